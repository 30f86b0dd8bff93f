"""The three defects real-world histories showed (issue: migration engine on real data), each as its
own small case on a real PostgreSQL, with drizzle-orm's migrate() as the judge where it matters."""
from __future__ import annotations

import json
from pathlib import Path

from migtools import add_entry, as_json, history, judge, migrate, schema_dump


def new_folder(tmp_path: Path, *migrations: tuple[str, str]) -> Path:
    folder = tmp_path / "migrations"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "_journal.json").write_text(json.dumps({"version": "7", "dialect": "postgresql", "entries": []}))
    for n, (tag, sql) in enumerate(migrations):
        add_entry(folder, tag, 1700000000000 + n * 1000, sql)
    return folder


def table_names(pgc, db) -> list[str]:
    with pgc.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]


def test_a_column_added_then_constrained_in_the_pending_set_is_left_to_the_rehearsal(pgc, db, node_modules, tmp_path):
    base = new_folder(tmp_path / "a", ("0000_t", 'CREATE TABLE "t"("id" integer PRIMARY KEY);'))
    assert judge(node_modules, pgc, db, base).returncode == 0
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO t SELECT g FROM generate_series(1, 50) g")
    folder = new_folder(tmp_path / "b", ("0000_t", 'CREATE TABLE "t"("id" integer PRIMARY KEY);'),
                        ("0001_k", 'ALTER TABLE "t" ADD COLUMN "k" text;--> statement-breakpoint\n'
                                   'CREATE UNIQUE INDEX "t_k_idx" ON "t"("k");'))
    before = schema_dump(pgc, db), history(pgc, db)
    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    assert proc.returncode == 2 and plan["to_apply"] == ["0001_k"] and not plan["blockers"], proc.stdout + proc.stderr
    check = plan["preflight"]["checks"][0]
    assert check["ok"] and check["live"] is None and "cannot be counted before" in check["note"] and "42703" in check["note"]
    assert check["at_statement"] == {"groups": 0, "rows": 0, "samples": [], "null_rows": 0}  # counted in the rehearsal
    assert plan["preflight"]["rehearsal"]["ok"] and check["verified"]
    assert (schema_dump(pgc, db), history(pgc, db)) == before
    # the human output says the same, no traceback
    proc = migrate(pgc, db, folder, "--check")
    assert proc.returncode == 2 and "cannot be counted before the pending statements run" in proc.stdout
    migrate(pgc, db, folder, check=True)
    assert len(history(pgc, db)) == 2
    assert judge(node_modules, pgc, db, folder).returncode == 0 and len(history(pgc, db)) == 2


def test_a_file_with_its_own_begin_commit_never_commits_a_rehearsal_nor_a_failed_apply(pgc, db, tmp_path):
    own_txn = ('BEGIN;\nCREATE TABLE "a"("id" integer PRIMARY KEY);--> statement-breakpoint\n'
               'CREATE TABLE "b"("id" integer PRIMARY KEY);\nCOMMIT;')
    folder = new_folder(tmp_path, ("0000_own_txn", own_txn), ("0001_fails", 'CREATE TABLE "c"("id" integer REFERENCES "nope"("id"));'))
    proc = migrate(pgc, db, folder, "--check", "--json")
    plan = as_json(proc)
    # the rehearsal fails on 0001 and rolls back 0000 too: the file's COMMIT did not run
    assert proc.returncode == 1 and plan["preflight"]["rehearsal"]["failure"]["tag"] == "0001_fails"
    assert table_names(pgc, db) == [] and history(pgc, db) is None
    how = [s for s in plan["execution"]["statements"] if s["tag"] == "0000_own_txn"]
    assert [h["how"] for h in how] == ["without the file's own BEGIN", "without the file's own COMMIT"]
    assert "drizzle's migrator" in how[0]["why"] and "commits everything run so far" in how[0]["why"]

    proc = migrate(pgc, db, folder)
    assert proc.returncode == 1 and "everything rolled back, tracking table unchanged" in proc.stderr
    assert table_names(pgc, db) == [] and history(pgc, db) is None  # and it was so

    (folder / "0001_fails.sql").write_text('CREATE TABLE "c"("id" integer REFERENCES "a"("id"));')
    migrate(pgc, db, folder, check=True)
    assert table_names(pgc, db) == ["a", "b", "c"] and len(history(pgc, db)) == 2


def test_a_file_that_rolls_back_is_refused_before_anything_runs(pgc, db, tmp_path):
    folder = new_folder(tmp_path, ("0000_rb", 'CREATE TABLE "a"("id" integer);\nROLLBACK;'))
    proc = migrate(pgc, db, folder)
    assert proc.returncode == 1 and "0000_rb statement 1 contains ROLLBACK" in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert table_names(pgc, db) == [] and history(pgc, db) is None


def test_a_sql_file_the_journal_does_not_list_is_a_warning_and_is_not_run(pgc, db, node_modules, tmp_path):
    folder = new_folder(tmp_path, ("0000_t", 'CREATE TABLE "t"("id" integer);'))
    (folder / "0001_abandoned.sql").write_text('CREATE TABLE "stray"("id" integer);')
    proc = migrate(pgc, db, folder, "--check")
    assert proc.returncode == 2 and "0001_abandoned.sql is not in the journal" in proc.stdout
    migrate(pgc, db, folder, check=True)
    assert table_names(pgc, db) == ["t"]
    assert judge(node_modules, pgc, db, folder).returncode == 0 and table_names(pgc, db) == ["t"]
