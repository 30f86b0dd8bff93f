"""slipway: deployment automation for a Node.js app run by PM2 on PostgreSQL (controller side)."""

__version__ = "0.1.0"

import os as _os

# Unknown --host patterns are reported by slipway.inventory.resolve_target in one line; Ansible's own
# warning about them would be a second line (set before anything imports ansible).
_os.environ.setdefault("ANSIBLE_HOST_PATTERN_MISMATCH", "ignore")
