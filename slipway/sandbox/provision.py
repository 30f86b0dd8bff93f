"""Provisioning one sandbox host: its unix user, dirs, sshd, PostgreSQL 15 cluster, the app release, PM2."""
from __future__ import annotations

import os
import pwd
import shutil
import time
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils.pm2 import app_summary, daemon_pid, summarize_jlist

from ..errors import SlipwayError
from ..files import write_private
from ..paths import READER_APP
from ..release import app_files, release_id
from .controller import Controller
from .layout import (
    APP_NAME,
    APP_PORT,
    DB_NAME,
    DB_USER,
    JOURNAL,
    PATH_ENV,
    PG_BIN,
    PG_PORT,
    SFTP_SERVER,
    SSH_PORT,
    SSHD,
    SYSTEM_PYTHON,
    Host,
    hosts_base,
    log,
)
from .processes import chown_tree, descendants, http_json, kill_pids, pid_alive, read_pid, run, wait_port


def preflight() -> None:
    if os.geteuid() != 0:
        raise SlipwayError("the sandbox needs root (it creates a unix user, an sshd and a PostgreSQL cluster per host); run it as root")
    missing = [
        str(p)
        for p in (SSHD, PG_BIN / "initdb", PG_BIN / "pg_ctl", SYSTEM_PYTHON)
        if not Path(p).exists()
    ]
    missing += [name for name in ("node", "npm", "pm2", "ssh", "ssh-keygen", "ssh-keyscan", "useradd", "userdel") if not shutil.which(name)]
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing.append("user postgres")
    if missing:
        raise SlipwayError(f"missing on this machine: {', '.join(missing)}; run ./bootstrap")
    if not JOURNAL.exists():
        raise SlipwayError(f"reference app not found at {READER_APP}; run from a complete slipway checkout")


def build_app(ctl: Controller, src: Path = READER_APP) -> tuple[str, Path]:
    """Copy the app and `npm ci --omit=dev` it once on the controller; reused for every host."""
    rid = release_id(src)
    out = ctl.build_dir / rid
    if (out / ".slipway-built").exists():
        return rid, out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for rel in app_files(src):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, out / rel)
    proc = run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"], cwd=out, check=False, timeout=300)
    if proc.returncode != 0:
        raise SlipwayError(f"npm ci for the reader app failed: {proc.stderr.strip().splitlines()[-1:] or 'no output'}; check npm registry access")
    (out / ".slipway-built").write_text(rid + "\n")
    return rid, out


def ensure_user(host: Host, state: dict, ctl: Controller) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(host.user)
    except KeyError:
        entry = None
    if entry is not None and not entry.pw_dir.startswith(str(hosts_base()) + "/"):
        raise SlipwayError(f"user {host.user} exists but is not a sandbox user (home {entry.pw_dir}); remove it or set SLIPWAY_SANDBOX_INSTANCE")
    host.root.mkdir(parents=True, exist_ok=True)
    os.chmod(hosts_base(), 0o755)
    os.chmod(host.root, 0o755)
    if entry is None:
        # recorded before it exists, so `down` finds it even if `up` dies halfway
        if host.user not in state["users"]:
            state["users"].append(host.user)
            ctl.save_state(state)
        run(["useradd", "--home-dir", host.home, "--create-home", "--user-group", "--shell", "/bin/bash", host.user])
        # with `UsePAM no` a fresh account is "locked" ("!" password): unlock for key-only login
        run(["usermod", "-p", "*", host.user])
        log(host.name, f"user {host.user} created")
        entry = pwd.getpwnam(host.user)
    os.chmod(host.home, 0o750)
    return entry


def ensure_dirs(host: Host, user: pwd.struct_passwd) -> None:
    for path, mode in (
        (host.home / ".ssh", 0o700),
        (host.app_dir, 0o755),
        (host.app_dir / "releases", 0o755),
        (host.app_dir / "shared", 0o750),
        (host.app_dir / "logs", 0o750),
        (host.backup_dir, 0o700),
    ):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(path, mode)


def ensure_sshd(host: Host, user: pwd.struct_passwd, ctl: Controller) -> None:
    host.sshd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    hostkey = host.sshd_dir / "ssh_host_ed25519_key"
    if not hostkey.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{host.name}-hostkey", "-f", hostkey])
    pubkey = Path(str(ctl.key) + ".pub").read_text().strip()
    write_private(host.home / ".ssh" / "authorized_keys", pubkey + "\n", 0o600, owner=user)
    config = "\n".join(
        [
            f"ListenAddress {host.address}:{SSH_PORT}",
            f"HostKey {hostkey}",
            f"PidFile {host.sshd_dir / 'sshd.pid'}",
            f"AllowUsers {host.user}",
            "PermitRootLogin no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AuthenticationMethods publickey",
            "UsePAM no",
            "StrictModes yes",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "PrintMotd no",
            "MaxStartups 30:30:100",
            "MaxSessions 20",
            "LogLevel INFO",
            f"Subsystem sftp {SFTP_SERVER}",
            "",
        ]
    )
    changed = write_private(host.sshd_dir / "sshd_config", config, 0o600)
    pid = read_pid(host.sshd_dir / "sshd.pid")
    if pid_alive(pid) and changed:
        stop_sshd(host)
        pid = None
    if not pid_alive(pid):
        run([SSHD, "-t", "-f", host.sshd_dir / "sshd_config"])
        run([SSHD, "-f", host.sshd_dir / "sshd_config", "-E", host.sshd_dir / "sshd.log"])
        wait_port(host.address, SSH_PORT)
        log(host.name, f"sshd listening on {host.address}:{SSH_PORT}")
    # known_hosts from the key we generated (not trust-on-first-use), checked against what is served
    served = run(["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", SSH_PORT, host.address], check=False).stdout
    expected = (host.sshd_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    if " ".join(expected) not in served:
        raise SlipwayError(f"{host.name}: the sshd on {host.address}:{SSH_PORT} does not serve the host key slipway generated; another sshd holds the address — stop it or set SLIPWAY_SANDBOX_INSTANCE")


def stop_sshd(host: Host) -> None:
    pid = read_pid(host.sshd_dir / "sshd.pid")
    if pid_alive(pid):
        # killing the listener leaves open sessions running: end them by pid first
        kill_pids(descendants(pid))
        kill_pids([pid])


def pg(*args, **kwargs):
    """Run a PostgreSQL 15 program (``initdb``, ``pg_ctl``, ``psql``) as the ``postgres`` user."""
    return run([PG_BIN / args[0], *args[1:]], user=pwd.getpwnam("postgres"), **kwargs)


def initdb(pgdata: Path) -> None:
    """A new cluster: superuser ``postgres`` (peer on the socket), scram over TCP, UTF-8."""
    pg("initdb", "-D", pgdata, "-U", "postgres", "--auth-local=peer", "--auth-host=scram-sha-256",
       "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")


def psql_admin(host: Host, sql: str, db: str = "postgres") -> str:
    """Run SQL as the cluster superuser over the unix socket (peer auth); SQL goes on stdin."""
    proc = pg(
        "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", host.pgsock, "-p", PG_PORT, "-U", "postgres", "-d", db, "-f", "-",
        input=sql,
    )
    return proc.stdout.strip()


def ensure_postgres(host: Host, user: pwd.struct_passwd, password: str) -> None:
    pguser = pwd.getpwnam("postgres")
    host.pg_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(host.pg_dir, pguser.pw_uid, pguser.pw_gid)
    host.pgsock.mkdir(mode=0o755, exist_ok=True)
    os.chown(host.pgsock, pguser.pw_uid, pguser.pw_gid)
    # logs readable by the host user (like adm membership on a real host), via the group + setgid
    host.pglog_dir.mkdir(exist_ok=True)
    os.chown(host.pglog_dir, pguser.pw_uid, user.pw_gid)
    os.chmod(host.pglog_dir, 0o2750)
    if not (host.pgdata / "PG_VERSION").exists():
        initdb(host.pgdata)
        log(host.name, "PostgreSQL cluster initialised")
    conf = "\n".join(
        [
            "# written by slipway sandbox",
            f"listen_addresses = '{host.address}'",
            f"port = {PG_PORT}",
            f"unix_socket_directories = '{host.pgsock}'",
            "password_encryption = 'scram-sha-256'",
            "max_connections = 60",
            "shared_buffers = '32MB'",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "logging_collector = on",
            f"log_directory = '{host.pglog_dir}'",
            "log_filename = 'postgresql.log'",
            "log_file_mode = 0640",
            "log_rotation_age = 0",
            "log_rotation_size = 0",
            "log_line_prefix = '%m [%p] %e %q%u@%d '",
            "log_min_error_statement = error",
            "",
        ]
    )
    hba = "\n".join(
        [
            "# written by slipway sandbox",
            "local   all   postgres                 peer",
            f"host    {DB_NAME}  {DB_USER}  {host.address}/32  scram-sha-256",
            f"host    {DB_NAME}  {DB_USER}  127.0.0.1/32     scram-sha-256",
            "",
        ]
    )
    changed = write_private(host.pgdata / "postgresql.auto.conf", conf, 0o600, owner=pguser)
    changed |= write_private(host.pgdata / "pg_hba.conf", hba, 0o600, owner=pguser)
    running = pg("pg_ctl", "-D", host.pgdata, "status", check=False).returncode == 0
    if running and changed:
        pg("pg_ctl", "-D", host.pgdata, "-m", "fast", "-w", "stop")
        running = False
    if not running:
        pg("pg_ctl", "-D", host.pgdata, "-l", host.pg_dir / "startup.log", "-w", "-t", "60", "start")
        log(host.name, f"PostgreSQL 15 listening on {host.address}:{PG_PORT}")
    if not all(c.isalnum() or c in "-_" for c in password):  # token_urlsafe's alphabet: safe in a literal
        raise SlipwayError(f"{host.name}: the DB password in the vault has characters other than [A-Za-z0-9_-]; remove the vault file and re-run `invoke sandbox.up`")
    exists = psql_admin(host, f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'")
    verb = "ALTER" if exists == "1" else "CREATE"
    # the password must not reach the server log, not even as the text of a failed statement
    psql_admin(host, f"SET log_statement = 'none';\nSET log_min_error_statement = 'panic';\n"
                     f"{verb} ROLE {DB_USER} LOGIN PASSWORD '{password}';")
    if psql_admin(host, f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'") != "1":
        psql_admin(host, f"CREATE DATABASE {DB_NAME} OWNER {DB_USER};")
        log(host.name, f"database {DB_NAME} created")


def stop_postgres(host: Host) -> None:
    if not (host.pgdata / "PG_VERSION").exists():
        return
    pid = read_pid(host.pgdata / "postmaster.pid")
    if pid_alive(pid):
        try:
            pg("pg_ctl", "-D", host.pgdata, "-m", "fast", "-w", "-t", "20", "stop", check=False)
        except (SlipwayError, KeyError):
            pass
        kill_pids([pid] + descendants(pid))


def _symlink(target: str, link: Path, owner: pwd.struct_passwd) -> bool:
    """Point ``link`` at ``target`` atomically (rename over the old link). True if changed."""
    if link.is_symlink() and os.readlink(link) == target:
        return False
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.lchown(tmp, owner.pw_uid, owner.pw_gid)
    os.replace(tmp, link)
    return True


def app_env_text(host: Host, secrets_: dict) -> str:
    """The reference app's .env on a sandbox host (its secrets from the vault)."""
    return "\n".join(["NODE_ENV=production", f"HOST={host.address}", f"PORT={APP_PORT}",
                      f"DATABASE_URL={host.database_url(secrets_['slipway_db_password'])}",
                      f"API_TOKEN={secrets_['slipway_api_token']}", ""])


def ensure_release(host: Host, user: pwd.struct_passwd, rid: str, build: Path, secrets_: dict) -> bool:
    """Install the built app as ``releases/<rid>`` and point ``current`` at it. True if changed."""
    env = "# written by slipway sandbox; secrets: mode 0600\n" + app_env_text(host, secrets_)
    changed = write_private(host.app_dir / "shared" / ".env", env, 0o600, owner=user)
    release = host.app_dir / "releases" / rid
    if not (release / ".slipway-built").exists():
        tmp = release.with_name(f".{rid}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(build, tmp, symlinks=True)
        os.symlink("../../shared/.env", tmp / ".env")
        os.symlink("../../logs", tmp / "logs")
        chown_tree(tmp, user)
        tmp.rename(release)
        log(host.name, f"release {rid} installed")
        changed = True
    changed |= _symlink(f"releases/{rid}", host.app_dir / "current", user)
    return changed


LEGACY_LOG_LINES = {
    # what the hand-deployed app's logs held when the incident was found (the seed's runbook read them)
    "err.log": ("2026-11-28T09:14:02: Error tracking book view: there is no unique or exclusion constraint matching "
                "the ON CONFLICT specification (code 42P10)\n"),
    "out.log": "2026-11-28T09:00:00: reader-app listening on 127.0.0.1:3000 (release none)\n",
}


def ensure_legacy_files(host: Host, user: pwd.struct_passwd, build: Path, secrets_: dict) -> bool:
    """state legacy, the seed's production: the app copied by hand into one directory to run in
    place from there (its own .env and logs/, a scripts/ dir), no app dir, no other state's PM2
    processes. True if changed."""
    changed = False
    state = pm2_app_state(host, user)
    if state["instances"] and state["cwd"] != [str(host.legacy_dir)]:
        pm2(host, user, "kill", check=False, timeout=30)  # another state's processes
        state, changed = pm2_app_state(host, user), True
    if host.app_dir.exists():
        shutil.rmtree(host.app_dir)
        changed = True
    if not (host.legacy_dir / ".slipway-built").exists():
        if host.legacy_dir.exists():
            shutil.rmtree(host.legacy_dir)
        host.legacy_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(build, host.legacy_dir, symlinks=True)
        (host.legacy_dir / "logs").mkdir(exist_ok=True)
        for name, text in LEGACY_LOG_LINES.items():
            (host.legacy_dir / "logs" / name).write_text(text)
        write_private(host.legacy_dir / ".env", app_env_text(host, secrets_), 0o600, owner=user)
        chown_tree(host.legacy_dir.parent, user)
        log(host.name, f"app copied by hand into {host.legacy_dir}")
        changed = True
    return changed


def ensure_legacy_app(host: Host, user: pwd.struct_passwd) -> bool:
    """PM2 started by hand in the legacy directory (`pm2 start ecosystem.config.js`: a daemon
    with no slipway settings). True if changed."""
    changed = False
    state = pm2_app_state(host, user)
    if not state["instances"] or state["online"] != state["instances"]:
        if state["instances"]:
            pm2(host, user, "delete", APP_NAME, check=False)
        # by hand: in the app's directory, with the user's plain environment (no APP_CURRENT, no
        # RELEASE_ID, a daemon without NODE_CLUSTER_SCHED_POLICY)
        run(["pm2", "start", "ecosystem.config.js"], env=user_env(host, user), cwd=host.legacy_dir, user=user, timeout=90)
        log(host.name, f"PM2 started {APP_NAME} by hand in {host.legacy_dir}")
        changed = True
    wait_healthy(host)
    return changed


def user_env(host: Host, user: pwd.struct_passwd, **extra) -> dict:
    env = {
        "HOME": str(host.home),
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "PATH": PATH_ENV,
        "PM2_HOME": str(host.pm2_home),
        "LANG": "C.UTF-8",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pm2(host: Host, user: pwd.struct_passwd, *args, check=True, timeout=90):
    return run(["pm2", *args], env=user_env(host, user), cwd=host.home, user=user, check=check, timeout=timeout)


def pm2_app_state(host: Host, user: pwd.struct_passwd, app: str = APP_NAME) -> dict:
    if daemon_pid(str(host.pm2_home)) is None:
        return app_summary([], app)
    return app_summary(summarize_jlist(pm2(host, user, "jlist").stdout), app)


def pm2_start_env(host: Host, user: pwd.struct_passwd) -> dict:
    """The environment slipway.core.pm2_app gives pm2: the `current` link's own path (APP_CURRENT,
    read by the ecosystem file for cwd/script, so later reloads run whatever `current` points at),
    the release it points at now (RELEASE_ID, reported by /api/health) and, for the PM2 daemon this
    may start, NODE_CLUSTER_SCHED_POLICY=none (round-robin hand-off loses connections in reloads)."""
    current = host.app_dir / "current"
    return user_env(host, user, APP_CURRENT=current, RELEASE_ID=os.path.basename(os.path.realpath(current)),
                    NODE_CLUSTER_SCHED_POLICY="none")


def ensure_app(host: Host, user: pwd.struct_passwd, release_changed: bool) -> bool:
    state = pm2_app_state(host, user)
    current = host.app_dir / "current"
    changed = False
    started_elsewhere = state["cwd"] != [str(current)]
    if release_changed or started_elsewhere or not state["instances"] or state["online"] != state["instances"]:
        # The sandbox starts a new release afresh (delete + start); zero-downtime switching is the
        # deploy's job (pm2_app). It starts the app the way pm2_app does, from the `current` link's
        # own path, so a later deploy's `pm2 reload` runs the new release's code; processes started
        # from a release's real path (an older sandbox) are started again the same way.
        if state["instances"]:
            pm2(host, user, "delete", APP_NAME, check=False)
        run(["pm2", "start", current / "ecosystem.config.js"], env=pm2_start_env(host, user), cwd=host.app_dir,
            user=user, timeout=90)
        log(host.name, f"PM2 started {APP_NAME} (cluster mode)")
        changed = True
    wait_healthy(host)
    return changed


def wait_healthy(host: Host) -> None:
    """Until the app answers its health check (30 s)."""
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = http_json("GET", f"{host.app_url}/api/health", timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise SlipwayError(f"{host.name}: the app did not become healthy at {host.app_url}/api/health ({last}); see the app's logs/err.log")
