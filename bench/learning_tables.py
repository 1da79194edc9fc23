"""Markdown tables from learning-bench results: AP by mark, equal steps, the diagnostics.

Reads the JSON of `bench/learning.py` and, for models whose run was cut short, its per-model
progress files (`<out stem>.<model>.partial.json`, written after every mark), so the tables of a
run stopped by a deadline hold every mark it measured (marked `partial`).

    .venv/bin/python bench/learning_tables.py bench/out/real/person_s0.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_report import equal_steps, interpolate  # noqa: E402


def load_results(path: Path, models: list[str] | None = None) -> tuple[dict, dict]:
    """`(results, report)`: finished models from `path`, others from their progress files."""
    report = json.loads(path.read_text()) if path.exists() else {}
    results = dict(report.get("results", {}))
    names = models or (report.get("config", {}).get("models")
                       or sorted(p.name.split(".")[-3] for p in
                                 path.parent.glob(f"{path.stem}.*.partial.json")))
    if models:
        results = {n: results[n] for n in models if n in results}
    for name in names:
        if name in results:
            continue
        partial = path.with_name(f"{path.stem}.{name}.partial.json")
        if partial.exists():
            results[name] = dict(json.loads(partial.read_text()), partial=True)
    return results, report


def _cell(m: dict) -> str:
    return f"{m['AP']:.3f} / {m['AP50']:.3f} ({m['steps']})"


def time_table(results: dict) -> list[str]:
    """Rows: mark seconds; cells: AP / AP50 (steps) per model."""
    names = list(results)
    marks = sorted({m["mark_s"] for r in results.values() for m in r["marks"]})
    lines = ["| training s | " + " | ".join(f"{n} AP / AP50 (steps)"
                                           + (" partial" if results[n].get("partial") else "")
                                           for n in names) + " |",
             "| ---: |" + " --- |" * len(names)]
    for t in marks:
        cells = []
        for n in names:
            hit = [m for m in results[n]["marks"] if m["mark_s"] == t]
            cells.append(_cell(hit[0]) if hit else "")
        lines.append(f"| {t:.0f} | " + " | ".join(cells) + " |")
    return lines


def steps_table(results: dict) -> list[str]:
    """The equal-steps view (`learning_report.equal_steps`)."""
    view = equal_steps(results)
    names = list(results)
    lines = [f"| steps (marks of {view['reference']}) | "
             + " | ".join(f"{n} AP / AP50" for n in names) + " |",
             "| ---: |" + " --- |" * len(names)]
    for row in view["rows"]:
        cells = ["n/a" if row[n] is None else f"{row[n]['AP']:.3f} / {row[n]['AP50']:.3f}"
                 for n in names]
        lines.append(f"| {row['steps']} | " + " | ".join(cells) + " |")
    return lines


def diag_table(results: dict) -> list[str]:
    """Per model and mark: loss groups, supervision per image, encoder-proposal probe."""
    lines = ["| model | mark s | steps | one-to-one | interm | dn | pos | co | gt / img | "
             "co positives / img | enc recall@0.5 | enc AP / AP50 |",
             "| --- | ---: | ---: |" + " ---: |" * 8 + " --- |"]
    for name, res in results.items():
        for m in res["marks"]:
            d = m.get("diag")
            if d is None:
                continue
            g = d["groups"]
            pos = ", ".join(f"{v:.1f}" for k, v in d["counts"].items() if k.startswith("positives"))
            enc = m.get("encoder")
            cells = [f"{g[k]:.3f}" if k in g else "-" for k in ("one_to_one", "interm", "dn",
                                                                  "pos", "co")]
            lines.append(f"| {name} | {m['mark_s']:.0f} | {m['steps']} | " + " | ".join(cells)
                         + f" | {d['counts'].get('gt_per_image', 0):.2f} | {pos or '-'} | "
                         + (f"{enc['recall50']:.3f} | {enc['AP']:.3f} / {enc['AP50']:.3f} |"
                            if enc else "- | - |"))
    return lines


def encoder_steps_table(results: dict) -> list[str]:
    """Encoder-proposal recall@0.5 and AP50 (and the one-to-one loss) at equal steps: the marks
    of the model with the fewest steps among those with the probe, the others interpolated."""
    flat = {}
    for name, res in results.items():
        marks = [{"steps": m["steps"], "recall50": m["encoder"]["recall50"],
                  "AP50": m["encoder"]["AP50"], "o2o": m["diag"]["groups"].get("one_to_one")}
                 for m in res["marks"] if m.get("encoder") and m.get("diag")]
        if marks:
            flat[name] = marks
    if not flat:
        return []
    ref = min(flat, key=lambda n: flat[n][-1]["steps"])
    lines = [f"| steps (marks of {ref}) | "
             + " | ".join(f"{n} enc recall@0.5 / enc AP50 / one-to-one loss" for n in flat) + " |",
             "| ---: |" + " --- |" * len(flat)]
    for m in flat[ref]:
        cells = []
        for n, marks in flat.items():
            vals = [interpolate(marks, m["steps"], k) for k in ("recall50", "AP50", "o2o")]
            cells.append("n/a" if None in vals else " / ".join(f"{v:.3f}" for v in vals))
        lines.append(f"| {m['steps']} | " + " | ".join(cells) + " |")
    return lines


def cost_table(results: dict) -> list[str]:
    lines = ["| model | params M | steps | s / step | wall s | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, res in results.items():
        if res.get("partial"):
            last = res["marks"][-1]
            lines.append(f"| {name} (partial) | | {last['steps']} | "
                         f"{last['train_s'] / max(1, last['steps']):.3f} | {last['wall_s']:.0f} | |")
            continue
        lines.append(f"| {name} | {res['params_m']:.2f} | {res['steps']} | "
                     f"{res['s_per_step']:.3f} | {res['wall_s']:.0f} | {res['peak_rss_mib']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", help="the --out JSON of bench/learning.py")
    parser.add_argument("--models", help="comma list (default: the run's --models)")
    args = parser.parse_args(argv)
    results, report = load_results(Path(args.result),
                                   args.models.split(",") if args.models else None)
    parts = [f"data: {report.get('data')}", ""] + time_table(results) + [""] + steps_table(results)
    parts += [""] + cost_table(results) + [""] + diag_table(results)
    parts += [""] + encoder_steps_table(results)
    text = "\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
