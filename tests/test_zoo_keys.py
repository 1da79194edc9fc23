"""`codetr.zoo.mmdet_keys` / `importer`: the name map rules, without the reference files."""
from __future__ import annotations

from collections import OrderedDict

import torch

from codetr.zoo import import_official, is_official_state_dict, map_key
from codetr.zoo.mmdet_keys import EMA_REASON, NO_RCNN_REASON
from tests.zoo_fixtures import tiny_model

AUX = "query_head.transformer.aux_pos_trans"


def test_backbone_prefix_covers_resnet_and_mmdet_swin_names():
    for key in ("backbone.layer1.0.bn2.weight", "backbone.stages.0.blocks.1.attn.w_msa.qkv.weight",
                "backbone.norm3.bias", "backbone.patch_embed.projection.weight"):
        assert map_key(key, with_rcnn=False) == ("backbone.body." + key[len("backbone."):], "")


def test_label_embedding_spellings_and_ema():
    want = ("query_head.label_embedding.weight", "")
    assert map_key("query_head.dn_generator.label_embedding.weight", False) == want  # mmdet 3.x
    assert map_key("query_head.label_embedding.weight", False) == want  # Sense-X
    assert map_key("ema_query_head_cls_branches_0_weight", False) == (None, EMA_REASON)


def test_aux_pos_trans_is_shifted_without_the_rcnn_co_head_and_kept_with_it():
    for suffix in ("", "_norm"):
        assert map_key(f"{AUX}{suffix}.0.weight", False) == (None, NO_RCNN_REASON)
        assert map_key(f"{AUX}{suffix}.2.bias", False) == (f"{AUX}{suffix}.1.bias", "")
        assert map_key(f"{AUX}{suffix}.0.weight", True) == (f"{AUX}{suffix}.0.weight", "")
    assert map_key("rpn_head.rpn_conv.weight", False) == (None, NO_RCNN_REASON)
    assert map_key("roi_head.0.bbox_head.fc_cls.bias", True) == ("roi_head.0.bbox_head.fc_cls.bias", "")
    assert map_key("neck.convs.0.conv.weight", False) == ("neck.convs.0.conv.weight", "")


def test_official_checkpoints_are_recognised_by_their_keys_not_ours():
    ours = tiny_model().state_dict()
    assert not is_official_state_dict(ours)
    # Our model with the Faster R-CNN co-head uses mmdet's rpn_head/roi_head names: still ours.
    assert not is_official_state_dict([*ours, "rpn_head.rpn_conv.weight", "roi_head.0.x"])
    official = ["backbone." + k[len("backbone.body."):] if k.startswith("backbone.body.") else k
                for k in ours]
    assert is_official_state_dict(official)
    assert is_official_state_dict([k for k in ours if not k.startswith("backbone.")]
                                  + ["query_head.dn_generator.label_embedding.weight"])
    assert not is_official_state_dict(["conv1.weight", "fc.weight"])  # an ImageNet backbone


def test_with_an_rcnn_target_the_heads_map_one_to_one():
    target = {f"{AUX}.0.weight": torch.zeros(2, 2), f"{AUX}.1.weight": torch.zeros(2, 2),
              "rpn_head.rpn_conv.weight": torch.zeros(3)}
    state = OrderedDict({f"{AUX}.0.weight": torch.ones(2, 2), f"{AUX}.1.weight": 2 * torch.ones(2, 2),
                         "rpn_head.rpn_conv.weight": torch.ones(3, dtype=torch.float16)})
    state._metadata = {"": {"version": 1}}  # torch's attribute: never a key
    mapped, report = import_official(state, target, "synthetic")
    assert report.ok and not report.dropped
    assert torch.equal(mapped[f"{AUX}.1.weight"], 2 * torch.ones(2, 2))
    assert mapped["rpn_head.rpn_conv.weight"].dtype == torch.float32


def test_the_report_names_problems_on_one_screen():
    target = {f"query_head.cls_branches.{i}.weight": torch.zeros(3, 4) for i in range(40)}
    state = {f"query_head.cls_branches.{i}.weight": torch.zeros(5, 4) for i in range(40)}
    state.update({"query_head.label_embedding.weight": torch.zeros(1),
                  "query_head.dn_generator.label_embedding.weight": torch.zeros(1),
                  "ema_x": torch.zeros(1), "something.else": torch.zeros(1),
                  "backbone.bn1.num_batches_tracked": torch.zeros((), dtype=torch.int64)})
    target["query_head.label_embedding.weight"] = torch.zeros(1)
    _, report = import_official(state, target, "synthetic")
    assert not report.ok and len(report.mismatched) == 40
    assert report.unexpected == ["query_head.dn_generator.label_embedding.weight", "something.else"]
    assert dict(report.dropped)["backbone.bn1.num_batches_tracked"].startswith("BatchNorm")
    text = report.summary()
    assert len(text.splitlines()) <= 12 and "(+34 more)" in text and "(5, 4) vs model (3, 4)" in text
