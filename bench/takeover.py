#!/usr/bin/env python3
"""Takeover benchmark: a steady GET /api/health load through the first `invoke deploy` of a host
deployed by hand (prints figures; not a test, nothing is asserted).

  .venv/bin/python bench/takeover.py [--rates 300,0] [--threads 16] [--instance 10]

For each rate (requests per second across all client threads; 0 = as fast as they go, which
saturates this machine), a fresh sandbox host in the `legacy` state (the reference app in place in
~/www/reader.market, PM2 started there by hand: its daemon hands connections to the workers
round-robin, 0007 missing) is deployed to under the load: requests, failures by cause, answers by
release (the hand-started workers' `reader.market`, then the release's) and the deploy's wall
time. Needs root (the sandbox does). The sandbox instance is taken down at the end.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' load generator (a bounded thread pool)

from loadgen import Load  # noqa: E402

INVOKE = [str(ROOT / ".venv" / "bin" / "invoke"), "--search-root", str(ROOT)]


def invoke(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*INVOKE, *args], capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT,
                          timeout=900, check=False)


def one(rate: float, threads: int, env: dict) -> dict:
    for args in (("sandbox.down",), ("sandbox.up", "--state", "legacy")):
        proc = invoke(env, *args)
        if proc.returncode:
            raise SystemExit(f"error: invoke {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    os.environ["SLIPWAY_SANDBOX_INSTANCE"] = env["SLIPWAY_SANDBOX_INSTANCE"]
    from slipway import sandbox as sb

    url = sb.find_host("sandbox").app_url
    started = time.monotonic()
    with Load(url, threads=threads, rate=rate or None) as load:
        deploy = invoke(env, "deploy", "--host", "sandbox")
    return {"rate": rate or "max", "seconds": round(time.monotonic() - started, 1), "deploy_rc": deploy.returncode,
            "requests": load.total, "failed": load.bad,
            "causes": {str(k): v for k, v in load.counts.items() if k != 200},
            "by_release": dict(load.releases)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="300,0", help="comma-separated requests/s (0 = as fast as possible)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--instance", default="10")
    args = parser.parse_args()
    env = {"SLIPWAY_SANDBOX_INSTANCE": args.instance}
    rows = []
    try:
        for rate in (float(r) for r in args.rates.split(",")):
            rows.append(one(rate, args.threads, env))
            print(rows[-1], flush=True)
    finally:
        invoke(env, "sandbox.down")
    print("\n| rate (req/s) | requests | failed | causes | answers by release | deploy exit | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']} | {r['requests']} | {r['failed']} | {r['causes'] or '-'} | {r['by_release']} | "
              f"{r['deploy_rc']} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
