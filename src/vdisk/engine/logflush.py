"""Making a volume's writes durable through the intent log, and the
replay at open: a log flush gathers the pages of the volume changed since
its last one (the overlay's and C's) into one record that the log's writer
appends (intentlog.py, csrc/intentlog.c).

Functions of a Pool, run in its owner's thread; they block on the log
file's fdatasync.  The log's writer lock (which C's flushes take too, so
that theirs and these take turns) is taken before the map's lock.
"""
from __future__ import annotations

import logging

from . import allocator, fastbridge, intentlog, readpath
from .errors import (
    EngineError,
    FormatError,
    NotFound,
    PoolFailed,
)
from .format import (
    BLOCK_SIZE,
    DB_MAP,
    FULL_MASK,
    LOG_HEADER,
    LOG_MAX_ENTRIES,
    LOG_PAGE,
    ZERO_SLOT,
    mask_pages,
    mask_runs,
    slot_offset,
)

log = logging.getLogger(__name__)


def flush(pool, vid: int) -> bool:
    """Make every write to volume vid so far durable through the intent
    log: one record of the pages changed since the volume's last log
    flush, written at the log's end and fdatasync()ed (one device flush,
    where a commit needs three).  Returns False, having changed nothing
    that matters, when a commit must do it instead: a commit in flight
    that changes this volume (or does not say which volumes it changes:
    txn.held_volumes), more than intentlog.FLUSH_MAX to write, a full
    log, a filesystem too full to grow it (see allocator.spare_bytes), a
    log that failed.

    During a commit that does not change this volume the record goes to
    the log's next generation (IntentLog.freeze) and carries, whole, the
    volume's blocks written before the freeze that no record holds yet:
    the commit makes those durable only once it is, and a crash before
    then replays this record over the map as it was.

    Runs in the owner's thread; blocks on the log file's fdatasync, and
    on a log flush C is writing (vdisk.engine.fastmap.FastMap.fsync).
    The fast path's lock is held only while the pages are gathered."""
    if pool._failed:
        raise PoolFailed(pool._failed)
    with pool.intent as il:  # the writer's lock: C's log flushes and ours take turns
        if not il.usable or (pool._inflight is not None and vid in pool._inflight.held):
            return False
        return _flush(pool, vid)


def _flush(pool, vid: int) -> bool:
    with pool._fast():
        vol = pool._vols.get(vid)
        if vol is None:
            raise NotFound("volume %d does not exist" % vid)
        lid = vol["lid"]
        blocks = pool._unlogged.get(lid, set())
        frozen = pool._unlogged_frozen.get(lid, set())
        if not blocks and not frozen:
            fastbridge.set_clean(pool, vid, True)
            return True
        if len(blocks | frozen) > LOG_MAX_ENTRIES:
            pool.intent.stats["commits_instead"] += 1
            return False
        dirty = pool._dirty.get(lid, {})
        entries, pages, npages = [], [], 0
        for block in sorted(blocks | frozen):
            if block in frozen:
                mask, data = _whole(pool, lid, block)
            else:
                mask, data = _changed(pool, vid, lid, block, dirty[block])
            entries.append((block, mask))
            npages += mask.bit_count()
            if npages * LOG_PAGE > intentlog.FLUSH_MAX:
                pool.intent.stats["commits_instead"] += 1
                return False
            for first, count in mask_runs(mask):
                pages.append(data[first * LOG_PAGE : (first + count) * LOG_PAGE] if data is not None
                             else pool.file.pread(count * LOG_PAGE, slot_offset(dirty[block].slot) + first * LOG_PAGE))
        grow = pool.intent.growth(npages, lambda: allocator.spare_bytes(pool))
        if grow is None:
            # a full log, or a filesystem too full to grow it: commit
            pool.intent.stats["commits_instead"] += 1
            return False
        # from here on the next write to any of these blocks is news
        if pool._fm is not None:
            pool._fm.log_epoch(vid)
        pool._unlogged.pop(lid, None)
        pool._unlogged_frozen.pop(lid, None)
        for block, _ in entries:
            if block in dirty:
                dirty[block].pages = 0
        fastbridge.set_clean(pool, vid, True)
    if not pool.intent.append(vid, entries, pages, grow):
        # what the record held is still in the overlay: commits make it
        # durable from now on
        with pool._fast():
            unlogged = pool._unlogged.setdefault(lid, set())
            for block, _ in entries:
                if block in dirty:
                    dirty[block].pages = FULL_MASK
                    unlogged.add(block)
            if frozen and pool._inflight is not None:
                pool._unlogged_frozen[lid] = frozen
            fastbridge.set_clean(pool, vid, False)
        return False
    return True


def _changed(pool, vid: int, lid: int, block: int, d):
    """A live overlay entry's pages changed since the volume's last record:
    (mask, the block's bytes, or None to read the pages from d's slot)."""
    if d.slot == ZERO_SLOT:
        return 0, None
    mask = d.pages | (pool._fm.mask(vid, block) if pool._fm is not None else 0)
    if not mask:  # a block changed, and no page of it?  The whole is safe
        pool.intent.stats["pages_unknown"] += 1
        mask = FULL_MASK
    if mask & ~d.have:  # partial: the pages it lacks as the view before
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            return mask, readpath.dirty_block(pool, txn.cursor(), lid, block, d)
    return mask, None


def _whole(pool, lid: int, block: int):
    """A block written before the freeze of the commit in flight and held
    by no record: (FULL_MASK, its bytes as the head reads it now), or (0,
    None) when it reads as zeros."""
    d = pool._dirty.get(lid, {}).get(block)
    live = d is not None
    if d is None:
        d = pool._inflight.dirty.get(lid, {}).get(block)
    if d is None:
        raise EngineError("lineage %d block %d was written before the freeze, and neither overlay holds it" % (lid, block))
    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
        data = readpath.dirty_block(pool, txn.cursor(), lid, block, d, live=live)
    return (0, None) if data is None else (FULL_MASK, data)


def replay(pool) -> None:
    """At open: apply the intent log's valid records (IntentLog.valid_records)
    to the heads, as the writes they stand for, then commit them, which
    also retires the log."""
    seq = nbytes = 0
    auto, pool.auto_commit = pool.auto_commit, False  # one commit, at the end
    try:
        for vid, entries, body in pool.intent.valid_records():
            _replay_record(pool, vid, entries, body)
            seq += 1
            nbytes += LOG_HEADER + len(body)
    finally:
        pool.auto_commit = auto
    if seq:
        log.info("%s: replayed %d intent log record(s) (%d bytes)", pool.path, seq, nbytes)
        pool.intent.stats["replayed"] = seq
    if seq or pool.intent.had_records:
        # a generation no record on disk has: the old records are dead
        pool.commit(change=lambda tx: None)


def _replay_record(pool, vid: int, entries, body: bytes) -> None:
    vol = pool._vols.get(vid)
    if vol is None:
        raise FormatError(
            "%s: the intent log has a record for volume %d, which does not exist; "
            "move %s aside to open the pool without them (losing what they hold)"
            % (pool.path, vid, " and ".join(f.path for f in pool.logs))
        )
    size = vol["size"]
    at = 0
    for block, mask in entries:
        base = block * BLOCK_SIZE
        if base >= size:
            raise FormatError("%s: the intent log has block %d beyond the end of volume %d"
                              % (pool.path, block, vid))
        if mask == 0:
            pool.discard(vid, base, min(BLOCK_SIZE, size - base))
            continue
        for p in mask_pages(mask):
            off = base + p * LOG_PAGE
            if off < size:
                pool.write(vid, off, body[at : at + min(LOG_PAGE, size - off)])
            at += LOG_PAGE
