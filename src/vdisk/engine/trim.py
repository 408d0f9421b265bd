"""Giving the host's disk back the pages partial slots do not hold (as
fstrim does for a filesystem).

A write over a block a snapshot shares takes a slot for the pages written
only (a partial entry, docs/format.md).  The data file is preallocated, so
that slot takes a whole block of the host's disk although its other pages
are never read: 4 KiB random writes after a snapshot take up to 16 times
their size.  `trim` punches those pages out of every committed partial
slot.  Punching holds the data file's inode lock (and waits on its
writeback) while it runs, so every write to the pool waits meanwhile: that
is why commits do not trim as they go (tried: 4 KiB random writes right
after a snapshot fell from 37 000-59 000 to 6 500-36 000 IOPS over four
runs), and this is asked for instead, at a quiet time.

Runs in the pool's owner thread, after a commit: the slots it punches are
committed and no writer touches them (a write to their block copies on
write), and no commit or allocation runs meanwhile, so none of them can be
freed and handed out again before its punch.  Backed entries are left
alone: a write to one the head owns goes into the pages its two slots do
not hold (the C fast path's flip, docs/format.md), so those pages are
about to be written anyway.
"""
from __future__ import annotations

import time

from .errors import EngineError
from .format import DB_MAP, FULL_MASK, PAGE, ZERO_SLOT, map_val_full, mask_runs, slot_offset


def partial_slots(pool) -> dict[int, int]:
    """slot -> the pages it holds, of every committed partial entry that
    is not backed (from the map alone)."""
    out: dict[int, int] = {}
    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
        for val in txn.cursor().iternext(keys=False):
            slot, _death, _crc, mask, back, _bcrc = map_val_full(val)
            if slot != ZERO_SLOT and mask != FULL_MASK and not back:
                out[slot] = mask
    return out


def trim(pool) -> dict:
    """Punch the pages every committed partial slot does not hold.
    Returns what it did: partial slots, holes punched and their bytes, the
    data file's allocated bytes before and after, seconds.  A slot punched
    before is punched again (the filesystem then has nothing to free)."""
    t0 = time.monotonic()
    pool.commit()
    before = pool.file.allocated_bytes()
    slots = partial_slots(pool)
    busy = pool._epoch_alloc | pool._reserved  # fresh: none after a commit, but C's reservoir
    holes = nbytes = 0
    for slot, mask in sorted(slots.items()):
        if slot in busy:
            continue
        for first, count in mask_runs(FULL_MASK & ~mask):
            try:
                pool.file.punch(slot_offset(slot) + first * PAGE, count * PAGE)
            except OSError as exc:
                raise EngineError(
                    "punching a hole in %s failed (%s): its filesystem may not support punch-hole; "
                    "no data changed (%d holes were punched before)" % (pool.file.path, exc.strerror, holes)
                ) from None
            holes += 1
            nbytes += count * PAGE
    return {"partial_slots": len(slots), "holes": holes, "bytes": nbytes, "allocated_before": before,
            "allocated_after": pool.file.allocated_bytes(), "seconds": time.monotonic() - t0}
