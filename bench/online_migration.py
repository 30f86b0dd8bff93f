#!/usr/bin/env python3
"""Online vs one-transaction migration under write load, on a real throwaway PostgreSQL 15 (prints figures).

  .venv/bin/python bench/online_migration.py [--rows 100000,2000000] [--huge] [--rate 150] [--dups 0.001]

For each table size: the incident database (drizzle-orm applied 0000-0006; book_view_statistics of
N unique rows plus --dups x N duplicate rows, 0007 pending), then, with writers running:
  - a random-row writer: UPDATE ... SET view_count = view_count + 1 WHERE id = <random> (--rate/s),
  - the app's track-view upsert on the incident book (20/s; it fails with 42P10 until 0007's
    constraint exists: that is the incident, counted apart),
`check` (plan + preflight + rehearsal, rolled back) and then `apply` of 0007, once in drizzle's
one-transaction mode and once in slipway's online mode (a fresh database each). Printed per run:
the longest and p99 write wait, writes over 50 ms, failed writes, deadlocks, phase times, whether
views were kept, and whether drizzle-orm's migrate() then agrees (applies nothing). --huge adds
10 M rows. Needs root (the cluster runs as the postgres user). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]  # the tests' helpers, the other benchmarks
os.environ.setdefault("SLIPWAY_SANDBOX_INSTANCE", "0")

import psycopg
from ansible_collections.slipway.core.plugins.module_utils import migrate as engine
from ansible_collections.slipway.core.plugins.module_utils.drizzle import read_folder
from bigtable import grow_statistics
from migrate_engine import JUDGE, MIGRATIONS, node_modules, upto_folder
from pgcluster import Cluster

INCIDENT_BOOK = "aa4a9ca1-9a21-4126-9a7a-39b17ff186bc"
UPSERT = ("INSERT INTO book_view_statistics (book_id, view_type, view_count, last_viewed_at) VALUES (%s, 'card_view', 1, now()) "
          "ON CONFLICT (book_id, view_type) DO UPDATE SET view_count = book_view_statistics.view_count + 1, last_viewed_at = now()")


class Writer(threading.Thread):
    """One connection writing at a fixed rate; records each write's wall time and its failures."""

    def __init__(self, cluster, db, rate, kind, max_id):
        super().__init__(daemon=True)
        self.conn = cluster.connect(db)
        self.rate, self.kind, self.max_id = rate, kind, max_id
        self.stop = threading.Event()
        self.waits, self.failed, self.deadlocks, self.no_constraint, self.ok = [], 0, 0, 0, 0
        self.errors: dict[str, int] = {}

    def run(self):
        period = 1.0 / self.rate
        rng = random.Random(7)
        nxt = time.monotonic()
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                if self.kind == "update":
                    cur = self.conn.execute("UPDATE book_view_statistics SET view_count = view_count + 1 WHERE id = %s",
                                            (rng.randint(1, self.max_id),))
                    self.ok += cur.rowcount  # 0 when 0007 merged that duplicate row away first: no view to keep
                else:
                    self.conn.execute(UPSERT, (INCIDENT_BOOK,))
                    self.ok += 1
            except psycopg.Error as exc:
                state = exc.sqlstate or "-"
                if state == "42P10":
                    self.no_constraint += 1  # the incident itself: no unique constraint yet
                else:
                    self.failed += 1
                    self.deadlocks += state == "40P01"
                    self.errors[state] = self.errors.get(state, 0) + 1
            self.waits.append((time.monotonic() - start) * 1000.0)
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))
        self.conn.close()


def incident(cluster, tmp, rows, dups):
    """0000-0006 applied; `rows` unique (book, type) rows and `dups` x rows duplicate rows."""
    db = cluster.createdb()
    with cluster.connect(db) as conn:
        engine.Engine(conn, read_folder(upto_folder(tmp, 7)), mode="transaction").apply()
        grow_statistics(conn, rows, dups)
        conn.execute("INSERT INTO books (id, title, author) VALUES (%s, 'incident', 'a')", (INCIDENT_BOOK,))
        conn.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count) VALUES "
                     "(%s, 'card_view', 5), (%s, 'card_view', 3)", (INCIDENT_BOOK, INCIDENT_BOOK))
        conn.execute("VACUUM ANALYZE book_view_statistics")
        total, count, max_id = conn.execute("SELECT sum(view_count), count(*), max(id) FROM book_view_statistics").fetchone()
    return db, total, count, max_id


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else 0.0


def run(cluster, tmp, mods, rows, dups, rate, mode):
    db, total, count, max_id = incident(cluster, tmp, rows, dups)
    writers = [Writer(cluster, db, rate, "update", max_id), Writer(cluster, db, 20, "upsert", max_id)]
    for w in writers:
        w.start()
    time.sleep(1.0)
    out = {"rows": count, "mode": mode}
    with cluster.connect(db) as conn:
        eng = engine.Engine(conn, read_folder(MIGRATIONS), mode=mode,
                            lock_timeout="5s" if mode == "online" else "0")  # drizzle sets no lock_timeout
        start = time.monotonic()
        try:
            plan = eng.check(rehearse=True)
            out["check"] = f"{(time.monotonic() - start):.1f}s " + ("ok" if not plan["blockers"] else "BLOCKED: " + plan["blockers"][0][:120])
        except engine.MigrationError as exc:
            out["check"] = f"{(time.monotonic() - start):.1f}s FAILED: {str(exc)[:160]}"
        check_waits = [list(w.waits) for w in writers]
        start = time.monotonic()
        try:
            done = engine.Engine(conn, read_folder(MIGRATIONS), mode=mode,
                                 lock_timeout="5s" if mode == "online" else "0").apply()
            out["apply"] = f"{(time.monotonic() - start):.1f}s {done['result']}"
            out["builds"] = "; ".join(f"{b['result']}" + (f" {b['ms']:.0f}ms" if "ms" in b else "") for b in done.get("builds", []))
            out["builds"] += " / transactions: " + ", ".join(f"{t['ms'] / 1000:.1f}s x{t['attempts']} tries"
                                                              for t in done.get("transactions", []))
        except engine.MigrationError as exc:
            out["apply"] = f"{(time.monotonic() - start):.1f}s FAILED: {str(exc)[:160]}"
    time.sleep(1.0)
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join()
    upd = writers[0]
    n_check = len(check_waits[0])
    out["check_max"] = max(check_waits[0][20:] or [0])  # after the first second of warm-up
    out["apply_waits"] = upd.waits[n_check:]
    out["waits"] = upd.waits[20:]
    out["writes"] = len(upd.waits)
    out["failed"] = upd.failed + writers[1].failed
    out["deadlocks"] = upd.deadlocks + writers[1].deadlocks
    out["errors"] = {**upd.errors, **writers[1].errors}
    out["upsert_42P10"] = writers[1].no_constraint
    with cluster.connect(db) as conn:
        after_total = conn.execute("SELECT sum(view_count) FROM book_view_statistics").fetchone()[0]
        constraint = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = "
                                  "'book_view_statistics_book_id_view_type_unique'").fetchone()[0]
        invalid = conn.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid").fetchone()[0]
    out["kept"] = after_total == total + upd.ok + writers[1].ok
    out["constraint"] = constraint == 1 and invalid == 0
    judge = subprocess.run(["node", str(JUDGE)], env={"PATH": os.environ["PATH"], "NODE_PATH": str(mods),
                                                      "DATABASE_URL": cluster.dsn(db), "MIGRATIONS": str(MIGRATIONS)},
                           capture_output=True, text=True)
    with cluster.connect(db) as conn:
        out["drizzle_agrees"] = judge.returncode == 0 and conn.execute(
            "SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0] == 8
        conn.execute("SELECT 1")
    with cluster.connect("postgres") as conn:
        conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,2000000")
    parser.add_argument("--huge", action="store_true", help="also 10,000,000 rows")
    parser.add_argument("--rate", type=int, default=150, help="random-row updates per second")
    parser.add_argument("--dups", type=float, default=0.001, help="duplicate rows per unique row")
    parser.add_argument("--modes", default="transaction,online")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: the benchmark starts a PostgreSQL cluster as the postgres user; run it as root")
    sizes = [int(x) for x in args.rows.split(",") if x] + ([10_000_000] if args.huge else [])
    mods = node_modules()
    cluster = Cluster(13)
    cluster.start()
    tmp = Path(tempfile.mkdtemp(prefix="slipway-bench-"))
    try:
        print(f"PostgreSQL 15 on 127.0.0.1:{cluster.port} (fsync off); {os.cpu_count()} CPUs; writers: {args.rate}/s "
              f"random-row UPDATE + 20/s track-view upsert; duplicates {args.dups:.1%} of rows")
        head = (f"{'rows':>9} {'mode':<11} {'max wait':>9} {'p99':>7} {'>50ms':>6} {'writes':>7} {'failed':>6} "
                f"{'deadlk':>6} {'42P10':>6}  check / apply / builds / views kept / constraint ok / drizzle agrees")
        print(head)
        for size in sizes:
            for mode in [m for m in args.modes.split(",") if m]:
                r = run(cluster, tmp, mods, size, args.dups, args.rate, mode)
                waits = r["waits"]
                print(f"{r['rows']:>9} {mode:<11} {max(waits or [0]):8.0f}ms {pct(waits, 0.99):6.0f}ms "
                      f"{sum(1 for w in waits if w > 50):>6} {r['writes']:>7} {r['failed']:>6} {r['deadlocks']:>6} "
                      f"{r['upsert_42P10']:>6}  {r['check']} / {r['apply']} / {r.get('builds') or '-'} / "
                      f"{'yes' if r['kept'] else 'NO'} / {'yes' if r['constraint'] else 'NO'} / "
                      f"{'yes' if r['drizzle_agrees'] else 'NO'}", flush=True)
                print(f"{'':>21} longest wait during check {r['check_max']:.0f}ms, during apply "
                      f"{max(r['apply_waits'] or [0]):.0f}ms; errors {r['errors'] or 'none'}", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
