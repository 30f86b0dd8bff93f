"""slipway.remote against a real sandbox host (own sshd, strict host keys): connections, the
guarded run, and the per-host deploy lock (flock held by a keeper over a persistent SSH channel).

Uses sandbox instance 5 (user sw5-sandbox on 127.0.0.111), so it never touches the suite's
instance-1 sandbox; in-process calls run with SLIPWAY_SANDBOX_INSTANCE=5, restored afterwards.
"""
from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, sandbox_up, sb
from instances import sandbox_instance

INSTANCE = "5"
ENV5 = {"SLIPWAY_SANDBOX_INSTANCE": INSTANCE}
# a second inventory host on the same sshd with its own app dir, to test lock_hosts over two hosts
ALIAS = "sandbox-lockalias"


@pytest.fixture(scope="module")
def host5():
    """One sandbox host on instance 5 (incident state is fine: only sshd and the app dir matter)."""
    with sandbox_up(INSTANCE, state="incident"):
        with sandbox_instance(INSTANCE):
            host = sb.Host.make(1)
            ctl = sb.Controller()
            alias_dir = host.home / "lockalias"
            base = sb.host_vars(host, ctl)
            alias_vars = {k: v for k, v in base.items() if k.startswith("ansible_")}
            alias_vars["slipway_app_dir"] = str(alias_dir)
            (ctl.inventory_dir / "lockalias.yml").write_text(
                yaml.safe_dump({"all": {"hosts": {ALIAS: alias_vars}}}, sort_keys=False))
            info = {"host": host, "ctl": ctl, "uid": pwd.getpwnam(host.user).pw_uid, "alias_dir": alias_dir}
        yield info


@pytest.fixture
def remote(host5):
    """slipway.remote with SLIPWAY_SANDBOX_INSTANCE=5 for the duration of one test."""
    with sandbox_instance(INSTANCE):
        from slipway import remote as module

        yield module


def lock_files(host) -> tuple[Path, Path]:
    d = host.app_dir / ".slipway"
    return d / "deploy.lock", d / "deploy.lock.json"


def as_host_user(host, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` as the host's deploy user over the inventory's ssh (like Ansible would)."""
    ctl = sb.Controller()
    return subprocess.run(["ssh", "-F", str(ctl.ssh_config), host.name, script],
                          check=False, capture_output=True, text=True, timeout=30)


def keeper_pids(uid: int) -> list[int]:
    """The host user's processes that belong to a lock keeper (flock / bash keeper)."""
    found = []
    for pid in sb.user_pids(uid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "deploy.lock" in cmd or "slipway-deploy-lock" in cmd:
            found.append(pid)
    return found


HOLDER = textwrap.dedent("""\
    import os, sys, time
    from slipway import remote, sandbox
    sandbox.register()
    start, hold = float(sys.argv[1]), float(sys.argv[2])
    lock = remote.DeployLock("sandbox", sys.argv[3], "test holder")
    time.sleep(max(0.0, start - time.time()))
    try:
        lock.acquire()
    except remote.LockHeld as exc:
        print("HELD", exc.exit_code, exc, flush=True)
        sys.exit(0)
    print("WON", os.getpid(), flush=True)
    time.sleep(hold)
    lock.release()
    print("RELEASED", flush=True)
""").format(root=str(ROOT))


def holder(start: float, hold: float, run_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(start), str(hold), run_id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV5}, cwd=ROOT)


# --------------------------------------------------------------------------------------------
# connection parameters and connections
# --------------------------------------------------------------------------------------------
def test_known_hosts_parsed_from_ssh_args(remote):
    parse = remote._known_hosts_files
    assert parse(["-o UserKnownHostsFile=/a/kh -o StrictHostKeyChecking=yes"]) == ["/a/kh"]
    assert parse(["-oUserKnownHostsFile=/b", None, "-o 'userknownhostsfile /c /d'"]) == ["/b", "/c", "/d"]
    assert parse(["-o StrictHostKeyChecking=yes", ""]) == []


def test_ssh_params_come_from_the_inventory_without_the_vault(remote, host5):
    host, ctl = host5["host"], host5["ctl"]
    saved = os.environ.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    try:
        params = remote.ssh_params("sandbox")
    finally:
        if saved is not None:
            os.environ["ANSIBLE_VAULT_PASSWORD_FILE"] = saved
    assert params["hostname"] == host.address
    assert params["port"] == sb.SSH_PORT
    assert params["user"] == host.user
    assert params["key_filename"] == str(ctl.key)
    assert params["known_hosts"] == str(ctl.known_hosts)
    with pytest.raises(remote.SlipwayError, match=r"^no host named 'nope' in the inventory \(hosts: .*sandbox"):
        remote.ssh_params("nope")


def test_connect_checks_host_keys_strictly(remote, host5, tmp_path):
    host = host5["host"]
    conn = remote.connect("sandbox")
    try:
        result = remote.run(conn, "id -un; exit 3")
        assert result.failed and result.exited == 3 and result.stdout.strip() == host.user
    finally:
        conn.close()
    params = remote.ssh_params("sandbox")

    # a different key recorded for [addr]:port (a re-keyed or impersonated host) is rejected
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "other"], check=True)
    kind, key = (tmp_path / "other.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts_wrong"
    wrong_text = f"[{host.address}]:{sb.SSH_PORT} {kind} {key}\n"
    wrong.write_text(wrong_text)
    with pytest.raises(remote.SlipwayError) as exc:
        remote.connect("sandbox", {**params, "known_hosts": str(wrong), "known_hosts_files": [str(wrong)]})
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"host key of sandbox ({host.address}:{sb.SSH_PORT}) is not in {wrong} ")
    assert f"ssh-keyscan -p {sb.SSH_PORT} {host.address}" in message

    # no entry for the host at all (another host's key only): the exact one-line fix
    other = tmp_path / "known_hosts_other"
    other_text = f"[127.0.0.1]:{sb.SSH_PORT} {kind} {key}\n"
    other.write_text(other_text)
    with pytest.raises(remote.SlipwayError) as exc:
        remote.connect("sandbox", {**params, "known_hosts": str(other), "known_hosts_files": [str(other)]})
    assert str(exc.value) == (
        f"host key of sandbox ({host.address}:{sb.SSH_PORT}) is not in {other}; add it with "
        f"ssh-keyscan -p {sb.SSH_PORT} {host.address} >> {other} after verifying it")
    assert (wrong.read_text(), other.read_text()) == (wrong_text, other_text)  # never written to


def test_connect_to_unreachable_port_names_address(remote, host5):
    host = host5["host"]
    params = remote.ssh_params("sandbox")
    started = time.monotonic()
    with pytest.raises(remote.SlipwayError) as exc:
        remote.connect("sandbox", {**params, "port": 1})
    assert time.monotonic() - started < 12
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach sandbox at {host.address}:1 (")


# --------------------------------------------------------------------------------------------
# the deploy lock
# --------------------------------------------------------------------------------------------
def test_acquire_release_leaves_no_metadata_and_preflight_check_sees_it(remote, host5):
    host = host5["host"]
    lock_file, meta_file = lock_files(host)
    with remote.DeployLock("sandbox", "run-acq", "invoke deploy --host sandbox") as lock:
        assert lock.held and lock.stale is None and lock.stale_message is None
        assert stat.S_IMODE(lock_file.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(meta_file.stat().st_mode) == 0o600
        meta = json.loads(meta_file.read_text())
        keeper = meta.pop("keeper_pid")  # written by the keeper itself: its own pid, the run's supervisor
        assert keeper in keeper_pids(host5["uid"]), (keeper, keeper_pids(host5["uid"]))
        assert meta == lock.meta
        assert set(meta) == {"run_id", "pid", "controller", "user", "started", "command"}
        meta["keeper_pid"] = keeper
        assert meta["run_id"] == "run-acq" and meta["pid"] == os.getpid()
        assert meta["command"] == "invoke deploy --host sandbox"
        assert meta["started"].endswith("Z")
        # what the preflight role checks from inside Ansible, as the deploy user
        probe = as_host_user(host, f"flock -n {shlex.quote(str(lock_file))} true; echo rc=$?; "
                                   f"cat {shlex.quote(str(meta_file))}")
        assert probe.returncode == 0, probe.stderr
        first, _, rest = probe.stdout.partition("\n")
        assert first == "rc=1"
        assert json.loads(rest)["run_id"] == "run-acq"
        assert remote.held_by("sandbox") == meta
        assert remote.lock_state("sandbox") == {"held": True, "meta": meta, "stale": False}
    assert not lock.held
    assert not meta_file.exists()
    assert remote.held_by("sandbox") is None
    assert remote.lock_state("sandbox") == {"held": False, "meta": None, "stale": False}
    probe = as_host_user(host, f"flock -n {shlex.quote(str(lock_file))} true; echo rc=$?")
    assert probe.stdout.strip() == "rc=0"


def test_second_acquire_while_held_raises_lock_held(remote, host5):
    with remote.DeployLock("sandbox", "run-first", "invoke deploy --host sandbox") as first:
        started = time.monotonic()
        with pytest.raises(remote.LockHeld) as exc:
            remote.DeployLock("sandbox", "run-second", "invoke deploy --host sandbox").acquire()
        assert time.monotonic() - started < 5
        assert exc.value.exit_code == 4
        assert isinstance(exc.value, remote.SlipwayError)
        assert str(exc.value) == (f"deploy already running on sandbox since {first.meta['started']} "
                                  f"(pid {os.getpid()})")
        # the holder is untouched
        assert first.held and remote.held_by("sandbox")["run_id"] == "run-first"
    assert remote.held_by("sandbox") is None


def test_lock_hosts_takes_all_or_none(remote, host5):
    host = host5["host"]
    with remote.lock_hosts(["sandbox", ALIAS], "run-both", "invoke deploy --host all") as locks:
        assert [lock.host for lock in locks] == ["sandbox", ALIAS]
        assert all(lock.held and lock.stale is None for lock in locks)
        assert remote.held_by("sandbox")["run_id"] == "run-both"
        assert remote.held_by(ALIAS)["run_id"] == "run-both"
        assert (host5["alias_dir"] / ".slipway" / "deploy.lock.json").exists()
    assert remote.held_by("sandbox") is None and remote.held_by(ALIAS) is None

    # ALIAS is held by another run: "sandbox" (taken first, sorted order) is given back
    with remote.DeployLock(ALIAS, "run-other", "invoke deploy --host sandbox-lockalias") as other:
        with pytest.raises(remote.LockHeld) as exc:
            with remote.lock_hosts([ALIAS, "sandbox"], "run-both-2", "invoke deploy --host all"):
                pytest.fail("lock_hosts must not yield while one host is held")
        assert str(exc.value) == f"deploy already running on {ALIAS} since {other.meta['started']} (pid {os.getpid()})"
        assert remote.lock_state("sandbox") == {"held": False, "meta": None, "stale": False}
        assert not lock_files(host)[1].exists()
        assert remote.held_by(ALIAS)["run_id"] == "run-other"


def test_killed_holder_is_taken_over_as_stale(remote, host5):
    proc = holder(time.time(), 300, "run-killed")
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["WON"], (line, proc.stderr.read() if proc.poll() is not None else "")
        dead_pid = int(line[1])
        assert dead_pid == proc.pid
        meta = remote.held_by("sandbox")
        assert meta["pid"] == dead_pid and meta["run_id"] == "run-killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    started = time.monotonic()
    while True:
        try:
            lock = remote.DeployLock("sandbox", "run-after-kill", "invoke deploy --host sandbox").acquire()
            break
        except remote.LockHeld:
            assert time.monotonic() - started < 5, "the killed run's lock was not freed within 5 s"
            time.sleep(0.2)
    took = time.monotonic() - started
    try:
        assert lock.stale is not None and lock.stale["pid"] == dead_pid and lock.stale["run_id"] == "run-killed"
        assert lock.stale_message.startswith(
            f"took over the deploy lock of run run-killed (pid {dead_pid} since {meta['started']}), which ended "
            "without releasing it; its processes here were stopped first; recorded it as interrupted in deploys.jsonl")
        assert remote.held_by("sandbox")["run_id"] == "run-after-kill"
    finally:
        lock.release()
    assert took < 5
    assert remote.lock_state("sandbox") == {"held": False, "meta": None, "stale": False}
    # the dead run's keeper is gone too
    deadline = time.monotonic() + 5
    while keeper_pids(host5["uid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert keeper_pids(host5["uid"]) == []


def test_two_processes_racing_exactly_one_wins(remote, host5):
    for round_ in range(2):
        start = time.time() + 2.5  # both are connected (imports, ssh) before they race
        procs = [holder(start, 1.0, f"run-race-{round_}-{i}") for i in range(2)]
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outs.append(out.split("\n")[0])
        won = [o for o in outs if o.startswith("WON ")]
        held = [o for o in outs if o.startswith("HELD ")]
        assert len(won) == 1 and len(held) == 1, outs
        winner_pid = won[0].split()[1]
        assert held[0].startswith("HELD 4 deploy already running on sandbox since ")
        assert held[0].endswith(f"(pid {winner_pid})")
        assert remote.lock_state("sandbox") == {"held": False, "meta": None, "stale": False}


def test_heartbeat_keeps_lock_and_silence_ends_it(remote, host5):
    # heartbeats every 0.5 s keep a keeper with a 2 s silence limit alive for 4 s
    with remote.DeployLock("sandbox", "run-hb", "hb", heartbeat=0.5, silence=2) as lock:
        time.sleep(4)
        assert lock.held and not lock.lost
        assert remote.held_by("sandbox")["run_id"] == "run-hb"
    assert remote.lock_state("sandbox")["meta"] is None

    # no heartbeat: after 2 s of silence the keeper ends without removing the metadata (stale)
    lock = remote.DeployLock("sandbox", "run-silent", "silent", heartbeat=600, silence=2).acquire()
    try:
        deadline = time.monotonic() + 8
        while lock.held and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not lock.held
        state = remote.lock_state("sandbox")
        assert state["held"] is False and state["stale"] is True and state["meta"]["run_id"] == "run-silent"
    finally:
        lock.release()
    with remote.DeployLock("sandbox", "run-next", "next") as nxt:
        assert nxt.stale["run_id"] == "run-silent" and nxt.stale["pid"] == os.getpid()
    assert remote.lock_state("sandbox") == {"held": False, "meta": None, "stale": False}


def test_keeper_leaves_no_processes_after_release(remote, host5):
    uid = host5["uid"]
    before = set(sb.user_pids(uid))
    assert keeper_pids(uid) == []
    with remote.DeployLock("sandbox", "run-procs", "procs"):
        assert keeper_pids(uid), "the keeper (flock + bash) runs as the deploy user while held"
    deadline = time.monotonic() + 5
    while (set(sb.user_pids(uid)) - before or keeper_pids(uid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = set(sb.user_pids(uid)) - before
    details = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in left if Path(f"/proc/{p}/cmdline").exists()}
    assert not left, details
    assert keeper_pids(uid) == []
