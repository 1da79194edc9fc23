"""bench/compile_probe.py compiles the part it names and trains the same model.

Dynamo's `eager` backend (graph capture, no code generation: seconds, not minutes) on fresh
seeds: the compiled variant's loss and gradients equal the eager model's on the same batch and
noise, bit for bit (the same aten ops; the real-pair grid permute moves the same numbers), and
the real-grid patch is seen inside the encoder only, never by the trunk (whose depthwise
weight-gradient route it would change).
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
    outputs = variant.model(batch.images, batch.masks, batch.targets)
    loss = sum(variant.criterion(outputs, batch.targets).values())
    loss.backward()
    grads = {n.replace("._orig_mod", "").replace(".module.", "."): p.grad.clone()
             for n, p in variant.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _export_flag_seen(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_hook(lambda *_: seen.append(torch.onnx.is_in_onnx_export()))


@pytest.mark.parametrize("part", ["encoder", "encoder_real_grid"])
def test_compiled_part_trains_the_same_model(tmp_path, part):
    data = synthetic_data(PARAMS, tmp_path, 40, 10)
    eager = Variant("ours_no_co", data, 2, clock=time.perf_counter)
    compiled = Variant("ours_no_co", data, 2, clock=time.perf_counter)
    trunk_flags, encoder_flags = [], []
    _export_flag_seen(compiled.model.backbone.body, trunk_flags)
    _export_flag_seen(compiled.model.query_head.transformer.encoder.layers[0], encoder_flags)
    compile_probe.compile_part(compiled, part, "eager")
    encoder = compiled.model.query_head.transformer.encoder
    encoder = encoder.module if part == "encoder_real_grid" else encoder  # the patching wrapper
    assert isinstance(encoder, torch._dynamo.eval_frame.OptimizedModule)
    batch, seed = eager.batch(), int(torch.randint(2**31, ()))
    loss, grads = _loss_and_grads(eager, batch, seed)
    loss_c, grads_c = _loss_and_grads(compiled, batch, seed)
    assert torch.equal(loss_c, loss), (seed, loss_c, loss)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads_c.items():
        assert torch.equal(grad, grads[name]), (name, seed)
    assert trunk_flags == [False]
    assert encoder_flags == [part == "encoder_real_grid"]


def test_probe_reports_both_variants(tmp_path):
    r = compile_probe.probe("encoder", rounds=2, backend="eager", out_dir=tmp_path, num_train=16,
                            num_val=4, batch=2)
    assert r["loss_eager"] == r["loss_compiled"]  # the same first batch and noise
    assert r["eager_s"] > 0 and r["compiled_s"] > 0 and r["compile_s"] > 0
    assert r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
