"""With `test_padding: lsj` boxes are scaled by the canvas frame (`detection_size`) but must stay
inside the original image: `PostProcess(clip_sizes=...)`, and evaluate / inference pass it.

Reference: the same boxes scaled and clipped by numpy in float64 (xyxy pixels). Tolerance 1e-3 px:
float32 scaling of values <= ~1300 px rounds by <= 1e-4 px (relative 6e-8 per op, a few ops).
"""
import numpy as np
import torch
from PIL import Image
from torch import nn

from codetr.data.labels import LabelMap
from codetr.data.test_padding import LSJTestCollator, detection_sizes
from codetr.postprocess import PostProcess
from codetr.postprocess.postprocess import image_sizes
from codetr.spec import spec_from_dict
from codetr.tasks import evaluate, inference, task_detector
from codetr.tasks.kitti import parse_kitti_line

PX_TOL = 1e-3  # see the module docstring
CANVAS_BOX = (0.5, 0.5, 1.0, 1.0)  # cxcywh normalised: the whole canvas, padding included


def _reference(boxes, frame, image):
    """cxcywh `[Q, 4]` normalised by `frame` (h, w) -> xyxy px clipped to `image` (h, w), float64."""
    b = boxes.double().numpy()
    xyxy = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2,
                     b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
    xyxy *= np.array([frame[1], frame[0], frame[1], frame[0]], dtype=np.float64)
    return np.clip(xyxy, 0, np.array([image[1], image[0], image[1], image[0]], dtype=np.float64))


def _lsj_batch(sizes, origs, canvas=(64, 64)):
    collator = LSJTestCollator(canvas, 32, [0.5] * 3, [0.5] * 3)
    return collator.images([(torch.randn(3, *s), {"orig_size": torch.tensor(o), "size": torch.tensor(s)})
                            for s, o in zip(sizes, origs)])


def test_lsj_boxes_are_clipped_to_the_original_image():
    # landscape and portrait images on one square canvas: padding below / right of each
    batch = _lsj_batch([(40, 64), (64, 24)], [(500, 800), (960, 360)])
    frame, image = detection_sizes(batch.metas), image_sizes(batch.metas)
    assert (frame > image + 1).any(dim=1).all()  # the canvas frame is larger than each image
    q = 50
    boxes = torch.rand(2, q, 4) * torch.tensor([1.0, 1.0, 0.6, 0.6])
    boxes[:, 0] = torch.tensor(CANVAS_BOX)
    logits = torch.randn(2, q, 3)
    post = PostProcess(q * 3, False, "linear", 0.5, 0.5)
    for i, det in enumerate(post({"pred_logits": logits, "pred_boxes": boxes}, frame, image)):
        query = torch.div(logits[i].flatten().topk(q * 3).indices, 3, rounding_mode="floor")
        want = _reference(boxes[i][query], frame[i].tolist(), image[i].tolist())
        np.testing.assert_allclose(det["boxes"].double().numpy(), want, rtol=0, atol=PX_TOL)
        h, w = image[i].tolist()
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
    # without clip_sizes the bounds are the scaling frame (the mask path: orig_size for both)
    unclipped = post({"pred_logits": logits, "pred_boxes": boxes}, frame)
    assert any((d["boxes"][:, 2:] > image[i].flip(0) + 1).any() for i, d in enumerate(unclipped))


class CanvasDetector(nn.Module):
    """Stands in for a detector: query 0 spans the canvas, query 1 lies on the bottom padding,
    both class 0 with a high score; other queries score ~0."""

    def __init__(self, num_classes: int, queries: int = 5) -> None:
        super().__init__()
        self.num_classes, self.queries = num_classes, queries

    def forward(self, images, masks):
        b = len(images)
        logits = torch.full((b, self.queries, self.num_classes), -20.0)
        logits[:, :2, 0] = 5.0
        boxes = torch.rand(b, self.queries, 4) * 0.5 + 0.25
        boxes[:, 0] = torch.tensor(CANVAS_BOX)
        boxes[:, 1] = torch.tensor([0.5, 0.95, 0.4, 0.08])
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_evaluate_clips_lsj_boxes_to_the_image():
    batch = _lsj_batch([(40, 64)], [(300, 480)])
    targets = [dict(m, image_id=torch.tensor(7)) for m in batch.metas]
    loader = [type("B", (), {"to": lambda self, d: self, "images": batch.images,
                             "masks": batch.masks, "targets": targets})()]
    post = PostProcess(10, False, "linear", 0.5, 0.5)
    results = evaluate.predict_coco(CanvasDetector(2), post, loader, [1, 2], 0.5, torch.device("cpu"))
    assert len(results) == 2  # the two queries tie: order by area (xywh)
    spanning, bottom = sorted(results, key=lambda r: -r["bbox"][2] * r["bbox"][3])
    np.testing.assert_allclose(spanning["bbox"], [0, 0, 480, 300], atol=PX_TOL)  # the whole image
    x, y, w, h = bottom["bbox"]
    assert 0 <= x and x + w <= 480 + PX_TOL and 0 <= y and y + h <= 300 + PX_TOL


def test_inference_writes_lsj_boxes_inside_the_image(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"wide": (48, 80), "tall": (90, 30)}  # (h, w), non-square
    for name, (h, w) in sizes.items():
        pixels = (np.random.rand(h, w, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{name}.png")
    checkpoint = tmp_path / "stub.pth"
    checkpoint.write_bytes(b"")
    spec = spec_from_dict({
        "results_dir": str(tmp_path / "results"),
        "dataset": {"num_classes": 2, "contiguous_labels": True, "batch_size": 2, "workers": 0,
                    "infer_data_sources": {"image_dir": str(images)},
                    "augmentation": {"test_random_resize": 64, "random_resize_max_size": 64,
                                     "test_padding": "lsj"}},
        "inference": {"checkpoint": str(checkpoint), "input_width": None, "input_height": None,
                      "save_annotated_images": False}})
    label_map = LabelMap((1, 2), ("car", "person"), True, 2)
    monkeypatch.setattr(task_detector, "load_detector",
                        lambda path, device, run_spec: (CanvasDetector(2), label_map, spec, "raw"))
    assert inference.run(spec) == 0
    for name, (h, w) in sizes.items():
        lines = (tmp_path / "results" / "inference" / "labels" / f"{name}.txt").read_text().splitlines()
        objects = [parse_kitti_line(line) for line in lines]
        assert len(objects) == 2 and {o.name for o in objects} == {"car"}
        spanning = max(objects, key=lambda o: (o.box_xyxy[2] - o.box_xyxy[0]) * (o.box_xyxy[3] - o.box_xyxy[1]))
        np.testing.assert_allclose(spanning.box_xyxy, (0, 0, w, h), atol=PX_TOL)
        for o in objects:
            x1, y1, x2, y2 = o.box_xyxy
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h, (name, o)
