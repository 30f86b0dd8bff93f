# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Read-only views of a host's deploy state, shared by the modules that look without changing
anything (pg_drift, app_state): the release ``current`` points at and the one before, the deploy
records, the deploy lock, the app's error log and PM2's own log since a time, the last verified
backup. Nothing here writes, and nothing waits for a lock."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fcntl
import json
import os
import re
import time

from ansible_collections.slipway.core.plugins.module_utils import layout
from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_mapping, redact_text

LOG_BYTES = 1024 * 1024  # the tail of each app log read
LOG_LINES = 200  # lines kept per log
RECORD_KEYS = ("run_id", "finished", "release", "previous", "switched_from", "result", "failure", "backup",
               "migrations_applied", "rolled_back", "rolled_back_to", "stopped", "took_over")
LOCK_KEYS = ("run_id", "command", "started", "user", "controller", "host", "keeper_pid", "heartbeat")


def _lock_held_in_proc_locks(path):
    """Whether /proc/locks lists an exclusive flock on ``path`` (None when it cannot tell). Read
    there, not by trying the lock: a probe that holds even a shared lock for an instant can make a
    deploy starting at that instant (its keeper's ``flock -n``) fail as if another run held it."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as handle:
            text = handle.read()
    except OSError:
        return None
    device = "%02x:%02x" % (os.major(st.st_dev), os.minor(st.st_dev))
    other_device = False
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[3] != "WRITE":
            continue
        dev, _, inode = parts[5].rpartition(":")
        if inode != str(st.st_ino):
            continue
        if dev == device:
            return True
        other_device = True  # btrfs subvolumes, overlayfs: stat's device is not the one /proc/locks shows
    return None if other_device else False


def deploy_running(app_dir):
    """Whether a deploy holds the host's deploy lock now (its keeper holds the flock exclusively):
    `current` may be switched before its migrations run. Read from /proc/locks; where there is
    none, a shared lock tried without waiting and let go at once."""
    path = layout.lock_paths(app_dir)[1]
    if not os.path.exists(path):
        return False  # no lock file: no deploy ever ran here
    held = _lock_held_in_proc_locks(path)
    if held is not None:
        return held
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def json_objects(lines):
    """The JSON objects among ``lines`` (one per line, as deploys.jsonl, run journals and jsonlog
    keep them); a line that is not one is skipped."""
    out = []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def deploy_records(app_dir, last=None):
    """The records of finished deploys (deploys.jsonl), oldest first; ``last``: only so many."""
    try:
        with open(layout.deploys_file(app_dir)) as handle:
            records = json_objects(handle.read().splitlines())
    except OSError:
        return []
    return records[-last:] if last else records


def migrations_folder(app_dir, wanted=None):
    """The migrations folder of the release ``current`` points at, by its real path (a deploy
    switching ``current`` meanwhile cannot mix two releases' files): ``wanted``, else the one the
    host's last successful deploy of that release recorded (its slipway.yml), else ``drizzle``,
    else ``migrations``."""
    current = layout.current_link(app_dir)
    if not os.path.isdir(current):
        raise MigrationError("%s does not exist: nothing is deployed to check; deploy first (invoke deploy)" % current)
    current = os.path.realpath(current)
    release = os.path.basename(current)
    if not wanted:
        for record in reversed(deploy_records(app_dir)):
            if record.get("result") == "ok" and record.get("release") == release and isinstance(record.get("app"), dict):
                wanted = record["app"].get("migrations")
                break
    for name in ([wanted] if wanted else ["drizzle", "migrations"]):
        folder = os.path.join(current, name)
        if os.path.isfile(os.path.join(folder, "meta", "_journal.json")):
            return folder
    raise MigrationError("no drizzle migrations folder (meta/_journal.json) in release %s (looked for %s); set "
                         "migrations in the app's slipway.yml and deploy" % (release, wanted or "drizzle/, migrations/"))


def folder_content(folder):
    """{relative path: text} of the journal and every listed migration of a read folder (the
    controller builds a shadow from them, and names the migration that makes an object)."""
    content = {"meta/_journal.json": open(os.path.join(folder["folder"], "meta", "_journal.json")).read()}
    for mig in folder["migrations"]:
        with open(mig["file"]) as handle:
            content[mig["tag"] + ".sql"] = handle.read()
    return content


def releases(app_dir):
    """``{current, current_since, previous, installed}``: the release ``current`` points at and
    since when (the link's own mtime), the one before it (the last successful deploy's record,
    else the newest other installed release) and the installed releases, newest first."""
    link = layout.current_link(app_dir)
    out = {"current": None, "current_since": None, "previous": None, "installed": []}
    try:
        out["current"] = os.path.basename(os.readlink(link).rstrip("/"))
        out["current_since"] = os.lstat(link).st_mtime
    except OSError:
        pass
    base = layout.releases_dir(app_dir)
    try:
        names = [n for n in os.listdir(base) if not n.startswith(".")]
    except OSError:
        names = []
    installed = []
    for name in names:
        marker = layout.built_marker(os.path.join(base, name))
        try:
            installed.append((os.stat(marker).st_mtime, name))
        except OSError:
            continue
    out["installed"] = [n for _, n in sorted(installed, reverse=True)]
    for record in reversed(deploy_records(app_dir)):
        if record.get("result") == "ok" and record.get("release") == out["current"]:
            before = record.get("switched_from") or record.get("previous")
            if before and before != out["current"]:  # a deploy of the same release again switched nothing
                out["previous"] = before
                break
    if out["previous"] is None:
        others = [n for n in out["installed"] if n != out["current"]]
        out["previous"] = others[0] if others else None
    return out


def lock(app_dir):
    """``{held, meta}`` of the deploy lock (``meta``: the holder's run id, command, start; or
    what a run that ended without releasing left)."""
    _, _, meta_path = layout.lock_paths(app_dir)
    meta = None
    try:
        with open(meta_path) as handle:
            data = json.load(handle)
        if isinstance(data, dict):
            meta = redact_mapping({k: data[k] for k in LOCK_KEYS if k in data})
    except (OSError, ValueError):
        pass
    held = deploy_running(app_dir)
    return {"held": held, "meta": meta, "stale": bool(meta) and not held}


_PM2_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?:?\s")


def _line_time(line):
    m = _PM2_TIME.match(line)
    if not m:
        return None
    from ansible_collections.slipway.core.plugins.module_utils.pglog import parse_time

    zone = m.group(2) or ""
    return parse_time(m.group(1) + (" " + zone if zone else ""))


def read_since(path, since_epoch, known=(), match=None, keep=LOG_LINES):
    """See below; ``match``: a string or several (a line with any of them is kept)."""
    needles = None if match is None else (match,) if isinstance(match, str) else tuple(match)
    return _read_since(path, since_epoch, known, needles, keep)


def _read_since(path, since_epoch, known, needles, keep):
    """``{path, lines, timed}``: the lines of ``path`` written at or after ``since_epoch``, newest
    ``keep``, redacted. A line with no time of its own (a stack frame) goes with the line before;
    a file with no times at all counts when it was modified since then (its last lines).
    ``needles``: keep only lines containing one of them (and their untimed followers). Only a
    regular file is opened (a FIFO would block)."""
    import stat as stat_module

    from ansible_collections.slipway.core.plugins.module_utils.pglog import tail_lines
    from ansible_collections.slipway.core.plugins.module_utils.redact import scrub_user_data

    out = {"path": path, "lines": [], "times": [], "timed": False, "error": None}
    try:
        st = os.stat(path)
        if not stat_module.S_ISREG(st.st_mode):
            out["error"] = "%s: not a regular file" % path
            return out
        if since_epoch is not None and st.st_mtime < since_epoch:
            return out
        lines = tail_lines(path, LOG_BYTES)
    except OSError as exc:
        out["error"] = "%s: %s" % (path, exc.strerror or exc)
        return out
    def wanted(line):
        return needles is None or any(n in line for n in needles)

    keep_current = needles is None
    kept, times, when_last = [], [], None
    for line in lines:
        when = _line_time(line)
        if when is not None:
            out["timed"] = True
            when_last = when
            keep_current = (since_epoch is None or when >= since_epoch) and wanted(line)
        elif not out["timed"]:  # no time yet: the file's mtime said it was written since
            keep_current = wanted(line)
        if keep_current:
            kept.append(redact_text(scrub_user_data(line[:2000]), known=known))
            times.append(when_last)  # a line without a time of its own: the time of the line before it
    out["lines"] = kept[-keep:]
    out["times"] = times[-keep:]
    return out


def last_backup(backup_dir):
    """``{count, last}``: the verified backups the manifest lists (pg_backup adds an entry only
    after the dump was verified) and the newest of them."""
    from ansible_collections.slipway.core.plugins.module_utils.backup import read_manifest

    try:
        entries = read_manifest(backup_dir) or []
    except Exception as exc:  # noqa: BLE001 - an unreadable manifest is reported, not raised
        return {"count": None, "last": None, "error": redact_text(str(exc))[:300]}
    entries = [e for e in entries if isinstance(e, dict)]
    entries.sort(key=lambda e: str(e.get("created") or ""))
    last = entries[-1] if entries else None
    if last is not None:
        last = {k: last.get(k) for k in ("id", "created", "size", "release", "reason", "db")}
    return {"count": len(entries), "last": last, "error": None}


def env_file_values(path):
    """``{KEY: value}`` of a dotenv file (simple KEY=value lines, quotes taken off); {} if unreadable."""
    values = {}
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[7:].strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
            value = value[1:-1]
        values[key] = value
    return values


def now():
    return time.time()
