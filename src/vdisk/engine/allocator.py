"""The slot allocator: free slots from DB_FREE (scanned in batches), or new
ones at the high-water mark, which grows the data file.

Functions of a Pool, run in its owner's thread.  A slot is free for
allocation when DB_FREE says so durably and no epoch, reservoir or punch in
progress holds it (see the Pool's _epoch_alloc, _reserved, _punching).
"""
from __future__ import annotations

import logging
import os
import time


from .errors import (
    NoSpace,
)
from .format import (
    BLOCK_SIZE,
    DB_FREE,
    slot_offset,
    u64,
    u64_decode,
)

log = logging.getLogger(__name__)

# The fast path's reservoir and the intent log grow their files only while
# the pool's filesystem keeps a tenth of itself free, but never less than
# RESERVE_KEEP_FREE nor more than RESERVE_KEEP_FREE_MAX (a tenth of a large
# host disk, 25 GiB of 252, left vdisk writing everything the slow way with
# plenty of room left).
RESERVE_KEEP_FREE = 256 << 20
RESERVE_KEEP_FREE_MAX = 4 << 30

# The data file grows sparse while the pool's filesystem has more than this
# to spare (spare_bytes); closer to full, the slots it hands out are
# allocated first (DataFile.reserve, allocate), so that a write cannot take
# the room LMDB needs to commit.  Writes into sparse slots the allocator
# handed out earlier may still take room: at most the reservoir and the
# write cache's fresh slots (1 GiB and 4 GiB of slots by default), which
# this margin covers.  VDISK_SPARSE_ROOM_MIB sets it (a huge value
# preallocates always, as vdisk did before 947fe7e).
SPARSE_ROOM = max(0, int(os.environ.get("VDISK_SPARSE_ROOM_MIB", "8192"))) << 20
ROOM_CHECK_S = 1.0  # how long a look at the filesystem's free space holds


def roomy(pool) -> bool:
    """Whether the data file may grow sparse (SPARSE_ROOM), looked up at
    most once every ROOM_CHECK_S."""
    now = time.monotonic()
    until, answer = pool._room_checked
    if now >= until:
        answer = spare_bytes(pool) > SPARSE_ROOM
        pool._room_checked = (now + ROOM_CHECK_S, answer)
    return answer


def _allocate_reused(pool, slots: list[int]) -> int:
    """Allocate reused slots (ascending) on the filesystem unless it is
    roomy: they may be holes (a sparse stretch, a punched slot).  Returns
    how many of them, from the first, are ready (fewer: ENOSPC)."""
    if not slots or roomy(pool):
        return len(slots)
    ready = 0
    for start, count in runs(slots):
        try:
            pool.file.allocate(slot_offset(start), count * BLOCK_SIZE)
        except OSError as exc:
            log.warning("allocating %d reused slots failed: %s", count, exc)
            break
        ready += count
    return ready


def runs(nums: list[int]):
    """Group sorted numbers (slots) into (start, count) runs."""
    start = prev = None
    for s in nums:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            yield start, prev - start + 1
            start = prev = s
    if start is not None:
        yield start, prev - start + 1


def alloc(pool) -> int:
    """A slot nobody references, durable map included, allocated in the
    epoch (the fast path's reservoir takes its own: reserve_many)."""
    if not pool._free_cache and pool._free_scan is not None:
        _refill_cache(pool)
    if pool._free_cache:
        slot = pool._free_cache[-1]
        if not _allocate_reused(pool, [slot]):
            raise NoSpace("the pool's filesystem is full (%s)" % pool.path)
        pool._free_cache.pop()
    else:
        slot = pool._hwm
        try:
            _reserve(pool, slot, 1)
        except OSError as exc:
            raise NoSpace("the pool's filesystem is full (%s): %s" % (pool.path, exc)) from exc
        pool._hwm += 1
    pool._epoch_alloc.add(slot)
    pool._verified.discard(slot)
    return slot


def reserve_many(pool, want: int, grow: int) -> list[int]:
    """Up to want slots for the fast path's reservoir, in the order alloc
    would give them: free ones first, then at most grow new ones at the
    high-water mark, the data file reserved for them at once.  What alloc
    does one slot at a time, for a refill of thousands (fewer when the
    filesystem is full)."""
    slots: list[int] = []
    while len(slots) < want:
        if not pool._free_cache and pool._free_scan is not None:
            _refill_cache(pool)
        if not pool._free_cache:
            break
        k = min(want - len(slots), len(pool._free_cache))
        taken = pool._free_cache[-k:][::-1]  # the lowest, ascending
        ready = _allocate_reused(pool, taken)
        del pool._free_cache[len(pool._free_cache) - ready :]
        slots.extend(taken[:ready])
        pool._reserved.update(taken[:ready])  # before the next scan of DB_FREE, which skips them
        if ready < k:  # the filesystem is full: the rest stay free
            grow = 0
            break
    beyond = [s for s in slots if s >= pool._committed_hwm]  # given back beyond the durable hwm
    n = min(want - len(slots), grow)
    while n > 0:
        try:
            _reserve(pool, pool._hwm, n)
            break
        except OSError:
            n //= 2
    if n > 0:
        new = range(pool._hwm, pool._hwm + n)
        pool._hwm += n
        slots.extend(new)
        beyond.extend(new)
        pool._reserved.update(new)
    pool._reserved_beyond.update(beyond)
    pool._verified.difference_update(slots)
    return slots


def _reserve(pool, first: int, count: int) -> None:
    """Make room in the data file for count new slots from first (at the
    high-water mark): the file grows sparse while the filesystem is roomy;
    otherwise the slots are allocated, also where an earlier growth left
    them sparse (the filesystem filled up since, or the pool was opened
    close to full).  Raises OSError (ENOSPC)."""
    start, end = slot_offset(first), slot_offset(first + count)
    sparse, grown_from = roomy(pool), pool.file.reserved()
    if end > grown_from:
        pool.file.reserve(end, sparse=sparse)
    if not sparse and start < grown_from:  # reserve() allocated what lies beyond
        pool.file.allocate(start, min(end, grown_from) - start)


def _refill_cache(pool) -> None:
    got = []
    with pool.env.begin(db=pool._db[DB_FREE]) as txn:
        cur = txn.cursor()
        if cur.set_range(pool._free_scan):
            for k in cur.iternext(values=False):
                s = u64_decode(k)
                pool._free_scan = u64(s + 1)
                if (
                    s not in pool._epoch_alloc
                    and s not in pool._reserved
                    and s not in pool._punching
                    and not (pool._inflight and s in pool._inflight.alloc)
                ):
                    got.append(s)
                if len(got) >= 4096:
                    break
            else:
                pool._free_scan = None
        else:
            pool._free_scan = None
    got.reverse()
    pool._free_cache = got


def release_fresh(pool, slot: int) -> None:
    """Give back a slot allocated since the last commit (never durable)."""
    pool._epoch_alloc.discard(slot)
    floor = max(pool._committed_hwm, pool._inflight.hwm if pool._inflight else 0)
    if slot == pool._hwm - 1 and slot >= floor:
        pool._hwm -= 1
    else:
        pool._free_cache.append(slot)
        pool._free_cache.sort(reverse=True)


def spare_bytes(pool) -> int:
    """Room on the pool's filesystem beyond what must stay free for LMDB
    and the writes themselves (a tenth of it, between RESERVE_KEEP_FREE and
    RESERVE_KEEP_FREE_MAX): what the reservoir and the intent log may grow
    into."""
    st = os.statvfs(pool.path)
    return st.f_bavail * st.f_frsize - keep_free(st.f_blocks * st.f_frsize)


def keep_free(size: int) -> int:
    """What must stay free on a filesystem of size bytes (spare_bytes)."""
    return max(RESERVE_KEEP_FREE, min(RESERVE_KEEP_FREE_MAX, size // 10))
