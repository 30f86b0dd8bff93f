"""`invoke lint`, `invoke molecule` and `invoke test`: slipway's own checks."""
from __future__ import annotations

import os
import shlex

from invoke import task

from ..paths import ROOT

VENV_BIN = ROOT / ".venv" / "bin"


@task
def lint(c):
    """ruff over slipway's Python (ruff.toml), then ansible-lint (production profile, offline) over playbooks, roles and the collection."""
    c.run(shlex.join([str(VENV_BIN / "ruff"), "check", "--quiet", str(ROOT)]), pty=False)
    c.run(f"{VENV_BIN / 'ansible-lint'} --offline -q", pty=False)


@task(help={"scenario": "one scenario (a role name); default: all of them"})
def molecule(c, scenario=""):
    """Molecule: one scenario per role on a real sandbox host (create, converge, idempotence, verify, destroy)."""
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # molecule runs ansible-* by name
    which = ["-s", scenario] if scenario else ["--all"]
    c.run(shlex.join([str(VENV_BIN / "molecule"), "test", *which]), env=env, pty=False)


@task(help={"k": "pytest -k expression (skips Molecule)", "x": "stop at the first failure",
            "no_molecule": "run lint and pytest only"})
def test(c, k="", x=False, no_molecule=False):
    """The whole test suite: ansible-lint, pytest against real sandbox hosts, then every Molecule scenario (needs root)."""
    lint(c)
    args = ["-ra", "-p", "no:cacheprovider"]
    if k:
        args += ["-k", k]
    if x:
        args.append("-x")
    c.run(shlex.join([str(VENV_BIN / "python"), "-m", "pytest", *args, "tests"]), pty=False)
    if not k and not no_molecule:
        molecule(c)


TASKS = (lint, molecule, test)
