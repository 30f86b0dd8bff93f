"""Lock-safety findings on pending migrations, from squawk (PyPI ``squawk-cli`` ships its binary).

slipway writes no lint rules of its own: each finding is squawk's, placed on the drizzle statement
(the chunk between breakpoint markers) it points at, and said to be handled when slipway's online
path does what squawk asks for that statement (an index built CONCURRENTLY, a UNIQUE constraint
added USING INDEX, a lock_timeout on every transaction).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

BREAKPOINT = "--> statement-breakpoint"
# squawk's own rules that do not apply to drizzle migrations run by slipway
IGNORED = {
    "prefer-robust-stmts": "drizzle runs each migration once, tracked; IF NOT EXISTS would hide drift",
    "require-statement-timeout": "a migration may legitimately run long; lock waits are bounded by lock_timeout",
}
# what the online path does about a rule, for a statement it rewrote / for every transaction
HANDLED_WHEN_REWRITTEN = {"disallowed-unique-constraint", "require-concurrent-index-creation",
                          "constraint-missing-not-valid"}
HANDLED_ALWAYS = {"require-lock-timeout": "slipway sets lock_timeout on every transaction"}
_FALSE_POSITIVE = {"constraint-missing-not-valid": "UNIQUE"}  # squawk asks NOT VALID of UNIQUE, which has none


def squawk_path() -> str | None:
    beside = Path(sys.executable).parent / "squawk"
    return str(beside) if beside.exists() else shutil.which("squawk")


def _chunk_of(text: str, line0: int, column: int) -> int:
    """The 1-based drizzle statement number at 0-based ``line0``/``column`` of the file."""
    lines = text.split("\n")
    prefix = "\n".join(lines[:line0] + [lines[line0][:column] if line0 < len(lines) else ""])
    return prefix.count(BREAKPOINT) + 1


def lint(files: dict[str, Path], rewritten: set[tuple[str, int]], mode: str = "online") -> dict:
    """``files``: tag -> .sql path of the pending migrations; ``rewritten``: (tag, statement) the
    online path rewrites. Returns ``{"tool", "findings": [...], "error"}``."""
    exe = squawk_path()
    if exe is None:
        return {"tool": "squawk", "findings": [], "error": "squawk is not installed; run ./bootstrap (squawk-cli)"}
    if not files:
        return {"tool": "squawk", "findings": [], "error": None}
    try:
        proc = subprocess.run([exe, "--reporter", "json", "--pg-version", "15", *map(str, files.values())],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"tool": "squawk", "findings": [], "error": f"squawk could not run: {exc}"}
    try:
        raw = json.loads(proc.stdout or "[]")
    except ValueError:
        return {"tool": "squawk", "findings": [], "error": f"squawk said: {(proc.stderr or proc.stdout).strip()[:200]}"}
    by_path = {str(p): tag for tag, p in files.items()}
    texts = {tag: Path(p).read_text() for tag, p in files.items()}
    findings = []
    for item in raw:
        rule = item.get("rule_name")
        tag = by_path.get(item.get("file"))
        if tag is None or rule in IGNORED:
            continue
        number = _chunk_of(texts[tag], int(item.get("line", 0)), int(item.get("column", 0)))
        chunk = texts[tag].split(BREAKPOINT)[number - 1] if number <= len(texts[tag].split(BREAKPOINT)) else ""
        if rule in _FALSE_POSITIVE and _FALSE_POSITIVE[rule] in chunk.upper():
            continue
        if mode == "online" and (tag, number) in rewritten and rule in HANDLED_WHEN_REWRITTEN:
            handled = "handled: slipway builds it concurrently"
        elif mode == "online" and rule in HANDLED_ALWAYS:
            handled = "handled: " + HANDLED_ALWAYS[rule]
        else:
            handled = None
        findings.append({"tag": tag, "statement": number, "rule": rule, "message": item.get("message"),
                         "help": item.get("help"), "handled": handled})
    return {"tool": "squawk", "findings": findings, "error": None}


def lint_plan(doc: dict, folder: str | Path) -> dict:
    """Lint the pending migrations of a plan document made from ``folder``."""
    folder = Path(folder)
    files = {tag: folder / f"{tag}.sql" for tag in doc.get("to_apply", [])}
    execution = doc.get("execution") or {}
    rewritten = {(s["tag"], s["statement"]) for s in execution.get("statements", []) if s["how"].startswith("rewritten")}
    return lint(files, rewritten, execution.get("mode", "online"))
