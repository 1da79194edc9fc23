"""Small perceptrons of the transformer: the prediction/position `MLP` and the residual `FFN`.

Both keep the module layout of the official Co-DINO checkpoints so weights port by name:
`MLP` is an `nn.Sequential` of Linear/ReLU (`reg_branches.{i}.{0,2,4}`, `ref_point_head.{0,2}`),
`FFN` holds `layers.0.0` (first Linear) and `layers.1` (second Linear) as mmcv's FFN does.
"""
from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Sequential):
    """`num_layers` Linear layers with ReLU between them (none after the last).

    Args:
        input_dim: features of the input.
        hidden_dim: features of every hidden layer.
        output_dim: features of the output.
        num_layers: number of Linear layers (>= 1).

    Shapes: `[..., input_dim] -> [..., output_dim]`.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        modules: list[nn.Module] = []
        for i in range(num_layers):
            modules.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                modules.append(nn.ReLU(inplace=True))
        super().__init__(*modules)

    def forward(self, x: Tensor) -> Tensor:
        """`[..., input_dim] -> [..., output_dim]`, the layers run on `x` as `[N, input_dim]`."""
        return super().forward(flat_rows(x)).view(*x.shape[:-1], self[-1].out_features)


class FFN(nn.Module):
    """Transformer feed-forward block with its residual: `x + Dropout(W2 Dropout(ReLU(W1 x)))`.

    The normalisation is not part of the block (the layers own their `norms`).

    Args:
        embed_dim: features of the input and output.
        feedforward_dim: hidden features.
        dropout: dropout probability after the activation and after the second Linear.

    Shapes: `[..., embed_dim] -> [..., embed_dim]`.
    """

    def __init__(self, embed_dim: int, feedforward_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dim, feedforward_dim), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(feedforward_dim, embed_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Returns `x + ffn(x)`, same shape as `x` (the layers run on it as `[N, embed_dim]`)."""
        return x + self.layers(flat_rows(x)).view(x.shape)


def flat_rows(x: Tensor) -> Tensor:
    """`[..., D] -> [N, D]`: a Linear of a 2-D input returns a fresh tensor, of a 3-D one a view
    of its 2-D result; an in-place op on that view (the ReLUs here, a masked fill) makes autograd
    rebase it (`CopySlices` + `AsStridedBackward0`: two copies and a zero-fill of the whole
    tensor per op in the backward pass). Same values either way."""
    return x.reshape(-1, x.shape[-1])
