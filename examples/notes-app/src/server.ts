// notes-api: a small JSON API on PostgreSQL (drizzle-orm + node-postgres). Its settings come from
// the environment, or a .env file in its working directory (dotenv): DATABASE_URL, PORT, HOST.
import "dotenv/config";
import http from "node:http";
import { desc } from "drizzle-orm";
import { drizzle } from "drizzle-orm/node-postgres";
import { Pool } from "pg";
import { notes } from "./schema";

const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 4 });
pool.on("error", (err) => console.error(`database pool error: ${err.message}`));
const db = drizzle(pool);

function send(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

async function readJson(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  const parsed = JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}");
  return parsed && typeof parsed === "object" ? parsed : {};
}

const server = http.createServer(async (req, res) => {
  const path = (req.url ?? "/").split("?")[0];
  try {
    if (req.method === "GET" && path === "/healthz") {
      await pool.query("SELECT 1");
      return send(res, 200, { ok: true });
    }
    if (req.method === "GET" && path === "/api/notes") {
      return send(res, 200, { notes: await db.select().from(notes).orderBy(desc(notes.id)).limit(50) });
    }
    if (req.method === "POST" && path === "/api/notes") {
      const body = await readJson(req);
      if (typeof body.body !== "string" || !body.body) return send(res, 400, { error: "body is required" });
      const [note] = await db.insert(notes).values({ body: body.body }).returning();
      return send(res, 201, { note });
    }
    return send(res, 404, { error: "not found" });
  } catch (err) {
    console.error(`request ${req.method} ${path} failed: ${(err as Error).message}`);
    return send(res, 500, { error: "internal error" });
  }
});

const port = Number(process.env.PORT || 3000);
server.listen(port, process.env.HOST || "127.0.0.1", () => {
  console.log(`notes-api listening on ${process.env.HOST || "127.0.0.1"}:${port}`);
});
