"""The inventory seam (no root, no hosts): production code never imports the sandbox, and a bad
sandbox setting never fails a production command."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT

PRODUCTION = ("slipway.deploy", "slipway.runner", "slipway.remote", "slipway.inventory", "slipway.release",
              "slipway.backups", "slipway.smoke", "slipway.migrations", "slipway.journal", "slipway.vault",
              "slipway.cli.deploy", "slipway.cli.db", "slipway.cli.hosts")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=120)


def test_production_modules_do_not_import_the_sandbox():
    proc = _python(f"""
        import importlib, sys
        for name in {PRODUCTION!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.startswith("slipway.sandbox")))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_a_bad_sandbox_instance_does_not_break_a_production_inventory(tmp_path):
    # the sandbox is registered (as tasks.py does) but $SLIPWAY_SANDBOX_INSTANCE is invalid: the
    # production inventory answers, and the error is about the inventory, not the sandbox
    proc = _python("""
        from slipway import inventory, sandbox
        from slipway.errors import SlipwayError
        sandbox.register()
        print(inventory.sources())
        try:
            inventory.resolve_target("prod")
        except SlipwayError as exc:
            print(exc)
    """, SLIPWAY_SANDBOX_INSTANCE="not-a-number")
    assert proc.returncode == 0, proc.stderr
    sources, error = proc.stdout.strip().splitlines()
    assert "SLIPWAY_SANDBOX_INSTANCE" not in proc.stdout
    assert error.startswith("no inventory") or error.startswith("no host or group named 'prod'"), error
