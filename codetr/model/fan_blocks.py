"""The attention blocks of FAN (Fully Attentional Networks, Zhou et al. 2022).

A FAN block is a ViT block whose MLP is replaced by *attentional channel processing*: after
token self-attention (``attn``), each head's channels are re-weighted by a sigmoid attention
computed between softmax-normalised queries and the token-averaged keys, applied to the output
of a depthwise-conv MLP (``mlp.mlp_v``). Two CaiT class-attention blocks then refine a class
token (and, as XCiT/FAN do, re-normalise the patch tokens) before the last pyramid level.

Parameter names are those of NVIDIA TAO's FAN (``attn.q``, ``attn.kv``, ``mlp.q``,
``mlp.temperature``, ``mlp.mlp_v.dwconv.bn``, ``gamma1`` ...), so its checkpoints load by name.
Tokens are ``[B, N, C]`` with ``N = H * W`` in row-major order of the ``H x W`` grid.
"""
import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn


class PositionalEncodingFourier(nn.Module):
    """Sine/cosine encoding of normalised (y, x) grid positions, projected by a 1x1 conv.

    Args:
        dim: output channels (the token width).
        hidden_dim: frequencies per axis (32, so the projection sees 64 channels).
        temperature: frequency base.
    """

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(2 * hidden_dim, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature

    def forward(self, height: int, width: int) -> Tensor:
        """The ``[1, dim, height, width]`` encoding (positions 1..n scaled to (0, 2 pi])."""
        device = self.token_projection.weight.device
        eps = 1e-6
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        y = (y / (height + eps) * 2 * math.pi)[:, None].expand(height, width)
        x = (x / (width + eps) * 2 * math.pi)[None, :].expand(height, width)
        index = torch.arange(self.hidden_dim, dtype=torch.float32, device=device)
        freq = self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / self.hidden_dim)

        def encode(pos: Tensor) -> Tensor:  # [h, w] -> [h, w, hidden]: sin(even), cos(odd)
            angle = pos[..., None] / freq
            return torch.stack([angle[..., 0::2].sin(), angle[..., 1::2].cos()], -1).flatten(2)

        pos = torch.cat([encode(y), encode(x)], dim=-1).permute(2, 0, 1)[None]
        return self.token_projection(pos.to(self.token_projection.weight.dtype))


class TokenMixing(nn.Module):
    """Multi-head self-attention over the tokens (``q``, fused ``kv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, C / heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """Depthwise 3x3 conv -> GELU -> BatchNorm -> depthwise 3x3 conv on the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``[B, N, C]`` tokens of an ``height x width`` grid -> same shape."""
        b, n, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, height, width)
        grid = self.conv2(self.bn(self.act(self.conv1(grid))))
        return grid.reshape(b, c, n).transpose(1, 2)


class ConvMlp(nn.Module):
    """``fc1`` -> layer-scaled depthwise-conv residual (``gamma``, ``dwconv``) -> ``fc2``.

    The activation sits inside ``dwconv``; FAN applies none between ``fc1`` and the residual.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.gamma = nn.Parameter(torch.ones(hidden))
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``[B, N, dim]`` -> ``[B, N, dim]``."""
        x = self.fc1(x)
        x = x + self.gamma * self.dwconv(x, height, width)
        return self.fc2(x)


class ChannelProcessing(nn.Module):
    """Attentional channel processing: per-head channel gates times a conv-MLP of the tokens.

    For each head, queries ``q(x)`` are softmax-normalised over the tokens, keys (the input
    itself) likewise and then averaged over the head's channels; ``sigmoid(q^T k)`` gives one gate
    per channel, scaled by a learned per-head ``temperature``, that multiplies
    ``norm_v(mlp_v(x))``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.mlp_v = ConvMlp(dim, mlp_hidden)
        self.norm_v = nn.LayerNorm(dim)  # torch's default eps, as in the reference
        self.q = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""
        b, n, c = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, n, heads, ch).transpose(1, 2)     # [B, h, N, ch]
        k = x.reshape(b, n, heads, ch).transpose(1, 2)             # [B, h, N, ch]
        q = q.softmax(dim=-2).transpose(-1, -2)                    # [B, h, ch, N]
        k = k.softmax(dim=-2).mean(dim=-1, keepdim=True)           # [B, h, N, 1]
        gate = torch.sigmoid(q @ k) * self.temperature             # [B, h, ch, 1]
        v = self.norm_v(self.mlp_v(x, height, width))              # [B, N, C]
        v = v.reshape(b, n, heads, ch).permute(0, 2, 3, 1)          # [B, h, ch, N]
        return (gate * v).permute(0, 3, 1, 2).reshape(b, n, c)


class FANBlock(nn.Module):
    """Pre-norm token mixing and channel processing, each with a layer scale (``gamma1/2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 eta: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenMixing(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ChannelProcessing(dim, num_heads, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``[B, N, C]`` tokens of an ``height x width`` grid -> same shape."""
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), height, width))


class ClassAttention(nn.Module):
    """CaiT class attention: the class token (index 0) attends to all tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 1 + N, C]`` -> the updated class token ``[B, 1, C]``."""
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x[:, :1]).reshape(b, 1, heads, c // heads).transpose(1, 2)
        k = self.k(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        v = self.v(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, C / heads]
        return self.proj(out.transpose(1, 2).reshape(b, 1, c))


class ClassAttentionBlock(nn.Module):
    """CaiT/XCiT class-attention block with ``tokens_norm`` (every token passes ``norm2``).

    As in XCiT and FAN, the attention branch adds ``norm1(x)`` to the patch tokens and the
    final residual adds the normalised patch tokens to themselves; the MLP updates only the
    class token. The reference weights were trained with exactly this arithmetic.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eta: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # timm's fc1 -> GELU -> fc2
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 1 + N, C]`` (class token first) -> same shape."""
        normed = self.norm1(x)
        x = x + self.gamma1 * torch.cat([self.attn(normed), normed[:, 1:]], dim=1)
        x = self.norm2(x)
        cls = self.gamma2 * self.mlp(x[:, :1])
        return x + torch.cat([cls, x[:, 1:]], dim=1)
