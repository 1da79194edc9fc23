"""The transformer's Linears run on 2-D rows (`codetr.model.mlp.flat_rows`): the in-place ReLUs of
`MLP` / `FFN` and the deformable attention's in-place padding fill then act on fresh tensors, so
autograd never rebases a view (`CopySlices` + `AsStridedBackward0`, two copies and a zero-fill of
the whole tensor per op in the backward pass). Values and gradients bit-identical to the plain
N-D forward."""
import copy

import torch
from torch import nn

from codetr.model.deformable_attention import MultiScaleDeformableAttention
from codetr.model.mlp import FFN, MLP
from tests.autograd_graph import VIEW_REBASE, graph_nodes


def _plain_ffn(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    return x + ffn.layers(x)  # the N-D form flat_rows replaces


def _values_and_grads(module: nn.Module, forward, x: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = forward(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}, graph_nodes(out)


def test_mlp_and_ffn_rebase_no_view_and_match_the_plain_forward():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 32)
    cases = [(MLP(32, 48, 4, 3), lambda m: m, lambda m: lambda t: nn.Sequential.forward(m, t)),
             (FFN(32, 64, 0.0), lambda m: m, lambda m: lambda t: _plain_ffn(m, t))]
    for module, ours, plain in cases:
        out, gx, grads, nodes = _values_and_grads(module, ours(module), x)
        ref_out, ref_gx, ref_grads, ref_nodes = _values_and_grads(module, plain(module), x)
        assert not nodes & VIEW_REBASE, nodes
        assert ref_nodes & VIEW_REBASE  # why: the plain form's in-place ReLU rebases a view
        assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
        assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    # leading dims may be empty (no queries of a co-head in a batch)
    assert MLP(32, 48, 4, 3)(torch.randn(0, 5, 32)).shape == (0, 5, 4)


def test_deformable_attention_fills_the_padding_on_fresh_rows():
    torch.manual_seed(1)
    attn = MultiScaleDeformableAttention(32, 4, 2, 2)
    for p in attn.parameters():  # the zero-initialised projections would hide the sampling
        nn.init.normal_(p, std=0.2)
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    value = torch.randn(2, 39, 32)
    query, refs = torch.randn(2, 11, 32), torch.rand(2, 11, 2, 2)
    pad = torch.rand(2, 39) < 0.3
    out = attn(query, refs, value.requires_grad_(True), shapes, starts, pad)
    assert not graph_nodes(out) & VIEW_REBASE
    out.backward(torch.randn(out.shape))
    assert value.grad[pad].abs().max() == 0 and value.grad[~pad].abs().max() > 0
    # padded keys read zeros after the projection: what they held does not matter
    other = value.detach().masked_fill(pad[..., None], 100.0)
    again = copy.deepcopy(attn)(query, refs, other, shapes, starts, pad)
    torch.testing.assert_close(again, out.detach(), rtol=0, atol=0)
