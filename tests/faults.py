"""Fault injection on a real sandbox host, for tests/integration/test_faults.py and bench/faults.py (no fixtures
here): a deploy started as a user would (`invoke deploy` in a process group of its own, like a
terminal job), a fault injected when a phase starts, then every process of the run awaited, the
host's state read right away and again later, and the re-run.

The run's processes: on the controller, every process whose environment carries the run's
``SLIPWAY_RUN_PARENT`` (the guard, ansible-playbook, its workers, ssh) and `invoke` itself; on the
host, every process of the host's user apart from the PM2 daemon and its app workers (the lock
keeper, sshd sessions, the modules' python, pg_dump, the pm2 CLI).
"""
from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from instances import sandbox_instance

ROOT = Path(__file__).resolve().parent.parent
SMOKE_BOOK = "5b0e7e57-0000-4000-8000-00000000c0de"  # slipway.sandbox.SMOKE_BOOK
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]

# Σview_count per book, the smoke tests' own book aside (each deploy's smoke test adds its views)
SUMS = ("SELECT count(*), coalesce(md5(string_agg(book_id::text || ':' || s, ',' ORDER BY book_id)), '') "
        "FROM (SELECT book_id, sum(view_count) s FROM book_view_statistics WHERE book_id <> %s GROUP BY book_id) t")


def invoke(*args, env=None, timeout=600):
    return subprocess.run([*INVOKE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def host_env(name: str, env=None) -> dict:
    out = invoke("sandbox.env", "--host", name, env=env).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line[len("export "):].partition("=")
        values[key] = shlex.split(value)[0]
    return values


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def _uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def ssh_masters() -> set[int]:
    """ssh ControlPersist masters of slipway runs (`ssh: /tmp/slipway-cp-…/… [mux]`): they start
    a session of their own and clear their environment, so the run's marker is not on them."""
    return {p for p in _pids() if _cmd(p).startswith("ssh: /tmp/slipway-cp-")}


def run_processes(invoke_pid: int, host_user: str, masters_before: set[int] = frozenset()) -> dict:
    """{"controller": [...], "host": [...]} (pid and command) of the run still alive; ssh masters
    count unless they were there before the run (``masters_before``)."""
    marker = f"SLIPWAY_RUN_PARENT={invoke_pid}".encode()
    uid = pwd.getpwnam(host_user).pw_uid
    pids = _pids()
    daemons = {p for p in pids if _uid(p) == uid and _cmd(p).startswith("PM2 ")}
    controller, host = [], []
    for pid in pids:
        if pid == os.getpid():
            continue
        zombie = False
        try:
            zombie = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
        except (OSError, IndexError):
            continue
        if zombie:
            continue
        if pid == invoke_pid or marker in _environ(pid).split(b"\0") or \
                (pid not in masters_before and _cmd(pid).startswith("ssh: /tmp/slipway-cp-")):
            controller.append((pid, _cmd(pid)[:120]))
        elif _uid(pid) == uid and pid not in daemons and _ppid(pid) not in daemons:
            host.append((pid, _cmd(pid)[:120]))
    return {"controller": controller, "host": host}


class Host:
    """One sandbox host of an instance, as the fault runs see it."""

    def __init__(self, name: str = "sandbox", instance: str = "1"):
        self.env = {"SLIPWAY_SANDBOX_INSTANCE": instance}
        with sandbox_instance(instance) as sb:
            self.host = sb.find_host(name)
        self.name = name
        values = host_env(name, env=self.env)
        self.dsn = values["DATABASE_URL"]
        self.secrets = [values["API_TOKEN"], psycopg.conninfo.conninfo_to_dict(self.dsn).get("password")]

    def reset(self, rows: int) -> None:
        """The incident state (0007 missing, duplicates), the table grown to ``rows`` rows."""
        proc = invoke("sandbox.up", "--state", "incident", env=self.env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if rows:
            from bigtable import grow_statistics  # tests/ is on sys.path in pytest and bench/

            with psycopg.connect(self.dsn, autocommit=True) as conn:
                (have,) = conn.execute("SELECT count(*) FROM book_view_statistics").fetchone()
                if have < rows:
                    grow_statistics(conn, rows - have, dups=0.05)

    def state(self) -> dict:
        """What a deploy changes: current, tracking rows, the unique index, kept backups, PM2's
        instances (pid, status, release), Σview_count per book."""
        app = self.host.app_dir
        current = os.path.basename(os.readlink(app / "current")) if (app / "current").is_symlink() else None
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0]
            indexes = conn.execute(
                "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = 'book_view_statistics'::regclass ORDER BY 1").fetchall()
            sums = conn.execute(SUMS, (SMOKE_BOOK,)).fetchone()
        backups = sorted(p.name for p in self.host.backup_dir.glob("*.dump")) if self.host.backup_dir.exists() else []
        return {"current": current, "tracking_rows": rows, "indexes": [list(i) for i in indexes],
                "backups": backups, "pm2": self.pm2(), "sums": list(sums)}

    def pm2(self) -> list:
        user = pwd.getpwnam(self.host.user)
        proc = subprocess.run(["runuser", "-u", self.host.user, "--", "env", f"HOME={self.host.home}",
                               f"PM2_HOME={self.host.pm2_home}", "pm2", "jlist"],
                              capture_output=True, text=True, timeout=60, cwd=user.pw_dir)
        try:
            procs = json.loads(proc.stdout[proc.stdout.find("["):])
        except ValueError:
            return [["unreadable", proc.returncode]]
        return sorted([p.get("pid"), p["pm2_env"].get("status"), p["pm2_env"].get("env", {}).get("RELEASE_ID")
                       or p["pm2_env"].get("RELEASE_ID")] for p in procs)

    def records(self) -> list[dict]:
        path = self.host.app_dir / ".slipway" / "deploys.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Deploy:
    """`invoke deploy --host H` in a process group of its own, its output read line by line."""

    def __init__(self, host: Host, *args: str):
        self.host = host
        self.masters_before = ssh_masters()
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*INVOKE, "deploy", "--host", host.name, *args], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **host.env})
        self.started = time.monotonic()

    def wait_for(self, text: str, timeout: float = 120) -> str:
        """Read output until a line containing ``text``; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"deploy ended before {text!r}:\n" + "".join(self.lines))
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in {timeout}s:\n" + "".join(self.lines))

    def finish(self, timeout: float = 300) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out or "")
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def ansible_playbook_pid(invoke_pid: int) -> int | None:
    marker = f"SLIPWAY_RUN_PARENT={invoke_pid}".encode()
    for pid in _pids():
        cmd = _cmd(pid)
        if "ansible-playbook" in cmd and "playbook_guard" not in cmd and marker in _environ(pid).split(b"\0"):
            if _ppid(pid) and "playbook_guard" in _cmd(_ppid(pid)):
                return pid
    return None


def kill_host_sessions(host: Host) -> int:
    """The host's sshd and every ssh session of its user killed (DESIGN: killing sshd does not end
    open sessions, so the sessions' sshd processes are killed by pid). Returns how many."""
    uid = pwd.getpwnam(host.host.user).pw_uid
    sshd_pid_file = host.host.sshd_dir / "sshd.pid"
    victims = []
    for pid in _pids():
        cmd = _cmd(pid)
        if cmd.startswith("sshd:") and (_uid(pid) == uid or host.host.user in cmd):
            victims.append(pid)
    if sshd_pid_file.exists():
        victims.append(int(sshd_pid_file.read_text().split()[0]))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)


def wait_gone(invoke_pid: int, host_user: str, timeout: float = 90,
              masters_before: set[int] = frozenset()) -> tuple[float, dict]:
    """Seconds until no process of the run is left (and what was left when it timed out)."""
    start = time.monotonic()
    while True:
        left = run_processes(invoke_pid, host_user, masters_before)
        if not left["controller"] and not left["host"]:
            return time.monotonic() - start, left
        if time.monotonic() - start > timeout:
            return time.monotonic() - start, left
        time.sleep(0.1)
