"""The description a codetr ONNX file carries in `metadata_props["codetr"]` (JSON).

With it, evaluate/inference run an `.onnx` file alone, as they run a `.pth` checkpoint: the label
map, the input size, the normalisation the images need and the kind of outputs.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List

METADATA_KEY = "codetr"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ExportMetadata:
    """What an exported file needs to be used on its own (stored as JSON in the file).

    Attributes:
        outputs: `raw` (pred_logits, pred_boxes) or `detections` (scores, labels, boxes).
        input_height: H of the `images` input.
        input_width: W of the `images` input.
        batch_size: the fixed batch size, or -1 (dynamic).
        input_mean: the per-channel mean the images are normalised with (`(x / 255 - mean) / std`).
        input_std: the per-channel std.
        label_map: `LabelMap.to_dict()` of the model.
        weights: `ema` or `raw`: which weights of the checkpoint were exported.
        num_select: K of the `detections` outputs (`model.num_select` at export).
        spec: the checkpoint's stored spec (plain data), for the record.
        format_version: this layout's version.
    """
    outputs: str
    input_height: int
    input_width: int
    batch_size: int
    input_mean: List[float]
    input_std: List[float]
    label_map: Dict[str, Any]
    weights: str
    num_select: int
    spec: Dict[str, Any]
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExportMetadata":
        data = json.loads(text)
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"ONNX metadata format {data['format_version']} is newer than this "
                             f"codetr reads ({FORMAT_VERSION}): upgrade codetr")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
