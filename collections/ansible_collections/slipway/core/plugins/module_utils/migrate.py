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

import contextlib
import random
import time
import zlib

from ansible_collections.slipway.core.plugins.module_utils import postgres as pg
from ansible_collections.slipway.core.plugins.module_utils import statements as stmts
from ansible_collections.slipway.core.plugins.module_utils.drizzle import (
    MigrationError,
    classify,
    counts,
)
from ansible_collections.slipway.core.plugins.module_utils.oneline import one_line

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

    HAS_PGLAST = True
    PGLAST_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover
    HAS_PGLAST = False
    PGLAST_IMPORT_ERROR = _exc

LOCK_CLASS = 0x736C7770  # "slwp": the advisory lock namespace of slipway migrations
SAMPLE_KEYS = 5
DEFAULT_SCHEMA = "drizzle"
DEFAULT_TABLE = "__drizzle_migrations"
# the overrides, as blockers name them; each front end (CLI, role) says how to set them
OVERRIDES = {
    "allow_tampered": "allow tampered history",
    "include_skipped": "include skipped migrations",
    "allow_unknown": "allow unknown tracking rows",
}


class MigrationFailed(MigrationError):
    """A statement failed; ``detail`` holds tag, statement, sqlstate and message."""

    def __init__(self, message, detail):
        MigrationError.__init__(self, message)
        self.detail = detail


class LockBusy(MigrationError):
    """Another slipway migration holds the advisory lock of this tracking table."""


def lock_key(schema, table):
    """The advisory lock key (in class LOCK_CLASS) of a tracking table: a migration holds it
    exclusively, a drift check shared."""
    return zlib.crc32(("%s.%s" % (schema, table)).encode("utf-8")) & 0x7FFFFFFF


def require_libraries(module):
    """Fail the Ansible ``module`` (one line) when psycopg or pglast cannot be imported: slipway's
    module runtime is not on its PYTHONPATH. ``missing_libraries`` in the result tells a playbook
    that installing the runtime and running the module again is the fix."""
    from ansible.module_utils.basic import missing_required_lib

    for ok, name, error in ((HAS_PSYCOPG, "psycopg", PSYCOPG_IMPORT_ERROR), (HAS_PGLAST, "pglast", PGLAST_IMPORT_ERROR)):
        if not ok:
            module.fail_json(msg=missing_required_lib(name), exception=str(error), missing_libraries=[name])


def _ms(start):
    return round((time.monotonic() - start) * 1000.0, 1)


def error_detail(tag, number, exc):
    """tag / statement / SQLSTATE / message of a database error, as data and as one line."""
    state = getattr(exc, "sqlstate", None)
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None and diag.message_primary else str(exc)).strip()
    detail = {"tag": tag, "statement": number, "sqlstate": state, "message": one_line(message)}
    if diag is not None and diag.message_detail:
        detail["detail"] = one_line(diag.message_detail)
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
    """``postgres.connect`` (the one door to PostgreSQL), failing with a MigrationError."""
    try:
        return pg.connect(dsn, connect_timeout, **params)
    except pg.ConnectError as exc:
        raise MigrationError(str(exc))


dsn_password = pg.dsn_password


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
_deparse = stmts.deparse
_table = stmts.table_of
_same_table = stmts.same_table


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
        return {"parsed": False, "error": one_line(str(exc)), "ops": []}
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
    check["consolidated_by"] = by
    live, error = _count(conn, op, relation)
    if error is not None:
        # e.g. a column an earlier pending statement adds: only running them can tell
        check.update(ok=True, verified=False, live=None, count_later=True, note="cannot be counted before the pending statements "
                     "run (%s); the rehearsal counts it right before the statement" % error)
        return check
    bad = live["groups"] > 0 or live["null_rows"] > 0 if op["kind"] == "unique" else live["null_rows"] > 0
    check["live"] = live
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
        if check["kind"] in ("unique", "not_null") and (check.get("live") is not None or check.get("count_later")):
            out.setdefault((check["tag"], check["statement"]), []).append(check)
    return out


def _count(conn, op, relation):
    """(live counts, None) or (None, the database's one-line reason it cannot count now). Runs in a
    savepoint (or a transaction of its own): a count that fails never aborts the caller's work."""
    try:
        with conn.transaction():
            if op["kind"] == "unique":
                return count_duplicates(conn, op, relation), None
            return {"null_rows": count_nulls(conn, op, relation)}, None
    except psycopg.Error as exc:
        return None, "%s %s" % (getattr(exc, "sqlstate", None) or "-", one_line(getattr(exc.diag, "message_primary", None) or exc))


def _recount(conn, check):
    relation = _relation(conn, check["op"]["table"])
    if relation is None:
        return None
    return _count(conn, check["op"], relation)[0]


# --------------------------------------------------------------------------------------------
# How each statement runs: the program
# --------------------------------------------------------------------------------------------
MODES = ("online", "transaction")
IN_TRANSACTION = "in the transaction"


def _rows_at_least(conn, relation, min_rows):
    """Whether the table holds at least ``min_rows`` rows (the planner's estimate when it has one,
    else a count that stops at ``min_rows``); also returns the figure for the plan."""
    est = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                       (relation.as_string(conn),)).fetchone()
    if est and est[0] is not None and est[0] >= 0:
        return est[0] >= min_rows, int(est[0])
    if min_rows <= 0:
        return True, None
    n = conn.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {}) AS s").format(
        relation, sql.Literal(int(min_rows)))).fetchone()[0]
    return n >= min_rows, int(n)


def _index_named(conn, name, relation):
    """(name as regclass text, valid, definition, relkind) of the relation called ``name`` in the
    schema of the table ``relation`` (quoted text), or None. valid is None for a non-index."""
    return conn.execute(
        "SELECT c.oid::regclass::text, i.indisvalid, pg_get_indexdef(c.oid), c.relkind FROM pg_class c "
        "LEFT JOIN pg_index i ON i.indexrelid = c.oid WHERE c.relname = %s "
        "AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass(%s))",
        (name, relation),
    ).fetchone()


def _human_rows(n):
    if n is None:
        return "rows (never analysed)"
    if n >= 1000000:
        return "~%.1fM rows" % (n / 1e6)
    if n >= 1000:
        return "~%dk rows" % (n // 1000)
    return "%d rows" % n


def build_program(conn, to_apply, mode="online", min_rows=10000):
    """How the set runs: ``{"mode", "prebuilds", "sequence", "atomic", "blockers", "statements"}``.

    ``sequence`` items run in order: ``sql`` (in a transaction), ``build`` (an index built
    CONCURRENTLY outside any transaction, after committing what came before) and ``track`` (a
    migration's tracking row, in the transaction of its last statement). ``prebuilds`` are builds
    that depend on nothing pending: they run before the first transaction, which keeps the rest
    atomic. ``statements`` describes, per statement that does not simply run in the transaction,
    how it runs and why. Mode ``transaction`` is drizzle's: everything in one transaction."""
    prebuilds, sequence, blockers, described = [], [], [], []
    seen = []  # (tag, number, tables referenced) of every statement before the current one
    texts_seen = []  # the text of every chunk before the current one
    created = []
    for mig in to_apply:
        writes_here = []  # (sql item, tables written) of this migration, for re-running consolidations
        kinds_here = []  # statement kinds of this migration so far (None: not parsed)
        for number, text in enumerate(mig["statements"], 1):
            if not text.strip():
                continue
            texts_seen.append(text)
            split = stmts.split_chunk(text)
            if not split["parsed"]:
                item = {"type": "sql", "tag": mig["tag"], "statement": number, "part": None, "text": text,
                        "how": IN_TRANSACTION, "writes": True, "refs": None}  # unknown: may write anything
                sequence.append(item)
                seen.append((mig["tag"], number, None))  # unknown: references anything
                kinds_here.append(None)
                continue
            parts = split["statements"]
            refused = [p["txn"] for p in parts if p["txn"] in stmts.TXN_REFUSED]
            if refused:
                blockers.append("%s statement %d contains %s: it would end or undo the migration's transaction; "
                                "remove it from the migration" % (mig["tag"], number, refused[0]))
            own_txn = [p["txn"] for p in parts if p["txn"] in stmts.TXN_DROPPED]
            plans = []
            for i, p in enumerate(parts):
                build = None
                if mode == "online" and not p["txn"]:
                    build = stmts.index_build(p["node"])
                    if build is not None:  # what runs before it: earlier chunks and this chunk's earlier statements
                        earlier = parts[:i]
                        texts = texts_seen[:-1] + [q["text"] for q in earlier]
                        made = created + [stmts.table_of(q["node"].relation) for q in earlier
                                          if isinstance(q["node"], pgast.CreateStmt)]
                        touched = seen + [(mig["tag"], number, _scope([q for q in earlier if not q["txn"]]))]
                        kinds = kinds_here + [type(q["node"]).__name__ for q in earlier if not q["txn"]]
                        build = _place_build(conn, build, made, touched, min_rows, texts, kinds)
                plans.append((p, build))
            whole = not own_txn and not any(b for _, b in plans)  # a kept build is described: not whole
            if whole:
                item = {"type": "sql", "tag": mig["tag"], "statement": number, "part": None, "text": text, "how": IN_TRANSACTION}
                sequence.append(item)
                seen.append((mig["tag"], number, _scope(parts)))
                kinds_here += [type(p["node"]).__name__ for p in parts]
                _note_writes(writes_here, item, parts)
                created += [stmts.table_of(p["node"].relation) for p in parts if isinstance(p["node"], pgast.CreateStmt)]
                continue
            if own_txn:
                described.append({"tag": mig["tag"], "statement": number, "part": None,
                                  "how": "without the file's own %s" % "/".join(own_txn),
                                  "why": "drizzle's migrator runs every migration inside its own transaction, so the file's "
                                         "COMMIT commits everything run so far (earlier migrations and their tracking rows "
                                         "included) and what follows runs outside any transaction; slipway runs the "
                                         "file's statements inside its transaction instead"})
            for k, (p, build) in enumerate(plans, 1):
                part = k if len(parts) > 1 else None
                if p["txn"]:
                    continue
                if build is not None and build["phase"] == "kept":
                    described.append({"tag": mig["tag"], "statement": number, "part": part, "how": build["how"], "why": build["why"]})
                    build = None
                if build is None:
                    item = {"type": "sql", "tag": mig["tag"], "statement": number, "part": part, "text": p["text"], "how": IN_TRANSACTION}
                    sequence.append(item)
                    _note_writes(writes_here, item, [p])
                    if isinstance(p["node"], pgast.CreateStmt):
                        created.append(stmts.table_of(p["node"].relation))
                    continue
                build.update(tag=mig["tag"], statement=number, part=part, type="build", original=p["text"])
                if build["phase"] == "inline":
                    build["consolidate"] = [i for i, tables in writes_here
                                            if any(stmts.same_table(build["table"], t) for t in tables)]
                    sequence.append(build)
                else:
                    prebuilds.append(build)
                if build["attach"]:
                    sequence.append({"type": "sql", "tag": mig["tag"], "statement": number, "part": part,
                                     "text": build["attach"], "how": "attach", "attaches": build["index"]})
                described.append({"tag": mig["tag"], "statement": number, "part": part, "how": build["how"], "why": build["why"]})
            seen.append((mig["tag"], number, _scope([p for p in parts if not p["txn"]])))
            kinds_here += [type(p["node"]).__name__ for p in parts if not p["txn"]]
        sequence.append({"type": "track", "tag": mig["tag"], "hash": mig["hash"], "when": mig["when"]})
    atomic = not any(i["type"] == "build" for i in sequence)
    return {"mode": mode, "prebuilds": prebuilds, "sequence": sequence, "atomic": atomic,
            "blockers": blockers, "statements": described}


def _note_writes(writes_here, item, parts):
    tables = []
    for p in parts:
        node = p["node"]
        writes = stmts.writes_rows(node)
        if writes is None:
            item["writes"] = True  # a DO block, CALL or data-modifying WITH: rows of unknown tables
        elif writes and getattr(node, "relation", None) is not None:
            tables.append(stmts.table_of(node.relation))
    item["kinds"] = [type(p["node"]).__name__ for p in parts]
    item["refs"] = _scope(parts)
    if tables:
        item["writes"] = True
        item["written"] = tables
        writes_here.append((item, tables))


def _scope(parts):
    tables = []
    for p in parts:
        found = stmts.scope(p["node"])
        if found is None:
            return None
        tables += found
    return tables


def _place_build(conn, build, created, seen, min_rows, earlier_texts, kinds_here):
    """Decide whether an index build runs concurrently, and when; None keeps the statement as it is
    (phase ``kept``: as it is, with the reason for the plan)."""
    table = build["table"]
    if any(stmts.same_table(table, t) for t in created):
        return None  # created by the pending set: empty, in the transaction
    relation = _relation(conn, table)
    if relation is None:
        return None  # renamed or created in an unparsed statement: the statement knows best
    relkind = conn.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (relation.as_string(conn),)).fetchone()
    if not relkind or relkind[0] not in ("r", "m"):
        return None  # a partitioned table: no CONCURRENTLY, no USING INDEX
    big, rows = _rows_at_least(conn, relation, min_rows)
    if not big:
        return None
    build["relation"] = relation.as_string(conn)
    build["rows"] = rows
    existing = _index_named(conn, build["index"], build["relation"])
    if existing is not None and existing[1] is not False and any(build["index"] in text for text in earlier_texts):
        return None  # e.g. DROP INDEX x ... CREATE INDEX x: the statements, in order, in the transaction
    earlier = [(t, n) for t, n, tables in seen if tables is None or any(stmts.same_table(table, x) for x in tables)]
    what = "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX in the transaction" \
        if build["attach"] else "CREATE INDEX CONCURRENTLY"
    size = "%s has %s" % (_table_text(table), _human_rows(rows))
    if not earlier:
        build.update(phase="before", how="rewritten: %s, before the transaction" % what,
                     why="%s; built in the transaction the index would block its writes (SHARE lock) for the whole "
                         "build; nothing pending touches it first, so the rest stays one transaction" % size)
    elif any(k not in stmts.REWRITES_ROWS for k in kinds_here):
        first = earlier[-1]
        build.update(phase="kept", how="in the transaction, as written (its writes wait for the whole build)",
                     why="%s, but %s statement %d touches it first and the statements of this migration before it "
                         "are not all UPDATE/DELETE: committing them before a concurrent build would leave a migration "
                         "that cannot be run again if the build failed" % (size, first[0], first[1]))
    else:
        first = earlier[-1]
        build.update(phase="inline", how="rewritten: %s, after committing what runs before it (NOT atomic)" % what,
                     why="%s and %s statement %d touches it first, so the build must wait for that to commit; "
                         "if the build fails on rows written meanwhile, this migration's UPDATE/DELETE statements "
                         "on the table run again and the build is retried; after an interruption a re-run runs the "
                         "whole migration again (its statements before the build are UPDATE/DELETE only)"
                         % (size, first[0], first[1]))
    return build


def _item_label(item):
    return "%s statement %s%s" % (item["tag"], item["statement"], "" if not item.get("part") else ".%d" % item["part"])


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
class Engine:
    """Plan / check / apply one migrations folder against one database connection.

    ``folder`` is what ``drizzle.read_folder`` returned: callers read (and so validate) the folder
    before they connect, and the engine plans with exactly that content.

    ``mode`` ``online`` (the default) builds indexes on existing tables of at least ``min_rows``
    rows CONCURRENTLY and runs transactions with ``online_lock_timeout`` and ``lock_retries``;
    ``transaction`` is drizzle's own behaviour: the whole set in one transaction with
    ``lock_timeout``."""

    def __init__(self, conn, folder, schema=DEFAULT_SCHEMA, table=DEFAULT_TABLE, include_skipped=False,
                 allow_tampered=False, allow_unknown=False, lock_timeout="5s", lock_wait=10.0,
                 mode="online", min_rows=10000, online_lock_timeout="20ms", lock_retries=30, build_retries=3,
                 conflict_retries=4, fence=None):
        if not schema or not table:
            raise MigrationError("tracking schema and table must be non-empty")
        if mode not in MODES:
            raise MigrationError("migration mode %r is not one of %s" % (mode, ", ".join(MODES)))
        self.conn = conn
        # fence: module_utils/runguard.Guard of a deploy run (or None): each commit happens under
        # fence.hold() (refused once the run lost its deploy lock) and is journaled there
        self.fence = fence
        self.folder = folder
        self.schema = schema
        self.table = table
        self.include_skipped = include_skipped
        self.allow_tampered = allow_tampered
        self.allow_unknown = allow_unknown
        self.lock_timeout = lock_timeout
        self.lock_wait = float(lock_wait)
        self.mode = mode
        self.min_rows = int(min_rows)
        self.online_lock_timeout = online_lock_timeout
        self.lock_retries = int(lock_retries)
        self.conflict_retries = int(conflict_retries)
        self.build_retries = int(build_retries)
        self._lock_key = lock_key(schema, table)

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
            "warnings": info["warnings"] + classified["warnings"] + self._invalid_indexes(),
            "to_apply": [m["tag"] for m in to_apply],
            "blockers": self._blockers(classified),
            "timings_ms": {"plan": _ms(start)},
        }
        self._to_apply = to_apply
        self._program = build_program(self.conn, to_apply, self.mode, self.min_rows)
        plan["blockers"] += self._program["blockers"]
        plan["execution"] = self._describe_program()
        return plan

    def _describe_program(self):
        prog = self._program
        out = {"mode": prog["mode"], "atomic": prog["atomic"], "statements": prog["statements"]}
        if not self._to_apply:
            out["summary"] = "nothing to run"
        elif prog["atomic"]:
            out["summary"] = "one transaction" + (
                " (%d index(es) built concurrently before it; dropped again if it fails)" % len(prog["prebuilds"])
                if prog["prebuilds"] else "")
        else:
            splits = [_item_label(i) for i in prog["sequence"] if i["type"] == "build"]
            out["summary"] = ("NOT one transaction: what runs before %s commits first; a failure after that leaves "
                              "it committed (a re-run runs that migration again from its first statement)" % ", ".join(splits))
        return out

    def _invalid_indexes(self):
        rows = self.conn.execute(
            "SELECT i.indexrelid::regclass::text, i.indrelid::regclass::text FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT i.indisvalid AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        ).fetchall()
        return ["index %s on %s is INVALID (a failed or interrupted CREATE INDEX CONCURRENTLY): it enforces nothing "
                "and ON CONFLICT cannot use it; slipway drops and rebuilds it when a pending migration builds it, "
                "else drop it: DROP INDEX CONCURRENTLY %s" % (r[0], r[1], r[0]) for r in rows]

    def _blockers(self, classified):
        out = []
        for mig in classified["migrations"]:
            if mig["status"] == "tampered" and not self.allow_tampered:
                out.append(
                    "%s.sql was edited after it was applied (tracking row %d has hash %s..., the file hashes to %s...); "
                    "restore the applied version, or %s to accept the file as applied"
                    % (mig["tag"], mig["row_id"], mig["applied_hash"][:12], mig["hash"][:12], OVERRIDES["allow_tampered"])
                )
            elif mig["status"] == "skipped" and not self.include_skipped:
                out.append(
                    "%s is skipped: its when (%d) is older than the newest applied migration, so drizzle's migrator "
                    "never runs it; %s to apply it in journal order" % (mig["tag"], mig["when"], OVERRIDES["include_skipped"])
                )
        if classified["unknown_rows"] and not self.allow_unknown:
            row = classified["unknown_rows"][0]
            out.append(
                "%d tracking row(s) match no migration in %s (first: id %d, created_at %s, hash %s...): the database "
                "has history this folder lacks; use the matching migrations folder, or %s"
                % (len(classified["unknown_rows"]), self.folder["folder"], row["id"], row["created_at"], (row["hash"] or "")[:12],
                   OVERRIDES["allow_unknown"])
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
        """Run the set to apply in one transaction, then roll back; never commits. Under the
        apply's advisory lock: two rehearsals (or a rehearsal and an apply) of one database at the
        same time would wait on each other's table locks and deadlock. In online mode a concurrent
        build is not run (it would lock the table for the build): the duplicate count right before
        it stands in, and the ADD CONSTRAINT ... USING INDEX that needs the index is not rehearsed.
        A lock not granted within the online lock_timeout rolls back and tries again.

        In online mode a big existing table that the set's statements rewrite rows of (0007's
        consolidation) is rehearsed on a private copy: a temporary table of the same name, which
        the statements' unqualified names resolve to first, so the rehearsal locks none of the
        live rows the app writes (the copy has the table's columns, defaults, checks and indexes;
        not its foreign keys or triggers)."""
        attempts = 0
        shadows = self._shadow_candidates(checks) if self.mode == "online" else []
        while True:
            attempts += 1
            try:
                with self.conn.transaction(force_rollback=True):
                    self._take_lock(xact=True)
                    copies = self._make_shadows(shadows)
                    self._set_lock_timeout(self._txn_lock_timeout())
                    ran, failure, skipped = self._rehearse_items(checks)
            except psycopg.Error as exc:  # only a lock timeout of our own statements gets here
                raise _db_error("rehearsal", exc)
            if failure and failure["sqlstate"] in RETRY_STATES and self._retries_left(attempts):
                self._backoff(attempts)
                continue
            result = {"ok": failure is None, "failure": failure, "statements": ran, "attempts": attempts}
            if skipped:
                result["not_rehearsed"] = skipped
            if copies:
                result["copies"] = copies
            return result

    def _shadow_candidates(self, checks):
        """Big existing tables whose rows pending statements rewrite, named only unqualified."""
        written, qualified = [], []
        for item in self._program["sequence"]:
            for table in item.get("written") or ():
                (qualified if table["schema"] else written).append(table)
        for check in checks:
            op = check.get("op") or {}
            if op.get("table") and op["table"]["schema"]:
                qualified.append(op["table"])
        items = [i for i in self._program["sequence"] if i["type"] == "sql" and not i.get("attaches")]
        if any(i.get("refs") is None for i in items):
            return []  # a DO block, a DROP or RENAME, an unparsed chunk: it may touch the table in ways a copy lacks
        out = []
        for table in written:
            if any(t["name"] == table["name"] for t in qualified) or any(t["name"] == table["name"] for t in out):
                continue
            # only row changes and reads on it: DDL, constraints or keys would meet a copy that differs
            if any(any(t["name"] == table["name"] for t in i["refs"])
                   and not set(i.get("kinds") or ["?"]) <= {"UpdateStmt", "DeleteStmt", "SelectStmt"} for i in items):
                continue
            relation = _relation(self.conn, table)
            if relation is not None and _rows_at_least(self.conn, relation, max(self.min_rows, 1))[0]:
                out.append(table)
        return out

    def _make_shadows(self, tables):
        copies = []
        for table in tables:
            start = time.monotonic()
            oid, nsp, rel = self.conn.execute(
                "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s)", (sql.Identifier(table["name"]).as_string(self.conn),)).fetchone()
            live = sql.Identifier(nsp, rel).as_string(self.conn)  # qualified: the copy takes the bare name
            # not INCLUDING INDEXES: an INVALID index (a failed concurrent build) would be built, and fail
            self.conn.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {} INCLUDING ALL EXCLUDING INDEXES) ON COMMIT DROP").format(
                sql.Identifier(table["name"]), sql.SQL(live)))
            cols = [sql.Identifier(r[0]) for r in self.conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
                "AND attgenerated = '' ORDER BY attnum", (oid,)).fetchall()]
            n = self.conn.execute(sql.SQL("INSERT INTO pg_temp.{} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}").format(
                sql.Identifier(table["name"]), sql.SQL(", ").join(cols), sql.SQL(", ").join(cols), sql.SQL(live))).rowcount
            for (definition,) in self.conn.execute(
                    "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s AND indisvalid", (oid,)).fetchall():
                self.conn.execute(stmts.retarget_index(definition, "pg_temp", table["name"]))
            self.conn.execute(sql.SQL("ANALYZE pg_temp.{}").format(sql.Identifier(table["name"])))
            resolved = self.conn.execute(
                "SELECT n.nspname LIKE 'pg_temp%%' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s)", (sql.Identifier(table["name"]).as_string(self.conn),)).fetchone()
            if not resolved or not resolved[0]:  # search_path puts pg_temp after the table's schema
                self.conn.execute(sql.SQL("DROP TABLE pg_temp.{}").format(sql.Identifier(table["name"])))
                continue
            copies.append({"table": live, "rows": n, "ms": _ms(start)})
        return copies

    def _rehearse_items(self, checks):
        counted = _checks_by_statement(checks)
        recounted = set()
        ran, skipped, as_written = 0, [], set()
        for build in self._program["prebuilds"]:
            failure = self._rehearse_as_written(build, as_written)
            if failure:
                return ran, failure, skipped
        for item in self._program["sequence"]:
            if item["type"] == "track":
                continue
            key = (item["tag"], item["statement"])
            if key not in recounted:
                recounted.add(key)
                self._recount_all(counted.get(key, []))
            if item["type"] == "build":
                failure = self._build_stand_in(item, counted.get(key, [])) or self._rehearse_as_written(item, as_written)
                if failure:
                    return ran, failure, skipped
                continue
            if item.get("attaches") in as_written:
                continue
            if item.get("attaches"):
                skipped.append("%s: %s (needs the index built concurrently)" % (_item_label(item), _first_words(item["text"])))
                continue
            failure = self._run_item(item)
            if failure:
                return ran, failure, skipped
            ran += 1
        return ran, None, skipped

    def _rehearse_as_written(self, build, as_written):
        """A small table's index is built as written (a brief lock), so what depends on it rehearses
        too; records it in ``as_written``. A failure detail or None."""
        if (build.get("rows") or 0) >= REHEARSE_AS_WRITTEN_ROWS:
            return None
        failure = self._run_item(dict(build, text=build["original"]))
        if failure is None:
            as_written.add(build["index"])
        return failure

    def _build_stand_in(self, item, checks):
        """In a rehearsal: would the concurrent build of ``item`` find duplicates now?"""
        for check in checks:
            found = check.get("at_statement")
            if check["kind"] == "unique" and found and (found.get("groups") or found.get("null_rows")):
                return {"tag": item["tag"], "statement": item["statement"], "sqlstate": "23505",
                        "message": "%d duplicate key groups left when %s would be built" % (found["groups"], item["index"])}
        return None

    def _recount_all(self, checks):
        """Count each check again right before its statement; returns the counts by check."""
        before = {}
        for check in checks:
            if not check.get("written_in_statement"):
                check["at_statement"] = before[check["what"]] = _recount(self.conn, check)
        return before

    def _run_item(self, item):
        """Run one sql item in the current transaction; a failure detail or None. Raises when the
        statement ended the transaction itself (nothing may pretend the set is still atomic)."""
        try:
            self.conn.execute(item["text"])
        except psycopg.Error as exc:
            return error_detail(item["tag"], item["statement"], exc)
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
            raise MigrationError(
                "%s ended slipway's transaction (a COMMIT or ROLLBACK slipway could not see in it): what ran before "
                "it, in this transaction, is committed or rolled back by that statement, not by slipway; "
                "remove the transaction control from the migration" % _item_label(item))
        return None

    def _txn_lock_timeout(self):
        return self.online_lock_timeout if self.mode == "online" else self.lock_timeout

    def _retries_left(self, attempts):
        return self.mode == "online" and attempts <= self.lock_retries

    @staticmethod
    def _backoff(attempts):
        time.sleep(min(1.0, 0.05 * attempts) * (0.5 + random.random()))

    def _set_lock_timeout(self, value):
        if value:
            self.conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(str(value))))

    # ---- apply -------------------------------------------------------------------------------
    def _take_lock(self, xact=False):
        fn = "pg_try_advisory_xact_lock" if xact else "pg_try_advisory_lock"
        deadline = time.monotonic() + self.lock_wait
        while True:
            got = self.conn.execute("SELECT %s(%%s, %%s)" % fn, (LOCK_CLASS, self._lock_key)).fetchone()[0]
            if got:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        holder = self.conn.execute(
            "SELECT l.pid, a.application_name, to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ') FROM pg_locks l "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 2 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (LOCK_CLASS, self._lock_key),
        ).fetchone()
        who = " (backend pid %s, %s, connected since %s)" % holder if holder else ""
        raise LockBusy(
            "another migration is running on this database%s: waited %.0fs for its lock; "
            "let it finish and run again" % (who, self.lock_wait)
        )

    def _unlock(self):
        try:
            self.conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, self._lock_key))
        except psycopg.Error:  # the connection is gone: so is the lock
            pass

    def apply(self):
        """Take the lock, plan again under it, refuse on blockers or a failing static preflight,
        then run the program: concurrent builds and transactions, each migration's tracking row
        in the transaction of its last statement. Returns the plan document with
        ``applied_now``; raises MigrationError on any failure, with the plan document as
        ``.plan`` (``committed`` says what was committed before the failure)."""
        total = time.monotonic()
        plan = None
        locked = False
        try:
            start = time.monotonic()
            self._take_lock()
            locked = True
            lock_ms = _ms(start)
            plan = self.plan()
            plan["timings_ms"]["lock_wait"] = lock_ms
            plan["applied_now"] = []
            plan["committed"] = []
            self._static_preflight(plan)
            self._finish_preflight(plan)
            if plan["blockers"]:
                plan["result"] = "blocked"
                raise MigrationRefused(plan)
            if self._to_apply:
                start = time.monotonic()
                self._run(plan)
                plan["timings_ms"]["apply"] = _ms(start)
            # committed (or nothing to do): the database itself has verified every check
            for check in plan["preflight"]["checks"]:
                check["verified"] = True
            plan.update(result="applied" if plan["applied_now"] else "up_to_date", changed=bool(plan["applied_now"]))
            return plan
        except MigrationError as exc:
            if plan is not None:
                plan["changed"] = bool(plan.get("committed"))
                exc.plan = plan
            raise
        except psycopg.Error as exc:
            raise _db_error("apply", exc, committed=(plan or {}).get("committed"))
        finally:
            if locked:
                self._unlock()
            if plan is not None:
                plan["timings_ms"]["total"] = _ms(total)
                _public(plan)

    def _ensure_tracking_table(self):
        ident = tracking_ident(self.schema, self.table)
        self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        self.conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id SERIAL PRIMARY KEY, hash text NOT NULL, created_at bigint)"
        ).format(ident))

    def _run(self, plan):
        prog = self._program
        checks = _checks_by_statement(plan["preflight"]["checks"])
        built = []
        try:
            for build in prog["prebuilds"]:
                self._build(build, plan)
                built.append(build)
            segment = []
            for item in prog["sequence"]:
                if item["type"] == "build":
                    self._commit_segment(segment, plan, checks)
                    segment = []
                    self._build(item, plan, checks)
                else:
                    segment.append(item)
            self._commit_segment(segment, plan, checks)
        except (MigrationError, psycopg.Error) as exc:
            # an index built ahead for a migration that did not commit is not left behind
            self._drop_prebuilt([b for b in built if b["tag"] not in plan["applied_now"]], plan)
            if plan["committed"] and isinstance(exc, MigrationError):
                exc.args = (exc.args[0] + "; committed before the failure: " + "; ".join(plan["committed"]),)
            raise

    def _commit_segment(self, items, plan, checks):
        """Run ``items`` in one transaction (tracking rows included) and commit; a lock not granted
        in time rolls the whole transaction back and tries again (online mode)."""
        if not items:
            return
        ident = tracking_ident(self.schema, self.table)
        attempts = conflicts = 0
        started = time.monotonic()
        while True:
            attempts += 1
            applied, counted, failure, before = [], set(), None, {}
            fenced = contextlib.ExitStack()
            with fenced, self.conn.transaction(force_rollback=False) as tx:
                if self.mode == "online" and any(i.get("writes") for i in items):
                    # rows the migration rewrites (a consolidation) while the app writes them: a
                    # concurrent update is a serialization failure and a retry, never a lost update
                    self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                self._set_lock_timeout(self._txn_lock_timeout())
                if any(i["type"] == "track" for i in items):
                    self._ensure_tracking_table()
                for item in items:
                    if item["type"] == "track":
                        self.conn.execute(sql.SQL("INSERT INTO {} (hash, created_at) VALUES (%s, %s)").format(ident),
                                          (item["hash"], item["when"]))
                        applied.append(item["tag"])
                        continue
                    key = (item["tag"], item["statement"])
                    if key not in counted:
                        counted.add(key)
                        before = self._recount_all(checks.get(key, []))
                    failure = self._run_item(item)
                    if failure:
                        break
                if failure:
                    raise psycopg.Rollback(tx)
                if self.fence is not None:
                    # held through the COMMIT (the transaction block ends first) and the journal line
                    fenced.enter_context(self.fence.hold())
                    fenced.push(self._journal_commit(applied, items))
            if failure is None:
                plan["applied_now"] += applied
                done = [_item_label(i) for i in items if i["type"] == "sql"]
                plan.setdefault("transactions", []).append({
                    "statements": done, "tracking_rows": applied, "attempts": attempts, "ms": _ms(started)})
                if self._program["atomic"]:
                    return
                plan["committed"].append("%s (%d statement%s%s)" % (
                    ", ".join(applied) + " applied" if applied else "part of " + items[0]["tag"],
                    len(done), "s" if len(done) != 1 else "", "" if not applied else ", tracking row%s written" % ("s" if len(applied) > 1 else "")))
                return
            conflicts += failure["sqlstate"] == "40001"
            # a lock not granted is cheap to try again; a serialization failure costs the whole
            # transaction again, and on a table the app keeps writing may never stop recurring
            if failure["sqlstate"] in RETRY_STATES and self._retries_left(attempts) \
                    and conflicts <= self.conflict_retries:
                self._backoff(attempts)
                continue
            if before:
                failure["before_statement"] = before
            plan["result"] = "failed"
            plan["error"] = failure
            if failure["sqlstate"] == "40001" and self.mode == "online":
                failure["message"] += (
                    " (%d tries at REPEATABLE READ, %.0f s: the app kept updating rows these statements rewrite; "
                    "slipway will not rewrite them at READ COMMITTED, where those updates would be lost; run again "
                    "when the table is quieter, or use one transaction as drizzle does and accept that risk)"
                    % (attempts, time.monotonic() - started))
            elif failure["sqlstate"] in RETRY_STATES and self.mode == "online":
                failure["message"] += " (%d tries with lock_timeout %s)" % (attempts, self.online_lock_timeout)
            scope = "everything rolled back, tracking table unchanged" if not plan["committed"] \
                else "this transaction rolled back"
            raise MigrationFailed("migration failed, %s: %s" % (scope, describe_failure(failure)), failure)

    def _journal_commit(self, applied, items):
        """An ExitStack exit callback: journal a transaction that committed (nothing on an error)."""
        def record(exc_type, exc, tb):
            if exc_type is None:
                self.fence.record("migrations", applied=list(applied),
                                  statements=sum(1 for i in items if i["type"] == "sql"))
            return False
        return record

    # ---- concurrent index builds -------------------------------------------------------------
    def _index_state(self, build):
        return _index_named(self.conn, build["index"], build["relation"])

    def _drop_index(self, name):
        self.conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.SQL(name)))

    def _build(self, build, plan, checks=None):
        """CREATE [UNIQUE] INDEX CONCURRENTLY outside any transaction. An index of that name left
        by an interrupted run is adopted when valid and the same, dropped and rebuilt when INVALID.
        A build that fails leaves no INVALID index behind; one that fails on duplicates written
        since the consolidation re-runs this migration's writes to the table and tries again."""
        label = _item_label(build)
        attempts = 0
        notes = plan.setdefault("builds", [])
        while True:
            attempts += 1
            found = self._index_state(build)
            if found is not None:
                name, valid, definition, relkind = found
                if relkind not in ("i", "I"):
                    return self._build_failed(build, plan, "42P07", "relation %s already exists and is not an index" % name)
                if valid and build.get("if_not_exists"):
                    notes.append({"statement": label, "index": name, "result": "kept",
                                  "note": "CREATE INDEX IF NOT EXISTS and a valid index of that name exists"})
                    return None
                if valid and stmts.same_index(definition, build["index_node"]):
                    notes.append({"statement": label, "index": name, "result": "adopted",
                                  "note": "a valid index of that definition already existed (an interrupted earlier run)"})
                    return None
                if valid:
                    return self._build_failed(build, plan, "42P07", "index %s already exists with another definition (%s)"
                                              % (name, definition))
                self._drop_index(name)
                notes.append({"statement": label, "index": name, "result": "dropped INVALID",
                              "note": "an INVALID index of that name was left by an interrupted build"})
            start = time.monotonic()
            try:
                self.conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(str(self.lock_timeout) or "0")))
                self.conn.execute(build["build"])
                notes.append({"statement": label, "index": build["index"], "result": "built",
                              "ms": _ms(start), "attempts": attempts})
                return None
            except psycopg.Error as exc:
                detail = error_detail(build["tag"], build["statement"], exc)
            finally:
                self.conn.execute("RESET lock_timeout")
            left = self._cleanup_invalid(build)
            if left:
                return self._build_failed(build, plan, detail["sqlstate"], detail["message"] + "; " + left, detail,
                                          invalid_left=True)
            retry = attempts <= self.build_retries
            if detail["sqlstate"] == "23505" and retry and build.get("consolidate"):
                notes.append({"statement": label, "index": build["index"], "result": "duplicates written during the build",
                              "note": detail["message"]})
                self._commit_segment([dict(i) for i in build["consolidate"]], plan, checks or {})
                continue
            if detail["sqlstate"] in RETRY_STATES and retry:
                self._backoff(attempts)
                continue
            return self._build_failed(build, plan, detail["sqlstate"], detail["message"], detail)

    def _cleanup_invalid(self, build):
        """Drop the INVALID index a failed build left; None, or what was left and why."""
        try:
            found = self._index_state(build)
            if found is not None and found[1] is False:
                self._drop_index(found[0])
        except psycopg.Error as exc:
            return ("the INVALID index %s it left could not be dropped (%s %s): drop it with DROP INDEX CONCURRENTLY, "
                    "or run again (the next run drops it)" % (build["index"], exc.sqlstate or "-", one_line(str(exc))))
        return None

    def _build_failed(self, build, plan, state, message, detail=None, invalid_left=False):
        detail = dict(detail or {"tag": build["tag"], "statement": build["statement"], "sqlstate": state}, message=message)
        plan["result"] = "failed"
        plan["error"] = detail
        raise MigrationFailed("migration failed building %s concurrently%s: %s"
                              % (build["index"], "" if invalid_left else " (no INVALID index left)",
                                 describe_failure(detail)), detail)

    def _drop_prebuilt(self, built, plan):
        for build in built:
            adopted = any(n["index"] == build["index"] and n["result"] in ("adopted", "kept") for n in plan.get("builds", []))
            try:
                found = self._index_state(build)
                if found is not None and not adopted:
                    self._drop_index(found[0])
                    plan["builds"].append({"statement": _item_label(build), "index": build["index"], "result": "dropped",
                                           "note": "built before the transaction, which failed"})
            except psycopg.Error as exc:  # the next run finds the index (and adopts or drops it)
                plan["builds"].append({"statement": _item_label(build), "index": build["index"], "result": "left",
                                       "note": "built before the transaction, which failed; it could not be dropped "
                                               "(%s %s)" % (exc.sqlstate or "-", one_line(str(exc)))})


REHEARSE_AS_WRITTEN_ROWS = 10000  # below this, a rehearsal builds an index as written instead of counting
RETRY_STATES = ("55P03", "40P01", "40001")  # lock_not_available, deadlock_detected, serialization_failure


def _first_words(text, width=80):
    return one_line(text, width, ellipsis="…")


def _db_error(stage, exc, committed=None):
    """A database error outside the migration statements (reading history, counting duplicates)."""
    done = ("; committed before it: " + "; ".join(committed)) if committed else ", nothing changed"
    return MigrationError("%s failed%s: %s %s; check the role's privileges and the tracking table"
                          % (stage, done, getattr(exc, "sqlstate", None) or "-", one_line(str(exc))))


def _public(plan):
    """Drop internal fields (parsed ops) from the plan document; returns it."""
    for check in (plan.get("preflight") or {}).get("checks", []):
        check.pop("op", None)
        check.pop("written_in_statement", None)
        check.pop("count_later", None)
    return plan


class MigrationRefused(MigrationError):
    """Apply refused before any change: blockers (history, skipped, preflight)."""

    def __init__(self, plan):
        MigrationError.__init__(self, "apply refused, nothing changed: " + plan["blockers"][0]
                                + ("" if len(plan["blockers"]) == 1 else " (+%d more)" % (len(plan["blockers"]) - 1)))
        self.plan = plan
