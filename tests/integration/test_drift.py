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
from instances import sandbox_instance

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
    drift("--include", "grants,comments", expect=0)  # the app role's own rights aside, none differ


def test_a_migration_running_is_could_not_check_never_drift(host):
    with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, shadow.lock_key("drizzle", "__drizzle_migrations")))
        proc = drift(expect=3)
    assert "UNKNOWN - could not check: a migration is running" in proc.stdout
    drift(expect=0)


def leave_an_invalid_unique_index(dsn) -> None:
    """What a failed CREATE UNIQUE INDEX CONCURRENTLY leaves: 0007's constraint dropped, one
    duplicate key group written, the build failing on it (the index left INVALID)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE book_view_statistics DROP CONSTRAINT {UNIQUE}")
        book = conn.execute("SELECT book_id FROM book_view_statistics LIMIT 1").fetchone()[0]
        conn.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count) "
                     "SELECT book_id, view_type, 1 FROM book_view_statistics WHERE book_id = %s LIMIT 1", (book,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {UNIQUE} ON book_view_statistics (book_id, view_type)")


def test_an_invalid_unique_index_is_critical(host):
    leave_an_invalid_unique_index(host["DATABASE_URL"])
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
    from slipway.sandbox import DB_USER, pg, psql_admin

    with sandbox_instance(INSTANCE) as sb:
        sandbox = sb.Host.make(1)
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


def test_a_host_that_does_not_exist_is_one_line_and_could_not_check(host):
    proc = cli("drift", "--host", "nosuchhost", check=False, env=ENV)
    assert proc.returncode == 3 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ alerts, metrics, cron
class Receiver:
    """A webhook on loopback that keeps every JSON document POSTed to it."""

    def __init__(self):
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_the_webhook_gets_one_alert_per_change_then_the_recovery(host, receiver, tmp_path):
    env = {**ENV, "SLIPWAY_CACHE": str(tmp_path / "cache")}
    metrics = tmp_path / "slipway_drift.prom"
    state("drifted")
    proc = cli("drift", "--host", "sandbox", "--notify", receiver.url, "--metrics", str(metrics), check=False, env=env)
    assert proc.returncode == 2 and "notify: sent for sandbox" in proc.stdout, proc.stdout + proc.stderr
    assert len(receiver.received) == 1
    alert = receiver.received[0]
    assert alert["state"] == "CRITICAL" and alert["environment"] == "sandbox" and alert["text"].startswith(
        "slipway drift: sandbox is CRITICAL: critical missing constraint")
    assert len(alert["findings"]) == 3 and len(alert["fingerprints"]) == 3 and alert["release"]
    text = metrics.read_text()
    assert 'slipway_drift_findings{env="sandbox",severity="critical"} 1' in text
    assert 'slipway_drift_findings{env="sandbox",severity="warning"} 2' in text
    assert 'slipway_migrations{env="sandbox",state="applied"} 8' in text and 'slipway_drift_up{env="sandbox"} 1' in text
    # the same drift again: no alert
    proc = cli("drift", "--host", "sandbox", "--notify", receiver.url, check=False, env=env)
    assert proc.returncode == 2 and "no change since the last alert, nothing sent" in proc.stdout
    assert len(receiver.received) == 1
    # fixed: the recovery
    state("healthy")
    proc = cli("drift", "--host", "sandbox", "--notify", receiver.url, "--metrics", str(metrics), check=False, env=env)
    assert proc.returncode == 0 and len(receiver.received) == 2, proc.stdout
    assert receiver.received[1]["recovered"] is True and receiver.received[1]["state"] == "OK"
    assert len(receiver.received[1]["gone"]) == 3
    assert 'slipway_drift_findings{env="sandbox",severity="critical"} 0' in metrics.read_text()
    for secret in (host["DATABASE_URL"],):
        assert secret not in json.dumps(receiver.received) and secret not in metrics.read_text()


def test_the_schedule_really_runs_under_cron_and_alerts(host, receiver, tmp_path):
    import os
    import shutil
    import subprocess
    import time

    cron = shutil.which("cron") or "/usr/sbin/cron"
    started_cron = subprocess.run(["pgrep", "-x", "cron"], capture_output=True).returncode != 0
    if started_cron:
        subprocess.run([cron], check=True)  # Debian's cron, installed by ./bootstrap; no systemd here
    env = {**ENV, "SLIPWAY_CACHE": str(tmp_path / "cache")}
    state("drifted")
    try:
        cli("drift.schedule", "--host", "sandbox", "--every", "1m", "--notify", receiver.url, env=env)
        crontab = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
        assert "#Ansible: slipway drift sandbox (sandbox instance 2)" in crontab
        assert receiver.url not in crontab  # the URL stays in the job's 0700 script
        script = next((tmp_path / "cache" / "drift").glob("schedule-*.sh"))
        assert oct(script.stat().st_mode & 0o777) == "0o700"
        log = tmp_path / "cache" / "drift" / "sandbox-sandbox2.log"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not (receiver.received and log.exists()
                                                   and "drift check of sandbox" in log.read_text()):
            time.sleep(2)
        assert receiver.received and receiver.received[0]["state"] == "CRITICAL", receiver.received
        assert "CRITICAL: drift check of sandbox" in log.read_text()
        # fixed by hand: the next run under cron sends the recovery, and only that
        state("healthy")
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and len(receiver.received) < 2:
            time.sleep(2)
        assert [r["state"] for r in receiver.received] == ["CRITICAL", "OK"], receiver.received
        assert receiver.received[1]["recovered"] is True
    finally:
        cli("drift.unschedule", "--host", "sandbox", env=env)
        if started_cron:
            subprocess.run(["pkill", "-x", "cron"], check=False)
    assert "slipway drift sandbox" not in subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
    assert not list((tmp_path / "cache" / "drift").glob("schedule-*.sh"))
    assert os.path.exists(log)  # the log stays


def test_bad_schedule_and_alert_inputs_are_one_line(host, tmp_path):
    for args, words in ((("drift.schedule", "--host", "sandbox", "--every", "7m"), "--every '7m' is not a period cron can keep"),
                        (("drift", "--host", "sandbox", "--notify", "ftp://x"), "is not an http(s) URL"),
                        (("drift", "--host", "sandbox", "--include", "owners"), "--include owners: not something drift"),
                        (("drift", "--host", "sandbox", "--metrics", str(tmp_path / "nodir" / "m.prom")), "not a file in an existing directory")):
        proc = cli(*args, check=False, env=ENV)
        assert proc.returncode != 0 and proc.stderr.startswith("error: ") and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ --fix
def views(dsn) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT coalesce(sum(view_count), 0) FROM book_view_statistics").fetchone()[0]


def test_fix_restores_what_is_safe_online_and_leaves_the_hand_made_column(host):
    state("drifted")
    before = views(host["DATABASE_URL"])
    doc = json.loads(drift("--fix", "--json", expect=1).stdout)
    info = doc["hosts"]["sandbox"]
    assert info["before"] == {"exit": 2, "findings": 3}
    done = {f["what"]: f for f in info["fixed"]}
    assert set(done) == {f"constraint {UNIQUE} on public.book_view_statistics", "index books_title_idx on public.books"}
    assert all(f["done"] for f in done.values()) and any("CONCURRENTLY" in s for f in done.values() for s in f["ran"])
    # what is reported is the check after the fix: the hand-made column alone, left for a human
    assert [(f["kind"], f["object"]["name"]) for f in info["result"]["findings"]] == [("extra", "public.books.hotfix_note")]
    assert [r["why"] for r in info["refused"]] == ["slipway never drops: review it, then add it to a migration or drop it by hand"]
    assert views(host["DATABASE_URL"]) == before
    with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:
        assert conn.execute("SELECT contype FROM pg_constraint WHERE conname = %s", (UNIQUE,)).fetchone() == ("u",)
    from slipway.sandbox import INCIDENT_BOOK, http_json

    status, _ = http_json("POST", f"{host['APP_URL']}/api/books/{INCIDENT_BOOK}/track-view", {"viewType": "card_view"},
                          token=host["API_TOKEN"], timeout=10)
    assert status == 200


def test_fix_does_not_build_a_unique_index_over_duplicates(host):
    state("healthy")
    leave_an_invalid_unique_index(host["DATABASE_URL"])
    proc = drift("--fix", expect=2)
    assert f"NOT FIXED: constraint {UNIQUE} on public.book_view_statistics: 1 duplicate key group(s)" in proc.stdout
    with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:  # the useless INVALID leftover is gone
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = %s", (UNIQUE,)).fetchone()[0] == 0
    state("healthy")


def test_fix_applies_a_pending_migration_through_the_engine_with_a_backup_first(host):
    state("incident")
    before = views(host["DATABASE_URL"])
    proc = drift("--fix", expect=0)
    assert "MIGRATED: 0007_add_unique_constraint_book_view_statistics (deploy lock held, backup sandbox_booksdb_" in proc.stdout
    assert "--fix: 1 finding(s) before (WARNING); now OK" in proc.stdout
    assert views(host["DATABASE_URL"]) == before  # 0007 consolidates the duplicates, every view kept
    from slipway.sandbox import INCIDENT_BOOK, http_json

    status, _ = http_json("POST", f"{host['APP_URL']}/api/books/{INCIDENT_BOOK}/track-view", {"viewType": "card_view"},
                          token=host["API_TOKEN"], timeout=10)
    assert status == 200
    with sandbox_instance(INSTANCE) as sb:
        backups = list(sb.Host.make(1).backup_dir.glob("sandbox_booksdb_*.dump"))
    assert backups and all(oct(b.stat().st_mode & 0o777) == "0o600" for b in backups)
