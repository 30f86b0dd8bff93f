"""`invoke deploy`: build the release, lock the hosts, run playbooks/deploy.yml, report.

The playbook does the work (one role per phase); this module prints one progress line per phase
while it runs, then a summary table (phase, status, changed, seconds) per host, and writes the JSON
report. Exit codes: 0 deployed (or nothing to do), 1 failed (rolled back, or stopped before any
change), 4 another deploy holds a host's lock.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets as pysecrets
import signal
import sys
import threading
import time
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils.redact import redact_mapping, redact_text

from .errors import Exit, SlipwayError
from .paths import PLAYBOOKS

_TASK_EVENTS = {"runner_on_ok", "runner_on_failed", "runner_on_skipped", "runner_on_unreachable"}
RESCUE = "rescue"  # the role playbooks/deploy.yml runs in its block's rescue: (roles/rescue)


def playbook_phases(playbook: Path = PLAYBOOKS / "deploy.yml") -> tuple[str, ...]:
    """The deploy's phases: the roles ``playbook`` imports, itself or in the task files it
    includes, in the order it runs them (a phase's name is its role's name), the rescue aside."""
    import yaml

    names: list[str] = []

    def walk(items):
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            if "role" in item:
                names.append(item["role"])
            for action in ("ansible.builtin.import_role", "ansible.builtin.include_role"):
                if isinstance(item.get(action), dict):
                    names.append(item[action]["name"])
            for action in ("ansible.builtin.import_tasks", "ansible.builtin.include_tasks"):
                target = item.get(action)
                target = target.get("file") if isinstance(target, dict) else target
                if isinstance(target, str):  # a task file beside the playbook (playbooks/tasks/)
                    walk(yaml.safe_load((playbook.parent / target).read_text()))
            for key in ("roles", "tasks", "block", "rescue", "always"):
                walk(item.get(key))

    walk(yaml.safe_load(playbook.read_text()))
    return tuple(n for n in dict.fromkeys(names) if n != RESCUE)


PHASES = playbook_phases()


def deploy_extravars(run_id: str, built, runtimes: dict) -> dict:
    """What playbooks/deploy.yml's roles get from the controller (Molecule passes the same);
    ``runtimes``: {X.Y: slipway.runtime.Runtime}, one per Python the hosts run modules with."""
    from .runtime import extravars

    return {
        "slipway_deploy_run_id": run_id,
        "slipway_release_id": built.id,
        "slipway_release_archive": str(built.archive),
        "slipway_migrations": built.migrations,
        "slipway_app": built.app.as_vars(),
        **extravars(runtimes),
    }


def runtime_lines(pythons: dict, runtimes: dict) -> list[str]:
    """One line per module runtime: its id, where it came from, and the hosts (interpreter and
    version) it is for."""
    lines = []
    for xy, rt in runtimes.items():
        hosts = [f"{p.host} ({p.interpreter}, {p.version})" for p in pythons.values() if p.python == xy]
        origin = ("the controller's venv" if rt.origin == "venv" else
                  "PyPI wheels, cached" if rt.cached else "PyPI wheels, downloaded now")
        lines.append(f"  runtime {rt.id} ({origin}) for Python {xy}: {', '.join(hosts)}")
    return lines


_SERIAL = re.compile(r"^(?:([1-9][0-9]*)|([1-9][0-9]?|100)%)$")


def rollout(hosts: list[str]) -> dict:
    """How the hosts are rolled out: the inventory's ``slipway_serial`` (how many hosts deploy at
    once: a number, or a percentage of the hosts; 1 by default) and ``slipway_max_fail_percentage``
    (how many of a batch may fail before the rollout stops; 0 by default), alike on every host, and
    the batches in the order the playbook takes them (Ansible's: a percentage rounds down, at least
    one host)."""
    from .inventory import host_vars

    seen, databases = {}, set()
    for name in hosts:
        hv = host_vars(name)
        seen[name] = (str(hv.render("slipway_serial", 1)).strip(), str(hv.render("slipway_max_fail_percentage", 0)).strip())
        databases.add((str(hv.render("slipway_db_host", "")), str(hv.render("slipway_db_port", 5432)),
                       str(hv.render("slipway_db_name", ""))))
    values = set(seen.values())
    if len(values) > 1:
        detail = "; ".join(f"{n}: {v[0]}, {v[1]}" for n, v in sorted(seen.items()))
        raise SlipwayError(f"the hosts of one deploy set slipway_serial / slipway_max_fail_percentage differently ({detail}); "
                           "set them once, for the group")
    serial, max_fail = values.pop() if values else ("1", "0")
    m = _SERIAL.match(serial)
    if not m:
        raise SlipwayError(f"slipway_serial {serial!r} is not a number of hosts or a percentage; set e.g. "
                           "slipway_serial: 2 or slipway_serial: 25% in the inventory")
    if not re.match(r"^(?:[0-9]|[1-9][0-9]|100)$", max_fail):
        raise SlipwayError(f"slipway_max_fail_percentage {max_fail!r} is not a percentage from 0 to 100; set e.g. "
                           "slipway_max_fail_percentage: 0 in the inventory")
    size = int(m.group(1)) if m.group(1) else max(1, int(len(hosts) * int(m.group(2)) / 100))
    batches = [hosts[i:i + size] for i in range(0, len(hosts), size)]
    # a no-op on every host may run them in one batch - not when two share a database: their smoke
    # tests reset and count the same smoke book's rows
    return {"serial": int(serial) if m.group(1) else serial, "max_fail_percentage": int(max_fail), "size": size,
            "batches": batches, "noop_together": len(databases) == len(hosts)}


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}-{pysecrets.token_hex(2)}"


class PhaseTracker:
    """Turns ansible-runner events into per-host phases (status, changed, seconds) and progress lines."""

    def __init__(self, out=sys.stdout, quiet: bool = False):
        self.out = out
        self.quiet = quiet
        self.hosts: dict[str, dict[str, dict]] = {}
        self.rescue = False
        self.started = time.monotonic()

    def _phase(self, host: str, name: str) -> dict:
        phases = self.hosts.setdefault(host, {})
        if name not in phases:
            phases[name] = {"name": name, "status": "ok", "changed": 0, "seconds": 0.0, "tasks": 0}
            if not self.quiet:
                elapsed = time.monotonic() - self.started
                print(f"  [{elapsed:6.1f}s] {host:<12} {name}", file=self.out, flush=True)
        return phases[name]

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        data = event.get("event_data") or {}
        if kind == "playbook_on_task_start":
            # the rescue role's tasks and the roles it includes count as the phase "rescue",
            # until the first task of no role (the block's always:)
            role = data.get("role") or ""
            if role == RESCUE:
                self.rescue = True
            elif not role:
                self.rescue = False
            return
        if kind not in _TASK_EVENTS and kind != "runner_on_start":
            return
        host = data.get("host")
        role = data.get("role") or ""
        if not host or (not role and not self.rescue):
            return
        name = "rescue" if self.rescue else role
        phase = self._phase(host, name)
        if kind == "runner_on_start":
            return
        res = data.get("res") or {}
        phase["tasks"] += 1
        try:
            phase["seconds"] += float(data.get("duration") or 0.0)
        except (TypeError, ValueError):
            pass
        if kind == "runner_on_ok" and res.get("changed"):
            phase["changed"] += 1
        if kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            phase["status"] = "failed"

    def last_phase(self, host: str) -> str | None:
        """The phase this host's run had reached (the last one an event was seen for), rescue aside."""
        names = [n for n in self.hosts.get(host, {}) if n != "rescue"]
        return names[-1] if names else None

    def phases(self, host: str) -> list[dict]:
        phases = self.hosts.get(host, {})
        ordered = [phases[p] for p in PHASES if p in phases] + [v for k, v in phases.items() if k not in PHASES]
        return [{**p, "seconds": round(p["seconds"], 2)} for p in ordered]


def _summary_table(report: dict) -> list[str]:
    lines = [f"{'host':<12} {'phase':<12} {'status':<8} {'changed':>7} {'seconds':>8}"]
    for host, info in report["hosts"].items():
        for p in info["phases"]:
            lines.append(f"{host:<12} {p['name']:<12} {p['status']:<8} {p['changed']:>7} {p['seconds']:>8.2f}")
    return lines


def _lint_release(doc: dict, migrations: dict) -> dict:
    """squawk over the release's pending migrations (written to a private temporary folder)."""
    import tempfile

    from .lint import lint_plan

    with tempfile.TemporaryDirectory(prefix="slipway-lint-") as tmp:
        for rel, text in migrations.items():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return lint_plan(doc, tmp)


def lint_plans(report: dict, migrations: dict) -> dict:
    """squawk's findings on each host's pending migrations (--check), by host."""
    found = {}
    for host, info in report["hosts"].items():
        doc = (info.get("plan") or {}).get("document")
        if doc and doc.get("to_apply"):
            found[host] = _lint_release(doc, migrations)
    return found


def _check_lines(report: dict, lints: dict) -> list[str]:
    from .migrations import render

    lines = []
    for host, info in report["hosts"].items():
        state = info.get("release_state") or {}
        lines.append(f"{host}: release {report['release']} "
                     + ("would be installed and current switched from " + str(state.get("previous"))
                        if state.get("installed") else
                        ("is installed; current would switch from " + str(state.get("previous")) if state.get("switched")
                         else "is installed and current; no new release")))
        doc = (info.get("plan") or {}).get("document")
        if doc:
            if host in lints:
                doc = {**doc, "lint": lints[host]}
            rendered = render(doc)
            rendered[0] = (f"migrations of release {report['release']} -> {host}'s database, "
                           f"{doc['tracking_table']} ({doc['tracking_rows']} rows)")
            lines += ["  " + line for line in rendered]
        pm2 = info.get("pm2") or {}
        action = pm2.get("action")
        lines.append(f"  pm2: {'reload/start: ' + str(action) if action and action != 'none' else 'no reload'}"
                     + (f" ({pm2.get('reason')})" if pm2.get("reason") else ""))
        backup = info.get("backup")
        lines.append(f"  backup: {'would be taken: ' + str(backup.get('path')) if backup else 'not needed (no schema change)'}")
    return lines


_INVENTORY_OVERRIDES = {"allow_tampered": "slipway_migrate_allow_tampered",
                        "include_skipped": "slipway_migrate_include_skipped",
                        "allow_unknown": "slipway_migrate_allow_unknown"}


def name_overrides(text: str | None) -> str | None:
    """The engine names its overrides in words; `invoke deploy` takes them from the inventory."""
    from ansible_collections.slipway.core.plugins.module_utils.migrate import OVERRIDES

    for key, words in OVERRIDES.items():
        text = text.replace(words, f"set {_INVENTORY_OVERRIDES[key]}: true for the host in the inventory") if text else text
    return text


def check_report_path(report_path: str) -> None:
    """--report must name a file slipway can write: checked before anything happens."""
    path = Path(report_path)
    if path.is_dir():
        raise SlipwayError(f"--report {report_path} is a directory; give a file path, e.g. --report {path / 'deploy.json'}")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise SlipwayError(f"--report {report_path}: directory {parent} does not exist; create it or pick another path")
    if path.exists() and not os.access(path, os.W_OK):
        raise SlipwayError(f"--report {report_path} is not writable; pick another path")
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".slipway-report-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise SlipwayError(f"--report {report_path}: cannot write in {parent} ({exc.strerror or exc}); pick a writable path") from None


def write_report(report_path: str, report: dict) -> None:
    """The JSON report, written whole (a temporary file renamed into place)."""
    from .files import write_private

    write_private(Path(report_path), json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", mode=0o600)


@contextlib.contextmanager
def _stop_on_signals():
    """While the run is under way, SIGINT/SIGTERM/SIGHUP ask it to stop (the playbook's process
    group is killed, the hosts' processes of the run are stopped by the lock keepers, the report
    tells what was done); a second signal is not needed and changes nothing. Yields the event."""
    stop = threading.Event()
    names = {}

    def handler(signum, frame):
        names.setdefault("signal", signal.Signals(signum).name)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stop.names = names
    try:
        yield stop
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def _interrupted(locks, tracker, run_id: str, release: str, how: str) -> dict:
    """After a playbook that did not finish: stop the run's processes on every host (lock kept),
    then write each host's record from the run's journal. Returns {host: what was found}."""
    from . import journal
    from .remote import connect

    found = {}
    for lock in locks:
        stopped = lock.stop_run()
        try:
            conn = lock.conn if lock.held else connect(lock.host)
            state = journal.reconcile(conn, lock.app_dir, run_id, release, how,
                                      phase=tracker.last_phase(lock.host))
        except Exception as exc:  # noqa: BLE001 - unreachable host, broken channel: said in the report
            message = str(exc) if isinstance(exc, SlipwayError) else f"{type(exc).__name__}: {exc}"
            state = {"record": None, "written": False,
                     "error": redact_text(message) + "; the next deploy records what this run did"}
        found[lock.host] = {**state, "stopped": stopped}
    return found


def build_report(host: str, hosts: list[str], run_id: str, release_id: str, source: str, check: bool,
                 result: dict, known: list[str], tracker: PhaseTracker, interrupted: dict, how: str,
                 seconds: float) -> dict:
    """The deploy's report (what `--report` writes and the summary renders), from the playbook's
    result, the phases seen and what was found on hosts whose run was cut short. Pure: no I/O."""
    data = redact_mapping(result["data"].get("deploy", {}), known=known)
    failures = [{**f, "msg": redact_text(name_overrides(f["msg"]), known=known)} for f in result["failures"]]
    report = {
        "host": host,
        "run_id": run_id,
        "release": release_id,
        "source": source,
        "check": check,
        "hosts": {},
        "seconds": seconds,
    }
    # a stop asked for when the playbook had already finished: its outcome is what happened
    late_stop = result["finished"] and result["status"] == "canceled" and \
        all((data.get(n) or {}).get("result") == "ok" for n in hosts)
    ok = result["finished"] and (result["rc"] == 0 or late_stop)
    for name in hosts:
        info = data.get(name) or {}
        phases = tracker.phases(name)
        failure = info.get("failure")
        if failure:
            failure = {**failure, "cause": name_overrides(failure.get("cause"))}
        cut = interrupted.get(name)
        record = (cut or {}).get("record") or {}
        if cut is not None and (not info or info.get("result") != "ok"):
            # the playbook did not get to write this host's record: the journal tells what happened
            phase = tracker.last_phase(name) or "preflight"
            info = {
                "result": "interrupted",
                "previous": record.get("previous"),
                "release_state": {"id": release_id, "previous": record.get("previous"),
                                  "switched": bool(record.get("switched_from")), "current": record.get("current")},
                "migrations_applied": record.get("migrations_applied") or [],
                "backup": record.get("backup"),
                "pm2": record.get("pm2"),
                "rolled_back": record.get("rolled_back"),
            }
            failure = {"phase": phase, "task": None, "cause": how}
        if not failure and not late_stop:
            first = next((f for f in failures if f["host"] == name), None)
            if first:
                failed_phase = next((p["name"] for p in phases if p["status"] == "failed"), "preflight")
                failure = {"phase": failed_phase, "task": first["task"], "cause": first["msg"]}
        host_result = info.get("result") or ("ok" if ok and name in tracker.hosts else ("failed" if failure else "not run"))
        report["hosts"][name] = {
            "result": host_result,
            "phases": phases,
            "changed": sum(p["changed"] for p in phases if p["name"] != "rescue"),
            "previous": info.get("previous"),
            "release_state": info.get("release_state"),
            "migrations_applied": info.get("migrations_applied") or [],
            "backup": info.get("backup"),
            "smoke": info.get("smoke"),
            "pm2": info.get("pm2"),
            "plan": info.get("plan") if check else {k: v for k, v in (info.get("plan") or {}).items() if k != "document"},
            "failure": failure,
            "rolled_back": bool(info.get("rolled_back")),
            "rolled_back_to": info.get("rolled_back_to"),
            "stopped": _truthy(info.get("stopped")),
            "took_over": info.get("took_over") or None,
            "handover": info.get("handover") or None,
            # preflight found nothing this deploy could change there: only its health and smoke tests ran
            "noop": _truthy(info.get("noop")),
            "batch_hosts": info.get("batch_hosts") or None,
        }
        if cut is not None:
            report["hosts"][name]["interrupted"] = {
                "how": how, "processes_stopped": cut["stopped"], "record_written": cut.get("written"),
                "current": record.get("current"), "record": cut.get("record"), "error": cut.get("error")}
    report["result"] = ("interrupted" if interrupted else
                        "ok" if ok and all(h["result"] == "ok" for h in report["hosts"].values()) else "failed")
    report["changed"] = sum(h["changed"] for h in report["hosts"].values())
    return report


def rollout_line(plan: dict) -> str:
    batches = "; ".join(f"{i}: {', '.join(b)}" for i, b in enumerate(plan["batches"], 1))
    together = ("; all in one batch if preflight finds nothing to change on any of them"
                if plan.get("noop_together") and len(plan["batches"]) > 1 else "")
    return (f"rollout: {len(plan['batches'])} batch(es) of up to {plan['size']} (slipway_serial {plan['serial']}, "
            f"slipway_max_fail_percentage {plan['max_fail_percentage']}) - {batches}{together}")


def add_rollout(report: dict, plan: dict) -> None:
    """The batches in the report, each host's batch, and where a stopped rollout stopped. When the
    deploy could change nothing on any host (each a no-op), playbooks/deploy.yml ran them in one
    batch: nothing reloads, each host only proves itself."""
    # the batch each host ran in, as the play saw it (ansible_play_batch): larger than the plan's
    # only when every host was a no-op and the play ran them all at once
    ran = [h.get("batch_hosts") for h in report["hosts"].values() if h.get("batch_hosts")]
    together = bool(ran) and max(len(b) for b in ran) > plan["size"]
    if together:
        widest = max(ran, key=len)
        plan = {**plan, "size": len(widest), "batches": [list(widest)]}
    report["rollout"] = {k: plan[k] for k in ("serial", "max_fail_percentage", "size", "batches")}
    report["rollout"]["one_batch_noop"] = together
    reached = 0
    for number, batch in enumerate(plan["batches"], 1):
        for name in batch:
            if name in report["hosts"]:
                report["hosts"][name]["batch"] = number
                if report["hosts"][name]["result"] != "not run":
                    reached = number
    # a later batch none of whose hosts ran: the rollout stopped after the last one that did
    stopped = 0 < reached < len(plan["batches"]) and report["result"] != "ok"
    report["rollout"]["stopped_after_batch"] = reached if stopped else None


def render_report(report: dict, lints: dict | None = None) -> list[str]:
    """The summary printed after a deploy: the phase table, the plan (--check, with ``lints`` from
    lint_plans), each host's failure and what to do next, and the one-line outcome. Pure: no I/O."""
    hosts = list(report["hosts"])
    release_id = report["release"]
    how = next((h["interrupted"]["how"] for h in report["hosts"].values() if h.get("interrupted")), "")
    lines = ["", *_summary_table(report)]
    stopped = (report.get("rollout") or {}).get("stopped_after_batch")
    if stopped:
        later = [n for b in report["rollout"]["batches"][stopped:] for n in b]
        lines.append(f"\nthe rollout stopped after batch {stopped} (a host failed there); not deployed: {', '.join(later)}")
    if report["check"]:
        lines += ["", *_check_lines(report, lints or {})]
    unchanged = [n for n, h in report["hosts"].items() if h.get("noop") and h["result"] == "ok" and not report["check"]]
    if (report.get("rollout") or {}).get("one_batch_noop"):
        lines.append("\nall hosts in one batch: the deploy could change nothing on any of them (no reload)")
    if unchanged:
        lines.append(f"\nnothing to change on {', '.join(unchanged)}: {release_id} already serves there and nothing is "
                     f"pending; {'its' if len(unchanged) == 1 else 'their'} lock, plan, health and smoke tests were checked")
    for name, info in report["hosts"].items():
        lines += _takeover_lines(name, info, report["check"])
        lines += _failure_lines(name, info, report["host"])
    if report["check"]:
        tail = f"checked {release_id} for {', '.join(hosts)} in {report['seconds']:.1f}s; a deploy would make {report['changed']} change(s)"
    elif report["result"] == "ok":
        tail = f"deployed {release_id} to {', '.join(hosts)} in {report['seconds']:.1f}s, {report['changed']} change(s)"
    elif report["result"] == "interrupted":
        tail = (f"the deploy of {release_id} to {', '.join(hosts)} was interrupted ({how}; "
                f"{report['seconds']:.1f}s); see above what it did")
    else:
        tail = f"{release_id} was not deployed to {', '.join(hosts)} ({report['seconds']:.1f}s; see the failure above)"
    return [*lines, f"\n{report['result'].upper()}: {tail}"]


def deploy(host: str, release: str | None = None, check: bool = False, report_path: str | None = None,
           out=sys.stdout) -> int:
    from . import release as rel
    from . import runtime as rt
    from .inventory import resolve_target
    from .remote import LockHeld, close_all, lock_hosts, probe_pythons
    from .runner import run_playbook
    from .vault import check_hosts

    started = time.monotonic()
    hosts = resolve_target(host)
    if report_path:
        check_report_path(report_path)
    known = check_hosts(hosts)  # the vault decrypts, every secret is there: before anything is built or locked
    plan = rollout(hosts)  # the batches: a bad setting stops here, before anything is built or locked
    with rel.resolved(release) as source:  # resolved once (a git ref: one archive), settings read once
        if source.app.needs_token:  # the app's smoke tests send the API token (slipway.yml): before a build
            check_hosts(hosts, required=("slipway_api_token",), optional=())
        built = rel.pack(source)
    # each host's module Python, one command on the SSH connection its deploy lock then uses; the
    # module runtime for each Python X.Y (a download that fails stops here, before any lock)
    pythons, conns = probe_pythons(hosts)
    try:
        runtimes = rt.runtimes(list(pythons.values()))
    except BaseException:
        close_all(conns)
        raise
    run_id = new_run_id()
    mode = "check (nothing will change)" if check else "deploy"
    print(f"slipway {mode}: release {built.id} ({built.files} files, {len(built.journal_tags)} migrations) "
          f"from {built.source} -> {', '.join(hosts)}; run {run_id}", file=out, flush=True)
    for line in runtime_lines(pythons, runtimes):
        print(line, file=out, flush=True)
    tracker = PhaseTracker(out)
    extravars = {**deploy_extravars(run_id, built, runtimes), "slipway_rollout_serial": plan["serial"],
                 "slipway_rollout_hosts": list(hosts) if plan["noop_together"] else [],
                 "slipway_rollout_max_fail_percentage": plan["max_fail_percentage"]}
    if len(hosts) > 1:
        print(rollout_line(plan), file=out, flush=True)
    command = "invoke deploy --host " + host + (" --check" if check else "")
    interrupted: dict = {}
    how = ""
    try:
        with _stop_on_signals() as stop, lock_hosts(hosts, run_id, command, extra={"release": built.id},
                                                    conns=conns) as locks:
            for lock in locks:
                if lock.stale_message:
                    print(f"  {lock.host}: {lock.stale_message}", file=out, flush=True)
            result = run_playbook("deploy.yml", host, extravars, check=check, on_event=tracker, cancel=stop.is_set)
            lost = [lock for lock in locks if not lock.held]
            if not result["finished"]:
                how = (f"stopped by {stop.names.get('signal', 'a signal')}" if stop.is_set() else
                       f"ansible-playbook ended before the deploy finished (exit {result['rc']})")
                cut = locks
            elif lost:
                how = ("the deploy lock's SSH channel to the host broke during the run; the lock keeper there "
                       "stopped the run's processes")
                cut = lost
            if not result["finished"] or lost:
                print(f"  {how}: stopping the run's processes on {', '.join(sorted(lock.host for lock in cut))}",
                      file=out, flush=True)
                interrupted = _interrupted(cut, tracker, run_id, built.id, how)
    except LockHeld as exc:
        raise SlipwayError(str(exc), exit_code=Exit.LOCK_HELD) from None
    report = build_report(host, hosts, run_id, built.id, built.source, check, result, known, tracker,
                          interrupted, how, round(time.monotonic() - started, 2))
    add_rollout(report, plan)
    for line in render_report(report, lint_plans(report, built.migrations) if check else None):
        print(line, file=out)
    out.flush()
    if report_path:
        try:
            write_report(report_path, report)
        except OSError as exc:
            print(f"error: cannot write the report {report_path} ({exc.strerror or exc}); the deploy's outcome is above "
                  f"and in each host's deploys.jsonl", file=sys.stderr)
            return 1
    return 0 if report["result"] == "ok" else 1


def _takeover_lines(name: str, info: dict, check: bool) -> list[str]:
    """A first deploy onto a host deployed by hand: where the app ran from, what was taken from
    there, whether its processes were replaced (and how), and that the directory was left as it was."""
    old = info.get("took_over")
    if not old:
        return []
    if check:
        return [f"\n{name}: PM2 runs the app by hand from {old}: the deploy would take it over (its .env and logs "
                f"copied in, its processes replaced by the release's; {old} left as it is)"]
    adopted = (info.get("release_state") or {}).get("adopted") or {}
    pm2 = info.get("pm2") or {}
    hand = info.get("handover") or pm2.get("handover") or {}
    release = (info.get("release_state") or {}).get("id") or pm2.get("release")
    taken = []
    if _truthy(adopted.get("env")):
        taken.append("its .env became shared/.env (0600)")
    if adopted.get("logs"):
        taken.append(f"{len(adopted['logs'])} old log file(s) copied to logs/ ({', '.join(adopted['logs'])})")
    ok = info["result"] == "ok"
    if ok and pm2.get("action") == "replaced":
        taken.append(f"its PM2 processes replaced by the release's with no gap (served meanwhile by {hand.get('app')})")
    elif ok and pm2.get("action") == "restarted":
        taken.append("its PM2 processes deleted and started again from the release (not all ran online in cluster "
                     "mode, so with a short gap)")
    elif hand and not _truthy(hand.get("old_deleted")):
        taken.append("its PM2 processes were NOT replaced: they serve as before")
    elif _truthy(hand.get("old_deleted")):
        taken.append(f"its PM2 processes were deleted in the handover, so there is nothing to go back to: the rescue "
                     f"left release {release} running ({pm2.get('online')}/{pm2.get('total')} instances online as "
                     f"PM2 last showed them); fix the release and deploy again, or "
                     f"start the old app by hand in {old} (pm2 delete the release's processes first)")
    else:
        taken.append("its PM2 processes were not touched: they serve as before")
    return [f"\n{name}: took over the app deployed by hand in {old}: " + ("; ".join(taken) or "nothing copied")
            + f"; {old} itself was left as it was"]


def _failure_lines(name: str, info: dict, target: str) -> list[str]:
    """What went wrong on one host, what the run changed there, and what to do next."""
    from .journal import describe

    f = info.get("failure")
    if not f:
        return []
    lines = []
    backup = info.get("backup") or {}
    state = info.get("release_state") or {}
    if info["result"] == "interrupted":
        cut = info.get("interrupted") or {}
        lines.append(f"\n{name}: INTERRUPTED in {f['phase']}: {f['cause']}")
        if cut.get("record"):
            lines.append(f"{name}: what the run did: " + "; ".join(describe(cut["record"])))
        else:
            lines.append(f"{name}: what the run did could not be read from its journal ({cut.get('error')})")
        if not cut.get("processes_stopped"):
            lines.append(f"{name}: could not confirm that the run's processes on the host were stopped "
                         f"({cut.get('error') or 'the lock keeper did not answer'}); the next deploy's lock keeper stops them first")
        nxt = f"{name}: next: `invoke deploy --host {target}` finishes the deploy (idempotent)"
        if state.get("switched"):
            nxt += f", or `invoke rollback --host {name}` returns to {state.get('previous')}"
        lines.append(nxt)
    else:
        lines.append(f"\n{name}: FAILED in {f['phase']}: {f['cause']}")
        if info["rolled_back"]:
            lines += _rollback_lines(name, info)
        elif info.get("stopped"):
            lines.append(f"{name}: no release served healthy before this deploy, so the rescue stopped the app "
                         f"(pm2 delete); current -> {state.get('id')} serves nothing")
            pm2 = info.get("pm2") or {}
            if pm2.get("app_error"):
                lines.append(f"{name}: the app's last error: {pm2['app_error']}")
            lines.append(f"{name}: next: fix the release, then `invoke deploy --host {name}` again")
        elif f["phase"] == "preflight":
            lines.append(f"{name}: stopped before any change")
    if backup.get("path"):
        lines.append(f"{name}: the pre-deploy database is in {backup['path']} "
                     f"(restore: invoke rollback --host {name} --db restore --backup {backup.get('id')})")
    return lines


def _truthy(value) -> bool:
    return value is True or str(value).lower() == "true"


def _rollback_lines(name: str, info: dict) -> list[str]:
    """What the deploy's automatic rollback reached, as PM2 showed it at the end: `current` went
    back; whether the previous release really runs (every instance online, health gate passed)."""
    previous = info.get("rolled_back_to") or info.get("previous")
    pm2 = info.get("pm2") or {}
    counts = f"{pm2.get('online')}/{pm2.get('total')} instances online" if pm2.get("total") is not None else "instances unknown"
    if pm2.get("release") == previous and _truthy(pm2.get("healthy")):
        how = "reloaded" if pm2.get("action") not in (None, "none") else "it was still running"
        return [f"{name}: rolled back: current -> {previous}; PM2 runs it healthy ({counts}, {how})"]
    lines = [f"{name}: rolled back current -> {previous}, but the app is NOT healthy on it: {counts}"
             + (f" on {pm2.get('release')}" if pm2.get("release") else "")]
    for proc in pm2.get("processes") or []:
        if isinstance(proc, dict) and proc.get("status") != "online":
            lines.append(f"{name}:   instance {proc.get('pm_id')}: {proc.get('status')} on {proc.get('release')}, "
                         f"{proc.get('restarts')} restarts")
    if pm2.get("app_error"):
        lines.append(f"{name}: the app's last error: {pm2['app_error']}")
    elif pm2.get("error"):
        lines.append(f"{name}: PM2: {str(pm2['error']).splitlines()[0][:300]}")
    lines.append(f"{name}: next: the app is down or degraded on this host; find the cause (the error above, "
                 f"`pm2 logs` on the host), then `invoke deploy --host {name}` a fixed release")
    return lines


def rollback(host: str, release: str | None = None, db: str | None = None, backup: str | None = None,
             yes: bool = False, out=sys.stdout, ask=input) -> int:
    """Point `current` back at the release before the current one (or ``release``), reload and gate
    on health; with ``db="restore"`` also restore the database from ``backup`` (safety backup first)."""
    from . import backups
    from .inventory import resolve_target
    from .remote import LockHeld, lock_hosts
    from .runner import run_playbook
    from .vault import check_hosts

    if db not in (None, "restore"):
        raise SlipwayError(f"--db {db!r} is not known; use --db restore --backup ID (the schema is otherwise kept)")
    if db and not backup:
        raise SlipwayError("--db restore needs --backup ID; list backups with `invoke backup --host H --list`")
    if backup and not db:
        raise SlipwayError("--backup is only used with --db restore; add --db restore to restore the database")
    hosts = resolve_target(host)
    known = check_hosts(hosts)  # the vault decrypts, every secret is there (and the output is scrubbed of them)
    if db:
        target = backups.restore_target(host, backup)  # one host, a backup of that host
        if not yes:
            if not sys.stdin.isatty():
                raise SlipwayError(f"restoring {target} from {backup} replaces the database (a safety backup is "
                                   "taken first); confirm by running it in a terminal or pass --yes")
            backups.confirm_restore(target, backup, ask)
    run_id = new_run_id()
    extravars = {"slipway_deploy_run_id": run_id}
    if release:
        extravars["rollback_release"] = release
    if db:
        extravars["rollback_db_backup_id"] = backup
    tracker = PhaseTracker(out, quiet=True)
    try:
        with lock_hosts(hosts, run_id, "invoke rollback --host " + host):
            result = run_playbook("rollback.yml", host, extravars, on_event=tracker)
    except LockHeld as exc:
        raise SlipwayError(str(exc), exit_code=Exit.LOCK_HELD) from None
    data = redact_mapping(result["data"].get("rollback", {}), known=known)
    for name, info in sorted(data.items()):
        line = f"{name}: current {info.get('previous')} -> {info.get('release')} (reloaded, healthy)"
        if info.get("restored_backup"):
            line += f"; database restored from {info['restored_backup']} (safety backup {info.get('safety_backup')})"
        print(line, file=out)
    for failure in result["failures"]:
        print(f"{failure['host']}: FAILED {failure['task'] or ''}: {redact_text(failure['msg'], known=known)}", file=out)
    return 0 if result["rc"] == 0 else 1
