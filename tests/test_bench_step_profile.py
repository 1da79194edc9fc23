"""bench/step_profile.py's per-round ratio statistics (the figures BENCHMARKS.md quotes)."""
import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from step_profile import round_ratios, split_variant  # noqa: E402


def test_round_ratios_cancel_a_load_change_between_rounds():
    rng = random.Random()
    load = [rng.uniform(1.0, 3.0) for _ in range(15)]  # the machine's slowdown, per round
    ours = [0.40 * s * rng.uniform(0.99, 1.01) for s in load]
    base = [0.32 * s * rng.uniform(0.99, 1.01) for s in load]
    mid, low, high = round_ratios(ours, base)
    assert low <= mid <= high
    assert mid == pytest.approx(1.25, rel=0.03) and high - low < 0.06
    # the ratio of medians does not see the pairing: it can be far off when the load moves
    ratios = sorted(a / b for a, b in zip(ours, base))
    assert mid == pytest.approx(statistics.median(ratios))


def test_round_ratios_of_one_round():
    assert round_ratios([0.5], [0.25]) == (2.0, 2.0, 2.0)


def test_variant_names_split_into_model_and_before_suffix():
    assert split_variant("ours_no_co_onednn_dw") == ("ours_no_co", "_onednn_dw")
    assert split_variant("ours_per_tower") == ("ours", "_per_tower")
    assert split_variant("peer") == ("peer", "")
