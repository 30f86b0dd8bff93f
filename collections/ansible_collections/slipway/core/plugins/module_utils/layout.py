# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Where slipway keeps things on a target host: the one place that names the host-side paths.

Everything lives under the app directory (``slipway_app_dir``)::

    <app_dir>/
      current -> releases/<id>      the release that serves (a symlink, switched by an atomic rename)
      releases/<id>/                an installed release: complete when its .slipway-built names <id>
      releases/.<id>.tmp/           a release being installed (renamed to <id> when complete)
      shared/.env                   the app's environment, linked into every release
      logs/                         the app's log files, linked into every release
      .slipway/                     slipway's state directory
        deploy.lock                 flock held by the deploy lock's keeper for a whole run
        deploy.lock.json            that lock's metadata (run_id, keeper_pid, ...)
        commit.lock                 shared by a commit under way; exclusive while the keeper stops a run
        run.closing                 present while the keeper stops the run
        run/<pid>                   the run's registered module processes (content: their start time)
        runs/<run_id>.jsonl         what each run changed (its journal, 0600)
        deploys.jsonl               one record per finished deploy
        incoming/<id>.tar.gz        release archives shipped before their install
        runtime/<id>/               slipway's module runtime (complete when it holds .complete)

Paths are built with ``/`` (the host is POSIX) from an app dir given with or without a trailing
slash. The roles and playbooks spell the same names in YAML (roles/preflight, roles/app_release,
playbooks/deploy.yml, playbooks/rollback.yml): change them together.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

STATE_DIR = ".slipway"
LOCK_FILE = "deploy.lock"
LOCK_META = "deploy.lock.json"
COMMIT_LOCK = "commit.lock"
CLOSING = "run.closing"
RUN_DIR = "run"
RUNS_DIR = "runs"
JOURNAL_SUFFIX = ".jsonl"
DEPLOYS = "deploys.jsonl"
INCOMING_DIR = "incoming"
ARCHIVE_SUFFIX = ".tar.gz"
RUNTIME_DIR = "runtime"
RUNTIME_COMPLETE = ".complete"

CURRENT = "current"
RELEASES_DIR = "releases"
SHARED_DIR = "shared"
LOGS_DIR = "logs"
ENV_FILE = ".env"
BUILT_MARKER = ".slipway-built"
# the app dir's own directories and their modes (created by app_release when missing)
APP_DIRS = ((RELEASES_DIR, 0o755), (SHARED_DIR, 0o750), (LOGS_DIR, 0o750))
# the links made inside each release, name -> target relative to the release (app_release's default)
SHARED_LINKS = {ENV_FILE: "../../%s/%s" % (SHARED_DIR, ENV_FILE), LOGS_DIR: "../../%s" % LOGS_DIR}


def join(base, *parts):
    """``base/part/...`` with ``base``'s trailing slashes dropped."""
    return "/".join((base.rstrip("/"),) + parts)


# -- the state directory ---------------------------------------------------------------------
def state_dir(app_dir):
    return join(app_dir, STATE_DIR)


def lock_paths(app_dir):
    """(state dir, lock file, lock metadata file) of the deploy lock under ``app_dir``."""
    directory = state_dir(app_dir)
    return directory, join(directory, LOCK_FILE), join(directory, LOCK_META)


def journal_name(run_id):
    """The file name of a run's journal inside ``runs/``."""
    return run_id + JOURNAL_SUFFIX


def run_journal(app_dir, run_id):
    return join(state_dir(app_dir), RUNS_DIR, journal_name(run_id))


def deploys_file(app_dir):
    return join(state_dir(app_dir), DEPLOYS)


def incoming_archive(app_dir, release):
    return join(state_dir(app_dir), INCOMING_DIR, release + ARCHIVE_SUFFIX)


def runtime_dir(app_dir, runtime_id):
    return join(state_dir(app_dir), RUNTIME_DIR, runtime_id)


# -- releases ----------------------------------------------------------------------------------
def current_link(app_dir):
    return join(app_dir, CURRENT)


def releases_dir(app_dir):
    return join(app_dir, RELEASES_DIR)


def release_dir(app_dir, release):
    return join(app_dir, RELEASES_DIR, release)


def current_target(release):
    """What ``current`` holds when it points at ``release`` (relative, so the app dir can move)."""
    return join(RELEASES_DIR, release)


def built_marker(release_path):
    """The marker file of a complete release directory (its content: the release id)."""
    return join(release_path, BUILT_MARKER)


def staging_name(release):
    """The hidden name a release is installed under before it is renamed into place."""
    return ".%s.tmp" % release


def is_staging(name):
    """True for a leftover of an interrupted install (never a complete release)."""
    return name.startswith(".") and name.endswith(".tmp")


def aside_name(release, stamp):
    """The hidden name an incomplete directory under a release's final name is moved to."""
    return ".%s.incomplete.%d" % (release, stamp)


def current_tmp_name(pid):
    """The new symlink renamed over ``current`` (one per process)."""
    return ".%s.%d.tmp" % (CURRENT, pid)


def logs_dir(app_dir):
    return join(app_dir, LOGS_DIR)


def shared_dir(app_dir):
    return join(app_dir, SHARED_DIR)
