# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""The drift check on a live database: its migration history classified, a shadow database on the
same server (same version, same extensions, the same ``pg_get_*def`` output) built by replaying the
applied migrations, both schemas read from the catalogs (module_utils/catalog.py) and compared
(module_utils/drift.py). The shadow is dropped again in every case.

The check takes the migration advisory lock of the tracking table *without waiting*: while a
deploy migrates, the answer is "could not check" (DriftBusy), never drift.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time
import uuid

from ansible_collections.slipway.core.plugins.module_utils import catalog, drift, drizzle
from ansible_collections.slipway.core.plugins.module_utils import statements as stmts
from ansible_collections.slipway.core.plugins.module_utils.migrate import LOCK_CLASS, MigrationError, read_rows
from ansible_collections.slipway.core.plugins.module_utils.migrate import lock_key as migrate_lock_key

SHADOW_PREFIX = "slipway_shadow_"
CLUSTER_WIDE = ("CreateRoleStmt", "AlterRoleStmt", "DropRoleStmt", "AlterRoleSetStmt", "CreateTableSpaceStmt",
                "DropTableSpaceStmt", "GrantRoleStmt")


class DriftBusy(MigrationError):
    """A migration holds the tracking table's advisory lock: the schema is changing right now."""


class CannotCheck(MigrationError):
    """The check could not run (no shadow database could be made, a migration failed to replay)."""


lock_key = migrate_lock_key  # the engine's advisory lock key of a tracking table


def replay(conn, migrations):
    """Run ``migrations`` (read_folder's, in journal order) into the database of ``conn`` (a fresh
    one), one transaction per migration, the files' own BEGIN/COMMIT left out as the engine does.
    Raises CannotCheck naming the migration and statement that failed."""
    import psycopg

    for mig in migrations:
        at = 0
        try:
            with conn.transaction():
                for chunk in mig["statements"]:
                    at += 1
                    parsed = stmts.split_chunk(chunk)
                    if not parsed["parsed"]:
                        conn.execute(chunk)
                        continue
                    for st in parsed["statements"]:
                        # roles and tablespaces are the server's, not the database's: the live
                        # database's migrations made them already
                        if st["txn"] is None and type(st["node"]).__name__ not in CLUSTER_WIDE:
                            conn.execute(st["text"])
        except psycopg.Error as exc:
            raise CannotCheck("replaying %s into the shadow database failed at statement %d: %s; the expected schema "
                              "cannot be built (the migration may need something the live database has that no migration "
                              "makes: a role, an extension, a search_path)" % (mig["tag"], at, str(exc).strip().splitlines()[0]))


READ_TIMEOUTS = (("lock_timeout", "10s"), ("statement_timeout", "120s"))


def read_live(conn, folder, schema="drizzle", table="__drizzle_migrations", exclude=None, include=()):
    """The live side of a drift check, read under the migration advisory lock taken shared and
    without waiting (DriftBusy while a migration holds it; two checks do not exclude each other),
    each query with a lock and a statement timeout (CannotCheck past them): ``{"classified",
    "status" ({tag: status}), "replay" (the tags the expected schema is built from: applied or
    tampered, journal order), "live" (catalog), "prepare" (what a shadow needs that no migration
    makes: the live database's other extensions, and the server's roles), "seconds"}``."""
    import psycopg

    key = lock_key(schema, table)
    if not conn.execute("SELECT pg_try_advisory_lock_shared(%s, %s)", (LOCK_CLASS, key)).fetchone()[0]:
        raise DriftBusy("a migration is running on this database (it holds slipway's migration lock): the schema is "
                        "changing; check again when the deploy has finished")
    try:
        for name, value in READ_TIMEOUTS:
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        rows = read_rows(conn, schema, table)
        classified = drizzle.classify(folder["migrations"], rows)
        started = time.monotonic()
        live = catalog.read(conn, exclude=[schema] + list(exclude or ()), include=include)
        seconds = time.monotonic() - started
        roles = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1").fetchall()]
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
        raise CannotCheck("reading the schema waited too long (%s): a long lock on a table or view, e.g. an ALTER "
                          "TABLE under way; check again" % str(exc).strip().splitlines()[0])
    finally:
        for name, _ in READ_TIMEOUTS:
            conn.execute("RESET %s" % name)
        conn.execute("SELECT pg_advisory_unlock_shared(%s, %s)", (LOCK_CLASS, key))
    status = dict((m["tag"], m["status"]) for m in classified["migrations"])
    made = set(name for kind, name in drift.makers(folder["migrations"]) if kind == "extension")
    extensions = sorted(o["name"] for o in live.values() if o["kind"] == "extension" and o["name"] not in made)
    return {"classified": classified, "status": status, "live": live, "seconds": round(seconds, 3),
            "replay": [m["tag"] for m in folder["migrations"] if status[m["tag"]] in ("applied", "tampered")],
            "prepare": {"extensions": extensions, "roles": roles}}


def result(expected, live_state, folder, shadow):
    """The drift check's answer from both sides (``shadow``: where the expected schema was built
    and how long it took): findings (most severe first), the classified history, counts, exit."""
    started = time.monotonic()
    findings = drift.compare(expected, live_state["live"], folder["migrations"], live_state["status"])
    findings += drift.migration_findings(live_state["classified"])
    findings.sort(key=lambda f: drift.SEVERITY_ORDER[f["severity"]])
    return {
        "findings": findings,
        "migrations": live_state["classified"],
        "counts": drizzle.counts(live_state["classified"]),
        "shadow": dict(shadow, migrations_replayed=len(live_state["replay"])),
        "seconds": {"shadow": shadow.get("seconds"), "read": live_state["seconds"],
                    "compare": round(time.monotonic() - started, 3)},
        "exit": drift.exit_code(findings),
    }


def check(conn, connect, folder, schema="drizzle", table="__drizzle_migrations", exclude=None):
    """The drift check of the database ``conn`` (autocommit) is connected to, its shadow a database
    on the same server. ``connect(dbname)`` opens an autocommit connection to another database of
    that server as the same role; ``folder``: read_folder's result. Raises DriftBusy while a
    migration runs, CannotCheck when no shadow can be built there."""
    live_state = read_live(conn, folder, schema, table, exclude)
    started = time.monotonic()
    replay_set = set(live_state["replay"])
    expected = build_shadow(conn, connect, [m for m in folder["migrations"] if m["tag"] in replay_set],
                            exclude=[schema] + list(exclude or ()),
                            prepare={"extensions": live_state["prepare"]["extensions"]})
    return result(expected, live_state, folder,
                  {"where": "a database on the same server", "seconds": round(time.monotonic() - started, 3)})


def _create_database(admin, name):
    import psycopg
    from psycopg import sql

    # asked first: a refused CREATE DATABASE would put an ERROR line in the server's log on every check
    may = admin.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (may and may[0]):
        raise CannotCheck("cannot create a shadow database on this server (the role has no CREATEDB); grant the role "
                          "CREATEDB (ALTER ROLE ... CREATEDB) so the check can build the expected schema next to the live one")
    try:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        said = str(exc).strip().splitlines()[0]
        if getattr(exc, "sqlstate", None) == "42501":
            raise CannotCheck("cannot create a shadow database on this server (%s); grant the role CREATEDB "
                              "(ALTER ROLE ... CREATEDB) so the check can build the expected schema next to the live one"
                              % said)
        raise CannotCheck("cannot create a shadow database on this server (%s)" % said)


def _prepare(admin, shadow, prepare):
    """What the shadow needs that no migration makes: the server's roles (created NOLOGIN where
    they are missing: the controller's own PostgreSQL) and the live database's other extensions."""
    import psycopg
    from psycopg import sql

    for role in (prepare or {}).get("roles") or ():
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    for ext in (prepare or {}).get("extensions") or ():
        try:
            shadow.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
        except psycopg.Error as exc:
            raise CannotCheck("the shadow database cannot have extension %s, which the live database has (%s); "
                              "install it where the shadow is built" % (ext, str(exc).strip().splitlines()[0]))


def build_shadow(conn, connect, migrations, exclude=catalog.DEFAULT_EXCLUDE, prepare=None, include=()):
    """Create a shadow database on the server of ``conn``, give it what ``prepare`` names (see
    read_live), replay ``migrations`` into it, read its catalog and drop it. Raises CannotCheck
    when no shadow can be made or built there."""
    from psycopg import sql

    name = SHADOW_PREFIX + uuid.uuid4().hex[:12]
    _create_database(conn, name)
    try:
        try:
            shadow = connect(name)
        except Exception as exc:  # noqa: BLE001 - psycopg's or the connection helper's own error, one line
            raise CannotCheck("cannot connect to the shadow database %s on this server (%s): pg_hba.conf may allow the "
                              "role only its own database; allow it every database (or the slipway_shadow_* ones)"
                              % (name, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
        try:
            _prepare(conn, shadow, prepare)
            replay(shadow, migrations)
            return catalog.read(shadow, exclude=exclude, include=include)
        finally:
            shadow.close()
    finally:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# -------------------------------------------------------------------------------------------- baseline
def _hand_record(finding):
    """A table that keeps a migration record by hand (the seed's runbook: `_drizzle_migrations(idx,
    tag, timestamp)`), and what is on it: not the app's schema, left as it is by a baseline."""
    obj = finding["object"]
    name = obj["name"] if obj["kind"] == "table" else (obj.get("table") or "")
    return finding["kind"] == "extra" and name.rsplit(".", 1)[-1].endswith("drizzle_migrations")


def baseline_points(conn, admin, connect, folder, exclude=None):
    """Replay ``folder``'s migrations one at a time into one shadow database (made through
    ``admin``, a connection to the server that holds it, reached by ``connect(dbname)``: the live
    server's, or the controller's own) and compare the live schema of ``conn`` with the shadow after
    each: ``{N: findings}`` for N = 0..all migrations (no findings: the first N migrations make
    exactly the live schema, a hand-kept migration record table aside)."""
    from psycopg import sql

    exclude = list(exclude or catalog.DEFAULT_EXCLUDE)
    live = catalog.read(conn, exclude=exclude)
    name = SHADOW_PREFIX + uuid.uuid4().hex[:12]
    _create_database(admin, name)
    points = {}
    try:
        try:
            shadow = connect(name)
        except Exception as exc:  # noqa: BLE001 - the connection helper's own one-line error
            raise CannotCheck("cannot connect to the shadow database %s (%s)" % (name, str(exc).strip().splitlines()[0]))
        try:
            migs = folder["migrations"]
            for n in range(0, len(migs) + 1):
                if n:
                    replay(shadow, [migs[n - 1]])
                points[n] = [f for f in drift.compare(catalog.read(shadow, exclude=exclude), live, migs[:n])
                             if not _hand_record(f)]
        finally:
            shadow.close()
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return points


def write_baseline(conn, migrations, schema="drizzle", table="__drizzle_migrations"):
    """drizzle's own tracking rows (sha256 of each file, created_at = its journal `when`) for
    ``migrations``, in one transaction under the migration lock, into a tracking table that must be
    empty (created as drizzle creates it when missing). Raises MigrationError otherwise."""
    from psycopg import sql

    key = lock_key(schema, table)
    if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()[0]:
        raise DriftBusy("a migration is running on this database; baseline when it has finished")
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            ident = sql.Identifier(schema, table)
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id SERIAL PRIMARY KEY, hash text NOT NULL, "
                                 "created_at bigint)").format(ident))
            have = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
            if have:
                raise MigrationError("%s.%s has %d rows already: a database drizzle or slipway migrated needs no "
                                     "baseline; run invoke migrate" % (schema, table, have))
            for mig in migrations:
                conn.execute(sql.SQL("INSERT INTO {} (hash, created_at) VALUES (%s, %s)").format(ident),
                             (mig["hash"], mig["when"]))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))
