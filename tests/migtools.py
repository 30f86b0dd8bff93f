"""Helpers of the migration-engine tests: folder copies, the drizzle judge, database probes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import ROOT, cli, sb
from pgcluster import Cluster

MIGRATIONS = ROOT / "examples" / "reader-app" / "migrations"
JUDGE = ROOT / "tests" / "js" / "drizzle_judge.js"
TAGS = [e["tag"] for e in json.loads((MIGRATIONS / "meta" / "_journal.json").read_text())["entries"]]
T0007 = TAGS[7]
WHEN_0007 = json.loads((MIGRATIONS / "meta" / "_journal.json").read_text())["entries"][7]["when"]


def folder_copy(tmp_path: Path, upto: int | None = None) -> Path:
    dest = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, dest)
    if upto is not None:
        journal = json.loads((dest / "meta" / "_journal.json").read_text())
        for entry in journal["entries"][upto:]:
            (dest / f"{entry['tag']}.sql").unlink()
        journal["entries"] = journal["entries"][:upto]
        (dest / "meta" / "_journal.json").write_text(json.dumps(journal, indent=2))
    return dest


def add_entry(folder: Path, tag: str, when: int, sql: str) -> None:
    path = folder / "meta" / "_journal.json"
    journal = json.loads(path.read_text())
    journal["entries"].append({"idx": len(journal["entries"]), "version": "7", "when": when, "tag": tag, "breakpoints": True})
    path.write_text(json.dumps(journal, indent=2))
    (folder / f"{tag}.sql").write_text(sql)


def judge(node_modules: Path, pgc: Cluster, db: str, folder: Path, schema=None, table=None):
    env = {"PATH": os.environ["PATH"], "NODE_PATH": str(node_modules), "DATABASE_URL": pgc.dsn(db), "MIGRATIONS": str(folder)}
    if schema:
        env["MIGRATIONS_SCHEMA"] = schema
    if table:
        env["MIGRATIONS_TABLE"] = table
    return subprocess.run(["node", str(JUDGE)], env=env, capture_output=True, text=True, timeout=60)


def migrate(pgc: Cluster, db: str, folder: Path, *args: str, check: bool = False):
    proc = cli("migrate", "--dsn-env", "SLIPWAY_TEST_DSN", "--migrations", str(folder), *args,
               check=False, env={"SLIPWAY_TEST_DSN": pgc.dsn(db)})
    assert pgc.password not in proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def as_json(proc) -> dict:
    return json.loads(proc.stdout)


def history(pgc: Cluster, db: str, schema="drizzle", table="__drizzle_migrations"):
    from psycopg import sql

    with pgc.connect(db) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, table).as_string(conn),)).fetchone()[0]
        if exists is None:
            return None
        return conn.execute(sql.SQL("SELECT hash, created_at FROM {} ORDER BY id").format(sql.Identifier(schema, table))).fetchall()


def file_hash(folder: Path, tag: str) -> str:
    return hashlib.sha256((folder / f"{tag}.sql").read_bytes()).hexdigest()


def schema_dump(pgc: Cluster, db: str) -> str:
    proc = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", "--no-privileges", "-d", pgc.dsn(db)],
        capture_output=True, text=True, check=True,
    )
    # comments and the per-dump random \\restrict key are not schema
    return "\n".join(line for line in proc.stdout.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict")))


def seed_duplicates(pgc: Cluster, db: str) -> None:
    """The incident's data: the sandbox's books and statistics rows, duplicates included."""
    with pgc.connect(db) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO books (id, title, author, language) VALUES (%s, %s, %s, %s)", sb.BOOKS)
        for book, view_type, counts in sb.STATS:
            for n in counts:
                cur.execute("INSERT INTO book_view_statistics (book_id, view_type, view_count) VALUES (%s, %s, %s)",
                            (book, view_type, n))


def stats(pgc: Cluster, db: str):
    with pgc.connect(db) as conn:
        total, rows = conn.execute("SELECT coalesce(sum(view_count), 0), count(*) FROM book_view_statistics").fetchone()
        groups = conn.execute("SELECT count(*) FROM (SELECT 1 FROM book_view_statistics GROUP BY book_id, view_type "
                              "HAVING count(*) > 1) d").fetchone()[0]
        constraint = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = %s", (sb.UNIQUE_CONSTRAINT,)).fetchone()[0]
    return {"total": total, "rows": rows, "dup_groups": groups, "constraint": constraint}


def incident_db(pgc, db, node_modules, tmp_path) -> None:
    """Production's history: drizzle's migrator applied 0000-0006, then duplicates accumulated."""
    proc = judge(node_modules, pgc, db, folder_copy(tmp_path / "upto7", upto=7))
    assert proc.returncode == 0, proc.stderr
    seed_duplicates(pgc, db)


def incident_with(pgc, db, node_modules, tmp_path, tag: str, sql: str) -> Path:
    """The incident database, and a migrations folder whose last entry (0007's `when`) is ``sql``."""
    incident_db(pgc, db, node_modules, tmp_path)
    folder = folder_copy(tmp_path, upto=7)
    add_entry(folder, tag, WHEN_0007, sql)
    return folder


def run_module_once(playbook: Path, extravars: dict, secret: str) -> dict:
    """Run a one-task test playbook (task "Run the module") on the controller with the venv's Python,
    through ansible-runner; returns the module's event kind, result and rc, and checks that
    ``secret`` (a no_log parameter) appears in no output or event."""
    import sys
    import tempfile

    import ansible_runner

    from slipway.runner import env_for_ansible

    private = Path(tempfile.mkdtemp(prefix="slipway-modtest-"))
    events = []
    try:
        runner = ansible_runner.run(
            private_data_dir=str(private),
            playbook=str(playbook),
            inventory=f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}",
            extravars=extravars,
            envvars=env_for_ansible(),  # ansible.cfg (collections path), the venv's ansible-playbook
            quiet=True,
            event_handler=lambda e: events.append(e) or True,
        )
        stdout = runner.stdout.read()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    results = [(e["event"], e["event_data"]["res"]) for e in events
               if e.get("event") in ("runner_on_ok", "runner_on_failed") and e["event_data"].get("task") == "Run the module"]
    assert len(results) == 1, stdout
    assert secret not in stdout + json.dumps(events, default=str)  # never in any output or event
    return {"event": results[0][0], "res": results[0][1], "rc": runner.rc}
