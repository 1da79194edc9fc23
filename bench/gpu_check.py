"""The GPU check: one script, one table, for the day a session is lent a GPU (< 6 min on an H200).

Rows (columns: check, config, dtype, ms, max_err, peak_MiB, status, note):

- `msda_ref` / `msda_triton`: multi-scale deformable attention forward + backward at Co-DINO's
  1024x1024 encoder sizes (5 levels, strides 4..64 = 87,296 queries = keys, 8 heads, D 32,
  4 points, batch 1), the `F.grid_sample` reference against `codetr/ops/msda_triton.py`, in
  fp32 / fp16 / bf16. `max_err`: the largest |difference| of the output against the fp32
  reference, relative to its largest |value| (the three gradients' in the note); a Triton row is
  `ok` only when all four are within `TRITON_MAX_ERR` of its dtype.
- `train_step`: a training step (forward with targets, every loss, backward, AdamW) of the
  TAO-sized model (ResNet-50, 4 levels, hidden 256, 6 + 6 layers, 900 queries, one ATSS co-head)
  at batch 2, 800x800, in fp32 and under fp16 / bf16 autocast (fp16 with a GradScaler).
  `ms` per step (median after warm-up), `peak_MiB` = `torch.cuda.max_memory_allocated`; status
  `ok` only when every loss term is finite.
- `ddp_step`: the same step under 2-process DistributedDataParallel (NCCL) when two GPUs exist,
  else skipped.
- `onnxruntime` / `tensorrt`: the model exported as `codetr export` does (`codetr/export`),
  onnxruntime latency, and a TensorRT engine built as `codetr gen_trt_engine` builds it
  (`codetr/export/tensorrt_engine.py`): latency and parity (`max_err` = max |score diff|,
  note = max |box diff| and whether the top-100 labels agree; `ok` only when scores and boxes
  are within `DEPLOY_TOL` = 1e-3 and the top-100 agree up to ties). Skipped with the reason when
  tensorrt does not import or no GPU is visible.

`--dry` runs the same code paths at tiny sizes on the CPU (Triton under `TRITON_INTERPRET=1`,
DDP over gloo); it is what tests/test_gpu_check.py runs. `--json PATH` also writes the rows.

    python bench/gpu_check.py [--dry] [--iters 10] [--json out.json]
"""
from __future__ import annotations

import os
import sys

if "--dry" in sys.argv:  # before torch imports Triton: the interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check_parts import ddp_row, deploy_rows, skip_row  # noqa: E402
from gpu_check_parts import sizes as SIZES  # noqa: E402
from gpu_check_parts import step_setup  # noqa: E402
from msda import make_inputs  # noqa: E402

COLUMNS = ("check", "config", "dtype", "ms", "max_err", "peak_MiB", "status", "note")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# msda_triton `ok` bound on every relative error (output and the three gradients). The kernels
# accumulate in fp32, so what remains is the rounding of inputs and outputs to the dtype (unit
# roundoff fp16 4.9e-4, bf16 3.9e-3) plus summation order; --dry measured 3.9e-7 / 2.8e-4 /
# 5.3e-3. The grid_sample reference in fp16 / bf16 is itself that far off (bf16 location
# gradient 1.3e-1 in --dry), so msda_ref rows are judged finite only: they are the baseline.
TRITON_MAX_ERR = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}


def msda_status(check: str, dtype: str, errs: list[float]) -> str:
    """`ok` / `FAIL` of an msda row from its relative errors (output, then the three gradients)."""
    finite = all(map(math.isfinite, errs))
    return "ok" if finite and (check == "msda_ref" or max(errs) <= TRITON_MAX_ERR[dtype]) else "FAIL"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, iters: int, device: torch.device, warm: bool = False) -> float:
    """Median wall milliseconds of `fn` over `iters` runs (after one warm-up unless `warm`)."""
    if not warm:
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _relative_error(test: torch.Tensor, ref: torch.Tensor) -> float:
    return float((test.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def _triton_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run here, or None (CUDA, or Triton's interpreter)."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as error:  # pragma: no cover - triton ships with torch's CUDA builds
        return f"triton does not import: {error}"
    if device.type == "cuda" or isinstance(tl.standard.sum, InterpretedFunction):
        return None
    return "no CUDA, and Triton was imported without TRITON_INTERPRET=1"


def msda_rows(size: dict, device: torch.device, iters: int) -> list[dict]:
    """Reference vs Triton deformable attention, forward + backward, per dtype.

    Inputs are drawn in fp32 and rounded to the dtype; the truth is the fp32 reference on those
    rounded inputs (so input rounding, which moves sampling points across pixel edges where the
    location gradient jumps, is not counted as kernel error). `max_err`: output; note: grads.
    """
    from codetr.ops.msda import multi_scale_deformable_attention_pytorch as reference
    from codetr.ops.msda import multi_scale_deformable_attention_triton as triton_fn

    rows: list[dict] = []
    config = (f"{size['msda_image']}^2 strides 4-64, Nq {size['msda_queries']}, "
              f"{size['msda_heads']}x{size['msda_dim']}, {size['msda_points']} pts")
    torch.manual_seed(0)
    value, shapes, starts, loc, attn = make_inputs(size["msda_image"], size["msda_heads"],
                                                  size["msda_dim"], size["msda_points"], str(device))
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           device=device)

    def run(fn, dtype, compute):
        leaves = [t.detach().to(dtype).to(compute).requires_grad_() for t in (value, loc, attn)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(grad_out.to(dtype).to(compute))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    reason = _triton_reason(device)
    for name, dtype in DTYPES.items():
        truth = run(reference, dtype, torch.float32)
        for check, fn in (("msda_ref", reference), ("msda_triton", triton_fn)):
            if check == "msda_triton" and reason is not None:
                rows.append(skip_row(check, config, name, reason))
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                got = run(fn, dtype, dtype)  # also the warm-up of the timing
                errs = [_relative_error(g, t) for g, t in zip(got, truth)]
                ms = median_ms(lambda: run(fn, dtype, dtype), iters, device, warm=True)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                rows.append({"check": check, "config": config, "dtype": name, "ms": ms,
                             "max_err": errs[0], "peak_MiB": peak,
                             "status": msda_status(check, name, errs),
                             "note": "fwd+bwd; rel. err of grads value/loc/attn "
                                     + "/".join(f"{e:.1e}" for e in errs[1:])})
            except Exception as error:  # a failing path is a row, not the end of the check
                traceback.print_exc(file=sys.stderr)
                rows.append({**skip_row(check, config, name, f"{type(error).__name__}: {error}"),
                             "status": "FAIL"})
    return rows


def train_rows(size: dict, device: torch.device, iters: int) -> list[dict]:
    """Training steps of the TAO-sized model in fp32 and under fp16 / bf16 autocast."""
    rows = []
    for name, dtype in DTYPES.items():
        config = f"{size['model_name']}, batch {size['batch']} @ {size['image']}^2"
        try:
            step, reset = step_setup(size, device, None if name == "fp32" else dtype)
            losses = step()  # compile / autotune / first-touch
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = median_ms(lambda: losses.update(step()), iters, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            finite = all(math.isfinite(v) for v in losses.values())
            rows.append({"check": "train_step", "config": config, "dtype": name, "ms": ms,
                         "max_err": None, "peak_MiB": peak, "status": "ok" if finite else "FAIL",
                         "note": f"{len(losses)} loss terms {'all finite' if finite else 'NOT finite'}"})
            reset()
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            rows.append({**skip_row("train_step", config, name, f"{type(error).__name__}: {error}"),
                         "status": "FAIL"})
    return rows


def _fmt(value, scientific: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if scientific else f"{value:.1f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows (one header, one line per row)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row["check"], row["config"], row["dtype"], _fmt(row["ms"]),
                 _fmt(row["max_err"], scientific=True), _fmt(row["peak_MiB"]), row["status"],
                 row["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def save_progress(new: list[dict], rows: list[dict], path: Path | None, section: str,
                  seconds: float) -> None:
    """After each section: its rows on stderr, and all rows so far written to `path` atomically.

    The lent GPU's time is scarce: a check stopped by its timeout still leaves the finished
    sections' rows in the JSON file and their lines in the log.
    """
    for row in new:
        print(f"[gpu_check {seconds:.0f} s] {row['check']} {row['dtype']}: {row['status']}, "
              f"ms {_fmt(row['ms'])}, max_err {_fmt(row['max_err'], scientific=True)}, "
              f"{row['note']}", file=sys.stderr, flush=True)
    print(f"[gpu_check {seconds:.0f} s] section {section} done", file=sys.stderr, flush=True)
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per row")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip", default="", help="comma list of msda,train,ddp,deploy")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("error: no CUDA device visible; use --dry for the CPU smoke run", file=sys.stderr)
        return 2
    size = SIZES(args.dry)
    iters = args.iters or (1 if args.dry else 10)
    device = torch.device("cpu" if args.dry else "cuda")
    torch.set_num_threads(1 if args.dry else torch.get_num_threads())
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    rows: list[dict] = []
    sections = {"msda": lambda: msda_rows(size, device, iters),
                "train": lambda: train_rows(size, device, iters),
                "ddp": lambda: [ddp_row(size, args.dry, iters)],
                "deploy": lambda: deploy_rows(size, device, iters)}
    for name, section in sections.items():
        if name not in skip:
            new = section()
            rows += new
            save_progress(new, rows, args.json, name, time.perf_counter() - start)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry else "CPU (dry)"
    print(f"gpu_check on {gpu}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s, "
          f"ms = median of {iters} after a warm-up")
    print(format_table(rows))
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
