"""One training run per results folder: an advisory lock that names its holder.

Two trainings into one `results_dir` would interleave their logs and overwrite each other's
`last.pth`. The lock is `fcntl.flock` on `<folder>/.codetr_train.lock`: the kernel releases it when
the holder exits in any way (SIGKILL included), so a lock left by a dead run is recognised as
stale by construction and simply taken over. The file holds the holder's pid, host and start
time for the message the second run prints.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from codetr.errors import UserError

LOCK_NAME = ".codetr_train.lock"


class RunLockedError(UserError):
    """Another live process holds the results folder's lock (the message names it)."""


def _is_rank_zero() -> bool:
    """Lightning re-runs the command for DDP ranks > 0: only the first process locks."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


class RunLock:
    """Context manager holding the lock of `folder` for the lifetime of the run.

    Raises:
        RunLockedError: on entry, when another live process holds it.
    """

    def __init__(self, folder: str | os.PathLike, task: str = "training") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.task = task
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, the run proceeds unguarded
            return self
        if not _is_rank_zero():
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"another {self.task} run is using {self.path.parent}: {holder} (lock file "
                f"{self.path}). Wait for it to finish, stop it, or set results_dir to another "
                "folder; a lock of a process that has exited is released by the system") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        """True while this process holds the lock (False on ranks > 0 and without flock)."""
        return self._fd is not None

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (harmless)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"
