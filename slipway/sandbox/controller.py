"""The sandbox controller's files: key pair, known_hosts, ssh_config, inventory, vault and its password."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from .. import vault
from ..files import write_private
from .layout import controller_dir
from .processes import run


class Controller:
    """Files on the controller: key pair, known_hosts, ssh_config, inventory, vault."""

    def __init__(self, path: Path | None = None):
        self.dir = path or controller_dir()

    key = property(lambda self: self.dir / "id_ed25519")
    known_hosts = property(lambda self: self.dir / "known_hosts")
    ssh_config = property(lambda self: self.dir / "ssh_config")
    inventory_dir = property(lambda self: self.dir / "inventory")
    inventory_file = property(lambda self: self.dir / "inventory" / "sandbox.yml")
    vault_password_file = property(lambda self: self.dir / "vault-password")
    state_file = property(lambda self: self.dir / "state.json")
    build_dir = property(lambda self: self.dir / "build")

    def vault_file(self, host: str) -> Path:
        return self.inventory_dir / "host_vars" / host / "vault.yml"

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "slipway-sandbox-deploy", "-f", self.key])
        if not self.vault_password_file.exists():
            write_private(self.vault_password_file, secrets.token_urlsafe(32) + "\n", 0o600)

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"hosts": {}, "users": []}

    def save_state(self, state: dict) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n", 0o600)

    def secrets_for(self, host: str) -> dict:
        """The host's secrets from the vault, generated once and kept across `up` runs."""
        path = self.vault_file(host)
        if path.exists():
            return vault.load(path, self.vault_password_file)
        values = {
            "slipway_db_password": secrets.token_urlsafe(24),
            "slipway_api_token": secrets.token_urlsafe(32),
        }
        vault.dump(values, path, self.vault_password_file)
        return values
