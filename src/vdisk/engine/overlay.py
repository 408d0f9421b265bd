"""The write overlay's records: a block written since the last commit
(Dirty), a lineage's blocks (Overlay), the overlay frozen for one commit
(Epoch), and what an entry reads the pages it lacks from (under)."""
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

    back: a *flipped* block (never fresh): the C fast path wrote it into
    the committed backed entry's own two slots, each page into the place
    the durable map does not use for it (csrc/fastmap.c, FLIP).  Its pages
    not in have are in slot back (the entry's back slot; both slots are
    the committed entry's, so the commit frees neither), and flip names the
    pages flipped since the commit (the writes the overlay holds).
    """

    __slots__ = ("slot", "crc", "crc_ok", "fresh", "pages", "have", "back", "flip")

    def __init__(self, slot: int, crc: int, crc_ok: bool, fresh: bool, pages: int = 0, have: int = 0xFFFF,
                 back: int = 0, flip: int = 0):
        self.slot = slot
        self.crc = crc
        self.crc_ok = crc_ok
        self.fresh = fresh
        self.pages = pages
        self.have = have
        self.back = back
        self.flip = flip


# An Overlay notes its blocks by region of 2**REGION_SHIFT blocks (256 MiB).
REGION_SHIFT = 12


class Overlay(dict):
    """One lineage's overlay: block -> Dirty (Pool._dirty[lid], and an
    Epoch's once frozen), which can also say which of its blocks fall in
    a range without looking at all of them (blocks_in).  A discard asks
    that once per request, and mkfs or fstrim of a 64 TiB disk sends
    16384 requests of 4 GiB while the overlay may hold 65536 blocks.

    Every key set is noted in its region.  Blocks are never taken out of
    an overlay one by one (a commit freezes the whole of it, a volume's
    deletion drops it), so the regions hold exactly the keys.  Make one
    with overlay_of(); only item assignment adds keys."""

    __slots__ = ("_regions",)

    def __init__(self):
        super().__init__()
        self._regions: dict[int, set[int]] = {}

    def __setitem__(self, block: int, d: Dirty) -> None:
        region = self._regions.get(block >> REGION_SHIFT)
        if region is None:
            region = self._regions[block >> REGION_SHIFT] = set()
        region.add(block)
        dict.__setitem__(self, block, d)

    def setdefault(self, *args):
        raise TypeError("Overlay: assign items (overlay[block] = d), which notes their region")

    def update(self, *args, **kw):
        raise TypeError("Overlay: assign items (overlay[block] = d), which notes their region")

    def blocks_in(self, first: int, last: int) -> list[int]:
        """The blocks of [first, last) the overlay has, in no order: the
        cost of the smaller of the range and the regions it meets, plus
        the blocks of those regions."""
        if last - first <= len(self):
            return [b for b in range(first, last) if b in self]
        lo, hi = first >> REGION_SHIFT, (last - 1) >> REGION_SHIFT
        regions = self._regions
        if hi - lo < len(regions):
            met = [regions[r] for r in range(lo, hi + 1) if r in regions]
        else:
            met = [blocks for r, blocks in regions.items() if lo <= r <= hi]
        return [b for blocks in met for b in blocks if first <= b < last]


def overlay_of(overlays: dict, lid: int) -> Overlay:
    """Lineage lid's overlay in overlays (Pool._dirty), a new empty one
    if it has none yet."""
    o = overlays.get(lid)
    if o is None:
        o = overlays[lid] = Overlay()
    return o


def held(d: Dirty) -> int:
    """The pages of written data an overlay entry holds (none for a block
    made zeros; those flipped for a flipped one): what the write cache's
    size counts."""
    if d.back:
        return d.flip.bit_count()
    return 0 if d.slot == ZERO_SLOT else d.have.bit_count()


class Epoch:
    """The overlay frozen by begin_commit(): what one commit makes durable.

    dirty: lid -> block -> Dirty.  alloc: slots allocated in the epoch (to be
    taken out of DB_FREE).  hwm: the high-water mark at the freeze.
    free_back: free slots not allocated (those beyond the durable hwm go to
    DB_FREE).  records: staged catalogue records.  zeroed: slots whose block
    turned out all zeros when the checksums were finished; they are freed by
    the commit.  backed: the entries it wrote backed.  log_gen: the intent
    log's generation the commit records (IntentLog.freeze).  held: the
    volumes whose fsyncs wait until the commit is durable
    (txn.held_volumes; empty also when it holds every volume's, for then
    the log takes no record at all).
    """

    __slots__ = ("dirty", "alloc", "hwm", "free_back", "records", "zeroed", "zeroed_at", "blank", "backed",
                 "back_sums", "log_gen", "held")

    def __init__(self, dirty, alloc, hwm, free_back, records):
        self.dirty = dirty
        self.alloc = alloc
        self.hwm = hwm
        self.free_back = free_back
        self.records = records
        self.log_gen = 0
        self.held: frozenset = frozenset()
        self.zeroed: list[int] = []
        self.zeroed_at: list[tuple[int, int, int]] = []  # (lid, block, slot) of each
        # (lid, block) of partial blocks whose pages are all zeros: zeros
        # altogether if what they read through to is
        self.blank: set[tuple[int, int]] = set()
        # lid -> (block, slot, back) of every entry the commit wrote backed,
        # in an array('Q'): C may flip them once it is durable
        # (FastMap.commit_done, one call for all)
        self.backed: dict = {}
        # (lid, block) -> the checksum of a flipped block's back slot
        # (commit._finish_checksums)
        self.back_sums: dict[tuple[int, int], int] = {}


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
    if f is not None and f.back:  # flipped: its two slots hold the block
        return [(f.slot, f.have, None), (f.back, FULL_MASK & ~f.have, None)]
    committed = layers.layers(pool, cur, lid, pool._lins[lid].gen, block)  # only when it is read
    return committed if f is None else [(f.slot, f.have, None)] + committed
