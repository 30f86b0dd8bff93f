"""Running playbooks through ansible-runner with slipway's inventories and settings."""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

from . import inventory
from .errors import SlipwayError
from .paths import PLAYBOOKS
from .playbook_guard import end_masters

_FAILED_EVENTS = {"runner_on_failed", "runner_on_unreachable"}


def env_for_ansible() -> dict:
    # ansible-playbook from the same venv as this interpreter, whether or not it is activated
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path
    return inventory.ansible_env()


GUARD = Path(__file__).resolve().parent / "playbook_guard.py"


def _children_running(name: str) -> list[int]:
    """Pids of this process's children whose command line names ``name``."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            if int(stat[stat.rfind(b")") + 2:].split()[1]) == me and \
                    name.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                out.append(int(entry))
        except (OSError, ValueError):
            continue
    return out


def run_playbook(playbook: str, target: str, extravars: dict | None = None, progress=None, *,
                 check: bool = False, on_event=None, cancel=None, local: bool = False) -> dict:
    """Run ``playbooks/<playbook>`` against ``target`` (a host or group); returns a result dict with
    ``rc``, ``status``, ``stats`` (set_stats data), ``failures`` (host, task, msg) and per-host counts.

    ``progress``: a callable given one line per task start, for the CLI's progress output;
    ``check``: run in check mode (``--check``); ``on_event``: a callable given every event;
    ``cancel``: a callable polled while it runs, True = stop it (the playbook's process group is
    killed). ``finished`` in the result: the playbook ran to its end (its stats arrived); False when
    it was stopped or died. ``local``: a playbook for this machine only (``target`` must be
    ``localhost``; the inventory is that host alone, with this Python)."""
    import ansible_runner

    path = PLAYBOOKS / playbook
    if not path.exists():
        raise SlipwayError(f"playbook {path} not found; run from a complete slipway checkout")
    failures: list[dict] = []
    final: dict = {}

    finished = []

    def handle(event: dict) -> bool:
        data = event.get("event_data", {})
        kind = event.get("event")
        if on_event:
            on_event(event)
        if kind == "playbook_on_stats":
            finished.append(True)
            final.update(data.get("artifact_data") or {})
        elif kind == "playbook_on_task_start" and progress:
            progress(data.get("task", ""))
        elif kind in _FAILED_EVENTS and not data.get("ignore_errors"):
            res = data.get("res", {}) or {}
            msg = res.get("msg") or res.get("stderr") or ("unreachable" if kind == "runner_on_unreachable" else "failed")
            lines = redact_text(str(msg)).strip().splitlines()
            failures.append({"host": data.get("host"), "task": data.get("task"), "msg": lines[-1:] or [""]})
        return False  # keep no events on disk beyond what ansible-runner needs

    signalled = []

    def cancel_run() -> bool:
        # ansible-runner's own cancel SIGKILLs the guard's process group, which leaves the guard no
        # time to kill ansible's workers (sessions of their own): the guard gets SIGTERM instead,
        # kills every descendant and exits, and ansible-runner sees the playbook end
        if cancel is not None and cancel() and not signalled:
            for pid in _children_running(GUARD.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
        return False

    private = Path(tempfile.mkdtemp(prefix="slipway-runner-"))
    # ansible-runner polls ``cancel`` each time its pexpect wait times out (default 5 s); it reads
    # this from env/settings only (a ``settings=`` argument is dropped when that file is missing)
    (private / "env").mkdir(mode=0o700)
    (private / "env" / "settings").write_text("pexpect_timeout: 0.25\n")
    # one ControlPersist dir per run (short path: unix sockets are limited to ~104 bytes);
    # its masters are closed when the run ends
    control_dir = Path(tempfile.mkdtemp(prefix="slipway-cp-", dir="/tmp"))
    # the guard (slipway/playbook_guard.py) ties ansible-playbook's whole process group to this
    # process: it is killed when this process dies, however it dies
    envvars = {**env_for_ansible(), "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
               "SLIPWAY_RUN_PARENT": str(os.getpid())}
    try:
        result = ansible_runner.run(
            private_data_dir=str(private),
            binary=str(GUARD),
            inventory=(f"localhost ansible_connection=local ansible_python_interpreter={shlex.quote(sys.executable)}\n"
                       if local else inventory.sources()),
            extravars={"slipway_target": target, **(extravars or {})},
            envvars=envvars,
            cmdline=f"{shlex.quote(str(path))} --limit {shlex.quote(target)}" + (" --check" if check else ""),
            quiet=True,
            event_handler=handle,
            cancel_callback=cancel_run if cancel is not None else None,
            suppress_env_files=True,
        )
        stats = result.stats or {}
        rc = result.rc
        if rc != 0 and not failures and not stats.get("ok"):
            tail = redact_text(result.stdout.read() if hasattr(result.stdout, "read") else "").strip().splitlines()[-3:]
            failures.append({"host": target, "task": None, "msg": tail})
        return {
            "rc": rc,
            "status": result.status,
            "finished": bool(finished),
            "counts": {k: v for k, v in stats.items() if isinstance(v, dict)},
            "data": final,
            "failures": [{**f, "msg": " ".join(f["msg"])} for f in failures],
        }
    finally:
        end_masters(str(control_dir))  # the guard ends them too, unless it was killed itself
        shutil.rmtree(control_dir, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def print_failures(result: dict, stream=None) -> None:
    """One line per failed host of a run_playbook result: host, task, message."""
    for failure in result["failures"]:
        where = f"{failure['task']}: " if failure["task"] else ""
        print(f"{failure['host']:<14} FAILED     {where}{failure['msg']}", file=stream or sys.stdout)




def run_read_only(playbook: str, hosts: list[str], extravars: dict, key: str) -> tuple[dict, dict]:
    """A read-only playbook (no deploy lock) on ``hosts``: ({host: its set_stats ``key`` entry},
    {host: why it could not be read}). Each host's module Python is probed on its own (in
    parallel), so one unreachable host is only that host's failure; the playbook then runs once
    for the hosts that answered, with the module runtime each needs."""
    from . import runtime as rt
    from .remote import probe_each, probe_settings

    def said(exc: BaseException) -> str:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__

    # the inventory is read here, one host after another (Ansible's loaders and templating are not
    # thread-safe); only the SSH connections and the probe commands run side by side
    settings, failures = {}, {}
    for name in hosts:
        try:
            settings[name] = probe_settings(name)
        except Exception as exc:  # noqa: BLE001 - a host's own inventory error: that host's failure
            failures[name] = said(exc)

    pythons = {}
    for name, got in probe_each(settings).items():
        if isinstance(got, BaseException):  # SSH's, the probe's, a time-out: one line for that host
            failures[name] = said(got)
        else:
            got[0].close()
            pythons[name] = got[1]
    data = {}
    if pythons:
        runtimes = rt.runtimes(list(pythons.values()))
        # each host's Python X.Y as probed: the playbook sets the module runtime's path from it, and
        # installs the runtime only where a module finds it missing (one module call per host)
        xy = {name: ".".join(found.version.split(".")[:2]) for name, found in pythons.items()}
        result = run_playbook(playbook, ",".join(sorted(pythons)),
                              {**rt.extravars(runtimes), "slipway_host_pythons": xy, **extravars})
        data = result["data"].get(key, {})
        for f in result["failures"]:
            msg = " ".join(f["msg"]) if isinstance(f["msg"], list) else str(f["msg"])
            if f["host"] in data:
                continue  # a failure its play rescued (the module runtime installed, the read run again)
            if f["host"] in pythons:
                failures[f["host"]] = msg
            else:  # the playbook failed as a whole (before any host's task): every host without an answer
                failures.update({n: msg for n in pythons if n not in data and n not in failures})
    return data, failures
