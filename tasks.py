"""slipway's command line (Invoke). `invoke --list` shows the tasks; `invoke --help TASK` their flags.

Every task turns a SlipwayError into one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import functools
import json as jsonlib
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
    from slipway.runner import resolve_target, run_playbook

    resolve_target(host)
    result = run_playbook("ping.yml", host)
    state = result["data"].get("ping", {})
    if json:
        print(jsonlib.dumps({"hosts": state, "failures": result["failures"], "rc": result["rc"]}, indent=2, sort_keys=True))
    else:
        for name, info in sorted(state.items()):
            app = info["pm2"]
            print(f"{name:<14} reachable  pm2 {app['online']}/{app['instances']} online  current -> {info['current']}")
        for failure in result["failures"]:
            where = f"{failure['task']}: " if failure["task"] else ""
            print(f"{failure['host']:<14} FAILED     {where}{failure['msg']}")
    if result["rc"] != 0:
        raise Exit(code=1)


@task
@cli
def demo(c):
    """Bring the sandbox up in the incident state and show the production failure, end to end."""
    print("== 1. a production-like host where migration 0007 never ran")
    sb.up(1, "incident")
    ctl = sb.Controller()
    host = sb.find_host("sandbox", ctl)
    from slipway import vault

    creds = vault.load(ctl.vault_file(host.name), ctl.vault_password_file)
    url = f"{host.app_url}/api/books/{sb.INCIDENT_BOOK}/track-view"
    print(f"\n== 2. POST {url}  {{\"viewType\": \"card_view\"}}")
    status, body = sb.http_json("POST", url, {"viewType": "card_view"}, token=creds["slipway_api_token"])
    print(f"   HTTP {status} {jsonlib.dumps(body)}")
    print("\n== 3. what the runbook found")
    try:
        line = sb.wait_for_line(host.pg_log, " 42P10 booksuser@booksdb ERROR:", timeout=10)
    except SlipwayError:
        line = "(no 42P10 line)"
    print(f"   PostgreSQL log ({host.pg_log}):\n     {line}")
    err_line = sb.wait_for_line(host.app_dir / "logs" / "err.log", "Error tracking book view", timeout=10)
    print(f"   app err.log: {err_line}")
    with sb.connect(host, creds["slipway_db_password"]) as conn:
        applied = conn.execute("SELECT count(*) FROM drizzle.__drizzle_migrations").fetchone()[0]
        has = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = %s", (sb.UNIQUE_CONSTRAINT,)).fetchone()[0]
        dups = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM book_view_statistics GROUP BY book_id, view_type HAVING count(*) > 1) d"
        ).fetchone()[0]
    journal = sb.journal_entries()
    print(f"   drizzle.__drizzle_migrations: {applied} rows; the journal has {len(journal)} migrations")
    print(f"   constraint {sb.UNIQUE_CONSTRAINT}: {'present' if has else 'MISSING'}")
    print(f"   duplicate (book_id, view_type) groups that block it: {dups}")
    print(f"   => pending: {journal[-1]['tag']} — the upsert's ON CONFLICT has no unique constraint to use")
    from slipway import migrations as mig

    print("\n== 4. what slipway's migration engine plans (invoke migrate --check: preflight + rehearsal, no change)")
    doc, error, code = mig.run_dsn(host.database_url(creds["slipway_db_password"]), str(sb.READER_APP / "migrations"), check=True)
    for line in mig.render(doc) if doc else [f"error: {error}"]:
        print("   " + line)
    print("\nThe sandbox stays up: `eval \"$(.venv/bin/invoke sandbox.env)\"` then curl it, or fix it with "
          "`.venv/bin/invoke migrate --migrations examples/reader-app/migrations`; "
          "`.venv/bin/invoke sandbox.down` removes it.")
    if status != 500:
        raise Exit(f"error: expected the incident's 500, got HTTP {status}", code=1)


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
        "lock_timeout": "PostgreSQL lock_timeout for the rehearsal and the apply (default 5s)",
        "lock_wait": "seconds to wait for another running migration (default 10)",
    }
)
@cli
def migrate(c, migrations, dsn_env="DATABASE_URL", check=False, json=False, include_skipped=False,
            allow_tampered=False, allow_unknown=False, no_rehearse=False, schema="drizzle",
            table="__drizzle_migrations", lock_timeout="5s", lock_wait=10.0):
    """Drizzle-compatible migrations against a database: plan, preflight, rehearse, apply (exit 0 ok, 1 error, 2 pending with --check)."""
    from slipway import migrations as mig

    try:
        wait = float(lock_wait)
    except ValueError:
        raise SlipwayError(f"--lock-wait {lock_wait!r} is not a number of seconds; pass e.g. --lock-wait 10") from None
    doc, error, code = mig.run(dsn_env, migrations, check, include_skipped=include_skipped,
                               allow_tampered=allow_tampered, allow_unknown=allow_unknown,
                               rehearse=not no_rehearse, schema=schema, table=table,
                               lock_timeout=lock_timeout, lock_wait=wait)
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


@task(help={"k": "pytest -k expression", "x": "stop at the first failure"})
def test(c, k="", x=False):
    """The whole test suite: ansible-lint, then pytest against real sandbox hosts (needs root)."""
    lint(c)
    args = ["-ra", "-p", "no:cacheprovider"]
    if k:
        args += ["-k", k]
    if x:
        args.append("-x")
    c.run(shlex.join([str(VENV_BIN / "python"), "-m", "pytest", *args, "tests"]), pty=False)


sandbox = Collection("sandbox")
sandbox.add_task(up)
sandbox.add_task(down)
sandbox.add_task(env)

ns = Collection()
ns.add_collection(sandbox)
ns.add_task(ping)
ns.add_task(demo)
ns.add_task(migrate)
ns.add_task(lint)
ns.add_task(test)
ns.configure({"run": {"echo": False, "warn": False}})
