"""Unit tests of the collection's shared code (pure functions; no host needed)."""
from __future__ import annotations

import json

import pytest

from slipway.paths import import_module_utils

import_module_utils()
from ansible_collections.slipway.core.plugins.module_utils import pm2, redact  # noqa: E402

PW = "s3cr3t-Pa55_word"
TOKEN = "tok_abcdefghijklmnopqrstuvwxyz012345"


def test_redact_text_masks_urls_pairs_bearer_and_known_values():
    text = (
        f"DATABASE_URL=postgres://booksuser:{PW}@127.0.0.1:5432/booksdb "
        f"API_TOKEN={TOKEN} PORT=3000 Authorization: Bearer {TOKEN} "
        f'{{"DB_PASSWORD": "{PW}", "HOST": "127.0.0.1"}} other {PW}'
    )
    out = redact.redact_text(text, known=[PW])
    assert PW not in out and TOKEN not in out
    assert "PORT=3000" in out and '"HOST": "127.0.0.1"' in out
    assert redact.redact_text(f"postgres://u:{PW}@h/db") == "postgres://u:***@h/db"


def test_redact_mapping_masks_secret_keys_deeply():
    data = {"env": {"DATABASE_URL": f"postgres://u:{PW}@h/db", "API_TOKEN": TOKEN, "PORT": "3000"},
            "list": [{"password": PW}], "note": f"url postgres://u:{PW}@h/db"}
    out = redact.redact_mapping(data)
    assert PW not in json.dumps(out) and TOKEN not in json.dumps(out)
    assert out["env"]["PORT"] == "3000"


def test_summarize_jlist_never_returns_the_environment():
    raw = json.dumps([
        {"name": "ollama-reader", "pm_id": 0, "pid": 101, "monit": {"memory": 1, "cpu": 0},
         "pm2_env": {"status": "online", "restart_time": 1, "unstable_restarts": 0, "exec_mode": "cluster_mode",
                     "pm_cwd": "/app/releases/r1", "DATABASE_URL": f"postgres://u:{PW}@h/db", "API_TOKEN": TOKEN,
                     "RELEASE_ID": "r1", "env": {"DATABASE_URL": f"postgres://u:{PW}@h/db"}}},
        {"name": "ollama-reader", "pm_id": 1, "pid": 102, "monit": {},
         "pm2_env": {"status": "launching", "restart_time": 0, "unstable_restarts": 2}},
    ])
    procs = pm2.summarize_jlist("some daemon banner\n" + raw)
    assert PW not in json.dumps(procs) and TOKEN not in json.dumps(procs)
    assert procs[0]["release"] == "r1" and procs[0]["pm_cwd"] == "/app/releases/r1"
    app = pm2.app_summary(procs, "ollama-reader")
    assert app == {"name": "ollama-reader", "instances": 2, "online": 1, "pids": [101, 102], "restarts": 1,
                   "unstable_restarts": 2, "statuses": ["launching", "online"], "cwd": ["/app/releases/r1"]}


def test_summarize_jlist_rejects_garbage():
    for bad in ("", "not json", "[{broken"):
        try:
            pm2.summarize_jlist(bad)
        except ValueError as exc:
            assert "pm2 jlist" in str(exc)
        else:
            raise AssertionError(f"accepted {bad!r}")


@pytest.mark.parametrize("module, option", [("pm2_info", "app_name"), ("pg_migrations", "migrations_path")])
def test_collection_resolves_by_fqcn_from_the_checkout(module, option):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, ANSIBLE_CONFIG=str(root / "ansible.cfg"))
    doc = subprocess.run([str(Path(sys.executable).parent / "ansible-doc"), "--json", f"slipway.core.{module}"],
                         capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert doc.returncode == 0, doc.stderr
    info = json.loads(doc.stdout)[f"slipway.core.{module}"]["doc"]
    assert info["module"] == module and option in info["options"]
