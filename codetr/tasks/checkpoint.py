"""codetr checkpoints: weights_only-safe Lightning checkpoints, written atomically.

A checkpoint is Lightning's own checkpoint dict (`state_dict`, `optimizer_states`,
`lr_schedulers`, `loops`, `callbacks`, `epoch`, `global_step`, ...) converted to plain data, plus

- `codetr`: {`format_version`, `spec` (the resolved spec as plain data), `label_map`
  (`LabelMap.to_dict()`), `weights`, `validation`, `best` and `early_stopping` (the best
  validation so far and the count of validations without improvement, `best_checkpoint.py`)},
  so evaluate and inference rebuild the model from the file alone;
- `ema`: `ModelEMA.state_dict()` when EMA is enabled;
- `rng`: the random generators' states (tensors and ints), restored on resume.

Every file holds only tensors, numbers, strings, None, lists, tuples and dicts:
`torch.load(path, weights_only=True)` loads it. `AtomicCheckpointIO` writes through a temporary
file, fsync and rename, so a killed process never leaves a truncated `last.pth`.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from torch import nn

from codetr.errors import UserError
from codetr.fileio import atomic_torch_save
from codetr.load_report import LoadReport
from codetr.safe_load import UnsafeCheckpointError, safe_torch_load

FORMAT_VERSION = 1
# The LightningModule holds the detector as `self.model`: its keys carry this prefix.
MODEL_PREFIX = "model."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, not a codetr checkpoint or of another architecture."""


def to_weights_only_safe(obj: Any, where: str = "checkpoint") -> Any:
    """Converts `obj` recursively to types `torch.load(weights_only=True)` accepts.

    Counters/OrderedDicts become dicts, numpy arrays become tensors, numpy scalars Python numbers,
    dataclasses dicts. Anything else (a class instance, a function) raises TypeError naming the
    key path, so an unsafe checkpoint fails at save time, not at load time.
    """
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype,
                                       torch.device, torch.Size)):
        return obj
    if isinstance(obj, dict):  # includes Counter, OrderedDict, defaultdict
        return {k: to_weights_only_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj) if isinstance(obj, (set, frozenset)) else obj
        out = [to_weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_weights_only_safe(dataclasses.asdict(obj), where)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a weights_only checkpoint")


class AtomicCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO: weights_only-safe data, atomic writes, weights_only loads."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any,
                        storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(to_weights_only_safe(checkpoint), path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu", require_codetr=False)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


def require_checkpoint_file(path: str | os.PathLike, key: str) -> None:
    """Raises CheckpointError naming the spec `key` (e.g. `evaluate.checkpoint`) when `path` is no file."""
    if not Path(path).is_file():
        raise CheckpointError(f"{key}: checkpoint not found: {path}")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    require_codetr: bool = True) -> Dict[str, Any]:
    """Loads a checkpoint with `weights_only=True`.

    Raises:
        CheckpointError: the file is missing or unreadable, or (`require_codetr`) has no `codetr`
            section (spec + label map), i.e. was not written by codetr's training.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_torch_load(path, "checkpoint", map_location)
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict (got {type(ckpt).__name__})")
    return _require_codetr(ckpt, path) if require_codetr else ckpt


def _require_codetr(ckpt: Dict[str, Any], path: Path) -> Dict[str, Any]:
    if "codetr" not in ckpt:
        raise CheckpointError(f"{path} is not a codetr checkpoint: it has no 'codetr' section with "
                              f"the spec and label map (top-level keys: {sorted(map(str, ckpt))[:10]})")
    codetr_section(ckpt, path)
    return ckpt


def codetr_section(ckpt: Dict[str, Any], path: str | os.PathLike) -> Dict[str, Any]:
    """The checked `codetr` section of a loaded checkpoint: a dict whose `format_version` (when
    present) is an int this codetr reads and whose `spec` and `label_map` are dicts.

    Raises:
        CheckpointError: naming the file and the entry that is missing or malformed.
    """
    meta = ckpt.get("codetr")
    damaged = "the file is damaged or was not written by codetr's training"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its 'codetr' section is a {type(meta).__name__}, not a "
                              f"dict with the spec and label map; {damaged}")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path}: codetr.format_version is {version!r}, not an integer; {damaged}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}; this codetr "
                              f"reads up to {FORMAT_VERSION}: upgrade codetr")
    for key in ("spec", "label_map"):
        if not isinstance(meta.get(key), dict):
            got = "missing" if key not in meta else f"a {type(meta[key]).__name__}"
            raise CheckpointError(f"{path}: codetr.{key} must be a dict, it is {got}; {damaged}")
    return meta


def model_state_dict(ckpt: Dict[str, Any], prefer_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """The detector's weights in a checkpoint: (state_dict without prefix, 'ema' | 'raw').

    Accepts codetr/Lightning checkpoints (`state_dict` with `model.` keys), `{'model': sd}` and
    bare state dicts. EMA weights win when present and `prefer_ema`, unless the checkpoint's
    `codetr.weights` (chosen by `train.ema.final_weights`) says 'raw'.
    """
    ema = ckpt.get("ema")
    chosen = (ckpt.get("codetr") or {}).get("weights") if isinstance(ckpt.get("codetr"), dict) else None
    if prefer_ema and chosen != "raw" and isinstance(ema, dict) and isinstance(ema.get("state_dict"), dict):
        return dict(ema["state_dict"]), "ema"
    for key in ("state_dict", "model"):
        sd = ckpt.get(key)
        if isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
            if all(k.startswith(MODEL_PREFIX) for k in sd):
                return {k[len(MODEL_PREFIX):]: v for k, v in sd.items()}, "raw"
            if any(k.startswith(MODEL_PREFIX) for k in sd):  # Lightning: model.* + criterion.*
                return {k[len(MODEL_PREFIX):]: v for k, v in sd.items()
                        if k.startswith(MODEL_PREFIX)}, "raw"
            return dict(sd), "raw"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), "raw"
    raise CheckpointError(f"no model weights found in the checkpoint (keys: {sorted(ckpt)[:10]})")


def compare_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> LoadReport:
    """Compares checkpoint tensors with `model`'s by name and shape (nothing is loaded)."""
    own = model.state_dict()
    loaded, mismatched = [], []
    for key, value in state.items():
        if key in own:
            if tuple(own[key].shape) == tuple(value.shape):
                loaded.append(key)
            else:
                mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
    return LoadReport(loaded=loaded, missing=[k for k in own if k not in state],
                      unexpected=[k for k in state if k not in own], mismatched=mismatched)


def load_partial(model: nn.Module, state: Dict[str, torch.Tensor]) -> LoadReport:
    """Loads the tensors whose name and shape match; reports the rest (fine-tuning start)."""
    report = compare_state_dict(model, state)
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def require_same_architecture(model: nn.Module, state: Dict[str, torch.Tensor], origin: str) -> None:
    """Raises CheckpointError naming the differences unless `state` fits `model` exactly."""
    report = compare_state_dict(model, state)
    if not report.ok:
        raise CheckpointError(
            f"{origin} was written for another architecture (a different backbone, number of "
            f"classes, layers or queries in the spec?):\n{report.summary()}")


def capture_rng_state() -> Dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) generators, as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_detector(path: str | os.PathLike, device: torch.device | str = "cpu", spec=None):
    """Rebuilds the trained detector from a codetr checkpoint alone.

    The architecture comes from the spec stored in the checkpoint, the label map too; EMA weights
    are used when the checkpoint has them. An official mmdet / Sense-X checkpoint (recognised by
    its keys, `codetr.zoo`) has no stored spec: with `spec` given, the run's spec builds the model.

    Args:
        path: the checkpoint file.
        device: where the model goes.
        spec: the run's ExperimentSpec, used only for an official checkpoint (None: codetr only).

    Returns:
        (model in eval mode on `device`, LabelMap, the checkpoint's ExperimentSpec, 'ema'|'raw').

    Raises:
        CheckpointError: missing/foreign file, or weights that do not fit the stored architecture.
    """
    from codetr.data import LabelMap
    from codetr.model.builder import build_model
    from codetr.spec import spec_from_dict

    ckpt = load_checkpoint(path, require_codetr=spec is None)
    if "codetr" not in ckpt:
        from codetr.zoo.restore import is_official_checkpoint, restore_official
        if is_official_checkpoint(ckpt):
            return restore_official(ckpt, str(path), spec, device)
        ckpt = _require_codetr(ckpt, Path(path))
    meta = codetr_section(ckpt, path)
    spec = spec_from_dict(meta["spec"], origin=f"{path} (stored spec)")
    try:
        label_map = LabelMap.from_dict(meta["label_map"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: codetr.label_map is malformed ({type(err).__name__}: "
                              f"{err}); it needs category_ids, names, contiguous and num_classes") from None
    state, which = model_state_dict(ckpt)
    # The trained weights also say which ViT-L MLP `vit_large_codetr` was built with.
    model = build_model(spec, label_map.num_classes, load_pretrained_backbone=False, trained_state=state)
    require_same_architecture(model, state, str(path))
    model.load_state_dict(state)
    return model.to(device).eval(), label_map, spec, which
