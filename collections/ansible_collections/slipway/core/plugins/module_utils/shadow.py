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
import zlib

from ansible_collections.slipway.core.plugins.module_utils import catalog, drift, drizzle
from ansible_collections.slipway.core.plugins.module_utils import statements as stmts
from ansible_collections.slipway.core.plugins.module_utils.migrate import LOCK_CLASS, MigrationError, read_rows

SHADOW_PREFIX = "slipway_shadow_"
CLUSTER_WIDE = ("CreateRoleStmt", "AlterRoleStmt", "DropRoleStmt", "AlterRoleSetStmt", "CreateTableSpaceStmt",
                "DropTableSpaceStmt", "GrantRoleStmt")


class DriftBusy(MigrationError):
    """A migration holds the tracking table's advisory lock: the schema is changing right now."""


class CannotCheck(MigrationError):
    """The check could not run (no shadow database could be made, a migration failed to replay)."""


def lock_key(schema, table):
    """The engine's advisory lock key for a tracking table (migrate.Engine uses the same)."""
    return zlib.crc32(("%s.%s" % (schema, table)).encode("utf-8")) & 0x7FFFFFFF


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
            raise CannotCheck("replaying %s into the shadow database failed at statement %d: %s; the migrations "
                              "do not build from an empty database (fix the migration, or check by hand)" % (
                                  mig["tag"], at, str(exc).strip().splitlines()[0]))


def read_live(conn, folder, schema="drizzle", table="__drizzle_migrations", exclude=None):
    """The live side of a drift check, read under the migration advisory lock taken without
    waiting (DriftBusy while a migration runs): ``{"classified", "status" ({tag: status}),
    "replay" (the tags the expected schema is built from: applied or tampered, journal order),
    "live" (catalog), "seconds"}``."""
    key = lock_key(schema, table)
    if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()[0]:
        raise DriftBusy("a migration is running on this database (it holds slipway's migration lock): the schema is "
                        "changing; check again when the deploy has finished")
    try:
        rows = read_rows(conn, schema, table)
        classified = drizzle.classify(folder["migrations"], rows)
        started = time.monotonic()
        live = catalog.read(conn, exclude=[schema] + list(exclude or ()))
        seconds = time.monotonic() - started
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))
    status = dict((m["tag"], m["status"]) for m in classified["migrations"])
    return {"classified": classified, "status": status, "live": live, "seconds": round(seconds, 3),
            "replay": [m["tag"] for m in folder["migrations"] if status[m["tag"]] in ("applied", "tampered")]}


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
                            exclude=[schema] + list(exclude or ()))
    return result(expected, live_state, folder,
                  {"where": "a database on the same server", "seconds": round(time.monotonic() - started, 3)})


def build_shadow(conn, connect, migrations, exclude=catalog.DEFAULT_EXCLUDE):
    """Create a shadow database on the server of ``conn``, replay ``migrations`` into it, read its
    catalog and drop it. Raises CannotCheck when the role may not create a database."""
    import psycopg
    from psycopg import sql

    name = SHADOW_PREFIX + uuid.uuid4().hex[:12]
    try:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise CannotCheck("cannot create a shadow database on this server (%s); grant the role CREATEDB "
                          "(ALTER ROLE ... CREATEDB) so the check can build the expected schema next to the live one"
                          % str(exc).strip().splitlines()[0])
    try:
        try:
            shadow = connect(name)
        except Exception as exc:  # noqa: BLE001 - psycopg's or the connection helper's own error, one line
            raise CannotCheck("cannot connect to the shadow database %s on this server (%s): pg_hba.conf may allow the "
                              "role only its own database; allow it every database (or the slipway_shadow_* ones)"
                              % (name, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
        try:
            replay(shadow, migrations)
            return catalog.read(shadow, exclude=exclude)
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
    import psycopg
    from psycopg import sql

    exclude = list(exclude or catalog.DEFAULT_EXCLUDE)
    live = catalog.read(conn, exclude=exclude)
    name = SHADOW_PREFIX + uuid.uuid4().hex[:12]
    try:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise CannotCheck("cannot create a shadow database on this server (%s); grant the role CREATEDB"
                          % str(exc).strip().splitlines()[0])
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
