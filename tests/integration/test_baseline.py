"""`invoke migrate --baseline` against the real test cluster: a database brought up by hand (the
reference app's migrations 0000-0006 run by psql-like hands, the runbook's own record table
`_drizzle_migrations(idx, tag, timestamp)` beside them, no drizzle tracking table) is adopted only
because its schema equals what those migrations make; then drizzle-orm's own migrator agrees (it
applies 0007 alone). A schema that differs is refused with the differences and nothing written;
a database already tracked, an empty one and a data-only ambiguity are refused too."""
from __future__ import annotations

import json

import pytest
from conftest import cli, sb
from migtools import MIGRATIONS, TAGS, add_entry, folder_copy, history, judge

from ansible_collections.slipway.core.plugins.module_utils import drizzle, shadow  # isort: skip


@pytest.fixture(scope="module")
def built_app():
    """drizzle-orm and pg as the reference app pins them (the sandbox's `npm ci` build, no hosts)."""
    ctl = sb.Controller()
    ctl.ensure()
    _, build = sb.build_app(ctl)
    return build / "node_modules"


def by_hand(pgc, db, upto=7, record=True):
    """What the seed's runbook left: the first ``upto`` migrations run by hand, their own record."""
    folder = drizzle.read_folder(str(MIGRATIONS))
    with pgc.connect(db) as conn:
        shadow.replay(conn, folder["migrations"][:upto])
        if record:
            conn.execute("CREATE TABLE _drizzle_migrations (idx integer PRIMARY KEY, tag text NOT NULL, timestamp bigint)")
            for mig in folder["migrations"][:upto]:
                conn.execute("INSERT INTO _drizzle_migrations VALUES (%s, %s, %s)", (mig["idx"], mig["tag"], mig["when"]))


def baseline(pgc, db, *args, folder=MIGRATIONS, expect=0):
    proc = cli("migrate", "--dsn-env", "SLIPWAY_TEST_DSN", "--migrations", str(folder), "--baseline", *args,
               check=False, env={"SLIPWAY_TEST_DSN": pgc.dsn(db)})
    assert proc.returncode == expect, proc.stdout + proc.stderr
    assert pgc.password not in proc.stdout + proc.stderr
    return proc


def tracked(pgc, db) -> bool:
    with pgc.connect(db) as conn:
        return conn.execute("SELECT to_regclass('drizzle.__drizzle_migrations') IS NOT NULL").fetchone()[0]


def test_a_database_brought_up_by_hand_is_adopted_and_drizzle_agrees(pgc, db, built_app):
    by_hand(pgc, db)
    proc = baseline(pgc, db, "--json")
    doc = json.loads(proc.stdout)
    assert doc["baselined"] == TAGS[:7] and doc["pending"] == TAGS[7:]
    assert doc["shadow"] == "a database on the same server"
    rows = history(pgc, db)
    folder = drizzle.read_folder(str(MIGRATIONS))
    assert [(r[0], r[1]) for r in rows] == [(m["hash"], m["when"]) for m in folder["migrations"][:7]]
    # drizzle-orm's own migrator now runs 0007 alone, and the schema is the migrations' own
    out = judge(built_app, pgc, db, MIGRATIONS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(history(pgc, db)) == 8
    with pgc.connect(db) as conn:
        found = shadow.check(conn, lambda name: pgc.connect(name), folder)["findings"]
    # drift still sees the runbook's own record table (made by hand, left as it was): info only
    assert [(f["kind"], f["object"]["name"], f["severity"]) for f in found] == [("extra", "public._drizzle_migrations", "info")]


def test_a_schema_that_differs_is_refused_and_nothing_written(pgc, db):
    by_hand(pgc, db)
    with pgc.connect(db) as conn:
        conn.execute("ALTER TABLE books ADD COLUMN hotfix_note text")
    proc = baseline(pgc, db, expect=1)
    assert proc.stderr.startswith("error: no prefix of the migrations makes the live schema; closest 7 migration(s)")
    assert "extra column public.books.hotfix_note" in proc.stderr and "nothing written" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not tracked(pgc, db)
    proc = baseline(pgc, db, "--baseline-to", TAGS[6], expect=1)
    assert "the live schema is not what" in proc.stderr and not tracked(pgc, db)


def test_already_tracked_and_empty_databases_are_refused(pgc, db):
    baseline(pgc, db, expect=1)  # empty: none of the migrations' objects
    assert not tracked(pgc, db)
    cli("migrate", "--dsn-env", "SLIPWAY_TEST_DSN", "--migrations", str(MIGRATIONS), env={"SLIPWAY_TEST_DSN": pgc.dsn(db)})
    proc = baseline(pgc, db, expect=1)
    assert "has 8 rows already: a database drizzle or slipway migrated needs no baseline" in proc.stderr


def test_a_data_only_migration_makes_it_ask_which(pgc, db, tmp_path):
    folder = folder_copy(tmp_path)
    add_entry(folder, "0008_seed_a_book", 1900000000000,
              "INSERT INTO books (id, title, author, language) VALUES "
              "('00000000-0000-4000-8000-000000000001', 'seed', 'x', 'en') ON CONFLICT DO NOTHING;")
    by_hand(pgc, db, upto=8, record=False)
    proc = baseline(pgc, db, folder=folder, expect=1)
    assert "each leave" in proc.stderr and "--baseline-to TAG" in proc.stderr and not tracked(pgc, db)
    doc = json.loads(baseline(pgc, db, "--json", "--baseline-to", TAGS[7], folder=folder).stdout)
    assert doc["baselined"] == TAGS and doc["pending"] == ["0008_seed_a_book"]


def test_a_tag_not_in_the_folder_is_one_line(pgc, db):
    proc = baseline(pgc, db, "--baseline-to", "9999_nope", expect=1)
    assert proc.stderr.startswith("error: --baseline-to '9999_nope' is not a migration of") and not tracked(pgc, db)
