"""slipway's module runtime: psycopg + pglast (compiled code) for the Python a host runs slipway's
modules with, built on the controller and unpacked once on the host by preflight.

* For the controller's own Python X.Y, on a host whose platform the venv's wheels fit: the venv's
  files (no network), as before.
* For any other X.Y from 3.9 to 3.13 (or a host the venv's wheels do not fit): the versions pinned
  in ``PINS`` for that X.Y, as wheels from PyPI (``pip download --only-binary=:all:`` for the
  host's CPython ABI and manylinux platform), once: the archive is cached by an id that names the
  Python version and the package versions.

Either way the archive is a deterministic .tar.gz in ``cache_dir()/runtime/<id>.tar.gz``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import SlipwayError
from .release import _deterministic_tar, cache_dir

# The versions the runtime ships for each Python X.Y a host may run modules with: the newest
# releases with CPython wheels for that version (manylinux x86_64 and aarch64, checked on PyPI):
# psycopg 3.3 and pglast 8 need Python >= 3.10, so 3.9 gets psycopg 3.2 and pglast 7 (PostgreSQL
# 17's parser; module_utils/statements.py reads both alike). typing-extensions: psycopg's only
# dependency (below 3.13). The controller's own X.Y is served from its venv when it fits the host.
_CURRENT = {"psycopg": "3.3.9", "psycopg-binary": "3.3.9", "pglast": "8.8", "typing-extensions": "4.16.0"}
PINS: dict[str, dict[str, str]] = {
    "3.9": {"psycopg": "3.2.13", "psycopg-binary": "3.2.13", "pglast": "7.22", "typing-extensions": "4.16.0"},
    "3.10": _CURRENT,
    "3.11": _CURRENT,
    "3.12": _CURRENT,
    "3.13": _CURRENT,
}
# What the runtime holds: the import packages of those distributions (top-level names)
PACKAGES = ("psycopg", "psycopg_binary", "psycopg_binary.libs", "pglast", "typing_extensions.py")
_SKIP_SUFFIXES = (".pyi", ".pxd", ".c", ".h")
MANYLINUX_FLOOR = 17  # manylinux2014 = glibc 2.17: the oldest platform the pinned wheels are built for
PIP_TIMEOUT = 600  # seconds the download may take


def controller_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclasses.dataclass(frozen=True)
class HostPython:
    """The Python a host runs slipway's modules with, as the deploy's probe found it
    (``slipway.remote.probe_pythons``)."""

    host: str
    interpreter: str  # the command (ansible_python_interpreter, or what Ansible's discovery picks)
    version: str  # "3.9.18"
    implementation: str  # "CPython"
    machine: str  # "x86_64": the architecture of its platform (sysconfig.get_platform())
    glibc: str | None  # "2.36"; None when it is not linked against glibc (musl, ...)

    @property
    def python(self) -> str:
        """Its "X.Y"."""
        return ".".join(self.version.split(".")[:2])


@dataclasses.dataclass(frozen=True)
class Runtime:
    id: str
    archive: Path
    python: str  # "X.Y" it is built for
    packages: dict  # distribution -> version
    origin: str  # "venv" (the controller's own files) or "pypi" (wheels downloaded once, cached)
    cached: bool = True  # False: built by this call (a download, for "pypi")


def _glibc_tuple(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def platform_tags(machine: str, glibc: str) -> list[str]:
    """The manylinux platform tags a host of ``machine`` with glibc ``glibc`` can load, newest
    first: manylinux_2_<N>_<machine> for N from its glibc down to 17, and manylinux2014's alias."""
    major, minor = _glibc_tuple(glibc)
    if major != 2 or minor < MANYLINUX_FLOOR:
        raise SlipwayError(f"glibc {glibc} is older than 2.{MANYLINUX_FLOOR}, the oldest the runtime's wheels support")
    return [f"manylinux_2_{n}_{machine}" for n in range(minor, MANYLINUX_FLOOR - 1, -1)] + [f"manylinux2014_{machine}"]


def check_host(found: HostPython) -> None:
    """A one-line SlipwayError when no runtime can be built for the Python ``found`` describes."""
    where = f"{found.host} runs slipway's modules with {found.interpreter} (Python {found.version})"
    oldest, newest = min(PINS, key=_key), max(PINS, key=_key)
    fix = f"set ansible_python_interpreter for the host in the inventory to a CPython {oldest} to {newest} there"
    if found.implementation != "CPython":
        raise SlipwayError(f"{where}, which is {found.implementation}; slipway's runtime holds CPython extensions: {fix}")
    if found.python not in PINS:
        raise SlipwayError(f"{where}; slipway's module runtime is built for Python {oldest} to {newest} only: {fix}")
    if not found.glibc:
        raise SlipwayError(f"{where}, which is not linked against glibc (musl?); slipway's runtime is built from "
                           f"manylinux wheels: {fix} (a glibc Linux host)")
    try:
        platform_tags(found.machine, found.glibc)
    except SlipwayError as exc:
        raise SlipwayError(f"{where}: {exc}; deploy to a host with a newer glibc") from None


def _key(xy: str) -> tuple[int, ...]:
    return tuple(int(p) for p in xy.split("."))


def plan(pythons: list[HostPython]) -> dict[str, tuple[str, str]]:
    """What to build: {X.Y: (machine, glibc)}, one runtime per Python X.Y the hosts run modules
    with, for the oldest glibc among them (manylinux wheels run on any newer one). Refuses what
    cannot be served: see ``check_host``; hosts of one X.Y on two architectures."""
    groups: dict[str, list[HostPython]] = {}
    for found in pythons:
        check_host(found)
        groups.setdefault(found.python, []).append(found)
    out = {}
    for xy, group in sorted(groups.items(), key=lambda item: _key(item[0])):
        machines = sorted({p.machine for p in group})
        if len(machines) > 1:
            names = ", ".join(f"{p.host} ({p.machine})" for p in group)
            raise SlipwayError(f"hosts running Python {xy} are on different architectures: {names}; deploy each "
                               "architecture's hosts in a run of its own (--host per group)")
        out[xy] = (machines[0], min((p.glibc for p in group), key=_glibc_tuple))
    return out


def runtimes(pythons: list[HostPython]) -> dict[str, Runtime]:
    """The runtime of every Python X.Y the hosts run modules with (see ``plan``), built or found
    in the cache; a download that fails is one SlipwayError line."""
    return {xy: build(xy, machine, glibc) for xy, (machine, glibc) in plan(pythons).items()}


def build(python: str | None = None, machine: str | None = None, glibc: str | None = None) -> Runtime:
    """The runtime for Python ``python`` ("X.Y"; default the controller's) on a host of
    ``machine``/``glibc`` (default the controller's): the venv's files when they fit, else the
    pinned wheels from PyPI."""
    python = python or controller_python()
    machine = machine or _controller_machine()
    glibc = glibc or _controller_glibc()
    if python == controller_python() and _venv_fits(machine, glibc):
        return _from_venv()
    if python not in PINS:
        raise SlipwayError(f"no module runtime is pinned for Python {python}; slipway supports {', '.join(PINS)}")
    return _from_pypi(python, machine, glibc)


# -- the controller's venv ---------------------------------------------------------------------
def _controller_machine() -> str:
    import sysconfig

    return sysconfig.get_platform().split("-", 1)[-1]


def _controller_glibc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").split()[-1]
    except (AttributeError, ValueError, OSError, IndexError):
        return platform.libc_ver()[1] or "0.0"


def _wheel_platforms(dist: str) -> set[str]:
    """The platform tags the venv's ``dist`` was installed from (its dist-info WHEEL file)."""
    try:
        text = importlib.metadata.distribution(dist).read_text("WHEEL") or ""
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {line.split(":", 1)[1].strip().split("-")[-1] for line in text.splitlines() if line.startswith("Tag:")}


def _venv_fits(machine: str, glibc: str) -> bool:
    """Whether the venv's compiled packages load on a host of ``machine`` with glibc ``glibc``."""
    try:
        accepted = set(platform_tags(machine, glibc))
    except (SlipwayError, ValueError):
        return False
    if machine == _controller_machine() and _glibc_tuple(glibc) >= _glibc_tuple(_controller_glibc()):
        accepted.add(f"linux_{machine}")  # built on this machine: fits the same or a newer glibc
    return all(_wheel_platforms(dist) & accepted for dist in ("psycopg-binary", "pglast"))


def _members(site: Path, where: str) -> list[tuple[str, Path]]:
    """(archive name, file) of the runtime's packages under ``site``, sorted, without caches and
    build inputs."""
    members = []
    for name in PACKAGES:
        top = site / name
        if top.is_file():
            members.append((name, top))
            continue
        if not top.is_dir():
            raise SlipwayError(f"{name} is missing from {where}")
        for path in sorted(top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(_SKIP_SUFFIXES):
                members.append((str(path.relative_to(site)), path))
    return members


def _from_venv() -> Runtime:
    import psycopg

    python = controller_python()
    site = Path(psycopg.__file__).resolve().parent.parent
    try:
        members = _members(site, f"the controller's venv ({site})")
    except SlipwayError as exc:
        raise SlipwayError(f"{exc}; run ./bootstrap") from None
    versions = {dist: importlib.metadata.version(dist) for dist in _CURRENT}
    digest = hashlib.sha256(f"{python} {sorted(versions.items())}".encode())
    for name, path in members:
        digest.update(name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
    rid = f"{_id_prefix(python, versions)}-venv-{digest.hexdigest()[:10]}"
    out, exists = _archive_path(rid)
    if not exists:
        _deterministic_tar(out, members)
    return Runtime(rid, out, python, versions, "venv", cached=exists)


# -- PyPI --------------------------------------------------------------------------------------
def _id_prefix(python: str, versions: dict) -> str:
    return f"py{python.replace('.', '')}-psycopg{versions['psycopg']}-pglast{versions['pglast']}"


def runtime_id(python: str, machine: str, glibc: str) -> str:
    """The id of the PyPI runtime for Python ``python`` on ``machine``/``glibc``: the Python and
    package versions, the architecture, and a digest of every pin and platform tag."""
    pins = PINS[python]
    key = f"{python} {sorted(pins.items())} {platform_tags(machine, glibc)}"
    return f"{_id_prefix(python, pins)}-{machine}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def pip_download_command(python: str, machine: str, glibc: str, dest: Path) -> list[str]:
    """pip download of the pinned wheels for CPython ``python`` on a manylinux host; nothing else
    (no dependencies resolved, no source builds)."""
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--quiet",
           "--retries", "1", "--timeout", "20", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "--abi", abi, "--dest", str(dest)]
    for tag in platform_tags(machine, glibc):
        cmd += ["--platform", tag]
    return cmd + [f"{dist}=={version}" for dist, version in sorted(PINS[python].items())]


def _archive_path(rid: str) -> tuple[Path, bool]:
    out = cache_dir() / "runtime" / f"{rid}.tar.gz"
    out.parent.mkdir(mode=0o700, exist_ok=True)
    return out, out.exists()


def _from_pypi(python: str, machine: str, glibc: str) -> Runtime:
    rid = runtime_id(python, machine, glibc)
    out, exists = _archive_path(rid)
    if not exists:
        with tempfile.TemporaryDirectory(prefix="slipway-runtime-") as tmp:
            wheels = Path(tmp) / "wheels"
            _download(python, machine, glibc, wheels)
            site = Path(tmp) / "site"
            unpack_wheels(sorted(wheels.glob("*.whl")), site)
            members = _members(site, f"the wheels of {', '.join(f'{d} {v}' for d, v in sorted(PINS[python].items()))}")
            _deterministic_tar(out, members)
    return Runtime(rid, out, python, dict(PINS[python]), "pypi", cached=exists)


def _download(python: str, machine: str, glibc: str, dest: Path) -> None:
    label = f"Python {python} ({machine}, glibc {glibc})"
    fix = (f"the controller needs PyPI (or a mirror in PIP_INDEX_URL) once per host Python version; or set the "
           f"host's ansible_python_interpreter to a Python {controller_python()} (served from the controller's venv)")
    try:
        proc = subprocess.run(pip_download_command(python, machine, glibc, dest), capture_output=True, text=True,
                              timeout=PIP_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlipwayError(f"downloading slipway's module runtime for {label} from PyPI took over {PIP_TIMEOUT} s; "
                           + fix) from None
    if proc.returncode != 0:
        said = [line.strip() for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()]
        cause = next((line for line in reversed(said) if line.startswith("ERROR")), said[-1] if said else "no output")
        raise SlipwayError(f"cannot download slipway's module runtime for {label} from PyPI "
                           f"(pip: {cause[:300]}); {fix}")


def unpack_wheels(wheels: list[Path], site: Path) -> None:
    """The runtime's packages out of ``wheels`` into ``site`` (a wheel is a zip laid out as
    site-packages), executable bits kept; names outside ``site`` are refused."""
    site.mkdir(parents=True, exist_ok=True)
    root = site.resolve()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                top = info.filename.split("/", 1)[0]
                if info.is_dir() or top not in PACKAGES:
                    continue
                target = (site / info.filename).resolve()
                if root not in target.parents:
                    raise SlipwayError(f"{wheel.name} holds a file outside its package ({info.filename}); not unpacked")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))
                mode = (info.external_attr >> 16) & 0o777
                if mode & stat.S_IXUSR:
                    target.chmod(0o755)


def extravars(built: dict[str, Runtime]) -> dict:
    """What the playbooks get: ``slipway_runtimes`` {X.Y: {id, archive}}; preflight picks the one
    of the Python it finds on the host."""
    return {"slipway_runtimes": {xy: {"id": rt.id, "archive": str(rt.archive)} for xy, rt in built.items()}}
