"""Test-wide settings: offline hub, few threads (2-core machines), shared fixtures."""
import atexit
import os
import random
import secrets
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# The image-check cache of the test run (and of the subprocesses it starts) stays out of ~/.cache.
if "CODETR_CACHE_DIR" not in os.environ:
    os.environ["CODETR_CACHE_DIR"] = tempfile.mkdtemp(prefix="codetr_test_cache_")
    atexit.register(shutil.rmtree, os.environ["CODETR_CACHE_DIR"], True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

_PASSED = pytest.StashKey[bool]()
_SEED = pytest.StashKey[int]()
SEED_ENV = "CODETR_TEST_SEED"


def _test_seed() -> int:
    value = os.environ.get(SEED_ENV, "")
    if not value:
        return secrets.randbits(31)
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={value!r}: expected an integer seed") from None


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test starts from a fresh seed of torch's, numpy's and Python's global generators
    (fresh random inputs per check, independent of which tests ran before), reported when the test
    fails so that `CODETR_TEST_SEED=<seed> pytest <test>` replays it. A test that seeds itself
    (`torch.manual_seed(k)`) stays fixed."""
    seed = _test_seed()
    request.node.stash[_SEED] = seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A passed test's `tmp_path` is removed at its teardown, not at the end of the run: the
    real-size checkpoints and pipeline copies of the suite sum to ~11 GB, which a CI disk shared
    with the 5.5 GB venv may not hold. A failed test's folder stays for inspection."""
    report = yield
    if report.failed and _SEED in item.stash:
        report.sections.append(("seed", f"replay with {SEED_ENV}={item.stash[_SEED]}"))
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    elif report.when == "teardown" and item.stash.get(_PASSED, False):
        path = (getattr(item, "funcargs", None) or {}).get("tmp_path")
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
    return report

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"


@pytest.fixture
def coco128() -> Path:
    """The 128 real COCO images of ../shared/data/coco128; skips when absent."""
    if not (COCO128 / "annotations" / "instances.json").exists():
        pytest.skip("../shared/data/coco128 is not present")
    return COCO128

MMDET_REFERENCE = REPO.parent / "shared" / "reference" / "mmdet-codino"


@pytest.fixture
def mmdet_reference() -> Path:
    """The official mmdet Co-DINO reference of ../shared/reference/mmdet-codino; skips when absent."""
    if not (MMDET_REFERENCE / "tiny_state_dict.pth").exists():
        pytest.skip("../shared/reference/mmdet-codino is not present")
    return MMDET_REFERENCE
