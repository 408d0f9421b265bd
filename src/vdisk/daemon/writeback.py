"""When the daemon starts background writeback of the data file
(Daemon._writeback runs sync_file_range in a worker thread).

Writeback makes the next commit's fdatasync (a snapshot's, say) short.  It
waits while a burst of writes goes on: it converts the data file's
unwritten extents under the inode's extent lock, which the writes of new
slots wait for, and on a small host it takes the CPU from them (a 64 MiB
burst of 4 KiB writes after a snapshot ran at about 0.65x the speed it
reaches when writeback waits, docs/perf/2026-12-02-writeback.md).  fsyncs
do not wait for it: a log flush copies its pages into the intent log.

Pure bookkeeping, no I/O: the trio thread asks it at every tick.
"""
from __future__ import annotations

import os

# The data written since the last writeback (the pages the overlay's slots
# hold) that starts one while writes go on, and the seconds after which one
# runs anyway (blocks rewritten in place, a database's hot pages, are then
# written to the device once per period, not again and again).
WRITEBACK_BYTES = max(1, int(os.environ.get("VDISK_WRITEBACK_MIB", "64"))) << 20
WRITEBACK_IDLE = float(os.environ.get("VDISK_WRITEBACK_IDLE", "5"))
TICK = 0.05  # seconds between two looks at the write cache


class Writeback:
    """Decides, tick after tick, whether to start writeback now: as soon
    as writes pause (no new data since the last tick) with data waiting,
    while they go on once `limit` bytes are waiting, and every `idle`
    seconds anyway."""

    def __init__(self, now: float, limit: int = WRITEBACK_BYTES, idle: float = WRITEBACK_IDLE):
        self.limit, self.idle = limit, idle
        self._done = 0  # the write cache's data at the last writeback
        self._seen = 0  # ... at the last tick
        self._last = now  # when the last writeback started

    def due(self, data: int, now: float) -> bool:
        """data: the write cache's bytes now (Pool.dirty).  True: start a
        writeback (it is counted as started)."""
        if data < self._done:  # a commit took the overlay (its write-out synced the data file)
            self._done = 0
        waiting, paused = data - self._done, data == self._seen
        self._seen = data
        if waiting >= self.limit or (paused and waiting) or now - self._last >= self.idle:
            self._done, self._last = data, now
            return True
        return False
