"""`codetr gen_trt_engine`: a TensorRT engine from an exported ONNX file (TAO Deploy's task).

Reads `gen_trt_engine.onnx_file` (written by `codetr export`) and writes `gen_trt_engine.trt_engine`
(default `<results_dir>/gen_trt_engine/codetr_model.engine`), atomically, with the batch
optimisation profile `tensorrt.min/opt/max_batch_size`, precision `tensorrt.data_type` (fp32 or
fp16, any case: TAO Deploy writes FP32/FP16; INT8 is refused, its calibration is not implemented)
and builder workspace `tensorrt.workspace_size` MiB, on GPU `gpu_id`. TAO Deploy's
`tensorrt.calibration` block is accepted and unused (a notice says so when it is set).

Needs a CUDA GPU and the optional `tensorrt` package (`pip install 'codetr[tensorrt]'`); without
either it prints what is missing and exits with status 2, before anything is written. TensorRT
is imported by this task only.
"""
from __future__ import annotations

import os
import sys

import torch

from codetr.fileio import atomic_write_bytes
from codetr.export.tensorrt_engine import EngineProfile  # no tensorrt import at module level
from codetr.spec import ExperimentSpec, SpecError
from codetr.spec.load import save_spec
from codetr.spec.schema_deploy import CalibrationConfig
from codetr.tasks.runtime import ensure_writable_dir

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"error: codetr gen_trt_engine: {message}", file=sys.stderr)
    return EXIT_USAGE


def _profile(spec: ExperimentSpec, meta) -> EngineProfile:
    """The engine's batch profile: the file's fixed batch, `batch_size` > 0, or min/opt/max
    (`batch_size: -1`, dynamic; check_spec refuses 0 and below -1, as for export.batch_size).

    Raises:
        SpecError: `batch_size` > 0 that differs from the fixed batch the file was exported with.
    """
    cfg, trt_cfg = spec.gen_trt_engine, spec.gen_trt_engine.tensorrt
    fixed = meta.batch_size if meta is not None and meta.batch_size > 0 else None
    if fixed is not None and cfg.batch_size > 0 and cfg.batch_size != fixed:
        raise SpecError(f"gen_trt_engine.batch_size={cfg.batch_size}, but {cfg.onnx_file} was "
                        f"exported with the fixed batch size {fixed}: set {fixed} or -1, or export "
                        "again with export.batch_size=-1 (dynamic)")
    batch = fixed or (cfg.batch_size if cfg.batch_size > 0 else None)
    if batch is None:
        return EngineProfile(trt_cfg.min_batch_size, trt_cfg.opt_batch_size, trt_cfg.max_batch_size)
    why = (f"the ONNX file has the fixed batch size {batch}" if fixed
           else f"gen_trt_engine.batch_size={batch} fixes it (TAO's rule)")
    print(f"gen_trt_engine: engine batch {batch}: {why}; tensorrt.min/opt/max_batch_size "
          "are not used")
    return EngineProfile(batch, batch, batch)


def _note_opset(onnx_file: str, opset_version: int) -> None:
    """`opset_version` is TAO's informational field: the engine takes the file's own opset.

    A value that differs from the file's default-domain opset is pointed out, not enforced.
    """
    import onnx

    model = onnx.load(onnx_file, load_external_data=False)
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if opsets and opsets[0] != opset_version:
        print(f"gen_trt_engine: {onnx_file} uses ONNX opset {opsets[0]}; "
              f"gen_trt_engine.opset_version={opset_version} is informational and not applied")


def run(spec: ExperimentSpec) -> int:
    """Builds the engine; returns the exit status (0, or 2 without CUDA or tensorrt)."""
    from google.protobuf.message import DecodeError

    from codetr.export.onnx_export import read_metadata

    cfg, trt_cfg = spec.gen_trt_engine, spec.gen_trt_engine.tensorrt
    if not cfg.onnx_file:
        raise SpecError("gen_trt_engine.onnx_file is required: a file written by `codetr export`")
    if not os.path.isfile(cfg.onnx_file):
        raise SpecError(f"gen_trt_engine.onnx_file={cfg.onnx_file} does not exist")
    if not trt_cfg.min_batch_size <= trt_cfg.opt_batch_size <= trt_cfg.max_batch_size:
        raise SpecError("gen_trt_engine.tensorrt batch sizes must satisfy min_batch_size <= "
                        f"opt_batch_size <= max_batch_size, got {trt_cfg.min_batch_size}, "
                        f"{trt_cfg.opt_batch_size}, {trt_cfg.max_batch_size}")
    try:
        meta = read_metadata(cfg.onnx_file)
    except (DecodeError, OSError) as err:  # not an ONNX model at all (not: a newer codetr file)
        raise SpecError(f"gen_trt_engine.onnx_file={cfg.onnx_file} is not an ONNX file "
                        f"({type(err).__name__}: {err}); give a file written by `codetr export`") from err
    if meta is not None and (cfg.input_height or meta.input_height, cfg.input_width or meta.input_width) \
            != (meta.input_height, meta.input_width):  # either side given alone is checked too
        raise SpecError(f"gen_trt_engine.input_height/input_width = {cfg.input_height}x{cfg.input_width}, "
                        f"but {cfg.onnx_file} was exported for {meta.input_height}x{meta.input_width}")
    profile = _profile(spec, meta)
    _note_opset(cfg.onnx_file, cfg.opset_version)
    if trt_cfg.calibration != CalibrationConfig():
        print("gen_trt_engine: tensorrt.calibration is not used: it configures INT8 calibration, "
              f"which is not implemented (the engine is {trt_cfg.data_type})")
    if not torch.cuda.is_available():
        return _fail("TensorRT needs a CUDA GPU and none is visible on this machine; run it where "
                     "one is (the ONNX file itself runs on a CPU with onnxruntime: "
                     "evaluate/inference accept checkpoint=<file>.onnx)")
    if cfg.gpu_id >= torch.cuda.device_count():
        raise SpecError(f"gen_trt_engine.gpu_id={cfg.gpu_id} but only {torch.cuda.device_count()} "
                        "GPU(s) are visible")
    try:
        import tensorrt  # noqa: F401 - only to report a missing install clearly
    except ImportError:
        return _fail("the tensorrt package is not installed: pip install 'codetr[tensorrt]' "
                     "(NVIDIA's wheels; it needs a CUDA driver)")
    from codetr.export.tensorrt_engine import build_engine

    out_dir = spec.task_results_dir("gen_trt_engine")
    ensure_writable_dir(out_dir, "gen_trt_engine results directory")
    save_spec(spec, out_dir)
    engine_file = cfg.trt_engine or os.path.join(out_dir, "codetr_model.engine")
    with torch.cuda.device(cfg.gpu_id):
        engine = build_engine(cfg.onnx_file, profile, trt_cfg.data_type, trt_cfg.workspace_size,
                              cfg.verbose)
    atomic_write_bytes(engine_file, engine)
    print(f"TensorRT engine ({trt_cfg.data_type}, batch {profile.min_batch}..{profile.max_batch}) "
          f"written to {engine_file}")
    return 0
