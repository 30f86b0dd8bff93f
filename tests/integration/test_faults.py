"""Crash safety on a real sandbox host (instance 7: its own user, sshd, PostgreSQL 15, PM2): a deploy
stopped in the middle really stops, tells the truth, and nothing moves once it has gone.

Each fault run starts from the incident state with book_view_statistics grown to ROWS rows, so
the backup and the migration last long enough for a fault to land inside them. For each fault:
every process of the run (controller and host) is gone within a bound; the host's state right
then and 10 s later are the same; deploys.jsonl records the interrupted run; the next
`invoke deploy` converges; Σview_count per book is what it was before.
Then a table of bad inputs, each refused with one `error: <cause>; <fix>` line before anything
changes."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time

import faults as F
import pytest
from conftest import Outputs, sandbox_up
from instances import sandbox_instance

from slipway.paths import READER_APP

INSTANCE = "7"
ROWS = 300_000  # 0007's consolidation + unique index take ~1.3 s, the backup ~0.9 s on this size
GONE_WITHIN = 45  # seconds: the keeper's STOP_SECONDS (30) for a process that ignores SIGTERM, plus margin
STILL = 10  # seconds the state must stay put after the run is gone


@pytest.fixture(scope="module")
def host():
    with sandbox_up(INSTANCE, state="incident"):
        yield F.Host("sandbox", INSTANCE)


def _fault_run(host, phase: str, fault, delay: float = 0.3, args=()):
    """Reset, deploy, inject ``fault(deploy)`` ``delay`` s after ``phase`` starts; returns what was seen."""
    host.reset(ROWS)
    before = host.state()
    records_before = len(host.records())
    deploy = F.Deploy(host, *args)
    deploy.wait_for(f" {phase}")
    time.sleep(delay)
    fault(deploy)
    gone, left = F.wait_gone(deploy.proc.pid, host.host.user, timeout=GONE_WITHIN + 30,
                              masters_before=deploy.masters_before)
    try:
        rc = deploy.finish(timeout=60)
    except Exception:  # noqa: BLE001 - a killed invoke has no output left to read
        rc = deploy.proc.poll()
    Outputs.texts.append(deploy.output)
    right_after = host.state()
    time.sleep(STILL)
    later = host.state()
    return {"before": before, "records_before": records_before, "deploy": deploy, "rc": rc, "gone": gone,
            "left": left, "right_after": right_after, "later": later}


def _converges(host, seen, killed_run: str | None = None):
    proc = F.invoke("deploy", "--host", "sandbox", env=host.env)
    Outputs.texts += [proc.stdout, proc.stderr]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = host.state()
    assert after["tracking_rows"] == 8
    assert ["book_view_statistics_book_id_view_type_unique", True] in after["indexes"] or \
        any(valid and "view_type" in name for name, valid in after["indexes"]), after["indexes"]
    assert after["sums"] == seen["before"]["sums"], "a view was lost or invented"
    assert all(status == "online" for _, status, _ in after["pm2"]), after["pm2"]
    return proc.stdout


def _run_id(deploy) -> str:
    first = deploy.output.splitlines()[0]
    return first.rsplit("run ", 1)[1].strip()


def _common(seen, host):
    assert seen["gone"] <= GONE_WITHIN, f"processes of the run left after {seen['gone']:.1f}s: {seen['left']}"
    assert seen["right_after"] == seen["later"], ("the host changed after the run had gone",
                                                  seen["right_after"], seen["later"])
    assert seen["rc"] != 0


def test_sigkill_of_the_invoke_group_mid_migration_stops_everything(host):
    seen = _fault_run(host, "db_migrate", lambda d: os.killpg(d.proc.pid, signal.SIGKILL))
    _common(seen, host)
    state = seen["right_after"]
    # the migration was either committed whole before the kill or not at all
    assert state["tracking_rows"] in (7, 8)
    run_id = _run_id(seen["deploy"])
    out = _converges(host, seen)
    assert f"took over the deploy lock of run {run_id}" in out and "recorded it as interrupted" in out, out
    record = next(r for r in host.records() if r.get("run_id") == run_id)
    assert record["result"] == "interrupted"
    assert record["backup"] and record["backup"]["id"] in " ".join(state["backups"])
    assert record["migrations_applied"] == ([] if state["tracking_rows"] == 7 else
                                            ["0007_add_unique_constraint_book_view_statistics"])


def test_sigkill_of_ansible_playbook_alone_is_reported_as_it_happened(host):
    def kill_playbook(deploy):
        pid = F.ansible_playbook_pid(deploy.proc.pid)
        assert pid, "no ansible-playbook of this run found"
        os.kill(pid, signal.SIGKILL)

    seen = _fault_run(host, "db_backup", kill_playbook, delay=0.4)
    _common(seen, host)
    out = seen["deploy"].output
    assert "INTERRUPTED in db_backup" in out and "ansible-playbook ended before the deploy finished" in out, out
    assert "FAILED in preflight" not in out and "stopped before any change" not in out
    run_id = _run_id(seen["deploy"])
    record = next(r for r in host.records() if r.get("run_id") == run_id)  # written by invoke itself
    assert record["result"] == "interrupted" and record["migrations_applied"] == []
    taken = seen["right_after"]["backups"] != seen["before"]["backups"]
    assert bool(record["backup"]) == taken, (record["backup"], taken)
    assert ("backup " + record["backup"]["id"] + " taken" in out) if taken else "what the run did:" in out
    assert seen["right_after"]["tracking_rows"] == 7
    _converges(host, seen)


def test_host_sshd_and_sessions_killed_mid_migration(host):
    seen = _fault_run(host, "db_migrate", lambda d: F.kill_host_sessions(host))
    _common(seen, host)
    run_id = _run_id(seen["deploy"])
    state = seen["right_after"]
    assert state["tracking_rows"] in (7, 8)
    proc = F.invoke("sandbox.up", "--state", "incident", env=host.env)  # sshd back (the database is left as it is)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.state()["tracking_rows"] == state["tracking_rows"]
    _converges(host, seen)
    record = next(r for r in host.records() if r.get("run_id") == run_id)
    assert record["result"] == "interrupted", record


def test_sigterm_while_the_release_is_installed(host):
    seen = _fault_run(host, "app_release", lambda d: os.kill(d.proc.pid, signal.SIGTERM), delay=0.1)
    _common(seen, host)
    out = seen["deploy"].output
    assert "INTERRUPTED in app_release: stopped by SIGTERM" in out, out
    assert seen["right_after"]["tracking_rows"] == 7
    _converges(host, seen)


def test_sigterm_in_the_middle_of_a_pm2_reload_lets_the_reload_finish(host, tmp_path):
    # a release of its own, so that the deploy reloads PM2 (one instance after the other)
    app = tmp_path / "app"
    shutil.copytree(READER_APP, app, ignore=shutil.ignore_patterns("node_modules", ".env", "logs"))
    (app / "server.js").write_text((app / "server.js").read_text() + "\n// a release of its own\n")
    seen_mixed = []

    def stop_mid_reload(deploy):
        release = deploy.output.splitlines()[0].split("release ", 1)[1].split()[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            releases = [r for _, status, r in host.pm2()]
            if release in releases and any(r != release for r in releases):
                seen_mixed.append(releases)
                break
            time.sleep(0.05)
        os.kill(deploy.proc.pid, signal.SIGTERM)

    seen = _fault_run(host, "pm2_app", stop_mid_reload, delay=0, args=("--release", str(app)))
    _common(seen, host)
    assert seen_mixed, "the stop did not land while PM2 ran two releases"
    out = seen["deploy"].output
    run_id = _run_id(seen["deploy"])
    record = next(r for r in host.records() if r.get("run_id") == run_id)
    assert record["result"] == "interrupted", record
    # the reload under way when the stop came was finished, then journaled; the gate was cut
    pm2_record = record["pm2"]
    assert {k: pm2_record[k] for k in ("action", "release", "completed", "app")} == {
        "action": "reload", "release": record["release"], "completed": True, "app": "ollama-reader"}, record
    assert pm2_record["steps"] == [{"action": "reload", "app": "ollama-reader", "completed": True}], record
    assert f"PM2 reload on {record['release']}" in out and "INTERRUPTED in pm2_app" in out, out
    pm2 = seen["right_after"]["pm2"]
    assert len(pm2) == 2 and all(status == "online" and rel == record["release"] for _, status, rel in pm2), pm2
    _converges(host, seen)


# --------------------------------------------------------------------------------------------
def _error_line(proc):
    text = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0, text
    assert "Traceback" not in text and "[WARNING]" not in text and "ERROR!" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and ";" in lines[0], text
    return lines[0]


def test_bad_inputs_are_refused_before_anything_changes(host, tmp_path):
    host.reset(0)
    records = len(host.records())
    state = host.state()
    with sandbox_instance(INSTANCE) as sb:
        ctl = sb.Controller()
        vault = ctl.vault_file("sandbox")
        password_file = ctl.vault_password_file
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the vault password\n")
    cases = [
        (["deploy", "--host", "sandbox", "--report", str(tmp_path)], {}, "is a directory"),
        (["deploy", "--host", "sandbox", "--report", "/proc/x.json"], {}, "--report /proc/x.json"),
        (["deploy", "--host", "sandbox", "--report", str(tmp_path / "no" / "r.json")], {}, "does not exist"),
        (["deploy", "--host", "sandbox"], {"ANSIBLE_VAULT_PASSWORD_FILE": str(wrong)}, "wrong vault password"),
        (["deploy", "--host", "sandbox"], {"ANSIBLE_VAULT_PASSWORD_FILE": str(tmp_path / "missing")},
         "does not exist"),
        (["restore", "--host", "sandboxes", "--backup", "sandbox_booksdb_20260101T000000Z_r1", "--yes"], {},
         "one named host"),
        (["rollback", "--host", "sandboxes", "--db", "restore", "--backup", "sandbox_booksdb_20260101T000000Z_r1",
          "--yes"], {}, "one named host"),
    ]
    for args, env, expected in cases:
        proc = F.invoke(*args, env={**host.env, **env})
        Outputs.texts += [proc.stdout, proc.stderr]
        line = _error_line(proc)
        assert expected in line, (args, line)
    # the vault file gone: the secrets it held are missing
    aside = vault.with_name("vault.yml.aside")
    shutil.move(vault, aside)
    try:
        proc = F.invoke("deploy", "--host", "sandbox", env=host.env)
        Outputs.texts += [proc.stdout, proc.stderr]
        line = _error_line(proc)
        assert "slipway_db_password is not set" in line and "--" not in line.split(";")[1], line
    finally:
        shutil.move(aside, vault)
    assert password_file.exists()
    assert len(host.records()) == records and host.state() == state
    # a hint names only what the command has: deploy has no --allow-tampered
    lock = host.host.app_dir / ".slipway" / "deploy.lock.json"
    assert not lock.exists()


def test_report_is_written_whole_and_private(host, tmp_path):
    report = tmp_path / "r.json"
    proc = F.invoke("deploy", "--host", "sandbox", "--report", str(report), env=host.env)
    Outputs.texts += [proc.stdout, proc.stderr]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["result"] == "ok" and (report.stat().st_mode & 0o777) == 0o600


def _pg_ctl(host, *args):
    """pg_ctl as postgres; its output goes to a file (a started postmaster keeps inherited pipes open)."""
    log = host.host.pg_dir / "pg_ctl-test.log"
    with open(log, "w") as out:
        proc = F.subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-D",
                                 str(host.host.pgdata), "-l", str(host.host.pg_dir / "startup.log"), *args],
                                stdout=out, stderr=F.subprocess.STDOUT, stdin=F.subprocess.DEVNULL, timeout=120)
    proc.output = log.read_text()
    return proc


def test_postgres_stopped_immediately_mid_migration(host):
    """The database server dies mid-migration (pg_ctl stop -m immediate: no shutdown checkpoint,
    every session cut): the run fails, nothing moves afterwards, the migration is all or nothing
    after crash recovery, and the next deploy converges."""
    host.reset(ROWS)
    before = host.state()
    deploy = F.Deploy(host)
    deploy.wait_for(" db_migrate")
    time.sleep(0.3)
    stopped = _pg_ctl(host, "stop", "-m", "immediate")
    assert stopped.returncode == 0, stopped.output
    gone, left = F.wait_gone(deploy.proc.pid, host.host.user, timeout=GONE_WITHIN + 30,
                              masters_before=deploy.masters_before)
    rc = deploy.finish(timeout=60)
    Outputs.texts.append(deploy.output)
    assert gone <= GONE_WITHIN, f"processes of the run left after {gone:.1f}s: {left}"
    assert rc == 1, deploy.output
    assert "FAILED in db_migrate" in deploy.output, deploy.output
    # PostgreSQL back (crash recovery): the migration committed whole or not at all
    started = _pg_ctl(host, "start", "-w", "-t", "60")
    assert started.returncode == 0, started.output
    right_after = host.state()
    assert right_after["tracking_rows"] in (7, 8), right_after
    assert right_after["sums"] == before["sums"], "a view was lost or invented"
    if right_after["tracking_rows"] == 7:
        assert not any("view_type" in name for name, _ in right_after["indexes"]), right_after["indexes"]
    time.sleep(STILL)
    assert host.state() == right_after, "the host changed after the run had gone"
    run_id = _run_id(deploy)
    record = next(r for r in host.records() if r.get("run_id") == run_id)
    assert record["result"] == "failed" and record["failure"]["phase"] == "db_migrate", record
    _converges(host, {"before": before})


def fill(directory) -> None:
    """Fill ``directory``'s filesystem to its last 64 KiB while another process writes to it: a
    filler file grown by what is free at each look (pg_dump may take some of it between the look
    and the allocation: ENOSPC there means try again with what is left)."""
    size = 0
    with open(directory / "filler", "wb") as filler:
        for _ in range(100):
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= 64 * 1024:
                return
            try:
                os.posix_fallocate(filler.fileno(), size, free - 32 * 1024)
                size += free - 32 * 1024
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    raise AssertionError(f"could not fill {directory}: {os.statvfs(directory).f_bavail} blocks still free")


def test_full_backup_filesystem_fails_the_backup_and_changes_nothing(host):
    """The backup directory's filesystem fills up while pg_dump writes: the backup fails with the
    cause, no partial dump is left, nothing after the backup runs (release, migration, reload), and
    the next deploy, with room again, converges. A filesystem too small from the start is refused
    by preflight, before any change."""
    host.reset(ROWS)
    before = host.state()
    backups = host.host.backup_dir
    backups.mkdir(mode=0o700, exist_ok=True)
    user = F.pwd.getpwnam(host.host.user)
    os.chown(backups, user.pw_uid, user.pw_gid)
    with F.psycopg.connect(host.dsn, autocommit=True) as conn:
        (db_size,) = conn.execute("SELECT pg_database_size(current_database())").fetchone()

    def mount(size: int):
        proc = F.subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700,uid={user.pw_uid},"
                                 f"gid={user.pw_gid}", "tmpfs", str(backups)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs for the backup directory: {proc.stderr.strip()}")

    def umount():
        F.subprocess.run(["umount", str(backups)], capture_output=True, check=True)

    # too small from the start: preflight says so, nothing changes
    mount(8 * 1024 * 1024)
    try:
        proc = F.invoke("deploy", "--host", "sandbox", env=host.env)
        Outputs.texts += [proc.stdout, proc.stderr]
        assert proc.returncode == 1, proc.stdout + proc.stderr
        out = proc.stdout + proc.stderr
        assert "FAILED in preflight" in out and "MiB free" in out and "slipway_backup_dir" in out, out
        # (the mount hides the backups kept below it: compare the rest)
        assert {k: v for k, v in host.state().items() if k != "backups"} == \
            {k: v for k, v in before.items() if k != "backups"}
    finally:
        umount()

    # room for preflight's estimate, then full while pg_dump writes
    mount(db_size + 80 * 1024 * 1024)
    try:
        deploy = F.Deploy(host)
        deploy.wait_for(" db_backup")
        deadline = time.monotonic() + 30
        partial = []
        while time.monotonic() < deadline and not partial:
            partial = list(backups.glob("*.partial"))
            time.sleep(0.01)
        assert partial, "pg_dump did not start writing"
        fill(backups)
        rc = deploy.finish(timeout=300)
        Outputs.texts.append(deploy.output)
        out = deploy.output
        assert rc == 1, out
        assert "FAILED in db_backup" in out and "No space left on device" in out, out
        # no partial dump, no backup, no manifest entry left (the manifest's lock file is the directory's own)
        assert sorted(p.name for p in backups.iterdir()) == [".manifest.lock", "filler"], list(backups.iterdir())
        after = host.state()
        assert {k: v for k, v in after.items() if k != "backups"} == \
            {k: v for k, v in before.items() if k != "backups"}, (before, after)
        run_id = _run_id(deploy)
        record = next(r for r in host.records() if r.get("run_id") == run_id)
        assert record["result"] == "failed" and record["failure"]["phase"] == "db_backup" and not record["backup"], record
    finally:
        umount()
    _converges(host, {"before": before})
