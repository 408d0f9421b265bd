"""Writing a volume's head in the engine, for the writes C hands back (or
every write when no FastMap is attached): fresh slots, copy-on-write of
the pages written, blocks made zeros; the overlay (overlay.Dirty) records
them until a commit or a log flush makes them durable.

Functions of a Pool, in its owner thread, with the map's lock held
(Pool._fast) while they change the overlay."""
from __future__ import annotations

import errno

from . import allocator, fastbridge, layers, native, readpath
from .errors import NoSpace, NotFound, OutOfRange, PoolFailed
from .fastmap import COALESCE_PAGES, MAX_SPAN, READ_ONLY
from .format import BLOCK_SIZE, DB_MAP, FULL_MASK, PAGE, ZERO_SLOT, mask_runs, page_mask, slot_offset
from .mapindex import mapped_blocks
from .overlay import Dirty, Overlay, held, overlay_of, under
from .readpath import head_block, where

ZERO_BLOCK = bytes(BLOCK_SIZE)
# The most bytes of a write the write cache in C is asked to serve at once
# (aligned runs of this size).
C_SPAN = MAX_SPAN * BLOCK_SIZE
# Commit on our own once this many blocks are dirty (bounds memory and the
# amount of unflushed data, like a disk's write cache).
DIRTY_LIMIT = 1024


def check_range(size: int, offset: int, length: int, what: str) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise OutOfRange(
            "%s of %d bytes at offset %d is beyond the end of the volume (%d bytes)"
            % (what, length, offset, size)
        )


def write(pool, vid: int, offset: int, data) -> None:
    """Write to a volume's head.  Durable only after `commit()` or a
    `log_flush()` of the volume.  The write cache in C serves what it can
    (fastbridge.write, at most C_SPAN bytes at a time), this module the
    rest.

    Raises OutOfRange beyond the end, NoSpace when the pool is full.
    """
    if pool._failed:
        raise PoolFailed(pool._failed)
    vol = pool._vols.get(vid)
    if vol is None:
        raise NotFound("volume %d does not exist" % vid)
    mv = memoryview(data)
    check_range(vol["size"], offset, len(mv), "write")
    pos = 0
    while pos < len(mv):
        at = offset + pos
        end = min(len(mv), at - at % C_SPAN + C_SPAN - offset)
        if not fastbridge.write(pool, vid, at, mv[pos:end]):
            _write_here(pool, vid, at, mv[pos:end])
        pos = end
    if pool.auto_commit and pool._inflight is None and pool.dirty_blocks() >= DIRTY_LIMIT:
        pool.commit()


def _write_here(pool, vid: int, offset: int, mv: memoryview) -> None:
    """Write into the overlay in Python, with the map's lock held."""
    if pool._fm is not None:
        pool.served_here["writes"] += 1
    with pool._fast():
        lid = pool._vols[vid]["lid"]
        dirty = overlay_of(pool._dirty, lid)
        pos = 0
        while pos < len(mv):
            block, intra = divmod(offset + pos, BLOCK_SIZE)
            n = min(BLOCK_SIZE - intra, len(mv) - pos)
            write_block(pool, vid, lid, dirty, block, intra, mv[pos : pos + n])
            pos += n


# A discard makes this many blocks zeros at a time, holding the map's lock
# (about 1 ms), so that the writers of every disk go on in between.
DISCARD_BATCH = 256


def discard(pool, vid: int, offset: int, length: int) -> None:
    """Make a range read as zeros and free what it held (punch-hole).

    Only the blocks of the range that may hold data now (the overlay's,
    an in-flight commit's, or those the committed map has in the
    volume's lineage or one it was made from: mapindex.mapped_blocks)
    are written; the rest read as zeros already.  So a discard costs what
    the range holds, not its size: mkfs discarding a new 32 TiB disk takes
    a few seeks, not 500 million overlay entries.

    The committed map is looked up without the map's lock (the lock
    guards C's table and the overlay, not LMDB; only this thread changes
    what the map says of the head).  The whole blocks are made zeros by C
    (FastMap.discard), DISCARD_BATCH at a time, each batch one hold of
    its lock in C with no Python under it, so that C's I/O threads, every
    disk's, go on between batches (a request holding 2 GiB held them all
    for the whole of it, once); the overlay takes them in from the drain.
    Without C, or when C cannot, the Pool makes them zeros itself, a
    batch under the lock.  A block the range covers in part gets zeros
    written, by C if it can.  Writes racing the discard to the same
    blocks land before or after it, block by block, as on a real disk."""
    if pool._failed:
        raise PoolFailed(pool._failed)
    vol = pool._vols.get(vid)
    if vol is None:
        raise NotFound("volume %d does not exist" % vid)
    check_range(vol["size"], offset, length, "discard")
    if length == 0:
        return
    lid = vol["lid"]
    end = offset + length
    first, last = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
    with pool.env.begin() as txn:
        found = mapped_blocks(pool, txn, lid, first, last)
    fastbridge.drain_light(pool)  # C's writes so far are in the overlay
    dirty = overlay_of(pool._dirty, lid)
    found.update(dirty.blocks_in(first, last))
    frozen = pool._inflight_dirty(lid)
    if frozen:
        found.update(frozen.blocks_in(first, last))
    # the range's ends may cover part of a block: zeros are written there
    ends = {b for b in (first, last - 1) if b in found and (b * BLOCK_SIZE < offset or (b + 1) * BLOCK_SIZE > end)}
    whole = sorted(found - ends)
    fm = pool._fm
    for i in range(0, len(whole), DISCARD_BATCH):
        batch = whole[i : i + DISCARD_BATCH]
        # in C, one hold of its lock: the overlay takes them in from the
        # drain, in order with C's writes (fastbridge.drain); else here
        if fm is None or not fm.discard(vid, batch, locked=bool(pool._fm_depth)):
            with pool._fast():
                dirty = overlay_of(pool._dirty, lid)
                for block in batch:
                    set_zero(pool, vid, lid, dirty, block)
    for block in sorted(ends):
        start = max(offset, block * BLOCK_SIZE)
        _zero_part(pool, vid, start, min(end, (block + 1) * BLOCK_SIZE) - start)


def _zero_part(pool, vid: int, start: int, n: int) -> None:
    """Zeros written over part of a block (a discard's end), by C if it
    can, else here."""
    zeros = memoryview(ZERO_BLOCK)[:n]
    if not fastbridge.write(pool, vid, start, zeros):
        _write_here(pool, vid, start, zeros)


def set_zero(pool, vid: int, lid: int, dirty: dict, block: int) -> None:
    if pool._fm is not None:  # before the slot can be reused
        pool._fm.set(vid, block, ZERO_SLOT, READ_ONLY)
    d = fastbridge.make_zero(pool, dirty, block)
    fastbridge.changed(pool, vid, lid, d, block, FULL_MASK)


def write_block(pool, vid: int, lid: int, dirty: dict, block: int, intra: int, chunk: memoryview) -> None:
    """Write into one block.  Checksums of what is written here are
    computed at commit (commit._finish_checksums, in the commit's thread when
    the daemon runs commits in a worker), not per write.

    Sub-block copy-on-write: a block that reads as a whole block now
    (the head's own, committed or in a commit in flight, or what its
    last snapshot point or its parent sees) gets a fresh slot holding
    only the pages written, a partial overlay entry (Dirty.have) over
    it.  A block the head owns in part is copied with its pages.  Once
    a slot over the head's own block would hold more than
    COALESCE_PAGES, the whole block is copied instead (what was below
    is freed at commit).  A block that reads as zeros is written
    whole."""
    d = dirty.get(block)
    if d is not None and d.back:
        d = _unflip(pool, vid, lid, dirty, block, d)
    full = len(chunk) == BLOCK_SIZE
    wmask = page_mask(intra, len(chunk))
    if d is not None and d.fresh:
        # Allocated since the last commit: nothing durable points here
        # (the intent log holds copies of what it needs).
        had = d.have
        if full:
            if native.is_zero(chunk):
                set_zero(pool, vid, lid, dirty, block)
                return
            pool.file.pwrite(chunk, slot_offset(d.slot))
            d.have = FULL_MASK
        else:
            if wmask & ~d.have:
                fill_edges(pool, lid, block, d.slot, d.have, intra, len(chunk))
            pool.file.pwrite(chunk, slot_offset(d.slot) + intra)
            d.have |= wmask
        grown = wmask & ~had
        pool._dirty_pages += (d.have & ~had).bit_count()
        d.crc_ok = False
        fastbridge.changed(pool, vid, lid, d, block, wmask)
        if pool._fm is not None and grown:  # C must know what the slot holds now
            fastbridge.tell(pool, vid, lid, block, d)
        return
    # The new slot holds the pages written and those of the head's own
    # partial entry (own_mask); the rest reads from below it (overlay.under).
    # Over a whole block (the head's own, or its last point's) only the
    # pages written are written.  A block that reads as zeros now is
    # written whole.
    zeros = d is not None  # a dirty zero block
    own_mask = 0
    may_coalesce = False  # the head owns the block: a whole copy frees what is below at commit
    if not zeros and not full:
        frozen = pool._inflight_dirty(lid)
        f = frozen.get(block) if frozen else None
        if f is not None:
            zeros = f.slot == ZERO_SLOT
            may_coalesce = True
            own_mask = 0 if f.have == FULL_MASK else f.have
        else:
            with pool.env.begin(db=pool._db[DB_MAP]) as txn:
                lin = pool._lins[lid]
                state, oslot, omask = layers.head_state(txn.cursor(), lid, lin.gen, lin.last_point(), block)[:3]
            if state == "dead" or (state == "own" and oslot == ZERO_SLOT):
                zeros = True
            elif state == "own":
                may_coalesce = True
                own_mask = 0 if omask == FULL_MASK else omask
    if full or zeros or (may_coalesce and (own_mask | wmask).bit_count() > COALESCE_PAGES):
        if full:
            buf = chunk
        else:
            if zeros:
                buf = bytearray(ZERO_BLOCK)
            else:  # coalesce: the whole block as it reads now
                with pool.env.begin(db=pool._db[DB_MAP]) as txn:
                    buf = layers.assemble(pool, under(pool, txn.cursor(), lid, block), where(lid, block))
            buf[intra : intra + len(chunk)] = chunk
        if native.is_zero(buf):
            set_zero(pool, vid, lid, dirty, block)
            return
        if d is None and full and pool._lins[lid].points:
            # Rewriting a block with what it already holds must not make the
            # snapshot that shares it diverge (its billed size would grow).
            old = head_block(pool, lid, block)
            if old is not None and native.diff_sectors(old, buf)[0] == 0:
                return
        slot = new_slot(pool, buf, FULL_MASK)
        have = FULL_MASK
    else:
        # sub-block copy-on-write: the head's own pages, the rest of the
        # pages written in part as below, and the new ones
        buf = bytearray(BLOCK_SIZE)
        need = own_mask | (wmask & ~_covered(intra, len(chunk)))
        if need:
            with pool.env.begin(db=pool._db[DB_MAP]) as txn:
                layers.assemble(pool, under(pool, txn.cursor(), lid, block), where(lid, block),
                                out=buf, need=need)
        buf[intra : intra + len(chunk)] = chunk
        have = own_mask | wmask
        slot = new_slot(pool, buf, have)
    if d is None:
        pool._ndirty += 1
        d = dirty[block] = Dirty(slot, 0, False, True, 0, have)
    else:
        pool._dirty_pages -= held(d)
        d.slot, d.crc, d.crc_ok, d.fresh, d.have = slot, 0, False, True, have
    pool._dirty_pages += held(d)
    # the rest of the block is as the log's replay finds it: the head as
    # committed (no record of this generation has it), or zeros that a
    # record has (FULL_MASK until that record is written)
    fastbridge.changed(pool, vid, lid, d, block, wmask)
    if pool._fm is not None:
        fastbridge.tell(pool, vid, lid, block, d)


def _unflip(pool, vid: int, lid: int, dirty: dict, block: int, d: Dirty) -> Dirty:
    """A block C flipped (Dirty.back), written here: it becomes a fresh
    whole copy (the commit then frees both of the committed entry's
    slots).  Flips are C's alone: this path is rare (C handed the write
    back)."""
    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
        buf = readpath.dirty_block(pool, txn.cursor(), lid, block, d)
    slot = new_slot(pool, buf, FULL_MASK)
    pool._dirty_pages -= held(d)
    d.slot, d.crc, d.crc_ok, d.fresh, d.have, d.back, d.flip = slot, 0, False, True, FULL_MASK, 0, 0
    d.pages = FULL_MASK  # its log record must carry what the flips wrote too
    pool._dirty_pages += held(d)
    fastbridge.changed(pool, vid, lid, d, block, FULL_MASK)
    if pool._fm is not None:
        fastbridge.tell(pool, vid, lid, block, d)
    return d


def new_slot(pool, buf, have: int) -> int:
    """A fresh slot holding the pages of have from buf (a whole block)."""
    slot = allocator.alloc(pool)
    try:
        if have == FULL_MASK:
            pool.file.pwrite(buf, slot_offset(slot))
        else:
            mv = memoryview(buf)
            for first, count in mask_runs(have):
                pool.file.pwrite(mv[first * PAGE : (first + count) * PAGE], slot_offset(slot) + first * PAGE)
    except OSError as exc:
        allocator.release_fresh(pool, slot)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace("the pool's filesystem is full (%s)" % pool.path) from exc
        raise
    return slot


def fill_edges(pool, lid: int, block: int, slot: int, have: int, intra: int, length: int) -> None:
    """Before a write of [intra, intra + length) into a partial fresh
    slot: the pages it touches in part and the slot lacks get the rest
    of their contents from the view before the head's generation."""
    edges = page_mask(intra, length) & ~have & ~_covered(intra, length)
    if not edges:
        return
    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
        buf = layers.assemble(pool, under(pool, txn.cursor(), lid, block), where(lid, block), need=edges)
    mv = memoryview(buf)
    for first, count in mask_runs(edges):
        pool.file.pwrite(mv[first * PAGE : (first + count) * PAGE], slot_offset(slot) + first * PAGE)


def _covered(intra: int, length: int) -> int:
    """The pages of a block that bytes [intra, intra + length) cover whole."""
    first = -(-intra // PAGE)
    end = (intra + length) // PAGE
    return ((1 << end) - 1) & ~((1 << first) - 1) if end > first else 0
