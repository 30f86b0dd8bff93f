"""`invoke smoke --host H`: the app's smoke tests (playbooks/smoke.yml, role smoke_test, module
slipway.core.app_smoke) on every host that H names, printed as one table or one JSON document."""
from __future__ import annotations

import json

from .inventory import resolve_target
from .runner import run_playbook

COLUMNS = ("host", "case", "ok", "expected", "got", "seconds")


def _ok(value) -> str:
    return {True: "ok", False: "FAIL", None: "-"}.get(value, str(value))


def rows(hosts: dict) -> list[tuple[str, ...]]:
    """One table row per case of every host (a host without cases gets one row with its message)."""
    out = []
    for name, info in sorted(hosts.items()):
        cases = info.get("cases") or []
        if not cases:
            out.append((name, "(no case ran)", "ok" if info.get("ok") else "FAIL", "",
                        info.get("msg") or info.get("summary") or "", ""))
        for case in cases:
            seconds = case.get("seconds")
            out.append((name, str(case.get("name", "")), _ok(case.get("ok")), str(case.get("expected", "")),
                        str(case.get("got", "")), f"{seconds:.2f}" if isinstance(seconds, (int, float)) else ""))
    return out


def table(lines: list[tuple[str, ...]]) -> list[str]:
    widths = [max([len(COLUMNS[i])] + [len(r[i]) for r in lines]) for i in range(len(COLUMNS))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
    return [fmt.format(*COLUMNS).rstrip(), *(fmt.format(*r).rstrip() for r in lines)]


def smoke(host: str, as_json: bool = False, extravars: dict | None = None, release: str | None = None) -> int:
    """Run the smoke tests on ``host`` (inventory host or group); print a table (or, with
    ``as_json``, one JSON document and nothing else); return 0 when every case of every host
    passed, else 1. The checks are those the app's slipway.yml names (``release``: the app's
    directory or git ref, as for deploy; default the reference app); ``extravars`` override role
    variables (``smoke_test_*``)."""
    from .release import settings

    targets = resolve_target(host)
    result = run_playbook("smoke.yml", host, {"slipway_app": settings(release).as_vars(), **(extravars or {})})
    hosts = result["data"].get("smoke", {}) or {}
    failures = result["failures"]
    ok = result["rc"] == 0 and all(hosts.get(t, {}).get("ok") is True for t in targets)
    if as_json:
        print(json.dumps({"ok": ok, "hosts": hosts, "failures": failures, "rc": result["rc"]}, indent=2, sort_keys=True))
        return 0 if ok else 1
    for line in table(rows(hosts)):
        print(line)
    for name in targets:
        info = hosts.get(name)
        if info:
            print(f"{name}: {info.get('summary', '') if info.get('ok') else info.get('msg') or 'failed'}")
    for failure in failures:
        if failure["msg"] == hosts.get(failure["host"], {}).get("msg"):
            continue  # already printed with the host's summary
        where = f"{failure['task']}: " if failure["task"] else ""
        print(f"{failure['host']}: FAILED {where}{failure['msg']}")
    return 0 if ok else 1
