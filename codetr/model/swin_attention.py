"""(Shifted) window self-attention of the Swin Transformer, with mmdet's semantics and names.

Behaviour follows MMDetection 3.3 ``WindowMSA`` / ``ShiftWindowMSA`` (the module the official
Co-DINO Swin-L weights were trained with), which differs from timm's Swin in ways that change
the features of those weights:

- the map is zero-padded at the bottom/right to a multiple of the window FIRST, then rolled
  (timm rolls, then pads); padded tokens are not masked, they are keys/values like any other;
- every odd block shifts by ``window // 2``, whatever the map size (timm turns the shift off and
  shrinks the window when the map fits in one window);
- the shift mask is built on the padded size and adds -100 (not -inf) across regions.

State-dict names are mmdet's: ``attn.w_msa.{relative_position_bias_table,
relative_position_index, qkv, proj}`` (``attn`` being the :class:`ShiftWindowMSA`).
"""
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``window``) -> ``[B * nW, window^2, C]``.

    Windows are ordered (batch, window row, window column), tokens row-major inside a window.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, window^2, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window: int, device: torch.device | None = None) -> Tensor:
    """``[w^2, w^2]`` int64: index into the ``(2w-1)^2`` bias table for token pair (p, q).

    ``index[p, q] = (i_p - i_q + w - 1) * (2w - 1) + (j_p - j_q + w - 1)`` for tokens
    p = (i_p, j_p), q = (i_q, j_q) in row-major order: the buffer mmdet and the original Swin store.
    """
    coords = torch.arange(window, device=device)
    rows = coords.repeat_interleave(window)  # i of each token, row-major
    cols = coords.repeat(window)
    d_rows = rows[:, None] - rows[None, :] + window - 1
    d_cols = cols[:, None] - cols[None, :] + window - 1
    return d_rows * (2 * window - 1) + d_cols


def shift_attention_mask(height: int, width: int, window: int, shift: int,
                         device: torch.device | None = None) -> Tensor:
    """The additive SW-MSA mask of a padded ``height x width`` map rolled by ``-shift``.

    Returns:
        float ``[nW, w^2, w^2]``: 0 between tokens of the same region, -100 otherwise (the value
        mmdet and the original Swin use, not -inf), one mask per window, shared by batch and heads.
    """
    region = torch.zeros(1, height, width, 1, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[:, rows, cols, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # [nW, N]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias.

    Args:
        embed_dims: channels C.
        num_heads: heads (C must be divisible by them).
        window: window side w (N = w^2 tokens per window).
        qkv_bias: bias of the qkv projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, embed_dims: int, num_heads: int, window: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = window
        self.scale = (embed_dims // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads))
        # Persistent, as in mmdet: official checkpoints carry it and the importer maps it 1:1.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self) -> Tensor:
        """``[heads, N, N]`` bias added to the attention logits."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within each window.

        Args:
            x: ``[B * nW, N, C]`` window tokens (:func:`window_partition` order).
            mask: ``[nW, N, N]`` additive shift mask, or None.

        Returns:
            ``[B * nW, N, C]``.
        """
        bw, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        # qkv output channels are [q | k | v], each head-major.
        q, k, v = self.qkv(x).view(bw, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias()  # [heads, N, N]
        if mask is not None:
            # Fold the windows into the head axis so one [nW * heads, N, N] bias broadcasts over B.
            num_windows = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(num_windows * heads, n, n)
            q, k, v = (t.reshape(bw // num_windows, num_windows * heads, n, head_dim)
                       for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0)
        out = out.reshape(bw, heads, n, head_dim).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class ShiftWindowMSA(nn.Module):
    """Pad to whole windows, optionally roll, window-attend, undo, crop (mmdet's order).

    Args:
        embed_dims: channels C.
        num_heads: attention heads.
        window: window side.
        shift: roll of the padded map (0: plain W-MSA; mmdet uses ``window // 2`` in odd blocks).
        qkv_bias: bias of the qkv projection.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the output projection.
        drop_path: stochastic-depth rate of this residual branch.
    """

    def __init__(self, embed_dims: int, num_heads: int, window: int, shift: int = 0,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window {window})")
        self.window = window
        self.shift = shift
        self.w_msa = WindowMSA(embed_dims, num_heads, window, qkv_bias, attn_drop, proj_drop)
        self.drop = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The map size after zero-padding to multiples of the window."""
        return height + (-height) % self.window, width + (-width) % self.window

    def forward(self, x: Tensor, hw: tuple[int, int], mask: Tensor | None = None) -> Tensor:
        """(S)W-MSA of a token map.

        Args:
            x: ``[B, H * W, C]`` tokens, row-major (already ``norm1``-ed).
            hw: ``(H, W)``.
            mask: the :func:`shift_attention_mask` of the padded size when ``shift > 0``
                (``[nW, N, N]``; the stage computes it once for all its shifted blocks).

        Returns:
            ``[B, H * W, C]``, before the residual addition.
        """
        b, _, c = x.shape
        height, width = hw
        padded_h, padded_w = self.padded_size(height, width)
        x = F.pad(x.view(b, height, width, c), (0, 0, 0, padded_w - width, 0, padded_h - height))
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        else:
            mask = None
        out = self.w_msa(window_partition(x, self.window), mask)
        x = window_reverse(out, self.window, padded_h, padded_w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(b, height * width, c)
        return self.drop(x)
