"""A throwaway, real PostgreSQL 15 cluster for the migration-engine tests.

initdb as ``postgres`` under /tmp, listening on 127.0.0.1 at its own port, scram over TCP for a
test role with CREATEDB and CREATEROLE (public histories create roles); each test gets a fresh database. Nothing here is a mock.
"""
from __future__ import annotations

import pwd
import secrets
import shutil
import uuid
from pathlib import Path

import psycopg

from slipway import sandbox as sb

ADDRESS = "127.0.0.1"


class Cluster:
    def __init__(self, instance: int):
        self.root = Path(f"/tmp/slipway-testpg-{instance}")
        self.port = 25432 + instance
        self.user = "slipway_t"
        self.password = secrets.token_urlsafe(18)
        self.pguser = pwd.getpwnam("postgres")

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        self.stop()
        self.root.mkdir(mode=0o700)
        shutil.chown(self.root, self.pguser.pw_uid, self.pguser.pw_gid)
        sb.initdb(self.data)
        (self.data / "postgresql.auto.conf").write_text(
            f"listen_addresses = '{ADDRESS}'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 40\n"
        )
        (self.data / "pg_hba.conf").write_text(
            f"local all postgres peer\nhost all {self.user} {ADDRESS}/32 scram-sha-256\n"
        )
        sb.pg("pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-w", "-t", "60", "start")
        sb.pg("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.root, "-p", self.port, "-U", "postgres",
              "-d", "postgres", "-f", "-",
              input=f"SET log_statement = 'none';\nCREATE ROLE {self.user} LOGIN CREATEDB CREATEROLE PASSWORD '{self.password}';\n")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            pid = sb.read_pid(self.data / "postmaster.pid")
            sb.pg("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False)
            sb.kill_pids([p for p in [pid] if p])
        if self.root.exists():
            shutil.rmtree(self.root)

    def dsn(self, dbname: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{ADDRESS}:{self.port}/{dbname}"

    def connect(self, dbname: str, **kwargs) -> psycopg.Connection:
        return psycopg.connect(host=ADDRESS, port=self.port, user=self.user, password=self.password,
                               dbname=dbname, autocommit=True, **kwargs)

    def createdb(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with self.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name
