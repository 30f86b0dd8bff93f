'use strict';

const http = require('http');
const path = require('path');
const crypto = require('crypto');
const { loadEnvFile } = require('./lib/env');

// A .env next to this file fills in variables not already set in the environment.
loadEnvFile(path.join(__dirname, '.env'));

const { Pool } = require('pg');

const HOST = process.env.HOST || '127.0.0.1';
const PORT = Number(process.env.PORT || 3000);
const API_TOKEN = process.env.API_TOKEN || '';
const RELEASE_ID = process.env.RELEASE_ID || null;

const BODY_LIMIT = 16 * 1024;
const HEALTH_TIMEOUT_MS = 2000;
const FORCE_EXIT_MS = 4000;
// On shutdown, keep-alive clients get this long to send one more request, answered with
// `Connection: close`, before the server stops listening and closes idle connections (closing a
// connection a client is about to reuse would fail that request).
const DRAIN_MS = 1500;
const VIEW_TYPES = ['card_view', 'reader_open'];
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

if (!API_TOKEN) {
  console.error('reader-app: API_TOKEN is not set; refusing to start (set it in the environment or in .env)');
  process.exit(1);
}
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) {
  console.error(`reader-app: invalid PORT ${JSON.stringify(process.env.PORT)}`);
  process.exit(1);
}

const pool = new Pool({
  connectionString: process.env.DATABASE_URL,
  max: 10,
  connectionTimeoutMillis: 5000,
});
// Errors on idle clients (e.g. the server restarting) must not crash the process.
pool.on('error', (err) => {
  console.error(`Idle database client error: ${err.message} (code ${err.code || 'unknown'})`);
});

const TRACK_VIEW_SQL = `INSERT INTO book_view_statistics (book_id, view_type, view_count, last_viewed_at)
VALUES ($1, $2, 1, NOW())
ON CONFLICT (book_id, view_type) DO UPDATE SET view_count = book_view_statistics.view_count + 1, last_viewed_at = NOW()`;

const STATS_SQL = `SELECT view_type, COALESCE(SUM(view_count), 0)::bigint AS total
FROM book_view_statistics
WHERE book_id = $1
GROUP BY view_type`;

let shuttingDown = false;

function sendJson(res, status, body) {
  if (res.headersSent) return;
  const payload = JSON.stringify(body);
  const headers = {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(payload),
  };
  if (shuttingDown) headers.Connection = 'close';
  res.writeHead(status, headers);
  res.end(payload);
}

const TOKEN_DIGEST = crypto.createHash('sha256').update(API_TOKEN).digest();

function isAuthorized(req) {
  const header = req.headers.authorization;
  if (typeof header !== 'string') return false;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (!match) return false;
  // Hash both sides so timingSafeEqual always compares equal-length buffers
  // and the token length is not leaked through timing.
  const given = crypto.createHash('sha256').update(match[1]).digest();
  return crypto.timingSafeEqual(given, TOKEN_DIGEST);
}

class BodyTooLarge extends Error {}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length']);
    if (Number.isFinite(declared) && declared > BODY_LIMIT) {
      reject(new BodyTooLarge());
      return;
    }
    const chunks = [];
    let size = 0;
    let done = false;
    req.on('data', (chunk) => {
      if (done) return;
      size += chunk.length;
      if (size > BODY_LIMIT) {
        done = true;
        reject(new BodyTooLarge());
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (done) return;
      done = true;
      resolve(Buffer.concat(chunks).toString('utf8'));
    });
    req.on('error', (err) => {
      if (done) return;
      done = true;
      reject(err);
    });
  });
}

function rejectTooLarge(req, res) {
  res.on('finish', () => req.destroy());
  res.setHeader('Connection', 'close');
  sendJson(res, 413, { error: 'Payload too large' });
}

async function handleTrackView(req, res, bookId) {
  if (!isAuthorized(req)) return sendJson(res, 401, { error: 'Unauthorized' });
  if (!UUID_RE.test(bookId)) return sendJson(res, 400, { error: 'Invalid book id' });

  let raw;
  try {
    raw = await readBody(req);
  } catch (err) {
    if (err instanceof BodyTooLarge) return rejectTooLarge(req, res);
    return sendJson(res, 400, { error: 'Invalid viewType' });
  }

  let viewType;
  try {
    const parsed = JSON.parse(raw);
    viewType = parsed && typeof parsed === 'object' ? parsed.viewType : undefined;
  } catch {
    viewType = undefined;
  }
  if (typeof viewType !== 'string' || !VIEW_TYPES.includes(viewType)) {
    return sendJson(res, 400, { error: 'Invalid viewType' });
  }

  try {
    await pool.query(TRACK_VIEW_SQL, [bookId, viewType]);
    return sendJson(res, 200, { success: true });
  } catch (err) {
    if (err.code === '23503') return sendJson(res, 404, { error: 'Book not found' });
    console.error(`Error tracking book view: ${err.message} (code ${err.code || 'unknown'})`);
    return sendJson(res, 500, { error: 'Failed to track book view' });
  }
}

async function handleStats(req, res, bookId) {
  if (!UUID_RE.test(bookId)) return sendJson(res, 400, { error: 'Invalid book id' });
  try {
    const { rows } = await pool.query(STATS_SQL, [bookId]);
    const stats = {};
    for (const type of VIEW_TYPES) stats[type] = 0;
    for (const row of rows) {
      if (VIEW_TYPES.includes(row.view_type)) stats[row.view_type] = Number(row.total);
    }
    return sendJson(res, 200, { bookId, stats });
  } catch (err) {
    console.error(`Error reading book stats: ${err.message} (code ${err.code || 'unknown'})`);
    return sendJson(res, 500, { error: 'Failed to read book stats' });
  }
}

async function handleHealth(req, res) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('health check timed out')), HEALTH_TIMEOUT_MS);
  });
  try {
    await Promise.race([pool.query('SELECT 1'), timeout]);
    return sendJson(res, 200, { status: 'ok', db: 'ok', release: RELEASE_ID, pid: process.pid });
  } catch (err) {
    console.error(`Health check failed: ${err.message} (code ${err.code || 'unknown'})`);
    return sendJson(res, 503, { status: 'error', db: 'unreachable', release: RELEASE_ID, pid: process.pid });
  } finally {
    clearTimeout(timer);
  }
}

const BOOK_ROUTE = /^\/api\/books\/([^/]+)\/(track-view|stats)\/?$/;

async function route(req, res) {
  let pathname;
  try {
    pathname = new URL(req.url, 'http://localhost').pathname;
  } catch {
    return sendJson(res, 404, { error: 'Not found' });
  }

  if (req.method === 'GET' && (pathname === '/api/health' || pathname === '/api/health/')) {
    return handleHealth(req, res);
  }
  const m = BOOK_ROUTE.exec(pathname);
  if (m) {
    let bookId;
    try {
      bookId = decodeURIComponent(m[1]);
    } catch {
      bookId = m[1];
    }
    if (m[2] === 'track-view' && req.method === 'POST') return handleTrackView(req, res, bookId);
    if (m[2] === 'stats' && req.method === 'GET') return handleStats(req, res, bookId);
  }
  return sendJson(res, 404, { error: 'Not found' });
}

const server = http.createServer((req, res) => {
  route(req, res).catch((err) => {
    console.error(`Unhandled request error: ${err.message}`);
    sendJson(res, 500, { error: 'Internal server error' });
  });
});

server.on('error', (err) => {
  console.error(`reader-app: server error: ${err.message} (code ${err.code || 'unknown'})`);
  process.exit(1);
});

server.listen(PORT, HOST, () => {
  const addr = server.address();
  const where = addr && typeof addr === 'object' ? `${HOST}:${addr.port}` : `${HOST}:${PORT}`;
  console.log(`reader-app listening on ${where} (release ${RELEASE_ID || 'none'}, pid ${process.pid})`);
  if (typeof process.send === 'function') process.send('ready');
});

function shutdown(signal) {
  if (shuttingDown) return;
  shuttingDown = true;
  console.log(`reader-app received ${signal}, shutting down (pid ${process.pid})`);

  const force = setTimeout(() => {
    console.error('reader-app: graceful shutdown timed out after 4s, forcing exit');
    process.exit(1);
  }, FORCE_EXIT_MS);
  force.unref();

  // Drain first: for DRAIN_MS every response says `Connection: close`, so keep-alive clients end
  // their connections after one more request. Only then stop listening: since Node 19,
  // server.close() also closes idle keep-alive connections at once, and a client reusing one at
  // that moment would see its request fail.
  const drain = setTimeout(() => {
    server.close(() => {
      pool
        .end()
        .catch((err) => console.error(`reader-app: error closing database pool: ${err.message}`))
        .finally(() => {
          console.log('reader-app stopped');
          process.exit(0);
        });
    });
    server.closeIdleConnections();
  }, DRAIN_MS);
  drain.unref();
}

process.on('SIGINT', () => shutdown('SIGINT'));
process.on('SIGTERM', () => shutdown('SIGTERM'));
