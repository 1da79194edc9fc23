"""`make setup` installs only pinned versions (pip and the build backend too) and refuses a Python
the pins do not run on, before it creates anything."""
import random
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PINS = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#"))
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _min_python() -> str:
    spec = PYPROJECT["project"]["requires-python"]
    found = re.fullmatch(r">=\s*(\d+\.\d+)", spec)
    assert found, f"requires-python {spec!r}: expected a single lower bound"
    return found.group(1)


def test_requires_python_admits_no_python_a_pinned_package_refuses():
    """The oldest Python pyproject.toml admits runs every pinned package installed here."""
    oldest = f"{_min_python()}.0"
    refused = {}
    for name, version in PINS.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        requires = dist.metadata.get("Requires-Python")
        if dist.version == version and requires and not SpecifierSet(requires).contains(oldest):
            refused[name] = requires
    assert not refused, f"requires-python >={_min_python()} but the pins need: {refused}"


def test_pip_and_the_build_backend_are_pinned():
    assert "pip" in PINS
    for req in map(Requirement, PYPROJECT["build-system"]["requires"]):
        assert req.name in PINS and req.specifier.contains(PINS[req.name]), f"{req}: not pinned"


def _setup_copy(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


@needs_make
def test_every_install_command_is_pinned_and_builds_with_the_pinned_backend(tmp_path):
    plan = subprocess.run(["make", "-n", "setup", "bench"], cwd=_setup_copy(tmp_path),
                          capture_output=True, text=True, check=True).stdout
    installs = [line for line in plan.splitlines() if re.search(r"\bpip install\b", line)]
    assert len(installs) >= 3, plan
    for line in installs:
        assert "-c constraints.txt" in line, line
        # the project itself: built by the venv's pinned setuptools, not an isolated newest one
        if " -e " in line:
            assert "--no-build-isolation" in line, line
    upgrade = next(line for line in installs if "--upgrade" in line)
    assert {"pip", "setuptools"} <= set(upgrade.split()), upgrade
    assert installs.index(upgrade) == 0, "pip and setuptools come first"


@needs_make
def test_make_setup_refuses_an_old_python_before_creating_the_venv(tmp_path):
    minor = random.randint(6, int(_min_python().split(".")[1]) - 1)
    fake = tmp_path / "python3"
    # a Python that reports 3.<minor> for `-c` code (what the Makefile's check runs) and can do
    # nothing else: if make got past the check, `-m venv` would fail with another message
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.version_info = (3, {minor}, 1, 'final', 0)\n"
                    "if sys.argv[1:2] != ['-c']:\n    sys.exit('fake python: -c only')\n"
                    "code, sys.argv = sys.argv[2], ['-c', *sys.argv[3:]]\n"
                    "exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})\n")
    fake.chmod(0o755)
    (tmp_path / "repo").mkdir()
    repo = _setup_copy(tmp_path / "repo")
    proc = subprocess.run(["make", f"PYTHON={fake}", "setup"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"is Python 3.{minor}; codetr needs Python >= {_min_python()}" in proc.stderr, proc.stderr
    assert "fake python" not in proc.stderr and not (repo / ".venv").exists()
