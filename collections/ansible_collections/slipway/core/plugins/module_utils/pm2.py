# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""PM2 state, read safely.

``pm2 jlist`` prints every process's full environment (DATABASE_URL, tokens). Nothing from it
leaves this module except whitelisted fields: a summary never carries an environment.
Any ``pm2`` command starts a daemon for its PM2_HOME, so callers check ``daemon_pid`` first
when they must not start one.

``pm2 save`` writes that same environment to ``dump.pm2`` (and the previous one to
``dump.pm2.bak``) with the caller's umask, in a PM2_HOME PM2 creates 0755: ``secure_pm2_home``
makes the directory private and those files 0600.

``app_error_line`` picks the app's own error line out of what a crashing worker wrote (node's
stack frames and PM2's own frames around it are skipped).
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re
import stat

from ansible_collections.slipway.core.plugins.module_utils import layout

# Fields copied from pm2_env (everything else, including env and the app's variables, is dropped).
_ENV_FIELDS = (
    "status",
    "restart_time",
    "unstable_restarts",
    "exec_mode",
    "pm_uptime",
    "pm_cwd",
    "pm_exec_path",
    "created_at",
    "instances",
    "node_version",
    "version",
    "pm_err_log_path",
    "pm_out_log_path",
    "pm_log_path",
    "exit_code",
    "max_memory_restart",
)

# The second PM2 app a takeover's handover runs beside the app (pm2_app action=replaced), deleted by
# the next health gate that passes.
HANDOVER_SUFFIX = "~slipway-handover"

# Files PM2 writes with every process's environment (DATABASE_URL, tokens) in them.
DUMP_FILES = ("dump.pm2", "dump.pm2.bak")


def default_home():
    """PM2's own default PM2_HOME: ``~/.pm2`` of the user running the module."""
    return os.path.join(os.path.expanduser("~"), ".pm2")


def daemon_pid(pm2_home):
    """PID of the PM2 daemon for ``pm2_home`` if it is alive, else None (starts nothing)."""
    try:
        with open(os.path.join(pm2_home, "pm2.pid")) as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if _written_before_boot(os.path.join(pm2_home, "pm2.pid")):
        return None  # pm2.pid outlives a reboot: its pid now belongs to some other process
    return pid


def _written_before_boot(path):
    """Whether ``path`` was last written before this machine booted (False when it cannot tell)."""
    try:
        with open("/proc/stat") as handle:
            boot = next((float(line.split()[1]) for line in handle if line.startswith("btime ")), None)
        return boot is not None and os.stat(path).st_mtime < boot
    except (OSError, ValueError, IndexError):
        return False


def cwd_release(pid):
    """The release process ``pid`` runs as the kernel sees it: the id of ``<app>/releases/<id>``
    when that is its working directory (PM2 starts each worker in the app's ``cwd``, the
    ``current`` link resolved at that moment), else None (not readable here, not a release, or the
    release directory deleted since)."""
    try:
        real = os.readlink("/proc/%d/cwd" % int(pid))
    except (OSError, ValueError, TypeError):
        return None
    parent, name = os.path.split(real.rstrip("/"))
    if os.path.basename(parent) != layout.RELEASES_DIR or not name or " " in name or layout.is_staging(name):
        return None
    return name


def summarize_jlist(text):
    """Parse ``pm2 jlist`` output into a list of safe per-process dicts.

    Raises ValueError with a short message when the output is not the JSON list PM2 prints.
    """
    start = text.find("[")
    if start < 0:
        raise ValueError("pm2 jlist printed no JSON list")
    try:
        raw = json.loads(text[start:])
    except ValueError as exc:
        raise ValueError("pm2 jlist printed malformed JSON: %s" % exc)
    if not isinstance(raw, list):
        raise ValueError("pm2 jlist did not print a list")
    procs = []
    for item in raw:
        env = item.get("pm2_env") or {}
        proc = {
            "name": item.get("name"),
            "pm_id": item.get("pm_id"),
            "pid": item.get("pid"),
        }
        for field in _ENV_FIELDS:
            proc[field] = env.get(field)
        # The release the process runs: its working directory as the kernel resolved it
        # (<app>/releases/<id>), else the RELEASE_ID it was started with (never the whole env).
        app_env = env.get("env") or {}
        proc["release"] = cwd_release(item.get("pid")) or env.get("RELEASE_ID") or app_env.get("RELEASE_ID")
        # the RELEASE_ID it was started with, which the app reports (a worker PM2 restarted during a
        # failed reload keeps that reload's, whatever directory it runs from)
        proc["env_release"] = env.get("RELEASE_ID") or app_env.get("RELEASE_ID")
        monit = item.get("monit") or {}
        proc["memory"] = monit.get("memory")
        proc["cpu"] = monit.get("cpu")
        procs.append(proc)
    return procs


def app_summary(procs, name):
    """Aggregate the processes of app ``name``: instance count, online count, pids, restarts."""
    mine = [p for p in procs if p.get("name") == name]
    return {
        "name": name,
        "instances": len(mine),
        "online": sum(1 for p in mine if p.get("status") == "online"),
        "pids": sorted(p["pid"] for p in mine if p.get("pid")),
        "restarts": sum(int(p.get("restart_time") or 0) for p in mine),
        "unstable_restarts": sum(int(p.get("unstable_restarts") or 0) for p in mine),
        "statuses": sorted(set(str(p.get("status")) for p in mine)),
        "cwd": sorted(set(p.get("pm_cwd") for p in mine if p.get("pm_cwd"))),
    }


def under(path, app_dir):
    """Whether ``path`` (a process's working directory) is ``app_dir`` or inside it (``~`` and
    trailing slashes as a shell would take them)."""
    if not path or not app_dir:
        return False
    base = os.path.normpath(os.path.expanduser(app_dir))
    path = os.path.normpath(path)
    return path == base or path.startswith(base.rstrip("/") + "/")


def outside(procs, name, app_dir):
    """The working directories app ``name``'s processes run from outside ``app_dir`` (an app
    deployed by hand, which a first deploy takes over), sorted."""
    return sorted(set(p.get("pm_cwd") for p in procs
                      if p.get("name") == name and p.get("pm_cwd") and not under(p.get("pm_cwd"), app_dir)))


def app_processes(procs, name):
    """The processes of app ``name`` that hold a PM2 id: during a reload PM2 parks each outgoing
    worker under an ``_old_<id>`` id until it has exited; those are left out."""
    return [p for p in procs if p.get("name") == name and isinstance(p.get("pm_id"), int)]


def reload_lock_path(pm2_home):
    """The file the pm2 CLI uses as its reload lock (a timestamp while a reload runs, else empty).
    A CLI killed mid-reload leaves it set, and every reload for the next 30 s is refused."""
    return os.path.join(pm2_home, "reload.lock")


def instance_facts(procs):
    """Per instance, sorted by pm_id: pm_id, pid, status, restarts (PM2's restart count) and
    release (the RELEASE_ID the instance was started with); nothing else."""
    facts = [{"pm_id": p.get("pm_id"), "pid": p.get("pid") or 0, "status": p.get("status"),
              "restarts": int(p.get("restart_time") or 0), "release": p.get("release")} for p in procs]
    return sorted(facts, key=lambda f: f["pm_id"])


def secure_pm2_home(pm2_home, check_mode=False):
    """Make ``pm2_home`` 0700 and the dump files in it 0600 (in check mode only report it).

    Returns the paths whose mode was (or would be) changed, each as ``path (0755 -> 0700)``.
    Raises OSError when a mode cannot be changed (e.g. not the owner)."""
    changed = []
    targets = [(pm2_home, 0o700)] + [(os.path.join(pm2_home, name), 0o600) for name in DUMP_FILES]
    for path, want in targets:
        try:
            have = stat.S_IMODE(os.stat(path).st_mode)  # a link: what it points at (chmod follows too)
        except FileNotFoundError:
            continue
        if have & ~want:
            if not check_mode:
                os.chmod(path, have & want)
            changed.append("%s (%04o -> %04o)" % (path, have, have & want))
    return changed


_TIME_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?:\s?")
_FRAME = re.compile(r"^\s*(?:at\s|\.\.\.\s*\d+\s+more\b)")
# Not the app's words: PM2's own code, node's location headers and carets, the bits of an
# uncaught 'error' event report, and the fields node prints of an error object.
_NOISE = re.compile(
    r"(?:/node_modules/pm2/|ProcessContainer"
    r"|^\s*\^+\s*$"
    r"|^(?:node:)?[\w./@-]+\.?[cm]?js:\d+$|^node:[\w/]+:\d+$"
    r"|^\s*throw\s+\w+;\s*//"
    r"|^Emitted 'error' event"
    r"|^Node\.js v\d"
    r"|^\s*[\[\]{}]\s*,?\s*$|^\s+[\w$]+:\s.*,?$"
    r"|^PM2\b)")
_ERROR_HEAD = re.compile(r"^(?:Uncaught\s+)?(?:[A-Za-z_$][\w$.]*)?(?:Error|Exception)\b(?:\s*\[[\w-]+\])?:")


def app_error_line(lines, skip=()):
    """The app's own error line among ``lines`` (a crashing worker's output, oldest first), or None.

    Stack frames (``at ...``), PM2's own lines and node's decorations are skipped, and so is any
    line in ``skip`` (e.g. what the app wrote on stdout). Of what is left, the last line that
    starts like an error (``SyntaxError: ...``, ``Error: listen EADDRINUSE ...``) is the answer;
    when there is none, the last line the app wrote (e.g. its own ``console.error`` line)."""
    skip = set(line.strip() for line in skip)
    last = head = None
    for raw in lines:
        line = _TIME_PREFIX.sub("", raw.rstrip())
        text = line.strip()
        if not text or text in skip or _FRAME.match(line) or _NOISE.search(line):
            continue
        last = text
        if _ERROR_HEAD.match(text):
            head = text
    return head or last


def can_hand_over(procs):
    """Whether new workers can serve beside ``procs`` before they go: every one online in PM2's
    cluster mode (the PM2 daemon holds the listening socket and shares it with the workers of any
    app on the same address, so a second app's workers take connections at once)."""
    return bool(procs) and all(p.get("exec_mode") == "cluster_mode" and p.get("status") == "online" for p in procs)


def decide(procs, current, release, reload_mode):
    """(action, reason) for the processes PM2 runs now."""
    if not procs:
        return "started", "the app is not running under PM2"
    elsewhere = sorted(set(p.get("pm_cwd") or "?" for p in procs
                           if p.get("pm_cwd") != current or not str(p.get("pm_exec_path") or "").startswith(current + "/")))
    if (elsewhere and reload_mode != "never") or reload_mode == "replace":
        why = ("processes were started from %s, not from %s, so a reload would keep running that code" % (
            ", ".join(elsewhere), current) if elsewhere and reload_mode != "replace" else
            "reload=replace (new processes, with nothing of the old ones' environment: `pm2 reload --update-env` "
            "merges it, so a removed key would stay)")
        if can_hand_over(procs):
            return "replaced", ("%s; new workers started from the current link beside them, then the old ones "
                                "deleted (no gap)" % why)
        return "restarted", ("%s; deleted and started again from the current link (not every instance is online in "
                             "cluster mode, so new workers cannot serve beside them: a short gap)" % why)
    others = sorted(set(str(p.get("release")) for p in procs if p.get("release") != release))
    not_online = [p for p in procs if p.get("status") != "online"]
    if reload_mode == "never":
        return "none", "reload=never"
    if others:
        return "reloaded", "running release %s, current is %s" % (", ".join(others), release)
    if not_online:
        return "reloaded", "%d of %d instances not online (%s)" % (
            len(not_online), len(procs), ",".join(sorted(set(str(p.get("status")) for p in not_online))))
    if reload_mode == "always":
        return "reloaded", "reload=always"
    return "none", "release %s runs on all %d instances from the current link" % (release, len(procs))
