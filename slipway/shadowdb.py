"""An ephemeral PostgreSQL on the controller, for the drift check's shadow when the host's database
role may not create a database: the server's own major version (the catalogs print definitions as
that version does), initdb into a private temporary directory, a unix socket there and no TCP
listener, trust authentication (only this directory's owner can reach the socket), stopped and
removed when the ``with`` block ends.

Run as root (CI, a root controller), initdb refuses to run: the cluster then belongs to the
``postgres`` user when there is one, else ``nobody``."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from .errors import SlipwayError

USER = "slipway_shadow"


def bindir(major: int) -> Path:
    """The server binaries of PostgreSQL ``major`` on this machine (Debian's layout, else pg_config's)."""
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "initdb").is_file():
        return debian
    pg_config = shutil.which("pg_config")
    if pg_config:
        proc = subprocess.run([pg_config, "--bindir", "--version"], capture_output=True, text=True, check=False)
        lines = proc.stdout.split("\n")
        if proc.returncode == 0 and len(lines) > 1 and lines[1].split()[1:2] and \
                lines[1].split()[1].split(".")[0] == str(major) and (Path(lines[0]) / "initdb").is_file():
            return Path(lines[0])
    raise SlipwayError(f"the drift check needs a PostgreSQL {major} server on this controller for its shadow database "
                       f"(the host's database role may not create one); install postgresql-{major} here, or grant the "
                       f"role CREATEDB (ALTER ROLE ... CREATEDB) so the shadow is built next to the live database")


def _owner() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise SlipwayError("running as root, the shadow PostgreSQL needs a user to run as (postgres or nobody); "
                       "create one, or run slipway as an ordinary user")


@contextlib.contextmanager
def cluster(major: int):
    """``connect(dbname)`` of a fresh, running PostgreSQL ``major`` (autocommit connections)."""
    import psycopg

    bins = bindir(major)
    owner = _owner()
    root = Path(tempfile.mkdtemp(prefix="slipway-shadow-"))
    as_owner = {}
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    data = root / "data"

    # the server gets none of this process's environment (a webhook URL, a vault password file path)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

    def run(*argv):
        proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, cwd=root,
                              stdin=subprocess.DEVNULL, env=env, **as_owner)
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise SlipwayError(f"the shadow PostgreSQL did not start ({Path(str(argv[0])).name}: "
                               f"{said[-1] if said else 'no output'}); check {bins} on this controller")

    def stop_here(signum, _frame):  # SIGTERM/SIGHUP end the block: the server is stopped, the directory removed
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop_here) for sig in (signal.SIGTERM, signal.SIGHUP)
                if threading.current_thread() is threading.main_thread()}
    try:
        run(bins / "initdb", "-D", data, "-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        run(bins / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
            f"-c listen_addresses='' -c unix_socket_directories='{root}' -c fsync=off -c full_page_writes=off "
            f"-c synchronous_commit=off", "start")

        def connect(dbname: str):
            return psycopg.connect(host=str(root), user=USER, dbname=dbname, autocommit=True,
                                   application_name="slipway-shadow")

        yield connect
    finally:
        if (data / "postmaster.pid").exists():  # started, even when pg_ctl's wait timed out
            subprocess.run([str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, check=False, cwd=root, stdin=subprocess.DEVNULL, env=env, **as_owner)
        shutil.rmtree(root, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
