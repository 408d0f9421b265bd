"""The engine's side of the C fast path (fastmap.py, csrc/fastmap.c): what
the Pool tells C about each block (tell, tell_committed, and teach for the
requests C hands back), what it takes in from C (drain), and the volumes C
serves (sync_volumes).

Functions of a Pool, called with the map's lock held (FastLock) unless they
say otherwise.  C's table is a cache of the overlay and the committed map:
never ahead of them, forgotten when unsure.
"""
from __future__ import annotations

import errno
import logging
import typing
from array import array

from . import allocator, layers, overlay
from .mapindex import mapped_blocks
from .overlay import Dirty, held, overlay_of
from .fastmap import (
    CRC_KNOWN,
    FLUSHED,
    MAX_SPAN,
    READ_ONLY,
    VOL_CLEAN,
    VOL_NEW,
    VOL_POINTS,
    VOL_SHARE,
    VOL_UNSHARE,
    WINDOW,
    WRITABLE,
    WRITABLE_REPORT,
)
from .errors import (
    EngineError,
    NoSpace,
)
from .format import (
    BLOCK_SIZE,
    DB_MAP,
    FULL_MASK,
    ZERO_SLOT,
    lid_prefix,
)

if typing.TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger(__name__)


class FastLock:
    """`with pool._fast():` (the pool's one FastLock) holds the fast path's
    map (if attached) for the duration, taking in what C wrote first.
    Re-entrant within the owner thread."""

    __slots__ = ("pool",)

    def __init__(self, pool: "Pool"):
        self.pool = pool

    def __enter__(self):
        p = self.pool
        if p._fm_depth:
            p._fm_depth += 1
        elif p._fm is not None:
            # take in most of what C wrote while the I/O threads go on, so
            # that the drain under the lock has only the last moments' left
            drain(p)
            p._fm.lock()
            p._fm_held = p._fm
            p._fm_depth = 1
            try:
                drain(p)
            except BaseException:
                self.__exit__()
                raise

    def __exit__(self, *exc):
        p = self.pool
        if p._fm_depth:
            p._fm_depth -= 1
            if not p._fm_depth:
                p._fm_held.unlock()
                p._fm_held = None


def attach(pool, fm) -> None:
    """Keep a FastMap (vdisk.engine.fastmap) in step with this pool from
    now on, so that an I/O thread may serve reads and writes through it.
    From here on every operation that touches the overlay holds the
    map's lock and first takes in what C wrote (see docs/architecture.md,
    "The fast path")."""
    if pool._fm is not None:
        raise EngineError("a fast path is already attached")
    pool._fm = fm
    with pool._fast():
        pool._fm_heads = {}
        sync_volumes(pool)
        fm.set_log(pool.intent.handle)
    refill(pool)


def detach(pool) -> None:
    """Stop keeping the FastMap in step: its reservoir comes back, and it
    serves nothing more.  Call once no I/O thread uses it."""
    fm = pool._fm
    if fm is None:
        return
    with pool.intent, pool._fast():
        fm.set_log(None)
        for slot in fm.reservoir_take():
            pool._reserved.discard(slot)
            pool._reserved_beyond.discard(slot)
            pool._free_cache.append(slot)
        pool._free_cache.sort(reverse=True)
        fm.set_failed(2)
        fm.clear()
        pool._fm = None


def refill(pool) -> int:
    """Take in what C wrote and top its reservoir up; returns how many
    slots were added (fewer when the pool's filesystem is full).

    Runs without the map's lock: it changes only the allocator (this
    thread's), and the reservoir and C's table (under C's inner mutex, a
    chunk of the table at a time), so the I/O threads go on meanwhile,
    even while this thread waits for the GIL."""
    fm = pool._fm
    if fm is None or pool._failed:
        return 0
    drain_light(pool)
    added = 0
    want = fm.reservoir_target - fm.reservoir()
    if want > 0:
        # growing the data file for the reservoir must not take the room
        # LMDB and the writes themselves need: only reused slots then
        grow = max(0, allocator.spare_bytes(pool) // BLOCK_SIZE)
        slots = allocator.reserve_many(pool, want, grow)
        fm.reservoir_add(slots[::-1])  # C takes from the end: ascending slots
        added = len(slots)
    # then C's table, with the writers supplied (a trim of the whole table
    # before the reservoir kept them waiting 0.7 s for slots): a cache of
    # bounded size, so once it is full enough C forgets what it may (and
    # is taught again as requests need), a step at a time; else it grows
    # ahead of need, so that no write waits while it grows
    if not fm.trim():
        fm.grow()
    return added


def drain_light(pool) -> None:
    """Take in what C wrote so far without stopping it (for counting:
    what C writes meanwhile comes in at the next drain)."""
    if pool._fm is not None and not pool._fm_depth:
        drain(pool)


def drain(pool, limit: int | None = None) -> None:
    """Put the blocks C gave new slots into the overlay, as write() would
    have (at most limit records: a freeze's, commit.begin).  Called with
    the map locked, or by drain_light or a freeze: the log is taken under
    C's inner mutex, and nothing here touches C's table or frees a slot C
    could still know."""
    got = pool._fm.drain(limit)
    for vid, block, slot, have, back, flip, crcw in got:
        if block == FLUSHED:  # C wrote a log flush of the volume
            v = pool._vols.get(vid)
            if v is not None:
                # only C's blocks: the volume was clean, and C's first record
                # after a freeze carries those written before it, whole
                pool._unlogged.pop(v["lid"], None)
                pool._unlogged_frozen.pop(v["lid"], None)
            continue
        if slot == ZERO_SLOT:  # C made it zeros (a discard: FastMap.discard)
            v = pool._vols.get(vid)
            if v is not None:
                # a log flush of the Pool's records the whole block,
                # whatever C writes over it (C's own records do too)
                pool._unlogged.setdefault(v["lid"], set()).add(block)
                make_zero(pool, overlay_of(pool._dirty, v["lid"]), block).pages = FULL_MASK
            continue
        fresh = not back  # else C flipped a committed backed entry: no slot is new
        if fresh:
            pool._reserved.discard(slot)
            pool._reserved_beyond.discard(slot)
            pool._epoch_alloc.add(slot)
        v = pool._vols.get(vid)
        if v is None:  # cannot happen while volumes change only under the lock
            if fresh:
                allocator.release_fresh(pool, slot)
            continue
        dirty = overlay_of(pool._dirty, v["lid"])
        pool._unlogged.setdefault(v["lid"], set()).add(block)  # C has its pages
        # C checksummed a new partial slot as it wrote it: the commit need
        # not read it back (a later record of the block says 0 again)
        crc, crc_ok = crcw & 0xFFFFFFFF, bool(crcw & CRC_KNOWN)
        d = dirty.get(block)
        if d is None:
            pool._ndirty += 1
            d = dirty[block] = Dirty(slot, crc, crc_ok, fresh, 0, have, back, flip)
            pool._dirty_pages += held(d)
            continue
        if not fresh:  # flipped again: the overlay's entry is that flipped one
            assert d.slot == slot and not d.fresh, (block, d.slot, slot)
        elif d.fresh and d.slot != slot:
            allocator.release_fresh(pool, d.slot)
        pool._dirty_pages -= held(d)
        d.slot, d.crc, d.crc_ok, d.fresh, d.have, d.back, d.flip = slot, crc, crc_ok, fresh, have, back, flip
        pool._dirty_pages += held(d)


def make_zero(pool, dirty: dict, block: int) -> Dirty:
    """The overlay's entry for a block that reads as zeros now (a
    discard): a fresh slot it had is free again (C knows it no more)."""
    d = dirty.get(block)
    if d is None:
        pool._ndirty += 1
        d = dirty[block] = Dirty(ZERO_SLOT, 0, True, False)
        return d
    pool._dirty_pages -= held(d)
    if d.fresh:
        allocator.release_fresh(pool, d.slot)
    d.slot, d.crc, d.crc_ok, d.fresh, d.have, d.back, d.flip = ZERO_SLOT, 0, True, False, FULL_MASK, 0, 0
    return d


def sync_volumes(pool) -> None:
    """Tell the map every volume's head, size and whether a snapshot
    shares its blocks (volume_ops), in one hold of the map's lock (the
    caller's, if it holds it).  Without the lock only for changes that
    give no served volume another head or take it away (C's writes to it
    not drained yet would be taken for the new head's)."""
    ops, gone = volume_ops(pool)
    pool._fm.sync_volumes(ops, gone, locked=bool(pool._fm_depth))


def volume_ops(pool) -> tuple[array, list[int]]:
    """What C must be told of the volumes since it was told last, as
    FastMap.sync_volumes takes it: (ops, gone).  A volume whose head
    changed starts empty, and clean when this engine holds no unlogged
    change to it (so that its first fsync is served in C too).  A volume
    whose last snapshot point was deleted shares nothing C knows any more.
    Notes what C will have been told (Pool._fm_heads): pass the result to
    C before anything else is.  No lock needed: it reads the pool's state,
    which only this thread changes, and the committed map."""
    ops = array("Q")
    heads = {}  # vid -> (head lineage, its generation, its last snapshot point), as C was told last
    for vid, v in pool._vols.items():
        lid = v["lid"]
        lin = pool._lins[lid]
        heads[vid] = (lid, lin.gen, lin.last_point())
        how = VOL_POINTS if lin.points else 0
        told = pool._fm_heads.get(vid)
        if told is None or told[0] != lid:
            if not pool._unlogged.get(lid):  # C starts it not clean
                how |= VOL_CLEAN
            if _is_new(pool, lid):  # C may take unknown blocks as zeros
                how |= VOL_NEW
        elif told[1] != lin.gen:  # a snapshot
            how |= VOL_SHARE
        elif told[2] != lin.last_point():  # its last snapshot was deleted
            how |= VOL_UNSHARE
        ops.extend((vid, lid, v["size"], how))
    gone = sorted(pool._fm_heads.keys() - pool._vols.keys())
    pool._fm_heads = heads
    return ops, gone


def _is_new(pool, lid: int) -> bool:
    """Whether a lineage holds nothing at all: no parent, no block in
    the committed map, none in the overlay."""
    if pool._lins[lid].parent is not None or pool._dirty.get(lid) or pool._inflight_dirty(lid):
        return False
    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
        cur = txn.cursor()
        return not (cur.set_range(lid_prefix(lid)) and cur.key()[:8] == lid_prefix(lid))


def _writable(pool, lid: int, block: int, d: Dirty) -> int:
    """How the fast path may write a dirty block: in place if its slot
    is fresh (or the places it flipped to, if flipped), reporting the
    first write if the block is in the log."""
    if not d.fresh and not d.back:
        return READ_ONLY
    return WRITABLE if block in pool._unlogged.get(lid, ()) else WRITABLE_REPORT


def unverified(pool, chain) -> tuple:
    """The committed slots among these layers not verified against their
    checksums since the pool was opened (the overlay's slots, crc None,
    were written by this engine), as (slot, mask, crc): C verifies them
    itself before it reads from them (FastMap.set, FastMap.add)."""
    return tuple(l for l in chain if l[2] is not None and l[0] != ZERO_SLOT and l[0] not in pool._verified)


def tell(pool, vid: int, lid: int, block: int, d: Dirty, cur=None) -> None:
    """Tell C what a live overlay entry holds (with the map's lock held):
    a partial one with what it reads the rest from (overlay.under) when at
    most three slots make that (layers.below), or nothing (then C leaves
    the block to us).  A flipped one with its back slot and flips."""
    if d.back:
        frozen = pool._inflight_dirty(lid)
        f = frozen.get(block) if frozen else None
        pool._fm.set(vid, block, d.slot, _writable(pool, lid, block, d), d.have, d.back, back=d.back, flip=d.flip,
                     held=f.flip if f is not None and f.back else 0)
        return
    if d.have == FULL_MASK:
        pool._fm.set(vid, block, d.slot, _writable(pool, lid, block, d))
        return
    if cur is None:
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            return tell(pool, vid, lid, block, d, txn.cursor())
    chain = layers.visible(overlay.under(pool, cur, lid, block), d.have)
    b = layers.below(chain)
    if b is None:
        d.pages |= pool._fm.mask(vid, block)  # what C wrote since the log flush: ours to log now
        pool._fm.forget(vid, block)
    else:
        pool._fm.set(vid, block, d.slot, _writable(pool, lid, block, d), d.have, *b, unverified(pool, chain[:3]))


def committed_view(pool, cur, lid: int, gen: int, block: int, chain) -> tuple | None:
    """What C is told of the head's committed view of a block, as
    FastMap.add's arguments after (vid, block): (slot, have, base, shared,
    bhave, base2, bhave2, base3, unverified), or None when more than four
    slots make it.
    shared: the head's last snapshot point sees the same (layers.head_state).
    back: the head's own backed entry's back slot, which C may flip (0:
    not one; C leaves it out while a structural change is in flight)."""
    slot = layers.single(chain)
    if slot is not None:
        have, b = FULL_MASK, layers.below([])
    else:
        slot, have, _crc = chain[0]
        b = layers.below(chain[1:])
        if b is None:
            return None
    state = layers.head_state(cur, lid, gen, pool._lins[lid].last_point(), block)
    back = state[4] if state[0] == "own" and state[1] == slot else 0
    return (slot, have, b[0], state[0] == "shared", *b[1:], unverified(pool, chain[:4]), back)


def frozen_view(pool, cur, lid: int, block: int, f: Dirty) -> tuple | None:
    """What C is told of a block an in-flight commit holds (f, its entry),
    as FastMap.add's arguments after (vid, block), or None when more than
    four slots make it.  Never shared: the head's own.  Never flipped
    either (a page flipped in its epoch has both places in use until it
    is durable)."""
    if f.slot == ZERO_SLOT or f.have == FULL_MASK:
        return (f.slot,)
    if f.back:
        return (f.slot, f.have, f.back, False)
    chain = layers.visible(overlay.under(pool, cur, lid, block, live=False), f.have)
    b = layers.below(chain)
    if b is None:
        return None
    return (f.slot, f.have, b[0], False, *b[1:], unverified(pool, chain[:3]))


def tell_committed(pool, vid: int, lid: int, gen: int, block: int, chain, cur) -> None:
    """Tell C the head's committed view of a block (or zeros) if at most
    four slots make it (an entry over its back slot or over what it
    reads through to: layers.below), and whether its last snapshot point
    sees the same.  A copy-on-write in C writes only the pages written
    over a whole block, the head's own or its point's, and over its
    point's view of two or three slots; over one of four it copies the
    pages of the layer that shows the fewest."""
    view = committed_view(pool, cur, lid, gen, block, chain)
    if view is not None:
        pool._fm.add(vid, block, *view)


# A request C hands back for a block it does not know teaches C that block
# and every block the map has in the aligned window of this many blocks
# around it (16 MiB, C's window: fastmap.WINDOW), so that the next requests
# there are served in C, those to blocks that read as zeros too.
TEACH_WINDOW = WINDOW


def teach(pool, vid: int, offset: int, length: int) -> bool:
    """C handed a read or write back: tell it the blocks it did not know, the
    request's and those of the window around them (TEACH_WINDOW) that the
    committed map or an in-flight commit holds, as the head sees them now.
    True when C learnt something (the request is worth trying in C
    again).

    In the owner thread.  The map is looked up without the map's lock, so
    that the I/O threads go on meanwhile: nothing the lookups depend on
    changes until the lock is taken, because only this thread changes
    the overlay, commits and the committed map's view (a commit's LMDB
    transaction in a worker thread writes what the in-flight epoch,
    consulted first here, already says), and C cannot write a block it
    does not know.  Blocks C learnt meanwhile keep what C has
    (FastMap.add).  A slot not verified yet is taught with its checksum:
    C verifies it before it reads from it (unverified).

    Blocks that read as zeros are taught only for the request itself (a
    sparse disk's windows would fill C's table), unless the map has an
    entry for them (at any generation, in the lineage or one it was made
    from: mapindex.mapped_blocks), such as a block the head discarded
    after a snapshot, which the point still sees: C must hold those as
    the head's zeros (a partial write over zeros there would become an
    entry reading its other pages through to the point's block).  Then
    the window is taught whole and becomes *known* to C (FastMap.add_many's
    windows): a block of it C does not hold reads as zeros, for the head
    and its snapshot points, so that writes to blocks never written are
    served in C too.  Not a window with a block the overlay holds that C
    is not taught (the live overlay's, or one whose view takes more than
    four slots)."""
    fm = pool._fm
    vol = pool._vols.get(vid)
    if fm is None or vol is None or pool._failed or length <= 0 or offset + length > vol["size"]:
        return False
    first, last = offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE
    if last - first >= MAX_SPAN or not fm.unknown(vid, first, last - first + 1):
        return False  # C handed it back for another reason
    nblocks = -(-vol["size"] // BLOCK_SIZE)
    lo = first - first % TEACH_WINDOW
    hi = min(nblocks, max(last + 1, lo + TEACH_WINDOW))
    lid = vol["lid"]
    gen = pool._lins[lid].gen
    dirty = pool._dirty.get(lid) or {}
    frozen = pool._inflight_dirty(lid) or {}
    plan, zeros, left = [], [], set()  # left: not taught, may not read as zeros
    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
        cur = txn.cursor()
        for block in fm.unknown(vid, lo, hi - lo):
            if block in dirty:
                left.add(block)  # the live overlay's: the Pool tells C of those itself (tell)
                continue
            f = frozen.get(block)
            if f is not None:
                view = frozen_view(pool, cur, lid, block, f)
            else:
                chain = layers.layers(pool, cur, lid, gen, block)
                if not chain and not first <= block <= last:
                    zeros.append(block)  # taught below only if the map has an entry for it
                    continue
                view = committed_view(pool, cur, lid, gen, block, chain)
            if view is None:
                left.add(block)
            else:
                plan.append((block, *view))
        if zeros:
            mapped = mapped_blocks(pool, txn, lid, min(zeros), max(zeros) + 1)
            plan.extend((block, *committed_view(pool, cur, lid, gen, block, [])) for block in zeros if block in mapped)
    windows = _whole_windows(lo, hi, nblocks, left)
    if not plan and not windows[1]:
        return False
    # one hold of C's lock, in C: only this thread changes what the plan
    # was made from, and C keeps what it learnt meanwhile
    return fm.add_many(vid, plan, locked=bool(pool._fm_depth), windows=windows) > 0 or windows[1] > 0


def _whole_windows(lo: int, hi: int, nblocks: int, left: set) -> tuple[int, int]:
    """The windows of [lo, hi) (lo a window's start) that teach covers
    whole and may make known, as (first, n): from the first, those with
    no block in left (unknown to C and not taught, but not zeros)."""
    end = hi if hi == nblocks else hi - hi % TEACH_WINDOW  # a window cut short by the volume's end is whole
    n = 0
    for w_lo in range(lo, end, TEACH_WINDOW):
        if any(w_lo <= b < w_lo + TEACH_WINDOW for b in left):
            break
        n += 1
    return lo // TEACH_WINDOW, n


def write(pool, vid: int, offset: int, data) -> bool:
    """Serve a write of the owner thread's in C, as the I/O threads'
    are (the write cache has one owner): True when C took it.  When C
    hands it back, teach C the blocks it did not know and refill its
    reservoir, and try once more if either did something; False leaves
    the write to the Pool (writepath).  Not with the map's lock held (C
    would wait for it)."""
    if not _for_c(pool, offset, len(data)):
        return False
    if write_in_c(pool, vid, offset, data):
        return True
    taught = teach(pool, vid, offset, len(data))
    if refill(pool) or taught:
        return write_in_c(pool, vid, offset, data)
    return False


def read(pool, vid: int, offset: int, length: int):
    """Serve a read of the owner thread's in C (see write): the bytes,
    or None when the Pool must."""
    if not _for_c(pool, offset, length):
        return None
    got = read_in_c(pool, vid, offset, length)
    if got is None and teach(pool, vid, offset, length):
        got = read_in_c(pool, vid, offset, length)
    return got


def _for_c(pool, offset: int, length: int) -> bool:
    """Whether C may be asked to serve a request of the Pool's: a map to
    ask, not locked by this thread, a pool that has not failed, and a
    request C could serve (the rest, and bad arguments, get the Pool's
    own answer)."""
    return (pool._fm is not None and not pool._fm_depth and not pool._failed
            and offset >= 0 and 0 < length <= MAX_SPAN * BLOCK_SIZE)


def write_in_c(pool, vid: int, offset: int, data) -> bool:
    """Try a write in C again (after teach): True when C served it."""
    try:
        return pool._fm.write(vid, offset, data)
    except OSError as exc:
        raise _failed_in_c(pool, "a write of %d bytes at %d to volume %d" % (len(data), offset, vid), exc) from exc


def read_in_c(pool, vid: int, offset: int, length: int):
    """Try a read in C again (after teach): the bytes, or None."""
    try:
        return pool._fm.read(vid, offset, length)
    except OSError as exc:
        raise _failed_in_c(pool, "a read of %d bytes at %d from volume %d" % (length, offset, vid), exc) from exc


def _failed_in_c(pool, what: str, exc: OSError) -> EngineError:
    """The engine's error for an I/O error C met serving a request."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("the pool's filesystem is full (%s)" % pool.path)
    err = EngineError("%s failed: %s" % (what, exc))
    err.errno = exc.errno
    return err


def changed(pool, vid: int, lid: int, d: Dirty, block: int, pages: int) -> None:
    """Note pages of a block this engine changed (for the log flush)."""
    d.pages |= pages
    pool._unlogged.setdefault(lid, set()).add(block)
    set_clean(pool, vid, False)


def set_clean(pool, vid: int, clean: bool) -> None:
    """Tell C whether it may write the volume's next log flush: only
    while every change to it since its last one came from C (whose table
    has their pages).  With the map's lock held."""
    if pool._fm is not None:
        pool._fm.log_clean(vid, clean)
