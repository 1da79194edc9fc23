"""Plain YAML data -> typed spec dataclasses, with per-field checks that name the dotted key."""
from __future__ import annotations

import dataclasses
import math
import difflib
import typing
from typing import Any, Dict, List, Union

from codetr.spec.errors import SpecError

_NONE = type(None)


def to_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Builds `cls` from a mapping, recursively; unknown keys and wrong types raise SpecError."""
    where = path or "<spec>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of {cls.__name__} fields, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f" Did you mean '{_join(path, close[0])}'?" if close else ""
            raise SpecError(f"unknown key '{_join(path, key)}'.{hint} "
                            f"Allowed keys of {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(path, name))
            check_constraints(kwargs[name], f.metadata, _join(path, name))
    return cls(**kwargs)


def check_key_path(cls: type, dotted: str) -> None:
    """Raises SpecError (with a "did you mean") when `dotted` names no field of `cls`'s sections.

    Checked as far as the sections are dataclasses (a dict-valued field such as `color_map`
    takes any key below it).
    """
    path = ""
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return
        fields = [f.name for f in dataclasses.fields(cls)]
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1, cutoff=0.6)
            hint = f" Did you mean '{_join(path, close[0])}'?" if close else ""
            raise SpecError(f"unknown key '{_join(path, part)}'.{hint} "
                            f"Allowed keys of {path or '<spec>'}: {', '.join(fields)}")
        tp = typing.get_type_hints(cls)[part]
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        cls = args[0] if typing.get_origin(tp) is Union and len(args) == 1 else tp
        path = _join(path, part)


def check_constraints(value: Any, meta: typing.Mapping, key: str) -> None:
    """Applies `choices`, `min`, `max`, `gt` and `each` metadata to a converted value."""
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SpecError(f"{key}={value!r} is not supported.{hint} "
                        f"Allowed values: {', '.join(map(str, meta['choices']))}")
    if "min" in meta and value < meta["min"]:
        raise SpecError(f"{key}={value!r} is out of range: must be >= {meta['min']}"
                        + (f" and <= {meta['max']}" if "max" in meta else ""))
    if "max" in meta and value > meta["max"]:
        raise SpecError(f"{key}={value!r} is out of range: must be <= {meta['max']}"
                        + (f" and >= {meta['min']}" if "min" in meta else ""))
    if "gt" in meta and not value > meta["gt"]:
        raise SpecError(f"{key}={value!r} is out of range: must be > {meta['gt']}")
    if "each" in meta:
        for i, item in enumerate(value):
            check_constraints(item, meta["each"], f"{key}[{i}]")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and _NONE in args:
            return None
        errors = {}
        for option in (a for a in args if a is not _NONE):
            try:
                return _coerce(option, value, key)
            except SpecError as err:
                errors[option] = str(err)
        # A list given for a string-or-list key failed inside the list: that item's error says more.
        lists = [e for o, e in errors.items() if typing.get_origin(o) in (list, List)]
        if isinstance(value, (list, tuple)) and len(lists) == 1:
            raise SpecError(lists[0])
        raise SpecError(next(iter(errors.values())) if len(errors) == 1 else
                        f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return to_dataclass(tp, value, key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SpecError(f"{key}: expected a mapping, got {_show(value)}")
        return {_coerce(args[0], k, f"{key} key"): _coerce(args[1], v, f"{key}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SpecError(f"{key}: expected an integer, got {_show(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # '1e-4' read as a string by a YAML 1.1 loader
            except ValueError:
                pass
        if number is None:
            raise SpecError(f"{key}: expected a number, got {_show(value)}")
        if not math.isfinite(number):
            # NaN compares False with every bound, so range checks alone would let it through.
            raise SpecError(f"{key}={value!r}: expected a finite number (not NaN or infinity)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise SpecError(f"{key}: expected a string, got {_show(value)}")
    raise TypeError(f"unsupported spec type {tp} at {key}")


def _join(path: str, name: Any) -> str:
    return f"{path}.{name}" if path else str(name)


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


_NAMES = {str: ("a string", "strings"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), bool: ("true or false", "true/false values")}


def _type_name(tp: Any, plural: bool = False) -> str:
    """A spec type in words, e.g. `Union[str, List[str]]` -> 'a string or a list of strings'.

    Users write YAML, not Python: 'Union' or 'List[int]' would not tell them what to write.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        members = [_type_name(a, plural) for a in args if a is not _NONE]
        return " or ".join(members + (["null"] if _NONE in args else []))
    if origin in (list, List):
        return ("lists of " if plural else "a list of ") + _type_name(args[0], plural=True)
    if origin in (dict, Dict):
        return "mappings" if plural else "a mapping"
    if tp in _NAMES:
        return _NAMES[tp][1 if plural else 0]
    name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
    return f"{name} mappings" if plural else f"a mapping of {name} fields"

