"""module_utils/hoststate.py and the redaction it relies on: the deploy lock read without taking
it, a pm2.pid from before the boot, parameters and flags left alone by the secret masking."""
from __future__ import annotations

import fcntl
import os

from ansible_collections.slipway.core.plugins.module_utils import hoststate, pm2
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_mapping, redact_text


def test_the_deploy_lock_is_read_from_proc_locks_without_taking_it(tmp_path):
    state = tmp_path / ".slipway"
    state.mkdir()
    lock = state / "deploy.lock"
    assert hoststate.deploy_running(str(tmp_path)) is False  # no lock file: no deploy ever ran
    lock.write_text("")
    assert hoststate.deploy_running(str(tmp_path)) is False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the keeper's flock -n holds
        assert hoststate._lock_held_in_proc_locks(str(lock)) is True
        assert hoststate.deploy_running(str(tmp_path)) is True
    finally:
        os.close(fd)
    assert hoststate.deploy_running(str(tmp_path)) is False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another reader's shared lock is no deploy
        assert hoststate.deploy_running(str(tmp_path)) is False
    finally:
        os.close(fd)


def test_a_pm2_pid_file_from_before_the_boot_names_no_daemon(tmp_path):
    home = tmp_path / ".pm2"
    home.mkdir()
    (home / "pm2.pid").write_text(str(os.getpid()))  # a live pid
    assert pm2.daemon_pid(str(home)) == os.getpid()
    os.utime(home / "pm2.pid", (0, 0))  # written in 1970: before this machine booted
    assert pm2.daemon_pid(str(home)) is None


def test_parameters_and_flags_are_not_taken_for_secrets():
    assert redact_text("UPDATE t SET token = $1, password = $2 WHERE key = $3") == \
        "UPDATE t SET token = $1, password = $2 WHERE key = $3"
    assert redact_text("PASSWORD=hunter2 DB_PASS=x SESSION_KEY=y BYPASS_CACHE=1") == \
        "PASSWORD=*** DB_PASS=*** SESSION_KEY=*** BYPASS_CACHE=1"
    assert redact_mapping({"password_ok": True, "token": "abc"}) == {"password_ok": True, "token": "***"}
