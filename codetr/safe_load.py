"""`torch.load(weights_only=True)` for every file codetr reads, with messages a user can act on.

torch's own errors for a refused file advise re-running with `weights_only=False`, i.e. executing
whatever the pickle says: that advice is never shown. The message says whether the file is
missing, empty, damaged, not a PyTorch file, or a pickle that would need code (naming it).

Official mmengine / mmdet checkpoint files are read without mmengine and without running pickled
code.

An mmdet 3.x training run (`epoch_12.pth`) pickles mmengine objects next to the weights: its
`message_hub` holds `mmengine.logging.history_buffer.HistoryBuffer`s, whose state is numpy arrays
and whose `statistics_methods` are pickled as `getattr(HistoryBuffer, 'min' | 'max' | 'current' |
'mean')`. `torch.load(weights_only=True)` refuses those globals. Model-zoo files (after mmdet's
`publish_model.py`: `meta` + `state_dict`, legacy format) load as they are.

`safe_torch_load` keeps torch's weights-only unpickler and extends its allowlist by exactly what
the mmengine file needs, every entry inert:

- `HistoryBuffer` is an `InertObject` registered under mmengine's class name: it stores the
  pickled state and has no behaviour;
- `builtins.getattr` is NOT the real getattr (that would open attribute access on every
  allowlisted object) but `_statistics_method_name`, which only resolves the four statistics names
  on the stand-in, to their names;
- numpy's `_reconstruct`, `ndarray`, `dtype` and the two dtype classes the buffers use (float64,
  int64): numpy arrays of plain numbers. They are allowlisted only when the plain weights-only load
  failed, and (zip files) only when the file's globals are a subset of this list.

Anything else (a `posix.system`, a foreign class) is refused with `UnsafeCheckpointError`, whose
message says the file is not a safe checkpoint and names the globals. Nothing is executed.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List

import numpy as np
import torch

from codetr.errors import MissingInputError, UserError

HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
_STATISTICS = ("min", "max", "current", "mean")


class UnsafeCheckpointError(UserError, ValueError):
    """A file that is empty, damaged, not a PyTorch file, or would need code outside the
    weights-only allowlist to unpickle (never executed)."""


class InertObject:
    """Stand-in for a pickled foreign class (mmengine's `HistoryBuffer`): it only keeps its state.

    The statistics functions of a `HistoryBuffer` are pickled as `getattr(HistoryBuffer, name)`;
    the class attributes below let `_statistics_method_name` resolve them to their names.
    """

    min = max = current = mean = None  # noqa: A003 - mirror the mmengine attribute names

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {"state": state}

    def __repr__(self) -> str:
        return f"InertObject({sorted(self.state)})"


def _statistics_method_name(obj: Any, name: str) -> str:
    """Registered as `builtins.getattr`: resolves only `getattr(HistoryBuffer, min|max|current|mean)`.

    Returns the name instead of a function, so nothing callable comes out of the file.
    """
    if obj is InertObject and name in _STATISTICS:
        return name
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed in a checkpoint")


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved `core` to `_core`
    return core.multiarray._reconstruct


def mmengine_allowlist() -> List[Any]:
    """The extra globals of an mmengine training checkpoint, as `torch.serialization` entries."""
    reconstruct = _numpy_reconstruct()
    entries: List[Any] = [
        (InertObject, HISTORY_BUFFER),
        (_statistics_method_name, "builtins.getattr"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        # Files written under numpy 1.x spell the module `numpy.core`.
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray, np.dtype,
    ]
    # The buffers' float64 / int64 arrays BUILD dtype instances; their classes are not GLOBALs.
    for name in ("Float64DType", "Int64DType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            entries.append(cls)
    return entries


def allowed_global_names() -> set[str]:
    """Global names an mmengine checkpoint may use beyond torch's defaults (from the allowlist)."""
    return {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
            for entry in mmengine_allowlist()}


def _unsafe_globals(path: Path) -> List[str] | None:
    """The globals torch's default allowlist refuses, for zip files; None for legacy files."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - a damaged archive: let the load report it
        return None


def _refuse(path: Path, what: Iterable[str] | str, label: str) -> UnsafeCheckpointError:
    """The refusal of a file that would run code; `what` is the unsafe globals or a sentence."""
    if isinstance(what, str):
        reason = what
    else:
        reason = f"loading it would need {', '.join(sorted(what))}, which could run code"
    return UnsafeCheckpointError(
        f"{label} {path} is not a safe checkpoint: {reason}. codetr loads only tensors, plain "
        "data and the inert mmengine/numpy objects of mmdet training checkpoints. If you trust "
        "the file, re-save its weights as a plain {name: tensor} state dict where it was made, "
        "and load that file instead")


def _unreadable(path: Path, err: BaseException, label: str) -> UnsafeCheckpointError:
    """The message for a file torch could not read, without torch's advice text."""
    message = str(err)
    if "GLOBAL " in message:
        name = message.split("GLOBAL ", 1)[1].split(" ", 1)[0].strip()
        return _refuse(path, f"loading it would need {name}, which could run code", label)
    if isinstance(err, pickle.UnpicklingError):
        detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = detail[0].strip() if detail and "WeightsUnpickler error:" in message else ""
        return UnsafeCheckpointError(
            f"{label} {path} is not a PyTorch checkpoint: its content is not a checkpoint written "
            f"by torch.save ({detail or type(err).__name__})")
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return UnsafeCheckpointError(f"{label} {path} is not a PyTorch checkpoint: it is damaged or "
                                 f"truncated ({lines[0][:200] if lines else type(err).__name__})")


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)`, extended by the inert mmengine allowlist when needed.

    Args:
        path: the file.
        what: how messages name the file, e.g. 'pretrained backbone weights'.
        map_location: as for `torch.load`.

    Raises:
        MissingInputError: no such file (or a directory).
        UnsafeCheckpointError: empty, damaged, not a PyTorch file, or needs globals outside the
            allowlist (never executed).
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
    except pickle.UnpicklingError as first:
        unsafe = _unsafe_globals(path)
        if unsafe is not None and not set(unsafe) <= allowed_global_names():
            raise _refuse(path, sorted(set(unsafe) - allowed_global_names()), what) from None
        if "GLOBAL " not in str(first) and unsafe is None:
            raise _unreadable(path, first, what) from None  # not a pickle torch can read at all
        try:
            with torch.serialization.safe_globals(mmengine_allowlist()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
            raise _unreadable(path, err, what) from None
    except Exception as err:  # noqa: BLE001 - truncated zip, EOF, ...
        raise _unreadable(path, err, what) from None
