"""`codetr train` as a real process: auto-resume after SIGKILL, and 2-process DDP on the CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from codetr.data.synthetic import generate
from test_tasks_e2e import tiny_spec_dict

REPO = Path(__file__).resolve().parents[1]


def codetr_train(spec: dict, cwd: Path) -> subprocess.Popen:
    path = cwd / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               DVC_NO_ANALYTICS="1")
    # cwd outside any git repository: DVCLive then logs without creating a DVC repository.
    return subprocess.Popen([sys.executable, "-m", "codetr.cli", "train", "-e", str(path)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def all_checkpoints_load(folder: Path) -> list:
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob("*.pth"))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=8, num_val=2, num_test=2, image_size=64, seed=1, max_objects=3)
    return root


@pytest.mark.slow
def test_sigkill_then_auto_resume(tmp_path):
    # 20 steps per epoch: on a fast, quiet machine 4 steps per epoch finished the whole run
    # before the kill arrived (the kill must land mid-run, whatever the machine's speed).
    data = tmp_path / "shapes"
    generate(data, num_train=40, num_val=2, num_test=2, image_size=64, seed=1, max_objects=3)
    spec = tiny_spec_dict(data, tmp_path / "res", num_epochs=3)
    out = tmp_path / "res" / "train"
    proc = codetr_train(spec, tmp_path)
    deadline = time.time() + 300
    while not (out / "model_epoch_000.pth").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    time.sleep(0.2)  # into epoch 1, far from its end (20 steps)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "codetr_model.pth").exists()
    all_checkpoints_load(out)  # nothing half-written at the moment of the kill

    rerun = codetr_train(spec, tmp_path)
    log, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, log
    assert "resuming from" in log and "last.pth" in log
    names = {p.name for p in out.glob("*.pth")}
    assert names == {"model_epoch_000.pth", "model_epoch_001.pth", "model_epoch_002.pth", "last.pth",
                     "codetr_model.pth", "model_best.pth"}
    ckpts = {p.name: torch.load(p, weights_only=True) for p in out.glob("*.pth")}
    assert [ckpts[f"model_epoch_00{i}.pth"]["epoch"] for i in range(3)] == [0, 1, 2]
    assert ckpts["codetr_model.pth"]["global_step"] == 60  # 3 epochs x 20 steps, none lost or repeated
    metrics = json.loads((out / "dvclive" / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and "AP" in metrics["val"]
    ap_rows = (out / "dvclive" / "plots" / "metrics" / "val" / "AP.tsv").read_text().splitlines()
    assert len(ap_rows) - 1 >= 3  # every epoch validated (the killed epoch's row may repeat)


@pytest.mark.slow
def test_two_cpu_processes_ddp(data, tmp_path):
    spec = tiny_spec_dict(data, tmp_path / "ddp", num_epochs=1, num_gpus=2)
    proc = codetr_train(spec, tmp_path)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log
    assert "No GPU found: running on the CPU with 2 processes" in log
    ckpts = all_checkpoints_load(tmp_path / "ddp" / "train")
    final = torch.load(tmp_path / "ddp" / "train" / "codetr_model.pth", weights_only=True)
    assert len(ckpts) == 4 and final["global_step"] == 2  # 8 images / (2 processes x batch 2)
    # model_best.pth from the one validation, written and logged once (by the first process)
    assert final["codetr"]["best"]["epoch"] == 1 and log.count("new best val AP") == 1
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())
