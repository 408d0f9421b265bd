"""When the daemon starts background writeback (vdisk.daemon.writeback):
pure unit tests of the decision; its effect on speed is measured by
scripts/bench (docs/perf/2026-12-02-writeback.md)."""
import ctypes
import os
import platform

import pytest

from vdisk.daemon.writeback import Writeback
from vdisk.engine import native

MIB = 1 << 20


def ticks(policy, data_by_tick, start=0.0, tick=0.05):
    """Feed the write cache's size tick by tick; the ticks a writeback started."""
    return [i for i, data in enumerate(data_by_tick) if policy.due(data, start + (i + 1) * tick)]


def test_a_burst_is_left_alone_until_it_pauses():
    p = Writeback(0.0, limit=64 * MIB, idle=5.0)
    # 2 MiB of new data every tick for ten ticks, then writes stop
    data = [2 * MIB * (i + 1) for i in range(10)] + [20 * MIB] * 3
    assert ticks(p, data) == [10]  # the first tick with nothing new, once


def test_a_long_burst_is_written_back_every_limit():
    p = Writeback(0.0, limit=64 * MIB, idle=5.0)
    data = [8 * MIB * (i + 1) for i in range(40)]  # 320 MiB, never pausing
    assert ticks(p, data) == [7, 15, 23, 31, 39]  # at 64, 128, ... MiB


def test_in_place_rewrites_are_written_back_every_idle_period():
    p = Writeback(0.0, limit=64 * MIB, idle=1.0)
    # the cache's size stays put (rewrites in place): only the period starts it
    assert ticks(p, [4 * MIB] + [4 * MIB] * 60) == [1, 21, 41]


def test_a_commit_that_took_the_cache_starts_the_count_again():
    p = Writeback(0.0, limit=64 * MIB, idle=5.0)
    data = [40 * MIB, 70 * MIB, 1 * MIB, 30 * MIB, 62 * MIB, 66 * MIB]
    # written back at 70 MiB; after the commit (70 -> 1 MiB) 66 MiB are
    # waiting at the last tick, not 66 - 70
    assert ticks(p, data) == [1, 5]


# ------------------------------------------------- the writeback itself (a real file)

def _dirty_pages(fd: int, size: int):
    """The dirty pages of the file's first size bytes, by the cachestat
    syscall (Linux 6.5); None where the kernel lacks it."""
    if platform.machine() != "x86_64":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    rng = (ctypes.c_uint64 * 2)(0, size)
    out = (ctypes.c_uint64 * 5)()
    if libc.syscall(451, fd, rng, out, 0) != 0:
        return None
    return out[1]  # nr_dirty


def test_writeback_starts_on_the_whole_file_a_range_at_a_time(tmp_path):
    """native.start_writeback covers the data file in 4 MiB calls (one
    whole-file call held a CPU for tens of milliseconds): every range must
    be started, the last one too, not only the first."""
    path = tmp_path / "data"
    size = 24 * MIB + 64 * 1024  # six ranges and a piece of a seventh
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        if _dirty_pages(fd, size) is None:
            pytest.skip("the kernel has no cachestat syscall (Linux 6.5+): cannot see dirty pages")
        page = b"\x5a" * 4096
        offsets = list(range(0, size, 256 * 1024)) + [size - 4096]  # a page in every 256 KiB, and the last
        for off in offsets:
            os.pwrite(fd, page, off)
        dirty = _dirty_pages(fd, size)
        if dirty < len(offsets):
            pytest.skip("the filesystem under %s keeps no dirty pages (tmpfs?)" % tmp_path)
        native.start_writeback(fd)
        # started, not waited for: what is still dirty is what no call covered
        dirty = _dirty_pages(fd, size)
        assert dirty == 0, "%d of %d pages written were not put under writeback" % (dirty, len(offsets))
    finally:
        os.close(fd)
