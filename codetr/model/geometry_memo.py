"""A memo of the tensors that an unpadded batch's shape alone determines, for eager CPU inference.

At inference on one size (`codetr inference`, eager deployment, `bench/infer_speed.py`) every
batch has the same level sizes and no padding, so the pixel position encodings, the encoder's
reference points and the two-stage proposal boxes come out the same in every forward: many small
ops, 3-7% of a ~25 ms forward of the default model (`bench/infer_speed.py`'s `ours, no memo` row;
BENCHMARKS.md, "Eval forward against the HF peer"). They are computed once per key and reused. The memo is never used while gradients
are recorded, while tracing, exporting or compiling (a graph must compute them from its inputs),
or off the CPU (the padding check is a host sync there). What `get` returns is shared between
forwards: callers must not modify it in place (the tests compare repeated forwards bit for bit).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Iterator, Optional, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
_DISABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("codetr_geometry_memo_off", default=False)


@contextlib.contextmanager
def memo_disabled() -> Iterator[None]:
    """Every forward inside computes its geometry afresh (for comparisons and benchmarks)."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def memo_applies(mask: Optional[Tensor]) -> bool:
    """Whether a forward whose padding mask is `mask` (bool, True = padding) may use the memo."""
    if mask is None or _DISABLED.get() or torch.is_grad_enabled() or mask.device.type != "cpu":
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    return not bool(mask.any())


class GeometryMemo:
    """Least-recently-used store of `max_entries` computed values, keyed by shape tuples."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The value stored under `key` (and the inference-mode flag), computing it if absent."""
        key = (key, torch.is_inference_mode_enabled())
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def cached(self, mask: Optional[Tensor], key: Callable[[], Hashable], compute: Callable[[], T]) -> T:
        """`get(key(), compute)` when `memo_applies(mask)`, else `compute()` afresh (the key is
        only built when the memo applies: it may read tensors back to the host)."""
        return self.get(key(), compute) if memo_applies(mask) else compute()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forgets every entry."""
        with self._lock:
            self._entries.clear()
