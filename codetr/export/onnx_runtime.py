"""Running an exported `.onnx` file with onnxruntime where the tasks run a PyTorch detector.

`OnnxDetector` quacks like `CoDETR` in eval mode: `detector(images, masks)` returns
`{"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4] cxcywh normalised}` as torch tensors on the
images' device, so `codetr evaluate` / `codetr inference` keep their post-processing and outputs.
`load_detector` picks it for a `.onnx` path and `restore_detector` otherwise.

The file takes whole `H x W` images (codetr.export.graph); `fit_input_size` makes the tasks resize
to exactly that size and checks the spec normalises as the exported model expects.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from codetr.data.labels import LabelMap
from codetr.export.metadata import METADATA_KEY, ExportMetadata
from codetr.spec import ExperimentSpec, SpecError, spec_from_dict


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether a checkpoint path names an ONNX file (by its extension)."""
    return os.fspath(path).lower().endswith(".onnx")


def providers_for(device: torch.device) -> List[str]:
    """onnxruntime execution providers: TensorRT/CUDA first on a CUDA device when installed."""
    import onnxruntime as ort

    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] + wanted
    available = set(ort.get_available_providers())
    return [p for p in wanted if p in available]


def make_session(path: str | os.PathLike | bytes, device: torch.device | str = "cpu",
                 threads: Optional[int] = None):
    """An `onnxruntime.InferenceSession` with all graph optimisations.

    Args:
        path: the `.onnx` file (or a serialized model).
        device: a CUDA device selects the CUDA/TensorRT providers (on its index) when present.
        threads: intra-op threads; default torch's (`torch.get_num_threads()`), so both runtimes
            get the same CPU budget.
    """
    import onnxruntime as ort

    device = torch.device(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = providers_for(device)
    model = path if isinstance(path, bytes) else os.fspath(path)
    if device.type == "cuda":
        index = device.index or 0
        provider_options = [{"device_id": index} if p != "CPUExecutionProvider" else {} for p in providers]
        return ort.InferenceSession(model, options, providers=providers, provider_options=provider_options)
    return ort.InferenceSession(model, options, providers=providers)


class OnnxDetector:
    """An exported codetr ONNX file (raw outputs) behind `CoDETR`'s eval call.

    Args:
        path: a file written by `codetr export` without `export.postprocess`.
        device: where the returned tensors go (and which providers run it).
        threads: intra-op threads (see `make_session`).

    Raises:
        SpecError: not a codetr ONNX file, or one with the top-k post-processing in the graph.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu",
                 threads: Optional[int] = None) -> None:
        if not os.path.isfile(path):
            raise SpecError(f"ONNX file not found: {path}")
        self.path = os.fspath(path)
        self.device = torch.device(device)
        try:
            self.session = make_session(path, self.device, threads)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises InvalidProtobuf, Fail, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise SpecError(f"{path} is not an ONNX model onnxruntime can load: {first}") from None
        text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if text is None:
            raise SpecError(f"{path} was not written by `codetr export` (no '{METADATA_KEY}' "
                            "metadata): its label map and input size are unknown")
        self.meta = ExportMetadata.from_json(text)
        if self.meta.outputs != "raw":
            raise SpecError(f"{path} has the top-k post-processing in the graph (exported with "
                            "export.postprocess=true); evaluate and inference need the raw outputs: "
                            "export again with export.postprocess=false")
        self.input_size: Tuple[int, int] = (self.meta.input_height, self.meta.input_width)

    def eval(self) -> "OnnxDetector":
        """No-op (the graph is eval-only), for code written against `nn.Module`."""
        return self

    def to(self, device: torch.device | str) -> "OnnxDetector":
        """Where the outputs go from now on (the session keeps its providers)."""
        self.device = torch.device(device)
        return self

    def run(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """`[B, 3, H, W]` float32 -> `(pred_logits [B, Q, C], pred_boxes [B, Q, 4])`, numpy.

        A fixed-batch file is run in chunks of its batch size, the last one zero-filled.
        """
        fixed = self.meta.batch_size
        if fixed == -1 or len(images) == fixed:
            logits, boxes = self.session.run(None, {"images": images})
            return logits, boxes
        parts: List[Tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(images), fixed):
            chunk = images[start:start + fixed]
            n = len(chunk)
            if n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n,) + chunk.shape[1:], chunk.dtype)])
            logits, boxes = self.session.run(None, {"images": chunk})
            parts.append((logits[:n], boxes[:n]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def __call__(self, images: Tensor, masks: Tensor) -> dict:
        """Runs the file on a collated batch.

        Args:
            images: `[B, 3, H', W']` normalised, each image exactly `H x W` at the top left
                (padding beyond it, from `pad_size_divisor` or the LSJ canvas, is cropped off).
            masks: `[B, H', W']` bool, True on padding; must be False on the `H x W` image.

        Returns:
            `pred_logits` `[B, Q, C]` and `pred_boxes` `[B, Q, 4]` cxcywh normalised, as `CoDETR`
            normalises them, by each image's unmasked extent `(W_valid, H_valid)`: `(W, H)` with
            the padding mask, the whole `(W', H')` canvas with `test_padding: lsj` (no mask), which
            is the frame the LSJ `detection_size` scales by.
        """
        h, w = self.input_size
        if images.shape[-2] < h or images.shape[-1] < w or bool(masks[:, :h, :w].any()):
            raise SpecError(f"{self.path} takes whole {h}x{w} images, got a batch of "
                            f"{tuple(images.shape[-2:])} with padding inside {h}x{w}: resize every "
                            f"image to exactly {h}x{w} (input_height/input_width)")
        batch = images[:, :, :h, :w].float().contiguous().cpu().numpy()
        logits, boxes = self.run(batch)
        return {"pred_logits": torch.from_numpy(logits).to(self.device),
                "pred_boxes": to_unmasked_frame(torch.from_numpy(boxes), masks, (h, w)).to(self.device)}


def to_unmasked_frame(boxes: Tensor, masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """cxcywh `[B, Q, 4]` normalised by the file's `size` (h, w) -> normalised by each image's
    unmasked extent in `masks` `[B, H', W']` (True on padding), the frame `CoDETR` uses.

    The image sits at the top left, so x (cx and w) scales by `w / W_valid` and y by `h / H_valid`;
    with the padding mask the extent is the image itself (factor 1).
    """
    valid = ~masks.cpu()
    valid_h = valid[:, :, 0].sum(1).clamp(min=1).float()  # rows of the first column: [B]
    valid_w = valid[:, 0, :].sum(1).clamp(min=1).float()
    rx, ry = size[1] / valid_w, size[0] / valid_h
    return boxes * torch.stack([rx, ry, rx, ry], dim=1)[:, None, :].to(boxes.dtype)


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu",
                  spec: Optional[ExperimentSpec] = None):
    """`restore_detector` for `.pth` checkpoints (codetr's, or official ones built from the run's
    `spec`), `OnnxDetector` for `.onnx` files.

    A restored PyTorch model is folded for eval (`codetr.model.eval_fold`: BatchNorm into its
    convolution, fused query projections; same outputs within 1e-5).

    Returns:
        (detector, LabelMap, the spec it was trained with, 'ema' | 'raw').
    """
    if not is_onnx_file(path):
        from codetr.model.eval_fold import fold_for_eval
        from codetr.tasks.checkpoint import restore_detector

        model, label_map, trained_spec, which = restore_detector(path, device, spec)
        fold_for_eval(model)
        return model, label_map, trained_spec, which
    detector = OnnxDetector(path, device)
    meta = detector.meta
    spec = spec_from_dict(meta.spec, origin=f"{path} (stored spec)")
    return detector, LabelMap.from_dict(meta.label_map), spec, meta.weights


def default_input_size(spec: ExperimentSpec, task: str) -> Optional[Tuple[int, int]]:
    """The schema's default (h, w) of `<task>.input_height/input_width` (inference: TAO's 640x640,
    evaluate: None), or None when either default is null."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(getattr(spec, task)))}
    height, width = defaults.get("input_height"), defaults.get("input_width")
    return (int(height), int(width)) if isinstance(height, int) and isinstance(width, int) else None


def fit_input_size(detector, spec: ExperimentSpec, task: str,
                   size: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    """The (h, w) a task resizes to: `size` for a PyTorch detector, the file's for an ONNX one.

    For an ONNX file, `size` left unset (null) or at the schema's default (TAO's 640x640 for
    inference; the spec cannot tell a default from the same value written out) gives way to the
    file's own size, with a one-line notice; any other size is an error.

    Raises:
        SpecError: `<task>.input_height/input_width` set to another size than the ONNX file's.
    """
    if not isinstance(detector, OnnxDetector):
        return size
    h, w = detector.input_size
    if size is not None and tuple(size) != (h, w):
        if tuple(size) != default_input_size(spec, task):
            raise SpecError(f"{task}.input_height/input_width = {size[0]}x{size[1]}, but "
                            f"{detector.path} takes {h}x{w} images: set them to {h} and {w} or "
                            "leave them null")
        print(f"{task}: {detector.path} takes {h}x{w} images: using that size, not the default "
              f"{task}.input_height/input_width = {size[0]}x{size[1]} (set {h} and {w}, or null)")
    elif size is None:
        print(f"{task}: input_height/input_width unset: using {detector.path}'s size {h}x{w}")
    aug = spec.dataset.augmentation  # its mean/std: checked against the file's spec (spec_drift)
    divisor = aug.pad_size_divisor
    if aug.test_padding == "lsj" and (h % divisor or w % divisor):
        print(f"{task}: dataset.augmentation.test_padding=lsj pads to a multiple of "
              f"pad_size_divisor={divisor}; {detector.path} ({h}x{w}) sees the image without that "
              "border (boxes are mapped to the canvas frame), so scores can differ slightly from "
              f"the PyTorch model's: export at multiples of {divisor} for the same input")
    return h, w
