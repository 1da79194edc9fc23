"""Every repository file a stage's script imports is one of the stage's deps in dvc.yaml.

An import that no dep covers is code DVC does not watch: editing it would leave the stage "up to
date" with stale outputs. Checked by importing each `python -m pipeline.<stage>` module, plus
the modules its functions import lazily (`LAZY`, kept by hand: grep for indented `from codetr`),
in a fresh interpreter.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import read_stages

REPO = Path(__file__).resolve().parents[1]
STAGES = read_stages(REPO / "dvc.yaml")
LAZY = {"pipeline.backbone": ["codetr.model.pretrained"], "pipeline.train": ["codetr.spec", "codetr.cli"]}

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})))
"""


def _imported_repo_files(module: str) -> list:
    out = subprocess.run([sys.executable, "-c", _PROBE, module, *LAZY.get(module, [])], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    files = []
    for path in json.loads(out):
        if not Path(path).is_absolute():  # a few extension modules name a bare file
            continue
        path = Path(path).resolve()
        if REPO in path.parents and ".venv" not in path.relative_to(REPO).parts:
            files.append(path.relative_to(REPO).as_posix())
    return files


def _covered(path: str, deps) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_imported_code_is_a_dep(stage):
    script = re.match(r"python -m (pipeline\.\w+)", stage.cmd)
    if script is None:  # the codetr CLI: the whole package must be a dep
        assert stage.cmd.startswith("codetr ") and "codetr" in stage.deps, stage
        return
    missing = [f for f in _imported_repo_files(script.group(1)) if not _covered(f, stage.deps)]
    assert not missing, f"stage {stage.name}: imported but not in its dvc.yaml deps: {missing}"


def test_the_check_sees_a_missing_dep():
    """The probe finds the stage's own script and its helpers (so an empty list means covered)."""
    prepare = next(s for s in STAGES if s.name == "prepare")
    files = _imported_repo_files("pipeline.prepare")
    assert "pipeline/prepare.py" in files and "codetr/data/coco.py" in files
    assert not _covered("pipeline/prepare.py", [d for d in prepare.deps if d != "pipeline/prepare.py"])
