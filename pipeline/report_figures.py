"""The report's figures as PNG/JPEG bytes: matplotlib (Agg, no display) and PIL."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # headless: never touch a display
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

Series = Tuple[List[float], List[float]]  # (x values, y values)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def per_class_bars(names: Sequence[str], ap: Sequence[float], ap50: Sequence[float]) -> bytes:
    """Horizontal bars of AP and AP50 per class (COCO's -1 "undefined" is drawn as 0)."""
    height = max(2.0, 0.45 * len(names) + 1.0)
    fig, ax = plt.subplots(figsize=(6.0, height))
    ys = list(range(len(names)))
    ax.barh([y + 0.2 for y in ys], [max(v, 0.0) for v in ap50], height=0.4, label="AP50",
            color="#9ecae1")
    ax.barh([y - 0.2 for y in ys], [max(v, 0.0) for v in ap], height=0.4, label="AP",
            color="#3182bd")
    ax.set_yticks(ys, labels=list(names))
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("average precision")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def pr_curve(recall: Sequence[float], precision: Sequence[float]) -> bytes:
    """The precision-recall curve (recall on x)."""
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    ax.plot(recall, precision, color="#3182bd")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    return _png(fig)


def curves(series: Dict[str, Series], xlabel: str, ylabel: str, log_y: bool = False,
           vline: Optional[float] = None, vline_label: str = "") -> bytes:
    """Line plot of several named series on one axis; `vline`: a dashed marker at that x."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) <= 30 else None, markersize=3)
    if vline is not None:
        ax.axvline(vline, color="#777", linestyle="--", linewidth=1, label=vline_label or None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y and all(v > 0 for _, ys in series.values() for v in ys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _png(fig)


def image_grid(paths: Sequence[Path], columns: int, cell: int = 256) -> bytes:
    """A JPEG mosaic of the images, each fitted into a `cell` x `cell` square."""
    rows = (len(paths) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, max(rows, 1) * cell), (255, 255, 255))
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = img.convert("RGB")
            # fit the longer side to the cell; small images (128 px) are enlarged without
            # smoothing so that thin box outlines stay sharp
            scale = cell / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.NEAREST if scale > 1 else Image.BILINEAR)
            x = (i % columns) * cell + (cell - img.width) // 2
            y = (i // columns) * cell + (cell - img.height) // 2
            grid.paste(img, (x, y))
    buf = io.BytesIO()
    grid.save(buf, format="JPEG", quality=88)
    return buf.getvalue()
