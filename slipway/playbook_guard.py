#!/usr/bin/env python3
"""ansible-playbook for one slipway run, tied to the life of the `invoke` process that started it.

ansible-runner starts its command in a session of its own (pexpect), so a signal to `invoke`'s
process group never reaches ansible-playbook, its forked workers or their ssh clients. slipway
passes this script as ansible-runner's ``binary``: it asks the kernel to send it SIGTERM when its
parent (`invoke`, pid in ``SLIPWAY_RUN_PARENT``) dies — even by SIGKILL — and runs
ansible-playbook as its child, as a child subreaper (orphans of the run are re-parented to it).
When the parent dies, when it is sent SIGTERM, SIGINT or SIGHUP (slipway's cancel sends SIGTERM),
and when ansible-playbook ends in any way, it kills every descendant (SIGKILL: ansible-playbook,
its workers — each in a session of its own —, their ssh clients and ControlPersist masters) and
ends the run's masters (``ANSIBLE_SSH_CONTROL_PATH_DIR``) by socket too, so no controller process
of the run outlives it. The host side
is stopped by the deploy lock's keeper (slipway/remote.py), whose SSH channel belongs to `invoke`.

Standard library only; exits with ansible-playbook's status (128 + signal when it was killed).
"""
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def end_masters(control_dir):
    """End the ControlPersist masters of one run (`ssh -O exit` on each socket in ``control_dir``)."""
    if not control_dir or not os.path.isdir(control_dir):
        return
    for name in os.listdir(control_dir):
        subprocess.run(["ssh", "-O", "exit", "-o", "ControlPath=" + os.path.join(control_dir, name), "slipway-master"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)


def _parents():
    """{pid: parent pid} of every process now."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        out[int(name)] = int(stat[stat.rfind(b")") + 2:].split()[1])
    return out


def _sigkill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_descendants():
    """SIGKILL every descendant of this process, until none is left. Ansible's workers start
    sessions of their own and ssh's ControlPersist master daemonizes, so a process group does not
    hold them all; as a child subreaper this process stays the ancestor of every one of them."""
    me = os.getpid()
    for _ in range(50):
        parents = _parents()
        mine, grew = {me}, True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in mine and pid not in mine:
                    mine.add(pid)
                    grew = True
        mine.discard(me)
        _sigkill(mine)
        while True:  # reap what was killed (orphans are re-parented to this subreaper)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if not pid:
                break
        if not mine:
            return


def main(argv):
    parent = int(os.environ.get("SLIPWAY_RUN_PARENT") or os.getppid())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the run (workers, ssh masters) stay below this one
    if os.getppid() != parent:  # the parent died before the request took effect
        return 143
    stopping, children = [], []

    def stop(signum, frame):
        # no exception here: a second signal (SIGTERM from the kernel and SIGHUP from the pty
        # arrive together when invoke dies) must not cut the cleanup below short
        stopping.append(signum)
        _sigkill(children)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    child = os.fork()
    if child == 0:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp("ansible-playbook", ["ansible-playbook"] + argv[1:])
        finally:
            os._exit(127)
    children.append(child)
    status = 1
    try:
        if stopping:  # a stop that came before the child was known
            os.kill(child, signal.SIGKILL)
        _, raw = os.waitpid(child, 0)  # returns once the child ends (killed by stop() or on its own)
        status = os.waitstatus_to_exitcode(raw)
        status = 128 - status if status < 0 else status
    finally:
        kill_descendants()
        end_masters(os.environ.get("ANSIBLE_SSH_CONTROL_PATH_DIR"))
    return 128 + stopping[0] if stopping else status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
