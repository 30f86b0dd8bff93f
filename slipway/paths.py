"""Well-known paths of a slipway checkout."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "collections"
PLAYBOOKS = ROOT / "playbooks"
INVENTORY = ROOT / "inventory"
READER_APP = ROOT / "examples" / "reader-app"


def import_module_utils() -> None:
    """Make ``ansible_collections.slipway.core.plugins.module_utils`` importable from the checkout.

    The shared code lives once, in the collection's module_utils; the controller imports the same
    files the modules ship to target hosts.
    """
    path = str(COLLECTIONS)
    if path not in sys.path:
        sys.path.insert(0, path)
