# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""`invoke drift --fix`: which drift findings can be put right safely, online, and how.

Safe, and done: an index or a UNIQUE/PRIMARY KEY constraint that an applied migration makes and
the live database lacks, or has INVALID - rebuilt without blocking writes (``CREATE [UNIQUE] INDEX
CONCURRENTLY``; a constraint then ``ADD CONSTRAINT ... USING INDEX``, a catalog change), a unique
one only after counting duplicate keys (any duplicate: not fixed, the count said); an INVALID
leftover of the same name dropped first (``DROP INDEX CONCURRENTLY``). Never done: anything that
drops or rewrites (an extra object, a changed type or default), a missing table or column, a
foreign key or CHECK (they can fail on existing rows), and pending or skipped migrations, which go
through ``invoke deploy`` (backup first, the deploy lock held). Each of those is reported with why.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

_UNIQUE_TYPES = ("unique", "primary key")


def _q(name):
    return '"%s"' % name.replace('"', '""')


def _qual(name):
    return ".".join(_q(part) for part in name.split(".", 1))


def plan(findings):
    """``(fixes, refused)``: fixes ``[{fingerprint, steps: [{sql, concurrently, check}], what}]``
    and refused ``[{fingerprint, why}]`` for ``findings`` (module_utils/drift.py's)."""
    fixes, refused = [], []
    handled = set()
    for f in findings:
        obj = f["object"]
        key = (obj["kind"], obj["name"])
        if key in handled:
            continue
        exp = f.get("expected") or {}
        if f["kind"] == "invalid" and any(x["kind"] == "missing" and x["object"]["name"] == obj["name"] for x in findings):
            continue  # the missing object's fix drops this leftover and builds it again
        if f["kind"] == "invalid" and not exp.get("definition"):
            refused.append({"fingerprint": f["fingerprint"], "why": "an INVALID index no migration makes: dropping it is "
                            "a human's call (DROP INDEX CONCURRENTLY)"})
            continue
        if f["kind"] in ("missing", "invalid") and f.get("cause") != "tampered" and obj["kind"] in ("index", "constraint"):
            unique = exp.get("unique") or exp.get("type") in _UNIQUE_TYPES
            if obj["kind"] == "constraint" and exp.get("type") not in _UNIQUE_TYPES:
                refused.append({"fingerprint": f["fingerprint"], "why": "a %s constraint can fail on the rows already there; "
                                "add it by hand (NOT VALID, then VALIDATE)" % exp.get("type")})
                continue
            steps = []
            # an INVALID index of the name the fix builds (a failed CONCURRENTLY): dropped first
            invalid = [x for x in findings if x["kind"] == "invalid" and x["object"]["name"] == obj["name"]]
            if invalid:
                steps.append({"sql": "DROP INDEX CONCURRENTLY IF EXISTS %s" % _q_index(invalid[0]), "concurrently": True})
            if unique and exp.get("columns"):
                steps.append({"check": {"table": obj["table"], "columns": exp["columns"]}})
            if obj["kind"] == "index":
                definition = exp.get("definition") or ""
                head = re.match(r"^CREATE (UNIQUE )?INDEX ON ", definition)
                sql = ("CREATE %sINDEX CONCURRENTLY %s ON " % (head.group(1) or "", _q(obj["name"]))
                       + definition[head.end():]) if head else definition
                if sql == definition:
                    refused.append({"fingerprint": f["fingerprint"], "why": "its definition could not be read back"})
                    continue
                steps.append({"sql": sql, "concurrently": True})
            else:
                cols = ", ".join(_q(c) for c in exp.get("columns") or [])
                steps.append({"sql": "CREATE UNIQUE INDEX CONCURRENTLY %s ON %s (%s)" % (_q(obj["name"]), _qual(obj["table"]), cols),
                              "concurrently": True})
                steps.append({"sql": "ALTER TABLE %s ADD CONSTRAINT %s %s USING INDEX %s" % (
                    _qual(obj["table"]), _q(obj["name"]), exp["type"].upper(), _q(obj["name"])), "concurrently": False})
            handled.add(key)
            fixes.append({"fingerprint": f["fingerprint"], "what": "%s %s on %s" % (obj["kind"], obj["name"], obj["table"]),
                          "steps": steps})
            continue
        if f["kind"] == "migration":
            why = {"pending": "a pending migration goes through `invoke deploy` (backup first, the deploy lock held)",
                   "skipped": "a skipped migration goes through `invoke deploy` with slipway_migrate_include_skipped",
                   "tampered": "a tampered file is for a human: restore it or accept it"}.get(f["actual"], "not fixed")
        elif f["kind"] == "extra":
            why = "slipway never drops: review it, then add it to a migration or drop it by hand"
        elif f["kind"] == "missing" and obj["kind"] in ("table", "column"):
            why = "a missing %s is made by its migration's statement, which may depend on data; run it by hand" % obj["kind"]
        else:
            why = "not a change slipway makes online (%s %s)" % (f["kind"], obj["kind"])
        refused.append({"fingerprint": f["fingerprint"], "why": why})
    return fixes, refused


def _q_index(finding):
    obj = finding["object"]
    schema = (obj.get("table") or "public.x").split(".", 1)[0]
    return "%s.%s" % (_q(schema), _q(obj["name"]))


def duplicates(conn, table, columns):
    """How many key groups of ``columns`` in ``table`` (``schema.name``) hold more than one row."""
    from psycopg import sql

    schema, name = table.split(".", 1)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE {} GROUP BY {} HAVING count(*) > 1) d").format(
        sql.Identifier(schema, name),
        sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in columns), cols)
    return conn.execute(query).fetchone()[0]


def apply(conn, fixes, lock_timeout="5s"):
    """Run ``fixes`` on ``conn`` (autocommit: CONCURRENTLY needs it), one at a time; a fix whose
    duplicate count is not 0, or whose statement fails, stops there (what it built before is
    dropped again) and the rest go on. Returns ``[{fingerprint, what, done, why, ran}]``."""
    import psycopg

    out = []
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (lock_timeout,))
    for fix in fixes:
        ran, why = [], None
        for step in fix["steps"]:
            if "check" in step:
                n = duplicates(conn, step["check"]["table"], step["check"]["columns"])
                if n:
                    why = "%d duplicate key group(s) in %s (%s): remove them, then fix again" % (
                        n, step["check"]["table"], ", ".join(step["check"]["columns"]))
                    break
                continue
            try:
                conn.execute(step["sql"])
                ran.append(step["sql"])
            except psycopg.Error as exc:
                why = "%s: %s" % (step["sql"].split(" ON ")[0], str(exc).strip().splitlines()[0])
                for done in reversed(ran):  # an index this fix built, without its constraint: gone again
                    m = re.match(r"^CREATE (?:UNIQUE )?INDEX CONCURRENTLY (\"(?:[^\"]|\"\")+\") ON ", done)
                    if m:
                        try:
                            conn.execute("DROP INDEX CONCURRENTLY IF EXISTS %s" % m.group(1))
                        except psycopg.Error:
                            pass
                break
        out.append({"fingerprint": fix["fingerprint"], "what": fix["what"], "done": why is None, "why": why, "ran": ran})
    return out
