#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: app_preflight
short_description: Read everything a deploy checks on one host before it changes anything, in one call
version_added: "0.7.0"
description:
  - The host side of a deploy's preflight (roles/preflight), in one module call instead of one per
    check. Reads the Python it runs on and whether slipway's module runtime for it is installed, the
    deploy lock (held, and by which run), which of I(tools) are missing from the PATH, Node.js's
    version, whether I(release) is installed and which release C(current) points at, what PM2 runs
    of the app, the deploy records (the release a failed deploy may return to), and whether the
    app's C(shared/.env) would change.
  - With I(plan), the runtime installed, the lock held by I(run_id) (unless not I(require_lock)) and
    no tool missing, it also plans the release's migrations as C(slipway.core.pg_migrations) does in check mode (the rehearsal is
    rolled back) and, when the plan applies anything, estimates the space a backup needs.
    Otherwise the plan is left to that module (C(plan_run) false, with the reason).
  - Nothing is refused here - what is wrong is returned, and the preflight role asserts each
    concern in its order, with its own message. Only slipway's own state directory is written
    (created 0700 when missing); in check mode too.
  - C(noop) tells a deploy that can change nothing on this host - the release installed and
    current, PM2 running it online on every instance from the C(current) link and started with its
    RELEASE_ID, no handover app left, C(shared/.env) unchanged, no takeover, nothing to migrate and
    PM2_HOME private - so the deploy only proves the host (lock, plan, health, smoke) and skips the
    steps that cannot change anything. It is decided here, when preflight runs; a later batch acts
    on it as read then.
extends_documentation_fragment:
  - slipway.core.postgres
  - slipway.core.migrations.plan
options:
  app_dir:
    description: The app directory (releases, current, shared/.env, .slipway).
    type: path
    required: true
  runtimes:
    description:
      - 'The module runtimes built on the controller, C({"X.Y": runtime id}) (or C({"X.Y": {"id": runtime id, ...}}));
        the one of the Python this module runs on is looked for under C(.slipway/runtime/).'
    type: dict
    default: {}
  run_id:
    description: The deploy run that holds the host's deploy lock (C(lock.ours) tells whether it does).
    type: str
    default: ""
  require_lock:
    description: Plan only when the lock is held by I(run_id) (a deploy); false - the lock is only read.
    type: bool
    default: true
  tools:
    description: Commands that must be on the PATH (the later phases run them).
    type: list
    elements: str
    default: []
  node:
    description: Read C(node --version).
    type: bool
    default: false
  release:
    description: The release being deployed.
    type: str
  app_name:
    description: The PM2 app name; unset - PM2 is not read.
    type: str
  pm2_home:
    description: PM2_HOME; defaults to C(~/.pm2) of the remote user.
    type: path
  pm2_bin:
    description: The pm2 executable.
    type: str
    default: pm2
  env_content:
    description: The text C(shared/.env) gets from the inventory's C(slipway_app_env) (as C(app_release)'s
      I(env_content); the filter C(slipway.core.env_file_text)); unset - the file is the app's own and never
      changes in a deploy.
    type: str
  plan:
    description: Plan the migrations in I(migrations_content) when the runtime is installed and the lock is
      this run's.
    type: bool
    default: false
  migrations_content:
    description: The release's migrations folder as data (see C(slipway.core.pg_migrations)).
    type: dict
  backup_dir:
    description: Where the deploy's backup goes; its free space is compared with the database's size when
      the plan applies anything.
    type: path
requirements:
  - psycopg >= 3.1 and pglast >= 6 for the plan (from slipway's module runtime, found by this module)
author:
  - slipway developers
notes:
  - Supports check mode (it changes nothing but slipway's state directory in either mode).
"""

EXAMPLES = r"""
- name: Read the host before a deploy
  slipway.core.app_preflight:
    app_dir: /srv/reader
    runtimes: {"3.11": "py311-abc123"}
    run_id: "{{ slipway_deploy_run_id }}"
    tools: [node, npm, pm2, pg_dump, pg_restore, psql]
    release: r81e56f6adb23
    app_name: reader
    plan: true
    migrations_content: "{{ slipway_migrations }}"
    backup_dir: /srv/reader/backups
  module_defaults:
    group/slipway.core.postgres: "{{ slipway_postgres_login }}"
  register: host
"""

RETURN = r"""
runtime:
  description: C(python) (X.Y), C(executable), C(id) (null - none built for this Python), C(path), C(installed).
  returned: always
  type: dict
lock:
  description: C(held), C(meta) (the holder's run id, command, start), C(ours) (held, by I(run_id)).
  returned: always
  type: dict
tools_missing:
  description: I(tools) not found on the PATH.
  returned: always
  type: list
  elements: str
node_version:
  description: C(node --version), when I(node).
  returned: always
  type: str
release:
  description: C(installed) (I(release) is complete on the host), C(current) (the release C(current) points at).
  returned: always
  type: dict
pm2:
  description: C(error) (null, or why PM2 could not be read), C(processes) (the app's instances), C(outside)
    (directories the app runs from outside I(app_dir)), C(action) and C(reason) (what a deploy of I(release) would
    do in PM2), C(modes_to_fix) (PM2_HOME files to make private), C(handover_left) (instances of a takeover's
    handover app still running), C(env_releases) (the RELEASE_IDs the instances were started with).
  returned: always
  type: dict
rescue_release:
  description: The release a failed deploy returns to - the one C(current) points at when PM2 runs it online and the
    deploy records do not know it only from failed deploys; else the newest one recorded as deployed well; else null.
  returned: always
  type: str
env:
  description: C(changed), C(removed) (keys), C(error) (a bad key).
  returned: always
  type: dict
plan_run:
  description: Whether the migrations were planned here; C(plan_reason) says why not.
  returned: always
  type: bool
plan:
  description: When planned - C(applied), C(summary), C(blockers), C(error) (one line), C(plan) (the document).
  returned: always
  type: dict
space:
  description: When the plan applies anything - C(db_size), C(free_bytes), C(enough).
  returned: always
  type: dict
noop:
  description: A deploy of I(release) can change nothing here (see the description); C(noop_why) lists what stands
    in its way.
  returned: always
  type: bool
"""

import os
import shutil
import subprocess

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils import hoststate, layout, runguard
from ansible_collections.slipway.core.plugins.module_utils import postgres as pg
from ansible_collections.slipway.core.plugins.module_utils import runtime as modruntime
from ansible_collections.slipway.core.plugins.module_utils.appdir import current_release, env_keys, installed
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, folder_from_content
from ansible_collections.slipway.core.plugins.module_utils.oneline import one_line
from ansible_collections.slipway.core.plugins.module_utils.pm2 import (
    HANDOVER_SUFFIX,
    app_processes,
    daemon_pid,
    decide,
    default_home,
    instance_facts,
    outside,
    secure_pm2_home,
    summarize_jlist,
)
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_mapping, redact_text


def state_dirs(app_dir):
    """slipway's state directory and its runtime directory, 0700 (its own bookkeeping)."""
    for path in (layout.state_dir(app_dir), layout.join(layout.state_dir(app_dir), layout.RUNTIME_DIR)):
        if not os.path.isdir(path):
            os.makedirs(path, 0o700)


def read_lock(app_dir, run_id):
    info = hoststate.lock(app_dir)
    owner = (info.get("meta") or {}).get("run_id")
    info["ours"] = bool(run_id) and bool(info["held"]) and owner == run_id
    return info


def which(tools):
    return [t for t in tools if not shutil.which(t)]


def start(argv, env=None):
    """``argv`` started now and read later (the plan runs meanwhile): (process, None) or (None, why)."""
    try:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                universal_newlines=True), None
    except OSError as exc:
        return None, "%s: %s" % (argv[0], exc.strerror or exc)


def finish(proc, timeout=60):
    """(returncode, stdout, stderr) of a process ``start`` began; a hung one is killed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -9, out, "timed out after %ds" % timeout
    return proc.returncode, out, err


class Pm2Read(object):
    """PM2's processes of the app (none when no daemon runs: none is started), what a deploy of
    ``release`` would do with them, and the PM2_HOME files a deploy would make private. ``pm2
    jlist`` (a Node.js start, ~0.3 s) runs while the module plans the migrations."""

    def __init__(self, app_dir, app_name, release, pm2_home, pm2_bin):
        self.app_dir, self.app_name, self.release, self.pm2_home = app_dir, app_name, release, pm2_home
        self.out = {"error": None, "daemon_running": False, "processes": [], "outside": [], "action": None,
                    "reason": None, "modes_to_fix": [], "handover_left": 0, "env_releases": []}
        self.procs = []
        self.proc = None
        if not app_name:
            return
        try:
            self.out["modes_to_fix"] = secure_pm2_home(pm2_home, check_mode=True)
        except OSError as exc:
            self.out["modes_to_fix"] = ["%s (%s)" % (pm2_home, exc.strerror or exc)]
        if daemon_pid(pm2_home) is None:
            return
        binary = shutil.which(pm2_bin)
        if not binary:
            self.out["error"] = "%s not found on the PATH" % pm2_bin
            return
        self.proc, self.out["error"] = start([binary, "jlist"], env=dict(os.environ, PM2_HOME=pm2_home))

    def result(self):
        out = self.out
        if self.proc is not None:
            rc, stdout, stderr = finish(self.proc)
            if rc != 0:
                out["error"] = "pm2 jlist failed (rc=%d): %s" % (rc, redact_text(stderr.strip())[-500:])
            else:
                try:
                    self.procs = summarize_jlist(stdout)
                    out["daemon_running"] = True
                except ValueError as exc:
                    out["error"] = str(exc)
        if self.app_name and out["error"] is None:
            mine = app_processes(self.procs, self.app_name)
            out["processes"] = instance_facts(mine)
            out["outside"] = outside(self.procs, self.app_name, self.app_dir)
            out["handover_left"] = len(app_processes(self.procs, self.app_name + HANDOVER_SUFFIX))
            out["env_releases"] = sorted(set(str(x["env_release"]) for x in mine if x.get("env_release")))
            if self.release:
                out["action"], out["reason"] = decide(mine, layout.current_link(self.app_dir), self.release, "auto")
        return out, self.procs


def rescue_release(current, procs, app_name, records):
    """The release a failed deploy may return to (see RETURN)."""
    good = [r.get("release") for r in records if r.get("result") == "ok"]
    known_bad = [r.get("release") for r in records if r.get("release") not in good]
    online = any(p.get("name") == app_name and p.get("status") == "online" and p.get("release") == current
                 for p in procs)
    if current and online and current not in known_bad:
        return current
    return good[-1] if good else None


def env_state(app_dir, text):
    """Whether ``shared/.env`` would change to ``text`` (None: it is the app's own), and the keys it
    would lose."""
    out = {"changed": False, "removed": [], "error": None}
    if text is None:
        return out
    try:
        with open(layout.join(layout.shared_dir(app_dir), layout.ENV_FILE)) as handle:
            before = handle.read()
    except (IOError, OSError):
        out["changed"] = True
        return out
    out["changed"] = before != text
    out["removed"] = sorted(env_keys(before) - env_keys(text))
    return out


def plan_migrations(p, secrets, guard):
    """The migration plan as pg_migrations makes it in check mode, and the backup space when it
    applies anything: (plan dict, space dict or None). Never raises: a problem is the plan's error."""
    from ansible_collections.slipway.core.plugins.module_utils import migrate as engine  # after the runtime's activation

    missing = [name for ok, name in ((engine.HAS_PSYCOPG, "psycopg"), (engine.HAS_PGLAST, "pglast")) if not ok]
    if missing:
        return {"error": "%s not importable from slipway's module runtime; deploy again (the runtime is "
                         "reinstalled when incomplete)" % " and ".join(missing)}, None
    from ansible_collections.slipway.core.plugins.module_utils import backup as bk

    conn, space = None, None
    try:
        guard.start()
        with folder_from_content(p["migrations_content"] or {}) as folder:
            conn = engine.connect(None, connect_timeout=p["connect_timeout"], **pg.connect_params(p, None))
            eng = engine.Engine(
                conn, folder, include_skipped=p["include_skipped"], allow_tampered=p["allow_tampered"],
                allow_unknown=p["allow_unknown"], lock_timeout=p["lock_timeout"], mode=p["mode"],
                min_rows=p["online_min_rows"], online_lock_timeout=p["online_lock_timeout"], fence=None)
            plan = eng.check(rehearse=p["rehearse"])
        applied = list(plan["to_apply"])
        if applied and p["backup_dir"]:
            conn.rollback()
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            conn.rollback()
            free = bk.free_bytes(p["backup_dir"])
            space = {"db_size": size, "free_bytes": free, "enough": free >= size + bk.MARGIN}
        return {"applied": applied, "summary": plan["summary"], "blockers": list(plan["blockers"]), "error": None,
                "plan": redact_mapping(plan, known=secrets)}, space
    except (runguard.RunStopped, runguard.LockLost) as exc:
        return {"error": "%s; nothing was planned" % (exc.args[0] if exc.args else "stopped")}, None
    except MigrationError as exc:
        return {"error": one_line(redact_text(str(exc), known=secrets)),
                "plan": redact_mapping(exc.plan or {}, known=secrets)}, None
    except Exception as exc:  # noqa: BLE001 - a module reports, it does not crash with secrets in a trace
        return {"error": one_line(redact_text("%s: %s" % (type(exc).__name__, exc), known=secrets))}, None
    finally:
        guard.finish()
        if conn is not None:
            conn.close()


def noop_why(rid, release, pm2, env, takeover, plan):
    """What stands between this host and a deploy of ``rid`` that changes nothing (empty: none)."""
    why = []
    if not release["installed"]:
        why.append("release %s is not installed" % rid)
    if release["current"] != rid:
        why.append("current points at %s" % (release["current"] or "nothing"))
    if pm2["error"] or pm2["action"] != "none":
        why.append("PM2: %s" % (pm2["error"] or pm2["reason"]))
    if pm2["modes_to_fix"]:
        why.append("PM2_HOME is not private")
    if pm2.get("handover_left"):
        why.append("PM2 still runs the handover app of an interrupted takeover")
    wrong = [r for r in pm2.get("env_releases") or [] if r != rid]
    if wrong:
        why.append("an instance was started with RELEASE_ID %s" % ", ".join(wrong))
    if env["changed"] or env["error"]:
        why.append("shared/.env changes")
    if takeover:
        why.append("PM2 runs the app from %s" % ", ".join(takeover))
    if plan is None or plan.get("error") or plan.get("blockers"):
        why.append("the migrations were not planned")
    elif plan["applied"]:
        why.append("%d migration(s) to apply" % len(plan["applied"]))
    return why


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_dir=dict(type="path", required=True),
            runtimes=dict(type="dict", default={}),
            run_id=dict(type="str", default=""),
            require_lock=dict(type="bool", default=True),
            tools=dict(type="list", elements="str", default=[]),
            node=dict(type="bool", default=False),
            release=dict(type="str"),
            app_name=dict(type="str"),
            pm2_home=dict(type="path"),
            pm2_bin=dict(type="str", default="pm2"),
            env_content=dict(type="str", no_log=True),
            plan=dict(type="bool", default=False),
            migrations_content=dict(type="dict"),
            rehearse=dict(type="bool", default=True),
            lock_timeout=dict(type="str", default="5s"),
            include_skipped=dict(type="bool", default=False),
            allow_tampered=dict(type="bool", default=False),
            allow_unknown=dict(type="bool", default=False),
            mode=dict(type="str", default="online", choices=["online", "transaction"]),
            online_min_rows=dict(type="int", default=10000),
            online_lock_timeout=dict(type="str", default="20ms"),
            backup_dir=dict(type="path"),
            **pg.postgres_argument_spec(),
        ),
        supports_check_mode=True,
    )
    p = module.params
    app_dir, rid = p["app_dir"], p["release"]
    secrets = pg.secrets(p)
    try:
        state_dirs(app_dir)
    except OSError as exc:
        module.fail_json(msg="cannot create slipway's state directory under %s: %s; check that the deploy user owns %s" % (
            app_dir, exc.strerror or exc, app_dir), changed=False)
    found = modruntime.select(p["runtimes"], app_dir)
    modruntime.activate(found)
    lock = read_lock(app_dir, p["run_id"])
    node = start(["node", "--version"]) if p["node"] else (None, None)
    pm2_read = Pm2Read(app_dir, p["app_name"], rid, p["pm2_home"] or default_home(), p["pm2_bin"])
    result = dict(changed=False, runtime=found, lock=lock, tools_missing=which(p["tools"]), node_version=None)
    current = current_release(app_dir)
    result["release"] = {"installed": bool(rid) and installed(layout.releases_dir(app_dir), rid), "current": current}
    result["env"] = env_state(app_dir, p["env_content"])
    plan, space = None, None
    if not p["plan"]:
        reason = "not asked"
    elif not found["installed"]:
        reason = "the module runtime is not installed yet"
    elif p["require_lock"] and not lock["ours"]:
        reason = "the deploy lock is not this run's"
    elif result["tools_missing"]:
        reason = "%s not found" % ", ".join(result["tools_missing"])
    else:
        reason = None
        guard = runguard.Guard(p["run_id"], layout.state_dir(app_dir))
        plan, space = plan_migrations(p, secrets, guard)
    result.update(plan_run=reason is None, plan_reason=reason, plan=plan, space=space)
    if node[0] is not None:
        rc, stdout, _ = finish(node[0], timeout=30)
        result["node_version"] = stdout.strip() if rc == 0 else None
    pm2_state, procs = pm2_read.result()
    result["pm2"] = pm2_state
    result["rescue_release"] = rescue_release(current, procs, p["app_name"], hoststate.deploy_records(app_dir))
    why = noop_why(rid, result["release"], pm2_state, result["env"], pm2_state["outside"], plan) if rid else ["no release"]
    result.update(noop=not why, noop_why=why)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
