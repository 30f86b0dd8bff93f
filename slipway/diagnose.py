"""`invoke diagnose --host H [--since 1h] [--json]`: the runbook's diagnosis as a command.

One read-only pass per host (playbooks/state.yml: module app_state, then pg_drift) returns the
release `current` points at, PM2's processes, the app's health answer, slipway's and the app's own
database logins, the migration history, the drift check's read, and since ``--since``: the ERROR and
FATAL lines of PostgreSQL's log (module_utils/pglog.py, redacted on the host), the app's error log
and PM2's log lines about the app. Here each rule below turns what was read into causes, each with
its evidence lines and the command that fixes it, most severe first.

Log lines older than the release `current` points at are not causes: they were met by the release
before it (the report counts them). Exit codes: 0 healthy, 1 a cause found, 3 could not look.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from .errors import SlipwayError
from .status import _epoch, age

HEALTHY, CAUSE, COULD_NOT_LOOK = 0, 1, 3
# rank of each cause (lower first): the app down or unreachable, then errors it meets now, then
# what is latent (pending migrations, drift), then history
RANK = {"ssh": 0, "db-login": 1, "db-unreachable": 1, "app-db": 2, "pm2": 3, "crash-loop": 4, "eaddrinuse": 5,
        "oom": 6, "health": 7, "release-mismatch": 8, "schema": 10, "migration-timeout": 12, "data": 14,
        "sql-other": 16, "drift": 20, "migrations": 21, "deploy-failed": 25}
SCHEMA_CODES = {"42P10", "42P01", "42703", "42704", "42883"}
_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str) -> int:
    m = _DURATION.match(str(text).strip())
    if not m or int(m.group(1)) <= 0:
        raise SlipwayError(f"--since {text!r} is not a duration; use a number and s, m, h or d, e.g. --since 30m or --since 2h")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# --------------------------------------------------------------------------------------------
# What each migration creates (pglast), to name the one that makes a missing object
# --------------------------------------------------------------------------------------------
def _name(node) -> str:
    return node.relname if hasattr(node, "relname") else str(node)


def _names(items) -> list[str]:
    return [getattr(i, "sval", None) or getattr(i, "str", None) or str(i) for i in items or ()]


def _constraint_objects(table: str, con, column: str | None = None) -> list[tuple]:
    from pglast import enums

    out = []
    if con.conname:
        out.append(("constraint", con.conname))
    if con.contype in (enums.ConstrType.CONSTR_UNIQUE, enums.ConstrType.CONSTR_PRIMARY):
        keys = tuple(_names(con.keys)) if con.keys else ((column,) if column else ())
        if keys:
            out.append(("unique", table, tuple(sorted(keys))))
    return out


def _column_objects(table: str, col) -> list[tuple]:
    out = [("column", table, col.colname)]
    for con in col.constraints or ():
        out += _constraint_objects(table, con, col.colname)
    return out


def statement_objects(stmt) -> list[tuple]:
    """What one parsed statement creates: ("table", t), ("column", t, c), ("unique", t, (cols)),
    ("constraint", name), ("index", name), ("type", name), ("enum_value", type, value),
    ("function", name), ("extension", name)."""
    from pglast import ast, enums

    out: list[tuple] = []
    if isinstance(stmt, ast.CreateStmt):
        table = stmt.relation.relname
        out.append(("table", table))
        for elt in stmt.tableElts or ():
            if isinstance(elt, ast.ColumnDef):
                out += _column_objects(table, elt)
            elif isinstance(elt, ast.Constraint):
                out += _constraint_objects(table, elt)
    elif isinstance(stmt, (ast.ViewStmt,)):
        out.append(("table", stmt.view.relname))
    elif isinstance(stmt, ast.CreateTableAsStmt) and stmt.into is not None:
        out.append(("table", stmt.into.rel.relname))
    elif isinstance(stmt, ast.AlterTableStmt) and stmt.relation is not None:
        table = stmt.relation.relname
        for cmd in stmt.cmds or ():
            if cmd.subtype == enums.AlterTableType.AT_AddColumn and isinstance(cmd.def_, ast.ColumnDef):
                out += _column_objects(table, cmd.def_)
            elif cmd.subtype == enums.AlterTableType.AT_AddConstraint and isinstance(cmd.def_, ast.Constraint):
                out += _constraint_objects(table, cmd.def_)
    elif isinstance(stmt, ast.RenameStmt) and stmt.newname:
        if stmt.renameType == enums.ObjectType.OBJECT_TABLE:
            out.append(("table", stmt.newname))
        elif stmt.renameType == enums.ObjectType.OBJECT_COLUMN and stmt.relation is not None:
            out.append(("column", stmt.relation.relname, stmt.newname))
    elif isinstance(stmt, ast.IndexStmt) and stmt.relation is not None:
        if stmt.idxname:
            out += [("index", stmt.idxname), ("constraint", stmt.idxname)]
        if stmt.unique and not stmt.whereClause:
            cols = [e.name for e in stmt.indexParams or () if e.name]
            if len(cols) == len(stmt.indexParams or ()):
                out.append(("unique", stmt.relation.relname, tuple(sorted(cols))))
    elif isinstance(stmt, ast.CreateEnumStmt):
        name = _names(stmt.typeName)[-1]
        out.append(("type", name))
        out += [("enum_value", name, v) for v in _names(stmt.vals)]
    elif isinstance(stmt, ast.AlterEnumStmt) and stmt.newVal:
        out.append(("enum_value", _names(stmt.typeName)[-1], stmt.newVal))
    elif isinstance(stmt, (ast.CompositeTypeStmt,)):
        out.append(("type", stmt.typevar.relname))
    elif isinstance(stmt, ast.CreateDomainStmt):
        out.append(("type", _names(stmt.domainname)[-1]))
    elif isinstance(stmt, ast.CreateFunctionStmt):
        out.append(("function", _names(stmt.funcname)[-1]))
    elif isinstance(stmt, ast.CreateExtensionStmt):
        out.append(("extension", stmt.extname))
    return out


def index_folder(folder: dict) -> dict:
    """``{object: (tag, statement text)}`` for the objects a migrations folder (read_folder's
    result) creates, each named by the first migration that creates it."""
    from pglast import parse_sql

    index: dict = {}
    for mig in folder["migrations"]:
        for text in mig["statements"]:
            try:
                parsed = parse_sql(text)
            except Exception:  # noqa: BLE001 - a statement pglast cannot read names nothing
                continue
            made = (mig["tag"], " ".join(text.split())[:200])
            for stmt in _with_do_bodies([raw.stmt for raw in parsed or ()]):
                for obj in statement_objects(stmt) + renamed(index, stmt):
                    index.setdefault(obj, made)
    return index


def _with_do_bodies(stmts: list) -> list:
    """``stmts`` with each DO block replaced by the SQL statements of its PL/pgSQL body (public
    histories guard their DDL with ``DO $$ BEGIN IF NOT EXISTS ... THEN ALTER TABLE ...``)."""
    import pglast
    from pglast import ast

    out = []
    for stmt in stmts:
        if not isinstance(stmt, ast.DoStmt):
            out.append(stmt)
            continue
        body = next((a.arg.sval for a in stmt.args or () if a.defname == "as"), None)
        language = next((a.arg.sval for a in stmt.args or () if a.defname == "language"), "plpgsql")
        if not body or language != "plpgsql":
            continue
        try:
            tree = pglast.parse_plpgsql(f"CREATE FUNCTION slipway_do() RETURNS void LANGUAGE plpgsql AS $slipway_do${body}$slipway_do$")
        except Exception:  # noqa: BLE001 - a body pglast cannot read names nothing
            continue
        queries: list[str] = []
        _execsql(tree, queries)
        for query in queries:
            try:
                out += [raw.stmt for raw in pglast.parse_sql(query) or ()]
            except Exception:  # noqa: BLE001
                continue
    return out


def _execsql(node, found: list) -> None:
    """The SQL text of every PLpgSQL_stmt_execsql in a parse_plpgsql tree."""
    if isinstance(node, dict):
        if "PLpgSQL_stmt_execsql" in node:
            query = (((node["PLpgSQL_stmt_execsql"] or {}).get("sqlstmt") or {}).get("PLpgSQL_expr") or {}).get("query")
            if query:
                found.append(query)
        for value in node.values():
            _execsql(value, found)
    elif isinstance(node, list):
        for value in node:
            _execsql(value, found)


def renamed(index: dict, stmt) -> list[tuple]:
    """What an ALTER TABLE ... RENAME [COLUMN] makes of the objects made before it: the table's
    columns and unique keys under the new name (drizzle-kit rebuilds a table as ``x_temp`` and
    renames it)."""
    from pglast import ast, enums

    if not isinstance(stmt, ast.RenameStmt) or stmt.relation is None or not stmt.newname:
        return []
    old = stmt.relation.relname
    out = []
    if stmt.renameType == enums.ObjectType.OBJECT_TABLE:
        for obj in list(index):
            if obj[0] in ("column", "unique") and obj[1] == old:
                out.append((obj[0], stmt.newname, *obj[2:]))
    elif stmt.renameType == enums.ObjectType.OBJECT_COLUMN and stmt.subname:
        for obj in list(index):
            if obj[0] == "unique" and obj[1] == old and stmt.subname in obj[2]:
                out.append(("unique", old, tuple(sorted(stmt.newname if c == stmt.subname else c for c in obj[2]))))
    return out


def migration_index(content: dict) -> dict:
    """index_folder of the files pg_drift read from the host (``migrations_content``)."""
    from .drift import _folder

    if not content or "meta/_journal.json" not in content:
        return {}
    with tempfile.TemporaryDirectory(prefix="slipway-diagnose-") as tmp:
        return index_folder(_folder(content, Path(tmp)))


def on_conflict_target(statement: str | None) -> tuple[str, tuple] | None:
    """(table, sorted columns) of an INSERT ... ON CONFLICT (cols), parsed with pglast."""
    if not statement:
        return None
    from pglast import ast, parse_sql

    try:
        parsed = parse_sql(statement)
    except Exception:  # noqa: BLE001 - not parseable: no target
        return None
    for raw in parsed or ():
        stmt = raw.stmt
        if isinstance(stmt, ast.InsertStmt) and stmt.onConflictClause is not None and stmt.onConflictClause.infer:
            cols = [e.name for e in stmt.onConflictClause.infer.indexElems or () if getattr(e, "name", None)]
            if cols:
                return stmt.relation.relname, tuple(sorted(cols))
    return None


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------
def _short(text, width=220) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _pg_line(rec: dict, count: int = 1) -> str:
    times = f" (x{count}, last)" if count > 1 else ""
    code = rec.get("sqlstate") or "?????"
    inferred = " (SQLSTATE from the message)" if rec.get("inferred") else ""
    return f"PostgreSQL {rec.get('time')}{times}: {rec.get('level')} {code}{inferred} {_short(rec.get('message'))}"


class Diagnosis:
    """The causes found on one host from app_state's (and pg_drift's) answer."""

    def __init__(self, host: str, state: dict, drift_read: dict | None, since: int):
        self.host, self.state, self.since = host, state, since
        self.drift_read = drift_read
        self.causes: list[dict] = []
        self.notes: list[str] = []
        self.explained: set[str] = set()  # migration tags a cause already names
        self.resolved: list[str] = []  # errors whose object exists now (fixed since they were logged)
        self.unread: list[str] = []  # sources that could not be read: no "healthy" without them
        self.index = None
        self.drift = None
        release = state.get("release") or {}
        self.current = release.get("current")
        self.cutoff = release.get("current_since")
        for record in state.get("deploys") or []:  # a deploy that migrated or switched: errors before it met the old state
            if record.get("result") == "ok" and (record.get("migrations_applied") or record.get("switched_from")):

                when = _epoch(record.get("finished"))
                if when and (self.cutoff is None or when > self.cutoff):
                    self.cutoff = when
        self.app = state.get("app_name") or "the app"
        logs = state.get("logs") or {}
        self.pg_records, self.earlier = [], 0
        for rec in (logs.get("pg") or {}).get("records", []):
            if self.cutoff and rec.get("epoch") and rec["epoch"] < self.cutoff:
                self.earlier += 1
            else:
                self.pg_records.append(rec)
        self.app_lines, seen = [], set()
        for f in logs.get("app") or []:  # the error log first, then the combined one: each line once
            for line, when in self._timed(f):
                if line not in seen and not (self.cutoff and when is not None and when < self.cutoff):
                    seen.add(line)
                    self.app_lines.append((f["path"], line))
        self.pm2_lines = [line for line, when in self._timed(logs.get("pm2") or {})
                          if not (self.cutoff and when is not None and when < self.cutoff)]

    @staticmethod
    def _timed(read: dict) -> list[tuple[str, float | None]]:
        lines = read.get("lines") or []
        times = read.get("times") or []
        return list(zip(lines, times if len(times) == len(lines) else [None] * len(lines), strict=True))

    def add(self, kind: str, code: str, title: str, why: str, evidence: list[str], fix: str, **extra) -> None:
        self.causes.append({"kind": kind, "code": code, "title": title, "why": why,
                            "evidence": [e for e in evidence if e][:8], "fix": fix, **extra})

    def app_evidence(self, *needles: str, limit: int = 3) -> list[str]:
        found = [f"app {Path(path).name}: {_short(line)}" for path, line in self.app_lines
                 if any(n.lower() in line.lower() for n in needles)]
        return found[-limit:]

    # -- migrations ----------------------------------------------------------------------------
    def status_of(self, tag: str) -> str | None:
        for mig in (self.state.get("db") or {}).get("migrations") or []:
            if mig["tag"] == tag:
                return mig["status"]
        return None

    def creator(self, *objs) -> tuple[str, str] | None:
        if self.index is None:
            content = self.state.get("migrations_content") or (self.drift_read or {}).get("migrations_content") or {}
            self.index = migration_index(content)
        for obj in objs:
            if obj in self.index:
                return self.index[obj]
        return None

    def migration_fix(self, made: tuple[str, str] | None, what: str) -> tuple[str, str, str | None]:
        """(why, fix, tag) for an object the app needs: the migration that makes it and its state."""
        h = self.host
        if made is None and not self.index:
            return (f"which migration creates {what} could not be told: the release's migration files were not read",
                    f"invoke drift --host {h} compares the schema with the migrations", None)
        if made is None:
            return (f"no migration of release {self.current} creates {what}",
                    f"add a migration that creates {what} (drizzle-kit generate), then invoke deploy --host {h}", None)
        tag, text = made
        status = self.status_of(tag)
        self.explained.add(tag)
        if status == "pending":
            return (f"migration {tag} creates it ({_short(text, 120)}) and is pending on this database",
                    f"invoke deploy --host {h}  (applies {tag}; a verified backup first)", tag)
        if status == "skipped":
            return (f"migration {tag} creates it and was skipped (an older journal `when` than the newest applied "
                    "row: drizzle's migrator never runs it)",
                    f"invoke drift --fix --host {h}  (runs the skipped migration through the engine, a backup first)", tag)
        if status == "tampered":
            return (f"migration {tag} creates it, but its file changed after it was applied (hash differs)",
                    f"invoke drift --host {h} shows what differs; restore {tag}'s applied text or write a new migration", tag)
        return (f"migration {tag} creates it and is applied, but the live schema lacks it (dropped or changed by hand)",
                f"invoke drift --fix --host {h}  (rebuilds a missing index or unique constraint online; anything else "
                "it names for a human)", tag)

    # -- rules ------------------------------------------------------------------------------
    def run(self) -> None:
        self.evaluate_drift()
        for rule in (self.database, self.pm2, self.health, self.release, self.sql_errors, self.migration_timeouts,
                     self.drift_findings, self.migrations, self.last_deploy):
            rule()
        self.causes.sort(key=lambda c: (RANK.get(c["kind"], 30), -int(c.get("count") or 1)))
        lock = self.state.get("lock") or {}
        meta = lock.get("meta") or {}
        if lock.get("held"):
            self.notes.append(f"a deploy holds the deploy lock now (run {meta.get('run_id', '?')}, {meta.get('command', '?')}, "
                              f"since {meta.get('started', '?')}): what is read may change under it")
        elif lock.get("stale"):
            self.notes.append(f"the deploy lock's metadata was left by run {meta.get('run_id', '?')} (it ended without releasing); "
                              "the next deploy takes it over")
        self.notes += self.resolved
        if self.earlier:
            self.notes.append(f"{self.earlier} PostgreSQL error line(s) of the last {age(self.since)} came before the last deploy "
                              f"that switched the release or migrated, and are not counted")
        pg = (self.state.get("logs") or {}).get("pg") or {}
        self.notes += pg.get("notes") or []
        if pg.get("error"):
            self.notes.append(f"PostgreSQL log not read: {pg['error']}")
            self.unread.append("the PostgreSQL log")
        lc = ((self.state.get("db") or {}).get("settings") or {}).get("lc_messages") or ""
        if lc and not re.match(r"^(?:C|POSIX|en)(?:[._@-]|$)", lc) and pg.get("format") == "stderr":
            self.notes.append(f"lc_messages is {lc!r}: level names and messages are translated; diagnose reads "
                              "English ones (set lc_messages = 'C' or use jsonlog)")
        for f in (self.state.get("logs") or {}).get("app") or []:
            if f.get("error"):
                self.notes.append(f"app log not read: {f['error']}")

    def database(self) -> None:
        db = self.state.get("db") or {}
        appdb = (self.state.get("logs") or {}).get("app_db") or {}
        # refused logins of the app's own role and database (not a scanner's, not another app's)
        fatal = [r for r in self.pg_records if r.get("sqlstate") in ("28P01", "3D000", "28000")
                 and (not appdb.get("user") or not r.get("user") or r["user"] == appdb["user"])
                 and (not appdb.get("db") or not r.get("db") or r["db"] == appdb["db"])]
        if db.get("ok") and db.get("error"):
            self.notes.append(f"the migration history was not read: {db['error']}")
            self.unread.append("the migration history")
        if not db.get("ok") and db.get("error"):
            code = db.get("sqlstate") or ""
            if code in ("53300", "57P03"):
                what = {"53300": "the database refuses new connections: every connection slot is taken",
                        "57P03": "the database is starting up or shutting down"}[code]
                fix = {"53300": "find who holds the connections (pg_stat_activity); raise max_connections or pool the app's "
                                "connections (pgbouncer), then",
                       "57P03": "wait for the server (or see why it restarts in its log), then"}[code]
                self.add("db-unreachable", code, what, db["error"], [f"slipway's login: {db['error']}"],
                         f"{fix} invoke diagnose --host {self.host}")
            elif code in ("28P01", "28000", "3D000"):
                what = {"28P01": "slipway's database login is refused: wrong password",
                        "28000": "slipway's database login is refused by pg_hba.conf or the role does not exist",
                        "3D000": "slipway's database does not exist"}[code]
                self.add("db-login", code, what, db["error"], [f"slipway's login: {db['error']}"],
                         "correct slipway_db_* in the inventory (the password in its ansible-vault file), then "
                         f"invoke diagnose --host {self.host}")
            else:
                self.add("db-unreachable", code or "08006", "the database does not answer", db["error"],
                         [f"slipway's login: {db['error']}"],
                         "start PostgreSQL or correct slipway_db_host/slipway_db_port (and listen_addresses, pg_hba.conf), "
                         f"then invoke diagnose --host {self.host}")
        if appdb.get("tried") and not appdb.get("ok"):
            code = appdb.get("sqlstate") or ""
            what = {"28P01": "the app's DATABASE_URL has a wrong password", "3D000": "the app's DATABASE_URL names a database that does not exist",
                    "28000": "the app's DATABASE_URL login is refused (pg_hba.conf or no such role)"}.get(
                code, "the app's DATABASE_URL does not reach the database")
            codes = {"28P01": ("28P01",), "3D000": ("3D000",), "28000": ("28000",)}.get(code, ())
            lines = [r for r in fatal if r.get("sqlstate") in codes]
            evidence = [f"the app's DATABASE_URL (shared/.env) tried from the host: {appdb.get('error')}"]
            if lines:
                evidence.append(_pg_line(lines[-1], len(lines)))
            evidence += self.app_evidence("password authentication", "does not exist", "ECONNREFUSED", "no pg_hba.conf",
                                          "connection slots")
            ok_note = " (slipway's own login works)" if db.get("ok") else ""
            self.add("app-db", code or "08006", what + ok_note, appdb.get("error") or "",
                     evidence, f"set the right DATABASE_URL in the app's .env (shared/.env, or slipway_app_env in the "
                     f"inventory and invoke deploy --host {self.host}), then pm2 reload {self.app} --update-env on the host",
                     count=len(lines) or 1)
        elif fatal and db.get("ok"):
            last = fatal[-1]
            self.add("app-db", last["sqlstate"], f"logins refused by PostgreSQL ({last['sqlstate']})", _short(last.get("message")),
                     [_pg_line(last, len(fatal))], "find the client logging in with these settings (user "
                     f"{last.get('user') or '?'}, database {last.get('db') or '?'}) and correct its credentials",
                     count=len(fatal))

    def pm2(self) -> None:
        pm2 = self.state.get("pm2") or {}
        procs = [p for p in pm2.get("processes") or [] if not str(p.get("name", "")).endswith("~slipway-handover")]
        h = self.host
        if pm2.get("error"):
            self.add("pm2", "pm2", "PM2 could not be read", pm2["error"], [pm2["error"]], "check pm2 on the host (PATH, PM2_HOME)")
            return
        if not pm2.get("daemon"):
            self.add("pm2", "pm2", "PM2 is not running on the host", f"no PM2 daemon for PM2_HOME {pm2.get('home')}", [],
                     f"invoke deploy --host {h}  (starts the app under PM2)")
            return
        if not procs:
            self.add("pm2", "pm2", f"PM2 runs no process named {self.app}", "the app is not started", [],
                     f"invoke deploy --host {h}  (starts it)")
            return
        # PM2's statuses: online, stopping, stopped (by hand), launching, errored (gave up), waiting restart
        stopped = [p for p in procs if p.get("status") in ("stopped", "stopping")]
        bad = [p for p in procs if p.get("status") in ("errored", "launching", "waiting restart")]
        exits = [line for line in self.pm2_lines if re.search(r"exited with code \[(?!0\])", line)]
        oom_pm2 = [line for line in self.pm2_lines if "max-memory-restart" in line or "max_memory_restart" in line]
        unstable = sum(p.get("unstable_restarts") or 0 for p in procs)
        # PM2's counters add up over the app's life: only what happens now (a process down, exits or memory
        # restarts in the window) makes an old log line of the app a cause
        trouble = bool(bad or exits or oom_pm2)
        lines = [line for _, line in self.app_lines]
        oom = [line for line in lines if re.search(r"heap out of memory|Reached heap limit|Allocation failed", line)]
        if oom_pm2 or (oom and trouble):
            evidence = [f"app: {_short(x)}" for x in oom[-2:]] + [f"PM2: {_short(x)}" for x in oom_pm2[-2:]]
            self.add("oom", "OOM", f"{self.app} runs out of memory", "Node's heap limit was reached, or PM2's "
                     "max_memory_restart restarted it", evidence,
                     "raise the limit (node_args --max-old-space-size, max_memory_restart in the ecosystem file) or find "
                     f"the leak; invoke rollback --host {h} returns to the previous release meanwhile", count=len(oom) + len(oom_pm2))
        eaddr = [line for line in lines if "EADDRINUSE" in line] if trouble else []
        if eaddr:
            port = re.search(r"EADDRINUSE[^\n]*?:(\d+)\b", eaddr[-1])
            where = f"port {port.group(1)}" if port else "its port"
            self.add("eaddrinuse", "EADDRINUSE", f"{self.app} cannot listen: {where} is taken by another process",
                     _short(eaddr[-1]), [f"app: {_short(eaddr[-1])}"],
                     f"on the host, ss -ltnp 'sport = :{port.group(1) if port else 'PORT'}' names the process holding it; "
                     f"stop it (or change PORT), then pm2 restart {self.app}", count=len(eaddr))
        if stopped and not bad:
            self.add("pm2", "stopped", f"{len(stopped)} of {len(procs)} {self.app} process(es) stopped",
                     "stopped by hand (pm2 stop) or while a command ran", [f"PM2 id {p.get('pm_id')}: {p.get('status')}" for p in stopped][:3],
                     f"pm2 start {self.app} on the host, or invoke deploy --host {h}")
        if (bad or len(exits) >= 3) and not eaddr:
            from ansible_collections.slipway.core.plugins.module_utils.pm2 import app_error_line

            error_line = app_error_line(lines)
            statuses = ", ".join(sorted({f"{p.get('status')}" for p in procs}))
            evidence = [f"PM2: {sum(1 for p in procs if p.get('status') == 'online')}/{len(procs)} online ({statuses}); "
                        f"restarts {sum(p.get('restarts') or 0 for p in procs)}, unstable restarts {unstable}"]
            if error_line:
                evidence.append(f"the app's error: {_short(error_line)}")
            evidence += [f"PM2: {_short(x)}" for x in exits[-2:]]
            previous = (self.state.get("release") or {}).get("previous")
            self.add("crash-loop", "crash-loop", f"{self.app} is crash-looping on release {self.current}",
                     error_line or "its processes keep exiting", evidence,
                     f"invoke rollback --host {h}  (back to {previous or 'the previous release'}); fix the error above and deploy again",
                     count=len(exits) or len(bad), error_line=error_line)

    def health(self) -> None:
        health = self.state.get("health")
        if not health or any(c["kind"] in ("crash-loop", "pm2", "eaddrinuse") for c in self.causes):
            return
        if health.get("status") == health.get("expected"):
            return
        said = f"HTTP {health['status']}" if health.get("status") else (health.get("error") or "no answer")
        self.add("health", "health", f"the health check {health['url']} answers {said}",
                 f"expected {health.get('expected')}", [f"GET {health['url']}: {said} {_short(health.get('body'), 120)}".strip()],
                 f"see the causes below it; invoke rollback --host {self.host} returns to the previous release")

    def release(self) -> None:
        if (self.state.get("lock") or {}).get("held"):
            return  # a deploy is switching and reloading right now
        procs = [p for p in (self.state.get("pm2") or {}).get("processes") or []
                 if p.get("status") == "online" and not str(p.get("name", "")).endswith("~slipway-handover")]
        running = sorted({str(p.get("release")) for p in procs if p.get("release") and p.get("release") != self.current})
        if self.current and running:
            self.add("release-mismatch", "release", f"PM2 runs release {', '.join(running)} but current points at {self.current}",
                     "a deploy stopped between switching current and reloading, or the app was restarted by hand from another path",
                     [f"PM2 pid {p.get('pid')}: release {p.get('release')}" for p in procs if p.get("release") in running][:3],
                     f"invoke deploy --host {self.host}  (reloads PM2 onto current), or invoke rollback --host {self.host}")

    def sql_errors(self) -> None:
        groups: dict = {}
        for rec in self.pg_records:
            code = rec.get("sqlstate")
            if code in ("28P01", "3D000", "28000", "55P03", "57014"):
                continue
            if code in ("57P01", "57P02", "57P03") and (self.state.get("health") or {}).get("status") == \
                    (self.state.get("health") or {}).get("expected"):
                self.notes.append(f"{_pg_line(rec)}: the server ended or refused the app's connections then (a restart or "
                                  "pg_terminate_backend); the app answers its health check now")
                continue
            key = (code, rec.get("message"))
            groups.setdefault(key, []).append(rec)
        for (code, message), recs in groups.items():
            last = recs[-1]
            evidence = [_pg_line(last, len(recs))]
            if last.get("statement"):
                evidence.append(f"  STATEMENT: {_short(last['statement'])}")
            if last.get("detail"):
                evidence.append(f"  DETAIL: {_short(last['detail'])}")
            evidence += self.app_evidence(code, (message or "")[:40], limit=2)
            n = len(recs)
            if code in SCHEMA_CODES and self.resolved_error(code, message, last, n):
                continue
            if code == "42P10":
                target = on_conflict_target(last.get("statement"))
                if target:
                    table, cols = target
                    what = f"a UNIQUE constraint on {table}({', '.join(cols)})"
                    why, fix, tag = self.migration_fix(self.creator(("unique", table, cols)), what)
                    self.add("schema", code, f"INSERT ... ON CONFLICT ({', '.join(cols)}) on {table} has no matching unique "
                             "constraint", why, evidence, fix, count=n, table=table, columns=list(cols), migration=tag)
                else:
                    self.add("schema", code, "an ON CONFLICT target has no matching unique constraint",
                             "the statement was not logged (log_min_error_statement) or could not be parsed",
                             evidence, f"invoke drift --host {self.host} lists the missing constraints", count=n)
            elif code == "42P01":
                m = re.search(r'relation "([^"]+)"', message or "")
                table = m.group(1).split(".")[-1] if m else "?"
                why, fix, tag = self.migration_fix(self.creator(("table", table)), f"table {table}")
                self.add("schema", code, f"table {table} does not exist", why, evidence, fix, count=n, table=table, migration=tag)
            elif code == "42703":
                m = re.search(r'column "([^"]+)"(?: of relation "([^"]+)")?', message or "")
                col = (m.group(1) if m else "?").split(".")[-1]
                table = m.group(2) if m and m.group(2) else None
                if table:
                    made = self.creator(("column", table, col))
                else:
                    self.creator()  # builds the index
                    made = self.creator(*[k for k in self.index if k[0] == "column" and k[2] == col])
                what = f"column {table + '.' if table else ''}{col}"
                why, fix, tag = self.migration_fix(made, what)
                self.add("schema", code, f"{what} does not exist", why, evidence, fix, count=n, migration=tag)
            elif code == "42704":
                m = re.search(r'(type|constraint|index|extension) "([^"]+)"', message or "")
                kind, name = (m.group(1), m.group(2).split(".")[-1]) if m else ("object", "?")
                objs = [(kind if kind != "index" else "index", name)] + ([("constraint", name)] if kind == "index" else [])
                why, fix, tag = self.migration_fix(self.creator(*objs), f"{kind} {name}")
                self.add("schema", code, f"{kind} {name} does not exist", why, evidence, fix, count=n, migration=tag)
            elif code == "42883":
                m = re.search(r"function ([\w.\"]+)\(", message or "")
                name = m.group(1).replace('"', "").split(".")[-1] if m else None
                made = self.creator(("function", name)) if name else None
                if made is None and name:
                    why, fix = (f"no migration creates function {name}: it may come from an extension not installed here, or its "
                                "argument types differ from the call", "install the extension or cast the arguments; "
                                f"invoke drift --host {self.host} shows missing extensions")
                    tag = None
                else:
                    why, fix, tag = self.migration_fix(made, f"function {name}")
                self.add("schema", code, f"function {name or '?'} does not exist (for these argument types)", why, evidence,
                         fix, count=n, migration=tag)
            elif code == "22P02":
                m = re.search(r'invalid input value for enum ([^:]+): "(.*)"', message or "")
                if m and m.group(2) != "...":
                    enum, value = m.group(1).split(".")[-1].strip('"'), m.group(2)
                    made = self.creator(("enum_value", enum, value))
                    if made is not None:
                        why, fix, tag = self.migration_fix(made, f"enum value {enum}.{value}")
                        self.add("schema", code, f"enum {enum} has no value {value!r}", why, evidence, fix, count=n, migration=tag)
                        continue
                    self.add("data", code, f"the app sends {value!r}, which enum {enum} does not have",
                             f"no migration of release {self.current} adds it", evidence,
                             f"add it in a migration (ALTER TYPE {enum} ADD VALUE) and deploy, or fix the app's value", count=n)
                else:
                    self.add("data", code, "invalid input for a column's type", _short(message), evidence,
                             "a bad value from the app or its users: see the statement and the app's validation", count=n)
            elif code == "23505":
                m = re.search(r'unique constraint "([^"]+)"', message or "")
                self.add("data", code, f"duplicate keys on {m.group(1) if m else 'a unique constraint'}",
                         "the app inserts a row whose key exists", evidence,
                         "upsert on the constraint's columns (INSERT ... ON CONFLICT) or check the app's logic; no deploy fixes data",
                         count=n)
            elif code == "23502":
                m = re.search(r'column "([^"]+)"(?: of relation "([^"]+)")?', message or "")
                col, table = (m.group(1), m.group(2)) if m else ("?", None)
                made = self.creator(("column", table, col)) if table else None
                where = f" (added by {made[0]})" if made else ""
                self.add("data", code, f"the app writes NULL into {table + '.' if table else ''}{col}, which is NOT NULL{where}",
                         f"release {self.current} does not set it", evidence,
                         f"deploy a release that sets it (invoke deploy --host {self.host}), or give the column a DEFAULT in a new "
                         "migration", count=n)
            elif code is None:
                self.add("sql-other", "?", f"PostgreSQL error: {_short(message, 100)}",
                         "its SQLSTATE is not in the log (log_line_prefix has no %e) and the message is not one diagnose "
                         "knows", evidence, "see the statement and the app's log; add %e to log_line_prefix", count=n)
            else:
                self.add("sql-other", code, f"PostgreSQL error {code}: {_short(message, 100)}", "no rule of diagnose for this code",
                         evidence, "see the statement and the app's log", count=n)

    def resolved_error(self, code: str, message: str | None, last: dict, n: int) -> bool:
        """A schema error whose object the live schema has now: a note, not a cause."""
        table = None
        if code == "42P10":
            target = on_conflict_target(last.get("statement"))
            table = target[0] if target else None
            made = self.creator(("unique", *target)) if target else None
        elif code == "42P01":
            m = re.search(r'relation "([^"]+)"', message or "")
            table = m.group(1).split(".")[-1] if m else None
            made = self.creator(("table", table)) if table else None
        elif code == "42703":
            m = re.search(r'column "([^"]+)" of relation "([^"]+)"', message or "")
            table = m.group(2) if m else None
            made = self.creator(("column", table, m.group(1))) if m else None
        else:
            return False
        if made is None or self.status_of(made[0]) != "applied" or not self.exists_now(table):
            return False
        self.explained.add(made[0])
        self.resolved.append(f"{n} {code} line(s) ({_short(message, 80)}), last {last.get('time')}: fixed since - "
                             f"{made[0]} is applied and the drift check finds {table} as its migrations make it")
        return True

    def migration_timeouts(self) -> None:
        recs = [r for r in self.pg_records if r.get("sqlstate") in ("55P03", "57014")]
        deploys = self.state.get("deploys") or []
        failed = [d for d in deploys if d.get("result") != "ok" and isinstance(d.get("failure"), dict)
                  and d["failure"].get("phase") == "db_migrate"
                  and re.search(r"55P03|57014|lock timeout|statement timeout|lock_timeout|statement_timeout",
                                json.dumps(d["failure"]))]
        if failed:
            last = failed[-1]
            evidence = [f"deploy run {last.get('run_id')} ({last.get('finished')}): {_short(last['failure'].get('cause'))}"]
            evidence += [_pg_line(recs[-1], len(recs))] if recs else []
            self.add("migration-timeout", "55P03" if "lock" in json.dumps(last["failure"]) else "57014",
                     "a migration was stopped by a lock or statement timeout",
                     "another session held a lock the migration needed (or it ran too long); the migration's transaction rolled back",
                     evidence, "find the blocking session (pg_stat_activity, pg_locks) and let it finish, then "
                     f"invoke deploy --host {self.host} again", count=len(failed))
        elif recs:
            last = recs[-1]
            self.add("data", last["sqlstate"], "statements cancelled by a lock or statement timeout", _short(last.get("message")),
                     [_pg_line(last, len(recs))] + ([f"  STATEMENT: {_short(last['statement'])}"] if last.get("statement") else []),
                     "find what blocks them (pg_stat_activity, pg_locks) or raise the app's timeout", count=len(recs))

    def evaluate_drift(self) -> None:
        read = self.drift_read
        if not read:
            return
        if read.get("failed") or read.get("busy"):
            self.notes.append(f"drift check not made: {_short(read.get('msg'), 200)}")
            return
        from .drift import evaluate

        try:
            self.drift = evaluate(read)
        except Exception as exc:  # noqa: BLE001 - the shadow's, psycopg's: one note, the diagnosis goes on
            self.notes.append(f"drift check not made: {type(exc).__name__}: {_short(exc, 200)}")

    def exists_now(self, table: str | None) -> bool:
        """Whether the drift check ran and finds nothing missing or different on ``table``: the
        object an error lacked was made since (the migration applied, or a fix)."""
        if self.drift is None or not table:
            return False
        return not any(f["kind"] != "migration" and table in ((f.get("object") or {}).get("table"), (f.get("object") or {}).get("name"))
                       for f in self.drift["findings"])

    def drift_findings(self) -> None:
        if self.drift is None:
            return
        schema = [f for f in self.drift["findings"] if f["kind"] != "migration"
                  and (f.get("migration") or {}).get("tag") not in self.explained]
        if not schema:
            return
        worst = "critical" if any(f["severity"] == "critical" for f in schema) else "warning"
        evidence = [f"drift {f['severity']}: {f['object'].get('kind')} {f['object'].get('name')}: {f['why']}" for f in schema[:5]]
        self.add("drift", "drift", f"the live schema differs from its migrations ({len(schema)} finding(s), worst {worst})",
                 "changed by hand, or a migration half applied", evidence,
                 f"invoke drift --fix --host {self.host}  (what is safe; the rest it names for a human)", count=len(schema))

    def migrations(self) -> None:
        db = self.state.get("db") or {}
        pending = [m["tag"] for m in db.get("migrations") or [] if m["status"] in ("pending", "skipped") and m["tag"] not in self.explained]
        tampered = [m["tag"] for m in db.get("migrations") or [] if m["status"] == "tampered" and m["tag"] not in self.explained]
        if pending:
            skipped = [t for t in pending if self.status_of(t) == "skipped"]
            fix = (f"invoke drift --fix --host {self.host}  (runs pending and skipped migrations, a backup first)" if skipped
                   else f"invoke deploy --host {self.host}")
            self.add("migrations", "migrations", f"{len(pending)} migration(s) not applied: {', '.join(pending)}",
                     "pending: newer than the newest applied row" + ("; skipped: older than it, so drizzle never runs them" if skipped else ""),
                     [f"{t}: {self.status_of(t)}" for t in pending], fix, count=len(pending))
        if tampered:
            self.add("migrations", "tampered", f"{len(tampered)} applied migration(s) whose file changed: {', '.join(tampered)}",
                     "their hash differs from the tracking row's", [], f"invoke drift --host {self.host} shows what differs")
        if db.get("folder_error"):
            self.notes.append(f"migrations not read: {db['folder_error']}")

    def last_deploy(self) -> None:
        deploys = self.state.get("deploys") or []
        if not deploys or deploys[-1].get("result") == "ok" or any(c["kind"] == "migration-timeout" for c in self.causes):
            return
        last = deploys[-1]
        failure = last.get("failure") or {}
        back = f"; rolled back to {last.get('rolled_back_to')}" if last.get("rolled_back_to") else ""
        self.add("deploy-failed", "deploy", f"the last deploy (run {last.get('run_id')}, {last.get('finished')}) failed"
                 + (f" in {failure.get('phase')}" if isinstance(failure, dict) and failure.get("phase") else ""),
                 _short(failure.get("cause") if isinstance(failure, dict) else failure) + back,
                 [], f"fix the cause, then invoke deploy --host {self.host}")

    def facts(self) -> dict:
        st = self.state
        procs = (st.get("pm2") or {}).get("processes") or []
        db = st.get("db") or {}
        logs = st.get("logs") or {}
        return {"release": self.current, "previous": (st.get("release") or {}).get("previous"),
                "pm2": {"online": sum(1 for p in procs if p.get("status") == "online"), "total": len(procs),
                        "restarts": sum(p.get("restarts") or 0 for p in procs),
                        "releases": sorted({str(p.get("release")) for p in procs}),
                        "processes": [{k: p.get(k) for k in ("name", "pm_id", "pid", "status", "restarts", "unstable_restarts",
                                                             "uptime_seconds", "memory", "release", "exit_code")} for p in procs]},
                "health": (st.get("health") or {}).get("status"),
                "db": "ok" if db.get("ok") else (db.get("sqlstate") or "unreachable"),
                "migrations": db.get("counts"),
                "pg_log": {"path": (logs.get("pg") or {}).get("path"), "format": (logs.get("pg") or {}).get("format"),
                           "errors": len(self.pg_records), "read": "the PostgreSQL log" not in self.unread,
                           "log_line_prefix": (db.get("settings") or {}).get("log_line_prefix")},
                "app_log_lines": len(self.app_lines),
                "drift": None if self.drift is None else {"exit": self.drift["exit"], "findings": len(self.drift["findings"])}}


def collect(hosts: list[str], since: int) -> tuple[dict, dict]:
    from .runner import run_read_only

    return run_read_only("state.yml", hosts, {"slipway_state_since": since, "slipway_state_drift": True}, "state")


def diagnose_hosts(host: str, since: int) -> dict:
    from .inventory import resolve_target

    hosts = resolve_target(host)
    started = time.monotonic()
    data, failures = collect(hosts, since)
    out = {}
    for name in hosts:
        got = data.get(name)
        if name in failures or not got or not got.get("state") or got["state"].get("failed"):
            why = failures.get(name) or (got or {}).get("state", {}).get("msg") or "the host did not answer"
            out[name] = {"exit": COULD_NOT_LOOK, "error": _short(why, 400)}
            continue
        d = Diagnosis(name, got["state"], got.get("drift"), since)
        d.run()
        # a cause found stands; "healthy" needs every source read
        code = CAUSE if d.causes else COULD_NOT_LOOK if d.unread else HEALTHY
        out[name] = {"exit": code, "causes": d.causes, "notes": d.notes, "facts": d.facts(), "unread": d.unread}
    for info in out.values():
        info["seconds"] = round(time.monotonic() - started, 2)
    return out


def render(result: dict, since_text: str) -> list[str]:
    lines = []
    for name, info in result.items():
        if "error" in info:
            lines.append(f"{name}: could not look: {info['error']}")
            continue
        f = info["facts"]
        pm2 = f["pm2"]
        mig = f["migrations"] or {}
        head = (f"release {f['release']}; PM2 {pm2['online']}/{pm2['total']} online; health {f['health'] or '-'}; "
                f"database {f['db']}; migrations {mig.get('applied', '?')} applied, {mig.get('pending', '?')} pending; "
                f"since {since_text}: "
                + (f"{f['pg_log']['errors']} PostgreSQL error line(s)" if f["pg_log"]["read"] else "PostgreSQL log not read")
                + f", {f['app_log_lines']} app log line(s)")
        if info["causes"]:
            lines.append(f"{name}: {len(info['causes'])} cause(s) found - {head}")
        elif info.get("unread"):
            lines.append(f"{name}: no cause found, but could not look at {' and '.join(info['unread'])} - {head}")
        else:
            lines.append(f"{name}: healthy - {head}")
        for i, c in enumerate(info["causes"], 1):
            lines.append(f"  {i}. [{c['code']}] {c['title']}")
            if c.get("why"):
                lines.append(f"     why: {c['why']}")
            if c["evidence"]:
                lines.append("     evidence:")
                lines += [f"       {e}" for e in c["evidence"]]
            lines.append(f"     fix: {c['fix']}")
        for note in info["notes"]:
            lines.append(f"  note: {note}")
    return lines


def diagnose(host: str, since: str = "1h", as_json: bool = False) -> int:
    seconds = parse_since(since)
    result = diagnose_hosts(host, seconds)
    if as_json:
        print(json.dumps({"since": since, "hosts": result}, indent=2, sort_keys=True, default=str))
    else:
        print("\n".join(render(result, since)))
    codes = [i["exit"] for i in result.values()]
    return COULD_NOT_LOOK if COULD_NOT_LOOK in codes else (CAUSE if CAUSE in codes else HEALTHY)
