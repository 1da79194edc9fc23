"""One decoder call for matching, denoising and positive queries equals the separate passes.

The reference is the model's own separate passes (`QueryHead.finish` without positive queries,
then `forward_positive` per co-head, as mmdet's `forward_aux` runs them). Tolerance 1e-5: the
only difference allowed is the order of floating-point sums in the larger, masked self-attention
(measured: ~1e-7). Gradients into the memory are compared too.
"""
import pytest
import torch

from codetr.model.builder import build_model
from codetr.model.joint_queries import block_attn_mask
from test_model import random_batch, tiny_spec

TOL = dict(rtol=1e-5, atol=1e-5)


def test_block_attn_mask_keeps_groups_apart_and_the_denoising_mask():
    dn = torch.tensor([[False, True], [False, False]])
    mask = block_attn_mask([2, 3, 1], dn, torch.device("cpu"))
    assert mask.shape == (6, 6)
    assert torch.equal(mask[:2, :2], dn)
    assert not mask[2:5, 2:5].any() and not mask[5, 5]
    assert mask[:2, 2:].all() and mask[2:5, :2].all() and mask[2:5, 5].all() and mask[5, :5].all()


@pytest.mark.parametrize("sa_type", ["sa", "ca_label"])
def test_joint_pass_equals_separate_passes(sa_type):
    torch.manual_seed(0)
    model = build_model(tiny_spec("model.num_co_heads=2", f"model.decoder_sa_type={sa_type}"),
                        num_classes=3).train()
    images, masks, targets = random_batch()
    head = model.query_head
    feats = model.neck(model.backbone(images))
    level_masks = [torch.nn.functional.interpolate(masks[None].float(), size=f.shape[-2:]).bool()[0]
                   for f in feats]
    level_pos = [model.position_encoding(m) for m in level_masks]
    torch.manual_seed(1)
    prepared = head.prepare(feats, level_masks, level_pos, targets)
    assert prepared["dn"] is not None
    boxes = [torch.rand(2, n, 4) * 0.5 + 0.2 for n in (9, 5)]
    boxes[1][0, 0, 2] = 1.3  # an anchor wider than the image: raw as reference, as mmdet

    joint, joint_pos = head.finish(prepared, boxes)
    alone, none = head.finish(prepared)
    assert none == []
    separate_pos = [head.forward_positive(prepared["memory"], b, k) for k, b in enumerate(boxes)]

    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(joint[key], alone[key], **TOL)
        torch.testing.assert_close(joint["dn_outputs"][key], alone["dn_outputs"][key], **TOL)
        for a, b in zip(joint["aux_outputs"], alone["aux_outputs"]):
            torch.testing.assert_close(a[key], b[key], **TOL)
    assert len(joint_pos) == 2
    for layers_joint, layers_sep in zip(joint_pos, separate_pos):
        assert len(layers_joint) == len(layers_sep) == head.dec_layers
        for a, b in zip(layers_joint, layers_sep):
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(a[key], b[key], **TOL)

    memory = prepared["memory"].memory

    def grad(outputs):
        total = sum(o["pred_logits"].sum() + o["pred_boxes"].sum() for o in outputs)
        return torch.autograd.grad(total, memory, retain_graph=True)[0]

    g_joint = grad([joint] + joint["aux_outputs"] + [o for layers in joint_pos for o in layers])
    g_sep = grad([alone] + alone["aux_outputs"] + [o for layers in separate_pos for o in layers])
    torch.testing.assert_close(g_joint, g_sep, **TOL)
