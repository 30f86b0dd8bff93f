"""Any PM2 + PostgreSQL + drizzle app, not only the reference one: examples/notes-app (TypeScript
built by `tsc` in its slipway.yml's build step, migrations in drizzle/ as drizzle.config.ts's `out`
says, an ecosystem.config.cjs with nothing in it for slipway, a health path of its own that names no
release, no track-view) deployed by `invoke deploy --release DIR` onto a bare sandbox host
(instance 8: user, sshd, PostgreSQL with the app's role and an empty database, Node and PM2; no app
directory, no PM2 daemon). Tests run in file order on one host."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import psycopg
import pytest
from conftest import ROOT, Outputs, cli, host_env, sandbox_up
from instances import sandbox_instance

INSTANCE = "8"
ENV = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
NOTES_APP = ROOT / "examples" / "notes-app"


@pytest.fixture(scope="module")
def bare():
    with sandbox_up(INSTANCE, state="bare"):
        with sandbox_instance(INSTANCE) as sb:
            host = sb.find_host("sandbox")
            inventory_dir = sb.Controller().inventory_dir
        values = host_env("sandbox", env=ENV)
        yield {"host": host, "dsn": values["DATABASE_URL"], "url": host.app_url, "inventory": inventory_dir}


def deploy(tmp_path: Path, *args: str, expect: int = 0):
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*.json')))}.json"
    proc = cli("deploy", "--host", "sandbox", *args, "--report", str(report), check=False, env=ENV, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, (json.loads(report.read_text()) if report.exists() else None)


def get(url: str, path: str):
    from slipway.sandbox import http_json

    return http_json("GET", url + path, timeout=5)


def query(bare, sql):
    with psycopg.connect(bare["dsn"], autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def pm2(bare):
    from slipway.sandbox import pm2_app_state, pwd

    host = bare["host"]
    with sandbox_instance(INSTANCE):
        return pm2_app_state(host, pwd.getpwnam(host.user), app="notes-api")


def copy_app(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(NOTES_APP, dest, ignore=shutil.ignore_patterns("node_modules", "dist", ".env"))
    return dest


def env_file(bare) -> Path:
    return bare["host"].app_dir / "shared" / ".env"


def set_app_env(bare, env: dict) -> None:
    """The inventory's slipway_app_env of the host (host_vars win over the generated inventory)."""
    import yaml

    path = bare["inventory"] / "host_vars" / "sandbox" / "app_env.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"slipway_app_env": env}))


# --------------------------------------------------------------------------------------------
def test_the_bare_host_has_nothing_deployed(bare):
    host = bare["host"]
    assert not host.app_dir.exists()
    assert query(bare, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'") == [(0,)]


def crashing_app(tmp_path: Path, name: str, words: str) -> Path:
    """The notes app, built fine, whose server says ``words`` on stderr and exits soon after it
    starts (as one that cannot reach what it needs does). (PM2 7 in cluster mode loses what a worker
    writes in the instant before it exits while it loads -- a synchronous throw or exit at load
    leaves empty log files, seen here -- so the exit comes 200 ms later.)"""
    app = copy_app(tmp_path, name)
    server = app / "src" / "server.ts"
    server.write_text(server.read_text() + f'\nconsole.error("notes-api: {words}");\nsetTimeout(() => process.exit(1), 200);\n')
    return app


def test_a_first_deploy_that_fails_leaves_nothing_running(bare, tmp_path):
    """Onto the empty database: the backup of nothing is valid, every migration applies; the
    release crashes at start and, no release having ever served healthy, the rescue stops the app
    instead of leaving it half-running -- and a second failing release does not go back to the
    first one (it never served)."""
    proc, report = deploy(tmp_path, "--release", str(crashing_app(tmp_path, "crash-1", "boom at start")), expect=1)
    info = report["hosts"]["sandbox"]
    out = proc.stdout + proc.stderr
    assert info["backup"]["toc_entries"] == 0  # a dump of an empty database
    assert info["migrations_applied"] == ["0000_init"]
    assert query(bare, "SELECT count(*) FROM drizzle.__drizzle_migrations") == [(1,)]
    assert info["stopped"] is True and info["rolled_back"] is False, info
    assert "no release served healthy before this deploy, so the rescue stopped the app" in out, out
    assert "boom at start" in out, out  # the app's own error line
    assert pm2(bare)["instances"] == 0
    first = os.path.basename(os.readlink(bare["host"].app_dir / "current"))

    proc, report = deploy(tmp_path, "--release", str(crashing_app(tmp_path, "crash-2", "boom again")), expect=1)
    info = report["hosts"]["sandbox"]
    assert info["stopped"] is True and info["rolled_back"] is False and info["rolled_back_to"] is None, info
    assert os.path.basename(os.readlink(bare["host"].app_dir / "current")) not in (first,)
    assert pm2(bare)["instances"] == 0


def test_then_the_app_deploys(bare, tmp_path):
    proc, report = deploy(tmp_path, "--release", str(NOTES_APP))
    info = report["hosts"]["sandbox"]
    assert report["result"] == "ok" and info["result"] == "ok", proc.stdout
    assert [p["name"] for p in info["phases"]] == ["preflight", "db_backup", "app_release", "db_migrate",
                                                   "pm2_app", "smoke_test"], info["phases"]
    assert info["migrations_applied"] == [] and info["backup"] is None  # 0000 came with the failed first deploy
    assert query(bare, "SELECT to_regclass('public.notes') IS NOT NULL") == [(True,)]
    # the release was built (tsc) on the controller: dist/ ships, node_modules does not (npm ci on the host)
    current = bare["host"].app_dir / "current"
    assert (current / "dist" / "server.js").is_file() and (current / "node_modules" / "pg").is_dir()
    assert not (current / "node_modules" / "typescript").exists()
    # shared/.env from slipway_app_env, DATABASE_URL and PORT added; private
    text = env_file(bare).read_text()
    assert "HOST=" in text and "DATABASE_URL=postgresql://booksuser:" in text and "PORT=" in text
    assert stat.S_IMODE(env_file(bare).stat().st_mode) == 0o600
    # the app serves from the release slipway started, by PM2's own account (its health names no release)
    status, body = get(bare["url"], "/healthz")
    assert (status, body) == (200, {"ok": True})
    state = pm2(bare)
    assert state["instances"] == 2 and state["online"] == 2
    assert {p["release"] for p in info["pm2"]["processes"]} == {report["release"]}
    assert [c["name"] for c in info["smoke"]["cases"]] == ["health", "notes list"]
    assert all(c["ok"] for c in info["smoke"]["cases"])


def test_a_failing_release_returns_to_the_healthy_one(bare, tmp_path):
    """... with the environment it ran with: the deploy's change to shared/.env is undone too."""
    good = os.path.basename(os.readlink(bare["host"].app_dir / "current"))
    env_before = env_file(bare).read_text()
    set_app_env(bare, {"HOST": bare["host"].address, "NODE_ENV": "production", "FEATURE_X": "on"})
    try:
        proc, report = deploy(tmp_path, "--release", str(crashing_app(tmp_path, "crash-3", "boom later")), expect=1)
    finally:
        (bare["inventory"] / "host_vars" / "sandbox" / "app_env.yml").unlink()
    info = report["hosts"]["sandbox"]
    assert info["rolled_back"] is True and info["rolled_back_to"] == good, info
    assert os.path.basename(os.readlink(bare["host"].app_dir / "current")) == good
    assert env_file(bare).read_text() == env_before and "FEATURE_X" not in env_before
    state = pm2(bare)
    assert state["instances"] == 2 and state["online"] == 2
    assert get(bare["url"], "/healthz")[0] == 200


def test_second_deploy_changes_nothing(bare, tmp_path):
    pids = pm2(bare)["pids"]
    proc, report = deploy(tmp_path, "--release", str(NOTES_APP))
    assert "0 change(s)" in proc.stdout, proc.stdout
    assert report["hosts"]["sandbox"]["backup"] is None and report["hosts"]["sandbox"]["migrations_applied"] == []
    assert pm2(bare)["pids"] == pids


def test_a_new_migration_and_an_env_change_reach_the_app(bare, tmp_path):
    app = copy_app(tmp_path, "app-v2")
    (app / "drizzle" / "0001_note_title.sql").write_text('ALTER TABLE "notes" ADD COLUMN "title" text;')
    journal = json.loads((app / "drizzle" / "meta" / "_journal.json").read_text())
    journal["entries"].append({"idx": 1, "version": "7", "when": journal["entries"][0]["when"] + 60_000,
                               "tag": "0001_note_title", "breakpoints": True})
    (app / "drizzle" / "meta" / "_journal.json").write_text(json.dumps(journal, indent=2))
    set_app_env(bare, {"HOST": bare["host"].address, "NODE_ENV": "production", "NOTES_GREETING": "hello there"})
    pids = pm2(bare)["pids"]
    proc, report = deploy(tmp_path, "--release", str(app))
    info = report["hosts"]["sandbox"]
    assert info["migrations_applied"] == ["0001_note_title"] and info["backup"]["toc_entries"] > 0
    assert "NOTES_GREETING='hello there'" in env_file(bare).read_text()
    assert set(pm2(bare)["pids"]).isdisjoint(pids)  # reloaded onto the new release
    assert query(bare, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes' "
                       "AND column_name = 'title'") == [(1,)]

    # the key removed from slipway_app_env: gone from shared/.env, and the app reloaded without it
    set_app_env(bare, {"HOST": bare["host"].address, "NODE_ENV": "production"})
    pids = pm2(bare)["pids"]
    proc, report = deploy(tmp_path, "--release", str(app))
    assert "NOTES_GREETING" not in env_file(bare).read_text()
    assert set(pm2(bare)["pids"]).isdisjoint(pids), "an env change must reach the app (new workers)"
    assert get(bare["url"], "/healthz")[0] == 200


def test_a_failing_build_is_refused_before_any_change(bare, tmp_path):
    app = copy_app(tmp_path, "app-broken")
    server = app / "src" / "server.ts"
    server.write_text(server.read_text() + "\nconst broken: number = 'not a number';\n")
    host = bare["host"]
    before = (os.readlink(host.app_dir / "current"), sorted(os.listdir(host.app_dir / "releases")), pm2(bare)["pids"])
    proc, report = deploy(tmp_path, "--release", str(app), expect=1)
    text = (proc.stdout + proc.stderr).strip()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "build `npm ci" in errors[0] and "failed (exit" in errors[0], text
    assert "slipway.yml" in errors[0].split(";")[-1], errors
    assert "Traceback" not in text
    assert (os.readlink(host.app_dir / "current"), sorted(os.listdir(host.app_dir / "releases")),
            pm2(bare)["pids"]) == before
    assert not (host.app_dir / ".slipway" / "deploy.lock.json").exists()


def test_an_app_asking_for_another_node_is_refused_in_preflight(bare, tmp_path):
    app = copy_app(tmp_path, "app-node99")
    package = json.loads((app / "package.json").read_text())
    package["engines"]["node"] = ">=99"
    (app / "package.json").write_text(json.dumps(package, indent=2))
    host = bare["host"]
    before = (os.readlink(host.app_dir / "current"), pm2(bare)["pids"])
    proc, report = deploy(tmp_path, "--release", str(app), expect=1)
    out = proc.stdout + proc.stderr
    assert "FAILED in preflight" in out and "but the app asks for >=99 (package.json engines.node)" in out, out
    assert report["hosts"]["sandbox"]["backup"] is None
    assert (os.readlink(host.app_dir / "current"), pm2(bare)["pids"]) == before


def test_rollback_returns_to_the_previous_release(bare, tmp_path):
    host = bare["host"]
    now = os.path.basename(os.readlink(host.app_dir / "current"))
    cli("rollback", "--host", "sandbox", env=ENV)
    back = os.path.basename(os.readlink(host.app_dir / "current"))
    assert back != now
    assert get(bare["url"], "/healthz")[0] == 200
    state = pm2(bare)
    assert state["online"] == state["instances"] == 2


def test_no_secret_in_any_output(bare):
    from slipway import vault

    with sandbox_instance(INSTANCE) as sb:
        ctl = sb.Controller()
        password = vault.load(ctl.vault_file("sandbox"), ctl.vault_password_file)["slipway_db_password"]
    assert password and not any(password in text for text in Outputs.texts)
