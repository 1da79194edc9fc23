"""model_best.pth and early stopping (`codetr/tasks/best_checkpoint.py`) with a scripted val AP.

The COCO evaluation inside the LightningModule is replaced by a script of AP values, so each test
knows which validation improves; the training itself is real (a ~0.8M-parameter Co-DETR, two
64 px images, one optimizer step per epoch).
"""
from types import SimpleNamespace

import pytest
import torch

from codetr.data.synthetic import generate
from codetr.spec import SpecError, spec_from_dict
from codetr.tasks import train
from codetr.tasks.checkpoint import restore_detector
from codetr.tasks.coco_eval import STAT_NAMES
from tests.test_tasks_e2e import tiny_spec_dict


class ScriptedAP:
    """Stands in for `evaluate_coco`: the n-th call returns AP `aps[n]` (AP50 = AP + 0.2)."""

    def __init__(self, aps):
        self.aps, self.calls = list(aps), 0

    def __call__(self, gt, detections, image_ids=None):
        ap = self.aps[self.calls]
        self.calls += 1
        stats = dict.fromkeys(STAT_NAMES, 0.0)
        stats.update(AP=ap, AP50=ap + 0.2)
        return SimpleNamespace(stats=stats)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=2, num_val=1, num_test=1, image_size=64, seed=0, max_objects=2)
    return root


@pytest.fixture
def run(data, tmp_path, monkeypatch):
    """`run(aps, **train_options)`: trains into tmp_path/results with the scripted APs; returns
    (exit code, train folder, the script)."""
    monkeypatch.chdir(tmp_path)  # outside any git repository: DVCLive logs plainly

    def _run(aps, **options):
        script = ScriptedAP(aps)
        monkeypatch.setattr("codetr.tasks.module.evaluate_coco", script)
        spec = spec_from_dict(tiny_spec_dict(data, tmp_path / "results", **options))
        return train.run(spec), _run.train_dir, script
    _run.train_dir = tmp_path / "results" / "train"
    return _run


@pytest.fixture
def saves(monkeypatch):
    """Every checkpoint written: [(file name, its codetr.best record)]."""
    import codetr.tasks.checkpoint as ckpt_module

    written, real = [], ckpt_module.atomic_torch_save

    def spy(obj, path):
        real(obj, path)
        written.append((str(path).rsplit("/", 1)[-1], (obj.get("codetr") or {}).get("best")))
    monkeypatch.setattr(ckpt_module, "atomic_torch_save", spy)
    return written


def _best(path):
    return torch.load(path, weights_only=True)["codetr"]["best"]


def _tsv_values(train_dir, name):
    lines = (train_dir / "dvclive" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    column = lines[0].split("\t").index(name.rsplit("/", 1)[-1])
    return [float(line.split("\t")[column]) for line in lines[1:]]


def test_best_is_written_only_when_the_val_ap_improves(run, saves, capsys):
    code, out, script = run([0.2, 0.1, 0.3, 0.3], num_epochs=4)  # a tie is no improvement
    assert code == 0 and script.calls == 4
    best_writes = [rec for name, rec in saves if name == "model_best.pth"]
    assert [(r["epoch"], r["AP"]) for r in best_writes] == [(1, 0.2), (3, 0.3)]
    assert _best(out / "model_best.pth") == {"epoch": 3, "step": 3, "weights": "raw",
                                             "AP": 0.3, "AP50": pytest.approx(0.5)}
    assert _best(out / "last.pth")["epoch"] == 3  # the best-so-far travels in last.pth too
    # model_best holds the weights of epoch 3 (model_epoch_002.pth is written after that validation)
    best_sd = torch.load(out / "model_best.pth", weights_only=True)["state_dict"]
    epoch3_sd = torch.load(out / "model_epoch_002.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(best_sd[k], v) for k, v in epoch3_sd.items())
    model, _, _, which = restore_detector(out / "model_best.pth")
    assert which == "raw" and not model.training
    log = capsys.readouterr().out
    assert "validation epoch 2 step 2: AP 0.1000 AP50 0.3000 (raw); ranked: raw AP 0.1000; " \
           "best: AP 0.2000 at epoch 1" in log
    assert log.count("validation epoch ") == 4 and log.count("new best val AP") == 2
    assert f"new best val AP 0.3000 (raw weights, epoch 3, step 3): wrote {out / 'model_best.pth'}" in log
    assert "stopped early" not in log  # patience unset: never stops
    assert _tsv_values(out, "val/ranked/AP") == pytest.approx([0.2, 0.1, 0.3, 0.3])
    assert _tsv_values(out, "val/best/epoch") == [1, 1, 3, 3]
    # the same x as Lightning's own val/AP series (from the 2nd validation: DVCLive reads a step
    # of 0, the first one here with one optimizer step per epoch, as "no step" and counts on)
    def steps(name):
        rows = (out / "dvclive" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        return [row.split("\t")[rows[0].split("\t").index("step")] for row in rows[1:]]
    assert steps("val/AP")[1:] == steps("val/best/AP")[1:] == ["1", "2", "3"]


def test_with_ema_the_better_of_raw_and_ema_is_ranked(run):
    # calls alternate ema, raw per validation: ranked AP 0.2 (raw), 0.25 (ema), 0.22 (raw)
    code, out, _ = run([0.1, 0.2, 0.25, 0.15, 0.2, 0.22], num_epochs=3, enable_ema=True,
                       ema={"decay": 0.5})
    assert code == 0
    best = _best(out / "model_best.pth")
    assert (best["epoch"], best["weights"], best["AP"]) == (2, "ema", 0.25)
    ckpt = torch.load(out / "model_best.pth", weights_only=True)
    assert ckpt["codetr"]["weights"] == "ema"  # what the file hands over is what was ranked
    assert torch.load(out / "codetr_model.pth", weights_only=True)["codetr"]["weights"] == "raw"


def test_early_stopping_after_exactly_patience_validations(run, capsys):
    # best at epoch 2; epochs 3 (worse) and 4 (a tie) do not improve: stop after epoch 4
    code, out, script = run([0.3, 0.5, 0.4, 0.5, 0.9, 0.9], num_epochs=6, early_stopping_patience=2)
    assert code == 0 and script.calls == 4
    assert torch.load(out / "codetr_model.pth", weights_only=True)["global_step"] == 4
    assert (out / "model_epoch_003.pth").exists() and not (out / "model_epoch_004.pth").exists()
    last = torch.load(out / "last.pth", weights_only=True)["codetr"]
    assert last["early_stopping"] == {"patience": 2, "stale": 2, "stopped": True}
    assert _best(out / "model_best.pth")["epoch"] == 2
    log = capsys.readouterr().out
    assert ("early stopping after epoch 4: the ranked val AP has not improved for 2 validations "
            "(train.early_stopping_patience: 2); best 0.5000 at epoch 2") in log
    assert "the run stopped early" in log
    # a rerun resumes from last.pth and stops at once: the patience was already spent
    code, _, script = run([0.9], num_epochs=6, early_stopping_patience=2)
    assert code == 0 and script.calls == 0
    assert torch.load(out / "codetr_model.pth", weights_only=True)["global_step"] == 4
    assert "had already gone 2 validations without improvement" in capsys.readouterr().out


def test_resume_continues_the_count_and_keeps_the_better_best(run, saves):
    code, out, _ = run([0.5, 0.1], num_epochs=2, early_stopping_patience=3)
    assert code == 0 and _best(out / "model_best.pth")["AP"] == 0.5
    saves.clear()
    # resumed at epoch 3: 0.3 and 0.2 are worse than the best of the first run; with the count
    # of 1 from last.pth, the third non-improving validation is epoch 4 (not epoch 5's 0.9)
    code, _, script = run([0.3, 0.2, 0.9, 0.9], num_epochs=6, early_stopping_patience=3)
    assert code == 0 and script.calls == 2
    assert "model_best.pth" not in [name for name, _ in saves]
    assert _best(out / "model_best.pth") == {"epoch": 1, "step": 1, "weights": "raw", "AP": 0.5,
                                             "AP50": pytest.approx(0.7)}


class Killed(RuntimeError):
    """The process dies (Lightning turns a KeyboardInterrupt into SystemExit: not used)."""


def test_a_crash_after_a_new_best_never_lets_a_worse_one_replace_it(run, monkeypatch):
    """Killed after model_best.pth (epoch 2) but before that epoch's last.pth: the rerun resumes
    from epoch 1's last.pth, whose record (0.2) is older than the file's (0.5)."""
    import codetr.tasks.checkpoint as ckpt_module

    real = ckpt_module.atomic_torch_save

    def crash_on_second_last(obj, path):
        if str(path).endswith("last.pth") and obj["global_step"] == 2:
            raise Killed("killed")
        real(obj, path)
    monkeypatch.setattr(ckpt_module, "atomic_torch_save", crash_on_second_last)
    with pytest.raises(Killed):
        run([0.2, 0.5], num_epochs=2)
    monkeypatch.setattr(ckpt_module, "atomic_torch_save", real)
    code, out, script = run([0.3], num_epochs=2)
    assert code == 0 and script.calls == 1
    assert _best(out / "model_best.pth")["AP"] == 0.5


def test_the_write_is_atomic(run, monkeypatch):
    """A save that dies mid-write leaves the previous model_best.pth whole and no partial file."""
    import codetr.fileio as fileio

    real_fsync, calls = fileio.os.fsync, []

    def dying_fsync(fd):
        name = fileio.os.readlink(f"/proc/self/fd/{fd}")
        calls.append(name)
        if "model_best" in name and sum("model_best" in c for c in calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)
    monkeypatch.setattr(fileio.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="Input/output"):
        run([0.2, 0.5], num_epochs=2)
    folder = run.train_dir
    assert _best(folder / "model_best.pth")["AP"] == 0.2  # the first best, intact
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_without_validation_model_best_is_the_final_model(run, capsys):
    code, out, script = run([], num_epochs=1, validation_interval=2)
    assert code == 0 and script.calls == 0
    best = torch.load(out / "model_best.pth", weights_only=True)
    final = torch.load(out / "codetr_model.pth", weights_only=True)
    assert best["codetr"]["best"] is None and best["global_step"] == final["global_step"] == 1
    assert all(torch.equal(best["state_dict"][k], v) for k, v in final["state_dict"].items())
    assert "no validation ran" in capsys.readouterr().out


def test_model_best_belongs_to_the_run_in_the_folder(run, capsys):
    code, out, _ = run([0.9], num_epochs=1)
    (out / "last.pth").unlink()  # the next run starts afresh in the same folder
    code, out, _ = run([0.1], num_epochs=1)
    assert code == 0 and _best(out / "model_best.pth")["AP"] == 0.1
    assert "of an earlier run in this folder" in capsys.readouterr().out
    # resumed, but the file is gone: the next validation writes one, though worse than 0.1
    (out / "model_best.pth").unlink()
    code, out, _ = run([0.05], num_epochs=2)
    assert code == 0 and _best(out / "model_best.pth") == {
        "epoch": 2, "step": 2, "weights": "raw", "AP": 0.05, "AP50": pytest.approx(0.25)}
    assert "model_best.pth is missing: the next validation writes it" in capsys.readouterr().out


@pytest.mark.parametrize("value", [-1, 1.5, "two", True])
def test_bad_patience_is_a_spec_error(data, tmp_path, value):
    with pytest.raises(SpecError, match=r"train\.early_stopping_patience"):
        spec_from_dict(tiny_spec_dict(data, tmp_path, early_stopping_patience=value))


def test_patience_values_accepted(data, tmp_path):
    for value, expected in ((None, None), (0, 0), (3, 3)):
        spec = spec_from_dict(tiny_spec_dict(data, tmp_path, early_stopping_patience=value))
        assert spec.train.early_stopping_patience == expected
