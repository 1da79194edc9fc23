"""The ATSS / RPN box coder (`codetr.losses.atss_loss.delta_xywh_encode/decode`, mmdet's
DeltaXYWHBBoxCoder) against torchvision's `BoxCoder`, at several target stds."""
import torch
from torchvision.models.detection._utils import BoxCoder

from codetr.losses.atss_loss import delta_xywh_decode, delta_xywh_encode
from tests.test_atss import _random_gts


def test_box_coder_matches_torchvision():
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    # float64: in float32, near-zero deltas of ~300 px boxes over 6 px anchors carry ~2e-5 of
    # rounding, above assert_close's atol (failed 12 of 5000 seeds).
    anchors = _random_gts(50, 200.0, 300.0, gen, torch.float64)
    boxes = _random_gts(50, 200.0, 300.0, gen, torch.float64)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))  # = 1 / (0.1, 0.1, 0.2, 0.2)
    deltas = delta_xywh_encode(anchors, boxes)
    torch.testing.assert_close(deltas, coder.encode_single(boxes, anchors), rtol=0, atol=1e-12)
    # float64 round trip: measured <= 1.1e-13 px (corners <= 300 px, ~1 ulp) over 2000 seeds.
    torch.testing.assert_close(delta_xywh_decode(anchors, deltas), boxes, rtol=0, atol=1e-12)
    # Other stds (the RPN's all-1 coder, and an arbitrary one): torchvision's weights are 1 / std,
    # both use w = x2 - x1 (no +1) and centre x1 + w / 2. The log ratios stay inside both clamps
    # (torchvision: dw <= log(1000/16); ours: |dw| <= it), so the two must agree to rounding.
    # Measured over 2000 seeds: encode <= 8.5e-14, decode <= 2.7e-12 px (boxes grown e^4 = 55x to
    # ~16000 px, about one float64 ulp there), round trip <= 1.1e-13 px; bounds ~10x those.
    for stds in [(1.0, 1.0, 1.0, 1.0), (0.5, 0.25, 0.3, 0.7)]:
        other = BoxCoder(weights=tuple(1.0 / s for s in stds))
        encoded = delta_xywh_encode(anchors, boxes, stds)
        torch.testing.assert_close(encoded, other.encode_single(boxes, anchors), rtol=0, atol=1e-12)
        torch.testing.assert_close(delta_xywh_decode(anchors, encoded, stds), boxes, rtol=0, atol=1e-12)
        log_std = torch.tensor(stds[2:], dtype=torch.float64)
        random_deltas = torch.randn(50, 4, generator=gen, dtype=torch.float64)
        # std * (dw, dh), the log size ratios, within +-4 < log(1000/16) = 4.13
        random_deltas[:, 2:] = (random_deltas[:, 2:] * 1.3).clamp(-4.0, 4.0) / log_std
        torch.testing.assert_close(delta_xywh_decode(anchors, random_deltas, stds),
                                   other.decode_single(random_deltas, anchors), rtol=0, atol=3e-11)
    # Large growths hit the size-ratio clamp (torchvision clamps only growth, mmdet both ways).
    wild = torch.randn(50, 4, generator=gen, dtype=torch.float64) * 30
    wild[:, 2:] = wild[:, 2:].abs()
    torch.testing.assert_close(delta_xywh_decode(anchors, wild),
                               coder.decode_single(wild, anchors), rtol=1e-4, atol=1e-2)
    shrunk = delta_xywh_decode(anchors, torch.tensor([0.0, 0.0, -1e3, -1e3], dtype=anchors.dtype).expand(50, 4))
    torch.testing.assert_close(shrunk[:, 2:] - shrunk[:, :2],
                               (anchors[:, 2:] - anchors[:, :2]) * 16 / 1000,
                               rtol=1e-3, atol=1e-4)  # corners ~ 300 px: cancellation
