"""What `invoke drift` tells the outside: a Prometheus textfile for node_exporter's textfile
collector (``--metrics FILE``, written atomically on every run) and a webhook (``--notify URL``:
one JSON document, Slack-compatible ``text`` included, POSTed when a host's state changes - a new
finding, a finding gone, a change of exit code - and on recovery, never on every run).

The state the webhook compares with is kept per host in the controller's cache
(``~/.cache/slipway/drift/state.json``, 0600; ``$SLIPWAY_CACHE``). A POST that fails leaves it as
it was, so the next run tries again; the failure is one line on stderr."""
from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import SlipwayError
from .files import write_private

STATES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}  # invoke drift's exit codes (the monitoring convention)
_LABEL = re.compile(r'[\\"\n]')


def _label(value: str) -> str:
    return _LABEL.sub(lambda m: {"\\": "\\\\", '"': '\\"', "\n": "\\n"}[m.group(0)], str(value))


def _previous_success(path: Path) -> dict:
    """{env: timestamp} of slipway_drift_last_success_timestamp_seconds in the file as it is."""
    found = {}
    try:
        text = path.read_text()
    except OSError:
        return found
    for m in re.finditer(r'^slipway_drift_last_success_timestamp_seconds\{env="((?:[^"\\]|\\.)*)"\} (\S+)$', text, re.M):
        found[m.group(1)] = m.group(2)
    return found


def metrics_text(checked: dict, now: float, previous: dict | None = None) -> str:
    """The textfile for ``checked`` ({host: {exit, result | error}}): findings by severity and
    migrations by state for each host checked, whether each could be checked, and the time of
    each host's last successful check (kept from ``previous`` for a host that could not be checked)."""
    previous = previous or {}
    lines = [
        "# HELP slipway_drift_findings Schema drift findings by severity (invoke drift).",
        "# TYPE slipway_drift_findings gauge",
    ]
    for host, info in sorted(checked.items()):
        if "result" in info:
            counts = {"critical": 0, "warning": 0, "info": 0}
            for f in info["result"]["findings"]:
                counts[f["severity"]] += 1
            lines += [f'slipway_drift_findings{{env="{_label(host)}",severity="{sev}"}} {n}' for sev, n in counts.items()]
    lines += ["# HELP slipway_migrations Migrations by state against drizzle's tracking table (invoke drift).",
              "# TYPE slipway_migrations gauge"]
    for host, info in sorted(checked.items()):
        if "result" in info:
            counts = info["result"]["counts"]
            lines += [f'slipway_migrations{{env="{_label(host)}",state="{state}"}} {counts.get(state, 0)}'
                      for state in ("applied", "pending", "skipped", "tampered", "unknown_rows")]
    lines += ["# HELP slipway_drift_up 1 when the drift check could run, 0 when it could not (exit 3).",
              "# TYPE slipway_drift_up gauge"]
    lines += [f'slipway_drift_up{{env="{_label(h)}"}} {0 if "error" in i else 1}' for h, i in sorted(checked.items())]
    lines += ["# HELP slipway_drift_exit_code invoke drift's exit code (0 none, 1 warning, 2 critical, 3 could not check).",
              "# TYPE slipway_drift_exit_code gauge"]
    lines += [f'slipway_drift_exit_code{{env="{_label(h)}"}} {i["exit"]}' for h, i in sorted(checked.items())]
    lines += ["# HELP slipway_drift_last_success_timestamp_seconds When the drift check last ran to an answer.",
              "# TYPE slipway_drift_last_success_timestamp_seconds gauge"]
    stamps = dict(previous)
    stamps.update({_label(h): f"{now:.0f}" for h, i in checked.items() if "result" in i})
    lines += [f'slipway_drift_last_success_timestamp_seconds{{env="{h}"}} {t}' for h, t in sorted(stamps.items())]
    return "\n".join(lines) + "\n"


def check_options(notify: str | None, metrics: str | None) -> None:
    """``--notify`` and ``--metrics`` checked before anything runs: one ``cause; fix`` line each."""
    if notify and not re.match(r"^https?://", notify):
        raise SlipwayError("--notify is not an http(s) URL; pass the webhook's URL")
    if metrics and (Path(metrics).is_dir() or not Path(metrics).parent.is_dir()):
        raise SlipwayError(f"--metrics {metrics}: not a file in an existing directory; pass e.g. "
                           f"--metrics /var/lib/node_exporter/textfile_collector/slipway_drift.prom")


def write_metrics(path: str, checked: dict) -> None:
    """The textfile, written whole (a temporary file renamed over it), mode 0644 for node_exporter."""
    check_options(None, path)
    target = Path(path)
    text = metrics_text(checked, time.time(), _previous_success(target))
    try:
        write_private(target, text, 0o644)
    except OSError as exc:
        raise SlipwayError(f"--metrics {path}: cannot write it ({exc.strerror or exc}); pass a writable file") from None


def _state_file() -> Path:
    from .release import cache_dir

    path = cache_dir() / "drift"
    path.mkdir(mode=0o700, exist_ok=True)
    return path / "state.json"


def _last_file() -> Path:
    return _state_file().with_name("last.json")


def record_last(checked: dict, keys: dict, now: float | None = None) -> None:
    """Keep each host's last drift check (time, exit, findings by severity, or why it could not
    check) for `invoke status`, by host key (``keys``: {host: key}); 0600, written atomically."""
    from .files import write_private

    path = _last_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    at = time.time() if now is None else now
    for host, info in checked.items():
        entry = {"at": at, "exit": info["exit"], "state": STATES.get(info["exit"])}
        if "error" in info:
            entry["error"] = info["error"]
        else:
            counts = {"critical": 0, "warning": 0, "info": 0}
            for f in info["result"]["findings"]:
                counts[f["severity"]] += 1
            entry["findings"] = counts
        data[keys.get(host, host)] = entry
    write_private(path, json.dumps(data, indent=1, sort_keys=True), 0o600)


def last_checks() -> dict:
    """{host key: the last drift check's entry} as record_last kept them ({} before any)."""
    try:
        data = json.loads(_last_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _summary(info: dict) -> dict:
    if "error" in info:
        return {"exit": info["exit"], "fingerprints": [], "error": info["error"]}
    return {"exit": info["exit"], "fingerprints": sorted(f["fingerprint"] for f in info["result"]["findings"])}


def payload(host: str, key: str, info: dict, before: dict | None, release: str | None) -> dict:
    """The webhook document for one host whose state changed (``before``: its previous summary)."""
    now = _summary(info)
    findings = [] if "error" in info else info["result"]["findings"]
    was = STATES.get((before or {}).get("exit"), "none")
    state = STATES[info["exit"]]
    recovered = info["exit"] == 0 and before is not None and before.get("exit") != 0
    if "error" in info:
        head = f"slipway drift: {host} could not be checked ({info['error']})"
    elif recovered:
        head = f"slipway drift: {host} recovered: no drift (was {was})"
    else:
        head = (f"slipway drift: {host} is {state}: " + "; ".join(
            f"{f['severity']} {f['kind']} {f['object']['kind']} {f['object']['name']}" for f in findings[:5])
            + (f" (+{len(findings) - 5} more)" if len(findings) > 5 else ""))
    return {
        "environment": host,
        "host_key": key,
        "release": release,
        "state": state,
        "previous_state": was,
        "recovered": recovered,
        "findings": [{k: f[k] for k in ("kind", "object", "severity", "cause", "fix", "fingerprint", "migration")}
                     for f in findings],
        "fixes": sorted(set(f["fix"] for f in findings if f.get("fix"))),
        "fingerprints": now["fingerprints"],
        "new": sorted(set(now["fingerprints"]) - set((before or {}).get("fingerprints") or [])),
        "gone": sorted(set((before or {}).get("fingerprints") or []) - set(now["fingerprints"])),
        "error": info.get("error"),
        "text": head,
    }


def changed(info: dict, before: dict | None) -> bool:
    """Whether a host's state differs from the one last notified (a first check counts only when
    something is wrong: a healthy host is no news)."""
    now = _summary(info)
    if before is None:
        return now["exit"] != 0
    return now["exit"] != before.get("exit") or now["fingerprints"] != before.get("fingerprints")


def post(url: str, document: dict, timeout: float = 10.0) -> None:
    data = json.dumps(document, default=str).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "slipway-drift"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - the user's own URL
        if answer.status >= 300:
            raise urllib.error.HTTPError(url, answer.status, answer.reason, answer.headers, None)


def notify(url: str, checked: dict, keys: dict, releases: dict, err=sys.stderr) -> list[str]:
    """POST one document per host whose state changed since the last notified one; returns the
    hosts notified. ``keys``: {host: a key naming it across inventories}; ``releases``: {host: the
    release current points at}."""
    check_options(url, None)
    path = _state_file()
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    sent = []
    for host, info in sorted(checked.items()):
        key = keys.get(host, host)
        before = state.get(key)
        if not changed(info, before):
            continue
        try:
            post(url, payload(host, key, info, before, releases.get(host)))
        except (OSError, urllib.error.URLError, ValueError) as exc:
            print(f"notify: POST to the webhook for {host} failed ({getattr(exc, 'reason', exc)}); its state was "
                  f"kept as it was, so the next run tries again", file=err)
            continue
        state[key] = _summary(info)
        sent.append(host)
    write_private(path, json.dumps(state, indent=2, sort_keys=True), 0o600)
    os.chmod(path, 0o600)
    return sent
