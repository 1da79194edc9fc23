"""Reading `params.yaml` the way DVC does (YAML 1.2 floats), for the pipeline's own stages."""
from __future__ import annotations

import os
from typing import Any, Dict

from codetr.spec.yaml_io import load_yaml
from pipeline.param_schema import check_section


def load_params(path: str | os.PathLike = "params.yaml") -> Dict[str, Any]:
    """The whole params file as a dict (empty when the file is empty).

    Raises:
        ValueError: the file is not a YAML mapping.
    """
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections (prepare, backbone, model, ...)")
    return data


def section(params: Dict[str, Any], name: str) -> Dict[str, Any]:
    """`params[name]` as a dict (empty when absent); a non-mapping value is an error, and the
    pipeline's own sections (prepare, backbone, report) are checked against their typed keys.

    Raises:
        ValueError: not a mapping; `pipeline.param_schema.ParamsError` (a ValueError): an unknown
            key or a value of the wrong type, named by its full dotted key.
    """
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"params section '{name}' must be a mapping, got {type(value).__name__}")
    check_section(name, value)
    return value
