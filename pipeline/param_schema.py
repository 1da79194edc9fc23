"""The typed keys of the pipeline's own params sections (`prepare`, `backbone`, `report`).

`pipeline.params.section` checks a section against `SCHEMAS` before a stage reads it, so a value
that `dvc exp run -S key=value` (YAML 1.2: `no`, `abc`, `1.5` stay what they are) or an editor
put in params.yaml fails at once with the full dotted key, the value and what is allowed, and a
misspelt key (`backbone.sha265`) is refused with a did-you-mean instead of being ignored, as the
spec loader does for the codetr sections.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

# `prepare.coco.images`: symlink the user's images into data/, copy them, or leave them in place
IMAGE_MODES = ("symlink", "copy", "none")

_KINDS = {  # kind -> (test, words for the message)
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str_list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                 "a list of strings"),
    "mapping": (lambda v: isinstance(v, dict), "a mapping"),
    "null": (lambda v: v is None, "null"),
}


class ParamsError(ValueError):
    """A pipeline params value of the wrong type, out of range, or an unknown key."""


@dataclass(frozen=True)
class Key:
    """One key: the kinds of value it takes, and optionally choices, a lower bound or sub-keys."""
    kinds: Tuple[str, ...]
    choices: Tuple[str, ...] = ()
    minimum: Optional[float] = None
    above: Optional[float] = None  # exclusive lower bound
    keys: Optional[Mapping[str, "Key"]] = None  # a mapping's known keys


def _count(minimum: int = 0) -> Key:
    return Key(("int",), minimum=minimum)


_SPLIT = Key(("mapping", "null"), keys={"json_file": Key(("str",)), "image_dir": Key(("str",))})
SCHEMAS: Dict[str, Dict[str, Key]] = {
    "prepare": {
        "source": Key(("str",), choices=("synthetic", "coco")),
        "inputs": Key(("str", "int")),  # a dvc.yaml dep path: `${prepare.inputs}`
        "contiguous_ids": Key(("bool",)),
        "synthetic": Key(("mapping", "null"), keys={  # codetr.data.synthetic.generate's arguments
            "num_train": _count(), "num_val": _count(), "num_test": _count(),
            "image_size": _count(1), "seed": Key(("int",)), "classes": Key(("str_list",)),
            "max_objects": _count(1), "empty_prob": Key(("number",), minimum=0),
            "min_size": Key(("number",), minimum=0), "min_visible": Key(("number",), minimum=0)}),
        "coco": Key(("mapping", "null"), keys={
            "images": Key(("str",), choices=IMAGE_MODES),
            "train": _SPLIT, "val": _SPLIT, "test": _SPLIT,
            "categories": Key(("str_list", "null")),
            "split": Key(("mapping", "null"), keys={
                "val": Key(("number",), minimum=0), "test": Key(("number",), minimum=0),
                "seed": Key(("int",))})}),
    },
    "backbone": {
        "source": Key(("str", "null")),  # none | file | URL | timm:<name> | package:<name>
        "sha256": Key(("str", "null")),
        "timeout": Key(("number",), above=0),  # seconds
    },
    "report": {
        "title": Key(("str",)),
        "max_images": _count(),
        "columns": _count(1),
    },
}


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a decimal number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _expected(key: Key) -> str:
    return " or ".join(_KINDS[k][1] for k in key.kinds)


def require_bool(value: Any, dotted: str, error: type = ParamsError) -> bool:
    """`value` if it is a real boolean, else `error` naming `dotted`: YAML 1.2 (DVC's loader and
    the pipeline's) reads `no`, `off`, `yes` as strings, and a non-empty string is truthy."""
    if isinstance(value, bool):
        return value
    hint = (" (YAML 1.2, which DVC and the pipeline read, takes yes/no/on/off as strings: write "
            "true or false)" if isinstance(value, str) else "")
    raise error(f"{dotted}={_show(value)}: expected true or false{hint}")


def check(data: Mapping[str, Any], keys: Mapping[str, Key], where: str) -> None:
    """Raises ParamsError for the first unknown key or badly typed value of `data` (at `where`)."""
    for name in data:
        if name not in keys:
            close = difflib.get_close_matches(str(name), list(keys), n=1, cutoff=0.6)
            hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
            raise ParamsError(f"unknown key '{where}.{name}'.{hint} "
                              f"Allowed keys of {where}: {', '.join(keys)}")
    for name, value in data.items():
        _check_value(value, keys[name], f"{where}.{name}")


def _check_value(value: Any, key: Key, dotted: str) -> None:
    if key.kinds == ("bool",):
        require_bool(value, dotted)
    if not any(_KINDS[k][0](value) for k in key.kinds):
        raise ParamsError(f"{dotted}={_show(value)}: expected {_expected(key)}")
    if key.choices and value not in key.choices:
        close = difflib.get_close_matches(str(value), key.choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ParamsError(f"{dotted}={value!r} is not supported.{hint} "
                          f"Allowed values: {', '.join(key.choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # NaN passes every range check otherwise
            raise ParamsError(f"{dotted}={value!r}: expected a finite number")
        if key.minimum is not None and value < key.minimum:
            raise ParamsError(f"{dotted}={value!r} is out of range: must be >= {key.minimum}")
        if key.above is not None and not value > key.above:
            raise ParamsError(f"{dotted}={value!r} is out of range: must be > {key.above}")
    if key.keys is not None and isinstance(value, dict):
        check(value, key.keys, dotted)


def check_section(name: str, data: Mapping[str, Any]) -> None:
    """Checks the pipeline section `name` (a no-op for sections without a schema, e.g. `model`)."""
    if name in SCHEMAS:
        check(data, SCHEMAS[name], name)
