'use strict';

// PM2 process file: `pm2 startOrReload ecosystem.config.js`.
// In deployments `logs` is a symlink to a shared logs directory; it is not created here.
const path = require('path');
const { readEnvFile } = require('./lib/env');

const logDir = path.join(__dirname, 'logs');

module.exports = {
  apps: [
    {
      name: 'ollama-reader',
      script: 'server.js',
      cwd: __dirname,
      exec_mode: 'cluster',
      instances: Number(process.env.APP_INSTANCES || 2),
      wait_ready: true,
      listen_timeout: 10000,
      kill_timeout: 5000,
      merge_logs: true,
      time: true,
      error_file: path.join(logDir, 'err.log'),
      out_file: path.join(logDir, 'out.log'),
      log_file: path.join(logDir, 'combined.log'),
      env: {
        ...readEnvFile(path.join(__dirname, '.env')),
        NODE_ENV: 'production',
        // the release directory's name (releases/<id>); require() resolves the `current` symlink
        RELEASE_ID: process.env.RELEASE_ID || path.basename(__dirname),
      },
    },
  ],
};
