"""One training per results folder: the second is refused with the holder named; a dead
holder's lock is taken over."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from codetr.tasks.run_lock import LOCK_NAME, RunLock, RunLockedError

HOLD = """
import sys, time
from codetr.tasks.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_naming_the_holder_then_a_killed_holder_frees_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as err:
            with RunLock(tmp_path):
                pass
        message = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message and LOCK_NAME in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the stale file stays, its lock does not
    with RunLock(tmp_path) as lock:
        assert f'"pid": {os.getpid()}' in lock.path.read_text()


def test_lock_is_reentrant_after_release(tmp_path):
    with RunLock(tmp_path):
        pass
    with RunLock(tmp_path):
        pass


def test_ddp_ranks_above_zero_do_not_lock(tmp_path, monkeypatch):
    with RunLock(tmp_path):
        monkeypatch.setenv("LOCAL_RANK", "1")
        with RunLock(tmp_path):  # the rank-0 parent holds it; a child must not deadlock or fail
            pass
