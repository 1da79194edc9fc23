"""dvc.yaml, the Snakefile and params.yaml agree: same stages, same edges, same paths."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from codetr.spec import load_spec
from pipeline.params import load_params
from pipeline.stages import (Stage, code_files, edges, read_stages, stage_params, stage_params_text,
                             write_if_changed)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_NAMES = ["prepare", "backbone", "train", "evaluate", "inference", "export", "report"]
EXPECTED_EDGES = {("prepare", "train"), ("backbone", "train"), ("prepare", "evaluate"),
                  ("train", "evaluate"), ("prepare", "inference"), ("train", "inference"),
                  ("prepare", "report"), ("train", "report"), ("evaluate", "report"),
                  ("inference", "report"), ("train", "export"), ("export", "report")}


def tool_env(tmp: Path) -> dict:
    """Environment for dvc/snakemake/codetr subprocesses: the venv first, offline, no site cache."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"), HF_HUB_OFFLINE="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env


def copy_repo(dest: Path, env: dict) -> Path:
    """The repository's files (tracked and untracked, not ignored) copied to `dest`, as a new git
    repository with one commit (DVC needs git; `dvc exp run` and DVCLive need a commit)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *args], cwd=dest, env=env, check=True, capture_output=True)
    return dest


def run_tool(args, cwd: Path, env: dict, timeout: int = 300) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dot_graph(text: str) -> tuple[set, set]:
    """(node names, edges by name) of a graphviz dot text (DVC's or Snakemake's)."""
    labels = dict(re.findall(r'^\s*(\w+)\s*\[label\s*=\s*"([^"]+)"', text, re.M))
    names = set(labels.values()) | set(re.findall(r'^\s*"([^"]+)";\s*$', text, re.M))
    pairs = re.findall(r'^\s*"?([\w]+)"?\s*->\s*"?([\w]+)"?', text, re.M)
    return names, {(labels.get(a, a), labels.get(b, b)) for a, b in pairs}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repo")
    return copy_repo(tmp, tool_env(tmp))


def test_stage_table_names_and_edges():
    stages = read_stages(REPO / "dvc.yaml")
    assert [s.name for s in stages] == STAGE_NAMES
    assert edges(stages) == EXPECTED_EDGES
    for s in stages:
        gpu = s.resources.get("gpu")
        assert gpu == (1 if s.name in ("train", "evaluate", "inference") else None)


def test_dvc_and_snakemake_build_the_same_dag(repo_copy, tmp_path):
    env = tool_env(tmp_path)
    dvc_names, dvc_edges = dot_graph(run_tool(["dvc", "dag", "--dot"], repo_copy, env))
    smk_names, smk_edges = dot_graph(run_tool(["snakemake", "--rulegraph"], repo_copy, env))
    assert dvc_names == set(STAGE_NAMES)
    assert smk_names - {"all"} == dvc_names
    assert {e for e in smk_edges if "all" not in e} == dvc_edges == EXPECTED_EDGES


def test_snakemake_dry_run_runs_each_stage_command(repo_copy, tmp_path):
    out = run_tool(["snakemake", "-n", "-p", "--cores", "1"], repo_copy, tool_env(tmp_path))
    stages = read_stages(REPO / "dvc.yaml")
    produced = {o for s in stages for o in s.outs}
    for stage in stages:
        assert re.search(rf"rule {stage.name}:", out), stage.name
        # each rule runs ITS command (a loop-defined `shell: cmd` would run the last one)
        assert " ".join(stage.cmd.split()) in " ".join(out.split()), stage.name
        # and lists every dep as an input: a file dep (report's params.yaml, which it embeds as
        # text) by name, a code folder by its files, another stage's output as it is
        inputs = set(re.search(rf"^rule {stage.name}:\n\s+input: (.*)$", out, re.M).group(1).split(", "))
        for dep in stage.deps:
            expanded = [dep] if dep in produced else code_files(str(repo_copy / dep))
            assert {os.path.relpath(p, repo_copy) if os.path.isabs(p) else p for p in expanded} <= inputs, dep
    assert re.search(r"total\s+8", out)  # 7 stages + all


def test_params_file_reads_the_same_in_yaml_1_1_and_1_2():
    # Snakemake and plain PyYAML read YAML 1.1 (1e-4 is a string), DVC and codetr read 1.2
    for path in (REPO / "params.yaml", REPO / "params" / "coco-r50.yaml"):
        assert yaml.safe_load(path.read_text()) == load_params(path), path


def test_params_files_are_valid_specs():
    for path in (REPO / "params.yaml", REPO / "params" / "coco-r50.yaml"):
        load_spec(path)


def _under(path: str, folder: str) -> bool:
    return Path(path) == Path(folder) or Path(folder) in Path(path).parents


# The files a user copies to params.yaml for `dvc repro`: the default, the small-data recipe and
# the COCO recipe.
PIPELINE_PARAMS = ("params.yaml", "params/finetune-small.yaml", "params/coco-r50.yaml")


@pytest.mark.parametrize("name", PIPELINE_PARAMS)
def test_spec_paths_point_into_the_declared_outputs(name):
    params = load_params(REPO / name)
    spec = load_spec(REPO / name)
    outs = {s.name: s.outs for s in read_stages(REPO / "dvc.yaml")}
    data, = outs["prepare"]
    ds = spec.dataset
    # `prepare.coco.images: none` leaves the images where they are (COCO's 118k): only the
    # annotation files and the class map are the stage's outputs then
    images_copied = params["prepare"].get("coco", {}).get("images") != "none"
    for src in ds.train_data_sources + ds.val_data_sources + [ds.test_data_sources]:
        assert _under(src.json_file, data) and _under(src.image_dir, data) == images_copied
    assert _under(ds.infer_data_sources.image_dir, data) == images_copied
    assert _under(ds.infer_data_sources.classmap, data)
    assert Path(spec.model.pretrained_backbone_path).parent == Path(outs["backbone"][0])
    assert spec.task_results_dir("train") == outs["train"][0]
    assert spec.task_results_dir("inference") == outs["inference"][0]
    assert all(_under(p, spec.task_results_dir("evaluate")) for p in outs["evaluate"])
    assert _under(spec.evaluate.checkpoint, outs["train"][0])
    assert _under(spec.inference.checkpoint, outs["train"][0])
    assert spec.task_results_dir("export") == outs["export"][0]
    assert _under(spec.export.checkpoint, outs["train"][0]) and _under(spec.export.onnx_file, outs["export"][0])
    for section in ("prepare", "backbone", "report", "train", "evaluate", "inference", "export"):
        assert section in params


def test_stage_params_selection_and_write_if_changed(tmp_path):
    params = {"train": {"optim": {"lr": 1.0e-4}}, "model": {"a": 1}, "results_dir": "r"}
    (tmp_path / "extra.yaml").write_text("x: 2.0e-3\ny: 1\n")
    stage = Stage(name="s", cmd="c", params=["model", "train.optim.lr", {"extra.yaml": ["x"]},
                                             {"params.yaml": None}])
    assert stage_params(stage, params, tmp_path) == {
        "params.yaml:model": {"a": 1}, "params.yaml:train.optim.lr": 1.0e-4,
        "extra.yaml:x": 2.0e-3, "params.yaml": params}
    with pytest.raises(KeyError, match="train.optim.momentum"):
        stage_params(Stage(name="s", cmd="c", params=["train.optim.momentum"]), params)
    target = tmp_path / "p" / "s.json"
    text = stage_params_text(stage, params, tmp_path)
    assert write_if_changed(target, text, lambda: True) is True
    assert target.stat().st_mtime == 0  # outputs made with these params: not newer than them
    os.utime(target, (1, 1))
    assert write_if_changed(target, text, lambda: False) is False and target.stat().st_mtime == 1
    params["train"]["optim"]["lr"] = 2.0e-4
    assert write_if_changed(target, stage_params_text(stage, params, tmp_path), lambda: False) is True
    assert target.stat().st_mtime > 1


def test_code_dependencies_expand_to_source_files(tmp_path):
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("")
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_text("")
    assert code_files(str(tmp_path / "pkg")) == [str(tmp_path / "pkg" / "a.py")]
    assert code_files("not/a/dir.py") == ["not/a/dir.py"]
