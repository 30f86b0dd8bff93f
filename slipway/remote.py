"""Ad-hoc SSH to inventory hosts (Fabric/paramiko) and the per-host deploy lock.

Connection settings come from the same Ansible inventory the playbooks use (``ansible_host``,
``ansible_port``, ``ansible_user``, ``ansible_ssh_private_key_file`` and the ``UserKnownHostsFile``
named in ``ansible_ssh_common_args``/``ansible_ssh_extra_args``). Vault-encrypted vars files are
skipped, never decrypted: connection vars need no secrets. Host keys are always checked
(paramiko ``RejectPolicy`` against that known_hosts file); no ssh config, no agent, no default keys.

The deploy lock (``DeployLock``) is one ``flock`` per host on
``{{ slipway_app_dir }}/.slipway/deploy.lock``, held for the whole deploy by a small shell keeper
on the host that lives as long as the controller's SSH channel (heartbeat ``HB`` every 10 s;
``RELEASE`` ends it and removes the metadata ``deploy.lock.json``). A controller that dies leaves
the metadata behind with the lock free: the next run takes the lock over and reports it as stale.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shlex
import socket
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ansible_collections.slipway.core.plugins.module_utils import layout
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

from .errors import Exit, SlipwayError
from .inventory import host_vars

if TYPE_CHECKING:
    from .runtime import HostPython

CONNECT_TIMEOUT = 10
HEARTBEAT_SECONDS = 10
KEEPER_SILENCE_SECONDS = 60
RELEASE_TIMEOUT = 10
STOP_SECONDS = 30  # how long the keeper waits for the run's processes on the host before SIGKILL
LOCK_HELD_EXIT = 75  # flock -E: "another run holds the lock" (EX_TEMPFAIL)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # also a file name on the host
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


# --------------------------------------------------------------------------------------------
# Inventory → connection parameters
# --------------------------------------------------------------------------------------------
def _known_hosts_files(args: list[str]) -> list[str]:
    """The ``UserKnownHostsFile`` value(s) named by ``-o`` options in ssh argument strings."""
    found: list[str] = []
    for raw in args:
        if not raw:
            continue
        words = shlex.split(str(raw))
        options = []
        for i, word in enumerate(words):
            if word == "-o" and i + 1 < len(words):
                options.append(words[i + 1])
            elif word.startswith("-o") and len(word) > 2:
                options.append(word[2:])
        for option in options:
            key, sep, value = option.partition("=")
            if not sep:
                key, _, value = option.strip().partition(" ")
            if key.strip().lower() == "userknownhostsfile" and value.strip():
                found += value.split()
    return found


def ssh_params(host: str) -> dict:
    """Connection settings of inventory host ``host``: hostname, port, user, key_filename,
    known_hosts (path)."""
    hv = host_vars(host)
    hostname = hv.render("ansible_host") or hv.render("ansible_ssh_host") or host
    try:
        port = int(hv.render("ansible_port") or hv.render("ansible_ssh_port") or 22)
    except (TypeError, ValueError):
        raise SlipwayError(f"ansible_port of {host} is not a number; fix it in the inventory") from None
    user = hv.render("ansible_user") or hv.render("ansible_ssh_user") or getpass.getuser()
    key = hv.render("ansible_ssh_private_key_file") or hv.render("ansible_private_key_file")
    files = _known_hosts_files([hv.render("ansible_ssh_common_args"), hv.render("ansible_ssh_extra_args"),
                                hv.render("ansible_ssh_args")])
    known = [os.path.expanduser(f) for f in files] or [os.path.expanduser(DEFAULT_KNOWN_HOSTS)]
    return {
        "host": host,
        "hostname": str(hostname),
        "port": port,
        "user": str(user),
        "key_filename": os.path.expanduser(str(key)) if key else None,
        "known_hosts": known[0],
        "known_hosts_files": known,
    }


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------
def connect(host: str, params: dict | None = None):
    """An open ``fabric.Connection`` to inventory host ``host`` with the host key checked.

    Unknown or changed host key, unreachable host, failed authentication: a one-line SlipwayError
    naming the cause and the fix."""
    import paramiko
    from fabric import Config, Connection

    p = params or ssh_params(host)
    addr, port, known = p["hostname"], p["port"], p["known_hosts"]
    keyscan = f"ssh-keyscan -p {port} {addr} >> {known}"
    connect_kwargs = {"allow_agent": False, "look_for_keys": False, "banner_timeout": CONNECT_TIMEOUT,
                      "auth_timeout": CONNECT_TIMEOUT}
    if p.get("key_filename"):
        if not os.path.isfile(p["key_filename"]):
            raise SlipwayError(f"the ssh key {p['key_filename']} of {host} does not exist; fix ansible_ssh_private_key_file in the inventory")
        connect_kwargs["key_filename"] = p["key_filename"]
    # no ssh_config, no fabric/invoke config files: the inventory is the only source
    config = Config(ssh_config=paramiko.SSHConfig(), lazy=True)
    conn = Connection(addr, user=p["user"], port=port, connect_timeout=CONNECT_TIMEOUT,
                      connect_kwargs=connect_kwargs, config=config)
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    loaded = 0
    for path in p.get("known_hosts_files") or [known]:
        if os.path.isfile(path):
            conn.client.load_system_host_keys(path)  # read-only: never written back
            loaded += 1
    if not loaded:
        raise SlipwayError(f"host key of {host} ({addr}:{port}) is not in {known} (the file does not exist); "
                           f"add it with {keyscan} after verifying it")
    try:
        conn.open()
    except paramiko.BadHostKeyException:
        conn.close()
        raise SlipwayError(f"host key of {host} ({addr}:{port}) is not in {known} (it holds a different key for "
                           f"that address: the host was re-keyed or is being impersonated); verify the new key, then "
                           f"replace that line with the output of ssh-keyscan -p {port} {addr}") from None
    except paramiko.SSHException as exc:
        conn.close()
        if "not found in known_hosts" in str(exc):
            raise SlipwayError(f"host key of {host} ({addr}:{port}) is not in {known}; "
                               f"add it with {keyscan} after verifying it") from None
        if isinstance(exc, paramiko.AuthenticationException):
            raise SlipwayError(f"ssh login as {p['user']}@{addr}:{port} ({host}) was refused with key "
                               f"{p.get('key_filename') or '(none)'}; put its public key in ~{p['user']}/.ssh/authorized_keys "
                               "there or fix ansible_user/ansible_ssh_private_key_file") from None
        raise SlipwayError(f"cannot reach {host} at {addr}:{port} ({_one_line(exc)}); check that sshd runs there "
                           "and the inventory's ansible_host/ansible_port") from None
    except (OSError, EOFError) as exc:  # refused, timeout, no route, NoValidConnectionsError
        conn.close()
        cause = "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else _one_line(exc)
        raise SlipwayError(f"cannot reach {host} at {addr}:{port} ({cause}); check that sshd runs there "
                           "and the inventory's ansible_host/ansible_port") from None
    return conn


def _one_line(exc: BaseException) -> str:
    text = redact_text(str(exc)).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def run(conn, cmd: str, **kwargs):
    """``conn.run`` guarded: never raises on a non-zero exit (``warn=True``; check ``.failed``),
    prints nothing (``hide=True``), reads no stdin. Never put a secret on ``cmd``: pass it in
    ``env=`` or ``in_stream=``; callers print only redacted output."""
    kwargs.setdefault("warn", True)
    kwargs.setdefault("hide", True)
    kwargs.setdefault("in_stream", False)
    return conn.run(cmd, **kwargs)


# --------------------------------------------------------------------------------------------
# The host's module Python (what slipway's runtime is built for)
# --------------------------------------------------------------------------------------------
_AUTO = ("auto", "auto_silent", "auto_legacy", "auto_legacy_silent")
# Runs with the host's module Python (any 3.x): its version and what decides which wheels load.
_PYTHON_FACTS = """\
import json, os, platform, sys, sysconfig
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION")
except (AttributeError, ValueError, OSError):
    libc = None
print("SLIPWAY-PYTHON " + json.dumps({"version": "%d.%d.%d" % tuple(sys.version_info[:3]),
      "implementation": platform.python_implementation(), "platform": sysconfig.get_platform(), "libc": libc}))
"""


def module_interpreter(host: str, hv=None) -> tuple[list[str], list[str]]:
    """How Ansible will start ``host``'s module Python: (the command, as words) when the inventory
    (or ansible.cfg's interpreter_python) names one, else ([], the names its auto-discovery tries
    in order: ``INTERPRETER_PYTHON_FALLBACK``, python3.13 ... /usr/bin/python3, python3)."""
    from ansible import constants as C

    hv = hv if hv is not None else host_vars(host)
    given = hv.render("ansible_python_interpreter") or C.config.get_config_value("INTERPRETER_PYTHON")
    if given and str(given).strip() not in _AUTO:
        return shlex.split(str(given)), []
    fallback = hv.render("ansible_interpreter_python_fallback") or C.config.get_config_value("INTERPRETER_PYTHON_FALLBACK")
    return [], [str(name) for name in fallback]


def python_probe_command(command: list[str], fallback: list[str]) -> str:
    """One shell command: find the interpreter as Ansible's discovery would (the first of
    ``fallback`` that `command -v` finds as a path, else /usr/bin/python3) unless ``command`` is
    given, say which (``SLIPWAY-INTERPRETER``), and run the facts script with it."""
    q = shlex.quote
    if command:
        find = "set -- " + " ".join(q(word) for word in command)
    else:
        find = ("p=; for c in " + " ".join(q(name) for name in fallback) + "; do "
                "p=$(command -v \"$c\" 2>/dev/null) && case $p in /*) break;; esac; p=; done; "
                "set -- \"${p:-/usr/bin/python3}\"")
    return (f"{find}; printf 'SLIPWAY-INTERPRETER %s\\n' \"$*\"; "
            f"exec \"$@\" -c {q(_PYTHON_FACTS)}")


def parse_python_probe(host: str, stdout: str, stderr: str, exited: int) -> HostPython:
    """The probe's answer as a HostPython, or a one-line SlipwayError naming the interpreter."""
    from .runtime import HostPython

    interpreter, facts = None, None
    for line in stdout.splitlines():
        if line.startswith("SLIPWAY-INTERPRETER "):
            interpreter = line[len("SLIPWAY-INTERPRETER "):].strip()
        elif line.startswith("SLIPWAY-PYTHON "):
            try:
                facts = json.loads(line[len("SLIPWAY-PYTHON "):])
            except ValueError:
                facts = None
    if not facts:
        lines = [line.strip() for line in redact_text(stderr).splitlines() if line.strip()]
        said = lines[0][:300] if lines else f"exit {exited}, no output"
        raise SlipwayError(f"cannot run {host}'s module Python {interpreter or '(none found)'} ({said}); install "
                           "python3 there or set ansible_python_interpreter for the host in the inventory")
    plat = str(facts.get("platform") or "")
    libc = str(facts.get("libc") or "")
    return HostPython(host=host, interpreter=interpreter or "?", version=str(facts.get("version")),
                      implementation=str(facts.get("implementation")),
                      machine=plat.split("-", 1)[-1] if plat.startswith("linux-") else plat,
                      glibc=libc.split()[-1] if libc.startswith("glibc ") else None)


PROBE_SECONDS = 30  # a host that takes longer to say which Python it runs fails the probe


def probe_settings(host: str) -> tuple[dict, str]:
    """(ssh settings, probe command) of inventory host ``host``: read from the inventory, so on
    one thread only (Ansible's loaders and templating are not thread-safe)."""
    return ssh_params(host), python_probe_command(*module_interpreter(host, host_vars(host)))


def probe_each(settings: dict) -> dict:
    """Each host of ``settings`` ({host: probe_settings(host)}) connected to and probed side by
    side: {host: (open connection, HostPython), or the exception that host raised}. Interrupted
    (Ctrl-C), the probes under way end (each bounded by its timeouts) and every connection they
    opened is closed before the interrupt goes on."""
    from concurrent.futures import ThreadPoolExecutor

    def probe(host):
        params, command = settings[host]
        conn = connect(host, params)
        try:
            result = run(conn, command, timeout=PROBE_SECONDS)
            return conn, parse_python_probe(host, result.stdout, result.stderr, result.exited)
        except BaseException:
            conn.close()
            raise

    out: dict = {}
    pool = ThreadPoolExecutor(max_workers=min(8, max(1, len(settings))))
    futures = [(host, pool.submit(probe, host)) for host in settings]
    try:
        for host, future in futures:
            try:
                out[host] = future.result()
            except Exception as exc:  # noqa: BLE001 - that host's failure, for the caller to word
                out[host] = exc
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for _, future in futures:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result()[0].close()
        raise
    pool.shutdown(wait=True)
    return out


def probe_pythons(hosts: list[str]) -> tuple[dict, dict]:
    """({host: HostPython}, {host: open connection}) for each of ``hosts``, in sorted order. The
    connections are for ``lock_hosts(..., conns=)`` to take over (one SSH connection per host for
    the probe and the lock); on an error the ones opened are closed and the first failing host's
    error (in sorted order) is raised. The hosts are probed side by side (probe_each), their
    inventory read first, one after another."""
    names = sorted(set(hosts))
    results = probe_each({host: probe_settings(host) for host in names})
    found, conns, errors = {}, {}, []
    for host in names:
        if isinstance(results[host], BaseException):
            errors.append(results[host])
        else:
            conns[host], found[host] = results[host]
    if errors:
        close_all(conns)
        raise errors[0]
    return found, conns


def close_all(conns: dict) -> None:
    for conn in conns.values():
        with contextlib.suppress(Exception):
            conn.close()
    conns.clear()


# --------------------------------------------------------------------------------------------
# The deploy lock
# --------------------------------------------------------------------------------------------
class LockHeld(SlipwayError):
    """Another live run holds the deploy lock of a host (CLI exit 4)."""

    def __init__(self, host: str, meta: dict):
        started = meta.get("started", "an unknown time")
        pid = meta.get("pid", "unknown")
        message = f"deploy already running on {host} since {started} (pid {pid})"
        controller = meta.get("controller")
        if controller and controller != socket.gethostname():
            message += f" on {controller}"
        super().__init__(message, exit_code=Exit.LOCK_HELD)
        self.host = host
        self.meta = meta


# Runs under `flock -n -E 75 <lock> bash -c KEEPER slipway-deploy-lock <meta> <json> <silence> <stop>
# <run_id>` while the lock is held. It first ends what a killed run may have left (pids registered
# in run/, see module_utils/runguard.py), then writes the metadata (with its own pid) and says
# ACQUIRED. Every way out of the loop stops the run first: SIGTERM to every registered process of
# the run, the commit lock taken exclusively (a commit under way finishes, none starts), and after
# <stop> seconds SIGKILL; only then does the flock go. RELEASE also removes the metadata; EOF on
# stdin (the controller or its connection died) or <silence> seconds without a line leave it
# behind (= stale) and journal `lost`; STOP stops the run's processes and keeps the lock.
# POSIX sh apart from `read -t` and $SECONDS (bash, ksh and busybox ash have them; dash does not:
# hence bash).
KEEPER = """\
meta=$1
run=$5
dir=${meta%/*}
tmp="$meta.tmp.$$"
umask 077
starttime() { s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0; s=${s##*\\) }; set -- $s; printf %s "${20}"; }
live() { [ -n "$2" ] && [ "$(starttime "$1")" = "$2" ]; }
stop_run() {
  : > "$dir/@CLOSING@"
  for f in "$dir"/@RUN_DIR@/*; do
    case $f in *.tmp|*'*') continue;; esac
    p=${f##*/}; if live "$p" "$(cat "$f" 2>/dev/null)"; then kill -TERM "$p" 2>/dev/null; else rm -f "$f"; fi
  done
  exec 8>>"$dir/@COMMIT_LOCK@"
  flock -x -w "$1" 8
  end=$((SECONDS + $1))
  while :; do
    left=0
    for f in "$dir"/@RUN_DIR@/*; do
      case $f in *.tmp|*'*') continue;; esac
      p=${f##*/}; st=$(cat "$f" 2>/dev/null)
      if live "$p" "$st"; then
        if [ "$SECONDS" -ge "$end" ]; then kill -KILL "$p" 2>/dev/null; rm -f "$f"; else left=1; fi
      else rm -f "$f"; fi
    done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  exec 8>&-
}
journal() {
  mkdir -p -m 0700 "$dir/@RUNS_DIR@" && printf '{"at": "%s", "event": "%s", "pid": %s}\\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%S.000000Z)" "$1" "$$" >> "$dir/@RUNS_DIR@/$run@JOURNAL_SUFFIX@"
}
if [ -e "$meta" ]; then printf 'STALE %s\\n' "$(tr -d '\\n' < "$meta")"; fi
stop_run "$4"
rm -f "$dir/@CLOSING@"
# journals of the newest 100 runs are kept
ls -1t "$dir/@RUNS_DIR@" 2>/dev/null | tail -n +101 | while read -r f; do rm -f "$dir/@RUNS_DIR@/$f"; done
if ! { printf '{"keeper_pid": %s, %s\\n' "$$" "${2#?}" > "$tmp" && chmod 0600 "$tmp" && mv -f "$tmp" "$meta"; }; then
  rm -f "$tmp"; echo "ERROR cannot write $meta"; exit 70
fi
echo ACQUIRED
while read -r -t "$3" line; do
  case $line in
    RELEASE) stop_run "$4"; rm -f "$meta" "$dir/@CLOSING@"; echo RELEASED; exit 0;;
    STOP) stop_run "$4"; echo STOPPED;;
  esac
done
stop_run "$4"
journal lost
rm -f "$dir/@CLOSING@"
exit 0
"""
for _name, _value in (("@CLOSING@", layout.CLOSING), ("@RUN_DIR@", layout.RUN_DIR), ("@RUNS_DIR@", layout.RUNS_DIR),
                      ("@COMMIT_LOCK@", layout.COMMIT_LOCK), ("@JOURNAL_SUFFIX@", layout.JOURNAL_SUFFIX)):
    KEEPER = KEEPER.replace(_name, _value)  # the host-side names from module_utils/layout.py


def lock_paths(app_dir: str) -> tuple[str, str, str]:
    """(dir, lock file, metadata file) of the deploy lock under ``app_dir``."""
    return layout.lock_paths(app_dir)


def _app_dir(host: str, hv=None) -> str:
    hv = hv if hv is not None else host_vars(host)
    app_dir = hv.render("slipway_app_dir")
    if not app_dir:
        raise SlipwayError(f"{host} has no slipway_app_dir in the inventory; set it (see examples/inventory/prod.yml)")
    return str(app_dir)


def _parse_meta(text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError:
        return {"unreadable": redact_text(text.strip())[:200]}
    return data if isinstance(data, dict) else {"unreadable": str(data)[:200]}


def lock_state(host: str, conn=None, app_dir: str | None = None) -> dict:
    """Read-only look at ``host``'s deploy lock: {"held": bool, "meta": dict|None, "stale": bool}
    (``stale``: metadata left by a run that ended without releasing; the lock is free)."""
    app_dir = app_dir or _app_dir(host)
    _, lock, meta = lock_paths(app_dir)
    own = conn is None
    conn = conn or connect(host)
    try:
        # no lock file: nothing holds it (and we do not create one); flock -n on it fails while held
        probe = (f"if [ ! -e {shlex.quote(lock)} ]; then echo FREE; elif flock -n {shlex.quote(lock)} true; "
                 f"then echo FREE; else echo HELD; fi; cat {shlex.quote(meta)} 2>/dev/null || true")
        result = run(conn, probe)
    finally:
        if own:
            conn.close()
    if result.failed:
        raise SlipwayError(f"cannot read the deploy lock on {host} (exit {result.exited}): {_one_line(Exception(result.stderr))}")
    first, _, rest = result.stdout.partition("\n")
    held = first.strip() == "HELD"
    data = _parse_meta(rest) if rest.strip() else None
    return {"held": held, "meta": data, "stale": bool(data) and not held}


def held_by(host: str, conn=None, app_dir: str | None = None) -> dict | None:
    """The metadata of the run holding ``host``'s deploy lock ({} if unreadable), None when free."""
    state = lock_state(host, conn=conn, app_dir=app_dir)
    return (state["meta"] or {}) if state["held"] else None


class DeployLock:
    """The deploy lock of one host, held through a persistent SSH channel; context manager.

    After ``acquire()``: ``stale`` is the metadata of a dead run whose lock was taken over (or
    None), ``meta`` is this run's metadata. ``lost`` turns True if the channel broke while held."""

    def __init__(self, host: str, run_id: str, command: str = "", app_dir: str | None = None,
                 params: dict | None = None, heartbeat: float = HEARTBEAT_SECONDS,
                 silence: int = KEEPER_SILENCE_SECONDS, extra: dict | None = None, conn=None):
        if not _RUN_ID.match(run_id or ""):
            raise SlipwayError(f"run id {run_id!r} is not a plain name")
        self.host = host
        self.run_id = run_id
        self.command = command
        self.extra = dict(extra or {})
        self._out = None
        self.stale_record: dict | None = None
        self._app_dir = app_dir
        self._params = params
        self.heartbeat = heartbeat
        self.silence = int(silence)
        self.conn = None
        self._given_conn = conn  # an open connection to use (probe_pythons'); closed with the lock
        self.channel = None
        self.meta: dict | None = None
        self.stale: dict | None = None
        self.lost = False
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- paths -------------------------------------------------------------------------------
    @property
    def app_dir(self) -> str:
        if self._app_dir is None:
            self._app_dir = _app_dir(self.host)
        return self._app_dir

    @property
    def paths(self) -> tuple[str, str, str]:
        return lock_paths(self.app_dir)

    @property
    def held(self) -> bool:
        return self.channel is not None and not self.lost and not self.channel.exit_status_ready()

    @property
    def stale_message(self) -> str | None:
        if not self.stale:
            return None
        message = (f"took over the deploy lock of run {self.stale.get('run_id', '?')} (pid {self.stale.get('pid', 'unknown')} "
                   f"since {self.stale.get('started', 'an unknown time')}), which ended without releasing it; "
                   "its processes here were stopped first")
        record = self.stale_record
        if record and record.get("error"):
            return message + f"; its record could not be written: {record['error']}"
        if record:
            from .journal import describe

            message += "; recorded it as interrupted in deploys.jsonl (it had: " + "; ".join(describe(record)) + ")"
        return message

    # -- acquire / release -------------------------------------------------------------------
    def _command(self, meta: dict) -> str:
        directory, lock, meta_file = self.paths
        q = shlex.quote
        return (f"mkdir -p -m 0700 {q(directory)} && umask 077 && "
                f"exec flock -n -E {LOCK_HELD_EXIT} {q(lock)} bash -c {q(KEEPER)} slipway-deploy-lock "
                f"{q(meta_file)} {q(json.dumps(meta, sort_keys=True))} {self.silence} {STOP_SECONDS} "
                f"{q(self.run_id)}")

    def acquire(self) -> DeployLock:
        if self.channel is not None:
            raise SlipwayError(f"the deploy lock of {self.host} is already held by this run")
        self.conn, self._given_conn = self._given_conn or connect(self.host, self._params), None
        try:
            for _attempt in range(10):
                if self._try_acquire():
                    break
                info = lock_state(self.host, conn=self.conn, app_dir=self.app_dir)
                # held, or freed in between (a read-only probe or a release racing us): try again;
                # metadata missing while held = the holder is writing it right now
                if info["held"] and info["meta"]:
                    raise LockHeld(self.host, info["meta"])
                time.sleep(0.2)
            else:
                raise LockHeld(self.host, (held_by(self.host, conn=self.conn, app_dir=self.app_dir) or {}))
        except BaseException:
            self._close()
            raise
        if self.stale and self.stale.get("run_id") and self.stale.get("run_id") != self.run_id:
            self._record_stale()
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"deploy-lock-{self.host}", daemon=True)
        self._heartbeat.start()
        return self

    def _record_stale(self) -> None:
        """The run that left the lock stale did not finish: its processes here were stopped by the
        keeper before it said ACQUIRED; write its deploy record from its journal (once)."""
        from . import journal

        stale = self.stale
        try:
            found = journal.reconcile(self.conn, self.app_dir, str(stale["run_id"]), stale.get("release"),
                                      "its controller went away before the run ended (killed, or its connection "
                                      "dropped); the host's processes of the run were stopped by the lock keeper")
            self.stale_record = found["record"] if found["written"] else None
        except SlipwayError as exc:
            self.stale_record = {"error": str(exc)}

    def _try_acquire(self) -> bool:
        """One attempt: True when held (self.channel open), False when another process holds it."""
        meta = {
            "run_id": self.run_id,
            "pid": os.getpid(),
            "controller": socket.gethostname(),
            "user": getpass.getuser(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.command,
            **self.extra,
        }
        chan = self.conn.transport.open_session(timeout=CONNECT_TIMEOUT)
        chan.settimeout(CONNECT_TIMEOUT + 5)
        chan.exec_command(self._command(meta))
        out = chan.makefile("r")
        stale = None
        try:
            while True:
                line = out.readline()
                if not line:
                    break
                line = line.rstrip("\n")
                if line.startswith("STALE "):
                    stale = _parse_meta(line[len("STALE "):])
                elif line == "ACQUIRED":
                    chan.settimeout(None)
                    self.channel, self.meta, self.stale, self._out = chan, meta, stale, out
                    return True
        except TimeoutError:  # socket.timeout
            chan.close()
            raise SlipwayError(f"the deploy lock keeper on {self.host} did not answer in {CONNECT_TIMEOUT + 5}s; "
                               "check the host's load and that flock(1) and bash are installed") from None
        chan.status_event.wait(RELEASE_TIMEOUT)
        status = chan.exit_status if chan.exit_status_ready() else -1
        err = chan.makefile_stderr("r").read()
        chan.close()
        if status == LOCK_HELD_EXIT:
            return False
        detail = _one_line(Exception(err.decode(errors="replace") if isinstance(err, bytes) else err)) if err else "no output"
        raise SlipwayError(f"cannot take the deploy lock {self.paths[1]} on {self.host} (exit {status}: {detail}); "
                           "the deploy user needs write access to slipway_app_dir, and flock(1) and bash on the host")

    def _send(self, data: bytes) -> bool:
        with self._send_lock:
            chan = self.channel
            if chan is None or chan.closed:
                return False
            try:
                chan.sendall(data)
                return True
            except Exception:  # noqa: BLE001 - paramiko SSHException, socket errors, EOFError
                return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            chan = self.channel
            if chan is None:
                return
            if chan.exit_status_ready() or not self._send(b"HB\n"):
                self.lost = True
                return

    def stop_run(self) -> bool:
        """Have the keeper end every process of this run on the host (SIGTERM, a commit under way
        finishes, SIGKILL after STOP_SECONDS) while the lock stays held. True when it confirmed."""
        chan, out = self.channel, self._out
        if chan is None or out is None or chan.exit_status_ready() or not self._send(b"STOP\n"):
            return False
        chan.settimeout(STOP_SECONDS + 15)
        try:
            while True:
                line = out.readline()
                if not line:
                    return False
                if line.strip() == "STOPPED":
                    return True
        except Exception:  # noqa: BLE001 - timeout or a broken channel: the caller reports it
            return False
        finally:
            with contextlib.suppress(Exception):
                chan.settimeout(None)

    def release(self) -> None:
        """Release the lock (removes the metadata on the host) and close the connection. Idempotent."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=RELEASE_TIMEOUT)
        self._heartbeat = None
        chan = self.channel
        try:
            if chan is not None and not chan.exit_status_ready():
                if self._send(b"RELEASE\n"):
                    with contextlib.suppress(Exception):
                        chan.shutdown_write()
                chan.status_event.wait(RELEASE_TIMEOUT + STOP_SECONDS)
        finally:
            self._close()

    def _close(self) -> None:
        with self._send_lock:
            chan, self.channel = self.channel, None
        if chan is not None:
            with contextlib.suppress(Exception):
                chan.close()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def __enter__(self) -> DeployLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def lock_hosts(hosts: list[str], run_id: str, command: str = "", extra: dict | None = None,
               conns: dict | None = None):
    """Hold the deploy lock of every host in ``hosts`` (taken in sorted order, so two runs over
    overlapping hosts cannot deadlock); yields the list of DeployLock in that order (each has
    ``.host``, ``.stale``, ``.stale_message``). If one is held by another run, the ones already
    taken are released and LockHeld is raised. ``conns``: open connections by host (from
    probe_pythons) the locks take over; any left over are closed at the end."""
    taken: list[DeployLock] = []
    conns = conns if conns is not None else {}
    try:
        for host in sorted(set(hosts)):
            lock = DeployLock(host, run_id, command, extra=extra, conn=conns.get(host))
            conns.pop(host, None)  # the lock closes it from here on
            taken.append(lock.acquire())
        yield taken
    finally:
        for lock in reversed(taken):
            lock.release()
        close_all(conns)
