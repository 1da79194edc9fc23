"""bench/step_profile.py's per-round ratio statistics (the figures BENCHMARKS.md quotes) and its
before-a-change variants."""
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch

from codetr.model.builder import build_criterion, build_model
from codetr.spec import load_spec
from tests.autograd_graph import VIEW_REBASE, graph_nodes
from tests.tiny_detector import TINY_HEAD, fixed_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from step_profile import nd_rows, round_ratios, split_variant  # noqa: E402


def test_round_ratios_cancel_a_load_change_between_rounds():
    rng = random.Random(random.getrandbits(32))  # conftest seeds `random` per test
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


def test_nd_rows_restores_the_view_rebasing_forwards_with_the_same_values():
    """The `_nd_rows` variant times what `flat_rows` removed: CopySlices back in the graph, the
    loss and its gradients unchanged."""
    spec = load_spec(None, TINY_HEAD + ["model.backbone=resnet_18", "train.activation_checkpoint=false"])
    torch.manual_seed(0)
    model = build_model(spec, num_classes=3).train()
    criterion = build_criterion(spec, num_classes=3)
    images, masks, targets = fixed_batch()
    results = []
    for patch in (False, True):
        if patch:
            nd_rows(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same denoising draws
        loss = sum(criterion(model(images, masks, targets), targets).values())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                        graph_nodes(loss)))
    (loss_a, grads_a, nodes_a), (loss_b, grads_b, nodes_b) = results
    assert not nodes_a & VIEW_REBASE and nodes_b >= VIEW_REBASE
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
