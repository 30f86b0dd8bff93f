#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pg_drift
short_description: Read a database's schema and migration history for the drift check
version_added: "0.5.0"
description:
  - The host side of C(invoke drift). Finds the deployed release's drizzle migrations folder,
    classifies the history against the tracking table, and reads the live schema from the
    catalogs (module_utils/catalog.py), all under the tracking table's migration advisory lock
    taken without waiting - while a deploy migrates, it answers C(busy) (could not check), never
    drift.
  - With I(shadow=auto) it then builds the expected schema in a shadow database on the same
    server (the applied migrations replayed, read, dropped) when the role may create databases;
    otherwise (or with I(shadow=none)) it returns the migration files so the controller builds
    the shadow in a PostgreSQL of its own.
  - Read-only on the live database; the shadow database is created and dropped again.
extends_documentation_fragment:
  - slipway.core.postgres
  - slipway.core.migrations
options:
  app_dir:
    description: The app directory; the migrations are read from the release C(current) points at.
    type: path
    required: true
  migrations:
    description: The migrations folder inside the release; default - the one the host's last successful
      deploy of that release recorded (its slipway.yml), else C(drizzle), else C(migrations).
    type: str
  shadow:
    description: C(auto) builds the expected schema on the same server when it can; C(none) never.
    type: str
    choices: [auto, none]
    default: auto
  include:
    description: Also compare these, off by default - C(grants) (who may do what on each table, view,
      sequence and function; the owner's own rights aside), C(comments).
    type: list
    elements: str
    choices: [grants, comments]
    default: []
  fixes:
    description:
      - The plan of C(invoke drift --fix) (module_utils/remedy.py) - indexes and UNIQUE/PRIMARY KEY constraints
        rebuilt online, each unique one after a duplicate count. Run first, under the migration lock taken
        without waiting (C(busy) when a migration holds it); then the schema is read as without it.
      - Not in check mode (it reports C(fixed) empty there).
    type: list
    elements: dict
    default: []
author:
  - slipway developers
notes:
  - Supports check mode (it changes nothing either way).
"""

EXAMPLES = r"""
- name: Read the live schema and its expected twin
  slipway.core.pg_drift:
    app_dir: /srv/reader/app
  register: drift
"""

RETURN = r"""
fixed:
  description: Per fix of I(fixes) - C(fingerprint), C(what), C(done), C(why) (not done), C(ran) (the
    statements that ran).
  returned: always
  type: list
  elements: dict
busy:
  description: A migration held the lock; nothing was read (or fixed).
  returned: always
  type: bool
folder:
  description: The migrations folder read (on the host).
  returned: always
  type: str
release:
  description: The release C(current) points at.
  returned: unless the folder could not be found
  type: str
live:
  description: The live schema, catalog objects keyed as module_utils/catalog.py keys them.
  returned: unless busy
  type: dict
expected:
  description: The expected schema from the shadow on the same server, or null when it was not built.
  returned: unless busy
  type: dict
shadow:
  description: Where the expected schema was built (C(where)), or why not (C(error)), and seconds.
  returned: unless busy
  type: dict
status:
  description: "{tag: applied|pending|skipped|tampered}."
  returned: unless busy
  type: dict
classified:
  description: module_utils/drizzle.py classify's result (every migration's status, unknown rows, warnings).
  returned: unless busy
  type: dict
prepare:
  description: What a shadow needs that no migration makes - the live database's other extensions and the
    server's role names (module_utils/shadow.py read_live).
  returned: unless busy
  type: dict
replay:
  description: The tags the expected schema is built from (applied or tampered, journal order).
  returned: unless busy
  type: list
  elements: str
migrations_content:
  description: The folder's files (meta/_journal.json and each tag's .sql), for the controller (the statement
    that makes each object; its own shadow when none was built here).
  returned: unless busy
  type: dict
server_version_num:
  description: The server's version number (the controller's shadow must be the same major version).
  returned: unless busy
  type: int
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils import migrate as engine
from ansible_collections.slipway.core.plugins.module_utils import postgres as pg
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, read_folder
from ansible_collections.slipway.core.plugins.module_utils.hoststate import deploy_running, folder_content, migrations_folder
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_dir=dict(type="path", required=True),
            migrations=dict(type="str"),
            tracking_schema=dict(type="str", default=engine.DEFAULT_SCHEMA),
            tracking_table=dict(type="str", default=engine.DEFAULT_TABLE),
            shadow=dict(type="str", default="auto", choices=["auto", "none"]),
            fixes=dict(type="list", elements="dict", default=[]),
            include=dict(type="list", elements="str", default=[], choices=["grants", "comments"]),
            **pg.postgres_argument_spec(),
        ),
        supports_check_mode=True,
    )
    engine.require_libraries(module)
    from ansible_collections.slipway.core.plugins.module_utils import shadow

    p = module.params
    secrets = pg.secrets(p)
    conn = None
    out = dict(changed=False, busy=False, folder=None, fixed=[])
    try:
        if deploy_running(p["app_dir"]):
            module.exit_json(**dict(out, busy=True, msg="a deploy is running on this host (it holds the deploy lock): "
                                    "check again when it has finished"))
        path = migrations_folder(p["app_dir"], p["migrations"])
        out["folder"] = path
        out["release"] = os.path.basename(os.path.dirname(path))
        folder = read_folder(path)
        params = pg.connect_params(p)
        conn = engine.connect(None, connect_timeout=p["connect_timeout"], **params)  # autocommit
        if p["fixes"] and not module.check_mode:
            from ansible_collections.slipway.core.plugins.module_utils import remedy

            key = shadow.lock_key(p["tracking_schema"], p["tracking_table"])
            if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (engine.LOCK_CLASS, key)).fetchone()[0]:
                module.exit_json(**dict(out, busy=True, msg="a migration is running on this database (it holds "
                                        "slipway's migration lock): nothing fixed; fix again when the deploy has finished"))
            try:
                out["fixed"] = remedy.apply(conn, p["fixes"])
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (engine.LOCK_CLASS, key))
            out["changed"] = any(f["ran"] for f in out["fixed"])
        try:
            state = shadow.read_live(conn, folder, p["tracking_schema"], p["tracking_table"], include=p["include"])
        except shadow.DriftBusy as exc:
            module.exit_json(**dict(out, busy=True, msg=str(exc)))
        out.update(live=state["live"], status=state["status"], classified=state["classified"], replay=state["replay"],
                   prepare=state["prepare"], include=p["include"],
                   read_seconds=state["seconds"], expected=None, migrations_content={},
                   server_version_num=int(conn.execute("SHOW server_version_num").fetchone()[0]))
        shadow_info = {"where": None, "error": None, "seconds": None}
        if p["shadow"] == "auto":
            started = time.monotonic()
            replay = set(state["replay"])

            def connect(name):
                return engine.connect(None, connect_timeout=p["connect_timeout"], **dict(params, dbname=name))

            try:
                out["expected"] = shadow.build_shadow(conn, connect, [m for m in folder["migrations"] if m["tag"] in replay],
                                                      exclude=[p["tracking_schema"]],
                                                      prepare={"extensions": state["prepare"]["extensions"]},
                                                      include=p["include"])
                shadow_info.update(where="a database on the same server", seconds=round(time.monotonic() - started, 3))
            except shadow.CannotCheck as exc:
                shadow_info["error"] = str(exc)
        out["migrations_content"] = folder_content(folder)  # the controller names each object's statement from it
        out["shadow"] = shadow_info
    except MigrationError as exc:
        module.fail_json(msg=redact_text(str(exc), known=secrets), **out)
    except Exception as exc:  # noqa: BLE001 - a module reports, it does not crash with secrets in a trace
        module.fail_json(msg=redact_text("%s: %s" % (type(exc).__name__, exc), known=secrets), **out)
    finally:
        if conn is not None:
            conn.close()
    module.exit_json(**out)


if __name__ == "__main__":
    main()
