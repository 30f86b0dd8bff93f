"""Fixtures: real sandbox hosts (own users, sshd, PostgreSQL 15, PM2) started through the CLI.

The suite uses sandbox instance 1 (users sw1-*, addresses 127.0.0.31+, .sandbox-1/), so it
never touches a demo sandbox (instance 0) that may be up on the same machine.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from instances import sandbox_instance

from slipway import sandbox as sb

ROOT = Path(__file__).resolve().parent.parent

os.environ["SLIPWAY_SANDBOX_INSTANCE"] = "1"  # the sandbox reads it at call time
os.environ.pop("SLIPWAY_SANDBOX_DIR", None)
sb.register()  # in-process slipway calls (run_playbook, the deploy lock) find the sandbox's hosts

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


class Outputs:
    """Every stdout/stderr the suite's CLI calls produced, for the secret scan."""

    texts: list[str] = []


def cli(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None,
        prints_secrets: bool = False) -> subprocess.CompletedProcess:
    """Run `invoke <args>` as a user would (``env``: extra environment variables); returns the
    process with text stdout/stderr, which the secret scan also sees unless the command prints
    secrets on purpose (``sandbox.env``)."""
    proc = subprocess.run(
        [*INVOKE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    if not prints_secrets:
        Outputs.texts += [proc.stdout, proc.stderr]
    if check and proc.returncode != 0:
        raise AssertionError(f"invoke {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def host_env(name: str, env: dict | None = None) -> dict:
    """APP_URL / API_TOKEN / DATABASE_URL of a host, parsed from `invoke sandbox.env` like `eval` would
    (``env``: e.g. another SLIPWAY_SANDBOX_INSTANCE)."""
    out = cli("sandbox.env", "--host", name, env=env, prints_secrets=True).stdout
    values = {}
    for line in out.splitlines():
        assert line.startswith("export "), line
        key, _, value = line[len("export "):].partition("=")
        values[key] = shlex.split(value)[0]
    return values


@contextlib.contextmanager
def sandbox_up(instance: str, hosts: int = 1, state: str = "incident", switch: bool = False):
    """The body of every sandbox fixture: root checked, instance ``instance`` brought down and up
    again with ``hosts`` hosts in ``state``, its environment ({SLIPWAY_SANDBOX_INSTANCE: ...})
    yielded, and taken down afterwards. ``switch``: in-process calls use the instance too, for
    the fixture's whole life."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root: the sandbox creates users, sshd, PostgreSQL clusters and PM2")
    env = {"SLIPWAY_SANDBOX_INSTANCE": str(instance)}
    with sandbox_instance(instance) if switch else contextlib.nullcontext():
        cli("sandbox.down", env=env)
        cli("sandbox.up", "--hosts", str(hosts), "--state", state, env=env)
        try:
            yield env
        finally:
            cli("sandbox.down", env=env)


@pytest.fixture(scope="session")
def pgc():
    if os.geteuid() != 0:
        pytest.fail("the engine tests need root: they start a PostgreSQL cluster as the postgres user")
    from pgcluster import Cluster

    # SLIPWAY_TEST_PG_INSTANCE: another cluster (its own port and directory), e.g. beside a suite already running
    cluster = Cluster(int(os.environ.get("SLIPWAY_TEST_PG_INSTANCE") or int(os.environ["SLIPWAY_SANDBOX_INSTANCE"]) + 10))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def db(pgc):
    return pgc.createdb()


@pytest.fixture(scope="session")
def node_modules(sandbox2):
    """drizzle-orm and pg as pinned by the reference app (the sandbox's `npm ci` build)."""
    _, build = sb.build_app(sb.Controller())
    assert (build / "node_modules" / "drizzle-orm" / "package.json").exists()
    return build / "node_modules"


@pytest.fixture(scope="session")
def sandbox2():
    """Two hosts of instance 1 in the incident state; torn down at the end of the session."""
    with sandbox_up("1", hosts=2, state="incident"):
        hosts = {h.name: h for h in sb.hosts_in_record()}
        envs = {name: host_env(name) for name in hosts}
        yield {"hosts": hosts, "env": envs}
