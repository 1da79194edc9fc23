"""Train -> evaluate -> inference with a tiny Co-DETR on tiny generated images (in-process)."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from codetr.data.synthetic import generate
from codetr.errors import UserError
from codetr.spec import SpecError, spec_from_dict
from codetr.tasks import evaluate, inference, train
from codetr.tasks.checkpoint import CheckpointError, model_state_dict, restore_detector
from codetr.tasks.coco_eval import STAT_NAMES
from codetr.tasks.kitti import parse_kitti_line

CATEGORY_IDS = {3, 7, 11, 20}  # the synthetic shapes' (non-contiguous) ids


def tiny_spec_dict(data: Path, results: Path, **train_options) -> dict:
    """A ~0.8M-parameter Co-DETR (efficientvit_b0, hidden 32, 1+1 layers, 10 queries), 64 px."""
    def src(split):
        return {"image_dir": str(data / split / "images"), "json_file": str(data / split / "annotations.json")}
    return {
        "results_dir": str(results),
        "model": {"backbone": "efficientvit_b0", "num_feature_levels": 2, "return_interm_indices": [2, 3],
                  "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "num_queries": 10,
                  "dim_feedforward": 64, "dec_n_points": 2, "enc_n_points": 2, "num_select": 20,
                  "dn_number": 4, "num_co_heads": 1, "co_head_num_convs": 1},
        "dataset": {"train_data_sources": [src("train")], "val_data_sources": [src("val")],
                    "test_data_sources": src("test"),
                    "infer_data_sources": {"image_dir": str(data / "test" / "images")},
                    "num_classes": 21, "contiguous_labels": False, "batch_size": 2, "workers": 0,
                    "augmentation": {"scales": [64], "train_random_resize": [64], "train_random_crop_min": 48,
                                     "train_random_crop_max": 64, "random_resize_max_size": 64,
                                     "test_random_resize": 64, "fixed_padding": False}},
        "train": {"num_epochs": 2, "activation_checkpoint": False,
                  "optim": {"lr": 1e-3, "lr_backbone": 1e-4, "lr_steps": [1], "warmup_steps": 1},
                  **train_options},
        "evaluate": {"checkpoint": str(results / "train" / "codetr_model.pth")},
        "inference": {"checkpoint": str(results / "train" / "codetr_model.pth"), "conf_threshold": 0.0,
                      "input_width": 64, "input_height": 64},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=4, num_val=2, num_test=2, image_size=64, seed=0, max_objects=3)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One 2-epoch EMA training run shared by the tests of this file (cwd outside any git repo,
    where DVCLive logs without initialising a DVC repository)."""
    results = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(results)
        spec = spec_from_dict(tiny_spec_dict(data, results, enable_ema=True, ema={"decay": 0.5}))
        assert train.run(spec) == 0
    return spec, results


def test_training_outputs(trained):
    spec, results = trained
    out = results / "train"
    names = {p.name for p in out.iterdir()}
    assert {"model_epoch_000.pth", "model_epoch_001.pth", "last.pth", "codetr_model.pth",
            "experiment_spec.yaml", "dvclive"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    for path in out.glob("*.pth"):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["codetr"]["label_map"]["category_ids"] == sorted(CATEGORY_IDS)
        assert ckpt["codetr"]["spec"]["model"]["hidden_dim"] == 32 and "ema" in ckpt and "rng" in ckpt
    assert torch.load(out / "model_epoch_001.pth", weights_only=True)["epoch"] == 1
    assert torch.load(out / "codetr_model.pth", weights_only=True)["global_step"] == 4  # 2 x 2 steps
    metrics = json.loads((out / "dvclive" / "metrics.json").read_text())
    assert set(STAT_NAMES) <= set(metrics["val"]) and metrics["epoch"] == 1
    assert (out / "dvclive" / "plots" / "metrics" / "val" / "AP.tsv").read_text().count("\n") == 3


def test_ema_weights_differ_and_are_evaluated(trained):
    _, results = trained
    path = results / "train" / "codetr_model.pth"
    ckpt = torch.load(path, weights_only=True)
    raw = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    ema = ckpt["ema"]["state_dict"]
    assert ckpt["ema"]["updates"] == 4 and set(ema) == set(raw)
    differ = [k for k, v in raw.items() if v.is_floating_point() and not torch.equal(v, ema[k])]
    assert len(differ) > len(raw) // 2
    meta = ckpt["codetr"]
    assert set(meta["validation"]) == {"ema", "raw"} and meta["validations"] == 2
    better = "raw" if meta["validation"]["raw"]["AP"] > meta["validation"]["ema"]["AP"] else "ema"
    assert meta["weights"] == better  # train.ema.final_weights: best
    model, label_map, stored_spec, which = restore_detector(path)
    assert which == better and stored_spec.model.hidden_dim == 32
    for k, v in model.state_dict().items():
        assert torch.equal(v, (ema if better == "ema" else raw)[k]), k
    for forced, expected in (("raw", raw), ("ema", ema)):
        state, which = model_state_dict({**ckpt, "codetr": {**meta, "weights": forced}})
        assert which == forced and all(torch.equal(state[k], expected[k]) for k in expected)
    metrics = json.loads((results / "train" / "dvclive" / "metrics.json").read_text())
    assert set(STAT_NAMES) <= set(metrics["val"]["raw"])  # val_raw/*: DVCLive nests it under val
    assert label_map.name(label_map.label(7)) == "square"


def test_evaluate_writes_metrics(trained, data):
    spec, results = trained
    assert evaluate.run(spec) == 0
    out = results / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(-1.0 <= metrics[k] <= 1.0 for k in STAT_NAMES)
    assert {c["name"] for c in metrics["per_class"]} <= {"circle", "square", "triangle", "cross"}
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= CATEGORY_IDS
    gt_ids = {im["id"] for im in json.loads((data / "test" / "annotations.json").read_text())["images"]}
    assert {d["image_id"] for d in dets} == gt_ids
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 for d in dets)
    pr = (out / "pr_curve.csv").read_text().splitlines()
    assert pr[0] == "recall,precision" and len(pr) == 102
    assert (out / "per_class_ap.csv").read_text().startswith("name,AP,AP50\n")


def test_inference_writes_kitti_and_images(trained, data, tmp_path):
    spec, results = trained
    images = tmp_path / "in"
    (images / "sub dir").mkdir(parents=True)
    src = sorted((data / "test" / "images").glob("*.jpg"))
    Image.open(src[0]).save(images / "sub dir" / "ü odd name (1).jpg")
    Image.open(src[1]).save(images / "a b.png")
    Image.open(src[1]).save(images / "a_b.jpg")  # reduces to the same stem as 'a b.png'
    d = tiny_spec_dict(data, results)
    d["dataset"]["infer_data_sources"] = {"image_dir": [str(images)]}
    d["inference"].update(color_map={"square": "#00ff00"}, outline_width=2, results_dir=str(tmp_path / "inf"))
    assert inference.run(spec_from_dict(d)) == 0
    labels = sorted(p.relative_to(tmp_path / "inf" / "labels").as_posix()
                    for p in (tmp_path / "inf" / "labels").rglob("*.txt"))
    assert labels == ["a%20b.txt", "a_b.txt", "sub%20dir/%C3%BC%20odd%20name%20%281%29.txt"]
    index = json.loads((tmp_path / "inf" / "index.json").read_text())
    assert index["complete"] is True
    by_image = {Path(e["image"]).name: e for e in index["images"]}
    assert by_image["a b.png"]["labels"] == "labels/a%20b.txt"
    assert by_image["a b.png"]["annotated"] == "images_annotated/a%20b.jpg"
    for entry in index["images"]:
        lines = (tmp_path / "inf" / entry["labels"]).read_text().splitlines()
        assert entry["detections"] == len(lines) and (tmp_path / "inf" / entry["annotated"]).is_file()
    lines = [ln for p in (tmp_path / "inf" / "labels").rglob("*.txt") for ln in p.read_text().splitlines()]
    assert lines
    for line in lines:
        obj = parse_kitti_line(line)
        assert obj.name in {"circle", "square", "triangle", "cross"} and 0 <= obj.score <= 1
        assert 0 <= obj.box_xyxy[0] <= obj.box_xyxy[2] <= 64
    annotated = list((tmp_path / "inf" / "images_annotated").rglob("*.jpg"))
    assert len(annotated) == 3 and all(Image.open(p).size == (64, 64) for p in annotated)
    # category_mapping: fold into one group, drop the rest.
    d["inference"].update(category_mapping={"shape": ["square", "circle"]}, color_map={},
                          save_annotated_images=False, results_dir=str(tmp_path / "grouped"))
    d["model"]["soft_nms_enabled"] = True
    assert inference.run(spec_from_dict(d)) == 0
    grouped = [ln for p in (tmp_path / "grouped" / "labels").rglob("*.txt") for ln in p.read_text().splitlines()]
    assert {parse_kitti_line(ln).name for ln in grouped} <= {"shape"}
    assert not (tmp_path / "grouped" / "images_annotated").exists()
    # A rerun into the same folder with one image fewer leaves no output of the removed image.
    (images / "a_b.jpg").unlink()
    assert inference.run(spec_from_dict(d)) == 0
    assert sorted(p.name for p in (tmp_path / "grouped" / "labels").rglob("*.txt")) == [
        "%C3%BC%20odd%20name%20%281%29.txt", "a%20b.txt"]
    (tmp_path / "grouped" / "labels" / "notes.txt").write_text("someone else's file")
    with pytest.raises(UserError, match="notes.txt"):
        inference.run(spec_from_dict(d))


def test_task_errors(trained, data, tmp_path):
    spec, results = trained
    d = tiny_spec_dict(data, results)
    d["evaluate"]["checkpoint"] = None
    with pytest.raises(SpecError, match="evaluate.checkpoint is required"):
        evaluate.run(spec_from_dict(d))
    d["evaluate"]["checkpoint"] = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="evaluate.checkpoint: checkpoint not found"):
        evaluate.run(spec_from_dict(d))
    (tmp_path / "classmap.txt").write_text("square\ncircle\ntriangle\ncross\n")
    d["dataset"]["infer_data_sources"]["classmap"] = str(tmp_path / "classmap.txt")
    with pytest.raises(SpecError, match="classmap"):
        inference.run(spec_from_dict(d))
    (tmp_path / "file").write_text("x")
    d["results_dir"] = str(tmp_path / "file" / "sub")
    with pytest.raises(PermissionError, match="not writable"):
        train.run(spec_from_dict(d))


def _params_only(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_explicit_resume_and_architecture_mismatch(trained, data, tmp_path, monkeypatch):
    _, results = trained
    monkeypatch.chdir(tmp_path)
    first = results / "train" / "model_epoch_000.pth"
    d = tiny_spec_dict(data, tmp_path / "r", resume_training_checkpoint_path=str(first),
                       enable_ema=True, ema={"decay": 0.5})
    assert train.run(spec_from_dict(d)) == 0
    out = tmp_path / "r" / "train"
    assert not (out / "model_epoch_000.pth").exists()  # epoch 0 came from the checkpoint
    last = torch.load(out / "model_epoch_001.pth", weights_only=True)
    assert last["global_step"] == 4 and last["ema"]["updates"] == 4
    d["model"]["hidden_dim"] = 64
    with pytest.raises(CheckpointError, match="another architecture"):
        train.run(spec_from_dict(d))


def test_pretrained_other_num_classes_freeze_bf16(trained, data, tmp_path, monkeypatch, capsys):
    _, results = trained
    monkeypatch.chdir(tmp_path)
    pretrained = results / "train" / "codetr_model.pth"
    d = tiny_spec_dict(data, tmp_path / "p", pretrained_model_path=str(pretrained),
                       freeze=["backbone"], precision="bf16", num_epochs=1)
    d["dataset"].update(num_classes=4, contiguous_labels=True)
    assert train.run(spec_from_dict(d)) == 0
    printed = capsys.readouterr().out
    assert "shape mismatch, skipped" in printed and "frozen: backbone" in printed
    source = torch.load(pretrained, weights_only=True)["ema"]["state_dict"]  # EMA weights are used
    final = torch.load(tmp_path / "p" / "train" / "codetr_model.pth", weights_only=True)["state_dict"]
    final = {k[len("model."):]: v for k, v in final.items() if k.startswith("model.")}
    backbone = [k for k in _params_only(final) if k.startswith("backbone.")]
    assert backbone and all(torch.equal(final[k], source[k]) for k in backbone)  # frozen
    heads = [k for k, v in final.items() if source[k].shape != v.shape]
    assert heads and all(final[k].shape[0] == 4 for k in heads if final[k].dim() >= 1)
    trained_keys = [k for k in _params_only(final) if not k.startswith("backbone.") and k not in heads]
    assert any(not torch.equal(final[k], source[k]) for k in trained_keys)  # the rest trained


class NaNCriterion(torch.nn.Module):
    """The real criterion with one term turned into NaN."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, outputs, targets):
        terms = self.inner(outputs, targets)
        terms["loss_bbox"] = terms["loss_bbox"] * float("nan")
        return terms


class OOMCriterion(torch.nn.Module):
    """Fails like a GPU that ran out of memory."""

    def forward(self, outputs, targets):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _fit_with(criterion_factory, data, tmp_path):
    from codetr.data import build_label_map
    from codetr.model.builder import build_criterion, build_model, build_postprocess
    from codetr.tasks.datamodule import CoDETRDataModule
    from codetr.tasks.runtime import resolve_runtime

    spec = spec_from_dict(tiny_spec_dict(data, tmp_path))
    label_map = build_label_map(spec)
    runtime = resolve_runtime(1, [0], 1, "fp32", "ddp")
    train.fit(spec, build_model(spec, 21), criterion_factory(build_criterion(spec, 21)),
              build_postprocess(spec), CoDETRDataModule(spec, label_map), label_map, runtime,
              str(tmp_path / "train"))


def test_nan_loss_and_oom_stop_with_a_message(data, tmp_path, monkeypatch):
    from codetr.tasks.module import NonFiniteLossError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 0 .*loss_bbox=nan"):
        _fit_with(NaNCriterion, data, tmp_path)
    assert not list((tmp_path / "train").glob("*.pth")) and not list((tmp_path / "train").glob(".*tmp"))
    with pytest.raises(RuntimeError, match="out of memory.*batch_size.*activation_checkpoint"):
        _fit_with(lambda _: OOMCriterion(), data, tmp_path)


@pytest.mark.parametrize("with_val", [True, False])
def test_dry_run_writes_nothing(data, tmp_path, monkeypatch, capsys, with_val):
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec_dict(data, tmp_path / "dry", is_dry_run=True)
    if not with_val:  # fast_dev_run would ask for a val loader even so (it crashed: KeyError 'val')
        spec["dataset"]["val_data_sources"] = []
    assert train.run(spec_from_dict(spec)) == 0
    assert not (tmp_path / "dry").exists() and "dry run" in capsys.readouterr().out
