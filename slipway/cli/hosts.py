"""`invoke ping` and `invoke smoke`: reach hosts, test the app."""
from __future__ import annotations

import json as jsonlib

from invoke import Exit, task

from . import cli


@task(help={"host": "inventory host or group", "json": "print one JSON document"})
@cli
def ping(c, host, json=False):
    """Reach hosts over SSH (strict host keys) with Ansible and read their PM2 state."""
    from slipway.inventory import resolve_target
    from slipway.runner import print_failures, run_playbook

    resolve_target(host)
    result = run_playbook("ping.yml", host)
    state = result["data"].get("ping", {})
    if json:
        print(jsonlib.dumps({"hosts": state, "failures": result["failures"], "rc": result["rc"]}, indent=2, sort_keys=True))
    else:
        for name, info in sorted(state.items()):
            app = info["pm2"]
            print(f"{name:<14} reachable  pm2 {app['online']}/{app['instances']} online  current -> {info['current']}")
        print_failures(result)
    if result["rc"] != 0:
        raise Exit(code=1)


@task(help={"host": "inventory host or group", "json": "print one JSON document",
            "release": "the app whose slipway.yml names the smoke checks: its directory or a git ref, as for deploy "
                       "(default: the reference app)"})
@cli
def smoke(c, host, json=False, release=None):
    """Smoke-test the app: its health and the HTTP checks its slipway.yml lists (the reference app: the incident runbook's track-view cases on the smoke book, as deltas)."""
    from slipway.smoke import smoke as run_smoke

    if run_smoke(host, json, release=release):
        raise Exit(code=1)


TASKS = (ping, smoke)
