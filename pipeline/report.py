"""Stage `report`: one self-contained HTML page and a markdown summary of a pipeline run.

`params.yaml` section `report`: `title`, `max_images` (annotated predictions), `columns` (of the grid).

Reads (each part is optional: a missing input gives a "not available" note, not a failure):
- `<data>/stats.json` (prepare): images and boxes per split and class;
- `<train>/dvclive/plots/metrics/{train,val}/**.tsv` (DVCLive): loss and mAP curves, the
  per-epoch validation table (`pipeline.report_validation`);
- `<evaluate>/metrics.json`, `pr_curve.csv` (recall,precision), `per_class_ap.csv` (name,AP,AP50);
- `<inference>/images_annotated/*` (inference): the first `max_images`, sorted by name;
- `<metrics>/train.json` (train): steps, epochs, training time, the chosen weights, the epoch
  of `model_best.pth` and whether the run stopped early;
- `<export>/export_report.json` (optional `--export`): the ONNX file, size, latency, parity;
- the params file, and the run's origin (`pipeline.provenance`: commit, params hash, runner, command).

Writes `<out>/report.html` (figures embedded as base64 PNG/JPEG, inline CSS, no external
resource), `<out>/report.md` and the figures as files under `<out>/figures/` for the markdown.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from codetr.errors import InputValueError
from codetr.fileio import atomic_write_bytes, atomic_write_text
from pipeline import report_figures, report_validation
from pipeline.params import load_params, section
from pipeline.provenance import provenance

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_csv(path: Path) -> Optional[List[dict]]:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(tsv: Path, line: int, row: dict, column: str) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):  # a short row has None in its missing columns
        raise InputValueError(f"{tsv}:{line}: column {column} holds {row[column]!r}, not a number") from None


def read_dvclive(train_dir: Path) -> Dict[str, Dict[str, report_figures.Series]]:
    """DVCLive step series: `{"train" | "val": {metric: (steps, values)}}`.

    Each `dvclive/plots/metrics/<group>/<name>.tsv` has a `step` column and a `<name>` column.
    DVCLive ends every row it appends with a newline: an unterminated last line is a row cut by a
    run stopped mid-write, skipped with a warning; any other bad row is an InputValueError.
    """
    root = train_dir / "dvclive" / "plots" / "metrics"
    out: Dict[str, Dict[str, report_figures.Series]] = {}
    for tsv in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        group = tsv.relative_to(root).parts[0] if len(tsv.relative_to(root).parts) > 1 else ""
        name = tsv.relative_to(root / group).with_suffix("").as_posix()
        lines = tsv.read_text(encoding="utf-8").splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            warnings.warn(f"{tsv}:{len(lines)}: skipped the truncated last line {lines.pop()!r}", stacklevel=2)
        reader, key = csv.DictReader(lines, delimiter="\t"), name.rsplit("/", 1)[-1]
        rows = [(reader.line_num, r) for r in reader]
        if rows and {"step", key} <= set(reader.fieldnames):
            out.setdefault(group, {})[name] = ([_number(tsv, n, r, "step") for n, r in rows],
                                               [_number(tsv, n, r, key) for n, r in rows])
    return out


def steps_to_epochs(series: report_figures.Series,
                    epochs: report_figures.Series) -> report_figures.Series:
    """Re-indexes a validation series by completed epochs.

    Lightning logs `epoch` (0-based) at the same global steps as the metrics; a validation value
    at step s belongs to the last epoch logged at a step <= s, and is drawn at that epoch + 1.
    """
    return ([float(e) for e in report_validation.epoch_of_steps(list(series[0]), epochs)],
            list(series[1]))


def collect(data_dir: Path, train_dir: Path, evaluate_dir: Path, inference_dir: Path,
            max_images: int, export_dir: Optional[Path] = None) -> dict:
    """Everything the report shows, read from the stage outputs (None where absent)."""
    image_dir = inference_dir / "images_annotated"
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if image_dir.is_dir() else []
    return {"stats": _read_json(data_dir / "stats.json"),
            "metrics": _read_json(evaluate_dir / "metrics.json"),
            "pr": _read_csv(evaluate_dir / "pr_curve.csv"),
            "per_class": _read_csv(evaluate_dir / "per_class_ap.csv"),
            "live": read_dvclive(train_dir),
            "images": images[:max_images], "num_images": len(images),
            "export": _read_json(export_dir / "export_report.json") if export_dir else None}


def make_figures(found: dict, columns: int) -> Dict[str, bytes]:
    """`{file name: bytes}` of the figures that the found inputs allow."""
    figs: Dict[str, bytes] = {}
    if found["per_class"]:
        rows = found["per_class"]
        figs["per_class_ap.png"] = report_figures.per_class_bars(
            [r["name"] for r in rows], [float(r["AP"]) for r in rows], [float(r["AP50"]) for r in rows])
    if found["pr"]:
        figs["pr_curve.png"] = report_figures.pr_curve([float(r["recall"]) for r in found["pr"]],
                                                       [float(r["precision"]) for r in found["pr"]])
    live = found["live"]
    # the total loss only: the ~15 weighted terms (per decoder layer, dn, co-head) would bury it
    losses = {f"{g}/{n}": s for g, series in live.items() for n, s in series.items()
              if n.rsplit("/", 1)[-1] == "loss"}
    if losses:
        figs["loss.png"] = report_figures.curves(losses, "step", "loss", log_y=True)
    # val/ranked and val/best repeat these values: the table shows them, the figure marks the best
    maps = {f"{g}/{n}": s for g, series in live.items() for n, s in series.items()
            if n.rsplit("/", 1)[-1] in ("AP", "AP50", "AP75") and not n.startswith(("ranked/", "best/"))}
    epochs = live.get("", {}).get("epoch")
    if maps and epochs:
        maps = {name: steps_to_epochs(s, epochs) for name, s in maps.items()}
    if maps:
        best = report_validation.best_epoch(live, found.get("train_record")) if epochs else None
        figs["map.png"] = report_figures.curves(maps, "epoch" if epochs else "step",
                                                "mAP (validation)", vline=best,
                                                vline_label="model_best.pth")
    if found["images"]:
        figs["predictions.jpg"] = report_figures.image_grid(found["images"], columns)
    return figs


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, (int, float)) and value < 0) else f"{value:.3f}"


def tables(found: dict) -> Dict[str, List[List[str]]]:
    """The report's tables as rows of cells (first row = header)."""
    out: Dict[str, List[List[str]]] = {}
    if found.get("provenance"):
        out["provenance"] = [["", ""]] + [[k, str(v)] for k, v in found["provenance"].items()]
    run = found.get("train_record")
    if run:
        run = {**run, **{f"best_{k}": v for k, v in (run.get("best") or {}).items() if k in ("epoch", "AP")}}
        keys = [k for k in ("steps", "epochs", "train_seconds", "val_ema_AP", "val_raw_AP", "ema_chosen",
                            "best_epoch", "best_AP", "stopped_early") if k in run]
        out["training"] = [keys, [str(run[k]) for k in keys]]
    per_epoch = report_validation.validation_table(found["live"], run)
    if per_epoch:
        out["validation"] = per_epoch
    m = found["metrics"]
    if m:
        out["metrics"] = [list(METRIC_KEYS), [_fmt(m.get(k)) for k in METRIC_KEYS]]
    if found["per_class"]:
        out["per_class"] = [["class", "AP", "AP50"]] + [
            [r["name"], _fmt(float(r["AP"])), _fmt(float(r["AP50"]))] for r in found["per_class"]]
    if found.get("export"):
        out["export"] = export_table(found["export"])
    stats = found["stats"]
    if stats:
        names = [c["name"] for c in stats.get("categories", [])]
        rows = [[split, str(s["images"]), str(s["empty_images"]), str(s["boxes"])]
                + [str(s["boxes_per_class"].get(n, 0)) for n in names]
                for split, s in stats["splits"].items()]
        out["data"] = [["split", "images", "without objects", "boxes"] + names] + rows
    return out


def export_table(rep: dict) -> List[List[str]]:
    """One row: the ONNX file, its size, input, onnxruntime latency and worst parity figures."""
    parity = rep.get("parity") or []
    worst = (max(max(p["max_score_diff"], p["max_box_diff"]) for p in parity) if parity else None)
    images = rep.get("inputs", {}).get("images", [])
    latency = rep.get("latency_ms_per_image")
    return [["ONNX file", "size (MiB)", "input", "opset", "latency (ms/image)", "max abs diff vs PyTorch"],
            [Path(str(rep.get("onnx_file", "?"))).name, f"{rep.get('size_bytes', 0) / 2**20:.1f}",
             "x".join(str(d) for d in images), str(rep.get("opset_version", "?")),
             "n/a" if latency is None else f"{latency:.1f} ({rep.get('threads', '?')} threads)",
             "n/a" if worst is None else f"{worst:.1e}"]]


def _html_table(rows: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


SECTIONS = (  # (title, table key, figure file)
    ("Run", "provenance", None),
    ("Metrics (test split)", "metrics", None),
    ("Training", "training", None),
    ("AP per class", "per_class", "per_class_ap.png"),
    ("Precision-recall", None, "pr_curve.png"),
    ("Training loss", None, "loss.png"),
    ("Validation per epoch", "validation", "map.png"),
    ("Predictions", None, "predictions.jpg"),
    ("Deployment (ONNX)", "export", None),
    ("Data", "data", None),
)

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:1100px}
body{color:#222}table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:right}th{background:#f0f3f7}td:first-child{text-align:left}
img{max-width:100%}pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:12px}.na{color:#999}"""


def render_html(title: str, found: dict, figs: Dict[str, bytes], tabs: dict, params_text: str) -> str:
    """The self-contained page."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, table, fig in SECTIONS:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if table and table in tabs:
            parts.append(_html_table(tabs[table]))
        if fig and fig in figs:
            mime = "image/jpeg" if fig.endswith(".jpg") else "image/png"
            data = base64.b64encode(figs[fig]).decode("ascii")
            parts.append(f"<img alt='{html.escape(heading)}' src='data:{mime};base64,{data}'>")
        if not ((table and table in tabs) or (fig and fig in figs)):
            parts.append("<p class='na'>not available (the stage output is missing)</p>")
        if fig == "predictions.jpg" and found["images"]:
            parts.append(f"<p>{len(found['images'])} of {found['num_images']} annotated images.</p>")
    parts.append(f"<h2>Parameters</h2><pre>{html.escape(params_text)}</pre></body></html>")
    return "\n".join(parts)


def render_markdown(title: str, figs: Dict[str, bytes], tabs: dict) -> str:
    """The summary: tables inline, figures as files in `figures/`."""
    lines = [f"# {title}", "", "Full report with parameters: [report.html](report.html).", ""]
    for heading, table, fig in SECTIONS:
        if not ((table and table in tabs) or (fig and fig in figs)):
            continue
        lines += [f"## {heading}", ""]
        if table and table in tabs:
            lines += [_md_table(tabs[table]), ""]
        if fig and fig in figs:
            lines += [f"![{heading}](figures/{fig})", ""]
    return "\n".join(lines)


def run(params_file: str | Path, data_dir: str | Path, train_dir: str | Path,
        evaluate_dir: str | Path, inference_dir: str | Path, out_dir: str | Path,
        export_dir: Optional[str | Path] = None, metrics_file: Optional[str | Path] = None) -> List[Path]:
    """Writes report.html, report.md and figures/ into `out_dir`; returns the written paths."""
    params_file, out_dir = Path(params_file), Path(out_dir)
    opts = section(load_params(params_file), "report")
    title = str(opts.get("title", "codetr report"))
    found = collect(Path(data_dir), Path(train_dir), Path(evaluate_dir), Path(inference_dir),
                    int(opts.get("max_images", 12)), Path(export_dir) if export_dir else None)
    found["provenance"] = provenance(params_file, params_file.resolve().parent / "dvc.yaml")
    found["train_record"] = _read_json(Path(metrics_file)) if metrics_file else None
    figs = make_figures(found, int(opts.get("columns", 4)))
    tabs = tables(found)
    written = []
    for name, data in figs.items():
        atomic_write_bytes(out_dir / "figures" / name, data)
        written.append(out_dir / "figures" / name)
    params_text = params_file.read_text(encoding="utf-8")
    atomic_write_text(out_dir / "report.html", render_html(title, found, figs, tabs, params_text))
    atomic_write_text(out_dir / "report.md", render_markdown(title, figs, tabs))
    return written + [out_dir / "report.html", out_dir / "report.md"]


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="prepare's output folder")
    parser.add_argument("--train", required=True, help="train's results folder")
    parser.add_argument("--evaluate", required=True, help="evaluate's results folder")
    parser.add_argument("--inference", required=True, help="inference's results folder")
    parser.add_argument("--export", default=None, help="export's results folder (optional)")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    parser.add_argument("--train-metrics", default=None, help="the train stage's metrics record")
    args = parser.parse_args(argv)
    try:
        paths = run(args.params, args.data, args.train, args.evaluate, args.inference, args.out,
                    args.export, args.train_metrics)
    except ValueError as err:  # InputValueError: a malformed input, named by its file and line
        print(f"report: error: {err}", file=sys.stderr)
        return 1
    print(f"report: wrote {len(paths)} files, open {Path(args.out) / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
