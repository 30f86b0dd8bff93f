"""The deploy's report model and its rendering, and the journal's summary of an interrupted run:
pure functions, fed the event and result shapes ansible-runner and the modules produce (no hosts)."""
from __future__ import annotations

import io

from slipway.deploy import PhaseTracker, build_report, render_report
from slipway.journal import describe, summarize

HOST = "web1"


def _events(*steps):
    """ansible-runner events: (role, kind, changed) per task."""
    out = []
    for role, kind, changed in steps:
        data = {"host": HOST, "role": role, "task": f"{role} task", "duration": 0.5,
                "res": {"changed": changed}}
        out += [{"event": "runner_on_start", "event_data": data}, {"event": kind, "event_data": data}]
    return out


def _tracker(*steps):
    tracker = PhaseTracker(out=io.StringIO(), quiet=True)
    for event in _events(*steps):
        tracker(event)
    return tracker


def _result(rc, host_data, failures=(), finished=True):
    return {"rc": rc, "status": "successful" if rc == 0 else "failed", "finished": finished,
            "data": {"deploy": {HOST: host_data}} if host_data else {}, "failures": list(failures)}


def test_a_deploy_that_rolled_back_healthy_says_so():
    tracker = _tracker(("preflight", "runner_on_ok", False), ("app_release", "runner_on_ok", True),
                       ("pm2_app", "runner_on_failed", False))
    data = {"result": "failed", "previous": "r1", "rolled_back": True,
            "failure": {"phase": "pm2_app", "task": "t", "cause": "pm2_app reloaded app failed: boom"},
            "pm2": {"action": "reloaded", "release": "r1", "healthy": True, "online": 2, "total": 2, "processes": []}}
    report = build_report(HOST, [HOST], "run-1", "r2", "dir", False, _result(2, data), [], tracker, {}, "", 3.0)
    assert report["result"] == "failed" and report["hosts"][HOST]["rolled_back"] is True
    assert [p["name"] for p in report["hosts"][HOST]["phases"]] == ["preflight", "app_release", "pm2_app"]
    assert report["changed"] == 1
    text = "\n".join(render_report(report))
    assert "web1: FAILED in pm2_app: pm2_app reloaded app failed: boom" in text
    assert "rolled back: current -> r1; PM2 runs it healthy (2/2 instances online, reloaded)" in text
    assert text.endswith("FAILED: r2 was not deployed to web1 (3.0s; see the failure above)")


def test_a_rollback_that_left_the_app_down_is_not_called_a_rollback_that_worked():
    tracker = _tracker(("pm2_app", "runner_on_failed", False))
    data = {"result": "failed", "previous": "r1", "rolled_back": True,
            "failure": {"phase": "pm2_app", "task": "t", "cause": "gate failed"},
            "pm2": {"action": "reloaded", "release": "r1", "healthy": "False", "online": 1, "total": 2,
                    "app_error": "Error: ECONNREFUSED 127.0.0.1:5432",
                    "processes": [{"pm_id": 0, "status": "errored", "release": "r1", "restarts": 15},
                                  {"pm_id": 1, "status": "online", "release": "r1", "restarts": 0}]}}
    report = build_report(HOST, [HOST], "run-1", "r2", "dir", False, _result(2, data), [], tracker, {}, "", 1.0)
    text = "\n".join(render_report(report))
    assert "PM2 runs it healthy" not in text
    assert "rolled back current -> r1, but the app is NOT healthy on it: 1/2 instances online on r1" in text
    assert "instance 0: errored on r1, 15 restarts" in text and "instance 1" not in text
    assert "the app's last error: Error: ECONNREFUSED 127.0.0.1:5432" in text


def test_a_rescue_returns_to_the_release_that_served_healthy_not_merely_the_previous_one():
    tracker = _tracker(("pm2_app", "runner_on_failed", False))
    data = {"result": "failed", "previous": "r2", "rolled_back": True, "rolled_back_to": "r1",
            "failure": {"phase": "pm2_app", "task": "t", "cause": "gate failed"},
            "pm2": {"action": "reloaded", "release": "r1", "healthy": True, "online": 2, "total": 2, "processes": []}}
    report = build_report(HOST, [HOST], "run-1", "r3", "dir", False, _result(2, data), [], tracker, {}, "", 1.0)
    assert report["hosts"][HOST]["rolled_back_to"] == "r1"
    assert "rolled back: current -> r1; PM2 runs it healthy" in "\n".join(render_report(report))


def test_a_rescue_that_stopped_the_app_says_so():
    tracker = _tracker(("pm2_app", "runner_on_failed", False))
    data = {"result": "failed", "previous": None, "rolled_back": False, "stopped": "True",
            "release_state": {"id": "r1", "previous": None, "switched": True},
            "failure": {"phase": "pm2_app", "task": "t", "cause": "pm2_app started app failed: app error: Error: boom"},
            "pm2": {"action": "deleted", "release": "r1", "healthy": False, "online": 0, "total": 0, "processes": []}}
    report = build_report(HOST, [HOST], "run-1", "r1", "dir", False, _result(2, data), [], tracker, {}, "", 1.0)
    assert report["hosts"][HOST]["stopped"] is True
    text = "\n".join(render_report(report))
    assert "no release served healthy before this deploy, so the rescue stopped the app (pm2 delete); " \
           "current -> r1 serves nothing" in text
    assert "rolled back" not in text


def test_an_interrupted_run_is_reported_from_its_journal():
    events = [{"event": "backup", "id": "b1", "path": "/b/b1.dump"},
              {"event": "switched", "release": "r2", "previous": "r1"},
              {"event": "migrations", "applied": ["0007_x"]},
              {"event": "pm2", "action": "reload", "release": "r2", "completed": False}]
    record = summarize("run-1", "r2", events, "r2", how="stopped by SIGTERM")
    assert record["result"] == "interrupted" and record["switched_from"] == "r1"
    assert record["failure"]["phase"] == "pm2_app" and record["migrations_applied"] == ["0007_x"]
    assert describe(record) == ["backup b1 taken", "current switched from r1 to r2", "migrations committed: 0007_x",
                                "PM2 reload on r2 (cut short)"]
    tracker = _tracker(("preflight", "runner_on_ok", False), ("pm2_app", "runner_on_ok", True))
    cut = {HOST: {"record": record, "written": True, "stopped": True}}
    report = build_report(HOST, [HOST], "run-1", "r2", "dir", False, _result(-15, None, finished=False), [],
                          tracker, cut, "stopped by SIGTERM", 9.0)
    info = report["hosts"][HOST]
    assert report["result"] == "interrupted" and info["result"] == "interrupted"
    assert info["failure"] == {"phase": "pm2_app", "task": None, "cause": "stopped by SIGTERM"}
    assert info["interrupted"]["record_written"] is True
    text = "\n".join(render_report(report))
    assert "web1: INTERRUPTED in pm2_app: stopped by SIGTERM" in text
    assert "PM2 reload on r2 (cut short)" in text
    assert "`invoke rollback --host web1` returns to r1" in text
    assert "was interrupted (stopped by SIGTERM; 9.0s)" in text


def test_secrets_are_scrubbed_from_the_report_model():
    tracker = _tracker(("db_migrate", "runner_on_failed", False))
    data = {"result": "failed", "failure": {"phase": "db_migrate", "task": "t", "cause": "auth failed for s3cr3t-pw"}}
    failures = [{"host": HOST, "task": "t", "msg": "password s3cr3t-pw rejected"}]
    report = build_report(HOST, [HOST], "run-1", "r2", "dir", False, _result(2, data, failures), ["s3cr3t-pw"],
                          tracker, {}, "", 1.0)
    assert "s3cr3t-pw" not in repr(report) and "s3cr3t-pw" not in "\n".join(render_report(report))


def test_phases_are_the_roles_deploy_yml_runs_in_order():
    from slipway.deploy import PHASES

    assert PHASES == ("preflight", "db_backup", "app_release", "db_migrate", "pm2_app", "smoke_test")


def test_the_rescue_roles_tasks_and_what_it_includes_count_as_the_rescue_phase():
    tracker = PhaseTracker(out=io.StringIO(), quiet=True)

    def task(role, kind="runner_on_ok", changed=False):
        data = {"host": HOST, "role": role, "task": "t", "duration": 1.0, "res": {"changed": changed}}
        tracker({"event": "playbook_on_task_start", "event_data": {"role": role, "task": "t"}})
        tracker({"event": "runner_on_start", "event_data": data})
        tracker({"event": kind, "event_data": data})

    task("app_release", changed=True)
    task("pm2_app", kind="runner_on_failed")
    task("rescue")  # Record the failure
    task("app_release", changed=True)  # the rollback it includes
    task("pm2_app", changed=True)  # the reload it includes
    task("")  # the block's always: the record
    phases = {p["name"]: p for p in tracker.phases(HOST)}
    assert list(phases) == ["app_release", "pm2_app", "rescue"]
    assert phases["app_release"]["changed"] == 1 and phases["pm2_app"]["status"] == "failed"
    assert phases["rescue"]["tasks"] == 3 and phases["rescue"]["changed"] == 2
    assert tracker.last_phase(HOST) == "pm2_app"


def test_the_report_shows_the_batches_the_play_ran():
    from slipway.deploy import add_rollout, rollout_line

    plan = {"serial": 1, "max_fail_percentage": 0, "size": 1, "batches": [["a"], ["b"], ["c"]], "noop_together": True}
    assert rollout_line(plan).endswith("all in one batch if preflight finds nothing to change on any of them")
    assert "one batch if" not in rollout_line({**plan, "noop_together": False})

    def report(*hosts):
        return {"result": "ok", "hosts": {n: dict(h, result="ok") for n, h in zip("abc", hosts, strict=True)}}

    # every host a no-op, and the play ran them together (ansible_play_batch): one batch, even when a
    # host's own entry is missing its batch (cut short)
    together = report({"noop": True, "batch_hosts": ["a", "b", "c"]}, {"noop": True, "batch_hosts": ["a", "b", "c"]}, {})
    add_rollout(together, plan)
    assert together["rollout"]["batches"] == [["a", "b", "c"]] and together["rollout"]["one_batch_noop"] is True
    assert [together["hosts"][n]["batch"] for n in "abc"] == [1, 1, 1]
    # the play's batches as planned (a host changed something, or two hosts share a database)
    apart = report(*({"noop": True, "batch_hosts": [n]} for n in "abc"))
    add_rollout(apart, plan)
    assert apart["rollout"]["batches"] == [["a"], ["b"], ["c"]] and apart["rollout"]["one_batch_noop"] is False
