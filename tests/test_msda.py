"""Multi-scale deformable attention: reference vs a naive loop; level-major, gather and Triton paths vs reference.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors, in a
subprocess started with ``TRITON_INTERPRET=1`` (the variable must be set before Triton is
first imported), so shapes stay tiny. Inputs are fresh random draws every run.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch

from codetr.ops import (
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_cpu,
    multi_scale_deformable_attention_levels,
    multi_scale_deformable_attention_pytorch,
    select_backend,
)

# (batch, queries, heads, head_dim, points, level shapes (h, w)); odd sizes on purpose.
CASES = [
    (1, 10, 2, 4, 3, [(7, 5)]),
    (2, 6, 2, 8, 2, [(7, 5), (3, 11), (4, 4), (2, 3), (1, 1)]),
    (2, 70, 1, 6, 4, [(5, 7), (3, 2)]),  # 140 rows > one Triton block; D not a power of 2
]


def make_inputs(
    bs: int, num_queries: int, num_heads: int, head_dim: int, num_points: int, shapes: list[tuple[int, int]],
    dtype: torch.dtype = torch.float32, device: str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Random op inputs; locations in [-0.2, 1.2] with some exactly on the map edges 0 and 1."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_keys = int(sizes.sum())
    num_levels = len(shapes)
    value = torch.randn(bs, num_keys, num_heads, head_dim, dtype=dtype, device=device)
    loc = torch.rand(bs, num_queries, num_heads, num_levels, num_points, 2, dtype=dtype, device=device) * 1.4 - 0.2
    edge = torch.rand(loc.shape, device=device) < 0.1
    loc = torch.where(edge, torch.randint(0, 2, loc.shape, device=device).to(dtype), loc)
    logits = torch.randn(bs, num_queries, num_heads, num_levels * num_points, dtype=dtype, device=device)
    attn = logits.softmax(-1).view(bs, num_queries, num_heads, num_levels, num_points)
    return value, spatial_shapes, level_start_index, loc, attn


def naive_msda(value, spatial_shapes, level_start_index, loc, attn) -> torch.Tensor:
    """Explicit loops: bilinear interpolation with zero padding, pixel centres at (i + 0.5) / size."""
    bs, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = loc.shape
    out = torch.zeros(bs, num_queries, num_heads, head_dim, dtype=torch.float64)
    for b in range(bs):
        for q in range(num_queries):
            for h in range(num_heads):
                for lvl in range(num_levels):
                    height, width = (int(s) for s in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])
                    for p in range(num_points):
                        x = float(loc[b, q, h, lvl, p, 0]) * width - 0.5
                        y = float(loc[b, q, h, lvl, p, 1]) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < height and 0 <= xx < width:
                                bilinear = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                row = value[b, start + yy * width + xx, h].double()
                                out[b, q, h] += float(attn[b, q, h, lvl, p]) * bilinear * row
    return out.view(bs, num_queries, num_heads * head_dim)


def forward_and_grads(fn, inputs, grad_out=None) -> tuple[torch.Tensor, ...]:
    """Output and gradients for value, sampling_locations, attention_weights."""
    value, shapes, starts, loc, attn = (t.detach().clone() for t in inputs)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    out = fn(value, shapes, starts, loc, attn)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(), *grads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Error bounded relative to the tensor's scale (location grads grow with the map size)."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rel * 10, atol=rel * (1 + expected.abs().max().item()))


def assert_matches_reference(fn, case) -> None:
    """`fn`'s output and three gradients equal the reference's on fresh inputs of `case`."""
    inputs = make_inputs(*case)
    grad_out = torch.randn(case[0], case[1], case[2] * case[3])
    expected = forward_and_grads(multi_scale_deformable_attention_pytorch, inputs, grad_out)
    actual = forward_and_grads(fn, inputs, grad_out)
    for got, want in zip(actual, expected):
        assert_close(got, want)


@pytest.mark.parametrize("case", CASES[:2])
def test_reference_matches_naive_loop(case):
    inputs = make_inputs(*case)
    expected = naive_msda(*inputs)
    assert_close(multi_scale_deformable_attention_pytorch(*inputs).double(), expected)
    assert_close(multi_scale_deformable_attention_cpu(*inputs).double(), expected)
    assert_close(multi_scale_deformable_attention_levels(*inputs).double(), expected)


FAST_PATHS = [multi_scale_deformable_attention_cpu, multi_scale_deformable_attention_levels]


@pytest.mark.parametrize("fn", [multi_scale_deformable_attention_pytorch, *FAST_PATHS])
def test_gradcheck_float64(fn):
    value, shapes, starts, loc, attn = make_inputs(1, 3, 2, 3, 2, [(3, 4), (2, 3)], dtype=torch.float64)
    # No point on a pixel centre: the bilinear kink there makes finite differences one-sided.
    loc = torch.rand_like(loc) * 1.2 - 0.1
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("fn", FAST_PATHS)
@pytest.mark.parametrize("case", CASES)
def test_cpu_paths_match_reference(case, fn):
    assert_matches_reference(fn, case)


@pytest.mark.parametrize("bags_per_chunk", [1, 9])
def test_cpu_chunked_backward_matches_reference(monkeypatch, bags_per_chunk):
    """`WeightedRowSum.backward` in many chunks (one bag; 9 bags: 15 full chunks and a ragged
    one of 5) gives the reference gradients; the default size runs these tiny cases in one
    chunk."""
    from codetr.ops import msda_cpu

    case = CASES[2]  # 2 * 70 * 1 = 140 bags of L * P * 4 = 32 rows of D = 6
    bag_elements = len(case[5]) * case[4] * 4 * case[3]
    monkeypatch.setattr(msda_cpu, "_CHUNK_ELEMENTS", bags_per_chunk * bag_elements)
    assert_matches_reference(multi_scale_deformable_attention_cpu, case)


def test_outside_points_read_zero_and_get_zero_location_grads():
    value, shapes, starts, loc, attn = make_inputs(1, 5, 2, 4, 2, [(4, 6), (3, 3)])
    # Beyond the half-pixel padding ring every corner lies outside the map.
    loc = torch.where(torch.rand_like(loc) < 0.5, -0.6 - torch.rand_like(loc), 1.6 + torch.rand_like(loc))
    for fn in (multi_scale_deformable_attention_pytorch, *FAST_PATHS):
        out, grad_value, grad_loc, grad_attn = forward_and_grads(fn, (value, shapes, starts, loc, attn))
        assert out.abs().max() == 0 and grad_value.abs().max() == 0
        assert grad_loc.abs().max() == 0 and grad_attn.abs().max() == 0


def test_dispatch_follows_device_argument_and_env(monkeypatch):
    inputs = make_inputs(*CASES[1])
    monkeypatch.delenv("CODETR_MSDA_BACKEND", raising=False)
    assert select_backend(inputs[0]) == "levels"  # CPU: measured fastest (BENCHMARKS.md)
    assert select_backend(inputs[0].half()) == "levels"
    assert select_backend(inputs[0].to("meta")) == "pytorch"  # neither CPU nor CUDA
    assert select_backend(inputs[0], "cpu") == "cpu"
    monkeypatch.setenv("CODETR_MSDA_BACKEND", "cpu")
    assert select_backend(inputs[0]) == "cpu"
    monkeypatch.setenv("CODETR_MSDA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="unknown msda backend"):
        select_backend(inputs[0])
    expected = multi_scale_deformable_attention_pytorch(*inputs)
    assert_close(multi_scale_deformable_attention(*inputs, backend="cpu"), expected)
    assert_close(multi_scale_deformable_attention(*inputs, backend="pytorch"), expected)
    assert_close(multi_scale_deformable_attention(*inputs, backend="levels"), expected)


# ----------------------------------------------------------------------------- Triton
def _triton_mode() -> str:
    """``native`` with CUDA, ``interpreted`` when Triton was imported under TRITON_INTERPRET=1, else ``off``.

    Triton decorates its own ``triton.language`` helpers when it is first imported (and
    torchvision/timm import it), so setting the variable later in this process is too late.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.standard.sum, InterpretedFunction):
        return "interpreted"
    return "native" if torch.cuda.is_available() else "off"


@pytest.fixture(scope="module")
def triton_msda() -> tuple[ModuleType, str]:
    """``codetr.ops.msda_triton`` and the device its kernels run on."""
    pytest.importorskip("triton")
    mode = _triton_mode()
    if mode == "off":
        pytest.skip("no CUDA: these run interpreted in a subprocess (test_triton_interpreted_subprocess)")
    return importlib.import_module("codetr.ops.msda_triton"), "cuda" if mode == "native" else "cpu"


def test_triton_interpreted_subprocess():
    """Without CUDA, reruns this file's Triton tests in a fresh interpreter with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if _triton_mode() != "off":
        pytest.skip("the Triton tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not subprocess"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(triton_msda, case):
    module, device = triton_msda
    inputs = make_inputs(*case, device=device)
    grad_out = torch.randn(case[0], case[1], case[2] * case[3], device=device)
    expected = forward_and_grads(multi_scale_deformable_attention_pytorch, inputs, grad_out)
    actual = forward_and_grads(module.multi_scale_deformable_attention_triton, inputs, grad_out)
    for got, want in zip(actual, expected):
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_accumulates_in_fp32(triton_msda, dtype):
    module, device = triton_msda
    inputs = make_inputs(*CASES[1], dtype=dtype, device=device)
    grad_out = torch.randn(2, 6, 16, device=device, dtype=dtype)
    actual = forward_and_grads(module.multi_scale_deformable_attention_triton, inputs, grad_out)
    # Reference in fp64 on the same (rounded) inputs: only the op's own error is measured.
    expected = forward_and_grads(
        multi_scale_deformable_attention_pytorch,
        tuple(t.double() if t.is_floating_point() else t for t in inputs),
        grad_out.double(),
    )
    for got, want in zip(actual, expected):
        assert got.dtype == dtype
        assert_close(got.double(), want, rel=2e-2 if dtype == torch.bfloat16 else 4e-3)
