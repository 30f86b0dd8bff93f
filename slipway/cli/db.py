"""`invoke backup`, `invoke restore` and `invoke migrate`: the database."""
from __future__ import annotations

import json as jsonlib

from invoke import Exit, task

from ..errors import SlipwayError
from . import cli


@task(help={"host": "inventory host or group", "list": "list the host's backups instead of taking one",
            "json": "print one JSON document"})
@cli
def backup(c, host, list=False, json=False):
    """Take a verified pg_dump backup (0600, checked with pg_restore --list, retention, manifest), or --list them."""
    from slipway import backups

    code = backups.list_backups(host, json) if list else backups.backup(host, json)
    if code:
        raise Exit(code=code)


@task(help={"host": "one inventory host", "backup": "backup id (see `invoke backup --host H --list`)",
            "yes": "do not ask for confirmation", "json": "print one JSON document"})
@cli
def restore(c, host, backup, yes=False, json=False):
    """Restore a host's database from a backup (asks unless --yes; takes a safety backup first)."""
    from slipway import backups

    code = backups.restore(host, backup, yes, json)
    if code:
        raise Exit(code=code)


@task(
    help={
        "dsn_env": "environment variable holding the database URL (default DATABASE_URL); never the URL itself",
        "migrations": "drizzle migrations folder (holds meta/_journal.json)",
        "check": "plan + preflight + rehearsal (rolled back); change nothing; exit 2 when something is pending",
        "json": "print one JSON document",
        "include_skipped": "also apply migrations drizzle skips (older `when` than the newest applied), in journal order",
        "allow_tampered": "accept applied files edited since (treat them as applied)",
        "allow_unknown": "accept tracking rows that match no file",
        "no_rehearse": "with --check: static preflight only, no rehearsal transaction",
        "schema": "tracking table schema (default drizzle)",
        "table": "tracking table (default __drizzle_migrations)",
        "lock_timeout": "PostgreSQL lock_timeout with --one-transaction, and while a concurrent index build waits (default 5s)",
        "lock_wait": "seconds to wait for another running migration (default 10)",
        "one_transaction": "drizzle's own behaviour: the whole set in one transaction, no concurrent index builds",
        "online_min_rows": "build indexes CONCURRENTLY on existing tables of at least this many rows (default 10000)",
        "online_lock_timeout": "lock_timeout of each online transaction; a lock not granted in time retries (default 20ms)",
        "baseline": "adopt a database brought up without tracking rows: write drizzle's rows for the migrations whose "
                    "schema the live one equals (checked against a shadow database; refused, with the differences, "
                    "when it differs)",
        "baseline_to": "with --baseline: the last migration the database has (when several fit)",
    }
)
@cli
def migrate(c, migrations, dsn_env="DATABASE_URL", check=False, json=False, include_skipped=False,
            allow_tampered=False, allow_unknown=False, no_rehearse=False, schema="drizzle",
            table="__drizzle_migrations", lock_timeout="5s", lock_wait=10.0, one_transaction=False,
            online_min_rows=10000, online_lock_timeout="20ms", baseline=False, baseline_to=None):
    """Drizzle-compatible migrations against a database: plan, preflight, rehearse, apply (exit 0 ok, 1 error, 2 pending with --check)."""
    from slipway import migrations as mig

    if baseline or baseline_to:
        from slipway.baseline import baseline as run_baseline

        run_baseline(dsn_env, migrations, to=baseline_to, as_json=json, schema=schema, table=table)
        return
    try:
        wait = float(lock_wait)
    except ValueError:
        raise SlipwayError(f"--lock-wait {lock_wait!r} is not a number of seconds; pass e.g. --lock-wait 10") from None
    try:
        min_rows = int(online_min_rows)
    except ValueError:
        raise SlipwayError(f"--online-min-rows {online_min_rows!r} is not a whole number; pass e.g. --online-min-rows 10000") from None
    doc, error, code = mig.run(dsn_env, migrations, check, include_skipped=include_skipped,
                               allow_tampered=allow_tampered, allow_unknown=allow_unknown,
                               rehearse=not no_rehearse, schema=schema, table=table,
                               lock_timeout=lock_timeout, lock_wait=wait,
                               mode="transaction" if one_transaction else "online", min_rows=min_rows,
                               online_lock_timeout=online_lock_timeout)
    if json:
        print(jsonlib.dumps(doc if doc is not None else {"result": "error", "error": error}, indent=2, sort_keys=True))
    elif doc is not None:
        print("\n".join(mig.render(doc)))
    if error:
        raise Exit(f"error: {error}", code=code)
    if code:
        raise Exit(code=code)


TASKS = (backup, restore, migrate)
