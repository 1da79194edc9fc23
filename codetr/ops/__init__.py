"""Custom tensor ops: multi-scale deformable attention (reference, level-major CPU path, gather path, Triton, dispatch)."""
from codetr.ops.msda import (
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_cpu,
    multi_scale_deformable_attention_levels,
    multi_scale_deformable_attention_pytorch,
    multi_scale_deformable_attention_triton,
    select_backend,
)

__all__ = [
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_cpu",
    "multi_scale_deformable_attention_levels",
    "multi_scale_deformable_attention_pytorch",
    "multi_scale_deformable_attention_triton",
    "select_backend",
]
