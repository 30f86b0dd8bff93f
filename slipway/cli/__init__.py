"""slipway's command line: one Invoke module per topic (as pyinvoke/invocations does), composed
into one namespace by the checkout's tasks.py.

- ``sandbox``: `sandbox.up|down|env` (the local test hosts) and `demo`
- ``deploy``: `deploy`, `rollback`
- ``db``: `backup`, `restore`, `migrate`
- ``hosts``: `ping`, `smoke`
- ``schema``: `drift` (`drift.check`), `drift.schedule`, `drift.unschedule`
- ``observe``: `diagnose`, `status` (read-only)
- ``dev``: `lint`, `molecule`, `test`

Every task turns a SlipwayError into one line ``error: <cause>; <fix>`` on stderr and its exit
code (``slipway.errors.Exit``)."""
from __future__ import annotations

import functools

from invoke import Exit

from ..errors import SlipwayError


def cli(func):
    """Run a task body, mapping SlipwayError to `error: <message>` and its exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SlipwayError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None

    return wrapper
