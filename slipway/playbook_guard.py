#!/usr/bin/env python3
"""ansible-playbook for one slipway run, tied to the life of the `invoke` process that started it.

ansible-runner starts its command in a session of its own (pexpect), so a signal to `invoke`'s
process group never reaches ansible-playbook, its forked workers or their ssh clients. slipway
passes this script as ansible-runner's ``binary``: it asks the kernel to send it SIGTERM when its
parent (`invoke`, pid in ``SLIPWAY_RUN_PARENT``) dies — even by SIGKILL — and runs
ansible-playbook in its own process group (the one pexpect made for it, which ansible-runner's
cancel kills whole). When the parent dies, when it is sent SIGTERM, SIGINT or SIGHUP, and when
ansible-playbook ends in any way, it kills every other process of that group (SIGKILL:
ansible-playbook, its workers, their ssh clients) and ends the run's ssh ControlPersist masters
(``ANSIBLE_SSH_CONTROL_PATH_DIR``), so no controller process of the run outlives it. The host side
is stopped by the deploy lock's keeper (slipway/remote.py), whose SSH channel belongs to `invoke`.

Standard library only; exits with ansible-playbook's status (128 + signal when it was killed).
"""
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def end_masters(control_dir):
    """End the ControlPersist masters of one run (`ssh -O exit` on each socket in ``control_dir``)."""
    if not control_dir or not os.path.isdir(control_dir):
        return
    for name in os.listdir(control_dir):
        subprocess.run(["ssh", "-O", "exit", "-o", "ControlPath=" + os.path.join(control_dir, name), "slipway-master"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)


def kill_group_but_me():
    """SIGKILL every other process of this process group, until none is left (a worker may fork
    an ssh client while the first pass runs)."""
    me, group = os.getpid(), os.getpgid(0)
    for _ in range(20):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            try:
                if os.getpgid(int(name)) == group:
                    os.kill(int(name), signal.SIGKILL)
                    found = True
            except (ProcessLookupError, PermissionError):
                pass
        if not found:
            return


def main(argv):
    parent = int(os.environ.get("SLIPWAY_RUN_PARENT") or os.getppid())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        return 143
    child = os.fork()
    if child == 0:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp("ansible-playbook", ["ansible-playbook"] + argv[1:])
        finally:
            os._exit(127)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    status = 1
    try:
        _, raw = os.waitpid(child, 0)
        status = os.waitstatus_to_exitcode(raw)
        status = 128 - status if status < 0 else status
    except SystemExit as exc:
        status = exc.code
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        kill_group_but_me()
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass
        end_masters(os.environ.get("ANSIBLE_SSH_CONTROL_PATH_DIR"))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
