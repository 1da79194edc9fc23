"""The whole tiny official Co-DINO in training: our CoDETR.forward + build_criterion against
mmdet's `CoDETR.loss` (../shared/reference/mmdet-codino/train_losses.pth, `full_codetr`).

The official recipe's weights through the spec, as params/co_dino_5scale_*.yaml say them:
`co_head_loss_weight: 12.0` (loss_lambda 2 x 6 decoder layers: ATSS 12 / 24 / 12),
`cls_loss_coef: 2.0` (the matching cost) with `cls_loss_weight: 1.0` (the QFL weight). The first
run has denoising off; mmdet's one-to-one losses with dn are bit-identical to those without (the
reference's checks), so `loss_*`, `d*.loss_*` and `enc_loss_*` of the dn run are the targets. The
second run has denoising on with mmdet's seeds (`manual_seed(0)` at the start of the loss, 301
before the ATSS head's positive queries): our noise is drawn as mmdet's `CdnQueryGenerator` draws
it, so its `dn_loss_*` terms are the targets too. The Faster R-CNN co-head is not built (the tiny spec: one ATSS head), so mmdet's ATSS
terms `*1` / `*_aux1` are our `_co0` / `_pos0_*` (the importer maps `aux_pos_trans.1` to our 0).
Tolerance rtol 1e-5 (the README's); the maps our encoder feeds the co-heads differ from mmdet's
by ~3e-6 (forward parity); measured: at most 7.6e-7 relative over the 24 terms.
"""
import pytest
import torch

import codetr.model.codetr as codetr_module
from codetr.model.builder import build_criterion
from codetr.zoo import checkpoint_flavour, import_official
from tests.zoo_fixtures import (NUM_CLASSES, plain_state_dict, reference_file, reference_targets,
                                tiny_model, tiny_spec)

OFFICIAL_WEIGHTS = dict(co_head_loss_weight=12.0, cls_loss_type="quality_focal",
                        cls_loss_coef=2.0, cls_loss_weight=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0)
QUERY_NAMES = (("loss_ce", "loss_cls"), ("loss_bbox", "loss_bbox"), ("loss_giou", "loss_iou"))




def _losses(with_dn: bool, monkeypatch):
    from tests.zoo_fixtures import REFERENCE
    if not (REFERENCE / "train_losses.pth").exists():
        pytest.skip("../shared/reference/mmdet-codino is not present")
    # mmdet's ResNet has norm_eval=True and BN requires_grad=False: the recipes' backbone_frozen_bn.
    model = tiny_model(**OFFICIAL_WEIGHTS, backbone_frozen_bn=True)
    state = plain_state_dict(REFERENCE)
    mapped, report = import_official(state, model.state_dict(), "tiny", checkpoint_flavour({}, state))
    assert report.ok, report.summary()
    model.load_state_dict(mapped, strict=False)
    model.train()
    model.query_head.use_dn = with_dn  # the weights keep their dn label embedding either way
    images = reference_file(str(REFERENCE), "tiny_inputs.pth")
    rcnn = reference_file(str(REFERENCE), "rcnn_inputs.pth")
    targets = reference_targets(rcnn)
    build_positives = codetr_module.build_positive_queries

    def seeded_positives(*args, **kwargs):
        torch.manual_seed(301)  # mmdet's seed before the ATSS head's get_aux_targets (300 + head 1)
        return build_positives(*args, **kwargs)

    monkeypatch.setattr(codetr_module, "build_positive_queries", seeded_positives)
    torch.manual_seed(0)  # mmdet's seed at the start of CoDETR.loss: the dn noise comes first
    with torch.no_grad():
        out = model(images["batch_inputs"], images["padding_mask"], targets)
    losses = build_criterion(tiny_spec(**OFFICIAL_WEIGHTS), NUM_CLASSES)(out, targets)
    reference = reference_file(str(REFERENCE), "train_losses.pth")["full_codetr"]["losses"]
    return losses, reference


@pytest.fixture(scope="module")
def our_losses():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _losses(False, monkeypatch)


@pytest.fixture(scope="module")
def our_losses_with_dn():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _losses(True, monkeypatch)


def test_one_to_one_losses(our_losses):
    losses, theirs = our_losses
    for ours, name in QUERY_NAMES:
        for suffix, prefix in (("", ""), ("_0", "d0."), ("_1", "d1."), ("_interm", "enc_")):
            torch.testing.assert_close(losses[ours + suffix], theirs[prefix + name], rtol=1e-5, atol=0,
                                       msg=ours + suffix)


def test_denoising_losses(our_losses_with_dn):
    """mmdet's `dn_loss_*` (and `d*.dn_loss_*`) with the same seed: the same noisy queries."""
    losses, theirs = our_losses_with_dn
    for ours, name in QUERY_NAMES:
        for suffix, prefix in (("_dn", ""), ("_dn_0", "d0."), ("_dn_1", "d1.")):
            torch.testing.assert_close(losses[ours + suffix], theirs[f"{prefix}dn_{name}"], rtol=1e-5,
                                       atol=0, msg=ours + suffix)


def test_denoising_leaves_the_other_losses_alone(our_losses, our_losses_with_dn):
    """With dn on, every other term is the no-dn run's (the dn queries are masked out)."""
    without, _ = our_losses
    with_dn, _ = our_losses_with_dn
    assert set(with_dn) - set(without) == {f"{n}_dn{s}" for n, _ in QUERY_NAMES for s in ("", "_0", "_1")}
    for name, value in without.items():
        torch.testing.assert_close(with_dn[name], value, rtol=1e-5, atol=0, msg=name)


def test_atss_co_head_losses(our_losses):
    losses, theirs = our_losses
    for name in ("loss_cls", "loss_bbox", "loss_centerness"):
        torch.testing.assert_close(losses[f"{name}_co0"], torch.stack(theirs[f"{name}1"]).sum(),
                                   rtol=1e-5, atol=0, msg=name)


def test_positive_query_losses(our_losses):
    losses, theirs = our_losses
    for layer, prefix in enumerate(("d0.", "d1.", "")):
        for ours, name in QUERY_NAMES:
            torch.testing.assert_close(losses[f"{ours}_pos0_{layer}"], theirs[f"{prefix}{name}_aux1"],
                                       rtol=1e-5, atol=0, msg=f"{ours}_pos0_{layer}")


def test_nothing_else_is_trained(our_losses):
    """Every term we return has its mmdet counterpart above (mmdet's extra: dn, R-CNN head, acc)."""
    losses, _ = our_losses
    assert len(losses) == 12 + 3 + 9


def test_the_official_recipes_say_these_weights():
    """params/co_dino_5scale_*.yaml carry the weights this file tests (lambda 2 x dec_layers)."""
    from pathlib import Path

    from codetr.spec import load_spec

    recipes = sorted((Path(__file__).resolve().parents[1] / "params").glob("co_dino_5scale_*.yaml"))
    assert len(recipes) == 8
    for path in recipes:
        m = load_spec(str(path), []).model
        assert m.co_head_loss_weight == 2.0 * m.dec_layers == OFFICIAL_WEIGHTS["co_head_loss_weight"], path
        for key in ("cls_loss_type", "cls_loss_coef", "cls_loss_weight", "bbox_loss_coef", "giou_loss_coef"):
            assert getattr(m, key) == OFFICIAL_WEIGHTS[key], (path, key)
