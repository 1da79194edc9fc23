"""Test-wide settings: offline hub, few threads (2-core machines), shared fixtures."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

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
    """The mmdet Co-DINO numerical reference of ../shared/reference/mmdet-codino; skips when absent."""
    if not (MMDET_REFERENCE / "README.md").exists():
        pytest.skip("../shared/reference/mmdet-codino is not present")
    return MMDET_REFERENCE
