"""Reading a volume: what a block of a head or of a snapshot holds, through
the live overlay, an in-flight commit's frozen one and the committed map
(layers.py), teaching the C fast path what it reads (fastbridge.py).

Functions of a Pool, in its owner thread; the head's reads hold the map's
lock (Pool._fast) while they look at the overlay."""
from __future__ import annotations

from . import fastbridge, layers, overlay
from .errors import NotFound
from .format import BLOCK_SIZE, DB_MAP, FULL_MASK, ZERO_SLOT, slot_offset
from .overlay import Dirty


def dirty_block(pool, cur, lid: int, block: int, d: Dirty, live: bool = True) -> bytes | None:
    """The block an overlay entry stands for (None: zeros): its slot's
    pages, and for a partial one the rest from what it covers
    (overlay.under).  live: d is the live overlay's (else an in-flight
    commit's)."""
    if d.slot == ZERO_SLOT:
        return None
    data = pool.file.pread(BLOCK_SIZE, slot_offset(d.slot))
    if d.have == FULL_MASK:
        return data
    if d.back:  # flipped: the rest is in its back slot
        out = bytearray(pool.file.pread(BLOCK_SIZE, slot_offset(d.back)))
        layers.copy_pages(out, data, d.have)
        return out
    out = layers.assemble(pool, overlay.under(pool, cur, lid, block, live), where(lid, block), need=FULL_MASK & ~d.have)
    layers.copy_pages(out, data, d.have)
    return out


def where(lid: int, block: int) -> str:
    """Where a block is, for error messages."""
    return "lineage %d block %d" % (lid, block)


def head_block(pool, lid: int, block: int) -> bytes | None:
    """A block of a lineage's head as durable or about to be: the frozen
    overlay of an in-flight commit first, then the committed map."""
    frozen = pool._inflight_dirty(lid)
    d = frozen.get(block) if frozen else None
    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
        cur = txn.cursor()
        if d is not None:
            return dirty_block(pool, cur, lid, block, d, live=False)
        return chain_block(pool, cur, lid, pool._lins[lid].gen, block)


def chain_block(pool, cur, lid: int, gen: int, block: int) -> bytes | None:
    chain = layers.layers(pool, cur, lid, gen, block)
    if not chain:
        return None
    return layers.assemble(pool, chain, where(lid, block))


def read(pool, vid: int, offset: int, length: int) -> bytearray:
    """Read from a volume's head.  Reads beyond the end are short (EOF)."""
    got = fastbridge.read(pool, vid, offset, length)  # C, taught what it did not know
    if got is not None:
        return got
    if pool._fm is not None:
        pool.served_here["reads"] += 1
    with pool._fast():
        vol = pool._vols.get(vid)
        if vol is None:
            raise NotFound("volume %d does not exist" % vid)
        length = max(0, min(length, vol["size"] - offset))
        lid = vol["lid"]
        return read_view(
            pool,
            lid, pool._lins[lid].gen, offset, length, pool._dirty.get(lid), pool._inflight_dirty(lid), vid
        )


def read_snapshot(pool, sid: int, offset: int, length: int) -> bytearray:
    s = pool.snapshot_info(sid)
    length = max(0, min(length, s["size"] - offset))
    return read_view(pool, s["lid"], s["gen"], offset, length, None, None)


def read_view(pool, lid: int, gen: int, offset: int, length: int, dirty, frozen, vid=None) -> bytearray:
    """dirty, frozen: the live overlay and an in-flight commit's (or None).
    Returns the buffer it filled (no copy into bytes: FUSE takes it as is).
    vid: the head's volume, whose mappings the fast path learns here
    (whole-block ones only: C knows nothing of partial entries)."""
    fm = pool._fm if vid is not None else None
    out = bytearray(length)
    pos = 0
    txn = cur = None
    try:
        while pos < length:
            block, intra = divmod(offset + pos, BLOCK_SIZE)
            n = min(BLOCK_SIZE - intra, length - pos)
            d = dirty.get(block) if dirty else None
            live = d is not None
            if not live and frozen:
                d = frozen.get(block)
            if txn is None and (d is None or d.have != FULL_MASK):
                txn = pool.env.begin(db=pool._db[DB_MAP])
                cur = txn.cursor()
            if d is not None:
                if d.slot == ZERO_SLOT:
                    pass
                elif d.have == FULL_MASK:
                    out[pos : pos + n] = pool.file.pread(n, slot_offset(d.slot) + intra)
                else:
                    out[pos : pos + n] = memoryview(dirty_block(pool, cur, lid, block, d, live))[intra : intra + n]
                if fm is not None and live:  # after the read, which verified what is below
                    fastbridge.tell(pool, vid, lid, block, d, cur if d.have != FULL_MASK else None)
                elif fm is not None:
                    view = fastbridge.frozen_view(pool, cur, lid, block, d)
                    if view is not None:
                        fm.add(vid, block, *view)
            else:
                chain = layers.layers(pool, cur, lid, gen, block)
                slot = layers.single(chain)
                if slot is None:  # partial entries: pages from several slots
                    data = layers.assemble(pool, chain, where(lid, block))
                    out[pos : pos + n] = memoryview(data)[intra : intra + n]
                elif slot != ZERO_SLOT:
                    if n < BLOCK_SIZE and slot in pool._verified:
                        out[pos : pos + n] = pool.file.pread(n, slot_offset(slot) + intra)
                    else:
                        data = layers.checked(pool, slot, FULL_MASK, chain[0][2], where(lid, block))
                        out[pos : pos + n] = memoryview(data)[intra : intra + n]
                if fm is not None:  # verified (or zeros): C may serve it from now on
                    fastbridge.tell_committed(pool, vid, lid, gen, block, chain, cur)
            pos += n
    finally:
        if txn is not None:
            txn.abort()
    return out
