'use strict';

// PM2 process file: `APP_CURRENT=<app>/current pm2 start <app>/current/ecosystem.config.js`, then
// after switching `current` to a new release
// `APP_CURRENT=<app>/current RELEASE_ID=<id> pm2 reload <app>/current/ecosystem.config.js --update-env`.
//
// Why APP_CURRENT: require() resolves symlinks, so __dirname here is the release's real path
// (releases/<id>) even when this file is loaded through the `current` symlink. PM2 stores cwd and
// the script path once, at start, and `pm2 reload` reuses them: with a real path it would go on
// running the old release's code. Given the `current` link's own path, every reload starts the
// workers from whatever `current` points at then. Without APP_CURRENT this file's directory is
// used (fine for a one-off start from a plain checkout).
// Start the PM2 daemon with NODE_CLUSTER_SCHED_POLICY=none in its environment (slipway's pm2_app
// does): it is the cluster primary, and with Node's default round-robin hand-off a reload now and
// then loses a connection; with `none` the workers accept from the shared socket.
// In deployments `logs` is a symlink to a shared logs directory; it is not created here.
const fs = require('fs');
const path = require('path');
const { readEnvFile } = require('./lib/env');

const appDir = process.env.APP_CURRENT ? path.resolve(process.env.APP_CURRENT) : __dirname;
const logDir = path.join(appDir, 'logs');

module.exports = {
  apps: [
    {
      name: 'ollama-reader',
      script: path.join(appDir, 'server.js'),
      cwd: appDir,
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
        ...readEnvFile(path.join(appDir, '.env')),
        NODE_ENV: 'production',
        // the release directory's name (releases/<id>) that appDir resolves to now
        RELEASE_ID: process.env.RELEASE_ID || path.basename(fs.realpathSync(appDir)),
      },
    },
  ],
};
