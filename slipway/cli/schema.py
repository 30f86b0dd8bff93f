"""`invoke drift`: the live schema against the schema its applied migrations produce."""
from __future__ import annotations

from invoke import Exit, task

from ..errors import SlipwayError


@task(help={"host": "inventory host or group", "json": "print one JSON document"})
def drift(c, host, json=False):
    """Schema drift: what the live schema lacks or has extra versus its applied migrations, the migration and cause of each finding, the fix (exit 0 none, 1 warning, 2 critical, 3 could not check)."""
    from slipway.drift import UNKNOWN
    from slipway.drift import drift as run_drift

    try:
        code = run_drift(host, as_json=json)
    except SlipwayError as exc:  # could not check: the monitoring convention's UNKNOWN
        raise Exit(f"error: {exc}", code=UNKNOWN) from None
    if code:
        raise Exit(code=code)


TASKS = (drift,)
