#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pm2_info
short_description: Read PM2 process state with secrets removed
version_added: "0.1.0"
description:
  - Runs C(pm2 jlist) for one PM2_HOME and returns a summary per process with whitelisted fields
    only; the process environment (which holds DATABASE_URL and tokens) is never returned.
  - Starts no PM2 daemon when none is running (any pm2 command would), unless I(start_daemon=true).
options:
  pm2_home:
    description: PM2_HOME to read; defaults to C(~/.pm2) of the remote user.
    type: path
  app_name:
    description: When set, C(app) summarises this app's processes (instances, online, pids, restarts).
    type: str
  pm2_bin:
    description: The pm2 executable.
    type: str
    default: pm2
  start_daemon:
    description: Run C(pm2 jlist) even when no daemon is running (which starts one).
    type: bool
    default: false
  app_dir:
    description: With I(app_name), C(outside) lists the working directories the app's processes run
      from outside this directory (an app deployed by hand, which a first deploy takes over).
    type: path
author:
  - slipway developers
notes:
  - Read-only; supports check mode.
"""

EXAMPLES = r"""
- name: Read PM2 state of the reader app
  slipway.core.pm2_info:
    app_name: ollama-reader
  register: pm2_state
"""

RETURN = r"""
daemon_running:
  description: Whether a PM2 daemon for I(pm2_home) is alive.
  returned: always
  type: bool
processes:
  description: One dict per PM2 process (name, pm_id, pid, status, restart_time, unstable_restarts,
    exec_mode, pm_uptime, pm_cwd, release, memory, cpu, ...); no environment.
  returned: always
  type: list
  elements: dict
outside:
  description: With I(app_name) and I(app_dir), the working directories of the app's processes that
    are not I(app_dir) or inside it, sorted.
  returned: when app_name and app_dir are set
  type: list
  elements: str
app:
  description: Aggregate for I(app_name) (instances, online, pids, restarts, unstable_restarts, statuses, cwd).
  returned: when app_name is set
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils.pm2 import (
    app_summary,
    daemon_pid,
    default_home,
    outside,
    summarize_jlist,
)
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pm2_home=dict(type="path"),
            app_name=dict(type="str"),
            pm2_bin=dict(type="str", default="pm2"),
            start_daemon=dict(type="bool", default=False),
            app_dir=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    pm2_home = module.params["pm2_home"] or default_home()
    result = dict(changed=False, daemon_running=False, processes=[], pm2_home=pm2_home)

    if daemon_pid(pm2_home) is None and not module.params["start_daemon"]:
        if module.params["app_name"]:
            result["app"] = app_summary([], module.params["app_name"])
            result["outside"] = []
        module.exit_json(**result)

    pm2_bin = module.get_bin_path(module.params["pm2_bin"], required=True)
    env = dict(PM2_HOME=pm2_home)
    rc, out, err = module.run_command([pm2_bin, "jlist"], environ_update=env)
    if rc != 0:
        module.fail_json(msg="pm2 jlist failed (rc=%d): %s" % (rc, redact_text(err.strip())[-500:]), **result)
    try:
        procs = summarize_jlist(out)
    except ValueError as exc:
        module.fail_json(msg=str(exc), **result)
    result["daemon_running"] = True
    result["processes"] = procs
    if module.params["app_name"]:
        result["app"] = app_summary(procs, module.params["app_name"])
        if module.params["app_dir"]:
            result["outside"] = outside(procs, module.params["app_name"], module.params["app_dir"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
