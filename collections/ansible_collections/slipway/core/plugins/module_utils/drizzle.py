# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
"""Drizzle migrations, read and classified exactly as drizzle-orm's migrator sees them.

drizzle-orm (``migrator.js`` + ``pg-core/dialect.js``) reads ``meta/_journal.json``, and for each
entry reads ``<tag>.sql``, splits it on ``--> statement-breakpoint`` and hashes the whole file
(sha256 hex). It applies, in one transaction, every entry whose ``when`` is newer than the
``created_at`` of the newest row of ``drizzle.__drizzle_migrations`` and inserts (hash, when).
It never compares hashes. This module adds what drizzle misses:

* ``skipped``: an entry older than the newest row that was never applied; drizzle skips it silently.
* ``tampered``: a row whose hash matches no file while its created_at matches an entry's ``when``:
  that file was edited after it was applied.
* ``unknown`` rows: a hash and a created_at that match nothing in the folder.

Pure Python (no database access): the folder and the tracking rows go in, a classification out.
"""
from __future__ import absolute_import, annotations, division, print_function

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile

__metaclass__ = type

BREAKPOINT = "--> statement-breakpoint"
JOURNAL = os.path.join("meta", "_journal.json")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class MigrationError(Exception):
    """A one-line, user-facing problem with the migrations or the database history; ``plan`` is
    the plan document when one was made before the problem."""

    plan = None


def _utf8(path, raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MigrationError(
            "%s is not valid UTF-8 (byte 0x%02x at offset %d); save it as UTF-8" % (path, raw[exc.start], exc.start)
        )


def _when_text(when):
    try:
        return datetime.datetime.fromtimestamp(when / 1000.0, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError, TypeError):
        return str(when)


def read_folder(folder):
    """Read a drizzle migrations folder; returns ``{"folder", "journal", "version", "dialect",
    "migrations": [...], "warnings": [...]}`` or raises MigrationError naming the bad file.

    Each migration: idx, tag, when, breakpoints, file, hash (sha256 hex of the whole file, as
    drizzle computes it), statements (the file split on the breakpoint marker, verbatim)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise MigrationError("migrations folder %s does not exist; pass the folder that holds meta/_journal.json" % folder)
    journal_path = os.path.join(folder, JOURNAL)
    if not os.path.isfile(journal_path):
        raise MigrationError(
            "journal %s not found: %s is not a drizzle migrations folder; pass the folder drizzle-kit generates into"
            % (journal_path, folder)
        )
    with open(journal_path, "rb") as handle:
        text = _utf8(journal_path, handle.read())
    try:
        journal = json.loads(text)
    except ValueError as exc:
        raise MigrationError("journal %s is malformed JSON (%s); restore it from version control" % (journal_path, exc))
    if not isinstance(journal, dict) or not isinstance(journal.get("entries"), list):
        raise MigrationError('journal %s has no "entries" list; restore it from version control' % journal_path)
    dialect = journal.get("dialect", "postgresql")
    if dialect not in ("postgresql", "pg"):
        raise MigrationError("journal %s is for dialect %r; slipway migrates PostgreSQL only" % (journal_path, dialect))

    migrations = []
    seen_idx, seen_tag = {}, {}
    for pos, entry in enumerate(journal["entries"]):
        where = "journal %s, entry #%d" % (journal_path, pos + 1)
        if not isinstance(entry, dict):
            raise MigrationError("%s is not an object; restore the journal from version control" % where)
        tag, idx, when = entry.get("tag"), entry.get("idx"), entry.get("when")
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            raise MigrationError("%s has no valid \"tag\" (a file name without .sql); fix the journal" % where)
        where = "journal %s, entry %s" % (journal_path, tag)
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise MigrationError("%s has no integer \"idx\"; fix the journal" % where)
        if isinstance(when, bool) or not isinstance(when, int) or when <= 0:
            raise MigrationError("%s has no valid \"when\" (epoch milliseconds); fix the journal" % where)
        if idx in seen_idx:
            raise MigrationError("%s: idx %d is also used by %s; give every entry its own idx" % (where, idx, seen_idx[idx]))
        if tag in seen_tag:
            raise MigrationError("journal %s lists tag %s twice (idx %d and %d); remove one entry" % (journal_path, tag, seen_tag[tag], idx))
        seen_idx[idx], seen_tag[tag] = tag, idx
        path = os.path.join(folder, tag + ".sql")
        if not os.path.isfile(path):
            raise MigrationError(
                "%s not found: the journal lists it (idx %d) but the file is missing; restore it or remove the entry"
                % (path, idx)
            )
        with open(path, "rb") as handle:
            raw = handle.read()
        sql = _utf8(path, raw)
        migrations.append({
            "idx": idx,
            "tag": tag,
            "when": when,
            "breakpoints": bool(entry.get("breakpoints", True)),
            "file": path,
            "hash": hashlib.sha256(raw).hexdigest(),
            "statements": sql.split(BREAKPOINT),
        })

    # drizzle's migrator reads only what the journal lists: a stray .sql is ignored there, and here
    listed = set(seen_tag)
    warnings = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".sql") and name[:-4] not in listed and os.path.isfile(os.path.join(folder, name)):
            warnings.append(
                "%s is not in the journal: drizzle's migrator never runs it, and neither does slipway; "
                "add it with drizzle-kit if it is meant to run, or move it out of the folder" % os.path.join(folder, name)
            )

    newest = None
    for mig in migrations:
        if newest is not None and mig["when"] <= newest["when"]:
            warnings.append(
                "%s (when %s) is not newer than %s (when %s) listed before it: on a database that has %s, "
                "drizzle's migrator skips %s silently" % (
                    mig["tag"], _when_text(mig["when"]), newest["tag"], _when_text(newest["when"]),
                    newest["tag"], mig["tag"])
            )
        if newest is None or mig["when"] > newest["when"]:
            newest = mig
    return {
        "folder": folder,
        "journal": journal_path,
        "version": journal.get("version"),
        "dialect": dialect,
        "migrations": migrations,
        "warnings": warnings,
    }


def write_folder(top, content):
    """Write ``{relative path: text}`` under ``top`` (paths must stay inside it); returns ``top``/migrations."""
    root = os.path.join(top, "migrations")
    for rel, text in content.items():
        path = os.path.normpath(os.path.join(root, rel))
        if not path.startswith(root + os.sep) or not (rel == "meta/_journal.json" or rel.endswith(".sql")):
            raise MigrationError("migrations_content key %r is not meta/_journal.json or <tag>.sql inside the folder" % rel)
        if not os.path.isdir(os.path.dirname(path)):
            os.makedirs(os.path.dirname(path), 0o700)
        with open(path, "w") as handle:
            handle.write(text)
    return root


@contextlib.contextmanager
def folder_from_content(content):
    """read_folder of ``content`` (``{relative path: text}``) written to a private temporary folder,
    removed when the block ends."""
    tmpdir = tempfile.mkdtemp(prefix="slipway-migrations-")
    try:
        yield read_folder(write_folder(tmpdir, content))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def drizzle_would_apply(migrations, rows):
    """Tags drizzle-orm's migrator would run now: entries newer than the newest row by created_at
    (``ORDER BY created_at DESC LIMIT 1``: NULLs sort first there, and Number(null) is 0)."""
    if not rows:
        return [m["tag"] for m in migrations]
    with_null = [r for r in rows if r["created_at"] is None]
    newest = 0 if with_null else max(int(r["created_at"]) for r in rows)
    return [m["tag"] for m in migrations if newest < m["when"]]


def classify(migrations, rows):
    """Classify every migration against the tracking rows (dicts id, hash, created_at).

    Returns ``{"migrations": [{tag, status, row_id, ...}], "unknown_rows": [...], "warnings": [...],
    "drizzle_would_apply": [...]}``; status is applied, pending, skipped or tampered."""
    rows = sorted(rows, key=lambda r: r["id"])
    unmatched = list(rows)
    match = {}
    # rows match files by hash; when one hash belongs to several files (identical SQL), prefer
    # the row whose created_at is the entry's `when`
    for exact in (True, False):
        for mig in migrations:
            if mig["tag"] in match:
                continue
            for row in unmatched:
                if row["hash"] == mig["hash"] and (not exact or row["created_at"] == mig["when"]):
                    match[mig["tag"]] = row
                    unmatched.remove(row)
                    break

    would = set(drizzle_would_apply(migrations, rows))
    out, warnings = [], []
    for mig in migrations:
        item = {k: mig[k] for k in ("idx", "tag", "when", "hash", "file")}
        item["statements"] = len(mig["statements"])
        row = match.get(mig["tag"])
        if row is not None:
            item.update(status="applied", row_id=row["id"], applied_when=row["created_at"])
            if mig["tag"] in would:
                warnings.append(
                    "%s is applied (row id %d) but its journal when %d is newer than every row: drizzle's migrator "
                    "would run it again; restore its original when (%s)" % (mig["tag"], row["id"], mig["when"], row["created_at"])
                )
        elif mig["tag"] in would:
            item.update(status="pending", row_id=None)
        else:
            edited = next((r for r in unmatched if r["created_at"] == mig["when"]), None)
            if edited is not None:
                unmatched.remove(edited)
                item.update(status="tampered", row_id=edited["id"], applied_hash=edited["hash"])
            else:
                item.update(status="skipped", row_id=None)
        out.append(item)
    unknown = [{"id": r["id"], "hash": r["hash"], "created_at": r["created_at"]} for r in unmatched]
    return {
        "migrations": out,
        "unknown_rows": unknown,
        "warnings": warnings,
        "drizzle_would_apply": [m["tag"] for m in migrations if m["tag"] in would],
    }


def counts(classified):
    result = {"applied": 0, "pending": 0, "skipped": 0, "tampered": 0}
    for mig in classified["migrations"]:
        result[mig["status"]] += 1
    result["unknown_rows"] = len(classified["unknown_rows"])
    return result
