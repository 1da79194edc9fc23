"""End to end, in a temporary git copy of the repository with a tiny model and dataset:
`dvc repro`, `dvc exp run -S ...`, and a real Snakemake run. Slow (whole CLI processes)."""
import json
import re
import subprocess
from pathlib import Path

import pytest

from codetr.spec.yaml_io import dump_yaml
from pipeline.params import load_params
from test_pipeline_dag import copy_repo, run_tool, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TINY = {
    # 10 steps of batch 2 (batch 1 breaks BatchNorm on 1x1 maps): the train task logs the loss
    # every 10 steps, so train/loss is then a metric
    "prepare": {"synthetic": {"num_train": 20, "num_val": 4, "num_test": 4, "image_size": 64}},
    "backbone": {"source": "none"},
    "model": {"pretrained_backbone_path": None, "backbone": "resnet_18", "hidden_dim": 32,
              "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
              "num_queries": 10, "num_select": 10, "dn_number": 4},
    "dataset": {"batch_size": 2, "workers": 0,
                "augmentation": {"scales": [64], "train_random_resize": [64],
                                 "train_random_crop_min": 48, "train_random_crop_max": 64,
                                 "random_resize_max_size": 64, "test_random_resize": 64}},
    "train": {"num_epochs": 1, "optim": {"lr_steps": [1]}},
    "inference": {"input_width": 64, "input_height": 64, "conf_threshold": 0.0},
    "report": {"max_images": 4},
}


def _merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _set_params(repo: Path, over: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(dump_yaml(_merge(load_params(path), over)))


def _git(repo: Path, env: dict, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def _tiny_repo(tmp_path: Path) -> tuple[Path, dict]:
    env = tool_env(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo, env)
    _set_params(repo, TINY)
    _git(repo, env, "commit", "-q", "-am", "tiny params")
    return repo, env


def _check_outputs(repo: Path) -> None:
    assert json.loads((repo / "data" / "stats.json").read_text())["splits"]["train"]["images"] == 20
    assert (repo / "models" / "backbone" / "source.json").is_file()
    assert (repo / "results" / "train" / "codetr_model.pth").is_file()
    assert (repo / "results" / "train" / "model_best.pth").is_file()  # what evaluate reads
    metrics = json.loads((repo / "results" / "evaluate" / "metrics.json").read_text())
    assert {"AP", "AP50", "per_class"} <= set(metrics)
    assert len(list((repo / "results" / "inference" / "labels").glob("*.txt"))) == 4
    page = (repo / "results" / "report" / "report.html").read_text()
    assert "base64," in page and "not available" not in page


def _share_and_clone(repo: Path, env: dict, tmp_path: Path) -> Path:
    """Pushes to a local-directory remote and makes a fresh git clone (no DVC cache)."""
    run_tool(["dvc", "remote", "add", "-d", "local", str(tmp_path / "store")], repo, env)
    _git(repo, env, "commit", "-q", "-am", "local remote")
    run_tool(["dvc", "push"], repo, env, timeout=600)
    clone = tmp_path / "clone"
    _git(tmp_path, env, "clone", "-q", str(repo), str(clone))
    return clone


def test_dvc_repro_then_share_diff_in_a_clone_and_run_an_experiment(tmp_path):
    repo, env = _tiny_repo(tmp_path)
    run_tool(["dvc", "repro"], repo, env, timeout=1500)
    _check_outputs(repo)
    record = json.loads((repo / "results" / "metrics" / "train.json").read_text())
    assert record["steps"] == 10 and record["epochs"] == 1 and {"AP", "AP50", "APl"} <= set(record["val"])
    assert record["train_seconds"] > 0 and (repo / "results" / "plots" / "train" / "train" / "loss.tsv").is_file()
    shown = json.dumps(json.loads(run_tool(["dvc", "metrics", "show", "--json"], repo, env)))
    assert "results/metrics/train.json" in shown and "results/evaluate/metrics.json" in shown
    assert "loss_giou" not in shown  # loss terms are curves (plots), not metrics
    assert "Data and pipelines are up to date" in run_tool(["dvc", "status"], repo, env)
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "baseline run")

    clone = _share_and_clone(repo, env, tmp_path)
    # The committed metrics and curves diff without the cache (HEAD~2: the tiny params commit).
    diff = json.loads(run_tool(["dvc", "metrics", "diff", "HEAD~2", "--json"], clone, env))
    assert "results/metrics/train.json" in diff
    plots = json.loads(run_tool(["dvc", "plots", "diff", "HEAD~2", "--json"], clone, env))
    assert any(key.startswith("results/plots/train/train/") for key in plots["data"])
    run_tool(["dvc", "pull"], clone, env, timeout=600)
    assert "Data and pipelines are up to date" in run_tool(["dvc", "status"], clone, env)
    assert "Running stage" not in run_tool(["dvc", "repro"], clone, env, timeout=600)
    # Snakemake in the same clone: `dvc pull` checks outputs out in its own order, so their
    # mtimes say nothing; `snakemake --touch` (DVC has just verified them) stamps them in DAG order.
    run_tool(["snakemake", "--touch", "--cores", "1"], clone, env)
    plan = run_tool(["snakemake", "-n", "--cores", "1", "train"], clone, env)
    assert "Nothing to be done" in plan, plan
    assert "Data and pipelines are up to date" in run_tool(["dvc", "status"], clone, env)

    before = json.loads((repo / "results" / "train" / "dvclive" / "metrics.json").read_text())
    out = run_tool(["dvc", "exp", "run", "-S", "train.optim.lr=1.0e-4"], repo, env, timeout=1500)
    assert "Running stage 'prepare'" not in out and "Running stage 'train'" in out
    assert load_params(repo / "params.yaml")["train"]["optim"]["lr"] == pytest.approx(1.0e-4)
    after = json.loads((repo / "results" / "train" / "dvclive" / "metrics.json").read_text())
    assert after["train"]["loss"] != before["train"]["loss"]
    # the loss terms are logged on the logger's steps only: they must still reach it
    assert {"loss_ce", "loss_bbox_dn", "loss_giou_interm", "loss_cls_co0"} <= set(after["train"])
    exps = json.loads(run_tool(["dvc", "exp", "show", "--json"], repo, env))
    assert re.search(r'"lr": 0\.0001', json.dumps(exps))
    table = run_tool(["dvc", "exp", "show", "--only-changed", "--no-pager"], repo,
                     dict(env, COLUMNS="120"))
    assert "lr" in table and max(len(line) for line in table.splitlines()) <= 120, table


def test_snakemake_runs_the_pipeline_and_reruns_dependents_of_a_param(tmp_path):
    repo, env = _tiny_repo(tmp_path)
    run_tool(["snakemake", "--cores", "1"], repo, env, timeout=1500)
    _check_outputs(repo)
    assert (repo / "results" / "train" / ".snakemake_timestamp").exists()
    assert "Nothing to be done" in run_tool(["snakemake", "-n", "--cores", "1"], repo, env)
    _set_params(repo, {"train": {"optim": {"lr": 1.0e-4}}})
    plan = run_tool(["snakemake", "-n", "--cores", "1"], repo, env)
    planned = set(re.findall(r"^rule (\w+):", plan, re.M))
    assert planned == {"train", "evaluate", "inference", "export", "report", "all"}  # not prepare, backbone
