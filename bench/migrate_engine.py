#!/usr/bin/env python3
"""Benchmark of the migration engine on a real, throwaway PostgreSQL 15 cluster (prints figures).

  .venv/bin/python bench/migrate_engine.py [--rows 10000,100000,1000000] [--repeat 5]

1. apply of 0000-0007 on an empty database: the engine in-process, `invoke migrate` as a command,
   and drizzle-orm's own migrate() as a command (node start-up included), median of --repeat;
2. per table size (book_view_statistics rows, 1 in 10 keys duplicated, at 0006): plan (journal +
   tracking rows: must not grow), static preflight (the duplicate-count query: grows), rehearsal
   (runs 0007 and rolls back: grows), and the real apply of 0007.
Needs root (the cluster runs as the postgres user). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]  # the tests' helpers (bigtable, pgcluster, faults)
os.environ.setdefault("SLIPWAY_SANDBOX_INSTANCE", "0")

from ansible_collections.slipway.core.plugins.module_utils import migrate as engine
from ansible_collections.slipway.core.plugins.module_utils.drizzle import read_folder
from pgcluster import Cluster

MIGRATIONS = ROOT / "examples" / "reader-app" / "migrations"
JUDGE = ROOT / "tests" / "js" / "drizzle_judge.js"


def node_modules() -> Path:
    local = ROOT / "examples" / "reader-app" / "node_modules"
    if (local / "drizzle-orm").exists():
        return local
    out = Path(tempfile.gettempdir()) / "slipway-bench-node"
    if not (out / "node_modules" / "drizzle-orm").exists():
        out.mkdir(exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(ROOT / "examples" / "reader-app" / name, out / name)
        subprocess.run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"], cwd=out, check=True)
    return out / "node_modules"


def upto_folder(tmp: Path, n: int) -> Path:
    dest = tmp / f"upto{n}"
    if not dest.exists():
        shutil.copytree(MIGRATIONS, dest)
        journal = json.loads((dest / "meta" / "_journal.json").read_text())
        for entry in journal["entries"][n:]:
            (dest / f"{entry['tag']}.sql").unlink()
        journal["entries"] = journal["entries"][:n]
        (dest / "meta" / "_journal.json").write_text(json.dumps(journal))
    return dest


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1000.0, result


def med(values):
    return f"{statistics.median(values):8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: the benchmark starts a PostgreSQL cluster as the postgres user; run it as root")
    sizes = [int(x) for x in args.rows.split(",") if x]
    mods = node_modules()
    cluster = Cluster(11)
    cluster.start()
    tmp = Path(tempfile.mkdtemp(prefix="slipway-bench-"))
    try:
        print(f"PostgreSQL 15 on 127.0.0.1:{cluster.port} (fsync off); {os.cpu_count()} CPUs; median of {args.repeat}")
        print("\n1. apply 0000-0007 on an empty database (ms)")
        inproc, cmd, drz = [], [], []
        env = {**os.environ, "BENCH_DSN": "", "NODE_PATH": str(mods)}
        for _ in range(args.repeat):
            db = cluster.createdb()
            with cluster.connect(db) as conn:
                ms, plan = timed(lambda: engine.Engine(conn, read_folder(MIGRATIONS)).apply())
            assert plan["applied_now"] and len(plan["applied_now"]) == 8
            inproc.append(ms)
            db = cluster.createdb()
            env["BENCH_DSN"] = cluster.dsn(db)
            ms, proc = timed(lambda: subprocess.run(
                [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "migrate", "--dsn-env", "BENCH_DSN",
                 "--migrations", str(MIGRATIONS)], env=env, capture_output=True, text=True))
            assert proc.returncode == 0, proc.stderr
            cmd.append(ms)
            db = cluster.createdb()
            ms, proc = timed(lambda db=db: subprocess.run(
                ["node", str(JUDGE)], env={**env, "DATABASE_URL": cluster.dsn(db), "MIGRATIONS": str(MIGRATIONS)},
                capture_output=True, text=True))
            assert proc.returncode == 0, proc.stderr
            drz.append(ms)
        print(f"   slipway engine, in-process (apply incl. lock, plan, preflight) {med(inproc)}")
        print(f"   `invoke migrate` command (Python start-up included)           {med(cmd)}")
        print(f"   drizzle-orm migrate() command (node start-up included)        {med(drz)}")

        print("\n2. 0007 against book_view_statistics of N rows (ms)")
        print(f"   {'rows':>9} {'plan':>8} {'preflight':>9} {'rehearsal':>9} {'apply':>8}  duplicate groups")
        for size in sizes:
            db = cluster.createdb()
            with cluster.connect(db) as conn:
                engine.Engine(conn, read_folder(upto_folder(tmp, 7))).apply()
                # keys (book k/2, type k%2) are unique per k; 1 row in 10 repeats the previous row's key
                conn.execute("INSERT INTO books (id, title, author) SELECT md5(i::text)::uuid, 'b' || i, 'a' "
                             "FROM generate_series(0, %s) i", (size // 2 + 1,))
                conn.execute(
                    "INSERT INTO book_view_statistics (book_id, view_type, view_count) "
                    "SELECT md5((k / 2)::text)::uuid, CASE WHEN k %% 2 = 0 THEN 'card_view' ELSE 'reader_open' END, 1 "
                    "FROM (SELECT CASE WHEN i %% 10 = 0 THEN i - 1 ELSE i END AS k FROM generate_series(1, %s) i) s",
                    (size,))
                conn.execute("ANALYZE book_view_statistics")
                plans, pres, rehs = [], [], []
                for _ in range(args.repeat):
                    plan = engine.Engine(conn, read_folder(MIGRATIONS)).check(rehearse=True)
                    assert plan["to_apply"] == ["0007_add_unique_constraint_book_view_statistics"], plan["blockers"]
                    plans.append(plan["timings_ms"]["plan"])
                    pres.append(plan["timings_ms"]["preflight"])
                    rehs.append(plan["timings_ms"]["rehearsal"])
                groups = plan["preflight"]["checks"][0]["live"]["groups"]
                ms, done = timed(lambda: engine.Engine(conn, read_folder(MIGRATIONS)).apply())
                assert done["applied_now"] == ["0007_add_unique_constraint_book_view_statistics"]
            print(f"   {size:>9} {med(plans)} {med(pres):>9} {med(rehs):>9} {ms:8.1f}  {groups}")
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
