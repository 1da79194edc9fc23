"""dvc.yaml as a stage table for other runners (the Snakefile) and for tests.

The Snakefile defines one rule per stage from `read_stages`; `stage_params_text` gives the text
of a per-stage params file that Snakemake lists as an input, so that changing a stage's params
reruns it (and its dependents) even for outputs Snakemake did not produce itself.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from codetr.fileio import atomic_write_text

PARAMS_FILE = "params.yaml"


@dataclass
class Stage:
    """One stage of dvc.yaml.

    Attributes:
        name: the stage name (also the Snakemake rule name).
        cmd: the shell command.
        deps: dependency paths (files or folders).
        params: `params:` entries as written (a section or dotted key, or `{file: keys}`).
        outs: all produced paths: outs, then metrics, then plots.
        resources: `meta.snakemake.resources` (e.g. `{"gpu": 1}`).
    """
    name: str
    cmd: str
    deps: List[str] = field(default_factory=list)
    params: List[Any] = field(default_factory=list)
    outs: List[str] = field(default_factory=list)
    resources: Dict[str, Any] = field(default_factory=dict)


def _paths(entries: Optional[Sequence]) -> List[str]:
    """Paths of `outs`/`metrics`/`plots` entries, which are strings or `{path: options}`."""
    paths = []
    for entry in entries or []:
        paths.extend([entry] if isinstance(entry, str) else list(entry))
    return paths


_VAR = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def _interpolate(text: str, params: Dict[str, Any], where: str) -> str:
    """DVC's `${key}` in a dep: the params.yaml value (a string or number), as DVC substitutes it."""
    def value(match: "re.Match") -> str:
        try:
            found = _lookup(params, match.group(1))
        except KeyError:
            raise ValueError(f"{where}: ${{{match.group(1)}}} is not in {PARAMS_FILE}; dvc.yaml uses it "
                             "as a dependency path: add it (e.g. `prepare.inputs: inputs`, the folder "
                             "of the data prepare reads)") from None
        if isinstance(found, (dict, list)) or found is None:
            raise ValueError(f"{where}: ${{{match.group(1)}}} must be a string or number in "
                             f"{PARAMS_FILE}, got {found!r}")
        return str(found)
    return _VAR.sub(value, text)


def read_stages(dvc_yaml: str | os.PathLike = "dvc.yaml",
                params: Optional[Dict[str, Any]] = None) -> List[Stage]:
    """The stages of a dvc.yaml, in file order; `${key}` in deps is taken from `params` (default:
    the params.yaml beside dvc.yaml), the only DVC templating the pipeline uses."""
    text = Path(dvc_yaml).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if params is None and "${" in text:
        from pipeline.params import load_params

        params = load_params(Path(dvc_yaml).parent / PARAMS_FILE)
    stages = []
    for name, raw in (data.get("stages") or {}).items():
        if "foreach" in raw or "matrix" in raw:
            raise ValueError(f"{dvc_yaml}: stage {name}: foreach/matrix stages are not supported")
        cmd = raw["cmd"] if isinstance(raw["cmd"], str) else " && ".join(raw["cmd"])
        meta = ((raw.get("meta") or {}).get("snakemake") or {})
        stages.append(Stage(
            name=name, cmd=cmd,
            deps=[_interpolate(d, params or {}, f"{dvc_yaml}: stage {name}") for d in raw.get("deps") or []], params=list(raw.get("params") or []),
            outs=_paths(raw.get("outs")) + _paths(raw.get("metrics")) + _paths(raw.get("plots")),
            resources=dict(meta.get("resources") or {})))
    return stages


def is_directory(path: str) -> bool:
    """Outputs without a file extension are folders (data, results/train, ...)."""
    return Path(path).suffix == ""


def edges(stages: Sequence[Stage]) -> set:
    """`(upstream, downstream)` stage pairs: a stage depends on a path another stage outputs."""
    producer = {out: s.name for s in stages for out in s.outs}
    return {(producer[d], s.name) for s in stages for d in s.deps if d in producer}


def code_files(dep: str) -> List[str]:
    """A dependency folder that no stage produces (code) as its files, so mtimes are compared
    per file (a folder's mtime does not change when a file in it is edited)."""
    root = Path(dep)
    if not root.is_dir():
        return [dep]
    return sorted(str(p) for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _lookup(params: Dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"params key '{dotted}' is not in {PARAMS_FILE}")
        node = node[part]
    return node


def stage_params(stage: Stage, params: Dict[str, Any], root: str | os.PathLike = ".") -> Dict[str, Any]:
    """The values a stage's `params:` entries select: `{"<file>:<key>" or "<file>": value}`.

    Entries of other files than params.yaml are read from `root` with the same YAML 1.2 loader.
    """
    from pipeline.params import load_params

    selected: Dict[str, Any] = {}
    for entry in stage.params:
        if isinstance(entry, str):
            selected[f"{PARAMS_FILE}:{entry}"] = _lookup(params, entry)
            continue
        for file, keys in entry.items():
            values = params if file == PARAMS_FILE else load_params(Path(root) / file)
            if keys is None:  # `- file.yaml:` tracks the whole file
                selected[file] = values
            else:
                for key in keys:
                    selected[f"{file}:{key}"] = _lookup(values, key)
    return selected


def stage_params_text(stage: Stage, params: Dict[str, Any], root: str | os.PathLike = ".") -> str:
    """Canonical JSON of `stage_params` (sorted keys): equal text iff equal params."""
    return json.dumps(stage_params(stage, params, root), sort_keys=True, indent=1) + "\n"


def write_if_changed(path: str | os.PathLike, text: str, outputs_current: Callable[[], bool]) -> bool:
    """Writes `text` unless the file already holds it (its mtime then stays); returns True if written.

    The file's mtime means "when these params last changed". When it is written (first sight, or
    new content) `outputs_current()` says whether the outputs on disk were made with these params
    (the Snakefile asks DVC: `pipeline.dvc_status`): then the mtime is 0, so outputs `dvc repro`
    made do not look stale; otherwise it is now, so the stage reruns. Missing outputs rerun anyway.
    """
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    # A unique, fsynced temporary file: Snakefile parses running at once (dry runs, several
    # snakemake calls) each write their own, and none is left behind on an error; its mtime is
    # set before the rename, so the file never shows a "changed now" time it should not have.
    atomic_write_text(path, text, mtime=0 if outputs_current() else None)
    return True
