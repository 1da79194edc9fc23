"""Stage `train`: `codetr train -e params.yaml`, then the run's small, diffable record.

The checkpoints and DVCLive logs stay in the cached `results/train` folder, which a fresh clone
does not have. What people diff across commits is written beside it, small and committed to git
(`cache: false` in dvc.yaml), so `dvc metrics diff HEAD~1` and `dvc plots diff HEAD~1` work in a
clone without the cache:

- `<metrics>` (JSON): the last validation of the weights `codetr_model.pth` hands over
  (`val`: AP, AP50, AP75, APs, APm, APl), the AP of both the EMA and the raw weights when EMA is
  on, which of them was chosen (1 = EMA), `best` (the validation `model_best.pth` is from:
  epoch, step, AP, AP50 and `ema` 1/0 for the weights ranked; absent when no validation ran),
  `stopped_early` (1/0, with `train.early_stopping_patience` set), optimizer steps, epochs and
  training seconds. Loss terms are curves, not metrics: they are in the plots.
- `<plots>/`: DVCLive's per-step series (`train/*.tsv` losses and learning rates, `val/*.tsv`
  COCO metrics per epoch of the EMA (`val/`) and raw (`val/raw/`) weights, `val/ranked/` the AP of
  the weights a checkpoint hands over and `val/best/` the best so far with its epoch), copied out
  of `results/train/dvclive/plots/metrics`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

from codetr.errors import InputValueError, UserError
from codetr.fileio import atomic_write_text
from codetr.safe_load import safe_torch_load

FINAL = "codetr_model.pth"
SUMMARY_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def summarise(train_dir: Path, seconds: float) -> Dict[str, Any]:
    """The metrics record of a finished run in `train_dir` (reads `codetr_model.pth`)."""
    ckpt = safe_torch_load(train_dir / FINAL, "the trained model")
    meta = ckpt.get("codetr", {})
    validation = meta.get("validation") or {}
    chosen = meta.get("weights", "raw")
    record: Dict[str, Any] = {}
    if chosen in validation:
        record["val"] = {k: round(float(validation[chosen][k]), 4) for k in SUMMARY_STATS}
    for tag in ("ema", "raw"):
        if tag in validation and len(validation) > 1:
            record[f"val_{tag}_AP"] = round(float(validation[tag]["AP"]), 4)
    if len(validation) > 1:
        record["ema_chosen"] = int(chosen == "ema")
    best = meta.get("best")
    if best:
        record["best"] = {"epoch": int(best["epoch"]), "step": int(best["step"]),
                          "AP": round(float(best["AP"]), 4), "AP50": round(float(best["AP50"]), 4),
                          "ema": int(best["weights"] == "ema")}
    stopping = meta.get("early_stopping") or {}
    if stopping.get("patience"):
        record["stopped_early"] = int(bool(stopping.get("stopped")))
    # The final file is saved after fit: its `epoch` counts the completed epochs.
    record.update(steps=int(ckpt.get("global_step", 0)), epochs=int(ckpt.get("epoch", 0)),
                  train_seconds=round(seconds, 1))
    return record


def copy_plots(train_dir: Path, plots: Path) -> int:
    """Copies DVCLive's step series to `plots`, replacing it as a whole (a sibling folder is
    filled, then renamed over it: an interrupted copy never leaves a partial folder); returns the
    number of series. Without DVCLive series (the train task's CSV fallback, in a git repository
    without commits) `plots` is left empty, with a notice saying why."""
    source = train_dir / "dvclive" / "plots" / "metrics"
    if not source.is_dir():
        print(f"train: notice: {plots} is left empty: {no_series_reason(train_dir)}", file=sys.stderr)
    plots.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=plots.parent, prefix=f".{plots.name}.tmp-"))
    try:
        if source.is_dir():
            shutil.copytree(source, staging, dirs_exist_ok=True)
        old = None
        if plots.exists():
            old = plots.with_name(f".{plots.name}.old-{os.getpid()}")
            os.replace(plots, old)
        os.replace(staging, plots)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return sum(1 for _ in plots.rglob("*.tsv"))


def no_series_reason(train_dir: Path) -> str:
    """Why `train_dir` holds no DVCLive series (`codetr.tasks.loggers.build_logger`'s fallback)."""
    source = train_dir / "dvclive" / "plots" / "metrics"
    csv_file = train_dir / "csv" / "metrics.csv"
    if csv_file.is_file():
        return (f"there is no {source}: the run logged to {csv_file} instead, because DVCLive cannot "
                "log inside a git repository without commits. Commit once (git commit), then rerun "
                "the train stage to get the curves")
    return f"there is no {source} (the train task logged no DVCLive series)"


def check_train_dir(params: Path, train_dir: Path) -> None:
    """Fails before training when `train_dir` is not the folder the spec in `params` trains in
    (`results_dir`/train, or `train.results_dir`): the record would be read from the wrong place.

    Raises:
        InputValueError: naming both folders and how to make them agree.
    """
    from codetr.spec import load_spec

    spec = load_spec(params)
    spec_dir = Path(spec.task_results_dir("train"))
    if spec_dir.resolve() != train_dir.resolve():
        raise InputValueError(
            f"--train {train_dir} is not the folder {params} trains in: {spec_dir} (results_dir "
            f"'{spec.results_dir}' + /train, or train.results_dir); pass --train {spec_dir} or "
            f"change the spec (dvc.yaml declares the stage's output folder too)")


def run(params: Path, train_dir: Path, metrics: Path, plots: Path) -> int:
    """Trains with the codetr CLI, then writes the metrics record and the plots; the exit code."""
    from codetr.cli import main as codetr_main

    start = time.perf_counter()
    code = codetr_main(["train", "-e", str(params)])
    if code != 0:
        return code
    record = summarise(train_dir, time.perf_counter() - start)
    atomic_write_text(metrics, json.dumps(record, indent=2) + "\n")
    count = copy_plots(train_dir, plots)
    print(f"train: {metrics} ({', '.join(f'{k} {v}' for k, v in record.items() if not isinstance(v, dict))}); "
          f"{count} plot series in {plots}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--train", type=Path, default=Path("results/train"), help="codetr's train folder")
    parser.add_argument("--metrics", type=Path, default=Path("results/metrics/train.json"))
    parser.add_argument("--plots", type=Path, default=Path("results/plots/train"))
    args = parser.parse_args(argv)
    try:
        check_train_dir(args.params, args.train)
    except UserError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    return run(args.params, args.train, args.metrics, args.plots)


if __name__ == "__main__":
    sys.exit(main())
