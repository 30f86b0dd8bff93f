#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: app_state
short_description: Read one host's app, PM2, database and log state for diagnose and status
version_added: "0.6.0"
description:
  - The host side of C(invoke status) and C(invoke diagnose), in one call. Reads the release
    C(current) points at and the one before, the deploy records, the deploy lock (read from /proc/locks,
    never taken), PM2's processes of the app (C(pm2 jlist), only when a daemon runs),
    the database - reachable or not and with which SQLSTATE, the migration history classified
    against drizzle's tracking table, the log settings - and the newest verified backup.
  - With I(since) above zero it also reads, since that many seconds ago, the ERROR/FATAL lines of
    PostgreSQL's log (module_utils/pglog.py), the app's error log, PM2's own log lines about the
    app, and tries the app's own C(DATABASE_URL) from its C(.env).
  - Read-only. What it returns is redacted on the host - no passwords, tokens or query parameters.
extends_documentation_fragment:
  - slipway.core.postgres
  - slipway.core.migrations
options:
  app_dir:
    description: The app directory (releases, current, shared/.env, .slipway).
    type: path
    required: true
  app_name:
    description: The PM2 app name; its processes (and a takeover's handover app) are returned. The name
      the last successful deploy recorded (the app's slipway.yml) comes first; this is for a host no
      deploy has recorded one on.
    type: str
  pm2_home:
    description: PM2_HOME to read; defaults to C(~/.pm2) of the remote user.
    type: path
  pm2_bin:
    description: The pm2 executable.
    type: str
    default: pm2
  migrations:
    description: The migrations folder inside the release; default - as pg_drift finds it.
    type: str
  backup_dir:
    description: The backup directory whose manifest lists the verified backups.
    type: path
  app_url:
    description: The app's base URL as seen from the host; its health path (the last deploy's recorded one,
      else C(/api/health)) is asked once, with a 5 second limit.
    type: str
  since:
    description: Read the logs of the last this many seconds; 0 reads no log.
    type: int
    default: 0
  pg_log:
    description: PostgreSQL's log file; default - C(pg_current_logfile()) when the role may call it and
      the path is absolute, else Debian's C(/var/log/postgresql/postgresql-MAJOR-main.log).
    type: path
  app_logs:
    description: More app log files to read besides the error logs PM2 names for the app's processes.
    type: list
    elements: path
    default: []
author:
  - slipway developers
notes:
  - Read-only; supports check mode.
"""

EXAMPLES = r"""
- name: Read the reader app's state and the last hour of its logs
  slipway.core.app_state:
    app_dir: /var/www/reader/app
    app_name: ollama-reader
    since: 3600
    pg_log: /var/log/postgresql/postgresql-15-main.log
  register: state
"""

RETURN = r"""
app_name:
  description: The PM2 app name used (the last successful deploy's, else I(app_name)).
  returned: success
  type: str
now:
  description: The host's time (epoch seconds) when it looked.
  returned: always
  type: float
seconds:
  description: How long the look took.
  returned: success
  type: float
release:
  description: current, current_since (epoch), previous and installed (newest first).
  returned: success
  type: dict
deploys:
  description: The last deploy records (run_id, finished, release, previous, switched_from, result, failure
    without user data, backup, migrations_applied, rolled_back, rolled_back_to, stopped, took_over), oldest first.
  returned: success
  type: list
  elements: dict
lock:
  description: held, meta (run_id, command, started, ...) and stale.
  returned: success
  type: dict
pm2:
  description: daemon (bool), home, error, and processes (name, pm_id, pid, status, restarts, unstable_restarts,
    uptime_seconds, memory, release, cwd, exit_code, max_memory_restart, err_log, log).
  returned: success
  type: dict
db:
  description: ok, sqlstate and error, settings (log_line_prefix, log_destination, lc_messages, ...), migrations
    (tag, status, when), counts, unknown_rows, warnings, folder, release, folder_error.
  returned: success
  type: dict
backups:
  description: count and last (id, created, size, release, reason, db) of the verified backups, and error.
  returned: success
  type: dict
health:
  description: url, status (None when nothing answered), expected, error, ms and the answer's first 200
    characters (redacted); None without I(app_url).
  returned: success
  type: dict
logs:
  description: None when I(since) is 0; else pg (path, format, records, notes, lines, total, unreadable, error),
    app (one per file - path, lines, times (each line's time, a line without one taking the time of the line before),
    timed, error), pm2 (PM2's own lines about the app, the same shape), app_db (the app's DATABASE_URL tried - tried,
    ok, sqlstate, error, user, db) and since (epoch).
  returned: success
  type: dict
migrations_content:
  description: With I(since), the release's journal and migration files ({relative path - text}), from which
    the controller names the migration that makes an object an error lacks.
  returned: when since is above 0
  type: dict
"""

import os
import re
import shutil
import stat
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils import hoststate, layout
from ansible_collections.slipway.core.plugins.module_utils import migrate as engine
from ansible_collections.slipway.core.plugins.module_utils import postgres as pg
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, classify, counts, read_folder
from ansible_collections.slipway.core.plugins.module_utils.pm2 import daemon_pid, default_home, summarize_jlist
from ansible_collections.slipway.core.plugins.module_utils.redact import (
    is_secret_key,
    redact_mapping,
    redact_text,
    scrub_user_data,
)

APPLICATION_NAME = "slipway-app-state"  # how its own logins show in the server's log (%a)
SETTINGS = ("log_line_prefix", "log_destination", "logging_collector", "log_min_error_statement", "lc_messages",
            "server_version_num", "log_directory", "log_filename")


_CONNECT_STATES = (
    ("28P01", re.compile(r"password authentication failed")),
    ("3D000", re.compile(r'database "[^"]*" does not exist')),
    ("28000", re.compile(r'role "[^"]*" does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects')),
    ("53300", re.compile(r"remaining connection slots|too many clients|too many connections")),
    ("57P03", re.compile(r"the database system is (?:starting up|shutting down|in recovery mode)")),
)


def sqlstate_of(exc):
    """The SQLSTATE of a failed connection or query: the server's (psycopg keeps it on the error
    or on the one it was raised from), else read from the message libpq gives, else None."""
    seen = exc
    while seen is not None:
        code = getattr(seen, "sqlstate", None)
        if code:
            return code
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for code, pattern in _CONNECT_STATES:
        if pattern.search(text):
            return code
    return None


def scrub_failure(failure):
    """A deploy record's failure without user data (a migration's error may quote a DETAIL)."""
    if isinstance(failure, dict):
        return {k: scrub_user_data(v) if isinstance(v, str) else v for k, v in failure.items()}
    return scrub_user_data(failure) if isinstance(failure, str) else failure


def substantial(value):
    """A value worth masking wherever it appears: not a flag, number or short word (masking
    `AUTH_TRUST_HOST=true` would garble every "true" in the output)."""
    value = (value or "").strip()
    return len(value) >= 8 and value.lower() not in ("true", "false", "yes", "no") and not value.isdigit()


def pm2_state(module, pm2_home, app_name, pm2_bin):
    out = {"daemon": False, "processes": [], "error": None, "home": pm2_home}
    if daemon_pid(pm2_home) is None:
        return out  # any pm2 command would start a daemon: not when only looking
    binary = module.get_bin_path(pm2_bin)
    if not binary:
        out["error"] = "%s is not on PATH" % pm2_bin
        return out
    timeout = shutil.which("timeout")  # a stuck daemon must not hang the look
    rc, stdout, stderr = module.run_command(([timeout, "20"] if timeout else []) + [binary, "jlist"],
                                            environ_update=dict(PM2_HOME=pm2_home))
    if rc != 0:
        out["error"] = "pm2 jlist failed (rc=%d): %s" % (rc, redact_text(stderr.strip())[-300:])
        return out
    try:
        procs = summarize_jlist(stdout)
    except ValueError as exc:
        out["error"] = str(exc)
        return out
    out["daemon"] = True
    now = time.time()
    names = (app_name, app_name + "~slipway-handover")
    for p in procs:
        if p.get("name") not in names:
            continue
        uptime = None
        if p.get("status") == "online" and p.get("pm_uptime"):
            uptime = max(0, int(now - float(p["pm_uptime"]) / 1000.0))
        out["processes"].append({
            "name": p.get("name"), "pm_id": p.get("pm_id"), "pid": p.get("pid") or 0, "status": p.get("status"),
            "restarts": int(p.get("restart_time") or 0), "unstable_restarts": int(p.get("unstable_restarts") or 0),
            "uptime_seconds": uptime, "memory": p.get("memory"), "release": p.get("release"), "cwd": p.get("pm_cwd"),
            "exit_code": p.get("exit_code"), "max_memory_restart": p.get("max_memory_restart"),
            "err_log": p.get("pm_err_log_path"), "log": p.get("pm_log_path"),
        })
    return out


def db_state(p, conn_params, secrets):
    out = {"ok": False, "sqlstate": None, "error": None, "settings": {}, "migrations": [], "counts": None,
           "unknown_rows": 0, "folder": None, "release": None, "folder_error": None}
    try:
        folder_path = hoststate.migrations_folder(p["app_dir"], p["migrations"])
        out["folder"] = folder_path
        out["release"] = os.path.basename(os.path.dirname(folder_path))
        folder = read_folder(folder_path)
    except MigrationError as exc:
        folder = None
        out["folder_error"] = redact_text(str(exc), known=secrets)
    try:
        conn = engine.connect(None, connect_timeout=min(p["connect_timeout"], 10),
                              **dict(conn_params, application_name=APPLICATION_NAME))
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, wrong password: what diagnose reports
        out["sqlstate"] = sqlstate_of(exc)
        out["error"] = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, known=secrets)
        return out
    try:
        out["ok"] = True
        conn.execute("SET statement_timeout = '10s'")
        conn.execute("SET lock_timeout = '1s'")  # never wait behind a migration's lock
        # pg_settings shows a setting this role may not read as absent, where current_setting() would log an error
        for name, value in conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(SETTINGS),)):
            out["settings"][name] = value
        out["settings"]["current_logfile"] = None
        if conn.execute("SELECT has_function_privilege('pg_current_logfile()', 'EXECUTE')").fetchone()[0]:
            out["settings"]["current_logfile"] = conn.execute("SELECT pg_current_logfile()").fetchone()[0]
        if folder is not None:
            rows = engine.read_rows(conn, p["tracking_schema"], p["tracking_table"])
            classified = classify(folder["migrations"], rows)
            out["migrations"] = [{"tag": m["tag"], "status": m["status"], "when": m["when"]} for m in classified["migrations"]]
            out["counts"] = counts(classified)
            out["unknown_rows"] = len(classified["unknown_rows"])
            out["warnings"] = classified["warnings"]
    except Exception as exc:  # noqa: BLE001 - e.g. the tracking table unreadable: said, the rest still returned
        out["sqlstate"] = sqlstate_of(exc)
        out["error"] = redact_text("%s: %s" % (type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else ""),
                                   known=secrets)
    finally:
        conn.close()
    return out


def pg_log_path(p, db):
    if p["pg_log"]:
        return p["pg_log"]
    current = (db.get("settings") or {}).get("current_logfile")
    if current and os.path.isabs(current):
        return current
    version = (db.get("settings") or {}).get("server_version_num")
    if version:
        return "/var/log/postgresql/postgresql-%d-main.log" % (int(version) // 10000)
    return None


def app_db(env, known):
    """The app's own DATABASE_URL tried once: what the app meets when it connects. Returns the
    user and database it names (not the password), so its refused logins can be told from others'."""
    url = env.get("DATABASE_URL")
    if not url:
        return {"tried": False, "ok": None, "sqlstate": None, "error": None, "user": None, "db": None}
    out = {"tried": True, "ok": False, "sqlstate": None, "error": None, "user": None, "db": None}
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(url)
        out["user"], out["db"] = parts.get("user"), parts.get("dbname")
        conn = psycopg.connect(url, connect_timeout=5, autocommit=True, application_name=APPLICATION_NAME)
        conn.close()
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the answer is the error
        out["sqlstate"] = sqlstate_of(exc)
        text = str(exc).strip().splitlines()
        out["error"] = redact_text(text[0] if text else type(exc).__name__, known=known)
    return out


def health(url, expected, known):
    from ansible_collections.slipway.core.plugins.module_utils.http_client import HttpClient

    out = {"url": url, "status": None, "expected": expected, "error": None, "ms": None, "body": None}
    started = time.monotonic()
    try:
        status, text, _ = HttpClient(timeout=5).request(url, limit=4096)
        out.update(status=status, body=redact_text(text[:200], known=known))
    except Exception as exc:  # noqa: BLE001 - refused, timed out: the answer is the error
        out["error"] = redact_text(str(getattr(exc, "reason", None) or exc)[:200], known=known)
    out["ms"] = int((time.monotonic() - started) * 1000)
    return out


def migrations_content(folder_path):
    """The release's migration files (hoststate.folder_content), {} when unreadable."""
    if not folder_path:
        return {}
    try:
        return hoststate.folder_content(read_folder(folder_path))
    except (OSError, MigrationError):
        return {}


def read_logs(p, db, processes, since_epoch, known):
    from ansible_collections.slipway.core.plugins.module_utils import pglog

    logs = {"pg": {"path": None, "format": None, "records": [], "notes": [], "error": None}, "app": [], "pm2": None}
    path = pg_log_path(p, db)
    logs["pg"]["path"] = path
    if not path:
        logs["pg"]["error"] = "no PostgreSQL log file known: set slipway_pg_log in the inventory"
    else:
        prefix = (db.get("settings") or {}).get("log_line_prefix")
        if prefix is None:
            prefix = "%m [%p] "  # PostgreSQL's default, when the server could not be asked
            logs["pg"]["notes"].append("log_line_prefix unknown (the database did not answer): read as %r" % prefix)
        try:
            if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
                raise OSError(0, "not a regular file")
            logs["pg"].update(pglog.read_log(path, prefix, since_epoch, known=known))
            if logs["pg"].get("unreadable"):
                logs["pg"]["error"] = "no line of %s matches log_line_prefix %r" % (path, prefix)
        except OSError as exc:
            logs["pg"]["error"] = "cannot read %s: %s; make it readable by this user (e.g. its group) or set " \
                                  "slipway_pg_log" % (path, exc.strerror or exc)
        except Exception as exc:  # noqa: BLE001 - one odd line must not cost the whole look
            logs["pg"]["error"] = "cannot parse %s: %s" % (path, redact_text(str(exc), known=known)[:200])
    files = []
    for proc in processes:  # the error log, and the combined log (where PM2 puts a worker's crash at start)
        for path in (proc.get("err_log"), proc.get("log")):
            if path and path not in files and path != "/dev/null":
                files.append(path)
    for extra in p["app_logs"] or ():
        if extra not in files:
            files.append(extra)
    if not files:  # no process to ask: the app dir's logs/ as slipway lays it out
        logs_dir = layout.logs_dir(p["app_dir"])
        try:
            files = [os.path.join(logs_dir, n) for n in sorted(os.listdir(logs_dir))
                     if ("err" in n or "combined" in n) and n.endswith(".log")]
        except OSError:
            files = []
    logs["app"] = [hoststate.read_since(f, since_epoch, known=known) for f in files]
    pm2_home = p["pm2_home"] or default_home()
    # PM2's lines about the app: "App [name:id] ...", and its worker's "Process <id> restarted because it
    # exceeds --max-memory-restart" (which names the id only)
    needles = ["[%s:" % p["app_name"]] + ["Process %s restarted" % proc["pm_id"] for proc in processes
                                           if proc.get("pm_id") is not None]
    logs["pm2"] = hoststate.read_since(os.path.join(pm2_home, "pm2.log"), since_epoch, known=known, match=needles, keep=60)
    return logs


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_dir=dict(type="path", required=True),
            app_name=dict(type="str"),
            pm2_home=dict(type="path"),
            pm2_bin=dict(type="str", default="pm2"),
            migrations=dict(type="str"),
            tracking_schema=dict(type="str", default=engine.DEFAULT_SCHEMA),
            tracking_table=dict(type="str", default=engine.DEFAULT_TABLE),
            backup_dir=dict(type="path"),
            since=dict(type="int", default=0),
            pg_log=dict(type="path"),
            app_logs=dict(type="list", elements="path", default=[]),
            app_url=dict(type="str"),
            **pg.postgres_argument_spec(),
        ),
        supports_check_mode=True,
    )
    engine.require_libraries(module)
    p = module.params
    started = time.time()
    env = hoststate.env_file_values(os.path.join(p["app_dir"], layout.SHARED_DIR, layout.ENV_FILE))
    # the values masked anywhere in the output: the app's secrets, and URLs that carry credentials
    known = list(pg.secrets(p)) + [v for k, v in env.items() if substantial(v) and (is_secret_key(k) or "@" in v and "://" in v)]
    out = dict(changed=False, now=started)
    try:
        health_path, health_status = "/api/health", 200
        for record in reversed(hoststate.deploy_records(p["app_dir"])):
            if record.get("result") == "ok" and isinstance(record.get("app"), dict):
                p["app_name"] = record["app"].get("name") or p["app_name"]
                recorded = record["app"].get("health") or {}
                health_path = recorded.get("path") or health_path
                health_status = recorded.get("status") or health_status
                break
        if not p["app_name"]:
            module.fail_json(msg="no PM2 app name: no deploy recorded one and app_name is not set; set "
                                 "slipway_app_name in the inventory", **out)
        out["app_name"] = p["app_name"]
        out["release"] = hoststate.releases(p["app_dir"])
        out["deploys"] = [dict({k: r.get(k) for k in hoststate.RECORD_KEYS},
                               failure=redact_mapping(scrub_failure(r.get("failure")), known))
                          for r in hoststate.deploy_records(p["app_dir"], last=10)]
        out["lock"] = hoststate.lock(p["app_dir"])
        out["pm2"] = pm2_state(module, p["pm2_home"] or default_home(), p["app_name"], p["pm2_bin"])
        out["db"] = db_state(p, pg.connect_params(p), known)
        out["backups"] = hoststate.last_backup(p["backup_dir"]) if p["backup_dir"] else {"count": None, "last": None,
                                                                                            "error": None}
        out["health"] = health(p["app_url"].rstrip("/") + health_path, health_status, known) if p["app_url"] else None
        out["logs"] = None
        if p["since"] > 0:
            since_epoch = started - p["since"]
            out["logs"] = read_logs(p, out["db"], out["pm2"]["processes"], since_epoch, known)
            out["logs"]["app_db"] = app_db(env, known)
            out["logs"]["since"] = since_epoch
            out["migrations_content"] = migrations_content(out["db"].get("folder"))
    except Exception as exc:  # noqa: BLE001 - a module reports, it does not crash with secrets in a trace
        module.fail_json(msg=redact_text("%s: %s" % (type(exc).__name__, exc), known=known), **out)
    out["seconds"] = round(time.time() - started, 3)
    module.exit_json(**out)


if __name__ == "__main__":
    main()
