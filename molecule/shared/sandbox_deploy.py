"""Controller-side helper of the molecule scenarios: what `invoke deploy` does around the playbook.

    sandbox_deploy.py vars OUT.yml RUN_ID [--variant DIR]
        Build the release (examples/reader-app, or with --variant a copy of it under DIR with one
        extra file, so its release id differs from the one the sandbox runs) and slipway's module
        runtime, and write the extra vars `invoke deploy` passes (slipway_deploy_run_id,
        slipway_release_id, slipway_release_archive, slipway_migrations, slipway_runtimes) to OUT.yml.
        No secret is in them.
    sandbox_deploy.py lock-hold HOST RUN_ID PIDFILE LOGFILE
        Take HOST's real deploy lock (slipway.remote.DeployLock) for RUN_ID and keep holding it from a
        background process until `lock-release` (or until the host goes away); returns once held.
    sandbox_deploy.py lock-release PIDFILE
        End that process (it releases the lock); nothing to do when it is gone.

The sandbox instance comes from SLIPWAY_SANDBOX_INSTANCE, as for every slipway command.
Exit 0 ok, 1 with one line on stderr.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from slipway.errors import SlipwayError

ROOT = Path(__file__).resolve().parents[2]

VARIANT_FILE = "MOLECULE_VARIANT.txt"


def write_vars(out: str, run_id: str, variant: str | None) -> None:
    from slipway import release, runtime
    from slipway.deploy import deploy_extravars
    from slipway.paths import READER_APP
    from slipway.release import app_files

    spec = None
    if variant:
        dest = Path(variant)
        if dest.exists():
            shutil.rmtree(dest)
        for rel in app_files(READER_APP):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(READER_APP / rel, dest / rel)
        (dest / VARIANT_FILE).write_text("a release that differs from the sandbox's only by this file\n")
        spec = str(dest)
    built = release.build(spec)
    own = runtime.build()  # the sandbox hosts run modules with the controller's Python X.Y
    data = deploy_extravars(run_id, built, {own.python: own})
    Path(out).write_text("---\n# written by molecule/shared/sandbox_deploy.py: what `invoke deploy` passes\n"
                         + yaml.safe_dump(data, sort_keys=True))
    print(f"release {built.id}, runtime {own.id}, {len(built.journal_tags)} migrations")


def lock_hold(host: str, run_id: str, pidfile: str, logfile: str) -> None:
    """Fork a holder; the parent returns when the child reports the lock held (or failed)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            answer = pipe.read().strip()
        if answer != "HELD":
            os.waitpid(pid, 0)
            raise SlipwayError(answer or f"the lock holder ended without a word; see {logfile}")
        Path(pidfile).write_text(f"{pid}\n")
        print(f"deploy lock of {host} held for run {run_id} by pid {pid}")
        return
    # child: own session, no inherited stdio (so the Ansible task that started it can return)
    os.close(read_fd)
    os.setsid()
    log = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    status = 0
    try:
        from slipway.remote import DeployLock
        from slipway.sandbox import register

        register()  # the lock reads the host's connection settings from the sandbox's inventory
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        signal.signal(signal.SIGINT, lambda *_: stop.append(1))
        lock = DeployLock(host, run_id, command=f"molecule (run {run_id})").acquire()
        os.write(write_fd, b"HELD\n")
        os.close(write_fd)
        print(f"{time.strftime('%H:%M:%S')} held {lock.paths[1]}", flush=True)
        while not stop and lock.held:
            time.sleep(0.5)
        print(f"{time.strftime('%H:%M:%S')} {'releasing' if stop else 'lost (host gone)'}", flush=True)
        lock.release()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            os.write(write_fd, f"cannot take the deploy lock of {host}: {message}\n".encode())
        except OSError:
            pass
        print(message, flush=True)
        status = 1
    os._exit(status)


def lock_release(pidfile: str) -> None:
    path = Path(pidfile)
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        print("no lock holder")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        print(f"lock holder {pid} already gone")
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    print(f"lock holder {pid} ended")


def main(argv: list[str]) -> int:
    try:
        if len(argv) in (3, 5) and argv[0] == "vars":
            variant = argv[4] if len(argv) == 5 and argv[3] == "--variant" else None
            if len(argv) == 5 and variant is None:
                raise SlipwayError("usage: sandbox_deploy.py vars OUT.yml RUN_ID [--variant DIR]")
            write_vars(argv[1], argv[2], variant)
        elif len(argv) == 5 and argv[0] == "lock-hold":
            lock_hold(*argv[1:])
        elif len(argv) == 2 and argv[0] == "lock-release":
            lock_release(argv[1])
        else:
            raise SlipwayError("usage: sandbox_deploy.py vars OUT.yml RUN_ID [--variant DIR] | "
                               "lock-hold HOST RUN_ID PIDFILE LOGFILE | lock-release PIDFILE")
    except SlipwayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
