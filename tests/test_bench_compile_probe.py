"""bench/compile_probe.py compiles the part it names and trains the same model.

Dynamo's `eager` backend (graph capture, no code generation: seconds, not minutes) on fresh
seeds: the compiled variant's loss and gradients equal the eager model's on the same batch and
noise. Tolerance 1e-5 relative: the same ops, possibly reordered sums; the real-grid permute
only moves the same numbers.
"""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compile_probe  # noqa: E402
from step_profile import PARAMS, Variant, synthetic_data  # noqa: E402


def _loss_and_grads(variant: Variant, batch, seed: int):
    variant.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with variant.context():
        outputs = variant.model(batch.images, batch.masks, batch.targets)
        loss = sum(variant.criterion(outputs, batch.targets).values())
        loss.backward()
    grads = {n: p.grad.clone() for n, p in variant.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("part", ["encoder", "encoder_real_grid"])
def test_compiled_part_trains_the_same_model(tmp_path, part):
    data = synthetic_data(PARAMS, tmp_path, 40, 10)
    eager = Variant("ours_no_co", data, 2, clock=time.perf_counter)
    compiled = Variant("ours_no_co", data, 2, clock=time.perf_counter)
    compile_probe.compile_part(compiled, part, "eager")
    owner = compiled.model.query_head.transformer
    assert isinstance(owner.encoder, torch._dynamo.eval_frame.OptimizedModule)
    batch, seed = eager.batch(), int(torch.seed() % 2**31)
    loss, grads = _loss_and_grads(eager, batch, seed)
    loss_c, grads_c = _loss_and_grads(compiled, batch, seed)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    names = {n.replace("._orig_mod", "") for n in grads_c}
    assert names == set(grads)
    for name, grad in grads_c.items():
        torch.testing.assert_close(grad, grads[name.replace("._orig_mod", "")], rtol=1e-5, atol=1e-6,
                                   msg=name)
