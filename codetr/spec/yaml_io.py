"""YAML reading and writing that agree with DVC on numbers.

PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; DVC, Snakemake users and humans
expect a float. `SpecLoader` adds the YAML 1.2 float pattern so `1e-4`, `1E+3` and `.5` load as
floats whichever way the file is written. Booleans are YAML 1.2's too (`true` / `false` only), as
DVC reads them: in YAML 1.1 `no`, `off`, `yes` and `on` are booleans, which turned TAO's
documented `two_stage_type: no` into `False`; a bool field given `yes` gets an error that asks
for true or false.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class SpecLoader(yaml.SafeLoader):
    """SafeLoader whose float resolver accepts `1e-4` (YAML 1.2 style)."""


_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")

SpecLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_12, list("tTfF"))


def _mapping_without_duplicates(loader: SpecLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML's "last one wins" would silently drop a setting."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a mapping key must be a plain name, not {key!r}", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' on lines {seen[key]} and {line} "
                "(YAML would keep only the last; delete one)", key_node.start_mark)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml_text(text: str, origin: str = "<string>") -> Any:
    """Parses YAML text; errors name `origin` and the line."""
    try:
        return yaml.load(text, Loader=SpecLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{origin}: not valid YAML: {err}") from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Reads a YAML file with `SpecLoader`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"spec file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a spec file (give the YAML file)") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the spec "
                         "as UTF-8") from None
    except OSError as err:
        raise ValueError(f"cannot read spec file {path}: {err.strerror or err}") from None
    return load_yaml_text(text, str(path))


def dump_yaml(data: Any) -> str:
    """YAML text in key order as given; floats always carry a dot (`1.0e-04`) so any reader agrees."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None)


class _Dumper(yaml.SafeDumper):
    pass


def _float_repr(dumper: yaml.SafeDumper, value: float):
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exp = text.split("e")
        text = f"{mantissa}.0e{exp}"
    return dumper.represent_scalar("tag:yaml.org,2002:float", text)


_Dumper.add_representer(float, _float_repr)
