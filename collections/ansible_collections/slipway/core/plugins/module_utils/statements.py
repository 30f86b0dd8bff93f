# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""One drizzle chunk (the text between two breakpoint markers) seen statement by statement.

Pure pglast, no database: which SQL statements a chunk holds, its own transaction control
(``BEGIN;`` / ``COMMIT;``), the tables each statement references, and the lock-safe form of the
statements that build an index on a table that already exists:

* ``CREATE [UNIQUE] INDEX name ON t (...)`` -> ``CREATE [UNIQUE] INDEX CONCURRENTLY name ON t (...)``
* ``ALTER TABLE t ADD CONSTRAINT c UNIQUE (cols)`` -> ``CREATE UNIQUE INDEX CONCURRENTLY c ON t (cols)``
  then ``ALTER TABLE t ADD CONSTRAINT c UNIQUE USING INDEX c`` (a catalog change only).

The end state of both forms is the statement's own: same index, same constraint, same names.
"""
from __future__ import absolute_import, annotations, division, print_function

__metaclass__ = type

from ansible_collections.slipway.core.plugins.module_utils.oneline import one_line

try:
    import pglast
    from pglast import ast as pgast
    from pglast import enums as pgenums
    from pglast.stream import RawStream

    HAS_PGLAST = True
except ImportError:  # pragma: no cover - migrate.py reports it
    HAS_PGLAST = False

# transaction control a drizzle file may carry; slipway's own transaction stands in for them
TXN_DROPPED = ("BEGIN", "START TRANSACTION", "COMMIT", "END")
# transaction control that would undo or end slipway's transaction in a way nothing can stand in for
TXN_REFUSED = ("ROLLBACK", "PREPARE TRANSACTION", "COMMIT PREPARED", "ROLLBACK PREPARED")


def _txn_word(stmt):
    kind = stmt.kind
    k = pgenums.TransactionStmtKind
    return {
        k.TRANS_STMT_BEGIN: "BEGIN", k.TRANS_STMT_START: "START TRANSACTION", k.TRANS_STMT_COMMIT: "COMMIT",
        k.TRANS_STMT_ROLLBACK: "ROLLBACK", k.TRANS_STMT_PREPARE: "PREPARE TRANSACTION",
        k.TRANS_STMT_COMMIT_PREPARED: "COMMIT PREPARED", k.TRANS_STMT_ROLLBACK_PREPARED: "ROLLBACK PREPARED",
    }.get(kind)


def deparse(node):
    return RawStream()(node)


def table_of(rangevar):
    return {"schema": rangevar.schemaname, "name": rangevar.relname}


def same_table(a, b):
    return a["name"] == b["name"] and (a["schema"] is None or b["schema"] is None or a["schema"] == b["schema"])


def references(node):
    """Every table a statement names (RangeVar nodes anywhere in its tree)."""
    found = []

    def walk(value):
        if isinstance(value, pgast.RangeVar):
            found.append(table_of(value))
        if isinstance(value, pgast.Node):
            for name in value:  # pglast nodes iterate over their attribute names
                walk(getattr(value, name))
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(node)
    return found


# statements whose effect stays on the tables they name; any other kind (DROP, RENAME, CREATE
# EXTENSION/FUNCTION/TYPE, DO, CALL, ...) may change what any name means or can do
_TABLE_LOCAL = {"CreateStmt", "AlterTableStmt", "IndexStmt", "UpdateStmt", "DeleteStmt", "InsertStmt",
                "SelectStmt", "CreatePolicyStmt", "CommentStmt", "GrantStmt", "VariableSetStmt",
                "CreateSeqStmt", "AlterSeqStmt", "ViewStmt"}
REWRITES_ROWS = ("UpdateStmt", "DeleteStmt")  # re-runnable consolidations: a second run finds nothing left


def scope(node):
    """The tables a statement can affect, or None when it may affect anything."""
    if type(node).__name__ not in _TABLE_LOCAL:
        return None
    return references(node)


def writes_rows(node):
    """True, False, or None (cannot tell: a DO block, a CALL, a data-modifying WITH)."""
    kind = type(node).__name__
    if kind in ("UpdateStmt", "DeleteStmt", "InsertStmt", "MergeStmt"):
        return True
    if kind in ("DoStmt", "CallStmt"):
        return None
    if kind == "SelectStmt" and node.withClause is not None:
        for cte in node.withClause.ctes or ():
            if type(cte.ctequery).__name__ in ("UpdateStmt", "DeleteStmt", "InsertStmt", "MergeStmt"):
                return None
    return False


def split_chunk(text):
    """``{"parsed", "error", "statements": [{"text", "node", "txn"}]}``: the chunk's statements in
    order; ``txn`` is the transaction-control word of a BEGIN/COMMIT/... statement, else None."""
    try:
        raws = pglast.parse_sql(text) or ()
        texts = pglast.split(text, with_parser=True) if raws else ()
    except pglast.parser.ParseError as exc:
        return {"parsed": False, "error": one_line(str(exc)), "statements": []}
    out = []
    for raw, piece in zip(raws, texts):
        word = _txn_word(raw.stmt) if isinstance(raw.stmt, pgast.TransactionStmt) else None
        out.append({"text": _without_leading_comments(piece), "node": raw.stmt, "txn": word})
    return {"parsed": True, "error": None, "statements": out}


def _without_leading_comments(piece):
    """A statement's text from its first token: pglast 8 (PostgreSQL 18's parser) splits a chunk
    that way, pglast 7 (the runtime on Python 3.9) keeps the comments before each statement."""
    while True:
        stripped = piece.lstrip()
        if stripped.startswith("--"):
            newline = stripped.find("\n")
            piece = "" if newline < 0 else stripped[newline + 1:]
        elif stripped.startswith("/*"):
            end = _block_comment_end(stripped)
            if end < 0:
                return stripped
            piece = stripped[end:]
        else:
            return stripped


def _block_comment_end(text):
    """The index after the ``/* ... */`` comment ``text`` starts with (they nest in PostgreSQL), or -1."""
    depth, i = 0, 0
    while i < len(text) - 1:
        pair = text[i:i + 2]
        if pair == "/*":
            depth, i = depth + 1, i + 2
        elif pair == "*/":
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def index_build(node):
    """The lock-safe form of a statement that builds an index, or None when it has none (or needs
    none): ``{"kind": "index"|"unique_constraint", "table", "index", "unique", "build", "attach",
    "index_node"}``. ``build`` runs outside a transaction (CONCURRENTLY); ``attach`` (constraints
    only) runs in one."""
    if isinstance(node, pgast.IndexStmt):
        if node.concurrent or not node.idxname or node.relation is None:
            return None  # CONCURRENTLY already (refused elsewhere) / an unnamed index cannot be found again
        if getattr(node.relation, "inh", True) is False:
            return None  # ON ONLY parent: a partitioned-table stub, cannot be built concurrently
        built = _copy(node)
        built.concurrent = True
        built.if_not_exists = False  # an existing index is looked at first (IF NOT EXISTS: kept, as drizzle keeps it)
        return {"kind": "index", "table": table_of(node.relation), "index": node.idxname, "unique": bool(node.unique),
                "build": deparse(built), "attach": None, "index_node": built, "if_not_exists": bool(node.if_not_exists)}
    if isinstance(node, pgast.AlterTableStmt) and node.relation is not None and len(node.cmds or ()) == 1:
        cmd = node.cmds[0]
        con = cmd.def_
        if cmd.subtype != pgenums.AlterTableType.AT_AddConstraint or not isinstance(con, pgast.Constraint):
            return None
        if con.contype != pgenums.ConstrType.CONSTR_UNIQUE or not con.conname or not con.keys or con.indexname:
            return None
        if con.deferrable or con.initdeferred or con.including or con.options or con.indexspace:
            return None
        if getattr(node.relation, "inh", True) is False:
            return None
        idx = pgast.IndexStmt(
            idxname=con.conname, relation=node.relation, accessMethod="btree", unique=True, concurrent=True,
            nulls_not_distinct=bool(con.nulls_not_distinct),
            indexParams=[pgast.IndexElem(name=k.sval, ordering=pgenums.SortByDir.SORTBY_DEFAULT,
                                         nulls_ordering=pgenums.SortByNulls.SORTBY_NULLS_DEFAULT) for k in con.keys],
        )
        attach = "ALTER TABLE %s ADD CONSTRAINT %s UNIQUE USING INDEX %s" % (
            deparse(node.relation), _quote(con.conname), _quote(con.conname))
        return {"kind": "unique_constraint", "table": table_of(node.relation), "index": con.conname, "unique": True,
                "build": deparse(idx), "attach": attach, "index_node": idx}
    return None


def same_index(existing_def, node):
    """Whether ``pg_get_indexdef`` text describes the index ``node`` builds (name, schema, operator
    classes and CONCURRENTLY aside)."""
    try:
        other = pglast.parse_sql(existing_def)[0].stmt
    except (pglast.parser.ParseError, IndexError):
        return False
    if not isinstance(other, pgast.IndexStmt):
        return False
    return _index_shape(other) == _index_shape(node)


def _index_shape(node):
    params = []
    for elem in node.indexParams or ():
        params.append((elem.name, deparse(elem.expr) if elem.expr is not None else None,
                       int(elem.ordering or 0), int(elem.nulls_ordering or 0)))
    return (
        bool(node.unique), (node.accessMethod or "btree").lower(), tuple(params),
        deparse(node.whereClause) if node.whereClause is not None else None,
        bool(getattr(node, "nulls_not_distinct", False)),
        tuple(deparse(p) for p in node.indexIncludingParams or ()),
    )


def retarget_index(definition, schema, table):
    """``pg_get_indexdef`` text rewritten to build the same (unnamed) index on ``schema.table``."""
    node = pglast.parse_sql(definition)[0].stmt
    node.idxname = None
    node.relation = pgast.RangeVar(schemaname=schema, relname=table, inh=True, relpersistence="p")
    return deparse(node)


def _copy(node):
    return pglast.parse_sql(deparse(node))[0].stmt


def _quote(name):
    return "\"%s\"" % name.replace("\"", "\"\"")
