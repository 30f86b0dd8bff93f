"""The reference app's data on a sandbox host: the incident state (0007 not applied, duplicate statistics rows) or the healthy one."""
from __future__ import annotations

import json
import pwd
import shutil
import tempfile
from pathlib import Path

from ..errors import SlipwayError
from .layout import DB_NAME, DB_USER, JOURNAL, PG_PORT, Host, log
from .processes import chown_tree, run
from .provision import psql_admin, user_env

INCIDENT_BOOK = "aa4a9ca1-9a21-4126-9a7a-39b17ff186bc"
SMOKE_BOOK = "5b0e7e57-0000-4000-8000-00000000c0de"
UNIQUE_CONSTRAINT = "book_view_statistics_book_id_view_type_unique"

BOOKS = [
    (INCIDENT_BOOK, "The Brothers Karamazov", "Fyodor Dostoevsky", "ru"),
    ("0f3c2b8e-6a51-4d0e-9b7c-1d2e3f405162", "Middlemarch", "George Eliot", "en"),
    ("3e9d7c1a-2b4f-4a6e-8c0d-9e8f7a6b5c4d", "Anna Karenina", "Leo Tolstoy", "ru"),
    ("7a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9", "Les Miserables", "Victor Hugo", "fr"),
    ("c4d5e6f7-0819-4a2b-bc3d-4e5f60718293", "Don Quixote", "Miguel de Cervantes", "es"),
    (SMOKE_BOOK, "slipway smoke-test book", "slipway", "en"),
]
# (book_id, view_type, [view_count of each row]); more than one count = duplicate rows, which
# exist in production because the UNIQUE constraint of 0007 was never applied.
STATS = [
    (INCIDENT_BOOK, "card_view", [5, 3, 2]),
    (INCIDENT_BOOK, "reader_open", [4, 1]),
    ("0f3c2b8e-6a51-4d0e-9b7c-1d2e3f405162", "card_view", [7, 1]),
    ("0f3c2b8e-6a51-4d0e-9b7c-1d2e3f405162", "reader_open", [2]),
    ("3e9d7c1a-2b4f-4a6e-8c0d-9e8f7a6b5c4d", "card_view", [11]),
    ("7a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9", "reader_open", [6]),
]
USERS = [
    ("9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a", "reader@example.invalid", "Avid Reader"),
    ("1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "editor@example.invalid", "Editor"),
]


def journal_entries() -> list[dict]:
    """The reference app's drizzle journal entries, in order."""
    return json.loads(JOURNAL.read_text())["entries"]


def connect(host: Host, password: str):
    """A psycopg connection to the host's app database as the app's role, over TCP (scram);
    the password goes as a parameter, never into a URL that could be printed."""
    import psycopg

    return psycopg.connect(host=host.address, port=PG_PORT, dbname=DB_NAME, user=DB_USER, password=password, connect_timeout=10)


# state drifted: a healthy database changed by hand, as production databases drift
DRIFT_SQL = (
    f"ALTER TABLE book_view_statistics DROP CONSTRAINT {UNIQUE_CONSTRAINT}",  # its tracking row stays
    "DROP INDEX books_title_idx",
    "ALTER TABLE books ADD COLUMN hotfix_note text",
)


def db_state(host: Host, password: str) -> str:
    """'empty', 'incident', 'healthy', 'drifted' or 'other', from the live database."""
    with connect(host, password) as conn:
        tracked = conn.execute("SELECT to_regclass('drizzle.__drizzle_migrations') IS NOT NULL").fetchone()[0]
        if not tracked:
            return "empty"
        rows = conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0]
        has_unique = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = %s", (UNIQUE_CONSTRAINT,)).fetchone()[0]
        hotfix = conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'books' "
                              "AND column_name = 'hotfix_note'").fetchone()[0]
    total = len(journal_entries())
    if rows == total and has_unique and not hotfix:
        return "healthy"
    if rows == total and not has_unique and hotfix:
        return "drifted"
    if rows == total - 1 and not has_unique:
        return "incident"
    return "other"


def drizzle_migrate(host: Host, user: pwd.struct_passwd, password: str, upto: int | None,
                    app_root: Path | None = None) -> None:
    """Apply migrations with drizzle-orm's own migrator (the app's scripts/migrate.js in
    ``app_root``, default ``current``), as the host user; ``upto`` limits the journal to its first
    ``upto`` entries (the incident's history)."""
    current = app_root or host.app_dir / "current"
    source = current / "migrations"
    with tempfile.TemporaryDirectory(dir=host.home, prefix=".migrations-") as tmp:
        folder = Path(tmp) / "migrations"
        shutil.copytree(source, folder)
        if upto is not None:
            journal_path = folder / "meta" / "_journal.json"
            journal = json.loads(journal_path.read_text())
            journal["entries"] = journal["entries"][:upto]
            journal_path.write_text(json.dumps(journal, indent=2))
        chown_tree(Path(tmp), user)
        env = user_env(host, user, DATABASE_URL=host.database_url(password))
        proc = run(["node", "scripts/migrate.js", folder], cwd=current, env=env, user=user, check=False)
        if proc.returncode != 0:
            raise SlipwayError(f"{host.name}: drizzle migrate failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def seed(host: Host, password: str) -> None:
    with connect(host, password) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (id, email, display_name) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", USERS
            )
            cur.executemany(
                "INSERT INTO books (id, title, author, language) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", BOOKS
            )
            for book, view_type, counts in STATS:
                for n, count in enumerate(counts):
                    cur.execute(
                        "INSERT INTO book_view_statistics (book_id, view_type, view_count, last_viewed_at)"
                        " VALUES (%s, %s, %s, now() - make_interval(days => %s))",
                        (book, view_type, count, n + 1),
                    )


def ensure_database_state(host: Host, user: pwd.struct_passwd, password: str, want: str,
                          app_root: Path | None = None) -> bool:
    """The database in state ``want`` (incident or healthy), migrated by drizzle's migrator from
    the app in ``app_root`` (default ``current``). True if changed."""
    have = db_state(host, password)
    if have == want:
        return False
    if want == "drifted":
        ensure_database_state(host, user, password, "healthy", app_root)
        with connect(host, password) as conn:
            for statement in DRIFT_SQL:
                conn.execute(statement)
            conn.commit()
        log(host.name, "database drifted by hand: 0007's constraint dropped (its tracking row kept), "
                       "books_title_idx dropped, books.hotfix_note added")
        return True
    total = len(journal_entries())
    if have == "incident" and want == "healthy":
        drizzle_migrate(host, user, password, None, app_root)
        log(host.name, "database moved to healthy state (0007 applied by drizzle's migrator)")
        return True
    if have != "empty":
        # a sandbox database in another state is rebuilt (it only ever holds seed data)
        psql_admin(host, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE);\nCREATE DATABASE {DB_NAME} OWNER {DB_USER};")
        log(host.name, f"database {DB_NAME} rebuilt (was {have})")
    drizzle_migrate(host, user, password, total - 1, app_root)
    seed(host, password)
    if want == "healthy":
        drizzle_migrate(host, user, password, None, app_root)
    log(host.name, f"database in {want} state ({'all migrations applied' if want == 'healthy' else '0007 not applied, duplicate rows seeded'})")
    return True


def empty_database(host: Host) -> bool:
    """The app's database with nothing in it (for a bare host): rebuilt when it holds any object
    of its own. True when it was empty already."""
    objects = psql_admin(host, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                               "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' "
                               "AND n.nspname <> 'information_schema'", db=DB_NAME)
    schemas = psql_admin(host, "SELECT count(*) FROM pg_namespace WHERE nspname NOT IN "
                               "('pg_catalog', 'information_schema', 'public') AND nspname NOT LIKE 'pg\\_%'", db=DB_NAME)
    if objects == "0" and schemas == "0":
        return True
    psql_admin(host, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE);\nCREATE DATABASE {DB_NAME} OWNER {DB_USER};")
    log(host.name, f"database {DB_NAME} emptied (bare host)")
    return False

