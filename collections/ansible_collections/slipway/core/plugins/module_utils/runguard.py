# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""The deploy run's guard on the host: a slipway module that changes something acts only while its
run holds the host's deploy lock, stops when the run is stopped, and journals what it changed.

The lock is held by a keeper process on the host (``slipway/remote.py``: ``flock`` on
``<state_dir>/deploy.lock`` + ``bash`` reading the controller's SSH channel); its metadata
``deploy.lock.json`` names the run (``run_id``) and the keeper's pid (``keeper_pid``). A module run
by that run (environment ``SLIPWAY_RUN_ID`` / ``SLIPWAY_STATE_DIR``, set by the preflight role):

- registers its pid in ``<state_dir>/run/<pid>`` (content: its start time, so a reused pid is
  never signalled), then checks that the lock is still its run's: else it changes nothing;
- stops (``RunStopped``, a ``KeyboardInterrupt``: psycopg cancels the running query) on SIGTERM,
  which the keeper sends to every registered pid when the run ends for any reason (the controller
  released the lock, asked it to stop, or its SSH channel closed), and on its own when a watchdog
  thread sees the keeper gone (the keeper itself killed);
- makes each change that must not outlive the lock under ``hold()``: a shared ``flock`` on
  ``<state_dir>/commit.lock`` and the check again, at the moment of the commit. The keeper takes
  that lock exclusively after signalling, so a commit under way finishes (and is journaled) before
  the lock is released, and a commit can never start after the lock was lost — a reparented
  module cannot pass the check;
- appends what it changed to ``<state_dir>/runs/<run_id>.jsonl`` (mode 0600), which the controller
  (or the next run, when this one was killed) reads to tell what the run really did.

Without ``SLIPWAY_RUN_ID`` (a module run on its own, Molecule, ``invoke migrate``) the guard does
nothing.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import datetime
import fcntl
import json
import os
import signal
import threading

from ansible_collections.slipway.core.plugins.module_utils import layout

ENV_RUN_ID = "SLIPWAY_RUN_ID"
ENV_STATE_DIR = "SLIPWAY_STATE_DIR"
KEEPER_NAME = b"slipway-deploy-lock"
WATCH_SECONDS = 0.2
HOLD_WAIT_SECONDS = 30


class RunStopped(KeyboardInterrupt):
    """The run was stopped (SIGTERM from the lock keeper, or the keeper is gone)."""


class LockLost(Exception):
    """This run does not hold the host's deploy lock (any more)."""


def start_time(pid):
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            stat = handle.read()
    except (OSError, IOError):
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def _keeper_alive(pid):
    try:
        with open("/proc/%d/cmdline" % int(pid), "rb") as handle:
            return KEEPER_NAME in handle.read()
    except (OSError, IOError, TypeError, ValueError):
        return False


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Guard:
    """See the module docstring. ``Guard(None, None)`` is inactive: every method is a no-op."""

    def __init__(self, run_id, state_dir):
        self.run_id = run_id or None
        self.state_dir = state_dir or None
        self.active = bool(self.run_id and self.state_dir)
        self._defer = 0
        self._pending = None
        self._stop = threading.Event()
        self._watch = None
        self._pidfile = None

    # -- paths ----------------------------------------------------------------------------
    def _path(self, *parts):
        return os.path.join(self.state_dir, *parts)

    # -- the check ----------------------------------------------------------------------------
    def lost(self):
        """Why this run does not hold the lock (one line), or None while it does."""
        if not self.active:
            return None
        if os.path.exists(self._path(layout.CLOSING)):
            return "the run is being stopped"
        try:
            with open(self._path(layout.LOCK_META)) as handle:
                meta = json.load(handle)
        except (OSError, IOError, ValueError):
            return "the deploy lock's metadata %s is missing or unreadable" % self._path(layout.LOCK_META)
        if not isinstance(meta, dict) or meta.get("run_id") != self.run_id:
            return "the deploy lock is held by run %s, not this run %s" % (
                (meta or {}).get("run_id") if isinstance(meta, dict) else "?", self.run_id)
        if not _keeper_alive(meta.get("keeper_pid")):
            return "the deploy lock's keeper (pid %s) is gone: the controller that ran this deploy has gone" % (
                meta.get("keeper_pid"),)
        return None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self):
        """Register, check, arm. Raises LockLost (nothing changed) when the run does not hold the lock."""
        if not self.active:
            return self
        run_dir = self._path(layout.RUN_DIR)
        if not os.path.isdir(run_dir):
            os.mkdir(run_dir, 0o700)
        pid = os.getpid()
        self._pidfile = os.path.join(run_dir, str(pid))
        tmp = self._pidfile + ".tmp"
        with open(tmp, "w") as handle:
            handle.write("%s\n" % start_time(pid))
        os.rename(tmp, self._pidfile)
        # registered first, checked second: a keeper that starts stopping the run after this
        # check sees the pid file and signals this process
        reason = self.lost()
        if reason:
            self.finish()
            raise LockLost(reason)
        signal.signal(signal.SIGTERM, self._on_term)
        self._watch = threading.Thread(target=self._watchdog, name="slipway-run-guard", daemon=True)
        self._watch.start()
        return self

    def finish(self):
        """Unregister (the keeper no longer waits for this process)."""
        self._stop.set()
        if self._pidfile:
            try:
                os.unlink(self._pidfile)
            except OSError:
                pass
            self._pidfile = None

    def _on_term(self, signum, frame):
        reason = "stopped: the deploy run %s was stopped (SIGTERM from its lock keeper)" % self.run_id
        if self._defer:
            self._pending = reason
            return
        raise RunStopped(reason)

    def _watchdog(self):
        while not self._stop.wait(WATCH_SECONDS):
            if self.lost():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    @contextlib.contextmanager
    def deferred(self):
        """A stop that arrives inside is raised when the block ends (the block finishes first)."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
            if not self._defer and self._pending:
                reason, self._pending = self._pending, None
                raise RunStopped(reason)

    @contextlib.contextmanager
    def hold(self):
        """Around a commit: the commit lock shared, the lock checked, stops deferred until the
        block (commit + journal) is done. Raises LockLost before the block when the lock is lost."""
        if not self.active:
            yield
            return
        fd = os.open(self._path(layout.COMMIT_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            with self.deferred():
                reason = self.lost()
                if reason:
                    raise LockLost(reason)
                yield
        finally:
            os.close(fd)  # releases the flock

    def record(self, event, **data):
        """Append one journal line (what this run changed) under <state_dir>/runs/."""
        if not self.active:
            return
        runs = self._path(layout.RUNS_DIR)
        if not os.path.isdir(runs):
            os.mkdir(runs, 0o700)
        line = json.dumps(dict(event=event, at=now_iso(), pid=os.getpid(), **data), sort_keys=True) + "\n"
        fd = os.open(os.path.join(runs, layout.journal_name(self.run_id)), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def from_env():
    """The guard of the run that started this module (inactive outside a deploy run)."""
    return Guard(os.environ.get(ENV_RUN_ID), os.environ.get(ENV_STATE_DIR))
