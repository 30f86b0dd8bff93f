"""`invoke backup` / `invoke restore`: database backups on target hosts through playbooks/backup.yml,
restore.yml and backup_list.yml (module slipway.core.pg_backup). Each function prints a short human
summary or one JSON document and returns the exit code (0 ok, 1 failed)."""
from __future__ import annotations

import json
import sys

from ansible_collections.slipway.core.plugins.module_utils import backup as bk

from .errors import SlipwayError

# how users list a host's backups (the CLI wiring in tasks.py)
LIST_HINT = "invoke backup --list --host {host}"
CONFIRM = "Restore {db} on {host} from {id}? A safety backup is taken first. Type the host name to confirm: "


def human_size(size) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def _document(key: str, result: dict) -> str:
    return json.dumps({key: result["data"].get(key, {}), "failures": result["failures"], "rc": result["rc"]},
                      indent=2, sort_keys=True)


def backup(host: str, as_json: bool = False, progress=None) -> int:
    """Take a verified backup now on every host ``host`` names (reason "manual")."""
    from .inventory import resolve_target
    from .runner import print_failures, run_playbook

    resolve_target(host)
    result = run_playbook("backup.yml", host, progress=progress)
    if as_json:
        print(_document("backup", result))
    else:
        for name, info in sorted(result["data"].get("backup", {}).items()):
            if not info:
                continue
            if info.get("check_mode"):
                print(f"{name:<14} would back up to {info['path']}")
                continue
            pruned = ", ".join(info.get("pruned") or []) or "none"
            print(f"{name:<14} backup {info['id']}\n{'':<14} path {info['path']}  size {human_size(info.get('size'))}"
                  f"  toc entries {info.get('toc_entries')}  pruned: {pruned}")
        print_failures(result)
    return 0 if result["rc"] == 0 else 1


def list_backups(host: str, as_json: bool = False) -> int:
    """Print the backups each host's manifest lists (newest first), and whether each file is intact in size."""
    from .inventory import resolve_target
    from .runner import print_failures, run_playbook

    resolve_target(host)
    result = run_playbook("backup_list.yml", host)
    if as_json:
        print(_document("backups", result))
    else:
        for name, entries in sorted(result["data"].get("backups", {}).items()):
            if not entries:
                print(f"{name:<14} no backups")
            for entry in sorted(entries, key=lambda e: e.get("created", ""), reverse=True):
                state = "ok" if entry.get("size_ok") else ("MISSING" if not entry.get("exists") else "SIZE MISMATCH")
                print(f"{name:<14} {entry['id']}  {entry.get('reason', '-'):<11} {human_size(entry.get('size')):>10}  {state}")
        print_failures(result)
    return 0 if result["rc"] == 0 else 1


def _db_name(host: str, backup_id: str) -> str:
    """The host's slipway_db_name from the inventory, else the database part of the backup id."""
    from .inventory import host_vars

    try:
        name = host_vars(host).render("slipway_db_name")
    except Exception:  # noqa: BLE001 - only for the prompt's wording
        name = None
    return str(name or bk.parse_id(backup_id)["db"])


def restore_target(host: str, backup_id: str) -> str:
    """The one inventory host a restore of ``backup_id`` may run on, or a one-line SlipwayError
    (a group, a malformed id, a backup taken on another host)."""
    from .inventory import resolve_target

    hosts = resolve_target(host)
    if len(hosts) != 1 or hosts[0] != host:
        # a group (even of one host) or a pattern: a restore replaces a database, so it names its host
        raise SlipwayError(f"restore works on one named host; {host!r} is a group or pattern of {len(hosts)} "
                           f"({', '.join(hosts)}): pass --host with the host's own name")
    target = hosts[0]
    parsed = bk.parse_id(backup_id)
    if parsed is None:
        raise SlipwayError(f"backup id {backup_id!r} is malformed: ids look like <host>_<db>_<YYYYmmddTHHMMSSZ>_<release>; "
                           f"list them with `{LIST_HINT.format(host=target)}`")
    if parsed["host"] != bk.sanitize(target):
        raise SlipwayError(f"backup {backup_id} was taken on host {parsed['host']}, not {target}; "
                           f"restore it there or pick a backup of {target}")
    return target


def confirm_restore(target: str, backup_id: str, ask=input, to_stderr: bool = False) -> None:
    """Ask for the host name before ``backup_id`` replaces ``target``'s database; SlipwayError unless
    it is typed (``to_stderr``: the prompt goes to stderr, so stdout stays one JSON document)."""
    prompt = CONFIRM.format(db=_db_name(target, backup_id), host=target, id=backup_id)
    try:
        if to_stderr:
            sys.stderr.write(prompt)
            sys.stderr.flush()
            answer = ask("")
        else:
            answer = ask(prompt)
    except EOFError:
        answer = ""
    if answer.strip() != target:
        raise SlipwayError("restore not confirmed; nothing changed")


def restore(host: str, backup_id: str, yes: bool = False, as_json: bool = False, ask=input, progress=None) -> int:
    """Restore ``backup_id`` on one host after a safety backup; asks for the host name unless ``yes``."""
    from .runner import print_failures, run_playbook

    target = restore_target(host, backup_id)
    if not yes:
        confirm_restore(target, backup_id, ask, to_stderr=as_json)
    result = run_playbook("restore.yml", target, {"restore_backup_id": backup_id}, progress=progress)
    if as_json:
        print(_document("restore", result))
    else:
        for name, info in sorted(result["data"].get("restore", {}).items()):
            if info.get("check_mode"):
                print(f"{name:<14} would restore {info['restored']} (backup verified)")
                continue
            safety = info.get("safety_backup") or "none"
            print(f"{name:<14} restored {info['restored']}\n{'':<14} safety backup {safety}")
        print_failures(result)
    return 0 if result["rc"] == 0 else 1
