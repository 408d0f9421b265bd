"""The data directory's lock: whoever holds it owns the pool (daemon or CLI)."""
from __future__ import annotations

import fcntl
import os


class Locked(Exception):
    def __init__(self, pid: str):
        super().__init__("the data directory is in use by process %s" % (pid or "?"))
        self.pid = pid


def acquire(path: str) -> int:
    """Take the lock (non-blocking); returns its fd.  Raises Locked."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Locked(pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


def release(fd: int) -> None:
    os.close(fd)
