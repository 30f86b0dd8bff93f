'use strict';

// Usage: node scripts/migrate.js [migrationsFolder]
// Applies Drizzle migrations (default: ./migrations next to the app) using
// drizzle-orm's own migrator. DATABASE_URL comes from the environment or .env.
const path = require('path');
const { loadEnvFile } = require('../lib/env');

const appDir = path.resolve(__dirname, '..');
loadEnvFile(path.join(appDir, '.env'));

const { Pool } = require('pg');
const { drizzle } = require('drizzle-orm/node-postgres');
const { migrate } = require('drizzle-orm/node-postgres/migrator');

async function main() {
  const arg = process.argv[2];
  const migrationsFolder = arg ? path.resolve(process.cwd(), arg) : path.join(appDir, 'migrations');

  if (!process.env.DATABASE_URL) throw new Error('DATABASE_URL is not set');

  const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
  pool.on('error', () => {});
  try {
    const db = drizzle(pool);
    await migrate(db, { migrationsFolder });
  } finally {
    await pool.end().catch(() => {});
  }
  console.log(`migrations applied from ${migrationsFolder}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    // Drizzle wraps the database error; report the underlying cause too.
    const cause = err && err.cause;
    let msg = `migration failed: ${err && err.message ? err.message : String(err)}`;
    if (cause && cause.message) msg += ` (cause: ${cause.message}${cause.code ? `, code ${cause.code}` : ''})`;
    console.error(msg);
    process.exit(1);
  },
);
