#!/usr/bin/env python3
"""`invoke deploy` of the incident fix on a sandbox host whose table is big, under write load (prints figures).

  .venv/bin/python bench/deploy_under_load.py [--rows 2000000] [--dups 0.001] [--rate 150] [--mode online]

A sandbox host (instance 3: its own users and ports, so a demo or the test suite are not touched)
in the incident state; book_view_statistics grown to --rows unique rows plus --dups x rows
duplicates; then, while
  - a random-row writer runs UPDATE ... SET view_count = view_count + 1 WHERE id = <random> (--rate/s)
  - a client POSTs the app's track-view for the incident book (10/s; 500 until 0007's constraint
    exists: the incident itself, counted apart)
`invoke deploy --host <host>` runs (preflight with plan and rehearsal, backup, 0007, smoke tests).
Printed: deploy result and time, its phase times, the longest and p99 write wait, writes over
50 ms, failed writes, deadlocks, track-view statuses before/after the fix, views kept. --mode
transaction sets slipway_migrate_mode for drizzle's one-transaction path. Needs root. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["SLIPWAY_SANDBOX_INSTANCE"] = "3"
os.environ.pop("SLIPWAY_SANDBOX_DIR", None)
sys.path[:0] = [str(ROOT / "tests")]  # the tests' helpers (bigtable, pgcluster, faults)

import psycopg
from bigtable import grow_statistics

from slipway import sandbox as sb

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def invoke(*args, env=None, timeout=1800):
    return subprocess.run([*INVOKE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def host_env(name):
    out = invoke("sandbox.env", "--host", name).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line[len("export "):].partition("=")
        values[key] = shlex.split(value)[0]
    return values


class Updater(threading.Thread):
    def __init__(self, dsn, rate, max_id):
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.rate, self.max_id = rate, max_id
        self.stop = threading.Event()
        self.samples, self.ok, self.gone, self.failed, self.deadlocks, self.errors = [], 0, 0, 0, 0, {}

    def run(self):
        rng, period, nxt = random.Random(3), 1.0 / self.rate, time.monotonic()
        while not self.stop.is_set():
            start = time.monotonic()
            row = rng.randint(1, self.max_id)
            try:
                cur = self.conn.execute("UPDATE book_view_statistics SET view_count = view_count + 1 WHERE id = %s", (row,))
                self.ok += cur.rowcount  # 0 when 0007 deleted that duplicate row first: no view to keep
                self.gone += 1 - cur.rowcount
            except psycopg.Error as exc:
                self.failed += 1
                self.deadlocks += exc.sqlstate == "40P01"
                self.errors[exc.sqlstate] = self.errors.get(exc.sqlstate, 0) + 1
            self.samples.append((start, (time.monotonic() - start) * 1000.0, row))
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))
        self.conn.close()


class Tracker(threading.Thread):
    def __init__(self, env, rate):
        super().__init__(daemon=True)
        self.env, self.rate = env, rate
        self.stop = threading.Event()
        self.statuses: list[tuple[float, int]] = []

    def run(self):
        period, nxt = 1.0 / self.rate, time.monotonic()
        while not self.stop.is_set():
            try:
                status, _ = sb.http_json("POST", f"{self.env['APP_URL']}/api/books/{sb.INCIDENT_BOOK}/track-view",
                                         {"viewType": "card_view"}, token=self.env["API_TOKEN"], timeout=5)
            except OSError:
                status = 0
            self.statuses.append((time.monotonic(), status))
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))


def grow(dsn, rows, dups):
    with psycopg.connect(dsn, autocommit=True) as conn:
        grow_statistics(conn, rows, dups)
        return conn.execute("SELECT max(id), count(*), pg_size_pretty(pg_total_relation_size('book_view_statistics')) "
                            "FROM book_view_statistics").fetchone()


def views(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT sum(view_count) FROM book_view_statistics WHERE book_id <> %s",
                            (sb.SMOKE_BOOK,)).fetchone()[0]


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dups", type=float, default=0.001)
    parser.add_argument("--rate", type=int, default=150)
    parser.add_argument("--mode", choices=("online", "transaction"), default="online")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: the sandbox needs root; run it as root")
    invoke("sandbox.down")
    up = invoke("sandbox.up", "--hosts", "1", "--state", "incident")
    if up.returncode != 0:
        sys.exit(f"error: sandbox.up failed: {up.stderr.strip()[-300:]}")
    try:
        name = sb.hosts_in_record()[0].name
        env = host_env(name)
        dsn = env["DATABASE_URL"]
        start = time.monotonic()
        max_id, count, size = grow(dsn, args.rows, args.dups)
        print(f"{name}: book_view_statistics {count} rows, {size}, grown in {time.monotonic() - start:.0f}s; "
              f"writers {args.rate}/s random-row UPDATE + 10/s track-view; mode {args.mode}", flush=True)
        if args.mode == "transaction":  # the inventory variable a user sets for drizzle's one transaction
            import yaml

            inv = sb.Controller().inventory_file
            data = yaml.safe_load(inv.read_text())
            for host in data["all"]["children"]["sandboxes"]["hosts"].values():
                host["slipway_migrate_mode"] = "transaction"
            inv.write_text(yaml.safe_dump(data, sort_keys=False))
        before = views(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:  # the rows 0007's consolidation rewrites
            merged = {r[0] for r in conn.execute(
                "SELECT id FROM book_view_statistics b JOIN (SELECT book_id, view_type FROM book_view_statistics "
                "GROUP BY 1, 2 HAVING count(*) > 1) d USING (book_id, view_type)").fetchall()}
        updater, tracker = Updater(dsn, args.rate, max_id), Tracker(env, 10)
        updater.start()
        tracker.start()
        time.sleep(2.0)
        report = Path(tempfile.mkdtemp(prefix="slipway-bench-")) / "report.json"
        t0 = time.monotonic()
        proc = invoke("deploy", "--host", name, "--report", str(report))
        t1 = time.monotonic()
        time.sleep(2.0)
        updater.stop.set()
        tracker.stop.set()
        updater.join()
        tracker.join()
        after = views(dsn)
        during = [ms for at, ms, _ in updater.samples if t0 <= at <= t1]
        slow = [(at - t0, ms, row in merged) for at, ms, row in updater.samples if ms > 50]
        statuses_before = [s for at, s in tracker.statuses if at < t0]
        statuses_after = [s for at, s in tracker.statuses if at > t1]
        tv_ok = sum(1 for _, s in tracker.statuses if s == 200)
        print(f"deploy: exit {proc.returncode} in {t1 - t0:.1f}s; last line: {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]}")
        if report.exists():
            doc = json.loads(report.read_text())
            for info in doc.get("hosts", {}).values():
                print("phases: " + ", ".join(f"{p['name']} {p['seconds']:.1f}s" for p in info.get("phases", [])))
        print(f"writes during the deploy: {len(during)}; longest wait {max(during or [0]):.0f} ms; p99 {pct(during, 0.99):.0f} ms; "
              f"over 50 ms: {sum(1 for w in during if w > 50)}; failed {updater.failed} {updater.errors or ''}; "
              f"deadlocks {updater.deadlocks}")
        print(f"rows 0007 consolidates: {len(merged)}; writes over 50 ms (s after the deploy started, ms, "
              f"on a row being consolidated): {[(round(a, 1), round(m), c) for a, m, c in slow]}")
        print(f"track-view: before the deploy {sorted(set(statuses_before))} x{len(statuses_before)}, "
              f"after it {sorted(set(statuses_after))} x{len(statuses_after)}")
        print(f"views kept: {'yes' if after == before + updater.ok + tv_ok else 'NO'} "
              f"(before {before}, +{updater.ok} updates, +{tv_ok} track-views, after {after}; "
              f"{updater.gone} updates found their row already merged away)")
    finally:
        invoke("sandbox.down")


if __name__ == "__main__":
    main()
