"""Multi-scale deformable attention: PyTorch reference and device dispatch.

The op samples each attention head's value map at ``P`` points on each of ``L``
feature levels and sums the bilinear samples weighted by ``attention_weights``.
Argument order follows mmcv's ``MultiScaleDeformableAttnFunction`` so weights and
call sites port one-to-one.

Paths: ``pytorch`` (this file, the reference), ``levels`` (the reference's math in a
level-major layout without the stack, ``msda_levels.py``: the CPU default), ``cpu``
(gather-based, ``msda_cpu.py``),
``export`` (the ``levels`` formulation, always taken while ``torch.onnx.export`` runs: only
standard ONNX ops) and ``triton`` (``msda_triton.py``, CUDA tensors; CPU tensors
only under ``TRITON_INTERPRET=1``). The dispatcher picks one per call; ``backend=`` or the
``CODETR_MSDA_BACKEND`` environment variable forces one.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.ops.msda_cpu import multi_scale_deformable_attention_cpu
from codetr.ops.msda_levels import multi_scale_deformable_attention_levels
from codetr.ops.msda_shapes import level_maps, level_shapes, msda_sizes


def multi_scale_deformable_attention_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference multi-scale deformable attention built on ``F.grid_sample``.

    Args:
        value: ``[B, Nk, H, D]`` values of all levels, flattened row-major per level
            and concatenated level after level (``Nk = sum(h_l * w_l)``).
        spatial_shapes: ``[L, 2]`` int64, ``(h_l, w_l)`` of every level.
        level_start_index: ``[L]`` int64, offset of each level in ``Nk``. Unused here
            (the levels are split by ``spatial_shapes``), kept for mmcv's signature.
        sampling_locations: ``[B, Nq, H, L, P, 2]`` normalised ``(x, y)``; ``0`` and ``1``
            are the outer edges of the feature map (``align_corners=False``), points
            outside sample zeros.
        attention_weights: ``[B, Nq, H, L, P]``, usually softmaxed over ``L * P``.

    Returns:
        ``[B, Nq, H * D]``, heads concatenated along the channel axis.
    """
    del level_start_index
    n = msda_sizes(value, sampling_locations)
    # grid_sample wants [-1, 1] with -1/+1 at the outer pixel edges (align_corners=False).
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, value_l in enumerate(level_maps(value, level_shapes(spatial_shapes))):
        # [B, Nq, H, P, 2] -> [B*H, Nq, P, 2]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [B*H, D, Nq, P]
        sampling_value_list.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [B, Nq, H, L, P] -> [B*H, 1, Nq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(
        n.batch * n.num_heads, 1, n.num_queries, n.num_levels * n.num_points)
    # [B*H, D, Nq, L*P] * weights -> [B*H, D, Nq] -> [B, H*D, Nq]
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * weights).sum(-1)
    output = output.view(n.batch, n.num_heads * n.head_dim, n.num_queries)
    return output.transpose(1, 2).contiguous()


Backend = Literal["auto", "pytorch", "levels", "cpu", "triton", "export"]
BACKEND_ENV = "CODETR_MSDA_BACKEND"


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def multi_scale_deformable_attention_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Triton kernels (forward and backward); see ``codetr.ops.msda_triton``.

    Imported on first use: Triton reads ``TRITON_INTERPRET`` when the kernels are
    decorated, so importing it eagerly would freeze that choice at ``import codetr``.
    """
    from codetr.ops.msda_triton import multi_scale_deformable_attention_triton as triton_fn

    return triton_fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def select_backend(value: Tensor, backend: Backend | None = None) -> Backend:
    """The path ``multi_scale_deformable_attention`` takes for ``value``.

    Args:
        value: ``[B, Nk, H, D]``; its device and dtype decide ``auto``.
        backend: forced path; ``None`` reads ``CODETR_MSDA_BACKEND`` (default ``auto``).

    Returns:
        ``triton`` for CUDA tensors when Triton imports, ``levels`` for CPU tensors, ``pytorch``
        otherwise; a forced path is returned as is, except during ONNX export (always
        ``export``: the ``levels`` formulation, standard ONNX ops only). The CPU rule comes from
        measurements (BENCHMARKS.md, "Multi-scale deformable attention"; ``bench/msda.py``):
        ``levels`` was the fastest path in the real training step of the default model and at
        inference of both the default and the TAO-sized model, against the reference and the
        gather path ``cpu``. ``cpu`` is never chosen automatically: it keeps ~4x less memory
        for backward but its scattered backward lost in the training step; force it by name.
    """
    if torch.onnx.is_in_onnx_export():
        # The exported graph must be standard ONNX ops (GridSample): never a kernel or a gather
        # path, whatever was forced (codetr.export relies on this).
        return "export"
    choice = backend or os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "pytorch", "levels", "cpu", "triton"):
        raise ValueError(f"unknown msda backend {choice!r}; use auto, pytorch, levels, cpu or triton")
    if choice != "auto":
        return choice  # type: ignore[return-value]
    if value.is_cuda and triton_available():
        return "triton"
    return "levels" if value.device.type == "cpu" else "pytorch"


# The paths by backend name (public: tests and benches take one by its name).
PATHS: dict[str, Callable[..., Tensor]] = {
    # The exported graph uses the level-major formulation too: standard ONNX ops (Transpose,
    # GridSample opset 16+, Mul, ReduceSum), 8% faster in onnxruntime than weighting per level in
    # the reference's layout (BENCHMARKS.md, ONNX export).
    "export": multi_scale_deformable_attention_levels,
    "pytorch": multi_scale_deformable_attention_pytorch,
    "levels": multi_scale_deformable_attention_levels,
    "cpu": multi_scale_deformable_attention_cpu,
    "triton": multi_scale_deformable_attention_triton,
}


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: Backend | None = None,
) -> Tensor:
    """Multi-scale deformable attention on the fastest available path.

    Same arguments and result as :func:`multi_scale_deformable_attention_pytorch`;
    ``backend`` forces a path (see :func:`select_backend`).
    """
    path = PATHS[select_backend(value, backend)]
    return path(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
