"""The sandbox's generated Ansible inventory and ssh_config, and the provider that adds it to slipway.inventory."""
from __future__ import annotations

import yaml

from ..files import write_private
from .controller import Controller
from .data import SMOKE_BOOK
from .layout import APP_NAME, DB_NAME, DB_USER, PG_PORT, SSH_PORT, SYSTEM_PYTHON, Host


def host_vars(host: Host, ctl: Controller) -> dict:
    return {
        "ansible_host": host.address,
        "ansible_port": SSH_PORT,
        "ansible_user": host.user,
        "ansible_ssh_private_key_file": str(ctl.key),
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={ctl.known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes",
        "ansible_python_interpreter": SYSTEM_PYTHON,
        "slipway_app_name": APP_NAME,
        "slipway_app_dir": str(host.app_dir),
        "slipway_app_url": host.app_url,
        "slipway_backup_dir": str(host.backup_dir),
        "slipway_pm2_home": str(host.pm2_home),
        "slipway_pg_log": str(host.pg_log),
        "slipway_db_host": host.address,
        "slipway_db_port": PG_PORT,
        "slipway_db_name": DB_NAME,
        "slipway_db_user": DB_USER,
        "slipway_smoke_book_id": SMOKE_BOOK,
    }


def write_inventory(hosts: list[Host], ctl: Controller, state: str = "incident") -> None:
    """The sandbox's inventory (group ``sandboxes``). A bare host also gets ``slipway_app_env``,
    as a production inventory for an app that reads its settings from the environment would:
    the deploy writes shared/.env from it (DATABASE_URL and PORT added)."""
    hosts_vars = {h.name: host_vars(h, ctl) for h in hosts}
    if state == "bare":
        for h in hosts:
            hosts_vars[h.name]["slipway_app_env"] = {"HOST": h.address, "NODE_ENV": "production"}
    inventory = {
        "all": {
            "children": {
                "sandboxes": {"hosts": hosts_vars},
            }
        }
    }
    header = "# written by `invoke sandbox.up`; secrets are in host_vars/<host>/vault.yml (ansible-vault)\n"
    write_private(ctl.inventory_file, header + yaml.safe_dump(inventory, sort_keys=False), 0o600)
    known = []
    ssh_config = ["# written by `invoke sandbox.up`\n"]
    for h in hosts:
        kind, key = (h.sshd_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.append(f"[{h.address}]:{SSH_PORT} {kind} {key}")
        ssh_config.append(
            f"Host {h.name}\n  HostName {h.address}\n  Port {SSH_PORT}\n  User {h.user}\n"
            f"  IdentityFile {ctl.key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {ctl.known_hosts}\n"
            f"  StrictHostKeyChecking yes\n  PasswordAuthentication no\n  BatchMode yes\n"
        )
    write_private(ctl.known_hosts, "\n".join(known) + "\n", 0o644)
    write_private(ctl.ssh_config, "\n".join(ssh_config), 0o600)


def source() -> tuple:
    """(inventory dir, vault password file) of the current instance, each None when absent."""
    ctl = Controller()
    return (ctl.inventory_dir if ctl.inventory_file.exists() else None,
            ctl.vault_password_file if ctl.vault_password_file.exists() else None)


def register() -> None:
    """Add the running sandbox's inventory (whichever instance $SLIPWAY_SANDBOX_INSTANCE names at
    the time of each call) to slipway.inventory's sources."""
    from .. import inventory

    inventory.add_source(source)
