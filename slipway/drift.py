"""`invoke drift`: what each host's live schema lacks or has extra against the schema its applied
migrations produce, the migration statement that makes each object, why it differs, and the fix.

On each host (playbooks/drift.yml, module slipway.core.pg_drift, read-only): the deployed release's
migrations, the history classified and the live schema read under the migration lock taken without
waiting, and the expected schema built in a shadow database on the same server when the role may
create one. Otherwise the controller builds the shadow in an ephemeral PostgreSQL of the server's
major version (slipway/shadowdb.py). The comparison is module_utils/drift.py's.

Exit codes, the monitoring-plugin convention (Nagios, Icinga, cron mail): 0 no drift, 1 a warning,
2 a critical finding, 3 could not check (a host unreachable, a migration running, no shadow).
Across several hosts the worst counts: critical, then could-not-check, then warning.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils import shadow
from ansible_collections.slipway.core.plugins.module_utils.drizzle import read_folder

from .alerts import STATES as STATE  # the exit codes' names, one table
from .errors import SlipwayError

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def worst(codes: list[int]) -> int:
    """Critical first, then could-not-check, then warning, then OK."""
    for code in (CRITICAL, UNKNOWN, WARNING):
        if code in codes:
            return code
    return OK


def _folder(content: dict, tmp: Path) -> dict:
    root = tmp / "migrations"
    for rel, text in content.items():
        path = (root / rel).resolve()
        if root.resolve() not in path.parents or not (rel == "meta/_journal.json" or rel.endswith(".sql")):
            raise SlipwayError(f"the host sent a migrations file named {rel!r}; expected meta/_journal.json or <tag>.sql")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_folder(str(root))


def evaluate(read: dict) -> dict:
    """One host's drift result from pg_drift's answer (``read``): the expected schema as the host
    built it, else from an ephemeral PostgreSQL here."""
    from . import shadowdb

    with tempfile.TemporaryDirectory(prefix="slipway-drift-") as tmp:
        folder = _folder(read["migrations_content"], Path(tmp))
        live_state = {k: read[k] for k in ("classified", "status", "live", "replay")}
        live_state["seconds"] = read.get("read_seconds")
        where = dict(read.get("shadow") or {})
        expected = read.get("expected")
        if expected is None:
            major = int(read["server_version_num"]) // 10000
            replay = set(read["replay"])
            started = time.monotonic()
            with shadowdb.cluster(major) as connect:
                with connect("postgres") as conn:
                    expected = shadow.build_shadow(conn, connect, [m for m in folder["migrations"] if m["tag"] in replay],
                                                   exclude=[read.get("tracking_schema") or "drizzle"],
                                                   prepare=read.get("prepare"), include=read.get("include") or ())
            where = {"where": f"an ephemeral PostgreSQL {major} on the controller", "seconds": round(time.monotonic() - started, 3),
                     "why": where.get("error") or "shadow: none"}
        return shadow.result(expected, live_state, folder, where)


def check(host: str, fixes: dict | None = None, include: tuple = ()) -> dict:
    """``{host: {"exit", "result" | "error", "release", "fixed"}}`` for every host ``host`` names;
    ``fixes`` ({host: remedy plan}): applied on each host first (pg_drift), then the check."""
    from .inventory import resolve_target
    from .runner import run_read_only

    hosts = resolve_target(host)
    data, failures = run_read_only("drift.yml", hosts, {"slipway_drift_fixes": fixes or {},
                                                       "slipway_drift_include": list(include)}, "drift")
    out = {}
    for name in hosts:
        read = data.get(name)
        if name in failures or not read:
            out[name] = {"exit": UNKNOWN, "error": str(failures.get(name) or "the host did not answer").splitlines()[0]}
        elif read.get("busy"):
            out[name] = {"exit": UNKNOWN, "error": read.get("msg") or "a migration is running",
                         "release": read.get("release")}
        else:
            try:
                res = evaluate(read)
                out[name] = {"exit": res["exit"], "result": res, "release": read.get("release")}
            except Exception as exc:  # noqa: BLE001 - the ephemeral PostgreSQL's, psycopg's: could not check
                said = str(exc).strip().splitlines()
                out[name] = {"exit": UNKNOWN, "error": said[0] if said else type(exc).__name__}
        if read and read.get("fixed"):
            out[name]["fixed"] = read["fixed"]
        if read and read.get("folder"):
            out[name]["folder"] = read["folder"]
    return out


def migrate_pending(checked: dict) -> dict:
    """Pending (and skipped) migrations through the engine, as a deploy runs them
    (playbooks/drift_migrate.yml): each host's deploy lock held by this run, a verified backup
    first, then the migrations of the release `current` points at. ``{host: {done, applied,
    backup, why}}`` for the hosts whose check found some."""
    from . import runtime as rt
    from .deploy import new_run_id
    from .remote import LockHeld, close_all, lock_hosts, probe_pythons
    from .runner import run_playbook

    wanted = {}
    for name, info in checked.items():
        states = {f["actual"] for f in (info.get("result") or {}).get("findings", []) if f["kind"] == "migration"}
        if states & {"pending", "skipped"} and info.get("folder"):
            wanted[name] = "skipped" in states
    if not wanted:
        return {}
    names = sorted(wanted)
    run_id = new_run_id()
    pythons, conns = probe_pythons(names)
    try:
        runtimes = rt.runtimes(list(pythons.values()))
    except BaseException:
        close_all(conns)
        raise
    extravars = {**rt.extravars(runtimes), "slipway_deploy_run_id": run_id,
                 "slipway_drift_folder": {n: checked[n]["folder"] for n in names},
                 "slipway_drift_release": {n: checked[n].get("release") for n in names},
                 "slipway_drift_include_skipped": wanted}
    try:
        with lock_hosts(names, run_id, "invoke drift --fix", conns=conns):
            result = run_playbook("drift_migrate.yml", ",".join(names), extravars)
    except LockHeld as exc:
        return {n: {"done": False, "why": str(exc)} for n in names}
    data = result["data"].get("drift_migrate", {})
    failures = {f["host"]: f["msg"] for f in result["failures"]}
    return {n: ({"done": True, **data[n]} if n in data and n not in failures else
                {"done": False, "why": failures.get(n) or "not run (an earlier host failed)"}) for n in names}


def fix(host: str, checked: dict, include: tuple = ()) -> dict:
    """``invoke drift --fix``: what is safe of each host's findings (module_utils/remedy.py) fixed
    online, then every host checked again; the result holds that check, each host's ``fixed``
    (done or why not) and ``refused`` (left for a human, with why)."""
    from ansible_collections.slipway.core.plugins.module_utils import remedy

    migrated = migrate_pending(checked)
    plans = {name: remedy.plan(info["result"]["findings"]) for name, info in checked.items() if "result" in info}
    for name, done in migrated.items():  # migrations run (or not, and why): not left for a human
        if done["done"]:
            plans[name] = (plans[name][0], [r for r in plans[name][1] if not r["why"].startswith(("a pending", "a skipped"))])
    fixes = {name: plan[0] for name, plan in plans.items() if plan[0]}
    again = check(host, fixes, include) if (fixes or migrated) else checked
    for name, (_, refused) in plans.items():
        if name in again:
            again[name].setdefault("fixed", [])
            again[name]["refused"] = refused
            again[name]["before"] = {"exit": checked[name]["exit"], "findings": len(checked[name]["result"]["findings"])}
            if name in migrated:
                again[name]["migrated"] = migrated[name]
    return again


def render(checked: dict) -> list[str]:
    """The human report: per host its state, the migration counts, where the shadow was built, and
    each finding with its migration, cause and fix."""
    lines = []
    for name, info in checked.items():
        if "error" in info:
            lines.append(f"{name}: UNKNOWN - could not check: {info['error']}")
            continue
        res = info["result"]
        counts = res["counts"]
        lines.append(f"{name}: {STATE[info['exit']]} - {len(res['findings'])} finding(s); migrations: "
                     f"{counts['applied']} applied, {counts['pending']} pending, {counts['skipped']} skipped, "
                     f"{counts['tampered']} tampered; expected schema built in {res['shadow'].get('where')}")
        for f in res["findings"]:
            obj = f["object"]
            made = f["migration"] or {}
            where = (f"{made['tag']} statement {made['statement']}" if made.get("statement") else made.get("tag")) or "no migration"
            lines.append(f"  {f['severity'].upper():<8} {f['kind']} {obj['kind']} {obj['name']}"
                         + (f" on {obj['table']}" if obj.get("table") and obj["kind"] != "column" else ""))
            lines.append(f"           made by: {where}")
            lines.append(f"           why: {f['why']}")
            if f.get("fix"):
                lines.append(f"           fix: {f['fix']}")
        if "before" in info:
            before = info["before"]
            lines.append(f"  --fix: {before['findings']} finding(s) before ({STATE[before['exit']]}); now {STATE[info['exit']]}")
            migrated = info.get("migrated")
            if migrated and migrated["done"]:
                lines.append(f"  MIGRATED: {', '.join(migrated.get('applied') or []) or 'nothing left to apply'} "
                             f"(deploy lock held, backup {migrated.get('backup')} first)")
            elif migrated:
                lines.append(f"  NOT MIGRATED: {migrated['why']}")
            for done in info.get("fixed") or []:
                lines.append(f"  {'FIXED' if done['done'] else 'NOT FIXED'}: {done['what']}"
                             + ("" if done["done"] else f": {done['why']}"))
                lines += [f"           ran: {statement}" for statement in done.get("ran") or []]
            refused = info.get("refused") or []
            if refused:
                lines.append(f"  left for a human: {len(refused)} finding(s), listed above with their fix (slipway does "
                             f"not make these changes: {'; '.join(sorted(set(r['why'] for r in refused)))})")
    return lines


def host_key(name: str) -> str:
    """A host's name with where it is (ansible_host:port): the webhook's state of one inventory's
    `web1` is not another's."""
    from .inventory import host_vars

    try:
        hv = host_vars(name)
        return f"{name}@{hv.render('ansible_host') or name}:{hv.render('ansible_port') or 22}"
    except (SlipwayError, KeyError, TypeError, ValueError):
        return name


def drift(host: str, as_json: bool = False, notify: str | None = None, metrics: str | None = None,
          out=sys.stdout, fix_safe: bool = False, include: str | None = None, html: str | None = None) -> int:
    """Check, print (or one JSON document), write ``metrics``, POST to ``notify`` what changed,
    refresh the status page ``html`` (invoke status --html); returns the exit code."""
    from . import alerts

    notify = notify or os.environ.get("SLIPWAY_DRIFT_NOTIFY") or None  # a scheduled check's (drift.schedule)
    alerts.check_options(notify, metrics)
    extra = tuple(name.strip() for name in (include or "").split(",") if name.strip())
    bad = [name for name in extra if name not in ("grants", "comments")]
    if bad:
        raise SlipwayError(f"--include {','.join(bad)}: not something drift compares on request; pass grants, comments "
                           "or grants,comments")
    checked = check(host, include=extra)
    if fix_safe:
        checked = fix(host, checked, extra)
    code = worst([info["exit"] for info in checked.values()])
    alerts.record_last(checked, {h: host_key(h) for h in checked})  # for invoke status
    if metrics:
        alerts.write_metrics(metrics, checked)
    sent = None
    if notify:
        sent = alerts.notify(notify, checked, {h: host_key(h) for h in checked},
                             {h: info.get("release") for h, info in checked.items()})
    page_error = None
    if html:  # after record_last (the page shows this check) and after the alert (a page that fails stops no alert)
        from .status import collect, write_html

        try:
            write_html(html, collect(host, False), by="invoke drift")
        except Exception as exc:  # noqa: BLE001 - the check's result stands; the page is said not refreshed
            said = str(exc).strip().splitlines()
            page_error = said[0] if said else type(exc).__name__
    if as_json:
        doc = {"exit": code, "state": STATE[code], "hosts": checked}
        if sent is not None:
            doc["notified"] = sent
        if html:
            doc["status_page"] = {"path": html, "refreshed": page_error is None, "error": page_error}
        print(json.dumps(doc, indent=2, sort_keys=True, default=str), file=out)
        return code
    for line in render(checked):
        print(line, file=out)
    if sent is not None:
        print(f"notify: {'sent for ' + ', '.join(sent) if sent else 'no change since the last alert, nothing sent'}",
              file=out)
    if metrics:
        print(f"metrics: {metrics}", file=out)
    if html:
        print(f"status page: {html}" if page_error is None else f"status page not refreshed: {page_error}", file=out)
    print(f"\n{STATE[code]}: drift check of {', '.join(checked)}", file=out)
    return code


# --------------------------------------------------------------------------------------------- schedule
_EVERY = re.compile(r"^([1-9][0-9]*)([mh])$")
LOG_ROTATE_BYTES = 1024 * 1024


def cron_times(every: str) -> tuple[str, str]:
    """(minute, hour) of a cron entry running every ``every`` (``15m``, ``1h``, ...)."""
    m = _EVERY.match(every or "")
    n = int(m.group(1)) if m else 0
    if m and m.group(2) == "m" and n < 60 and 60 % n == 0:
        return ("*" if n == 1 else f"*/{n}"), "*"
    if m and m.group(2) == "h" and n <= 24 and 24 % n == 0:
        return "0", ("*" if n == 1 else "0" if n == 24 else f"*/{n}")
    raise SlipwayError(f"--every {every!r} is not a period cron can keep; use minutes that divide an hour (1m, 5m, "
                       f"15m, 30m) or hours that divide a day (1h, 6h, 24h)")


def _schedule_files(host: str) -> tuple[str, Path, Path, Path, Path]:
    """(cron entry name, script, log, lock, directory) of ``host``'s scheduled check; a sandbox
    instance other than 0 is part of the name (its hosts have the same names)."""
    from .release import cache_dir

    instance = os.environ.get("SLIPWAY_SANDBOX_INSTANCE", "0")
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", host) + (f"-sandbox{instance}" if instance not in ("", "0") else "")
    where = cache_dir() / "drift"
    where.mkdir(mode=0o700, exist_ok=True)
    return (f"slipway drift {host}" + (f" (sandbox instance {instance})" if tag.endswith(f"-sandbox{instance}") else ""),
            where / f"schedule-{tag}.sh", where / f"{tag}.log", where / f"{tag}.lock", where)


def schedule_script(host: str, log: Path, lock: Path, notify: str | None, metrics: str | None,
                    html: str | None = None) -> str:
    """The job cron runs: the log rotated past 1 MiB, one run at a time (flock), the check."""
    from .paths import ROOT

    venv_bin = Path(sys.executable).parent
    keep = {k: os.environ[k] for k in ("SLIPWAY_SANDBOX_INSTANCE", "SLIPWAY_SANDBOX_DIR", "SLIPWAY_CACHE",
                                        "XDG_CACHE_HOME", "ANSIBLE_VAULT_PASSWORD_FILE", "SSH_AUTH_SOCK")
            if os.environ.get(k)}
    if notify:
        keep["SLIPWAY_DRIFT_NOTIFY"] = notify  # in this 0700 file, never on a command line
    args = ["drift", "--host", host] + (["--metrics", metrics] if metrics else []) + (["--html", html] if html else [])
    lines = ["#!/bin/sh",
             "# written by `invoke drift.schedule` (slipway); removed by `invoke drift.unschedule`",
             f"log={shlex.quote(str(log))}",
             f'if [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt {LOG_ROTATE_BYTES} ]; then mv -f "$log" "$log.1"; fi',
             f"export PATH={shlex.quote(str(venv_bin))}:/usr/local/bin:/usr/bin:/bin",
             *[f"export {k}={shlex.quote(v)}" for k, v in sorted(keep.items())],
             f"cd {shlex.quote(str(ROOT))} || exit 3",
             'echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) invoke ' + " ".join(shlex.quote(a) for a in args) + '" >> "$log"',
             # one run at a time (a run still going: said in the log, exit 3), none past 10 minutes
             f"flock -n -E 75 {shlex.quote(str(lock))} timeout 600 {shlex.quote(str(venv_bin / 'invoke'))} "
             + " ".join(shlex.quote(a) for a in args) + ' >> "$log" 2>&1',
             "rc=$?",
             'if [ "$rc" -eq 75 ]; then echo "the previous check still runs: this one skipped" >> "$log"; exit 3; fi',
             'if [ "$rc" -eq 124 ]; then echo "the check did not finish in 10 minutes: stopped" >> "$log"; exit 3; fi',
             'exit "$rc"',
             ""]
    return "\n".join(lines)


def schedule(host: str, every: str, notify: str | None = None, metrics: str | None = None, out=sys.stdout,
             html: str | None = None) -> int:
    """Install the drift check of ``host`` in this user's crontab (ansible.builtin.cron)."""
    from .alerts import check_options
    from .files import write_private
    from .inventory import resolve_target
    from .runner import run_playbook

    resolve_target(host)
    minute, hour = cron_times(every)
    check_options(notify, metrics)
    if html:
        from .status import check_html_path

        html = str(check_html_path(html).resolve())  # cron runs it from the checkout
    name, script, log, lock, _ = _schedule_files(host)
    write_private(script, schedule_script(host, log, lock, notify, metrics, html), 0o700)
    result = run_playbook("drift_schedule.yml", "localhost", {
        "drift_schedule_name": name, "drift_schedule_state": "present", "drift_schedule_script": str(script),
        "drift_schedule_minute": minute, "drift_schedule_hour": hour}, local=True)
    if result["rc"] != 0:
        raise SlipwayError(f"cron entry not installed: {result['failures'][0]['msg'] if result['failures'] else 'ansible failed'}; "
                           "check that crontab works for this user")
    print(f"scheduled: invoke drift --host {host} at cron '{minute} {hour} * * *' (every {every}), one run at a time; "
          f"log {log} (rotated past 1 MiB){'; alerts to the webhook on a change' if notify else ''}"
          f"{'; metrics ' + metrics if metrics else ''}{'; status page ' + html if html else ''}; remove with invoke drift.unschedule --host {host}", file=out)
    return 0


def unschedule(host: str, out=sys.stdout) -> int:
    """Remove the scheduled drift check of ``host`` (its cron entry and script; the log stays)."""
    from .runner import run_playbook

    name, script, log, _, _ = _schedule_files(host)
    result = run_playbook("drift_schedule.yml", "localhost", {
        "drift_schedule_name": name, "drift_schedule_state": "absent", "drift_schedule_script": str(script)}, local=True)
    if result["rc"] != 0:
        raise SlipwayError("cron entry not removed: " + (result["failures"][0]["msg"] if result["failures"] else
                                                         "ansible failed") + "; remove it with crontab -e")
    script.unlink(missing_ok=True)
    print(f"unscheduled: the drift check of {host} (its log {log} stays)", file=out)
    return 0
