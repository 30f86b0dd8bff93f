"""The one switcher of sandbox instances for in-process calls (slipway.sandbox reads
SLIPWAY_SANDBOX_INSTANCE at call time; conftest sets 1 for the suite). Standard library only, so
bench/ can use it without pytest's conftest."""
from __future__ import annotations

import contextlib
import os

VAR = "SLIPWAY_SANDBOX_INSTANCE"


@contextlib.contextmanager
def sandbox_instance(instance: str):
    """SLIPWAY_SANDBOX_INSTANCE=``instance`` inside the block, put back as it was afterwards;
    yields slipway.sandbox."""
    old = os.environ.get(VAR)
    os.environ[VAR] = str(instance)
    try:
        from slipway import sandbox

        yield sandbox
    finally:
        if old is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = old
