"""The slipway.core.pg_migrations module, called by ansible-playbook (through ansible-runner) against
the real test cluster: call, assert the result, query the database, repeat in check mode, repeat."""
from __future__ import annotations

from pathlib import Path

from conftest import ROOT, sb
from migtools import MIGRATIONS, T0007, history, incident_db, incident_with, run_module_once, stats

PLAYBOOK = ROOT / "tests" / "playbooks" / "pg_migrations.yml"


def run_module(pgc, db, folder: Path, check_mode: bool) -> dict:
    """Run the module once; returns the event kind, its result (``res``) and the playbook's rc."""
    extravars = {"t_migrations": str(folder), "t_host": "127.0.0.1", "t_port": pgc.port, "t_user": pgc.user,
                 "t_password": pgc.password, "t_db": db, "t_check_mode": check_mode}
    return run_module_once(PLAYBOOK, extravars, pgc.password)


def test_module_plans_applies_and_is_idempotent(pgc, db, node_modules, tmp_path):
    incident_db(pgc, db, node_modules, tmp_path)
    before = stats(pgc, db)

    # check mode first: predicts the change honestly, changes nothing
    out = run_module(pgc, db, MIGRATIONS, check_mode=True)
    res = out["res"]
    assert out["rc"] == 0 and out["event"] == "runner_on_ok" and res["changed"] is True and res["applied"] == [T0007]
    assert res["plan"]["preflight"]["rehearsal"]["ok"] is True
    assert res["plan"]["preflight"]["checks"][0]["live"]["groups"] == 3
    assert res["diff"]["after"]["applied"][-1] == T0007 and T0007 not in res["diff"]["before"]["applied"]
    assert stats(pgc, db) == before and len(history(pgc, db)) == 7

    # the call
    res = run_module(pgc, db, MIGRATIONS, check_mode=False)["res"]
    assert res["changed"] is True and res["applied"] == [T0007] and res["summary"]["pending"] == 1
    after = stats(pgc, db)
    assert after["constraint"] == 1 and after["dup_groups"] == 0 and after["total"] == before["total"]
    assert len(history(pgc, db)) == 8

    # check mode again: nothing to do; then a real repeat: changed=false
    res = run_module(pgc, db, MIGRATIONS, check_mode=True)["res"]
    assert res["changed"] is False and res["applied"] == [] and res["plan"]["result"] == "up_to_date"
    res = run_module(pgc, db, MIGRATIONS, check_mode=False)["res"]
    assert res["changed"] is False and res["applied"] == []
    assert stats(pgc, db) == after and len(history(pgc, db)) == 8


def test_module_fails_in_preflight_without_change(pgc, db, node_modules, tmp_path):
    folder = incident_with(pgc, db, node_modules, tmp_path, "0007_unique_only",
                           'ALTER TABLE "book_view_statistics" ADD CONSTRAINT "u" UNIQUE("book_id","view_type");')
    before = stats(pgc, db)
    for check_mode in (True, False):
        out = run_module(pgc, db, folder, check_mode=check_mode)
        res = out["res"]
        assert out["rc"] != 0 and out["event"] == "runner_on_failed" and res["changed"] is False
        assert "preflight: 0007_unique_only statement 1" in res["msg"] and "3 duplicate key groups" in res["msg"]
        assert res["plan"]["preflight"]["checks"][0]["ok"] is False
    assert stats(pgc, db) == before and len(history(pgc, db)) == 7
    assert sb.UNIQUE_CONSTRAINT  # the constraint name the app relies on (used by stats())
