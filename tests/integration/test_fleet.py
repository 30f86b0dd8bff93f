"""A group deploy in batches (instance 11, after test_diagnose has taken its hosts down: four
hosts in the incident state, `slipway_serial: 2` in the group's vars): the batches in the report and
their order on the hosts (no host of the second batch switches before every host of the first has
finished), and a host failing in the first batch stopping the rollout there: its peer in the batch
deploys, the second batch is left as it was."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from conftest import cli, host_env, sandbox_up
from instances import sandbox_instance

INSTANCE = "11"
ENV = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
NAMES = ["sandbox", "sandbox-2", "sandbox-3", "sandbox-4"]
T0007 = "0007_add_unique_constraint_book_view_statistics"


@pytest.fixture(scope="module")
def fleet():
    with sandbox_up(INSTANCE, hosts=4, state="incident"):
        with sandbox_instance(INSTANCE) as sb:
            hosts = {n: sb.find_host(n) for n in NAMES}
            group_vars = sb.Controller().inventory_dir / "group_vars"
        group_vars.mkdir(exist_ok=True)
        (group_vars / "sandboxes.yml").write_text("slipway_serial: 2\n")
        yield {"hosts": hosts, "env": {n: host_env(n, env=ENV) for n in NAMES}}


def deploy(tmp_path: Path, expect: int) -> tuple[dict, str]:
    report = tmp_path / "report.json"
    proc = cli("deploy", "--host", "sandboxes", "--report", str(report), check=False, env=ENV, timeout=900)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(report.read_text()), proc.stdout


def pending(fleet, name: str) -> bool:
    with psycopg.connect(fleet["env"][name]["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0] == 7


def records(fleet, name: str) -> list[dict]:
    path = fleet["hosts"][name].app_dir / ".slipway" / "deploys.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def journal(fleet, name: str, run_id: str) -> list[dict]:
    path = fleet["hosts"][name].app_dir / ".slipway" / "runs" / f"{run_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_failing_host_stops_the_rollout_at_its_batch(fleet, tmp_path):
    with sandbox_instance(INSTANCE) as sb:
        host_vars = sb.Controller().inventory_dir / "host_vars" / "sandbox-2" / "smoke.yml"
    # sandbox-2's smoke tests ask for a book its database does not have: 404, after preflight passed
    host_vars.write_text("slipway_smoke_book_id: 00000000-0000-4000-8000-000000000000\n")
    try:
        report, out = deploy(tmp_path, expect=1)
    finally:
        host_vars.unlink()
    assert report["rollout"]["batches"] == [["sandbox", "sandbox-2"], ["sandbox-3", "sandbox-4"]]
    assert report["rollout"]["stopped_after_batch"] == 1
    assert "rollout: 2 batch(es) of up to 2 (slipway_serial 2, slipway_max_fail_percentage 0)" in out
    assert "the rollout stopped after batch 1 (a host failed there); not deployed: sandbox-3, sandbox-4" in out
    hosts = report["hosts"]
    assert hosts["sandbox"]["result"] == "ok" and hosts["sandbox"]["batch"] == 1  # its peer in the batch deployed
    assert hosts["sandbox-2"]["result"] == "failed" and hosts["sandbox-2"]["failure"]["phase"] == "smoke_test"
    assert [hosts[n]["result"] for n in ("sandbox-3", "sandbox-4")] == ["not run", "not run"]
    assert not pending(fleet, "sandbox")
    for name in ("sandbox-3", "sandbox-4"):  # left as they were: 0007 pending, no deploy recorded
        assert pending(fleet, name) and records(fleet, name) == []


def test_batches_deploy_one_after_the_other(fleet, tmp_path):
    report, out = deploy(tmp_path, expect=0)
    assert [report["hosts"][n]["result"] for n in NAMES] == ["ok"] * 4
    assert [report["hosts"][n]["batch"] for n in NAMES] == [1, 1, 2, 2]
    assert report["rollout"]["stopped_after_batch"] is None
    run_id = report["run_id"]
    finished = {n: when(next(r for r in records(fleet, n) if r["run_id"] == run_id)["finished"]) for n in NAMES}
    # each change a host's deploy makes is journaled when it is made (backup, migrations, switch, PM2)
    first_change = {n: min(when(e["at"]) for e in journal(fleet, n, run_id)) for n in ("sandbox-3", "sandbox-4")}
    # the second batch changes nothing before the whole first batch has finished
    assert max(finished["sandbox"], finished["sandbox-2"]) <= min(first_change.values())
    for name in NAMES:
        assert not pending(fleet, name)


def test_a_noop_on_every_host_runs_in_one_batch(fleet, tmp_path):
    report, out = deploy(tmp_path, expect=0)
    assert all(report["hosts"][n]["noop"] for n in NAMES) and report["changed"] == 0
    assert report["rollout"]["batches"] == [NAMES] and report["rollout"]["one_batch_noop"] is True
    assert "all hosts in one batch: the deploy could change nothing on any of them" in out
    run_id = report["run_id"]
    assert sorted(n for n in NAMES for r in records(fleet, n) if r["run_id"] == run_id and r["noop"]) == sorted(NAMES)
    assert [report["hosts"][n]["batch"] for n in NAMES] == [1, 1, 1, 1]


def test_a_bad_serial_is_one_line_before_anything_changes(fleet, tmp_path):
    with sandbox_instance(INSTANCE) as sb:
        group_vars = sb.Controller().inventory_dir / "group_vars" / "sandboxes.yml"
    group_vars.write_text("slipway_serial: lots\n")
    try:
        proc = cli("deploy", "--host", "sandboxes", check=False, env=ENV, timeout=300)
    finally:
        group_vars.write_text("slipway_serial: 2\n")
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("error: slipway_serial 'lots' is not a number of hosts or a percentage; set e.g. "
                                   "slipway_serial: 2 or slipway_serial: 25% in the inventory")
