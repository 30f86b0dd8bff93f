#!/usr/bin/env python3
"""Drift-check benchmark (prints figures; not a test): the catalog read and compare on an N-table
schema (goal: under 0.3 s for 200 tables), and the shadow build (the migrations replayed into a
database on the same server, read, dropped).

  .venv/bin/python bench/drift.py [--tables 200] [--repeat 5] [--instance 31]

A throwaway PostgreSQL 15 cluster (tests/pgcluster.py, instance --instance) gets a generated drizzle
history of N tables (each: uuid PK, 8 columns of mixed types with defaults, an enum column, a
UNIQUE constraint, an index, a foreign key to the previous table) in 4 migrations, applied by
slipway's engine; then the live schema is read and compared with the shadow's --repeat times, and a
drifted copy (a constraint and an index dropped, a column added) is checked once. Needs root (initdb
runs as postgres).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from ansible_collections.slipway.core.plugins.module_utils import catalog, drift, drizzle, shadow  # noqa: E402
from pgcluster import Cluster  # noqa: E402

from slipway import migrations as mig  # noqa: E402


def table_sql(i: int) -> str:
    ref = f',\n\t"parent_id" uuid REFERENCES "t{i - 1}"("id") ON DELETE CASCADE' if i else ""
    return (f'CREATE TABLE "t{i}" (\n\t"id" uuid PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,\n'
            f'\t"name" text NOT NULL,\n\t"slug" varchar(120) NOT NULL,\n\t"count" integer DEFAULT 0 NOT NULL,\n'
            f'\t"price" numeric(12, 2),\n\t"flags" jsonb DEFAULT \'{{}}\'::jsonb,\n\t"state" "state" DEFAULT \'new\',\n'
            f'\t"created_at" timestamp with time zone DEFAULT now() NOT NULL,\n\t"note" text{ref},\n'
            f'\tCONSTRAINT "t{i}_slug_unique" UNIQUE("slug")\n);\n--> statement-breakpoint\n'
            f'CREATE INDEX "t{i}_created_idx" ON "t{i}" USING btree ("created_at");\n--> statement-breakpoint\n')


def history(folder: Path, tables: int, parts: int = 4) -> None:
    (folder / "meta").mkdir(parents=True)
    entries, per = [], -(-tables // parts)
    for n in range(parts):
        tag = f"{n:04d}_part{n}"
        body = "CREATE TYPE \"state\" AS ENUM('new', 'active', 'gone');\n--> statement-breakpoint\n" if n == 0 else ""
        body += "".join(table_sql(i) for i in range(n * per, min(tables, (n + 1) * per)))
        (folder / f"{tag}.sql").write_text(body)
        entries.append({"idx": n, "version": "7", "when": 1700000000000 + n, "tag": tag, "breakpoints": True})
    (folder / "meta" / "_journal.json").write_text(json.dumps({"version": "7", "dialect": "postgresql",
                                                               "entries": entries}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--instance", type=int, default=31)
    parser.add_argument("--sandbox", default="11", help="sandbox instance for the full `invoke drift` timings ('' to skip)")
    args = parser.parse_args()
    cluster = Cluster(args.instance)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "migrations"
            history(folder, args.tables)
            db = cluster.createdb()
            started = time.monotonic()
            _, error, code = mig.run_dsn(cluster.dsn(db), str(folder), False)
            if code:
                raise SystemExit(f"error: the generated history did not apply: {error}")
            apply_s = time.monotonic() - started
            read = drizzle.read_folder(str(folder))
            with cluster.connect(db) as conn:
                started = time.monotonic()
                expected = shadow.build_shadow(conn, cluster.connect, read["migrations"])
                shadow_s = time.monotonic() - started
                reads, compares = [], []
                for _ in range(args.repeat):
                    started = time.monotonic()
                    actual = catalog.read(conn)
                    reads.append(time.monotonic() - started)
                    started = time.monotonic()
                    findings = drift.compare(expected, actual, read["migrations"], {})
                    compares.append(time.monotonic() - started)
                assert findings == [], findings[:3]
                conn.execute('ALTER TABLE "t7" DROP CONSTRAINT "t7_slug_unique"')
                conn.execute('DROP INDEX "t9_created_idx"')
                conn.execute('ALTER TABLE "t11" ADD COLUMN "hotfix" text')
                started = time.monotonic()
                result = shadow.check(conn, cluster.connect, read)
                check_s = time.monotonic() - started
            objects = len(actual)
    finally:
        cluster.stop()
    med = statistics.median
    print(f"schema: {args.tables} tables, {objects} catalog objects; applied by slipway in {apply_s:.2f}s")
    print(f"catalog read (live): median {med(reads) * 1000:.0f} ms of {args.repeat} (min {min(reads) * 1000:.0f})")
    print(f"compare: median {med(compares) * 1000:.1f} ms of {args.repeat}")
    print(f"read + compare: median {(med(reads) + med(compares)) * 1000:.0f} ms (goal: under 300 ms)")
    print(f"shadow build (create, replay {len(read['migrations'])} migrations, read, drop): {shadow_s:.2f}s")
    print(f"whole check of a drifted copy: {check_s:.2f}s, exit {result['exit']}, "
          f"{len(result['findings'])} findings: " + ", ".join(
              f"{f['severity']} {f['kind']} {f['object']['name']}" for f in result["findings"]))
    if args.sandbox:
        sandbox_timings(args.sandbox)
    return 0


def sandbox_timings(instance: str) -> None:
    """`invoke drift --host sandbox` as a user runs it, on a sandbox host in the drifted state: the
    shadow on the controller (the sandbox role may not create databases), then on the server."""
    import os
    import subprocess

    env = {**os.environ, "SLIPWAY_SANDBOX_INSTANCE": instance}
    invoke = [str(ROOT / ".venv" / "bin" / "invoke"), "--search-root", str(ROOT)]

    def run(*args):
        started = time.monotonic()
        proc = subprocess.run([*invoke, *args], env=env, capture_output=True, text=True, timeout=600, check=False)
        return time.monotonic() - started, proc

    try:
        for args in (("sandbox.down",), ("sandbox.up", "--state", "drifted")):
            if run(*args)[1].returncode:
                raise SystemExit(f"error: invoke {' '.join(args)} failed")
        times = [run("drift", "--host", "sandbox") for _ in range(3)]
        print("invoke drift --host sandbox (drifted; shadow on the controller): "
              + ", ".join(f"{t:.1f}s exit {p.returncode}" for t, p in times))
        seconds, proc = run("drift", "--host", "sandbox", "--fix")
        print(f"invoke drift --host sandbox --fix: {seconds:.1f}s exit {proc.returncode}")
    finally:
        run("sandbox.down")


if __name__ == "__main__":
    raise SystemExit(main())
