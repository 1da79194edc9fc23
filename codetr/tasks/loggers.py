"""The training logger: DVCLive in `<train_dir>/dvclive`, or CSV in `<train_dir>/csv` where DVCLive
cannot run, both resumable without losing the history a killed run left behind.

- CSV: Lightning's writer deletes an existing `metrics.csv` when it starts and rewrites it in place
  when a new metric key appears; `ResumableCSVLogger` keeps the file on resume and makes that
  rewrite atomic.
- DVCLive writes `dvclive/metrics.json` with a plain `open('w')`, and its resume `json.load`s it
  with no word of which file failed; `repair_dvclive_summary` moves a damaged one aside and rebuilds
  it from the per-metric `.tsv` histories before DVCLive reads it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from codetr.fileio import atomic_write_text


def build_logger(train_dir: str, resume: bool):
    """DVCLive in `<train_dir>/dvclive`; a CSV logger in `<train_dir>/csv` where DVCLive would
    crash (inside a git repository without any commit). `resume` keeps the previous run's history."""
    if _git_without_commits(os.getcwd()):
        _info("notice: DVCLive cannot log inside a git repository without commits; "
              f"logging to {os.path.join(train_dir, 'csv')} instead")
        return ResumableCSVLogger(train_dir, resume=resume, name="csv", version="")
    from dvclive.lightning import DVCLiveLogger

    live_dir = os.path.join(train_dir, "dvclive")
    if resume and rank_zero_only.rank == 0:  # only rank 0 writes (and reads) DVCLive's files
        repair_dvclive_summary(live_dir)
    return DVCLiveLogger(dir=live_dir, dvcyaml=None, save_dvc_exp=False, log_model=False,
                         resume=resume)


def _git_without_commits(cwd: str) -> bool:
    try:
        inside = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=cwd, capture_output=True)
        if inside.returncode != 0:
            return False
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cwd,
                              capture_output=True)
        return head.returncode != 0
    except OSError:  # no git executable: DVCLive will not find a repository either
        return False


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger` whose writer keeps `metrics.csv` when `resume` is true."""

    def __init__(self, save_dir: str, resume: bool, **kwargs: Any) -> None:
        super().__init__(save_dir, **kwargs)
        self._resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> "ResumableExperimentWriter":
        if self._experiment is not None:
            return self._experiment
        os.makedirs(self.root_dir, exist_ok=True)
        self._experiment = ResumableExperimentWriter(self.log_dir, resume=self._resume)
        return self._experiment


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, local files only. On resume it keeps `metrics.csv` (and its column
    order); a write that changes the header replaces the file atomically; rows are appended."""

    def __init__(self, log_dir: str, resume: bool) -> None:
        self._resume = resume  # read by _check_log_dir_exists, which the base __init__ calls
        super().__init__(log_dir)
        if resume:
            self.metrics_keys = self._kept_header()

    def _check_log_dir_exists(self) -> None:
        if not self._resume:  # a fresh run starts a fresh metrics.csv, as in Lightning
            super()._check_log_dir_exists()

    def _kept_header(self) -> List[str]:
        """The columns of the kept file. A last row torn by a kill mid-append is dropped, else the
        next append would glue onto it; a file without a whole header row is moved aside."""
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return []
        try:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
            kept = text[: text.rfind("\n") + 1]  # everything up to the last complete line
            header = next(csv.reader(io.StringIO(kept)), [])
        except (UnicodeDecodeError, csv.Error) as err:
            header, why = [], f"it is not a CSV file ({err})"
        else:
            why = "it has no complete header row"
        if not header:
            aside = _move_aside(path)
            _info(f"notice: {path}: {why}; moved it to {aside} and starting a new one")
            return []
        if kept != text:
            atomic_write_text(path, kept)
            _info(f"notice: {path}: dropped its incomplete last row (the previous run stopped "
                  "while writing it); the rows before it are kept")
        return header

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        path = self.metrics_file_path
        exists = os.path.isfile(path)
        if exists and not new_keys:
            # the common case, after every logging step: a kill tears at most this row, which the
            # next resume drops (_kept_header); a full atomic rewrite here would cost O(rows) each time
            with open(path, "a", encoding="utf-8", newline="") as f:
                csv.DictWriter(f, fieldnames=self.metrics_keys).writerows(self.metrics)
        else:
            rows: List[Dict[str, Any]] = []
            if exists:
                with open(path, encoding="utf-8", newline="") as f:
                    reader = csv.DictReader(f)
                    # restkey None holds the surplus cells of a malformed row: not a column
                    rows = [{k: v for k, v in r.items() if k is not None} for r in reader]
                    self.metrics_keys = sorted(set(self.metrics_keys) | set(reader.fieldnames or ()))
            buf = io.StringIO(newline="")
            writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
            writer.writerows(self.metrics)
            atomic_write_text(path, buf.getvalue())
        self.metrics = []


def repair_dvclive_summary(live_dir: str) -> Optional[str]:
    """Before DVCLive resumes from `live_dir`: a `metrics.json` that is not a JSON object with an
    integer step (DVCLive's resume reads its summary and its `step` from it) is moved aside and
    rebuilt from the `.tsv` histories under `plots/metrics`. Returns where it went, or None."""
    path = os.path.join(live_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        why = f"it is not valid JSON ({err})"
    else:
        step = summary.get("step", 0) if isinstance(summary, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            return None
        why = "it is not a summary with an integer step"
    aside = _move_aside(path)
    rebuilt = summary_from_history(live_dir)
    if rebuilt:
        atomic_write_text(path, json.dumps(rebuilt, indent=4) + "\n")
        how = (f"rebuilt it from the {_count_leaves(rebuilt) - 1} metric histories in "
               f"{os.path.join(live_dir, 'plots', 'metrics')} (step {rebuilt['step']})")
    else:
        how = "no metric history to rebuild it from: DVCLive writes a new one at the next log"
    _info(f"notice: {path}: {why}; moved it to {aside} and {how}")
    return aside


def summary_from_history(live_dir: str) -> Dict[str, Any]:
    """DVCLive's summary (the last value of every metric, nested by the `/` of its name, and the
    latest `step`) read back from `<live_dir>/plots/metrics/**/*.tsv`; {} when there is none."""
    root = Path(live_dir) / "plots" / "metrics"
    summary: Dict[str, Any] = {}
    steps = []
    for tsv in sorted(root.rglob("*.tsv")) if root.is_dir() else ():
        last = _last_complete_row(tsv)
        if last is None:
            continue
        step, value = last
        node = summary
        *parents, leaf = tsv.relative_to(root).with_suffix("").parts
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # a metric and a group of the same name: keep the metric
                break
        else:
            node[leaf] = value
            steps.append(step)
    if steps:
        summary["step"] = max(steps)
    return summary


def _last_complete_row(tsv: Path):
    """(step, value) of the last whole row of a DVCLive metric history, or None."""
    try:
        text = tsv.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # torn by a kill mid-append: its value may be cut short ("0.12" -> "0.1")
    rows = list(csv.DictReader(lines, delimiter="\t"))
    name = tsv.stem
    for row in reversed(rows):
        try:
            return int(row["step"]), _metric_value(row[name])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def _metric_value(text: str):
    """As DVCLive logged it: an int, a float, or a string (it stores nan and inf as strings)."""
    if text is None or text == "":
        raise ValueError("no value")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def _count_leaves(tree: Dict[str, Any]) -> int:
    return sum(_count_leaves(v) if isinstance(v, dict) else 1 for v in tree.values())


def _move_aside(path: str) -> str:
    """Renames a damaged file to `<path>.damaged-<time>` (never over an earlier one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = f"{path}.damaged-{stamp}", 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.damaged-{stamp}-{n}"
    os.replace(path, aside)
    return aside


def _info(message: str) -> None:
    """Prints on the first process only (every DDP process builds the logger)."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)
