"""The spec sections of the deployment tasks: `import_mmdet`, `export` and `gen_trt_engine`.

Part of the experiment spec of `codetr.spec.schema` (which re-exports these classes); the field
names follow TAO's Deformable DETR / RT-DETR export and TAO Deploy's gen_trt_engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from codetr.spec.fields import _f


@dataclass
class ImportMmdetConfig:
    """`import_mmdet`: write an official MMDetection / Sense-X checkpoint once in codetr's format."""
    checkpoint: Optional[str] = _f(None)
    results_dir: Optional[str] = _f(None)


@dataclass
class ExportConfig:
    """`export`: ONNX export of a checkpoint (TAO's fields, plus `postprocess`, `simplify`,
    `verify` and `latency_runs`)."""
    checkpoint: Optional[str] = _f(None)
    onnx_file: Optional[str] = _f(None)
    results_dir: Optional[str] = _f(None)
    on_cpu: bool = _f(False)
    opset_version: int = _f(17, min=16)
    input_channel: int = _f(3, choices=(3,))
    input_width: int = _f(960, min=32)
    input_height: int = _f(544, min=32)
    batch_size: int = _f(-1, min=-1)
    verbose: bool = _f(False)
    postprocess: bool = _f(False)
    simplify: bool = _f(True)
    verify: bool = _f(True)
    latency_runs: int = _f(5, min=0)


@dataclass
class TensorRTConfig:
    """`gen_trt_engine.tensorrt`: engine precision, workspace and the batch optimisation profile."""
    data_type: str = _f("fp32", choices=("fp32", "fp16"))
    workspace_size: int = _f(1024, gt=0)
    min_batch_size: int = _f(1, gt=0)
    opt_batch_size: int = _f(1, gt=0)
    max_batch_size: int = _f(1, gt=0)


@dataclass
class GenTrtEngineConfig:
    """`gen_trt_engine`: a TensorRT engine from an exported ONNX file (TAO Deploy's fields)."""
    onnx_file: Optional[str] = _f(None)
    trt_engine: Optional[str] = _f(None)
    results_dir: Optional[str] = _f(None)
    gpu_id: int = _f(0, min=0)
    input_channel: int = _f(3, choices=(3,))
    input_width: Optional[int] = _f(None, min=32)
    input_height: Optional[int] = _f(None, min=32)
    opset_version: int = _f(17, min=16)
    batch_size: int = _f(-1, min=-1)
    verbose: bool = _f(False)
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
