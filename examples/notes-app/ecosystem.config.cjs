// PM2 process file, as the app's authors wrote it: nothing in it is there for slipway.
module.exports = {
  apps: [
    {
      name: "notes-api",
      script: "dist/server.js",
      exec_mode: "cluster",
      instances: 2,
      env: { NODE_ENV: "production" },
    },
  ],
};
