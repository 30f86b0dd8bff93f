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
import sys
import tempfile
import time
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils import shadow
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, read_folder

from .errors import SlipwayError

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


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
                    expected = shadow.build_shadow(conn, connect, [m for m in folder["migrations"] if m["tag"] in replay])
            where = {"where": f"an ephemeral PostgreSQL {major} on the controller", "seconds": round(time.monotonic() - started, 3),
                     "why": where.get("error") or "shadow: none"}
        return shadow.result(expected, live_state, folder, where)


def check(host: str) -> dict:
    """``{host: {"exit", "result" | "error"}}`` for every host ``host`` names."""
    from . import runtime as rt
    from .inventory import resolve_target
    from .remote import close_all, probe_pythons
    from .runner import run_playbook

    hosts = resolve_target(host)
    pythons, conns = probe_pythons(hosts)
    close_all(conns)
    runtimes = rt.runtimes(list(pythons.values()))
    result = run_playbook("drift.yml", host, rt.extravars(runtimes))
    data = result["data"].get("drift", {})
    failures = {f["host"]: f["msg"] for f in result["failures"]}
    out = {}
    for name in hosts:
        read = data.get(name)
        if name in failures or not read:
            out[name] = {"exit": UNKNOWN, "error": str(failures.get(name) or "the host did not answer").splitlines()[0]}
        elif read.get("busy"):
            out[name] = {"exit": UNKNOWN, "error": read.get("msg") or "a migration is running"}
        else:
            try:
                res = evaluate(read)
                out[name] = {"exit": res["exit"], "result": res}
            except (SlipwayError, MigrationError) as exc:
                out[name] = {"exit": UNKNOWN, "error": str(exc)}
    return out


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
    return lines


def drift(host: str, as_json: bool = False, out=sys.stdout) -> int:
    checked = check(host)
    code = worst([info["exit"] for info in checked.values()])
    if as_json:
        print(json.dumps({"exit": code, "state": STATE[code], "hosts": checked}, indent=2, sort_keys=True, default=str),
              file=out)
    else:
        for line in render(checked):
            print(line, file=out)
        print(f"\n{STATE[code]}: drift check of {', '.join(checked)}", file=out)
    return code
