"""What a deploy run really did on a host, from its journal, and the record of a run that did not
finish.

Every slipway module that changes a host during a deploy appends one line to
``<app_dir>/.slipway/runs/<run_id>.jsonl`` at the moment of the change, under the run's lock
(``module_utils/runguard.py``): ``backup`` (a verified backup kept), ``switched`` (``current``
now points at ``release``, was ``previous``), ``migrations`` (a committed transaction and the
tracking rows in it), ``pm2`` (the app was started/reloaded on a release). The lock keeper adds
``lost`` when the controller's connection ended. A run that ends normally writes its own record in
``deploys.jsonl`` (playbooks/deploy.yml); one that was stopped or killed does not: then the
controller (when it is still alive) or the next run that takes the lock over writes it from the
journal, marked ``result: interrupted``, so `invoke rollback` and the next deploy know what
happened.
"""
from __future__ import annotations

import json
import shlex
from datetime import datetime, timezone

from ansible_collections.slipway.core.plugins.module_utils import layout

from .errors import SlipwayError

PHASE_OF = {"backup": "db_backup", "env": "app_release", "adopted": "app_release", "switched": "app_release",
            "migrations": "db_migrate", "pm2": "pm2_app"}


def _files(app_dir: str, run_id: str) -> dict:
    return {"journal": layout.run_journal(app_dir, run_id), "records": layout.deploys_file(app_dir),
            "current": layout.current_link(app_dir)}


def _lines(text: str) -> list[dict]:
    from ansible_collections.slipway.core.plugins.module_utils.hoststate import json_objects

    return json_objects(text.splitlines())


def read_state(conn, app_dir: str, run_id: str) -> dict:
    """The run's journal events, whether deploys.jsonl has a record of it, and where current points."""
    from .remote import run

    f = _files(app_dir, run_id)
    q = shlex.quote
    marker = "--slipway-records--"
    cmd = (f"readlink {q(f['current'])} || true; echo {marker}; cat {q(f['journal'])} 2>/dev/null || true; "
           f"echo {marker}; grep -F {q(json.dumps(run_id))} {q(f['records'])} 2>/dev/null || true")
    result = run(conn, cmd)
    if result.failed:
        raise SlipwayError(f"cannot read the journal of run {run_id} in {app_dir}/.slipway (exit {result.exited})")
    current, _, rest = result.stdout.partition(marker + "\n")
    journal, _, records = rest.partition(marker + "\n")
    recorded = [r for r in _lines(records) if r.get("run_id") == run_id]
    return {"events": _lines(journal), "recorded": recorded,
            "current": current.strip().rsplit("/", 1)[-1] or None}


def summarize(run_id: str, release: str | None, events: list[dict], current: str | None,
              phase: str | None = None, how: str = "") -> dict:
    """The deploy record of an interrupted run, from its journal events (same keys as the record
    playbooks/deploy.yml writes, plus ``interrupted`` and ``current``)."""
    switches = [e for e in events if e.get("event") == "switched"]
    backups = [e for e in events if e.get("event") == "backup"]
    applied = [tag for e in events if e.get("event") == "migrations" for tag in e.get("applied") or []]
    pm2 = [e for e in events if e.get("event") == "pm2"]
    env = [e for e in events if e.get("event") == "env"]
    adopted = [e for e in events if e.get("event") == "adopted"]
    lost = next((e for e in events if e.get("event") == "lost"), None)
    first_previous = switches[0].get("previous") if switches else None
    final = switches[-1].get("release") if switches else None
    rolled_back = len(switches) > 1 and final == first_previous
    changes = [e for e in events if e.get("event") in PHASE_OF]
    reached = phase
    if not reached:
        reached = PHASE_OF[changes[-1]["event"]] if changes else "preflight"
    backup = backups[-1] if backups else None
    return {
        "run_id": run_id,
        "finished": datetime.now(timezone.utc).isoformat(),
        "release": release,
        "previous": first_previous if switches else current,
        "switched_from": first_previous if switches and final == release and final != first_previous else None,
        "result": "interrupted",
        "failure": {"phase": reached, "task": "", "cause": how or "the run was interrupted"},
        "backup": {k: backup.get(k) for k in ("id", "path", "size", "sha256", "toc_entries", "created")} if backup else None,
        "migrations_applied": applied,
        "rolled_back": rolled_back,
        "pm2": dict({k: pm2[-1].get(k) for k in ("action", "release", "completed", "app")},
                    steps=[{k: e.get(k) for k in ("action", "app", "completed")} for e in pm2]) if pm2 else None,
        "adopted": {k: adopted[-1].get(k) for k in ("path", "env", "logs")} if adopted else None,
        "env": ("restored" if env[-1].get("restored") else "written") if env else None,
        "current": current,
        "interrupted": {"how": how, "controller_lost_at": lost.get("at") if lost else None,
                        "last_change": changes[-1]["event"] if changes else None},
    }


def describe(record: dict) -> list[str]:
    """What an interrupted run did, one phrase per kind of change, from its record."""
    did = []
    backup = record.get("backup") or {}
    if backup.get("id"):
        did.append(f"backup {backup['id']} taken")
    adopted = record.get("adopted") or {}
    if adopted.get("path"):
        did.append(f"took over {adopted['path']}: " + ", ".join(
            (["its .env copied to shared/.env"] if adopted.get("env") else []) +
            [f"{len(adopted.get('logs') or [])} old log file(s) copied to logs/"]))
    if record.get("env"):
        did.append(f"the app's shared/.env {record['env']}")
    if record.get("switched_from"):
        did.append(f"current switched from {record['switched_from']} to {record.get('release')}")
    did.append("migrations committed: " + (", ".join(record.get("migrations_applied") or []) or "none"))
    pm2 = record.get("pm2") or {}
    steps = pm2.get("steps") or []
    if len(steps) > 1:  # a handover: several PM2 commands, on two apps
        did.append(f"PM2 on {pm2.get('release')}: " + "; ".join(
            f"{st.get('action')} {st.get('app')}" + (" (cut short)" if st.get("completed") is False else "")
            for st in steps))
    elif pm2.get("action"):
        did.append(f"PM2 {pm2['action']} on {pm2.get('release')}" + (" (cut short)" if pm2.get("completed") is False else ""))
    else:
        did.append("PM2 not reloaded")
    return did


def append_record(conn, app_dir: str, record: dict) -> None:
    from .remote import run

    path = _files(app_dir, record["run_id"])["records"]
    # the record holds ids, paths and release names, never a secret: it may travel on the command line
    line = json.dumps(record, sort_keys=True)
    result = run(conn, f"umask 077; printf '%s\\n' {shlex.quote(line)} >> {shlex.quote(path)}")
    if result.failed:
        raise SlipwayError(f"cannot append to {path} (exit {result.exited}); check the deploy user's access to it")


def reconcile(conn, app_dir: str, run_id: str, release: str | None, how: str, phase: str | None = None) -> dict:
    """Write the record of run ``run_id`` when it has none (it was interrupted); returns
    {"record": the record (new or existing), "written": bool}."""
    state = read_state(conn, app_dir, run_id)
    if state["recorded"]:
        return {"record": state["recorded"][-1], "written": False}
    record = summarize(run_id, release, state["events"], state["current"], phase=phase, how=how)
    append_record(conn, app_dir, record)
    return {"record": record, "written": True}
