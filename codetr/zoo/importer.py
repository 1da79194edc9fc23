"""Mapping an official Co-DINO state dict onto a codetr model, with an `ImportReport`."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from torch import Tensor

from codetr.zoo.mmdet_keys import CONSTANT_BUFFERS, has_rcnn_co_head, map_key, map_value
from codetr.zoo.report import ImportReport
from codetr.zoo.swin_keys import has_original_swin_names, original_swin_to_mmdet

_COUNTER = "num_batches_tracked"


def checkpoint_flavour(ckpt: Mapping[str, Any], state: Mapping[str, Tensor]) -> str:
    """`mmdet 3.x`, `Sense-X / mmdet 2.x` or `unknown`, from the file's `meta` and the keys.

    mmengine writes `meta.mmengine_version` (mmdet 3.x); mmcv 1.x writes `meta.mmcv_version` and
    `meta.mmdet_version` (the Sense-X release). The label embedding's name tells them apart when
    there is no `meta` (a plain state dict).
    """
    meta = ckpt.get("meta") if isinstance(ckpt, Mapping) else None
    if isinstance(meta, Mapping):
        if "mmengine_version" in meta:
            return "mmdet 3.x"
        if "mmcv_version" in meta or "mmdet_version" in meta:
            return "Sense-X / mmdet 2.x"
    if any(k.startswith("query_head.dn_generator.") for k in state):
        return "mmdet 3.x"
    if "query_head.label_embedding.weight" in state:
        return "Sense-X / mmdet 2.x"
    return "unknown"


def import_official(state: Mapping[str, Any], target: Mapping[str, Tensor], source: str,
                    flavour: str = "unknown") -> Tuple[Dict[str, Tensor], ImportReport]:
    """Renames an official state dict to codetr's names and checks it against the model's.

    Args:
        state: official `{key: tensor}` (non-tensor entries are ignored).
        target: the codetr model's `state_dict()` (names and shapes; meta tensors are fine).
        source: shown in the report.
        flavour: shown in the report (`checkpoint_flavour`).
        An original-name Swin backbone (Sense-X release) is first converted to mmdet's names
        (`swin_keys`); the report then names its tensors by their mmdet names.

    Returns:
        `({codetr key: tensor}` of every mapped tensor whose shape matches the model's, cast to
        the model's dtype`}`, the report). Load it with `load_state_dict(..., strict=False)`.
    """
    if has_original_swin_names(state):  # Sense-X's SwinTransformerV1: rename + re-order first
        state = original_swin_to_mmdet(state)
    with_rcnn = has_rcnn_co_head(target)
    report = ImportReport(source=source, flavour=flavour)
    out: Dict[str, Tensor] = {}
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, Tensor):
            continue
        name, reason = map_key(key, with_rcnn)
        if name is not None:
            tensor = map_value(name, tensor, with_rcnn)
        if name is None:
            report.dropped.append((key, reason))
        elif name not in target:
            buffer = key.rsplit(".", 1)[-1]
            if buffer in CONSTANT_BUFFERS:
                report.dropped.append((key, CONSTANT_BUFFERS[buffer]))
            else:
                report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(target[name].shape):
            report.mismatched.append((key, name, tuple(tensor.shape), tuple(target[name].shape)))
        elif name in out:  # two official keys onto one of ours (both label embedding spellings)
            report.unexpected.append(key)
        else:
            out[name] = tensor.to(target[name].dtype)
            report.mapped.append((key, name))
    mismatched = {dst for _, dst, _, _ in report.mismatched}
    report.missing = [k for k in target if k not in out and k not in mismatched
                      and not k.endswith(_COUNTER)]
    return out, report
