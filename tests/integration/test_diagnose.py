"""`invoke diagnose` and `invoke status` against real sandbox hosts (instance 11, two hosts in the
incident state: `sandbox` and `sandbox-2`), as an operator meets them. In file order:

- the incident (a POST answered 500): diagnose names 42P10, book_view_statistics(book_id,
  view_type), migration 0007 pending and `invoke deploy` as the fix; its output holds no secret;
- `sandbox-2` deployed, `invoke drift` over both: `invoke status --all` in the terminal, as JSON and
  as an HTML page that headless Chromium renders (a screenshot; the DOM holds each host's release,
  pending count and drift state); status changes nothing on either host;
- `sandbox` deployed: diagnose says healthy (the earlier 42P10 lines not counted);
- a wrong password in `sandbox`'s .env: diagnose names 28P01 for the app's DATABASE_URL;
- a crash-looping release on `sandbox-2`: diagnose names the crash loop and the app's own error line;
- bad input and an unreachable host: one line, exit 3.
"""
from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import cli, host_env, sandbox_up
from instances import sandbox_instance

INSTANCE = "11"
ENV = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
TRACKING = "SELECT id, hash, created_at FROM drizzle.__drizzle_migrations ORDER BY id"


@pytest.fixture(scope="module")
def hosts():
    with sandbox_up(INSTANCE, hosts=2, state="incident"):
        with sandbox_instance(INSTANCE) as sb:
            found = {name: sb.find_host(name) for name in ("sandbox", "sandbox-2")}
            creds = {name: sb.vault.load(sb.Controller().vault_file(name), sb.Controller().vault_password_file)
                     for name in found}
        yield {"host": found, "creds": creds, "env": {n: host_env(n, env=ENV) for n in found}}


def invoke(*args: str, expect: int, timeout: int = 300):
    proc = cli(*args, check=False, env=ENV, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def diagnose(host: str, expect: int, *args: str) -> tuple[dict, str]:
    """(the host's JSON diagnosis, the text output)."""
    doc = json.loads(invoke("diagnose", "--host", host, "--json", *args, expect=expect).stdout)
    text = invoke("diagnose", "--host", host, *args, expect=expect).stdout
    return doc["hosts"][host], text


def post_track_view(hosts, name: str) -> int:
    from slipway.sandbox import INCIDENT_BOOK, http_json

    host = hosts["host"][name]
    status, _ = http_json("POST", f"{host.app_url}/api/books/{INCIDENT_BOOK}/track-view", {"viewType": "card_view"},
                          token=hosts["creds"][name]["slipway_api_token"])
    return status


def secrets(hosts) -> list[str]:
    return [v for c in hosts["creds"].values() for k, v in c.items() if k in ("slipway_db_password", "slipway_api_token")]


def pm2_as_user(hosts, name: str, *args: str, env: dict | None = None):
    import pwd

    from slipway.sandbox import run, user_env

    host = hosts["host"][name]
    user = pwd.getpwnam(host.user)
    return run(["pm2", *args], env={**user_env(host, user), **(env or {})}, cwd=host.home, user=user, timeout=90)


def reload_app(hosts, name: str) -> None:
    """`pm2 reload` from the ecosystem file with --update-env, as an operator changing .env does."""
    from slipway.sandbox import pm2_start_env

    host = hosts["host"][name]
    import pwd

    env = pm2_start_env(host, pwd.getpwnam(host.user))
    pm2_as_user(hosts, name, "reload", str(host.app_dir / "current" / "ecosystem.config.js"), "--update-env", env=env)


def snapshot(hosts, name: str) -> dict:
    """What a read-only command must leave as it was: the app dir's files, the lock, the tracking rows."""
    host = hosts["host"][name]
    files = {}
    for root, dirs, names in os.walk(host.app_dir):
        # the module runtime is what a host's first look installs (said on the page and in the README)
        dirs[:] = [d for d in dirs if d not in ("node_modules", "runtime")]
        for n in names + [d for d in dirs if not (Path(root) == host.app_dir and d == ".slipway")]:  # it holds the runtime
            path = Path(root) / n
            st = path.lstat()
            files[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns if not path.is_dir() else 0)
    with psycopg.connect(hosts["env"][name]["DATABASE_URL"], autocommit=True) as conn:
        rows = conn.execute(TRACKING).fetchall()
        databases = conn.execute("SELECT datname FROM pg_database ORDER BY 1").fetchall()
    pm2 = sorted(os.listdir(host.pm2_home))
    return {"files": files, "rows": rows, "databases": databases, "pm2_home": pm2,
            "current": os.readlink(host.app_dir / "current")}


# --------------------------------------------------------------------------------------------
def test_the_incident_is_diagnosed_as_42p10_with_its_table_migration_and_fix(hosts):
    from slipway.sandbox import wait_for_line

    assert post_track_view(hosts, "sandbox") == 500
    wait_for_line(hosts["host"]["sandbox"].pg_log, " 42P10 ", timeout=15)
    from slipway.sandbox import psql_admin

    host = hosts["host"]["sandbox"]
    # a role that may create databases, its DDL logged: diagnose must build no shadow on the server
    with sandbox_instance(INSTANCE):
        psql_admin(host, "ALTER ROLE booksuser CREATEDB; ALTER ROLE booksuser SET log_statement = 'ddl';")
    try:
        before = snapshot(hosts, "sandbox")
        log_size = host.pg_log.stat().st_size
        found, text = diagnose("sandbox", 1)
        after = snapshot(hosts, "sandbox")
        changed = {k: (before["files"].get(k), after["files"].get(k)) for k in set(before["files"]) | set(after["files"])
                   if before["files"].get(k) != after["files"].get(k)}
        assert after == before, ("invoke diagnose changed the host", changed)
        with open(host.pg_log, errors="replace") as log:
            log.seek(log_size)
            assert "CREATE DATABASE" not in log.read().upper()
    finally:
        with sandbox_instance(INSTANCE):
            psql_admin(host, "ALTER ROLE booksuser NOCREATEDB; ALTER ROLE booksuser RESET log_statement;")
    assert found["exit"] == 1
    first = found["causes"][0]
    assert first["code"] == "42P10"
    assert first["table"] == "book_view_statistics" and first["columns"] == ["book_id", "view_type"]
    assert first["migration"] == "0007_add_unique_constraint_book_view_statistics"
    assert "pending" in first["why"]
    assert first["fix"].startswith("invoke deploy --host sandbox")
    assert any("42P10" in e and "ON CONFLICT" in e for e in first["evidence"])
    assert any(e.startswith("app err.log:") and "Error tracking book view" in e for e in first["evidence"])
    assert any("STATEMENT: INSERT INTO book_view_statistics" in e for e in first["evidence"])
    # 0007 is named by that cause: no second cause for the same pending migration
    assert not [c for c in found["causes"] if c["kind"] == "migrations"]
    assert found["facts"]["migrations"]["pending"] == 1 and found["facts"]["drift"]["exit"] == 1
    assert "1. [42P10] INSERT ... ON CONFLICT (book_id, view_type) on book_view_statistics" in text
    assert "fix: invoke deploy --host sandbox" in text
    for secret in secrets(hosts):
        assert secret not in text and secret not in json.dumps(found)


def test_status_of_an_incident_host_and_a_healthy_one(hosts, tmp_path):
    invoke("deploy", "--host", "sandbox-2", expect=0, timeout=600)
    page = tmp_path / "status.html"
    # records each host's last check (WARNING, OK) and refreshes the page, as drift.schedule --html does
    drifted = invoke("drift", "--host", "sandboxes", "--html", str(page), expect=1).stdout
    assert f"status page: {page}" in drifted
    assert 'data-host="sandbox" data-field="drift">WARNING' in page.read_text()
    assert 'data-host="sandbox-2" data-field="drift">OK' in page.read_text()
    page.unlink()
    before = {n: snapshot(hosts, n) for n in ("sandbox", "sandbox-2")}
    text = invoke("status", "--all", "--html", str(page), expect=0).stdout
    doc = json.loads(invoke("status", "--all", "--json", expect=0).stdout)
    assert {n: snapshot(hosts, n) for n in ("sandbox", "sandbox-2")} == before, "invoke status changed a host"

    incident, healthy = doc["hosts"]["sandbox"], doc["hosts"]["sandbox-2"]
    assert incident["environment"] == healthy["environment"] == "sandboxes"
    assert incident["migrations"]["pending"] == 1 and healthy["migrations"]["pending"] == 0
    assert incident["migration_states"]["0007_add_unique_constraint_book_view_statistics"] == "pending"
    assert healthy["migration_states"]["0007_add_unique_constraint_book_view_statistics"] == "applied"
    assert incident["drift"]["state"] == "WARNING" and healthy["drift"]["state"] == "OK"
    assert incident["release"]["deployed"] is None  # built by hand (the sandbox), never deployed by slipway
    deployed = healthy["release"]["deployed"]
    assert deployed["result"] == "ok" and deployed["run_id"]
    assert healthy["backup"]["id"] and healthy["backup"]["age_seconds"] < 600  # the deploy's verified backup
    assert incident["backup"] is None
    assert healthy["pm2"]["online"] == healthy["pm2"]["total"] == 2
    assert not healthy["lock"]["held"] and not incident["lock"]["held"]
    release = healthy["release"]["current"]
    for line in ("sandbox-2", "sandbox ", "7 applied, 1 pending", "8 applied, 0 pending", "WARNING", "2/2 online"):
        assert line in text, line

    shot = tmp_path / "status.png"
    browser = [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1600,900"]
    subprocess.run([*browser, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout

    cells = DomCells()
    cells.feed(dom)
    assert cells.get("sandbox-2", "release").startswith(release)
    assert "8 applied, 0 pending" in cells.get("sandbox-2", "migrations")
    assert "7 applied, 1 pending" in cells.get("sandbox", "migrations")
    assert cells.get("sandbox", "drift").startswith("WARNING")
    assert cells.get("sandbox-2", "drift").startswith("OK")
    assert cells.matrix[("sandbox", "0007_add_unique_constraint_book_view_statistics")] == "pending"
    assert cells.matrix[("sandbox-2", "0007_add_unique_constraint_book_view_statistics")] == "applied"
    source = page.read_text()
    for remote in ("<script", "http://", "https://", "src=", "<link", "url("):
        assert remote not in source, remote
    for secret in secrets(hosts):
        assert secret not in source and secret not in text


class DomCells(html.parser.HTMLParser):
    """The text of every <td data-host data-field|data-migration> in a DOM Chromium dumped."""

    def __init__(self):
        super().__init__()
        self.fields, self.matrix, self._open = {}, {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-host" in a:
            self._open = (a["data-host"], a.get("data-field"), a.get("data-migration"), [])

    def handle_data(self, data):
        if self._open:
            self._open[3].append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._open:
            host, field, migration, text = self._open
            if field:
                self.fields[(host, field)] = "".join(text)
            if migration:
                self.matrix[(host, migration)] = "".join(text)
            self._open = None

    def get(self, host, field):
        return self.fields[(host, field)]


def test_after_the_deploy_the_incident_host_is_healthy(hosts):
    invoke("deploy", "--host", "sandbox", expect=0, timeout=600)
    assert post_track_view(hosts, "sandbox") == 200
    found, text = diagnose("sandbox", 0)
    assert found["causes"] == []
    assert text.startswith("sandbox: healthy - ")
    assert any("came before the last deploy" in n for n in found["notes"])


def test_a_wrong_database_password_in_the_apps_env_is_28p01(hosts):
    host = hosts["host"]["sandbox"]
    env_file = host.app_dir / "shared" / ".env"
    good = env_file.read_text()
    password = hosts["creds"]["sandbox"]["slipway_db_password"]
    wrong = "Wr0ng-" + password[::-1][:12]
    env_file.write_text(good.replace(f":{password}@", f":{wrong}@"))
    try:
        reload_app(hosts, "sandbox")
        from slipway.sandbox import http_json

        status, _ = http_json("GET", host.app_url + "/api/health", timeout=5)
        assert status == 503
        found, text = diagnose("sandbox", 1)
        first = found["causes"][0]
        assert first["code"] == "28P01" and first["kind"] == "app-db"
        assert "wrong password" in first["title"] and "slipway's own login works" in first["title"]
        assert any("28P01" in e for e in first["evidence"])
        assert any(c["kind"] == "health" and "503" in c["title"] for c in found["causes"])
        assert wrong not in text and password not in text
    finally:
        env_file.write_text(good)
        reload_app(hosts, "sandbox")


def test_a_crash_looping_release_names_the_apps_own_error_line(hosts):
    host = hosts["host"]["sandbox-2"]
    import pwd

    from slipway.sandbox import chown_tree

    current = host.app_dir / "current"
    good = os.readlink(current)
    source = Path(os.path.realpath(current))
    broken = source.with_name(source.name + "-broken")
    shutil.copytree(source, broken, symlinks=True)
    (broken / ".slipway-built").write_text(broken.name + "\n")
    server = broken / "server.js"
    server.write_text("throw new Error('reader-app: cannot read config: feature flag table missing');\n" + server.read_text())
    chown_tree(broken, pwd.getpwnam(host.user))
    tmp = host.app_dir / ".current.test"
    os.symlink(f"releases/{broken.name}", tmp)
    os.rename(tmp, current)
    try:
        pm2_as_user(hosts, "sandbox-2", "restart", "ollama-reader")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # PM2 restarts it until it gives up (errored) or backs off
            found, text = diagnose("sandbox-2", 1)
            if found["causes"] and found["causes"][0]["kind"] == "crash-loop":
                break
            time.sleep(2)
        first = found["causes"][0]
        assert first["kind"] == "crash-loop", found["causes"]
        assert first["error_line"] == "Error: reader-app: cannot read config: feature flag table missing"
        assert any("feature flag table missing" in e for e in first["evidence"])
        assert first["fix"].startswith("invoke rollback --host sandbox-2")
        assert "is crash-looping on release " + broken.name in text
    finally:
        os.symlink(good, tmp)
        os.rename(tmp, current)
        pm2_as_user(hosts, "sandbox-2", "restart", "ollama-reader")


def test_bad_input_and_an_unreachable_host_are_one_line_and_exit_3(hosts):
    proc = invoke("diagnose", "--host", "sandbox", "--since", "yesterday", expect=3)
    assert proc.stderr.strip() == ("error: --since 'yesterday' is not a duration; use a number and s, m, h or d, "
                                   "e.g. --since 30m or --since 2h")
    proc = invoke("diagnose", "--host", "nosuchhost", expect=3)
    assert proc.stderr.startswith("error: no host or group named 'nosuchhost'") and len(proc.stderr.splitlines()) == 1
    proc = invoke("status", expect=3)
    assert proc.stderr.strip() == "error: no hosts named; pass --host HOST_OR_GROUP or --all"
    proc = invoke("status", "--all", "--html", "/nonexistent-dir/status.html", expect=3)
    assert proc.stderr.startswith("error: --html /nonexistent-dir/status.html: the directory /nonexistent-dir does not exist")

    from slipway.sandbox import stop_sshd

    host = hosts["host"]["sandbox-2"]
    with sandbox_instance(INSTANCE):
        stop_sshd(host)
    found, _ = diagnose("sandbox-2", 3)  # the fixture's sandbox.down takes the rest away
    assert "error" in found
    doc = json.loads(invoke("status", "--all", "--json", expect=3).stdout)
    assert "error" in doc["hosts"]["sandbox-2"] and doc["hosts"]["sandbox"]["migrations"]["pending"] == 0
