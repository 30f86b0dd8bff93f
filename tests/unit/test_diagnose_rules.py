"""slipway/diagnose.py's rules on what module app_state returns (its documented shape): each
SQLSTATE and process failure the issue names, the migration that makes the missing object (read
from the migration files with pglast), the fix, the ranking, and log lines from before the last
deploy left out. The integration test (test_diagnose.py) meets the same rules on real hosts."""
from __future__ import annotations

import json

import pytest

from slipway.diagnose import Diagnosis, on_conflict_target, parse_since
from slipway.errors import SlipwayError

NOW = 1_800_000_000.0
MIGRATIONS = {
    "0000_init": 'CREATE TABLE "books" ("id" serial PRIMARY KEY, "title" text NOT NULL);\n--> statement-breakpoint\n'
                 "CREATE TYPE \"mood\" AS ENUM('happy', 'sad');",
    "0001_stats": 'CREATE TABLE "stats" ("book_id" integer NOT NULL, "view_type" text NOT NULL, "n" integer);',
    "0002_unique": 'ALTER TABLE "stats" ADD CONSTRAINT "stats_book_view_unique" UNIQUE("book_id","view_type");',
    "0003_more": 'ALTER TABLE "books" ADD COLUMN "subtitle" text;\n--> statement-breakpoint\n'
                 "ALTER TYPE \"mood\" ADD VALUE 'bored';\n--> statement-breakpoint\n"
                 "CREATE FUNCTION slugify(t text) RETURNS text LANGUAGE sql AS $$ SELECT lower(t) $$;",
    "0004_later": 'CREATE TABLE "reviews" ("id" serial PRIMARY KEY);',
}


def content() -> dict:
    entries = [{"idx": i, "version": "7", "when": 1_700_000_000_000 + i, "tag": tag, "breakpoints": True}
               for i, tag in enumerate(MIGRATIONS)]
    out = {"meta/_journal.json": json.dumps({"version": "7", "dialect": "postgresql", "entries": entries})}
    out.update({f"{tag}.sql": sql for tag, sql in MIGRATIONS.items()})
    return out


def state(statuses: dict | None = None, records=(), app_lines=(), pm2_lines=(), procs=None, deploys=(), health=200,
          db_ok=True, app_db=None) -> dict:
    statuses = statuses or {}
    migs = [{"tag": t, "status": statuses.get(t, "applied"), "when": i} for i, t in enumerate(MIGRATIONS)]
    counts = {k: sum(1 for m in migs if m["status"] == k) for k in ("applied", "pending", "skipped", "tampered")}
    procs = procs if procs is not None else [
        {"name": "app", "pm_id": i, "pid": 100 + i, "status": "online", "restarts": 0, "unstable_restarts": 0,
         "uptime_seconds": 600, "release": "r2", "err_log": "/app/logs/err.log"} for i in range(2)]
    return {
        "app_name": "app", "now": NOW,
        "release": {"current": "r2", "current_since": NOW - 3000, "previous": "r1", "installed": ["r2", "r1"]},
        "deploys": list(deploys), "lock": {"held": False, "meta": None, "stale": False},
        "pm2": {"daemon": True, "processes": procs, "error": None, "home": "/h/.pm2"},
        "db": {"ok": db_ok, "sqlstate": None if db_ok else "08006", "error": None if db_ok else "connection refused",
               "settings": {"log_line_prefix": "%m [%p] %e %q%u@%d "}, "migrations": migs if db_ok else [],
               "counts": {**counts, "unknown_rows": 0} if db_ok else None, "folder": "/app/current/drizzle"},
        "backups": {"count": 1, "last": None},
        "health": {"url": "http://127.0.0.1:3000/api/health", "status": health, "expected": 200, "error": None, "body": ""},
        "logs": {"pg": {"path": "/pg.log", "format": "stderr", "records": list(records), "notes": [], "error": None},
                 "app": [{"path": "/app/logs/err.log", "lines": [x[1] for x in app_lines],
                          "times": [x[0] for x in app_lines], "timed": True}],
                 "pm2": {"path": "/h/.pm2/pm2.log", "lines": [x[1] for x in pm2_lines], "times": [x[0] for x in pm2_lines]},
                 "app_db": app_db or {"tried": True, "ok": True, "sqlstate": None, "error": None}},
    }


def rec(code, message, statement=None, at=NOW - 60, level="ERROR"):
    return {"level": level, "sqlstate": code, "message": message, "statement": statement, "time": "t", "epoch": at,
            "inferred": False}


def diagnose(st, drift=True) -> Diagnosis:
    d = Diagnosis("web1", st, {"migrations_content": content()} if drift else None, 3600)
    d.run()
    return d


def test_a_healthy_host_has_no_cause():
    assert diagnose(state()).causes == []


def test_42p10_names_table_columns_the_pending_migration_and_deploy():
    d = diagnose(state({"0002_unique": "pending", "0003_more": "pending", "0004_later": "pending"}, records=[
        rec("42P10", "there is no unique or exclusion constraint matching the ON CONFLICT specification",
            "INSERT INTO stats (book_id, view_type, n) VALUES ($1, $2, 1) ON CONFLICT (view_type, book_id) DO UPDATE SET n = stats.n + 1")]))
    first = d.causes[0]
    assert (first["code"], first["table"], first["columns"], first["migration"]) == ("42P10", "stats", ["book_id", "view_type"], "0002_unique")
    assert first["fix"].startswith("invoke deploy --host web1") and "pending" in first["why"]
    # the other pending migrations are one more cause; 0002 is not repeated there
    rest = [c for c in d.causes if c["kind"] == "migrations"]
    assert rest and "0002_unique" not in rest[0]["title"] and "0003_more" in rest[0]["title"]


@pytest.mark.parametrize("status,fix", [
    ("skipped", "invoke drift --fix --host web1"),
    ("applied", "invoke drift --fix --host web1"),
    ("tampered", "invoke drift --host web1"),
])
def test_42p10_fix_follows_the_migrations_state(status, fix):
    st = state({"0002_unique": status}, records=[rec("42P10", "there is no unique ...", "INSERT INTO stats (book_id, view_type) VALUES ($1, $2) ON CONFLICT (book_id, view_type) DO NOTHING")])
    assert diagnose(st).causes[0]["fix"].startswith(fix)


def test_42p10_without_a_migration_asks_for_one():
    st = state(records=[rec("42P10", "x", "INSERT INTO books (title) VALUES ($1) ON CONFLICT (title) DO NOTHING")])
    first = diagnose(st).causes[0]
    assert first["migration"] is None and "no migration of release r2 creates a UNIQUE constraint on books(title)" == first["why"]


@pytest.mark.parametrize("code,message,tag,title", [
    ("42P01", 'relation "reviews" does not exist', "0004_later", "table reviews does not exist"),
    ("42703", 'column "subtitle" of relation "books" does not exist', "0003_more", "column books.subtitle does not exist"),
    ("42703", 'column "subtitle" does not exist', "0003_more", "column subtitle does not exist"),
    ("42704", 'type "mood" does not exist', "0000_init", "type mood does not exist"),
    ("42883", "function slugify(text) does not exist", "0003_more", "function slugify does not exist (for these argument types)"),
    ("22P02", 'invalid input value for enum mood: "bored"', "0003_more", "enum mood has no value 'bored'"),
])
def test_each_schema_error_names_the_migration_that_makes_the_object(code, message, tag, title):
    st = state({tag: "pending"}, records=[rec(code, message)])
    first = diagnose(st).causes[0]
    assert (first["code"], first["title"], first["migration"]) == (code, title, tag)
    assert first["fix"].startswith("invoke deploy --host web1")


def test_a_missing_function_no_migration_makes_points_at_extensions():
    first = diagnose(state(records=[rec("42883", "function gen_random_uuid7() does not exist")])).causes[0]
    assert first["migration"] is None and "extension" in first["why"]


def test_data_errors_are_ranked_below_schema_errors():
    d = diagnose(state({"0004_later": "pending"}, records=[
        rec("23505", 'duplicate key value violates unique constraint "stats_book_view_unique"'),
        rec("23505", 'duplicate key value violates unique constraint "stats_book_view_unique"'),
        rec("23502", 'null value in column "title" of relation "books" violates not-null constraint'),
        rec("42P01", 'relation "reviews" does not exist'),
    ]))
    assert [c["code"] for c in d.causes[:3]] == ["42P01", "23505", "23502"]
    assert d.causes[1]["count"] == 2 and "no deploy fixes data" in d.causes[1]["fix"]
    assert "books.title" in d.causes[2]["title"]


def test_a_migration_stopped_by_lock_timeout():
    deploys = [{"run_id": "r-1", "finished": "2027-01-15T08:00:00+00:00", "result": "failed",
                "failure": {"phase": "db_migrate", "cause": "0004_later: canceling statement due to lock timeout (55P03)"}}]
    d = diagnose(state(deploys=deploys, records=[rec("55P03", "canceling statement due to lock timeout")]))
    first = d.causes[0]
    assert first["kind"] == "migration-timeout" and first["code"] == "55P03"
    assert "pg_stat_activity" in first["fix"] and not [c for c in d.causes if c["kind"] == "deploy-failed"]


def test_eaddrinuse_names_the_port():
    lines = [(NOW - 30, "2027-01-15T08:00:00: Error: listen EADDRINUSE: address already in use 127.0.0.1:3000")]
    procs = [{"name": "app", "pm_id": 0, "pid": 0, "status": "errored", "restarts": 15, "unstable_restarts": 15, "release": "r2"}]
    d = diagnose(state(app_lines=lines, procs=procs, health=None))
    assert d.causes[0]["kind"] == "eaddrinuse" and "port 3000" in d.causes[0]["title"]
    assert "ss -ltnp 'sport = :3000'" in d.causes[0]["fix"]
    assert not [c for c in d.causes if c["kind"] == "crash-loop"]  # the same failure, said once


def test_out_of_memory_when_the_app_is_restarting_now():
    lines = [(NOW - 30, "FATAL ERROR: Reached heap limit Allocation failed - JavaScript heap out of memory")]
    exits = [(NOW - 30, "2027-01-15T07:59:30: PM2 log: App [app:0] exited with code [134] via signal [SIGABRT]")]
    d = diagnose(state(app_lines=lines, pm2_lines=exits))
    assert d.causes[0]["kind"] == "oom" and "--max-old-space-size" in d.causes[0]["fix"]
    # the same line in a log while every process is online and none exited: history, not a cause
    assert diagnose(state(app_lines=lines)).causes == []
    # PM2's own memory restart (its line names the process id only)
    memory = [(NOW - 30, "2027-01-15T07:59:30: PM2 log: [PM2][WORKER] Process 0 restarted because it exceeds "
                         "--max-memory-restart value (current_memory=300000000 max_memory_limit=200000000 [octets])")]
    assert diagnose(state(pm2_lines=memory)).causes[0]["kind"] == "oom"


def test_cumulative_unstable_restarts_alone_are_no_crash_loop_and_stopped_is_its_own_cause():
    procs = [{"name": "app", "pm_id": 0, "pid": 5, "status": "online", "restarts": 3, "unstable_restarts": 2, "release": "r2"}]
    assert diagnose(state(procs=procs)).causes == []
    procs = [{"name": "app", "pm_id": 0, "pid": 0, "status": "stopped", "restarts": 0, "release": "r2"}]
    first = diagnose(state(procs=procs, health=None)).causes[0]
    assert (first["kind"], first["code"]) == ("pm2", "stopped") and first["fix"].startswith("pm2 start app")


def test_without_the_migration_files_the_migration_is_not_guessed():
    st = state({"0004_later": "pending"}, records=[rec("42P01", 'relation "reviews" does not exist')])
    first = diagnose(st, drift=False).causes[0]
    assert first["migration"] is None and "could not be told" in first["why"] and "no migration" not in first["why"]
    st["migrations_content"] = content()  # what app_state returns with since: the release's files
    assert diagnose(st, drift=False).causes[0]["migration"] == "0004_later"


def test_an_error_without_sqlstate_is_still_a_cause():
    st = state(records=[dict(rec(None, "permission denied for table books"), inferred=True)])
    first = diagnose(st).causes[0]
    assert first["kind"] == "sql-other" and "%e" in first["fix"]


def test_no_healthy_without_the_postgresql_log():
    st = state()
    st["logs"]["pg"]["error"] = "cannot read /var/log/postgresql/postgresql-15-main.log: Permission denied"
    d = diagnose(st)
    assert d.causes == [] and d.unread == ["the PostgreSQL log"]
    from slipway.diagnose import render

    facts = d.facts()
    text = render({"web1": {"exit": 3, "causes": [], "notes": d.notes, "facts": facts, "unread": d.unread}}, "1h")
    assert text[0].startswith("web1: no cause found, but could not look at the PostgreSQL log") and "PostgreSQL log not read" in text[0]


def test_refused_logins_of_another_role_are_not_the_apps():
    scanner = dict(rec("28P01", 'password authentication failed for user "postgres"', level="FATAL"), user="postgres", db="postgres")
    app_db = {"tried": True, "ok": True, "sqlstate": None, "error": None, "user": "app", "db": "appdb"}
    assert diagnose(state(records=[scanner], app_db=app_db)).causes == []


def test_a_full_server_and_a_deploy_in_progress():
    st = state(db_ok=False)
    st["db"].update(sqlstate="53300", error="FATAL: remaining connection slots are reserved")
    first = diagnose(st).causes[0]
    assert first["code"] == "53300" and "pg_stat_activity" in first["fix"] and "start PostgreSQL" not in first["fix"]
    procs = [{"name": "app", "pm_id": 0, "pid": 5, "status": "online", "restarts": 0, "release": "r1"}]
    st = state(procs=procs)
    st["lock"] = {"held": True, "meta": {"run_id": "r-9", "command": "invoke deploy"}, "stale": False}
    d = diagnose(st)
    assert d.causes == [] and any("holds the deploy lock" in n for n in d.notes)


def test_a_crash_loop_outranks_sql_errors_and_names_the_apps_line():
    lines = [(NOW - 30, "2027-01-15T08:00:00: starting"), (NOW - 30, "TypeError: Cannot read properties of undefined (reading 'port')"),
             (NOW - 30, "    at Object.<anonymous> (/app/releases/r2/server.js:3:20)")]
    procs = [{"name": "app", "pm_id": i, "pid": 0, "status": "waiting restart", "restarts": 9, "unstable_restarts": 9,
              "release": "r2"} for i in range(2)]
    d = diagnose(state(app_lines=lines, procs=procs, health=None, records=[rec("42P01", 'relation "reviews" does not exist')],
                       statuses={"0004_later": "pending"}))
    assert [c["kind"] for c in d.causes[:2]] == ["crash-loop", "schema"]
    assert d.causes[0]["error_line"] == "TypeError: Cannot read properties of undefined (reading 'port')"
    assert d.causes[0]["fix"].startswith("invoke rollback --host web1  (back to r1)")


def test_pm2_running_another_release_than_current():
    procs = [{"name": "app", "pm_id": 0, "pid": 5, "status": "online", "restarts": 0, "release": "r1"}]
    first = diagnose(state(procs=procs)).causes[0]
    assert first["kind"] == "release-mismatch" and "runs release r1 but current points at r2" in first["title"]


def test_the_apps_wrong_password_and_an_unreachable_database():
    app_db = {"tried": True, "ok": False, "sqlstate": "28P01", "error": 'password authentication failed for user "app"'}
    d = diagnose(state(app_db=app_db, health=503, records=[rec("28P01", 'password authentication failed for user "app"', level="FATAL")]))
    assert d.causes[0]["code"] == "28P01" and "wrong password (slipway's own login works)" in d.causes[0]["title"]
    assert any(c["kind"] == "health" for c in d.causes)
    d = diagnose(state(db_ok=False, app_db={"tried": True, "ok": False, "sqlstate": None, "error": "connection refused"}))
    assert d.causes[0]["kind"] == "db-unreachable"


def test_lines_from_before_the_last_deploy_are_not_causes():
    deploys = [{"run_id": "r-2", "finished": "2027-01-15T08:00:00+00:00", "release": "r2", "result": "ok",
                "migrations_applied": ["0002_unique"], "switched_from": None}]
    from slipway.status import _epoch

    deployed_at = _epoch("2027-01-15T08:00:00+00:00")
    before = rec("42P10", "there is no unique ...", "INSERT INTO stats (book_id, view_type) VALUES ($1, $2) ON CONFLICT (book_id, view_type) DO NOTHING",
                 at=deployed_at - 10)
    st = state(deploys=deploys, records=[before], app_lines=[(deployed_at - 10, "Error tracking: (code 42P10)")])
    st["release"]["current_since"] = deployed_at - 3600
    d = diagnose(st)
    assert d.causes == [] and any("came before the last deploy" in n for n in d.notes)


def test_on_conflict_target_and_durations():
    assert on_conflict_target("INSERT INTO s.t AS x (a, b) VALUES ($1, $2) ON CONFLICT (b, a) WHERE a > 0 DO NOTHING") == ("t", ("a", "b"))
    assert on_conflict_target("INSERT INTO t (a) VALUES ($1) ON CONFLICT ON CONSTRAINT t_a DO NOTHING") is None
    assert on_conflict_target("not sql") is None
    assert parse_since("90s") == 90 and parse_since("30m") == 1800 and parse_since("2d") == 172800
    for bad in ("1w", "0h", "-1h", "h", ""):
        with pytest.raises(SlipwayError, match="is not a duration; use a number and s, m, h or d"):
            parse_since(bad)
