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
    base = ["--base-config", str(ROOT / ".config" / "molecule" / "config.yml")]  # also outside a git checkout
    c.run(shlex.join([str(VENV_BIN / "molecule"), *base, "test", *which]), env=env, pty=False)


@task(help={"k": "pytest -k expression (skips Molecule)", "x": "stop at the first failure",
            "no_molecule": "run lint and pytest only",
            "unit": "only tests/unit: no root, no hosts, seconds (no lint, no Molecule)"})
def test(c, k="", x=False, no_molecule=False, unit=False):
    """The whole test suite: lint (ruff, ansible-lint), pytest (tests/unit, then tests/integration against real sandbox hosts), then every Molecule scenario (needs root); --unit: the unit tests alone."""
    args = ["-ra", "-p", "no:cacheprovider"]
    if k:
        args += ["-k", k]
    if x:
        args.append("-x")
    if unit:
        c.run(shlex.join([str(VENV_BIN / "python"), "-m", "pytest", *args, str(ROOT / "tests" / "unit")]), pty=False)
        return
    lint(c)
    c.run(shlex.join([str(VENV_BIN / "python"), "-m", "pytest", *args, str(ROOT / "tests" / "unit"),
                      str(ROOT / "tests" / "integration")]), pty=False)
    if not k and not no_molecule:
        molecule(c)


TASKS = (lint, molecule, test)
