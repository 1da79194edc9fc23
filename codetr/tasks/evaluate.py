"""`codetr evaluate`: COCO metrics of `evaluate.checkpoint` on `dataset.test_data_sources`.

Writes to `<results_dir>/evaluate` (`spec.task_results_dir("evaluate")`):

- `metrics.json`: the 12 COCO stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm,
  ARl; -1 where COCO leaves one undefined) and `per_class` [{category_id, name, AP, AP50}];
- `detections.json`: COCO results with the ORIGINAL category ids (bbox xywh pixels);
- `pr_curve.csv`: `recall,precision` at IoU 0.5, area all, maxDets 100, averaged over classes;
- `per_class_ap.csv`: `name,AP,AP50`.

The model (architecture, label map, EMA weights when present) comes from the checkpoint alone;
post-processing (`model.num_select`, soft-NMS) and the data options come from the spec. Spec keys
the checkpoint overrules are listed in a notice, other input normalisation is an error, and
`experiment_spec.yaml` records the spec used (`codetr.tasks.spec_drift`).
One process on one device (the first of `evaluate.gpu_ids`, or the CPU).
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import List, Optional, Tuple

import torch

from codetr.data.test_padding import detection_sizes
from codetr.data import build_collator, build_dataloader, build_dataset
from codetr.fileio import atomic_write_text
from codetr.postprocess.postprocess import image_sizes
from codetr.spec import ExperimentSpec, SpecError
from codetr.export.onnx_runtime import fit_input_size
from codetr.tasks.coco_eval import (CocoMetrics, evaluate_coco, format_table, load_ground_truth,
                                    to_coco_results)
from codetr.tasks.task_detector import load_task_detector


def input_size(width: Optional[int], height: Optional[int]) -> Optional[Tuple[int, int]]:
    """(height, width) when both are set (a fixed eval resize), else None."""
    return (int(height), int(width)) if width and height else None


def run(spec: ExperimentSpec) -> int:
    """Evaluates `evaluate.checkpoint`; returns the exit status (0)."""
    from codetr.model.builder import build_postprocess

    cfg = spec.evaluate
    if not cfg.checkpoint:
        raise SpecError("evaluate.checkpoint is required: the .pth to evaluate, e.g. "
                        "evaluate.checkpoint=<results_dir>/train/codetr_model.pth")
    if spec.dataset.test_data_sources is None or not spec.dataset.test_data_sources.json_file:
        raise SpecError("dataset.test_data_sources (image_dir and json_file) is required")
    loaded = load_task_detector(spec, "evaluate")
    model, label_map, spec, which = loaded.model, loaded.label_map, loaded.spec, loaded.weights
    device, out_dir = loaded.device, loaded.out_dir
    print(f"evaluating {cfg.checkpoint} ({'EMA' if which == 'ema' else 'raw'} weights) on {device}")
    size = fit_input_size(model, spec, "evaluate", input_size(cfg.input_width, cfg.input_height))
    dataset = build_dataset(spec, "test", label_map, size)
    loader = build_dataloader(dataset, batch_size=spec.dataset.batch_size,
                              workers=spec.dataset.workers, shuffle=False,
                              collate_fn=build_collator(spec, "test", size))
    detections = predict_coco(model, build_postprocess(spec).to(device), loader,
                              label_map.category_id_lut(), cfg.conf_threshold, device)
    metrics = evaluate_coco(load_ground_truth(dataset.json_files), detections,
                            image_ids=dataset.image_ids)
    write_outputs(out_dir, metrics, detections)
    print(format_table(metrics))
    print(f"evaluation results written to {out_dir}")
    return 0


@torch.no_grad()
def predict_coco(model: torch.nn.Module, postprocess: torch.nn.Module,
                 loader: torch.utils.data.DataLoader, category_lut, conf_threshold: float,
                 device: torch.device) -> List[dict]:
    """COCO result dicts (original category ids, xywh pixels) for every image of `loader`."""
    results: List[dict] = []
    model.eval()
    for batch in loader:
        batch = batch.to(device)
        outputs = model(batch.images, batch.masks)
        orig_sizes = detection_sizes(batch.targets)  # orig_size, or the LSJ canvas frame
        clip = image_sizes(batch.targets)  # boxes stay inside the image, not the canvas
        for target, det in zip(batch.targets, postprocess(outputs, orig_sizes, clip)):
            results += to_coco_results(int(target["image_id"]), det["scores"], det["labels"],
                                       det["boxes"], category_lut, conf_threshold)
    return results


def write_outputs(out_dir: str, metrics: CocoMetrics, detections: List[dict]) -> None:
    """metrics.json, detections.json, pr_curve.csv and per_class_ap.csv, each atomically."""
    atomic_write_text(os.path.join(out_dir, "metrics.json"),
                      json.dumps({**metrics.stats, "per_class": metrics.per_class}, indent=2))
    atomic_write_text(os.path.join(out_dir, "detections.json"), json.dumps(detections))
    atomic_write_text(os.path.join(out_dir, "pr_curve.csv"),
                      _csv(["recall", "precision"], [(f"{r:.2f}", f"{p:.6f}") for r, p in metrics.pr_curve]))
    atomic_write_text(os.path.join(out_dir, "per_class_ap.csv"),
                      _csv(["name", "AP", "AP50"], [(c["name"], f"{c['AP']:.6f}", f"{c['AP50']:.6f}")
                                                    for c in metrics.per_class]))


def _csv(header: List[str], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
