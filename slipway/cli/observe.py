"""`invoke diagnose` and `invoke status`: read-only looks at hosts (no deploy lock, no change)."""
from __future__ import annotations

from invoke import Exit, task

from ..errors import SlipwayError

COULD_NOT_LOOK = 3


def _could_not_look(exc: BaseException) -> Exit:
    from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

    if isinstance(exc, SlipwayError):
        return Exit(f"error: {redact_text(str(exc))}", code=COULD_NOT_LOOK)
    said = redact_text(str(exc)).strip().splitlines()
    return Exit(f"error: {type(exc).__name__}: {said[0] if said else ''}; run it again, and report it if it stays",
                code=COULD_NOT_LOOK)


@task(help={"host": "inventory host or group", "since": "how far back to read the logs: 30m, 1h, 2d (default 1h)",
            "json": "print one JSON document"})
def diagnose(c, host=None, since="1h", json=False):
    """Why the app fails: PM2, the app's and PostgreSQL's logs, the migrations and drift, as ranked causes with evidence and the fix (exit 0 healthy, 1 a cause found, 3 could not look)."""
    from slipway.diagnose import diagnose as run_diagnose

    if not host:
        raise Exit("error: no host named; pass --host HOST_OR_GROUP", code=COULD_NOT_LOOK)
    try:
        code = run_diagnose(host, since=since, as_json=json)
    except Exception as exc:  # noqa: BLE001 - anything that stops the look is could-not-look (exit 1 means a cause)
        raise _could_not_look(exc) from None
    if code:
        raise Exit(code=code)


@task(name="status", help={"host": "inventory host or group", "all": "every host of the inventory",
                           "json": "print one JSON document", "html": "also write one static HTML page here (inline CSS, no scripts)"})
def status_(c, host=None, all=False, json=False, html=None):  # noqa: A002 - the flag is --all
    """Every environment at a glance: release, last deploy, PM2, migrations, last drift check, last verified backup, deploy lock (read-only; exit 3 when a host could not be read)."""
    from slipway.status import status as run_status

    try:
        code = run_status(host, all_hosts=all, as_json=json, html_path=html)
    except Exception as exc:  # noqa: BLE001
        raise _could_not_look(exc) from None
    if code:
        raise Exit(code=code)


TASKS = [diagnose, status_]
