"""`invoke deploy` and `invoke rollback`."""
from __future__ import annotations

from invoke import Exit, task

from . import cli


@task(
    help={
        "host": "inventory host or group (e.g. prod, sandbox, sandboxes)",
        "release": "the app to ship: a directory, or a git ref (REF or REF:subdir of $SLIPWAY_APP_REPO); default examples/reader-app",
        "check": "print the full plan (release, SQL with preflight results, reload yes/no); change nothing",
        "report": "write a JSON report to this file",
    }
)
@cli
def deploy(c, host, release=None, check=False, report=None):
    """Deploy: preflight, verified backup, release, migrations, PM2 zero-downtime reload, smoke tests; rolls back on failure (exit 0 ok, 1 failed, 4 lock held)."""
    from slipway.deploy import deploy as run_deploy

    code = run_deploy(host, release=release, check=check, report_path=report)
    if code:
        raise Exit(code=code)


@task(
    help={
        "host": "inventory host or group",
        "release": "release id to go back to (default: the one before the current release, from the host's deploy records)",
        "db": "`restore`: also restore the database from --backup (asks for confirmation unless --yes)",
        "backup": "backup id (see `invoke backup --host H --list`)",
        "yes": "do not ask before restoring the database",
    }
)
@cli
def rollback(c, host, release=None, db=None, backup=None, yes=False):
    """Point `current` back at the previous release and reload (schema kept); `--db restore --backup ID` also restores the database."""
    from slipway.deploy import rollback as run_rollback

    code = run_rollback(host, release=release, db=db, backup=backup, yes=yes)
    if code:
        raise Exit(code=code)


TASKS = (deploy, rollback)
