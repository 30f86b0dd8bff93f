"""The migration engine against a real PostgreSQL 15, with drizzle-orm's own migrate() as the judge.

Each test gets a fresh database in a throwaway cluster (tests/pgcluster.py) and, when it changes
the migrations, its own copy of the reference app's folder. `invoke migrate` runs as a user runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from ansible_collections.slipway.core.plugins.module_utils import drizzle
from conftest import INVOKE, ROOT, cli, sb
from migtools import (
    MIGRATIONS,
    T0007,
    TAGS,
    add_entry,
    as_json,
    file_hash,
    folder_copy,
    history,
    incident_db,
    incident_with,
    judge,
    migrate,
    schema_dump,
    stats,
)


# --------------------------------------------------------------------------------------------
# the folder reader (no database)
# --------------------------------------------------------------------------------------------
def test_reader_reads_the_journal_and_hashes_like_drizzle():
    info = drizzle.read_folder(MIGRATIONS)
    assert [m["tag"] for m in info["migrations"]] == TAGS and info["warnings"] == []
    last = info["migrations"][7]
    assert last["hash"] == file_hash(MIGRATIONS, T0007)
    assert len(last["statements"]) == 3 and "ADD CONSTRAINT" in last["statements"][2]
    # drizzle splits verbatim: the pieces put back together are the file
    assert drizzle.BREAKPOINT.join(last["statements"]) == (MIGRATIONS / f"{T0007}.sql").read_text()


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("no_journal", "_journal.json not found"),
        ("bad_json", "_journal.json is malformed JSON"),
        ("no_entries", 'has no "entries" list'),
        ("missing_sql", "0004_add_books_title_index.sql not found: the journal lists it (idx 4)"),
        ("dup_idx", "idx 3 is also used by 0003_create_reading_progress"),
        ("dup_tag", "lists tag 0002_create_book_view_statistics twice"),
        ("bad_when", 'entry 0001_add_book_metadata has no valid "when"'),
        ("not_utf8", "0005_create_bookmarks.sql is not valid UTF-8 (byte 0xff"),
    ],
)
def test_reader_refuses_a_damaged_folder_with_one_line_naming_the_file(tmp_path, damage, expected):
    folder = folder_copy(tmp_path)
    journal_path = folder / "meta" / "_journal.json"
    journal = json.loads(journal_path.read_text())
    if damage == "no_journal":
        journal_path.unlink()
    elif damage == "bad_json":
        journal_path.write_text(journal_path.read_text()[:-20])
    elif damage == "no_entries":
        journal_path.write_text('{"version": "7", "dialect": "postgresql"}')
    elif damage == "missing_sql":
        (folder / "0004_add_books_title_index.sql").unlink()
    elif damage in ("dup_idx", "dup_tag", "bad_when"):
        if damage == "dup_idx":
            journal["entries"][4]["idx"] = 3
        elif damage == "dup_tag":
            journal["entries"][3]["tag"] = journal["entries"][2]["tag"]
        else:
            journal["entries"][1]["when"] = "yesterday"
        journal_path.write_text(json.dumps(journal))
    elif damage == "not_utf8":
        path = folder / "0005_create_bookmarks.sql"
        path.write_bytes(path.read_bytes() + b"\n-- caf\xff\n")
    with pytest.raises(drizzle.MigrationError) as err:
        drizzle.read_folder(folder)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_cli_reports_a_damaged_folder_before_connecting(tmp_path):
    folder = folder_copy(tmp_path)
    (folder / "0004_add_books_title_index.sql").unlink()
    # the DSN points nowhere: the folder error must come first, as one line, exit 1
    proc = cli("migrate", "--migrations", str(folder), "--check", check=False,
               env={"DATABASE_URL": "postgresql://nobody:pw@127.0.0.1:1/none"})
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: ") and "0004_add_books_title_index.sql not found" in proc.stderr
    proc = cli("migrate", "--migrations", str(folder), "--check", "--dsn-env", "SLIPWAY_UNSET_VAR", check=False)
    assert proc.returncode == 1 and "environment variable SLIPWAY_UNSET_VAR is not set" in proc.stderr


def test_cli_connection_failure_is_one_line_without_the_password(pgc):
    dsn = f"postgresql://{pgc.user}:wrong-{pgc.password}@127.0.0.1:{pgc.port}/postgres"
    proc = cli("migrate", "--migrations", str(MIGRATIONS), "--check", check=False, env={"DATABASE_URL": dsn})
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot connect to PostgreSQL:") and "password authentication failed" in proc.stderr
    assert pgc.password not in proc.stdout + proc.stderr and proc.stderr.strip().count("\n") == 0


# --------------------------------------------------------------------------------------------
# compatibility with drizzle-orm's migrator
# --------------------------------------------------------------------------------------------
def test_fresh_database_slipway_applies_all_and_drizzle_then_finds_nothing(pgc, db, node_modules, tmp_path):
    proc = migrate(pgc, db, MIGRATIONS, "--check", "--json")
    assert proc.returncode == 2
    plan = as_json(proc)
    assert plan["to_apply"] == TAGS and plan["summary"]["pending"] == 8 and plan["preflight"]["rehearsal"]["ok"]
    assert history(pgc, db) is None  # --check created nothing, not even the tracking table

    doc = as_json(migrate(pgc, db, MIGRATIONS, "--json", check=True))
    assert doc["applied_now"] == TAGS and doc["changed"] is True
    expected = [(file_hash(MIGRATIONS, t), e["when"]) for t, e in zip(TAGS, json.loads((MIGRATIONS / "meta" / "_journal.json").read_text())["entries"], strict=True)]
    assert history(pgc, db) == expected

    proc = judge(node_modules, pgc, db, MIGRATIONS)
    assert proc.returncode == 0, proc.stderr
    assert history(pgc, db) == expected  # drizzle added no row and ran nothing

    # and the schema is exactly the one drizzle's own migrator builds
    other = pgc.createdb()
    assert judge(node_modules, pgc, other, MIGRATIONS).returncode == 0
    assert schema_dump(pgc, db) == schema_dump(pgc, other)
    assert history(pgc, other) == expected

    again = as_json(migrate(pgc, db, MIGRATIONS, "--json", check=True))
    assert again["changed"] is False and again["result"] == "up_to_date" and again["applied_now"] == []


def test_drizzle_applied_0000_to_0005_slipway_plans_exactly_0006_and_0007(pgc, db, node_modules, tmp_path):
    assert judge(node_modules, pgc, db, folder_copy(tmp_path, upto=6)).returncode == 0
    proc = migrate(pgc, db, MIGRATIONS, "--check", "--json")
    assert proc.returncode == 2
    plan = as_json(proc)
    assert plan["to_apply"] == TAGS[6:8]
    assert [m["status"] for m in plan["migrations"]] == ["applied"] * 6 + ["pending"] * 2
    assert plan["drizzle_would_apply"] == TAGS[6:8]  # slipway and drizzle agree
    text = migrate(pgc, db, MIGRATIONS, "--check").stdout
    assert f"pending     {TAGS[6]}" in text and f"pending     {T0007}" in text and f"applied     {TAGS[5]}" in text
    migrate(pgc, db, MIGRATIONS, check=True)
    before = history(pgc, db)
    assert len(before) == 8
    assert judge(node_modules, pgc, db, MIGRATIONS).returncode == 0
    assert history(pgc, db) == before


def test_silent_skip_is_reported_and_applied_only_when_asked(pgc, db, node_modules, tmp_path):
    folder = folder_copy(tmp_path)
    migrate(pgc, db, folder, check=True)
    entries = json.loads((folder / "meta" / "_journal.json").read_text())["entries"]
    older = entries[6]["when"] + 1000  # newer than 0006, older than the applied 0007
    add_entry(folder, "0008_hotfix_reading_progress_index", older,
              'CREATE INDEX "reading_progress_updated_idx" ON "reading_progress" USING btree ("updated_at");')
    before = history(pgc, db)

    # drizzle's own migrator: nothing, exit 0 (the incident's failure mode)
    proc = judge(node_modules, pgc, db, folder)
    assert proc.returncode == 0, proc.stderr
    assert history(pgc, db) == before

    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1  # an apply would be refused until the user decides
    skipped = plan["migrations"][8]
    assert skipped["status"] == "skipped" and plan["drizzle_would_apply"] == []
    assert "0008_hotfix_reading_progress_index is skipped" in proc.stderr and "--include-skipped" in proc.stderr
    assert any("not newer than 0007" in w for w in plan["warnings"])

    proc = migrate(pgc, db, folder)
    assert proc.returncode == 1 and "apply refused, nothing changed" in proc.stderr
    assert history(pgc, db) == before

    doc = as_json(migrate(pgc, db, folder, "--include-skipped", "--json", check=True))
    assert doc["applied_now"] == ["0008_hotfix_reading_progress_index"]
    assert history(pgc, db) == before + [(file_hash(folder, "0008_hotfix_reading_progress_index"), older)]
    with pgc.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('reading_progress_updated_idx')").fetchone()[0] is not None
    # drizzle still agrees there is nothing to do, and slipway too
    assert judge(node_modules, pgc, db, folder).returncode == 0
    assert len(history(pgc, db)) == 9
    assert as_json(migrate(pgc, db, folder, "--check", "--json", check=True))["result"] == "up_to_date"


def test_tampered_applied_file_stops_the_apply(pgc, db, tmp_path):
    migrate(pgc, db, folder_copy(tmp_path / "upto7", upto=7), check=True)
    folder = folder_copy(tmp_path)
    path = folder / "0003_create_reading_progress.sql"
    path.write_text(path.read_text().replace('"position" integer', '"position" bigint'))
    before = history(pgc, db)

    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1
    assert plan["migrations"][3]["status"] == "tampered" and plan["migrations"][3]["row_id"] == 4
    assert "0003_create_reading_progress.sql was edited after it was applied" in proc.stderr
    proc = migrate(pgc, db, folder)
    assert proc.returncode == 1 and "--allow-tampered" in proc.stderr
    assert history(pgc, db) == before and stats(pgc, db)["constraint"] == 0

    doc = as_json(migrate(pgc, db, folder, "--allow-tampered", "--json", check=True))
    assert doc["applied_now"] == [T0007]  # the override accepts 0003 as it is and goes on
    assert len(history(pgc, db)) == 8


def test_unknown_tracking_rows_stop_the_apply(pgc, db, tmp_path):
    migrate(pgc, db, MIGRATIONS, check=True)
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES (%s, %s)",
                     ("f" * 64, 1790000000000))
    folder = folder_copy(tmp_path)
    add_entry(folder, "0008_later", 1795000000000, "SELECT 1;")
    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1 and plan["unknown_rows"][0]["hash"] == "f" * 64
    assert "1 tracking row(s) match no migration" in proc.stderr
    assert migrate(pgc, db, folder).returncode == 1 and len(history(pgc, db)) == 9
    doc = as_json(migrate(pgc, db, folder, "--allow-unknown", "--json", check=True))
    assert doc["applied_now"] == ["0008_later"]


def test_sql_error_in_the_middle_rolls_everything_back(pgc, db, tmp_path):
    folder = folder_copy(tmp_path)
    bad = folder / "0004_add_books_title_index.sql"
    bad.write_text('CREATE INDEX "books_title_idx" ON "books" USING btree ("titel");')
    proc = migrate(pgc, db, folder)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line.count("\n") == 0
    assert "0004_add_books_title_index statement 1: 42703" in line and 'column "titel" does not exist' in line
    assert "everything rolled back, tracking table unchanged" in line
    with pgc.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('books'), to_regnamespace('drizzle')").fetchone() == (None, None)
    # with history present, the tracking table keeps exactly its rows
    good = folder_copy(tmp_path / "good", upto=4)
    migrate(pgc, db, good, check=True)
    before = history(pgc, db)
    proc = migrate(pgc, db, folder, "--json")
    doc = as_json(proc)
    assert proc.returncode == 1 and doc["error"]["tag"] == "0004_add_books_title_index"
    assert doc["error"]["statement"] == 1 and doc["error"]["sqlstate"] == "42703" and doc["applied_now"] == []
    assert history(pgc, db) == before
    with pgc.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('bookmarks')").fetchone()[0] is None  # 0005 came after: not kept


def test_duplicates_without_consolidation_are_refused_in_preflight(pgc, db, node_modules, tmp_path):
    folder = incident_with(pgc, db, node_modules, tmp_path, "0007_unique_only",
                           'ALTER TABLE "book_view_statistics" ADD CONSTRAINT "book_view_statistics_book_id_view_type_unique" '
                           'UNIQUE("book_id","view_type");')
    before = stats(pgc, db)
    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1
    check = plan["preflight"]["checks"][0]
    assert check["ok"] is False and check["tag"] == "0007_unique_only" and check["statement"] == 1
    assert check["live"]["groups"] == 3 and check["live"]["rows"] == 7
    assert check["live"]["samples"][0] == {"key": [sb.INCIDENT_BOOK, "card_view"], "rows": 3}
    assert plan["preflight"]["rehearsal"] is None  # refused statically: no lock was taken for a rehearsal
    assert "3 duplicate key groups (7 rows) on book_view_statistics" in proc.stderr
    assert f"({sb.INCIDENT_BOOK}, card_view) x3" in proc.stderr
    text = migrate(pgc, db, folder, "--check").stdout
    assert "REFUSED" in text and "3 duplicate groups (7 rows)" in text

    proc = migrate(pgc, db, folder)
    assert proc.returncode == 1 and "apply refused, nothing changed: preflight: 0007_unique_only statement 1" in proc.stderr
    assert stats(pgc, db) == before and len(history(pgc, db)) == 7


def test_duplicates_with_consolidation_pass_and_view_counts_are_preserved(pgc, db, node_modules, tmp_path):
    incident_db(pgc, db, node_modules, tmp_path)
    before = stats(pgc, db)
    assert before["dup_groups"] == 3 and before["constraint"] == 0
    proc = migrate(pgc, db, MIGRATIONS, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 2 and plan["to_apply"] == [T0007]
    check = plan["preflight"]["checks"][0]
    assert check["statement"] == 3 and check["live"]["groups"] == 3 and check["ok"] and check["verified"]
    assert check["consolidated_by"] == ["statement 1", "statement 2"]
    assert check["at_statement"]["groups"] == 0  # counted inside the rehearsal, after statements 1-2
    assert plan["preflight"]["rehearsal"] == {"ok": True, "failure": None, "statements": 3, "attempts": 1}
    assert stats(pgc, db) == before  # the rehearsal was rolled back

    doc = as_json(migrate(pgc, db, MIGRATIONS, "--json", check=True))
    assert doc["applied_now"] == [T0007]
    after = stats(pgc, db)
    assert after["total"] == before["total"] and after["dup_groups"] == 0 and after["constraint"] == 1
    assert after["rows"] == before["rows"] - 4
    # the incident's upsert works now
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count, last_viewed_at) VALUES (%s, %s, 1, now()) "
                     "ON CONFLICT (book_id, view_type) DO UPDATE SET view_count = book_view_statistics.view_count + 1",
                     (sb.INCIDENT_BOOK, "card_view"))
        assert conn.execute("SELECT view_count FROM book_view_statistics WHERE book_id = %s AND view_type = 'card_view'",
                            (sb.INCIDENT_BOOK,)).fetchone()[0] == 11
    assert judge(node_modules, pgc, db, MIGRATIONS).returncode == 0 and len(history(pgc, db)) == 8


def test_rehearsal_reports_the_first_failure_with_tag_statement_and_sqlstate(pgc, db, node_modules, tmp_path):
    # consolidation that does not consolidate: static preflight trusts it, the rehearsal finds out
    folder = incident_with(pgc, db, node_modules, tmp_path, "0007_bad_consolidation",
                           'UPDATE "book_view_statistics" SET "view_count" = "view_count";--> statement-breakpoint\n'
                           'ALTER TABLE "book_view_statistics" ADD CONSTRAINT "u" UNIQUE("book_id","view_type");')
    before = stats(pgc, db)
    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1
    assert plan["preflight"]["rehearsal"]["failure"]["tag"] == "0007_bad_consolidation"
    assert plan["preflight"]["rehearsal"]["failure"]["statement"] == 2
    assert plan["preflight"]["rehearsal"]["failure"]["sqlstate"] == "23505"
    assert plan["preflight"]["checks"][0]["at_statement"]["groups"] == 3
    assert "rehearsal: 0007_bad_consolidation statement 2: 23505 could not create unique index" in proc.stderr
    assert stats(pgc, db) == before
    # the apply fails the same way, names the duplicates it found right before, and keeps nothing
    proc = migrate(pgc, db, folder, "--json")
    doc = as_json(proc)
    assert proc.returncode == 1 and doc["error"]["sqlstate"] == "23505"
    assert list(doc["error"]["before_statement"].values())[0]["groups"] == 3
    assert stats(pgc, db) == before and len(history(pgc, db)) == 7


def test_concurrent_applies_one_wins_the_other_fails_clearly(pgc, db, tmp_path):
    folder = folder_copy(tmp_path)
    add_entry(folder, "0008_slow", 1790000000000, "SELECT pg_sleep(3);")
    migrate(pgc, db, folder_copy(tmp_path / "base"), check=True)
    env = {**os.environ, "SLIPWAY_TEST_DSN": pgc.dsn(db)}
    cmd = [*INVOKE, "migrate", "--dsn-env", "SLIPWAY_TEST_DSN", "--migrations", str(folder),
           "--lock-wait", "1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    time.sleep(1.0)  # the first one holds the lock (pg_sleep runs inside its transaction)
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=60), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    loser = next(r for r in results if r[0] == 1)
    assert "another migration is running on this database (backend pid" in loser[2]
    assert "slipway" in loser[2] and pgc.password not in loser[1] + loser[2]
    assert [h[1] for h in history(pgc, db)].count(1790000000000) == 1
    # once it is done, a late apply waits for nothing and finds nothing to do
    assert as_json(migrate(pgc, db, folder, "--json", check=True))["result"] == "up_to_date"


def test_concurrent_rehearsals_of_one_database_take_turns_instead_of_deadlocking(pgc, db, tmp_path):
    """Two hosts sharing a database plan a deploy at once: without the advisory lock their
    rehearsals (UPDATE ... then ALTER TABLE) wait on each other's locks and one dies with 40P01."""
    folder = folder_copy(tmp_path)
    add_entry(folder, "0008_touch_then_alter", 1790000000000,
              "UPDATE book_view_statistics SET view_count = view_count;--> statement-breakpoint\n"
              "SELECT pg_sleep(1.5);--> statement-breakpoint\n"
              "ALTER TABLE book_view_statistics ADD COLUMN touched int;")
    migrate(pgc, db, folder_copy(tmp_path / "base"), check=True)
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO books (id, title, author) VALUES ('00000000-0000-4000-8000-000000000001', 't', 'a')")
        conn.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count) "
                     "VALUES ('00000000-0000-4000-8000-000000000001', 'card_view', 1)")
    env = {**os.environ, "SLIPWAY_TEST_DSN": pgc.dsn(db)}
    cmd = [*INVOKE, "migrate", "--dsn-env", "SLIPWAY_TEST_DSN", "--migrations", str(folder), "--check"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=60), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [r[0] for r in results] == [2, 2], results  # both: pending, rehearsal ok
    assert all("rehearsal   ok" in r[1] and "40P01" not in r[1] + r[2] for r in results)
    with pgc.connect(db) as conn:  # rehearsals only: nothing kept
        assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE column_name = 'touched'").fetchone()[0] == 0


def test_quoted_identifiers_in_tracking_schema_and_table_are_not_injected(pgc, db, node_modules, tmp_path):
    schema = 'mig"rations; DROP TABLE books; --'
    table = "track'ed\"rows"
    doc = as_json(migrate(pgc, db, MIGRATIONS, "--schema", schema, "--table", table, "--json", check=True))
    assert doc["applied_now"] == TAGS and doc["tracking_table"] == f"{schema}.{table}"
    with pgc.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('books')").fetchone()[0] is not None
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()[0] == 1
        assert conn.execute("SELECT to_regnamespace('drizzle')").fetchone()[0] is None
    assert len(history(pgc, db, schema, table)) == 8
    # drizzle, configured with the same names, reads the same table and has nothing to do
    proc = judge(node_modules, pgc, db, MIGRATIONS, schema=schema, table=table)
    assert proc.returncode == 0, proc.stderr
    assert len(history(pgc, db, schema, table)) == 8
    assert as_json(migrate(pgc, db, MIGRATIONS, "--schema", schema, "--table", table, "--check", "--json", check=True))["result"] == "up_to_date"


def test_a_table_that_is_not_a_tracking_table_is_refused(pgc, db):
    with pgc.connect(db) as conn:
        conn.execute("CREATE SCHEMA drizzle; CREATE TABLE drizzle.__drizzle_migrations (x int)")
    proc = migrate(pgc, db, MIGRATIONS, "--check")
    assert proc.returncode == 1 and "is not a drizzle tracking table (columns: x)" in proc.stderr


def test_unique_index_preflight_handles_expressions_predicates_and_nulls(pgc, db, tmp_path):
    folder = folder_copy(tmp_path)
    migrate(pgc, db, folder, check=True)
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO users (email, display_name) VALUES "
                     "('A@x.invalid', '100% reader'), ('a@x.invalid', '100% reader'), ('b@x.invalid', NULL), "
                     "('c@x.invalid', 'plain'), ('C@x.invalid', 'plain')")
    # lower(email) duplicates only among '100%' names: the predicate keeps its literal '%'; NULL
    # display names never collide (NULLS DISTINCT)
    add_entry(folder, "0008_unique_lower_email", 1790000000000,
              "CREATE UNIQUE INDEX \"users_lower_email_pct\" ON \"users\" (lower(\"email\"), \"display_name\") "
              "WHERE \"display_name\" LIKE '%\\%%';")
    add_entry(folder, "0009_not_null_name", 1790000001000,
              'ALTER TABLE "users" ALTER COLUMN "display_name" SET NOT NULL;')
    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1
    unique, not_null = plan["preflight"]["checks"]
    assert unique["kind"] == "unique" and unique["ok"] is False
    assert unique["live"]["groups"] == 1 and unique["live"]["samples"] == [{"key": ["a@x.invalid", "100% reader"], "rows": 2}]
    assert "WHERE display_name LIKE" in unique["what"]
    assert not_null["kind"] == "not_null" and not_null["ok"] is False and not_null["live"]["null_rows"] == 1
    assert migrate(pgc, db, folder).returncode == 1
    with pgc.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('users_lower_email_pct')").fetchone()[0] is None


def test_statements_that_cannot_run_in_a_transaction_are_refused_before_running(pgc, db, tmp_path):
    folder = folder_copy(tmp_path)
    add_entry(folder, "0008_concurrent_index", 1790000000000,
              'CREATE INDEX CONCURRENTLY "books_author_idx" ON "books" ("author");')
    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1 and plan["preflight"]["rehearsal"] is None
    assert "CREATE INDEX CONCURRENTLY cannot run inside a transaction block" in proc.stderr
    assert migrate(pgc, db, folder).returncode == 1 and history(pgc, db) is None


def test_classification_edge_cases_without_a_database(tmp_path):
    info = drizzle.read_folder(MIGRATIONS)
    migs = info["migrations"]
    rows = [{"id": i + 1, "hash": m["hash"], "created_at": m["when"]} for i, m in enumerate(migs[:7])]
    # the journal's `when` of an applied entry was moved forward: drizzle would run it again
    moved = [dict(m) for m in migs]
    moved[6]["when"] = migs[7]["when"] + 1
    out = drizzle.classify(moved, rows)
    assert out["migrations"][6]["status"] == "applied"
    assert out["drizzle_would_apply"] == [migs[6]["tag"], migs[7]["tag"]]
    assert any("would run it again" in w for w in out["warnings"])
    # a row with a NULL created_at: drizzle compares against 0 and would re-run everything
    out = drizzle.classify(migs, rows + [{"id": 99, "hash": "x" * 64, "created_at": None}])
    assert out["drizzle_would_apply"] == [m["tag"] for m in migs]
    assert out["unknown_rows"] == [{"id": 99, "hash": "x" * 64, "created_at": None}]
    assert [m["status"] for m in out["migrations"]] == ["applied"] * 7 + ["pending"]
    # two files with identical SQL: each row is matched once, by hash and `when`
    twins = [dict(m) for m in migs[:2]]
    twins[1] = dict(twins[0], tag="0001_same", idx=1, when=migs[1]["when"])
    out = drizzle.classify(twins, [{"id": 1, "hash": twins[0]["hash"], "created_at": migs[0]["when"]}])
    assert [m["status"] for m in out["migrations"]] == ["applied", "pending"]


def test_where_drizzle_would_rerun_applied_migrations_slipway_does_not(pgc, db, node_modules, tmp_path):
    migrate(pgc, db, MIGRATIONS, check=True)
    # an applied entry's `when` moved forward in the journal (a rebase, a hand edit)
    folder = folder_copy(tmp_path)
    path = folder / "meta" / "_journal.json"
    journal = json.loads(path.read_text())
    journal["entries"][6]["when"] = journal["entries"][7]["when"] + 1
    path.write_text(json.dumps(journal))
    proc = judge(node_modules, pgc, db, folder)
    assert proc.returncode == 1 and "already exists" in proc.stderr  # drizzle runs 0006 again
    plan = as_json(migrate(pgc, db, folder, "--check", "--json", check=True))
    assert plan["result"] == "up_to_date" and plan["drizzle_would_apply"] == [TAGS[6]]
    assert any(f"{TAGS[6]} is applied (row id 7)" in w and "would run it again" in w for w in plan["warnings"])
    # a tracking row with a NULL created_at: drizzle compares with 0 and re-runs everything
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES ('manual', NULL)")
    proc = judge(node_modules, pgc, db, MIGRATIONS)
    assert proc.returncode == 1 and 'CREATE TABLE "users"' in proc.stderr
    proc = migrate(pgc, db, MIGRATIONS, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 1 and plan["to_apply"] == [] and plan["unknown_rows"][0]["hash"] == "manual"
    assert plan["drizzle_would_apply"] == TAGS
    assert len(history(pgc, db)) == 9
