"""Stage `report`: self-contained HTML, markdown summary, robustness to missing inputs."""
import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from codetr.errors import InputValueError
from pipeline import report
from pipeline.prepare import run as prepare_run


@pytest.fixture
def outputs(tmp_path):
    """Stage outputs shaped like the real ones, with random values."""
    rng = np.random.default_rng(7)
    prepare_run({"source": "synthetic", "synthetic": {"num_train": 6, "num_val": 3, "num_test": 5,
                                                      "image_size": 64, "seed": 2}}, tmp_path / "data")
    names = ["circle", "square", "triangle", "cross"]
    ev = tmp_path / "results" / "evaluate"
    ev.mkdir(parents=True)
    metrics = {k: float(rng.uniform(0.1, 0.9)) for k in report.METRIC_KEYS}
    metrics["APl"] = -1.0  # COCO's "undefined"
    metrics["per_class"] = [{"category_id": i, "name": n, "AP": float(rng.uniform()),
                             "AP50": float(rng.uniform())} for i, n in zip((3, 7, 11, 20), names)]
    (ev / "metrics.json").write_text(json.dumps(metrics))
    recall = np.linspace(0, 1, 101)
    precision = np.sort(rng.uniform(0, 1, 101))[::-1]
    (ev / "pr_curve.csv").write_text("recall,precision\n" + "".join(
        f"{r:.2f},{p:.6f}\n" for r, p in zip(recall, precision)))
    (ev / "per_class_ap.csv").write_text("name,AP,AP50\n" + "".join(
        f"{c['name']},{c['AP']:.6f},{c['AP50']:.6f}\n" for c in metrics["per_class"]))
    live = tmp_path / "results" / "train" / "dvclive" / "plots" / "metrics"
    (live / "train").mkdir(parents=True)
    (live / "val").mkdir()
    steps = np.arange(1, 41)
    (live / "train" / "loss.tsv").write_text("timestamp\tstep\tloss\n" + "".join(
        f"0\t{s}\t{v:.4f}\n" for s, v in zip(steps, 30 * np.exp(-steps / 20) + rng.uniform(0, 1, 40))))
    (live / "epoch.tsv").write_text("step\tepoch\n" + "".join(
        f"{s}\t{(s - 1) // 10}\n" for s in steps))
    (live / "train" / "loss_giou_dn.tsv").write_text("step\tloss_giou_dn\n1\t0.5\n")
    (live / "val" / "AP.tsv").write_text("step\tAP\n" + "".join(
        f"{s}\t{v:.4f}\n" for s, v in zip(steps[::10], np.linspace(0.1, 0.6, 4))))
    (live / "val" / "raw").mkdir()
    for name, values in (("raw/AP", [0.12, 0.3, 0.55, 0.5]), ("raw/AP50", [0.2, 0.5, 0.8, 0.7]),
                         ("AP50", [0.2, 0.4, 0.7, 0.9])):
        (live / "val" / f"{name}.tsv").write_text(f"step\t{name.split('/')[-1]}\n" + "".join(
            f"{s}\t{v}\n" for s, v in zip(steps[::10], values)))
    for name, values in (("ranked/AP", [0.12, 0.3, 0.55, 0.6]), ("ranked/ema", [0, 1, 0, 1]),
                         ("best/epoch", [1, 2, 3, 4])):
        (live / "val" / name.split("/")[0]).mkdir(exist_ok=True)
        (live / "val" / f"{name}.tsv").write_text(f"step\t{name.split('/')[-1]}\n" + "".join(
            f"{s}\t{v}\n" for s, v in zip(steps[::10], values)))
    ann = tmp_path / "results" / "inference" / "images_annotated"
    ann.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(ann / f"im{i}.jpg")
    (tmp_path / "results" / "metrics").mkdir(parents=True)
    (tmp_path / "results" / "metrics" / "train.json").write_text(json.dumps(
        {"val": {"AP": 0.5}, "val_ema_AP": 0.5, "val_raw_AP": 0.4, "ema_chosen": 1, "steps": 40,
         "epochs": 4, "train_seconds": 81.5,
         "best": {"epoch": 3, "step": 30, "AP": 0.55, "AP50": 0.8, "ema": 0}, "stopped_early": 1}))
    exp = tmp_path / "results" / "export"
    exp.mkdir(parents=True)
    (exp / "export_report.json").write_text(json.dumps({
        "onnx_file": "results/export/codetr_model.onnx", "size_bytes": 3 * 2**20, "opset_version": 17,
        "inputs": {"images": ["batch", 3, 64, 64]}, "latency_ms_per_image": 12.34, "threads": 1,
        "parity": [{"max_score_diff": 2e-5, "max_box_diff": 3e-5}]}))
    params = tmp_path / "params.yaml"
    params.write_text("report:\n  title: Test <run>\n  max_images: 3\n  columns: 2\n"
                      "backbone:\n  source: https://example.com/w.pth\n")
    return tmp_path, metrics


def _run(root):
    return report.run(root / "params.yaml", root / "data", root / "results" / "train",
                      root / "results" / "evaluate", root / "results" / "inference",
                      root / "results" / "report", root / "results" / "export",
                      root / "results" / "metrics" / "train.json")


def test_html_is_self_contained_with_every_section(outputs):
    root, metrics = outputs
    _run(root)
    page = (root / "results" / "report" / "report.html").read_text()
    assert not re.search(r"<script|<link|src=['\"]https?:", page)  # nothing loaded from outside
    assert "Test &lt;run&gt;" in page and "https://example.com/w.pth" in page  # escaped params
    images = re.findall(r"src='data:(image/\w+);base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5  # per-class AP, PR curve, loss, mAP, predictions grid
    for mime, data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[mime] and min(img.size) > 100
    assert f"{metrics['AP']:.3f}" in page and "n/a" in page  # APl = -1 shown as n/a
    assert "not available" not in page
    assert "3 of 5 annotated images" in page
    import hashlib
    digest = hashlib.sha256((root / "params.yaml").read_bytes()).hexdigest()[:12]
    assert f"<td>params_sha256</td><td>{digest}</td>" in page and "<td>runner</td>" in page
    assert "<td>81.5</td>" in page  # the train stage's record
    assert "codetr_model.onnx" in page and "12.3 (1 threads)" in page and "3.0e-05" in page


def test_markdown_summary_and_figure_files(outputs):
    root, metrics = outputs
    written = _run(root)
    out = root / "results" / "report"
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "loss.png", "map.png", "per_class_ap.png", "pr_curve.png", "predictions.jpg"]
    assert set(written) == set((out / "figures").iterdir()) | {out / "report.html", out / "report.md"}
    md = (out / "report.md").read_text()
    assert md.startswith("# Test <run>")
    assert f"| {metrics['AP']:.3f} |" in md
    for c in metrics["per_class"]:
        assert f"| {c['name']} | {c['AP']:.3f} | {c['AP50']:.3f} |" in md
    for fig in ("per_class_ap.png", "pr_curve.png", "loss.png", "map.png", "predictions.jpg"):
        assert f"(figures/{fig})" in md
    with Image.open(out / "figures" / "predictions.jpg") as grid:
        assert grid.size == (2 * 256, 2 * 256)  # 3 images in 2 columns


def test_missing_inputs_give_notes_not_failures(tmp_path):
    (tmp_path / "params.yaml").write_text("report: {}\n")
    report.run(tmp_path / "params.yaml", tmp_path / "no-data", tmp_path / "no-train",
               tmp_path / "no-eval", tmp_path / "no-inf", tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("not available") == len(report.SECTIONS) - 1  # the provenance is always there
    assert "codetr report" in page and "<td>commit</td>" in page


def test_dvclive_reader(outputs):
    root, _ = outputs
    live = report.read_dvclive(root / "results" / "train")
    assert set(live) == {"", "train", "val"}
    steps, values = live["val"]["AP"]
    assert steps == [1.0, 11.0, 21.0, 31.0] and values[-1] == pytest.approx(0.6)
    assert len(live["train"]["loss"][0]) == 40 and "loss_giou_dn" in live["train"]


def test_validation_steps_map_to_completed_epochs():
    epochs = ([1.0, 5.0, 10.0, 11.0, 20.0], [0.0, 0.0, 0.0, 1.0, 1.0])
    assert report.steps_to_epochs(([10.0, 20.0], [0.3, 0.5]), epochs) == ([1.0, 2.0], [0.3, 0.5])


def test_validation_per_epoch_and_the_epoch_of_model_best(outputs):
    root, _ = outputs
    _run(root)
    md = (root / "results" / "report" / "report.md").read_text()
    section = md.split("## Validation per epoch")[1].split("## ")[0]
    assert "| epoch | AP (EMA) | AP50 (EMA) | AP (raw) | AP50 (raw) | ranked | best |" in section
    assert "| 1 | 0.100 | 0.200 | 0.120 | 0.200 | raw 0.120 |  |" in section
    # the train record's best (epoch 3) wins over the series' last best/epoch (4)
    assert "| 3 | 0.433 | 0.700 | 0.550 | 0.800 | raw 0.550 | model_best.pth |" in section
    assert section.count("model_best.pth") == 1 and "(figures/map.png)" in section
    training = md.split("## Training")[1]
    assert "best_epoch | best_AP | stopped_early" in training and "| 3 | 0.55 | 1 |" in training


def test_validation_table_without_ema_or_best_records():
    live = {"val": {"AP": ([9.0, 19.0], [0.2, 0.1]), "AP50": ([9.0, 19.0], [0.4, 0.3])}}
    assert report.report_validation.validation_table(live) == [
        ["epoch", "AP", "AP50", "best"], ["1", "0.200", "0.400", ""], ["2", "0.100", "0.300", ""]]
    assert report.report_validation.validation_table({"train": {}}) is None
    # a resumed run logs an epoch's step twice: the later value is shown once
    live["val"]["AP"] = ([9.0, 19.0, 19.0], [0.2, 0.1, 0.15])
    live["val"]["best/epoch"] = ([9.0, 19.0, 19.0], [1.0, 1.0, 2.0])
    assert report.report_validation.validation_table(live)[1:] == [
        ["1", "0.200", "0.400", ""], ["2", "0.150", "0.300", "model_best.pth"]]


def _live_tsv(tmp_path, body: str):
    tsv = tmp_path / "train" / "dvclive" / "plots" / "metrics" / "train" / "loss2.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text(body)
    return tsv


def test_a_row_cut_by_a_stopped_run_is_skipped_with_a_warning(tmp_path):
    # the report of a run killed while DVCLive appended a row is still wanted: only that row goes
    rng = np.random.default_rng()
    values = rng.uniform(0.1, 5.0, int(rng.integers(1, 8))).round(4).tolist()
    rows = "".join(f"{i}\t{v}\n" for i, v in enumerate(values))
    cut = f"{len(values)}\t{rng.uniform():.4f}"[:int(rng.integers(1, 4))]  # e.g. "7", "7\t", "7\t0"
    tsv = _live_tsv(tmp_path, "step\tloss2\n" + rows + cut)
    with pytest.warns(UserWarning, match=rf"loss2.tsv:{len(values) + 2}: skipped the truncated last"):
        live = report.read_dvclive(tmp_path / "train")
    assert live["train"]["loss2"] == ([float(i) for i in range(len(values))], values)
    tsv.write_text("step\tloss2\n0\t1.5\n1")  # the reviewer's case: a bare TypeError before
    with pytest.warns(UserWarning, match=r"loss2.tsv:3: skipped the truncated last line '1'"):
        assert report.read_dvclive(tmp_path / "train")["train"]["loss2"] == ([0.0], [1.5])


@pytest.mark.parametrize("bad", ["{step}\n", "{step}\tx{value}\n", "\t{value}\n"])
def test_a_bad_complete_row_names_the_file_and_line(tmp_path, bad):
    rng = np.random.default_rng()
    n = int(rng.integers(0, 6))
    rows = "".join(f"{i}\t{rng.uniform():.5f}\n" for i in range(n))
    _live_tsv(tmp_path, "step\tloss2\n" + rows + bad.format(step=n, value=rng.uniform())
              + f"{n + 1}\t{rng.uniform():.5f}\n")
    with pytest.raises(InputValueError, match=rf"loss2.tsv:{n + 2}: column (step|loss2) holds .*not a number"):
        report.read_dvclive(tmp_path / "train")
