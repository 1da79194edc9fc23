"""`codetr.ops.roi_align` against `torchvision.ops.roi_align` (aligned, adaptive sampling): the
same forward, the same gradient (rtol = atol = 1e-5: only the fp32 summation order
differs) on random maps and RoIs, including empty, outside, border-crossing and whole-map RoIs."""
import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

import codetr.ops.roi_align as module
from codetr.ops.roi_align import roi_align


def _case(batch, channels, height, width, scale, num, seed):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, channels, height, width, generator=gen, requires_grad=True)
    extent = torch.tensor([width, height]) / scale
    xy = torch.rand(num, 2, generator=gen) * extent * 1.4 - 0.2 * extent
    wh = torch.rand(num, 2, generator=gen) * extent * 0.8
    rois = torch.cat([torch.randint(0, batch, (num, 1), generator=gen).float(), xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # empty
    rois[1, 1:] = -extent.repeat(2) * 3  # far outside
    rois[2, 1:] = torch.cat([torch.zeros(2), extent])  # the whole map
    rois[3, 1:] = torch.cat([extent - 3, extent + 5])  # across the bottom-right border
    grad_out = torch.randn(num, channels, 7, 7, generator=gen)
    return feat, rois, grad_out, scale


@pytest.mark.parametrize("shape", [(2, 8, 16, 20, 1 / 8), (2, 4, 7, 5, 1 / 32), (1, 3, 1, 2, 1 / 64),
                                   (3, 16, 32, 24, 1 / 4)])
def test_forward_and_gradient_match_torchvision(shape):
    feat, rois, grad_out, scale = _case(*shape, num=80, seed=sum(shape[:4]))
    expected = torchvision_roi_align(feat, rois, 7, scale, 0, aligned=True)
    (expected_grad,) = torch.autograd.grad(expected, feat, grad_out)
    ours = roi_align(feat, rois, 7, scale)
    (grad,) = torch.autograd.grad(ours, feat, grad_out)
    assert torch.equal(ours, expected)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_chunked_backward_is_the_same(monkeypatch):
    feat, rois, grad_out, scale = _case(2, 8, 16, 20, 1 / 8, num=50, seed=1)
    (whole,) = torch.autograd.grad(roi_align(feat, rois, 7, scale), feat, grad_out)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 1)  # one RoI per chunk
    (chunked,) = torch.autograd.grad(roi_align(feat, rois, 7, scale), feat, grad_out)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_bfloat16_under_autocast_keeps_the_dtype():
    """bf16 maps under autocast (bf16 training): torchvision pools in fp32, the gradient is bf16."""
    feat, rois, grad_out, scale = _case(2, 8, 16, 20, 1 / 8, num=20, seed=2)
    half = feat.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(half, rois, 7, scale)
    (grad,) = torch.autograd.grad(out, half, grad_out.to(out.dtype))
    # The gradient of a linear op does not depend on the map's values: fp32 torchvision's.
    reference = torchvision_roi_align(feat, rois, 7, scale, 0, aligned=True)
    (expected,) = torch.autograd.grad(reference, feat, grad_out.to(out.dtype).float())
    assert grad.dtype == torch.bfloat16 and grad.shape == feat.shape
    torch.testing.assert_close(grad.float(), expected, rtol=2e-2, atol=5e-2)
