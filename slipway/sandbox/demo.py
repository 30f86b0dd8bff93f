"""`invoke demo`: the incident end to end on a sandbox host, as the runbook met it."""
from __future__ import annotations

import json as jsonlib

from .. import vault
from ..deploy import deploy as run_deploy
from ..diagnose import diagnose as run_diagnose
from ..drift import drift as run_drift
from ..errors import SlipwayError
from . import ops
from .controller import Controller
from .data import INCIDENT_BOOK, connect
from .processes import http_json, wait_for_line


def run() -> None:
    """The incident end to end on the sandbox: the 500, its diagnosis, `invoke deploy`, the 200 with every view kept."""
    print("== 1. a production-like host where migration 0007 never ran")
    ops.up(1, "incident")
    ctl = Controller()
    host = ops.find_host("sandbox", ctl)
    creds = vault.load(ctl.vault_file(host.name), ctl.vault_password_file)
    url = f"{host.app_url}/api/books/{INCIDENT_BOOK}/track-view"

    def post():
        status, body = http_json("POST", url, {"viewType": "card_view"}, token=creds["slipway_api_token"])
        print(f"   POST {url}  {{\"viewType\": \"card_view\"}}\n   HTTP {status} {jsonlib.dumps(body)}")
        return status

    def book_rows():
        with connect(host, creds["slipway_db_password"]) as conn:
            return conn.execute(
                "SELECT view_type, count(*), sum(view_count) FROM book_view_statistics WHERE book_id = %s "
                "GROUP BY view_type ORDER BY view_type", (INCIDENT_BOOK,)).fetchall()

    def show_rows(rows):
        for view_type, n, total in rows:
            print(f"   {view_type:<12} rows {n}  view_count total {total}")

    print("\n== 2. the production failure")
    before_status = post()
    print("\n== 3. invoke diagnose --host sandbox  (the runbook's diagnosis: PM2, the app's and PostgreSQL's logs, "
          "migrations, drift)")
    try:  # the logging collector writes the line a moment after the answer
        wait_for_line(host.pg_log, " 42P10 ", timeout=10)
    except SlipwayError:
        pass
    diagnosed_before = run_diagnose("sandbox", since="1h")
    print(f"   statistics of book {INCIDENT_BOOK} (duplicate rows, which 0007 consolidates before adding the constraint):")
    rows_before = book_rows()
    show_rows(rows_before)

    print("\n== 4. invoke deploy --host sandbox  (preflight, backup, release, migrations, reload, smoke)")
    code = run_deploy("sandbox")
    if code:
        raise SlipwayError(f"the deploy failed (exit {code}); see the lines above", exit_code=code)

    print("\n== 5. after the deploy")
    after_status = post()
    rows_after = book_rows()
    show_rows(rows_after)
    total_before = sum(int(t) for vt, _, t in rows_before if vt == "card_view")
    total_after = sum(int(t) for vt, _, t in rows_after if vt == "card_view")
    print(f"   card_view: {total_before} views before the deploy + 1 new = {total_after}; one row per view type")

    print("\n== 6. invoke drift --host sandbox  (the live schema against the schema its applied migrations make)")
    drift_after = run_drift("sandbox")
    print("\n== 7. invoke diagnose --host sandbox  (the 42P10 lines came before the deploy that applied 0007: not counted)")
    diagnosed_after = run_diagnose("sandbox", since="1h")
    print("\nThe sandbox stays up: `eval \"$(.venv/bin/invoke sandbox.env)\"` then curl it; "
          "`.venv/bin/invoke deploy --host sandbox` again changes nothing; `.venv/bin/invoke sandbox.down` removes it.")
    if before_status != 500 or after_status != 200 or total_after != total_before + 1:
        raise SlipwayError(f"expected 500 then 200 with {total_before + 1} views, got {before_status}, {after_status}, "
                           f"{total_after}; see the lines above")
    if diagnosed_before != 1 or drift_after != 0 or diagnosed_after != 0:
        raise SlipwayError(f"expected invoke diagnose to find the cause before the deploy (exit 1), then invoke drift and "
                           f"invoke diagnose to find nothing after it (exit 0), got exit {diagnosed_before}, {drift_after} and "
                           f"{diagnosed_after}; see the lines above")
