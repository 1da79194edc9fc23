"""Atomic file writes: a crash never leaves a half-written output or "latest" file behind."""
from __future__ import annotations

import errno
import io
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from codetr.errors import DiskFullError, UnwritableOutputError


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mtime: float | None = None) -> None:
    """Writes `data` to a temporary file next to `path`, fsyncs it, then renames it over `path`.

    `mtime`: the access and modification time the file has from the moment it appears (set on the
    temporary before the rename, so no reader sees another one); None: now.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_free_space(path, len(data))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError as err:
        raise UnwritableOutputError(f"cannot write {path}: {err.strerror}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on the device while writing {path} "
                                f"({len(data) / 2**20:.1f} MiB); free some space there or point "
                                "results_dir elsewhere") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_free_space(path: Path, size: int) -> None:
    """Refuses up front a write that cannot fit (statvfs is cheap; the bytes are in memory)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < size:
        raise DiskFullError(f"not enough space to write {path}: it needs {size / 2**20:.1f} MiB, "
                            f"{free / 2**20:.1f} MiB are free; free some space or point "
                            "results_dir elsewhere")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, mtime: float | None = None) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mtime)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file and a rename."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# `.<target name>.<mkstemp's 8 random characters>.tmp`, exactly what atomic_write_bytes creates:
# mkstemp draws the characters from [a-z0-9_] (tempfile._RandomNameSequence).
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(directory: str | os.PathLike, older_than_s: float = 60.0,
                            recursive: bool = False) -> list[Path]:
    """Deletes the temporary files that killed atomic writes left in `directory`; returns them.

    Only regular files named like `atomic_write_bytes`'s temporaries are touched (no links, no
    other dotfiles). A file modified in the last `older_than_s` seconds is kept: an atomic write
    in progress keeps its temporary's mtime fresh, so only dead writers' files are old. The caller
    must still make sure no other process writes the folder (the train task holds its RunLock).
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    candidates = root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")
    cutoff = time.time() - older_than_s
    removed = []
    for path in sorted(candidates):
        if not _TEMP_NAME.match(path.name):
            continue
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:
                continue
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to delete: housekeeping never stops a run
            continue
        removed.append(path)
    return removed


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves the folder `new` onto `target` (a folder, a file, a link or nothing; same file system).

    The old folder is renamed aside (`.<name>.old-<pid>`), `new` renamed in, and only then is the
    old one deleted, so a failure before the second rename puts the old folder back. A process
    killed between the two renames leaves no `target` and the aside folder; the next call deletes
    such leftovers first (`target` is a derived output that call rebuilds).
    """
    new, target = Path(new), Path(target)
    for stale in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    old = None
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
