"""codetr's Swin against mmdet 3.3's SwinTransformer (../shared/reference/mmdet-codino ``swin_*``).

The reference is a small mmdet Swin with every option of Co-DINO's Swin-L (window 12, shift in
every odd block, per-level norms, ...), its fp16-exact weights, fp16-exact inputs at 224x224,
160x192 (B=2) and 384x384, and its fp32 per-level outputs (at most 5.1 in magnitude).

Tolerance atol 1e-4: weights and inputs are exactly representable (fp16 values run in fp32), so
the only difference left is fp32 summation order (our fused attention vs mmdet's explicit
softmax), measured at <= 3e-6. The smallest plausible mistake in the reference README's table (a
tanh GELU) moves the outputs by >= 2.5e-4, and each of them is shown below to break 1e-4.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codetr.model import swin as swin_module
from codetr.model import swin_attention
from codetr.model.swin import SwinTransformer
from codetr.model.swin_attention import relative_position_index

ATOL = 1e-4
SIZES = ("224x224", "160x192", "384x384")


@functools.lru_cache(maxsize=1)
def _load(path):
    state = torch.load(path / "swin_state_dict.pth", weights_only=True)
    inputs = torch.load(path / "swin_inputs.pth", weights_only=True)["images"]
    outputs = torch.load(path / "swin_outputs.pth", weights_only=True)
    return state, inputs, outputs


@pytest.fixture
def reference(mmdet_reference):
    """(fp16 state dict, {size: fp16 images}, {size: [4 fp32 maps]}); read once per session."""
    return _load(mmdet_reference)


def _model(state) -> SwinTransformer:
    """The reference architecture (swin_config.json) with the reference weights, eval mode."""
    model = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8), window=12, drop_path_rate=0.3).eval()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v.clone()
                           for k, v in state.items()})
    return model


def _max_errors(model, inputs, outputs, size) -> list[float]:
    with torch.no_grad():
        levels = model(inputs[size].float())
    assert [o.shape for o in levels] == [o.shape for o in outputs[size]]
    return [(a - b).abs().max().item() for a, b in zip(levels, outputs[size])]


def test_keys_and_buffers_match_mmdet(reference):
    state, _, _ = reference
    ours = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8), window=12).state_dict()
    assert list(ours) == list(state)  # same names, same order
    assert all(ours[k].shape == state[k].shape for k in state)
    for key in (k for k in state if k.endswith("relative_position_index")):
        torch.testing.assert_close(ours[key], state[key], rtol=0, atol=0)
    torch.testing.assert_close(relative_position_index(12), state[key], rtol=0, atol=0)


@pytest.mark.parametrize("size", SIZES)
def test_per_level_maps_match_mmdet(reference, size):
    state, inputs, outputs = reference
    errors = _max_errors(_model(state), inputs, outputs, size)
    assert max(errors) < ATOL, errors


# --- each likely mistake of the reference README would fail that tolerance ----------------------

def _variant_forward(roll_first=False, mask_padding=False, no_shift_mask=False):
    """ShiftWindowMSA.forward with one of mmdet's rules broken."""
    def forward(self, x, hw, mask=None):
        b, _, c = x.shape
        height, width = hw
        x = x.view(b, height, width, c)
        padded_h, padded_w = self.padded_size(height, width)
        pad = (0, 0, 0, padded_w - width, 0, padded_h - height)
        if roll_first and self.shift:  # timm: roll the unpadded map, then pad
            x = F.pad(torch.roll(x, (-self.shift, -self.shift), (1, 2)), pad)
        else:
            x = F.pad(x, pad)
            if self.shift:
                x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        mask = mask if self.shift and not no_shift_mask else None
        if mask_padding:
            valid = torch.zeros(1, padded_h, padded_w, 1)
            valid[:, :height, :width] = 1
            if self.shift:
                valid = torch.roll(valid, (-self.shift, -self.shift), (1, 2))
            keys = swin_attention.window_partition(valid, self.window).squeeze(-1)  # [nW, N]
            key_mask = ((1 - keys) * -1e4)[:, None, :].expand(-1, keys.shape[1], -1)
            mask = key_mask if mask is None else mask + key_mask
        out = self.w_msa(swin_attention.window_partition(x, self.window), mask)
        x = swin_attention.window_reverse(out, self.window, padded_h, padded_w)
        if roll_first:  # timm crops, then rolls back
            x = x[:, :height, :width]
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), (1, 2))
        return x[:, :height, :width].reshape(b, height * width, c)
    return forward


def _concat_merging_forward(self, x, hw):
    """Original/timm PatchMerging order with mmdet's (Unfold-order) weights: not permuted."""
    b, _, c = x.shape
    height, width = hw
    x = F.pad(x.view(b, height, width, c), (0, 0, 0, width % 2, 0, height % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x.flatten(1, 2))), (x.shape[1], x.shape[2])


def _no_shift_where_map_fits(model, size):
    """timm: no shift in a stage whose map is no larger than the window."""
    height, width = (int(v) for v in size.split("x"))
    side = min(-(-height // 4), -(-width // 4))
    for stage in model.stages:
        if side <= stage.window:
            for block in stage.blocks:
                block.attn.shift = 0
        side = -(-side // 2)


def _no_level_norms(model, size):
    for i in model.out_indices:
        setattr(model, f"norm{i}", nn.Identity())


def _transposed_index(model, size):
    for module in model.modules():
        if isinstance(module, swin_attention.WindowMSA):
            module.relative_position_index.copy_(module.relative_position_index.t().clone())


def _tanh_gelu(model, size):
    for module in model.modules():
        if isinstance(module, swin_module.FFN):
            module.layers[0][1] = nn.GELU(approximate="tanh")


MISTAKES = {  # name -> (patch of the class or the model, sizes where the README shows an effect)
    "timm order: roll, then pad": (("forward", _variant_forward(roll_first=True)), SIZES[:2]),
    "no shift where the map fits a window": (_no_shift_where_map_fits, SIZES),
    "PatchMerging concat order, weights not permuted": (("merge", _concat_merging_forward), SIZES),
    "no per-level norm": (_no_level_norms, SIZES),
    "padded keys masked out": (("forward", _variant_forward(mask_padding=True)), SIZES[:2]),
    "shift without the -100 mask": (("forward", _variant_forward(no_shift_mask=True)), SIZES),
    "transposed relative-position index": (_transposed_index, SIZES),
    "tanh GELU": (_tanh_gelu, SIZES),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_likely_mistake_breaks_the_tolerance(reference, monkeypatch, mistake):
    state, inputs, outputs = reference
    patch, sizes = MISTAKES[mistake]
    for size in sizes:
        model = _model(state)
        if isinstance(patch, tuple):
            target = {"forward": swin_attention.ShiftWindowMSA,
                      "merge": swin_module.PatchMerging}[patch[0]]
            monkeypatch.setattr(target, "forward", patch[1])
        else:
            patch(model, size)
        errors = _max_errors(model, inputs, outputs, size)
        monkeypatch.undo()
        assert max(errors) > 2 * ATOL, (mistake, size, errors)
