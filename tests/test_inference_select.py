"""`codetr inference`'s grouping and final soft-NMS pass (`inference.category_mapping`)."""
import pytest
import torch
from torchvision.ops import box_iou

from codetr.data.labels import LabelMap
from codetr.spec.schema import ModelConfig
from codetr.tasks.inference import CategoryGrouping, select

CATEGORIES = [{"id": 1, "name": "car"}, {"id": 2, "name": "truck"}, {"id": 3, "name": "person"}]


def _detections(gen: torch.Generator):
    """Two heavily overlapping boxes (IoU > 0.8) of classes car and truck, one distant person."""
    base = torch.rand(2, generator=gen) * 50
    car = torch.cat([base, base + 100])
    truck = car + torch.rand(4, generator=gen) * 4  # a few pixels off: IoU about 0.9
    person = car + 300
    boxes = torch.stack([car, truck, person])
    scores = torch.rand(3, generator=gen) * 0.4 + 0.5  # in [0.5, 0.9]: none below the threshold
    labels = torch.tensor([0, 1, 2])
    return scores, labels, boxes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_a_mapping_scores_stay_as_post_processed(seed):
    """The post-processor already ran soft-NMS per class: a second pass would decay overlaps twice."""
    scores, labels, boxes = _detections(torch.Generator().manual_seed(seed))
    grouping = CategoryGrouping(LabelMap.from_categories(CATEGORIES, 3, True), {})
    model = ModelConfig(soft_nms_enabled=True)
    out_scores, groups, out_boxes = select(*grouping.apply(scores, labels, boxes), model, 0.0, grouping.merges)
    assert not grouping.merges
    assert torch.equal(out_scores, scores) and torch.equal(groups, labels) and torch.equal(out_boxes, boxes)
    assert [grouping.names[g] for g in groups.tolist()] == ["car", "truck", "person"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_mapping_merges_classes_and_suppresses_within_a_group(seed):
    """car and truck fold into `vehicle`: the lower of the two overlapping boxes decays linearly
    by (1 - IoU) (TAO's extra per-output-category pass); `person` is untouched."""
    scores, labels, boxes = _detections(torch.Generator().manual_seed(seed))
    grouping = CategoryGrouping(LabelMap.from_categories(CATEGORIES, 3, True),
                                {"vehicle": ["car", "truck"], "human": ["person"]})
    model = ModelConfig(soft_nms_enabled=True, soft_nms_method="linear", soft_nms_iou_threshold=0.8)
    out_scores, groups, out_boxes = select(*grouping.apply(scores, labels, boxes), model, 0.0, grouping.merges)
    iou = float(box_iou(boxes[:1], boxes[1:2]))
    assert iou > 0.8
    high, low = (0, 1) if scores[0] >= scores[1] else (1, 0)
    expected = {high: float(scores[high]), low: float(scores[low]) * (1 - iou), 2: float(scores[2])}
    got = {next(i for i in range(3) if torch.equal(out_boxes[k], boxes[i])): float(out_scores[k])
           for k in range(len(out_scores))}
    assert got == pytest.approx(expected, rel=1e-5)  # float32 IoU and products
    names = {tuple(out_boxes[k].tolist()): grouping.names[g] for k, g in enumerate(groups.tolist())}
    assert names[tuple(boxes[2].tolist())] == "human" and names[tuple(boxes[0].tolist())] == "vehicle"

    model_off = ModelConfig(soft_nms_enabled=False)
    kept, _, _ = select(*grouping.apply(scores, labels, boxes), model_off, float(scores.min()) + 1e-6,
                        grouping.merges)
    assert sorted(kept.tolist()) == sorted(scores.tolist())[1:]  # only the threshold applies


def test_classes_outside_every_group_are_dropped():
    scores, labels, boxes = _detections(torch.Generator().manual_seed(3))
    grouping = CategoryGrouping(LabelMap.from_categories(CATEGORIES, 3, True), {"human": ["person"]})
    kept_scores, groups, _ = grouping.apply(scores, labels, boxes)
    assert kept_scores.tolist() == [scores[2].item()] and groups.tolist() == [0]


def test_a_rename_only_mapping_runs_no_second_pass():
    """Groups of one class each: the per-class soft-NMS already ran, so the scores stay."""
    scores, labels, boxes = _detections(torch.Generator().manual_seed(4))
    grouping = CategoryGrouping(LabelMap.from_categories(CATEGORIES, 3, True),
                                {"auto": ["car"], "lorry": ["truck"], "human": ["person"]})
    out, groups, _ = select(*grouping.apply(scores, labels, boxes), ModelConfig(soft_nms_enabled=True),
                            0.0, grouping.merges)
    assert not grouping.merges and torch.equal(out, scores) and groups.tolist() == [0, 1, 2]
