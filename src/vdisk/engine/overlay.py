"""The write overlay's records: a block written since the last commit
(Dirty), the overlay frozen for one commit (Epoch), and what an entry
reads the pages it lacks from (under)."""
from __future__ import annotations

from . import layers
from .format import FULL_MASK, ZERO_SLOT


class Dirty:
    """One block written since the last commit.

    slot == ZERO_SLOT: the block is now all zeros.  fresh: the slot was
    allocated since the last commit (no durable map references it), so it may
    be overwritten in place.  crc_ok: crc matches the slot's contents.
    pages: the 4 KiB pages this engine wrote since the block's last log flush
    (FULL_MASK: all of them may differ); the C fast path keeps its own.
    have: the pages the slot holds (FULL_MASK for a zero block); the others
    read as the overlay below it has them: an in-flight commit's entry,
    else the committed head (under).  At commit they become a backed
    entry (the head's own whole block below becomes its back slot) or a
    partial one (reading through to what its last point sees):
    commit._apply_dirty.  crc covers the pages of have.
    """

    __slots__ = ("slot", "crc", "crc_ok", "fresh", "pages", "have")

    def __init__(self, slot: int, crc: int, crc_ok: bool, fresh: bool, pages: int = 0, have: int = 0xFFFF):
        self.slot = slot
        self.crc = crc
        self.crc_ok = crc_ok
        self.fresh = fresh
        self.pages = pages
        self.have = have


def held(d: Dirty) -> int:
    """The pages of written data an overlay entry holds (none for a block
    made zeros): what the write cache's size counts."""
    return 0 if d.slot == ZERO_SLOT else d.have.bit_count()


class Epoch:
    """The overlay frozen by begin_commit(): what one commit makes durable.

    dirty: lid -> block -> Dirty.  alloc: slots allocated in the epoch (to be
    taken out of DB_FREE).  hwm: the high-water mark at the freeze.
    free_back: free slots not allocated (those beyond the durable hwm go to
    DB_FREE).  records: staged catalogue records.  zeroed: slots whose block
    turned out all zeros when the checksums were finished; they are freed by
    the commit.
    """

    __slots__ = ("dirty", "alloc", "hwm", "free_back", "records", "zeroed", "zeroed_at", "blank")

    def __init__(self, dirty, alloc, hwm, free_back, records):
        self.dirty = dirty
        self.alloc = alloc
        self.hwm = hwm
        self.free_back = free_back
        self.records = records
        self.zeroed: list[int] = []
        self.zeroed_at: list[tuple[int, int, int]] = []  # (lid, block, slot) of each
        # (lid, block) of partial blocks whose pages are all zeros: zeros
        # altogether if what they read through to is
        self.blank: set[tuple[int, int]] = set()


def under(pool, cur, lid: int, block: int, live: bool = True) -> list:
    """What an overlay entry of lid's head reads the pages it lacks
    from, as a chain of layers (layers.layers): for the live overlay,
    an in-flight commit's entry over the committed head; for that
    commit's, the committed head (at the head's generation: its own
    entry if it has one, else what its last point sees).  The overlay's
    slots carry no checksum yet (crc None: not verified)."""
    frozen = pool._inflight_dirty(lid) if live else None
    f = frozen.get(block) if frozen else None
    if f is not None and f.slot == ZERO_SLOT:
        return []
    if f is not None and f.have == FULL_MASK:
        return [(f.slot, FULL_MASK, None)]
    committed = layers.layers(pool, cur, lid, pool._lins[lid].gen, block)  # only when it is read
    return committed if f is None else [(f.slot, f.have, None)] + committed
