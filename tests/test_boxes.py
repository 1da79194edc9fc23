"""codetr.boxes against torchvision.ops on fresh random boxes."""
import torch
from torchvision import ops

from codetr.boxes import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    inverse_sigmoid,
)


def _random_xyxy(n: int, scale: float = 100.0) -> torch.Tensor:
    top_left = torch.rand(n, 2, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, dtype=torch.float64) * scale * 0.5 + 1e-3
    return torch.cat([top_left, top_left + wh], dim=1)


def test_conversions_match_torchvision_and_round_trip():
    xyxy = _random_xyxy(37)
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, ops.box_convert(xyxy, "xyxy", "cxcywh"))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    batched = torch.rand(3, 5, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batched)), batched)
    assert box_cxcywh_to_xyxy(batched).shape == (3, 5, 4)


def test_box_iou_matches_torchvision():
    a, b = _random_xyxy(11), _random_xyxy(7)
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, ops.box_iou(a, b))
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    # union = area_a + area_b - inter, and inter = iou * union
    torch.testing.assert_close(union, area_a[:, None] + area_b[None, :] - iou * union)
    torch.testing.assert_close(box_iou(a, a)[0].diagonal(), torch.ones(11, dtype=a.dtype))


def test_generalized_box_iou_matches_torchvision():
    a, b = _random_xyxy(9), _random_xyxy(13)
    giou = generalized_box_iou(a, b)
    torch.testing.assert_close(giou, ops.generalized_box_iou(a, b))
    assert giou.min() >= -1 and giou.max() <= 1


def test_elementwise_giou_is_the_diagonal():
    a, b = _random_xyxy(15), _random_xyxy(15)
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b),
                               ops.generalized_box_iou(a, b).diagonal())
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b),
                               1 - ops.generalized_box_iou_loss(a, b, reduction="none"))


def test_elementwise_iou_is_the_diagonal():
    a, b = _random_xyxy(15), _random_xyxy(15)
    iou, union = elementwise_box_iou(a, b)
    torch.testing.assert_close(iou, ops.box_iou(a, b).diagonal())
    torch.testing.assert_close(union, box_iou(a, b)[1].diagonal())


def test_degenerate_boxes_stay_finite():
    point = torch.tensor([[0.3, 0.3, 0.3, 0.3]])
    assert torch.isfinite(generalized_box_iou(point, point)).all()
    assert torch.isfinite(elementwise_generalized_box_iou(point, point)).all()
    assert torch.isfinite(elementwise_box_iou(point, point)[0]).all()
    assert torch.isfinite(box_iou(point, _random_xyxy(3).float())[0]).all()


def test_giou_gradients_flow():
    a = _random_xyxy(6).requires_grad_(True)
    b = _random_xyxy(6)
    elementwise_generalized_box_iou(a, b).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_inverse_sigmoid():
    x = torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    torch.testing.assert_close(inverse_sigmoid(x), torch.logit(x))
    torch.testing.assert_close(torch.sigmoid(inverse_sigmoid(x)), x)
    edges = inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5]))
    assert torch.isfinite(edges).all()
    torch.testing.assert_close(edges[0], torch.logit(torch.tensor(1e-5)), rtol=1e-4, atol=1e-4)
