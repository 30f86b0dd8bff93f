"""Secrets at rest: ansible-vault files, readable with the same password file Ansible uses.

The controller keeps each host's secrets (DB password, API token) in an encrypted
``host_vars/<host>/vault.yml``; Ansible reads them through ``--vault-password-file`` and the
controller decrypts them here. Nothing here prints a secret.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from ansible.parsing.vault import VaultLib, VaultSecret

from .errors import SlipwayError
from .files import write_private


def _secret(password_file: Path, unreadable_fix: str) -> VaultSecret:
    """The vault password in ``password_file`` (a plain file), or a one-line SlipwayError."""
    try:
        password = Path(password_file).read_bytes().strip()
    except OSError as exc:
        raise SlipwayError(f"cannot read the vault password file {password_file} ({exc.strerror}); {unreadable_fix}") from None
    if not password:
        raise SlipwayError(f"the vault password file {password_file} is empty; put the vault password in it")
    return VaultSecret(password)


def _lib(password_file: Path) -> VaultLib:
    return VaultLib([("default", _secret(password_file, "set ANSIBLE_VAULT_PASSWORD_FILE or re-run `invoke sandbox.up`"))])


def dump(values: dict, path: Path, password_file: Path) -> None:
    """Encrypt ``values`` as YAML into ``path`` (mode 0600, written atomically)."""
    blob = _lib(password_file).encrypt(yaml.safe_dump(values, sort_keys=True))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, blob, 0o600)


def load(path: Path, password_file: Path) -> dict:
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise SlipwayError(f"cannot read the vault {path} ({exc.strerror}); re-run `invoke sandbox.up`") from None
    try:
        data = yaml.safe_load(_lib(password_file).decrypt(blob))
    except Exception as exc:  # noqa: BLE001 - AnsibleError subclasses: wrong password, corrupt file
        raise SlipwayError(f"cannot decrypt {path}: {type(exc).__name__}; check the vault password file") from None
    if not isinstance(data, dict):
        raise SlipwayError(f"{path} does not hold a mapping of variables; fix or remove it")
    return data


REQUIRED_SECRETS = ("slipway_db_password",)
# needed only by some apps (the reader app's track-view smoke cases, smoke checks with auth), and
# scrubbed from every output wherever it is set
OPTIONAL_SECRETS = ("slipway_api_token",)


def check_hosts(hosts: list[str], required: tuple[str, ...] = REQUIRED_SECRETS,
                optional: tuple[str, ...] = OPTIONAL_SECRETS) -> list[str]:
    """Before a run changes anything: the vault password is available and decrypts every vault
    file the hosts' variables come from, and each host has every secret. One-line SlipwayError
    naming the cause and the fix; no secret is ever in it. Returns the secrets' values, for
    scrubbing whatever the run prints or writes."""
    import os

    from ansible.errors import AnsibleError
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    from . import inventory

    password_file = inventory.vault_password_file()
    loader = DataLoader()
    if password_file:
        path = Path(password_file).expanduser()
        if not path.is_file():
            raise SlipwayError(f"the vault password file {password_file} (ANSIBLE_VAULT_PASSWORD_FILE) does not exist; "
                               "point ANSIBLE_VAULT_PASSWORD_FILE at the file holding the vault password")
        if os.access(path, os.X_OK):
            from ansible.parsing.vault import get_file_vault_secret

            try:
                secret = get_file_vault_secret(filename=str(path), loader=loader)
                secret.load()
            except AnsibleError as exc:
                raise SlipwayError(f"the vault password script {password_file} failed ({type(exc).__name__}); "
                                   "fix it or point ANSIBLE_VAULT_PASSWORD_FILE at a plain password file") from None
        else:
            secret = _secret(path, "make it readable by this user")
        loader.set_vault_secrets([("default", secret)])
    _, manager = inventory.manager(loader)
    variables = VariableManager(loader=loader, inventory=manager)
    known: list[str] = []
    for host in hosts:
        entry = manager.get_host(host)
        try:
            values = variables.get_vars(host=entry, include_hostvars=False)
        except AnsibleError as exc:
            text = " ".join(str(getattr(exc, "message", exc)).split())
            where = next((w for w in text.split() if w.endswith((".yml", ".yaml", ".json"))), "a vault file")
            if "no vault secrets" in text.lower() and "decrypt" in text.lower() and not password_file:
                raise SlipwayError(f"{host}: {where} is vault-encrypted and no vault password is set; export "
                                   "ANSIBLE_VAULT_PASSWORD_FILE=<file holding the vault password>") from None
            if "decrypt" in text.lower():
                raise SlipwayError(f"{host}: cannot decrypt {where} with the password in {password_file} "
                                   "(wrong vault password?); point ANSIBLE_VAULT_PASSWORD_FILE at the right one") from None
            raise SlipwayError(f"{host}: cannot read its inventory variables ({type(exc).__name__}); "
                               "fix the inventory file it names: " + where) from None
        templar = Templar(loader=loader, variables=values)
        for key in optional:
            try:
                value = templar.template(values.get(key)) if isinstance(values.get(key), str) else values.get(key)
            except AnsibleError:
                value = None
            if value not in (None, ""):
                known.append(str(value))
        for key in required:
            value = values.get(key)
            try:
                value = templar.template(value) if isinstance(value, str) else value
            except AnsibleError:
                raise SlipwayError(f"{host}: {key} cannot be rendered (it refers to an undefined variable); "
                                   f"set {key} in host_vars/{host}/vault.yml (ansible-vault edit)") from None
            if value in (None, ""):
                raise SlipwayError(f"{host}: {key} is not set; put it in an ansible-vault file "
                                   f"host_vars/{host}/vault.yml (ansible-vault create) and export ANSIBLE_VAULT_PASSWORD_FILE")
            known.append(str(value))
    return known
