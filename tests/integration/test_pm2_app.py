"""The pm2_app role/module against a real sandbox host (instance 4: its own user, sshd, PostgreSQL,
PM2), run through slipway.runner.run_playbook as the host's user over SSH: no-op, a legacy start
moved to the `current` link, check mode, a zero-downtime reload under steady load, a release that
exits at start (fails within health_timeout) and the rollback the deploy's rescue does; rollbacks
after a release left `errored` (SyntaxError, many restarts) and after one that crashed with
EADDRINUSE restore every instance on the previous release, and the failure quotes the app's own
error line; PM2_HOME and its dump files (every process's environment) are private."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import stat
import time
import urllib.parse

import pytest
from conftest import ROOT, Outputs, host_env, sandbox_up, sb
from instances import sandbox_instance
from loadgen import Load

from ansible_collections.slipway.core.plugins.module_utils.pm2 import (  # isort: skip (path set by conftest's sb)
    app_error_line,
    app_processes,
    instance_facts,
    summarize_jlist,
)

INSTANCE = "4"
I4 = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
PLAYBOOK = str(ROOT / "tests" / "playbooks" / "pm2_app.yml")
EVENTS: list[dict] = []


class Target(dict):
    """The fixture's values; its repr names no secret (pytest prints fixtures on failures)."""

    def __repr__(self):
        return f"Target(host={self['host'].name}, rid={self['rid']}, secrets=<hidden>)"


@pytest.fixture(scope="module")
def h4():
    with sandbox_up(INSTANCE, state="healthy"):
        values = host_env("sandbox", env=I4)
        with sandbox_instance(INSTANCE):
            host = sb.find_host("sandbox")
        user = pwd.getpwnam(host.user)
        rid = os.path.basename(os.path.realpath(host.app_dir / "current"))
        secrets = [values["API_TOKEN"], urllib.parse.urlparse(values["DATABASE_URL"]).password]
        assert all(secrets)
        yield Target(host=host, user=user, token=values["API_TOKEN"], secrets=secrets, rid=rid, url=host.app_url)


def run_role(**extra) -> dict:
    """One run of tests/playbooks/pm2_app.yml; returns rc, the module's result (from set_stats, or
    the failed event), the failures and the wall time. Every event is kept for the secret scan."""
    import ansible_runner

    from slipway.runner import run_playbook

    original = ansible_runner.run
    mine: list[dict] = []

    def tapped(**kwargs):  # keep the events run_playbook's own handler sees
        handler = kwargs["event_handler"]
        kwargs["event_handler"] = lambda event: (mine.append(event), handler(event))[1]
        return original(**kwargs)

    ansible_runner.run = tapped
    started = time.monotonic()
    try:
        with sandbox_instance(INSTANCE):
            out = run_playbook(PLAYBOOK, "sandbox", extra)
    finally:
        ansible_runner.run = original
    EVENTS.extend(mine)
    res = (out["data"] or {}).get("pm2_app")
    if res is None:
        failed = [e["event_data"]["res"] for e in mine if e.get("event") == "runner_on_failed"]
        res = failed[-1] if failed else {}
    return {"rc": out["rc"], "res": res, "failures": out["failures"], "data": out["data"],
            "wall": time.monotonic() - started}


def pm2_state(h4) -> dict:
    """The app's PM2 summary, read as the host user (never as root)."""
    with sandbox_instance(INSTANCE):
        return sb.pm2_app_state(h4["host"], h4["user"])


def new_rid(tag: str) -> str:
    return "r" + hashlib.sha256(f"{tag}-{time.time()}".encode()).hexdigest()[:12]


def make_release(h4, src: str, rid: str, server_js) -> None:
    """releases/<rid> from releases/<src> with server.js changed by ``server_js(text)``, completed
    with .slipway-built and owned by the host user, like app_release leaves one."""
    releases = h4["host"].app_dir / "releases"
    tmp = releases / f".{rid}.tmp"
    shutil.copytree(releases / src, tmp, symlinks=True)
    server = tmp / "server.js"
    server.write_text(server_js(server.read_text()))
    (tmp / ".slipway-built").write_text(rid + "\n")
    sb.chown_tree(tmp, h4["user"])
    tmp.rename(releases / rid)


def switch(h4, rid: str) -> None:
    """Point `current` at releases/<rid>: a relative link renamed over the old one (atomic)."""
    assert sb._symlink(f"releases/{rid}", h4["host"].app_dir / "current", h4["user"])


def health_by_pid(h4, tries: int = 40) -> dict:
    """{pid: release} from repeated GET /api/health (the cluster spreads them over the workers)."""
    seen = {}
    for _ in range(tries):
        status, body = sb.http_json("GET", f"{h4['url']}/api/health")
        assert status == 200, body
        seen[body["pid"]] = body["release"]
    return seen


def report(line: str) -> None:
    print(f"\n[pm2_app] {line}", flush=True)


def test_legacy_start_is_moved_to_the_current_link_then_noop(h4):
    host, user = h4["host"], h4["user"]
    # what an older sandbox did: start without APP_CURRENT, so PM2 stores releases/<rid> (real path)
    with sandbox_instance(INSTANCE):
        sb.pm2(host, user, "delete", sb.APP_NAME)
        sb.run(["pm2", "start", host.app_dir / "current" / "ecosystem.config.js"], env=sb.user_env(host, user),
               cwd=host.app_dir, user=user)
    legacy = pm2_state(h4)
    assert legacy["cwd"] == [str(host.app_dir / "releases" / h4["rid"])]
    # every instance online in cluster mode: new workers serve beside the old ones before they go,
    # so not one request fails
    with Load(h4["url"], h4["token"]) as load:
        out = run_role()
    res = out["res"]
    assert out["rc"] == 0, out["failures"]
    assert res["action"] == "replaced" and res["changed"] is True and "releases/" in res["reason"], res
    assert load.total > 50 and load.bad == 0, load.counts
    assert res["handover"] == {"app": sb.APP_NAME + "~slipway-handover", "old_deleted": True,
                               "old_cwd": [str(host.app_dir / "releases" / h4["rid"])]}
    state = pm2_state(h4)
    assert state["cwd"] == [str(host.app_dir / "current")] and state["online"] == state["instances"] == 2
    assert not set(res["pids_after"]) & set(legacy["pids"]) and res["health"]["release"] == h4["rid"]
    fact = out["data"]["slipway_pm2"]
    assert {k: fact[k] for k in ("action", "release", "instances", "pids_after")} == {
        "action": "replaced", "release": h4["rid"], "instances": 2, "pids_after": res["pids_after"]}
    assert fact["healthy"] is True and fact["online"] == fact["total"] == 2 and fact["error"] is None
    assert [(p["status"], p["release"]) for p in fact["processes"]] == [("online", h4["rid"])] * 2
    assert res["healthy"] is True and res["app_error"] is None and res["recovered"] == []
    with sandbox_instance(INSTANCE):
        assert sb.pm2_app_state(host, user, app=sb.APP_NAME + "~slipway-handover")["instances"] == 0
    report(f"legacy handover: {res['seconds']}s in the module, {out['wall']:.1f}s wall, "
           f"{load.total} requests, {load.bad} failed")

    before = pm2_state(h4)
    out = run_role()
    res = out["res"]
    assert out["rc"] == 0 and res["changed"] is False and res["action"] == "none", out
    assert res["pids_before"] == res["pids_after"] == before["pids"] == pm2_state(h4)["pids"]
    assert res["health"]["status"] == 200 and res["health"]["release"] == h4["rid"]
    report(f"no-op: {res['seconds']}s in the module, {out['wall']:.1f}s wall")


def test_reload_new_release_with_zero_downtime(h4):
    rid2 = new_rid("reload")
    make_release(h4, h4["rid"], rid2, lambda text: text + f"\n// slipway test release {rid2}\n")
    switch(h4, rid2)
    before = pm2_state(h4)

    # check mode: predicts the reload, changes nothing
    out = run_role(t_check_mode=True)
    res = out["res"]
    assert out["rc"] == 0 and res["changed"] is True and res["action"] == "reloaded", out
    assert h4["rid"] in res["reason"] and res["pids_after"] == before["pids"]
    assert pm2_state(h4)["pids"] == before["pids"]
    assert set(health_by_pid(h4).values()) == {h4["rid"]}

    with Load(h4["url"], h4["token"]) as load:
        out = run_role()
    res = out["res"]
    assert out["rc"] == 0, out["failures"]
    assert res["action"] == "reloaded" and res["changed"] is True and res["release"] == rid2
    assert res["pids_before"] == before["pids"] and not set(res["pids_after"]) & set(before["pids"])
    assert res["health"]["release"] == rid2 and res["health"]["successes"] >= 4
    seen = health_by_pid(h4)
    assert set(seen) == set(res["pids_after"]) and set(seen.values()) == {rid2}
    report(f"reload under load: {res['seconds']}s in the module (action + gate), {out['wall']:.1f}s wall; "
           f"{load.total} requests, {load.bad} not 200 {dict(load.counts)}; releases seen {dict(load.releases)}")
    assert load.bad == 0 and load.counts[200] > 100
    h4["rid2"] = rid2


def test_release_that_exits_at_start_fails_then_rollback_serves(h4):
    rid2 = h4["rid2"]
    rid3 = new_rid("crash")
    make_release(h4, rid2, rid3, lambda text: text.replace(
        "'use strict';", "'use strict';\nconsole.error('reader-app: config check failed, exiting'); process.exit(1);", 1))
    switch(h4, rid3)
    timeout = 12
    with Load(h4["url"], h4["token"]) as load:
        out = run_role(t_health_timeout=timeout)
        failed_at = time.monotonic()
        res = out["res"]
        assert out["rc"] != 0 and res.get("msg"), res
        msg = res["msg"]
        assert "\n" not in msg and res["action"] == "reloaded" and res["release"] == rid3
        assert "errored" in msg or "crash-loop" in msg, msg
        assert "config check failed" in msg, msg  # the app's last words, from its log
        assert res["seconds"] <= timeout + 1
        assert len(out["failures"]) == 1 and out["failures"][0]["msg"] == msg

        # the deploy's rescue: switch current back, run the role again (it reloads)
        switch(h4, rid2)
        back = run_role()
        rolled_back_at = time.monotonic()
    res = back["res"]
    assert back["rc"] == 0, back["failures"]
    assert res["action"] == "reloaded" and res["release"] == rid2
    seen = health_by_pid(h4)
    assert set(seen) == set(res["pids_after"]) and set(seen.values()) == {rid2}
    report(f"crash release: failed after {out['res']['seconds']}s (health_timeout {timeout}), {out['wall']:.1f}s wall; "
           f"rollback reload {res['seconds']}s, {rolled_back_at - failed_at:.1f}s wall; "
           f"{load.total} requests, {load.bad} not 200 {dict(load.counts)}; releases {dict(load.releases)}")
    report(f"failure message: {msg}")


def current_rid(h4) -> str:
    return os.path.basename(os.path.realpath(h4["host"].app_dir / "current"))


def instances(h4) -> list[dict]:
    """Per instance {pm_id, pid, status, restarts, release} from `pm2 jlist`, read as the host user."""
    with sandbox_instance(INSTANCE):
        out = sb.pm2(h4["host"], h4["user"], "jlist").stdout
    return instance_facts(app_processes(summarize_jlist(out), sb.APP_NAME))


FRAMES = re.compile(r"\bat \S+ \(|\bat (?:node:|/)|node_modules/pm2|ProcessContainer|node:internal")


def assert_failed_with_own_line(out, bad: str, own: str) -> dict:
    """The crash release's run failed, says so with the host's state, and quotes the app's own line."""
    res = out["res"]
    assert out["rc"] != 0 and res.get("msg"), res
    msg = res["msg"]
    assert "\n" not in msg and res["action"] == "reloaded" and res["release"] == bad, msg
    assert own in msg and own in (res["app_error"] or ""), msg
    assert not FRAMES.search(msg), msg  # node's and PM2's stack frames are not the cause
    assert res["healthy"] is False and res["total"] == 2 and res["online"] < 2, res
    assert f"now instances {res['online']}/2 online" in msg, msg
    assert any(p["status"] != "online" and p["release"] == bad for p in res["processes"]), res["processes"]
    fact = out["data"]["slipway_pm2"]  # set by the role also when the module failed
    assert fact["healthy"] is False and fact["release"] == bad and fact["error"] == msg, fact
    assert fact["processes"] == res["processes"] and fact["app_error"] == res["app_error"]
    return res


def assert_rolled_back_healthy(h4, back, prev: str) -> None:
    """Every instance online on ``prev``, answering with it, and staying so (restarts not climbing)."""
    res = back["res"]
    assert back["rc"] == 0, back["failures"]
    assert res["healthy"] is True and res["release"] == prev and res["online"] == res["total"] == 2, res
    assert all(p["status"] == "online" and p["release"] == prev for p in res["processes"]), res["processes"]
    fact = back["data"]["slipway_pm2"]
    assert fact["healthy"] is True and fact["online"] == fact["total"] == 2 and fact["release"] == prev
    seen = health_by_pid(h4)
    assert set(seen) == set(res["pids_after"]) and set(seen.values()) == {prev}
    first = instances(h4)
    time.sleep(4)
    assert instances(h4) == first, "restarts or pids changed after the rollback"
    assert [(p["status"], p["release"]) for p in first] == [("online", prev)] * 2, first


def test_app_error_line_is_the_apps_own_line():
    syntax = ["/srv/app/releases/r2/server.js:2", "const = 1;", "      ^", "",
              "SyntaxError: Unexpected token '='",
              "    at wrapSafe (node:internal/modules/cjs/loader:1464:18)",
              "    at /usr/lib/node_modules/pm2/lib/ProcessContainer.js:285:27",
              "    at WriteStream.<anonymous> (/usr/lib/node_modules/pm2/lib/Utility.js:185:13)",
              "2026-01-01T00:00:01: reader-app stopped"]
    assert app_error_line(syntax, skip=["reader-app stopped"]) == "SyntaxError: Unexpected token '='"
    uncaught = ["node:events:497", "      throw er; // Unhandled 'error' event", "      ^", "",
                "Error: listen EADDRINUSE: address already in use :::3000",
                "    at Server.setupListenHandle [as _listen2] (node:net:1908:16)",
                "Emitted 'error' event on Server instance at:", "    at emitErrorNT (node:net:1887:8)",
                "{", "  code: 'EADDRINUSE',", "  port: 3000", "}", "", "Node.js v20.19.2"]
    assert app_error_line(uncaught) == "Error: listen EADDRINUSE: address already in use :::3000"
    said = ["2026-01-01T00:00:01: reader-app: config check failed, exiting"] * 3
    assert app_error_line(said) == "reader-app: config check failed, exiting"
    assert app_error_line(["    at x (/usr/lib/node_modules/pm2/lib/God.js:1:1)", ""]) is None


def test_rollback_after_a_release_left_errored_restores_every_instance(h4):
    prev = current_rid(h4)
    assert set(health_by_pid(h4).values()) == {prev}
    bad = new_rid("syntax")
    make_release(h4, prev, bad, lambda text: text.replace("'use strict';", "'use strict';\nconst = 1;", 1))
    switch(h4, bad)
    out = run_role(t_health_timeout=12)
    failed_at = time.monotonic()
    res = assert_failed_with_own_line(out, bad, "SyntaxError: Unexpected token")
    report(f"errored release: failed after {res['seconds']}s: {res['msg']}")

    # the crashed release has run long enough for PM2 to give up on it (errored, 16 restarts) and to
    # stop the worker its reload had parked (listen_timeout 10 s): the state the issue found
    time.sleep(max(0.0, failed_at + 11 - time.monotonic()))
    state = instances(h4)
    errored = [p for p in state if p["status"] == "errored"]
    assert errored and all(p["release"] == bad and p["restarts"] >= 15 for p in errored), state
    assert sum(p["status"] == "online" for p in state) == 2 - len(errored), state

    switch(h4, prev)  # the deploy's rescue: current back, then the role again
    back = run_role()
    assert_rolled_back_healthy(h4, back, prev)
    report(f"rollback from errored ({state}): {back['res']['seconds']}s, recovered {back['res']['recovered']}")


def test_rollback_right_after_an_eaddrinuse_crash_restores_every_instance(h4):
    prev = current_rid(h4)
    address = urllib.parse.urlparse(h4["url"]).hostname
    with socket.socket() as taken:  # a port someone else holds
        taken.bind((address, 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad = new_rid("eaddrinuse")
        make_release(h4, prev, bad, lambda text: text.replace(
            "'use strict';", f"'use strict';\nrequire('net').createServer().listen({port}, '{address}');", 1))
        switch(h4, bad)
        out = run_role(t_health_timeout=12)
        res = assert_failed_with_own_line(out, bad, "EADDRINUSE")
        report(f"EADDRINUSE release: failed after {res['seconds']}s: {res['msg']}")

        switch(h4, prev)  # at once: PM2 may still hold the reload's parked worker
        back = run_role()
    assert_rolled_back_healthy(h4, back, prev)
    report(f"rollback right after EADDRINUSE: {back['res']['seconds']}s, recovered {back['res']['recovered']}")


def test_pm2_home_and_dump_files_are_private(h4):
    home = h4["host"].pm2_home

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    dumps = [home / "dump.pm2", home / "dump.pm2.bak"]
    assert all(p.exists() for p in dumps), "pm2 save ran after the reloads above"
    assert mode(home) == 0o700 and [mode(p) for p in dumps] == [0o600, 0o600]
    holding = {}
    for top, _, files in os.walk(home):  # whatever holds a secret there is the user's alone
        for name in files:
            path = os.path.join(top, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as handle:
                    data = handle.read()
                if any(secret.encode() in data for secret in h4["secrets"]):
                    holding[os.path.relpath(path, home)] = f"{mode(path):04o}"
    report(f"files in PM2_HOME (0700) holding a secret: {holding}")
    assert all(int(m, 8) & 0o077 == 0 for m in holding.values()), holding

    # loosened by hand (or by an older slipway): check mode predicts, a run tightens, then no change
    os.chmod(home, 0o755)
    for p in dumps:
        os.chmod(p, 0o644)
    out = run_role(t_check_mode=True)
    assert out["rc"] == 0 and out["res"]["changed"] is True and len(out["res"]["modes_fixed"]) == 3, out["res"]
    assert mode(home) == 0o755 and mode(dumps[0]) == 0o644
    out = run_role()
    res = out["res"]
    assert out["rc"] == 0 and res["action"] == "none" and res["changed"] is True, res
    assert sorted(res["modes_fixed"]) == sorted(f"{p} ({m:04o} -> {w:04o})" for p, m, w in (
        (home, 0o755, 0o700), (dumps[0], 0o644, 0o600), (dumps[1], 0o644, 0o600)))
    assert mode(home) == 0o700 and [mode(p) for p in dumps] == [0o600, 0o600]
    out = run_role()
    assert out["rc"] == 0 and out["res"]["changed"] is False and out["res"]["modes_fixed"] == [], out["res"]

    # a reload (pm2 save rewrites both files) keeps them private
    rid = new_rid("private")
    make_release(h4, current_rid(h4), rid, lambda text: text + f"\n// slipway test release {rid}\n")
    switch(h4, rid)
    out = run_role()
    assert out["rc"] == 0 and out["res"]["action"] == "reloaded", out["failures"]
    assert mode(home) == 0o700 and [mode(p) for p in dumps] == [0o600, 0o600]
    assert rid.encode() in dumps[0].read_bytes()  # the dump is the new one


def test_no_secret_in_any_output(h4):
    assert EVENTS
    text = json.dumps(EVENTS, default=str) + "".join(Outputs.texts)
    for secret in h4["secrets"]:
        assert secret not in text
