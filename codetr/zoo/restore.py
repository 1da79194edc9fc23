"""Official checkpoints in the tasks: evaluate / inference (`restore_official`) and fine-tuning
(`adapt_for_finetuning`).

An official file carries no codetr spec, so the architecture and the label map come from the
run's spec (one of `params/co_dino_*.yaml`); the weights must then fit it exactly, apart from the
explicit drop list. Fine-tuning is lenient: tensors whose shape differs (the class layers of
another class count) are skipped and reported.
"""
from __future__ import annotations

import os

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from codetr.spec import ExperimentSpec, SpecError
from codetr.zoo.importer import checkpoint_flavour, import_official
from codetr.zoo.mmdet_keys import is_official_state_dict


def official_state(ckpt: Mapping[str, Any]) -> Optional[Dict[str, Tensor]]:
    """The official weights of a loaded file (`state_dict`, or the file itself), else None."""
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        return None
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    return tensors if tensors and is_official_state_dict(tensors) else None


def is_official_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """Whether a loaded file holds official Co-DINO weights (by key pattern; no codetr section)."""
    return isinstance(ckpt, Mapping) and "codetr" not in ckpt and official_state(ckpt) is not None


def checkpoint_classes(ckpt: Mapping[str, Any]) -> Optional[Sequence[str]]:
    """The class names stored in `meta` (mmdet 3.x `dataset_meta.classes`, mmdet 2.x `CLASSES`)."""
    meta = ckpt.get("meta")
    if not isinstance(meta, Mapping):
        return None
    dataset_meta = meta.get("dataset_meta")
    names = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else meta.get("CLASSES")
    return list(names) if isinstance(names, (list, tuple)) else None


def spec_label_map(spec: ExperimentSpec):
    """The label map of an official checkpoint's run: the checkpoint stores none.

    The test annotations when their file exists (what evaluate scores against), else the inference
    classmap when it exists (the names are all inference needs), else `build_label_map`'s order
    (train, val, test sources, classmap), so a spec listing COCO train2017 does not make
    inference parse the 450 MB train annotations, or fail where only val2017 is present.
    """
    from codetr.data import LabelMap, build_label_map, load_coco
    from codetr.data.classmap import label_map_from_classmap

    ds = spec.dataset
    test, infer = ds.test_data_sources, ds.infer_data_sources
    if test is not None and test.json_file and os.path.isfile(test.json_file):
        source = load_coco(test.json_file, test.image_dir, check_files=False)
        return LabelMap.from_categories(source.categories, ds.num_classes, ds.contiguous_labels)
    if infer is not None and infer.classmap and os.path.isfile(infer.classmap):
        return label_map_from_classmap(infer.classmap, ds.num_classes, ds.contiguous_labels)
    return build_label_map(spec)


def restore_official(ckpt: Mapping[str, Any], path: str, spec: ExperimentSpec,
                     device: torch.device | str = "cpu"):
    """Builds the detector of `spec` and loads an official file's weights into it.

    Returns:
        (model in eval mode on `device`, LabelMap, `spec`, 'model'), as `restore_detector`.

    Raises:
        SpecError: the weights do not fit the spec's model (the report names every difference),
            or the spec's classes are not as many as the checkpoint's.
    """
    from codetr.model.builder import build_model

    label_map = spec_label_map(spec)
    names = checkpoint_classes(ckpt)
    if names is not None and len(names) != label_map.num_classes:
        raise SpecError(f"{path} was trained on {len(names)} classes but the spec's label map has "
                        f"{label_map.num_classes} (dataset.num_classes, contiguous_labels and the "
                        "annotations / classmap); the official COCO models need 80 contiguous classes")
    model = build_model(spec, label_map.num_classes, load_pretrained_backbone=False)
    state = official_state(ckpt) or {}
    mapped, report = import_official(state, model.state_dict(), str(path),
                                     checkpoint_flavour(ckpt, state))
    print(report.summary())
    if not report.ok:
        raise SpecError(f"{path} does not fit the model of this spec (backbone, levels, layers, "
                        f"queries, classes or co-heads differ):\n{report.summary()}")
    model.load_state_dict(mapped, strict=False)
    return model.to(device).eval(), label_map, spec, "raw"


def adapt_for_finetuning(state: Dict[str, Tensor], model: nn.Module, source: str,
                         ckpt: Optional[Mapping[str, Any]] = None) -> Dict[str, Tensor]:
    """`state` renamed to codetr's names when it is official (report printed); else unchanged.

    The shape-mismatched tensors (class layers of another class count) are left out and reported,
    so the caller's partial load takes everything else.
    """
    if not is_official_state_dict(state):
        return state
    mapped, report = import_official(state, model.state_dict(), source,
                                     checkpoint_flavour(ckpt or {}, state))
    print(report.summary())
    return mapped

