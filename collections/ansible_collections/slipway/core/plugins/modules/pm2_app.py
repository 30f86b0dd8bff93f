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
    module moves them to the C(current) path with C(pm2 delete) + C(pm2 start) (I(action=restarted)).
  - Health gate after any action, within I(health_timeout) seconds counted from the action's start
    (C(pm2 jlist) shows every instance online, restart counts and pids unchanged for
    I(stable_seconds), and I(health_url) answers I(health_successes) consecutive 200 responses whose
    C(release) is the expected release). When nothing is done, a quicker gate (all online, one 200 of
    the expected release). A worker that crash-loops while the pm2 command runs ends the command early
    (the other workers of a reload keep serving the previous release).
  - Never returns environment values; the err.log lines and health bodies it quotes are redacted.
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
      only starts an absent app (the health gate still expects I(release)).
    type: str
    choices: [auto, always, never]
    default: auto
  env:
    description: Extra environment for the pm2 commands (with C(--update-env) it reaches the app).
    type: dict
    default: {}
  health_url:
    description: URL answering 200 with a JSON body holding C(release).
    type: str
    required: true
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
  choices: [none, started, reloaded, restarted]
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
"""

import json
import os
import re
import signal
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.six.moves.urllib.error import HTTPError
from ansible.module_utils.six.moves.urllib.request import ProxyHandler, Request, build_opener
from ansible_collections.slipway.core.plugins.module_utils.pm2 import (
    app_processes,
    app_summary,
    daemon_pid,
    reload_lock_path,
    summarize_jlist,
)
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_IN_PROGRESS = "already in progress"


class GateFailed(Exception):
    """The action or the health gate did not reach a healthy app in time (message: one line)."""


class WrongRelease(GateFailed):
    """A stable, online instance answers with another release than expected."""


def _one_line(text, limit=300):
    text = " ".join(_ANSI.sub("", str(text or "")).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(text):
    lines = [line.strip() for line in _ANSI.sub("", text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class Pm2App(object):
    def __init__(self, module):
        self.module = module
        p = module.params
        self.app_name = p["app_name"]
        self.app_dir = os.path.normpath(p["app_dir"])
        self.current = os.path.join(self.app_dir, "current")
        self.ecosystem = os.path.join(self.current, p["ecosystem"])
        self.pm2_home = p["pm2_home"] or os.path.join(os.path.expanduser("~"), ".pm2")
        self.health_url = p["health_url"]
        self.pm2_bin = None
        self.opener = build_opener(ProxyHandler({}))  # loopback/internal URLs: never via a proxy

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

    def jlist(self):
        """This app's processes (safe summaries); [] when no daemon runs (none is started)."""
        if daemon_pid(self.pm2_home) is None:
            return []
        proc = subprocess.run([self.bin(), "jlist"], cwd=self.app_dir, env=dict(os.environ, PM2_HOME=self.pm2_home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        if proc.returncode != 0:
            raise GateFailed("pm2 jlist failed (rc=%d): %s" % (proc.returncode, redact_text(_last_line(proc.stderr))))
        try:
            return app_processes(summarize_jlist(proc.stdout), self.app_name)
        except ValueError as exc:
            raise GateFailed(str(exc))

    def run_pm2(self, args, release, deadline, baseline):
        """Run one pm2 command (a reload is retried while PM2 reports one in progress), watching the
        app: a crash loop or the deadline ends the command (and clears the reload lock it held)."""
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
            raise GateFailed("pm2 %s failed (rc=%d): %s" % (args[0], proc.returncode, redact_text(_last_line(out))))

    def _watch(self, proc, deadline, baseline):
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
                if "errored" in summary["statuses"]:
                    return "stopped early: an instance is errored (it exits at start); %s" % self._describe(summary)
                if summary["restarts"] > baseline + max(summary["instances"], 1) + 2:
                    return "stopped early: instances crash-loop; %s" % self._describe(summary)
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
            resp = self.opener.open(Request(self.health_url, method="GET"), timeout=timeout)
            status, raw = resp.getcode(), resp.read(4096)
            resp.close()
        except HTTPError as exc:
            status, raw = exc.code, exc.read(4096)
        except Exception as exc:  # connection refused/reset, timeout: the app is not serving
            reason = getattr(exc, "reason", exc)
            return None, None, redact_text(_one_line("%s: %s" % (type(exc).__name__, reason), 160))
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        release = body.get("release") if isinstance(body, dict) else None
        self.last_pid = body.get("pid") if isinstance(body, dict) else None
        return status, release, redact_text(_one_line("HTTP %s %s" % (status, text), 200))

    def _describe(self, summary):
        return "instances %d/%d online (%s), restarts %d" % (
            summary["online"], summary["instances"], ",".join(summary["statuses"]) or "none", summary["restarts"])

    def gate(self, release, deadline, needed, stable_seconds):
        """Wait until the app is healthy: every instance online with unchanged restart counts for
        ``stable_seconds``, ``needed`` consecutive 200s reporting ``release``, and every PM2 pid
        seen answering with it (the kernel spreads connections unevenly, so consecutive successes
        alone could all come from one worker). Returns (summary, health); raises WrongRelease when
        a stable, online instance keeps answering with another release, GateFailed on timeout."""
        stable_since, signature, summary = None, None, app_summary([], self.app_name)
        successes, status, seen_release, detail = 0, None, None, "no probe yet"
        good, wrong = set(), {}
        next_look = 0.0
        while True:
            now = time.time()
            if now >= next_look:
                next_look = now + 0.5
                summary = app_summary(self.jlist(), self.app_name)
                healthy = summary["instances"] > 0 and summary["online"] == summary["instances"]
                sig = (tuple(summary["pids"]), summary["restarts"])
                if not healthy:
                    stable_since, signature = None, None
                elif sig != signature:
                    stable_since, signature = now, sig
            status, seen_release, detail = self.probe(min(2.0, max(0.2, deadline - now)))
            pid = self.last_pid
            if status == 200 and seen_release == release:
                successes += 1
                good.add(pid)
                wrong.pop(pid, None)
            else:
                successes = 0
                if status == 200 and pid is not None:
                    good.discard(pid)
                    wrong[pid] = seen_release
            now = time.time()
            need = needed or 2 * max(summary["instances"], 1)
            stable = stable_since is not None and now - stable_since >= stable_seconds
            pids = set(summary["pids"])
            if stable and successes >= need and (pids <= good or None in good):  # None: the app does not report its pid
                return summary, dict(status=status, release=seen_release, successes=successes)
            stale = {p: r for p, r in wrong.items() if p in pids}
            if stable and stale:
                raise WrongRelease("instance pid %s still answers with release %s, not %s" % (
                    ", ".join(str(p) for p in sorted(stale)), ", ".join(sorted(set(map(str, stale.values())))), release))
            if now >= deadline:
                missing = sorted(pids - good)
                raise GateFailed("health gate: %s; health %s (%d/%d consecutive 200s of release %s%s)" % (
                    self._describe(summary), detail, successes, need, release,
                    "; never heard from pid %s" % ", ".join(map(str, missing)) if missing else ""))
            time.sleep(0.1)

    def err_tail(self, since, lines=5):
        """The last lines of the app's err.log, redacted, as one line. A worker that exits at once can
        leave its last words only in combined.log (PM2 writes that stream first): when err.log got
        nothing since ``since``, combined.log is quoted instead, and named."""
        logs = os.path.join(self.app_dir, "logs")
        if not os.path.isdir(logs):
            logs = os.path.join(self.current, "logs")
        chosen = None
        for name in ("err.log", "combined.log"):
            path = os.path.join(logs, name)
            try:
                fresh = os.path.getsize(path) > 0 and os.path.getmtime(path) >= since - 1
            except OSError:
                continue
            if chosen is None or fresh:
                chosen = (name, path)
            if fresh:
                break
        if chosen is None:
            return "err.log: not readable"
        try:
            with open(chosen[1], "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 16384))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return "%s: not readable" % chosen[0]
        tail = [_one_line(line, 200) for line in text.splitlines() if line.strip()][-lines:]
        return "%s: %s" % (chosen[0], redact_text(" | ".join(tail)) if tail else "empty")


def decide(procs, current, release, reload_mode):
    """(action, reason) for the processes PM2 runs now."""
    if not procs:
        return "started", "the app is not running under PM2"
    elsewhere = sorted(set(p.get("pm_cwd") or "?" for p in procs
                           if p.get("pm_cwd") != current or not str(p.get("pm_exec_path") or "").startswith(current + "/")))
    if elsewhere and reload_mode != "never":
        return "restarted", ("processes were started from %s, not from %s, so a reload would keep running that "
                             "code; deleted and started again from the current link" % (", ".join(elsewhere), current))
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


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_dir=dict(type="path", required=True),
            app_name=dict(type="str", required=True),
            pm2_home=dict(type="path"),
            pm2_bin=dict(type="str", default="pm2"),
            ecosystem=dict(type="str", default="ecosystem.config.js"),
            release=dict(type="str"),
            reload=dict(type="str", default="auto", choices=["auto", "always", "never"]),
            env=dict(type="dict", default={}, no_log=True),
            health_url=dict(type="str", required=True),
            health_timeout=dict(type="float", default=60.0),
            stable_seconds=dict(type="float", default=3.0),
            health_successes=dict(type="int", default=0),
            save=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    app = Pm2App(module)
    p = module.params
    result = dict(changed=False, action="none", reason="", release=None, instances=0, pids_before=[], pids_after=[],
                  restarts=0, health=dict(status=None, release=None, successes=0), seconds=0.0)

    if not os.path.islink(app.current) and not os.path.isdir(app.current):
        module.fail_json(msg="%s does not exist; install a release and point current at it first (app_release)" % app.current, **result)
    real = os.path.realpath(app.current)
    current_release = os.path.basename(real)
    release = p["release"] or current_release
    result["release"] = release
    if release != current_release and module.check_mode:
        # a deploy in check mode: app_release would have switched current to `release` by now
        try:
            before = app_summary(app.jlist(), app.app_name)
        except (GateFailed, subprocess.TimeoutExpired) as exc:
            module.fail_json(msg="reading PM2 state: %s" % exc, **result)
        result.update(changed=True, action="reloaded" if before["instances"] else "started",
                      reason="current would switch from %s to %s" % (current_release, release),
                      instances=before["instances"], pids_before=before["pids"], pids_after=before["pids"],
                      restarts=before["restarts"])
        module.exit_json(**result)
    if release != current_release:
        module.fail_json(msg="current points at %s, not at the expected release %s; switch current first (app_release) "
                             "or pass release=%s" % (current_release, release, current_release), **result)
    if not os.path.exists(os.path.join(real, ".slipway-built")):
        module.fail_json(msg="release %s is incomplete (no .slipway-built in %s); install it again (app_release)" % (release, real), **result)
    if not os.path.isfile(app.ecosystem):
        module.fail_json(msg="no %s in release %s; set ecosystem to the PM2 process file's name" % (p["ecosystem"], release), **result)
    if p["health_timeout"] <= 0 or p["stable_seconds"] < 0 or p["health_successes"] < 0:
        module.fail_json(msg="health_timeout must be > 0, stable_seconds and health_successes >= 0", **result)

    try:
        procs = app.jlist()
    except (GateFailed, subprocess.TimeoutExpired) as exc:
        module.fail_json(msg="reading PM2 state: %s" % exc, **result)
    before = app_summary(procs, app.app_name)
    action, reason = decide(procs, app.current, release, p["reload"])
    result.update(action=action, reason=reason, instances=before["instances"], pids_before=before["pids"],
                  pids_after=before["pids"], restarts=before["restarts"], changed=action != "none")
    result["diff"] = dict(before=dict(release=sorted(set(str(x.get("release")) for x in procs)), cwd=before["cwd"]),
                          after=dict(release=[release], cwd=[app.current]) if action != "none" else
                          dict(release=sorted(set(str(x.get("release")) for x in procs)), cwd=before["cwd"]))

    if module.check_mode:
        status, seen, _ = app.probe(2.0)
        result["health"] = dict(status=status, release=seen, successes=1 if status == 200 and seen == release else 0)
        module.exit_json(**result)

    if action == "reloaded" and app.daemon_sched_policy() != "none":
        module.warn("the PM2 daemon uses Node's round-robin connection hand-off, with which a reload can lose a "
                    "connection now and then; start the daemon with NODE_CLUSTER_SCHED_POLICY=none (pm2_app does "
                    "when it starts the daemon; for a running one: pm2 kill, then run pm2_app, in a quiet moment)")
    started = time.time()
    deadline = started + p["health_timeout"]
    try:
        if action == "started":
            app.run_pm2(["start", app.ecosystem], release, deadline, 0)
        elif action == "restarted":
            app.run_pm2(["delete", app.app_name], release, deadline, before["restarts"])
            app.run_pm2(["start", app.ecosystem], release, deadline, 0)
        elif action == "reloaded":
            app.run_pm2(["reload", app.ecosystem, "--update-env"], release, deadline, before["restarts"])
        if action == "none":
            summary, health = app.gate(release, deadline, 1, 0)
        else:
            try:
                summary, health = app.gate(release, deadline, p["health_successes"], p["stable_seconds"])
            except WrongRelease as exc:
                # e.g. a worker PM2 auto-restarted during a failed reload kept that reload's
                # environment: reload once more (zero-downtime), then the gate must pass
                module.warn("%s; reloading once more" % exc)
                result["reason"] = (reason + "; " if reason else "") + "reloaded again: " + str(exc)
                app.run_pm2(["reload", app.ecosystem, "--update-env"], release, deadline, app_summary(
                    app.jlist(), app.app_name)["restarts"])
                summary, health = app.gate(release, deadline, p["health_successes"], p["stable_seconds"])
    except (GateFailed, subprocess.TimeoutExpired) as exc:
        result["seconds"] = round(time.time() - started, 2)
        try:
            after = app_summary(app.jlist(), app.app_name)
            result.update(instances=after["instances"], pids_after=after["pids"], restarts=after["restarts"])
        except (GateFailed, subprocess.TimeoutExpired):
            pass
        module.fail_json(msg="pm2_app %s %s (release %s, %s) failed after %.1fs: %s; %s" % (
            action, app.app_name, release, reason, result["seconds"], _one_line(exc, 600), app.err_tail(started)), **result)

    result.update(seconds=round(time.time() - started, 2), instances=summary["instances"], pids_after=summary["pids"],
                  restarts=summary["restarts"], health=health)
    if action != "none" and p["save"]:
        proc = subprocess.run([app.bin(), "save"], cwd=app.app_dir, env=dict(os.environ, PM2_HOME=app.pm2_home),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
        if proc.returncode != 0:
            module.warn("pm2 save failed (rc=%d): %s" % (proc.returncode, redact_text(_last_line(proc.stdout))))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
