"""`invoke migrate --baseline`: adopt a database brought up without drizzle's tracking rows (by
hand, by `drizzle-kit push`, or by a runbook that kept its own record such as
`_drizzle_migrations(idx, tag, timestamp)`).

Flyway's baseline trusts the user; this one checks: the migrations are replayed one at a time into
a shadow database (on the same server when the role may create one, else an ephemeral PostgreSQL
of the server's version on this machine) and the live schema is compared with each step
(module_utils/drift.py). Only when the first N migrations make exactly the live schema are
drizzle's own tracking rows written for them (sha256 of each file, created_at = its `when`, one
transaction); otherwise it refuses and lists the differences. When several N fit (a migration that
changes only data) it asks which, with ``--baseline-to``."""
from __future__ import annotations

import json
import sys

from ansible_collections.slipway.core.plugins.module_utils import migrate as engine
from ansible_collections.slipway.core.plugins.module_utils import shadow
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, read_folder

from .errors import SlipwayError
from .migrations import dsn_from_env


def _points(conn, dsn: str, folder: dict, schema: str) -> tuple[dict, str]:
    from . import shadowdb

    exclude = [schema]
    try:
        return shadow.baseline_points(conn, conn, lambda name: engine.connect(dsn, dbname=name), folder, exclude), \
            "a database on the same server"
    except shadow.CannotCheck as exc:
        why = str(exc)
    major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
    with shadowdb.cluster(major) as connect, connect("postgres") as admin:
        return shadow.baseline_points(conn, admin, connect, folder, exclude), \
            f"an ephemeral PostgreSQL {major} on this machine ({why})"


def _listing(findings: list[dict]) -> str:
    return "; ".join(f"{f['kind']} {f['object']['kind']} {f['object']['name']}" for f in findings[:8]) + (
        f" (+{len(findings) - 8} more)" if len(findings) > 8 else "")


def baseline(dsn_env: str, migrations: str, to: str | None = None, as_json: bool = False,
             schema: str = engine.DEFAULT_SCHEMA, table: str = engine.DEFAULT_TABLE, out=sys.stdout) -> int:
    dsn = dsn_from_env(dsn_env)
    try:
        folder = read_folder(migrations)
    except MigrationError as exc:
        raise SlipwayError(str(exc)) from None
    tags = [m["tag"] for m in folder["migrations"]]
    if to is not None and to not in tags:
        raise SlipwayError(f"--baseline-to {to!r} is not a migration of {folder['folder']}; pass one of its tags "
                           f"({tags[0]} … {tags[-1]})")
    try:
        conn = engine.connect(dsn)
    except MigrationError as exc:
        raise SlipwayError(str(exc)) from None
    try:
        rows = engine.read_rows(conn, schema, table)
        if rows:
            raise SlipwayError(f"{schema}.{table} has {len(rows)} rows already: a database drizzle or slipway migrated "
                               "needs no baseline; run invoke migrate (--check shows what is pending)")
        points, where = _points(conn, dsn, folder, schema)
        fits = [n for n, found in points.items() if not found and n > 0]
        if to is not None:
            n = tags.index(to) + 1
            if points[n]:
                raise SlipwayError(f"the live schema is not what {tags[0]} … {to} make: {_listing(points[n])}; nothing "
                                   "written (make the database match, or name another migration)")
        elif not fits and not points[0]:
            raise SlipwayError("the database holds none of the migrations' objects: nothing to baseline; apply them "
                               "with invoke migrate")
        elif not fits:
            n, found = min(points.items(), key=lambda kv: (len(kv[1]), -kv[0]))
            raise SlipwayError(f"no prefix of the migrations makes the live schema; closest {n} migration(s) "
                               f"({tags[n - 1] if n else 'none'}), which differ by {_listing(found)}; nothing written")
        elif len(fits) > 1:
            raise SlipwayError(f"the live schema is what {', '.join(tags[i - 1] for i in fits)} each leave (those "
                               "migrations change no schema, only data): say which ran with --baseline-to TAG; "
                               "nothing written")
        else:
            n = fits[0]
        shadow.write_baseline(conn, folder["migrations"][:n], schema, table)
    except (MigrationError, shadow.CannotCheck) as exc:
        raise SlipwayError(str(exc)) from None
    finally:
        conn.close()
    pending = tags[n:]
    doc = {"baselined": tags[:n], "pending": pending, "shadow": where, "tracking_table": f"{schema}.{table}"}
    if as_json:
        print(json.dumps(doc, indent=2), file=out)
    else:
        print(f"baselined: the live schema is exactly what {tags[0]} … {tags[n - 1]} make (compared in {where}); "
              f"{schema}.{table} now records them ({n} rows, as drizzle writes them)", file=out)
        print(f"pending: {', '.join(pending) if pending else 'none'}"
              + ("; apply with invoke migrate (or invoke deploy)" if pending else ""), file=out)
    return 0
