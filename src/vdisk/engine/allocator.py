"""The slot allocator: free slots from DB_FREE (scanned in batches), or new
ones at the high-water mark, which grows the data file.

Functions of a Pool, run in its owner's thread.  A slot is free for
allocation when DB_FREE says so durably and no epoch, reservoir or punch in
progress holds it (see the Pool's _epoch_alloc, _reserved, _punching).
"""
from __future__ import annotations

import logging
import os


from .errors import (
    NoSpace,
)
from .format import (
    DB_FREE,
    slot_offset,
    u64,
    u64_decode,
)

log = logging.getLogger(__name__)

# The fast path's reservoir grows the data file only while the pool's
# filesystem keeps this much (or a tenth of itself) free.
RESERVE_KEEP_FREE = 256 << 20


def alloc(pool, reserve: bool = False) -> int:
    """A slot nobody references, durable map included.  reserve: for the
    fast path's reservoir (allocated in the epoch only once it is used)."""
    if not pool._free_cache and pool._free_scan is not None:
        _refill_cache(pool)
    if pool._free_cache:
        slot = pool._free_cache.pop()
        if reserve and slot >= pool._committed_hwm:
            # given back beyond the durable hwm: a commit records it free
            pool._reserved_beyond.add(slot)
    else:
        slot = pool._hwm
        try:
            pool.file.reserve(slot_offset(slot + 1))
        except OSError as exc:
            raise NoSpace("the pool's filesystem is full (%s): %s" % (pool.path, exc)) from exc
        pool._hwm += 1
        if reserve:
            pool._reserved_beyond.add(slot)
    if reserve:
        pool._reserved.add(slot)
    else:
        pool._epoch_alloc.add(slot)
    pool._verified.discard(slot)
    return slot


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
    and the writes themselves (a tenth of it, and RESERVE_KEEP_FREE at
    least): what the reservoir and the intent log may grow into."""
    st = os.statvfs(pool.path)
    return st.f_bavail * st.f_frsize - max(RESERVE_KEEP_FREE, st.f_blocks * st.f_frsize // 10)
