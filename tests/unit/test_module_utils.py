"""Unit tests of the collection's shared code (pure functions; no host needed)."""
from __future__ import annotations

import json

import pytest
from ansible_collections.slipway.core.plugins.module_utils import http_client, layout, oneline, pm2, postgres, redact

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

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, ANSIBLE_CONFIG=str(root / "ansible.cfg"))
    doc = subprocess.run([str(Path(sys.executable).parent / "ansible-doc"), "--json", f"slipway.core.{module}"],
                         capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert doc.returncode == 0, doc.stderr
    info = json.loads(doc.stdout)[f"slipway.core.{module}"]["doc"]
    assert info["module"] == module and option in info["options"]


# -- one_line: the one formatter of one-line messages ----------------------------------------------
def test_one_line_folds_cuts_and_picks_lines():
    text = "\x1b[31mError:\x1b[0m  listen\n\n  EADDRINUSE  :3000 \nnext line\n"
    assert oneline.one_line(text) == "Error: listen EADDRINUSE :3000 next line"
    assert oneline.one_line("x" * 10, 8) == "xxxxx..." and oneline.one_line("x" * 8, 8) == "x" * 8
    assert oneline.one_line("a b c d", 4, ellipsis="…") == "a b…"
    assert oneline.one_line(text, pick="first") == "Error:  listen"
    assert oneline.one_line(text, pick="last") == "next line"
    assert oneline.one_line("notice\nFATAL: no such db\nerror: other", pick="error") == "FATAL: no such db"
    assert oneline.one_line("just\nlines", pick="error") == "just"
    assert oneline.one_line("a\n\nb\nc\nd", pick=3) == "b | c | d"
    assert oneline.one_line("  \n", pick="last", default="no output") == "no output"
    assert oneline.one_line(None) == ""


# -- postgres: the one door (login options -> psycopg keywords, client argv/env) -------------------
LOGIN = {"login_host": "db.internal", "login_port": 5433, "login_user": "booksuser", "login_password": PW,
         "login_db": "booksdb", "connect_timeout": 7}


def test_client_programs_get_the_password_only_in_their_environment():
    argv = postgres.client_argv("/usr/bin/pg_dump", LOGIN, ["-Fc"], ["--", "x"], no_password=True)
    assert argv == ["/usr/bin/pg_dump", "-Fc", "--no-password", "-h", "db.internal", "-p", "5433", "-U", "booksuser",
                    "-d", "booksdb", "--", "x"]
    assert PW not in " ".join(argv)
    env = postgres.client_env(LOGIN, base={"PATH": "/bin", "PGPASSWORD": "inherited"})
    assert env == {"PATH": "/bin", "PGPASSWORD": PW, "PGCONNECT_TIMEOUT": "7"}
    bare = dict(LOGIN, login_host=None, login_user=None, login_password=None, login_db=None)
    assert postgres.client_argv("psql", bare) == ["psql", "-p", "5433"]
    assert postgres.client_env(bare, base={"PGPASSWORD": "inherited"}, connect_timeout=1) == {"PGCONNECT_TIMEOUT": "1"}
    assert postgres.where(bare) == "local socket:5433/None"


def test_connect_params_never_let_the_default_port_override_a_dsn():
    assert postgres.connect_params(LOGIN) == {"host": "db.internal", "port": 5433, "user": "booksuser",
                                              "password": PW, "dbname": "booksdb"}
    assert postgres.connect_params(dict(LOGIN, login_host=None), dsn="postgresql://h:6000/db")["port"] is None
    assert postgres.connect_params(dict(LOGIN, login_host=None))["port"] == 5433
    assert postgres.secrets(LOGIN, "postgresql://u:dsnpw@h/db") == [PW, "dsnpw"]


def test_connect_failure_is_one_line_without_the_password():
    with pytest.raises(postgres.ConnectError) as failed:
        postgres.connect("postgresql://u:dsnpw@127.0.0.1:1/db", connect_timeout=2, password=PW)
    message = str(failed.value)
    assert message.startswith("cannot connect to PostgreSQL: ") and "\n" not in message
    assert PW not in message and "dsnpw" not in message


# -- layout: the host-side paths ------------------------------------------------------------------
def test_layout_names_the_host_paths_once():
    assert layout.state_dir("/srv/app/") == "/srv/app/.slipway"
    assert layout.lock_paths("/srv/app") == ("/srv/app/.slipway", "/srv/app/.slipway/deploy.lock",
                                             "/srv/app/.slipway/deploy.lock.json")
    assert layout.run_journal("/srv/app", "r-1") == "/srv/app/.slipway/runs/r-1.jsonl"
    assert layout.deploys_file("/srv/app") == "/srv/app/.slipway/deploys.jsonl"
    assert layout.incoming_archive("/srv/app", "r1") == "/srv/app/.slipway/incoming/r1.tar.gz"
    assert layout.current_link("/srv/app") == "/srv/app/current" and layout.current_target("r1") == "releases/r1"
    assert layout.built_marker(layout.release_dir("/srv/app", "r1")) == "/srv/app/releases/r1/.slipway-built"
    assert layout.SHARED_LINKS == {".env": "../../shared/.env", "logs": "../../logs"}
    assert layout.is_staging(layout.staging_name("r1")) and not layout.is_staging("r1")
    assert not layout.is_staging(layout.aside_name("r1", 1700000000))


# -- http_client: the one HTTP client --------------------------------------------------------------
@pytest.fixture
def http_server():
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = json.dumps({"got": json.loads(body), "type": self.headers["Content-Type"],
                                 "auth": self.headers.get("Authorization")}).encode()
            self.send_response(404)
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"plain " + b"x" * 100)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def test_http_client_answers_error_statuses_and_ignores_proxies(http_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that does not exist
    monkeypatch.delenv("no_proxy", raising=False)
    client = http_client.HttpClient(timeout=5)
    status, text, doc = client.request(http_server + "/x", "post", {"a": 1}, {"Authorization": "Bearer t"})
    assert status == 404 and doc == {"got": {"a": 1}, "type": "application/json", "auth": "Bearer t"}
    status, text, doc = client.request(http_server + "/", limit=10)
    assert (status, text, doc) == (200, "plain xxxx", None)


def test_http_client_raises_when_no_answer_came():
    import socket
    from urllib.error import URLError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(URLError):
        http_client.HttpClient(timeout=2).request("http://127.0.0.1:%d/" % port)
