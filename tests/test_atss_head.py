"""CoATSSHead's stacked-tower forward against its layer-by-layer reference."""
import pytest
import torch

from codetr.model.atss_head import CoATSSHead


@pytest.mark.parametrize("stacked_convs, num_classes", [(1, 5), (2, 80), (0, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "memory_view"])
def test_stacked_towers_match_the_per_tower_form(stacked_convs, num_classes, layout):
    """`forward` (towers stacked, reg + centerness as one conv) is `forward_per_tower`.

    float64, so the only difference is the order of the sums (tolerance 1e-10 relative; float32
    would compare ReLU kinks: a GroupNorm output within 1e-9 of zero can flip sides between two
    summation orders and move one gradient entry by O(1)). Random weights everywhere (the init
    zeroes biases and puts GN at identity, which would hide a swapped affine). `memory_view`: the
    maps as the encoder memory gives them (channels-last views of `[B, S, D]`); `contiguous`:
    NCHW copies of them.
    """
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    dim, batch, sides = 64, 2, [16, 8, 4, 2]  # GroupNorm(32): 2 channels a group
    head = CoATSSHead(num_classes, dim, num_levels=len(sides), stacked_convs=stacked_convs).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)

    def run(forward):
        memory = torch.randn(batch, sum(s * s for s in sides), dim, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed)).requires_grad_()
        levels = memory.split([s * s for s in sides], 1)
        feats = [m.transpose(1, 2).reshape(batch, dim, s, s) for m, s in zip(levels, sides)]
        if layout == "contiguous":
            feats = [f.contiguous() for f in feats]
        outputs = [x for group in forward(feats) for x in group]
        grads = [torch.randn(x.shape, dtype=x.dtype,
                             generator=torch.Generator().manual_seed(seed + i))
                 for i, x in enumerate(outputs)]
        head.zero_grad()
        torch.autograd.backward(outputs, grads)
        return [*outputs, memory.grad, *(p.grad.clone() for p in head.parameters())]

    for ours, theirs in zip(run(head), run(head.forward_per_tower), strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"seed {seed}: {m}")
