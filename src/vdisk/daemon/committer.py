"""Commits off the trio thread.

The pool's commit has a slow part (fdatasync of the data file, then a
synchronous LMDB transaction) that used to stall every disk while it ran.
The Committer freezes the overlay in the trio thread (`Pool.begin_commit`,
an instant between two FUSE requests), runs the slow part in a worker thread
and publishes the result back in the trio thread; FUSE requests go on in the
meantime into a new overlay.

Concurrency contract: every method is called from the trio thread.  At most
one commit is in flight.  `flush()` blocks the calling task (only) until
every write acknowledged before the call is durable (`flush(vid)`: every
write to that volume, by a log flush in the trio thread when it can, even
while a commit that changes no volume is in flight);
`idle()` until no commit is in flight, after which the caller may run
synchronous structural changes (snapshots, rollbacks) before its next await.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import trio

from ..engine.errors import EngineError
from ..engine.pool import Pool
from .background import Worker
from .memory import Heap

log = logging.getLogger(__name__)

# The emulated disk's volatile write cache: a background commit starts once
# this much data was written since the last one (VDISK_WRITE_CACHE_MIB,
# default 2048 MiB: the pages the new slots hold, so 4 KiB written to a
# block counts 4 KiB), or this many blocks were (VDISK_WRITE_CACHE_BLOCKS,
# default 65536: the daemon keeps about 300 bytes of memory per block
# written).  What is not flushed may be lost in a crash, as on a disk with
# a volatile cache; a larger cache rewrites more blocks in place instead of
# copying them again after every commit.
CACHE_BYTES = max(1, int(os.environ.get("VDISK_WRITE_CACHE_MIB", "2048"))) << 20
CACHE_BLOCKS = max(1, int(os.environ.get("VDISK_WRITE_CACHE_BLOCKS", "65536")))
# A write waits (back-pressure) when twice as much is dirty while a commit
# is still running: memory and unflushed data stay bounded.
HARD_FACTOR = 2
# Seconds after which what was written is committed in the background even
# below the dirty limit (VDISK_COMMIT_INTERVAL).
COMMIT_INTERVAL = float(os.environ.get("VDISK_COMMIT_INTERVAL", "30"))
# A background commit starts once the intent log's file being written is
# this full (of its 64 MiB): the commit moves the log on to its other file,
# so fsyncs find room there while it runs instead of waiting for it (a
# full log makes every fsync a commit of its own).  C writes the records
# without telling anyone: after_write looks, which the daemon calls every
# 100 ms as it feeds the fast path.
LOG_FILL = 0.5
# Commits of at most this many blocks run in the trio thread itself.
INLINE_BLOCKS = 16


class Committer:
    def __init__(self, pool: Pool):
        self.pool = pool
        pool.auto_commit = False
        self._seq = 0  # commits begun
        self._ok = 0  # the last one that succeeded
        self._idle = trio.Event()
        self._idle.set()
        self._wake = trio.Event()
        self._priority = 0  # structural commits waiting: background ones hold off
        self._last_commit = 0.0  # trio.current_time() of the last freeze
        self.commit_count = 0  # commits finished, and the seconds they took (freeze to publish)
        self.commit_seconds = 0.0
        # slots structural commits freed, to punch in a worker thread (run())
        self._punch_send, self._punch_recv = trio.open_memory_channel(math.inf)
        # the slow parts, each in a thread of its own (VDISK_BACKGROUND_NICE)
        self._commit_thread = Worker("vdisk-commit")
        self._write_out_thread = Worker("vdisk-write-out")
        self._punch_thread = Worker("vdisk-punch")
        # the heap commits freed goes back to the kernel once they pause (memory.py)
        self.heap = Heap()
        self._given_back_at = 0  # commit_count at the last give_back

    async def _commit(self, change=None):
        """Begin a commit, run it in a worker thread, finish it; returns the
        change's result.  Raises what the commit raised (its writes stay
        pending then).  The caller makes sure none is in flight."""
        t0 = time.monotonic()
        job = self.pool.begin_commit(change)
        t1 = time.monotonic()
        self._last_commit = trio.current_time()
        self._seq += 1
        seq = self._seq
        self._idle = trio.Event()
        try:
            if change is None and job.blocks() <= INLINE_BLOCKS:
                # a database's commit: handing it to a thread and back costs
                # more than the little it writes; the C fast path serves
                # reads and writes meanwhile (pyfuse3's requests wait)
                job.run()
            else:
                # not cancellable: the job must finish before the pool is touched
                await self._commit_thread.run(job.run)
        finally:
            t2 = time.monotonic()
            try:
                # punching the freed slots can wait on the filesystem's
                # journal for seconds: the puncher does it, not this thread
                result = self.pool.finish_commit(job, punch=False)
                if job.to_punch:
                    self._punch_send.send_nowait(job.to_punch)
                self._ok = seq
            finally:
                self._idle.set()
                t3 = time.monotonic()
                self.commit_count += 1
                self.commit_seconds += t3 - t0
                (log.info if t3 - t0 > 1 else log.debug)(
                    "commit %d (%s, %d blocks): freeze %.1f ms, run %.1f ms, finish %.1f ms",
                    seq, "structural" if change is not None else "writes", job.blocks(),
                    (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000)
        return result

    async def _background_commit(self) -> None:
        """A commit nobody waits for.  The data file is synced first, in a
        worker thread and before the freeze, so that the commit itself has
        only the last moments' writes left to sync (fsyncs go on meanwhile
        through the log's other file, but a commit that changes volumes
        waits for this one)."""
        await self._write_out_thread.run(self.pool.write_out)
        if not self.pool.inflight() and not self._priority:  # a structural commit may have come first
            await self._commit()

    @contextlib.asynccontextmanager
    async def _turn(self):
        """The turn of a commit asked for by another thread: background
        commits stand aside (_priority) and none is in flight when the body
        runs; the map may grow meanwhile, since the asking thread is
        blocked in this call and holds no LMDB transaction."""
        self._priority += 1
        deferred = self.pool.defer_map_growth
        try:
            await self.idle()
            self.pool.defer_map_growth = False
            yield
        finally:
            self.pool.defer_map_growth = deferred
            self._priority -= 1

    async def commit_change(self, change):
        """A structural commit (a snapshot, say) run like the others: the
        overlay is frozen now, between two FUSE requests - the instant the
        snapshot is taken - and the fdatasync and the transaction run in the
        worker thread while I/O goes on.  Returns the change's result."""
        async with self._turn():
            return await self._commit(change)

    async def commit_meta(self, change=None):
        """Records (and a change that touches no block) committed alone
        (Pool.commit_meta) for another thread: once no commit is in
        flight, one small transaction here, between two FUSE requests,
        without the data sync of a full commit.  Returns change's
        result."""
        async with self._turn():
            return self.pool.commit_meta(change)  # no await: nothing comes in between

    async def idle(self) -> None:
        """Return once no commit is in flight."""
        while self.pool.inflight():
            await self._idle.wait()

    async def flush(self, vid: int | None = None) -> None:
        """Make every write acknowledged so far durable (fsync); with vid,
        only the writes to that volume, through the intent log when it can
        (one device flush instead of a commit's three)."""
        target = self._seq + 1 if self.pool.pending() else self._seq
        while self._ok < target:
            # the log first, even while a commit that changes no volume runs
            if vid is not None and self.pool.log_flush(vid):
                return
            if self.pool.inflight():
                await self._idle.wait()
            elif not self.pool.pending() and self._ok >= self._seq:
                return
            else:
                await self._commit()

    def cache_full(self, factor: int = 1) -> bool:
        """Whether the write cache holds factor times its size (in data or
        in blocks)."""
        data, blocks = self.pool.dirty()
        return data >= factor * CACHE_BYTES or blocks >= factor * CACHE_BLOCKS

    def log_filling(self) -> bool:
        """Whether the intent log's file being written is LOG_FILL full."""
        return self.pool.log_fill() >= LOG_FILL

    def status(self) -> dict:
        """The write cache as `vdisk daemon status` shows it."""
        data, blocks = self.pool.dirty()
        return {
            "Bytes": data,
            "Blocks": blocks,
            "SizeBytes": CACHE_BYTES,
            "SizeBlocks": CACHE_BLOCKS,
            "Commits": self._seq,
        }

    async def after_write(self) -> None:
        """Called after each write: start a background commit when the
        write cache is full or the intent log half full; wait while the
        cache holds twice its size.  Keeps room written ahead in the intent
        log's file, and lets C grow it as it needs, so that C writes every
        record of an fsync itself."""
        self.pool.log_grow_ahead()
        if self.cache_full() or self.log_filling():
            self._wake.set()
            while self.cache_full(HARD_FACTOR) and self.pool.inflight():
                await self._idle.wait()

    async def _puncher(self) -> None:
        """Give the slots structural commits freed back to the filesystem, in
        a worker thread; the pool allocates them only once that is done."""
        async for slots in self._punch_recv:
            await self._punch_thread.run(self.pool.punch_slots, slots)
            self.pool.punched(slots)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The background task: commits whenever the dirty limit is hit or
        the intent log is half full, and what was written at least
        COMMIT_INTERVAL seconds ago (like ext4's
        commit= or ZFS's txg timeout: a crash loses at most that much); and
        the puncher of freed slots."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._puncher)
                task_status.started()
                await self._loop()
        finally:  # no job runs: every run() waits for its own
            for w in (self._commit_thread, self._write_out_thread, self._punch_thread):
                w.close()

    async def _loop(self) -> None:
        self._last_commit = trio.current_time()
        while True:
            with trio.move_on_after(COMMIT_INTERVAL) as tick:
                await self._wake.wait()
            self._wake = trio.Event()
            if trio.current_time() - self._last_commit >= COMMIT_INTERVAL and not self.pool.inflight():
                if self.pool.dirty_blocks():
                    try:
                        await self._background_commit()
                    except EngineError as exc:
                        log.error("background commit failed: %s", exc)
                self._last_commit = trio.current_time()
            if tick.cancelled_caught and self.commit_count != self._given_back_at:
                # a commit interval without a full cache, after commits: the
                # heap they freed goes back (under load the next one would
                # only take it again, page by page)
                self._given_back_at = self.commit_count
                await self._write_out_thread.run(self.heap.give_back)
            while self.cache_full() or self.log_filling():
                if self.pool.inflight() or self._priority:
                    await self._idle.wait()
                    await trio.sleep(0)  # let a waiting structural commit go first
                    continue
                try:
                    await self._background_commit()
                except EngineError as exc:  # the next flush reports it to its caller
                    log.error("background commit failed: %s", exc)
                    break
