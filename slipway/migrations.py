"""`invoke migrate`: the migration engine (collection module_utils) run locally against a DSN."""
from __future__ import annotations

import os
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils import migrate as engine
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, read_folder
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_mapping, redact_text

from .errors import Exit, SlipwayError
from .lint import lint_plan


def dsn_from_env(var: str) -> str:
    if not var or not var.replace("_", "").isalnum():
        raise SlipwayError(f"--dsn-env {var!r} is not an environment variable name; pass e.g. --dsn-env DATABASE_URL")
    value = os.environ.get(var, "")
    if not value.strip():
        raise SlipwayError(f"environment variable {var} is not set; export the database URL in it "
                           f"(for the sandbox: eval \"$(invoke sandbox.env)\")")
    return value


def run(dsn_env: str, migrations: str, check: bool, **options) -> tuple[dict | None, str | None, int]:
    """``run_dsn`` against the DSN in environment variable ``dsn_env``."""
    return run_dsn(dsn_from_env(dsn_env), migrations, check, **options)


def run_dsn(dsn: str, migrations: str, check: bool, include_skipped=False, allow_tampered=False,
            allow_unknown=False, rehearse=True, schema=engine.DEFAULT_SCHEMA, table=engine.DEFAULT_TABLE,
            lock_timeout="5s", lock_wait=10.0, mode="online", min_rows=10000,
            online_lock_timeout="20ms") -> tuple[dict | None, str | None, int]:
    """Plan (``check``) or apply; returns (document, error line, exit code). Never raises for a
    user-facing problem."""
    conn = None
    try:
        folder = read_folder(str(Path(migrations).expanduser()))  # folder problems first: no connection needed
        conn = engine.connect(dsn)
        eng = engine.Engine(conn, folder, schema=schema, table=table, include_skipped=include_skipped,
                            allow_tampered=allow_tampered, allow_unknown=allow_unknown,
                            lock_timeout=lock_timeout, lock_wait=lock_wait, mode=mode, min_rows=min_rows,
                            online_lock_timeout=online_lock_timeout)
        if check:
            doc = eng.check(rehearse=rehearse)
            doc["lint"] = lint_plan(doc, folder["folder"])
            code = 1 if doc["blockers"] else (Exit.PENDING if doc["to_apply"] else 0)
            error = _name_flags("apply would be refused: " + doc["blockers"][0]) if doc["blockers"] else None
            return _finish(doc, dsn), error, code
        doc = eng.apply()
        return _finish(doc, dsn), None, 0
    except MigrationError as exc:
        doc = _finish(exc.plan, dsn) if exc.plan else None
        if doc is not None:
            doc["error"] = doc.get("error") or str(exc)
        return doc, _name_flags(redact_text(str(exc), known=_secrets(dsn))), 1
    finally:
        if conn is not None:
            conn.close()


_FLAGS = {"allow_tampered": "--allow-tampered", "include_skipped": "--include-skipped", "allow_unknown": "--allow-unknown"}


def _name_flags(text: str | None) -> str | None:
    """The engine names its overrides in words; `invoke migrate` has a flag for each."""
    for key, words in engine.OVERRIDES.items():
        text = text.replace(words, "pass " + _FLAGS[key]) if text else text
    return text


def _secrets(dsn: str) -> list[str]:
    password = engine.dsn_password(dsn)
    return [password] if password else []


def _finish(doc: dict, dsn: str) -> dict:
    """Add where the database is (never the password) and redact anything secret-looking."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a DSN we could connect with parses; this is only a label
        info = {}
    doc = dict(doc)
    doc["database"] = {k: info.get(k) for k in ("host", "port", "dbname", "user")}
    return redact_mapping(doc, known=_secrets(dsn))


# --------------------------------------------------------------------------------------------
# Human output
# --------------------------------------------------------------------------------------------
def _first_line(text: str, width: int = 96) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("--")]
    line = " ".join(" ".join(lines).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _keys(sample: dict) -> str:
    return "(" + ", ".join("NULL" if v is None else str(v) for v in sample["key"]) + f") x{sample['rows']}"


def render(doc: dict) -> list[str]:
    out = []
    db = doc.get("database", {})
    out.append(f"migrations {doc['migrations_dir']}  ->  {db.get('dbname')}@{db.get('host')}:{db.get('port')} "
               f"{doc['tracking_table']} ({doc['tracking_rows']} rows)")
    checks_by_tag: dict[str, list[dict]] = {}
    for check in (doc.get("preflight") or {}).get("checks", []):
        checks_by_tag.setdefault(check["tag"], []).append(check)
    lint = doc.get("lint") or {}
    lint_by_tag: dict[str, list[dict]] = {}
    for finding in lint.get("findings", []):
        lint_by_tag.setdefault(finding["tag"], []).append(finding)
    applied_now = set(doc.get("applied_now") or [])
    execution = doc.get("execution") or {}
    how: dict[tuple[str, int], list[dict]] = {}
    for entry in execution.get("statements", []):
        how.setdefault((entry["tag"], entry["statement"]), []).append(entry)
    for mig in doc["migrations"]:
        status = "applied now" if mig["tag"] in applied_now else mig["status"]
        out.append(f"  {status:<11} {mig['tag']}  ({mig['statements']} statement{'s' if mig['statements'] != 1 else ''})")
        if mig["status"] in ("pending", "skipped") and mig["tag"] not in applied_now:
            for number, text in enumerate(mig.get("sql") or [], 1):
                if text.strip():
                    out.append(f"      {number}. {_first_line(text)}")
                for entry in how.get((mig["tag"], number), []):
                    part = f" (statement {number}.{entry['part']})" if entry.get("part") else ""
                    out.append(f"         runs{part}: {entry['how']}; why: {entry['why']}")
        if mig["status"] == "tampered":
            out.append(f"      tracking row {mig['row_id']} hash {mig['applied_hash'][:12]}…, file now {mig['hash'][:12]}…")
        for c in checks_by_tag.get(mig["tag"], []):
            out.append("      " + _check_line(c))
        for f in lint_by_tag.get(mig["tag"], []):
            verdict = f["handled"] or ("not handled: " + f["help"] if f.get("help") else "not handled")
            out.append(f"      squawk {f['statement']}. {f['rule']}: {f['message']} ({verdict})")
    for row in doc.get("unknown_rows", []):
        out.append(f"  unknown     tracking row {row['id']} created_at {row['created_at']} hash {str(row['hash'])[:12]}…")
    if doc.get("to_apply") and execution.get("summary") and not applied_now:
        out.append(f"  execution   {execution['mode']}: {execution['summary']}")
    rehearsal = (doc.get("preflight") or {}).get("rehearsal")
    if rehearsal:
        if rehearsal["ok"]:
            out.append(f"  rehearsal   ok: {rehearsal['statements']} statement(s) ran in a transaction, rolled back "
                       f"({doc['timings_ms'].get('rehearsal', 0):.0f} ms)")
        else:
            out.append("  rehearsal   FAILED: " + engine.describe_failure(rehearsal["failure"]) + " (rolled back)")
        for copy in rehearsal.get("copies", []):
            out.append(f"  rehearsal   on a private copy of {copy['table']} ({copy['rows']} rows, copied in "
                       f"{copy['ms'] / 1000:.1f} s): none of the live rows were locked; the copy has no foreign keys or triggers")
        for item in rehearsal.get("not_rehearsed", []):
            out.append(f"  rehearsal   not run: {item}")
    transactions = doc.get("transactions", [])
    if len(transactions) > 1 or any(t["attempts"] > 1 for t in transactions):
        for n, t in enumerate(transactions, 1):
            retried = f", {t['attempts']} tries (a lock or a row the app wrote meanwhile)" if t["attempts"] > 1 else ""
            rows = f"; tracking rows {', '.join(t['tracking_rows'])}" if t["tracking_rows"] else ""
            out.append(f"  committed   transaction {n}: {len(t['statements'])} statement(s){rows} "
                       f"({t['ms']:.0f} ms{retried})")
    for build in doc.get("builds", []):
        extra = f", {build['ms']:.0f} ms" if "ms" in build else ""
        note = f": {build['note']}" if build.get("note") else ""
        out.append(f"  index       {build['index']} ({build['statement']}) {build['result']}{extra}{note}")
    if doc.get("committed") and doc.get("result") == "failed":
        out.append("  committed   before the failure: " + "; ".join(doc["committed"]))
    if lint.get("error"):
        out.append(f"  squawk      not run: {lint['error']}")
    would = doc.get("drizzle_would_apply", [])
    if would != doc["to_apply"]:
        out.append(f"  drizzle     its own migrator would run: {', '.join(would) or 'nothing'}")
    for warning in doc.get("warnings", []):
        out.append(f"  warning     {warning}")
    s = doc["summary"]
    t = doc["timings_ms"]
    tail = f"plan {t.get('plan', 0):.0f} ms, preflight {t.get('preflight', 0):.0f} ms"
    if "apply" in t:
        tail += f", apply {t['apply']:.0f} ms"
    counts = f"{s['applied']} applied, {s['pending']} pending, {s['skipped']} skipped, {s['tampered']} tampered, {s['unknown_rows']} unknown rows"
    if doc.get("result") == "applied":
        out.append(f"applied {len(applied_now)}: {', '.join(doc['applied_now'])}  [{tail}]")
    elif doc.get("result") == "up_to_date":
        out.append(f"up to date: {counts}  [{tail}]")
    else:
        out.append(f"{counts}; to apply: {', '.join(doc['to_apply']) or 'nothing'}  [{tail}]")
    return out


def _check_line(c: dict) -> str:
    head = f"preflight {c['statement']}. {c['what']}: "
    if c["kind"] == "parse":
        return head + "not analysed (pglast could not parse it)"
    if c["kind"] == "no_transaction":
        return head + "FAILS: " + c["reason"]
    if c.get("live") is None:
        return head + c.get("note", "nothing to check")
    live = c["live"]
    if c["kind"] == "not_null":
        found = f"{live['null_rows']} NULL rows"
    else:
        found = f"{live['groups']} duplicate groups ({live['rows']} rows)"
        if live["samples"]:
            found += ", e.g. " + "; ".join(_keys(s) for s in live["samples"][:3])
        if live.get("null_rows"):
            found += f", {live['null_rows']} rows with NULL keys"
    if not c["ok"]:
        verdict = "REFUSED (nothing consolidates them first)"
    elif c.get("consolidated_by") and (live.get("groups") or live.get("null_rows")):
        at = c.get("at_statement")
        after = "" if at is None else f"; {at.get('groups', at.get('null_rows'))} left when it runs"
        verdict = f"consolidated by {', '.join(c['consolidated_by'])}{after}" + ("" if c["verified"] else " (not rehearsed)")
    else:
        verdict = "ok"
    return head + found + " -> " + verdict
