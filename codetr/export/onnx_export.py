"""Writes a detector as an ONNX file: TorchScript-based export, checker, onnxslim, metadata.

The graph is `codetr.export.graph` (see there for the input/output contract): a fixed `H x W`
and, with `batch_size=-1`, a dynamic batch. Deformable attention is exported through
`F.grid_sample` (ONNX GridSample, opset >= 16): `codetr.ops.select_backend` returns the PyTorch
reference path whenever an ONNX export is running, so no custom op or TensorRT plugin is needed.

Why `dynamo=False`: the TorchScript tracer is what this module is verified with (parity tests in
tests/test_export_onnx.py); the torch.export-based exporter was not verified here.

The file carries its own description in `metadata_props["codetr"]` (JSON, see `ExportMetadata`):
the label map, the input size, the normalisation the images need and the output kind, so that
evaluate/inference can run an `.onnx` file alone, as they run a `.pth` checkpoint.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional

import torch

from codetr.data.labels import LabelMap
from codetr.export.graph import DETECTION_OUTPUTS, RAW_OUTPUTS, DetectionsGraph, DetectorGraph
from codetr.export.metadata import METADATA_KEY, ExportMetadata
from codetr.fileio import atomic_write_bytes
from codetr.model.codetr import CoDETR

MIN_OPSET = 16  # GridSample entered the default ONNX domain in opset 16


def _three(values: List[float]) -> List[float]:
    return [float(v) for v in values] * (3 if len(values) == 1 else 1)


def export_onnx(model: CoDETR, path: str | os.PathLike, *, label_map: LabelMap, spec_data: Dict[str, Any],
                weights: str, height: int, width: int, batch_size: int = -1, opset_version: int = 17,
                detections: bool = False, num_select: int = 300, simplify: bool = True,
                verbose: bool = False) -> ExportMetadata:
    """Exports `model` to `path` (written atomically) and returns the metadata stored in it.

    Args:
        model: the detector (any device; exported on the CPU in float32, eval mode).
        path: the `.onnx` file to write.
        label_map: the model's label map (stored in the file).
        spec_data: the checkpoint's spec as plain data; its `dataset.augmentation.input_mean` /
            `input_std` are the normalisation recorded in the file.
        weights: `ema` or `raw` (recorded).
        height: H of the input (every image is resized to exactly H x W, no padding).
        width: W of the input.
        batch_size: fixed batch size, or -1 for a dynamic batch axis.
        opset_version: ONNX opset, at least 16 (GridSample).
        detections: put the top-k post-processing in the graph (`DetectionsGraph`).
        num_select: K of the top-k (with `detections`).
        simplify: run onnxslim (constant folding, dead-node removal) and check the result again.
        verbose: print the TorchScript exporter's graph.

    Raises:
        ValueError: an opset below 16, a batch size of 0 or below -1.
        onnx.checker.ValidationError: the written graph is not valid ONNX.
    """
    import onnx

    if opset_version < MIN_OPSET:
        raise ValueError(f"opset_version {opset_version} < {MIN_OPSET}: deformable attention needs "
                         "GridSample (opset 16+)")
    if batch_size == 0 or batch_size < -1:
        raise ValueError(f"batch_size must be -1 (dynamic) or >= 1, got {batch_size}")
    model = model.float().cpu().eval()
    # A dynamic batch is traced with 2 images: a traced 1 can be mistaken for a broadcast axis.
    trace_batch = 2 if batch_size == -1 else batch_size
    images = torch.randn(trace_batch, 3, height, width)
    if detections:
        graph: torch.nn.Module = DetectionsGraph(model, num_select)
        orig_sizes = torch.tensor([[height, width]] * trace_batch, dtype=torch.int64)
        args, inputs, outputs = (images, orig_sizes), ["images", "orig_sizes"], list(DETECTION_OUTPUTS)
    else:
        graph = DetectorGraph(model)
        args, inputs, outputs = (images,), ["images"], list(RAW_OUTPUTS)
    dynamic_axes = {name: {0: "batch"} for name in inputs + outputs} if batch_size == -1 else None
    tmp = f"{os.fspath(path)}.trace.tmp"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python int it records (level shapes, top-k sizes):
            # they are fixed by the fixed H x W on purpose; the batch is checked by the tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, args, tmp, input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic_axes, opset_version=opset_version, dynamo=False,
                              do_constant_folding=True, verbose=verbose)
        proto = onnx.load(tmp)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    onnx.checker.check_model(proto, full_check=True)
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
        onnx.checker.check_model(proto, full_check=True)
    aug = spec_data.get("dataset", {}).get("augmentation", {})
    meta = ExportMetadata(
        outputs="detections" if detections else "raw", input_height=int(height), input_width=int(width),
        batch_size=int(batch_size), input_mean=_three(aug.get("input_mean", [0.485, 0.456, 0.406])),
        input_std=_three(aug.get("input_std", [0.229, 0.224, 0.225])), label_map=label_map.to_dict(),
        weights=weights, num_select=int(num_select), spec=spec_data)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    proto.producer_name = "codetr"
    atomic_write_bytes(path, proto.SerializeToString())
    return meta


def read_metadata(path: str | os.PathLike) -> Optional[ExportMetadata]:
    """The `ExportMetadata` of a codetr ONNX file, or None for a foreign file."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return ExportMetadata.from_json(entry.value)
    return None
