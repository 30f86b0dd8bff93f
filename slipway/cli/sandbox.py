"""`invoke sandbox.up|down|env` and `invoke demo`: the local sandbox hosts."""
from __future__ import annotations

from invoke import Collection, task

from .. import sandbox as sb
from . import cli


@task(help={"hosts": "number of hosts (sandbox, sandbox-2, ...), 1-19", "state": "incident (0007 missing), healthy, bare (nothing deployed: an empty database, no app), legacy (the app deployed by hand in ~/www/reader.market, PM2 started there by hand, 0007 missing), or drifted (all applied, then changed by hand: a constraint and an index dropped, a column added)"})
@cli
def up(c, hosts=1, state="incident"):
    """Start real local target hosts (user, sshd, PostgreSQL 15, PM2 app) and write their inventory."""
    sb.up(int(hosts), state)


@task
@cli
def down(c):
    """Stop the sandbox hosts and remove every process, user and file the sandbox made."""
    sb.down()


@task(help={"host": "sandbox host name (default: sandbox)"})
@cli
def env(c, host="sandbox"):
    """Print `export APP_URL=… API_TOKEN=… DATABASE_URL=…` for a sandbox host, for `eval`."""
    for line in sb.env_lines(host):
        print(line)


@task
@cli
def demo(c):
    """The incident end to end on the sandbox: the 500, its diagnosis, `invoke deploy`, the 200 with every view kept."""
    from ..sandbox.demo import run

    run()


ns = Collection("sandbox")
ns.add_task(up)
ns.add_task(down)
ns.add_task(env)
