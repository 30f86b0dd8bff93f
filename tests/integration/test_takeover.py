"""A host deployed by hand, taken over by the first `invoke deploy` (sandbox instance 10, state
`legacy`: the seed's production). The reference app runs in place from ~/www/reader.market with its
own .env and logs/, PM2 `ollama-reader` started there by hand, 0007 missing, no app dir. Under a
steady load, the deploy takes the .env into shared/, keeps the old logs, starts the release layout,
hands the traffic over with 0 failed requests, leaves the old directory as it was, names it in the
report and fixes the incident. Then: a no-op, and an environment key removed from an app whose
ecosystem copies .env into PM2's own env (`pm2 reload --update-env` would keep it). Tests run in
file order on one host."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import stat
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import cli, host_env, sandbox_up
from instances import sandbox_instance
from loadgen import Load

INSTANCE = "10"
ENV = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
HANDOVER = "~slipway-handover"


@pytest.fixture(scope="module")
def legacy():
    with sandbox_up(INSTANCE, state="legacy"):
        with sandbox_instance(INSTANCE) as sb:
            host = sb.find_host("sandbox")
            inventory_dir = sb.Controller().inventory_dir
        values = host_env("sandbox", env=ENV)
        yield {"host": host, "url": host.app_url, "dsn": values["DATABASE_URL"], "token": values["API_TOKEN"],
               "inventory": inventory_dir}


def deploy(tmp_path: Path, *args: str, expect: int = 0):
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*.json')))}.json"
    proc = cli("deploy", "--host", "sandbox", *args, "--report", str(report), check=False, env=ENV, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, (json.loads(report.read_text()) if report.exists() else None)


def pm2(legacy, app: str = "ollama-reader") -> dict:
    with sandbox_instance(INSTANCE) as sb:
        host = legacy["host"]
        return sb.pm2_app_state(host, pwd.getpwnam(host.user), app=app)


def track_view(legacy) -> int:
    from slipway.sandbox import INCIDENT_BOOK, http_json

    status, _ = http_json("POST", f"{legacy['url']}/api/books/{INCIDENT_BOOK}/track-view", {"viewType": "card_view"},
                          token=legacy["token"], timeout=10)
    return status


def snapshot(root: Path) -> dict:
    """Every file and link under ``root`` but the running app's own log files: (kind, mode, size,
    mtime, sha256 of small files)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == "logs" and len(rel.parts) > 1:
            continue
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20 else None
        found[str(rel)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return found


def worker_env(legacy) -> list[dict]:
    """The environment PM2 keeps for each of the app's processes (what its next start or reload
    gives the app: cluster workers get it from PM2 as one JSON variable, not in /proc/<pid>/environ)."""
    with sandbox_instance(INSTANCE) as sb:
        host = legacy["host"]
        listed = json.loads(sb.pm2(host, pwd.getpwnam(host.user), "jlist").stdout)
    return [{**(p["pm2_env"].get("env") or {}), **{k: v for k, v in p["pm2_env"].items() if isinstance(v, str)}}
            for p in listed if p["name"] == "ollama-reader"]


def set_app_env(legacy, env: dict) -> None:
    """The host's slipway_app_env in its host_vars (they win over the generated inventory)."""
    path = legacy["inventory"] / "host_vars" / "sandbox" / "app_env.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"slipway_app_env": env}))


STATE: dict = {}


def rr_losses_only(load) -> bool:
    """No request failed, but for at most 2 that hung until the client's time-out: the hand-started
    PM2 daemon hands connections to its workers round-robin, and one handed to a worker in the
    instant it exits is lost (README, "Taking over a host deployed by hand"; seen once in six runs,
    with the whole suite running beside it). A gap in the handover fails hundreds at once (refused);
    test_pm2_app's handover on a daemon that lets the workers accept (NODE_CLUSTER_SCHED_POLICY=none)
    must lose none."""
    failed = {k: v for k, v in load.counts.items() if k != 200}
    return set(failed) <= {"TimeoutError"} and sum(failed.values()) <= 2


def test_legacy_state_is_the_seeds_production(legacy):
    host = legacy["host"]
    old = host.legacy_dir
    assert not host.app_dir.exists()
    state = pm2(legacy)
    assert state["cwd"] == [str(old)] and state["online"] == state["instances"] == 2, state
    assert (old / ".env").is_file() and (old / "logs" / "err.log").is_file() and (old / "scripts").is_dir()
    assert track_view(legacy) == 500  # the incident: 0007 missing, ON CONFLICT has no constraint (42P10)
    STATE["pids"] = state["pids"]
    STATE["snapshot"] = snapshot(old)
    STATE["env"] = (old / ".env").read_text()
    STATE["err_log"] = (old / "logs" / "err.log").read_text()


def test_check_names_the_takeover_and_changes_nothing(legacy, tmp_path):
    proc, report = deploy(tmp_path, "--check")
    host = legacy["host"]
    assert f"PM2 runs the app by hand from {host.legacy_dir}: the deploy would take it over" in proc.stdout, proc.stdout
    assert report["hosts"]["sandbox"]["took_over"] == str(host.legacy_dir)
    assert pm2(legacy)["pids"] == STATE["pids"]
    assert not (host.app_dir / "current").exists() and not (host.app_dir / "shared").exists()
    assert snapshot(host.legacy_dir) == STATE["snapshot"]


def test_first_deploy_takes_the_host_over_under_load_with_no_failed_request(legacy, tmp_path):
    host = legacy["host"]
    started = time.monotonic()
    # a steady 300 requests/s (the app's PM2 daemon, started by hand, hands connections to the
    # workers round-robin: see the README on a takeover)
    with Load(legacy["url"], threads=16, rate=300) as load:
        proc, report = deploy(tmp_path)
    seconds = time.monotonic() - started
    rid = report["release"]
    print(f"\n[takeover] {load.total} requests in {seconds:.1f}s under the deploy, {load.bad} failed "
          f"({dict(load.counts)}); answers by release: {dict(load.releases)}", flush=True)
    assert load.total > 3000 and rr_losses_only(load), load.counts
    # the traffic really moved: the hand-started workers answered first, the release's after
    assert load.releases["reader.market"] > 0 and load.releases[rid] > 0, load.releases

    info = report["hosts"]["sandbox"]
    assert report["result"] == "ok" and info["took_over"] == str(host.legacy_dir)
    assert info["pm2"]["action"] == "replaced" and info["pm2"]["handover"]["old_deleted"] is True
    assert info["pm2"]["handover"]["old_cwd"] == [str(host.legacy_dir)]
    assert f"took over the app deployed by hand in {host.legacy_dir}" in proc.stdout
    assert "its .env became shared/.env (0600)" in proc.stdout and f"{host.legacy_dir} itself was left as it was" in proc.stdout

    # the release layout runs; nothing of the handover is left
    state = pm2(legacy)
    assert state["cwd"] == [str(host.app_dir / "current")] and state["online"] == state["instances"] == 2, state
    assert not set(state["pids"]) & set(STATE["pids"])
    assert pm2(legacy, "ollama-reader" + HANDOVER)["instances"] == 0
    assert os.path.realpath(host.app_dir / "current") == str(host.app_dir / "releases" / rid)
    assert not (host.app_dir / ".slipway" / "handover.config.cjs").exists()
    # the env moved into shared/ (private), the old logs kept where the release's logs go
    env = host.app_dir / "shared" / ".env"
    assert env.read_text() == STATE["env"] and stat.S_IMODE(env.stat().st_mode) == 0o600
    assert (host.app_dir / "logs" / "err.log").read_text().startswith(STATE["err_log"])
    assert sorted(p.name for p in (host.app_dir / "logs").iterdir()) == ["combined.log", "err.log", "out.log"]
    # the old directory as it was (its own logs aside: the old workers wrote to them until they went)
    assert snapshot(host.legacy_dir) == STATE["snapshot"]
    # and the incident is fixed
    assert track_view(legacy) == 200
    with psycopg.connect(legacy["dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = "
                            "'book_view_statistics_book_id_view_type_unique'").fetchone()[0] == 1
    records = (host.app_dir / ".slipway" / "deploys.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["took_over"] == str(host.legacy_dir)


def test_second_deploy_changes_nothing(legacy, tmp_path):
    before = pm2(legacy)["pids"]
    proc, report = deploy(tmp_path)
    assert report["changed"] == 0 and report["hosts"]["sandbox"]["took_over"] is None, proc.stdout
    assert "took over" not in proc.stdout and pm2(legacy)["pids"] == before


def test_env_key_removed_leaves_an_app_that_copies_env_into_pm2(legacy, tmp_path):
    """The reference app's ecosystem puts .env's keys into PM2's own env, so a reload would keep a
    key removed from it; the deploy replaces the processes instead (no gap) and the key is gone."""
    host = legacy["host"]
    base = {"HOST": host.address, "NODE_ENV": "production", "API_TOKEN": "{{ slipway_api_token }}"}
    set_app_env(legacy, {**base, "FEATURE_FLAG": "on"})
    _, report = deploy(tmp_path)
    assert report["hosts"]["sandbox"]["pm2"]["action"] == "reloaded"
    envs = worker_env(legacy)
    assert envs and all(env.get("FEATURE_FLAG") == "on" for env in envs)

    set_app_env(legacy, base)
    from slipway.sandbox import INCIDENT_BOOK  # not the smoke tests' book: they count its views

    with Load(legacy["url"], legacy["token"], threads=12, rate=300, book=INCIDENT_BOOK) as load:
        proc, report = deploy(tmp_path)
    info = report["hosts"]["sandbox"]
    assert info["release_state"]["env_removed"] == ["FEATURE_FLAG"], info["release_state"]
    assert info["pm2"]["action"] == "replaced" and info["pm2"]["healthy"] in (True, "True"), info["pm2"]
    envs = worker_env(legacy)
    assert len(envs) == 2 and all("FEATURE_FLAG" not in env for env in envs), [sorted(e) for e in envs]
    assert all(env.get("API_TOKEN") == legacy["token"] for env in envs)
    assert "FEATURE_FLAG" not in (host.app_dir / "shared" / ".env").read_text()
    print(f"\n[env removed] {load.total} requests under the deploy, {load.bad} failed ({dict(load.counts)})", flush=True)
    assert load.total > 1500 and rr_losses_only(load), load.counts
    assert pm2(legacy, "ollama-reader" + HANDOVER)["instances"] == 0


# ------------------------------------------------------------------ a takeover that fails
def legacy_again(legacy) -> dict:
    """The host back in the legacy state (PM2 killed, the app dir removed, the database rebuilt in
    the incident state, the app started by hand again)."""
    cli("sandbox.up", "--state", "legacy", env=ENV)
    state = pm2(legacy)
    assert state["cwd"] == [str(legacy["host"].legacy_dir)] and state["online"] == 2, state
    return state


def reader_copy(tmp_path: Path, name: str) -> Path:
    import shutil

    from conftest import ROOT

    dest = tmp_path / name
    shutil.copytree(ROOT / "examples" / "reader-app", dest, ignore=shutil.ignore_patterns("node_modules", ".env", "logs"))
    return dest


def test_new_workers_that_fail_their_gate_leave_the_hand_started_app_serving(legacy, tmp_path):
    before = legacy_again(legacy)
    src = reader_copy(tmp_path, "crashing")
    server = src / "server.js"
    server.write_text("throw new Error('boot failure on purpose');\n" + server.read_text())
    with Load(legacy["url"], threads=8, rate=150) as load:
        proc, report = deploy(tmp_path, "--release", str(src), expect=1)
    assert load.total > 1000 and load.bad == 0, load.counts  # the old workers served all along
    info = report["hosts"]["sandbox"]
    assert info["failure"]["phase"] == "pm2_app" and info["handover"]["old_deleted"] is False, info
    assert "the new workers were deleted, the old processes serve as before" in info["failure"]["cause"]
    assert "its PM2 processes were NOT replaced: they serve as before" in proc.stdout, proc.stdout
    assert pm2(legacy)["pids"] == before["pids"] and pm2(legacy, "ollama-reader" + HANDOVER)["instances"] == 0
    assert set(load.releases) == {"reader.market"}


def test_a_failure_after_the_handover_leaves_the_release_serving(legacy, tmp_path):
    """The old processes are gone once handed over: the rescue has nothing to go back to and does
    not stop the release (a site with nothing serving would be worse)."""
    legacy_again(legacy)
    src = reader_copy(tmp_path, "failing-smoke")
    (src / "slipway.yml").write_text("smoke:\n  - name: a page that is not there\n    path: /api/nope\n    status: 200\n")
    proc, report = deploy(tmp_path, "--release", str(src), expect=1)
    info = report["hosts"]["sandbox"]
    rid = report["release"]
    assert info["failure"]["phase"] == "smoke_test" and info["handover"]["old_deleted"] is True, info
    assert info["stopped"] is False and not info["rolled_back"]
    assert "nothing to go back to: the rescue left release" in proc.stdout and rid in proc.stdout, proc.stdout
    state = pm2(legacy)
    assert state["cwd"] == [str(legacy["host"].app_dir / "current")] and state["online"] == state["instances"] == 2
    assert pm2(legacy, "ollama-reader" + HANDOVER)["instances"] == 0
    from slipway.sandbox import http_json

    status, body = http_json("GET", f"{legacy['url']}/api/health", timeout=5)
    assert status == 200 and body["release"] == rid
