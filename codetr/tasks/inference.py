"""`codetr inference`: KITTI labels and annotated images for `dataset.infer_data_sources`.

Writes to `<results_dir>/inference` (`spec.task_results_dir("inference")`):

- `labels/<stem>.txt`: one KITTI line per detection (see `codetr.tasks.kitti`; class
  names with spaces are written with underscores);
- `images_annotated/<stem>.jpg` when `save_annotated_images`;
- `index.json`: every input image with its output files and detection count.

`<stem>` is the image's path under its input folder without extension, percent-encoded per
component (`codetr.tasks.output_names`: contained and collision-free by construction). Outputs
of an earlier run in the same folder are removed first (as its index lists them); files that no
index lists make the run stop before writing anything.

The model comes from the checkpoint, as for `codetr evaluate` (`codetr.tasks.spec_drift`: a
notice lists the spec's keys it overrules; `experiment_spec.yaml` records the spec used).
Class names come from the checkpoint's label map (a given `infer_data_sources.classmap` must
list the same names). `category_mapping` folds classes into output groups (detections of
classes outside every group are dropped) and, with `model.soft_nms_enabled`, runs one more
soft-NMS pass per group (TAO's "additional per-output-category pass"); without a mapping the
post-processor's per-class soft-NMS is the only one, so scores equal `codetr evaluate`'s.
`conf_threshold` applies to the final scores.
"""
from __future__ import annotations

import io
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageOps

from codetr.data.test_padding import detection_sizes
from codetr.data import build_collator, build_dataloader, build_infer_dataset, read_classmap
from codetr.data.labels import LabelMap
from codetr.fileio import atomic_write_bytes, atomic_write_text
from codetr.postprocess.postprocess import image_sizes
from codetr.postprocess.soft_nms import batched_soft_nms
from codetr.spec import ExperimentSpec, SpecError
from codetr.spec.schema import ModelConfig
from codetr.export.onnx_runtime import fit_input_size
from codetr.tasks.draw import class_colors, draw_detections
from codetr.tasks.evaluate import input_size
from codetr.tasks.kitti import format_kitti_line, kitti_text
from codetr.tasks.output_names import (clear_previous_outputs, output_stems, relative_output,
                                       write_index)
from codetr.tasks.task_detector import load_task_detector


class CategoryGrouping:
    """`inference.category_mapping`: model labels -> output group index, and the group names.

    Without a mapping every class is its own group (named as the class) and `merges` is False.

    Raises:
        SpecError: a mapping names an unknown class or puts one class in two groups.
    """

    def __init__(self, label_map: LabelMap, mapping: Mapping[str, Sequence[str]]) -> None:
        self.num_classes = label_map.num_classes
        labels = [lab for lab in range(label_map.num_classes) if label_map.has_label(lab)]
        by_name = {label_map.name(lab): lab for lab in labels}
        # groups of several classes: soft-NMS runs again per group (a rename-only mapping would
        # decay the per-class soft-NMS scores twice)
        self.merges = any(len(members) > 1 for members in mapping.values())
        self.group_of: Dict[int, int] = {}
        if not mapping:
            self.names = [label_map.name(lab) for lab in labels]
            self.group_of = {lab: i for i, lab in enumerate(labels)}
            return
        self.names = list(mapping)
        for g, (group, members) in enumerate(mapping.items()):
            for member in members:
                if member not in by_name:
                    raise SpecError(f"inference.category_mapping.{group}: '{member}' is not a class "
                                    f"of the model; classes are: {', '.join(by_name)}")
                if by_name[member] in self.group_of:
                    raise SpecError(f"inference.category_mapping: '{member}' is in two groups")
                self.group_of[by_name[member]] = g

    def apply(self, scores: torch.Tensor, labels: torch.Tensor,
              boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keeps detections whose label has a group; returns (scores, group indices, boxes)."""
        lut = torch.full((self.num_classes,), -1, dtype=torch.int64)
        for lab, g in self.group_of.items():
            lut[lab] = g
        groups = lut[labels.cpu().clamp(0, self.num_classes - 1)]
        keep = groups >= 0
        return scores.cpu()[keep], groups[keep], boxes.cpu()[keep]


def check_classmap(label_map: LabelMap, classmap: Optional[str]) -> None:
    """A given classmap must list the checkpoint's class names, in the same order."""
    if not classmap:
        return
    names = read_classmap(classmap, where="dataset.infer_data_sources.classmap")
    if list(names) != list(label_map.names):
        raise SpecError(f"dataset.infer_data_sources.classmap {classmap} lists {names}, but the "
                        f"checkpoint was trained with classes {list(label_map.names)} (in category "
                        "id order); fix the classmap or leave it null to use the checkpoint's names")


def select(scores: torch.Tensor, groups: torch.Tensor, boxes: torch.Tensor, model: ModelConfig,
           conf_threshold: float, merges: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group soft-NMS (when `model.soft_nms_enabled` and `merges`: a category_mapping
    folded classes into groups), then the confidence threshold.

    Args:
        scores: `[N]` post-processed scores (already soft-NMSed per class when enabled).
        groups: `[N]` int64 output group of each detection.
        boxes: `[N, 4]` xyxy pixels.
        model: the spec's model section (`soft_nms_*`).
        conf_threshold: detections scoring below it are dropped.
        merges: `CategoryGrouping.merges`; False leaves the scores as the post-processor gave them.
    """
    if model.soft_nms_enabled and merges and len(scores):
        keep, scores = batched_soft_nms(boxes, scores, groups, model.soft_nms_method,
                                        model.soft_nms_iou_threshold, model.soft_nms_sigma)
        groups, boxes = groups[keep], boxes[keep]
    keep = scores >= conf_threshold
    return scores[keep], groups[keep], boxes[keep]


def run(spec: ExperimentSpec) -> int:
    """Runs inference with `inference.checkpoint`; returns the exit status (0)."""
    from codetr.model.builder import build_postprocess

    cfg = spec.inference
    if not cfg.checkpoint:
        raise SpecError("inference.checkpoint is required: the .pth to run, e.g. "
                        "inference.checkpoint=<results_dir>/train/codetr_model.pth")
    infer = spec.dataset.infer_data_sources
    if infer is None or not infer.image_dir:
        raise SpecError("dataset.infer_data_sources.image_dir is required (a folder or a list)")
    loaded = load_task_detector(spec, "inference")
    model, label_map, spec, which = loaded.model, loaded.label_map, loaded.spec, loaded.weights
    device, out_dir = loaded.device, loaded.out_dir
    check_classmap(label_map, infer.classmap)
    grouping = CategoryGrouping(label_map, cfg.category_mapping)
    colors = class_colors(grouping.names, cfg.color_map)
    size = fit_input_size(model, spec, "inference", input_size(cfg.input_width, cfg.input_height))
    dataset = build_infer_dataset(spec, size)
    loader = build_dataloader(dataset, batch_size=spec.dataset.batch_size,
                              workers=spec.dataset.workers, shuffle=False,
                              collate_fn=build_collator(spec, "test", size).images)
    postprocess = build_postprocess(spec).to(device)
    stems = output_stems(dataset.items)
    removed = clear_previous_outputs(out_dir, ("labels", "images_annotated"))
    if removed:
        print(f"removed {removed} output files of the previous inference run in {out_dir}")
    index = {key: {"image": os.path.join(*key), "labels": relative_output(stem, "labels", ".txt"),
                   "annotated": relative_output(stem, "images_annotated", ".jpg")
                   if cfg.save_annotated_images else None, "detections": None}
             for key, stem in stems.items()}
    write_index(out_dir, list(index.values()), complete=False)
    count = 0
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            outputs = model(batch.images, batch.masks)
            orig_sizes = detection_sizes(batch.metas).to(device)  # orig_size, or the LSJ frame
            clip = image_sizes(batch.metas).to(device)  # boxes stay inside the image, not the canvas
            for meta, det in zip(batch.metas, postprocess(outputs, orig_sizes, clip)):
                scores, groups, boxes = select(*grouping.apply(det["scores"], det["labels"], det["boxes"]),
                                               spec.model, cfg.conf_threshold, grouping.merges)
                names = [grouping.names[g] for g in groups.tolist()]
                entry = index[(meta["root"], meta["relative_path"])]
                atomic_write_text(os.path.join(out_dir, entry["labels"]), kitti_text(
                    format_kitti_line(n, b.tolist(), s) for n, b, s in zip(names, boxes, scores.tolist())))
                if entry["annotated"]:
                    _save_annotated(meta["path"], os.path.join(out_dir, entry["annotated"]),
                                    boxes.tolist(), names, scores.tolist(), colors, cfg.outline_width)
                entry["detections"] = len(names)
                count += 1
    write_index(out_dir, list(index.values()), complete=True)
    print(f"inference ({'EMA' if which == 'ema' else 'raw'} weights) on {count} images: "
          f"results written to {out_dir}")
    return 0


def _save_annotated(src: str, dst: str, boxes: List[List[float]], names: List[str],
                    scores: List[float], colors, outline_width: int) -> None:
    with Image.open(src) as image:
        # Boxes are in the displayed (EXIF-rotated) frame, as the data loader decodes it.
        drawn = draw_detections(ImageOps.exif_transpose(image), boxes, names, scores, colors,
                                outline_width)
    buf = io.BytesIO()
    drawn.save(buf, format="JPEG", quality=90)
    atomic_write_bytes(dst, buf.getvalue())
