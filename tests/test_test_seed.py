"""The suite's per-test seed (tests/conftest.py): each test starts from a fresh seed, a failing
test reports it, and `CODETR_TEST_SEED=<seed>` replays the same random inputs."""
import os
import re
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")
PROBE = '''
import numpy as np, random, torch

def test_a():
    raise AssertionError(f"draws {torch.rand(2).tolist()} {np.random.rand()} {random.random()}")

def test_b():
    raise AssertionError(f"draws {torch.rand(2).tolist()} {np.random.rand()} {random.random()}")
'''


def _run(folder: Path, seed: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CODETR_TEST_SEED"}
    if seed is not None:
        env["CODETR_TEST_SEED"] = seed
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rN",
                           str(folder)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def _failed_run(folder: Path, seed: str | None) -> str:
    done = _run(folder, seed)
    assert done.returncode == 1, done.stdout + done.stderr  # both probe tests fail, by design
    return done.stdout


def _draws(out: str) -> list[str]:
    return re.findall(r"AssertionError: (draws .*)", out)


def test_fresh_seed_per_test_reported_and_replayed(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_probe.py").write_text(PROBE)
    out = _failed_run(tmp_path, None)
    seeds = re.findall(r"replay with CODETR_TEST_SEED=(\d+)", out)
    draws = _draws(out)
    assert len(seeds) == 2 and len(draws) == 2, out
    assert seeds[0] != seeds[1] and draws[0] != draws[1]  # 1 in 2**31 to collide
    assert _draws(_failed_run(tmp_path, seeds[1]))[1] == draws[1]  # torch, numpy and random replayed
    again = _failed_run(tmp_path, None)
    assert _draws(again) != draws  # a fresh run draws afresh
    bad = _run(tmp_path, "x7")
    assert bad.returncode != 0 and "CODETR_TEST_SEED='x7': expected an integer seed" in (
        bad.stdout + bad.stderr)
