"""The detector an evaluation task runs (`codetr evaluate | inference`), loaded one way for both.

`<task>.checkpoint` is a codetr `.pth`, an official mmdet / Sense-X file or an exported `.onnx`
(`codetr.export.onnx_runtime.load_detector`). The weights fix the architecture, so the run's spec
is reconciled with the checkpoint's (`codetr.tasks.spec_drift`: a notice names the keys it
overrules; another input normalisation is an error), and the spec really used is saved as `<results>/<task>/experiment_spec.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from codetr.data.labels import LabelMap
from codetr.export.onnx_runtime import load_detector
from codetr.spec import ExperimentSpec
from codetr.spec.load import save_spec
from codetr.tasks.checkpoint import require_checkpoint_file
from codetr.tasks.runtime import ensure_writable_dir, eval_device
from codetr.tasks.spec_drift import reconcile_with_checkpoint


@dataclass
class TaskDetector:
    """What `load_task_detector` returns."""

    model: torch.nn.Module  # eval mode on `device`: images `[B, 3, H, W]` -> head outputs
    label_map: LabelMap
    spec: ExperimentSpec  # the spec used: the checkpoint's model section, the run's other keys
    weights: str  # 'ema' | 'raw'
    device: torch.device
    out_dir: str  # `<results_dir>/<task>`, writable


def load_task_detector(spec: ExperimentSpec, task: str) -> TaskDetector:
    """Device, results folder, detector and reconciled spec of `task` ('evaluate' | 'inference')."""
    cfg = getattr(spec, task)
    out_dir = spec.task_results_dir(task)
    ensure_writable_dir(out_dir, f"{task} results directory")
    device, notices = eval_device(cfg.num_gpus, cfg.gpu_ids, task)
    for notice in notices:
        print(notice)
    require_checkpoint_file(cfg.checkpoint, f"{task}.checkpoint")
    model, label_map, trained, which = load_detector(cfg.checkpoint, device, spec)
    used, notice = reconcile_with_checkpoint(spec, trained, label_map, cfg.checkpoint)
    if notice:
        print(notice)
    save_spec(used, out_dir)
    return TaskDetector(model, label_map, used, which, device, out_dir)
