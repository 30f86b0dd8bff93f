"""Hosts whose module Python is not the controller's: a real `invoke deploy` of the reference app
(incident state) to a sandbox host running slipway's modules with Python 3.9 and one with 3.13.

The interpreters are this machine's pyenv builds (/root/.pyenv/versions), copied under each host's
/tmp tree (root-owned, readable by all, as a system Python would be: /root is 0700, so a host user
cannot run them in place) with their RUNPATH pointed at the copy's own lib/ (patchelf; ./bootstrap
installs it). The inventory's ansible_python_interpreter names them through a host_vars file next
to the sandbox's inventory. Each host must get the runtime built for its own version (wheels
downloaded from PyPI into a cache of the test's own: the controller needs PyPI) and the migration
must apply; a second deploy finds both runtimes cached and changes nothing. Then module_utils'
reading of the reference app's and the corpus' SQL with pglast 7 (the 3.9 runtime) is compared
with pglast 8's (the controller's).

Sandbox instance 9 (users sw9-*, addresses 127.0.0.191+), two hosts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import ROOT, cli, host_env, sandbox_up, sb

PYENV = Path("/root/.pyenv/versions")
INSTANCE = "9"
TAG_0007 = "0007_add_unique_constraint_book_view_statistics"
HOST_PYTHONS = {"sandbox": "3.9", "sandbox-2": "3.13"}
CORPUS = ROOT.parent / "shared" / "corpus" / "drizzle"
REPORT = Path("/tmp/slipway-test-host-python-report.json")
# not needed to run modules; big (the test suite alone is 70-140 MB)
_NOT_COPIED = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "__pycache__", "site-packages"}


def pyenv_build(xy: str) -> Path | None:
    """The newest pyenv build of Python ``xy`` on this machine, or None."""
    found = sorted((p for p in PYENV.glob(f"{xy}.*") if (p / "bin" / f"python{xy}").is_file()),
                   key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
    return found[-1] if found else None


if not PYENV.is_dir():
    pytest.skip(f"{PYENV} is absent: no Python 3.9/3.13 builds to give the sandbox hosts", allow_module_level=True)
_MISSING = [xy for xy in HOST_PYTHONS.values() if pyenv_build(xy) is None]
if _MISSING:
    pytest.skip(f"{PYENV} holds no build of Python {', '.join(_MISSING)}", allow_module_level=True)


def copy_python(src: Path, dest: Path, xy: str) -> Path:
    """A copy of pyenv's build ``src`` at ``dest`` that any user can run: its modules (tests and
    site-packages aside), libpython, and the interpreter with RUNPATH ``$ORIGIN/../lib``."""
    if shutil.which("patchelf") is None:
        pytest.fail("patchelf is not installed; run ./bootstrap (it installs Debian's patchelf)")

    def ignore(directory, names):
        if Path(directory) == src / "bin":
            return [n for n in names if n != f"python{xy}"]
        return [n for n in names if n in _NOT_COPIED or n.startswith("config-") or n.endswith(".a")]

    shutil.copytree(src / "bin", dest / "bin", ignore=ignore)
    shutil.copytree(src / "lib", dest / "lib", ignore=ignore, symlinks=True)
    (dest / "lib" / f"python{xy}" / "site-packages").mkdir()
    python = dest / "bin" / f"python{xy}"
    subprocess.run(["patchelf", "--set-rpath", "$ORIGIN/../lib", str(python)], check=True)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return python


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with sandbox_up(INSTANCE, hosts=2, state="incident", switch=True) as env:
        # a cache of its own: the first deploy really downloads both runtimes
        found = {h.name: h for h in sb.hosts_in_record()}
        ctl = sb.Controller()
        pythons = {}
        for name, xy in HOST_PYTHONS.items():
            src = pyenv_build(xy)
            pythons[name] = copy_python(src, found[name].root / f"python-{src.name}", xy)
            override = ctl.inventory_dir / "host_vars" / name / "python.yml"
            override.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            override.write_text("# test_host_python.py: this host runs slipway's modules with its own Python\n"
                                + yaml.safe_dump({"ansible_python_interpreter": str(pythons[name])}))
        deploy_env = {**env, "SLIPWAY_CACHE": str(tmp_path_factory.mktemp("cache"))}
        yield {"hosts": found, "pythons": pythons, "env": deploy_env, "db": {n: host_env(n, env) for n in found}}


def run_as(user: str, argv: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin",
                           *[f"{k}={v}" for k, v in (env or {}).items()], *argv],
                          capture_output=True, text=True, check=False, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_probe_finds_each_hosts_python_over_ssh(hosts):
    from slipway.remote import close_all, probe_pythons

    found, conns = probe_pythons(list(HOST_PYTHONS))
    close_all(conns)
    for name, xy in HOST_PYTHONS.items():
        assert found[name].python == xy and found[name].interpreter == str(hosts["pythons"][name])
        assert found[name].implementation == "CPython" and found[name].glibc


def test_deploy_builds_each_hosts_runtime_for_its_python_and_migrates(hosts):
    REPORT.unlink(missing_ok=True)
    proc = cli("deploy", "--host", "sandboxes", "--report", str(REPORT), check=False, timeout=900, env=hosts["env"])
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    report = json.loads(REPORT.read_text())
    assert report["result"] == "ok"
    for name, xy in HOST_PYTHONS.items():
        host = hosts["hosts"][name]
        tag = "py" + xy.replace(".", "")
        pins = {"3.9": "psycopg3.2.13-pglast7.22", "3.13": "psycopg3.3.9-pglast8.8"}[xy]
        line = next(line for line in lines if line.startswith(f"  runtime {tag}-"))
        assert f"runtime {tag}-{pins}-x86_64-" in line and "(PyPI wheels, downloaded now)" in line, line
        assert f"for Python {xy}: {name} ({hosts['pythons'][name]}, {xy}." in line, line
        # the host unpacked that runtime, and its compiled code is for the host's Python
        runtimes = sorted(p.name for p in (host.app_dir / ".slipway" / "runtime").iterdir())
        assert len(runtimes) == 1 and runtimes[0].startswith(f"{tag}-{pins}-"), runtimes
        unpacked = host.app_dir / ".slipway" / "runtime" / runtimes[0]
        assert (unpacked / ".complete").exists()
        abi = f"cpython-{xy.replace('.', '')}-x86_64-linux-gnu"
        assert (unpacked / "psycopg_binary" / f"_psycopg.{abi}.so").is_file()
        assert list((unpacked / "pglast").glob(f"parser.{abi}.so"))
        said = run_as(host.user, [str(hosts["pythons"][name]), "-c",
                                  "import sys, psycopg, pglast; print(sys.version_info[:2], psycopg.pq.__impl__)"],
                      env={"PYTHONPATH": str(unpacked)})
        assert said == f"({xy.replace('.', ', ')}) binary"
        # the deploy ran its modules there: plan, backup, migration, smoke tests
        info = report["hosts"][name]
        assert info["result"] == "ok" and TAG_0007 in info["migrations_applied"], info
        with psycopg.connect(hosts["db"][name]["DATABASE_URL"], autocommit=True) as conn:
            count = conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = %s", (sb.UNIQUE_CONSTRAINT,)).fetchone()[0]
        assert count == 1


def test_a_second_deploy_uses_the_cached_runtimes_and_changes_nothing(hosts):
    REPORT.unlink(missing_ok=True)
    proc = cli("deploy", "--host", "sandboxes", "--report", str(REPORT), check=False, timeout=600, env=hosts["env"])
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    runtime_lines = [line for line in proc.stdout.splitlines() if line.startswith("  runtime ")]
    assert len(runtime_lines) == 2 and all("(PyPI wheels, cached)" in line for line in runtime_lines), runtime_lines
    report = json.loads(REPORT.read_text())
    assert report["result"] == "ok" and report["changed"] == 0, report["hosts"]


def test_preflight_refuses_a_host_whose_python_has_no_runtime_with_the_fix(hosts):
    """The runtime entry point (playbooks/runtime.yml) given runtimes for other Pythons only, as
    when Ansible's own interpreter discovery finds another Python than the deploy's probe did."""
    from slipway import runtime
    from slipway.runner import run_playbook

    own = runtime.build()  # the controller's Python (3.11 here), not the host's 3.9
    result = run_playbook("runtime.yml", "sandbox", runtime.extravars({own.python: own}))
    assert result["rc"] != 0
    message = " ".join(f["msg"] for f in result["failures"])
    assert (f"sandbox runs modules with Python 3.9 ({hosts['pythons']['sandbox']}) but no slipway runtime was "
            f"built for it (built for: {own.python}); set ansible_python_interpreter") in message, message


# module_utils' view of SQL under the 3.9 runtime (pglast 7) and the controller's (pglast 8)
_READ_SQL = r'''
import glob, json, os, sys
from ansible_collections.slipway.core.plugins.module_utils import migrate, statements as st

out = {}
for root in sys.argv[1:]:
    for path in sorted(glob.glob(os.path.join(root, "**", "*.sql"), recursive=True)):
        with open(path, encoding="utf-8") as handle:
            chunks = handle.read().split("--> statement-breakpoint")
        for n, chunk in enumerate(chunks):
            if not chunk.strip():
                continue
            split = st.split_chunk(chunk)
            stmts = []
            for s in split["statements"]:
                node = s["node"]
                build = st.index_build(node)
                stmts.append({"text": s["text"], "txn": s["txn"], "kind": type(node).__name__,
                              "scope": st.scope(node), "writes": st.writes_rows(node),
                              "build": {k: v for k, v in build.items() if k != "index_node"} if build else None,
                              "same": st.same_index(build["build"], build["index_node"]) if build else None})
            out["%s#%d" % (path, n)] = {"analysis": migrate.analyse_statement(chunk), "parsed": split["parsed"],
                                        "error": split["error"], "statements": stmts}
print(json.dumps(out, sort_keys=True, default=str))
'''


def test_module_utils_read_sql_alike_with_the_3_9_runtimes_pglast_7(tmp_path):
    from slipway import runtime

    built = runtime.build("3.9", runtime._controller_machine(), runtime._controller_glibc())
    site = tmp_path / "site"
    with tarfile.open(built.archive) as tar:
        tar.extractall(site, filter="data")
    (site / "ansible_collections").symlink_to(ROOT / "collections" / "ansible_collections")
    script = tmp_path / "read_sql.py"
    script.write_text(_READ_SQL)
    roots = [str(ROOT / "examples")] + ([str(CORPUS)] if CORPUS.is_dir() else [])
    python39 = pyenv_build("3.9") / "bin" / "python3.9"
    views = {}
    for label, argv, env in (("pglast 7", [str(python39)], {"PYTHONPATH": str(site)}),
                             ("pglast 8", [sys.executable], {})):
        proc = subprocess.run([*argv, str(script), *roots], capture_output=True, text=True, check=False,
                              env={**os.environ, **env}, timeout=600)
        assert proc.returncode == 0, f"{label}: {proc.stderr[-2000:]}"
        views[label] = json.loads(proc.stdout)
    assert len(views["pglast 8"]) > (1000 if CORPUS.is_dir() else 20)
    differ = [key for key, view in views["pglast 8"].items() if views["pglast 7"].get(key) != view]
    assert not differ, f"{len(differ)} chunk(s) read differently, first: {differ[0]}\n" \
                       f"{views['pglast 8'][differ[0]]}\n{views['pglast 7'].get(differ[0])}"
