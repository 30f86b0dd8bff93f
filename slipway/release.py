"""What a deploy ships, built once on the controller: the app release (a content-addressed,
byte-reproducible archive) and slipway's module runtime (psycopg + pglast for the target's Python).

A release is named by its content: the same files give the same id (``r`` + 12 hex), so shipping
the same content twice finds the release already installed and changes nothing.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ansible_collections.slipway.core.plugins.module_utils.drizzle import MigrationError, read_folder

from .errors import SlipwayError
from .paths import READER_APP

REQUIRED = ("package.json", "package-lock.json", "ecosystem.config.js", "migrations/meta/_journal.json")
RUNTIME_PACKAGES = ("psycopg", "psycopg_binary", "psycopg_binary.libs", "pglast", "typing_extensions.py")
_RUNTIME_SKIP = ("__pycache__", ".pyi", ".pxd", ".c", ".h")


_APP_EXCLUDE = {"node_modules", "logs", ".env", ".git"}


def app_files(src: Path) -> list[Path]:
    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in _APP_EXCLUDE or not path.is_file():
            continue
        files.append(rel)
    return files


def release_id(src: Path = READER_APP) -> str:
    """Content address of the app source: same content, same release id."""
    digest = hashlib.sha256()
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


def build(spec: str | None = None) -> Release:
    """Resolve ``--release`` (None: the reference app; a directory; or a git ref) into a release
    archive in the controller's cache; refuses an incomplete app or a damaged migrations folder."""
    with tempfile.TemporaryDirectory(prefix="slipway-release-") as tmp:
        if spec is None:
            src, label = READER_APP, str(READER_APP)
        elif Path(spec).is_dir():
            src, label = Path(spec).resolve(), str(Path(spec).resolve())
        else:
            src, label = _from_git(spec, Path(tmp)), spec
        missing = [name for name in REQUIRED if not (src / name).is_file()]
        if missing:
            raise SlipwayError(f"release {label} is not a deployable app: missing {', '.join(missing)}; "
                               "it needs package.json + package-lock.json (npm ci), ecosystem.config.js and migrations/")
        try:
            folder = read_folder(str(src / "migrations"))
        except MigrationError as exc:
            raise SlipwayError(f"release {label}: {exc}") from None
        rid = release_id(src)
        files = app_files(src)
        out = cache_dir() / "releases" / f"{rid}.tar.gz"
        out.parent.mkdir(mode=0o700, exist_ok=True)
        if not out.exists():
            _deterministic_tar(out, [(str(rel), src / rel) for rel in files])
        migrations = {"meta/_journal.json": (src / "migrations" / "meta" / "_journal.json").read_text()}
        for entry in folder["migrations"]:
            migrations[f"{entry['tag']}.sql"] = (src / "migrations" / f"{entry['tag']}.sql").read_text()
        return Release(id=rid, source=label, archive=out, files=len(files), migrations=migrations,
                       journal_tags=[m["tag"] for m in folder["migrations"]])


def runtime() -> tuple[str, Path, str]:
    """(id, archive, python "X.Y") of the module runtime: the controller venv's psycopg and pglast,
    for a target Python of the same version (compiled extensions are tied to it)."""
    import pglast
    import psycopg

    site = Path(psycopg.__file__).resolve().parent.parent
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    members = []
    for name in RUNTIME_PACKAGES:
        top = site / name
        if top.is_file():
            members.append((name, top))
            continue
        if not top.is_dir():
            raise SlipwayError(f"{top} is missing from the controller's venv; run ./bootstrap")
        for path in sorted(top.rglob("*")):
            if path.is_file() and not any(part == "__pycache__" for part in path.parts) and not path.name.endswith(_RUNTIME_SKIP[1:]):
                members.append((str(path.relative_to(site)), path))
    digest = hashlib.sha256(f"{pyver} {psycopg.__version__} {pglast.__version__}".encode())
    for name, path in members:
        digest.update(name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
    rid = f"py{pyver.replace('.', '')}-{digest.hexdigest()[:12]}"
    out = cache_dir() / "runtime" / f"{rid}.tar.gz"
    out.parent.mkdir(mode=0o700, exist_ok=True)
    if not out.exists():
        _deterministic_tar(out, members)
    return rid, out, pyver
