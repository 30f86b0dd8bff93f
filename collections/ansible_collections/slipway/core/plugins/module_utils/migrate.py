# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""The migration engine: plan, preflight, rehearse and apply drizzle migrations on PostgreSQL.

Drizzle-compatible on the wire: the same tracking table (created the way drizzle creates it),
one transaction for the whole pending set, one row (sha256 of the file, created_at = ``when``) per
migration, so drizzle-orm's own ``migrate()`` afterwards finds nothing to do. Stricter than drizzle:

* plan: every migration classified (applied / pending / skipped / tampered) plus unknown rows;
  tampered or unknown history and skipped migrations refuse an apply unless overridden;
* preflight (pglast, PostgreSQL's own parser): for each statement that adds a UNIQUE/PRIMARY KEY
  constraint or a unique index on an existing table, the duplicate key groups on the live table,
  with sample keys, knowing which earlier statements of the pending set write that table;
* rehearsal: the pending set run inside a transaction with a short lock_timeout, then rolled back;
  the first failure is reported with migration tag, statement number, SQLSTATE and message;
* apply: an advisory lock (a concurrent apply waits ``lock_wait`` seconds, then fails clearly),
  plan and static preflight repeated under the lock, then everything in one transaction.

Statements are numbered from 1 per migration file: the n-th chunk between breakpoint markers.
Requires psycopg 3 and pglast on the machine that runs it.
"""
from __future__ import absolute_import, annotations, division, print_function

import time
import zlib

from ansible_collections.slipway.core.plugins.module_utils.drizzle import (
    MigrationError,
    classify,
    counts,
)
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

__metaclass__ = type

try:
    import psycopg
    from psycopg import sql

    HAS_PSYCOPG = True
    PSYCOPG_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - reported by the module / CLI
    HAS_PSYCOPG = False
    PSYCOPG_IMPORT_ERROR = _exc

try:
    import pglast
    from pglast import ast as pgast
    from pglast import enums as pgenums
    from pglast.stream import RawStream

    HAS_PGLAST = True
    PGLAST_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover
    HAS_PGLAST = False
    PGLAST_IMPORT_ERROR = _exc

LOCK_CLASS = 0x736C7770  # "slwp": the advisory lock namespace of slipway migrations
SAMPLE_KEYS = 5
DEFAULT_SCHEMA = "drizzle"
DEFAULT_TABLE = "__drizzle_migrations"


class MigrationFailed(MigrationError):
    """A statement failed; ``detail`` holds tag, statement, sqlstate and message."""

    def __init__(self, message, detail):
        MigrationError.__init__(self, message)
        self.detail = detail


class LockBusy(MigrationError):
    """Another slipway migration holds the advisory lock of this tracking table."""


def _ms(start):
    return round((time.monotonic() - start) * 1000.0, 1)


def _one_line(text):
    return " ".join(str(text).split())


def error_detail(tag, number, exc):
    """tag / statement / SQLSTATE / message of a database error, as data and as one line."""
    state = getattr(exc, "sqlstate", None)
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None and diag.message_primary else str(exc)).strip()
    detail = {"tag": tag, "statement": number, "sqlstate": state, "message": _one_line(message)}
    if diag is not None and diag.message_detail:
        detail["detail"] = _one_line(diag.message_detail)
    return detail


def describe_failure(detail):
    text = "%s statement %s: %s %s" % (detail["tag"], detail["statement"], detail["sqlstate"] or "-", detail["message"])
    if detail.get("detail"):
        text += " (%s)" % detail["detail"]
    return text


# --------------------------------------------------------------------------------------------
# Connection and tracking table
# --------------------------------------------------------------------------------------------
def connect(dsn=None, connect_timeout=10, **params):
    """A psycopg connection (autocommit) from a DSN/URL and/or keyword parameters; application_name
    is ``slipway``. Errors become one-line MigrationError without the password."""
    if not HAS_PSYCOPG:
        raise MigrationError("psycopg 3 is not installed for %s; pip install 'psycopg[binary]'" % _python())
    kwargs = {k: v for k, v in params.items() if v not in (None, "")}
    kwargs.setdefault("application_name", "slipway")
    try:
        return psycopg.connect(dsn or "", autocommit=True, connect_timeout=connect_timeout, **kwargs)
    except psycopg.Error as exc:
        message = redact_text(_one_line(str(exc)) or type(exc).__name__, known=(kwargs.get("password"), dsn_password(dsn)))
        raise MigrationError("cannot connect to PostgreSQL: %s; check the DSN, the server and pg_hba.conf" % message)


def dsn_password(dsn):
    """The password inside a DSN/URL (to mask it in messages), or None."""
    if not dsn or not HAS_PSYCOPG:
        return None
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return None


def _python():
    import sys

    return sys.executable or "python"


def tracking_ident(schema, table):
    return sql.Identifier(schema, table)


def read_rows(conn, schema, table):
    """Rows of the tracking table (id, hash, created_at) or [] when it does not exist."""
    found = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, table),
    ).fetchone()
    if found is None:
        return []
    cols = {
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (found[0],)
        ).fetchall()
    }
    if not {"id", "hash", "created_at"} <= cols:
        raise MigrationError(
            "table %s.%s exists but is not a drizzle tracking table (columns: %s); "
            "configure the right tracking schema/table" % (schema, table, ", ".join(sorted(cols)))
        )
    rows = conn.execute(
        sql.SQL("SELECT id, hash, created_at FROM {} ORDER BY id").format(tracking_ident(schema, table))
    ).fetchall()
    return [{"id": r[0], "hash": r[1], "created_at": None if r[2] is None else int(r[2])} for r in rows]


# --------------------------------------------------------------------------------------------
# Static analysis (pglast)
# --------------------------------------------------------------------------------------------
def _deparse(node):
    return RawStream()(node)


def _table(rangevar):
    return {"schema": rangevar.schemaname, "name": rangevar.relname}


def _same_table(a, b):
    return a["name"] == b["name"] and (a["schema"] is None or b["schema"] is None or a["schema"] == b["schema"])


def _table_text(t):
    return "%s.%s" % (t["schema"], t["name"]) if t["schema"] else t["name"]


def analyse_statement(text):
    """pglast view of one chunk: ``{"parsed", "error", "ops"}``; ops in statement order:
    unique (table, keys, where, nulls_not_distinct, primary, name), not_null (table, column),
    write (table), create (table), no_transaction (what)."""
    if not HAS_PGLAST:
        raise MigrationError("pglast is not installed for %s; pip install pglast" % _python())
    try:
        raws = pglast.parse_sql(text)
    except pglast.parser.ParseError as exc:  # PostgreSQL would refuse it too: the rehearsal says how
        return {"parsed": False, "error": _one_line(str(exc)), "ops": []}
    ops = []
    for raw in raws or ():
        stmt = raw.stmt
        if isinstance(stmt, pgast.AlterTableStmt) and stmt.relation is not None:
            table = _table(stmt.relation)
            for cmd in stmt.cmds or ():
                if cmd.subtype == pgenums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, pgast.Constraint):
                    con = cmd.def_
                    primary = con.contype == pgenums.ConstrType.CONSTR_PRIMARY
                    if con.contype not in (pgenums.ConstrType.CONSTR_UNIQUE, pgenums.ConstrType.CONSTR_PRIMARY):
                        continue
                    if con.indexname or not con.keys:  # USING INDEX: the index exists and is unique already
                        continue
                    ops.append({
                        "kind": "unique", "table": table, "primary": primary, "name": con.conname,
                        "keys": [{"column": k.sval} for k in con.keys], "where": None,
                        "nulls_not_distinct": bool(getattr(con, "nulls_not_distinct", False)),
                    })
                elif cmd.subtype == pgenums.AlterTableType.AT_SetNotNull and cmd.name:
                    ops.append({"kind": "not_null", "table": table, "column": cmd.name})
        elif isinstance(stmt, pgast.IndexStmt) and stmt.relation is not None:
            if stmt.concurrent:
                ops.append({"kind": "no_transaction", "what": "CREATE INDEX CONCURRENTLY"})
            if stmt.unique:
                keys = []
                for elem in stmt.indexParams or ():
                    keys.append({"column": elem.name} if elem.name else {"expr": _deparse(elem.expr)})
                ops.append({
                    "kind": "unique", "table": _table(stmt.relation), "primary": bool(stmt.primary),
                    "name": stmt.idxname, "keys": keys,
                    "where": _deparse(stmt.whereClause) if stmt.whereClause is not None else None,
                    "nulls_not_distinct": bool(getattr(stmt, "nulls_not_distinct", False)),
                })
        elif isinstance(stmt, (pgast.UpdateStmt, pgast.DeleteStmt, pgast.InsertStmt)) and stmt.relation is not None:
            ops.append({"kind": "write", "table": _table(stmt.relation)})
        elif type(stmt).__name__ == "MergeStmt" and getattr(stmt, "relation", None) is not None:
            ops.append({"kind": "write", "table": _table(stmt.relation)})
        elif isinstance(stmt, pgast.TruncateStmt):
            for rel in stmt.relations or ():
                ops.append({"kind": "write", "table": _table(rel)})
        elif isinstance(stmt, pgast.CreateStmt) and stmt.relation is not None:
            ops.append({"kind": "create", "table": _table(stmt.relation)})
        elif isinstance(stmt, pgast.VacuumStmt):
            ops.append({"kind": "no_transaction", "what": "VACUUM/ANALYZE" if stmt.is_vacuumcmd else "ANALYZE"})
        elif isinstance(stmt, (pgast.CreatedbStmt, pgast.DropdbStmt)):
            ops.append({"kind": "no_transaction", "what": "CREATE/DROP DATABASE"})
    # a plain ANALYZE may run in a transaction
    ops = [o for o in ops if not (o["kind"] == "no_transaction" and o["what"] == "ANALYZE")]
    return {"parsed": True, "error": None, "ops": ops}


def _relation(conn, table):
    """The quoted relation name when the table exists now, else None."""
    ident = sql.Identifier(table["schema"], table["name"]) if table["schema"] else sql.Identifier(table["name"])
    name = ident.as_string(conn)
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]
    return ident if exists else None


def _key_sql(key):
    return sql.Identifier(key["column"]) if "column" in key else sql.SQL("(" + key["expr"] + ")")


def _key_text(key):
    return key.get("column") or key["expr"]


def count_duplicates(conn, op, relation):
    """Duplicate key groups that would make ``op`` (a unique op) fail on the table now:
    ``{"groups", "rows", "null_rows", "samples": [{"key": [...], "rows": n}]}``."""
    keys = [_key_sql(k) for k in op["keys"]]
    conds = []
    if not op["nulls_not_distinct"] or op["primary"]:
        conds += [sql.SQL("{} IS NOT NULL").format(k) for k in keys]
    if op["where"]:
        conds.append(sql.SQL("(" + op["where"] + ")"))
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
    names = [sql.Identifier("k%d" % i) for i in range(len(keys))]
    query = sql.SQL(
        "SELECT count(*) OVER (), sum(n) OVER (), n, {texts} FROM ("
        "SELECT {aliased}, count(*) AS n FROM {rel}{where} GROUP BY {positions} HAVING count(*) > 1"
        ") AS d ORDER BY n DESC, {names} LIMIT {limit}"
    ).format(
        texts=sql.SQL(", ").join(sql.SQL("{}::text").format(n) for n in names),
        aliased=sql.SQL(", ").join(sql.SQL("{} AS {}").format(k, n) for k, n in zip(keys, names)),
        rel=relation,
        where=where,
        positions=sql.SQL(", ").join(sql.Literal(i + 1) for i in range(len(keys))),
        names=sql.SQL(", ").join(names),
        limit=sql.Literal(SAMPLE_KEYS),
    )
    rows = conn.execute(query).fetchall()  # no parameters: a '%' in an index predicate stays literal
    result = {
        "groups": int(rows[0][0]) if rows else 0,
        "rows": int(rows[0][1]) if rows else 0,
        "samples": [{"key": list(r[3:]), "rows": int(r[2])} for r in rows],
        "null_rows": 0,
    }
    if op["primary"]:
        nulls = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(k) for k in keys)
        result["null_rows"] = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE ").format(relation) + nulls).fetchone()[0]
    return result


def count_nulls(conn, op, relation):
    return conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(relation, sql.Identifier(op["column"]))
    ).fetchone()[0]


def describe_op(op):
    if op["kind"] == "unique":
        what = "PRIMARY KEY" if op["primary"] else "UNIQUE"
        keys = ", ".join(_key_text(k) for k in op["keys"])
        name = (" " + op["name"]) if op["name"] else ""
        text = "%s%s on %s(%s)" % (what, name, _table_text(op["table"]), keys)
        if op["where"]:
            text += " WHERE " + op["where"]
        return text
    if op["kind"] == "not_null":
        return "NOT NULL on %s.%s" % (_table_text(op["table"]), op["column"])
    return op["kind"]


def static_checks(conn, to_apply):
    """Preflight without changing anything: one check per constraint-adding statement of the
    set to apply (duplicates / NULLs on the live table), plus statements that cannot run in a
    transaction and statements pglast cannot parse."""
    checks, created, writes = [], [], []
    for mig in to_apply:
        for number, text in enumerate(mig["statements"], 1):
            if not text.strip():
                continue
            analysis = analyse_statement(text)
            if not analysis["parsed"]:
                checks.append({
                    "tag": mig["tag"], "statement": number, "kind": "parse", "ok": True, "verified": False,
                    "what": "not parsed by pglast: %s" % analysis["error"],
                })
                continue
            for op in analysis["ops"]:
                if op["kind"] == "write":
                    writes.append((mig["tag"], number, op["table"]))
                elif op["kind"] == "create":
                    created.append(op["table"])
                elif op["kind"] == "no_transaction":
                    checks.append({
                        "tag": mig["tag"], "statement": number, "kind": "no_transaction", "ok": False, "verified": True,
                        "what": op["what"],
                        "reason": "%s cannot run inside a transaction block, and drizzle runs every migration in one; "
                                  "move it out of the migration" % op["what"],
                    })
                elif op["kind"] in ("unique", "not_null"):
                    checks.append(_constraint_check(conn, mig, number, op, created, writes))
    return checks


def _constraint_check(conn, mig, number, op, created, writes):
    check = {"tag": mig["tag"], "statement": number, "kind": op["kind"], "what": describe_op(op),
             "table": _table_text(op["table"]), "op": op}
    relation = None if any(_same_table(op["table"], t) for t in created) else _relation(conn, op["table"])
    if relation is None:
        check.update(ok=True, verified=True, live=None, note="new table: nothing to check")
        return check
    mine = [(t, n) for t, n, table in writes if _same_table(op["table"], table)]
    by = [("statement %d" % n) if t == mig["tag"] else ("%s statement %d" % (t, n)) for t, n in mine]
    check["written_in_statement"] = (mig["tag"], number) in mine
    if op["kind"] == "unique":
        live = count_duplicates(conn, op, relation)
        bad = live["groups"] > 0 or live["null_rows"] > 0
    else:
        live = {"null_rows": count_nulls(conn, op, relation)}
        bad = live["null_rows"] > 0
    check["live"] = live
    check["consolidated_by"] = by
    if not bad:
        check.update(ok=True, verified=True)
    elif by:
        # earlier statements of the pending set write this table (e.g. consolidate duplicates):
        # only running them (the rehearsal, or the apply itself) can tell
        check.update(ok=True, verified=False, note="written first by " + ", ".join(by))
    else:
        check.update(ok=False, verified=True, reason=_check_reason(check))
    return check


def _check_reason(check):
    live = check["live"]
    if check["kind"] == "not_null":
        return "%d rows of %s are NULL in %s; fill them in an earlier statement of the migration" % (
            live["null_rows"], check["table"], check["what"])
    parts = []
    if live.get("groups"):
        samples = "; ".join("(%s) x%d" % (", ".join("NULL" if v is None else str(v) for v in s["key"]), s["rows"])
                            for s in live["samples"][:3])
        parts.append("%d duplicate key groups (%d rows) on %s, e.g. %s" % (live["groups"], live["rows"], check["table"], samples))
    if live.get("null_rows"):
        parts.append("%d rows with NULL keys" % live["null_rows"])
    return "%s: %s; add statements that consolidate them before it in the migration" % (check["what"], "; ".join(parts))


def _checks_by_statement(checks):
    out = {}
    for check in checks:
        if check["kind"] in ("unique", "not_null") and check.get("live") is not None:
            out.setdefault((check["tag"], check["statement"]), []).append(check)
    return out


def _recount(conn, check):
    relation = _relation(conn, check["op"]["table"])
    if relation is None:
        return None
    if check["kind"] == "unique":
        return count_duplicates(conn, check["op"], relation)
    return {"null_rows": count_nulls(conn, check["op"], relation)}


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
class Engine:
    """Plan / check / apply one migrations folder against one database connection.

    ``folder`` is what ``drizzle.read_folder`` returned: callers read (and so validate) the folder
    before they connect, and the engine plans with exactly that content."""

    def __init__(self, conn, folder, schema=DEFAULT_SCHEMA, table=DEFAULT_TABLE, include_skipped=False,
                 allow_tampered=False, allow_unknown=False, lock_timeout="5s", lock_wait=10.0):
        if not schema or not table:
            raise MigrationError("tracking schema and table must be non-empty")
        self.conn = conn
        self.folder = folder
        self.schema = schema
        self.table = table
        self.include_skipped = include_skipped
        self.allow_tampered = allow_tampered
        self.allow_unknown = allow_unknown
        self.lock_timeout = lock_timeout
        self.lock_wait = float(lock_wait)
        self._lock_key = zlib.crc32(("%s.%s" % (schema, table)).encode("utf-8")) & 0x7FFFFFFF

    # ---- plan --------------------------------------------------------------------------------
    def plan(self):
        """Classify everything; returns the plan document (no change to the database)."""
        start = time.monotonic()
        info = self.folder
        rows = read_rows(self.conn, self.schema, self.table)
        classified = classify(info["migrations"], rows)
        by_tag = {m["tag"]: m for m in info["migrations"]}
        wanted = ("pending", "skipped") if self.include_skipped else ("pending",)
        to_apply = [by_tag[m["tag"]] for m in classified["migrations"] if m["status"] in wanted]
        for item in classified["migrations"]:
            if item["status"] in ("pending", "skipped", "tampered"):
                item["sql"] = by_tag[item["tag"]]["statements"]
        plan = {
            "migrations_dir": info["folder"],
            "tracking_table": "%s.%s" % (self.schema, self.table),
            "tracking_rows": len(rows),
            "migrations": classified["migrations"],
            "unknown_rows": classified["unknown_rows"],
            "summary": counts(classified),
            "drizzle_would_apply": classified["drizzle_would_apply"],
            "warnings": info["warnings"] + classified["warnings"],
            "to_apply": [m["tag"] for m in to_apply],
            "blockers": self._blockers(classified),
            "timings_ms": {"plan": _ms(start)},
        }
        self._to_apply = to_apply
        return plan

    def _blockers(self, classified):
        out = []
        for mig in classified["migrations"]:
            if mig["status"] == "tampered" and not self.allow_tampered:
                out.append(
                    "%s.sql was edited after it was applied (tracking row %d has hash %s..., the file hashes to %s...); "
                    "restore the applied version, or pass --allow-tampered to accept the file as applied"
                    % (mig["tag"], mig["row_id"], mig["applied_hash"][:12], mig["hash"][:12])
                )
            elif mig["status"] == "skipped" and not self.include_skipped:
                out.append(
                    "%s is skipped: its when (%d) is older than the newest applied migration, so drizzle's migrator "
                    "never runs it; pass --include-skipped to apply it in journal order" % (mig["tag"], mig["when"])
                )
        if classified["unknown_rows"] and not self.allow_unknown:
            row = classified["unknown_rows"][0]
            out.append(
                "%d tracking row(s) match no migration in %s (first: id %d, created_at %s, hash %s...): the database "
                "has history this folder lacks; use the matching migrations folder, or pass --allow-unknown"
                % (len(classified["unknown_rows"]), self.folder["folder"], row["id"], row["created_at"], (row["hash"] or "")[:12])
            )
        return out

    # ---- check -------------------------------------------------------------------------------
    def check(self, rehearse=True):
        """Plan + static preflight (+ rehearsal, rolled back). Changes nothing."""
        try:
            return self._check(rehearse)
        except psycopg.Error as exc:
            raise _db_error("plan", exc)

    def _static_preflight(self, plan):
        start = time.monotonic()
        plan["preflight"] = {"checks": static_checks(self.conn, self._to_apply), "rehearsal": None}
        plan["timings_ms"]["preflight"] = _ms(start)

    def _check(self, rehearse):
        plan = self.plan()
        self._static_preflight(plan)
        statically_ok = all(c["ok"] for c in plan["preflight"]["checks"])
        # a known failure needs no rehearsal: it would only take locks to find out again
        if rehearse and self._to_apply and not plan["blockers"] and statically_ok:
            start = time.monotonic()
            plan["preflight"]["rehearsal"] = self.rehearse(plan["preflight"]["checks"])
            plan["timings_ms"]["rehearsal"] = _ms(start)
        self._finish_preflight(plan)
        plan["result"] = "blocked" if plan["blockers"] else ("pending" if plan["to_apply"] else "up_to_date")
        plan["changed"] = False
        return _public(plan)

    def _finish_preflight(self, plan):
        pre = plan["preflight"]
        rehearsal = pre.get("rehearsal")
        if rehearsal and rehearsal["ok"]:
            for check in pre["checks"]:
                if check["ok"]:
                    check["verified"] = True
        failed = [c for c in pre["checks"] if not c["ok"]]
        pre["ok"] = not failed and not (rehearsal and not rehearsal["ok"])
        for check in failed:
            plan["blockers"].append("preflight: %s statement %d: %s" % (check["tag"], check["statement"], check["reason"]))
        if rehearsal and not rehearsal["ok"]:
            plan["blockers"].append("rehearsal: " + describe_failure(rehearsal["failure"]) + "; nothing was changed")

    def rehearse(self, checks):
        """Run the set to apply in a transaction with a short lock_timeout, then roll back. Under
        the apply's advisory lock: two rehearsals (or a rehearsal and an apply) of one database at
        the same time would wait on each other's table locks and deadlock."""
        with self.conn.transaction(force_rollback=True):
            self._take_lock()
            self._set_lock_timeout()
            ran, failure, _ = self._execute(checks)
        return {"ok": failure is None, "failure": failure, "statements": ran}

    def _execute(self, checks, applied=None):
        """Run the set to apply in the current transaction, re-counting each check right before its
        statement. With ``applied`` (a list), insert each migration's tracking row after it and
        append its tag. Returns (statements run, failure detail or None, counts before the failed
        statement); stops at the first failure, leaving the transaction to be rolled back."""
        counted = _checks_by_statement(checks)
        ident = tracking_ident(self.schema, self.table)
        ran = 0
        for mig in self._to_apply:
            for number, text in enumerate(mig["statements"], 1):
                if not text.strip():
                    continue
                before = {}
                for check in counted.get((mig["tag"], number), []):
                    if not check.get("written_in_statement"):
                        check["at_statement"] = before[check["what"]] = _recount(self.conn, check)
                try:
                    self.conn.execute(text)
                except psycopg.Error as exc:
                    return ran, error_detail(mig["tag"], number, exc), before
                ran += 1
            if applied is not None:
                self.conn.execute(
                    sql.SQL("INSERT INTO {} (hash, created_at) VALUES (%s, %s)").format(ident), (mig["hash"], mig["when"])
                )
                applied.append(mig["tag"])
        return ran, None, {}

    def _set_lock_timeout(self):
        if self.lock_timeout:
            self.conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(str(self.lock_timeout))))

    # ---- apply -------------------------------------------------------------------------------
    def _take_lock(self):
        deadline = time.monotonic() + self.lock_wait
        while True:
            got = self.conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_CLASS, self._lock_key)).fetchone()[0]
            if got:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        holder = self.conn.execute(
            "SELECT l.pid, a.application_name, to_char(a.xact_start, 'YYYY-MM-DD HH24:MI:SS TZ') FROM pg_locks l "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 2 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (LOCK_CLASS, self._lock_key),
        ).fetchone()
        who = " (backend pid %s, %s, since %s)" % holder if holder else ""
        raise LockBusy(
            "another migration is running on this database%s: waited %.0fs for its lock; "
            "let it finish and run again" % (who, self.lock_wait)
        )

    def apply(self):
        """Take the lock, plan again under it, refuse on blockers or a failing static preflight,
        then apply the set and its tracking rows in one transaction. Returns the plan document
        with ``applied_now``; raises MigrationError (nothing changed) on any failure, with the
        plan document as ``.plan`` when there is one."""
        total = time.monotonic()
        plan = None
        try:
            with self.conn.transaction():
                start = time.monotonic()
                self._take_lock()
                lock_ms = _ms(start)
                plan = self.plan()
                plan["timings_ms"]["lock_wait"] = lock_ms
                plan["applied_now"] = []
                self._static_preflight(plan)
                self._finish_preflight(plan)
                if plan["blockers"]:
                    plan["result"] = "blocked"
                    raise MigrationRefused(plan)
                if self._to_apply:
                    start = time.monotonic()
                    self._set_lock_timeout()
                    self._run(plan)
                    plan["timings_ms"]["apply"] = _ms(start)
            # committed (or nothing to do): the database itself has verified every check
            for check in plan["preflight"]["checks"]:
                check["verified"] = True
            plan.update(result="applied" if plan["applied_now"] else "up_to_date", changed=bool(plan["applied_now"]))
            return plan
        except MigrationError as exc:
            if plan is not None:
                plan.update(changed=False, applied_now=[])
                exc.plan = plan
            raise
        except psycopg.Error as exc:
            raise _db_error("apply", exc)
        finally:
            if plan is not None:
                plan["timings_ms"]["total"] = _ms(total)
                _public(plan)

    def _run(self, plan):
        ident = tracking_ident(self.schema, self.table)
        self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        self.conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id SERIAL PRIMARY KEY, hash text NOT NULL, created_at bigint)"
        ).format(ident))
        _, detail, before = self._execute(plan["preflight"]["checks"], applied=plan["applied_now"])
        if detail is not None:
            if before:
                detail["before_statement"] = before
            plan["result"] = "failed"
            plan["error"] = detail
            raise MigrationFailed(
                "migration failed, everything rolled back, tracking table unchanged: %s" % describe_failure(detail),
                detail,
            )


def _db_error(stage, exc):
    """A database error outside the migration statements (reading history, counting duplicates)."""
    return MigrationError("%s failed, nothing changed: %s %s; check the role's privileges and the tracking table"
                          % (stage, getattr(exc, "sqlstate", None) or "-", _one_line(str(exc))))


def _public(plan):
    """Drop internal fields (parsed ops) from the plan document; returns it."""
    for check in (plan.get("preflight") or {}).get("checks", []):
        check.pop("op", None)
        check.pop("written_in_statement", None)
    return plan


class MigrationRefused(MigrationError):
    """Apply refused before any change: blockers (history, skipped, preflight)."""

    def __init__(self, plan):
        MigrationError.__init__(self, "apply refused, nothing changed: " + plan["blockers"][0]
                                + ("" if len(plan["blockers"]) == 1 else " (+%d more)" % (len(plan["blockers"]) - 1)))
        self.plan = plan
