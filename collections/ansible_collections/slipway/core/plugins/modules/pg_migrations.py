#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pg_migrations
short_description: Plan, preflight and apply Drizzle migrations on PostgreSQL, drizzle-compatibly
version_added: "0.2.0"
description:
  - Reads a Drizzle migrations folder (C(meta/_journal.json) and C(<tag>.sql) files) and the tracking
    table (C(drizzle.__drizzle_migrations) by default), and classifies every migration as applied,
    pending, skipped (older C(when) than the newest applied row, which drizzle-orm's migrator never
    runs) or tampered (edited after it was applied); tracking rows that match no file are reported
    as unknown.
  - Preflight with PostgreSQL's own parser (pglast) counts, on the live tables, the duplicate key
    groups that would make a pending UNIQUE/PRIMARY KEY constraint or unique index fail, with sample
    keys, and notes earlier statements of the pending set that write the table (consolidation).
  - In check mode the pending set is also rehearsed inside a transaction and rolled back; the first
    failure is reported (migration, statement, SQLSTATE). In online mode a big existing table whose
    rows the set rewrites is rehearsed on a private temporary copy, so no live row is locked.
  - Apply takes an advisory lock, plans again under it, and runs the pending migrations and their
    tracking rows (sha256 of the file, created_at = C(when)), so drizzle's own migrator afterwards
    finds nothing to do.
  - With I(mode=transaction) everything runs in one transaction, as drizzle-orm runs it; any failure
    rolls everything back.
  - With I(mode=online) (the default) an index built on an existing table of at least
    I(online_min_rows) rows is built C(CONCURRENTLY) (a UNIQUE constraint as a unique index built
    concurrently, then C(ADD CONSTRAINT ... USING INDEX)), before the transaction when nothing
    pending touches the table first (the rest stays one transaction), else after committing what
    comes before it (not atomic, and the plan says so per statement). Transactions run with
    I(online_lock_timeout) and are retried when a lock is not granted in time; a transaction that
    rewrites rows runs at REPEATABLE READ, so a concurrent write is a retry, never a lost update.
    A failed build leaves no INVALID index; one that fails on duplicates written since the
    migration's consolidation re-runs that consolidation and builds again.
options:
  migrations_path:
    description: The migrations folder on the managed host (holds C(meta/_journal.json)).
      One of I(migrations_path) and I(migrations_content) is required.
    type: path
  migrations_content:
    description:
      - 'The migrations folder as data, C({"meta/_journal.json": text, "<tag>.sql": text, ...}), e.g. read
        on the controller from the release being deployed, so a plan needs nothing shipped first.'
      - Written to a private temporary folder on the managed host for the run and removed after.
    type: dict
  dsn:
    description: A libpq connection string or URL; combined with the I(login_*) options.
    type: str
  lock_wait:
    description: Seconds to wait for another slipway migration of the same database to finish.
    type: float
    default: 10
requirements:
  - psycopg >= 3.1
  - pglast >= 6
extends_documentation_fragment:
  - slipway.core.postgres
  - slipway.core.migrations
  - slipway.core.migrations.plan
author:
  - slipway developers
notes:
  - Supports check mode (plan, preflight and rehearsal; nothing changes) and diff mode (applied tags before/after).
  - Statements are numbered from 1 within each migration file (chunks between C(--> statement-breakpoint)).
"""

EXAMPLES = r"""
- name: Plan migrations and rehearse them (no change)
  slipway.core.pg_migrations:
    migrations_path: /srv/app/current/migrations
    login_host: 127.0.0.1
    login_user: booksuser
    login_password: "{{ vault_db_password }}"
    login_db: booksdb
  check_mode: true
  register: migration_plan

- name: Apply pending migrations
  slipway.core.pg_migrations:
    migrations_path: /srv/app/current/migrations
    dsn: "host=127.0.0.1 dbname=booksdb user=booksuser"
    login_password: "{{ vault_db_password }}"
  register: migrated
"""

RETURN = r"""
applied:
  description: Tags applied by this run (in check mode, the tags that would be applied).
  returned: always
  type: list
  elements: str
  sample: [0007_add_unique_constraint_book_view_statistics]
summary:
  description: Counts of applied, pending, skipped and tampered migrations and unknown rows, before this run.
  returned: success
  type: dict
plan:
  description: The whole plan document (migrations with status and SQL of those not applied,
    unknown_rows, warnings, drizzle_would_apply, preflight checks and rehearsal, timings_ms, result).
  returned: always
  type: dict
"""

import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils import migrate as engine
from ansible_collections.slipway.core.plugins.module_utils import postgres as pg
from ansible_collections.slipway.core.plugins.module_utils import runguard
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, read_folder, write_folder
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_mapping, redact_text


def main():
    module = AnsibleModule(
        argument_spec=dict(
            migrations_path=dict(type="path"),
            migrations_content=dict(type="dict"),
            dsn=dict(type="str", no_log=True),
            **pg.postgres_argument_spec(),
            tracking_schema=dict(type="str", default=engine.DEFAULT_SCHEMA),
            tracking_table=dict(type="str", default=engine.DEFAULT_TABLE),
            include_skipped=dict(type="bool", default=False),
            allow_tampered=dict(type="bool", default=False),
            allow_unknown=dict(type="bool", default=False),
            rehearse=dict(type="bool", default=True),
            lock_timeout=dict(type="str", default="5s"),
            lock_wait=dict(type="float", default=10.0),
            mode=dict(type="str", default="online", choices=list(engine.MODES)),
            online_min_rows=dict(type="int", default=10000),
            online_lock_timeout=dict(type="str", default="20ms"),
        ),
        required_one_of=[("migrations_path", "migrations_content")],
        mutually_exclusive=[("migrations_path", "migrations_content")],
        supports_check_mode=True,
    )
    engine.require_libraries(module)
    p = module.params
    secrets = pg.secrets(p, p["dsn"])

    def fail(msg, plan=None):
        module.fail_json(msg=redact_text(msg, known=secrets), plan=redact_mapping(plan or {}, known=secrets),
                         applied=[], changed=False)

    conn = None
    tmpdir = None
    guard = runguard.from_env()  # inactive outside a deploy run
    plan = None
    try:
        guard.start()
        if p["migrations_content"] is not None:
            tmpdir = tempfile.mkdtemp(prefix="slipway-migrations-")
            folder = read_folder(write_folder(tmpdir, p["migrations_content"]))
        else:
            folder = read_folder(p["migrations_path"])  # folder problems first: no connection needed
        conn = engine.connect(p["dsn"], connect_timeout=p["connect_timeout"], **pg.connect_params(p, p["dsn"]))
        eng = engine.Engine(
            conn, folder, schema=p["tracking_schema"], table=p["tracking_table"],
            include_skipped=p["include_skipped"], allow_tampered=p["allow_tampered"],
            allow_unknown=p["allow_unknown"], lock_timeout=p["lock_timeout"], lock_wait=p["lock_wait"],
            mode=p["mode"], min_rows=p["online_min_rows"], online_lock_timeout=p["online_lock_timeout"],
            fence=None if module.check_mode else guard,
        )
        if module.check_mode:
            plan = eng.check(rehearse=p["rehearse"])
            if plan["blockers"]:
                fail("apply would be refused: " + plan["blockers"][0], plan)
            applied = list(plan["to_apply"])
        else:
            plan = eng.apply()
            applied = list(plan["applied_now"])
    except (runguard.RunStopped, runguard.LockLost) as exc:
        # the run was stopped or lost its lock: committed transactions were journaled, the rest rolled back
        fail("%s; nothing after the last committed transaction was applied (the journal of run %s lists what was)" % (
            exc.args[0] if exc.args else "stopped", guard.run_id), None)
    except MigrationError as exc:
        fail(str(exc), exc.plan)
    except Exception as exc:  # noqa: BLE001 - a module reports, it does not crash with secrets in a trace
        fail("%s: %s" % (type(exc).__name__, exc), None)
    finally:
        guard.finish()
        if conn is not None:
            conn.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    before = sorted(m["tag"] for m in plan["migrations"] if m["status"] == "applied")
    result = dict(
        changed=bool(applied),
        applied=applied,
        summary=plan["summary"],
        plan=redact_mapping(plan, known=secrets),
    )
    if module._diff:
        result["diff"] = {"before": {"applied": before}, "after": {"applied": sorted(before + applied)}}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
