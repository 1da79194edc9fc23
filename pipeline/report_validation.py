"""The report's per-epoch validation: one row per validation and the epoch of `model_best.pth`.

Input: DVCLive's series as `pipeline.report.read_dvclive` returns them. With EMA on, `val/AP`
is the EMA and `val/raw/AP` the raw weights; without EMA `val/AP` is the raw weights alone.
`val/ranked/{AP,ema}` (the AP of the weights a checkpoint hands over, 1 = EMA) and
`val/best/epoch` are written by `codetr.tasks.best_checkpoint`; runs from before it lack them, and
the table then has no such columns.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

Series = Tuple[List[float], List[float]]


def _by_step(series: Optional[Series]) -> Dict[float, float]:
    """`{step: value}`; a step logged twice (a resumed run) keeps the later value."""
    return dict(zip(*series)) if series else {}


def epoch_of_steps(steps: List[float], epochs: Optional[Series]) -> List[int]:
    """Completed epochs at each validation step: Lightning logs `epoch` (0-based) at the same
    steps as the metrics, so a validation at step s ends the last epoch logged at a step <= s.
    Without an `epoch` series, validations are numbered 1, 2, ..."""
    if not epochs:
        return list(range(1, len(steps) + 1))
    pairs = sorted(zip(*epochs))
    out = []
    for step in steps:
        before = [e for st, e in pairs if st <= step]
        out.append(int(before[-1] if before else 0) + 1)
    return out


def best_epoch(live: Dict[str, Dict[str, Series]], train_record: Optional[dict]) -> Optional[int]:
    """The epoch `model_best.pth` is from: the train stage's record, else the last logged
    `val/best/epoch`; None when neither says."""
    best = (train_record or {}).get("best")
    if best:
        return int(best["epoch"])
    series = live.get("val", {}).get("best/epoch")
    return int(series[1][-1]) if series and series[1] else None


def validation_table(live: Dict[str, Dict[str, Series]],
                     train_record: Optional[dict] = None) -> Optional[List[List[str]]]:
    """Rows of cells (first row = header): epoch, AP/AP50 of each set of weights, the ranked
    weights and their AP, and `model_best.pth` on the best epoch's row. None without val series.

    No step column: DVCLive's step of a validation is Lightning's logging step, one less than the
    optimizer step the log line and `codetr.best` give; the epoch is the same in all three."""
    val = live.get("val", {})
    if "AP" not in val:
        return None
    has_raw = "raw/AP" in val
    columns = [("AP (EMA)" if has_raw else "AP", "AP"), ("AP50 (EMA)" if has_raw else "AP50", "AP50")]
    if has_raw:
        columns += [("AP (raw)", "raw/AP"), ("AP50 (raw)", "raw/AP50")]
    values = {key: _by_step(val.get(key)) for _, key in columns}
    ranked, ranked_ema = _by_step(val.get("ranked/AP")), _by_step(val.get("ranked/ema"))
    steps = sorted(values["AP"])
    epochs = epoch_of_steps(steps, live.get("", {}).get("epoch"))
    best = best_epoch(live, train_record)
    header = ["epoch"] + [title for title, _ in columns]
    if ranked:
        header.append("ranked")
    header.append("best")
    rows = [header]
    for step, epoch in zip(steps, epochs):
        row = [str(epoch)] + [_fmt(values[key].get(step)) for _, key in columns]
        if ranked:
            weights = "ema" if ranked_ema.get(step, 0.0) >= 0.5 else "raw"
            row.append(f"{weights} {_fmt(ranked.get(step))}" if step in ranked else "n/a")
        row.append("model_best.pth" if epoch == best else "")
        rows.append(row)
    return rows


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or value < 0 else f"{value:.3f}"
