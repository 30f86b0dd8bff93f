"""The sandbox's public operations: up, down, and finding the hosts of the running instance."""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils.pm2 import daemon_pid
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

from .. import vault
from ..errors import SlipwayError
from .controller import Controller
from .data import SMOKE_BOOK, empty_database, ensure_database_state
from .inventory import write_inventory
from .layout import MAX_HOSTS, SSH_PORT, STATES, Host, host_index, hosts_base, log
from .processes import kill_pids, run, user_pids
from .provision import (
    build_app,
    ensure_app,
    ensure_dirs,
    ensure_legacy_app,
    ensure_legacy_files,
    ensure_postgres,
    ensure_release,
    ensure_sshd,
    ensure_user,
    pm2,
    preflight,
    stop_postgres,
    stop_sshd,
)


def ensure_private_dirs(host: Host, user: pwd.struct_passwd) -> None:
    """The user's ~/.ssh and backup dir (0700), for a host that has no app dir of slipway's making."""
    for path in (host.home / ".ssh", host.backup_dir):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(path, 0o700)


def up_bare(host: Host, user: pwd.struct_passwd, ctl: Controller, creds: dict) -> bool:
    """A host nothing was deployed to: the user, sshd, PostgreSQL with the app's role and an empty
    database, Node and PM2 on the PATH; no app directory, no PM2 daemon. True if changed."""
    changed = False
    if daemon_pid(str(host.pm2_home)) is not None:
        pm2(host, user, "kill", check=False, timeout=30)
        changed = True
    ensure_private_dirs(host, user)
    ensure_sshd(host, user, ctl)
    ensure_postgres(host, user, creds["slipway_db_password"])
    for path in (host.app_dir, host.pm2_home):
        if path.exists():
            shutil.rmtree(path)
            changed = True
    if empty_database(host) is False:
        changed = True
    return changed


def up_legacy(host: Host, user: pwd.struct_passwd, ctl: Controller, build: Path, creds: dict) -> bool:
    """The seed's production, deployed by hand (provision.ensure_legacy), its database in the
    incident state (0007 missing). True if changed."""
    ensure_private_dirs(host, user)
    ensure_sshd(host, user, ctl)
    ensure_postgres(host, user, creds["slipway_db_password"])
    files_changed = ensure_legacy_files(host, user, build, creds)
    db_changed = ensure_database_state(host, user, creds["slipway_db_password"], "incident", host.legacy_dir)
    return ensure_legacy_app(host, user) or files_changed or db_changed


def up_host(host: Host, user: pwd.struct_passwd, ctl: Controller, rid: str, build: Path, want: str) -> bool:
    creds = ctl.secrets_for(host.name)
    if want == "bare":
        return up_bare(host, user, ctl, creds)
    if want == "legacy":
        return up_legacy(host, user, ctl, build, creds)
    ensure_dirs(host, user)
    ensure_sshd(host, user, ctl)
    ensure_postgres(host, user, creds["slipway_db_password"])
    release_changed = ensure_release(host, user, rid, build, creds)
    db_changed = ensure_database_state(host, user, creds["slipway_db_password"], want)
    app_changed = ensure_app(host, user, release_changed)
    return release_changed or db_changed or app_changed


def down_host(host: Host) -> None:
    try:
        user = pwd.getpwnam(host.user)
    except KeyError:
        user = None
    if user is not None:
        if daemon_pid(str(host.pm2_home)) is not None:
            pm2(host, user, "kill", check=False, timeout=30)
        # every process of the user (PM2 daemon, app workers, ssh sessions), by pid
        kill_pids(user_pids(user.pw_uid))
    stop_sshd(host)
    stop_postgres(host)
    if user is not None:
        kill_pids(user_pids(user.pw_uid), grace=2)
        run(["userdel", host.user], check=False)
        try:
            grp.getgrnam(host.user)
            run(["groupdel", host.user], check=False)
        except KeyError:
            pass
    if host.root.exists():
        shutil.rmtree(host.root)


def up(count: int = 1, state: str = "incident") -> list[Host]:
    if state not in STATES:
        raise SlipwayError(f"unknown state {state!r}; use --state {', '.join(STATES)}")
    if not 1 <= count <= MAX_HOSTS:
        raise SlipwayError(f"--hosts {count} is out of range; use 1 to {MAX_HOSTS}")
    preflight()
    ctl = Controller()
    ctl.ensure()
    record = ctl.load_state()
    hosts = [Host.make(i) for i in range(1, count + 1)]
    started = time.monotonic()
    print(f"sandbox: {count} host(s), state {state}", flush=True)

    extra = sorted(set(record["hosts"]) - {h.name for h in hosts})
    for name in extra:
        index = record["hosts"][name]["index"]
        down_host(Host.make(index))
        record["hosts"].pop(name)
        log(name, "removed (not in the requested --hosts)")
    rid, build = build_app(ctl)
    users = {h.name: ensure_user(h, record, ctl) for h in hosts}  # serially: useradd locks /etc/passwd
    for h in hosts:
        record["hosts"][h.name] = {"index": h.index, "user": h.user, "address": h.address, "root": str(h.root)}
    ctl.save_state(record)
    with ThreadPoolExecutor(max_workers=min(4, count)) as pool:
        futures = {h.name: pool.submit(up_host, h, users[h.name], ctl, rid, build, state) for h in hosts}
        results = {}
        errors = []
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except SlipwayError as exc:
                errors.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - psycopg, OS errors: still one line, never a traceback
                errors.append(f"{name}: {type(exc).__name__}: {redact_text(str(exc)).splitlines()[0] if str(exc) else ''}; "
                              "fix the cause, then `invoke sandbox.down` and `invoke sandbox.up` again")
    if errors:
        raise SlipwayError(errors[0])
    record["state"] = state
    record["release"] = rid
    ctl.save_state(record)
    write_inventory(hosts, ctl, state)
    for h in hosts:
        log(h.name, f"{'changed' if results[h.name] else 'unchanged'}: {h.app_url} (ssh {h.user}@{h.address}:{SSH_PORT})")
    print(f"sandbox: up in {time.monotonic() - started:.1f}s; inventory {ctl.inventory_file}", flush=True)
    return hosts


def down() -> None:
    if os.geteuid() != 0:
        raise SlipwayError("sandbox.down needs root (it removes the hosts' users and processes); run it as root")
    ctl = Controller()
    record = ctl.load_state()
    started = time.monotonic()
    indexes = {int(v["index"]) for v in record.get("hosts", {}).values()}
    # also what a half-finished `up` left: users whose home is ours, host dirs
    base = hosts_base()
    names = {Path(e.pw_dir).parent.name for e in pwd.getpwall() if e.pw_dir.startswith(f"{base}/")}
    if base.exists():
        names |= {child.name for child in base.iterdir()}
    indexes |= {i for i in map(host_index, names) if i is not None}
    for index in sorted(indexes):
        host = Host.make(index)
        down_host(host)
        log(host.name, "down: processes ended, user and files removed")
    for name in record.get("users", []):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        kill_pids(user_pids(entry.pw_uid))
        run(["userdel", name], check=False)
    if base.exists():
        shutil.rmtree(base)
    if ctl.dir.exists():
        shutil.rmtree(ctl.dir)
    print(f"sandbox: down in {time.monotonic() - started:.1f}s", flush=True)


def hosts_in_record(ctl: Controller | None = None) -> list[Host]:
    ctl = ctl or Controller()
    record = ctl.load_state()
    return [Host.make(int(v["index"])) for _, v in sorted(record.get("hosts", {}).items(), key=lambda kv: kv[1]["index"])]


def find_host(name: str, ctl: Controller | None = None) -> Host:
    ctl = ctl or Controller()
    for host in hosts_in_record(ctl):
        if host.name == name:
            return host
    known = ", ".join(h.name for h in hosts_in_record(ctl)) or "none; run `invoke sandbox.up`"
    raise SlipwayError(f"no sandbox host named {name!r} (sandbox hosts: {known})")


def env_lines(name: str) -> list[str]:
    """``export`` lines for one host, for `eval` in a shell (the only place secrets are printed,
    on request, to the user's own terminal)."""
    ctl = Controller()
    host = find_host(name, ctl)
    creds = vault.load(ctl.vault_file(host.name), ctl.vault_password_file)
    import shlex

    return [
        f"export APP_URL={shlex.quote(host.app_url)}",
        f"export API_TOKEN={shlex.quote(creds['slipway_api_token'])}",
        f"export DATABASE_URL={shlex.quote(host.database_url(creds['slipway_db_password']))}",
        f"export SLIPWAY_SMOKE_BOOK_ID={SMOKE_BOOK}",
    ]
