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


def _lib(password_file: Path) -> VaultLib:
    try:
        password = Path(password_file).read_text().strip().encode()
    except OSError as exc:
        raise SlipwayError(f"cannot read the vault password file {password_file} ({exc.strerror}); set ANSIBLE_VAULT_PASSWORD_FILE or re-run `invoke sandbox.up`")
    if not password:
        raise SlipwayError(f"the vault password file {password_file} is empty; put the vault password in it")
    return VaultLib([("default", VaultSecret(password))])


def dump(values: dict, path: Path, password_file: Path) -> None:
    """Encrypt ``values`` as YAML into ``path`` (mode 0600, written atomically)."""
    blob = _lib(password_file).encrypt(yaml.safe_dump(values, sort_keys=True))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, blob, 0o600)


def load(path: Path, password_file: Path) -> dict:
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise SlipwayError(f"cannot read the vault {path} ({exc.strerror}); re-run `invoke sandbox.up`")
    try:
        data = yaml.safe_load(_lib(password_file).decrypt(blob))
    except Exception as exc:  # AnsibleError subclasses: wrong password, corrupt file
        raise SlipwayError(f"cannot decrypt {path}: {type(exc).__name__}; check the vault password file")
    if not isinstance(data, dict):
        raise SlipwayError(f"{path} does not hold a mapping of variables; fix or remove it")
    return data
