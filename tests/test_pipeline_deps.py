"""Every repository file a stage's script imports is one of the stage's deps in dvc.yaml.

An import that no dep covers is code DVC does not watch: editing it would leave the stage "up to
date" with stale outputs. Checked by importing each `python -m pipeline.<stage>` module, plus
the modules its functions import lazily (`LAZY`, kept by hand: grep for indented `from codetr`),
in a fresh interpreter.
"""
import json
import re
import secrets
import shutil
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


def test_every_file_the_report_reads_is_a_dep(tmp_path, monkeypatch):
    """The report embeds params.yaml as text (comments too) and its sha256: DVC's `params:` tracks
    values only, so the file itself must be a dep, or a comment edit would leave `dvc status`
    clean with a stale page. Files read are recorded while the stage runs on a copy of the repo's
    params.yaml and dvc.yaml (its other inputs missing: the page notes them)."""
    import builtins
    import io

    from pipeline import report

    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    read, real_open = set(), io.open

    def spy(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and not set(mode) & set("wax+"):
            read.add(Path(file).resolve())
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    report.run(tmp_path / "params.yaml", tmp_path / "data", tmp_path / "results/train",
               tmp_path / "results/evaluate", tmp_path / "results/inference", tmp_path / "results/report",
               tmp_path / "results/export", tmp_path / "results/metrics/train.json")
    monkeypatch.undo()
    files = {p.relative_to(tmp_path.resolve()).as_posix() for p in read if tmp_path.resolve() in p.parents}
    assert {"params.yaml", "dvc.yaml"} <= files  # the spy sees what the stage reads
    stage = next(s for s in STAGES if s.name == "report")
    # dvc.yaml: DVC refuses it as a dependency ("DVC file 'dvc.yaml' cannot be a dependency");
    # the report reads only the train stage's command from it, which the next test covers
    missing = [f for f in files - {"dvc.yaml"} if not _covered(f, stage.deps)]
    assert not missing, f"stage report: reads but not in its dvc.yaml deps: {missing}"


def test_the_report_takes_only_the_train_command_from_dvc_yaml(tmp_path):
    """What the report shows of dvc.yaml is the train stage's cmd, which is in train's own lock
    entry: changing it reruns train, whose new record (train_seconds) and logs rerun the report.
    Any other edit of dvc.yaml leaves the page as it was."""
    from pipeline.provenance import provenance

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    text = (REPO / "dvc.yaml").read_text()
    train = next(s for s in STAGES if s.name == "train")
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(text)
    before = provenance(tmp_path / "params.yaml", dvc_yaml)
    assert " ".join(before["train_command"].split()) == " ".join(train.cmd.split())
    edited = text.replace("One self-contained HTML report", f"A report {secrets.token_hex(4)}")
    edited = edited.replace("cmd: codetr evaluate -e params.yaml", "cmd: codetr evaluate -e params.yaml -q")
    dvc_yaml.write_text(f"# {secrets.token_hex(8)}\n" + edited)
    assert provenance(tmp_path / "params.yaml", dvc_yaml) == before
    flag = f"--seed-{secrets.token_hex(3)}"
    dvc_yaml.write_text(text.replace("--plots results/plots/train", f"--plots results/plots/train {flag}"))
    assert flag in provenance(tmp_path / "params.yaml", dvc_yaml)["train_command"]
