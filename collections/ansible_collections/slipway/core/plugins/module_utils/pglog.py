# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""PostgreSQL's server log read back into records, for `invoke diagnose` (module app_state).

Three formats, told apart by the file's lines: ``stderr`` (the default; each line starts with
``log_line_prefix``), ``jsonlog`` (PostgreSQL 15+) and ``csvlog``. For stderr the prefix is turned
into a regular expression: its ``%e`` gives each line's SQLSTATE, ``%m``/``%t``/``%n`` its time,
``%p`` its process (which ties an ERROR to its DETAIL, HINT and STATEMENT lines). Without ``%e``
the SQLSTATE is inferred from the (English) message text and the report says so; without a time
escape ``since`` cannot be applied and the last lines are read instead.

Everything returned is redacted here, on the host: literal constants in logged statements become
``$n`` (pglast's scanner), bind parameters and the key values and rows that DETAIL lines show are
dropped, and known secrets are masked (module_utils/redact.py).
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import calendar
import csv
import io
import os
import re
import time

from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text, scrub_user_data

READ_BYTES = 8 * 1024 * 1024  # the tail of the log read at most
KEEP = 400  # records returned at most (the newest)
LEVELS = ("ERROR", "FATAL", "PANIC")
ATTACHED = ("DETAIL", "HINT", "CONTEXT", "STATEMENT", "QUERY", "LOCATION")

_ESCAPES = {
    # bounded classes, not .*?: a long line that has the prefix but no level must fail fast
    "a": r"(?P<app>[^\[\]\n]{0,64}?)", "u": r"(?P<user>[^\s@,:\[\]]*?)", "d": r"(?P<db>[^\s@,:\[\]]*?)",
    "r": r"[^\s,\]]*?", "h": r"[^\s,:\]]*?", "b": r"[^\[\]\n]{0,64}?", "p": r"(?P<pid>\d+)", "P": r"\d*", "t": r"(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?: [A-Za-z0-9+:-]+)?)",
    "m": r"(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+(?: [A-Za-z0-9+:-]+)?)", "n": r"(?P<epoch>\d+(?:\.\d+)?)",
    "i": r"[A-Za-z ]{0,40}?", "e": r"(?P<sqlstate>[0-9A-Z]{5})", "c": r"[0-9a-f]+\.[0-9a-f]+", "l": r"\d+",
    "s": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?: [A-Za-z0-9+:-]+)?", "v": r"\S*", "x": r"\d+", "Q": r"-?\d+",
}
_LEVEL = r"(?P<level>DEBUG\d?|INFO|NOTICE|WARNING|ERROR|LOG|FATAL|PANIC|DETAIL|HINT|QUERY|CONTEXT|STATEMENT|LOCATION):  (?P<text>.*)$"

# SQLSTATEs by message text (PostgreSQL's English messages), for a log_line_prefix without %e.
_BY_TEXT = (
    ("42P10", r"there is no unique or exclusion constraint matching the ON CONFLICT specification"),
    ("42P01", r'^relation ".*" does not exist'),
    ("42703", r'^column ".*" (?:of relation ".*" )?does not exist'),
    ("42704", r'^(?:type|constraint|index|schema|extension) ".*" does not exist|^constraint ".*" for table ".*" does not exist'),
    ("42883", r"^(?:function|operator|procedure) .* does not exist"),
    ("22P02", r"^invalid input (?:value for enum|syntax for)"),
    ("23505", r"^duplicate key value violates unique constraint"),
    ("23502", r'^null value in column ".*" (?:of relation ".*" )?violates not-null constraint'),
    ("23503", r"violates foreign key constraint"),
    ("55P03", r"^canceling statement due to lock timeout|^could not obtain lock"),
    ("57014", r"^canceling statement due to (?:statement timeout|user request)"),
    ("28P01", r"^password authentication failed for user"),
    ("28000", r"^no pg_hba\.conf entry|^role \".*\" does not exist"),
    ("3D000", r'^database ".*" does not exist'),
    ("53300", r"^(?:sorry, too many clients|remaining connection slots)"),
    ("40P01", r"^deadlock detected"),
)


class LogSettings(object):
    """How to read one log: its format, and for stderr the compiled prefix."""

    def __init__(self, prefix):
        self.prefix = prefix or ""
        self.has_sqlstate = "%e" in self.prefix
        self.has_time = any(e in self.prefix for e in ("%m", "%t", "%n"))
        self.has_pid = "%p" in self.prefix
        self.line = re.compile("^" + prefix_regex(self.prefix) + _LEVEL)


def prefix_regex(prefix):
    """A regular expression for the lines ``log_line_prefix`` starts (``%q``: what follows it is
    present only in session lines)."""
    out, i, seen, optional = [], 0, set(), False
    while i < len(prefix):
        ch = prefix[i]
        if ch != "%" or i + 1 >= len(prefix):
            out.append(re.escape(ch))
            i += 1
            continue
        m = re.match(r"%(-?\d+)?([a-zA-Z%])", prefix[i:])
        if not m:
            out.append(re.escape(ch))
            i += 1
            continue
        esc = m.group(2)
        i += len(m.group(0))
        if esc == "%":
            out.append("%")
        elif esc == "q":
            out.append("(?:")
            optional = True
        else:
            pattern = _ESCAPES.get(esc, r"[^\s\]]*?")
            for name in re.findall(r"\?P<(\w+)>", pattern):  # a group named twice: the second one unnamed
                if name in seen:
                    pattern = pattern.replace("?P<%s>" % name, "?:")
                seen.add(name)
            out.append((r"\s*" + pattern + r"\s*") if m.group(1) else pattern)
    if optional:
        out.append(")?")
    return "".join(out)


def infer_sqlstate(message):
    for code, pattern in _BY_TEXT:
        if re.search(pattern, message or ""):
            return code
    return None


def parse_time(text):
    """Epoch seconds of a log timestamp (``2026-12-06 00:50:01.123 UTC``, ``... +03``, or a zone
    name of this host's local time), None when unreadable."""
    if not text or not isinstance(text, str):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(\.\d+)?(?:\s*([A-Za-z0-9+:-]+))?$", text.strip())
    if not m:
        return None
    try:
        parts = time.strptime(m.group(1).replace("T", " "), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    frac = float(m.group(2) or 0)
    zone = m.group(3) or ""
    if zone in ("UTC", "GMT", "Z", "+00", "+00:00", "-00"):
        return calendar.timegm(parts) + frac
    off = re.match(r"^([+-])(\d\d):?(\d\d)?$", zone)
    if off:
        seconds = int(off.group(2)) * 3600 + int(off.group(3) or 0) * 60
        return calendar.timegm(parts) + frac - (seconds if off.group(1) == "+" else -seconds)
    return time.mktime(parts) + frac  # the host's local zone name


def tail_lines(path, max_bytes=READ_BYTES):
    """The last ``max_bytes`` of ``path`` as lines (a partial first line dropped)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        start = max(0, size - max_bytes)
        handle.seek(start)
        data = handle.read()
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    if start > 0 and lines:
        lines = lines[1:]
    return [ln for ln in lines if ln != ""]


def detect_format(lines):
    for line in lines[:20]:
        if line.startswith("{") and '"error_severity"' in line:
            return "jsonlog"
        if re.match(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ [A-Za-z0-9+:-]+,', line):
            return "csvlog"
    return "stderr"


def _records_stderr(lines, settings, counts=None):
    records, last = [], None
    open_by_pid = {}
    for line in lines:
        m = settings.line.match(line)
        if m and counts is not None:
            counts["matched"] += 1
        if not m:
            if last is not None:  # a statement or message continued on the next line
                field = last.get("_field", "message")
                last[field] = (last.get(field) or "") + "\n" + line
            continue
        fields = m.groupdict()
        level, text = fields["level"], fields["text"]
        pid = fields.get("pid")
        if level in ATTACHED:
            owner = open_by_pid.get(pid) if settings.has_pid else last
            last = owner  # None: this line and what continues it belong to no record read, and are dropped
            if owner is not None:
                key = level.lower()
                owner[key] = text if not owner.get(key) else owner[key] + "\n" + text
                owner["_field"] = key
            continue
        rec = {"level": level, "message": text, "sqlstate": fields.get("sqlstate"), "pid": pid,
               "user": fields.get("user"), "db": fields.get("db"), "app": fields.get("app"), "_field": "message",
               "epoch": float(fields["epoch"]) if fields.get("epoch") else parse_time(fields.get("ts")),
               "time": fields.get("ts") or fields.get("epoch")}
        records.append(rec)
        open_by_pid[pid] = rec
        last = rec
    return records


def _records_json(lines):
    from ansible_collections.slipway.core.plugins.module_utils.hoststate import json_objects

    records = []
    for raw in json_objects(lines):
        item = {k: (v if v is None or isinstance(v, str) else str(v)) for k, v in raw.items()}  # odd types: text
        records.append({"level": item.get("error_severity"), "message": item.get("message"),
                        "sqlstate": item.get("state_code"), "pid": str(item.get("pid") or ""),
                        "user": item.get("user"), "db": item.get("dbname"), "app": item.get("application_name"),
                        "detail": item.get("detail"), "hint": item.get("hint"), "context": item.get("context"),
                        "statement": item.get("statement"), "time": item.get("timestamp"),
                        "epoch": parse_time(item.get("timestamp"))})
    return records


_CSV = ("log_time", "user_name", "database_name", "process_id", "connection_from", "session_id", "session_line_num",
        "command_tag", "session_start_time", "virtual_transaction_id", "transaction_id", "error_severity",
        "sql_state_code", "message", "detail", "hint", "internal_query", "internal_query_pos", "context", "query",
        "query_pos", "location", "application_name")


def _records_csv(lines):
    records = []
    csv.field_size_limit(max(csv.field_size_limit(), READ_BYTES))  # a logged statement may be long
    for row in csv.reader(io.StringIO("\n".join(lines))):
        if len(row) < len(_CSV):
            continue
        item = dict(zip(_CSV, row))
        records.append({"level": item["error_severity"], "message": item["message"], "sqlstate": item["sql_state_code"],
                        "pid": item["process_id"], "user": item["user_name"], "db": item["database_name"],
                        "app": item["application_name"], "detail": item["detail"] or None, "hint": item["hint"] or None,
                        "context": item["context"] or None, "statement": item["query"] or None,
                        "time": item["log_time"], "epoch": parse_time(item["log_time"])})
    return records


# -- redaction -------------------------------------------------------------------------------
_CONSTS = ("SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST")


def normalize_sql(text):
    """``text`` with every literal constant replaced by a parameter ``$n`` (as pg_stat_statements
    shows queries); None when it cannot be scanned (then the statement is not shown at all)."""
    try:
        from pglast import parser
        tokens = parser.scan(text)
    except Exception:  # noqa: BLE001 - pglast missing, or a statement it cannot scan
        return None
    raw = text  # pglast's scanner gives character offsets, the end inclusive
    highest = 0
    for tok in tokens:
        if tok.name == "PARAM":
            try:
                highest = max(highest, int(raw[tok.start + 1:tok.end + 1]))
            except ValueError:
                pass
    out, pos, n = [], 0, highest
    for tok in tokens:
        if tok.name not in _CONSTS:
            continue
        start = tok.start
        if start > pos and raw[start:start + 1] == "'" and raw[start - 1:start] in ("E", "e", "B", "b", "X", "x", "N", "n"):
            start -= 1  # E'..', B'..', X'..', N'..': the prefix is part of the constant
        if raw[start - 1:start] == "&" and raw[start - 2:start - 1] in ("U", "u"):
            start -= 2
        n += 1
        out.append(raw[pos:start])
        out.append("$%d" % n)
        pos = tok.end + 1
    out.append(raw[pos:])
    return "".join(out)


_ENUM_VALUE = re.compile(r'^(invalid input value for enum [^:]+: )"(.*)"$', re.S)
# a quoted word right after one of these names an object (schema, not data): it is kept
_NAMES = re.compile(r"(?:relation|column|constraint|type|table|index|schema|database|role|user|extension|sequence|view|"
                    r"trigger|function|procedure|operator|enum|tablespace|publication|subscription|collation|"
                    r"domain|attribute|cursor|portal|prepared statement|savepoint|column reference|parameter|"
                    r"for table|of relation|of table|on table|in table)\s+$", re.IGNORECASE)
_QUOTED = re.compile(r'"(?:[^"]|"")*"')
_SAFE_DETAIL = re.compile(r"^(?:Connection matched (?:pg_hba\.conf|file \S+) line \d+:|Role \"[^\"]*\" does not exist|"
                          r"There (?:is|are) \S+ .*(?:column|constraint|index|table)s? named|Key columns \"|"
                          r"Table \"[^\"]*\" references|Could not open file|User does not have CONNECT privilege|"
                          r"The database was initialized|Process \d+ waits for)")
_PROCESS_SQL = re.compile(r"^(Process \d+: )(.*)$")


def _mask_quoted(text):
    """Every quoted value in ``text`` that does not name an object (see _NAMES) becomes "..."."""
    def one(m):
        return m.group(0) if _NAMES.search(text[:m.start()]) else '"..."'
    return _QUOTED.sub(one, text)


def _detail(detail, code):
    if detail.startswith("parameters:"):
        return "parameters: (not shown)"
    if code == "40P01":  # a deadlock: who waited for what, and each process's query as a pattern
        lines = []
        for line in detail.splitlines():
            m = _PROCESS_SQL.match(line.strip())
            lines.append(m.group(1) + (normalize_sql(m.group(2)) or "(not shown)") if m else line)
        return "\n".join(lines)
    scrubbed = scrub_user_data(detail)
    if scrubbed != detail:  # Key (...)=(...), Failing row contains (...)
        return scrubbed
    return detail if _SAFE_DETAIL.match(detail) else "(not shown: it may hold data)"


def _context(context):
    out = []
    for line in context.splitlines():
        m = re.match(r'^(SQL statement )"(.*)"$', line.strip(), re.S)
        if m:
            out.append(m.group(1) + '"%s"' % (normalize_sql(m.group(2)) or "(not shown)"))
        elif re.match(r"^(?:PL/pgSQL function|SQL function|PL/\w+ function) ", line.strip()):
            out.append(line)
        else:
            out.append("(not shown: it may hold data)")
    return "\n".join(out)


def redact_record(rec, known=()):
    """The record as it may leave the host: no user data, no secrets. A message keeps the quoted
    names of objects (relation "t", column "c") and loses every other quoted value; DETAIL and
    CONTEXT lines are kept only in shapes known to hold no data; statements become patterns."""
    out = {}
    for key in ("level", "sqlstate", "pid", "user", "db", "app", "time", "epoch"):
        out[key] = rec.get(key)
    message = rec.get("message") or ""
    if rec.get("sqlstate") == "P0001":  # RAISE EXCEPTION: the app's own text, which may hold anything
        message = "(a RAISE EXCEPTION message, not shown)"
    else:
        m = _ENUM_VALUE.match(message)
        if m and re.match(r"^[A-Za-z0-9_ .-]{1,63}$", m.group(2)):  # an enum label names schema, not user data
            message = '%s"%s"' % (m.group(1), m.group(2))
        else:
            message = scrub_user_data(_mask_quoted(message))
    out["message"] = redact_text(message, known=known)
    if rec.get("detail"):
        out["detail"] = redact_text(_detail(rec["detail"], rec.get("sqlstate")), known=known)
    if rec.get("hint"):
        out["hint"] = redact_text(scrub_user_data(_mask_quoted(rec["hint"])), known=known)
    if rec.get("context"):
        out["context"] = redact_text(_context(rec["context"]), known=known)
    if rec.get("statement"):
        shown = normalize_sql(rec["statement"])
        out["statement"] = redact_text(shown, known=known) if shown is not None else None
    return out


def read_log(path, prefix, since_epoch=None, known=(), max_bytes=READ_BYTES, keep=KEEP):
    """``{"format", "records", "notes"}``: the ERROR/FATAL/PANIC records of ``path`` at or after
    ``since_epoch`` (all read when the log has no times), newest ``keep``, redacted."""
    lines = tail_lines(path, max_bytes)
    fmt = detect_format(lines)
    notes = []
    if fmt == "jsonlog":
        records = _records_json(lines)
    elif fmt == "csvlog":
        records = _records_csv(lines)
    else:
        settings = LogSettings(prefix)
        counts = {"matched": 0}
        records = _records_stderr(lines, settings, counts)
        if lines and not counts["matched"]:
            notes.append("none of the %d lines read matches log_line_prefix %r (or its level names are not English: "
                         "lc_messages): nothing could be read from it; check both" % (len(lines), prefix))
        if not settings.has_sqlstate:
            notes.append("log_line_prefix %r has no %%e: SQLSTATEs were inferred from the message text; "
                         "add %%e to log_line_prefix (or use jsonlog) for exact codes" % prefix)
        if not settings.has_time:
            notes.append("log_line_prefix %r has no time (%%m): --since could not be applied to it; "
                         "add %%m to log_line_prefix" % prefix)
        if not settings.has_pid:
            notes.append("log_line_prefix %r has no %%p: a STATEMENT line is tied to the line before it; "
                         "add %%p to log_line_prefix" % prefix)
    out = []
    for rec in records:
        if rec.get("level") not in LEVELS:
            continue
        if since_epoch is not None and rec.get("epoch") is not None and rec["epoch"] < since_epoch:
            continue
        if not rec.get("sqlstate") or rec["sqlstate"] == "00000":
            rec["sqlstate"] = infer_sqlstate(rec.get("message"))
            rec["inferred"] = True
        clean = redact_record(rec, known)
        clean["inferred"] = bool(rec.get("inferred"))
        out.append(clean)
    unreadable = fmt == "stderr" and bool(lines) and not counts["matched"]
    return {"format": fmt, "records": out[-keep:], "notes": notes, "total": len(out), "lines": len(lines),
            "unreadable": unreadable}
