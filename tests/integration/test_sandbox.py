"""Integration tests of the sandbox against real hosts: sshd, PostgreSQL 15, PM2, the reader app.

Tests run in file order and share one two-host sandbox: incident checks first, then the hand
fix of 0007 on one host, the move to healthy state, `down`, and a fresh healthy sandbox.
"""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import ROOT, Outputs, cli, host_env, sb

MIGRATIONS = ROOT / "examples" / "reader-app" / "migrations"
INCIDENT_BODY = {"error": "Failed to track book view"}
FRESH_BOOK = "c4d5e6f7-0819-4a2b-bc3d-4e5f60718293"  # seeded, with no statistics rows


def track(env, book, view_type="card_view", token=None):
    return sb.http_json(
        "POST", f"{env['APP_URL']}/api/books/{book}/track-view", {"viewType": view_type},
        token=env["API_TOKEN"] if token is None else token,
    )


def connect(env):
    return psycopg.connect(env["DATABASE_URL"], autocommit=True)


def counts(env, book):
    with connect(env) as conn:
        rows = conn.execute(
            "SELECT view_type, count(*), sum(view_count) FROM book_view_statistics WHERE book_id = %s GROUP BY view_type",
            (book,),
        ).fetchall()
    return {vt: (int(n), int(total)) for vt, n, total in rows}


# --------------------------------------------------------------------------------------------
# incident state
# --------------------------------------------------------------------------------------------
def test_incident_endpoint_returns_exact_500_and_postgres_logs_42p10(sandbox2):
    assert sorted(sandbox2["hosts"]) == ["sandbox", "sandbox-2"]
    for name, host in sandbox2["hosts"].items():
        env = sandbox2["env"][name]
        status, body = track(env, sb.INCIDENT_BOOK)
        assert (status, body) == (500, INCIDENT_BODY), name
        line = sb.wait_for_line(host.pg_log, " 42P10 booksuser@booksdb ERROR:")
        assert "there is no unique or exclusion constraint matching the ON CONFLICT specification" in line
        line = sb.wait_for_line(host.app_dir / "logs" / "err.log", "Error tracking book view")
        assert line.endswith("(code 42P10)")
        assert (host.app_dir / "logs" / "out.log").exists() and (host.app_dir / "logs" / "combined.log").exists()


def test_incident_database_matches_drizzle_history_without_0007(sandbox2):
    entries = sb.journal_entries()
    assert entries[-1]["tag"] == "0007_add_unique_constraint_book_view_statistics"
    for name in sandbox2["hosts"]:
        with connect(sandbox2["env"][name]) as conn:
            rows = conn.execute("SELECT hash, created_at FROM drizzle.__drizzle_migrations ORDER BY id").fetchall()
            constraint = conn.execute(
                "SELECT count(*) FROM pg_constraint WHERE conname = 'book_view_statistics_book_id_view_type_unique'"
            ).fetchone()[0]
            dup_groups = conn.execute(
                "SELECT book_id::text, view_type FROM book_view_statistics GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2"
            ).fetchall()
            normal = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM book_view_statistics GROUP BY book_id, view_type HAVING count(*) = 1) s"
            ).fetchone()[0]
        # drizzle's own migrator wrote these rows: sha256 of each whole file, created_at = `when`
        expected = [
            (hashlib.sha256((MIGRATIONS / f"{e['tag']}.sql").read_bytes()).hexdigest(), e["when"]) for e in entries[:7]
        ]
        assert [(h, int(c)) for h, c in rows] == expected, name
        assert constraint == 0
        assert (sb.INCIDENT_BOOK, "card_view") in dup_groups and (sb.INCIDENT_BOOK, "reader_open") in dup_groups
        assert normal >= 3


def test_hosts_are_separate_real_hosts(sandbox2):
    hosts = list(sandbox2["hosts"].values())
    users = [pwd.getpwnam(h.user) for h in hosts]
    assert len({u.pw_uid for u in users}) == 2 and len({h.address for h in hosts}) == 2
    for host, user in zip(hosts, users, strict=True):
        assert host.address.startswith("127.0.0.")
        # no sudo: the user is in its own group only
        groups = subprocess.run(["id", "-Gn", host.user], capture_output=True, text=True, check=True).stdout.split()
        assert groups == [host.user]
        assert Path(user.pw_dir) == host.home
        # layout like production
        for rel in ("releases", "shared", "logs"):
            assert (host.app_dir / rel).is_dir()
        current = host.app_dir / "current"
        assert current.is_symlink() and os.readlink(current).startswith("releases/")
        env_file = host.app_dir / "shared" / ".env"
        assert oct(env_file.stat().st_mode & 0o777) == "0o600" and env_file.stat().st_uid == user.pw_uid
        assert oct(host.backup_dir.stat().st_mode & 0o777) == "0o700"
        # own sshd, own PostgreSQL cluster, own PM2 daemon run as the user
        assert sb.pid_alive(sb.read_pid(host.sshd_dir / "sshd.pid"))
        assert sb.pid_alive(sb.read_pid(host.pgdata / "postmaster.pid"))
        pm2_pid = sb.read_pid(host.pm2_home / "pm2.pid")
        assert pm2_pid in sb.user_pids(user.pw_uid)
    assert sb.read_pid(hosts[0].pgdata / "postmaster.pid") != sb.read_pid(hosts[1].pgdata / "postmaster.pid")


def test_pm2_runs_the_app_in_cluster_mode_with_two_instances(sandbox2):
    for host in sandbox2["hosts"].values():
        user = pwd.getpwnam(host.user)
        state = sb.pm2_app_state(host, user)
        assert state["instances"] == 2 and state["online"] == 2, state
        raw = sb.pm2(host, user, "jlist").stdout
        modes = {p["pm2_env"]["exec_mode"] for p in json.loads(raw[raw.index("["):])}
        assert modes == {"cluster_mode"}


def ssh(host, ctl, *extra, known_hosts=None, command="id -un"):
    args = [
        "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts or ctl.known_hosts}", "-o", "ConnectTimeout=5",
        "-i", str(ctl.key), "-p", str(sb.SSH_PORT), *extra, f"{host.user}@{host.address}", command,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def test_ssh_with_generated_known_hosts_works_and_a_wrong_host_key_is_refused(sandbox2, tmp_path):
    ctl = sb.Controller()
    for host in sandbox2["hosts"].values():
        ok = ssh(host, ctl)
        assert ok.returncode == 0 and ok.stdout.strip() == host.user, ok.stderr
        # the ssh_config users get works too
        via_config = subprocess.run(["ssh", "-F", str(ctl.ssh_config), host.name, "echo", "$HOME"],
                                    capture_output=True, text=True, timeout=30)
        assert via_config.returncode == 0 and via_config.stdout.strip() == str(host.home), via_config.stderr
    host = sandbox2["hosts"]["sandbox"]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    impostor = (tmp_path / "impostor.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[{host.address}]:{sb.SSH_PORT} {' '.join(impostor)}\n")
    refused = ssh(host, ctl, known_hosts=wrong)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    unknown = ssh(host, ctl, known_hosts=empty)
    assert unknown.returncode == 255 and "Host key verification failed" in unknown.stderr
    # password logins are off, and another user's key does not get in
    no_key = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={ctl.known_hosts}", "-o", "IdentitiesOnly=yes",
         "-i", str(tmp_path / "impostor"), "-p", str(sb.SSH_PORT), f"{host.user}@{host.address}", "true"],
        capture_output=True, text=True, timeout=30,
    )
    assert no_key.returncode == 255 and "Permission denied" in no_key.stderr


def test_ansible_reaches_hosts_through_the_collection_module(sandbox2):
    proc = cli("ping", "--host", "sandboxes", "--json")
    doc = json.loads(proc.stdout)
    assert doc["rc"] == 0 and doc["failures"] == []
    assert sorted(doc["hosts"]) == ["sandbox", "sandbox-2"]
    for name, info in doc["hosts"].items():
        host = sandbox2["hosts"][name]
        assert info["daemon_running"] is True
        assert info["pm2"]["instances"] == 2 and info["pm2"]["online"] == 2
        assert info["current"] == str((host.app_dir / "current").resolve())


def test_ansible_refuses_a_host_whose_key_does_not_match_known_hosts(sandbox2, tmp_path):
    ctl = sb.Controller()
    original = ctl.known_hosts.read_text()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    impostor = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    host = sandbox2["hosts"]["sandbox"]
    lines = [f"[{host.address}]:{sb.SSH_PORT} {impostor}" if line.startswith(f"[{host.address}]:") else line
             for line in original.splitlines()]
    try:
        ctl.known_hosts.write_text("\n".join(lines) + "\n")
        proc = cli("ping", "--host", "sandboxes", "--json", check=False)
    finally:
        ctl.known_hosts.write_text(original)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert [f["host"] for f in doc["failures"]] == ["sandbox"]
    assert "Host key verification failed" in doc["failures"][0]["msg"]
    assert list(doc["hosts"]) == ["sandbox-2"]  # the other host, with its right key, was read
    assert cli("ping", "--host", "sandbox").returncode == 0


def test_up_is_idempotent(sandbox2):
    before = {
        h.name: (sb.read_pid(h.pgdata / "postmaster.pid"), sb.read_pid(h.sshd_dir / "sshd.pid"),
                 sb.pm2_app_state(h, pwd.getpwnam(h.user))["pids"])
        for h in sandbox2["hosts"].values()
    }
    proc = cli("sandbox.up", "--hosts", "2", "--state", "incident")
    assert proc.stdout.count("unchanged:") == 2, proc.stdout
    for h in sandbox2["hosts"].values():
        after = (sb.read_pid(h.pgdata / "postmaster.pid"), sb.read_pid(h.sshd_dir / "sshd.pid"),
                 sb.pm2_app_state(h, pwd.getpwnam(h.user))["pids"])
        assert after == before[h.name]
    status, body = track(sandbox2["env"]["sandbox"], sb.INCIDENT_BOOK)
    assert (status, body) == (500, INCIDENT_BODY)


def test_bad_input_gets_one_line_errors_and_changes_nothing(sandbox2):
    for args, needle in (
        (("sandbox.up", "--state", "bogus"), "unknown state 'bogus'"),
        (("sandbox.up", "--hosts", "0"), "--hosts 0 is out of range"),
        (("sandbox.env", "--host", "nope"), "no sandbox host named 'nope'"),
        (("ping", "--host", "nope"), "no host or group named 'nope'"),
    ):
        proc = cli(*args, check=False)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr
    # the hosts are still there and still in the incident state
    assert sorted(h.name for h in sb.hosts_in_record()) == ["sandbox", "sandbox-2"]
    assert track(sandbox2["env"]["sandbox-2"], sb.INCIDENT_BOOK) == (500, INCIDENT_BODY)


def test_secrets_stay_out_of_files_output_and_process_lists(sandbox2):
    ctl = sb.Controller()
    assert oct(ctl.dir.stat().st_mode & 0o777) == "0o700"
    for name, env in sandbox2["env"].items():
        token = env["API_TOKEN"]
        password = urlsplit(env["DATABASE_URL"]).password
        assert len(token) >= 32 and len(password) >= 24
        vault_file = ctl.vault_file(name)
        assert vault_file.read_text().startswith("$ANSIBLE_VAULT;")
        assert oct(vault_file.stat().st_mode & 0o777) == "0o600"
        assert oct(ctl.vault_password_file.stat().st_mode & 0o777) == "0o600"
        for path in (ctl.inventory_file, ctl.ssh_config, ctl.known_hosts, ctl.state_file, vault_file):
            text = path.read_text()
            assert token not in text and password not in text, path
        for text in Outputs.texts:
            assert token not in text and password not in text
        host = sandbox2["hosts"][name]
        logs = [host.pg_log, host.sshd_dir / "sshd.log", host.pm2_home / "pm2.log",
                *(host.app_dir / "logs").glob("*.log")]
        assert len(logs) >= 6
        for path in logs:
            text = path.read_text(errors="replace")
            assert token not in text and password not in text, f"secret in {path}"
        for pid, _, _ in sb.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert token not in cmdline and password not in cmdline, f"secret on the command line of pid {pid}"


def test_app_rejects_bad_requests(sandbox2):
    env = sandbox2["env"]["sandbox-2"]
    assert track(env, sb.INCIDENT_BOOK, token="") == (401, {"error": "Unauthorized"})
    assert track(env, sb.INCIDENT_BOOK, token="not-the-token") == (401, {"error": "Unauthorized"})
    assert track(env, "not-a-uuid") == (400, {"error": "Invalid book id"})
    assert track(env, sb.INCIDENT_BOOK, view_type="page_flip") == (400, {"error": "Invalid viewType"})
    status, health = sb.http_json("GET", f"{env['APP_URL']}/api/health")
    assert status == 200 and health["db"] == "ok" and health["release"].startswith("r")


# --------------------------------------------------------------------------------------------
# the runbook's fix, by hand, on one host
# --------------------------------------------------------------------------------------------
def test_applying_0007_by_hand_makes_the_endpoint_return_200(sandbox2):
    env = sandbox2["env"]["sandbox"]
    entry = sb.journal_entries()[7]
    sql_bytes = (MIGRATIONS / f"{entry['tag']}.sql").read_bytes()
    with connect(env) as conn:
        total_before = conn.execute("SELECT sum(view_count) FROM book_view_statistics").fetchone()[0]
        rows_before = conn.execute("SELECT count(*) FROM book_view_statistics").fetchone()[0]
        with conn.transaction():
            for statement in sql_bytes.decode().split("--> statement-breakpoint"):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES (%s, %s)",
                (hashlib.sha256(sql_bytes).hexdigest(), entry["when"]),
            )
        total_after = conn.execute("SELECT sum(view_count) FROM book_view_statistics").fetchone()[0]
        rows_after = conn.execute("SELECT count(*) FROM book_view_statistics").fetchone()[0]
    assert total_after == total_before and rows_after < rows_before
    assert counts(env, sb.INCIDENT_BOOK) == {"card_view": (1, 10), "reader_open": (1, 5)}
    # the incident's own request now succeeds, and the consolidated row counts on
    assert track(env, sb.INCIDENT_BOOK) == (200, {"success": True})
    assert counts(env, sb.INCIDENT_BOOK)["card_view"] == (1, 11)
    # a (book, type) with no row yet: 1, then 2
    assert "reader_open" not in counts(env, FRESH_BOOK)
    assert track(env, FRESH_BOOK, "reader_open") == (200, {"success": True})
    assert counts(env, FRESH_BOOK)["reader_open"] == (1, 1)
    assert track(env, FRESH_BOOK, "reader_open") == (200, {"success": True})
    assert counts(env, FRESH_BOOK)["reader_open"] == (1, 2)
    status, stats = sb.http_json("GET", f"{env['APP_URL']}/api/books/{FRESH_BOOK}/stats")
    assert status == 200 and stats["stats"]["reader_open"] == 2
    # the other host is untouched
    assert track(sandbox2["env"]["sandbox-2"], sb.INCIDENT_BOOK) == (500, INCIDENT_BODY)
    # unknown book id: clean 404 once the upsert can run
    assert track(env, "11111111-2222-4333-8444-555555555555") == (404, {"error": "Book not found"})


def test_up_healthy_converges_both_hosts(sandbox2):
    proc = cli("sandbox.up", "--hosts", "2", "--state", "healthy")
    # the hand-fixed host is already healthy; the other gets 0007 through drizzle's migrator
    assert "sandbox      unchanged:" in proc.stdout
    assert "sandbox-2    database moved to healthy state" in proc.stdout
    env2 = sandbox2["env"]["sandbox-2"]
    assert counts(env2, sb.INCIDENT_BOOK) == {"card_view": (1, 10), "reader_open": (1, 5)}
    assert track(env2, sb.INCIDENT_BOOK) == (200, {"success": True})
    assert counts(env2, sb.INCIDENT_BOOK)["card_view"] == (1, 11)
    # the hand fix wrote exactly what drizzle writes: both hosts have identical history
    histories = []
    for name in ("sandbox", "sandbox-2"):
        with connect(sandbox2["env"][name]) as conn:
            histories.append(conn.execute("SELECT hash, created_at FROM drizzle.__drizzle_migrations ORDER BY id").fetchall())
    assert histories[0] == histories[1] and len(histories[0]) == 8


# --------------------------------------------------------------------------------------------
# slipway's migration engine fixes the incident
# --------------------------------------------------------------------------------------------
def test_invoke_migrate_fixes_the_incident_database(sandbox2):
    cli("sandbox.up", "--hosts", "2", "--state", "incident")  # healthy -> incident rebuilds the databases
    env = sandbox2["env"]["sandbox-2"]
    assert track(env, sb.INCIDENT_BOOK) == (500, INCIDENT_BODY)
    before = counts(env, sb.INCIDENT_BOOK)
    assert before == {"card_view": (3, 10), "reader_open": (2, 5)}
    with connect(env) as conn:
        total_before = conn.execute("SELECT sum(view_count) FROM book_view_statistics").fetchone()[0]

    args = ("migrate", "--dsn-env", "DATABASE_URL", "--migrations", "examples/reader-app/migrations")
    proc = cli(*args, "--check", check=False, env={"DATABASE_URL": env["DATABASE_URL"]})
    assert proc.returncode == 2, proc.stderr
    assert "pending     0007_add_unique_constraint_book_view_statistics" in proc.stdout
    assert "3 duplicate groups (7 rows), e.g. (aa4a9ca1-9a21-4126-9a7a-39b17ff186bc, card_view) x3" in proc.stdout
    assert "consolidated by statement 1, statement 2; 0 left when it runs" in proc.stdout
    assert "rehearsal   ok" in proc.stdout
    assert track(env, sb.INCIDENT_BOOK) == (500, INCIDENT_BODY)  # --check changed nothing

    check_output = proc.stdout + proc.stderr
    proc = cli(*args, env={"DATABASE_URL": env["DATABASE_URL"]})
    assert "applied 1: 0007_add_unique_constraint_book_view_statistics" in proc.stdout
    password = urlsplit(env["DATABASE_URL"]).password
    assert password not in check_output + proc.stdout + proc.stderr
    assert counts(env, sb.INCIDENT_BOOK) == {"card_view": (1, 10), "reader_open": (1, 5)}
    with connect(env) as conn:
        assert conn.execute("SELECT sum(view_count) FROM book_view_statistics").fetchone()[0] == total_before
    assert track(env, sb.INCIDENT_BOOK) == (200, {"success": True})
    assert counts(env, sb.INCIDENT_BOOK)["card_view"] == (1, 11)
    # drizzle's own migrator, as the host user from the app's release, agrees: nothing to do
    host = sandbox2["hosts"]["sandbox-2"]
    assert sb.db_state(host, sb.vault.load(sb.Controller().vault_file(host.name), sb.Controller().vault_password_file)
                       ["slipway_db_password"]) == "healthy"
    proc = cli("sandbox.up", "--hosts", "2", "--state", "healthy")
    assert "sandbox-2    unchanged:" in proc.stdout
    # the other host was left in the incident state and got its 0007 from drizzle just now
    assert "sandbox      database moved to healthy state" in proc.stdout


# --------------------------------------------------------------------------------------------
# down, and a fresh healthy sandbox
# --------------------------------------------------------------------------------------------
def assert_nothing_left(hosts, ctl_dir):
    for host in hosts:
        with pytest.raises(KeyError):
            pwd.getpwnam(host.user)
        assert not host.root.exists()
        for port in (sb.SSH_PORT, sb.PG_PORT, sb.APP_PORT):
            with socket.socket() as sock:
                sock.settimeout(1)
                assert sock.connect_ex((host.address, port)) != 0, f"{host.address}:{port} still open"
        # no process of the host is left: by the recorded pids and by any reference to its root
        for pid, _, _ in sb.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert str(host.root) not in cmdline, f"pid {pid} still runs from {host.root}: {cmdline!r}"
    assert not sb.hosts_base().exists()
    assert not ctl_dir.exists()


def test_down_leaves_no_process_user_or_file(sandbox2):
    hosts = list(sandbox2["hosts"].values())
    uids = [pwd.getpwnam(h.user).pw_uid for h in hosts]
    # an open SSH session must not survive `down` (killing sshd alone would leave it)
    ctl = sb.Controller()
    session = subprocess.Popen(
        ["ssh", "-F", str(ctl.ssh_config), "sandbox", "sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            if any("sleep" in Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in sb.user_pids(uids[0]) if Path(f"/proc/{p}").exists()):
                break
            time.sleep(0.05)
        pm2_pids = [sb.read_pid(h.pm2_home / "pm2.pid") for h in hosts]
        cli("sandbox.down")
        for uid in uids:
            assert sb.user_pids(uid) == []
        assert not any(sb.pid_alive(p) for p in pm2_pids)
        assert_nothing_left(hosts, ctl.dir)
        session.wait(timeout=10)
    finally:
        if session.poll() is None:
            session.kill()
    # down again: nothing to do, still exit 0
    assert cli("sandbox.down").returncode == 0


def test_fresh_healthy_sandbox_serves_200_at_once_and_drizzle_has_nothing_to_do():
    cli("sandbox.up", "--hosts", "1", "--state", "healthy")
    host = sb.find_host("sandbox")
    env = host_env("sandbox")
    assert track(env, sb.INCIDENT_BOOK) == (200, {"success": True})
    with connect(env) as conn:
        assert conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0] == 8
    # drizzle-orm's own migrator, run again against the full journal, adds nothing
    user = pwd.getpwnam(host.user)
    sb.drizzle_migrate(host, user, urlsplit(env["DATABASE_URL"]).password, None)
    with connect(env) as conn:
        assert conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0] == 8
    cli("sandbox.down")
    assert_nothing_left([host], sb.Controller().dir)


def test_demo_shows_the_incident_then_deploys_the_fix():
    proc = cli("demo", timeout=600)
    out = proc.stdout
    before, _, after = out.partition("== 4. invoke deploy")
    assert 'HTTP 500 {"error": "Failed to track book view"}' in before
    assert "there is no unique or exclusion constraint matching the ON CONFLICT specification" in before
    # step 3 is invoke diagnose: the cause, the migration that makes the constraint, the fix
    assert "sandbox: 1 cause(s) found - " in before and "migrations 7 applied, 1 pending" in before
    assert "1. [42P10] INSERT ... ON CONFLICT (book_id, view_type) on book_view_statistics" in before
    assert "migration 0007_add_unique_constraint_book_view_statistics creates it" in before
    assert "fix: invoke deploy --host sandbox" in before
    for phase in ("preflight", "db_backup", "app_release", "db_migrate", "pm2_app", "smoke_test"):
        assert phase in after
    assert "OK: deployed" in after and 'HTTP 200 {"success": true}' in after
    views = [line for line in after.splitlines() if "views before the deploy + 1 new" in line]
    assert len(views) == 1
    _, _, drift = after.partition("== 6. invoke drift --host sandbox")
    assert "sandbox: OK - 0 finding(s); migrations: 8 applied, 0 pending" in drift and "OK: drift check of sandbox" in drift
    _, _, diagnosed = after.partition("== 7. invoke diagnose --host sandbox")
    assert "sandbox: healthy - " in diagnosed
    host = sb.find_host("sandbox")
    env = host_env("sandbox")
    assert track(env, sb.INCIDENT_BOOK) == (200, {"success": True})  # still fixed after the demo
    with connect(env) as conn:
        assert conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0] == 8
    for secret in (env["API_TOKEN"], urlsplit(env["DATABASE_URL"]).password):
        assert secret not in out + proc.stderr
    cli("sandbox.down")
    assert_nothing_left([host], sb.Controller().dir)
