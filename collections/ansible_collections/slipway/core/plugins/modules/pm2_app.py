#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pm2_app
short_description: Start or zero-downtime reload a PM2 cluster app from the current release and gate on health
version_added: "0.3.0"
description:
  - Starts the app from C(<app_dir>/current/<ecosystem>) when PM2 does not run it, or reloads it
    with C(pm2 reload <ecosystem> --update-env), one worker at a time, each replaced only when its
    successor signalled ready, when it runs another release, not all instances are online, or
    I(reload=always).
  - The pm2 commands get C(APP_CURRENT=<app_dir>/current) and C(RELEASE_ID=<release>) in their
    environment. An ecosystem file that takes its C(cwd) and C(script) from C(APP_CURRENT) (the
    reference app's does) makes PM2 store the C(current) link's own path, so every later reload
    starts the workers from whatever C(current) points at then. Processes started with a real
    release path (C(releases/<id>)) would keep running that release's code on every reload; the
    module moves them to the C(current) path (e.g. an app started by hand from a directory of its
    own, which a first deploy takes over). When every one is online in cluster mode this happens
    with no gap (I(action=replaced)) - the ecosystem's app is started beside them under the name
    C(<app_name>~slipway-handover) from the C(current) link (PM2's cluster mode shares the listening
    socket between apps), gated on health, then the old processes are deleted (each finishing its
    requests), the app is started under its own name, gated, and the second app deleted. When the
    new workers fail their gate they are deleted and the old processes serve on, untouched.
    Otherwise C(pm2 delete) + C(pm2 start) (I(action=restarted), a short gap).
  - Health gate after any action, within I(health_timeout) seconds counted from the action's start
    (C(pm2 jlist) shows every instance online, restart counts and pids unchanged for
    I(stable_seconds), and I(health_url) answers I(health_successes) consecutive 200 responses whose
    C(release) is the expected release). When nothing is done, a quicker gate (all online, one 200 of
    the expected release). A worker that crash-loops while the pm2 command runs ends the command early
    (the other workers of a reload keep serving the previous release). An instance that was already
    C(errored) before the command (e.g. left by a failed release, before a rollback) does not end it;
    only an instance that errors or crash-loops during the command does.
  - Recovery, for a rollback after a release that crashed at start. When the action or the gate
    failed and instances are down (not C(online)) while still carrying another release than
    I(release), those instances are restarted once on I(release) (C(pm2 restart <pm_id>...
    --update-env); nothing serves on them, so no zero-downtime is lost) and the gate runs again
    within the same I(health_timeout). Online instances are only ever reloaded. An instance that is
    down on I(release) itself is that release failing and is left as it is.
  - On failure the message names the instances online/total, each instance's status and release,
    and quotes the app's own error line (the C(SyntaxError) or C(Error) line of an uncaught error,
    e.g. EADDRINUSE, or its last C(console.error) line) from what its log files got since the
    action started; node's and PM2's stack frames are left out. The failed result carries the same
    facts as a successful one (I(healthy), I(online), I(total), I(processes), I(app_error)).
  - Secrets at rest, on every run that is not check mode. C(pm2 save) writes every process's
    environment (DATABASE_URL, tokens) to C(dump.pm2) and C(dump.pm2.bak), in a PM2_HOME that PM2
    creates 0755. The module makes PM2_HOME 0700 (creating it so before PM2 first starts) and
    those files 0600, runs C(pm2 save) with umask 077, and reports what it tightened in
    I(modes_fixed) (a change; check mode predicts it).
  - Never returns environment values; the log lines and health bodies it quotes are redacted.
options:
  app_dir:
    description: The app directory; the ecosystem is C(<app_dir>/current/<ecosystem>).
    type: path
    required: true
  app_name:
    description: The PM2 app name the ecosystem defines.
    type: str
    required: true
  pm2_home:
    description: PM2_HOME of the deploy user; defaults to C(~/.pm2).
    type: path
  pm2_bin:
    description: The pm2 executable.
    type: str
    default: pm2
  state:
    description: C(present) starts or reloads the app as described above; C(absent) deletes the app's
      processes that run from I(app_dir) from PM2 (C(pm2 delete <id>...), then C(pm2 save)) and does
      nothing else - e.g. after a first deploy that failed, when no release ever served healthy.
      Processes of the app that run from elsewhere (an app started by hand, not yet taken over) are
      left running.
    type: str
    choices: [present, absent]
    default: present
  ecosystem:
    description: The ecosystem file's name inside the release.
    type: str
    default: ecosystem.config.js
  release:
    description: The release id expected to serve; must be the release C(current) points at.
      Default the basename of C(realpath(<app_dir>/current)).
    type: str
  reload:
    description: C(auto) reloads only when needed, C(always) reloads a running app anyway, C(never)
      only starts an absent app (the health gate still expects I(release)), C(replace) replaces a
      running app's processes with new ones (I(action=replaced)), whose environment holds nothing
      of the old ones' (a reload merges it, so a key removed from the app's environment would stay).
    type: str
    choices: [auto, always, never, replace]
    default: auto
  env:
    description: Extra environment for the pm2 commands (with C(--update-env) it reaches the app).
    type: dict
    default: {}
  health_url:
    description: The app's health URL. An answer counts when it has I(health_status) and, when its
      JSON body holds C(release), that release; an app whose answer names no release is judged by
      the release PM2's workers run (each worker's working directory, C(releases/<id>); else the
      C(RELEASE_ID) it was started with).
    type: str
    required: true
  health_status:
    description: The HTTP status a healthy app answers I(health_url) with.
    type: int
    default: 200
  health_timeout:
    description: Seconds for the action and its health gate together.
    type: float
    default: 60
  stable_seconds:
    description: Seconds during which all instances must stay online with unchanged restart counts.
    type: float
    default: 3
  health_successes:
    description: Consecutive 200 responses of the expected release required; 0 means 2 per instance.
    type: int
    default: 0
  save:
    description: Run C(pm2 save) after a change, so a resurrected daemon runs the same processes.
    type: bool
    default: true
author:
  - slipway developers
notes:
  - Supports check mode (predicts the action; starts no PM2 daemon and runs only C(pm2 jlist)).
  - Runs as the deploy user; needs no privilege escalation.
"""

EXAMPLES = r"""
- name: Reload the reader app on the release current points at
  slipway.core.pm2_app:
    app_dir: /srv/reader/app
    app_name: ollama-reader
    health_url: http://127.0.0.1:3000/api/health
  register: pm2_result

- name: Roll back (after switching current to the previous release)
  slipway.core.pm2_app:
    app_dir: /srv/reader/app
    app_name: ollama-reader
    health_url: http://127.0.0.1:3000/api/health
    health_timeout: 90
"""

RETURN = r"""
action:
  description: What was done (or, in check mode, would be done).
  returned: always
  type: str
  choices: [none, started, reloaded, replaced, restarted, deleted]
reason:
  description: Why, in one line.
  returned: always
  type: str
release:
  description: The release expected to serve (and, after a passed gate, serving).
  returned: always
  type: str
instances:
  description: Number of PM2 instances of the app after the action.
  returned: always
  type: int
pids_before:
  description: Worker pids before the action.
  returned: always
  type: list
  elements: int
pids_after:
  description: Worker pids after the action (unchanged in check mode).
  returned: always
  type: list
  elements: int
restarts:
  description: PM2 restart count summed over the instances, after the action.
  returned: always
  type: int
health:
  description: Last health probe (status, release, successes).
  returned: always
  type: dict
seconds:
  description: Seconds from the action's start until the gate passed or failed.
  returned: always
  type: float
healthy:
  description: True when the run ended with every instance online on I(release) and the health gate
    passed (check mode - every instance online on I(release) and one 200 of it now). False on any
    failure, with the host's actual state in I(online), I(total) and I(processes).
  returned: always
  type: bool
online:
  description: Instances of the app C(online) at the end of the run (as read from C(pm2 jlist)).
  returned: always
  type: int
total:
  description: Instances of the app PM2 runs at the end of the run (same as I(instances)).
  returned: always
  type: int
processes:
  description: One dict per instance at the end of the run, sorted by C(pm_id) - C(pm_id), C(pid)
    (0 when not running), C(status) (online, errored, stopped, launching...), C(restarts) (PM2's
    restart count) and C(release) (the RELEASE_ID the instance was started with).
  returned: always
  type: list
  elements: dict
  sample: [{"pm_id": 0, "pid": 4242, "status": "online", "restarts": 16, "release": "r1"}]
app_error:
  description: On failure, the app's own error line from its log files (written since the action
    started; redacted, stack frames left out), e.g. the C(SyntaxError) or C(Error) line node printed
    for an uncaught error, else the app's last C(console.error) line; null when the run succeeded or
    the app wrote none.
  returned: always
  type: str
handover:
  description: With I(action=replaced) or C(restarted), the second PM2 app that served during the
    handover (C(app); null for a restart), the working directories the old processes ran from
    (C(old_cwd)) and whether they were deleted (C(old_deleted)).
  returned: when action is replaced or restarted
  type: dict
recovered:
  description: C(pm_id)s of the instances restarted by the recovery (down on another release than
    I(release) after the action or gate failed); empty when none was needed.
  returned: always
  type: list
  elements: int
modes_fixed:
  description: PM2_HOME and dump files whose mode was tightened (in check mode - would be), each as
    C(path (0755 -> 0700)).
  returned: always
  type: list
  elements: str
"""

import copy
import json
import os
import signal
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils import layout, runguard
from ansible_collections.slipway.core.plugins.module_utils.http_client import HttpClient
from ansible_collections.slipway.core.plugins.module_utils.oneline import one_line, strip_ansi
from ansible_collections.slipway.core.plugins.module_utils.pm2 import (
    HANDOVER_SUFFIX,
    app_error_line,
    app_processes,
    app_summary,
    daemon_pid,
    decide,
    default_home,
    instance_facts,
    reload_lock_path,
    secure_pm2_home,
    summarize_jlist,
    under,
)
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

_IN_PROGRESS = "already in progress"

# action=replaced: the second PM2 app that serves while the app's processes are replaced, and the
# process file that starts it (the release's own ecosystem file, its app renamed).
HANDOVER_CONFIG = "handover.config.cjs"
HANDOVER_JS = """'use strict';
// written by slipway's pm2_app for one handover (action=replaced), removed once PM2 started it
const loaded = require(%s);
const name = %s;
const apps = [].concat(loaded.apps || loaded).filter((app) => app && app.name === name);
if (apps.length === 0) throw new Error(`the ecosystem file defines no app named ${name}`);
module.exports = { apps: apps.map((app) => Object.assign({}, app, { name: %s })) };
"""


class GateFailed(Exception):
    """The action or the health gate did not reach a healthy app in time (message: one line)."""


class WrongRelease(GateFailed):
    """A stable, online instance answers with another release than expected."""


class InstanceErrored(GateFailed):
    """An instance is ``errored``: PM2 gave up restarting it, so waiting longer cannot help."""


def _private_umask():
    """preexec_fn for pm2 save: the dump files it creates are 0600 from the start."""
    os.umask(0o077)


class Pm2App(object):
    def __init__(self, module):
        self.module = module
        p = module.params
        self.app_name = p["app_name"]
        self.app_dir = os.path.normpath(p["app_dir"])
        self.current = layout.current_link(self.app_dir)
        self.ecosystem = os.path.join(self.current, p["ecosystem"])
        self.pm2_home = p["pm2_home"] or default_home()
        self.health_url = p["health_url"]
        self.health_status = p["health_status"]
        self.pm2_bin = None
        self.client = HttpClient()  # loopback/internal URLs: never via a proxy

    # ---------------------------------------------------------------- pm2 commands
    def env(self, release):
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (self.module.params["env"] or {}).items()})
        env.update(PM2_HOME=self.pm2_home, APP_CURRENT=self.current, RELEASE_ID=release)
        # Read by the PM2 daemon (the cluster primary) when a command starts it: with Node's default
        # round-robin hand-off a reload loses a connection now and then (it hangs until the client
        # gives up); with "none" the workers accept from the shared socket and none is lost.
        env.setdefault("NODE_CLUSTER_SCHED_POLICY", "none")
        return env

    def daemon_sched_policy(self):
        """NODE_CLUSTER_SCHED_POLICY of the running daemon (only that value is read), or None."""
        pid = daemon_pid(self.pm2_home)
        try:
            with open("/proc/%d/environ" % pid, "rb") as handle:
                for item in handle.read().split(b"\0"):
                    if item.startswith(b"NODE_CLUSTER_SCHED_POLICY="):
                        return item.split(b"=", 1)[1].decode("ascii", "replace")
        except (OSError, TypeError):
            pass
        return None

    def bin(self):
        if self.pm2_bin is None:
            self.pm2_bin = self.module.get_bin_path(self.module.params["pm2_bin"], required=True)
        return self.pm2_bin

    def jlist(self, name=None):
        """This app's processes (or app ``name``'s; safe summaries); [] when no daemon runs (none is started)."""
        if daemon_pid(self.pm2_home) is None:
            return []
        proc = subprocess.run([self.bin(), "jlist"], cwd=self.app_dir, env=dict(os.environ, PM2_HOME=self.pm2_home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        if proc.returncode != 0:
            said = one_line(proc.stderr, pick="last", default="no output")
            raise GateFailed("pm2 jlist failed (rc=%d): %s" % (proc.returncode, redact_text(said)))
        try:
            return app_processes(summarize_jlist(proc.stdout), name or self.app_name)
        except ValueError as exc:
            raise GateFailed(str(exc))

    def run_pm2(self, args, release, deadline, baseline):
        """Run one pm2 command (a reload is retried while PM2 reports one in progress), watching the
        app: a crash loop or the deadline ends the command (and clears the reload lock it held).
        ``baseline``: the app's processes before the command (what is already broken there is not
        the command's doing)."""
        while True:
            started = time.time()
            proc = subprocess.Popen([self.bin()] + args, cwd=self.app_dir, env=self.env(release),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                    start_new_session=True)
            problem = self._watch(proc, deadline, baseline)
            if problem:
                self._kill(proc)
                if args[0] == "reload":
                    self._clear_reload_lock(started)
                raise GateFailed("pm2 %s %s" % (args[0], problem))
            out = proc.stdout.read()
            proc.stdout.close()
            if proc.returncode == 0:
                return
            if _IN_PROGRESS in out and time.time() + 1 < deadline:
                time.sleep(1)
                continue
            said = one_line(out, pick="last", default="no output")
            raise GateFailed("pm2 %s failed (rc=%d): %s" % (args[0], proc.returncode, redact_text(said)))

    def _watch(self, proc, deadline, baseline):
        """None when ``proc`` ended by itself, else why it was stopped: the deadline, an instance
        that became errored during the command (one already errored before it, unchanged, does not
        count: a reload is what restarts it), or restarts climbing (a crash loop)."""
        before = dict((p["pm_id"], (p.get("status"), int(p.get("restart_time") or 0))) for p in baseline)
        restarts_before = sum(r for _, r in before.values())
        next_look = time.time() + 1
        while proc.poll() is None:
            now = time.time()
            if now >= deadline:
                return "did not finish within health_timeout"
            if now >= next_look:
                next_look = now + 1
                try:
                    procs = self.jlist()
                except (GateFailed, subprocess.TimeoutExpired):
                    procs = []
                summary = app_summary(procs, self.app_name)
                newly = [p for p in procs if p.get("status") == "errored" and
                         before.get(p["pm_id"]) != ("errored", int(p.get("restart_time") or 0))]
                if newly:
                    return "stopped early: an instance is errored (it exits at start); %s" % self._describe(procs)
                if summary["restarts"] > restarts_before + max(summary["instances"], 1) + 2:
                    return "stopped early: instances crash-loop; %s" % self._describe(procs)
            time.sleep(0.2)
        return None

    @staticmethod
    def _kill(proc):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except OSError:
                pass
            try:
                proc.wait(timeout=3)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout:
            proc.stdout.close()

    def _clear_reload_lock(self, since):
        """Release the pm2 CLI's reload lock when it is the one our killed command took (the CLI does
        the same: it writes an empty file), so the rollback's reload is not refused for 30 s."""
        path = reload_lock_path(self.pm2_home)
        try:
            with open(path) as handle:
                stamp = int(handle.read().strip() or 0) / 1000.0
            if stamp >= since - 1:
                with open(path, "w") as handle:
                    handle.write("")
        except (OSError, ValueError):
            pass

    # ---------------------------------------------------------------- health
    def probe(self, timeout):
        """(status or None, release or None, one-line redacted detail); ``self.last_pid`` is the pid
        that answered (the app reports it), or None."""
        self.last_pid = None
        try:
            status, text, body = self.client.request(self.health_url, timeout=timeout, limit=4096)
        except Exception as exc:  # connection refused/reset, timeout: the app is not serving
            reason = getattr(exc, "reason", exc)
            return None, None, redact_text(one_line("%s: %s" % (type(exc).__name__, reason), 160))
        release = body.get("release") if isinstance(body, dict) else None
        self.last_pid = body.get("pid") if isinstance(body, dict) else None
        return status, release, redact_text(one_line("HTTP %s %s" % (status, text), 200))

    def serves(self, status, seen, release, procs):
        """An answer of ``release``: the health status, and the body's ``release`` when the app
        sends one; an app that does not is judged by the release each of PM2's workers runs
        (its working directory, releases/<id>; else the RELEASE_ID it was started with)."""
        if status != self.health_status:
            return False
        if seen is not None:
            return seen == release
        facts = instance_facts(procs)
        return bool(facts) and all(f["release"] == release for f in facts)

    @staticmethod
    def _describe(procs):
        """``instances 1/2 online (0 errored r2 16 restarts, 1 online r1 0 restarts)``."""
        facts = instance_facts(procs)
        return "instances %d/%d online (%s)" % (
            sum(1 for f in facts if f["status"] == "online"), len(facts),
            ", ".join("%s %s %s %d restarts" % (f["pm_id"], f["status"], f["release"] or "release?", f["restarts"])
                      for f in facts) or "none")

    def gate(self, release, deadline, needed, stable_seconds, attributed=False):
        """Wait until the app is healthy: every instance online with unchanged restart counts for
        ``stable_seconds``, ``needed`` consecutive 200s reporting ``release``, and every PM2 pid
        seen answering with it (the kernel spreads connections unevenly, so consecutive successes
        alone could all come from one worker; ``attributed``: only answers that name their pid count,
        and one that names none fails the gate at once). Returns (processes, health); raises WrongRelease when
        a stable, online instance keeps answering with another release, InstanceErrored as soon as
        an instance is errored, GateFailed on timeout."""
        stable_since, signature, procs, summary = None, None, [], app_summary([], self.app_name)
        successes, status, seen_release, detail = 0, None, None, "no probe yet"
        good, wrong = set(), {}
        next_look = 0.0
        while True:
            now = time.time()
            if now >= next_look:
                next_look = now + 0.5
                procs = self.jlist()
                summary = app_summary(procs, self.app_name)
                if "errored" in summary["statuses"]:
                    raise InstanceErrored("health gate: an instance is errored (PM2 stopped restarting it); %s" % (
                        self._describe(procs)))
                healthy = summary["instances"] > 0 and summary["online"] == summary["instances"]
                sig = (tuple(summary["pids"]), summary["restarts"])
                if not healthy:
                    stable_since, signature = None, None
                elif sig != signature:
                    stable_since, signature = now, sig
            status, seen_release, detail = self.probe(min(2.0, max(0.2, deadline - now)))
            pid = self.last_pid
            if attributed and status == self.health_status and pid is None:
                raise GateFailed("health gate: the app's health answer names no pid (the worker's process.pid), so "
                                 "the new workers' answers cannot be told from those of the processes they replace; "
                                 "add \"pid\" to the health answer, or stop those processes by hand (a gap) and deploy "
                                 "again")
            if self.serves(status, seen_release, release, procs):
                successes += 1
                good.add(pid)
                wrong.pop(pid, None)
            else:
                successes = 0
                if status == self.health_status and pid is not None and seen_release is not None:
                    good.discard(pid)
                    wrong[pid] = seen_release
            now = time.time()
            need = needed or 2 * max(summary["instances"], 1)
            stable = stable_since is not None and now - stable_since >= stable_seconds
            pids = set(summary["pids"])
            if stable and successes >= need and (pids <= good or None in good):  # None: the app does not report its pid
                return procs, dict(status=status, release=seen_release, successes=successes)
            stale = {p: r for p, r in wrong.items() if p in pids}
            if stable and stale:
                raise WrongRelease("instance pid %s still answers with release %s, not %s" % (
                    ", ".join(str(p) for p in sorted(stale)), ", ".join(sorted(set(map(str, stale.values())))), release))
            if now >= deadline:
                missing = sorted(pids - good)
                raise GateFailed("health gate: %s; health %s (%d/%d consecutive 200s of release %s%s)" % (
                    self._describe(procs), detail, successes, need, release,
                    "; never heard from pid %s" % ", ".join(map(str, missing)) if missing else ""))
            time.sleep(0.1)

    # ---------------------------------------------------------------- the app's own words
    def log_files(self, procs):
        """(stream, path) of the app's log files: PM2's record of them (pm_err_log_path, pm_log_path,
        pm_out_log_path), or, when PM2 runs no process of the app, <app_dir>/logs/{err,combined,out}.log."""
        files = []
        for stream, field, name in (("err", "pm_err_log_path", "err.log"), ("combined", "pm_log_path", "combined.log"),
                                    ("out", "pm_out_log_path", "out.log")):
            paths = sorted(set(p.get(field) for p in procs if p.get(field)))
            if not procs:
                logs = layout.logs_dir(self.app_dir)
                paths = [os.path.join(logs if os.path.isdir(logs) else layout.join(self.current, layout.LOGS_DIR), name)]
            files += [(stream, path) for path in paths]
        return files

    def mark_logs(self, procs):
        """Remember how long each log file is now: only what the app writes from here on is quoted."""
        self.marked_at, self.marked_procs, self.log_marks = time.time(), procs, {}
        for _, path in self.log_files(procs):
            try:
                self.log_marks[path] = os.path.getsize(path) if os.path.isfile(path) else None
            except OSError:
                self.log_marks[path] = 0  # not there yet: all of it will be new

    def _new_lines(self, path, limit=65536):
        """Lines ``path`` got since mark_logs (at most its last ``limit`` bytes), or None when it is
        not a readable file. A file PM2 did not name at the start counts when written since then."""
        try:
            if not os.path.isfile(path):
                return None
            size = os.path.getsize(path)
            mark = self.log_marks.get(path)
            if mark is None:
                mark = 0 if os.path.getmtime(path) >= self.marked_at - 1 else size
            if size < mark:  # truncated or rotated since
                mark = 0
            start = max(mark, size - limit)
            with open(path, "rb") as handle:
                handle.seek(start)
                text = handle.read(size - start).decode("utf-8", "replace")
        except OSError:
            return None
        lines = strip_ansi(text).splitlines()
        return lines[1:] if start > mark else lines  # the first line was cut

    def app_error(self, procs):
        """(log file name, the app's own error line or None) from what the logs got since mark_logs:
        the stderr file first, then the combined one (a worker that exits at once can leave its last
        words only there; the lines it shares with the stdout file are not errors)."""
        files = self.log_files(procs or self.marked_procs)
        stdout = [line for stream, path in files if stream == "out" for line in (self._new_lines(path) or [])]
        looked = []
        for want in ("err", "combined"):
            for stream, path in files:
                lines = self._new_lines(path) if stream == want else None
                if lines is None:
                    continue
                looked.append(os.path.basename(path))
                line = app_error_line(lines, skip=stdout if want == "combined" else ())
                if line:
                    return os.path.basename(path), redact_text(one_line(line, 240))
        return "/".join(looked) or "logs", None


class Rollout(object):
    """One run of the module, step by step: the release checked, the state read and the action
    decided, then (not in check mode) the action under the run guard, the health gate with its
    recovery, and the result. A step that cannot go on ends the module (fail_json/exit_json)."""

    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.app = Pm2App(module)
        self.result = dict(changed=False, action="none", reason="", release=None, instances=0, pids_before=[],
                           pids_after=[], restarts=0, health=dict(status=None, release=None, successes=0),
                           seconds=0.0, healthy=False, online=0, total=0, processes=[], app_error=None,
                           recovered=[], modes_fixed=[])
        self.release = None
        self.action, self.reason = "none", ""
        self.guard = None
        self.started = self.deadline = None

    def fail(self, msg):
        self.module.fail_json(msg=msg, **self.result)

    def observe(self, procs):
        """The app's state as PM2 shows it now, into the result."""
        summary = app_summary(procs, self.app.app_name)
        self.result.update(instances=summary["instances"], total=summary["instances"], online=summary["online"],
                           pids_after=summary["pids"], restarts=summary["restarts"], processes=instance_facts(procs))
        return summary

    def secure(self):
        """PM2_HOME 0700, its dump files 0600 (check mode: predicted); a tightened mode is a change."""
        try:
            fixed = secure_pm2_home(self.app.pm2_home, self.module.check_mode)
        except OSError as exc:
            self.module.warn("could not make %s private (0700, dump files 0600): %s; its dump files hold every "
                             "process's environment, secrets included" % (self.app.pm2_home, exc))
            return
        self.result["modes_fixed"] += [item for item in fixed if item not in self.result["modes_fixed"]]
        self.result["changed"] = self.result["changed"] or bool(fixed)

    def read_state(self):
        try:
            return self.app.jlist()
        except (GateFailed, subprocess.TimeoutExpired) as exc:
            self.fail("reading PM2 state: %s" % exc)

    # ---------------------------------------------------------------- before anything is done
    def check_release(self):
        """The release expected to serve is the one ``current`` points at, complete, with its
        ecosystem file. In check mode a deploy's switch of ``current`` to it (or its first
        ``current``) is predicted (and ends the module)."""
        app, p = self.app, self.p
        exists = os.path.islink(app.current) or os.path.isdir(app.current)
        real = os.path.realpath(app.current) if exists else None
        current_release = os.path.basename(real) if exists else None
        release = self.release = self.result["release"] = p["release"] or current_release
        if release and release != current_release and self.module.check_mode:
            # a deploy in check mode: app_release would have switched current to `release` by now
            procs = self.read_state()
            before = self.observe(procs)
            action, reason = decide(procs, app.current, release, p["reload"])
            self.result.update(changed=True, action=action if action != "none" else "reloaded", pids_before=before["pids"],
                               reason="current would %s %s; %s" % (
                                   "switch from %s to" % current_release if exists else "point at", release, reason))
            self.module.exit_json(**self.result)
        if not exists:
            self.fail("%s does not exist; install a release and point current at it first (app_release)" % app.current)
        if release != current_release:
            self.fail("current points at %s, not at the expected release %s; switch current first (app_release) "
                      "or pass release=%s" % (current_release, release, current_release))
        if not os.path.exists(layout.built_marker(real)):
            self.fail("release %s is incomplete (no %s in %s); install it again (app_release)" % (
                release, layout.BUILT_MARKER, real))
        if not os.path.isfile(app.ecosystem):
            self.fail("no %s in release %s; set ecosystem to the PM2 process file's name" % (p["ecosystem"], release))
        if p["health_timeout"] <= 0 or p["stable_seconds"] < 0 or p["health_successes"] < 0:
            self.fail("health_timeout must be > 0, stable_seconds and health_successes >= 0")

    def plan(self):
        """PM2's processes of the app now, and the action they call for (into the result)."""
        procs = self.read_state()
        before = self.observe(procs)
        self.action, self.reason = decide(procs, self.app.current, self.release, self.p["reload"])
        self.result.update(action=self.action, reason=self.reason, pids_before=before["pids"],
                           changed=self.action != "none" or bool(self.result["modes_fixed"]))
        releases = sorted(set(str(x.get("release")) for x in procs))
        self.result["diff"] = dict(before=dict(release=releases, cwd=before["cwd"]),
                                   after=dict(release=[self.release], cwd=[self.app.current]) if self.action != "none"
                                   else dict(release=releases, cwd=before["cwd"]))
        return procs

    def predict(self):
        """Check mode: one probe of the app as it serves now; ends the module."""
        status, seen, _ = self.app.probe(2.0)
        ok = self.app.serves(status, seen, self.release, self.app.jlist())
        self.result["health"] = dict(status=status, release=seen, successes=1 if ok else 0)
        self.result["healthy"] = self.action == "none" and ok
        self.module.exit_json(**self.result)

    # ---------------------------------------------------------------- the action
    def begin(self, procs):
        """Under the run's guard (or fail: PM2 not touched), with PM2_HOME private, the app's logs
        marked and the clock started."""
        app = self.app
        if self.action in ("reloaded", "replaced") and app.daemon_sched_policy() != "none":
            self.module.warn("the PM2 daemon uses Node's round-robin connection hand-off, with which a reload or a "
                             "handover can lose a connection now and then; start the daemon with NODE_CLUSTER_SCHED_POLICY=none (pm2_app "
                             "does when it starts the daemon; for a running one: pm2 kill, then run pm2_app, in a quiet "
                             "moment)")
        self.guard = runguard.from_env()  # inactive outside a deploy run
        try:
            self.guard.start()
        except runguard.LockLost as exc:
            self.fail("pm2_app %s %s (release %s): %s; PM2 was not touched" % (
                self.action, app.app_name, self.release, exc.args[0]))
        if not os.path.isdir(app.pm2_home):
            os.makedirs(app.pm2_home, 0o700)  # before PM2 creates it 0755
        app.mark_logs(procs)
        self.started = time.time()
        self.deadline = self.started + self.p["health_timeout"]

    def act(self, args, baseline, app=None):
        """One pm2 command that changes the app's processes (``app``: another PM2 app's view, e.g.
        the handover's second app, watched while the command runs): started only while the run
        holds the deploy lock, and finished (then journaled) even when the run is stopped meanwhile
        -- PM2's daemon would go on with a half-done reload anyway; the gate after it is what a stop
        cuts."""
        app = app or self.app
        with self.guard.hold():
            done = False
            try:
                app.run_pm2(args, self.release, self.deadline, baseline)
                done = True
            finally:
                self.guard.record("pm2", action=args[0], release=self.release, app=app.app_name, completed=done)

    def full_gate(self):
        """The gate after a change. An online instance that keeps answering with another release
        (e.g. a worker PM2 auto-restarted during a failed reload kept that reload's environment)
        gets one more reload (zero-downtime), then the gate must pass."""
        app, p = self.app, self.p
        try:
            return app.gate(self.release, self.deadline, p["health_successes"], p["stable_seconds"])
        except WrongRelease as exc:
            self.module.warn("%s; reloading once more" % exc)
            reason = self.result["reason"]
            self.result["reason"] = (reason + "; " if reason else "") + "reloaded again: " + str(exc)
            self.act(["reload", app.ecosystem, "--update-env"], app.jlist())
            return app.gate(self.release, self.deadline, p["health_successes"], p["stable_seconds"])

    def perform(self, procs):
        """The action and its health gate, with the recovery when they fail; (processes, health)."""
        app, action = self.app, self.action
        try:
            # --cwd: an ecosystem file that names its script relative to its cwd (or names no cwd)
            # runs from the `current` link itself, so every later reload runs what it points at then
            if action == "started":
                self.act(["start", app.ecosystem, "--cwd", app.current], [])
            elif action == "restarted":
                self.result["handover"] = dict(app=None, old_cwd=sorted(set(x.get("pm_cwd") or "?" for x in procs)),
                                               old_deleted=False)
                self.act(["delete", app.app_name], procs)
                self.result["handover"]["old_deleted"] = True
                self.act(["start", app.ecosystem, "--cwd", app.current], [])
            elif action == "reloaded":
                self.act(["reload", app.ecosystem, "--update-env"], procs)
            elif action == "replaced":
                return self.hand_over(procs)
            if action == "none":
                try:
                    return app.gate(self.release, self.deadline, 1, 0)
                except WrongRelease as exc:
                    # PM2 shows every worker on the release (its working directory), yet one answers
                    # with another (e.g. a worker PM2 restarted after `current` went back kept the
                    # failed reload's RELEASE_ID): one zero-downtime reload, then the full gate
                    self.action = self.result["action"] = "reloaded"
                    self.result["reason"] = "reloaded: " + str(exc)
                    self.act(["reload", app.ecosystem, "--update-env"], app.jlist())
                    return app.gate(self.release, self.deadline, self.p["health_successes"], self.p["stable_seconds"])
            return self.full_gate()
        except GateFailed as exc:
            return self.recover(exc)

    def helper(self):
        """The view of the handover's second PM2 app (``<app_name>~slipway-handover``)."""
        helper = copy.copy(self.app)
        helper.app_name = self.app.app_name + HANDOVER_SUFFIX
        return helper

    def hand_over(self, procs):
        """action=replaced, with no gap: the release started beside the running processes as a
        second PM2 app (the ecosystem's app under another name, from the `current` link; cluster
        mode shares the listening socket), gated; then the old processes deleted (each finishes its
        requests first), the app started under its own name, gated; then the second app deleted.
        When the new workers fail their gate (or the run is stopped meanwhile), they are deleted and
        the old processes were never touched. When the app under its own name then fails its gate,
        the second app is left serving the release (the next passed gate deletes it). Taking over
        processes that run from elsewhere, the first gate counts only answers that name the worker's
        pid (the old workers answer too, and may even be on the same release). Returns (processes,
        health) of the app under its own name."""
        app, p = self.app, self.p
        helper = self.helper()
        takeover = any(not under(x.get("pm_cwd"), app.app_dir) for x in procs)
        self.result["handover"] = dict(app=helper.app_name, old_cwd=sorted(set(x.get("pm_cwd") or "?" for x in procs)),
                                       old_deleted=False)
        if not os.path.isdir(layout.state_dir(app.app_dir)):
            os.makedirs(layout.state_dir(app.app_dir), 0o700)
        config = layout.join(layout.state_dir(app.app_dir), HANDOVER_CONFIG)
        with open(config, "w") as handle:  # no secret in it: it loads the release's own ecosystem file
            handle.write(HANDOVER_JS % (json.dumps(app.ecosystem), json.dumps(app.app_name), json.dumps(helper.app_name)))
        try:
            self.drop(helper)  # left by an interrupted handover
            self.act(["start", config, "--cwd", app.current], [], app=helper)
            # the old workers answer too (another release, or the same one from elsewhere): one
            # answer of the release from each new worker is what counts here
            helper.gate(self.release, self.deadline, 1, p["stable_seconds"], attributed=takeover)
        except BaseException as exc:  # a failed gate, or the run stopped: the old processes serve on
            failed = isinstance(exc, GateFailed)
            error = (None, None)
            if failed:
                try:
                    error = helper.app_error(helper.jlist())
                except (GateFailed, subprocess.TimeoutExpired):
                    pass
            self.drop(helper, stopping=not failed)
            if failed:
                raise GateFailed("%s%s; the new workers were deleted, the old processes serve as before" % (
                    exc, "; app error (%s): %s" % error if error[1] else ""))
            raise
        finally:
            try:
                os.unlink(config)
            except OSError:
                pass
        self.act(["delete", app.app_name], procs)
        self.result["handover"]["old_deleted"] = True
        self.act(["start", app.ecosystem, "--cwd", app.current], [])
        gated = self.full_gate()
        self.drop(helper)
        return gated

    def drop(self, helper=None, stopping=False):
        """Delete the handover's second app if PM2 runs it (its workers finish their requests
        first). ``stopping``: the run is being stopped, so not through act (which needs the run
        to go on); journaled all the same."""
        helper = helper or self.helper()
        try:
            left = helper.jlist()
        except (GateFailed, subprocess.TimeoutExpired):
            return
        if not left:
            return
        if not stopping:
            self.act(["delete", helper.app_name], left, app=helper)
            return
        with self.guard.deferred():
            done = False
            try:
                proc = subprocess.run([helper.bin(), "delete", helper.app_name], cwd=helper.app_dir,
                                      env=dict(os.environ, PM2_HOME=helper.pm2_home), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
                done = proc.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                self.guard.record("pm2", action="delete", release=self.release, app=helper.app_name, completed=done)

    def recover(self, exc):
        """After ``exc`` (a rollback after a release that crashed at start): instances that are down
        and still carry another release serve nothing, so restarting them on the release loses
        nothing; then the gate again. Raises ``exc`` when there is nothing to recover (or no time)."""
        app, release = self.app, self.release
        now_procs = app.jlist()
        down = [x["pm_id"] for x in now_procs if x.get("status") != "online" and x.get("release") != release]
        if not down or self.p["reload"] == "never" or self.deadline - time.time() < self.p["stable_seconds"] + 5:
            raise exc
        ids = ", ".join(str(i) for i in down)
        self.module.warn("%s; restarting instance(s) %s (down, on another release) on release %s" % (
            one_line(exc, 300), ids, release))
        self.result["recovered"] = down
        try:
            self.act(["restart"] + [str(i) for i in down] + ["--update-env"], now_procs)
            return self.full_gate()
        except GateFailed as again:
            raise GateFailed("%s; then restarted instance(s) %s (down, on another release) on release %s: %s" % (
                one_line(exc, 500), ids, release, one_line(again, 500)))

    # ---------------------------------------------------------------- the end
    def failed(self, exc):
        """The result of a failed action or gate: the host's actual state and the app's own error
        line; ends the module."""
        app = self.app
        self.guard.finish()
        self.result["seconds"] = round(time.time() - self.started, 2)
        now_procs, state = [], "PM2 state unreadable"
        try:
            now_procs = app.jlist()
            self.observe(now_procs)
            state = "now " + app._describe(now_procs)
        except (GateFailed, subprocess.TimeoutExpired):
            pass
        source, line = app.app_error(now_procs)
        self.result["app_error"] = line
        said = ("app error (%s): %s" % (source, line) if line else
                "%s: no error line from the app since the action started" % source)
        self.secure()
        self.fail("pm2_app %s %s (release %s, %s) failed after %.1fs: %s; %s; %s" % (
            self.action, app.app_name, self.release, self.reason, self.result["seconds"], one_line(exc, 1000),
            state, said))

    def succeeded(self, gated, health):
        """The result of a passed gate; after a change, PM2's process list saved. Ends the module."""
        self.observe(gated)
        self.result.update(seconds=round(time.time() - self.started, 2), health=health, healthy=True)
        if self.action != "replaced" and self.helper().jlist():
            # a handover's second app that a failed or interrupted run left: the app serves healthy
            # without it now
            self.drop()
            self.result["changed"] = True
            self.result["reason"] += "; deleted the second app %s a handover had left" % self.helper().app_name
            if self.p["save"]:
                self.save()
        if self.action != "none" or self.result["recovered"]:
            self.result["changed"] = True
            if self.p["save"]:
                self.save()
        self.guard.finish()
        self.module.exit_json(**self.result)

    def remove(self):
        """state=absent: the app's processes deleted from PM2 and the saved process list updated,
        only while the run holds the deploy lock (journaled). Ends the module."""
        app = self.app
        current = os.path.realpath(app.current) if os.path.lexists(app.current) else ""
        self.release = self.result["release"] = os.path.basename(current) or None
        procs = self.read_state()
        before = self.observe(procs)
        # only what runs from the app dir: an app started by hand elsewhere (a takeover that failed
        # before its handover) serves on
        ours = [str(x["pm_id"]) for x in procs if under(x.get("pm_cwd"), app.app_dir)]
        kept = sorted(set(x.get("pm_cwd") or "?" for x in procs if str(x["pm_id"]) not in ours))
        self.result.update(action="deleted" if ours else "none", pids_before=before["pids"],
                           reason="state=absent" + ("; left running: processes from %s" % ", ".join(kept) if kept else ""),
                           changed=bool(ours))
        if not ours or self.module.check_mode:
            self.module.exit_json(**self.result)
        self.guard = runguard.from_env()
        try:
            self.guard.start()
        except runguard.LockLost as exc:
            self.fail("pm2_app delete %s: %s; PM2 was not touched" % (app.app_name, exc.args[0]))
        self.deadline = time.time() + 120
        self.drop()  # a handover's second app serves the same release
        done = False
        try:
            with self.guard.hold():
                try:
                    proc = subprocess.run([app.bin(), "delete"] + ours, cwd=app.app_dir,
                                          env=dict(os.environ, PM2_HOME=app.pm2_home), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
                    done = proc.returncode == 0
                finally:
                    self.guard.record("pm2", action="delete", release=self.release, app=app.app_name, completed=done)
        except (runguard.RunStopped, runguard.LockLost, subprocess.TimeoutExpired) as exc:
            self.fail("pm2_app delete %s: %s" % (app.app_name, one_line(exc, 300)))
        if not done:
            self.fail("pm2 delete %s failed (rc=%d): %s" % (app.app_name, proc.returncode,
                                                             redact_text(one_line(proc.stdout, pick="last", default="no output"))))
        self.observe(self.read_state())
        if self.p["save"]:
            self.save()
        self.guard.finish()
        self.module.exit_json(**self.result)

    def save(self):
        app = self.app
        try:
            with self.guard.deferred():  # the app is healthy: a stop now lets the save finish, then ends the module
                proc = subprocess.run([app.bin(), "save"], cwd=app.app_dir, env=dict(os.environ, PM2_HOME=app.pm2_home),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                      timeout=60, preexec_fn=_private_umask)
        except runguard.RunStopped:
            self.module.warn("the deploy run was stopped after the app became healthy on %s; PM2's process list was "
                             "saved" % self.release)
        if proc.returncode != 0:
            said = one_line(proc.stdout, pick="last", default="no output")
            self.module.warn("pm2 save failed (rc=%d): %s" % (proc.returncode, redact_text(said)))
        self.secure()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_dir=dict(type="path", required=True),
            app_name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            pm2_home=dict(type="path"),
            pm2_bin=dict(type="str", default="pm2"),
            ecosystem=dict(type="str", default="ecosystem.config.js"),
            release=dict(type="str"),
            reload=dict(type="str", default="auto", choices=["auto", "always", "never", "replace"]),
            env=dict(type="dict", default={}, no_log=True),
            health_url=dict(type="str", required=True),
            health_status=dict(type="int", default=200),
            health_timeout=dict(type="float", default=60.0),
            stable_seconds=dict(type="float", default=3.0),
            health_successes=dict(type="int", default=0),
            save=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    run = Rollout(module)
    run.secure()
    if module.params["state"] == "absent":
        run.remove()
    run.check_release()
    procs = run.plan()
    if module.check_mode:
        run.predict()
    run.begin(procs)
    try:
        gated, health = run.perform(procs)
    except (GateFailed, subprocess.TimeoutExpired, runguard.RunStopped, runguard.LockLost) as exc:
        run.failed(exc)
    run.succeeded(gated, health)


if __name__ == "__main__":
    main()
