"""The spec sections of the deployment tasks: `import_mmdet`, `export` and `gen_trt_engine`.

Part of the experiment spec of `codetr.spec.schema` (which re-exports these classes); the field
names follow TAO's Deformable DETR / RT-DETR export and TAO Deploy's gen_trt_engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from codetr.spec.errors import SpecError
from codetr.spec.fields import _f

DATA_TYPES = ("fp32", "fp16")  # engine precisions built; TAO Deploy writes them upper case


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
class CalibrationConfig:
    """`gen_trt_engine.tensorrt.calibration`: TAO Deploy's INT8 calibration block. Accepted so
    TAO specs load; unused, as INT8 (the only precision that reads it) is not implemented."""
    cal_image_dir: Union[str, List[str]] = _f([])
    cal_cache_file: Optional[str] = _f(None)
    cal_batch_size: int = _f(1, gt=0)
    cal_batches: int = _f(1, gt=0)


@dataclass
class TensorRTConfig:
    """`gen_trt_engine.tensorrt`: engine precision, workspace and the batch optimisation profile.

    `data_type` is case-insensitive (TAO Deploy's default is `FP32`) and stored lower case.
    """
    data_type: str = _f("fp32")  # checked in __post_init__: DATA_TYPES, any case
    workspace_size: int = _f(1024, gt=0)
    min_batch_size: int = _f(1, gt=0)
    opt_batch_size: int = _f(1, gt=0)
    max_batch_size: int = _f(1, gt=0)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        # The one place data_type is normalised: every spec load builds this section.
        key, value = "gen_trt_engine.tensorrt.data_type", self.data_type
        lowered = value.lower() if isinstance(value, str) else value
        if lowered == "int8":
            raise SpecError(f"{key}={value!r}: INT8 calibration is not implemented (the "
                            f"calibration block is accepted but unused). Allowed values: "
                            f"{', '.join(DATA_TYPES)} (any case)")
        if lowered not in DATA_TYPES:
            raise SpecError(f"{key}={value!r} is not supported. Allowed values: "
                            f"{', '.join(DATA_TYPES)} (any case)")
        self.data_type = lowered


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
