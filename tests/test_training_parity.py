"""Training parity with mmdet 3.3's Co-DINO: ATSS co-head, query-head losses, positive queries.

Reference: ../shared/reference/mmdet-codino/train_losses.pth (its README, "Training losses"): the
tiny official model in train() mode on the 6 co-head maps of `rcnn_inputs.pth` and its fixed ground
truth. The official `bbox_head.0.*` / `query_head.*` weights (fp16 -> fp32) are loaded into our
modules. Tolerances (the README's): losses rtol 1e-5; assignments, labels and indices exact;
outputs atol 1e-5 (this CPU's kernels differ from the reference machine's in the last bits:
measured 4e-8 on the ATSS logits, 2e-6 after the three decoder layers of the positive pass).
mmdet's loss values carry its config weights (ATSS x12 / x24 / x12; query head 1 / 5 / 2); ours
are compared after the same weights (ATSS: `co_head_loss_weight` 12 times `ATSS_TERM_WEIGHTS`).
"""

import pytest
import torch
import torch.nn.functional as F

from codetr.losses.atss_assigner import atss_assign
from codetr.losses.criterion import SetCriterion
from codetr.losses.matcher import HungarianMatcher
from codetr.model.atss_head import CoATSSHead
from codetr.model.codetr import ATSS_TERM_WEIGHTS
from codetr.model.positive_queries import build_positive_queries
from codetr.model.query_head import QueryHead
from codetr.model.transformer import EncoderMemory, valid_ratios_of
from tests.zoo_fixtures import CO_HEAD_STRIDES, NUM_CLASSES, reference_file, reference_targets

STRIDES = CO_HEAD_STRIDES
CO_WEIGHT = 12.0  # the official recipe: lambda 2.0 x 6 decoder layers (tiny config = R50 recipe)
ATSS_NAMES = ("loss_cls", "loss_bbox", "loss_centerness")  # ours and mmdet's (mmdet suffixes "1")
QUERY_NAMES = (("loss_ce", "loss_cls"), ("loss_bbox", "loss_bbox"), ("loss_giou", "loss_iou"))


def _load(folder: str):
    train, inputs, state, images = (reference_file(folder, name) for name in (
        "train_losses.pth", "rcnn_inputs.pth", "tiny_state_dict.pth", "tiny_inputs.pth"))
    return train, inputs, state, images["padding_mask"]


@pytest.fixture
def ref(mmdet_reference):
    return _load(str(mmdet_reference))


def _atss_head(state):
    head = CoATSSHead(NUM_CLASSES, 64, num_levels=6, stacked_convs=1, octave_base_scale=8)
    head.load_state_dict({k[len("bbox_head.0."):]: v.float() for k, v in state.items()
                          if k.startswith("bbox_head.0.")})  # strict: every key has one home
    return head.train()




def _atss_run(ref):
    train, inputs, state, _ = ref
    head = _atss_head(state)
    with torch.no_grad():
        outputs = head(inputs["maps"])
        losses, positives = head.loss_and_positives(inputs["maps"], STRIDES, reference_targets(inputs),
                                                    per_level=True)
    return train["atss"], inputs, outputs, losses, positives


def test_atss_outputs_and_anchors(ref):
    atss, inputs, (cls, deltas, ctr), _, _ = _atss_run(ref)
    for ours, theirs in zip(cls + deltas + ctr, atss["cls_scores"] + atss["bbox_preds"] + atss["centernesses"]):
        # atol 1e-5 plus rtol 1e-5: the class logits are about -5, and one of 12800 differs by
        # 1.0e-5 (2e-6 relative: a few ulps of fp32 accumulation order).
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    anchors = _atss_head(ref[2]).anchors(inputs["maps"], STRIDES)
    for ours, theirs in zip(anchors, atss["anchors"]):
        assert torch.equal(ours, theirs)
    assert [a.shape[0] for a in anchors] == atss["num_anchors_per_level"]


def test_atss_assignment_is_exact(ref):
    atss, inputs, _, _, _ = _atss_run(ref)
    anchors = torch.cat(atss["anchors"])
    for b, theirs in enumerate(atss["assign"]):
        # From the pixel gts, as mmdet (the model's path from normalised targets gives the same
        # positives: test_atss_positive_coords).
        gt_index, labels = atss_assign(anchors, theirs["num_level_priors"], inputs["gt_bboxes"][b],
                                       inputs["gt_labels"][b])
        assert torch.equal(gt_index + 1, theirs["assigned_gt_inds"]), b
        assert torch.equal(labels, theirs["assigned_labels"]), b
    assert [int((a["assigned_gt_inds"] > 0).sum()) for a in atss["assign"]] == [27, 18]


def test_atss_losses_per_level(ref):
    atss, _, _, losses, _ = _atss_run(ref)
    for name in ATSS_NAMES:
        expected = torch.stack(atss["losses"][name])
        weight = CO_WEIGHT * ATSS_TERM_WEIGHTS[name]
        # atol 1e-9: the empty levels are -0.0 / 0.0 in mmdet (sum * 0) and +0.0 here.
        torch.testing.assert_close(losses[name] * weight, expected, rtol=1e-5, atol=1e-9)


def test_atss_positive_coords(ref):
    atss, _, _, _, positives = _atss_run(ref)
    coords = atss["pos_coords"]
    for b, sample in enumerate(positives):
        pos = coords["labels"][b] < NUM_CLASSES
        assert torch.equal(sample.anchors, coords["anchors"][b][pos])
        assert torch.equal(sample.labels, coords["labels"][b][pos])
        torch.testing.assert_close(sample.gt_boxes, coords["bbox_targets"][b][pos], rtol=0, atol=1e-4)
        # mmdet pads from every background anchor, in anchor order (all anchors are valid).
        assert torch.equal(sample.neg_anchors, coords["anchors"][b][~pos])


def test_atss_aux_targets_with_the_reference_seed(ref):
    """get_aux_targets after `manual_seed(301)`: image 1 draws randperm(1690)[:9] pads."""
    atss, inputs, _, _, positives = _atss_run(ref)
    aux = atss["aux_targets"]
    sizes = torch.tensor(inputs["img_shape"])
    boxes, targets, _ = build_positive_queries(positives, sizes, NUM_CLASSES,
                                            generator=torch.Generator().manual_seed(301))
    torch.testing.assert_close(boxes, aux["aux_coords"], rtol=0, atol=1e-6)
    assert torch.equal(targets["labels"], aux["aux_labels"])
    weights = aux["aux_bbox_weights"][..., 0] > 0
    torch.testing.assert_close(targets["boxes"][weights], aux["aux_targets"][weights], rtol=0, atol=1e-6)
    assert weights.sum(1).tolist() == [27, 18]


def _criterion(aux_loss=True):
    return SetCriterion(NUM_CLASSES, HungarianMatcher(2.0, 5.0, 2.0, 0.25), cls_loss_coef=1.0,
                        bbox_loss_coef=5.0, giou_loss_coef=2.0, focal_alpha=0.25,
                        loss_types=["labels", "boxes"], aux_loss=aux_loss, interm_loss_coef=1.0,
                        no_interm_box_loss=False, cls_loss_type="quality_focal")


def test_query_head_hungarian_assignment_per_layer(ref):
    train, inputs, _, _ = ref
    query = train["query"]
    matcher = HungarianMatcher(2.0, 5.0, 2.0, 0.25)
    targets = reference_targets(inputs)
    groups = [(query["all_layers_cls_scores"][l], query["all_layers_bbox_preds"][l],
               query["matched_gt_per_layer"][l]) for l in range(3)]
    groups.append((query["enc_cls_scores"], query["enc_bbox_preds"], query["matched_gt_enc"]))
    for logits, boxes, theirs in groups:
        ours = torch.full_like(theirs, -1)
        for b, (pred_idx, tgt_idx) in enumerate(matcher(logits, boxes, targets)):
            ours[b, pred_idx] = tgt_idx
        assert torch.equal(ours, theirs)


def test_query_head_one_to_one_losses(ref):
    """mmdet's `loss_by_feat` (no dn) on its own outputs, against our criterion on the same."""
    train, inputs, _, _ = ref
    query = train["query"]
    layers = [{"pred_logits": query["all_layers_cls_scores"][l], "pred_boxes": query["all_layers_bbox_preds"][l]}
              for l in range(3)]
    outputs = dict(layers[-1], aux_outputs=layers[:-1],
                   interm_outputs={"pred_logits": query["enc_cls_scores"], "pred_boxes": query["enc_bbox_preds"]})
    losses = _criterion()(outputs, reference_targets(inputs))
    theirs = query["losses"]
    for ours_name, name in QUERY_NAMES:
        for suffix, prefix in (("", ""), ("_0", "d0."), ("_1", "d1."), ("_interm", "enc_")):
            torch.testing.assert_close(losses[ours_name + suffix], theirs[prefix + name], rtol=1e-5, atol=0)
    assert len(losses) == len(theirs) == 12


def _query_head(state):
    head = QueryHead(num_classes=5, hidden_dim=64, nheads=8, num_feature_levels=5, enc_layers=2,
                     dec_layers=3, dim_feedforward=128, dropout=0.0, enc_n_points=4, dec_n_points=4,
                     num_queries=30, two_stage_type="standard", embed_init_tgt=True,
                     decoder_sa_type="sa", fix_refpoints_hw=-1, pre_norm=False, use_dn=True,
                     dn_number=20, dn_box_noise_scale=1.0, dn_label_noise_ratio=0.5, num_co_heads=2,
                     activation_checkpoint=False)
    head.load_state_dict({k[len("query_head."):].replace("dn_generator.", ""): v.float()
                          for k, v in state.items() if k.startswith("query_head.")})
    return head.train()


def _memory(maps, padding):
    masks = [F.interpolate(padding[None].float(), size=m.shape[-2:]).to(torch.bool)[0] for m in maps]
    shapes = torch.tensor([tuple(m.shape[-2:]) for m in maps])
    return EncoderMemory(torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1),
                         torch.cat([m.flatten(1) for m in masks], 1), shapes,
                         torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]]),
                         torch.stack([valid_ratios_of(m) for m in masks], 1))


def test_positive_query_pass_for_the_atss_head(ref):
    """`loss_aux(maps, atss pos_coords, head_idx=1)`: our positive pass with mmdet's projection 1
    (the ATSS head's in the official two-co-head numbering) on our own aux targets."""
    train, inputs, state, padding = ref
    head = _query_head(state)
    _, _, _, _, positives = _atss_run(ref)
    boxes, targets, _ = build_positive_queries(positives, torch.tensor(inputs["img_shape"]), NUM_CLASSES,
                                            generator=torch.Generator().manual_seed(301))
    with torch.no_grad():
        layers = head.forward_positive(_memory(inputs["maps"][:5], padding), boxes, 1)
    aux = train["aux_atss"]
    for l, layer in enumerate(layers):
        torch.testing.assert_close(layer["pred_logits"], aux["all_cls_scores"][l], rtol=0, atol=1e-5)
        torch.testing.assert_close(layer["pred_boxes"], aux["all_bbox_preds"][l], rtol=0, atol=1e-5)
    pos = {"layers": layers, "targets": targets}
    losses = _criterion()(dict(layers[-1], pos_outputs=[pos]), reference_targets(inputs))
    for l, prefix in enumerate(("d0.", "d1.", "")):
        for ours, name in QUERY_NAMES:
            torch.testing.assert_close(losses[f"{ours}_pos0_{l}"], aux["losses"][f"{prefix}{name}_aux"],
                                       rtol=1e-5, atol=0)
