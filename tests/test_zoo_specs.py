"""params/co_dino_*.yaml: each loads and builds, and the full official key lists map onto them.

The models are built on the meta device (names and shapes only: the R50 model has 65M
parameters, Swin-L 235M); the official key lists come from ../shared/reference/mmdet-codino.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from codetr.cli import main
from codetr.model.builder import build_model
from codetr.spec import load_spec
from codetr.zoo import import_official, is_official_state_dict
from codetr.zoo.mmdet_keys import INDEX_REASON, NO_RCNN_REASON

PARAMS = Path(__file__).resolve().parents[1] / "params"
SPECS = sorted(p.name for p in PARAMS.glob("co_dino_5scale_*.yaml"))
COCO_CLASSES = 80
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def _meta_model(name: str):
    spec = load_spec(str(PARAMS / name), [])
    with torch.device("meta"):
        return spec, build_model(spec, COCO_CLASSES, load_pretrained_backbone=False)


def test_every_official_config_has_a_spec():
    assert len(SPECS) == 8, SPECS
    assert "co_dino_5scale_r50_lsj.yaml" in SPECS  # the command


@pytest.mark.parametrize("name", SPECS)
def test_each_spec_loads_with_codetr_spec_and_builds(name, capsys):
    assert main(["spec", "-e", str(PARAMS / name)]) == 0
    assert "num_queries: 900" in capsys.readouterr().out
    spec, model = _meta_model(name)
    m, aug = spec.model, spec.dataset.augmentation
    assert (m.num_feature_levels, m.num_queries, m.hidden_dim, m.enc_layers, m.dec_layers) == (5, 900, 256, 6, 6)
    assert (spec.dataset.num_classes, spec.dataset.contiguous_labels) == (COCO_CLASSES, True)
    assert m.soft_nms_enabled and m.soft_nms_iou_threshold == 0.8 and m.num_select == 300
    assert aug.test_padding == ("lsj" if "lsj" in name else "mask")
    assert model.query_head.cls_branches[0].out_features == COCO_CLASSES
    assert len(model.bbox_head) == 1 and len(model.query_head.transformer.aux_pos_trans) == 2
    assert model.rpn_head is not None and len(model.roi_head) == 1  # mmdet's two co-heads


def _official_state(reference: Path, name: str) -> dict:
    """The official key list as meta tensors of the right shapes and dtypes."""
    keys = json.loads((reference / name).read_text())["keys"]
    return {k: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta") for k, v in keys.items()}


def _check_full_map(reference: Path, keys_file: str, spec_name: str, allowed=(NO_RCNN_REASON,)) -> None:
    state = _official_state(reference, keys_file)
    assert is_official_state_dict(state)
    _, model = _meta_model(spec_name)
    _, report = import_official(state, model.state_dict(), keys_file)
    # Every official key lands on one of ours with the same shape, or on the explicit drop list;
    # none of ours is left without a tensor.
    assert report.ok, report.summary()
    assert not report.unexpected and not report.mismatched and not report.missing
    assert len(report.mapped) == len(model.state_dict())
    assert {reason for _, reason in report.dropped} <= set(allowed)
    # The official specs turn the Faster R-CNN co-head on: its 18 keys (rpn_head, roi_head.0,
    # aux_pos_trans{,_norm}.0) have a home and nothing is dropped.
    assert not [k for k, r in report.dropped if r == NO_RCNN_REASON]
    assert ("rpn_head.rpn_conv.weight", "rpn_head.rpn_conv.weight") in report.mapped


def test_without_the_rcnn_head_its_keys_are_dropped_with_the_reason(mmdet_reference):
    state = _official_state(mmdet_reference, "keys_co_dino_5scale_r50.json")
    spec = load_spec(PARAMS / "co_dino_5scale_r50_lsj.yaml", ["model.use_rcnn_co_head=false"])
    with torch.device("meta"):
        model = build_model(spec, COCO_CLASSES, load_pretrained_backbone=False)
    _, report = import_official(state, model.state_dict(), "keys")
    dropped = sorted(k for k, r in report.dropped if r == NO_RCNN_REASON)
    assert report.ok and not report.missing and len(report.mapped) == len(model.state_dict()) == 656
    assert len(dropped) == 18 and all(
        k.startswith(("rpn_head.", "roi_head.", "query_head.transformer.aux_pos_trans.0.",
                      "query_head.transformer.aux_pos_trans_norm.0.")) for k in dropped)


def test_the_full_r50_key_list_maps_onto_the_r50_spec(mmdet_reference):
    _check_full_map(mmdet_reference, "keys_co_dino_5scale_r50.json", "co_dino_5scale_r50_lsj.yaml")
    _, model = _meta_model("co_dino_5scale_r50_lsj.yaml")
    assert len(model.state_dict()) == 674  # every official key, the Faster R-CNN co-head's too


def test_the_full_swin_l_key_list_maps_onto_the_swin_l_spec(mmdet_reference):
    # Through the mmdet-compatible Swin (codetr/model/swin.py, mmdet's names under backbone.body.).
    _check_full_map(mmdet_reference, "keys_co_dino_5scale_swin_l.json",
                    "co_dino_5scale_swin_l_1x.yaml", (NO_RCNN_REASON, INDEX_REASON))


def _leaves(tree, prefix: str = "") -> dict:
    """A nested spec dict as `{dotted key: value}`."""
    if not isinstance(tree, dict):
        return {prefix.removesuffix("."): tree}
    return {k: v for name, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{name}.").items()}


def test_the_coco_pipeline_recipe_trains_the_official_r50_lsj_recipe():
    """params/coco-r50.yaml (trained by the pipeline) = params/co_dino_5scale_r50_lsj.yaml (the
    released model's spec) but for where data, weights and results live and TAO's label ids."""
    pipeline, official = (_leaves(asdict(load_spec(str(PARAMS / n), [])))
                          for n in ("coco-r50.yaml", "co_dino_5scale_r50_lsj.yaml"))
    where = ("dataset.train_data_sources", "dataset.val_data_sources", "dataset.test_data_sources",
             "evaluate.checkpoint", "inference.checkpoint", "results_dir",
             "model.pretrained_backbone_path", "export")
    labels = {"dataset.num_classes": (91, 80), "dataset.contiguous_labels": (False, True)}
    differ = {k for k in pipeline.keys() | official.keys() if pipeline.get(k) != official.get(k)}
    assert {k for k in differ if not k.startswith(where)} == set(labels)
    assert all((pipeline[k], official[k]) == v for k, v in labels.items())
    assert pipeline["model.co_head_loss_weight"] == 12.0 and pipeline["dataset.augmentation.train_padding"] == "lsj"
