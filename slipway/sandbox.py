"""The embedded sandbox: real, separate target hosts on this machine's loopback.

Each host is what production looks like to slipway:
- its own unix user (no sudo), with a home holding the app dir laid out like production
  (``app/releases/<id>``, ``app/current``, ``app/shared/.env``, ``app/logs/``) and a backup dir;
- its own OpenSSH sshd on its own 127.0.0.x address with its own host key; the controller gets a
  known_hosts file and a key pair, and strict host key checking stays on;
- its own PostgreSQL 15 cluster (initdb as ``postgres``, own port and socket dir), db ``booksdb``,
  role ``booksuser`` with a password over TCP (scram), peer auth on the socket;
- the reader app under PM2 (cluster mode) with its own PM2_HOME.

States: ``incident`` (drizzle's tracking table records 0000-0006, 0007 is not applied, duplicate
statistics rows exist: track-view answers 500 with 42P10) and ``healthy`` (all applied).

Controller-side files live in ``.sandbox/`` (keys, known_hosts, ssh_config, inventory, an
ansible-vault file with the secrets and its 0600 password file); host-side files live under
``/tmp/slipway-sandbox-<instance>/<host>/`` (the ``postgres`` user cannot reach /root).
``SLIPWAY_SANDBOX_INSTANCE`` (0-11) selects an independent sandbox: other users, addresses and
dirs, so the test suite never disturbs a demo sandbox.
"""
from __future__ import annotations

import dataclasses
import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from .errors import SlipwayError
from .files import write_private
from .paths import READER_APP, ROOT, import_module_utils
from . import vault

import_module_utils()
from ansible_collections.slipway.core.plugins.module_utils.pm2 import app_summary, daemon_pid, summarize_jlist  # noqa: E402
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text  # noqa: E402

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
STATES = ("incident", "healthy")
JOURNAL = READER_APP / "migrations" / "meta" / "_journal.json"
PATH_ENV = "/usr/local/bin:/usr/bin:/bin"

INCIDENT_BOOK = "aa4a9ca1-9a21-4126-9a7a-39b17ff186bc"
SMOKE_BOOK = "5b0e7e57-0000-4000-8000-00000000c0de"
UNIQUE_CONSTRAINT = "book_view_statistics_book_id_view_type_unique"

BOOKS = [
    (INCIDENT_BOOK, "The Brothers Karamazov", "Fyodor Dostoevsky", "ru"),
    ("0f3c2b8e-6a51-4d0e-9b7c-1d2e3f405162", "Middlemarch", "George Eliot", "en"),
    ("3e9d7c1a-2b4f-4a6e-8c0d-9e8f7a6b5c4d", "Anna Karenina", "Leo Tolstoy", "ru"),
    ("7a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9", "Les Miserables", "Victor Hugo", "fr"),
    ("c4d5e6f7-0819-4a2b-bc3d-4e5f60718293", "Don Quixote", "Miguel de Cervantes", "es"),
    (SMOKE_BOOK, "slipway smoke-test book", "slipway", "en"),
]
# (book_id, view_type, [view_count of each row]); more than one count = duplicate rows, which
# exist in production because the UNIQUE constraint of 0007 was never applied.
STATS = [
    (INCIDENT_BOOK, "card_view", [5, 3, 2]),
    (INCIDENT_BOOK, "reader_open", [4, 1]),
    ("0f3c2b8e-6a51-4d0e-9b7c-1d2e3f405162", "card_view", [7, 1]),
    ("0f3c2b8e-6a51-4d0e-9b7c-1d2e3f405162", "reader_open", [2]),
    ("3e9d7c1a-2b4f-4a6e-8c0d-9e8f7a6b5c4d", "card_view", [11]),
    ("7a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9", "reader_open", [6]),
]
USERS = [
    ("9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a", "reader@example.invalid", "Avid Reader"),
    ("1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "editor@example.invalid", "Editor"),
]


def log(host: str, message: str) -> None:
    print(f"  {host:<12} {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Small process helpers
# --------------------------------------------------------------------------------------------
def run(cmd, *, check=True, input=None, env=None, cwd=None, timeout=120, user=None):
    """Run ``cmd`` (a list; never a secret on it) and return CompletedProcess with text output.

    ``user``: a pwd entry to run as (uid/gid/supplementary groups of that user)."""
    kwargs = {}
    if user is not None:
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            input=input,
            env=env,
            cwd=cwd,
            timeout=timeout,
            capture_output=True,
            text=True,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        raise SlipwayError(f"{Path(str(cmd[0])).name} timed out after {timeout}s; see the host's logs") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlipwayError(f"{' '.join(str(c) for c in cmd[:3])} failed (exit {proc.returncode}): {detail[-1] if detail else 'no output'}")
    return proc


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, uid) of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            out.append((int(entry), int(fields["PPid"]), int(fields["Uid"].split()[0])))
        except (OSError, KeyError, ValueError):
            continue
    return out


def user_pids(uid: int) -> list[int]:
    """Live processes owned by ``uid``."""
    return [pid for pid, _, owner in processes() if owner == uid and pid_alive(pid)]


def chown_tree(top: Path, user: pwd.struct_passwd) -> None:
    """Give ``top`` and everything below it to ``user`` (symlinks themselves, not their targets)."""
    os.lchown(top, user.pw_uid, user.pw_gid)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def descendants(root_pid: int) -> list[int]:
    procs = processes()
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in procs:
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_pids(pids, grace: float = 5.0) -> None:
    pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_port(address: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise SlipwayError(f"nothing listens on {address}:{port} after {timeout:.0f}s; see the host's logs")


def wait_for_line(path: Path, needle: str, timeout: float = 15.0) -> str:
    """The last line of ``path`` holding ``needle``, waiting for it: PM2 and PostgreSQL's logging
    collector write asynchronously. Raises SlipwayError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        lines = [line for line in text.splitlines() if needle in line]
        if lines:
            return lines[-1]
        if time.monotonic() > deadline:
            raise SlipwayError(f"no line with {needle!r} in {path} after {timeout:.0f}s")
        time.sleep(0.1)


def http_json(method: str, url: str, body: dict | None = None, token: str | None = None, timeout=5.0):
    """(status, parsed JSON or text) of one request; no secret is ever printed by this helper."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# --------------------------------------------------------------------------------------------
# Controller-side state
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Preflight
# --------------------------------------------------------------------------------------------
def preflight() -> None:
    if os.geteuid() != 0:
        raise SlipwayError("the sandbox needs root (it creates a unix user, an sshd and a PostgreSQL cluster per host); run it as root")
    missing = [
        str(p)
        for p in (SSHD, PG_BIN / "initdb", PG_BIN / "pg_ctl", SYSTEM_PYTHON)
        if not Path(p).exists()
    ]
    missing += [name for name in ("node", "npm", "pm2", "ssh", "ssh-keygen", "ssh-keyscan", "useradd", "userdel") if not shutil.which(name)]
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing.append("user postgres")
    if missing:
        raise SlipwayError(f"missing on this machine: {', '.join(missing)}; run ./bootstrap")
    if not JOURNAL.exists():
        raise SlipwayError(f"reference app not found at {READER_APP}; run from a complete slipway checkout")


# --------------------------------------------------------------------------------------------
# App build (once per app content, on the controller)
# --------------------------------------------------------------------------------------------
_APP_EXCLUDE = {"node_modules", "logs", ".env", ".git"}


def app_files(src: Path) -> list[Path]:
    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in _APP_EXCLUDE or not path.is_file():
            continue
        files.append(rel)
    return files


def release_id(src: Path = READER_APP) -> str:
    """Content address of the app source: same content, same release id."""
    digest = hashlib.sha256()
    for rel in app_files(src):
        digest.update(str(rel).encode() + b"\0")
        digest.update((src / rel).read_bytes() + b"\0")
    return "r" + digest.hexdigest()[:12]


def build_app(ctl: Controller, src: Path = READER_APP) -> tuple[str, Path]:
    """Copy the app and `npm ci --omit=dev` it once on the controller; reused for every host."""
    rid = release_id(src)
    out = ctl.build_dir / rid
    if (out / ".slipway-built").exists():
        return rid, out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for rel in app_files(src):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, out / rel)
    proc = run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"], cwd=out, check=False, timeout=300)
    if proc.returncode != 0:
        raise SlipwayError(f"npm ci for the reader app failed: {proc.stderr.strip().splitlines()[-1:] or 'no output'}; check npm registry access")
    (out / ".slipway-built").write_text(rid + "\n")
    return rid, out


# --------------------------------------------------------------------------------------------
# One host
# --------------------------------------------------------------------------------------------
def ensure_user(host: Host, state: dict, ctl: Controller) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(host.user)
    except KeyError:
        entry = None
    if entry is not None and not entry.pw_dir.startswith(str(hosts_base()) + "/"):
        raise SlipwayError(f"user {host.user} exists but is not a sandbox user (home {entry.pw_dir}); remove it or set SLIPWAY_SANDBOX_INSTANCE")
    host.root.mkdir(parents=True, exist_ok=True)
    os.chmod(hosts_base(), 0o755)
    os.chmod(host.root, 0o755)
    if entry is None:
        # recorded before it exists, so `down` finds it even if `up` dies halfway
        if host.user not in state["users"]:
            state["users"].append(host.user)
            ctl.save_state(state)
        run(["useradd", "--home-dir", host.home, "--create-home", "--user-group", "--shell", "/bin/bash", host.user])
        # with `UsePAM no` a fresh account is "locked" ("!" password): unlock for key-only login
        run(["usermod", "-p", "*", host.user])
        log(host.name, f"user {host.user} created")
        entry = pwd.getpwnam(host.user)
    os.chmod(host.home, 0o750)
    return entry


def ensure_dirs(host: Host, user: pwd.struct_passwd) -> None:
    for path, mode in (
        (host.home / ".ssh", 0o700),
        (host.app_dir, 0o755),
        (host.app_dir / "releases", 0o755),
        (host.app_dir / "shared", 0o750),
        (host.app_dir / "logs", 0o750),
        (host.backup_dir, 0o700),
    ):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(path, mode)


def ensure_sshd(host: Host, user: pwd.struct_passwd, ctl: Controller) -> None:
    host.sshd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    hostkey = host.sshd_dir / "ssh_host_ed25519_key"
    if not hostkey.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{host.name}-hostkey", "-f", hostkey])
    pubkey = Path(str(ctl.key) + ".pub").read_text().strip()
    write_private(host.home / ".ssh" / "authorized_keys", pubkey + "\n", 0o600, owner=user)
    config = "\n".join(
        [
            f"ListenAddress {host.address}:{SSH_PORT}",
            f"HostKey {hostkey}",
            f"PidFile {host.sshd_dir / 'sshd.pid'}",
            f"AllowUsers {host.user}",
            "PermitRootLogin no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AuthenticationMethods publickey",
            "UsePAM no",
            "StrictModes yes",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "PrintMotd no",
            "MaxStartups 30:30:100",
            "MaxSessions 20",
            "LogLevel INFO",
            f"Subsystem sftp {SFTP_SERVER}",
            "",
        ]
    )
    changed = write_private(host.sshd_dir / "sshd_config", config, 0o600)
    pid = read_pid(host.sshd_dir / "sshd.pid")
    if pid_alive(pid) and changed:
        stop_sshd(host)
        pid = None
    if not pid_alive(pid):
        run([SSHD, "-t", "-f", host.sshd_dir / "sshd_config"])
        run([SSHD, "-f", host.sshd_dir / "sshd_config", "-E", host.sshd_dir / "sshd.log"])
        wait_port(host.address, SSH_PORT)
        log(host.name, f"sshd listening on {host.address}:{SSH_PORT}")
    # known_hosts from the key we generated (not trust-on-first-use), checked against what is served
    served = run(["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", SSH_PORT, host.address], check=False).stdout
    expected = (host.sshd_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    if " ".join(expected) not in served:
        raise SlipwayError(f"{host.name}: the sshd on {host.address}:{SSH_PORT} does not serve the host key slipway generated; another sshd holds the address — stop it or set SLIPWAY_SANDBOX_INSTANCE")


def stop_sshd(host: Host) -> None:
    pid = read_pid(host.sshd_dir / "sshd.pid")
    if pid_alive(pid):
        # killing the listener leaves open sessions running: end them by pid first
        kill_pids(descendants(pid))
        kill_pids([pid])


def pg(*args, **kwargs):
    """Run a PostgreSQL 15 program (``initdb``, ``pg_ctl``, ``psql``) as the ``postgres`` user."""
    return run([PG_BIN / args[0], *args[1:]], user=pwd.getpwnam("postgres"), **kwargs)


def initdb(pgdata: Path) -> None:
    """A new cluster: superuser ``postgres`` (peer on the socket), scram over TCP, UTF-8."""
    pg("initdb", "-D", pgdata, "-U", "postgres", "--auth-local=peer", "--auth-host=scram-sha-256",
       "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")


def psql_admin(host: Host, sql: str, db: str = "postgres") -> str:
    """Run SQL as the cluster superuser over the unix socket (peer auth); SQL goes on stdin."""
    proc = pg(
        "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", host.pgsock, "-p", PG_PORT, "-U", "postgres", "-d", db, "-f", "-",
        input=sql,
    )
    return proc.stdout.strip()


def ensure_postgres(host: Host, user: pwd.struct_passwd, password: str) -> None:
    pguser = pwd.getpwnam("postgres")
    host.pg_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(host.pg_dir, pguser.pw_uid, pguser.pw_gid)
    host.pgsock.mkdir(mode=0o755, exist_ok=True)
    os.chown(host.pgsock, pguser.pw_uid, pguser.pw_gid)
    # logs readable by the host user (like adm membership on a real host), via the group + setgid
    host.pglog_dir.mkdir(exist_ok=True)
    os.chown(host.pglog_dir, pguser.pw_uid, user.pw_gid)
    os.chmod(host.pglog_dir, 0o2750)
    if not (host.pgdata / "PG_VERSION").exists():
        initdb(host.pgdata)
        log(host.name, "PostgreSQL cluster initialised")
    conf = "\n".join(
        [
            "# written by slipway sandbox",
            f"listen_addresses = '{host.address}'",
            f"port = {PG_PORT}",
            f"unix_socket_directories = '{host.pgsock}'",
            "password_encryption = 'scram-sha-256'",
            "max_connections = 60",
            "shared_buffers = '32MB'",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "logging_collector = on",
            f"log_directory = '{host.pglog_dir}'",
            "log_filename = 'postgresql.log'",
            "log_file_mode = 0640",
            "log_rotation_age = 0",
            "log_rotation_size = 0",
            "log_line_prefix = '%m [%p] %e %q%u@%d '",
            "log_min_error_statement = error",
            "",
        ]
    )
    hba = "\n".join(
        [
            "# written by slipway sandbox",
            "local   all   postgres                 peer",
            f"host    {DB_NAME}  {DB_USER}  {host.address}/32  scram-sha-256",
            f"host    {DB_NAME}  {DB_USER}  127.0.0.1/32     scram-sha-256",
            "",
        ]
    )
    changed = write_private(host.pgdata / "postgresql.auto.conf", conf, 0o600, owner=pguser)
    changed |= write_private(host.pgdata / "pg_hba.conf", hba, 0o600, owner=pguser)
    running = pg("pg_ctl", "-D", host.pgdata, "status", check=False).returncode == 0
    if running and changed:
        pg("pg_ctl", "-D", host.pgdata, "-m", "fast", "-w", "stop")
        running = False
    if not running:
        pg("pg_ctl", "-D", host.pgdata, "-l", host.pg_dir / "startup.log", "-w", "-t", "60", "start")
        log(host.name, f"PostgreSQL 15 listening on {host.address}:{PG_PORT}")
    if not all(c.isalnum() or c in "-_" for c in password):  # token_urlsafe's alphabet: safe in a literal
        raise SlipwayError(f"{host.name}: the DB password in the vault has characters other than [A-Za-z0-9_-]; remove the vault file and re-run `invoke sandbox.up`")
    exists = psql_admin(host, f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'")
    verb = "ALTER" if exists == "1" else "CREATE"
    # the password must not reach the server log, not even as the text of a failed statement
    psql_admin(host, f"SET log_statement = 'none';\nSET log_min_error_statement = 'panic';\n"
                     f"{verb} ROLE {DB_USER} LOGIN PASSWORD '{password}';")
    if psql_admin(host, f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'") != "1":
        psql_admin(host, f"CREATE DATABASE {DB_NAME} OWNER {DB_USER};")
        log(host.name, f"database {DB_NAME} created")


def stop_postgres(host: Host) -> None:
    if not (host.pgdata / "PG_VERSION").exists():
        return
    pid = read_pid(host.pgdata / "postmaster.pid")
    if pid_alive(pid):
        try:
            pg("pg_ctl", "-D", host.pgdata, "-m", "fast", "-w", "-t", "20", "stop", check=False)
        except (SlipwayError, KeyError):
            pass
        kill_pids([pid] + descendants(pid))


def _symlink(target: str, link: Path, owner: pwd.struct_passwd) -> bool:
    """Point ``link`` at ``target`` atomically (rename over the old link). True if changed."""
    if link.is_symlink() and os.readlink(link) == target:
        return False
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.lchown(tmp, owner.pw_uid, owner.pw_gid)
    os.replace(tmp, link)
    return True


def ensure_release(host: Host, user: pwd.struct_passwd, rid: str, build: Path, secrets_: dict) -> bool:
    """Install the built app as ``releases/<rid>`` and point ``current`` at it. True if changed."""
    env_text = "\n".join(
        [
            "# written by slipway sandbox; secrets: mode 0600",
            "NODE_ENV=production",
            f"HOST={host.address}",
            f"PORT={APP_PORT}",
            f"DATABASE_URL={host.database_url(secrets_['slipway_db_password'])}",
            f"API_TOKEN={secrets_['slipway_api_token']}",
            "",
        ]
    )
    changed = write_private(host.app_dir / "shared" / ".env", env_text, 0o600, owner=user)
    release = host.app_dir / "releases" / rid
    if not (release / ".slipway-built").exists():
        tmp = release.with_name(f".{rid}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(build, tmp, symlinks=True)
        os.symlink("../../shared/.env", tmp / ".env")
        os.symlink("../../logs", tmp / "logs")
        chown_tree(tmp, user)
        tmp.rename(release)
        log(host.name, f"release {rid} installed")
        changed = True
    changed |= _symlink(f"releases/{rid}", host.app_dir / "current", user)
    return changed


def user_env(host: Host, user: pwd.struct_passwd, **extra) -> dict:
    env = {
        "HOME": str(host.home),
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "PATH": PATH_ENV,
        "PM2_HOME": str(host.pm2_home),
        "LANG": "C.UTF-8",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def journal_entries() -> list[dict]:
    """The reference app's drizzle journal entries, in order."""
    return json.loads(JOURNAL.read_text())["entries"]


def connect(host: Host, password: str):
    """A psycopg connection to the host's app database as the app's role, over TCP (scram);
    the password goes as a parameter, never into a URL that could be printed."""
    import psycopg

    return psycopg.connect(host=host.address, port=PG_PORT, dbname=DB_NAME, user=DB_USER, password=password, connect_timeout=10)


def db_state(host: Host, password: str) -> str:
    """'empty', 'incident', 'healthy' or 'other', from the live database."""
    with connect(host, password) as conn:
        tracked = conn.execute("SELECT to_regclass('drizzle.__drizzle_migrations') IS NOT NULL").fetchone()[0]
        if not tracked:
            return "empty"
        rows = conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0]
        has_unique = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = %s", (UNIQUE_CONSTRAINT,)).fetchone()[0]
    total = len(journal_entries())
    if rows == total and has_unique:
        return "healthy"
    if rows == total - 1 and not has_unique:
        return "incident"
    return "other"


def drizzle_migrate(host: Host, user: pwd.struct_passwd, password: str, upto: int | None) -> None:
    """Apply migrations with drizzle-orm's own migrator (the app's scripts/migrate.js), as the host
    user; ``upto`` limits the journal to its first ``upto`` entries (the incident's history)."""
    current = host.app_dir / "current"
    source = current / "migrations"
    with tempfile.TemporaryDirectory(dir=host.home, prefix=".migrations-") as tmp:
        folder = Path(tmp) / "migrations"
        shutil.copytree(source, folder)
        if upto is not None:
            journal_path = folder / "meta" / "_journal.json"
            journal = json.loads(journal_path.read_text())
            journal["entries"] = journal["entries"][:upto]
            journal_path.write_text(json.dumps(journal, indent=2))
        chown_tree(Path(tmp), user)
        env = user_env(host, user, DATABASE_URL=host.database_url(password))
        proc = run(["node", "scripts/migrate.js", folder], cwd=current, env=env, user=user, check=False)
        if proc.returncode != 0:
            raise SlipwayError(f"{host.name}: drizzle migrate failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def seed(host: Host, password: str) -> None:
    with connect(host, password) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (id, email, display_name) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", USERS
            )
            cur.executemany(
                "INSERT INTO books (id, title, author, language) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", BOOKS
            )
            for book, view_type, counts in STATS:
                for n, count in enumerate(counts):
                    cur.execute(
                        "INSERT INTO book_view_statistics (book_id, view_type, view_count, last_viewed_at)"
                        " VALUES (%s, %s, %s, now() - make_interval(days => %s))",
                        (book, view_type, count, n + 1),
                    )


def ensure_database_state(host: Host, user: pwd.struct_passwd, password: str, want: str) -> bool:
    have = db_state(host, password)
    if have == want:
        return False
    total = len(journal_entries())
    if have == "incident" and want == "healthy":
        drizzle_migrate(host, user, password, None)
        log(host.name, "database moved to healthy state (0007 applied by drizzle's migrator)")
        return True
    if have != "empty":
        # a sandbox database in another state is rebuilt (it only ever holds seed data)
        psql_admin(host, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE);\nCREATE DATABASE {DB_NAME} OWNER {DB_USER};")
        log(host.name, f"database {DB_NAME} rebuilt (was {have})")
    drizzle_migrate(host, user, password, total - 1)
    seed(host, password)
    if want == "healthy":
        drizzle_migrate(host, user, password, None)
    log(host.name, f"database in {want} state ({'all migrations applied' if want == 'healthy' else '0007 not applied, duplicate rows seeded'})")
    return True


def pm2(host: Host, user: pwd.struct_passwd, *args, check=True, timeout=90):
    return run(["pm2", *args], env=user_env(host, user), cwd=host.home, user=user, check=check, timeout=timeout)


def pm2_app_state(host: Host, user: pwd.struct_passwd) -> dict:
    if daemon_pid(str(host.pm2_home)) is None:
        return app_summary([], APP_NAME)
    return app_summary(summarize_jlist(pm2(host, user, "jlist").stdout), APP_NAME)


def pm2_start_env(host: Host, user: pwd.struct_passwd) -> dict:
    """The environment slipway.core.pm2_app gives pm2: the `current` link's own path (APP_CURRENT,
    read by the ecosystem file for cwd/script, so later reloads run whatever `current` points at),
    the release it points at now (RELEASE_ID, reported by /api/health) and, for the PM2 daemon this
    may start, NODE_CLUSTER_SCHED_POLICY=none (round-robin hand-off loses connections in reloads)."""
    current = host.app_dir / "current"
    return user_env(host, user, APP_CURRENT=current, RELEASE_ID=os.path.basename(os.path.realpath(current)),
                    NODE_CLUSTER_SCHED_POLICY="none")


def ensure_app(host: Host, user: pwd.struct_passwd, release_changed: bool) -> bool:
    state = pm2_app_state(host, user)
    current = host.app_dir / "current"
    changed = False
    started_elsewhere = state["cwd"] != [str(current)]
    if release_changed or started_elsewhere or not state["instances"] or state["online"] != state["instances"]:
        # The sandbox starts a new release afresh (delete + start); zero-downtime switching is the
        # deploy's job (pm2_app). It starts the app the way pm2_app does, from the `current` link's
        # own path, so a later deploy's `pm2 reload` runs the new release's code; processes started
        # from a release's real path (an older sandbox) are started again the same way.
        if state["instances"]:
            pm2(host, user, "delete", APP_NAME, check=False)
        run(["pm2", "start", current / "ecosystem.config.js"], env=pm2_start_env(host, user), cwd=host.app_dir,
            user=user, timeout=90)
        log(host.name, f"PM2 started {APP_NAME} (cluster mode)")
        changed = True
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = http_json("GET", f"{host.app_url}/api/health", timeout=2)
            if status == 200:
                return changed
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise SlipwayError(f"{host.name}: the app did not become healthy at {host.app_url}/api/health ({last}); see {host.app_dir}/logs/err.log")


def up_host(host: Host, user: pwd.struct_passwd, ctl: Controller, rid: str, build: Path, want: str) -> bool:
    creds = ctl.secrets_for(host.name)
    ensure_dirs(host, user)
    ensure_sshd(host, user, ctl)
    ensure_postgres(host, user, creds["slipway_db_password"])
    release_changed = ensure_release(host, user, rid, build, creds)
    db_changed = ensure_database_state(host, user, creds["slipway_db_password"], want)
    app_changed = ensure_app(host, user, release_changed)
    return release_changed or db_changed or app_changed


def down_host(host: Host) -> None:
    try:
        user = pwd.getpwnam(host.user)
    except KeyError:
        user = None
    if user is not None:
        if daemon_pid(str(host.pm2_home)) is not None:
            pm2(host, user, "kill", check=False, timeout=30)
        # every process of the user (PM2 daemon, app workers, ssh sessions), by pid
        kill_pids(user_pids(user.pw_uid))
    stop_sshd(host)
    stop_postgres(host)
    if user is not None:
        kill_pids(user_pids(user.pw_uid), grace=2)
        run(["userdel", host.user], check=False)
        try:
            grp.getgrnam(host.user)
            run(["groupdel", host.user], check=False)
        except KeyError:
            pass
    if host.root.exists():
        shutil.rmtree(host.root)


# --------------------------------------------------------------------------------------------
# Inventory and ssh_config
# --------------------------------------------------------------------------------------------
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


def write_inventory(hosts: list[Host], ctl: Controller) -> None:
    inventory = {
        "all": {
            "children": {
                "sandboxes": {"hosts": {h.name: host_vars(h, ctl) for h in hosts}},
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


# --------------------------------------------------------------------------------------------
# Public operations
# --------------------------------------------------------------------------------------------
def up(count: int = 1, state: str = "incident") -> list[Host]:
    if state not in STATES:
        raise SlipwayError(f"unknown state {state!r}; use --state incident or --state healthy")
    if not 1 <= count <= MAX_HOSTS:
        raise SlipwayError(f"--hosts {count} is out of range; use 1 to {MAX_HOSTS}")
    preflight()
    ctl = Controller()
    ctl.ensure()
    record = ctl.load_state()
    hosts = [Host.make(i) for i in range(1, count + 1)]
    started = time.monotonic()
    print(f"sandbox: {count} host(s), state {state}", flush=True)

    extra = sorted(set(record["hosts"]) - {h.name for h in hosts})
    for name in extra:
        index = record["hosts"][name]["index"]
        down_host(Host.make(index))
        record["hosts"].pop(name)
        log(name, "removed (not in the requested --hosts)")
    rid, build = build_app(ctl)
    users = {h.name: ensure_user(h, record, ctl) for h in hosts}  # serially: useradd locks /etc/passwd
    for h in hosts:
        record["hosts"][h.name] = {"index": h.index, "user": h.user, "address": h.address, "root": str(h.root)}
    ctl.save_state(record)
    with ThreadPoolExecutor(max_workers=min(4, count)) as pool:
        futures = {h.name: pool.submit(up_host, h, users[h.name], ctl, rid, build, state) for h in hosts}
        results = {}
        errors = []
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except SlipwayError as exc:
                errors.append(str(exc))
            except Exception as exc:  # psycopg, OS errors: still one line, never a traceback
                errors.append(f"{name}: {type(exc).__name__}: {redact_text(str(exc)).splitlines()[0] if str(exc) else ''}; "
                              "fix the cause, then `invoke sandbox.down` and `invoke sandbox.up` again")
    if errors:
        raise SlipwayError(errors[0])
    record["state"] = state
    record["release"] = rid
    ctl.save_state(record)
    write_inventory(hosts, ctl)
    for h in hosts:
        log(h.name, f"{'changed' if results[h.name] else 'unchanged'}: {h.app_url} (ssh {h.user}@{h.address}:{SSH_PORT})")
    print(f"sandbox: up in {time.monotonic() - started:.1f}s; inventory {ctl.inventory_file}", flush=True)
    return hosts


def down() -> None:
    if os.geteuid() != 0:
        raise SlipwayError("sandbox.down needs root (it removes the hosts' users and processes); run it as root")
    ctl = Controller()
    record = ctl.load_state()
    started = time.monotonic()
    indexes = {int(v["index"]) for v in record.get("hosts", {}).values()}
    # also what a half-finished `up` left: users whose home is ours, host dirs
    base = hosts_base()
    names = {Path(e.pw_dir).parent.name for e in pwd.getpwall() if e.pw_dir.startswith(f"{base}/")}
    if base.exists():
        names |= {child.name for child in base.iterdir()}
    indexes |= {i for i in map(host_index, names) if i is not None}
    for index in sorted(indexes):
        host = Host.make(index)
        down_host(host)
        log(host.name, "down: processes ended, user and files removed")
    for name in record.get("users", []):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        kill_pids(user_pids(entry.pw_uid))
        run(["userdel", name], check=False)
    if base.exists():
        shutil.rmtree(base)
    if ctl.dir.exists():
        shutil.rmtree(ctl.dir)
    print(f"sandbox: down in {time.monotonic() - started:.1f}s", flush=True)


def hosts_in_record(ctl: Controller | None = None) -> list[Host]:
    ctl = ctl or Controller()
    record = ctl.load_state()
    return [Host.make(int(v["index"])) for _, v in sorted(record.get("hosts", {}).items(), key=lambda kv: kv[1]["index"])]


def find_host(name: str, ctl: Controller | None = None) -> Host:
    ctl = ctl or Controller()
    for host in hosts_in_record(ctl):
        if host.name == name:
            return host
    known = ", ".join(h.name for h in hosts_in_record(ctl)) or "none; run `invoke sandbox.up`"
    raise SlipwayError(f"no sandbox host named {name!r} (sandbox hosts: {known})")


def env_lines(name: str) -> list[str]:
    """``export`` lines for one host, for `eval` in a shell (the only place secrets are printed,
    on request, to the user's own terminal)."""
    ctl = Controller()
    host = find_host(name, ctl)
    creds = vault.load(ctl.vault_file(host.name), ctl.vault_password_file)
    import shlex

    return [
        f"export APP_URL={shlex.quote(host.app_url)}",
        f"export API_TOKEN={shlex.quote(creds['slipway_api_token'])}",
        f"export DATABASE_URL={shlex.quote(host.database_url(creds['slipway_db_password']))}",
        f"export SLIPWAY_SMOKE_BOOK_ID={SMOKE_BOOK}",
    ]
