"""`codetr export`: an ONNX file of `export.checkpoint`, checked against PyTorch eager.

Writes `export.onnx_file` (default `<results_dir>/export/codetr_model.onnx`) and, in
`spec.task_results_dir("export")`, `experiment_spec.yaml` and `export_report.json`: the file, its
size in bytes, opset, input/output names and shapes, the onnxruntime vs PyTorch parity on random
images (`export.verify`) and the onnxruntime latency per image (`export.latency_runs`).

The graph contract is `codetr.export.graph`'s: `images [B, 3, input_height, input_width]`
normalised whole images -> `pred_logits`, `pred_boxes` (or, with `export.postprocess`, the
top `model.num_select` `scores`, `labels`, `boxes` given `orig_sizes`). `batch_size: -1` gives
a dynamic batch axis; verification then runs batches of 1 and 3 through the one file.
The parity is measured on the query selection the graph made (`codetr.export.parity`: proposals
tied within float noise may be ranked either way) and the swapped ranks are checked to be ties.
`on_cpu` is accepted for TAO compatibility: the graph always uses standard ONNX ops (GridSample),
which every runtime (onnxruntime, TensorRT) runs without a plugin.
"""
from __future__ import annotations

import json
import os
import time

import torch

from codetr.fileio import atomic_write_text
from codetr.spec import ExperimentSpec, SpecError, spec_to_dict
from codetr.spec.load import save_spec
from codetr.tasks.runtime import ensure_writable_dir

# onnxruntime and PyTorch compute in float32 with different kernels and summation orders;
# 1e-3 on sigmoid scores and normalised boxes is the bound (a box off by 1e-3 of the
# image side is about half a pixel at 640).
TOLERANCE = 1e-3


def default_onnx_file(spec: ExperimentSpec) -> str:
    """`export.onnx_file`, or `<export results dir>/codetr_model.onnx` when unset."""
    return spec.export.onnx_file or os.path.join(spec.task_results_dir("export"), "codetr_model.onnx")


def run(spec: ExperimentSpec) -> int:
    """Exports `export.checkpoint`; returns the exit status (0)."""
    from codetr.export.onnx_export import export_onnx
    from codetr.export.onnx_runtime import make_session
    from codetr.export.parity import detections_parity, onnx_parity
    from codetr.model.eval_fold import fold_for_eval
    from codetr.tasks.checkpoint import require_checkpoint_file, restore_detector
    from codetr.tasks.spec_drift import reconcile_with_checkpoint

    cfg = spec.export
    if not cfg.checkpoint:
        raise SpecError("export.checkpoint is required: the .pth to export, e.g. "
                        "export.checkpoint=<results_dir>/train/codetr_model.pth")
    onnx_file = default_onnx_file(spec)
    if not onnx_file.lower().endswith(".onnx"):
        raise SpecError(f"export.onnx_file={onnx_file} must end in .onnx (evaluate and inference "
                        "recognise ONNX files by that extension)")
    out_dir = spec.task_results_dir("export")
    ensure_writable_dir(out_dir, "export results directory")
    ensure_writable_dir(os.path.dirname(os.path.abspath(onnx_file)), "export.onnx_file directory")
    # An official mmdet / Sense-X file has no stored spec: this run's spec builds its model.
    require_checkpoint_file(cfg.checkpoint, "export.checkpoint")
    model, label_map, stored_spec, which = restore_detector(cfg.checkpoint, "cpu", spec)
    # The graph is the checkpoint's architecture and carries its normalisation, as evaluate runs it.
    spec, notice = reconcile_with_checkpoint(spec, stored_spec, label_map, cfg.checkpoint)
    if notice:
        print(notice)
    save_spec(spec, out_dir)
    fold_for_eval(model)  # a smaller graph; same outputs within 1e-5 (tests/test_eval_fold.py)
    height, width = cfg.input_height, cfg.input_width
    # Written beside the target and moved onto it only once verified: a graph that fails the
    # parity check never replaces a good file (it stays as <name>.failed.onnx for inspection).
    staged = _sibling(onnx_file, ".unverified.onnx")
    meta = export_onnx(model, staged, label_map=label_map, spec_data=spec_to_dict(stored_spec),
                       weights=which, height=height, width=width, batch_size=cfg.batch_size,
                       opset_version=cfg.opset_version, detections=cfg.postprocess,
                       num_select=spec.model.num_select, simplify=cfg.simplify, verbose=cfg.verbose)
    session = make_session(staged, "cpu")  # loaded in memory: it stays valid after the move
    report = {
        "onnx_file": onnx_file, "size_bytes": os.path.getsize(staged), "opset_version": cfg.opset_version,
        "inputs": {i.name: i.shape for i in session.get_inputs()},
        "outputs": {o.name: o.shape for o in session.get_outputs()},
        "batch_size": cfg.batch_size, "input_height": height, "input_width": width,
        "postprocess": cfg.postprocess, "simplified": cfg.simplify, "weights": which,
        "input_mean": meta.input_mean, "input_std": meta.input_std,
    }
    batches = [1, 3] if cfg.batch_size == -1 else [cfg.batch_size]
    if cfg.verify:
        generator = torch.Generator().manual_seed(0)
        checks = []
        for batch in batches:
            images = torch.randn(batch, 3, height, width, generator=generator)
            if cfg.postprocess:
                sizes = torch.randint(32, 2048, (batch, 2), generator=generator)
                parity = detections_parity(model, staged, images, sizes, spec.model.num_select, TOLERANCE)
            else:
                parity = onnx_parity(model, staged, images, tolerance=TOLERANCE)
            checks.append(parity.__dict__)
            labels = ("equal" if parity.topk_labels_equal else
                      "equal up to ties" if parity.topk_same_up_to_ties else "DIFFER")
            print(f"onnxruntime vs PyTorch, batch {batch}: max |score diff| {parity.max_score_diff:.2e}, "
                  f"max |box diff| {parity.max_box_diff:.2e}, top-{parity.topk} labels {labels}; "
                  f"query selection: {parity.selection_ranks_differing} ranks swapped between "
                  f"{'tied' if parity.selection_ties_only else 'NOT tied'} proposals")
            if not parity.within():
                failed = _sibling(onnx_file, ".failed.onnx")
                os.replace(staged, failed)
                _write_report(out_dir, dict(report, onnx_file=failed, parity=checks))
                raise RuntimeError(f"the exported graph does not match PyTorch within {TOLERANCE} "
                                   f"(batch {batch}): {parity}; {onnx_file} was not written (the "
                                   f"graph is kept as {failed})")
        report["parity"] = checks
    os.replace(staged, onnx_file)
    print(f"exported {cfg.checkpoint} ({'EMA' if which == 'ema' else 'raw'} weights) to {onnx_file}"
          + (" (verified)" if cfg.verify else ""))
    if cfg.latency_runs:
        report["latency_ms_per_image"] = _latency(session, cfg, height, width)
        print(f"onnxruntime latency: {report['latency_ms_per_image']:.1f} ms per image "
              f"(batch 1, {torch.get_num_threads()} threads, median of {cfg.latency_runs})")
    report["threads"] = torch.get_num_threads()
    _write_report(out_dir, report)
    print(f"export report written to {os.path.join(out_dir, 'export_report.json')}")
    return 0


def _sibling(onnx_file: str, suffix: str) -> str:
    """`<dir>/<name>.onnx` -> `<dir>/<name><suffix>`."""
    return onnx_file[:-len(".onnx")] + suffix


def _latency(session, cfg, height: int, width: int) -> float:
    """Median wall time in ms of `latency_runs` batch-1 runs after one warm-up run."""
    import numpy as np

    feeds = {"images": np.random.default_rng(0).standard_normal((1, 3, height, width), dtype=np.float32)}
    if cfg.postprocess:
        feeds["orig_sizes"] = np.array([[height, width]], dtype=np.int64)
    if cfg.batch_size > 1:
        feeds = {k: np.repeat(v, cfg.batch_size, 0) for k, v in feeds.items()}
    session.run(None, feeds)
    times = []
    for _ in range(cfg.latency_runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / max(1, cfg.batch_size)


def _write_report(out_dir: str, report: dict) -> None:
    atomic_write_text(os.path.join(out_dir, "export_report.json"), json.dumps(report, indent=2))
