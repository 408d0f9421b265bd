"""The daemon's memory (vdisk.daemon.memory): freed heap given back to the
kernel, in this very process (glibc's malloc).  The daemon's figures at
scale are measured by scripts/bench --only-memory, not here."""
import ctypes

import pytest

from vdisk.daemon import memory

CHUNK = 96 << 10  # below glibc's mmap threshold: from the heap, not a mapping of its own

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


def test_the_heap_a_burst_freed_goes_back_to_the_kernel():
    """128 MiB of chunks from malloc; every other one is freed: malloc
    keeps their pages (each lies between two chunks still in use, none at
    the heap's top) until give_back returns them.  Straight from libc, so
    that no Python object lands in between."""
    if memory._malloc_trim is None:
        pytest.skip("not glibc: malloc_trim is glibc's")
    chunks = []
    for _ in range((128 << 20) // CHUNK):
        c = _libc.malloc(CHUNK)
        assert c
        ctypes.memset(c, 1, CHUNK)  # its pages touched: resident
        chunks.append(c)
    try:
        before = memory.resident()["anon"]
        for c in chunks[::2]:
            _libc.free(c)
        freed = memory.resident()["anon"]
        heap = memory.Heap()
        shrank = heap.give_back()
        after = memory.resident()["anon"]
    finally:
        for c in chunks[1::2]:
            _libc.free(c)
    assert before - freed < 16 << 20, "malloc gave the chunks back by itself: the test shows nothing"
    assert shrank >= 48 << 20 and freed - after >= 48 << 20, (before, freed, after, shrank)
    st = heap.status()
    assert st["HeapTrims"] == 1 and st["HeapGivenBackMiB"] >= 48 and st["AnonymousMiB"] > 0, st
    assert st["ResidentMiB"] == pytest.approx(st["AnonymousMiB"] + st["FileMiB"], abs=0.2)
