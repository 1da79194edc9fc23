"""The training logger resumes without losing the previous run's history: the CSV fallback keeps
metrics.csv (and rewrites it atomically when a column is added), and DVCLive survives a
metrics.json truncated by a kill."""
import csv
import errno
import json
import random
import shutil
import subprocess

import pytest

from codetr.errors import DiskFullError
from codetr.tasks import loggers
from codetr.tasks.loggers import ResumableCSVLogger, build_logger, summary_from_history


@pytest.fixture
def git_without_commits(tmp_path, monkeypatch):
    """The CSV fallback's condition: the working directory is a git repository with no commit."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    return repo


def _rows(n, keys, first_step):
    return [({k: random.uniform(-10, 10) for k in keys}, first_step + 3 * i) for i in range(n)]


def _log(logger, rows):
    for metrics, step in rows:
        logger.log_metrics(metrics, step=step)
        logger.save()  # what Lightning's logger connector does after every log_metrics
    logger.finalize("success")


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    assert all(len(r) == len(header) for r in body), "a row with a wrong number of cells"
    return [dict(zip(header, r)) for r in body]


def _assert_rows(got, expected):
    assert len(got) == len(expected)
    for row, (metrics, step) in zip(got, expected):
        assert int(row["step"]) == step
        for k, v in metrics.items():
            assert float(row[k]) == v  # Lightning writes repr(float): exact round trip
        assert all(row[k] == "" for k in row if k not in metrics and k != "step")


def _previous_run(train_dir, n):
    """A metrics.csv as Lightning's own CSVLogger leaves it."""
    from lightning.pytorch.loggers import CSVLogger

    old = _rows(n, ["train/loss", "epoch"], first_step=random.randint(0, 50))
    _log(CSVLogger(str(train_dir), name="csv", version=""), old)
    return old


def test_csv_resume_keeps_the_history_and_adds_a_column(git_without_commits, tmp_path, monkeypatch):
    train_dir = tmp_path / "train"
    old = _previous_run(train_dir, random.randint(3, 8))
    writes = []
    real_write = loggers.atomic_write_text
    monkeypatch.setattr(loggers, "atomic_write_text", lambda p, t: (writes.append(p), real_write(p, t)))

    logger = build_logger(str(train_dir), resume=True)
    assert isinstance(logger, ResumableCSVLogger)
    same_keys = _rows(random.randint(2, 5), ["train/loss", "epoch"], first_step=old[-1][1] + 1)
    new_key = _rows(random.randint(1, 3), ["val/AP", "epoch"], first_step=same_keys[-1][1] + 1)
    _log(logger, same_keys + new_key)

    path = train_dir / "csv" / "metrics.csv"
    _assert_rows(_read_csv(path), old + same_keys + new_key)
    assert writes == [str(path)]  # rows with known keys were appended; the new column, atomic
    assert not list((train_dir / "csv").glob(".*.tmp"))


def test_csv_new_column_failing_to_write_keeps_the_old_file(git_without_commits, tmp_path, monkeypatch):
    train_dir = tmp_path / "train"
    _previous_run(train_dir, random.randint(3, 8))
    path = train_dir / "csv" / "metrics.csv"
    before = path.read_bytes()
    logger = build_logger(str(train_dir), resume=True)
    logger.log_metrics({"val/AP": random.random()}, step=1000)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("codetr.fileio.os.fsync", full_disk)
    with pytest.raises(DiskFullError, match="metrics.csv"):
        logger.save()
    assert path.read_bytes() == before  # Lightning's in-place rewrite would have emptied it
    assert not list(path.parent.glob(".*.tmp"))


def test_csv_resume_drops_a_row_torn_by_a_kill(git_without_commits, tmp_path, capsys):
    train_dir = tmp_path / "train"
    old = _previous_run(train_dir, random.randint(3, 8))
    path = train_dir / "csv" / "metrics.csv"
    torn = f"{random.randint(0, 9)},{random.random()}"[: random.randint(1, 8)]
    path.write_bytes(path.read_bytes() + torn.encode())
    logger = build_logger(str(train_dir), resume=True)
    more = _rows(random.randint(1, 4), ["train/loss", "epoch"], first_step=old[-1][1] + 1)
    _log(logger, more)
    _assert_rows(_read_csv(path), old + more)
    assert f"{path}: dropped its incomplete last row" in capsys.readouterr().out


def test_csv_without_resume_starts_fresh(git_without_commits, tmp_path):
    train_dir = tmp_path / "train"
    _previous_run(train_dir, random.randint(3, 8))
    logger = build_logger(str(train_dir), resume=False)
    new = _rows(random.randint(1, 4), ["train/loss"], first_step=0)
    _log(logger, new)
    _assert_rows(_read_csv(train_dir / "csv" / "metrics.csv"), new)


def _dvclive_run(train_dir, resume):
    """A run's DVCLive history: per-step train metrics and per-epoch validation. sync=True: what
    the DVCLive logger passes itself when Lightning's loops call it (it inspects the stack)."""
    logger = build_logger(str(train_dir), resume=resume)
    step = random.randint(1, 20)
    for epoch in range(random.randint(2, 4)):
        for _ in range(random.randint(2, 4)):
            step += random.randint(1, 10)
            logger.log_metrics({"train/loss": random.uniform(0, 5), "epoch": epoch}, step=step,
                               sync=True)
        logger.log_metrics({"val/AP": random.random(), "val/raw/AP": random.random(),
                            "epoch": epoch}, step=step, sync=True)
    logger.finalize("success")
    return step


def test_dvclive_resume_survives_a_truncated_summary(tmp_path, capsys):
    train_dir = tmp_path / "train"
    last_step = _dvclive_run(train_dir, resume=False)
    metrics = train_dir / "dvclive" / "metrics.json"
    intact = json.loads(metrics.read_text())
    assert intact["step"] == last_step
    assert summary_from_history(str(train_dir / "dvclive")) == intact
    text = metrics.read_text()
    metrics.write_text(text[: random.randint(0, len(text.rstrip()) - 1)])  # cut by a kill
    truncated = metrics.read_bytes()

    logger = build_logger(str(train_dir), resume=True)
    live = logger.experiment
    assert live.summary == intact
    assert live.step == last_step + 1  # what DVCLive resumes to from an intact metrics.json
    asides = list(metrics.parent.glob("metrics.json.damaged-*"))
    assert len(asides) == 1 and asides[0].read_bytes() == truncated
    out = capsys.readouterr().out
    assert str(metrics) in out and str(asides[0]) in out

    loss = random.uniform(0, 5)
    logger.log_metrics({"train/loss": loss}, step=last_step + 7, sync=True)
    logger.finalize("success")
    after = json.loads(metrics.read_text())
    assert after["step"] == last_step + 7 and after["train"]["loss"] == loss
    assert after["val"] == intact["val"]  # the last validation is still in the summary
    rows = (train_dir / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[-1].split("\t")[-2:] == [str(last_step + 7), str(loss)]


def test_dvclive_resume_with_only_a_damaged_summary(tmp_path, capsys):
    """The reviewer's case (/tmp/review_io/t4.py): a cut metrics.json and no history."""
    live_dir = tmp_path / "train" / "dvclive"
    live_dir.mkdir(parents=True)
    (live_dir / "metrics.json").write_text('{"step": %d, "train' % random.randint(1, 99))
    live = build_logger(str(tmp_path / "train"), resume=True).experiment
    assert live.summary == {} and live.step == 0
    assert not (live_dir / "metrics.json").exists()
    assert "no metric history" in capsys.readouterr().out


def test_dvclive_resume_leaves_an_intact_summary_alone(tmp_path):
    train_dir = tmp_path / "train"
    last_step = _dvclive_run(train_dir, resume=False)
    metrics = train_dir / "dvclive" / "metrics.json"
    before = metrics.read_bytes()
    live = build_logger(str(train_dir), resume=True).experiment
    assert live.step == last_step + 1
    assert metrics.read_bytes() == before
    assert not list(metrics.parent.glob("metrics.json.damaged-*"))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_without_commits_is_detected(git_without_commits, tmp_path):
    assert loggers._git_without_commits(str(git_without_commits))
    assert not loggers._git_without_commits(str(tmp_path))
