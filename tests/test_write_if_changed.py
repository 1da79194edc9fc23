"""`pipeline.stages.write_if_changed`, the per-stage params files of the Snakefile: written
atomically (a unique fsynced temporary file renamed into place), never leaving a temporary file
behind, and safe when several Snakefile parses write at once."""
import os
import secrets
import threading
import time

import pytest

from codetr import fileio
from pipeline.stages import write_if_changed


def _text() -> str:
    return "".join(f'"{secrets.token_hex(4)}": {secrets.randbelow(1000)}\n'
                   for _ in range(1 + secrets.randbelow(20)))


def test_written_atomically_and_dated_by_what_made_the_outputs(tmp_path):
    target = tmp_path / "sub" / "params" / "train.json"  # a missing parent folder is made
    first, second = _text(), _text() + "x"
    assert write_if_changed(target, first, lambda: True) is True
    assert target.read_text() == first and target.stat().st_mtime == 0
    assert write_if_changed(target, second, lambda: False) is True
    assert target.read_text() == second and target.stat().st_mtime > time.time() - 60
    assert sorted(os.listdir(target.parent)) == ["train.json"]  # no `<name>.tmp` beside it
    stamp = secrets.randbelow(10**6) + 1
    os.utime(target, (stamp, stamp))
    assert write_if_changed(target, second, lambda: pytest.fail("asked for unchanged text")) is False
    assert target.stat().st_mtime == stamp


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "prepare.json"
    old = _text()
    write_if_changed(target, old, lambda: False)

    def fail(src, dst):
        raise OSError("simulated failure of the rename")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="simulated failure"):
        write_if_changed(target, old + _text(), lambda: True)
    monkeypatch.undo()
    assert target.read_text() == old and sorted(os.listdir(tmp_path)) == ["prepare.json"]


def test_concurrent_writers_never_collide(tmp_path):
    # the old fixed `<name>.tmp` made one writer's os.replace fail (or move another's half file)
    target = tmp_path / "evaluate.json"
    texts = [_text() + str(i) for i in range(8)]
    errors, start = [], threading.Barrier(len(texts))

    def write(text):
        start.wait()
        try:
            for _ in range(20):
                write_if_changed(target, text, lambda: False)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_text() in texts and sorted(os.listdir(tmp_path)) == ["evaluate.json"]
