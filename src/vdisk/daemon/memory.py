"""The daemon's memory: its resident size, and giving the heap it freed
back to the kernel.

glibc's malloc keeps what a process frees for its next allocations, and
returns to the kernel only the top of each heap.  A commit frees most of
what it built (its frozen overlay, the dicts and lists of its Python
part), among chunks still in use, so the freed pages stay resident: after
50 GiB of random writes over ten disks of 1 TiB, 55 MiB of the daemon's
264 MiB of anonymous memory was free in malloc's main heap.  Under load
the next commit takes it again, so giving it back after every commit
changed nothing (docs/perf/2026-12-05-heap-given-back.md); once commits
pause it is memory nobody uses.  So the Committer calls `give_back`
(glibc's `malloc_trim`) in its write-out thread when a commit interval
passes without the write cache filling, after commits.  A fixed mmap
threshold (M_MMAP_THRESHOLD) instead still left 25 MiB (at 1 MiB) to
43 MiB (at 4 MiB) free: most of those chunks are smaller.

Concurrency contract: give_back may run in any thread, without the GIL
(ctypes lets it go); malloc_trim locks each heap in turn, so a thread
allocating meanwhile waits for it a moment.  The counters are updated by
one thread at a time (the Committer's write-out thread); status() reads
them from anywhere.
"""
from __future__ import annotations

import ctypes
import os
import time

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc's; absent from musl
    _malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _malloc_trim = None

_PAGE = os.sysconf("SC_PAGE_SIZE")


class Heap:
    """Counts what give_back did: how often, the longest, how much."""

    def __init__(self):
        self.trims = 0
        self.max_seconds = 0.0
        self.given_back = 0  # bytes the resident set shrank by across trims

    def give_back(self) -> int:
        """Return the free pages of malloc's heaps to the kernel; the bytes
        the resident set shrank by (0 where malloc cannot say: not glibc)."""
        if _malloc_trim is None:
            return 0
        before = resident()["anon"]
        t0 = time.monotonic()
        _malloc_trim(0)
        dt = time.monotonic() - t0
        shrank = max(0, before - resident()["anon"])
        self.trims += 1
        self.max_seconds = max(self.max_seconds, dt)
        self.given_back += shrank
        return shrank

    def status(self) -> dict:
        """What `vdisk daemon status` shows under Memory."""
        r = resident()
        return {
            "ResidentMiB": round(r["total"] / (1 << 20), 1),
            "AnonymousMiB": round(r["anon"] / (1 << 20), 1),
            "FileMiB": round(r["file"] / (1 << 20), 1),
            "HeapTrims": self.trims,
            "HeapTrimMsMax": round(self.max_seconds * 1000, 3),
            "HeapGivenBackMiB": round(self.given_back / (1 << 20), 1),
        }


def resident() -> dict:
    """This process's resident memory in bytes: total, anon (its own) and
    file (pages of the files it maps: LMDB's map, the libraries), from
    /proc/self/statm (one read, no parsing of status)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    total, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
    return {"total": total, "file": shared, "anon": total - shared}
