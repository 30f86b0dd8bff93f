"""`invoke drift` (the default task of the collection `drift`), `drift.schedule`, `drift.unschedule`:
the live schema against the schema its applied migrations produce, now or under cron."""
from __future__ import annotations

from invoke import Collection, Exit, task

from ..errors import SlipwayError
from . import cli


@task(default=True, help={
    "host": "inventory host or group", "json": "print one JSON document",
    "notify": "POST one JSON document (Slack-compatible `text`) to this webhook URL when a host's state changes, "
              "and on recovery (default: $SLIPWAY_DRIFT_NOTIFY)",
    "metrics": "write a Prometheus textfile here (node_exporter's textfile collector), atomically",
    "include": "also compare grants and/or comments (off by default): grants, comments or grants,comments",
    "html": "then refresh the status page here (what invoke status --html writes, for the hosts checked)",
    "fix": "rebuild online what is safe (a missing or INVALID index or UNIQUE constraint an applied migration makes, "
           "after a duplicate count), then check again; never a drop or a type change"})
def check(c, host, json=False, notify=None, metrics=None, fix=False, include=None, html=None):
    """Schema drift: what the live schema lacks or has extra versus its applied migrations, the migration and cause of each finding, the fix (exit 0 none, 1 warning, 2 critical, 3 could not check)."""
    from slipway.drift import UNKNOWN
    from slipway.drift import drift as run_drift

    try:
        code = run_drift(host, as_json=json, notify=notify, metrics=metrics, fix_safe=fix, include=include, html=html)
    except SlipwayError as exc:  # could not check: the monitoring convention's UNKNOWN
        raise Exit(f"error: {exc}", code=UNKNOWN) from None
    except Exception as exc:  # noqa: BLE001 - anything else is could-not-check too (exit 1 would read as WARNING)
        said = str(exc).strip().splitlines()
        raise Exit(f"error: the drift check failed: {type(exc).__name__}: {said[0] if said else ''}; "
                   "run it again, and report it if it stays", code=UNKNOWN) from None
    if code:
        raise Exit(code=code)


@task(help={"host": "inventory host or group", "every": "how often: minutes that divide an hour (15m) or hours that divide a day (6h)",
            "notify": "webhook URL for alerts (kept in the job's 0700 script, never on a command line)",
            "metrics": "Prometheus textfile to write on each run",
            "html": "status page (invoke status --html) to refresh on each run"})
@cli
def schedule(c, host, every="15m", notify=None, metrics=None, html=None):
    """Run the drift check under cron on this machine (ansible.builtin.cron; one run at a time, a rotated log)."""
    from slipway.drift import schedule as run_schedule

    run_schedule(host, every, notify=notify, metrics=metrics, html=html)


@task(help={"host": "inventory host or group the check was scheduled for"})
@cli
def unschedule(c, host):
    """Remove the scheduled drift check (its cron entry and script; the log stays)."""
    from slipway.drift import unschedule as run_unschedule

    run_unschedule(host)


ns = Collection("drift")
ns.add_task(check)
ns.add_task(schedule)
ns.add_task(unschedule)
