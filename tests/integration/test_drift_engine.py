"""The drift check's engine (module_utils/catalog.py, drift.py, shadow.py) against a real
PostgreSQL 15 cluster: the applied migrations replayed into a shadow database on the same server,
both schemas read from the catalogs and compared. The reference app's history made to drift by
hand (a constraint dropped with its tracking row present, an index dropped, a column added, an
INVALID unique index from a failed CREATE UNIQUE INDEX CONCURRENTLY, a migration applied by hand
without its row), a migration running (the lock held: could not check), and every public history
of ../shared/corpus/drizzle that runs here: applied by slipway's engine (online mode, index builds
rewritten), no drift."""
from __future__ import annotations

import psycopg
import pytest
from ansible_collections.slipway.core.plugins.module_utils import drizzle, shadow
from ansible_collections.slipway.core.plugins.module_utils.migrate import LOCK_CLASS
from conftest import ROOT
from migtools import MIGRATIONS, T0007, TAGS
from test_corpus import CORPUS, SETS, missing_extensions

from slipway import migrations as mig
from slipway.diagnose import index_folder

UNIQUE = "book_view_statistics_book_id_view_type_unique"


def applied(pgc, db, folder=MIGRATIONS):
    doc, error, code = mig.run_dsn(pgc.dsn(db), str(folder), False, min_rows=0)
    assert code == 0, error
    return drizzle.read_folder(str(folder))


def check(pgc, db, folder):
    with pgc.connect(db) as conn:
        return shadow.check(conn, lambda name: pgc.connect(name), folder)


def by(findings, kind, name):
    found = [f for f in findings if f["kind"] == kind and f["object"]["name"] == name]
    assert len(found) == 1, [(f["kind"], f["object"]["name"]) for f in findings]
    return found[0]


def test_a_database_its_migrations_made_has_no_drift(pgc, db):
    folder = applied(pgc, db)
    result = check(pgc, db, folder)
    assert result["findings"] == [] and result["exit"] == 0, result["findings"]
    assert result["counts"]["applied"] == len(TAGS) and result["shadow"]["migrations_replayed"] == len(TAGS)
    with pgc.connect("postgres") as conn:  # the shadow is gone
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'slipway_shadow_%'").fetchone()[0] == 0


def test_drift_names_the_migration_the_cause_and_the_severity(pgc, db):
    folder = applied(pgc, db)
    with pgc.connect(db) as conn:
        conn.execute(f"ALTER TABLE book_view_statistics DROP CONSTRAINT {UNIQUE}")
        conn.execute("DROP INDEX books_title_idx")
        conn.execute("ALTER TABLE books ADD COLUMN hotfix_note text")
    result = check(pgc, db, folder)
    findings = result["findings"]
    assert result["exit"] == 2 and len(findings) == 3, findings

    constraint = by(findings, "missing", UNIQUE)
    assert constraint["severity"] == "critical" and constraint["cause"] == "applied_missing"
    assert constraint["migration"]["tag"] == T0007 and constraint["migration"]["statement"] == 3
    assert "ADD CONSTRAINT" in constraint["migration"]["text"]
    assert constraint["expected"]["definition"] == "UNIQUE (book_id, view_type)"
    assert "CREATE UNIQUE INDEX CONCURRENTLY" in constraint["fix"] and "USING INDEX" in constraint["fix"]

    index = by(findings, "missing", "books_title_idx")
    assert index["severity"] == "warning" and index["cause"] == "applied_missing"
    assert index["migration"]["tag"] in TAGS and "books_title_idx" in index["migration"]["text"]

    column = by(findings, "extra", "public.books.hotfix_note")
    assert column["severity"] == "warning" and column["cause"] == "hand_made" and column["migration"] is None
    assert "never drops" in column["fix"]
    assert findings[0]["severity"] == "critical"  # most severe first


def test_an_invalid_unique_index_is_critical(pgc, db):
    """What a failed CREATE UNIQUE INDEX CONCURRENTLY leaves: ON CONFLICT cannot use it (42P10)."""
    folder = applied(pgc, db)
    with pgc.connect(db) as conn:
        conn.execute(f"ALTER TABLE book_view_statistics DROP CONSTRAINT {UNIQUE}")
        book = conn.execute("SELECT id FROM books LIMIT 1").fetchone()
        if book is None:
            conn.execute("INSERT INTO books (id, title, author, language) VALUES "
                         "('aa4a9ca1-9a21-4126-9a7a-39b17ff186bc', 't', 'a', 'en')")
            book = ("aa4a9ca1-9a21-4126-9a7a-39b17ff186bc",)
        for _ in range(2):
            conn.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count) VALUES (%s, 'card_view', 1)",
                         book)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {UNIQUE} ON book_view_statistics (book_id, view_type)")
        assert conn.execute(f"SELECT indisvalid FROM pg_index WHERE indexrelid = '{UNIQUE}'::regclass").fetchone()[0] is False
    findings = check(pgc, db, folder)["findings"]
    invalid = by(findings, "invalid", UNIQUE)
    assert invalid["severity"] == "critical" and "42P10" in invalid["why"] and "DROP INDEX CONCURRENTLY" in invalid["fix"]
    missing = by(findings, "missing", UNIQUE)
    assert missing["severity"] == "critical"  # an INVALID index stands in for nothing


def test_a_valid_unique_index_on_the_same_columns_makes_a_missing_constraint_a_warning(pgc, db):
    folder = applied(pgc, db)
    with pgc.connect(db) as conn:
        conn.execute(f"ALTER TABLE book_view_statistics DROP CONSTRAINT {UNIQUE}")
        conn.execute("CREATE UNIQUE INDEX hand_made_bvs ON book_view_statistics (view_type, book_id)")
    findings = check(pgc, db, folder)["findings"]
    missing = by(findings, "missing", UNIQUE)
    assert missing["severity"] == "warning" and "hand_made_bvs" in missing["why"]
    assert by(findings, "extra", "hand_made_bvs")["severity"] == "info"


def test_a_migration_applied_by_hand_without_its_row_is_pending_and_its_objects_extra(pgc, db):
    folder = applied(pgc, db)
    with pgc.connect(db) as conn:
        conn.execute("DELETE FROM drizzle.__drizzle_migrations WHERE created_at = "
                     "(SELECT max(created_at) FROM drizzle.__drizzle_migrations)")
    result = check(pgc, db, folder)
    pending = by(result["findings"], "migration", T0007)
    assert pending["actual"] == "pending" and pending["severity"] == "warning" and "invoke deploy" in pending["fix"]
    extra = by(result["findings"], "extra", UNIQUE)
    assert extra["cause"] == "pending_by_hand" and extra["migration"]["tag"] == T0007
    assert result["counts"]["pending"] == 1 and result["exit"] == 1


def test_a_migration_running_means_could_not_check(pgc, db):
    folder = applied(pgc, db)
    with pgc.connect(db) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, shadow.lock_key("drizzle", "__drizzle_migrations")))
        with pytest.raises(shadow.DriftBusy, match="a migration is running"):
            check(pgc, db, folder)
    assert check(pgc, db, folder)["exit"] == 0


def test_a_role_that_may_not_create_databases_cannot_check(pgc, db):
    folder = applied(pgc, db)
    with pgc.connect("postgres") as conn:
        conn.execute("DROP ROLE IF EXISTS drift_nocreate")
        conn.execute("CREATE ROLE drift_nocreate NOLOGIN NOCREATEDB")
        conn.execute(f"GRANT drift_nocreate TO {pgc.user}")
    try:
        with pgc.connect(db) as conn:
            conn.execute("GRANT USAGE ON SCHEMA drizzle TO drift_nocreate")
            conn.execute("GRANT SELECT ON drizzle.__drizzle_migrations TO drift_nocreate")
            conn.execute("SET ROLE drift_nocreate")
            with pytest.raises(shadow.CannotCheck, match="CREATEDB"):
                shadow.check(conn, lambda name: None, folder)
    finally:
        with pgc.connect(db) as conn:
            conn.execute("DROP OWNED BY drift_nocreate")
        with pgc.connect("postgres") as conn:
            conn.execute("DROP ROLE IF EXISTS drift_nocreate")


@pytest.mark.parametrize("name", SETS)
def test_public_histories_applied_by_slipway_show_no_drift(pgc, name):
    src = CORPUS / name
    lacking = missing_extensions(pgc, src)
    if lacking:
        pytest.skip(f"needs extension(s) {', '.join(lacking)}, not available on this server")
    db = pgc.createdb()
    try:
        doc, error, code = mig.run_dsn(pgc.dsn(db), str(src), False, min_rows=0)
        if code != 0:
            pytest.skip(f"slipway's engine does not apply it here: {error}")
        folder = drizzle.read_folder(str(src))
        result = check(pgc, db, folder)
        assert [f for f in result["findings"] if f["kind"] != "migration"] == [], result["findings"][:5]
        # invoke diagnose names the migration that makes a table or unique key an error lacks: every live
        # one of this history must be found in its statements by that index (pglast) as PostgreSQL made it
        made = index_folder(folder)
        with pgc.connect(db) as conn:
            tables, uniques = live_tables_and_uniques(conn)
        assert sorted(t for t in tables if ("table", t) not in made) == []
        assert sorted(u for u in uniques if ("unique", *u) not in made) == []
    finally:
        with pgc.connect("postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def live_tables_and_uniques(conn) -> tuple[set, set]:
    """The app's tables, and their unique keys on plain columns (no predicate, no expression), as
    (table, sorted columns), from the catalogs."""
    where = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'drizzle') AND n.nspname NOT LIKE 'pg_toast%'"
    tables = {r[0] for r in conn.execute(
        f"SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
        f"AND {where} AND NOT c.relispartition AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid "
        "AND d.deptype = 'e')")}
    uniques = set()
    for table, cols in conn.execute(
            "SELECT c.relname, array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) "
            f"WHERE i.indisunique AND i.indpred IS NULL AND NOT (0 = ANY(i.indkey)) AND {where} "
            "GROUP BY i.indexrelid, c.relname"):
        if table in tables:
            uniques.add((table, tuple(sorted(cols))))
    return tables, uniques


def test_the_reference_app_is_where_the_tests_expect_it():
    assert (ROOT / "examples" / "reader-app" / "migrations" / "meta" / "_journal.json").is_file()


def test_grants_and_comments_are_compared_on_request(pgc, db, tmp_path):
    from migtools import add_entry, folder_copy

    with pgc.connect("postgres") as conn:
        conn.execute("DROP ROLE IF EXISTS drift_reader")
        conn.execute("CREATE ROLE drift_reader NOLOGIN")
    try:
        folder_path = folder_copy(tmp_path)
        add_entry(folder_path, "0008_grants_and_comments", 1900000000000,
                  'GRANT SELECT ON "books" TO drift_reader;\n--> statement-breakpoint\n'
                  "COMMENT ON TABLE \"books\" IS 'the catalogue';")
        folder = applied(pgc, db, folder_path)

        def check_with(include):
            with pgc.connect(db) as conn:
                state = shadow.read_live(conn, folder, include=include)
                expected = shadow.build_shadow(conn, lambda name: pgc.connect(name), folder["migrations"],
                                               exclude=["drizzle"], include=include)
                return shadow.result(expected, state, folder, {"where": "test"})["findings"]

        assert check_with(("grants", "comments")) == []
        with pgc.connect(db) as conn:
            conn.execute('REVOKE SELECT ON "books" FROM drift_reader')
            conn.execute("COMMENT ON TABLE \"books\" IS 'changed by hand'")
        assert check_with(()) == []  # off by default
        found = {(f["kind"], f["object"]["kind"], f["severity"]) for f in check_with(("grants", "comments"))}
        assert found == {("missing", "grant", "warning"), ("changed", "comment", "info")}
    finally:
        with pgc.connect(db) as conn:
            conn.execute('REVOKE ALL ON "books" FROM drift_reader')
        with pgc.connect("postgres") as conn:
            conn.execute("DROP ROLE IF EXISTS drift_reader")
