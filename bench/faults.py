"""Fault injection benchmark: per fault, the seconds until every process of the deploy run is gone
(controller and host), whether the host's state moved in the 10 s after that, and whether the
next `invoke deploy` converged with every view kept.

Runs on sandbox instance 3 (brought up here), each fault from the incident state with
book_view_statistics grown to --rows rows. Needs root (the sandbox). Prints one table row per
fault; figures are what this machine measured, nothing is asserted.

    .venv/bin/python bench/faults.py [--rows 1000000] [--only sigkill-group@db_migrate]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]  # the tests' helpers (bigtable, pgcluster, faults)

import faults as F

INSTANCE = "3"


def _kill_group(d):
    os.killpg(d.proc.pid, signal.SIGKILL)


def _kill_playbook(d):
    pid = F.ansible_playbook_pid(d.proc.pid)
    if pid:
        os.kill(pid, signal.SIGKILL)


def _sigint(d):
    os.killpg(d.proc.pid, signal.SIGINT)


def _stop_postgres(host):
    def fault(d):
        subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-D",
                        str(host.host.pgdata), "stop", "-m", "immediate"], capture_output=True, timeout=60)
    return fault


def faults(host):
    """(name, phase, fault, whether the fault stops a sandbox service that must be started again)."""
    out = []
    for phase in ("preflight", "db_backup", "app_release", "db_migrate", "pm2_app", "smoke_test"):
        out.append((f"sigkill-group@{phase}", phase, _kill_group, False))
    out += [
        ("sigkill-ansible-playbook@db_backup", "db_backup", _kill_playbook, False),
        ("sigkill-ansible-playbook@db_migrate", "db_migrate", _kill_playbook, False),
        ("sigint-group@db_migrate", "db_migrate", _sigint, False),
        ("host-sshd-and-sessions@db_migrate", "db_migrate", lambda d: F.kill_host_sessions(host), True),
        ("postgres-stopped@db_migrate", "db_migrate", _stop_postgres(host), True),
    ]
    return out


def _start_services(host, env):
    """sshd / PostgreSQL back, the database left in the state the fault left it (`sandbox.up`
    rebuilds a database that is not in the state it is asked for)."""
    try:
        state = "healthy" if host.state()["tracking_rows"] == 8 else "incident"
    except Exception:  # noqa: BLE001 - PostgreSQL is down: its last transaction did not commit
        state = "incident"
    F.invoke("sandbox.up", "--state", state, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", default="")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds after the phase starts")
    args = parser.parse_args()
    env = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
    up = F.invoke("sandbox.up", "--state", "incident", env=env)
    if up.returncode != 0:
        print(up.stdout + up.stderr)
        return 1
    host = F.Host("sandbox", INSTANCE)
    print(f"rows {args.rows}, fault {args.delay}s after the phase starts; 'gone' = every process of the run ended")
    print(f"{'fault':<38} {'gone s':>7} {'moved in 10s':>13} {'re-run':>7} {'views kept':>10} {'record':>12}")
    for name, phase, fault, restart in faults(host):
        if args.only and args.only != name:
            continue
        host.reset(args.rows)
        before = host.state()
        deploy = F.Deploy(host)
        try:
            deploy.wait_for(f" {phase}")
        except AssertionError:
            print(f"{name:<38} phase not reached")
            continue
        time.sleep(args.delay)
        fault(deploy)
        gone, left = F.wait_gone(deploy.proc.pid, host.host.user, timeout=120,
                                  masters_before=deploy.masters_before)
        try:
            deploy.finish(timeout=60)
        except Exception:  # noqa: BLE001
            pass
        if restart:
            _start_services(host, env)
        first = host.state()
        time.sleep(10)
        moved = host.state() != first
        rerun = F.invoke("deploy", "--host", "sandbox", env=env)
        after = host.state()
        run_id = deploy.output.splitlines()[0].rsplit("run ", 1)[1].strip()
        record = next((r.get("result") for r in host.records() if r.get("run_id") == run_id), "none")
        print(f"{name:<38} {gone:>7.2f} {'yes' if moved else 'no':>13} {'ok' if rerun.returncode == 0 else 'FAILED':>7} "
              f"{'yes' if after['sums'] == before['sums'] else 'NO':>10} {record:>12}"
              + (f"  left: {left}" if left['controller'] or left['host'] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
