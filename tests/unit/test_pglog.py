"""module_utils/pglog.py: PostgreSQL's log read back into records (stderr by log_line_prefix,
jsonlog, csvlog), filtered by time, and redacted before anything leaves the host. The lines are
written the way PostgreSQL 15 writes them (the sandbox's prefix, the default one, others)."""
from __future__ import annotations

import calendar
import json
import time

import pytest
from ansible_collections.slipway.core.plugins.module_utils import pglog

SANDBOX = "%m [%p] %e %q%u@%d "


def epoch(text: str) -> float:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def write(tmp_path, lines: list[str], name="postgresql.log"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("prefix,line,want", [
    (SANDBOX, "2026-12-06 00:50:01.123 UTC [123] 42P10 booksuser@booksdb ERROR:  there is no",
     {"pid": "123", "sqlstate": "42P10", "user": "booksuser", "db": "booksdb", "level": "ERROR"}),
    (SANDBOX, "2026-12-06 00:50:01.123 UTC [99] 00000 LOG:  checkpoint starting: time",  # %q: no session part
     {"pid": "99", "sqlstate": "00000", "user": None, "level": "LOG"}),
    ("%m [%p] ", "2026-12-06 00:50:01.123 UTC [7] FATAL:  password authentication failed for user \"x\"",
     {"pid": "7", "level": "FATAL"}),
    ("%t:%r:%u@%d:[%p]: ", "2026-12-06 00:50:01 UTC:127.0.0.1(5432):app@db:[42]: ERROR:  boom",
     {"pid": "42", "user": "app", "db": "db", "level": "ERROR"}),
    ("%m %-10u %e ", "2026-12-06 00:50:01.123 +03 app        23505 ERROR:  duplicate key value",
     {"user": "app", "sqlstate": "23505", "level": "ERROR"}),
    ("%%%n %p %e ", "%1796518201.123 5 22P02 ERROR:  invalid", {"epoch": "1796518201.123", "sqlstate": "22P02"}),
])
def test_log_line_prefix_becomes_a_pattern(prefix, line, want):
    m = pglog.LogSettings(prefix).line.match(line)
    assert m, (prefix, pglog.prefix_regex(prefix))
    got = m.groupdict()
    for key, value in want.items():
        assert got.get(key) == value, (key, got)


def test_times_in_utc_offsets_and_epochs():
    assert pglog.parse_time("2026-12-06 00:50:01.250 UTC") == epoch("2026-12-06 00:50:01") + 0.25
    assert pglog.parse_time("2026-12-06 03:50:01 +03") == epoch("2026-12-06 00:50:01")
    assert pglog.parse_time("2026-12-05 22:50:01 -02:00") == epoch("2026-12-06 00:50:01")
    assert pglog.parse_time("yesterday") is None


def test_stderr_records_since_with_their_statement_and_detail(tmp_path):
    path = write(tmp_path, [
        "2026-12-06 00:40:00.000 UTC [10] 42P01 app@db ERROR:  relation \"old\" does not exist",
        "2026-12-06 00:50:01.123 UTC [11] 42P10 app@db ERROR:  there is no unique or exclusion constraint matching the ON CONFLICT specification",
        "2026-12-06 00:50:01.124 UTC [12] 00000 app@db LOG:  duration: 1.0 ms",  # another session between
        "2026-12-06 00:50:01.123 UTC [11] 42P10 app@db STATEMENT:  INSERT INTO t (a, b)",
        "\tVALUES ($1, 'secret-value') ON CONFLICT (a, b) DO NOTHING",
        "2026-12-06 00:50:02.000 UTC [13] 23505 app@db ERROR:  duplicate key value violates unique constraint \"t_a_b\"",
        "2026-12-06 00:50:02.000 UTC [13] 23505 app@db DETAIL:  Key (a, b)=(alice@example.com, 7) already exists.",
        "2026-12-06 00:50:03.000 UTC [14] 42703 app@db ERROR:  column \"x\" does not exist",
        "2026-12-06 00:50:03.000 UTC [14] 42703 app@db DETAIL:  parameters: $1 = 'alice', $2 = 'hunter2'",
    ])
    read = pglog.read_log(path, SANDBOX, since_epoch=epoch("2026-12-06 00:45:00"))
    assert read["format"] == "stderr" and read["notes"] == []
    recs = read["records"]
    assert [r["sqlstate"] for r in recs] == ["42P10", "23505", "42703"]
    assert recs[0]["statement"] == "INSERT INTO t (a, b)\n\tVALUES ($1, $2) ON CONFLICT (a, b) DO NOTHING"
    assert recs[1]["detail"] == "Key (a, b)=(...) already exists."
    assert recs[2]["detail"] == "parameters: (not shown)"
    assert not recs[0]["inferred"]
    text = json.dumps(read)
    for secret in ("secret-value", "alice", "hunter2"):
        assert secret not in text


def test_without_sqlstate_in_the_prefix_it_is_inferred_and_said(tmp_path):
    path = write(tmp_path, [
        "2026-12-06 00:50:01.123 UTC [11] ERROR:  there is no unique or exclusion constraint matching the ON CONFLICT specification",
        "2026-12-06 00:50:02.000 UTC [12] FATAL:  password authentication failed for user \"booksuser\"",
        "2026-12-06 00:50:03.000 UTC [13] ERROR:  invalid input value for enum view_type: \"card\"",
        "2026-12-06 00:50:04.000 UTC [14] ERROR:  canceling statement due to lock timeout",
        "2026-12-06 00:50:05.000 UTC [15] ERROR:  something new",
    ])
    read = pglog.read_log(path, "%m [%p] ")
    assert [r["sqlstate"] for r in read["records"]] == ["42P10", "28P01", "22P02", "55P03", None]
    assert all(r["inferred"] for r in read["records"])
    assert any("has no %e" in n for n in read["notes"])
    assert read["records"][2]["message"] == 'invalid input value for enum view_type: "card"'  # an enum label: schema


def test_user_input_in_messages_is_not_shown(tmp_path):
    path = write(tmp_path, [
        "2026-12-06 00:50:01.123 UTC [11] 22P02 app@db ERROR:  invalid input syntax for type uuid: \"alice's id\"",
        "2026-12-06 00:50:02.123 UTC [12] 22P02 app@db ERROR:  invalid input value for enum mood: \"DROP TABLE x; --\"",
        "2026-12-06 00:50:03.123 UTC [13] 23502 app@db ERROR:  null value in column \"name\" of relation \"t\" violates not-null constraint",
        "2026-12-06 00:50:03.123 UTC [13] 23502 app@db DETAIL:  Failing row contains (1, null, alice@example.com).",
        "2026-12-06 00:50:04.000 UTC [14] 28P01 app@db FATAL:  password authentication failed for user \"app\"",
        "2026-12-06 00:50:04.000 UTC [14] 28P01 app@db DETAIL:  Connection matched pg_hba.conf line 3: \"host all all 0.0.0.0/0 scram-sha-256\"",
    ])
    recs = pglog.read_log(path, SANDBOX, known=["s3cr3t"])["records"]
    assert recs[0]["message"] == 'invalid input syntax for type uuid: "..."'
    assert recs[1]["message"] == 'invalid input value for enum mood: "..."'
    assert recs[2]["detail"] == "Failing row contains (...)."
    assert "alice" not in json.dumps(recs)


def test_known_secrets_are_masked_anywhere(tmp_path):
    path = write(tmp_path, ["2026-12-06 00:50:01.123 UTC [11] 42704 app@db ERROR:  role \"s3cr3t\" does not exist"])
    recs = pglog.read_log(path, SANDBOX, known=["s3cr3t"])["records"]
    assert "s3cr3t" not in json.dumps(recs) and recs[0]["message"] == 'role "***" does not exist'


@pytest.mark.parametrize("lines,shown,hidden", [
    (['ERROR:  syntax error at or near "alice@example.com"'], 'syntax error at or near "..."', "alice"),
    (['ERROR:  value "4111111111111111" is out of range for type integer'], 'value "..." is out of range', "4111"),
    (['ERROR:  malformed array literal: "{secret"'], 'malformed array literal: "..."', "secret"),
    (['ERROR:  column "email" of relation "users" does not exist'], 'column "email" of relation "users" does not exist', None),
    (['ERROR:  deadlock detected', 'DETAIL:  Process 1 waits for ShareLock on transaction 5; blocked by process 2.',
      "\tProcess 2: UPDATE users SET email = 'bob@example.com' WHERE id = 1"], "deadlock detected", "bob"),
    (['ERROR:  conflicting key value violates exclusion constraint "booking_overlap"',
      'DETAIL:  Key (room, during)=(1, [2026-01-01,2026-01-02)) conflicts with existing key (room, during)=(1, [x,y)).'],
     'exclusion constraint "booking_overlap"', "2026-01-01"),
    (['ERROR:  invalid input syntax for type json', 'DETAIL:  Token "s3cr3tvalue" is invalid.',
      'CONTEXT:  JSON data, line 1: {"password": s3cr3tvalue...'], "invalid input syntax for type json", "s3cr3tvalue"),
    (['ERROR:  user alice@example.com is blocked'], "user <e-mail> is blocked", "alice"),
])
def test_no_user_data_in_what_leaves_the_host(tmp_path, lines, shown, hidden):
    code = {"deadlock detected": "40P01"}.get(lines[0].split(":  ", 1)[1], "XX000")
    prefixed = [f"2026-12-06 00:50:01.123 UTC [11] {code} app@db {line}" if not line.startswith("\t") else line
                for line in lines]
    recs = pglog.read_log(write(tmp_path, prefixed), SANDBOX)["records"]
    text = json.dumps(recs)
    if shown:
        assert shown in recs[0]["message"], recs
    if hidden:
        assert hidden not in text, text


def test_a_raise_exception_message_is_not_shown_and_an_orphan_statement_is_dropped(tmp_path):
    recs = pglog.read_log(write(tmp_path, [
        "2026-12-06 00:50:01.123 UTC [11] P0001 app@db ERROR:  customer 42 (Alice Smith) has no credit",
        "2026-12-06 00:50:02.123 UTC [12] 42601 app@db STATEMENT:  SELECT * FROM t",  # its ERROR was not read
        "\tWHERE ssn = '123-45-6789'",
    ]), SANDBOX)["records"]
    assert recs[0]["message"] == "(a RAISE EXCEPTION message, not shown)"
    assert "123-45" not in json.dumps(recs) and "Alice" not in json.dumps(recs)


def test_no_escape_can_backtrack_without_bound():
    """`.*?` for several escapes made one 8 KB line that has the prefix but no level take a minute."""
    prefix = "%t [%p]: [%l-1] user=%u,db=%d,app=%a,client=%h %r %b %i %x %v %c %Q %s %n %P %z"
    assert ".*" not in pglog.prefix_regex(prefix)


def test_jsonlog_and_csvlog(tmp_path):
    doc = {"timestamp": "2026-12-06 00:50:01.123 UTC", "user": "app", "dbname": "db", "pid": 11, "error_severity": "ERROR",
           "state_code": "42P10", "message": "there is no unique or exclusion constraint matching the ON CONFLICT specification",
           "statement": "INSERT INTO t (a) VALUES ('x') ON CONFLICT (a) DO NOTHING"}
    log = {"timestamp": "2026-12-06 00:50:02.000 UTC", "pid": 12, "error_severity": "LOG", "state_code": "00000", "message": "x"}
    read = pglog.read_log(write(tmp_path, [json.dumps(doc), json.dumps(log)], "postgresql.json"), SANDBOX)
    assert read["format"] == "jsonlog"
    assert [(r["sqlstate"], r["statement"]) for r in read["records"]] == [("42P10", "INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO NOTHING")]
    row = ('2026-12-06 00:50:01.123 UTC,"app","db",11,"127.0.0.1:5000",6756,1,"INSERT",2026-12-06 00:50:00 UTC,3/4,0,ERROR,'
           '23505,"duplicate key value violates unique constraint ""t_a""","Key (a)=(x@y.z) already exists.",,,,,'
           '"INSERT INTO t (a) VALUES (\'x@y.z\')",,,"app",client backend,,0')
    read = pglog.read_log(write(tmp_path, [row], "postgresql.csv"), SANDBOX)
    assert read["format"] == "csvlog"
    rec = read["records"][0]
    assert rec["sqlstate"] == "23505" and rec["message"] == 'duplicate key value violates unique constraint "t_a"'
    assert rec["detail"] == "Key (a)=(...) already exists." and rec["statement"] == "INSERT INTO t (a) VALUES ($1)"


@pytest.mark.parametrize("sql,want", [
    ("SELECT 'a', 1, 2.5, $1", "SELECT $2, $3, $4, $1"),
    ("SELECT E'a\\n', U&'d', B'101', X'1f', N'x'", "SELECT $1, $2, $3, $4, $5"),
    ("SELECT 'é' || 'ü' FROM t WHERE a = 'x''y'", "SELECT $1 || $2 FROM t WHERE a = $3"),
    ("SELECT count(*) FROM t", "SELECT count(*) FROM t"),
])
def test_constants_become_parameters(sql, want):
    assert pglog.normalize_sql(sql) == want


def test_only_the_tail_of_a_big_log_is_read(tmp_path):
    lines = [f"2026-12-06 00:50:01.123 UTC [{i}] 42P01 app@db ERROR:  relation \"t{i}\" does not exist" for i in range(3000)]
    read = pglog.read_log(write(tmp_path, lines), SANDBOX, max_bytes=20_000, keep=50)
    assert len(read["records"]) == 50 and read["records"][-1]["message"] == 'relation "t2999" does not exist'
    assert read["total"] < 3000
