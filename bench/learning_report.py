"""Tables of the learning bench: AP by training time, the equal-steps view, the cost per model.

Equal steps: the models run different numbers of steps in the same time. `equal_steps` reads
every model's AP at the step counts that the model with the fewest final steps reached at its
marks, by linear interpolation in steps between the two marks around it (each mark records its
step count); a step count before a model's first mark or past its last one is not extrapolated
(None).
"""
from __future__ import annotations

from typing import Optional


def interpolate(marks: list[dict], steps: float, key: str) -> Optional[float]:
    """`key` (AP or AP50) of a model at `steps`, linear between its marks; None outside them."""
    points = [(m["steps"], m[key]) for m in marks]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= steps <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (steps - s0) / (s1 - s0)
    if points and points[-1][0] == steps:
        return points[-1][1]
    if points and points[0][0] == steps:
        return points[0][1]
    return None


def equal_steps(results: dict) -> dict:
    """`{"reference": model, "rows": [{"steps": s, model: {"AP", "AP50"} | None}]}`.

    The reference is the model with the fewest steps at its last mark; the rows are its marks'
    step counts.
    """
    if not results:
        return {"reference": None, "rows": []}
    ref = min(results, key=lambda name: results[name]["marks"][-1]["steps"])
    rows = []
    for m in results[ref]["marks"]:
        row: dict = {"steps": m["steps"]}
        for name, res in results.items():
            ap = interpolate(res["marks"], m["steps"], "AP")
            ap50 = interpolate(res["marks"], m["steps"], "AP50")
            row[name] = None if ap is None else {"AP": round(ap, 4), "AP50": round(ap50, 4)}
        rows.append(row)
    return {"reference": ref, "rows": rows}


def format_tables(results: dict, clock: str = "cpu") -> str:
    """The long table (model, mark, steps, AP, AP50), the equal-steps view and the cost summary."""
    lines = [f"{'model':<15} {'mark_s':>7} {'steps':>6} {'AP':>6} {'AP50':>6}   ({clock} clock)"]
    for name, res in results.items():
        for m in res["marks"]:
            lines.append(f"{name:<15} {m['mark_s']:>7.0f} {m['steps']:>6d} {m['AP']:>6.3f} "
                         f"{m['AP50']:>6.3f}")
    view = equal_steps(results)
    if view["rows"]:
        lines += ["", f"equal steps (at the marks of {view['reference']}, the fewest steps; "
                      "others interpolated linearly in steps): AP / AP50",
                  f"{'steps':>6} " + " ".join(f"{n:>15}" for n in results)]
        for row in view["rows"]:
            cells = [("n/a" if row[n] is None else f"{row[n]['AP']:.3f}/{row[n]['AP50']:.3f}")
                     for n in results]
            lines.append(f"{row['steps']:>6d} " + " ".join(f"{c:>15}" for c in cells))
    lines += ["", f"{'model':<15} {'params_M':>8} {'steps':>6} {'s/step':>7} {'wall_s':>7} "
                  f"{'peak_RSS_MiB':>12}"]
    for name, res in results.items():
        lines.append(f"{name:<15} {res['params_m']:>8.2f} {res['steps']:>6d} "
                     f"{res['s_per_step']:>7.3f} {res.get('wall_s', float('nan')):>7.0f} "
                     f"{res['peak_rss_mib']:>12.0f}")
    return "\n".join(lines)
