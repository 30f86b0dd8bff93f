"""Where a sandbox instance lives: its number, directories, host names and addresses, and one host's layout."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import SlipwayError
from ..paths import READER_APP, ROOT

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SYSTEM_PYTHON = "/usr/bin/python3"
APP_NAME = "ollama-reader"
DB_NAME = "booksdb"
DB_USER = "booksuser"
SSH_PORT = 2222
PG_PORT = 15432
APP_PORT = 3000
MAX_HOSTS = 19
STATES = ("incident", "healthy", "bare", "legacy", "drifted")
JOURNAL = READER_APP / "migrations" / "meta" / "_journal.json"
PATH_ENV = "/usr/local/bin:/usr/bin:/bin"


def log(host: str, message: str) -> None:
    print(f"  {host:<12} {message}", flush=True)


def instance() -> int:
    raw = os.environ.get("SLIPWAY_SANDBOX_INSTANCE", "0")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 11:
        raise SlipwayError(f"SLIPWAY_SANDBOX_INSTANCE={raw!r} is invalid; set it to a number from 0 to 11")
    return value


def controller_dir() -> Path:
    override = os.environ.get("SLIPWAY_SANDBOX_DIR")
    if override:
        return Path(override).resolve()
    n = instance()
    return ROOT / (".sandbox" if n == 0 else f".sandbox-{n}")


def hosts_base() -> Path:
    return Path(f"/tmp/slipway-sandbox-{instance()}")


def host_name(index: int) -> str:
    return "sandbox" if index == 1 else f"sandbox-{index}"


def host_index(name: str) -> int | None:
    """Inverse of host_name; None for a name the sandbox does not make."""
    if name == "sandbox":
        return 1
    suffix = name[len("sandbox-"):] if name.startswith("sandbox-") else ""
    return int(suffix) if suffix.isdigit() and 2 <= int(suffix) <= MAX_HOSTS else None


@dataclasses.dataclass(frozen=True)
class Host:
    """Everything about one sandbox host that can be derived from its index."""

    name: str
    index: int
    user: str
    address: str
    root: Path

    @classmethod
    def make(cls, index: int) -> "Host":
        n = instance()
        name = host_name(index)
        prefix = "sw-" if n == 0 else f"sw{n}-"
        return cls(
            name=name,
            index=index,
            user=prefix + name,
            address=f"127.0.0.{10 + 20 * n + index}",
            root=hosts_base() / name,
        )

    # host-side paths
    home = property(lambda self: self.root / "home")
    app_dir = property(lambda self: self.home / "app")
    # state legacy: the app deployed by hand, run in place (the seed's /var/www/reader.market)
    legacy_dir = property(lambda self: self.home / "www" / "reader.market")
    backup_dir = property(lambda self: self.home / "backups")
    pm2_home = property(lambda self: self.home / ".pm2")
    sshd_dir = property(lambda self: self.root / "sshd")
    pg_dir = property(lambda self: self.root / "pg")
    pgdata = property(lambda self: self.root / "pg" / "data")
    pgsock = property(lambda self: self.root / "pgsock")
    pglog_dir = property(lambda self: self.root / "pglog")
    pg_log = property(lambda self: self.root / "pglog" / "postgresql.log")
    app_url = property(lambda self: f"http://{self.address}:{APP_PORT}")

    def database_url(self, password: str) -> str:
        return f"postgres://{DB_USER}:{password}@{self.address}:{PG_PORT}/{DB_NAME}"
