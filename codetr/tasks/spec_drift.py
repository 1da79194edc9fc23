"""The run's spec against the spec a checkpoint was trained with (`codetr evaluate|inference|export`).

Those tasks rebuild the model from the checkpoint's stored spec and label map (the weights only
fit that architecture), so the run's `model.*`, `dataset.num_classes` and
`dataset.contiguous_labels` cannot change it. Instead of ignoring them silently:

- each such key whose value differs is listed in one notice (the checkpoint's value is used);
- `dataset.augmentation.input_mean/input_std` other than the training's are an error: the
  images would be normalised differently from training (for an `.onnx` file: the spec it was
  exported with, whose mean/std its graph takes);
- `spec_used` is the spec the task really runs with, which it saves as `experiment_spec.yaml`.

The post-processing keys (`POSTPROCESS_KEYS`) are the run's own: they act after the model.
An official mmdet checkpoint has no stored spec and is built from the run's spec: no drift.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, List, Optional, Sequence, Tuple

from codetr.data.labels import LabelMap
from codetr.spec import ExperimentSpec, SpecError

# `model` keys that evaluate and inference take from the run's spec (build_postprocess, select).
POSTPROCESS_KEYS = ("num_select", "soft_nms_enabled", "soft_nms_method", "soft_nms_iou_threshold",
                    "soft_nms_sigma")

Drift = Tuple[str, Any, Any]  # (dotted key, the run's value, the checkpoint's value)


def architecture_drift(spec: ExperimentSpec, trained: ExperimentSpec, label_map: LabelMap) -> List[Drift]:
    """The `model.*` keys (but the post-processing ones), `dataset.num_classes` and
    `dataset.contiguous_labels` where the run's spec differs from what the checkpoint was built
    with (the label map is the truth for the two dataset keys: it sized the class logits)."""
    drift: List[Drift] = []
    for f in dataclasses.fields(spec.model):
        if f.name in POSTPROCESS_KEYS:
            continue
        mine, theirs = getattr(spec.model, f.name), getattr(trained.model, f.name)
        if mine != theirs:
            drift.append((f"model.{f.name}", mine, theirs))
    ds = spec.dataset
    if ds.num_classes != label_map.num_classes:
        drift.append(("dataset.num_classes", ds.num_classes, label_map.num_classes))
    if ds.contiguous_labels != label_map.contiguous:
        drift.append(("dataset.contiguous_labels", ds.contiguous_labels, label_map.contiguous))
    return drift


def drift_notice(drift: Sequence[Drift], checkpoint: str) -> Optional[str]:
    """One notice naming every differing key with both values; None when there is none."""
    if not drift:
        return None
    lines = [f"notice: the model is rebuilt from {checkpoint} as it was trained; these keys of "
             "the spec differ from the checkpoint's:"]
    lines += [f"  {key}: {_show(mine)} in the spec, {_show(theirs)} in the checkpoint: the "
              "checkpoint's is used" for key, mine, theirs in drift]
    return "\n".join(lines)


def check_normalisation(spec: ExperimentSpec, trained: ExperimentSpec, checkpoint: str) -> None:
    """Raises SpecError when `dataset.augmentation.input_mean/input_std` differ from training's."""
    mine, theirs = spec.dataset.augmentation, trained.dataset.augmentation
    for name in ("input_mean", "input_std"):
        if not _same(getattr(mine, name), getattr(theirs, name)):
            raise SpecError(f"dataset.augmentation.{name}={getattr(mine, name)} differs from the "
                            f"{getattr(theirs, name)} {checkpoint} was trained with: the images "
                            f"would be normalised differently from training: set "
                            f"dataset.augmentation.{name}={getattr(theirs, name)}")


def spec_used(spec: ExperimentSpec, trained: ExperimentSpec, label_map: LabelMap) -> ExperimentSpec:
    """The run's spec with the checkpoint's `model` section (but the run's post-processing keys)
    and the label map's `num_classes` / `contiguous_labels`: what the task runs with."""
    model = dataclasses.replace(trained.model, **{k: getattr(spec.model, k) for k in POSTPROCESS_KEYS})
    dataset = dataclasses.replace(spec.dataset, num_classes=label_map.num_classes,
                                  contiguous_labels=label_map.contiguous)
    return dataclasses.replace(spec, model=model, dataset=dataset)


def reconcile_with_checkpoint(spec: ExperimentSpec, trained: ExperimentSpec, label_map: LabelMap,
                              checkpoint: str) -> Tuple[ExperimentSpec, Optional[str]]:
    """`check_normalisation`, then `(spec_used, drift_notice)`. An `.onnx` file's `trained` spec is
    the one it was exported with, whose mean/std its graph's metadata carries."""
    check_normalisation(spec, trained, checkpoint)
    notice = drift_notice(architecture_drift(spec, trained, label_map), checkpoint)
    return spec_used(spec, trained, label_map), notice


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    """Equal per channel, a single value standing for all three (as the transforms read it)."""
    a3, b3 = (list(v) * (3 if len(v) == 1 else 1) for v in (a, b))
    return len(a3) == len(b3) and all(abs(x - y) <= 1e-6 for x, y in zip(a3, b3))


def _show(value: Any) -> str:
    """A value as the user would write it in YAML (true, null, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value)
