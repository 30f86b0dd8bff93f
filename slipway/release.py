"""What a deploy ships, built once on the controller: the app release (a content-addressed,
byte-reproducible archive). slipway's module runtime (psycopg + pglast for each host's Python) is
slipway/runtime.py's, archived the same way in the same cache.

A release is named by its content: the same files give the same id (``r`` + 12 hex), so shipping
the same content twice finds the release already installed and changes nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, read_folder
from ansible_collections.slipway.core.plugins.module_utils.redact import redact_text

from . import appconfig
from .errors import SlipwayError
from .paths import READER_APP

REQUIRED = ("package.json", "package-lock.json")  # the ecosystem file and migrations: slipway/appconfig.py


_APP_EXCLUDE = {"node_modules", "logs", ".env", ".git"}


def app_files(src: Path) -> list[Path]:
    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in _APP_EXCLUDE or not path.is_file():
            continue
        files.append(rel)
    return files


def release_id(src: Path = READER_APP, build: str | None = None) -> str:
    """Content address of the app source (and of its build command, when it has one): same
    content, same release id."""
    digest = hashlib.sha256()
    if build:
        digest.update(b"build\0" + build.encode() + b"\0")
    for rel in app_files(src):
        digest.update(str(rel).encode() + b"\0")
        digest.update((src / rel).read_bytes() + b"\0")
    return "r" + digest.hexdigest()[:12]


def cache_dir() -> Path:
    base = os.environ.get("SLIPWAY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "slipway")
    path = Path(base)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclasses.dataclass
class Release:
    id: str
    source: str  # what the user named (directory or git ref), for reports
    archive: Path
    files: int
    migrations: dict  # relative path -> text: meta/_journal.json and every <tag>.sql
    journal_tags: list
    app: appconfig.AppConfig | None = None  # the app's settings (slipway.yml and defaults)


def _deterministic_tar(out: Path, members: list[tuple[str, Path]]) -> None:
    """A .tar.gz whose bytes depend only on the files' names, contents and exec bits."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in members:
            info = tarfile.TarInfo(name)
            data = path.read_bytes()
            info.size = len(data)
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle, gzip.GzipFile(fileobj=handle, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    os.replace(tmp, out)


def _from_git(spec: str, workdir: Path) -> Path:
    """``REF`` or ``REF:subdir`` of the git repository at $SLIPWAY_APP_REPO (default: cwd)."""
    repo = os.environ.get("SLIPWAY_APP_REPO") or os.getcwd()
    ref = spec.split(":", 1)[0]
    probe = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise SlipwayError(f"--release {spec!r} is neither a directory nor a git ref in {repo}; pass the app's "
                           "directory, or a ref (REF or REF:subdir) of the repo in $SLIPWAY_APP_REPO")
    tar_path = workdir / "src.tar"
    proc = subprocess.run(["git", "-C", repo, "archive", "--format=tar", "-o", str(tar_path), spec],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SlipwayError(f"git archive {spec} failed: {proc.stderr.strip().splitlines()[-1:] or ['no output']}")
    out = workdir / "src"
    out.mkdir()
    with tarfile.open(tar_path) as tar:
        tar.extractall(out, filter="data")
    return out


BUILD_TIMEOUT = 1800  # seconds a release's build command may take


def _clean_copy(src: Path, dest: Path) -> None:
    """``src`` without what never ships (node_modules, logs, .env, .git), for the build to run in."""
    for rel in app_files(src):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)


def _run_build(command: str, workdir: Path, label: str) -> None:
    """The app's ``build`` (slipway.yml) in ``workdir``; one ``cause; fix`` line when it fails."""
    try:
        proc = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlipwayError(f"release {label}: build `{command}` did not finish in {BUILD_TIMEOUT} s; "
                           "make it faster or fix 'build' in slipway.yml") from None
    if proc.returncode != 0:
        said = [line.strip() for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()]
        last = redact_text(said[-1][:300]) if said else "no output"
        raise SlipwayError(f"release {label}: build `{command}` failed (exit {proc.returncode}): {last}; "
                           "fix the build (it runs in a clean copy of the app) or 'build' in slipway.yml")


def _source(spec: str | None, tmp: Path) -> tuple[Path, str]:
    """(the app's source directory, its label) for ``--release`` (None: the reference app)."""
    if spec is None:
        return READER_APP, str(READER_APP)
    if Path(spec).is_dir():
        return Path(spec).resolve(), str(Path(spec).resolve())
    return _from_git(spec, tmp), spec


def _require_app(src: Path, label: str) -> None:
    missing = [name for name in REQUIRED if not (src / name).is_file()]
    if missing:
        raise SlipwayError(f"release {label} is not a deployable app: missing {', '.join(missing)}; "
                           "it needs package.json + package-lock.json (the host runs npm ci)")


@dataclasses.dataclass
class Source:
    """A release's source, resolved once: its directory (a git ref's lives only as long as the
    ``resolved`` block), its label for messages, and its app settings."""
    path: Path
    label: str
    app: appconfig.AppConfig


@contextlib.contextmanager
def resolved(spec: str | None = None):
    """The Source ``--release`` names (None: the reference app; a directory; or a git ref),
    refused when it is no deployable app or its settings (slipway.yml) are bad."""
    with tempfile.TemporaryDirectory(prefix="slipway-release-") as tmp:
        src, label = _source(spec, Path(tmp))
        _require_app(src, label)
        yield Source(src, label, appconfig.load(src, f"release {label}"))


def settings(spec: str | None = None) -> appconfig.AppConfig:
    """The app settings (slipway.yml and defaults) of the release ``spec`` names, nothing built."""
    with resolved(spec) as source:
        return source.app


def build(spec: str | None = None) -> Release:
    """``pack`` of the release ``spec`` names (see ``resolved``)."""
    with resolved(spec) as source:
        return pack(source)


def pack(source: Source) -> Release:
    """The release archive of ``source`` in the controller's cache; refuses a damaged migrations
    folder or a failing build. With a ``build`` command the release is what the build leaves in a
    clean copy of the source; its id names the source and the command, so the same source is
    built once and found installed on the next deploy."""
    src, label, app = source.path, source.label, source.app
    with tempfile.TemporaryDirectory(prefix="slipway-build-") as tmp:
        try:
            folder = read_folder(str(src / app.migrations))
        except MigrationError as exc:
            raise SlipwayError(f"release {label}: {exc}") from None
        rid = release_id(src, app.build)
        out = cache_dir() / "releases" / f"{rid}.tar.gz"
        out.parent.mkdir(mode=0o700, exist_ok=True)
        if out.exists():
            with tarfile.open(out) as tar:
                files = sum(1 for m in tar.getmembers() if m.isfile())
        else:
            packed = src
            if app.build:
                packed = Path(tmp) / "build"
                _clean_copy(src, packed)
                _run_build(app.build, packed, label)
            names = app_files(packed)
            _deterministic_tar(out, [(str(rel), packed / rel) for rel in names])
            files = len(names)
        base = src / app.migrations
        migrations = {"meta/_journal.json": (base / "meta" / "_journal.json").read_text()}
        for entry in folder["migrations"]:
            migrations[f"{entry['tag']}.sql"] = (base / f"{entry['tag']}.sql").read_text()
        return Release(id=rid, source=label, archive=out, files=files, migrations=migrations,
                       journal_tags=[m["tag"] for m in folder["migrations"]], app=app)
