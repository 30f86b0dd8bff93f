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

A leaf package: only tasks.py, the tests, bench/ and Molecule import it; production code never
does (the sandbox adds its inventory to ``slipway.inventory`` through :func:`register`).
Modules: ``layout`` (instance, dirs, one host's layout), ``processes`` (run/wait/kill helpers),
``controller`` (keys, known_hosts, vault), ``provision`` (user, sshd, PostgreSQL, release, PM2),
``data`` (the incident and healthy database states), ``inventory`` (the generated inventory),
``ops`` (up, down, finding hosts).
"""
from __future__ import annotations

import pwd  # noqa: F401 - tests use sb.pwd

from .. import vault  # noqa: F401 - tests use sb.vault
from ..paths import READER_APP, ROOT  # noqa: F401
from ..release import app_files, release_id  # noqa: F401
from .controller import (  # noqa: F401 - the sandbox's API, one namespace for tasks, tests and bench
    Controller,
)
from .data import (  # noqa: F401 - the sandbox's API, one namespace for tasks, tests and bench
    BOOKS,
    INCIDENT_BOOK,
    SMOKE_BOOK,
    STATS,
    UNIQUE_CONSTRAINT,
    USERS,
    connect,
    db_state,
    drizzle_migrate,
    ensure_database_state,
    journal_entries,
    seed,
)
from .inventory import (  # noqa: F401 - the sandbox's API, one namespace for tasks, tests and bench
    host_vars,
    register,
    source,
    write_inventory,
)
from .layout import (  # noqa: F401 - the sandbox's API, one namespace for tasks, tests and bench
    APP_NAME,
    APP_PORT,
    DB_NAME,
    DB_USER,
    JOURNAL,
    MAX_HOSTS,
    PATH_ENV,
    PG_BIN,
    PG_PORT,
    SFTP_SERVER,
    SSH_PORT,
    SSHD,
    STATES,
    SYSTEM_PYTHON,
    Host,
    controller_dir,
    host_index,
    host_name,
    hosts_base,
    instance,
    log,
)
from .ops import (  # noqa: F401 - the sandbox's API, one namespace for tasks, tests and bench
    down,
    down_host,
    env_lines,
    find_host,
    hosts_in_record,
    up,
    up_host,
)
from .processes import (  # noqa: F401 - the sandbox's API, one namespace for tasks, tests and bench
    chown_tree,
    descendants,
    http_json,
    kill_pids,
    pid_alive,
    processes,
    read_pid,
    run,
    user_pids,
    wait_for_line,
    wait_port,
)
from .provision import (  # noqa: F401 - the sandbox's API, one namespace for tasks, tests and bench
    _symlink,
    build_app,
    ensure_app,
    ensure_dirs,
    ensure_postgres,
    ensure_release,
    ensure_sshd,
    ensure_user,
    initdb,
    pg,
    pm2,
    pm2_app_state,
    pm2_start_env,
    preflight,
    psql_admin,
    stop_postgres,
    stop_sshd,
    user_env,
)
