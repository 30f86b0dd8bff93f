#!/usr/bin/env python3
"""Fleet benchmark (prints figures; not a test): for 1, 4 and 8 sandbox hosts in the incident state,
the wall time of a first `invoke status --all` (which installs slipway's module runtime on the hosts,
once per runtime version), a full deploy of the group, a no-op deploy right after it (median of
three), `invoke status --all` and `invoke drift` over the group (median of three each), with the
deploys' per-phase times (the report). The group deploys with `slipway_serial` set as --serial says
(default 25%).

  .venv/bin/python bench/fleet.py [--sizes 1,4,8] [--serial 25%] [--instance 10]

Uses sandbox instance --instance (brought down and up again for each size; down at the end). Needs
root. Goals (issue 15): 8 hosts at most 2x one host for a deploy with slipway_serial 25%; a no-op
deploy of one host at most 3 s; status --all of 8 hosts at most 2x one host.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INVOKE = [str(ROOT / ".venv" / "bin" / "python"), "-m", "invoke", "--search-root", str(ROOT)]


def run(env: dict, *args: str, timeout: int = 1800) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    proc = subprocess.run([*INVOKE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **env})
    return time.monotonic() - started, proc


def checked(env: dict, *args: str, ok: tuple = (0,)) -> float:
    """The wall time of ``invoke *args``, which must end with an exit code in ``ok`` (a failed run is
    no figure)."""
    took, proc = run(env, *args)
    if proc.returncode not in ok:
        print(proc.stdout[-3000:], proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"invoke {' '.join(args)} failed (exit {proc.returncode})")
    return took


def median_run(env: dict, *args: str, ok: tuple = (0,)) -> tuple[float, str, None]:
    """The median wall time of three successful runs of ``invoke *args``."""
    times = sorted(checked(env, *args, ok=ok) for _ in range(3))
    return times[1], "", None


def phases(report: dict) -> str:
    """Per phase, the slowest host's seconds (what the rollout waits for)."""
    worst: dict[str, float] = {}
    for info in report["hosts"].values():
        for p in info["phases"]:
            worst[p["name"]] = max(worst.get(p["name"], 0.0), float(p.get("seconds") or 0))
    return " ".join(f"{name} {sec:.1f}" for name, sec in worst.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--serial", default="25%")
    parser.add_argument("--instance", default="10")
    args = parser.parse_args()
    env = {"SLIPWAY_SANDBOX_INSTANCE": args.instance}
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            run(env, "sandbox.down")
            took, proc = run(env, "sandbox.up", "--hosts", str(size), "--state", "incident")
            if proc.returncode:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return 1
            sys.path.insert(0, str(ROOT))
            os.environ.update(env)
            from slipway.sandbox.controller import Controller

            group_vars = Controller().inventory_dir / "group_vars"
            group_vars.mkdir(exist_ok=True)
            (group_vars / "sandboxes.yml").write_text(f"slipway_serial: {json.dumps(args.serial)}\n")
            with tempfile.TemporaryDirectory() as tmp:
                figures = {"hosts": size}
                # the first look at the hosts installs slipway's module runtime there (once per runtime
                # version, not per deploy); the deploys below start from hosts that have it
                figures["first status --all"] = (checked(env, "status", "--all"), "", None)

                def deploy(label):
                    report = Path(tmp) / "report.json"
                    took, proc = run(env, "deploy", "--host", "sandboxes", "--report", str(report))
                    if proc.returncode:
                        print(proc.stdout[-3000:], proc.stderr[-2000:], file=sys.stderr)
                        raise SystemExit(f"{label} failed (exit {proc.returncode})")
                    doc = json.loads(report.read_text())
                    return took, phases(doc), doc.get("changed")

                figures["deploy"] = deploy("deploy")
                # a no-op: the median of three (one run varies by a few tenths of a second here)
                figures["no-op deploy"] = sorted((deploy("no-op deploy") for _ in range(3)), key=lambda f: f[0])[1]
                figures["status --all"] = median_run(env, "status", "--all")
                # exit 0-2: the check ran (none, warning, critical findings); 3: it could not check
                figures["drift"] = median_run(env, "drift", "--host", "sandboxes", ok=(0, 1, 2))
            rows.append(figures)
            for label in ("first status --all", "deploy", "no-op deploy", "status --all", "drift"):
                took, detail, changed = figures[label]
                print(f"{size} host(s)  {label:<18} {took:6.1f} s" + (f"  ({changed} changes; slowest host per phase: "
                      f"{detail})" if detail else ""), flush=True)
    finally:
        run(env, "sandbox.down")
    print("\n| hosts | deploy | no-op deploy | status --all | drift | first status --all (installs the runtime) |\n"
          "|---|---|---|---|---|---|")
    for f in rows:
        print(f"| {f['hosts']} | {f['deploy'][0]:.1f} s | {f['no-op deploy'][0]:.1f} s | {f['status --all'][0]:.1f} s | "
              f"{f['drift'][0]:.1f} s | {f['first status --all'][0]:.1f} s |")
    one = next((f for f in rows if f["hosts"] == 1), None)
    for f in rows:
        if one and f["hosts"] > 1:
            print(f"{f['hosts']} hosts / 1 host: deploy {f['deploy'][0] / one['deploy'][0]:.1f}x (goal 2x), "
                  f"status --all {f['status --all'][0] / one['status --all'][0]:.1f}x (goal 2x)")
    if one:
        print(f"no-op deploy of one host: {one['no-op deploy'][0]:.1f} s (goal 3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
