#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: app_release
short_description: Install an app release Ansistrano-style and switch the current link atomically
version_added: "0.3.0"
description:
  - Installs a release archive as C(<app_dir>/releases/<release>) (unpacked into a hidden temporary
    directory, shared paths linked, C(npm ci) run, then renamed into place, so a half-installed release
    never has its final name), points C(<app_dir>/current) at it with an atomic rename of a new symlink,
    and keeps the newest I(keep) releases (never the current or the previous one).
  - A release is installed when its directory holds C(.slipway-built) naming it; the same release again
    changes nothing.
  - C(state=switched) points C(current) back at an already installed release (rollback).
options:
  app_dir:
    description: The app's base directory (holds C(releases/), C(shared/), C(logs/), C(current)).
    type: path
    required: true
  release:
    description: Release id (directory name under C(releases/)); letters, digits, C(.), C(_), C(-).
    type: str
    required: true
  archive:
    description: A C(.tar.gz) of the app on the managed host; needed when the release is not installed yet. Removed after install.
    type: path
  shared:
    description: Links made inside the release, name -> target (relative to the release directory).
    type: dict
    default: {".env": "../../shared/.env", "logs": "../../logs"}
  npm_command:
    description: Command run in the new release before it is renamed into place (argv list); empty to skip.
    type: list
    elements: str
    default: [npm, ci, --omit=dev, --no-audit, --no-fund, --loglevel=error]
  keep:
    description: Releases to keep (the current and the previous one are always kept).
    type: int
    default: 5
  state:
    description: C(present) installs (if needed) and switches; C(switched) only switches to an installed release.
    type: str
    choices: [present, switched]
    default: present
  env:
    description:
      - The app's environment, written to C(shared/.env) (mode 0600, atomically, only while the deploy
        run holds its lock) when it differs from the file; one C(KEY=VALUE) line per key, a value that
        is not plain double-quoted. Omitted - the file is left as it is. Never returned or logged.
      - Ansible masks every value of this mapping wherever it occurs in the result (a value C(1) in a
        release id too); the deploy passes I(env_content) instead.
    type: dict
  env_content:
    description:
      - The text C(shared/.env) must hold, as the filter C(slipway.core.env_file_text) makes it from such a
        mapping; written as I(env) is. Only this whole text is masked in the result. Not with I(env).
    type: str
  restore_env:
    description:
      - Put back C(shared/.env) as it was before the last change I(env) made (kept as
        C(shared/.env.previous)); the rescue of a deploy that changed the environment does, so the
        release it returns to runs with the environment it ran with. Nothing when there is none.
    type: bool
    default: false
  adopt_from:
    description:
      - A directory the app was deployed to by hand and runs from now (found by the deploy's
        preflight from PM2's processes), taken over by this first release. Its C(.env) becomes
        C(shared/.env) (0600) when that does not exist yet and I(env) is not given; the log files
        in its C(logs/) that C(<app_dir>/logs/) lacks are copied there (a log keeps its own mode when
        narrower than 0640). When the filesystem has no room for them the takeover fails before it
        copies anything (the app dir's own directories may exist by then). The directory itself is
        only read.
    type: path
author:
  - slipway developers
notes:
  - Supports check mode (predicts install, switch and pruning) and diff mode (the current link before/after).
"""

EXAMPLES = r"""
- name: Install and switch to the release
  slipway.core.app_release:
    app_dir: /srv/app
    release: r311a8fb8289c
    archive: /srv/app/.slipway/incoming/r311a8fb8289c.tar.gz
  register: release

- name: Switch back to the previous release
  slipway.core.app_release:
    app_dir: /srv/app
    release: "{{ release.previous }}"
    state: switched
"""

RETURN = r"""
env_changed:
  description: Whether C(shared/.env) was (in check mode, would be) rewritten from I(env).
  returned: always
  type: bool
env_removed:
  description: Keys the previous C(shared/.env) had that I(env) no longer has (names only; in check mode,
    would be removed).
  returned: always
  type: list
  elements: str
adopted:
  description: With I(adopt_from), what was (would be) taken from it - C(from), C(env) (its C(.env)
    became C(shared/.env)), C(logs) (the log files copied) and C(bytes) (their size).
  returned: when adopt_from is given
  type: dict
env_restored:
  description: Whether C(shared/.env) was (would be) put back from C(shared/.env.previous) (I(restore_env)).
  returned: always
  type: bool
release:
  description: The release C(current) points at after the run.
  returned: always
  type: str
previous:
  description: The release C(current) pointed at before the run (null when there was none).
  returned: always
  type: str
installed:
  description: Whether the release was installed by this run.
  returned: always
  type: bool
switched:
  description: Whether C(current) was changed by this run.
  returned: always
  type: bool
pruned:
  description: Releases removed by retention.
  returned: always
  type: list
  elements: str
releases:
  description: Installed releases after the run, newest first.
  returned: always
  type: list
  elements: str
"""

import os
import re
import shutil
import stat
import subprocess
import tarfile
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils import layout, runguard
from ansible_collections.slipway.core.plugins.module_utils.appdir import (
    current_release,
    env_keys,
    env_text,
    installed,
    installed_releases,
)
from ansible_collections.slipway.core.plugins.module_utils.files import atomic_write
from ansible_collections.slipway.core.plugins.module_utils.oneline import one_line
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def switch(app_dir, rid):
    """Point current at releases/<rid>: a new symlink renamed over the old one (atomic)."""
    link = layout.current_link(app_dir)
    tmp = os.path.join(app_dir, layout.current_tmp_name(os.getpid()))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(layout.current_target(rid), tmp)
    os.rename(tmp, link)


def safe_extract(archive, dest):
    """Extract regular files and directories only, each inside ``dest`` (this Python may predate
    tarfile's extraction filters): no links, devices, absolute paths or ``..``."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            path = os.path.normpath(os.path.join(dest, member.name))
            if not path.startswith(dest + os.sep) or not (member.isfile() or member.isdir()):
                raise RuntimeError("archive member %r is not a plain file inside the release; refusing the archive" % member.name)
            if member.isdir():
                if not os.path.isdir(path):
                    os.makedirs(path, 0o755)
                continue
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                os.makedirs(parent, 0o755)
            source = tar.extractfile(member)
            with open(path, "wb") as handle:
                shutil.copyfileobj(source, handle)
            os.chmod(path, 0o755 if member.mode & 0o111 else 0o644)


def install(module, app_dir, rid, archive):
    releases_dir = layout.releases_dir(app_dir)
    final = os.path.join(releases_dir, rid)
    if os.path.lexists(final):
        # an incomplete directory under the final name (made by hand or by an old tool): keep it aside
        aside = os.path.join(releases_dir, layout.aside_name(rid, int(time.time())))
        os.rename(final, aside)
    tmp = os.path.join(releases_dir, layout.staging_name(rid))
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp, 0o755)
    try:
        safe_extract(archive, tmp)
        for name, target in module.params["shared"].items():
            path = os.path.join(tmp, name)
            if os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            os.symlink(target, path)
        cmd = module.params["npm_command"]
        if cmd:
            proc = subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=900)
            if proc.returncode != 0:
                tail = one_line(proc.stderr or proc.stdout, pick=3)
                raise RuntimeError("%s failed in the new release (exit %d): %s" % (" ".join(cmd), proc.returncode,
                                                                                   redact_text(tail)))
        with open(layout.built_marker(tmp), "w") as handle:
            handle.write(rid + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ENV_PREVIOUS = ".previous"  # shared/.env.previous: the file as it was before the last env change


def adoption(src, app_dir, env_path, take_env):
    """What a takeover of the hand-deployed directory ``src`` copies: (env text or None, [(name,
    size)] of the log files ``<app_dir>/logs`` lacks). Raises ValueError with a cause; fix line."""
    if not os.path.isdir(src):
        raise ValueError("adopt_from %s is not a directory; pass the directory the app runs from" % src)
    env = None
    if take_env and not os.path.exists(env_path) and os.path.isfile(os.path.join(src, layout.ENV_FILE)):
        with open(os.path.join(src, layout.ENV_FILE)) as handle:
            env = handle.read()
    logs, have = [], os.path.join(app_dir, layout.LOGS_DIR)
    old = os.path.join(src, layout.LOGS_DIR)
    if os.path.isdir(old):
        for name in sorted(os.listdir(old)):
            path = os.path.join(old, name)
            if os.path.isfile(path) and not os.path.islink(path) and not os.path.exists(os.path.join(have, name)):
                logs.append((name, os.path.getsize(path)))
    return env, logs


def adopt(guard, src, app_dir, env_path, env, logs):
    """Copy the hand-deployed app's environment and logs in: the logs copied first under temporary
    names (no lock needed: nothing reads them), then everything put in place and journaled while the
    run holds the deploy lock. A log keeps its own mode when that is narrower than 0640."""
    needed = sum(size for _, size in logs)
    dest = os.path.join(app_dir, layout.LOGS_DIR)
    st = os.statvfs(dest)
    if needed and needed + 16 * 1024 * 1024 > st.f_bavail * st.f_frsize:
        raise ValueError("the old logs in %s/%s take %d MiB and %s has %d MiB free; free space there or move the "
                         "old logs elsewhere first" % (src, layout.LOGS_DIR, needed // 1048576, dest,
                                                       st.f_bavail * st.f_frsize // 1048576))
    copied = []
    try:
        for name, _ in logs:
            old = os.path.join(src, layout.LOGS_DIR, name)
            tmp = os.path.join(dest, ".%s.adopt" % name)
            shutil.copy2(old, tmp)
            os.chmod(tmp, stat.S_IMODE(os.stat(old).st_mode) & 0o640)
            copied.append((tmp, os.path.join(dest, name)))
        with guard.hold():
            if env is not None:
                atomic_write(env_path, env, 0o600)
            for tmp, final in copied:
                os.rename(tmp, final)
            copied = []
            guard.record("adopted", path=src, env=env is not None, logs=[name for name, _ in logs])
    finally:
        for tmp, _ in copied:  # not put in place (a failure, or the run stopped)
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_env(path, text):
    """Write ``text`` to ``path`` (0600) atomically; True when it changed."""
    try:
        with open(path) as handle:
            if handle.read() == text:
                return False
    except (IOError, OSError):
        pass
    atomic_write(path, text, 0o600)
    return True


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app_dir=dict(type="path", required=True),
            release=dict(type="str", required=True),
            archive=dict(type="path"),
            shared=dict(type="dict", default=dict(layout.SHARED_LINKS)),
            npm_command=dict(type="list", elements="str",
                             default=["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"]),
            keep=dict(type="int", default=5),
            state=dict(type="str", default="present", choices=["present", "switched"]),
            env=dict(type="dict", no_log=True),
            env_content=dict(type="str", no_log=True),
            restore_env=dict(type="bool", default=False),
            adopt_from=dict(type="path"),
        ),
        mutually_exclusive=[("env", "env_content")],
        supports_check_mode=True,
    )
    p = module.params
    app_dir, rid = p["app_dir"], p["release"]
    releases_dir = layout.releases_dir(app_dir)
    if not _ID.match(rid):
        module.fail_json(msg="release id %r is not a plain directory name; pass the id slipway printed (e.g. r311a8fb8289c)" % rid)
    if p["keep"] < 2:
        module.fail_json(msg="keep=%d would delete the previous release; use keep >= 2" % p["keep"])
    if not os.path.isdir(app_dir):
        module.fail_json(msg="app_dir %s does not exist; create it (with releases/, shared/.env and logs/) first" % app_dir)

    previous = current_release(app_dir)
    have = installed(releases_dir, rid)
    result = dict(changed=False, release=rid, previous=previous, installed=False, switched=False, pruned=[],
                  env_changed=False, env_restored=False, env_removed=[])
    env_path = os.path.join(app_dir, layout.SHARED_DIR, layout.ENV_FILE)
    wanted = p["env"] is not None or p["env_content"] is not None
    if wanted:
        try:
            text = env_text(p["env"]) if p["env"] is not None else p["env_content"]
        except ValueError as exc:
            module.fail_json(msg=str(exc), **result)
        try:
            with open(env_path) as handle:
                before = handle.read()
            result["env_changed"] = before != text
            result["env_removed"] = sorted(env_keys(before) - env_keys(text))
        except (IOError, OSError):
            result["env_changed"] = True
    adopt_env, adopt_logs = None, []
    if p["adopt_from"]:
        try:
            adopt_env, adopt_logs = adoption(p["adopt_from"], app_dir, env_path, not wanted)
        except (ValueError, OSError) as exc:
            module.fail_json(msg="taking over %s: %s" % (p["adopt_from"], exc), **result)
        result["adopted"] = {"from": p["adopt_from"], "env": adopt_env is not None,
                             "logs": [name for name, _ in adopt_logs], "bytes": sum(size for _, size in adopt_logs)}

    if p["state"] == "switched":
        if not have:
            module.fail_json(msg="release %s is not installed in %s; installed: %s" % (
                rid, releases_dir, ", ".join(installed_releases(releases_dir)) or "none"), **result)
    elif not have:
        if not module.check_mode and not (p["archive"] and os.path.isfile(p["archive"])):
            module.fail_json(msg="release %s is not installed and its archive %s is missing; ship the archive first" % (
                rid, p["archive"]), **result)
        result["installed"] = True
    if previous != rid:
        result["switched"] = True

    if not module.check_mode:
        guard = runguard.from_env()  # inactive outside a deploy run
        try:
            guard.start()
            for sub, mode in layout.APP_DIRS:
                path = os.path.join(app_dir, sub)
                if not os.path.isdir(path):
                    os.mkdir(path, mode)
            if adopt_env is not None or adopt_logs:
                adopt(guard, p["adopt_from"], app_dir, env_path, adopt_env, adopt_logs)
            if result["installed"]:
                install(module, app_dir, rid, p["archive"])
            # the environment after the install (a failed install leaves it as it was), before the switch
            if result["env_changed"]:
                with guard.hold():  # the app's environment changes only while the run holds the deploy lock
                    if os.path.isfile(env_path):  # kept for a rescue (restore_env)
                        with open(env_path) as handle:
                            atomic_write(env_path + ENV_PREVIOUS, handle.read(), 0o600)
                    write_env(env_path, text)
                    guard.record("env", path=env_path)
            if p["restore_env"] and os.path.isfile(env_path + ENV_PREVIOUS):
                with guard.hold():
                    os.rename(env_path + ENV_PREVIOUS, env_path)
                    guard.record("env", path=env_path, restored=True)
                result["env_restored"] = True
            if result["switched"]:
                # the switch happens, and is journaled, only while the run holds the deploy lock
                with guard.hold():
                    switch(app_dir, rid)
                    guard.record("switched", release=rid, previous=previous)
            if p["archive"] and os.path.isfile(p["archive"]) and installed(releases_dir, rid):
                os.unlink(p["archive"])
        except (runguard.RunStopped, runguard.LockLost) as exc:
            now = current_release(app_dir)
            module.fail_json(msg="release %s: %s; current points at %s" % (
                rid, exc.args[0] if exc.args else "stopped", now), **dict(result, switched=now == rid != previous))
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            module.fail_json(msg="release %s: %s" % (rid, redact_text(str(exc))), **result)
        finally:
            guard.finish()

    # retention: newest `keep`, plus whatever current and previous point at
    listed = installed_releases(releases_dir)
    if result["installed"] and rid not in listed:
        listed.insert(0, rid)  # check mode: the release that would be installed
    protect = {rid, previous}
    keepers = [r for r in listed if r in protect]
    for name in listed:
        if len(keepers) >= p["keep"]:
            break
        if name not in keepers:
            keepers.append(name)
    doomed = [r for r in listed if r not in keepers]
    if not module.check_mode:
        for name in doomed:
            shutil.rmtree(os.path.join(releases_dir, name), ignore_errors=True)
        # leftovers of interrupted installs (never a complete release)
        for name in os.listdir(releases_dir):
            if layout.is_staging(name):
                shutil.rmtree(os.path.join(releases_dir, name), ignore_errors=True)
    result["pruned"] = doomed
    result["releases"] = [r for r in listed if r not in doomed]
    if p["restore_env"] and module.check_mode:
        result["env_restored"] = os.path.isfile(env_path + ENV_PREVIOUS)
    result["changed"] = bool(result["installed"] or result["switched"] or doomed or result["env_changed"]
                             or result["env_restored"] or adopt_env is not None or adopt_logs)
    if module._diff:
        result["diff"] = {"before": {"current": previous}, "after": {"current": rid}}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
