"""The smoke tests of deploy phase 6 (module slipway.core.app_smoke, role smoke_test, playbooks/smoke.yml,
slipway.smoke) against one real sandbox host of instance 3: healthy first, the incident state last.

Tests run in file order and share the host; the smoke book's statistics are asserted exactly after
every run, and every other statistics row must stay untouched."""
from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import Outputs, cli, host_env, sandbox_up, sb
from instances import sandbox_instance

INSTANCE = {"SLIPWAY_SANDBOX_INSTANCE": "3"}
CASES = ["health", "first view creates the row", "second view increments", "other view type has its own row",
         "20 concurrent views"]
# after one run with reset: card_view 1 + 1 + 20 in one row, reader_open 1 in one row
AFTER_RESET_RUN = {"card_view": (1, 22), "reader_open": (1, 1)}


class Seen:
    """Every event, playbook stdout and printed output of this file's runs, for the secret scan."""

    texts: list[str] = []


@contextmanager
def instance3(check: bool = False):
    """SLIPWAY_SANDBOX_INSTANCE=3 for in-process calls (conftest sets 1), and ansible-runner's
    events and stdout recorded; ``check`` adds --check to the ansible-playbook command line."""
    import ansible_runner

    original = ansible_runner.run

    def run(**kwargs):
        handler = kwargs.get("event_handler")

        def record(event):
            Seen.texts.append(json.dumps(event, default=str))
            return handler(event) if handler else True

        kwargs["event_handler"] = record
        if check:
            kwargs["cmdline"] = kwargs.get("cmdline", "") + " --check"
        result = original(**kwargs)
        with result.stdout as stdout:  # a fresh handle on the artifact's stdout file
            Seen.texts.append(stdout.read())
        return result

    with sandbox_instance("3"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ansible_runner, "run", run)
        yield


@pytest.fixture(scope="module")
def host():
    """One healthy sandbox host on instance 3 (its APP_URL, API_TOKEN, DATABASE_URL)."""
    with sandbox_up("3", state="healthy"):
        env = host_env("sandbox", env=INSTANCE)
        env["DB_PASSWORD"] = urlsplit(env["DATABASE_URL"]).password
        assert env["SLIPWAY_SMOKE_BOOK_ID"] == sb.SMOKE_BOOK
        yield env


def play(extravars: dict | None = None, check: bool = False) -> dict:
    """playbooks/smoke.yml with the reference app's settings (its slipway.yml opts into the
    track-view cases), as `invoke smoke` passes them."""
    from slipway.release import settings
    from slipway.runner import run_playbook

    with instance3(check):
        return run_playbook("smoke.yml", "sandbox", {"slipway_app": settings().as_vars(), **(extravars or {})})


def smoke(capsys, as_json: bool = False, extravars: dict | None = None) -> tuple[int, str]:
    from slipway.smoke import smoke as run_smoke

    capsys.readouterr()
    with instance3():
        rc = run_smoke("sandbox", as_json, extravars)
    out, err = capsys.readouterr()
    Seen.texts += [out, err]
    return rc, out


def smoke_rows(host) -> dict:
    """(rows, Σ view_count) per view type of the smoke book, straight from PostgreSQL."""
    with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:
        found = conn.execute(
            "SELECT view_type, count(*), sum(view_count) FROM book_view_statistics WHERE book_id = %s GROUP BY view_type",
            (sb.SMOKE_BOOK,),
        ).fetchall()
    return {vt: (int(n), int(total)) for vt, n, total in found}


def other_rows(host) -> tuple[int, list]:
    """Σ view_count of every other book's rows, and the rows themselves."""
    with psycopg.connect(host["DATABASE_URL"], autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, book_id::text, view_type, view_count, last_viewed_at FROM book_view_statistics"
            " WHERE book_id <> %s ORDER BY id", (sb.SMOKE_BOOK,),
        ).fetchall()
    return sum(r[3] for r in rows), rows


# --------------------------------------------------------------------------------------------
# healthy host
# --------------------------------------------------------------------------------------------
def test_healthy_host_passes_every_case_and_counts_are_exact(host, capsys):
    others = other_rows(host)
    assert others[0] > 0  # the seed's statistics of other books
    rc, out = smoke(capsys)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["host", "case", "ok", "expected", "got", "seconds"]
    for name in CASES:
        row = next(line for line in lines if line.startswith("sandbox") and f"  {name}  " in line)
        assert "  ok  " in row, row
    assert lines[-1] == "sandbox: 5/5 passed"
    assert "HTTP 200 x20; stats.card_view = 22; rows(card_view) = 1" in out
    assert smoke_rows(host) == AFTER_RESET_RUN
    assert other_rows(host) == others


def test_second_run_passes_again_as_one_json_document(host, capsys):
    others = other_rows(host)
    rc, out = smoke(capsys, as_json=True)
    doc = json.loads(out)  # stdout holds the JSON document and nothing else
    assert rc == 0 and doc["ok"] is True and doc["rc"] == 0 and doc["failures"] == []
    res = doc["hosts"]["sandbox"]
    assert res["ok"] is True and res["summary"] == "5/5 passed"
    assert [c["name"] for c in res["cases"]] == CASES
    for case in res["cases"]:
        assert case["ok"] is True and case["expected"] == case["got"] and isinstance(case["seconds"], float), case
    assert res["cases"][1]["got"] == "HTTP 200; stats.card_view = 1; rows(card_view) = 1"
    assert smoke_rows(host) == AFTER_RESET_RUN
    assert other_rows(host) == others


def test_without_reset_deltas_are_asserted_and_nothing_counts_as_changed(host):
    others = other_rows(host)
    result = play({"smoke_test_reset": False, "smoke_test_concurrency": 5})
    assert result["rc"] == 0, result["failures"]
    res = result["data"]["smoke"]["sandbox"]
    assert res["ok"] is True and res["summary"] == "5/5 passed"
    assert res["cases"][1]["name"] == "first view creates the row (no reset: +1 delta)"
    assert res["cases"][1]["got"] == "HTTP 200; stats.card_view = 23; rows(card_view) = 1"
    assert res["cases"][4]["got"] == "HTTP 200 x5; stats.card_view = 29; rows(card_view) = 1"
    assert result["counts"].get("changed", {}).get("sandbox", 0) == 0
    assert smoke_rows(host) == {"card_view": (1, 22 + 1 + 1 + 5), "reader_open": (1, 2)}
    assert other_rows(host) == others


def test_check_mode_runs_nothing(host):
    before = smoke_rows(host), other_rows(host)
    result = play(check=True)
    assert result["rc"] == 0, result["failures"]
    assert result["data"]["smoke"]["sandbox"] == {"ok": True, "summary": "not run in check mode", "cases": [],
                                                  "msg": "not run in check mode"}
    assert (smoke_rows(host), other_rows(host)) == before


def test_extra_checks_run_after_the_cases_and_a_wrong_status_fails_clearly(host, capsys):
    checks = [
        {"name": "stats of the smoke book", "path": f"/api/books/{sb.SMOKE_BOOK}/stats",
         "json": {"bookId": sb.SMOKE_BOOK, "stats.card_view": 22, "stats.reader_open": 1}},
        {"name": "track-view without the token is refused", "method": "POST", "auth": False, "status": 401,
         "path": f"/api/books/{sb.SMOKE_BOOK}/track-view", "body": {"viewType": "card_view"}},
        {"name": "health answers 201", "path": "/api/health", "status": 201},
    ]
    result = play({"smoke_test_extra_checks": checks})
    assert result["rc"] != 0
    res = result["data"]["smoke"]["sandbox"]
    assert [c["ok"] for c in res["cases"]] == [True] * 7 + [False] and res["summary"] == "7/8 passed"
    assert res["cases"][5]["got"] == f'HTTP 200; bookId = "{sb.SMOKE_BOOK}"; stats.card_view = 22; stats.reader_open = 1'
    failed = res["cases"][7]
    assert failed["expected"] == "HTTP 201" and failed["got"].startswith('HTTP 200 {"status":"ok"'), failed
    (failure,) = result["failures"]
    assert failure["msg"].startswith("smoke case 'health answers 201' failed: expected HTTP 201, got HTTP 200 "), failure
    assert failure["msg"].endswith("(7/8 passed)") and "\n" not in failure["msg"]
    assert res["msg"] == failure["msg"]
    # the CLI entry point prints the same line and exits 1
    rc, out = smoke(capsys, extravars={"smoke_test_extra_checks": checks[2:]})
    assert rc == 1 and out.splitlines()[-1].startswith("sandbox: smoke case 'health answers 201' failed: expected HTTP 201")
    assert smoke_rows(host) == AFTER_RESET_RUN


def test_a_book_that_does_not_exist_fails_with_one_line(host, capsys):
    others = other_rows(host)
    missing = str(uuid.uuid4())
    result = play({"smoke_test_book_id": missing})
    assert result["rc"] != 0
    (failure,) = result["failures"]
    assert failure["msg"] == (f"smoke book {missing} does not exist in the database (the app answers 404 to track-view); "
                              "set slipway_smoke_book_id to an existing book")
    res = result["data"]["smoke"]["sandbox"]
    assert [c["ok"] for c in res["cases"]] == [True, False, None, None, None]
    assert res["cases"][1]["got"] == 'HTTP 404 {"error":"Book not found"}'
    rc, out = smoke(capsys, extravars={"smoke_test_book_id": "not-a-uuid"})
    assert rc == 1
    assert out.splitlines()[-1] == ("sandbox: smoke book id 'not-a-uuid' is not a UUID; "
                                    "set slipway_smoke_book_id to an existing book's id")
    assert other_rows(host) == others


def test_an_app_that_does_not_answer_fails_with_one_line_naming_the_url(host):
    parts = urlsplit(host["APP_URL"])
    url = f"http://{parts.hostname}:3999"  # the host's own address; nothing listens on 3999
    result = play({"smoke_test_url": url})
    assert result["rc"] != 0
    (failure,) = result["failures"]
    assert failure["msg"] == (f"cannot reach the app: GET {url}/api/health: Connection refused; "
                              f"is it running (pm2 status) at {url}?")


# --------------------------------------------------------------------------------------------
# incident state (0007 missing): the runbook's case 1 fails with the incident's 500
# --------------------------------------------------------------------------------------------
def test_incident_database_fails_case_1_with_http_500(host, capsys):
    cli("sandbox.up", "--state", "incident", env=INSTANCE)
    others = other_rows(host)
    rc, out = smoke(capsys, as_json=True)
    assert rc == 1
    res = json.loads(out)["hosts"]["sandbox"]
    assert [c["ok"] for c in res["cases"]] == [True, False, None, None, None]
    case = res["cases"][1]
    assert case["name"] == "first view creates the row"
    assert case["expected"] == "HTTP 200; stats.card_view = 1; rows(card_view) = 1"
    assert case["got"] == 'HTTP 500 {"error":"Failed to track book view"}'
    assert res["msg"] == ("smoke case 'first view creates the row' failed: expected HTTP 200; stats.card_view = 1; "
                          'rows(card_view) = 1, got HTTP 500 {"error":"Failed to track book view"} (1/5 passed)')
    assert smoke_rows(host) == {}  # reset removed nothing else; the failed upsert wrote nothing
    assert other_rows(host) == others


def test_no_secret_in_any_output_or_event(host):
    texts = Seen.texts + Outputs.texts
    assert len(Seen.texts) > 20  # events, playbook stdout and printed output of every run above
    # the module's invocation (its arguments, no_log ones masked by Ansible) is among the scanned events
    assert any('"login_password": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"' in t for t in Seen.texts)
    for secret in (host["API_TOKEN"], host["DB_PASSWORD"]):
        assert secret and len(secret) >= 16
        leaks = [t for t in texts if secret in t]
        assert not leaks, f"a secret appears in {len(leaks)} recorded output(s)"
