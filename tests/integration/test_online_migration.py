"""Online (lock-safe) migrations against a real PostgreSQL with real concurrent writers.

The incident database grown past the online threshold; 0007 runs as consolidation (committed),
CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... USING INDEX with its tracking row. The
end state must be drizzle's own (schema dump identical, drizzle-orm's migrate() applies nothing).
Speed is measured in bench/online_migration.py, not here.
"""
from __future__ import annotations

import random
import threading
import time

import psycopg
from bigtable import grow_statistics
from conftest import sb
from migtools import MIGRATIONS, T0007, add_entry, as_json, folder_copy, history, incident_db, judge, migrate, schema_dump

EXTRA_ROWS = 200_000


def grow(pgc, db, rows=EXTRA_ROWS):
    """Unique (book, view_type) rows so the table is past the online threshold; returns max(id)."""
    with pgc.connect(db) as conn:
        grow_statistics(conn, rows)
        return conn.execute("SELECT max(id) FROM book_view_statistics").fetchone()[0]


def totals(pgc, db):
    with pgc.connect(db) as conn:
        return conn.execute("SELECT sum(view_count) FROM book_view_statistics").fetchone()[0]


def invalid_indexes(pgc, db):
    with pgc.connect(db) as conn:
        return conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid").fetchall()


class Updater(threading.Thread):
    """Random-row increments, as fast as the database answers, until stopped."""

    def __init__(self, pgc, db, max_id):
        super().__init__(daemon=True)
        self.conn = pgc.connect(db)
        self.max_id = max_id
        self.stop = threading.Event()
        self.ok, self.errors = 0, []

    def run(self):
        rng = random.Random(1)
        while not self.stop.is_set():
            try:
                self.conn.execute("UPDATE book_view_statistics SET view_count = view_count + 1 WHERE id = %s",
                                  (rng.randint(1, self.max_id),))
                self.ok += 1
            except psycopg.Error as exc:
                self.errors.append(exc.sqlstate)
            time.sleep(0.005)
        self.conn.close()


class DuplicateDuringBuild(threading.Thread):
    """Waits for a CREATE INDEX CONCURRENTLY on book_view_statistics to be scanning the table, then
    inserts one row duplicating the incident book's card_view key (as the pre-fix code did)."""

    def __init__(self, pgc, db):
        super().__init__(daemon=True)
        self.conn = pgc.connect(db)
        self.stop = threading.Event()
        self.inserted = None  # True: committed during the build; False: refused by the index

    def run(self):
        while not self.stop.is_set() and self.inserted is None:
            phase = self.conn.execute(
                "SELECT phase FROM pg_stat_progress_create_index WHERE relid = 'book_view_statistics'::regclass "
                "AND command = 'CREATE INDEX CONCURRENTLY'").fetchone()
            if phase and phase[0].startswith("building index"):
                try:
                    self.conn.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count) "
                                      "VALUES (%s, 'card_view', 4)", (sb.INCIDENT_BOOK,))
                    self.inserted = True
                except psycopg.Error as exc:
                    assert exc.sqlstate == "23505", exc
                    self.inserted = False
            time.sleep(0.002)
        self.conn.close()


def reference_schema(pgc, node_modules):
    """What drizzle's own migrator makes of 0000-0007 on a fresh database."""
    ref = pgc.createdb()
    assert judge(node_modules, pgc, ref, MIGRATIONS).returncode == 0
    return schema_dump(pgc, ref)


def test_online_0007_under_writers_keeps_every_view_and_ends_as_drizzle(pgc, db, node_modules, tmp_path):
    incident_db(pgc, db, node_modules, tmp_path)
    max_id = grow(pgc, db)

    # the rehearsal runs on a private copy: a live row the app holds locked does not stop it
    with pgc.connect(db) as holder, holder.transaction():
        holder.execute("SELECT * FROM book_view_statistics WHERE book_id = %s FOR UPDATE", (sb.INCIDENT_BOOK,))
        proc = migrate(pgc, db, MIGRATIONS, "--check", "--json")
        rehearsal = as_json(proc)["preflight"]["rehearsal"]
        assert rehearsal["ok"] and rehearsal["attempts"] == 1, rehearsal
        assert rehearsal["copies"][0]["rows"] == EXTRA_ROWS + sum(len(c) for _, _, c in sb.STATS)
    proc = migrate(pgc, db, MIGRATIONS, "--check")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "rehearsal   on a private copy of" in proc.stdout
    assert "rewritten: CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... UNIQUE USING INDEX" in proc.stdout
    assert "NOT one transaction" in proc.stdout and "rehearsal   ok" in proc.stdout
    assert "rehearsal   not run: " + T0007 + " statement 3: ALTER TABLE" in proc.stdout

    before = totals(pgc, db)
    updater, dup = Updater(pgc, db, max_id), DuplicateDuringBuild(pgc, db)
    updater.start()
    dup.start()
    time.sleep(0.3)
    try:
        proc = migrate(pgc, db, MIGRATIONS, "--json")
    finally:
        time.sleep(0.2)
        updater.stop.set()
        dup.stop.set()
        updater.join()
        dup.join()
    doc = as_json(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert doc["applied_now"] == [T0007] and updater.errors == [] and updater.ok > 0
    # written between the consolidation and the end of the build: consolidated, and the build retried
    assert dup.inserted is True, "the duplicate was not written during the build"
    assert [b["result"] for b in doc["builds"]] == ["duplicates written during the build", "built"]
    # every view kept: the table's total grew by exactly what the writers added
    assert totals(pgc, db) == before + updater.ok + 4
    assert invalid_indexes(pgc, db) == []
    assert schema_dump(pgc, db) == reference_schema(pgc, node_modules)
    rows = history(pgc, db)
    assert judge(node_modules, pgc, db, MIGRATIONS).returncode == 0 and history(pgc, db) == rows and len(rows) == 8


def test_an_invalid_index_from_an_interrupted_build_is_dropped_and_rebuilt(pgc, db, node_modules, tmp_path):
    incident_db(pgc, db, node_modules, tmp_path)
    grow(pgc, db, 20_000)
    with pgc.connect(db) as conn:  # a CONCURRENTLY build that failed on the duplicates: INVALID, left behind
        try:
            conn.execute(f'CREATE UNIQUE INDEX CONCURRENTLY "{sb.UNIQUE_CONSTRAINT}" ON book_view_statistics (book_id, view_type)')
        except psycopg.errors.UniqueViolation:
            pass
    assert invalid_indexes(pgc, db) == [(sb.UNIQUE_CONSTRAINT,)]
    proc = migrate(pgc, db, MIGRATIONS, "--check")
    assert f"index {sb.UNIQUE_CONSTRAINT} on book_view_statistics is INVALID" in proc.stdout
    doc = as_json(migrate(pgc, db, MIGRATIONS, "--json", check=True))
    assert [b["result"] for b in doc["builds"]] == ["dropped INVALID", "built"]
    assert invalid_indexes(pgc, db) == []
    assert schema_dump(pgc, db) == reference_schema(pgc, node_modules)


def test_a_build_that_fails_leaves_no_invalid_index_and_nothing_else(pgc, db, node_modules, tmp_path):
    """A unique index with nothing pending to consolidate, prebuilt before the transaction; a duplicate
    written during the build fails it: the INVALID index is dropped, nothing else ran."""
    incident_db(pgc, db, node_modules, tmp_path)
    with pgc.connect(db) as conn:  # a consolidated table (0007's statements 1-2 by hand)
        conn.execute(folder_copy(tmp_path / "x").joinpath(f"{T0007}.sql").read_text().split("--> statement-breakpoint")[0])
        conn.execute(folder_copy(tmp_path / "y").joinpath(f"{T0007}.sql").read_text().split("--> statement-breakpoint")[1])
    grow(pgc, db)
    folder = folder_copy(tmp_path, upto=7)
    add_entry(folder, "0007_only_index", 1800000000000,
              'CREATE TABLE "side" ("id" integer);--> statement-breakpoint\n'
              'CREATE UNIQUE INDEX "bvs_key" ON "book_view_statistics" ("book_id", "view_type");')
    dup = DuplicateDuringBuild(pgc, db)
    dup.start()
    try:
        proc = migrate(pgc, db, folder)
    finally:
        dup.stop.set()
        dup.join()
    assert dup.inserted is True, "the duplicate was not written during the build"
    assert proc.returncode == 1 and "building bvs_key concurrently (no INVALID index left)" in proc.stderr
    assert "23505" in proc.stderr and len(history(pgc, db)) == 7
    with pgc.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('side')").fetchone()[0] is None  # the transaction never ran
    assert invalid_indexes(pgc, db) == []


def test_one_transaction_switch_is_drizzles_behaviour(pgc, db, node_modules, tmp_path):
    incident_db(pgc, db, node_modules, tmp_path)
    grow(pgc, db, 20_000)
    doc = as_json(migrate(pgc, db, MIGRATIONS, "--check", "--json", "--one-transaction"))
    assert doc["execution"] == {"mode": "transaction", "atomic": True, "statements": [], "summary": "one transaction"}
    doc = as_json(migrate(pgc, db, MIGRATIONS, "--json", "--one-transaction", check=True))
    assert doc["applied_now"] == [T0007] and "builds" not in doc
    assert schema_dump(pgc, db) == reference_schema(pgc, node_modules)


def test_a_build_after_a_write_in_the_same_chunk_waits_for_it(pgc, db, tmp_path):
    """A file without breakpoints (one chunk) that fixes rows and then indexes them: the build must
    not be hoisted before the transaction (it would fail on, or index, the rows the UPDATE fixes)."""
    from test_engine_defects import new_folder

    folder = new_folder(tmp_path / "a", ("0000_t", 'CREATE TABLE "t"("id" integer PRIMARY KEY, "k" text);'))
    migrate(pgc, db, folder, check=True)
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO t SELECT g, 'same' FROM generate_series(1, 50) g")
    folder = new_folder(tmp_path / "b", ("0000_t", 'CREATE TABLE "t"("id" integer PRIMARY KEY, "k" text);'),
                        ("0001_fix", "UPDATE t SET k = 'k' || id;\nCREATE UNIQUE INDEX t_k ON t (k);"))
    doc = as_json(migrate(pgc, db, folder, "--check", "--json", "--online-min-rows", "0"))
    assert doc["preflight"]["rehearsal"]["ok"] and not doc["blockers"], doc["blockers"]
    [how] = doc["execution"]["statements"]
    assert (how["statement"], how["part"]) == (1, 2) and "after committing what runs before it" in how["how"]
    assert doc["execution"]["atomic"] is False
    doc = as_json(migrate(pgc, db, folder, "--json", "--online-min-rows", "0", check=True))
    assert doc["applied_now"] == ["0001_fix"] and [b["result"] for b in doc["builds"]] == ["built"]
    assert invalid_indexes(pgc, db) == []


def test_create_index_if_not_exists_keeps_an_existing_index_as_drizzle_does(pgc, db, tmp_path):
    from test_engine_defects import new_folder

    base = ("0000_t", 'CREATE TABLE "t"("id" integer PRIMARY KEY, "k" text);')
    migrate(pgc, db, new_folder(tmp_path / "a", base), check=True)
    with pgc.connect(db) as conn:
        conn.execute("INSERT INTO t SELECT g, 'k' || g FROM generate_series(1, 50) g")
        conn.execute('CREATE INDEX "t_k" ON t (id)')  # made by hand, another definition
    folder = new_folder(tmp_path / "b", base, ("0001_idx", 'CREATE INDEX IF NOT EXISTS "t_k" ON "t" ("k");'))
    doc = as_json(migrate(pgc, db, folder, "--json", "--online-min-rows", "0", check=True))
    assert doc["applied_now"] == ["0001_idx"] and [b["result"] for b in doc["builds"]] == ["kept"]
    with pgc.connect(db) as conn:
        assert "(id)" in conn.execute("SELECT pg_get_indexdef('t_k'::regclass)").fetchone()[0]
