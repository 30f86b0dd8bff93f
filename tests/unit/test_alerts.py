"""invoke drift's outside world, pure parts: the Prometheus textfile, when a webhook is due, and
what it says. No hosts."""
from __future__ import annotations

from slipway import alerts


def finding(name, severity="critical", fp="f1"):
    return {"kind": "missing", "object": {"kind": "constraint", "name": name, "table": "public.t"}, "severity": severity,
            "cause": "applied_missing", "fix": "ALTER TABLE ...", "fingerprint": fp,
            "migration": {"tag": "0007_x", "statement": 3, "text": "ALTER ..."}}


def checked(*findings, exit_code=2):
    counts = {"applied": 8, "pending": 0, "skipped": 0, "tampered": 0, "unknown_rows": 0}
    return {"exit": exit_code, "result": {"findings": list(findings), "counts": counts}}


def test_metrics_text_counts_by_severity_and_state_and_keeps_the_last_success_of_an_unchecked_host():
    text = alerts.metrics_text({"prod": checked(finding("c1"), finding("w1", "warning", "f2")),
                                "stage": {"exit": 3, "error": "unreachable"}},
                               now=1700000000.0, previous={"stage": "1690000000"})
    assert 'slipway_drift_findings{env="prod",severity="critical"} 1' in text
    assert 'slipway_drift_findings{env="prod",severity="warning"} 1' in text
    assert 'slipway_drift_findings{env="prod",severity="info"} 0' in text
    assert 'slipway_migrations{env="prod",state="applied"} 8' in text
    assert 'slipway_drift_up{env="stage"} 0' in text and 'slipway_drift_up{env="prod"} 1' in text
    assert 'slipway_drift_last_success_timestamp_seconds{env="prod"} 1700000000' in text
    assert 'slipway_drift_last_success_timestamp_seconds{env="stage"} 1690000000' in text
    assert "# TYPE slipway_drift_findings gauge" in text and text.endswith("\n")


def test_labels_are_escaped():
    assert alerts._label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_a_webhook_is_due_on_a_change_and_on_recovery_not_on_every_run():
    bad = checked(finding("c1"))
    assert alerts.changed(bad, None)  # first check, something wrong
    assert not alerts.changed(checked(exit_code=0), None)  # first check, healthy: no news
    before = alerts._summary(bad)
    assert not alerts.changed(bad, before)  # the same findings again
    assert alerts.changed(checked(finding("c1"), finding("c2", fp="f9")), before)  # a new finding
    assert alerts.changed(checked(exit_code=0), before)  # recovery


def test_the_payload_says_what_changed_in_a_slack_text():
    before = alerts._summary(checked(finding("c1")))
    doc = alerts.payload("prod", "prod@10.0.0.1:22", checked(finding("c1"), finding("c2", fp="f9")), before, "r1")
    assert doc["state"] == "CRITICAL" and doc["previous_state"] == "CRITICAL" and doc["new"] == ["f9"]
    assert doc["text"].startswith("slipway drift: prod is CRITICAL: critical missing constraint c1")
    assert doc["release"] == "r1" and doc["fixes"] == ["ALTER TABLE ..."]
    recovered = alerts.payload("prod", "k", checked(exit_code=0), before, "r2")
    assert recovered["recovered"] and recovered["gone"] == ["f1"] and "recovered" in recovered["text"]


def test_fix_plan_rebuilds_unique_constraints_and_indexes_online_and_refuses_the_rest():
    from ansible_collections.slipway.core.plugins.module_utils import remedy

    constraint = {"kind": "missing", "object": {"kind": "constraint", "name": "t_k_unique", "table": "public.t"},
                  "expected": {"type": "unique", "columns": ["a", "b"], "definition": "UNIQUE (a, b)"},
                  "cause": "applied_missing", "fingerprint": "c"}
    invalid = {"kind": "invalid", "object": {"kind": "index", "name": "t_k_unique", "table": "public.t"},
               "expected": None, "cause": "invalid", "fingerprint": "i"}
    index = {"kind": "missing", "object": {"kind": "index", "name": "t_c_idx", "table": "public.t"},
             "expected": {"unique": False, "columns": ["c"], "definition": "CREATE INDEX ON public.t USING btree (c)"},
             "cause": "applied_missing", "fingerprint": "x"}
    column = {"kind": "extra", "object": {"kind": "column", "name": "public.t.note", "table": "public.t"},
              "expected": None, "cause": "hand_made", "fingerprint": "e"}
    fk = {"kind": "missing", "object": {"kind": "constraint", "name": "t_fk", "table": "public.t"},
          "expected": {"type": "foreign key", "columns": ["u"]}, "cause": "applied_missing", "fingerprint": "f"}
    pending = {"kind": "migration", "object": {"kind": "migration", "name": "0008_x", "table": None},
               "actual": "pending", "cause": "pending", "fingerprint": "p"}
    fixes, refused = remedy.plan([constraint, invalid, index, column, fk, pending])
    steps = {fix["fingerprint"]: fix["steps"] for fix in fixes}
    assert steps["c"] == [
        {"sql": 'DROP INDEX CONCURRENTLY IF EXISTS "public"."t_k_unique"', "concurrently": True},
        {"check": {"table": "public.t", "columns": ["a", "b"]}},
        {"sql": 'CREATE UNIQUE INDEX CONCURRENTLY "t_k_unique" ON "public"."t" ("a", "b")', "concurrently": True},
        {"sql": 'ALTER TABLE "public"."t" ADD CONSTRAINT "t_k_unique" UNIQUE USING INDEX "t_k_unique"', "concurrently": False}]
    assert steps["x"] == [{"sql": 'CREATE INDEX CONCURRENTLY "t_c_idx" ON public.t USING btree (c)', "concurrently": True}]
    why = {r["fingerprint"]: r["why"] for r in refused}
    assert set(why) == {"e", "f", "p"} and "never drops" in why["e"] and "NOT VALID" in why["f"]
    assert "invoke deploy" in why["p"]


def test_a_scheduled_check_refreshes_the_status_page(tmp_path):
    from slipway.drift import schedule_script

    script = schedule_script("prod", tmp_path / "x.log", tmp_path / "x.lock", None, None, html="/srv/www/status.html")
    assert "invoke drift --host prod --html /srv/www/status.html" in script
    assert "--html" not in schedule_script("prod", tmp_path / "x.log", tmp_path / "x.lock", None, None)
