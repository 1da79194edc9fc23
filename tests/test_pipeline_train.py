"""The train stage's committed record: metrics of the chosen weights, both APs, steps, time; the
DVCLive curves copied out of the cached folder."""
import json
import random
import subprocess

import torch

from pipeline import train as train_stage


def _fake_run(train_dir, weights="raw"):
    stats = {k: 0.1 * i for i, k in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1"), start=1)}
    validation = {"ema": {**stats, "AP": 0.25}, "raw": {**stats, "AP": 0.3}}
    train_dir.mkdir(parents=True)
    torch.save({"global_step": 40, "epoch": 3, "state_dict": {"model.w": torch.randn(2)},
                "codetr": {"weights": weights, "validation": validation}}, train_dir / "codetr_model.pth")
    series = train_dir / "dvclive" / "plots" / "metrics"
    (series / "train").mkdir(parents=True)
    (series / "val").mkdir()
    (series / "train" / "loss.tsv").write_text("step\tloss\n9\t3.5\n19\t2.25\n")
    (series / "val" / "AP.tsv").write_text("step\tAP\n19\t0.3\n")


def test_summary_holds_what_people_diff(tmp_path):
    _fake_run(tmp_path / "train", weights="raw")
    record = train_stage.summarise(tmp_path / "train", 12.345)
    assert record == {"val": {"AP": 0.3, "AP50": 0.2, "AP75": 0.3, "APs": 0.4, "APm": 0.5, "APl": 0.6},
                      "val_ema_AP": 0.25, "val_raw_AP": 0.3, "ema_chosen": 0,
                      "steps": 40, "epochs": 3, "train_seconds": 12.3}


def test_summary_names_the_best_validation_and_early_stopping(tmp_path):
    _fake_run(tmp_path / "train", weights="raw")
    path = tmp_path / "train" / "codetr_model.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["codetr"]["best"] = {"epoch": 2, "step": 20, "weights": "ema", "AP": 0.41234, "AP50": 0.6}
    ckpt["codetr"]["early_stopping"] = {"patience": 2, "stale": 2, "stopped": True}
    torch.save(ckpt, path)
    record = train_stage.summarise(tmp_path / "train", 1.0)
    assert record["best"] == {"epoch": 2, "step": 20, "AP": 0.4123, "AP50": 0.6, "ema": 1}
    assert record["stopped_early"] == 1
    ckpt["codetr"]["best"], ckpt["codetr"]["early_stopping"] = None, {"patience": 0, "stale": 3}
    torch.save(ckpt, path)  # no validation ran, early stopping off: neither key
    assert not {"best", "stopped_early"} & set(train_stage.summarise(tmp_path / "train", 1.0))


def test_run_writes_metrics_and_plots_after_the_cli(tmp_path, monkeypatch):
    calls = []

    def fake_cli(argv):
        calls.append(argv)
        _fake_run(tmp_path / "train", weights="ema")
        return 0
    monkeypatch.setattr("codetr.cli.main", fake_cli)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "stale.tsv").write_text("old")
    code = train_stage.run(tmp_path / "params.yaml", tmp_path / "train", tmp_path / "m" / "train.json",
                           tmp_path / "plots")
    assert code == 0 and calls == [["train", "-e", str(tmp_path / "params.yaml")]]
    record = json.loads((tmp_path / "m" / "train.json").read_text())
    assert record["ema_chosen"] == 1 and record["val"]["AP"] == 0.25
    assert sorted(p.relative_to(tmp_path / "plots").as_posix() for p in (tmp_path / "plots").rglob("*")
                  if p.is_file()) == ["train/loss.tsv", "val/AP.tsv"]


def test_a_failed_training_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("codetr.cli.main", lambda argv: 2)
    assert train_stage.run(tmp_path / "p.yaml", tmp_path / "train", tmp_path / "m.json", tmp_path / "plots") == 2
    assert not (tmp_path / "m.json").exists()


def test_main_refuses_a_train_folder_the_spec_does_not_train_in(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("results_dir: runs\nprepare: {synthetic: {}}\n")
    ran = []
    monkeypatch.setattr(train_stage, "run", lambda *args: ran.append(args) or 0)
    args = ["--params", "params.yaml", "--metrics", "m.json", "--plots", "plots"]
    assert train_stage.main(args + ["--train", "results/train"]) == 2 and not ran
    err = capsys.readouterr().err
    assert "--train results/train" in err and "runs/train" in err and "params.yaml" in err
    assert train_stage.main(args + ["--train", "runs/train"]) == 0 and len(ran) == 1
    assert train_stage.main(args + ["--train", str(tmp_path / "runs" / "train")]) == 0  # absolute
    (tmp_path / "params.yaml").write_text("results_dir: runs\ntrain: {results_dir: elsewhere}\n")
    assert train_stage.main(args + ["--train", "elsewhere"]) == 0 and len(ran) == 3


def test_plots_left_empty_by_the_csv_fallback_say_why(tmp_path, monkeypatch, capsys):
    """In a git repository without commits the train task logs CSV, not DVCLive: the committed
    plots folder is then empty, and the stage says why instead of staying silent."""
    from codetr.tasks.loggers import build_logger

    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    train_dir = repo / "results" / "train"
    logger = build_logger(str(train_dir), resume=False)  # the CSV fallback
    for step in range(random.randint(1, 5)):
        logger.log_metrics({"train/loss": random.random()}, step=step)
        logger.save()
    logger.finalize("success")
    plots = repo / "results" / "plots" / f"train-{random.randint(0, 999)}"
    capsys.readouterr()
    assert train_stage.copy_plots(train_dir, plots) == 0
    assert plots.is_dir() and not list(plots.iterdir())
    err = capsys.readouterr().err
    assert f"{plots} is left empty" in err and str(train_dir / "csv" / "metrics.csv") in err
    assert "git repository without commits" in err and "git commit" in err


def test_plots_without_any_log_and_with_series(tmp_path, capsys):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    assert train_stage.copy_plots(train_dir, tmp_path / "plots") == 0
    err = capsys.readouterr().err
    assert "is left empty" in err and "logged no DVCLive series" in err and "csv" not in err
    series = train_dir / "dvclive" / "plots" / "metrics" / "train"
    series.mkdir(parents=True)
    n = random.randint(1, 4)
    for i in range(n):
        (series / f"m{i}.tsv").write_text(f"step\tm{i}\n0\t{random.random()}\n")
    assert train_stage.copy_plots(train_dir, tmp_path / "plots") == n
    assert capsys.readouterr().err == ""
