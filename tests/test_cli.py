"""The codetr console script: help, spec printing, exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

from codetr.cli import main
from codetr.spec import load_spec

CODETR = [sys.executable, "-m", "codetr.cli"]


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("codetr")
    assert exe.exists(), "the `codetr` console script is not installed in the venv"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "inference" in out.stdout


@pytest.mark.parametrize("task", ["train", "evaluate", "inference", "spec"])
def test_help_for_each_task(task, capsys):
    with pytest.raises(SystemExit) as ex:
        main([task, "--help"])
    assert ex.value.code == 0
    assert "key=value" in capsys.readouterr().out


def test_spec_prints_resolved_yaml(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("train:\n  num_epochs: 3\n")
    assert main(["spec", "-e", str(spec), "train.optim.lr=1e-4", "model.num_co_heads=2"]) == 0
    out = capsys.readouterr().out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out)
    s = load_spec(resolved)
    assert (s.train.num_epochs, s.train.optim.lr, s.model.num_co_heads) == (3, 1e-4, 2)


def test_spec_defaults_without_file(capsys):
    assert main(["spec"]) == 0
    assert "swin_large_patch4_window7_224" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    ([], "choose a task"),
    (["train"], "experiment_spec_file"),
    (["fly", "-e", "x"], "invalid choice"),
    (["spec", "model.num_queries=5000"], "model.num_queries=5000 is out of range"),
    (["spec", "trainn.seed=3"], "Did you mean 'train'"),
    (["spec", "oops"], "expected key=value"),
    (["train", "-e", "/nonexistent/spec.yaml"], "spec file not found"),
])
def test_usage_and_spec_errors_exit_2_without_traceback(argv, fragment):
    out = subprocess.run(CODETR + argv, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr


def test_runtime_failure_exits_1(tmp_path, monkeypatch):
    """Our own bug (here a forced one) keeps its traceback and exits 1."""
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("codetr.cli.load_spec", broken)
    assert main(["train", "-e", str(tmp_path / "s.yaml")]) == 1


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"not a checkpoint")
    from codetr.data.synthetic import generate
    generate(tmp_path / "data", num_train=0, num_val=0, num_test=2, image_size=64, seed=1)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"results_dir: {tmp_path}/results\ndataset:\n  test_data_sources:\n"
                    f"    image_dir: {tmp_path}/data/test/images\n"
                    f"    json_file: {tmp_path}/data/test/annotations.json\n")
    out = subprocess.run(CODETR + ["evaluate", "-e", str(spec), f"evaluate.checkpoint={bad}"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "model.pth is not a PyTorch checkpoint" in out.stderr
    assert "Traceback" not in out.stderr and "weights_only" not in out.stderr
