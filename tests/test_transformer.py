"""Deformable attention module, encoder, decoder refinement, two-stage proposals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codetr.model.decoder import Decoder
from codetr.model.deformable_attention import MultiScaleDeformableAttention
from codetr.model.encoder import Encoder, encoder_reference_points
from codetr.model.mlp import MLP
from codetr.model.two_stage import encoder_proposals, select_topk_proposals

D = 8


def _identity_attention(num_points: int) -> MultiScaleDeformableAttention:
    """One head, one level: identity projections so the output is the raw bilinear sample."""
    attn = MultiScaleDeformableAttention(D, 1, 1, num_points)
    with torch.no_grad():
        attn.value_proj.weight.copy_(torch.eye(D))
        attn.output_proj.weight.copy_(torch.eye(D))
    return attn


def _grid_sample(value_map: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Reference bilinear sample of `[B, D, H, W]` at normalised `[B, N, 2]` points -> `[B, N, D]`."""
    out = F.grid_sample(value_map, 2 * xy[:, :, None] - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[..., 0].transpose(1, 2)


def test_msda_2d_reference_samples_at_offset_cells():
    torch.manual_seed(0)
    attn = _identity_attention(1)
    h, w = 5, 7
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.5, -0.5]))  # (x, y) in cells
    value_map = torch.randn(2, D, h, w)
    value = value_map.flatten(2).transpose(1, 2)
    ref = torch.rand(2, 6, 2) * 0.6 + 0.2
    shapes = torch.tensor([[h, w]])
    out = attn(torch.randn(2, 6, D), ref[:, :, None], value, shapes, torch.tensor([0]))
    expected = _grid_sample(value_map, ref + torch.tensor([1.5 / w, -0.5 / h]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_msda_4d_reference_scales_offsets_by_box():
    torch.manual_seed(1)
    attn = _identity_attention(2)
    h, w = 6, 6
    with torch.no_grad():
        # Point 0 offset (2, 0), point 1 offset (0, -2): with P = 2 they land on the box's right
        # edge and top edge (off / P * wh / 2).
        attn.sampling_offsets.bias.copy_(torch.tensor([2.0, 0.0, 0.0, -2.0]))
    value_map = torch.randn(1, D, h, w)
    value = value_map.flatten(2).transpose(1, 2)
    boxes = torch.cat([torch.rand(1, 5, 2) * 0.4 + 0.3, torch.rand(1, 5, 2) * 0.3 + 0.1], -1)
    out = attn(torch.randn(1, 5, D), boxes[:, :, None], value, torch.tensor([[h, w]]), torch.tensor([0]))
    right = boxes[..., :2] + torch.stack([boxes[..., 2] / 2, torch.zeros(1, 5)], -1)
    top = boxes[..., :2] - torch.stack([torch.zeros(1, 5), boxes[..., 3] / 2], -1)
    expected = (_grid_sample(value_map, right) + _grid_sample(value_map, top)) / 2  # uniform weights
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_msda_ignores_padded_values():
    torch.manual_seed(2)
    attn = MultiScaleDeformableAttention(D, 2, 2, 3)
    shapes = torch.tensor([[4, 4], [2, 2]])
    start = torch.tensor([0, 16])
    value = torch.randn(1, 20, D)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, [3, 7, 18]] = True
    query, ref = torch.randn(1, 5, D), torch.rand(1, 5, 2, 2)
    out = attn(query, ref, value, shapes, start, mask)
    value2 = value.clone()
    value2[mask] = torch.randn(3, D) * 100
    torch.testing.assert_close(attn(query, ref, value2, shapes, start, mask), out)
    assert not torch.allclose(attn(query, ref, value2, shapes, start, None), out)


def test_encoder_reference_points_are_valid_pixel_centres():
    shapes = torch.tensor([[4, 6], [2, 3]])
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 0.75]]])
    ref = encoder_reference_points(shapes, ratios)
    assert ref.shape == (2, 30, 2, 2)
    # Unpadded image: pixel (row 1, col 2) of level 0 is at ((2 + 0.5) / 6, (1 + 0.5) / 4).
    torch.testing.assert_close(ref[0, 1 * 6 + 2, 0], torch.tensor([2.5 / 6, 1.5 / 4]))
    # Padded image: normalised by the valid size (3 x 3 of 6 x 4), then mapped back to the padded
    # map of each level by its valid ratio, which is the plain padded-map position.
    torch.testing.assert_close(ref[1, 1 * 6 + 2, 0], torch.tensor([2.5 / 6, 1.5 / 4]))
    torch.testing.assert_close(ref[1, 24 + 1 * 3 + 2, 1], torch.tensor([2.5 / 3, 1.5 / 2]))


def test_activation_checkpoint_same_outputs_and_grads():
    torch.manual_seed(3)
    enc = Encoder(D, 2, 2, 2, 16, 0.1, 2, False, False).train()
    shapes = torch.tensor([[4, 4], [2, 2]])
    start = torch.tensor([0, 16])
    src, pos = torch.randn(2, 20, D), torch.randn(2, 20, D)
    ratios = torch.rand(2, 2, 2) * 0.5 + 0.5
    mask = torch.rand(2, 20) > 0.8

    def run(checkpointing: bool):
        enc.activation_checkpoint = checkpointing
        enc.zero_grad()
        x = src.clone().requires_grad_(True)
        torch.manual_seed(7)  # same dropout masks in both runs
        out = enc(x, pos, shapes, start, ratios, mask)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        return out.detach(), x.grad, [p.grad.clone() for p in enc.parameters()]

    out_a, gx_a, grads_a = run(False)
    out_b, gx_b, grads_b = run(True)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)


def test_pre_norm_normalises_encoder_output():
    torch.manual_seed(4)
    enc = Encoder(D, 2, 1, 2, 16, 0.0, 1, True, False)
    assert isinstance(enc.norm, nn.LayerNorm)
    out = enc(torch.randn(1, 9, D) * 5 + 3, torch.randn(1, 9, D), torch.tensor([[3, 3]]), torch.tensor([0]),
              torch.ones(1, 1, 2), None)
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 9), atol=1e-5, rtol=0)


@pytest.mark.parametrize("query_pos_source", ["ref_point_head", "proposal"])
def test_decoder_refinement_detach_semantics(query_pos_source):
    """Both decoders (DINO's; Deformable DETR's with `look_forward_twice=True`, as Sense-X's
    Co-Deformable-DETR config) sample around detached boxes but return them undetached."""
    torch.manual_seed(5)
    dec = Decoder(D, 2, 1, 2, 16, 0.0, 2, "sa", 3, query_pos_source)
    reg = nn.ModuleList([MLP(D, D, 4, 3) for _ in range(2)])
    memory = torch.randn(1, 16, D)
    boxes = torch.cat([torch.rand(1, 4, 2) * 0.5 + 0.25, torch.rand(1, 4, 2) * 0.2 + 0.1], -1)
    query_pos = torch.randn(1, 4, D) if query_pos_source == "proposal" else None
    hidden, refs = dec(torch.randn(1, 4, D), boxes, memory, None, torch.tensor([[4, 4]]), torch.tensor([0]),
                       torch.ones(1, 1, 2), reg, query_pos=query_pos)
    assert len(hidden) == 2 and len(refs) == 3 and refs[0] is boxes
    reg0 = list(reg[0].parameters())
    # Layer 1 samples around a DETACHED box: its output does not depend on reg_branches[0] ...
    grads = torch.autograd.grad(hidden[1].sum(), reg0, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)
    # ... but the refined box itself (which layer 1's prediction refines) does.
    grads = torch.autograd.grad(refs[1].sum(), reg0, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in grads)
    # refs[l + 1] = sigmoid(reg_l(raw layer output) + logit(refs[l])) stays in (0, 1).
    assert all(((r > 0) & (r < 1)).all() for r in refs)


def test_encoder_proposals_match_formula():
    shapes = torch.tensor([[4, 4], [2, 2]])
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, :16] = torch.tensor([[0, 0, 1, 1]] * 4, dtype=torch.bool).flatten()  # level 0: 2 valid columns
    mask[1, 16:] = torch.tensor([[0, 1]] * 2, dtype=torch.bool).flatten()
    memory = torch.randn(2, 20, D)
    out_mem, props = encoder_proposals(memory, mask, shapes)
    sig = props.sigmoid()
    # Unpadded: level 0 pixel (row 1, col 2) -> (2.5/4, 1.5/4, 0.05, 0.05); level 1 w = 0.1.
    torch.testing.assert_close(sig[0, 6], torch.tensor([2.5 / 4, 1.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(sig[0, 16 + 3], torch.tensor([1.5 / 2, 1.5 / 2, 0.1, 0.1]))
    # Padded image: x normalised by the 2 valid columns; padded locations are invalid.
    torch.testing.assert_close(sig[1, 4 + 1], torch.tensor([1.5 / 2, 1.5 / 4, 0.05, 0.05]))
    invalid = torch.isinf(props).any(-1)
    assert invalid[1][mask[1]].all()
    # Level 1 of the padded image: cx = 0.5 / 1 = 0.5 valid, padded column invalid.
    assert not invalid[1, 16] and invalid[1, 17]
    assert (out_mem[invalid] == 0).all() and torch.equal(out_mem[~invalid], memory[~invalid])


def test_select_topk_proposals_picks_highest_scores():
    torch.manual_seed(6)
    mem = torch.randn(2, 12, D)
    props = torch.randn(2, 12, 4)
    cls, reg = nn.Linear(D, 3), MLP(D, D, 4, 3)
    top = select_topk_proposals(mem, props, cls, reg, 5)
    scores = cls(mem).max(-1)[0]
    idx = scores.topk(5, 1)[1]
    torch.testing.assert_close(top.logits, torch.gather(cls(mem), 1, idx[..., None].expand(-1, -1, 3)))
    torch.testing.assert_close(top.content, torch.gather(mem, 1, idx[..., None].expand(-1, -1, D)))
    expected_boxes = torch.gather(reg(mem) + props, 1, idx[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(top.boxes_unsig, expected_boxes)
    assert select_topk_proposals(mem, props, cls, reg, 50).logits.shape == (2, 12, 3)
