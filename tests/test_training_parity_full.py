"""The whole official Co-DINO training loss: the tiny model with BOTH co-heads (Faster R-CNN first,
then ATSS) and denoising, our CoDETR.forward + build_criterion against every term of mmdet's
`CoDETR.loss` (../shared/reference/mmdet-codino/train_losses.pth, `full_codetr`: 46 losses, `acc0`
aside).

Every random draw is mmdet's under mmdet's seeds, set where the reference set them: 0 at the start
of the loss (the denoising noise), 100 before the RPN, 200 before the RoI head (their samplers),
300 + k before co-head k's positive queries (their padding). Our denoising generator, samplers and
positive-query padding draw as mmdet's do (tests/test_denoising.py, test_rcnn_reference.py), so
nothing is injected. The tiny model's RoI head has 64-wide FCs (ours are 4 x hidden_dim by
default, 1024 in the R50 recipe, as mmdet's): the test builds that one head at 64.

Tolerance rtol 1e-5 (the reference README's for losses); the maps differ from mmdet's by ~3e-6
(forward parity); measured: at most 2.7e-7 relative over the 46 terms.
"""
import pytest
import torch

import codetr.model.codetr as codetr_module
from codetr.model.builder import build_criterion
from codetr.model.roi_head import CoStandardRoIHead
from codetr.zoo import checkpoint_flavour, import_official
from tests.zoo_fixtures import (CO_HEAD_STRIDES, NUM_CLASSES, REFERENCE, plain_state_dict,
                                reference_file, reference_targets, tiny_model, tiny_spec)

# The official recipe through the spec, as params/co_dino_5scale_r50*.yaml say it.
OFFICIAL = dict(co_head_loss_weight=12.0, cls_loss_type="quality_focal", cls_loss_coef=2.0,
                cls_loss_weight=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
                backbone_frozen_bn=True, use_rcnn_co_head=True)
QUERY_NAMES = (("loss_ce", "loss_cls"), ("loss_bbox", "loss_bbox"), ("loss_giou", "loss_iou"))
# mmdet's co-head terms (lists over levels are summed, as its logger does) under our names.
CO_HEAD_NAMES = {"loss_rpn_cls_co0": "loss_rpn_cls", "loss_rpn_bbox_co0": "loss_rpn_bbox",
                 "loss_roi_cls_co0": "loss_cls0", "loss_roi_bbox_co0": "loss_bbox0",
                 "loss_cls_co1": "loss_cls1", "loss_bbox_co1": "loss_bbox1",
                 "loss_centerness_co1": "loss_centerness1"}


def _names() -> dict[str, str]:
    """Our loss name -> mmdet's, for all 46 terms."""
    names = dict(CO_HEAD_NAMES)
    for ours, theirs in QUERY_NAMES:
        for suffix, prefix in (("", ""), ("_0", "d0."), ("_1", "d1."), ("_interm", "enc_")):
            names[ours + suffix] = prefix + theirs
        for suffix, prefix in (("_dn", ""), ("_dn_0", "d0."), ("_dn_1", "d1.")):
            names[ours + suffix] = f"{prefix}dn_{theirs}"
        for head in (0, 1):
            for layer, prefix in enumerate(("d0.", "d1.", "")):
                names[f"{ours}_pos{head}_{layer}"] = f"{prefix}{theirs}_aux{head}"
    return names


def _seeded(function, seed):
    def run(*args, **kwargs):
        torch.manual_seed(seed)
        return function(*args, **kwargs)
    return run


@pytest.fixture(scope="module")
def losses():
    if not (REFERENCE / "train_losses.pth").exists():
        pytest.skip("../shared/reference/mmdet-codino is not present")
    model = tiny_model(**OFFICIAL)
    assert model.roi_head[0].bbox_roi_extractor.finest_scale == 56.0  # the config's, levels from 4
    model.roi_head[0] = CoStandardRoIHead(NUM_CLASSES, 64, CO_HEAD_STRIDES[:-1], fc_channels=64)
    state = plain_state_dict(REFERENCE)
    mapped, report = import_official(state, model.state_dict(), "tiny", checkpoint_flavour({}, state))
    assert report.ok and len(mapped) == len(state) == len(model.state_dict()), report.summary()
    model.load_state_dict(mapped)
    model.train()
    model.rpn_head.loss_and_proposals = _seeded(model.rpn_head.loss_and_proposals, 100)
    model.roi_head[0].loss_and_positives = _seeded(model.roi_head[0].loss_and_positives, 200)
    build_positives, heads = codetr_module.build_positive_queries, []

    def seeded_positives(*args, **kwargs):
        torch.manual_seed(300 + len(heads))  # 300 + head index, R-CNN (0) first
        heads.append(None)
        return build_positives(*args, **kwargs)

    images = reference_file(str(REFERENCE), "tiny_inputs.pth")
    targets = reference_targets(reference_file(str(REFERENCE), "rcnn_inputs.pth"))
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(codetr_module, "build_positive_queries", seeded_positives)
        torch.manual_seed(0)
        out = model(images["batch_inputs"], images["padding_mask"], targets)
    assert len(heads) == 2
    ours = build_criterion(tiny_spec(**OFFICIAL), NUM_CLASSES)(out, targets)
    return ours, reference_file(str(REFERENCE), "train_losses.pth")["full_codetr"]["losses"]


def test_every_term_of_the_official_loss(losses):
    ours, theirs = losses
    names = _names()
    assert len(names) == 46 and set(ours) == set(names)
    assert set(theirs) - set(names.values()) == {"acc0"}  # the RoI accuracy is no loss
    for name, their_name in names.items():
        expected = theirs[their_name]
        expected = torch.stack(expected).sum() if isinstance(expected, list) else expected
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=0, msg=name)
