"""ChannelMapper neck and sine positional encodings against explicit reference computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from codetr.model.neck import ChannelMapper, group_norm_groups
from codetr.model.position_encoding import PositionEmbeddingSine, sine_embed_boxes


def _conv_gn_reference(x, block, stride):
    """Conv (no bias) + GroupNorm written with torch.nn.functional."""
    y = F.conv2d(x, block.conv.weight, stride=stride, padding=block.conv.kernel_size[0] // 2)
    return F.group_norm(y, block.gn.num_groups, block.gn.weight, block.gn.bias, block.gn.eps)


def test_group_norm_groups():
    assert group_norm_groups(256) == 32
    assert group_norm_groups(48) == 24
    assert group_norm_groups(30) == 30
    assert group_norm_groups(7) == 7


def test_channel_mapper_levels_names_and_values():
    torch.manual_seed(0)
    in_channels = [24, 40, 64]
    neck = ChannelMapper(in_channels, out_channels=32, num_extra_levels=2)
    for p in neck.parameters():  # GN starts as identity affine: randomise to test the wiring
        p.data.normal_()
    feats = [torch.randn(2, c, 20 // 2 ** i, 13 // 2 ** i + 1) for i, c in enumerate(in_channels)]
    outs = neck(feats)
    assert len(outs) == 5
    keys = set(neck.state_dict())
    assert {"convs.0.conv.weight", "convs.2.gn.bias", "extra_convs.0.conv.weight",
            "extra_convs.1.gn.weight"} <= keys
    assert not any(k.endswith("conv.bias") for k in keys)
    assert neck.convs[0].gn.num_groups == 32
    for i, f in enumerate(feats):
        assert outs[i].shape == (2, 32, *f.shape[-2:])
        torch.testing.assert_close(outs[i], _conv_gn_reference(f, neck.convs[i], 1))
    # First extra level from the RAW last backbone feature, the next from the previous extra.
    assert neck.extra_convs[0].conv.in_channels == 64
    last = feats[-1]
    extra0 = _conv_gn_reference(last, neck.extra_convs[0], 2)
    torch.testing.assert_close(outs[3], extra0)
    torch.testing.assert_close(outs[4], _conv_gn_reference(extra0, neck.extra_convs[1], 2))
    assert outs[3].shape[-2:] == (math.ceil(last.shape[-2] / 2), math.ceil(last.shape[-1] / 2))


def test_channel_mapper_no_extra_and_wrong_level_count():
    neck = ChannelMapper([16], out_channels=8, num_extra_levels=0)
    assert len(neck.extra_convs) == 0
    assert len(neck([torch.randn(1, 16, 5, 7)])) == 1
    with pytest.raises(ValueError, match="expected 1 feature levels"):
        neck([torch.randn(1, 16, 5, 7)] * 2)


def _pixel_reference(mask, num_feats, temp_h, temp_w, scale=2 * math.pi, normalize=True, offset=0.0):
    """Loop implementation of DINO's PositionEmbeddingSineHW in float64 (with mmdet's
    SinePositionalEncoding `offset`, added to the running position before normalising)."""
    bsz, height, width = mask.shape
    out = torch.zeros(bsz, 2 * num_feats, height, width, dtype=torch.float64)
    valid = (~mask).double()
    for b in range(bsz):
        for i in range(height):
            for j in range(width):
                y = valid[b, : i + 1, j].sum()
                x = valid[b, i, : j + 1].sum()
                if normalize:
                    y = (y + offset) / (valid[b, :, j].sum() + 1e-6) * scale
                    x = (x + offset) / (valid[b, i, :].sum() + 1e-6) * scale
                for k in range(num_feats):
                    ty = temp_h ** (2 * (k // 2) / num_feats)
                    tx = temp_w ** (2 * (k // 2) / num_feats)
                    fn = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j] = fn(y / ty)
                    out[b, num_feats + k, i, j] = fn(x / tx)
    return out


@pytest.mark.parametrize("normalize,offset", [(True, 0.0), (False, 0.0), (True, -0.5)])
def test_position_embedding_matches_loop_reference(normalize, offset):
    torch.manual_seed(1)
    mask = torch.rand(2, 5, 6) < 0.3  # arbitrary masks, not only bottom/right padding
    mask[1, 3:, :] = True  # and a plainly padded image with all-padding rows
    mask[1, :, 4:] = True
    pe = PositionEmbeddingSine(num_pos_feats=8, temperature_h=20, temperature_w=10000,
                               normalize=normalize, offset=offset)
    out = pe(mask)
    assert out.shape == (2, 16, 5, 6) and out.dtype == torch.float32
    ref = _pixel_reference(mask, 8, 20, 10000, normalize=normalize, offset=offset)
    if offset:
        # An all-padding column (row) puts the offset over eps 1e-6: a phase of 3e6 rad, which
        # float32 (ours, and mmdet's) and float64 round apart. Padding only: compared elsewhere.
        columns = (~mask).sum(1, keepdim=True).expand_as(mask) > 0  # [B, H, W]
        rows = (~mask).sum(2, keepdim=True).expand_as(mask) > 0
        keep = torch.cat([columns[:, None].expand(-1, 8, -1, -1), rows[:, None].expand(-1, 8, -1, -1)], 1)
        assert (~keep).any() and keep.float().mean() > 0.5
        out, ref = torch.where(keep, out.double(), 0.0), torch.where(keep, ref, 0.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_position_embedding_ignores_padding():
    """Padding an image must not change the encoding of its valid pixels (DETR's property)."""
    pe = PositionEmbeddingSine(num_pos_feats=16, temperature_h=20, temperature_w=20)
    small = torch.zeros(1, 7, 9, dtype=torch.bool)
    padded = torch.ones(1, 12, 16, dtype=torch.bool)
    padded[:, :7, :9] = False
    torch.testing.assert_close(pe(padded)[..., :7, :9], pe(small))


def _box_reference(boxes, num_feats, temperature):
    """Loop implementation of DINO's gen_sineembed_for_position (order y, x, w, h)."""
    flat = boxes.reshape(-1, boxes.shape[-1]).double()
    order = [1, 0] if boxes.shape[-1] == 2 else [1, 0, 2, 3]
    out = torch.zeros(flat.shape[0], num_feats * len(order), dtype=torch.float64)
    for n in range(flat.shape[0]):
        for block, coord in enumerate(order):
            c = flat[n, coord].item() * 2 * math.pi
            for k in range(num_feats):
                t = temperature ** (2 * (k // 2) / num_feats)
                out[n, block * num_feats + k] = math.sin(c / t) if k % 2 == 0 else math.cos(c / t)
    return out.reshape(*boxes.shape[:-1], -1)


@pytest.mark.parametrize("coords", [2, 4])
def test_sine_embed_boxes_matches_loop_reference(coords):
    torch.manual_seed(coords)
    boxes = torch.rand(2, 3, coords)
    out = sine_embed_boxes(boxes, num_pos_feats=16, temperature=10000)
    assert out.shape == (2, 3, 16 * coords)
    torch.testing.assert_close(out.double(), _box_reference(boxes, 16, 10000), atol=1e-5, rtol=1e-5)


def test_sine_embed_boxes_default_width_and_bad_input():
    assert sine_embed_boxes(torch.rand(5, 4)).shape == (5, 512)
    with pytest.raises(ValueError, match="2 or 4"):
        sine_embed_boxes(torch.rand(5, 3))


def test_sine_features_are_bit_identical_to_dinos_float32_expression():
    """The frequencies are computed once per (sin, cos) pair: the same float32 numbers as DINO's
    `temperature ** (2 * (dim_t // 2) / F)` over all F, so trained runs stay bit-reproducible."""
    from codetr.model.position_encoding import _sine_features

    torch.manual_seed(3)
    coords = torch.rand(2, 7, 5) * 2 * math.pi
    for feats, temperature in ((16, 10000), (64, 20), (8, 10000)):
        dim_t = torch.arange(feats, dtype=torch.float32)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats)
        pos = coords[..., None] / dim_t
        dino = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
        assert torch.equal(_sine_features(coords, feats, temperature), dino)


@pytest.mark.parametrize("coords", [2, 4])
def test_sine_embed_boxes_is_bit_identical_to_per_coordinate_blocks(coords):
    """One call over all coordinates: the same float32 numbers as DINO's per-coordinate blocks."""
    from codetr.model.position_encoding import _sine_features

    boxes = torch.rand(3, 5, coords)
    scaled = boxes * (2 * math.pi)
    blocks = [_sine_features(scaled[..., i], 32, 10000) for i in range(coords)]
    order = (1, 0) if coords == 2 else (1, 0, 2, 3)
    assert torch.equal(sine_embed_boxes(boxes, 32, 10000), torch.cat([blocks[i] for i in order], -1))


def test_the_co_deformable_recipe_centres_its_pixels():
    """params/co_deformable_detr_r50_1x.yaml: mmdet's Deformable DETR offset -0.5 reaches the model."""
    from pathlib import Path

    from codetr.model.builder import build_model
    from codetr.spec import load_spec

    recipe = Path(__file__).resolve().parents[1] / "params" / "co_deformable_detr_r50_1x.yaml"
    spec = load_spec(str(recipe), ["model.backbone=resnet_18", "model.hidden_dim=32",
                                   "model.dim_feedforward=32", "model.enc_layers=1", "model.dec_layers=1",
                                   "model.pretrained_backbone_path=null"])
    assert spec.model.pe_offset == -0.5
    model = build_model(spec, 3, load_pretrained_backbone=False)
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    torch.testing.assert_close(model.position_encoding(mask).double(),
                               _pixel_reference(mask, 16, 10000, 10000, offset=-0.5), atol=1e-5, rtol=1e-5)
