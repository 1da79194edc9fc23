"""`codetr.fileio.replace_dir`: a derived folder is swapped whole, never left half-written."""
import os
import secrets

import pytest

from codetr.fileio import replace_dir


def _folder(path, files):
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def _content(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_swaps_the_folder_and_removes_what_a_killed_swap_left(tmp_path):
    target = _folder(tmp_path / "data", {"a": secrets.token_bytes(32)})
    leftover = _folder(tmp_path / ".data.old-4242", {"b": b"x"})  # killed between the two renames
    files = {"c": secrets.token_bytes(64), "d": secrets.token_bytes(8)}
    replace_dir(_folder(tmp_path / "new", files), target)
    assert _content(target) == files and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (tmp_path / "link").symlink_to(target)  # a link (or a file) in the way is replaced, not followed
    replace_dir(_folder(tmp_path / "new2", {"e": b"1"}), tmp_path / "link")
    assert _content(target) == files and not (tmp_path / "link").is_symlink()


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    old = {"a": secrets.token_bytes(16)}
    target = _folder(tmp_path / "data", old)
    new = _folder(tmp_path / "new", {"b": secrets.token_bytes(16)})
    real = os.replace

    def failing(src, dst):
        if os.path.basename(src) == "new":
            raise OSError("simulated failure of the second rename")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="simulated"):
        replace_dir(new, target)
    monkeypatch.undo()
    assert _content(target) == old and new.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "new"]
