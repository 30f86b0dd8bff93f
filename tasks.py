"""slipway's command line (Invoke). `invoke --list` shows the tasks; `invoke --help TASK` their flags.

Every task turns a SlipwayError into one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import functools
import json as jsonlib
import os
import shlex
import sys
from pathlib import Path

from invoke import Collection, Exit, task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from slipway import sandbox as sb  # noqa: E402
from slipway.errors import SlipwayError  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"


def cli(func):
    """Run a task body, mapping SlipwayError to `error: <message>` and its exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SlipwayError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code)

    return wrapper


# --------------------------------------------------------------------------------------------
# sandbox.*
# --------------------------------------------------------------------------------------------
@task(help={"hosts": "number of hosts (sandbox, sandbox-2, ...), 1-19", "state": "incident (0007 missing) or healthy"})
@cli
def up(c, hosts=1, state="incident"):
    """Start real local target hosts (user, sshd, PostgreSQL 15, PM2 app) and write their inventory."""
    sb.up(int(hosts), state)


@task
@cli
def down(c):
    """Stop the sandbox hosts and remove every process, user and file the sandbox made."""
    sb.down()


@task(help={"host": "sandbox host name (default: sandbox)"})
@cli
def env(c, host="sandbox"):
    """Print `export APP_URL=… API_TOKEN=… DATABASE_URL=…` for a sandbox host, for `eval`."""
    for line in sb.env_lines(host):
        print(line)


# --------------------------------------------------------------------------------------------
# top level
# --------------------------------------------------------------------------------------------
@task(help={"host": "inventory host or group", "json": "print one JSON document"})
@cli
def ping(c, host, json=False):
    """Reach hosts over SSH (strict host keys) with Ansible and read their PM2 state."""
    from slipway.runner import print_failures, resolve_target, run_playbook

    resolve_target(host)
    result = run_playbook("ping.yml", host)
    state = result["data"].get("ping", {})
    if json:
        print(jsonlib.dumps({"hosts": state, "failures": result["failures"], "rc": result["rc"]}, indent=2, sort_keys=True))
    else:
        for name, info in sorted(state.items()):
            app = info["pm2"]
            print(f"{name:<14} reachable  pm2 {app['online']}/{app['instances']} online  current -> {info['current']}")
        print_failures(result)
    if result["rc"] != 0:
        raise Exit(code=1)


@task(
    help={
        "host": "inventory host or group (e.g. prod, sandbox, sandboxes)",
        "release": "the app to ship: a directory, or a git ref (REF or REF:subdir of $SLIPWAY_APP_REPO); default examples/reader-app",
        "check": "print the full plan (release, SQL with preflight results, reload yes/no); change nothing",
        "report": "write a JSON report to this file",
    }
)
@cli
def deploy(c, host, release=None, check=False, report=None):
    """Deploy: preflight, verified backup, release, migrations, PM2 zero-downtime reload, smoke tests; rolls back on failure (exit 0 ok, 1 failed, 4 lock held)."""
    from slipway.deploy import deploy as run_deploy

    code = run_deploy(host, release=release, check=check, report_path=report)
    if code:
        raise Exit(code=code)


@task(
    help={
        "host": "inventory host or group",
        "release": "release id to go back to (default: the one before the current release, from the host's deploy records)",
        "db": "`restore`: also restore the database from --backup (asks for confirmation unless --yes)",
        "backup": "backup id (see `invoke backup --host H --list`)",
        "yes": "do not ask before restoring the database",
    }
)
@cli
def rollback(c, host, release=None, db=None, backup=None, yes=False):
    """Point `current` back at the previous release and reload (schema kept); `--db restore --backup ID` also restores the database."""
    from slipway.deploy import rollback as run_rollback

    code = run_rollback(host, release=release, db=db, backup=backup, yes=yes)
    if code:
        raise Exit(code=code)


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


@task(help={"host": "inventory host or group", "json": "print one JSON document"})
@cli
def smoke(c, host, json=False):
    """Smoke-test the app: health + the incident runbook's four track-view cases on the smoke book (deltas)."""
    from slipway.smoke import smoke as run_smoke

    if run_smoke(host, json):
        raise Exit(code=1)


@task
@cli
def demo(c):
    """The incident end to end on the sandbox: the 500, its diagnosis, `invoke deploy`, the 200 with every view kept."""
    from slipway import vault
    from slipway.deploy import deploy as run_deploy

    print("== 1. a production-like host where migration 0007 never ran")
    sb.up(1, "incident")
    ctl = sb.Controller()
    host = sb.find_host("sandbox", ctl)
    creds = vault.load(ctl.vault_file(host.name), ctl.vault_password_file)
    url = f"{host.app_url}/api/books/{sb.INCIDENT_BOOK}/track-view"

    def post():
        status, body = sb.http_json("POST", url, {"viewType": "card_view"}, token=creds["slipway_api_token"])
        print(f"   POST {url}  {{\"viewType\": \"card_view\"}}\n   HTTP {status} {jsonlib.dumps(body)}")
        return status

    def book_rows():
        with sb.connect(host, creds["slipway_db_password"]) as conn:
            return conn.execute(
                "SELECT view_type, count(*), sum(view_count) FROM book_view_statistics WHERE book_id = %s "
                "GROUP BY view_type ORDER BY view_type", (sb.INCIDENT_BOOK,)).fetchall()

    def show_rows(rows):
        for view_type, n, total in rows:
            print(f"   {view_type:<12} rows {n}  view_count total {total}")

    print("\n== 2. the production failure")
    before_status = post()
    print("\n== 3. what the runbook found")
    try:
        line = sb.wait_for_line(host.pg_log, " 42P10 booksuser@booksdb ERROR:", timeout=10)
    except SlipwayError:
        line = "(no 42P10 line)"
    print(f"   PostgreSQL log: {line.split('ERROR:', 1)[-1].strip()}")
    with sb.connect(host, creds["slipway_db_password"]) as conn:
        applied = conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0]
        has = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = %s", (sb.UNIQUE_CONSTRAINT,)).fetchone()[0]
    journal = sb.journal_entries()
    print(f"   drizzle.__drizzle_migrations: {applied} rows; the journal has {len(journal)} migrations "
          f"-> pending: {journal[-1]['tag']}")
    print(f"   constraint {sb.UNIQUE_CONSTRAINT}: {'present' if has else 'MISSING'}")
    print(f"   statistics of book {sb.INCIDENT_BOOK} (duplicate rows block the constraint):")
    rows_before = book_rows()
    show_rows(rows_before)

    print("\n== 4. invoke deploy --host sandbox  (preflight, backup, release, migrations, reload, smoke)")
    code = run_deploy("sandbox")
    if code:
        raise Exit(f"error: the deploy failed (exit {code}); see the lines above", code=code)

    print("\n== 5. after the deploy")
    after_status = post()
    rows_after = book_rows()
    show_rows(rows_after)
    total_before = sum(int(t) for vt, _, t in rows_before if vt == "card_view")
    total_after = sum(int(t) for vt, _, t in rows_after if vt == "card_view")
    print(f"   card_view: {total_before} views before the deploy + 1 new = {total_after}; one row per view type")
    print("\nThe sandbox stays up: `eval \"$(.venv/bin/invoke sandbox.env)\"` then curl it; "
          "`.venv/bin/invoke deploy --host sandbox` again changes nothing; `.venv/bin/invoke sandbox.down` removes it.")
    if before_status != 500 or after_status != 200 or total_after != total_before + 1:
        raise Exit(f"error: expected 500 then 200 with {total_before + 1} views, got {before_status}, {after_status}, "
                   f"{total_after}", code=1)


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
    }
)
@cli
def migrate(c, migrations, dsn_env="DATABASE_URL", check=False, json=False, include_skipped=False,
            allow_tampered=False, allow_unknown=False, no_rehearse=False, schema="drizzle",
            table="__drizzle_migrations", lock_timeout="5s", lock_wait=10.0, one_transaction=False,
            online_min_rows=10000, online_lock_timeout="20ms"):
    """Drizzle-compatible migrations against a database: plan, preflight, rehearse, apply (exit 0 ok, 1 error, 2 pending with --check)."""
    from slipway import migrations as mig

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


@task
def lint(c):
    """ansible-lint (production profile, offline) over playbooks, roles and the collection."""
    c.run(f"{VENV_BIN / 'ansible-lint'} --offline -q", pty=False)


@task(help={"scenario": "one scenario (a role name); default: all of them"})
def molecule(c, scenario=""):
    """Molecule: one scenario per role on a real sandbox host (create, converge, idempotence, verify, destroy)."""
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # molecule runs ansible-* by name
    which = ["-s", scenario] if scenario else ["--all"]
    c.run(shlex.join([str(VENV_BIN / "molecule"), "test", *which]), env=env, pty=False)


@task(help={"k": "pytest -k expression (skips Molecule)", "x": "stop at the first failure",
            "no_molecule": "run lint and pytest only"})
def test(c, k="", x=False, no_molecule=False):
    """The whole test suite: ansible-lint, pytest against real sandbox hosts, then every Molecule scenario (needs root)."""
    lint(c)
    args = ["-ra", "-p", "no:cacheprovider"]
    if k:
        args += ["-k", k]
    if x:
        args.append("-x")
    c.run(shlex.join([str(VENV_BIN / "python"), "-m", "pytest", *args, "tests"]), pty=False)
    if not k and not no_molecule:
        molecule(c)


sandbox = Collection("sandbox")
sandbox.add_task(up)
sandbox.add_task(down)
sandbox.add_task(env)

ns = Collection()
ns.add_collection(sandbox)
ns.add_task(ping)
ns.add_task(deploy)
ns.add_task(rollback)
ns.add_task(backup)
ns.add_task(restore)
ns.add_task(smoke)
ns.add_task(demo)
ns.add_task(migrate)
ns.add_task(lint)
ns.add_task(test)
ns.add_task(molecule)
ns.configure({"run": {"echo": False, "warn": False}})
