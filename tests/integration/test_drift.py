"""`invoke drift` against a real sandbox host (instance 2), as a monitoring system would run it:
healthy -> 0; the incident (0007 pending) -> 1; drifted by hand (a constraint dropped with its
tracking row present, an index dropped, a column added) -> 2, each finding with the migration that
makes it, the cause and the fix; an INVALID unique index left by a failed CREATE UNIQUE INDEX
CONCURRENTLY -> 2; a migration running (its advisory lock held) -> 3, never drift; a host that does
not exist -> 3 with one line. The sandbox's database role may not create databases, so the expected
schema is built in an ephemeral PostgreSQL on the controller; a role that may gets it on the server."""
from __future__ import annotations

import json

import psycopg
import pytest
from conftest import cli, host_env, sandbox_up

from ansible_collections.slipway.core.plugins.module_utils import shadow  # isort: skip
from ansible_collections.slipway.core.plugins.module_utils.migrate import LOCK_CLASS  # isort: skip

INSTANCE = "2"
ENV = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
UNIQUE = "book_view_statistics_book_id_view_type_unique"


@pytest.fixture(scope="module")
def host():
    with sandbox_up(INSTANCE, state="drifted"):
        yield host_env("sandbox", env=ENV)


def drift(*args: str, expect: int):
    proc = cli("drift", "--host", "sandbox", *args, check=False, env=ENV, timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def findings(proc) -> list[dict]:
    doc = json.loads(proc.stdout)
    return doc["hosts"]["sandbox"]["result"]["findings"]


def state(name: str) -> None:
    cli("sandbox.up", "--state", name, env=ENV)


def test_drifted_host_is_critical_with_each_findings_migration_and_cause(host):
    proc = drift(expect=2)
    assert proc.stdout.splitlines()[-1] == "CRITICAL: drift check of sandbox"
    assert "expected schema built in an ephemeral PostgreSQL 15 on the controller" in proc.stdout
    found = {(f["kind"], f["object"]["name"]): f for f in findings(drift("--json", expect=2))}
    assert set(found) == {("missing", UNIQUE), ("missing", "books_title_idx"), ("extra", "public.books.hotfix_note")}
    constraint = found[("missing", UNIQUE)]
    assert constraint["severity"] == "critical" and constraint["cause"] == "applied_missing"
    assert constraint["migration"]["tag"] == "0007_add_unique_constraint_book_view_statistics"
    assert constraint["migration"]["statement"] == 3
    assert found[("missing", "books_title_idx")]["severity"] == "warning"
    assert found[("missing", "books_title_idx")]["migration"]["tag"].startswith("0004")
    column = found[("extra", "public.books.hotfix_note")]
    assert column["cause"] == "hand_made" and column["migration"] is None
    assert "made by: 0007_add_unique_constraint_book_view_statistics statement 3" in proc.stdout


def test_healthy_host_has_no_drift(host):
    state("healthy")
    proc = drift(expect=0)
    assert "sandbox: OK - 0 finding(s); migrations: 8 applied, 0 pending" in proc.stdout


def test_a_migration_running_is_could_not_check_never_drift(host):
    with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, shadow.lock_key("drizzle", "__drizzle_migrations")))
        proc = drift(expect=3)
    assert "UNKNOWN - could not check: a migration is running" in proc.stdout
    drift(expect=0)


def test_an_invalid_unique_index_is_critical(host):
    with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f"ALTER TABLE book_view_statistics DROP CONSTRAINT {UNIQUE}")
        book = conn.execute("SELECT book_id FROM book_view_statistics LIMIT 1").fetchone()[0]
        conn.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count) "
                     "SELECT book_id, view_type, 1 FROM book_view_statistics WHERE book_id = %s", (book,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {UNIQUE} ON book_view_statistics (book_id, view_type)")
    found = {(f["kind"], f["object"]["name"]): f for f in findings(drift("--json", expect=2))}
    assert found[("invalid", UNIQUE)]["severity"] == "critical" and "42P10" in found[("invalid", UNIQUE)]["why"]
    assert found[("missing", UNIQUE)]["severity"] == "critical"


def test_the_incident_is_a_pending_migration(host):
    state("incident")
    doc = json.loads(drift("--json", expect=1).stdout)
    found = doc["hosts"]["sandbox"]["result"]["findings"]
    assert [(f["kind"], f["object"]["name"], f["severity"]) for f in found] == [
        ("migration", "0007_add_unique_constraint_book_view_statistics", "warning")]
    assert doc["state"] == "WARNING" and "invoke deploy" in found[0]["fix"]


def test_a_role_that_may_create_databases_gets_its_shadow_on_the_server(host):
    """CREATEDB alone is not enough when pg_hba.conf lets the role reach only its own database (the
    sandbox's does): the controller builds the shadow and says why; allowed every database, the
    shadow is built next to the live database and dropped again."""
    import os

    from slipway.sandbox import DB_USER, Host, pg, psql_admin

    os.environ["SLIPWAY_SANDBOX_INSTANCE"] = INSTANCE
    sandbox = Host.make(1)
    hba = sandbox.pgdata / "pg_hba.conf"
    original = hba.read_text()
    try:
        psql_admin(sandbox, f"ALTER ROLE {DB_USER} CREATEDB;")
        doc = json.loads(drift("--json", expect=1).stdout)
        where = doc["hosts"]["sandbox"]["result"]["shadow"]
        assert where["where"].startswith("an ephemeral PostgreSQL 15 on the controller") and "pg_hba.conf" in where["why"]
        hba.write_text(original + f"host all {DB_USER} 127.0.0.1/32 scram-sha-256\n")
        pg("pg_ctl", "-D", sandbox.pgdata, "reload")
        proc = drift(expect=1)
        assert "expected schema built in a database on the same server" in proc.stdout, proc.stdout
        with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'slipway_shadow_%'").fetchone()[0] == 0
    finally:
        hba.write_text(original)
        pg("pg_ctl", "-D", sandbox.pgdata, "reload")
        psql_admin(sandbox, f"ALTER ROLE {DB_USER} NOCREATEDB;")
        os.environ["SLIPWAY_SANDBOX_INSTANCE"] = "1"


def test_a_host_that_does_not_exist_is_one_line_and_could_not_check(host):
    proc = cli("drift", "--host", "nosuchhost", check=False, env=ENV)
    assert proc.returncode == 3 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
