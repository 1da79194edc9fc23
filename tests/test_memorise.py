"""A tiny Co-DETR memorises a few synthetic images on the CPU: the loss falls and AP50 >= 0.9."""
import json

import pytest
import torch

from codetr.data.build import build_collator, build_dataloader, build_dataset, build_label_map
from codetr.data.synthetic import generate
from codetr.model.builder import build_criterion, build_model, build_postprocess
from codetr.spec import load_spec
from codetr.tasks.coco_eval import evaluate_coco, to_coco_results


def test_tiny_codetr_memorises_a_few_images(tmp_path):
    _memorise(tmp_path, [])


@pytest.mark.slow
def test_memorises_with_the_faster_rcnn_co_head(tmp_path):
    """The full Co-DINO (R-CNN + ATSS co-heads): AP50 >= 0.9 and every R-CNN loss term falls."""
    terms = _memorise(tmp_path, ["model.use_rcnn_co_head=true"])
    rcnn = [n for n in terms if n.endswith("_co0") or "_pos0_" in n]
    assert {"loss_rpn_cls_co0", "loss_rpn_bbox_co0", "loss_roi_cls_co0", "loss_roi_bbox_co0",
            "loss_ce_pos0_1", "loss_giou_pos0_1"} <= set(rcnn)
    for name in rcnn:
        first, last = sum(terms[name][:10]) / 10, sum(terms[name][-10:]) / 10
        assert last < first, f"{name} did not fall: {first:.4g} -> {last:.4g}"


def _memorise(tmp_path, extra):
    """Trains 150 steps on 4 synthetic images; asserts the loss falls and AP50 >= 0.9.

    Returns:
        Every loss term's value per step.
    """
    torch.manual_seed(0)
    generate(tmp_path, num_train=4, num_val=0, num_test=0, image_size=64, seed=3, max_objects=3,
             empty_prob=0.0)
    src = f"{{image_dir: {tmp_path}/train/images, json_file: {tmp_path}/train/annotations.json}}"
    spec = load_spec(None, [
        f"dataset.train_data_sources=[{src}]", f"dataset.val_data_sources=[{src}]",
        "dataset.contiguous_labels=true", "dataset.num_classes=4", "dataset.dataset_type=default",
        "dataset.augmentation.horizontal_flip_prob=0.0", "dataset.augmentation.scales=[64]", "dataset.augmentation.test_random_resize=64",
        "dataset.augmentation.random_resize_max_size=64", "dataset.augmentation.fixed_padding=false",
        "model.backbone=resnet_18", "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=20", "model.num_select=20",
        "model.dn_number=6", "model.num_co_heads=1", "model.co_head_num_convs=1",
        "model.num_feature_levels=3", "model.return_interm_indices=[1,2,3]",
        "train.activation_checkpoint=false",
    ] + list(extra))
    label_map = build_label_map(spec)
    # evaluation transforms for training too: memorising, not generalising
    data = build_dataset(spec, "val", label_map)
    loader = build_dataloader(data, batch_size=4, workers=0, shuffle=False, collate_fn=build_collator(spec, "val"))
    batch = next(iter(loader))
    model = build_model(spec, label_map.num_classes)
    criterion = build_criterion(spec, label_map.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    losses = []
    terms = {}
    model.train()
    for _ in range(150):
        step = criterion(model(batch.images, batch.masks, batch.targets), batch.targets)
        for name, value in step.items():
            terms.setdefault(name, []).append(float(value.detach()))
        loss = sum(step.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10, "the loss did not fall"

    model.eval()
    with torch.no_grad():
        out = model(batch.images, batch.masks)
    detections = build_postprocess(spec)(out, torch.stack([t["orig_size"] for t in batch.targets]))
    lut = [label_map.category_id(i) for i in range(label_map.num_classes)]
    results = [r for t, d in zip(batch.targets, detections)
               for r in to_coco_results(int(t["image_id"]), d["scores"], d["labels"], d["boxes"], lut)]
    gt = json.loads((tmp_path / "train" / "annotations.json").read_text())
    metrics = evaluate_coco(gt, results)
    assert metrics.stats["AP50"] >= 0.9, metrics.stats
    return terms
