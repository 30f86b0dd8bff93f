"""Small process helpers for the sandbox: run a command, find, wait for and kill processes, wait for a port or a log line, one JSON request."""
from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import SlipwayError


def run(cmd, *, check=True, input=None, env=None, cwd=None, timeout=120, user=None):
    """Run ``cmd`` (a list; never a secret on it) and return CompletedProcess with text output.

    ``user``: a pwd entry to run as (uid/gid/supplementary groups of that user)."""
    kwargs = {}
    if user is not None:
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            input=input,
            env=env,
            cwd=cwd,
            timeout=timeout,
            capture_output=True,
            text=True,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        raise SlipwayError(f"{Path(str(cmd[0])).name} timed out after {timeout}s; see the host's logs") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlipwayError(f"{' '.join(str(c) for c in cmd[:3])} failed (exit {proc.returncode}): {detail[-1] if detail else 'no output'}")
    return proc


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, uid) of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            out.append((int(entry), int(fields["PPid"]), int(fields["Uid"].split()[0])))
        except (OSError, KeyError, ValueError):
            continue
    return out


def user_pids(uid: int) -> list[int]:
    """Live processes owned by ``uid``."""
    return [pid for pid, _, owner in processes() if owner == uid and pid_alive(pid)]


def chown_tree(top: Path, user: pwd.struct_passwd) -> None:
    """Give ``top`` and everything below it to ``user`` (symlinks themselves, not their targets)."""
    os.lchown(top, user.pw_uid, user.pw_gid)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def descendants(root_pid: int) -> list[int]:
    procs = processes()
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in procs:
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_pids(pids, grace: float = 5.0) -> None:
    pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_port(address: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise SlipwayError(f"nothing listens on {address}:{port} after {timeout:.0f}s; see the host's logs")


def wait_for_line(path: Path, needle: str, timeout: float = 15.0) -> str:
    """The last line of ``path`` holding ``needle``, waiting for it: PM2 and PostgreSQL's logging
    collector write asynchronously. Raises SlipwayError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        lines = [line for line in text.splitlines() if needle in line]
        if lines:
            return lines[-1]
        if time.monotonic() > deadline:
            raise SlipwayError(f"no line with {needle!r} in {path} after {timeout:.0f}s")
        time.sleep(0.1)


def http_json(method: str, url: str, body: dict | None = None, token: str | None = None, timeout=5.0):
    """(status, parsed JSON or text) of one request; no secret is ever printed by this helper."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
