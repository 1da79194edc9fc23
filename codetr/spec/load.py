"""Spec file + `key=value` overrides -> a validated `ExperimentSpec`."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Any, Iterable, Optional, Sequence

from codetr.spec.convert import check_key_path, to_dataclass
from codetr.spec.errors import SpecError
from codetr.spec.schema import ExperimentSpec
from codetr.spec.yaml_io import dump_yaml, load_yaml, load_yaml_text

# Backbone names the spec accepts (TAO's list) that this build cannot construct yet: none.
UNAVAILABLE_BACKBONES: dict[str, str] = {}


def parse_override(text: str) -> tuple[str, Any, str]:
    """`a.b=value` -> ('a.b', parsed value, op). op is '=' (set), '+' (add a key) or '~' (delete).

    Values are parsed as YAML (`[1,2,3]`, `true`, `1e-4`, `null`); `key=` sets an empty string.
    """
    if text.startswith("~"):
        return text[1:].split("=", 1)[0], None, "~"
    op = "="
    if text.startswith("+"):
        op, text = "+", text[1:]
    if "=" not in text:
        raise SpecError(f"override '{text}' is not of the form key=value (e.g. train.optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SpecError(f"override '{text}': empty key")
    try:
        value = load_yaml_text(raw, f"override {key}") if raw.strip() else ""
    except ValueError as err:
        raise SpecError(str(err)) from None
    return key, value, op


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Returns a copy of `data` with each `key=value` applied (nested keys are created)."""
    data = copy.deepcopy(data) if data else {}
    for text in overrides:
        key, value, op = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"override '{text}': '{part}' is not a section")
            node = child
        if op == "~":
            if parts[-1] not in node and parts[0] not in PIPELINE_SECTIONS:
                try:
                    check_key_path(ExperimentSpec, key)  # a typo is an error, not a silent no-op
                except SpecError as err:
                    raise SpecError(f"override {text}: {err}") from None
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return data


# Sections of params.yaml that belong to pipeline stages, not to the codetr tasks.
PIPELINE_SECTIONS = ("prepare", "backbone", "report")


def _build(data: Optional[dict]) -> ExperimentSpec:
    """The validated spec of plain data; SpecError messages name the key but not the source."""
    for name in PIPELINE_SECTIONS:
        value = (data or {}).get(name)
        if value is not None and not isinstance(value, dict):
            hint = " Did you mean 'model.backbone'?" if name == "backbone" else ""
            raise SpecError(f"'{name}' is the pipeline's {name} stage section (a mapping, "
                            f"ignored by the codetr tasks), got {value!r}.{hint}")
    data = {k: v for k, v in (data or {}).items() if k not in PIPELINE_SECTIONS}
    spec = to_dataclass(ExperimentSpec, data)
    check_spec(spec)
    return spec


def spec_from_dict(data: Optional[dict], origin: str = "<spec>") -> ExperimentSpec:
    """Builds and validates the spec; SpecError messages start with `origin`.

    The pipeline's own sections (`PIPELINE_SECTIONS`) may sit beside the spec in params.yaml:
    they are ignored here so `codetr train -e params.yaml` works.
    """
    try:
        return _build(data)
    except SpecError as err:
        raise SpecError(f"{origin}: {err}") from None


def _blame(data: dict, overrides: Sequence[str], origin: str, message: str) -> str:
    """Who caused `message`: the file (`origin`) when it fails alone with it, else the overrides
    whose keys the message names (a cross-field rule may name several), else the first override
    after which it appears. Runs only once validation has failed, so re-validating costs nothing.
    """
    try:
        _build(data)
    except SpecError as err:
        if str(err) == message:
            return origin
    named = [o for o in overrides if re.search(
        rf"(?<![\w.]){re.escape(o.lstrip('~+').split('=', 1)[0].strip())}(?!\w)", message)]
    if named:
        return ("override " if len(named) == 1 else "overrides ") + " ".join(named)
    for count in range(1, len(overrides) + 1):
        try:
            _build(apply_overrides(data, overrides[:count]))
        except SpecError as err:
            if str(err) == message:
                return f"override {overrides[count - 1]}"
    return f"{origin} with overrides {' '.join(overrides)}"


def load_spec(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Reads the spec file (defaults when `path` is None), applies overrides and validates.

    An error is labelled with its cause: the file's path (or 'defaults'), or `override key=value`
    when a command-line override brought it in (the file may say something else).
    """
    data = {}
    origin = "defaults"
    if path is not None:
        try:
            data = load_yaml(path)
        except (FileNotFoundError, ValueError) as err:
            raise SpecError(str(err)) from None
        origin = str(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SpecError(f"{path}: the spec must be a mapping of sections (model, dataset, ...)")
    merged = apply_overrides(data, overrides)  # its errors name the override already
    try:
        return _build(merged)
    except SpecError as err:
        raise SpecError(f"{_blame(data, list(overrides), origin, str(err))}: {err}") from None


def spec_to_dict(spec: ExperimentSpec) -> dict:
    """Plain data (for YAML or for a checkpoint) of a spec."""
    return dataclasses.asdict(spec)


def spec_to_yaml(spec: ExperimentSpec) -> str:
    """The resolved spec as YAML text (what `codetr spec` prints and every task saves)."""
    return dump_yaml(spec_to_dict(spec))


def check_spec(spec: ExperimentSpec) -> None:
    """Rules that involve several fields."""
    m, a = spec.model, spec.dataset.augmentation
    idx = m.return_interm_indices
    if len(idx) != m.num_feature_levels:
        raise SpecError(
            f"model.return_interm_indices={idx} has {len(idx)} entries but "
            f"model.num_feature_levels={m.num_feature_levels}: the lengths must match "
            f"(e.g. [0, 1, 2, 3, 4] for 5 levels, [1, 2, 3, 4] for 4, [1, 2, 3] for 3)")
    check_interm_indices(idx)
    if not (m.cls_loss_coef or m.bbox_loss_coef or m.giou_loss_coef):
        raise SpecError("model.cls_loss_coef, model.bbox_loss_coef and model.giou_loss_coef are "
                        "all 0: the Hungarian matching cost is their weighted sum, so at least "
                        "one must be > 0 (TAO: 2.0, 5.0, 2.0)")
    if m.dilation and not m.backbone.startswith("resnet"):
        raise SpecError(f"model.dilation=true is supported for resnet backbones only, "
                        f"not model.backbone={m.backbone}")
    if m.backbone_frozen_bn and m.backbone.startswith(("swin_", "vit_")):
        raise SpecError(f"model.backbone_frozen_bn=true freezes the trunk's BatchNorm, but "
                        f"model.backbone={m.backbone} has none (LayerNorm only); it applies to "
                        f"resnet_*, efficientnet_lite0, efficientvit_* and fan_*")
    if m.decoder_query_pos == "proposal" and (m.two_stage_type != "standard" or m.use_dn):
        raise SpecError(f"model.decoder_query_pos=proposal (Co-Deformable-DETR) takes the "
                        f"positional queries from the encoder proposals: it needs "
                        f"model.two_stage_type=standard (got {m.two_stage_type}) and "
                        f"model.use_dn=false (got {str(m.use_dn).lower()})")
    if m.encoder_proposal_classes == "class_agnostic" and m.two_stage_type != "standard":
        raise SpecError(f"model.encoder_proposal_classes=class_agnostic classifies the encoder "
                        f"proposals of model.two_stage_type=standard, but two_stage_type="
                        f"{m.two_stage_type} has none: set encoder_proposal_classes=per_class")
    if m.with_coord_feat and m.num_co_heads == 0 and not m.use_rcnn_co_head:
        raise SpecError("model.with_coord_feat=true embeds the co-heads' anchor features in their "
                        "positive queries, but there is no co-head (model.num_co_heads=0, "
                        "model.use_rcnn_co_head=false): set model.with_coord_feat=false")
    if not m.loss_types:
        raise SpecError("model.loss_types must name at least one of: labels, boxes")
    if m.hidden_dim % m.nheads:
        raise SpecError(f"model.hidden_dim={m.hidden_dim} must be divisible by model.nheads={m.nheads}")
    if m.fix_refpoints_hw == 0 or m.fix_refpoints_hw < -2:
        raise SpecError(f"model.fix_refpoints_hw={m.fix_refpoints_hw} is not supported. "
                        "Allowed values: -1 (learn w, h per box), -2 (shared w, h), > 0 (fixed)")
    for name in ("input_mean", "input_std"):
        if len(getattr(a, name)) not in (1, 3):
            raise SpecError(f"dataset.augmentation.{name} must have 1 or 3 values, "
                            f"got {getattr(a, name)}")
    if a.train_random_crop_min > a.train_random_crop_max:
        raise SpecError(f"dataset.augmentation.train_random_crop_min={a.train_random_crop_min} "
                        f"exceeds train_random_crop_max={a.train_random_crop_max}")
    if a.fixed_random_crop is not None and a.fixed_random_crop % 32:
        raise SpecError(f"dataset.augmentation.fixed_random_crop={a.fixed_random_crop} must be "
                        "divisible by 32")
    if not spec.results_dir.strip():
        raise SpecError("results_dir is empty: set it to the folder the tasks write to "
                        "(e.g. results_dir=/tmp/codetr_run)")
    if spec.encryption_key:
        raise SpecError("encryption_key is not supported: codetr writes plain PyTorch .pth files "
                        "(load them with torch.load(weights_only=True)); set encryption_key: null")
    for task in ("evaluate", "inference"):
        t = getattr(spec, task)
        if (t.input_width is None) != (t.input_height is None):
            raise SpecError(f"{task}.input_width and {task}.input_height must be set together")
    for task in ("export", "gen_trt_engine"):
        if getattr(spec, task).batch_size == 0:
            raise SpecError(f"{task}.batch_size=0 is not supported. Allowed values: -1 (dynamic "
                            "batch, TAO's default) or a fixed batch size >= 1")


# TAO's supported values of model.return_interm_indices (seed 000's model table).
TAO_INTERM_INDICES = ([0, 1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3], [1, 2], [1])


def check_interm_indices(idx: Sequence[int]) -> None:
    """The slots the backbone can build: ascending consecutive slots in 0..4, with slot 4 (stride
    64, made from slot 3 by the neck's stride-2 conv or the ViT pyramid's pooling) only after 3.

    A superset of TAO's lists (`TAO_INTERM_INDICES`): any such run of consecutive slots builds.
    """
    allowed = "; TAO's values: " + ", ".join(map(str, TAO_INTERM_INDICES))
    if not idx or list(idx) != list(range(idx[0], idx[0] + len(idx))):
        raise SpecError(f"model.return_interm_indices={list(idx)} is not supported: the slots must "
                        f"be ascending and consecutive (slot k = stride 2^(k+2), 0..4){allowed}")
    if list(idx) == [4]:
        raise SpecError("model.return_interm_indices=[4] is not supported: slot 4 (stride 64) is "
                        "made from slot 3 (the backbones have slots 0..3 natively), so it needs "
                        f"slot 3 too, e.g. [3, 4]{allowed}")


def save_spec(spec: ExperimentSpec, folder: str | os.PathLike) -> str:
    """Writes the resolved spec as `<folder>/experiment_spec.yaml` (atomically); returns the path."""
    from codetr.fileio import atomic_write_text

    path = os.path.join(folder, "experiment_spec.yaml")
    atomic_write_text(path, spec_to_yaml(spec))
    return path
