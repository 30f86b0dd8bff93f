"""Conformance over real-world drizzle histories: ../shared/corpus/drizzle (23 public projects'
migration folders, read in place; see its SOURCES.md), with drizzle-orm's own migrate() as the judge.

For every set drizzle can run here, on one cluster, a few databases per set:
- fresh: drizzle applies all (A); `--check` on a fresh database changes nothing; slipway applies
  all (B): schema dumps identical, the same tracking rows, drizzle then adds no row; slipway on A
  finds nothing to do;
- behind: drizzle applies the first half (C); slipway's plan holds exactly the second half;
  `--check` leaves schema and tracking rows unchanged; slipway applies the rest with every index
  build on an existing table rewritten to CONCURRENTLY (online mode, no row threshold): schema
  identical to A, drizzle then adds no row.
A set needing an extension this server lacks, or one drizzle's own migrator fails on here, is
skipped with the reason.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, cli
from migtools import history, judge, schema_dump

from slipway import migrations as mig

CORPUS = ROOT.parent / "shared" / "corpus" / "drizzle"
SETS = sorted(p.name for p in CORPUS.glob("*") if (p / "meta" / "_journal.json").is_file()) if CORPUS.is_dir() else []
_EXT = re.compile(r'CREATE\s+EXTENSION\s+(?:IF\s+NOT\s+EXISTS\s+)?"?([A-Za-z0-9_-]+)"?', re.I)


def test_the_corpus_is_beside_the_checkout():
    assert len(SETS) >= 20, f"expected the drizzle corpus at {CORPUS} (CI has ../shared beside the checkout)"


def half_folder(src: Path, dest: Path, upto: int) -> Path:
    """A folder whose journal lists the first ``upto`` entries of ``src``; the .sql files are links
    to the originals (read in place, never copied)."""
    (dest / "meta").mkdir(parents=True)
    journal = json.loads((src / "meta" / "_journal.json").read_text())
    journal["entries"] = journal["entries"][:upto]
    (dest / "meta" / "_journal.json").write_text(json.dumps(journal))
    for entry in journal["entries"]:
        (dest / f"{entry['tag']}.sql").symlink_to(src / f"{entry['tag']}.sql")
    return dest


def missing_extensions(pgc, folder: Path) -> list[str]:
    wanted = {m.group(1).lower() for f in folder.glob("*.sql") for m in _EXT.finditer(f.read_text())}
    with pgc.connect("postgres") as conn:
        have = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions").fetchall()}
    return sorted(wanted - have)


def slipway(pgc, db, folder, check=False, **options):
    doc, error, code = mig.run_dsn(pgc.dsn(db), str(folder), check, **options)
    return doc, error, code


def dropdb(pgc, *names):
    with pgc.connect("postgres") as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stage:
    """A fresh database for one stage; on leaving, the database and every role created meanwhile
    are dropped (roles are cluster-wide: the next stage must be able to create them again)."""

    def __init__(self, pgc):
        self.pgc = pgc

    def roles(self):
        with self.pgc.connect("postgres") as conn:
            return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles").fetchall()}

    def __enter__(self):
        self.before = self.roles()
        self.db = self.pgc.createdb()
        return self.db

    def __exit__(self, *exc):
        dropdb(self.pgc, self.db)
        with self.pgc.connect("postgres") as conn:
            for role in sorted(self.roles() - self.before):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.parametrize("name", SETS)
def test_corpus_set_agrees_with_drizzle(pgc, node_modules, tmp_path, name):
    folder = CORPUS / name
    lacking = missing_extensions(pgc, folder)
    if lacking:
        pytest.skip(f"{name}: needs extension(s) {', '.join(lacking)}, not installed on this PostgreSQL 15")
    entries = json.loads((folder / "meta" / "_journal.json").read_text())["entries"]
    with Stage(pgc) as a:
        proc = judge(node_modules, pgc, a, folder)
        if proc.returncode != 0:
            pytest.skip(f"{name}: drizzle's own migrator fails here: {proc.stderr.strip().splitlines()[-1][:300]}")
        expected_schema, expected_rows = schema_dump(pgc, a), history(pgc, a)
        assert len(expected_rows) == len(entries)
        # slipway on drizzle's result: nothing to do
        doc, error, code = slipway(pgc, a, folder, check=True)
        assert code == 0 and doc["result"] == "up_to_date", error

    with Stage(pgc) as b:
        # fresh: --check changes nothing (a file's own COMMIT must not commit the rehearsal)
        empty = schema_dump(pgc, b)
        doc, error, code = slipway(pgc, b, folder, check=True)
        assert code == 2 and doc["to_apply"] == [e["tag"] for e in entries], error
        assert doc["preflight"]["rehearsal"]["ok"], doc["preflight"]["rehearsal"]
        assert schema_dump(pgc, b) == empty and history(pgc, b) is None
        doc, error, code = slipway(pgc, b, folder)
        assert code == 0, error
        assert schema_dump(pgc, b) == expected_schema
        assert history(pgc, b) == expected_rows
        assert judge(node_modules, pgc, b, folder).returncode == 0 and history(pgc, b) == expected_rows

    with Stage(pgc) as c:
        # behind: drizzle applied the first half; slipway plans and applies exactly the rest
        upto = len(entries) // 2
        assert judge(node_modules, pgc, c, half_folder(folder, tmp_path / "half", upto)).returncode == 0
        rest = [e["tag"] for e in entries[upto:]]
        before_schema, before_rows = schema_dump(pgc, c), history(pgc, c)
        for min_rows in (10000, 0):  # 0: the online plan and rehearsal for every existing table
            doc, error, code = slipway(pgc, c, folder, check=True, include_skipped=True, min_rows=min_rows)
            assert code == 2 and doc["to_apply"] == rest, error
            assert not doc["blockers"], doc["blockers"]
            assert schema_dump(pgc, c) == before_schema and history(pgc, c) == before_rows
        rewritten = [s for s in doc["execution"]["statements"] if s["how"].startswith("rewritten")]
        doc, error, code = slipway(pgc, c, folder, include_skipped=True, min_rows=0)
        assert code == 0, error
        assert doc["applied_now"] == rest
        assert len(doc.get("builds", [])) == len(rewritten)  # each rewritten statement was built concurrently
        assert schema_dump(pgc, c) == expected_schema
        assert sorted(history(pgc, c)) == sorted(expected_rows)
        assert judge(node_modules, pgc, c, folder).returncode == 0 and sorted(history(pgc, c)) == sorted(expected_rows)


def test_cli_plans_a_corpus_set_behind_by_half(pgc, node_modules, tmp_path):
    """`invoke migrate` as a user runs it, on a public project's history (kaneo: a column added and
    then constrained in the pending half, `when` going backwards)."""
    folder = CORPUS / "usekaneo__kaneo"
    entries = json.loads((folder / "meta" / "_journal.json").read_text())["entries"]
    db = pgc.createdb()
    try:
        assert judge(node_modules, pgc, db, half_folder(folder, tmp_path / "half", len(entries) // 2)).returncode == 0
        proc = cli("migrate", "--dsn-env", "SLIPWAY_TEST_DSN", "--migrations", str(folder), "--check",
                   check=False, env={"SLIPWAY_TEST_DSN": pgc.dsn(db)})
        assert proc.returncode in (1, 2), proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and "rehearsal   ok" in proc.stdout, proc.stdout + proc.stderr
    finally:
        dropdb(pgc, db)
