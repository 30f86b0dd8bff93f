# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""PM2 state, read safely.

``pm2 jlist`` prints every process's full environment (DATABASE_URL, tokens). Nothing from it
leaves this module except whitelisted fields: a summary never carries an environment.
Any ``pm2`` command starts a daemon for its PM2_HOME, so callers check ``daemon_pid`` first
when they must not start one.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os

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
)


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
        return pid
    return pid


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
        # The release the process runs, when the app reports it (never the whole env).
        app_env = env.get("env") or {}
        proc["release"] = env.get("RELEASE_ID") or app_env.get("RELEASE_ID")
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


def app_processes(procs, name):
    """The processes of app ``name`` that hold a PM2 id: during a reload PM2 parks each outgoing
    worker under an ``_old_<id>`` id until it has exited; those are left out."""
    return [p for p in procs if p.get("name") == name and isinstance(p.get("pm_id"), int)]


def reload_lock_path(pm2_home):
    """The file the pm2 CLI uses as its reload lock (a timestamp while a reload runs, else empty).
    A CLI killed mid-reload leaves it set, and every reload for the next 30 s is refused."""
    return os.path.join(pm2_home, "reload.lock")
