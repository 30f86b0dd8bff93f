"""The one source of hosts, groups and host variables: Ansible inventories, read with Ansible's own
InventoryManager, exactly as the playbooks see them.

Sources: the checkout's ``inventory/`` directory (when it holds an inventory file) and whatever
a provider given to :func:`add_source` names (the sandbox adds its generated inventory this way,
from tasks.py and the tests; nothing in production code knows about the sandbox). The vault
password file is ``$ANSIBLE_VAULT_PASSWORD_FILE``, else a provider's.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import SlipwayError
from .paths import INVENTORY, ROOT

_IGNORED = (".md", ".txt", ".rst", ".example", ".orig", ".bak", "~")
_PROVIDERS: list = []
NO_INVENTORY = "no inventory: add inventory/<env>.yml (see examples/inventory/prod.yml) or run `invoke sandbox.up`"


def add_source(provider) -> None:
    """Read hosts from what ``provider()`` names too: it returns (inventory path or None, vault
    password file or None), asked each time (the sandbox's instance can change between calls)."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)


def _provided() -> list[tuple]:
    out = []
    for provider in _PROVIDERS:
        try:
            out.append(provider())
        except SlipwayError:
            continue  # e.g. a bad $SLIPWAY_SANDBOX_INSTANCE: never a reason to fail a production run
    return out


def sources() -> list[str]:
    """The inventory sources, in order (what ``ansible-playbook -i`` is given)."""
    found = []
    if any(p.is_file() and not p.name.endswith(_IGNORED) for p in INVENTORY.glob("*")):
        found.append(str(INVENTORY))
    return found + [str(path) for path, _ in _provided() if path and Path(path).exists()]


def vault_password_file() -> str | None:
    return os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE") or next(
        (str(vault) for _, vault in _provided() if vault and Path(vault).exists()), None)


def ansible_env() -> dict:
    """Environment for Ansible run from slipway: its config, no colour, the vault password file."""
    env = {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    password = vault_password_file()
    if password:
        env["ANSIBLE_VAULT_PASSWORD_FILE"] = password
    return env


def manager(loader=None):
    """(loader, InventoryManager) over :func:`sources`; a one-line error when there is none."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    os.environ.setdefault("ANSIBLE_CONFIG", str(ROOT / "ansible.cfg"))
    os.environ["ANSIBLE_HOST_PATTERN_MISMATCH"] = "ignore"
    found = sources()
    if not found:
        raise SlipwayError(NO_INVENTORY)
    loader = loader or DataLoader()
    return loader, InventoryManager(loader=loader, sources=found)


def resolve_target(target: str) -> list[str]:
    """Hosts that ``target`` (host or group) names in the inventories, or a one-line error."""
    _, inv = manager()
    hosts = [h.name for h in inv.get_hosts(pattern=target)] if target else []
    if not hosts:
        groups = sorted(g for g in inv.groups if g not in ("all", "ungrouped"))
        names = sorted(inv.hosts)
        hint = ("run `invoke sandbox.up` for the sandbox, or add it to inventory/" if not names else
                f"hosts: {', '.join(names)}; groups: {', '.join(groups)}")
        raise SlipwayError(f"no host or group named {target!r} in the inventory ({hint})")
    return hosts


def _no_vault_loader():
    """A DataLoader that skips whole-file vault-encrypted vars files instead of decrypting them
    (``host_vars/<h>/vault.yml``), so no vault password is needed to read connection vars."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.parsing.vault import is_encrypted_file

    class _NoVaultLoader(DataLoader):
        def load_from_file(self, file_name, *args, **kwargs):
            path = self.path_dwim(file_name)
            try:
                with open(path, "rb") as handle:
                    if is_encrypted_file(handle):
                        return {}
            except OSError:
                pass
            return super().load_from_file(file_name, *args, **kwargs)

    return _NoVaultLoader()


def host_vars(host: str) -> "HostVars":
    """The inventory variables of ``host`` (host and group vars, vault files skipped), untemplated;
    ``.render(key)`` renders one. A one-line SlipwayError when there is no such host."""
    from ansible.vars.manager import VariableManager

    loader, inv = manager(_no_vault_loader())
    entry = inv.get_host(host)
    if entry is None:
        names = ", ".join(sorted(inv.hosts)) or "none"
        raise SlipwayError(f"no host named {host!r} in the inventory (hosts: {names}); pass an inventory host name")
    variables = VariableManager(loader=loader, inventory=inv).get_vars(host=entry, include_hostvars=False)
    return HostVars(loader, variables)


class HostVars(dict):
    """Host vars whose ``render`` templates Jinja (``ansible_host: "{{ ... }}"``)."""

    def __init__(self, loader, variables):
        super().__init__(variables)
        self._loader = loader

    def render(self, key, default=None):
        if key not in self:
            return default
        value = dict.__getitem__(self, key)
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            from ansible.template import Templar

            try:
                value = Templar(loader=self._loader, variables=dict(self)).template(value)
            except Exception as exc:  # noqa: BLE001 - AnsibleError subclasses; the message names the variable
                raise SlipwayError(f"cannot render inventory variable {key} ({type(exc).__name__}); "
                                   "connection variables must not depend on vault secrets") from None
        return value
