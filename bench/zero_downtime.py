#!/usr/bin/env python3
"""Zero-downtime benchmark: steady track-view load through `invoke deploy` vs. the runbook by hand (prints figures).

  .venv/bin/python bench/zero_downtime.py [--rate 250] [--min-requests 5000] [--instance 7] [--keep-up]
                                          [--no-stale-check]

Starts a fresh sandbox (instance --instance) in the incident state (0007 not applied) and makes the
host run "v1": the reference app whose track-view is an update-then-insert that needs no UNIQUE
constraint (so it answers 200 before 0007). Then, with a fixed-rate keep-alive load on
POST /api/books/<id>/track-view from this machine to the host's address:
1. `invoke deploy --host sandbox` ships v2 (the reference app: the upsert), applies 0007 and
   `pm2 reload`s the cluster (2 instances);
2. the runbook by hand from the same starting point with ONE instance: `invoke migrate`, switch
   `current` to v2, `pm2 restart` (the sandbox is brought up afresh for it);
for each: requests sent, 200s, failures by cause, and the load book's view_count delta in the
database against the 200s (lost = 200s - delta). The clients check an idle keep-alive connection
before reusing it, as pooled clients do (urllib3); --no-stale-check reuses it blindly, so each
connection a retiring worker closed fails its next request. 3. wall time of the full deploy, of a no-op
re-deploy, and of one raw `ssh` doing the same read-only checks.
Needs root (the sandbox does). Not a test: nothing is asserted. Secrets are read from
`invoke sandbox.env` and never printed.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import pwd
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from slipway import sandbox as sb
from slipway.errors import SlipwayError

INVOKE = ROOT / ".venv" / "bin" / "invoke"
MIGRATIONS = ROOT / "examples" / "reader-app" / "migrations"
# a seeded book with ONE statistics row per view type: 0007's consolidation never touches its rows
LOAD_BOOK = "3e9d7c1a-2b4f-4a6e-8c0d-9e8f7a6b5c4d"
LOAD_VIEW = "card_view"
THREADS = 32

UPSERT_SQL = """const TRACK_VIEW_SQL = `INSERT INTO book_view_statistics (book_id, view_type, view_count, last_viewed_at)
VALUES ($1, $2, 1, NOW())
ON CONFLICT (book_id, view_type) DO UPDATE SET view_count = book_view_statistics.view_count + 1, last_viewed_at = NOW()`;"""
# v1: no UNIQUE constraint needed; increments the lowest-id row of the key (the row 0007 keeps),
# inserts only when the key has no row yet
V1_SQL = """const TRACK_VIEW_SQL = `WITH upd AS (
  UPDATE book_view_statistics SET view_count = view_count + 1, last_viewed_at = NOW()
  WHERE id = (SELECT id FROM book_view_statistics WHERE book_id = $1::uuid AND view_type = $2::varchar ORDER BY id LIMIT 1)
  RETURNING id)
INSERT INTO book_view_statistics (book_id, view_type, view_count, last_viewed_at)
SELECT $1::uuid, $2::varchar, 1, NOW() WHERE NOT EXISTS (SELECT 1 FROM upd)`;"""


def say(message: str) -> None:
    print(f"  {message}", flush=True)


# --------------------------------------------------------------------------------------------
# invoke as the user runs it
# --------------------------------------------------------------------------------------------
class Cli:
    def __init__(self, instance: int):
        self.env = {**os.environ, "SLIPWAY_SANDBOX_INSTANCE": str(instance)}
        self.secrets: list[str] = []

    def mask(self, text: str) -> str:
        for value in self.secrets:
            text = text.replace(value, "***")
        return text

    def run(self, *args, check=True, env=None, timeout=600) -> tuple[float, subprocess.CompletedProcess]:
        started = time.perf_counter()
        proc = subprocess.run([str(INVOKE), "--search-root", str(ROOT), *args], check=False, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        seconds = time.perf_counter() - started
        if check and proc.returncode != 0:
            tail = self.mask((proc.stdout + proc.stderr).strip()).splitlines()[-15:]
            raise SlipwayError(f"invoke {' '.join(args)} exited {proc.returncode}:\n    " + "\n    ".join(tail))
        return seconds, proc

    def sandbox_env(self) -> dict:
        """APP_URL, API_TOKEN, DATABASE_URL of host `sandbox` (kept in memory, never printed)."""
        _, proc = self.run("sandbox.env", "--host", "sandbox")
        values = {}
        for line in proc.stdout.splitlines():
            parts = shlex.split(line)
            if len(parts) == 2 and parts[0] == "export" and "=" in parts[1]:
                key, value = parts[1].split("=", 1)
                values[key] = value
        self.secrets = [values["API_TOKEN"], values["DATABASE_URL"], values["DATABASE_URL"].split(":")[2].split("@")[0]]
        return values


def fresh_sandbox(cli: Cli) -> float:
    cli.run("sandbox.down")
    seconds, _ = cli.run("sandbox.up", "--state", "incident")
    return seconds


# --------------------------------------------------------------------------------------------
# v1 on the host, without applying 0007
# --------------------------------------------------------------------------------------------
def v1_source(tmp: Path) -> tuple[str, Path]:
    """The reference app with the constraint-free track-view SQL; (release id, its server.js)."""
    src = tmp / "reader-app-v1"
    for rel in sb.app_files(sb.READER_APP):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sb.READER_APP / rel, src / rel)
    server = src / "server.js"
    text = server.read_text()
    if UPSERT_SQL not in text:
        raise SlipwayError("examples/reader-app/server.js no longer holds the expected TRACK_VIEW_SQL; update V1_SQL/UPSERT_SQL in this script")
    server.write_text(text.replace(UPSERT_SQL, V1_SQL))
    return sb.release_id(src), server


def wait_health(host: sb.Host, release: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = sb.http_json("GET", f"{host.app_url}/api/health", timeout=2)
            if status == 200 and isinstance(body, dict) and body.get("release") == release:
                return
            last = f"HTTP {status} release {body.get('release') if isinstance(body, dict) else '?'}"
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise SlipwayError(f"the app did not serve release {release} within {timeout:.0f}s ({last})")


def install_v1(host: sb.Host, v1: str, server_js: Path, instances: int, drop_reference: bool, token: str) -> str:
    """Copy the running (reference) release to releases/<v1>, patch server.js, switch `current`,
    start it under PM2 with ``instances`` workers; returns the reference release id (v2)."""
    user = pwd.getpwnam(host.user)
    releases = host.app_dir / "releases"
    current = host.app_dir / "current"
    v2 = os.path.basename(os.path.realpath(current))
    if v2 == v1:
        raise SlipwayError("the sandbox already runs v1; bring it down first")
    tmp = releases / f".{v1}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(releases / v2, tmp, symlinks=True)
    shutil.copy2(server_js, tmp / "server.js")
    (tmp / ".slipway-built").write_text(v1 + "\n")
    sb.chown_tree(tmp, user)
    tmp.rename(releases / v1)
    sb._symlink(f"releases/{v1}", current, user)
    env = sb.pm2_start_env(host, user)
    env["APP_INSTANCES"] = str(instances)
    sb.pm2(host, user, "delete", sb.APP_NAME, check=False)
    sb.run(["pm2", "start", current / "ecosystem.config.js"], env=env, cwd=host.app_dir, user=user, timeout=90)
    wait_health(host, v1)
    status, _ = sb.http_json("POST", f"{host.app_url}/api/books/{LOAD_BOOK}/track-view", {"viewType": LOAD_VIEW}, token=token)
    if status != 200:
        raise SlipwayError(f"v1 answers HTTP {status} on track-view; see {host.app_dir}/logs/err.log")
    online = sb.pm2_app_state(host, user)
    if drop_reference:
        # the deploy must ship v2 itself (upload, npm ci), not find it already installed
        shutil.rmtree(releases / v2)
    say(f"host runs v1 {v1} ({online['online']}/{online['instances']} online), 0007 not applied; v2 = {v2}"
        + (" (removed from the host: the deploy installs it)" if drop_reference else " (kept installed)"))
    return v2


def view_count(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return conn.execute("SELECT COALESCE(SUM(view_count), 0) FROM book_view_statistics WHERE book_id = %s AND view_type = %s",
                            (LOAD_BOOK, LOAD_VIEW)).fetchone()[0]


# --------------------------------------------------------------------------------------------
# Load: fixed rate (request k is due at t0 + k/rate), keep-alive connections, one per thread
# --------------------------------------------------------------------------------------------
class Load:
    def __init__(self, address: str, port: int, token: str, rate: float, stale_check: bool, threads: int = THREADS):
        self.address, self.port, self.rate, self.threads = address, port, rate, threads
        self.stale_check = stale_check
        self.stale_dropped = 0
        self.body = json.dumps({"viewType": LOAD_VIEW}).encode()
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.path = f"/api/books/{LOAD_BOOK}/track-view"
        self.lock = threading.Lock()
        self.next_ticket = 0
        self.stop = threading.Event()
        self.results: list[tuple[float, float, str]] = []  # (sent at, latency s, outcome)
        self.workers: list[threading.Thread] = []
        self.t0 = 0.0
        self.action_at = 0.0  # load time at which the deploy / the runbook started

    def start(self) -> None:
        self.t0 = time.monotonic() + 0.05
        for _ in range(self.threads):
            worker = threading.Thread(target=self._worker, daemon=True)
            worker.start()
            self.workers.append(worker)

    def sent(self) -> int:
        with self.lock:
            return len(self.results)

    def finish(self) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout=15)

    def _worker(self) -> None:
        conn = None
        while not self.stop.is_set():
            with self.lock:
                ticket = self.next_ticket
                self.next_ticket += 1
            due = self.t0 + ticket / self.rate
            delay = due - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                return
            if conn is not None and self.stale_check and conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
                # readable while idle = the server closed it (EOF): reconnect instead of reusing it,
                # as pooled clients do (urllib3's is_connection_dropped); not a failed request
                conn.close()
                conn = None
                with self.lock:
                    self.stale_dropped += 1
            if conn is None:
                conn = http.client.HTTPConnection(self.address, self.port, timeout=10)
                used = 0
            started = time.monotonic()
            try:
                conn.request("POST", self.path, body=self.body, headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                outcome = f"HTTP {resp.status}"
                used += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                # a reused keep-alive connection the server closed vs. a new connection that failed
                outcome = f"{type(exc).__name__} ({'reused' if used else 'new'} conn)"
                conn.close()
                conn = None
            with self.lock:
                self.results.append((started - self.t0, time.monotonic() - started, outcome))
        if conn is not None:
            conn.close()

    def figures(self) -> dict:
        with self.lock:
            results = list(self.results)
        outcomes = collections.Counter(r[2] for r in results)
        failed = [r for r in results if r[2] != "HTTP 200"]
        lat = sorted(r[1] for r in results)
        span = max(r[0] for r in results) if results else 0.0
        return {
            "stale_dropped": self.stale_dropped,
            "sent": len(results),
            "ok": outcomes.get("HTTP 200", 0),
            "failures": {k: v for k, v in sorted(outcomes.items()) if k != "HTTP 200"},
            "failed_window": (min(r[0] for r in failed) - self.action_at, max(r[0] for r in failed) - self.action_at) if failed else None,
            "seconds": span,
            "rate": len(results) / span if span else 0.0,
            "p50_ms": statistics.median(lat) * 1000 if lat else 0.0,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000 if lat else 0.0,
            "max_ms": lat[-1] * 1000 if lat else 0.0,
        }


def run_load(load: Load, min_requests: int, action) -> tuple[dict, object]:
    """Run ``action()`` under the load; the load goes on until min_requests were sent and the
    action finished, then 1 s more."""
    load.start()
    time.sleep(1.0)  # steady state before the action
    load.action_at = time.monotonic() - load.t0
    try:
        outcome = action()
    finally:
        done = time.monotonic()
        while load.sent() < min_requests or time.monotonic() < done + 1.0:
            time.sleep(0.05)
        load.finish()
    return load.figures(), outcome


# --------------------------------------------------------------------------------------------
# The three measurements
# --------------------------------------------------------------------------------------------
def part_deploy(cli: Cli, host: sb.Host, creds: dict, args, tmp: Path) -> dict:
    report_file = tmp / "deploy-report.json"
    before = view_count(creds["DATABASE_URL"])
    load = Load(host.address, sb.APP_PORT, creds["API_TOKEN"], args.rate, not args.no_stale_check)

    def action():
        seconds, proc = cli.run("deploy", "--host", "sandbox", "--report", str(report_file), check=False)
        return seconds, proc.returncode, proc.stdout + proc.stderr

    figures, (seconds, rc, output) = run_load(load, args.min_requests, action)
    after = view_count(creds["DATABASE_URL"])
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    info = (report.get("hosts") or {}).get("sandbox") or {}
    if rc != 0:
        say("deploy output (tail):")
        for line in cli.mask(output).strip().splitlines()[-15:]:
            say("  " + line)
    figures.update(delta=after - before, action_seconds=seconds, rc=rc, report=info, result=report.get("result"))
    return figures


def part_runbook(cli: Cli, host: sb.Host, creds: dict, v2: str, args) -> dict:
    user = pwd.getpwnam(host.user)
    before = view_count(creds["DATABASE_URL"])
    load = Load(host.address, sb.APP_PORT, creds["API_TOKEN"], args.rate, not args.no_stale_check)
    steps = {}

    def action():
        started = time.perf_counter()
        steps["migrate"], _ = cli.run("migrate", "--dsn-env", "DATABASE_URL", "--migrations", str(MIGRATIONS),
                                      env={"DATABASE_URL": creds["DATABASE_URL"]})
        t = time.perf_counter()
        sb._symlink(f"releases/{v2}", host.app_dir / "current", user)
        steps["switch"] = time.perf_counter() - t
        t = time.perf_counter()
        env = sb.pm2_start_env(host, user)  # RELEASE_ID = v2 (what current points at now)
        env["APP_INSTANCES"] = "1"
        sb.run(["pm2", "restart", sb.APP_NAME, "--update-env"], env=env, cwd=host.app_dir, user=user, timeout=90)
        steps["restart"] = time.perf_counter() - t
        wait_health(host, v2)
        return time.perf_counter() - started

    figures, seconds = run_load(load, args.min_requests, action)
    after = view_count(creds["DATABASE_URL"])
    figures.update(delta=after - before, action_seconds=seconds, steps=steps)
    return figures


RAW_SSH = r"""set -eu
cd "$HOME/app"
echo "current $(readlink current)"
pw=$(sed -n 's|^DATABASE_URL=postgres://[^:]*:\([^@]*\)@.*|\1|p' shared/.env)
echo "tracking_rows $(PGPASSWORD="$pw" psql -X -At -h {addr} -p {pgport} -U {dbuser} -d {db} -c 'SELECT count(*) FROM drizzle.__drizzle_migrations')"
PM2_HOME="$HOME/.pm2" pm2 jlist | python3 -c '
import json, sys
procs = [p for p in json.load(sys.stdin) if p.get("name") == "{app}"]
print("pm2", len(procs), "instances", ",".join(sorted(set(p["pm2_env"]["status"] for p in procs))),
      "restarts", sum(p["pm2_env"].get("restart_time", 0) for p in procs))'
echo "health $(curl -fsS -o /dev/null -w '%{{http_code}}' {url}/api/health)"
echo "stats $(curl -fsS -o /dev/null -w '%{{http_code}}' {url}/api/books/{book}/stats)"
"""


def raw_ssh(host: sb.Host, repeat: int) -> tuple[float, list[str]]:
    script = RAW_SSH.format(addr=host.address, pgport=sb.PG_PORT, dbuser=sb.DB_USER, db=sb.DB_NAME, app=sb.APP_NAME,
                            url=host.app_url, book=sb.SMOKE_BOOK)
    config = sb.Controller().ssh_config
    times, lines = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        proc = subprocess.run(["ssh", "-F", str(config), "sandbox", "bash", "-s"], check=False, input=script, capture_output=True,
                              text=True, timeout=60)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SlipwayError(f"raw ssh checks failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        lines = proc.stdout.strip().splitlines()
    return statistics.median(times), lines


# --------------------------------------------------------------------------------------------
def fmt_failures(fig: dict) -> list[str]:
    return [f"{k} {v}" for k, v in fig["failures"].items()] or ["none"]


def print_load_table(a: dict, b: dict, rate: float, stale: bool) -> None:
    print(f"\n1-2. steady load, target {rate:.0f} req/s, POST /api/books/{LOAD_BOOK}/track-view ({LOAD_VIEW})")
    rows = [
        ("", "invoke deploy (reload, 2 inst.)", "runbook by hand (restart, 1 inst.)"),
        ("action wall time (s)", f"{a['action_seconds']:.1f}", f"{b['action_seconds']:.1f}"),
        ("load duration (s)", f"{a['seconds']:.1f}", f"{b['seconds']:.1f}"),
        ("achieved rate (req/s)", f"{a['rate']:.0f}", f"{b['rate']:.0f}"),
        ("requests sent", a["sent"], b["sent"]),
        ("200 responses", a["ok"], b["ok"]),
        ("non-200 / errors", a["sent"] - a["ok"], b["sent"] - b["ok"]),
    ]
    fa, fb = fmt_failures(a), fmt_failures(b)
    for i in range(max(len(fa), len(fb))):
        rows.append(("  by cause" if i == 0 else "", fa[i] if i < len(fa) else "", fb[i] if i < len(fb) else ""))
    def win(f):
        return f"{f['failed_window'][0]:.2f}-{f['failed_window'][1]:.2f}" if f["failed_window"] else "-"

    rows += [
        ("  failures at t (s from start)", win(a), win(b)),
        ("idle conns found closed, reopened", a["stale_dropped"] if stale else "(no check)",
         b["stale_dropped"] if stale else "(no check)"),
        ("view_count delta in DB", a["delta"], b["delta"]),
        ("lost (200s - delta)", a["ok"] - a["delta"], b["ok"] - b["delta"]),
        ("latency p50 / p99 / max (ms)", f"{a['p50_ms']:.1f} / {a['p99_ms']:.0f} / {a['max_ms']:.0f}",
         f"{b['p50_ms']:.1f} / {b['p99_ms']:.0f} / {b['max_ms']:.0f}"),
    ]
    for label, x, y in rows:
        print(f"   {label:<30} {x!s:>36} {y!s:>38}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=250.0, help="requests per second (default 250)")
    parser.add_argument("--min-requests", type=int, default=5000, help="at least this many requests per run (default 5000)")
    parser.add_argument("--instance", type=int, default=7, help="SLIPWAY_SANDBOX_INSTANCE to use (default 7)")
    parser.add_argument("--keep-up", action="store_true", help="leave the sandbox up at the end")
    parser.add_argument("--no-stale-check", action="store_true",
                        help="reuse keep-alive connections without checking whether the server closed them while idle")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: the benchmark starts a sandbox (unix users, sshd, PostgreSQL); run it as root")
    if not 0 <= args.instance <= 11 or args.rate <= 0 or args.min_requests < 1:
        sys.exit("error: --instance must be 0-11, --rate > 0 and --min-requests >= 1")
    os.environ["SLIPWAY_SANDBOX_INSTANCE"] = str(args.instance)  # for the in-process sandbox helpers
    cli = Cli(args.instance)
    tmp = Path(tempfile.mkdtemp(prefix="slipway-bench-zd-"))
    started = time.perf_counter()
    try:
        v1, server_js = v1_source(tmp)
        print(f"sandbox instance {args.instance}; {os.cpu_count()} CPUs; load {args.rate:.0f} req/s, >= {args.min_requests} "
              f"requests, {THREADS} keep-alive clients ({'no stale check' if args.no_stale_check else 'idle conns checked before reuse'}); v1 = {v1} (update-then-insert, no UNIQUE needed)", flush=True)

        print("\n[1] zero-downtime deploy", flush=True)
        up_s = fresh_sandbox(cli)
        say(f"sandbox up (incident state) in {up_s:.1f}s")
        creds = cli.sandbox_env()
        host = sb.find_host("sandbox")
        install_v1(host, v1, server_js, 2, True, creds["API_TOKEN"])
        deploy = part_deploy(cli, host, creds, args, tmp)
        info = deploy["report"]
        say(f"invoke deploy: exit {deploy['rc']}, {deploy['result']}, release {info.get('release_state', {}) and info['release_state'].get('id')}, "
            f"pm2 {(info.get('pm2') or {}).get('action')}, migrations applied {info.get('migrations_applied')}, "
            f"{info.get('changed')} change(s)")
        say("phases: " + ", ".join(f"{p['name']} {p['seconds']:.1f}s" for p in info.get("phases", [])))

        noop_s, noop = cli.run("deploy", "--host", "sandbox", "--report", str(tmp / "noop.json"), check=False)
        noop_report = json.loads((tmp / "noop.json").read_text()) if (tmp / "noop.json").exists() else {}
        say(f"no-op re-deploy: exit {noop.returncode}, {noop_report.get('changed')} change(s)")
        ssh_s, ssh_lines = raw_ssh(host, 3)
        say("raw ssh checks: " + "; ".join(ssh_lines))

        print("\n[2] runbook by hand", flush=True)
        up_s = fresh_sandbox(cli)
        say(f"sandbox up (incident state) in {up_s:.1f}s")
        creds = cli.sandbox_env()
        host = sb.find_host("sandbox")
        v2 = install_v1(host, v1, server_js, 1, False, creds["API_TOKEN"])
        runbook = part_runbook(cli, host, creds, v2, args)
        say("steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in runbook["steps"].items()))

        print_load_table(deploy, runbook, args.rate, not args.no_stale_check)
        print("\n3. wall time (s)")
        for label, value in (
            ("full deploy under load (0007, new release, pm2 reload)", f"{deploy['action_seconds']:8.2f}"),
            (f"no-op re-deploy ({noop_report.get('changed')} changes)", f"{noop_s:8.2f}"),
            ("raw ssh, same read-only checks (median of 3)", f"{ssh_s:8.2f}"),
            ("ratio no-op deploy / raw ssh", f"{noop_s / ssh_s:7.1f}x"),
        ):
            print(f"   {label:<56} {value}")
    finally:
        if args.keep_up:
            print(f"\nsandbox instance {args.instance} left up (--keep-up)")
        else:
            try:
                cli.run("sandbox.down")
            except (SlipwayError, subprocess.TimeoutExpired) as exc:
                print(f"warning: sandbox.down failed: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"\ntotal {time.perf_counter() - started:.1f}s", flush=True)


if __name__ == "__main__":
    try:
        main()
    except SlipwayError as exc:
        sys.exit(f"error: {exc}")
