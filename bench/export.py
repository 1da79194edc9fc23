"""Latency per image: onnxruntime (the exported file) against PyTorch eager, same process.

Two models, randomly initialised (latency does not depend on the weights):

- `tao`: TAO's default Co-DINO head on a ResNet-50 (4 levels, 900 queries, 6 + 6 layers, hidden
  256) at 640x640;
- `default`: the model of params.yaml at its input size (`export.input_height/width`).

Each model is exported once (as `codetr export` does: TorchScript exporter, onnxslim), then the
two runtimes run the same batch-1 image alternately, `--runs` times each after a warm-up; the
median time of each and their ratio are printed. Both get `--threads` intra-op threads; with one
thread the clock is the process CPU time (robust to other jobs), else wall time.
Both sides run the model as `codetr export`/`evaluate`/`inference` do: folded for eval
(`codetr.model.eval_fold`: BatchNorm into its convolution, fused query projections).
`--ort-levels` also times sessions at the other graph optimisation levels (basic, extended;
the default session is `all`, which adds the layout transforms), same threads.
`--ort-profile` prints onnxruntime's profiler's share of each op type over one run.
`--int8` also times onnxruntime's dynamic int8 quantization (int8 MatMul/Gemm weights) of the
default model. `--quantize SRC DST` writes that quantization of an exported file (metadata kept),
so that `codetr evaluate evaluate.checkpoint=DST` gives its AP change.

    python bench/export.py [--runs 5] [--threads 1] [--models tao,default] [--int8] [--ort-levels]
    python bench/export.py --quantize results/export/codetr_model.onnx /tmp/int8.onnx
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codetr.data.labels import LabelMap  # noqa: E402
from codetr.export.graph import DetectorGraph  # noqa: E402
from codetr.export.onnx_export import export_onnx  # noqa: E402
from codetr.export.onnx_runtime import make_session  # noqa: E402
from codetr.model.builder import build_model  # noqa: E402
from codetr.model.eval_fold import fold_for_eval  # noqa: E402
from codetr.spec import load_spec, spec_from_dict, spec_to_dict  # noqa: E402

TAO = {"backbone": "resnet_50", "num_feature_levels": 4, "return_interm_indices": [1, 2, 3, 4],
       "hidden_dim": 256, "nheads": 8, "enc_layers": 6, "dec_layers": 6, "num_queries": 900,
       "dim_feedforward": 2048, "dec_n_points": 4, "enc_n_points": 4, "num_co_heads": 1,
       "pretrained_backbone_path": None}


def models(names):
    """(name, spec, num_classes, (h, w)) of the requested models."""
    for name in names:
        if name == "tao":
            yield name, spec_from_dict({"model": TAO, "train": {"activation_checkpoint": False}}), 91, (640, 640)
        elif name == "default":
            spec = load_spec(REPO / "params.yaml")
            spec.model.pretrained_backbone_path = None
            yield name, spec, spec.dataset.num_classes, (spec.export.input_height, spec.export.input_width)
        else:
            raise SystemExit(f"unknown model {name!r}: use tao, default")


def quantize(src, dst) -> None:
    """onnxruntime dynamic quantization: int8 weights of MatMul/Gemm, activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


def _run_at_level(path, level: str, threads: int, feeds: dict):
    """A run function of a session like `make_session`'s at graph optimisation `level`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def ort_profile(path, threads: int, feeds: dict, rows: int = 10) -> str:
    """onnxruntime's profile of one run (after a warm-up): ms and share per op type."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="codetr-ort-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    last_run = nodes[len(nodes) // 2:]  # the second of the two runs
    per_op: dict[str, float] = {}
    for e in last_run:
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3
    total = sum(per_op.values())
    lines = [f"    {'op type':20s} {'ms':>9s} {'share':>6s}"]
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"    {op:20s} {ms:9.1f} {100 * ms / total:5.1f}%")
    return "\n".join(lines)


def alternate(fns: dict[str, Callable[[], object]], runs: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (one warm-up call each)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(name: str, spec, num_classes: int, size: tuple[int, int], args, tmp: Path) -> None:
    """Exports one model into `tmp`, times eager against onnxruntime and prints the rows."""
    h, w = size
    torch.manual_seed(0)
    model = build_model(spec, num_classes, load_pretrained_backbone=False).eval()
    fold_for_eval(model)
    label_map = LabelMap(tuple(range(1, num_classes)), tuple(f"c{i}" for i in range(1, num_classes)),
                         False, num_classes)
    path = tmp / f"{name}.onnx"
    start = time.perf_counter()
    export_onnx(model, path, label_map=label_map, spec_data=spec_to_dict(spec), weights="model",
                height=h, width=w)
    export_s = time.perf_counter() - start
    session = make_session(path, threads=args.threads)
    graph = DetectorGraph(model)
    image = torch.randn(1, 3, h, w)
    feeds = {"images": image.numpy()}

    def eager():
        with torch.no_grad():
            graph(image)

    fns = {"pytorch eager": eager, "onnxruntime": lambda: session.run(None, feeds)}
    if args.ort_levels:
        for level in ("basic", "extended"):
            fns[f"onnxruntime {level}"] = _run_at_level(path, level, args.threads, feeds)
    if args.int8 and name == "default":
        quantize(path, tmp / "int8.onnx")
        int8 = make_session(tmp / "int8.onnx", threads=args.threads)
        fns["onnxruntime int8"] = lambda: int8.run(None, feeds)
    # One thread: both runtimes compute on this thread (onnxruntime with one intra-op thread
    # runs on the caller's), so the process CPU time is robust to other jobs on the machine.
    clock = time.process_time if args.threads == 1 else time.perf_counter
    result = alternate(fns, args.runs, clock)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {spec.model.backbone}, {spec.model.num_queries} queries, {h}x{w}, {params:.1f}M "
          f"params, export {export_s:.0f} s, file {path.stat().st_size / 2**20:.1f} MiB")
    for k, v in result.items():
        print(f"  {k:20s} {1000 * v:9.1f} ms/image  ({v / result['pytorch eager']:.2f}x eager)")
    if args.ort_profile:
        print(f"  onnxruntime profile of one run (wall time in kernels):\n{ort_profile(path, args.threads, feeds)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="tao,default")
    parser.add_argument("--int8", action="store_true", help="also time int8 dynamic quantization")
    parser.add_argument("--ort-profile", action="store_true",
                        help="print onnxruntime's own profile of one run: time per op type")
    parser.add_argument("--ort-levels", action="store_true",
                        help="also time sessions at graph optimisation levels basic and extended")
    parser.add_argument("--quantize", nargs=2, metavar=("SRC", "DST"), help="only write DST = int8(SRC)")
    args = parser.parse_args()
    if args.quantize:
        quantize(*args.quantize)
        print(f"wrote {args.quantize[1]}")
        return 0
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, runs {args.runs}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="codetr-bench-export-") as tmp:  # ~200 MB of graphs
        for name, spec, num_classes, size in models(args.models.split(",")):
            measure(name, spec, num_classes, size, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
