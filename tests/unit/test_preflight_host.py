"""The pure parts of the deploy's one-call host read (module app_preflight, module_utils runtime):
which module runtime a Python picks, the release a failed deploy returns to, whether shared/.env
would change, and what keeps a deploy from being a no-op. No hosts; real files in tmp_path."""
from __future__ import annotations

import os
import sys

from ansible_collections.slipway.core.plugins.module_utils import layout
from ansible_collections.slipway.core.plugins.module_utils import runtime as modruntime
from ansible_collections.slipway.core.plugins.modules import app_preflight as mod

XY = "%d.%d" % sys.version_info[:2]


def test_the_runtime_of_this_python_is_picked_and_installed_only_with_its_marker(tmp_path):
    app = str(tmp_path)
    found = modruntime.select({XY: {"id": "py-x", "archive": "/ctl/x.tgz"}, "2.7": "py-old"}, app)
    assert found["python"] == XY and found["id"] == "py-x" and found["installed"] is False
    path = layout.runtime_dir(app, "py-x")
    os.makedirs(path)
    assert modruntime.select({XY: "py-x"}, app)["installed"] is False  # no marker: incomplete
    open(os.path.join(path, layout.RUNTIME_COMPLETE), "w").close()
    assert modruntime.select({XY: "py-x"}, app)["installed"] is True
    assert modruntime.select({"2.7": "py-old"}, app)["id"] is None  # none built for this Python


def online(release, status="online"):
    return {"name": "app", "status": status, "release": release}


def test_the_rescue_returns_to_what_serves_unless_only_failed_deploys_know_it():
    ok = {"result": "ok", "release": "r1"}
    bad = {"result": "failed", "release": "r2"}
    assert mod.rescue_release("r1", [online("r1")], "app", [ok]) == "r1"
    # r2 serves but no deploy of it ever passed: back to the last release that did
    assert mod.rescue_release("r2", [online("r2")], "app", [ok, bad]) == "r1"
    # current is not online: the newest release a deploy of passed, not current
    assert mod.rescue_release("r2", [online("r2", "errored")], "app", [{"result": "ok", "release": "r2"}, ok]) == "r1"
    assert mod.rescue_release("r3", [online("r3", "stopped")], "app", [bad]) is None
    # a hand-deployed host: what serves is the only release there is
    assert mod.rescue_release("r9", [online("r9")], "app", []) == "r9"


def test_shared_env_changes_when_its_text_or_its_keys_differ(tmp_path):
    from ansible_collections.slipway.core.plugins.module_utils.appdir import env_text

    app = str(tmp_path)
    assert mod.env_state(app, None) == {"changed": False, "removed": [], "error": None}
    assert mod.env_state(app, env_text({"A": "1"}))["changed"] is True  # no file yet
    os.makedirs(layout.shared_dir(app))
    with open(os.path.join(layout.shared_dir(app), layout.ENV_FILE), "w") as handle:
        handle.write(env_text({"A": "1", "B": "2"}))
    assert mod.env_state(app, env_text({"A": "1", "B": "2"})) == {"changed": False, "removed": [], "error": None}
    assert mod.env_state(app, env_text({"A": "1"})) == {"changed": True, "removed": ["B"], "error": None}


def test_the_env_file_text_leaves_the_controller_as_one_text_and_a_bad_key_is_one_line():
    import pytest
    from ansible.errors import AnsibleFilterError
    from ansible_collections.slipway.core.plugins.filter.env_file import env_file_text

    text = env_file_text({"PORT": 3000, "DATABASE_URL": "postgresql://u:s3cret@db/x"})
    assert text.splitlines()[1:] == ["DATABASE_URL=postgresql://u:s3cret@db/x", "PORT=3000"]
    with pytest.raises(AnsibleFilterError) as err:
        env_file_text({"1A": "s3cret"})
    assert "1A" in str(err.value) and "s3cret" not in str(err.value)


def test_a_deploy_is_a_noop_only_when_nothing_at_all_would_change():
    release = {"installed": True, "current": "r1"}
    pm2 = {"error": None, "action": "none", "reason": "release r1 runs on all 2 instances", "modes_to_fix": [],
           "handover_left": 0, "env_releases": ["r1"]}
    env = {"changed": False, "removed": [], "error": None}
    plan = {"applied": [], "blockers": [], "error": None}
    assert mod.noop_why("r1", release, pm2, env, [], plan) == []
    cases = [
        (dict(release=dict(release, installed=False)), "not installed"),
        (dict(release=dict(release, current="r0")), "current points at r0"),
        (dict(pm2=dict(pm2, action="reloaded", reason="1 of 2 instances not online")), "not online"),
        (dict(pm2=dict(pm2, modes_to_fix=["/home/u/.pm2 (0755 -> 0700)"])), "not private"),
        (dict(pm2=dict(pm2, handover_left=2)), "handover app"),
        (dict(pm2=dict(pm2, env_releases=["r0", "r1"])), "RELEASE_ID r0"),
        (dict(env=dict(env, changed=True)), "shared/.env"),
        (dict(takeover=["/var/www/app"]), "/var/www/app"),
        (dict(plan=None), "not planned"),
        (dict(plan=dict(plan, blockers=["tampered"])), "not planned"),
        (dict(plan=dict(plan, applied=["0007"])), "1 migration(s) to apply"),
    ]
    for change, said in cases:
        args = {**dict(release=release, pm2=pm2, env=env, takeover=[], plan=plan), **change}
        why = mod.noop_why("r1", args["release"], args["pm2"], args["env"], args["takeover"], args["plan"])
        assert why and any(said in w for w in why), (change, why)
