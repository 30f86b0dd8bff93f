#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: slipway developers
# MIT License
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pg_backup
short_description: Verified PostgreSQL backups (pg_dump -Fc) with a manifest and retention, and restore
version_added: "0.3.0"
description:
  - C(plan) reads the database's size and the free space of I(backup_dir)'s filesystem (read-only).
  - C(create) dumps the database with C(pg_dump -Fc) to a C(.partial) file (0600) in I(backup_dir)
    (0700), verifies it with C(pg_restore --list), fsyncs and renames it to
    C(<host_label>_<db>_<UTC stamp>_<release>.dump), records it in C(manifest.json) (0600, atomic
    replace) and keeps the newest I(keep) manifest entries, deleting the files of older entries only.
    A failed dump or verification leaves no file behind and the manifest unchanged.
  - C(list) returns the manifest's entries and whether each file is present with the recorded size.
  - C(restore) checks the backup's sha256 against the manifest and its archive with C(pg_restore --list),
    takes a safety backup (reason C(pre-restore)) unless I(safety_backup=false), then restores with
    C(pg_restore --clean --if-exists --single-transaction --exit-on-error --no-owner --no-privileges),
    so a failure changes nothing.
  - Runs the C(psql), C(pg_dump) and C(pg_restore) client programs; the password reaches them only
    through the child's environment (C(PGPASSWORD)), with C(--no-password).
options:
  action:
    description: What to do.
    type: str
    choices: [plan, create, list, restore]
    default: create
  backup_dir:
    description: Directory of the dump files and C(manifest.json); created with mode 0700 by C(create).
    type: path
    required: true
  host_label:
    description: The host's name in backup ids (the inventory hostname). Required by C(create) and by
      C(restore) with a safety backup.
    type: str
  release:
    description: Release id recorded in the backup's name and manifest entry.
    type: str
    default: none
  reason:
    description: Why the backup was taken (C(deploy), C(manual), ...); C(restore)'s safety backup uses C(pre-restore).
    type: str
    default: deploy
  keep:
    description: Manifest entries to keep after a backup (the newest by creation time); at least 1.
    type: int
    default: 7
  backup_id:
    description: The backup to restore (an id from the manifest).
    type: str
  safety_backup:
    description: Take a backup of the current database before restoring.
    type: bool
    default: true
  pg_bin_dir:
    description: Directory holding C(psql), C(pg_dump) and C(pg_restore); default is the PATH.
    type: path
extends_documentation_fragment:
  - slipway.core.postgres
author:
  - slipway developers
notes:
  - Supports check mode. C(create) returns the would-be path and writes nothing; C(restore) validates
    the backup (manifest, sha256, archive) and the connection, and predicts C(changed=true).
  - Supports diff mode for C(create) (manifest ids before/after).
  - C(--clean) drops and recreates the objects the dump holds; objects created after the backup that
    the dump does not hold stay.
  - The restore target is never pruned by the safety backup's retention (the manifest may then hold
    I(keep)+1 entries until the next backup).
"""

EXAMPLES = r"""
- name: Check the space a backup needs
  slipway.core.pg_backup:
    action: plan
    backup_dir: /srv/backups
    login_host: 127.0.0.1
    login_user: booksuser
    login_password: "{{ vault_db_password }}"
    login_db: booksdb
  register: backup_plan

- name: Back up the database before migrating
  slipway.core.pg_backup:
    backup_dir: /srv/backups
    login_host: 127.0.0.1
    login_user: booksuser
    login_password: "{{ vault_db_password }}"
    login_db: booksdb
    host_label: "{{ inventory_hostname }}"
    release: r0123456789ab
    keep: 7
  register: backup

- name: Restore a backup (a safety backup is taken first)
  slipway.core.pg_backup:
    action: restore
    backup_id: prod-1_booksdb_20260101T120000Z_r0123456789ab
    backup_dir: /srv/backups
    login_host: 127.0.0.1
    login_user: booksuser
    login_password: "{{ vault_db_password }}"
    login_db: booksdb
    host_label: "{{ inventory_hostname }}"
"""

RETURN = r"""
db_size:
  description: C(pg_database_size) of the database in bytes.
  returned: action=plan
  type: int
free_bytes:
  description: Free bytes (for unprivileged users) of I(backup_dir)'s filesystem.
  returned: action=plan, action=create
  type: int
enough:
  description: Whether I(free_bytes) >= I(db_size) + I(margin).
  returned: action=plan
  type: bool
margin:
  description: Bytes required beyond I(db_size) (64 MiB).
  returned: action=plan
  type: int
backup_dir:
  description: The backup directory.
  returned: always
  type: str
backup:
  description: The backup made (id, path, file, size, sha256, toc_entries, created, host, db, release,
    reason); in check mode id, path and created only.
  returned: action=create
  type: dict
pruned:
  description: Ids whose files retention deleted.
  returned: action=create, action=restore
  type: list
  elements: str
backups:
  description: Manifest entries, each with C(exists) and C(size_ok).
  returned: action=list
  type: list
  elements: dict
restored:
  description: Id of the backup restored (in check mode, the one that would be).
  returned: action=restore
  type: str
safety_backup:
  description: Id of the safety backup taken before the restore (null when none, or in check mode).
  returned: action=restore
  type: str
"""

import datetime
import os
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.slipway.core.plugins.module_utils import backup as bk
from ansible_collections.slipway.core.plugins.module_utils import postgres, runguard
from ansible_collections.slipway.core.plugins.module_utils.oneline import one_line
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text


class Pg(object):
    """The PostgreSQL client programs with one connection's arguments; secrets only in the child env."""

    def __init__(self, module):
        self.module = module
        p = module.params
        self.params = p
        self.secrets = postgres.secrets(p)
        self.env = postgres.client_env(p, base=os.environ)
        self.env.setdefault("LC_ALL", "C")
        self.bin_dir = p["pg_bin_dir"]

    def program(self, name):
        if self.bin_dir:
            path = os.path.join(self.bin_dir, name)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise bk.BackupError("%s not found in pg_bin_dir %s; point pg_bin_dir at the PostgreSQL client's bin dir" % (name, self.bin_dir))
            return path
        path = self.module.get_bin_path(name)
        if not path:
            raise bk.BackupError("%s not found on PATH; install the PostgreSQL client (postgresql-client) or set pg_bin_dir" % name)
        return path

    def argv(self, name, options=(), tail=()):
        """``name``'s command line connecting to the database (never prompting for a password)."""
        return postgres.client_argv(self.program(name), self.params, options, tail, no_password=True)

    def run(self, argv, what, stdout=subprocess.PIPE):
        proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env)
        try:
            out, err = proc.communicate()
        except BaseException:  # stopped (the deploy run ended): the client program goes too
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            cause = one_line(redact_text(err.decode("utf-8", "replace"), known=self.secrets), pick="error",
                             default="exited without a message")
            raise bk.BackupError("%s failed: %s" % (what, cause))
        return out.decode("utf-8", "replace") if out is not None else ""

    def db_size(self):
        out = self.run(self.argv("psql", ["-X", "-A", "-t", "-q"], ["-c", "SELECT pg_database_size(current_database())"]),
                       "psql (database size)")
        try:
            return int(out.strip())
        except ValueError:
            raise bk.BackupError("psql returned %r for the database size; check login_db and the server" % out.strip()[:80])

    def dump(self, fd):
        self.run(self.argv("pg_dump", ["-Fc"]), "pg_dump", stdout=fd)

    def user_objects(self):
        """How many objects of its own the database holds (relations, types, functions, schemas
        and extensions outside PostgreSQL's own): 0 for a database nothing was deployed to yet."""
        sql = ("SELECT (SELECT count(*) FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public')"
               " AND nspname NOT LIKE 'pg\\_%') + (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
               " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%')"
               " + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
               " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))"
               " + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql')")
        out = self.run(self.argv("psql", ["-X", "-A", "-t", "-q"], ["-c", sql]), "psql (objects in the database)")
        try:
            return int(out.strip())
        except ValueError:
            raise bk.BackupError("psql returned %r for the object count; check login_db and the server" % out.strip()[:80])

    def toc_entries(self, path, of_database=False):
        """Entries ``pg_restore --list`` reads in the dump at ``path``. A dump of no entries is
        valid only as the dump just taken (``of_database``) of a database with no objects of its
        own (counted then), e.g. before an app's first deploy."""
        listing = self.run([self.program("pg_restore"), "--list", path],
                           "pg_restore --list (verify %s)" % os.path.basename(path))
        count = bk.count_toc(listing)
        if count <= 0 and not (of_database and self.user_objects() == 0):
            raise bk.BackupError("pg_restore --list found no entries in %s; the dump is empty or damaged" % os.path.basename(path))
        return count

    def restore(self, path):
        self.run(self.argv("pg_restore", ["--clean", "--if-exists", "--single-transaction", "--exit-on-error",
                                          "--no-owner", "--no-privileges"], [path]), "pg_restore")


GUARD = runguard.Guard(None, None)  # the deploy run's guard, set in main(); inactive outside a run
KEPT = []  # backups this module run kept (for an honest message when it is stopped afterwards)


def require(module, *names):
    missing = [n for n in names if module.params.get(n) in (None, "")]
    if missing:
        raise bk.BackupError("action=%s needs %s; set %s" % (module.params["action"], ", ".join(missing),
                                                              " and ".join(missing)))


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def new_id(module, entries):
    """A fresh id: the next second when this second's name is taken (in the manifest or on disk)."""
    p = module.params
    taken = {e["id"] for e in entries}
    for _ in range(5):
        now = now_utc()
        backup_id = bk.make_id(p["host_label"], p["login_db"], p["release"], now)
        if backup_id not in taken and not os.path.lexists(os.path.join(p["backup_dir"], backup_id + bk.SUFFIX)):
            return backup_id, now
        time.sleep(1.0 - datetime.datetime.now().microsecond / 1e6 + 0.01)
    raise bk.BackupError("no free backup name for %s in %s; retry in a second" % (p["host_label"], p["backup_dir"]))


def create(module, pg, reason, protect=()):
    """Dump, verify, fsync, rename, record, prune. Returns (entry, pruned_ids)."""
    p = module.params
    backup_dir = p["backup_dir"]
    bk.ensure_dir(backup_dir)
    with bk.ManifestLock(backup_dir):
        entries = bk.read_manifest(backup_dir)
        backup_id, now = new_id(module, entries)
        name = backup_id + bk.SUFFIX
        final = os.path.join(backup_dir, name)
        partial = final + bk.PARTIAL
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                pg.dump(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            toc = pg.toc_entries(partial, of_database=True)
            digest = bk.sha256_file(partial)
            os.chmod(partial, 0o600)
            # a deploy run's backup is kept (renamed, listed, journaled) only while the run holds its lock
            with GUARD.hold():
                os.rename(partial, final)
                bk.fsync_dir(backup_dir)
                entry = dict(id=backup_id, file=name, host=p["host_label"], db=p["login_db"],
                             release=p["release"], reason=reason, created=bk.iso(now), size=os.path.getsize(final),
                             sha256=digest, toc_entries=toc)
                kept, pruned = bk.retention(entries + [entry], p["keep"], protect=set(protect) | {backup_id})
                bk.write_manifest(backup_dir, kept)
                GUARD.record("backup", id=backup_id, path=final, size=entry["size"], sha256=digest,
                             toc_entries=toc, created=entry["created"], reason=reason)
                KEPT.append(final)
        except BaseException:
            if os.path.lexists(partial):
                os.unlink(partial)
            raise
        for old in pruned:  # after the manifest no longer names them; a failed unlink leaves a file, never a lie
            try:
                path = bk.entry_path(backup_dir, old)
                if os.path.isfile(path) and not os.path.islink(path):
                    os.unlink(path)
            except (OSError, bk.BackupError) as exc:
                module.warn("retention could not delete %s: %s" % (old.get("file"), exc))
    return dict(entry, path=final), [e["id"] for e in pruned], [e["id"] for e in entries]


def action_plan(module, pg):
    size = pg.db_size()
    free = bk.free_bytes(module.params["backup_dir"])
    return dict(changed=False, db_size=size, free_bytes=free, enough=free >= size + bk.MARGIN,
                margin=bk.MARGIN, backup_dir=module.params["backup_dir"])


def action_create(module, pg):
    p = module.params
    require(module, "host_label", "login_db")
    if module.check_mode:
        pg.db_size()  # the connection works: predict honestly
        entries = bk.read_manifest(p["backup_dir"]) if os.path.isdir(p["backup_dir"]) else []
        backup_id, now = new_id(module, entries)
        return dict(changed=True, backup=dict(id=backup_id, path=os.path.join(p["backup_dir"], backup_id + bk.SUFFIX),
                                              created=bk.iso(now)),
                    pruned=[], free_bytes=bk.free_bytes(p["backup_dir"]), backup_dir=p["backup_dir"])
    entry, pruned, before = create(module, pg, p["reason"])
    result = dict(changed=True, backup=entry, pruned=pruned, free_bytes=bk.free_bytes(p["backup_dir"]),
                  backup_dir=p["backup_dir"])
    if module._diff:
        after = [i for i in before if i not in pruned] + [entry["id"]]
        result["diff"] = dict(before={"backups": before}, after={"backups": after})
    return result


def action_list(module):
    backup_dir = module.params["backup_dir"]
    out = []
    for entry in bk.read_manifest(backup_dir):
        path = bk.entry_path(backup_dir, entry)
        exists = os.path.isfile(path)
        out.append(dict(entry, path=path, exists=exists, size_ok=exists and os.path.getsize(path) == entry.get("size")))
    return dict(changed=False, backups=out, backup_dir=backup_dir,
                manifest_exists=os.path.exists(bk.manifest_path(backup_dir)))


def action_restore(module, pg):
    p = module.params
    require(module, "backup_id", "login_db")
    if p["safety_backup"]:
        require(module, "host_label")
    backup_dir = p["backup_dir"]
    entry = bk.find_entry(bk.read_manifest(backup_dir, required=True), p["backup_id"], backup_dir)
    path = bk.entry_path(backup_dir, entry)
    if not os.path.isfile(path):
        raise bk.BackupError("backup file %s of %s is missing; pick another backup id" % (path, entry["id"]))
    digest = bk.sha256_file(path)
    if digest != entry.get("sha256"):
        raise bk.BackupError("backup %s does not match its manifest sha256 (file changed or damaged); "
                             "pick another backup id" % entry["id"])
    pg.toc_entries(path)
    pg.db_size()  # the connection works before anything happens
    result = dict(changed=True, restored=entry["id"], safety_backup=None, pruned=[], backup_dir=backup_dir)
    if module.check_mode:
        return result
    if p["safety_backup"]:
        safety, pruned, _ = create(module, pg, "pre-restore", protect=[entry["id"]])
        result.update(safety_backup=safety["id"], pruned=pruned)
    try:
        pg.restore(path)
    except bk.BackupError as exc:
        where = (" (safety backup %s)" % result["safety_backup"]) if result["safety_backup"] else ""
        raise bk.BackupError("%s; the restore ran in one transaction, the database is unchanged%s" % (exc, where))
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            action=dict(type="str", default="create", choices=["plan", "create", "list", "restore"]),
            backup_dir=dict(type="path", required=True),
            **postgres.postgres_argument_spec(),
            host_label=dict(type="str"),
            release=dict(type="str", default="none"),
            reason=dict(type="str", default="deploy"),
            keep=dict(type="int", default=7),
            backup_id=dict(type="str"),
            safety_backup=dict(type="bool", default=True),
            pg_bin_dir=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    pg = Pg(module)

    def fail(msg):
        line = one_line(redact_text(str(msg), known=pg.secrets))
        module.fail_json(msg=line, changed=False, backup_dir=p["backup_dir"])

    global GUARD
    try:
        if p["action"] in ("create", "restore") and not module.check_mode:
            GUARD = runguard.from_env().start()
        if p["keep"] < 1:
            raise bk.BackupError("keep must be at least 1 (got %d); set keep to the number of backups to retain" % p["keep"])
        if p["action"] == "plan":
            require(module, "login_db")
            result = action_plan(module, pg)
        elif p["action"] == "create":
            result = action_create(module, pg)
        elif p["action"] == "list":
            result = action_list(module)
        else:
            result = action_restore(module, pg)
    except (runguard.RunStopped, runguard.LockLost) as exc:
        fail("%s; %s" % (exc.args[0] if exc.args else "stopped",
                         "the verified backup %s was kept before the stop" % KEPT[-1] if KEPT else "no backup was kept"))
    except bk.BackupError as exc:
        fail(exc)
    except (OSError, IOError) as exc:
        fail("%s: %s; check that the deploy user can write %s" % (type(exc).__name__, exc, p["backup_dir"]))
    except Exception as exc:  # noqa: BLE001 - a module reports, it does not crash with secrets in a trace
        fail("%s: %s" % (type(exc).__name__, exc))
    finally:
        GUARD.finish()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
