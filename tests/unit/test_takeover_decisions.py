"""The pure parts of a takeover and of a removed environment key: which PM2 action the processes
call for (module_utils pm2.decide), which keys left a .env (app_release.env_keys) and what a takeover
copies from the hand-deployed directory (app_release.adoption). No hosts; real files in tmp_path."""
from __future__ import annotations

import os

from ansible_collections.slipway.core.plugins.module_utils import pm2
from ansible_collections.slipway.core.plugins.modules import app_release

CURRENT = "/srv/app/current"


def proc(cwd=CURRENT, mode="cluster_mode", status="online", release="r1", script="server.js"):
    return {"pm_cwd": cwd, "pm_exec_path": f"{cwd}/{script}", "exec_mode": mode, "status": status, "release": release}


def test_processes_started_elsewhere_are_handed_over_without_a_gap_in_cluster_mode():
    action, reason = pm2.decide([proc("/var/www/reader.market", release="reader.market")] * 2, CURRENT, "r1", "auto")
    assert action == "replaced" and "/var/www/reader.market" in reason and "no gap" in reason


def test_a_handover_needs_every_instance_online_in_cluster_mode():
    old = "/var/www/reader.market"
    assert pm2.decide([proc(old, mode="fork_mode")], CURRENT, "r1", "auto")[0] == "restarted"
    action, reason = pm2.decide([proc(old), proc(old, status="errored")], CURRENT, "r1", "auto")
    assert action == "restarted" and "short gap" in reason


def test_reload_replace_replaces_processes_that_run_from_current():
    action, reason = pm2.decide([proc(), proc()], CURRENT, "r1", "replace")
    assert action == "replaced" and "reload=replace" in reason
    assert pm2.decide([proc(), proc()], CURRENT, "r1", "auto")[0] == "none"
    assert pm2.decide([], CURRENT, "r1", "replace")[0] == "started"


def test_reload_never_leaves_processes_started_elsewhere():
    assert pm2.decide([proc("/elsewhere")], CURRENT, "r1", "never") == ("none", "reload=never")


def test_under_is_the_app_dir_or_inside_it():
    assert pm2.under("/srv/app/current", "/srv/app") and pm2.under("/srv/app", "/srv/app/")
    assert pm2.under("/srv/app/releases/r1/", "/srv//app/")
    assert pm2.under(os.path.expanduser("~/app/current"), "~/app")
    assert not pm2.under("/srv/app2/current", "/srv/app") and not pm2.under(None, "/srv/app")


def test_outside_lists_the_directories_an_app_runs_from_outside_the_app_dir():
    procs = [{"name": "web", "pm_cwd": "/srv/app/current"}, {"name": "web", "pm_cwd": "/var/www/site"},
             {"name": "web", "pm_cwd": "/var/www/site"}, {"name": "other", "pm_cwd": "/elsewhere"}]
    assert pm2.outside(procs, "web", "/srv/app/") == ["/var/www/site"]
    assert pm2.outside(procs[:1], "web", "/srv/app") == []


def test_env_keys_are_the_names_a_dotenv_file_sets():
    text = "# comment\nexport A=1\nB='x y'\n C = 3\nnot a line\n9X=bad\n"
    assert app_release.env_keys(text) == {"A", "B", "C"}


def test_adoption_takes_the_env_only_when_shared_has_none_and_only_missing_logs(tmp_path):
    old, app = tmp_path / "www", tmp_path / "app"
    (old / "logs").mkdir(parents=True)
    (app / "logs").mkdir(parents=True)
    (app / "shared").mkdir()
    (old / ".env").write_text("PORT=3000\n")
    (old / "logs" / "err.log").write_text("old error\n")
    (old / "logs" / "out.log").write_text("old out\n")
    (app / "logs" / "out.log").write_text("already here\n")
    os.symlink(old / "logs" / "err.log", old / "logs" / "link.log")
    env_path = str(app / "shared" / ".env")
    env, logs = app_release.adoption(str(old), str(app), env_path, True)
    assert env == "PORT=3000\n" and logs == [("err.log", len("old error\n"))]
    assert app_release.adoption(str(old), str(app), env_path, False)[0] is None  # slipway_app_env set: not taken
    (app / "shared" / ".env").write_text("PORT=4000\n")
    assert app_release.adoption(str(old), str(app), env_path, True)[0] is None  # shared/.env exists: kept


def test_adoption_of_a_missing_directory_is_one_line(tmp_path):
    try:
        app_release.adoption(str(tmp_path / "nope"), str(tmp_path), str(tmp_path / ".env"), True)
    except ValueError as exc:
        assert "is not a directory; pass the directory the app runs from" in str(exc)
    else:
        raise AssertionError("no error")
