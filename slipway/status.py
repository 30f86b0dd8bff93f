"""`invoke status [--host H | --all] [--json] [--html FILE]`: every environment at a glance.

Per environment (the host's inventory group) and host, from one read-only module call per host
(playbooks/state.yml, module app_state; no deploy lock, nothing changed): the release `current`
points at and the one before, when and by which run it was deployed and the result, PM2's
instances online/total with restarts and uptime, the migrations applied / pending / skipped /
tampered, the newest verified backup and its age, the deploy lock. The last drift check comes
from this controller's record of `invoke drift` runs (slipway/alerts.py; a scheduled check keeps
it fresh). Output: a rich table, one JSON document, or one static HTML page (inline CSS, no
scripts, no network) with the environment x migration matrix.
"""
from __future__ import annotations

import html
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .errors import SlipwayError

COULD_NOT_READ = 3
STATUS_CLASS = {"applied": "ok", "pending": "warn", "skipped": "bad", "tampered": "bad", None: "none"}


def environment_of(name: str) -> str:
    """The inventory group a host is listed under (its environment), else ``ungrouped``."""
    from .inventory import manager

    _, inv = manager()
    host = inv.get_host(name)
    groups = [g.name for g in (host.get_groups() if host else []) if g.name not in ("all", "ungrouped")]
    return groups[-1] if groups else "ungrouped"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        text = str(iso).replace("Z", "+00:00")
        if len(text) >= 15 and text[8] == "T" and text[:8].isdigit():  # 20261206T005001Z (backup ids)
            return datetime.strptime(text[:15], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc).timestamp()
        when = datetime.fromisoformat(text)
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    except ValueError:
        return None


def summarize(name: str, state: dict, drift_last: dict | None, now: float) -> dict:
    """One host's status document from app_state's answer."""
    rel = state.get("release") or {}
    current = rel.get("current")
    deploys = state.get("deploys") or []
    deployed = next((d for d in reversed(deploys) if d.get("release") == current and d.get("result") == "ok"), None)
    last = deploys[-1] if deploys else None
    procs = [p for p in (state.get("pm2") or {}).get("processes") or [] if not str(p.get("name", "")).endswith("~slipway-handover")]
    uptimes = [p["uptime_seconds"] for p in procs if p.get("uptime_seconds") is not None]
    db = state.get("db") or {}
    counts = db.get("counts") or {}
    backup = (state.get("backups") or {}).get("last")
    backup_at = _epoch((backup or {}).get("created"))
    lock = state.get("lock") or {}
    meta = lock.get("meta") or {}
    doc = {
        "host": name,
        "release": {"current": current, "previous": rel.get("previous"), "since": rel.get("current_since"),
                    "deployed": None if deployed is None else {"at": deployed.get("finished"), "run_id": deployed.get("run_id"),
                                                              "result": deployed.get("result")},
                    "last_run": None if last is None else {"at": last.get("finished"), "run_id": last.get("run_id"),
                                                          "release": last.get("release"), "result": last.get("result"),
                                                          "failure": last.get("failure")}},
        "pm2": {"daemon": (state.get("pm2") or {}).get("daemon"), "online": sum(1 for p in procs if p.get("status") == "online"),
                "total": len(procs), "restarts": sum(p.get("restarts") or 0 for p in procs),
                "uptime_seconds": min(uptimes) if uptimes else None,
                "releases": sorted({str(p.get("release")) for p in procs if p.get("release")})},
        "database": {"ok": db.get("ok"), "sqlstate": db.get("sqlstate"), "error": db.get("error")},
        "migrations": {k: counts.get(k) for k in ("applied", "pending", "skipped", "tampered", "unknown_rows")} if counts else None,
        "migration_states": {m["tag"]: m["status"] for m in db.get("migrations") or []},
        "migration_whens": {m["tag"]: m.get("when") for m in db.get("migrations") or []},
        "drift": None if drift_last is None else dict(drift_last, age_seconds=now - drift_last.get("at", now)),
        "backup": None if backup is None else dict(backup, age_seconds=None if backup_at is None else now - backup_at),
        "backups": (state.get("backups") or {}).get("count"),
        "lock": {"held": bool(lock.get("held")), "stale": bool(lock.get("stale")),
                 "run_id": meta.get("run_id"), "command": meta.get("command"), "started": meta.get("started")},
        "health": state.get("health"),
    }
    return doc


def collect(target: str | None, all_hosts: bool) -> dict:
    """{"generated", "seconds", "hosts": {name: doc | {"host", "environment", "error"}}}."""
    from .alerts import last_checks
    from .drift import host_key
    from .inventory import manager, resolve_target
    from .runner import run_read_only

    if all_hosts and target:
        raise SlipwayError("--host and --all name the hosts twice; pass one of them")
    if all_hosts:
        _, inv = manager()
        hosts = sorted(inv.hosts)
        if not hosts:
            raise SlipwayError("the inventory lists no hosts; add them to inventory/ (or run invoke sandbox.up)")
    elif target:
        hosts = resolve_target(target)
    else:
        raise SlipwayError("no hosts named; pass --host HOST_OR_GROUP or --all")
    started = time.monotonic()
    data, failures = run_read_only("state.yml", hosts, {"slipway_state_since": 0, "slipway_state_drift": False}, "state")
    drift_last = last_checks()
    now = time.time()
    out = {}
    for name in hosts:
        got = (data.get(name) or {}).get("state")
        env = environment_of(name)
        if name in failures or not got or got.get("failed"):
            why = failures.get(name) or (got or {}).get("msg") or "the host did not answer"
            out[name] = {"host": name, "environment": env, "error": " ".join(str(why).split())[:300]}
            continue
        doc = summarize(name, got, drift_last.get(host_key(name)), now)
        doc["environment"] = env
        out[name] = doc
    return {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": round(time.monotonic() - started, 2), "hosts": out}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def cells(doc: dict, now: float) -> dict:
    """The short texts of one host's row (terminal and HTML alike)."""
    if "error" in doc:
        return {"release": "?", "deployed": "?", "pm2": "?", "migrations": "?", "drift": "?", "backup": "?",
                "lock": "?", "error": doc["error"]}
    rel = doc["release"]
    dep = rel["deployed"] or rel["last_run"]
    deployed = "-"
    if dep:
        when = _epoch(dep.get("at"))
        deployed = f"{age(now - when) + ' ago' if when else dep.get('at')} by {dep.get('run_id') or '?'} ({dep.get('result')})"
    last = rel.get("last_run")
    if last and last.get("result") != "ok" and last is not rel["deployed"]:
        deployed += f"; last run {last.get('run_id')} {last.get('result')}"
    pm2 = doc["pm2"]
    pm2_text = (f"{pm2['online']}/{pm2['total']} online, {pm2['restarts']} restarts, up {age(pm2['uptime_seconds'])}"
                if pm2["daemon"] else "no PM2 daemon")
    mig = doc["migrations"]
    if mig:
        mig_text = f"{mig['applied']} applied, {mig['pending']} pending"
        mig_text += "".join(f", {mig[k]} {k}" for k in ("skipped", "tampered") if mig.get(k))
    else:
        mig_text = f"unread ({doc['database']['sqlstate'] or doc['database']['error'] or 'no migrations folder'})"
    drift = doc["drift"]
    if drift is None:
        drift_text = "never checked (from this controller)"
    elif drift.get("error"):
        drift_text = f"{drift['state']} {age(drift['age_seconds'])} ago: {drift['error'][:60]}"
    else:
        f = drift.get("findings") or {}
        drift_text = f"{drift['state']} {age(drift['age_seconds'])} ago: {f.get('critical', 0)} critical, {f.get('warning', 0)} warning, {f.get('info', 0)} info"
    backup = doc["backup"]
    backup_text = "none" if backup is None else f"{age(backup.get('age_seconds'))} ago ({backup.get('id')})"
    lock = doc["lock"]
    lock_text = (f"held by {lock['run_id']} ({lock['command']})" if lock["held"] else
                 f"free (stale metadata of {lock['run_id']})" if lock["stale"] else "free")
    release_text = f"{rel['current'] or '-'} (previous {rel['previous'] or '-'})"
    if pm2["releases"] and rel["current"] and pm2["releases"] != [rel["current"]]:
        release_text += f"; PM2 runs {', '.join(pm2['releases'])}"
    return {"release": release_text, "deployed": deployed, "pm2": pm2_text, "migrations": mig_text, "drift": drift_text,
            "backup": backup_text, "lock": lock_text}


COLUMNS = (("release", "release (previous)"), ("deployed", "deployed"), ("pm2", "PM2"), ("migrations", "migrations"),
           ("drift", "last drift check"), ("backup", "last verified backup"), ("lock", "deploy lock"))


def render_table(status: dict, out=sys.stdout) -> None:
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    console = Console(file=out)
    # a terminal wraps cells to its width; a pipe or a file gets one line per host (grep, diff, mail)
    wrap = console.is_terminal
    table = Table(title=f"slipway status - {status['generated']} ({status['seconds']}s)", show_lines=wrap)
    table.add_column("env", no_wrap=not wrap)
    table.add_column("host", no_wrap=not wrap)
    for _, title in COLUMNS:
        table.add_column(title, no_wrap=not wrap)
    for name, doc in sorted(status["hosts"].items(), key=lambda kv: (kv[1]["environment"], kv[0])):
        c = cells(doc, now)
        if "error" in c:
            table.add_row(doc["environment"], name, f"could not read: {c['error']}", *[""] * (len(COLUMNS) - 1))
        else:
            table.add_row(doc["environment"], name, *[c[key] for key, _ in COLUMNS])
    (console if wrap else Console(file=out, width=400)).print(table)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px} p.meta{color:#57606a;margin:0 0 16px}
table{border-collapse:collapse;margin-bottom:8px} th,td{border:1px solid #d0d7de;padding:6px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.ok{background:#dafbe1} td.warn{background:#fff8c5} td.bad{background:#ffebe9} td.none{color:#8c959f}
td.mono,span.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
"""


def _td(value: str, cls: str = "", **data) -> str:
    attrs = "".join(f' data-{k}="{html.escape(str(v))}"' for k, v in data.items())
    return f'<td class="{cls}"{attrs}>{html.escape(str(value))}</td>'


def _row_class(doc: dict, key: str) -> str:
    if "error" in doc:
        return "bad"
    if key == "migrations":
        m = doc["migrations"] or {}
        return "bad" if (m.get("skipped") or m.get("tampered") or not m) else "warn" if m.get("pending") else "ok"
    if key == "drift":
        d = doc["drift"]
        return "none" if d is None else {0: "ok", 1: "warn"}.get(d.get("exit"), "bad")
    if key == "pm2":
        p = doc["pm2"]
        return "ok" if p["total"] and p["online"] == p["total"] else "bad"
    if key == "lock":
        return "warn" if doc["lock"]["held"] else ""
    if key == "backup":
        return "none" if doc["backup"] is None else ""
    return ""


def render_html(status: dict, by: str = "invoke status") -> str:
    """One static page: the hosts table and the environment x migration matrix."""
    now = time.time()
    hosts = sorted(status["hosts"].items(), key=lambda kv: (kv[1]["environment"], kv[0]))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
           "<title>slipway status</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>slipway status</h1>",
           f'<p class="meta">generated {html.escape(status["generated"])} in {status["seconds"]}s by {html.escape(by)}; '
           "read-only: no app, release, database or lock was changed (a host's first look installs slipway's module "
           "runtime there)</p>",
           "<h2>Hosts</h2>", '<table id="hosts"><thead><tr><th>environment</th><th>host</th>'
           + "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS) + "</tr></thead><tbody>"]
    for name, doc in hosts:
        c = cells(doc, now)
        row = [_td(doc["environment"]), _td(name, "mono")]
        if "error" in c:
            row.append(f'<td class="bad" colspan="{len(COLUMNS)}" data-host="{html.escape(name)}" data-field="error">'
                       f"could not read: {html.escape(c['error'])}</td>")
        else:
            for key, _ in COLUMNS:
                row.append(_td(c[key], _row_class(doc, key), host=name, field=key))
        out.append(f'<tr data-host="{html.escape(name)}">' + "".join(row) + "</tr>")
    out.append("</tbody></table>")
    tags: dict = {}
    for _, doc in hosts:
        for tag, when in (doc.get("migration_whens") or {}).items():
            tags.setdefault(tag, when or 0)
    out.append("<h2>Migrations by environment</h2>")
    if not tags:
        out.append("<p>No host's migrations could be read.</p>")
    else:
        out.append('<table id="matrix"><thead><tr><th>migration</th>'
                   + "".join(f"<th>{html.escape(doc['environment'])}<br>{html.escape(name)}</th>" for name, doc in hosts)
                   + "</tr></thead><tbody>")
        for tag in sorted(tags, key=lambda t: (tags[t], t)):
            row = [f'<td class="mono">{html.escape(tag)}</td>']
            for name, doc in hosts:
                st = (doc.get("migration_states") or {}).get(tag) if "error" not in doc else None
                row.append(_td(st or "-", STATUS_CLASS.get(st, "none"), host=name, migration=tag))
            out.append("<tr>" + "".join(row) + "</tr>")
        out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _public(status: dict) -> dict:
    """The JSON document: the matrix helpers left out."""
    doc = json.loads(json.dumps(status, default=str))
    for host in doc["hosts"].values():
        host.pop("migration_whens", None)
    return doc


def check_html_path(path: str) -> Path:
    import os

    target = Path(path).expanduser()
    if target.is_dir():
        raise SlipwayError(f"--html {path} is a directory; pass a file name, e.g. --html {path.rstrip('/')}/status.html")
    if not target.parent.is_dir():
        raise SlipwayError(f"--html {path}: the directory {target.parent} does not exist; create it or pass another path")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise SlipwayError(f"--html {path}: not writable by this user; pass a writable file")
    return target


def write_html(path: str, status: dict, by: str = "invoke status") -> None:
    from .files import write_private

    target = check_html_path(path)
    try:
        write_private(target, render_html(status, by), 0o644)  # no secrets in it: a page to be served
    except OSError as exc:
        raise SlipwayError(f"--html {path}: cannot write it ({exc.strerror or exc}); pass a writable file") from None


def status(target: str | None = None, all_hosts: bool = False, as_json: bool = False, html_path: str | None = None,
           out=sys.stdout) -> int:
    if html_path:
        check_html_path(html_path)
    result = collect(target, all_hosts)
    if html_path:
        write_html(html_path, result)
    if as_json:
        print(json.dumps(_public(result), indent=2, sort_keys=True), file=out)
    else:
        render_table(result, out)
        if html_path:
            print(f"html: {html_path}", file=out)
    return COULD_NOT_READ if any("error" in d for d in result["hosts"].values()) else 0
