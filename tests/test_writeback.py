"""When the daemon starts background writeback (vdisk.daemon.writeback):
pure unit tests of the decision; its effect on speed is measured by
scripts/bench (docs/perf/2026-12-02-writeback.md)."""
from vdisk.daemon.writeback import Writeback

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
