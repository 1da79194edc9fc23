"""The training logger avoids DVCLive's harmful defaults (shared/reference/pipeline-notes.md):
`dvcyaml="dvc.yaml"` rewrites the pipeline's dvc.yaml, `save_dvc_exp=True` makes experiment refs
outside `dvc exp run`, `log_model=True` copies the best checkpoint into dvclive/artifacts."""
import random
import secrets
import subprocess

import pytest

from codetr.tasks import loggers
from codetr.tasks.loggers import ResumableCSVLogger, build_logger

SAFE = {"dvcyaml": None, "save_dvc_exp": False, "log_model": False}
GIT_WITHOUT_COMMITS = loggers._git_without_commits


@pytest.fixture
def recorded(monkeypatch):
    """DVCLiveLogger replaced by a recorder of its arguments; git says "a repository with commits"."""
    calls = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            calls.append((args, kwargs))

    monkeypatch.setattr("dvclive.lightning.DVCLiveLogger", Recorder)
    monkeypatch.setattr(loggers, "_git_without_commits", lambda cwd: False)
    return Recorder, calls


def test_dvclive_is_built_with_the_safe_arguments(recorded, tmp_path):
    recorder, calls = recorded
    train_dir = tmp_path / f"run-{secrets.token_hex(4)}"
    resume = random.choice([True, False])
    logger = build_logger(str(train_dir), resume=resume)
    assert isinstance(logger, recorder) and len(calls) == 1
    args, kwargs = calls[0]
    assert args == () and kwargs == {**SAFE, "dir": str(train_dir / "dvclive"), "resume": resume}


def test_no_dvclive_in_a_repository_without_commits(recorded, tmp_path, monkeypatch):
    _, calls = recorded
    monkeypatch.setattr(loggers, "_git_without_commits", GIT_WITHOUT_COMMITS)  # the real check
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    logger = build_logger(str(repo / "results" / "train"), resume=random.choice([True, False]))
    assert isinstance(logger, ResumableCSVLogger) and calls == []


def test_the_real_logger_with_these_arguments_leaves_dvc_files_alone(tmp_path, monkeypatch):
    """Logged through the real DVCLiveLogger, outside git: DVCLive's default would add metrics and
    plots to this dvc.yaml (it does so outside git too); no artifacts copy either."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loggers, "_git_without_commits", lambda cwd: False)
    dvc_yaml = tmp_path / "dvc.yaml"
    text = f"stages: {{}}  # {secrets.token_hex(8)}\n"
    dvc_yaml.write_text(text)
    logger = build_logger(str(tmp_path / "train"), resume=False)
    for step in range(random.randint(1, 4)):
        logger.log_metrics({"train/loss": random.random()}, step=step)
    logger.finalize("success")
    assert (tmp_path / "train" / "dvclive" / "metrics.json").is_file()
    assert dvc_yaml.read_text() == text
    assert not (tmp_path / "train" / "dvclive" / "artifacts").exists()
    assert list(tmp_path.rglob("dvc.yaml")) == [dvc_yaml]
