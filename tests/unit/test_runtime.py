"""Unit tests of the module runtime's choices (slipway/runtime.py, the probe's parts in
slipway/remote.py): the per-version table, the platform tags, what is built for which hosts, the
pip command, the archive from wheels, and the probe's parsing. No host, no network."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from slipway import remote, runtime
from slipway.errors import SlipwayError


def host(name="h1", version="3.9.18", machine="x86_64", glibc="2.36", implementation="CPython"):
    return runtime.HostPython(host=name, interpreter="/opt/python/bin/python3", version=version,
                              implementation=implementation, machine=machine, glibc=glibc)


def test_table_pins_every_python_from_3_9_to_3_13_with_versions_that_exist_for_it():
    assert list(runtime.PINS) == ["3.9", "3.10", "3.11", "3.12", "3.13"]
    for xy, pins in runtime.PINS.items():
        assert set(pins) == {"psycopg", "psycopg-binary", "pglast", "typing-extensions"}, xy
        assert pins["psycopg"] == pins["psycopg-binary"], xy
    # psycopg 3.3 and pglast 8 need Python >= 3.10: 3.9 gets the last releases with its wheels
    assert runtime.PINS["3.9"]["psycopg"].startswith("3.2.") and runtime.PINS["3.9"]["pglast"].startswith("7.")
    for xy in ("3.10", "3.11", "3.12", "3.13"):
        assert runtime.PINS[xy]["psycopg"].startswith("3.3.") and runtime.PINS[xy]["pglast"].startswith("8."), xy


def test_platform_tags_run_from_the_hosts_glibc_down_to_manylinux2014():
    tags = runtime.platform_tags("x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert tags[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert len(tags) == 36 - 17 + 2
    assert runtime.platform_tags("aarch64", "2.17") == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    with pytest.raises(SlipwayError, match="older than 2.17"):
        runtime.platform_tags("x86_64", "2.12")


def test_plan_builds_one_runtime_per_python_for_the_oldest_glibc_of_its_hosts():
    found = [host("a", "3.9.18", glibc="2.36"), host("b", "3.9.2", glibc="2.31"), host("c", "3.13.0"),
             host("d", "3.11.2")]
    assert runtime.plan(found) == {"3.9": ("x86_64", "2.31"), "3.11": ("x86_64", "2.36"), "3.13": ("x86_64", "2.36")}


@pytest.mark.parametrize("found, words", [
    (host(version="3.8.18"), "(Python 3.8.18); slipway's module runtime is built for Python 3.9 to 3.13 only"),
    (host(version="3.14.0"), "built for Python 3.9 to 3.13"),
    (host(implementation="PyPy"), "which is PyPy"),
    (host(glibc=None), "not linked against glibc"),
    (host(glibc="2.12"), "older than 2.17"),
])
def test_plan_refuses_a_python_it_cannot_serve_in_one_line_with_the_fix(found, words):
    with pytest.raises(SlipwayError) as caught:
        runtime.plan([found])
    message = str(caught.value)
    assert words in message and "\n" not in message
    assert "h1 runs slipway's modules with /opt/python/bin/python3" in message
    if "glibc 2.12" not in message:
        assert "set ansible_python_interpreter for the host in the inventory" in message


def test_plan_refuses_one_python_on_two_architectures():
    with pytest.raises(SlipwayError, match=r"a \(x86_64\), b \(aarch64\); deploy each architecture's hosts"):
        runtime.plan([host("a"), host("b", machine="aarch64")])


def test_pip_download_asks_for_the_pinned_wheels_of_that_python_and_platform_only(tmp_path):
    cmd = runtime.pip_download_command("3.9", "x86_64", "2.28", tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    text = " ".join(cmd)
    for part in ("--only-binary=:all:", "--no-deps", "--python-version 3.9", "--implementation cp", "--abi cp39",
                 f"--dest {tmp_path}", "--platform manylinux_2_28_x86_64", "--platform manylinux2014_x86_64"):
        assert part in text, part
    assert "manylinux_2_29" not in text
    assert cmd[-4:] == ["pglast==7.22", "psycopg==3.2.13", "psycopg-binary==3.2.13", "typing-extensions==4.16.0"]
    assert "--abi cp313" in " ".join(runtime.pip_download_command("3.13", "aarch64", "2.36", tmp_path))


def test_runtime_id_names_the_python_and_package_versions_and_changes_with_the_platform():
    rid = runtime.runtime_id("3.9", "x86_64", "2.36")
    assert rid.startswith("py39-psycopg3.2.13-pglast7.22-x86_64-") and rid == runtime.runtime_id("3.9", "x86_64", "2.36")
    assert runtime.runtime_id("3.9", "x86_64", "2.31") != rid
    assert runtime.runtime_id("3.9", "aarch64", "2.36").startswith("py39-psycopg3.2.13-pglast7.22-aarch64-")
    assert runtime.runtime_id("3.13", "x86_64", "2.36").startswith("py313-psycopg3.3.9-pglast8.8-x86_64-")


def test_the_controllers_python_is_served_from_the_venv_without_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"ran {args[0]!r}")

    monkeypatch.setattr(subprocess, "run", no_network)
    own = runtime.build()
    assert own.origin == "venv" and own.python == runtime.controller_python()
    assert own.id.startswith(f"py{own.python.replace('.', '')}-psycopg{own.packages['psycopg']}-pglast")
    assert own.archive.is_file()
    # the venv's manylinux2014 wheels fit any host of this architecture with glibc >= 2.17
    machine = runtime._controller_machine()
    assert runtime._venv_fits(machine, "2.17") and not runtime._venv_fits("riscv64", "2.36")


def _wheel(path: Path, files: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _fake_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _wheel(dest / "psycopg-3.2.13-py3-none-any.whl", {
        "psycopg/__init__.py": (b"v = 1\n", 0o644), "psycopg/py.typed": (b"", 0o644),
        "psycopg/__pycache__/x.pyc": (b"junk", 0o644), "psycopg-3.2.13.dist-info/METADATA": (b"m", 0o644)})
    _wheel(dest / "psycopg_binary-3.2.13-cp39-cp39-manylinux2014_x86_64.whl", {
        "psycopg_binary/_psycopg.cpython-39-x86_64-linux-gnu.so": (b"\x7fELF", 0o755),
        "psycopg_binary/_psycopg.pyi": (b"stub", 0o644),
        "psycopg_binary.libs/libpq-1.so.5": (b"\x7fELF", 0o755)})
    _wheel(dest / "pglast-7.22-cp39-cp39-manylinux2014_x86_64.whl", {
        "pglast/__init__.py": (b"", 0o644), "pglast/parser.cpython-39-x86_64-linux-gnu.so": (b"\x7fELF", 0o755),
        "pglast/parser.c": (b"/* c */", 0o644)})
    _wheel(dest / "typing_extensions-4.16.0-py3-none-any.whl", {"typing_extensions.py": (b"", 0o644)})


def test_a_runtime_from_wheels_is_a_deterministic_archive_of_the_packages_only(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_download", lambda python, machine, glibc, dest: _fake_wheels(dest))
    archives = []
    for cache in ("one", "two"):
        monkeypatch.setenv("SLIPWAY_CACHE", str(tmp_path / cache))
        built = runtime.build("3.9", "x86_64", "2.36")
        assert built.origin == "pypi" and not built.cached and built.python == "3.9"
        assert built.id == runtime.runtime_id("3.9", "x86_64", "2.36")
        assert built.archive == tmp_path / cache / "runtime" / f"{built.id}.tar.gz"
        archives.append(built.archive.read_bytes())
        assert runtime.build("3.9", "x86_64", "2.36").cached
    assert archives[0] == archives[1]
    with tarfile.open(tmp_path / "one" / "runtime" / f"{built.id}.tar.gz") as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert sorted(modes) == ["pglast/__init__.py", "pglast/parser.cpython-39-x86_64-linux-gnu.so",
                             "psycopg/__init__.py", "psycopg/py.typed",
                             "psycopg_binary.libs/libpq-1.so.5", "psycopg_binary/_psycopg.cpython-39-x86_64-linux-gnu.so",
                             "typing_extensions.py"]
    assert modes["pglast/parser.cpython-39-x86_64-linux-gnu.so"] == 0o755 and modes["psycopg/__init__.py"] == 0o644


def test_a_wheel_with_a_path_outside_its_package_is_refused(tmp_path):
    wheel = _wheel(tmp_path / "pglast-7.22-cp39-cp39-manylinux2014_x86_64.whl",
                   {"pglast/../../escape.py": (b"", 0o644)})
    with pytest.raises(SlipwayError, match="outside its package"):
        runtime.unpack_wheels([wheel], tmp_path / "site")


def test_a_failed_download_is_one_line_with_its_cause_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIPWAY_CACHE", str(tmp_path))
    said = ("Looking in indexes: https://pypi.org/simple\n"
            "ERROR: Could not find a version that satisfies the requirement pglast==7.22 (from versions: none)\n"
            "ERROR: No matching distribution found for pglast==7.22\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", said))
    with pytest.raises(SlipwayError) as caught:
        runtime.build("3.9", "x86_64", "2.36")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot download slipway's module runtime for Python 3.9 (x86_64, glibc 2.36) from PyPI "
                              "(pip: ERROR: No matching distribution found for pglast==7.22); ")
    assert "PIP_INDEX_URL" in message and "ansible_python_interpreter" in message
    assert not list((tmp_path / "runtime").iterdir())  # nothing half-made is cached


def test_the_probe_finds_python_as_ansibles_discovery_does_and_reads_its_platform(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3.12").symlink_to(sys.executable)
    cmd = remote.python_probe_command([], ["python3.13", "python3.12", "/nonexistent/python3", "python3"])
    proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, env={"PATH": str(bin_dir)}, check=False)
    found = remote.parse_python_probe("h1", proc.stdout, proc.stderr, proc.returncode)
    assert found.interpreter == str(bin_dir / "python3.12")
    assert found.python == runtime.controller_python() and found.implementation == "CPython"
    assert found.machine == runtime._controller_machine() and found.glibc == runtime._controller_glibc()
    given = remote.python_probe_command([sys.executable, "-I"], [])
    proc = subprocess.run(["sh", "-c", given], capture_output=True, text=True, check=False)
    assert remote.parse_python_probe("h1", proc.stdout, proc.stderr, 0).interpreter == f"{sys.executable} -I"


def test_a_probe_without_a_python_names_the_interpreter_and_the_fix():
    proc = subprocess.run(["sh", "-c", remote.python_probe_command(["/nonexistent/python3.9"], [])],
                          capture_output=True, text=True, check=False)
    with pytest.raises(SlipwayError) as caught:
        remote.parse_python_probe("h1", proc.stdout, proc.stderr, proc.returncode)
    message = str(caught.value)
    assert message.startswith("cannot run h1's module Python /nonexistent/python3.9 (")
    assert message.endswith("set ansible_python_interpreter for the host in the inventory") and "\n" not in message


class _Vars:
    def __init__(self, **values):
        self.values = values

    def render(self, key):
        return self.values.get(key)


def test_the_interpreter_is_the_inventorys_or_else_discovered():
    assert remote.module_interpreter("h1", _Vars(ansible_python_interpreter="/usr/bin/env python3.9")) == \
        (["/usr/bin/env", "python3.9"], [])
    command, fallback = remote.module_interpreter("h1", _Vars(ansible_python_interpreter="auto_silent"))
    assert command == [] and fallback[0].startswith("python3.") and "/usr/bin/python3" in fallback
    os.environ.setdefault("ANSIBLE_CONFIG", str(Path(__file__).resolve().parents[2] / "ansible.cfg"))
    assert remote.module_interpreter("h1", _Vars())[0] == []  # ansible.cfg: interpreter_python = auto_silent


def test_statement_texts_start_at_their_first_token_with_pglast_7_as_with_8():
    from ansible_collections.slipway.core.plugins.module_utils.statements import _without_leading_comments, split_chunk

    assert _without_leading_comments("-- one\n  /* two /* nested */ */\n-- three\nSELECT 1 -- kept") == "SELECT 1 -- kept"
    assert _without_leading_comments("/* open") == "/* open"
    texts = [s["text"] for s in split_chunk("-- consolidate first\nUPDATE t SET a = 1;\n/* then */ DELETE FROM t")["statements"]]
    assert texts == ["UPDATE t SET a = 1", "DELETE FROM t"]
