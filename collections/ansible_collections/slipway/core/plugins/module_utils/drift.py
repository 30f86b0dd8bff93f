# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Schema drift: what the live database lacks or has extra against the schema its *applied*
migrations produce (Atlas's rule: a pending migration is reported as pending, not as drift), which
migration statement makes each object, why it differs, and the fix.

``expected`` and ``actual`` are module_utils/catalog.py reads of a shadow database (the applied
migrations replayed into it) and of the live one; ``compare`` turns them into findings. Each finding:
``kind`` (missing, extra, changed, renamed, invalid, migration), ``object`` ({kind, name, table}),
``expected``/``actual`` (definitions), ``severity`` (critical: breaks the app, e.g. a missing or
INVALID unique index/constraint that an ON CONFLICT target or a foreign key needs; warning; info),
``migration`` ({tag, statement, text} of the statement that makes the object, from pglast over the
files), ``cause`` and ``fix``. Pure: no database access here.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json

from ansible_collections.slipway.core.plugins.module_utils import statements as stmts

try:
    from pglast import ast as pgast
except ImportError:  # the controller's unit tests import this without pglast only for pure helpers
    pgast = None

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}

CAUSES = {
    "pending": "pending: its migration has not been applied yet",
    "skipped": "skipped by drizzle: its migration's journal `when` is older than the newest tracking row, so "
               "drizzle's migrator never runs it",
    "applied_missing": "applied but missing: its migration's tracking row is there, the object is not (dropped out "
                       "of band, or a partial failure of a non-transactional step)",
    "hand_made": "present in no migration: made by hand (a hotfix?)",
    "pending_by_hand": "made by a migration that has no tracking row: applied by hand?",
    "tampered": "tampered file: its migration was edited after it was applied; the database has what the original "
                "file made",
    "altered": "changed out of band: its migration made it otherwise",
    "invalid": "INVALID: a CREATE INDEX CONCURRENTLY that failed or was interrupted left it; it enforces nothing "
               "and ON CONFLICT cannot use it (42P10)",
}


# -------------------------------------------------------------------------------------------- who makes what
def _qual(rangevar_or_names, default_schema="public"):
    """``schema.name`` of a RangeVar or a list of String nodes (a type name)."""
    if hasattr(rangevar_or_names, "relname"):
        return "%s.%s" % (rangevar_or_names.schemaname or default_schema, rangevar_or_names.relname)
    names = [n.sval for n in rangevar_or_names]
    return "%s.%s" % (names[-2] if len(names) > 1 else default_schema, names[-1])


def _made_by(node):
    """The (kind, name) pairs one parsed statement makes: tables, columns, constraints, indexes,
    enums and their labels, sequences, views, functions, triggers, extensions."""
    made = []
    kind = type(node).__name__
    if kind == "CreateStmt":
        table = _qual(node.relation)
        made.append(("table", table))
        for elt in node.tableElts or ():
            if type(elt).__name__ == "ColumnDef":
                made.append(("column", "%s.%s" % (table, elt.colname)))
                for con in elt.constraints or ():
                    if getattr(con, "conname", None):
                        made.append(("constraint", con.conname))
            elif type(elt).__name__ == "Constraint" and elt.conname:
                made.append(("constraint", elt.conname))
    elif kind == "AlterTableStmt":
        table = _qual(node.relation)
        for cmd in node.cmds or ():
            sub = getattr(cmd, "subtype", None)
            name = getattr(sub, "name", str(sub))
            if name == "AT_AddColumn" and cmd.def_ is not None:
                made.append(("column", "%s.%s" % (table, cmd.def_.colname)))
            elif name in ("AT_AddConstraint", "AT_AddIndexConstraint") and getattr(cmd.def_, "conname", None):
                made.append(("constraint", cmd.def_.conname))
    elif kind == "IndexStmt" and node.idxname:
        made.append(("index", node.idxname))
    elif kind == "CreateEnumStmt":
        made.append(("enum", _qual(node.typeName)))
        made += [("enum_label", "%s=%s" % (_qual(node.typeName), v.sval)) for v in node.vals or ()]
    elif kind == "AlterEnumStmt" and node.newVal:
        made.append(("enum_label", "%s=%s" % (_qual(node.typeName), node.newVal)))
    elif kind == "CreateSeqStmt":
        made.append(("sequence", _qual(node.sequence)))
    elif kind == "ViewStmt":
        made.append(("view", _qual(node.view)))
    elif kind == "CreateTableAsStmt" and getattr(node, "objtype", None) is not None and "MATVIEW" in str(node.objtype):
        made.append(("view", _qual(node.into.rel)))
    elif kind == "CreateFunctionStmt":
        made.append(("function", _qual(node.funcname)))
    elif kind == "CreateTrigStmt":
        made.append(("trigger", node.trigname))
    elif kind == "CreateExtensionStmt":
        made.append(("extension", node.extname))
    return made


def makers(migrations):
    """``{(kind, name): {tag, statement, text}}``: the last statement in journal order that makes
    each object, from pglast over each migration's statements (``migrations``: read_folder's)."""
    found = {}
    for mig in migrations:
        for number, chunk in enumerate(mig["statements"], start=1):
            parsed = stmts.split_chunk(chunk)
            for st in parsed["statements"]:
                for made in _made_by(st["node"]):
                    found[made] = {"tag": mig["tag"], "statement": number, "text": _short(st["text"])}
    return found


def _short(text, width=160):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def _maker_key(obj):
    """How ``makers`` names the object ``obj`` (a catalog object)."""
    kind = obj["kind"]
    if kind == "function":
        return ("function", obj["name"].split("(", 1)[0])
    return (kind, obj["name"])


# -------------------------------------------------------------------------------------------- comparing
def _severity(kind, obj, expected_def=None):
    d = expected_def or obj["def"]
    if obj["kind"] == "comment":
        return "info"
    if kind == "invalid":
        return "critical" if d.get("unique") else "warning"
    if kind == "missing":
        if obj["kind"] in ("table", "column", "enum", "enum_label"):
            return "critical"
        if obj["kind"] == "constraint" and d.get("type") in ("primary key", "unique", "exclusion"):
            return "critical"
        if obj["kind"] == "index" and d.get("unique"):
            return "critical"
        return "warning"
    if kind == "changed":
        return "warning"
    if kind == "extra":
        return "warning" if obj["kind"] in ("column", "trigger") else "info"
    return "info"


def _status_cause(maker, status, missing):
    """The cause of a missing (``missing``) or extra object from its maker's migration status."""
    if maker is None:
        return "hand_made" if not missing else "applied_missing"
    state = status.get(maker["tag"])
    if missing:
        return "tampered" if state == "tampered" else "applied_missing"
    if state == "pending":
        return "pending_by_hand"
    if state == "skipped":
        return "pending_by_hand"
    return "hand_made" if state is None else "altered"


def _fix(kind, obj, expected_def, maker, cause):
    d = expected_def or obj["def"]
    if kind == "invalid":
        return ("DROP INDEX CONCURRENTLY %s; then build it again: %s (CONCURRENTLY; count duplicates first)" % (
            obj["name"], d.get("definition")))
    if kind == "missing":
        if obj["kind"] == "constraint" and d.get("type") in ("unique", "primary key"):
            return ("CREATE UNIQUE INDEX CONCURRENTLY %s ON %s (%s); ALTER TABLE %s ADD CONSTRAINT %s %s USING INDEX %s "
                    "(after removing duplicate rows)" % (
                        obj["name"], obj["table"], ", ".join(d.get("columns") or []), obj["table"], obj["name"],
                        d["type"].upper(), obj["name"]))
        if obj["kind"] == "index":
            return "%s (CONCURRENTLY on a big table)" % d.get("definition", "").replace(" INDEX ON ", " INDEX %s ON " % obj["name"], 1)
        if obj["kind"] == "constraint":
            return "ALTER TABLE %s ADD CONSTRAINT %s %s" % (obj["table"], obj["name"], d.get("definition"))
        if maker:
            return "run statement %d of %s again: %s" % (maker["statement"], maker["tag"], maker["text"])
        return "make it again as the migrations define it"
    if kind == "extra":
        if cause == "pending_by_hand":
            return "record the migration that made it (invoke migrate --baseline) or drop it by hand; slipway never drops"
        return "add it to a migration (drizzle-kit generate) or drop it by hand after review; slipway never drops"
    if kind == "changed":
        return "review: a migration that makes it as the database has it, or change it back by hand"
    if kind == "renamed":
        return "ALTER ... RENAME to the migrations' name, or rename it in the schema and generate a migration"
    return ""


def _fingerprint(finding):
    raw = json.dumps([finding["kind"], finding["object"]["kind"], finding["object"]["name"],
                      finding["object"].get("table"), finding.get("severity")], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _finding(kind, obj, expected, actual, maker, status, cause=None):
    cause = cause or (_status_cause(maker, status, kind == "missing") if kind in ("missing", "extra") else
                      "invalid" if kind == "invalid" else "altered" if kind == "changed" else "hand_made")
    found = {
        "kind": kind,
        "object": {"kind": obj["kind"], "name": obj["name"], "table": obj.get("table")},
        "expected": expected,
        "actual": actual,
        "severity": _severity(kind, obj, expected),
        "migration": maker,
        "cause": cause,
        "why": CAUSES.get(cause, cause),
        "fix": _fix(kind, obj, expected, maker, cause),
    }
    found["fingerprint"] = _fingerprint(found)
    return found


def _by_name(objects):
    """Constraints, indexes and triggers are keyed by definition; also index them by (kind, table, name)."""
    return {(o["kind"], o.get("table"), o["name"]): o for o in objects.values()}


def _unique(exp):
    d = exp["def"]
    return (exp["kind"] == "constraint" and d.get("type") in ("unique", "primary key")) or \
        (exp["kind"] == "index" and bool(d.get("unique")))


def _stand_in(found, exp, actual):
    """A critical finding about a unique constraint/index becomes a warning when a valid unique
    index or constraint on the same columns serves ON CONFLICT in its place (named in ``why``)."""
    name = _unique_stand_in(exp, actual)
    if name and name != exp["name"]:
        found["severity"] = "warning"
        found["why"] += "; the valid unique index %s on the same columns still serves ON CONFLICT and foreign keys" % name


def _unique_stand_in(exp, actual):
    """The name of a valid, whole-table unique index or constraint of ``actual`` on exactly the
    columns of the missing unique constraint/index ``exp`` (it serves ON CONFLICT in its place), or None."""
    d = exp["def"]
    if not (exp["kind"] == "constraint" and d.get("type") in ("unique", "primary key")) and \
            not (exp["kind"] == "index" and d.get("unique")):
        return None
    for obj in actual.values():
        od = obj["def"]
        if obj.get("table") != exp.get("table") or not od.get("valid", True) or od.get("partial_or_expression"):
            continue
        unique = (obj["kind"] == "index" and od.get("unique")) or \
            (obj["kind"] == "constraint" and od.get("type") in ("unique", "primary key"))
        if unique and sorted(od.get("columns") or []) == sorted(d.get("columns") or []):
            return obj["name"]
    return None


def compare(expected, actual, migrations=(), status=None):
    """Findings for ``actual`` (the live schema) against ``expected`` (the applied migrations'),
    most severe first. ``migrations``: read_folder's list (to name the statement that makes each
    object); ``status``: {tag: applied|pending|skipped|tampered} (to name the cause)."""
    status = status or {}
    made = makers(migrations) if migrations else {}
    findings = []
    actual_named = _by_name(actual)
    expected_named = _by_name(expected)

    for key, exp in expected.items():
        maker = made.get(_maker_key(exp))
        act = actual.get(key)
        if act is None:
            same_name = actual_named.get((exp["kind"], exp.get("table"), exp["name"]))
            if exp["kind"] in ("constraint", "index", "trigger") and same_name is not None:
                found = _finding("changed", exp, exp["def"], same_name["def"], maker, status)
                if _unique(exp):  # what ON CONFLICT and foreign keys need is gone under the old name
                    found["severity"] = "critical"
                    _stand_in(found, exp, actual)
                findings.append(found)
                continue
            found = _finding("missing", exp, exp["def"], None, maker, status)
            if found["severity"] == "critical":
                _stand_in(found, exp, actual)
            findings.append(found)
            continue
        if exp["kind"] in ("constraint", "index", "trigger") and act["name"] != exp["name"]:
            findings.append(_finding("renamed", exp, {"name": exp["name"]}, {"name": act["name"]}, maker, status,
                                     cause="altered"))
        if exp["def"].get("valid", True) and not act["def"].get("valid", True):
            findings.append(_finding("invalid", act, exp["def"], act["def"], maker, status))
            continue
        if exp["kind"] == "enum":
            have = set(act["def"]["labels"])
            common = [label for label in act["def"]["labels"] if label in set(exp["def"]["labels"])]
            if common != [label for label in exp["def"]["labels"] if label in have]:
                findings.append(_finding("changed", exp, {"labels": exp["def"]["labels"]}, {"labels": act["def"]["labels"]},
                                         maker, status))  # the order: ORDER BY and < on the enum differ
            for label in exp["def"]["labels"]:
                if label not in have:
                    obj = {"kind": "enum_label", "name": "%s=%s" % (exp["name"], label), "table": None}
                    findings.append(_finding("missing", obj, {"labels": exp["def"]["labels"]},
                                             {"labels": act["def"]["labels"]}, made.get(("enum_label", obj["name"])),
                                             status))
            extra = [label for label in act["def"]["labels"] if label not in set(exp["def"]["labels"])]
            if extra:
                findings.append(_finding("extra", {"kind": "enum_label", "name": "%s=%s" % (exp["name"], ",".join(extra)),
                                                   "table": None},
                                         {"labels": exp["def"]["labels"]}, {"labels": act["def"]["labels"]}, None, status))
            continue
        if exp["def"] != act["def"] and exp["kind"] not in ("constraint", "index", "trigger"):
            findings.append(_finding("changed", exp, exp["def"], act["def"], maker, status))

    for key, act in actual.items():
        if key in expected:
            continue
        if act["kind"] in ("constraint", "index", "trigger") and not act.get("duplicate_of") and \
                (act["kind"], act.get("table"), act["name"]) in expected_named:
            continue  # reported as changed above
        if act["kind"] == "column" and "table:%s" % act["table"] not in expected:
            continue  # its table is reported
        if act["kind"] in ("constraint", "index", "trigger") and "table:%s" % act["table"] not in expected:
            continue
        found = _finding("extra", act, None, act["def"], made.get(_maker_key(act)), status)
        if act.get("duplicate_of"):
            found["why"] = "a second %s of the same definition as %s (a leftover of REINDEX CONCURRENTLY, or made by " \
                           "hand): it costs every write and serves nothing more" % (act["kind"], act["duplicate_of"])
        findings.append(found)
        if not act["def"].get("valid", True):
            found = _finding("invalid", act, None, act["def"], made.get(_maker_key(act)), status)
            if act.get("duplicate_of"):  # its valid twin serves ON CONFLICT
                found["severity"] = "warning"
                found["why"] += "; the valid %s of the same definition serves in its place" % act["duplicate_of"]
            findings.append(found)

    for found in findings:  # severities settled: each finding's fingerprint names its severity too
        found["fingerprint"] = _fingerprint(found)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f["severity"]], f["object"]["kind"], f["object"]["name"]))
    return findings


def migration_findings(classified):
    """Findings for the migration history itself (drift.compare covers only what was applied):
    pending (warning), skipped by drizzle (critical: it never runs), tampered (warning)."""
    out = []
    for mig in classified["migrations"]:
        if mig["status"] == "applied":
            continue
        severity = {"pending": "warning", "skipped": "critical", "tampered": "warning"}[mig["status"]]
        fix = {"pending": "invoke deploy (or invoke migrate) applies it",
               "skipped": "invoke deploy with slipway_migrate_include_skipped: true applies it (drizzle never will)",
               "tampered": "restore the file as it was applied (its hash is in the tracking table), or accept it "
                           "with slipway_migrate_allow_tampered"}[mig["status"]]
        found = {"kind": "migration", "object": {"kind": "migration", "name": mig["tag"], "table": None},
                 "expected": "applied", "actual": mig["status"], "severity": severity,
                 "migration": {"tag": mig["tag"], "statement": None, "text": None},
                 "cause": mig["status"], "why": CAUSES.get(mig["status"], mig["status"]), "fix": fix}
        found["fingerprint"] = _fingerprint(found)
        out.append(found)
    for row in classified.get("unknown_rows") or []:
        found = {"kind": "migration", "object": {"kind": "tracking row", "name": "row %s" % row["id"], "table": None},
                 "expected": None, "actual": {"hash": row["hash"], "created_at": row["created_at"]},
                 "severity": "warning", "migration": None, "cause": "unknown_row",
                 "why": "a tracking row that matches no migration file here: a newer release applied it and "
                        "current was rolled back (its objects show as extra), or a file was removed",
                 "fix": "deploy the release that has it again, or review the row"}
        found["fingerprint"] = _fingerprint(found)
        out.append(found)
    return out


def exit_code(findings):
    """The monitoring-plugin convention: 0 none, 1 a warning, 2 a critical finding."""
    severities = set(f["severity"] for f in findings)
    return 2 if "critical" in severities else 1 if "warning" in severities else 0
