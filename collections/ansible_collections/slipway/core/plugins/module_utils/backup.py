# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Backup directory bookkeeping shared by the pg_backup module and the controller (stdlib only).

A backup dir holds ``<id>.dump`` files (0600) and ``manifest.json`` (0600): a JSON list of entries
``{id, file, host, db, release, reason, created, size, sha256, toc_entries}``. Only files named by
the manifest are ever deleted (retention); anything else in the dir is left alone.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import errno
import fcntl
import hashlib
import json
import os
import re

from ansible_collections.slipway.core.plugins.module_utils.files import atomic_write

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
SUFFIX = ".dump"
PARTIAL = ".partial"
MARGIN = 64 * 1024 * 1024  # free space a backup needs beyond the database's size

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")
_ID = re.compile(r"^[A-Za-z0-9.-]+_[A-Za-z0-9.-]+_[0-9]{8}T[0-9]{6}Z_[A-Za-z0-9.-]+$")


class BackupError(Exception):
    """A one-line failure naming the cause and the fix."""


def sanitize(part):
    """``part`` reduced to [A-Za-z0-9.-] (other runs become ``-``); never empty, never dots only."""
    out = _UNSAFE.sub("-", str(part or "")).strip("-")
    if not out.strip("."):
        out = "x"
    return out


def utc_stamp(now=None):
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def iso(now):
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_id(host, db, release, now):
    """``<host>_<db>_<UTC YYYYmmddTHHMMSSZ>_<release>``; each part sanitised, so ``_`` only separates."""
    return "_".join((sanitize(host), sanitize(db), utc_stamp(now), sanitize(release)))


def valid_id(backup_id):
    return bool(_ID.match(str(backup_id or "")))


def parse_id(backup_id):
    """``{host, db, stamp, release}`` of a well-formed id, else None."""
    if not valid_id(backup_id):
        return None
    host, db, stamp, release = backup_id.split("_")
    return {"host": host, "db": db, "stamp": stamp, "release": release}


def sha256_file(path, chunk=1024 * 1024):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def nearest_existing(path):
    """``path`` or its nearest existing parent (for statvfs before the dir exists)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(path):
    st = os.statvfs(nearest_existing(path))
    return st.f_bavail * st.f_frsize


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path):
    """Create the backup dir (0700) when missing; tighten an existing one to 0700. True if changed."""
    changed = False
    if not os.path.isdir(path):
        if os.path.lexists(path):
            raise BackupError("backup_dir %s exists and is not a directory; point backup_dir elsewhere or remove it" % path)
        os.makedirs(path, 0o700)
        changed = True
    if os.stat(path).st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
        changed = True
    return changed


def manifest_path(backup_dir):
    return os.path.join(backup_dir, MANIFEST)


def read_manifest(backup_dir, required=False):
    """The manifest's entries (a list). Missing: [] (or BackupError when ``required``)."""
    path = manifest_path(backup_dir)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except IOError as exc:
        if exc.errno != errno.ENOENT:
            raise BackupError("cannot read %s: %s; check the file's owner and mode (0600, the deploy user)" % (path, exc.strerror))
        if required:
            raise BackupError("no backup manifest at %s: no backups were taken in this dir; take one first (invoke backup)" % path)
        return []
    except ValueError as exc:
        raise BackupError("%s is not valid JSON (%s); restore it from a copy or move it aside (dump files stay usable)" % (path, exc))
    if isinstance(data, dict):  # tolerate a wrapped form
        data = data.get("backups")
    if not isinstance(data, list) or not all(isinstance(e, dict) and e.get("id") and e.get("file") for e in data):
        raise BackupError("%s is not a list of backup entries with id and file; restore it from a copy or move it aside" % path)
    return data


def write_manifest(backup_dir, entries):
    """Atomic replace (temp file 0600 in the same dir, fsync, rename, fsync dir)."""
    path = manifest_path(backup_dir)
    atomic_write(path, json.dumps(entries, indent=2, sort_keys=True) + "\n", 0o600, tmp=path + PARTIAL)
    fsync_dir(backup_dir)


class ManifestLock(object):
    """An exclusive flock on ``<backup_dir>/.manifest.lock`` around read-modify-write of the manifest."""

    def __init__(self, backup_dir):
        self.path = os.path.join(backup_dir, LOCK)
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        return False


def entry_path(backup_dir, entry):
    """The dump file of a manifest entry; refuses names that are not a plain ``*.dump`` in the dir."""
    name = str(entry.get("file", ""))
    if not name.endswith(SUFFIX) or os.path.basename(name) != name or name.startswith("."):
        raise BackupError("manifest entry %s names file %r, not a .dump file in %s; fix manifest.json"
                          % (entry.get("id"), name, backup_dir))
    return os.path.join(backup_dir, name)


def find_entry(entries, backup_id, backup_dir):
    for entry in entries:
        if entry.get("id") == backup_id:
            return entry
    newest = sorted(entries, key=lambda e: (e.get("created", ""), e.get("id", "")))[-3:]
    hint = ("newest: %s" % ", ".join(e["id"] for e in reversed(newest))) if newest else "it has no entries"
    raise BackupError("backup %s is not in %s (%s); pass one of the manifest's ids"
                      % (backup_id, manifest_path(backup_dir), hint))


def retention(entries, keep, protect=()):
    """Split ``entries`` into (kept, pruned): the newest ``keep`` by ``created`` stay, plus any id in
    ``protect`` (the backup just made, a backup being restored)."""
    ordered = sorted(entries, key=lambda e: (e.get("created", ""), e.get("id", "")), reverse=True)
    kept, pruned = [], []
    for index, entry in enumerate(ordered):
        (kept if index < keep or entry.get("id") in protect else pruned).append(entry)
    kept.reverse()
    return kept, pruned


def count_toc(listing):
    """TOC entries in ``pg_restore --list`` output (lines that are not ``;`` comments or blank)."""
    return sum(1 for line in listing.splitlines() if line.strip() and not line.lstrip().startswith(";"))
