"""An app's own settings: its ``slipway.yml`` (every key optional), with defaults that fit a plain
drizzle-kit + PM2 app.

=============  ==============================================================================
key            meaning (default)
=============  ==============================================================================
app            the PM2 app name (the ecosystem file's only app; else the inventory's
               ``slipway_app_name``)
ecosystem      the PM2 ecosystem file (``ecosystem.config.js``, else ``ecosystem.config.cjs``)
migrations     the drizzle migrations folder (drizzle.config's ``out``, else ``drizzle/``, else
               ``migrations/``): the one holding ``meta/_journal.json``
build          a shell command run on the controller in a clean copy of the app before it is
               packed (none); what it writes ships, ``node_modules`` aside (the host runs
               ``npm ci``)
health         ``{path, status}`` the health gate and the smoke tests probe (``/api/health``, 200);
               a JSON ``release`` field in the answer is checked only when the app sends one
smoke          the smoke checks after a deploy: a list of HTTP checks ``{name, method, path,
               status, json, body, auth}``, and ``{plugin: reader-track-view}`` for the reference
               app's track-view cases (which need ``slipway_api_token`` and
               ``slipway_smoke_book_id``); default: the health check alone
=============  ==============================================================================

The controller reads it once per release (``load``) and hands the roles what they need as the
extra var ``slipway_app`` (``as_vars``).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

from .errors import SlipwayError

FILE = "slipway.yml"
KEYS = ("app", "ecosystem", "migrations", "build", "health", "smoke")
ECOSYSTEMS = ("ecosystem.config.js", "ecosystem.config.cjs")
MIGRATION_FOLDERS = ("drizzle", "migrations")
DRIZZLE_CONFIGS = ("drizzle.config.ts", "drizzle.config.js", "drizzle.config.mjs", "drizzle.config.cjs",
                   "drizzle.config.mts", "drizzle.config.cts", "drizzle.config.json")
PLUGINS = ("reader-track-view",)
CHECK_KEYS = {"name": str, "method": str, "path": str, "status": int, "json": dict, "body": dict, "auth": bool}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
_OUT = re.compile(r"""["']?\bout["']?\s*:\s*["'`]([^"'`\n]+)["'`]""")
_LIST_APPS = ("const m = require(process.argv[1]); const c = (m && m.default) || m;"
              "const apps = Array.isArray(c) ? c : (c && c.apps) || [];"
              "process.stdout.write(JSON.stringify(apps.map((a) => a && a.name)));")


@dataclasses.dataclass
class AppConfig:
    app: str | None
    app_from: str  # "slipway.yml", "ecosystem" or "inventory" (unknown here: the inventory's slipway_app_name)
    ecosystem: str
    migrations: str  # folder relative to the app's root
    migrations_from: str  # "slipway.yml", "drizzle.config.ts", ..., "default"
    build: str | None
    health_path: str = "/api/health"
    health_status: int = 200
    smoke: list = dataclasses.field(default_factory=list)
    from_file: bool = False
    node: str | None = None  # the Node.js range the app asks for (package.json engines.node, else .nvmrc)
    node_from: str | None = None

    @property
    def plugins(self) -> list[str]:
        return [c["plugin"] for c in self.smoke if "plugin" in c]

    @property
    def needs_token(self) -> bool:
        """The smoke tests send the app's API token (slipway_api_token): the track-view plugin, or
        a check with ``auth``."""
        return "reader-track-view" in self.plugins or any(c["auth"] for c in self.checks)

    @property
    def checks(self) -> list[dict]:
        return [c for c in self.smoke if "plugin" not in c]

    def as_vars(self) -> dict:
        """The extra var ``slipway_app`` the roles read (roles/slipway/defaults/main.yml)."""
        return {"name": self.app, "ecosystem": self.ecosystem, "migrations": self.migrations,
                "health": {"path": self.health_path, "status": self.health_status},
                "smoke": {"plugins": self.plugins, "checks": self.checks},
                "node": self.node, "node_from": self.node_from}


def _bad(label: str, cause: str, fix: str) -> SlipwayError:
    return SlipwayError(f"{label}: {cause}; {fix}")


def _read_file(src: Path, label: str) -> dict:
    path = src / FILE
    if not path.exists():
        return {}
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise _bad(f"{label}/{FILE}", f"not readable YAML{at}", "fix the file (every key is optional)") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise _bad(f"{label}/{FILE}", "is not a mapping", f"write keys of {', '.join(KEYS)} at the top level")
    unknown = sorted(set(doc) - set(KEYS))
    if unknown:
        raise _bad(f"{label}/{FILE}", f"unknown key {unknown[0]!r}", f"use only {', '.join(KEYS)}")
    for key in ("app", "ecosystem", "migrations", "build"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _bad(f"{label}/{FILE}", f"{key!r} must be a non-empty string", f"set {key} to a string or remove it")
    return doc


def _relative(src: Path, value: str, label: str, key: str) -> str:
    rel = Path(value.strip())
    if rel.is_absolute() or ".." in rel.parts:
        raise _bad(f"{label}/{FILE}", f"{key} {value!r} is outside the app",
                   f"give {key} relative to the app's root, without '..'")
    return str(rel).rstrip("/") or "."


def _ecosystem(src: Path, doc: dict, label: str) -> str:
    if doc.get("ecosystem"):
        name = _relative(src, doc["ecosystem"], label, "ecosystem")
        if not (src / name).is_file():
            raise _bad(label, f"the ecosystem file {name} named in {FILE} is missing",
                       f"add it or fix 'ecosystem' in {FILE}")
        return name
    found = [name for name in ECOSYSTEMS if (src / name).is_file()]
    if not found:
        raise _bad(label, f"no PM2 ecosystem file ({' or '.join(ECOSYSTEMS)})",
                   f"add one, or name yours with 'ecosystem' in {FILE}")
    return found[0]


def drizzle_out(src: Path) -> tuple[str | None, str | None]:
    """(the ``out`` folder drizzle.config names, which config file) or (None, None)."""
    for name in DRIZZLE_CONFIGS:
        path = src / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if name.endswith(".json"):
            try:
                out = json.loads(text).get("out")
            except (ValueError, AttributeError):
                out = None
            return (out if isinstance(out, str) else None), name
        match = _OUT.search(text)
        return (match.group(1) if match else None), name
    return None, None


def _migrations(src: Path, doc: dict, label: str) -> tuple[str, str]:
    if doc.get("migrations"):
        folder, origin = _relative(src, doc["migrations"], label, "migrations"), FILE
    else:
        out, config = drizzle_out(src)
        if out:
            folder, origin = _relative(src, out.removeprefix("./"), label, f"{config}'s out"), config
        else:
            folder = next((f for f in MIGRATION_FOLDERS if (src / f / "meta" / "_journal.json").is_file()),
                          MIGRATION_FOLDERS[0])
            origin = "default"
    if not (src / folder / "meta" / "_journal.json").is_file():
        said = {FILE: f"named in {FILE}", "default": "(the default)"}.get(origin, f"({origin}'s out)")
        raise _bad(label, f"no drizzle migrations: {folder}/meta/_journal.json is missing, folder {folder} {said}",
                   f"generate them (drizzle-kit generate) or set 'migrations' in {FILE}")
    return folder, origin


def ecosystem_apps(src: Path, ecosystem: str, label: str) -> list:
    """The app names the ecosystem file defines, read by node on the controller."""
    node = shutil.which("node")
    if not node:
        raise _bad(label, f"cannot read the app names in {ecosystem}: node is not on this machine's PATH",
                   f"set 'app' in {FILE} or slipway_app_name in the inventory")
    try:
        proc = subprocess.run([node, "-e", _LIST_APPS, str((src / ecosystem).resolve())], capture_output=True, text=True,
                              timeout=30, cwd=src, check=False)
    except subprocess.TimeoutExpired:
        raise _bad(label, f"reading {ecosystem} with node did not finish in 30 s",
                   f"set 'app' in {FILE}") from None
    try:
        names = json.loads(proc.stdout) if proc.returncode == 0 else None
    except ValueError:
        names = None
    if not isinstance(names, list):
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        said = next((line for line in lines if re.match(r"^[A-Za-z]*Error\b", line)), lines[0] if lines else "no output")[:200]
        raise _bad(label, f"node could not load {ecosystem} ({said})", f"fix it, or set 'app' in {FILE}")
    return names


def _app(src: Path, doc: dict, ecosystem: str, label: str) -> tuple[str | None, str]:
    try:
        names = ecosystem_apps(src, ecosystem, label)
    except SlipwayError:
        if doc.get("app"):  # named in slipway.yml: trusted when the ecosystem cannot be read here
            return doc["app"], FILE
        raise
    if doc.get("app"):
        if doc["app"] not in names:
            raise _bad(label, f"{FILE} names app {doc['app']!r} but {ecosystem} defines {names or 'no app'}",
                       "make 'app' one of the ecosystem's app names")
        return doc["app"], FILE
    named = [n for n in names if isinstance(n, str) and n]
    if len(names) == 1 and named:
        return named[0], "ecosystem"
    return None, "inventory"  # several apps (or unnamed ones): the inventory's slipway_app_name must say which


def _health(doc: dict, label: str) -> tuple[str, int]:
    health = doc.get("health")
    if health is None:
        return "/api/health", 200
    if not isinstance(health, dict) or set(health) - {"path", "status"}:
        raise _bad(f"{label}/{FILE}", "'health' must be a mapping of path and status",
                   "write e.g. health: {path: /healthz, status: 200}")
    path, status = health.get("path", "/api/health"), health.get("status", 200)
    if not isinstance(path, str) or not path.startswith("/"):
        raise _bad(f"{label}/{FILE}", f"health path {path!r} does not start with /", "give the path from the app's root")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise _bad(f"{label}/{FILE}", f"health status {status!r} is not an HTTP status", "give a number from 100 to 599")
    return path, status


def _smoke(doc: dict, label: str) -> list:
    smoke = doc.get("smoke")
    if smoke is None:
        return []
    if not isinstance(smoke, list):
        raise _bad(f"{label}/{FILE}", "'smoke' must be a list", "list HTTP checks and/or {plugin: reader-track-view}")
    out, names = [], set()
    for i, check in enumerate(smoke, 1):
        where = f"{label}/{FILE}: smoke item {i}"
        if not isinstance(check, dict):
            raise SlipwayError(f"{where} is not a mapping; write {{name, path, ...}} or {{plugin: NAME}}")
        if "plugin" in check:
            if set(check) != {"plugin"} or check["plugin"] not in PLUGINS:
                raise SlipwayError(f"{where}: unknown plugin {check.get('plugin')!r}; slipway has {', '.join(PLUGINS)}")
            out.append({"plugin": check["plugin"]})
            continue
        unknown = sorted(set(check) - set(CHECK_KEYS))
        if unknown:
            raise SlipwayError(f"{where}: unknown key {unknown[0]!r}; use {', '.join(CHECK_KEYS)}")
        for key, kind in CHECK_KEYS.items():
            if key in check and (not isinstance(check[key], kind) or (kind is int and isinstance(check[key], bool))):
                raise SlipwayError(f"{where}: {key} must be a {kind.__name__}; fix it")
        if not check.get("name") or not check.get("path", "").startswith("/"):
            raise SlipwayError(f"{where}: needs a name and a path starting with /; add them")
        if check["name"] in names:
            raise SlipwayError(f"{where}: the name {check['name']!r} is used twice; give each check its own name")
        names.add(check["name"])
        method = check.get("method", "GET").upper()
        if method not in METHODS:
            raise SlipwayError(f"{where}: method {method!r} is not one of {', '.join(METHODS)}; fix it")
        out.append({"name": check["name"], "method": method, "path": check["path"],
                    "status": check.get("status", 200), "json": check.get("json"), "body": check.get("body"),
                    "auth": check.get("auth", False)})
    return out


def node_range(src: Path, label: str) -> tuple[str | None, str | None]:
    """(the npm semver range of Node.js versions the app asks for, where it says so):
    package.json's ``engines.node``, else ``.nvmrc`` / ``.node-version`` (a version or a range; an
    alias such as ``lts/iron`` names no version here and is not checked)."""
    import nodesemver

    try:
        engines = json.loads((src / "package.json").read_text()).get("engines") or {}
    except (OSError, ValueError, AttributeError):
        engines = {}
    wanted = engines.get("node") if isinstance(engines, dict) else None
    if isinstance(wanted, str) and wanted.strip():
        if nodesemver.valid_range(wanted, loose=True) is None:
            raise _bad(label, f"package.json engines.node {wanted!r} is not a version range",
                       "write one npm understands, e.g. \">=20\"")
        return wanted.strip(), "package.json engines.node"
    for name in (".nvmrc", ".node-version"):
        path = src / name
        if path.is_file():
            text = path.read_text().strip().splitlines()[0].strip() if path.read_text().strip() else ""
            text = text[1:] if text[:1] in "vV" else text
            if text and nodesemver.valid_range(text, loose=True) is not None:
                return text, name
            return None, None
    return None, None


def load(src: Path, label: str | None = None) -> AppConfig:
    """The settings of the app whose source is ``src`` (its slipway.yml, then the defaults);
    ``label`` names the release in messages. Raises SlipwayError with one ``cause; fix`` line."""
    label = label or str(src)
    doc = _read_file(src, label)
    ecosystem = _ecosystem(src, doc, label)
    migrations, migrations_from = _migrations(src, doc, label)
    app, app_from = _app(src, doc, ecosystem, label)
    health = _health(doc, label)
    build = doc.get("build")
    node, node_from = node_range(src, label)
    return AppConfig(node=node, node_from=node_from, app=app, app_from=app_from, ecosystem=ecosystem, migrations=migrations,
                     migrations_from=migrations_from, build=build.strip() if build else None,
                     health_path=health[0], health_status=health[1], smoke=_smoke(doc, label),
                     from_file=bool(doc))
