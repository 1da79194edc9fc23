"""A killed atomic write leaves `.<name>.<random>.tmp` behind: the train task removes such files
(and nothing else) when it starts, and only while it holds the folder's run lock."""
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

from codetr.fileio import remove_stale_temp_files
from codetr.tasks import train
from codetr.tasks.run_lock import RunLockedError

KILLED_WRITE = """
import os, signal, sys
import codetr.fileio as fileio
# dies between writing the temporary and renaming it, as a preempted run does
fileio.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
fileio.atomic_write_bytes(sys.argv[1], os.urandom(int(sys.argv[2])))
"""

HOLD = """
import sys, time
from codetr.tasks.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _killed_write(target, size):
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target), str(size)])
    assert proc.returncode == -signal.SIGKILL
    temps = list(target.parent.glob(f".{target.name}.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size == size
    return temps[0]


def _age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def _bystanders(folder):
    """Files that look alike but are not atomic_write_bytes' temporaries."""
    names = [".codetr_train.lock", ".hidden", ".last.pth.tmp", ".notes.tmp", "last.pth",
             "x.last.pth.abcdefgh.tmp", ".last.pth.ABCDEFGH.tmp", ".last.pth.abcdefg.tmp"]
    paths = []
    for name in names:
        (folder / name).write_bytes(os.urandom(random.randint(1, 64)))
        paths.append(folder / name)
    (folder / ".dir.abcdefgh.tmp").mkdir()  # a folder, not a file
    paths.append(folder / ".dir.abcdefgh.tmp")
    os.symlink(folder / "last.pth", folder / ".link.abcdefgh.tmp")  # a link: never followed
    paths.append(folder / ".link.abcdefgh.tmp")
    for p in paths:
        _age(p, 3600)
    return paths


def test_only_a_killed_writes_temporary_is_removed(tmp_path):
    target = tmp_path / "last.pth"
    temp = _killed_write(target, random.randint(1, 1 << 20))
    bystanders = _bystanders(tmp_path)
    _age(temp, 3600)
    assert remove_stale_temp_files(tmp_path) == [temp]
    assert not temp.exists()
    assert all(os.path.lexists(p) for p in bystanders)


def test_a_recent_temporary_is_kept(tmp_path):
    """A write in progress keeps its temporary's mtime fresh: it is not a dead writer's."""
    fd, name = tempfile.mkstemp(dir=tmp_path, prefix=".model_epoch_003.pth.", suffix=".tmp")
    os.close(fd)
    assert remove_stale_temp_files(tmp_path, older_than_s=600) == []
    assert os.path.exists(name)
    assert remove_stale_temp_files(tmp_path, older_than_s=0) == [tmp_path / os.path.basename(name)]


def test_subfolders_only_when_recursive(tmp_path):
    sub = tmp_path / "csv"
    sub.mkdir()
    temp = _killed_write(sub / "metrics.csv", random.randint(1, 4096))
    _age(temp, 3600)
    assert remove_stale_temp_files(tmp_path) == []
    assert remove_stale_temp_files(tmp_path, recursive=True) == [temp]
    assert remove_stale_temp_files(tmp_path / "absent") == []


def _fake_spec(train_dir):
    return SimpleNamespace(task_results_dir=lambda task: str(train_dir),
                           train=SimpleNamespace(is_dry_run=False))


def test_train_start_removes_them_under_its_lock(tmp_path, monkeypatch, capsys):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    temps = [_killed_write(train_dir / "last.pth", random.randint(1, 4096)),
             _killed_write(train_dir / "csv" / "metrics.csv", random.randint(1, 4096))]
    for t in temps:
        _age(t, 3600)
    bystanders = _bystanders(train_dir)
    seen = []
    monkeypatch.setattr(train, "_train", lambda spec, d: seen.append(
        [t.exists() for t in temps]) or 0)  # the training itself is not under test
    assert train.run(_fake_spec(train_dir)) == 0
    assert seen == [[False, False]]  # gone before the training started
    assert all(os.path.lexists(p) for p in bystanders)
    out = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in out and all(str(t) in out for t in temps)


def test_train_start_leaves_them_while_another_run_holds_the_folder(tmp_path, monkeypatch):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    temp = _killed_write(train_dir / "last.pth", random.randint(1, 4096))
    _age(temp, 3600)
    monkeypatch.setattr(train, "_train", lambda spec, d: pytest.fail("must not train"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(train_dir)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError):
            train.run(_fake_spec(train_dir))
        assert temp.exists()  # it may be the live run's write in progress
    finally:
        holder.kill()
        holder.wait()
