"""Well-known paths of a slipway checkout."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "collections"
PLAYBOOKS = ROOT / "playbooks"
INVENTORY = ROOT / "inventory"
READER_APP = ROOT / "examples" / "reader-app"
