"""In-place activations that clone under autograd run out of place when grad flows (same values)."""
import copy

import pytest
import torch
from torch import nn
from torch.profiler import profile

from codetr.model.backbone import Backbone
from codetr.model.inplace_activations import CLONING_INPLACE, InplaceWithoutGrad, grad_aware_inplace


def _ops(fn) -> list[str]:
    with profile() as prof:
        fn()
    return [e.key for e in prof.key_averages()]


def _instance(cls) -> nn.Module:
    return cls(0.1, 0.0, inplace=True) if cls is nn.Threshold else cls(inplace=True)


@pytest.mark.parametrize("cls", CLONING_INPLACE, ids=lambda c: c.__name__)
def test_each_listed_activation_clones_in_place_under_grad_and_the_wrapper_does_not(cls):
    """Why each class is on the list: in place with grad it copies its input (aten::clone)."""
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    assert "aten::clone" in _ops(lambda: _instance(cls)(x * 1.0))
    wrapped = nn.Sequential(_instance(cls))
    assert grad_aware_inplace(wrapped) == 1 and isinstance(wrapped[0], InplaceWithoutGrad)
    assert "aten::clone" not in _ops(lambda: wrapped(x * 1.0))
    # without grad it works in place: the input tensor itself is overwritten
    y = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert wrapped(y).data_ptr() == y.data_ptr()
    assert wrapped[0].act.inplace and not wrapped[0].plain_act.inplace  # nothing mutated
    assert [name for name, _ in wrapped.named_modules()] == ["", "0", "0.act"]


def test_relu_in_place_does_not_clone_and_is_left_alone():
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    relu = nn.ReLU(inplace=True)
    assert "aten::clone" not in _ops(lambda: relu(x * 1.0))
    model = nn.Sequential(relu)
    assert grad_aware_inplace(model) == 0 and model[0] is relu


def test_wrapped_module_gives_the_same_values_gradients_and_state_dict():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                        nn.Conv2d(8, 8, 1), nn.SiLU(inplace=True), nn.Hardswish(inplace=True))
    new = copy.deepcopy(ref)
    assert grad_aware_inplace(new) == 3 and grad_aware_inplace(new) == 0  # idempotent
    assert list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 9, 9)
    outs, grads = [], []
    for model in (ref, new):
        xi = x.clone().requires_grad_()
        y = model(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    assert torch.equal(outs[0], outs[1])  # same kernels in the same order: bit-identical
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref.eval(), new.eval()
    with torch.no_grad():
        assert torch.equal(ref(x), new(x))


def test_cnn_trunk_runs_no_in_place_relu6_under_autograd_and_in_place_without():
    torch.manual_seed(0)
    backbone = Backbone("efficientnet_lite0", [1, 2, 3])
    assert sum(isinstance(m, InplaceWithoutGrad) for m in backbone.modules()) == 32
    images = torch.randn(2, 3, 64, 64)
    ops = _ops(lambda: sum(f.sum() for f in backbone(images)).backward())
    assert "aten::hardtanh_" not in ops and "aten::hardtanh" in ops
    backbone.eval()
    with torch.no_grad():
        assert "aten::hardtanh_" in _ops(lambda: backbone(images))
