"""`torch.load(weights_only=True)` with messages a user can act on.

torch's own errors for a file it refuses advise re-running with `weights_only=False`, i.e. to
execute whatever the pickle says: we never show that advice. The message says instead whether the
file is empty, is not a PyTorch file at all, or is a pickle that needs code (names the global).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from codetr.errors import MissingInputError, UserError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")


class UnsafeCheckpointError(UserError, ValueError):
    """A file is empty, not a PyTorch file, or not loadable without running pickled code."""


def describe_unsafe(path: str | os.PathLike, err: BaseException, what: str) -> str:
    """The user's message for a file that `torch.load(weights_only=True)` refused.

    Never quotes torch's own text for a refused pickle: it advises `weights_only=False`.
    """
    text = str(err)
    found = _GLOBAL.search(text)
    if found:
        return (f"{what} {path} is not a safe checkpoint: loading it would run code named in the "
                f"file ({found.group(1)}). codetr loads only files made of tensors, numbers, "
                "strings, lists and dicts; re-save the weights as a plain state dict (or "
                "safetensors) with a trusted tool")
    if isinstance(err, pickle.UnpicklingError):
        operand = _OPERAND.search(text)
        detail = f" (pickle opcode {operand.group(1)} is not allowed)" if operand else ""
        reason = f"its content is not a checkpoint written by torch.save{detail}"
    else:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        reason = f"it is damaged or truncated: {lines[0][:200]}" if lines else type(err).__name__
    return f"{what} {path} is not a PyTorch checkpoint: {reason}"


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """Loads `path` with `weights_only=True`.

    Args:
        path: the file.
        what: how the message names the file, e.g. 'evaluate.checkpoint'.
        map_location: as for `torch.load`.

    Raises:
        MissingInputError: no such file (or a directory).
        UnsafeCheckpointError: empty, not a PyTorch file, or needs code execution.
    """
    path = Path(path)
    if not path.is_file():
        kind = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise MissingInputError(f"{what} {path} {kind}")
    if path.stat().st_size == 0:
        raise UnsafeCheckpointError(f"{what} {path} is empty (0 bytes): an interrupted copy or "
                                    "download? Copy the file again")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise UnsafeCheckpointError(describe_unsafe(path, err, what)) from None
