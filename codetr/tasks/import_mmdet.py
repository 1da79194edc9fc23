"""`codetr import_mmdet`: an official MMDetection / Sense-X Co-DINO checkpoint, once, as a codetr one.

Reads `import_mmdet.checkpoint` (recognised by its keys, read without running pickled code),
maps it onto the model of the spec exactly as `evaluate` does (`codetr.zoo.restore`), and writes
`<results_dir>/import_mmdet/codetr_model.pth`: a codetr checkpoint (`state_dict` with `model.`
keys, the `codetr` section with the spec and the label map) that `evaluate.checkpoint`,
`inference.checkpoint` and `train.pretrained_model_path` then take without the official spec, and
that `torch.load(weights_only=True)` opens. `imported_from` records the source file, its format
and its `meta` epoch / iteration / versions when present. The report goes to stdout.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from codetr.fileio import atomic_torch_save
from codetr.spec import ExperimentSpec, SpecError, spec_to_dict
from codetr.spec.load import save_spec
from codetr.tasks.checkpoint import (FORMAT_VERSION, MODEL_PREFIX, load_checkpoint, require_checkpoint_file,
                                     to_weights_only_safe)
from codetr.tasks.runtime import ensure_writable_dir
from codetr.zoo import checkpoint_flavour
from codetr.zoo.restore import is_official_checkpoint, official_state, restore_official

OUTPUT = "codetr_model.pth"
_META_KEYS = ("epoch", "iter", "mmengine_version", "mmcv_version", "mmdet_version", "time",
              "experiment_name")


def run(spec: ExperimentSpec) -> int:
    """Converts `import_mmdet.checkpoint`; returns the exit status (0).

    Raises:
        SpecError: no checkpoint given, it is not an official Co-DINO file, or its weights do not
            fit the spec's model.
    """
    source = spec.import_mmdet.checkpoint
    if not source:
        raise SpecError("import_mmdet.checkpoint is required: the official .pth to convert, e.g. "
                        "import_mmdet.checkpoint=models/zoo/co_dino_5scale_r50_lsj_8xb2_1x_coco-69a72d67.pth")
    require_checkpoint_file(source, "import_mmdet.checkpoint")
    ckpt = load_checkpoint(source, require_codetr=False)
    if not is_official_checkpoint(ckpt):
        raise SpecError(f"import_mmdet.checkpoint {source} is not an official MMDetection / Sense-X "
                        "Co-DINO checkpoint (no mmdet-style backbone / query-head keys); codetr's own "
                        "checkpoints need no import")
    out_dir = spec.task_results_dir("import_mmdet")
    ensure_writable_dir(out_dir, "import_mmdet results directory")
    save_spec(spec, out_dir)
    model, label_map, _, _ = restore_official(ckpt, source, spec, "cpu")
    converted = {
        "state_dict": {MODEL_PREFIX + k: v for k, v in model.state_dict().items()},
        "codetr": {"format_version": FORMAT_VERSION, "spec": spec_to_dict(spec),
                   "label_map": label_map.to_dict()},
        "imported_from": {"path": os.path.abspath(source),
                          "flavour": checkpoint_flavour(ckpt, official_state(ckpt) or {}),
                          "meta": _plain_meta(ckpt.get("meta"))},
    }
    path = os.path.join(out_dir, OUTPUT)
    atomic_torch_save(to_weights_only_safe(converted), path)
    print(f"wrote {path}")
    return 0


def _plain_meta(meta: Any) -> dict:
    """The scalar facts of an official `meta` (the config text and class lists stay out)."""
    if not isinstance(meta, Mapping):
        return {}
    return {k: meta[k] for k in _META_KEYS if isinstance(meta.get(k), (str, int, float))}
