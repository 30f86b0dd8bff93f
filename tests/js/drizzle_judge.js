'use strict';
// The compatibility judge: drizzle-orm's own migrate() (node-postgres driver), as an app runs it.
// Env: DATABASE_URL, MIGRATIONS (folder), optional MIGRATIONS_SCHEMA / MIGRATIONS_TABLE.
// NODE_PATH points at a node_modules with the reader app's pinned drizzle-orm and pg.
const { Pool } = require('pg');
const { drizzle } = require('drizzle-orm/node-postgres');
const { migrate } = require('drizzle-orm/node-postgres/migrator');

async function main() {
  const config = { migrationsFolder: process.env.MIGRATIONS };
  if (process.env.MIGRATIONS_SCHEMA) config.migrationsSchema = process.env.MIGRATIONS_SCHEMA;
  if (process.env.MIGRATIONS_TABLE) config.migrationsTable = process.env.MIGRATIONS_TABLE;
  const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
  try {
    await migrate(drizzle(pool), config);
  } finally {
    await pool.end();
  }
  console.log('drizzle migrate: ok');
}

main().catch((err) => {
  const cause = err && err.cause ? ` (cause: ${err.cause.message}, code ${err.cause.code})` : '';
  console.error(`drizzle migrate failed: ${err.message}${cause}`);
  process.exit(1);
});
