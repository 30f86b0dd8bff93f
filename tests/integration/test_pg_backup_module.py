"""The slipway.core.pg_backup module, called by ansible-playbook (through ansible-runner) against the
real test cluster: create/verify/record, check mode, retention, restore, failures that change nothing."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from migtools import MIGRATIONS, TAGS, run_module_once, seed_duplicates, stats

PLAYBOOK = ROOT / "tests" / "playbooks" / "pg_backup.yml"

if os.environ.get("SLIPWAY_TEST_PG_INSTANCE"):
    # a cluster of its own (e.g. a helper's sandbox instance + 10) instead of the suite's shared one,
    # for running this file while someone else runs the suite on the same machine
    @pytest.fixture(scope="module")
    def pgc():
        from pgcluster import Cluster

        cluster = Cluster(int(os.environ["SLIPWAY_TEST_PG_INSTANCE"]))
        cluster.start()
        yield cluster
        cluster.stop()


def books_db(pgc, db) -> None:
    """The incident's schema (migrations 0000-0006, applied as plain SQL) and data (duplicates included)."""
    with pgc.connect(db) as conn:
        for tag in TAGS[:7]:
            conn.execute((MIGRATIONS / f"{tag}.sql").read_text())
    seed_duplicates(pgc, db)


def run_module(pgc, db, backup_dir: Path, action: str = "create", check_mode: bool = False, **params) -> dict:
    """Run the module once; returns the event kind, its result (``res``) and the playbook's rc."""
    extravars = {"t_action": action, "t_backup_dir": str(backup_dir), "t_host": "127.0.0.1", "t_port": pgc.port,
                 "t_user": pgc.user, "t_password": pgc.password, "t_db": db, "t_check_mode": check_mode,
                 "t_host_label": "web-1"}
    extravars.update({f"t_{k}": v for k, v in params.items()})
    return run_module_once(PLAYBOOK, extravars, pgc.password)


def ok(out: dict) -> dict:
    assert out["rc"] == 0 and out["event"] == "runner_on_ok", out["res"].get("msg")
    return out["res"]


def failed(out: dict) -> str:
    assert out["rc"] != 0 and out["event"] == "runner_on_failed" and out["res"]["changed"] is False, out["res"]
    msg = out["res"]["msg"]
    assert "\n" not in msg
    return msg


def manifest(backup_dir: Path) -> list[dict]:
    return json.loads((backup_dir / "manifest.json").read_text())


def snapshot(backup_dir: Path) -> dict:
    """Every file in the dir with its bytes' hash (what 'nothing changed' means for the dir)."""
    if not backup_dir.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(backup_dir.iterdir())}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_verifies_and_records_check_mode_writes_nothing(pgc, db, tmp_path):
    books_db(pgc, db)
    backup_dir = tmp_path / "deep" / "backups"

    res = ok(run_module(pgc, db, backup_dir, "plan"))
    assert res["changed"] is False and res["db_size"] > 0 and res["enough"] is True
    assert res["free_bytes"] >= res["db_size"] and not backup_dir.parent.exists()

    res = ok(run_module(pgc, db, backup_dir, check_mode=True, release="r0123456789ab"))
    assert res["changed"] is True and res["backup"]["path"].startswith(str(backup_dir) + "/")
    assert res["backup"]["id"].startswith(f"web-1_{db.replace('_', '-')}_") and res["backup"]["id"].endswith("_r0123456789ab")
    assert not backup_dir.parent.exists()  # check mode wrote nothing, not even the dir

    res = ok(run_module(pgc, db, backup_dir, release="r0123456789ab", reason="manual"))
    made = res["backup"]
    path = Path(made["path"])
    assert res["changed"] is True and res["pruned"] == [] and res["diff"]["after"]["backups"] == [made["id"]]
    assert path.name == made["id"] + ".dump" and mode(path) == 0o600 and mode(backup_dir) == 0o700
    assert mode(backup_dir / "manifest.json") == 0o600
    assert not list(backup_dir.glob("*.partial"))
    listing = subprocess.run(["pg_restore", "--list", str(path)], capture_output=True, text=True, check=True).stdout
    toc = [ln for ln in listing.splitlines() if ln.strip() and not ln.startswith(";")]
    assert made["toc_entries"] == len(toc) > 0 and any("book_view_statistics" in ln for ln in toc)
    [entry] = manifest(backup_dir)
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == made["sha256"]
    assert entry["size"] == path.stat().st_size and entry["file"] == path.name and entry["host"] == "web-1"
    assert entry["db"] == db and entry["release"] == "r0123456789ab" and entry["reason"] == "manual"
    assert entry["created"].endswith("Z") and entry["toc_entries"] == len(toc)

    res = ok(run_module(pgc, db, backup_dir, "list"))
    assert res["changed"] is False and [(b["id"], b["exists"], b["size_ok"]) for b in res["backups"]] == [(made["id"], True, True)]

    # check mode with an existing manifest: still nothing written
    before = snapshot(backup_dir)
    res = ok(run_module(pgc, db, backup_dir, check_mode=True))
    assert res["changed"] is True and not Path(res["backup"]["path"]).exists() and snapshot(backup_dir) == before


def test_retention_keeps_the_newest_and_never_foreign_files(pgc, db, tmp_path):
    books_db(pgc, db)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir(mode=0o755)
    foreign = {"notes.txt": b"mine", "handmade.dump": b"not in the manifest"}
    for name, data in foreign.items():
        (backup_dir / name).write_bytes(data)

    ids, pruned = [], []
    for _ in range(3):
        res = ok(run_module(pgc, db, backup_dir, keep=2))
        ids.append(res["backup"]["id"])
        pruned.append(res["pruned"])
    assert len(set(ids)) == 3 and pruned == [[], [], [ids[0]]]
    assert mode(backup_dir) == 0o700  # tightened
    assert [e["id"] for e in manifest(backup_dir)] == ids[1:]
    assert sorted(p.name for p in backup_dir.glob("*.dump")) == sorted([f"{i}.dump" for i in ids[1:]] + ["handmade.dump"])
    for name, data in foreign.items():
        assert (backup_dir / name).read_bytes() == data


def test_restore_brings_the_data_back_after_a_safety_backup(pgc, db, tmp_path):
    books_db(pgc, db)
    backup_dir = tmp_path / "backups"
    before = stats(pgc, db)
    target = ok(run_module(pgc, db, backup_dir, keep=2))["backup"]["id"]

    with pgc.connect(db) as conn:  # what a bad deploy might do
        conn.execute("UPDATE book_view_statistics SET view_count = view_count + 1000")
        conn.execute("DELETE FROM book_view_statistics WHERE view_type = 'reader_open'")
    changed = stats(pgc, db)
    assert changed != before

    # check mode: validates only
    dir_before = snapshot(backup_dir)
    res = ok(run_module(pgc, db, backup_dir, "restore", check_mode=True, backup_id=target))
    assert res["changed"] is True and res["restored"] == target and res["safety_backup"] is None
    assert stats(pgc, db) == changed and snapshot(backup_dir) == dir_before

    # keep=2 with one newer backup: the safety backup's retention must not prune the restore target
    newer = ok(run_module(pgc, db, backup_dir, keep=2))["backup"]["id"]
    res = ok(run_module(pgc, db, backup_dir, "restore", backup_id=target, keep=2))
    assert res["changed"] is True and res["restored"] == target and res["safety_backup"] not in (None, target, newer)
    assert stats(pgc, db) == before
    entries = {e["id"]: e for e in manifest(backup_dir)}
    assert target in entries and (backup_dir / entries[target]["file"]).exists()
    safety = entries[res["safety_backup"]]
    assert safety["reason"] == "pre-restore" and (backup_dir / safety["file"]).exists()

    # the safety backup holds the changed data: restoring it without another safety backup gets it back
    res = ok(run_module(pgc, db, backup_dir, "restore", backup_id=safety["id"], safety_backup=False))
    assert res["safety_backup"] is None and stats(pgc, db) == changed


def test_bad_restore_input_fails_in_one_line_and_changes_nothing(pgc, db, tmp_path):
    books_db(pgc, db)
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = failed(run_module(pgc, db, empty, "restore", backup_id="web-1_x_20260101T000000Z_none"))
    assert "no backup manifest" in msg and "take one first" in msg and snapshot(empty) == {}

    backup_dir = tmp_path / "backups"
    made = ok(run_module(pgc, db, backup_dir))["backup"]
    data = stats(pgc, db)
    dir_before = snapshot(backup_dir)
    for check_mode in (True, False):
        msg = failed(run_module(pgc, db, backup_dir, "restore", check_mode=check_mode, backup_id="web-1_nope_20260101T000000Z_none"))
        assert "is not in" in msg and made["id"] in msg and "pass one of the manifest's ids" in msg
        assert snapshot(backup_dir) == dir_before and stats(pgc, db) == data

    with open(made["path"], "ab") as handle:  # damaged after it was recorded
        handle.write(b"\0")
    dir_before = snapshot(backup_dir)
    msg = failed(run_module(pgc, db, backup_dir, "restore", backup_id=made["id"]))
    assert "does not match its manifest sha256" in msg and "pick another backup id" in msg
    assert snapshot(backup_dir) == dir_before and stats(pgc, db) == data  # no safety backup, no restore


def test_failed_dump_leaves_no_file_and_the_manifest_unchanged(pgc, db, tmp_path):
    books_db(pgc, db)
    backup_dir = tmp_path / "backups"
    ok(run_module(pgc, db, backup_dir))
    before = snapshot(backup_dir)

    msg = failed(run_module(pgc, "no_such_db", backup_dir))
    assert msg.startswith("pg_dump failed:") and "no_such_db" in msg
    assert snapshot(backup_dir) == before and not list(backup_dir.glob("*.partial"))

    msg = failed(run_module(pgc, db, backup_dir, password="wrong-" + pgc.password[:4]))
    assert "pg_dump failed:" in msg and "password authentication failed" in msg
    assert snapshot(backup_dir) == before

    msg = failed(run_module(pgc, db, backup_dir, keep=0))
    assert "keep must be at least 1" in msg and snapshot(backup_dir) == before
