"""`invoke deploy` end to end, against real sandbox hosts (sshd, PostgreSQL 15, PM2, the reader app).

Tests run in file order on one two-host sandbox of their own (instance 6): the incident fixed by a
deploy, the no-op re-deploy, --check on the other host, releases that fail (app does not start,
smoke fails) and roll back, concurrent deploys, a failing host stopping a group rollout, rollback
and restore on request, and a scan of everything produced for secrets.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import INVOKE, ROOT, Outputs, cli, host_env, sandbox_up, sb

INSTANCE = "6"
INCIDENT_BODY = {"error": "Failed to track book view"}
TAG_0007 = "0007_add_unique_constraint_book_view_statistics"
REPORTS: list[Path] = []


@pytest.fixture(scope="module")
def hosts():
    with sandbox_up(INSTANCE, hosts=2, state="incident", switch=True):  # every call of this file: instance 6
        found = {h.name: h for h in sb.hosts_in_record()}
        envs = {name: host_env(name) for name in found}
        yield {"hosts": found, "env": envs}


def deploy(*args, expect=0, timeout=600, env=None):
    report = Path(f"/tmp/slipway-test-report-{len(REPORTS)}.json")
    REPORTS.append(report)
    report.unlink(missing_ok=True)
    proc = cli("deploy", *args, "--report", str(report), check=False, timeout=timeout, env=env)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, json.loads(report.read_text()) if report.exists() else None


def track(env, book, view_type="card_view"):
    return sb.http_json("POST", f"{env['APP_URL']}/api/books/{book}/track-view", {"viewType": view_type},
                        token=env["API_TOKEN"])


def health(env):
    return sb.http_json("GET", f"{env['APP_URL']}/api/health")


def db(env, sql, params=()):
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def totals(env):
    """Σview_count and row count per (book, view_type), the smoke book left out (smoke tests own it)."""
    rows = db(env, "SELECT book_id::text, view_type, sum(view_count), count(*) FROM book_view_statistics "
                   "WHERE book_id <> %s GROUP BY 1, 2 ORDER BY 1, 2", (sb.SMOKE_BOOK,))
    return {(b, t): (int(s), int(n)) for b, t, s, n in rows}


def schema(host):
    out = subprocess.run(["pg_dump", "--schema-only", "-h", host.address, "-p", str(sb.PG_PORT), "-U", sb.DB_USER, sb.DB_NAME],
                         capture_output=True, text=True, check=True, env={**os.environ, "PGPASSWORD": password(host)})
    # pg_dump >= 15.14 writes a random \\restrict key per dump; the schema is everything else
    return "\n".join(line for line in out.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def password(host):
    from slipway import vault

    ctl = sb.Controller()
    return vault.load(ctl.vault_file(host.name), ctl.vault_password_file)["slipway_db_password"]


def pm2_pids(host):
    user = sb.pwd.getpwnam(host.user)
    return sb.pm2_app_state(host, user)["pids"]


def current(host):
    return os.readlink(host.app_dir / "current")


def make_release(tmp: Path, edit) -> Path:
    """A copy of the reference app with one change made by ``edit(dir)``."""
    dest = tmp / "app"
    shutil.copytree(sb.READER_APP, dest, ignore=shutil.ignore_patterns("node_modules", ".env", "logs"))
    edit(dest)
    return dest


def phase_names(report, host):
    return [p["name"] for p in report["hosts"][host]["phases"]]


# --------------------------------------------------------------------------------------------
def test_deploy_fixes_the_incident_and_keeps_every_view(hosts):
    env, host = hosts["env"]["sandbox"], hosts["hosts"]["sandbox"]
    assert track(env, sb.INCIDENT_BOOK) == (500, INCIDENT_BODY)
    before = totals(env)
    assert any(n > 1 for _, n in before.values())  # the incident's duplicate rows
    pids = pm2_pids(host)

    proc, report = deploy("--host", "sandbox")

    out = proc.stdout
    for phase in ("preflight", "db_backup", "app_release", "db_migrate", "pm2_app", "smoke_test"):
        assert phase in out  # one progress line per phase, then the table
    assert "OK: deployed" in out
    info = report["hosts"]["sandbox"]
    assert report["result"] == "ok" and info["result"] == "ok"
    assert phase_names(report, "sandbox") == ["preflight", "db_backup", "app_release", "db_migrate", "pm2_app", "smoke_test"]
    assert info["migrations_applied"] == [TAG_0007]
    assert info["smoke"]["ok"] is True and len(info["smoke"]["cases"]) >= 5
    # the endpoint works, the constraint exists, duplicates were consolidated, no view was lost
    assert track(env, sb.INCIDENT_BOOK) == (200, {"success": True})
    after_fix = totals(env)
    key = (sb.INCIDENT_BOOK, "card_view")
    assert after_fix[key] == (before[key][0] + 1, 1)
    assert {k: v for k, v in after_fix.items() if k != key} == {k: (v[0], 1) for k, v in before.items() if k != key}
    assert db(env, "SELECT count(*) FROM pg_constraint WHERE conname = %s", (sb.UNIQUE_CONSTRAINT,)) == [(1,)]
    # a verified backup of the pre-deploy database: 0600 in a 0700 dir, restorable
    backup = Path(info["backup"]["path"])
    assert backup.parent == host.backup_dir
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600 and stat.S_IMODE(host.backup_dir.stat().st_mode) == 0o700
    listing = subprocess.run(["pg_restore", "--list", str(backup)], capture_output=True, text=True, check=True).stdout
    assert "TABLE public book_view_statistics" in listing
    scratch = "slipway_restore_check"
    copy = Path(f"/tmp/{scratch}.dump")  # the backup is the deploy user's 0600 file: a copy postgres can read
    shutil.copy(backup, copy)
    os.chmod(copy, 0o644)
    try:
        sb.psql_admin(host, f"DROP DATABASE IF EXISTS {scratch}; CREATE DATABASE {scratch};")
        sb.pg("pg_restore", "--no-owner", "-h", host.pgsock, "-p", sb.PG_PORT, "-U", "postgres", "-d", scratch, copy)
        assert sb.psql_admin(host, "SELECT count(*) FROM drizzle.__drizzle_migrations;", db=scratch) == "7"  # pre-0007
        dup_groups = sb.psql_admin(host, "SELECT count(*) FROM (SELECT 1 FROM book_view_statistics "
                                         "GROUP BY book_id, view_type HAVING count(*) > 1) d;", db=scratch)
        assert dup_groups == "3"  # the database as it was before the deploy consolidated it
        sb.psql_admin(host, f"DROP DATABASE {scratch};")
    finally:
        copy.unlink()
    # same release as the sandbox runs: no new release, no reload needed for a schema-only fix
    assert current(host) == f"releases/{report['release']}"
    assert pm2_pids(host) == pids
    assert health(env)[0] == 200


def test_second_deploy_changes_nothing_and_passes_smoke(hosts):
    host = hosts["hosts"]["sandbox"]
    backups = sorted(host.backup_dir.glob("*.dump"))
    pids = pm2_pids(host)
    proc, report = deploy("--host", "sandbox")
    assert report["result"] == "ok" and report["changed"] == 0, proc.stdout
    assert all(p["changed"] == 0 for p in report["hosts"]["sandbox"]["phases"])
    assert report["hosts"]["sandbox"]["migrations_applied"] == []
    assert report["hosts"]["sandbox"]["backup"] is None
    assert report["hosts"]["sandbox"]["smoke"]["ok"] is True
    assert sorted(host.backup_dir.glob("*.dump")) == backups
    assert pm2_pids(host) == pids
    assert "0 change(s)" in proc.stdout
    # the fast path: nothing could change, so only preflight (lock, plan) and the smoke tests (health) ran
    assert report["hosts"]["sandbox"]["noop"] is True
    assert phase_names(report, "sandbox") == ["preflight", "smoke_test"]
    assert "nothing to change on sandbox" in proc.stdout
    record = json.loads((host.app_dir / ".slipway" / "deploys.jsonl").read_text().splitlines()[-1])
    assert record["run_id"] == report["run_id"] and record["result"] == "ok" and record["noop"] is True


def test_noop_deploy_still_refuses_a_wrong_lock_plan_or_health(hosts):
    """A deploy that can change nothing still proves the host: a lock held elsewhere, a plan that
    would be refused (an applied migration edited since) or an app that does not answer its health
    check each fail it - exit 4 or 1 - and nothing changes. (The lock's own check in preflight,
    a lock held by another run id, is Molecule's preflight scenario.)"""
    import fcntl
    import signal

    host, env = hosts["hosts"]["sandbox"], hosts["env"]["sandbox"]
    records = host.app_dir / ".slipway" / "deploys.jsonl"

    def state():
        return current(host), pm2_pids(host), schema(host), sorted(host.backup_dir.glob("*.dump"))

    before = state()
    # the lock: another process holds it
    fd = os.open(host.app_dir / ".slipway" / "deploy.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = cli("deploy", "--host", "sandbox", check=False)
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: deploy already running on sandbox")
    finally:
        os.close(fd)
    assert state() == before

    # the plan: the newest applied migration's tracking row no longer matches its file (tampered)
    (row_id, digest), = db(env, "SELECT id, hash FROM drizzle.__drizzle_migrations ORDER BY id DESC LIMIT 1")

    def set_hash(value):
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute("UPDATE drizzle.__drizzle_migrations SET hash = %s WHERE id = %s", (value, row_id))

    try:
        set_hash("0" * 64)
        lines_before = len(records.read_text().splitlines())
        proc, report = deploy("--host", "sandbox", expect=1)
        info = report["hosts"]["sandbox"]
        assert info["failure"]["phase"] == "preflight" and "tampered" in info["failure"]["cause"], proc.stdout
        assert phase_names(report, "sandbox") == ["preflight"]
        assert len(records.read_text().splitlines()) == lines_before  # stopped before the deploy began
    finally:
        set_hash(digest)
    assert state() == before

    # health: PM2 still shows every instance online on the release, but none answers (stopped)
    pids = pm2_pids(host)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        proc, report = deploy("--host", "sandbox", expect=1)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    info = report["hosts"]["sandbox"]
    assert info["noop"] is True and info["result"] == "failed", proc.stdout
    assert info["failure"]["phase"] == "smoke_test" and not info["rolled_back"], proc.stdout
    assert phase_names(report, "sandbox")[:2] == ["preflight", "smoke_test"]
    record = json.loads(records.read_text().splitlines()[-1])
    assert record["run_id"] == report["run_id"] and record["result"] == "failed"
    assert state() == before
    # and once the app answers again, the same no-op passes
    deadline = time.monotonic() + 30
    while health(env)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc, report = deploy("--host", "sandbox")
    assert report["hosts"]["sandbox"]["noop"] is True and report["changed"] == 0


def test_check_prints_the_plan_and_changes_nothing(hosts):
    env, host = hosts["env"]["sandbox-2"], hosts["hosts"]["sandbox-2"]
    before = (schema(host), current(host), pm2_pids(host), totals(env), sorted(os.listdir(host.backup_dir)))
    proc, report = deploy("--host", "sandbox-2", "--check")
    out = proc.stdout
    assert TAG_0007 in out and "pending" in out  # the SQL to run, with preflight results
    assert "duplicate" in out
    assert "no new release" in out and "backup: would be taken" in out
    assert report["check"] is True and report["result"] == "ok"
    assert (schema(host), current(host), pm2_pids(host), totals(env), sorted(os.listdir(host.backup_dir))) == before
    assert track(env, sb.INCIDENT_BOOK)[0] == 500


def test_release_whose_app_fails_to_start_is_rolled_back(hosts, tmp_path):
    env, host = hosts["env"]["sandbox"], hosts["hosts"]["sandbox"]
    old = current(host)
    old_release = health(env)[1]["release"]

    def crash(app: Path):
        server = app / "server.js"
        server.write_text("'use strict';\nconsole.error('boom: this release cannot start');\nprocess.exit(1);\n" + server.read_text())

    proc, report = deploy("--host", "sandbox", "--release", str(make_release(tmp_path, crash)), expect=1)
    info = report["hosts"]["sandbox"]
    assert report["result"] == "failed" and info["failure"]["phase"] == "pm2_app"
    assert info["rolled_back"] is True
    assert f"rolled back: current -> {Path(old).name}; PM2 runs it healthy (2/2 instances online" in proc.stdout
    assert current(host) == old
    status, body = health(env)
    assert status == 200 and body["release"] == old_release
    assert track(env, sb.INCIDENT_BOOK)[0] == 200


def test_a_rollback_that_does_not_bring_the_app_back_says_so(hosts, tmp_path):
    # both releases are broken: the new one exits at start, and the previous one's code on disk no
    # longer starts either (what a restart of it would now run)
    env, host = hosts["env"]["sandbox"], hosts["hosts"]["sandbox"]
    user = sb.pwd.getpwnam(host.user)
    old = current(host)
    old_server = host.app_dir / "current" / "server.js"
    kept = old_server.read_text()

    def crash(app: Path):
        server = app / "server.js"
        server.write_text("'use strict';\nconsole.error('boom: the new release cannot start');\nprocess.exit(1);\n" + server.read_text())

    old_server.write_text("'use strict';\nconsole.error('boom: the old release no longer starts');\nprocess.exit(1);\n" + kept)
    try:
        proc, report = deploy("--host", "sandbox", "--release", str(make_release(tmp_path, crash)), expect=1)
        info = report["hosts"]["sandbox"]
        assert info["rolled_back"] is True and current(host) == old
        assert info["pm2"]["healthy"] in (False, "False") and info["pm2"]["release"] == Path(old).name
        out = proc.stdout
        assert "PM2 runs it healthy" not in out, out
        assert f"rolled back current -> {Path(old).name}, but the app is NOT healthy on it: " in out, out
        assert f"errored on {Path(old).name}" in out, out  # the instance that did not come back, by name
        assert "boom: the old release no longer starts" in out, out
    finally:
        old_server.write_text(kept)
        sb.pm2(host, user, "restart", sb.APP_NAME)
        deadline = time.time() + 60
        while health(env)[0] != 200 and time.time() < deadline:
            time.sleep(1)
    assert health(env)[0] == 200


def test_smoke_failure_is_rolled_back(hosts, tmp_path):
    env, host = hosts["env"]["sandbox"], hosts["hosts"]["sandbox"]
    old = current(host)

    def double_count(app: Path):
        server = app / "server.js"
        text = server.read_text()
        assert "book_view_statistics.view_count + 1" in text
        server.write_text(text.replace("book_view_statistics.view_count + 1", "book_view_statistics.view_count + 2"))

    proc, report = deploy("--host", "sandbox", "--release", str(make_release(tmp_path, double_count)), expect=1)
    info = report["hosts"]["sandbox"]
    assert info["failure"]["phase"] == "smoke_test", proc.stdout
    assert info["rolled_back"] is True
    assert current(host) == old
    assert health(env)[1]["release"] == old.split("/")[-1]


def test_concurrent_deploys_one_exits_4(hosts):
    host = hosts["hosts"]["sandbox"]
    meta = host.app_dir / ".slipway" / "deploy.lock.json"
    first = subprocess.Popen([*INVOKE, "deploy", "--host", "sandbox"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not meta.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = cli("deploy", "--host", "sandbox", check=False)
    out, err = first.communicate(timeout=600)
    Outputs.texts += [out, err]
    assert first.returncode == 0, out + err
    assert second.returncode == 4, second.stdout + second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith("error: deploy already running on sandbox since ") and f"(pid {first.pid})" in line
    assert not meta.exists()  # released


def test_failing_host_stops_the_group_rollout(hosts, tmp_path):
    h1, h2 = hosts["hosts"]["sandbox"], hosts["hosts"]["sandbox-2"]
    before2 = (current(h2), pm2_pids(h2), schema(h2))

    def crash(app: Path):
        (app / "server.js").write_text("process.exit(3);\n")

    old1 = current(h1)
    proc, report = deploy("--host", "sandboxes", "--release", str(make_release(tmp_path, crash)), expect=1)
    assert report["hosts"]["sandbox"]["result"] == "failed"
    assert report["hosts"]["sandbox-2"]["result"] == "not run", proc.stdout
    assert current(h1) == old1
    assert (current(h2), pm2_pids(h2), schema(h2)) == before2


def test_group_deploy_then_rollback_and_restore_on_request(hosts, tmp_path):
    env1, env2 = hosts["env"]["sandbox"], hosts["env"]["sandbox-2"]
    h1 = hosts["hosts"]["sandbox"]

    def comment(app: Path):
        server = app / "server.js"
        server.write_text(server.read_text() + "\n// release two\n")

    proc, report = deploy("--host", "sandboxes", "--release", str(make_release(tmp_path, comment)))
    new = report["release"]
    for name, env in (("sandbox", env1), ("sandbox-2", env2)):
        assert report["hosts"][name]["result"] == "ok"
        assert health(env)[1]["release"] == new
        assert track(env, sb.INCIDENT_BOOK) == (200, {"success": True})
    assert report["hosts"]["sandbox"]["migrations_applied"] == []
    assert report["hosts"]["sandbox-2"]["migrations_applied"] == [TAG_0007]
    # code rollback: previous release back, schema kept
    cli("rollback", "--host", "sandbox")
    assert health(env1)[1]["release"] != new
    assert db(env1, "SELECT count(*) FROM pg_constraint WHERE conname = %s", (sb.UNIQUE_CONSTRAINT,)) == [(1,)]
    # database restore on request: the pre-deploy database of sandbox-2 (0007 not applied)
    backup_id = report["hosts"]["sandbox-2"]["backup"]["id"]
    refused = cli("rollback", "--host", "sandbox-2", "--db", "restore", "--backup", backup_id, check=False)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    cli("rollback", "--host", "sandbox-2", "--db", "restore", "--backup", backup_id, "--yes")
    assert db(env2, "SELECT count(*) FROM pg_constraint WHERE conname = %s", (sb.UNIQUE_CONSTRAINT,)) == [(0,)]
    assert h1.backup_dir.exists()


def test_migrations_run_once_per_database_in_a_group(hosts):
    """Two inventory hosts on one database, deployed in one batch (slipway_serial 2): only the first
    migrates it (and backs it up)."""
    import yaml

    from slipway import vault

    ctl = sb.Controller()
    h1, h2 = hosts["hosts"]["sandbox"], hosts["hosts"]["sandbox-2"]
    assert db(hosts["env"]["sandbox-2"], "SELECT count(*) FROM drizzle.__drizzle_migrations") == [(7,)]  # restored above
    # `app1-on-db2`: the sandbox host's sshd and app dir, pointed at sandbox-2's database
    alias = {**sb.host_vars(h1, ctl), "slipway_db_host": h2.address}
    inventory = {"all": {"children": {"shareddb": {"hosts": {"sandbox-2": {}, "app1-on-db2": alias},
                                                   "vars": {"slipway_serial": 2}}}}}
    extra = ctl.inventory_dir / "shareddb.yml"
    extra.write_text(yaml.safe_dump(inventory))
    secrets2 = vault.load(ctl.vault_file("sandbox-2"), ctl.vault_password_file)
    secrets1 = vault.load(ctl.vault_file("sandbox"), ctl.vault_password_file)
    vault.dump({"slipway_db_password": secrets2["slipway_db_password"], "slipway_api_token": secrets1["slipway_api_token"]},
               ctl.vault_file("app1-on-db2"), ctl.vault_password_file)
    try:
        proc, report = deploy("--host", "shareddb", "--check")
    finally:
        extra.unlink()
        shutil.rmtree(ctl.vault_file("app1-on-db2").parent)
    order = [name for name in report["hosts"]]  # play order: the first host of the database is its primary
    assert sorted(order) == ["app1-on-db2", "sandbox-2"]
    assert report["rollout"]["size"] == 2 and [sorted(b) for b in report["rollout"]["batches"]] == [sorted(order)]
    first, second = report["hosts"][order[0]], report["hosts"][order[1]]
    assert first["plan"]["to_apply"] == second["plan"]["to_apply"] == [TAG_0007]  # both see the pending migration
    assert first["migrations_applied"] == [TAG_0007] and first["backup"] is not None
    assert second["migrations_applied"] == [] and second["backup"] is None, proc.stdout
    assert db(hosts["env"]["sandbox-2"], "SELECT count(*) FROM drizzle.__drizzle_migrations") == [(7,)]  # --check


def test_release_from_a_git_ref(hosts, tmp_path):
    from slipway.release import release_id

    repo = tmp_path / "repo"
    shutil.copytree(sb.READER_APP, repo / "app", ignore=shutil.ignore_patterns("node_modules", ".env", "logs"))
    (repo / "app" / "NOTES.md").write_text("built from git\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "app"], check=True)
    _, report = deploy("--host", "sandbox", "--check", "--release", "HEAD:app", env={"SLIPWAY_APP_REPO": str(repo)})
    assert report["release"] == release_id(repo / "app")
    assert report["hosts"]["sandbox"]["release_state"]["installed"] is True  # would be shipped
    bad = cli("deploy", "--host", "sandbox", "--release", "no-such-ref", check=False, env={"SLIPWAY_APP_REPO": str(repo)})
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --release 'no-such-ref' is neither")


def test_bad_input_is_one_line_and_changes_nothing(hosts, tmp_path):
    host = hosts["hosts"]["sandbox"]
    before = (current(host), pm2_pids(host), sorted(os.listdir(host.backup_dir)))
    incomplete = tmp_path / "app"
    incomplete.mkdir()
    (incomplete / "server.js").write_text("")
    cases = [
        (("deploy", "--host", "nosuchhost"), "error: no host or group named 'nosuchhost'"),
        (("deploy", "--host", "sandbox", "--release", str(incomplete)), "is not a deployable app: missing package.json"),
        (("deploy", "--host", "sandbox", "--report", "/nonexistent/dir/r.json"), "does not exist"),
        (("rollback", "--host", "sandbox", "--db", "drop"), "--db 'drop' is not known"),
        (("rollback", "--host", "sandbox", "--db", "restore"), "--db restore needs --backup ID"),
    ]
    for args, needle in cases:
        proc = cli(*args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0], (args, proc.stderr)
    # a host that lacks a tool a later phase needs is stopped in preflight, before any change
    extra = sb.Controller().inventory_dir / "host_vars" / "sandbox" / "tools.yml"
    extra.write_text("preflight_required_tools: [node, pm2, no-such-tool-xyz]\n")
    try:
        proc, report = deploy("--host", "sandbox", expect=1)
    finally:
        extra.unlink()
    failure = report["hosts"]["sandbox"]["failure"]
    assert failure["phase"] == "preflight" and "no-such-tool-xyz not found" in failure["cause"], proc.stdout
    assert "stopped before any change" in proc.stdout
    assert (current(host), pm2_pids(host), sorted(os.listdir(host.backup_dir))) == before


def test_no_secret_in_any_output_report_or_record(hosts):
    secrets = []
    for name in hosts["env"]:
        from slipway import vault

        ctl = sb.Controller()
        secrets += list(vault.load(ctl.vault_file(name), ctl.vault_password_file).values())
    assert all(len(s) >= 16 for s in secrets)
    texts = list(Outputs.texts)
    texts += [p.read_text() for p in REPORTS if p.exists()]
    for host in hosts["hosts"].values():
        texts += [p.read_text() for p in (host.app_dir / ".slipway").glob("*.jsonl")]
        texts += [p.read_text() for p in host.backup_dir.glob("*.json")]
        texts += [p.read_text(errors="replace") for p in (host.app_dir / "logs").glob("*.log")]
    assert len(texts) > 10
    for secret in secrets:
        assert not any(secret in t for t in texts)


def test_runtime_playbook_installs_the_module_runtime_without_the_lock(hosts):
    """playbooks/runtime.yml (role preflight, entry point runtime), for read-only commands: the
    module runtime installed on every host of a group, no deploy lock taken, no record written."""
    from slipway import runtime
    from slipway.runner import run_playbook

    own = runtime.build()  # the sandbox's hosts run modules with the controller's Python X.Y
    rid = own.id
    host = hosts["hosts"]["sandbox-2"]
    runtime_dir = host.app_dir / ".slipway" / "runtime" / rid
    shutil.rmtree(runtime_dir, ignore_errors=True)  # installed by the deploys before, if they ran
    records_file = host.app_dir / ".slipway" / "deploys.jsonl"
    records = records_file.read_text() if records_file.exists() else None
    result = run_playbook("runtime.yml", "sandboxes", runtime.extravars({own.python: own}))
    assert result["rc"] == 0, result["failures"]
    paths = result["data"]["runtime"]
    assert sorted(paths) == ["sandbox", "sandbox-2"]
    assert paths["sandbox-2"]["python_path"] == str(runtime_dir)
    assert (runtime_dir / ".complete").exists() and (runtime_dir / "psycopg").is_dir()
    assert (runtime_dir.stat().st_mode & 0o077) == 0
    assert not (host.app_dir / ".slipway" / "deploy.lock.json").exists()
    assert (records_file.read_text() if records_file.exists() else None) == records
