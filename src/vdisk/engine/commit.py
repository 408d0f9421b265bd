"""Commits: making the overlay durable in one LMDB transaction.

A commit comes in three steps so that its slow part can run in another
thread while writes go on: `begin()` freezes the overlay into an Epoch (new
writes start a new overlay, which reads through to the frozen one),
`CommitJob.run()` checksums what was written, fdatasyncs the data file and
writes the frozen overlay into the map (`run_job`, in any one thread),
`finish()` publishes the result in the owner's thread.  `commit()` is the
three in a row.  Slots freed by a transaction go to DB_FREE in that
transaction and are allocated again only after it is durable (those a
structural change freed only after they are punched).

Functions of a Pool.  Concurrency contract: see the Pool's docstring;
run_job touches only its frozen epoch, the data file's fdatasync and its
own LMDB write transaction.
"""
from __future__ import annotations

import itertools
import logging
import threading

import typing
from array import array

import lmdb

from . import allocator, fastbridge, layers, native, readpath, structure
from .fastmap import COMMIT_PLAIN, COMMIT_STRUCTURAL
from .lineage import Lineage
from .overlay import Dirty, Epoch, held, overlay_of
from .txn import Tx, held_volumes
from .errors import (
    CommitInFlight,
    EngineError,
    NoSpace,
    PoolFailed,
)
from .format import (
    BLOCK_SIZE,
    DB_BORN,
    DB_DEAD,
    DB_FREE,
    DB_LINEAGE,
    DB_MAP,
    DB_META,
    DB_RECORD,
    DB_SNAP,
    DB_VOLUME,
    FULL_MASK,
    INF,
    ZERO_SLOT,
    birth_val,
    born_key,
    dead_key,
    jenc,
    map_key,
    map_key_decode,
    map_val,
    map_val_full,
    mask_runs,
    PAGE,
    slot_offset,
    u64,
    u64_decode,
)

if typing.TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger(__name__)


class CommitJob:
    """One commit between begin_commit() and finish_commit().

    run() may be called from another thread (see the module docstring) and
    never raises: the outcome is kept for finish_commit().
    """

    def __init__(self, pool: "Pool", epoch: Epoch, change):
        self.pool = pool
        self.epoch = epoch
        self.change = change
        self.tx: "Tx | None" = None
        self.result = None
        self.error: BaseException | None = None
        self.map_full = False
        self.done = False
        self.to_punch: list[int] = []  # freed slots the caller punches (finish_commit)
        self.zeroed = None  # _zeroed_plan, once the job ran

    def blocks(self) -> int:
        """How many blocks the job makes durable."""
        return sum(len(d) for d in self.epoch.dirty.values())

    def run(self) -> None:
        try:
            run_job(self.pool, self)
        except BaseException as exc:  # noqa: BLE001 - handed to finish_commit
            self.error = exc
        self.done = True


def commit(pool, change=None):
    """Make every write so far durable, plus `change(tx)` if given.

    change is called inside the LMDB write transaction with a `Tx`; it may
    raise EngineError to abort (nothing is changed then).  May be called
    again after a MapFull retry, so it must act only through tx.
    Returns change's result.  Blocks on fdatasync and LMDB's fsync.
    Raises CommitInFlight while a job from begin_commit() is unfinished.
    """
    if pool.commit_via is not None and threading.get_ident() != pool._owner:
        return pool.commit_via(change)
    if pool._failed:
        raise PoolFailed(pool._failed)
    if pool._inflight is not None:
        raise CommitInFlight(
            "a commit is running in the background; wait for it to finish, then try again"
        )
    if change is None and not pool.pending():
        return None
    job = begin(pool, change)
    job.run()
    return finish(pool, job)


def commit_meta(pool, change=None):
    """Make the staged catalogue records durable, and `change(tx)` if
    given, in one small LMDB transaction of their own: the data file is
    not synced, the overlay not frozen, the intent log stays in its
    generation.  Returns change's result.

    For what no block depends on: records, and changes that touch no
    block (a volume's creation or growth, marked with txn.touches_no_block):
    a crash after it replays the log's records over it, and each names
    a volume that existed, at a block inside its size, when it was
    written.  Writes so far stay in the overlay, durable as before
    (their fsync's record, or the next commit).  From another thread
    than the owner's it goes through commit_via (meta=True), which runs
    it in the owner's thread.  Falls back to a full commit (commit())
    where it cannot run alone: outside the owner thread without
    commit_via, while a commit is in flight (whose frozen records it
    could overwrite with older ones), or for a change not marked so.
    """
    if change is not None and not getattr(change, "touches_no_block", False):
        return commit(pool, change)
    if change is None and not pool.catalogue.pending():
        return None  # nothing to make durable (and nothing to wait for in the owner's thread)
    if threading.get_ident() != pool._owner:
        if pool.commit_via is not None:
            return pool.commit_via(change, meta=True)
        return commit(pool, change)
    if pool._inflight is not None:
        return commit(pool, change)
    if pool._failed:
        raise PoolFailed(pool._failed)
    grow_map_if_needed(pool)
    with pool.catalogue.lock:
        staged = pool.catalogue.freeze()
    try:
        for _ in range(8):
            try:
                with pool.env.begin(write=True) as txn:
                    tx = Tx(pool, txn)
                    result = None
                    if change is not None:
                        pool._change_tx = tx
                        try:
                            result = change(tx)
                        finally:
                            pool._change_tx = None
                    if tx.frees:
                        raise EngineError("a change marked as touching no block freed slots")
                    _write_meta(pool, tx, staged)
                break
            except lmdb.MapFullError:
                grow_map(pool, force=True)  # no transaction is open: safe here
            except lmdb.Error as exc:
                _raise_no_space(exc)
                raise
        else:  # pragma: no cover
            raise NoSpace("LMDB map cannot grow enough")
    except BaseException:
        pool.catalogue.unfreeze(staged)
        raise
    pool.catalogue.committed(staged)
    _publish(pool, tx)
    if pool._fm is not None and (tx.vols or tx.lins):
        fastbridge.sync_volumes(pool)  # new volumes, new sizes: no head changes
    return result


def begin(pool, change=None) -> CommitJob:
    """Freeze the overlay into a job whose run() makes it durable.

    Writes after this go to a new overlay, which reads through to the
    frozen one; they are made durable by the next commit.  Only one job
    may be in flight.  Must be called with no LMDB transaction open in
    this process (it may grow the map).
    """
    if pool._failed:
        raise PoolFailed(pool._failed)
    if pool._inflight is not None:
        raise CommitInFlight("a commit is already in flight")
    # fsyncs go on during a commit (their records in the log's next
    # generation), but for those of the volumes it changes (ep.held), or
    # of all when it does not say which; a record of a volume must then
    # carry the blocks written before the freeze that no record holds
    # yet, which the commit makes durable only once it is
    held = held_volumes(change)
    state = COMMIT_PLAIN if change is None else COMMIT_STRUCTURAL
    fm = pool._fm
    if fm is not None:
        # The instant of the freeze, for C's writes as for ours, in one
        # hold of C's lock: the log's next generation, C's next epoch, the
        # held volumes' fsyncs said no to.  Then, without the lock, the
        # drain's records of the epoch it froze join the overlay before
        # it is frozen here (C's writes since wait in the drain).
        unclean = [vid for vid in held or () if vid in pool._fm_heads]
        log_gen, before = fm.freeze(pool.intent.handle, held is not None, state, unclean,
                                    locked=bool(pool._fm_depth))
        try:
            fastbridge.drain(pool, before)
        except BaseException:  # no commit after all: C and the log go on as before
            fm.commit_failed(pool.intent.handle, locked=bool(pool._fm_depth))
            raise
    else:
        log_gen = pool.intent.freeze(records=held is not None)
    # free slots beyond the durable high-water mark must be recorded
    # free; the reservoir's count as free for this commit
    beyond = pool._committed_hwm
    free_back = list(itertools.takewhile(lambda s: s >= beyond, pool._free_cache))
    free_back += pool._reserved_beyond
    with pool.catalogue.lock:
        ep = Epoch(pool._dirty, pool._epoch_alloc, pool._hwm, free_back, pool.catalogue.freeze())
        pool._dirty, pool._ndirty, pool._dirty_pages, pool._epoch_alloc = {}, 0, 0, set()
    ep.held = held if held is not None else frozenset()  # (all: no records at all)
    ep.log_gen = log_gen
    pool._unlogged_frozen = pool._unlogged if pool.intent.usable else {}
    pool._unlogged = {}
    pool._inflight = ep
    try:
        grow_map_if_needed(pool)
    except BaseException:
        with pool._fast():
            _unfreeze(pool, ep)
        raise
    return CommitJob(pool, ep, change)


def run_job(pool, job: CommitJob) -> None:
    """The blocking part of a commit: see CommitJob.run()."""
    ep = job.epoch
    _finish_checksums(pool, ep)
    sync_data(pool)
    pool._punching.difference_update(job.to_punch)  # a retry (MapFull) frees again
    job.to_punch = []
    try:
        with pool.env.begin(write=True) as txn:
            tx = Tx(pool, txn)
            _apply_dirty(pool, tx, ep)
            tx.change_frees_from = len(tx.frees)  # the change's own frees follow
            result = None
            if job.change is not None:
                pool._change_tx = tx
                try:
                    result = job.change(tx)
                finally:
                    pool._change_tx = None
                # The change's frees are punched once it is durable, and
                # must not be allocated before: the owner thread may scan
                # DB_FREE the moment this transaction commits, before
                # finish_commit runs.  (Set operations are atomic.)
                job.to_punch = sorted(tx.frees[tx.change_frees_from :])
                pool._punching.update(job.to_punch)
            _finish_tx(pool, tx, ep)
    except lmdb.MapFullError:
        job.map_full = True
        return
    except lmdb.Error as exc:
        _raise_no_space(exc)
        raise
    job.tx, job.result = tx, result


def _raise_no_space(exc: lmdb.Error) -> None:
    """Raise NoSpace for an LMDB error that says the filesystem is full."""
    if "No space" in str(exc) or "ENOSPC" in str(exc):
        raise NoSpace("the pool's filesystem is full: %s" % exc) from exc


def sync_data(pool) -> None:
    """fdatasync the data file; a failure fails the pool (the kernel
    reports a lost write once: nothing may sync this file as if all
    were well after it).  Any thread; raises PoolFailed."""
    try:
        pool.file.sync()
    except OSError as exc:
        pool._failed = (
            "syncing %s failed (%s); the pool refuses I/O until the daemon is "
            "restarted, which recovers the last durable state" % (pool.file.path, exc)
        )
        if pool._fm is not None:
            pool._fm.set_failed(True)
        raise PoolFailed(pool._failed) from exc


def write_out(pool) -> None:
    """Make what was written to the data file so far durable, without a
    commit (a background commit's first step, in a worker thread: the
    commit that follows then has little left to sync, and a structural
    one, which fsyncs wait for, holds them less).  Any thread: it touches no
    pool state but the failure flag.  Raises PoolFailed."""
    if pool._failed:
        raise PoolFailed(pool._failed)
    sync_data(pool)


def finish(pool, job: CommitJob, punch: bool = True):
    """Publish a job that ran (in this thread again); returns change's
    result or raises its error.  A failed job's writes go back into the
    overlay (newer writes win), so a later commit retries them.

    The slots a structural change freed go back to the filesystem
    (punch_slots): here, outside the fast path's lock, when punch is
    true; otherwise they are left in job.to_punch and not allocated
    until the caller has punched them (in any thread, since punching
    can wait on the filesystem's journal for seconds) and called
    punched().  They are kept from the allocator from the moment the
    job's transaction commits (_run_job)."""
    assert job.done and pool._inflight is job.epoch
    try:
        result = _finish(pool, job)
    except BaseException:
        pool._punching.difference_update(job.to_punch)  # nothing was freed
        job.to_punch = []
        raise
    if punch and job.to_punch:
        punch_slots(pool, job.to_punch)
        punched(pool, job.to_punch)
        job.to_punch = []
    return result


def punch_slots(pool, slots: list[int]) -> None:
    """Give freed slots (ascending) back to the filesystem.  Slots freed by
    overwrites are not punched: the next writes reuse them, and punching
    would only make the filesystem allocate again.  Any thread: it
    touches only the data file, and the slots are not allocated meanwhile."""
    for start, count in allocator.runs(slots):
        try:
            pool.file.punch(slot_offset(start), count * BLOCK_SIZE)
        except OSError as exc:  # space is reused anyway; only du suffers
            log.warning("punching freed slots %d+%d failed: %s", start, count, exc)


def punched(pool, slots: list[int]) -> None:
    """The slots finish_commit(punch=False) left are punched: they may be
    allocated from now on."""
    pool._punching.difference_update(slots)
    pool._free_scan = b""


def _finish(pool, job: CommitJob):
    for _ in range(8):
        if not job.map_full:
            break
        grow_map(pool, force=True)  # no transaction is open: safe here
        job.map_full, job.done = False, False
        job.run()
    else:  # pragma: no cover
        job.error = job.error or NoSpace("LMDB map cannot grow enough")
    if job.error is not None:
        with pool._fast():
            _unfreeze(pool, job.epoch)
        raise job.error
    job.zeroed = _zeroed_plan(pool, job.epoch)
    if pool._fm is not None and (job.zeroed or _heads_change(pool, job.tx)):
        # C's writes so far must be in the overlay (the lock's drain) and
        # no more may come until C knows: for _absorb over a block found
        # all zeros, and for a volume whose head changes or goes (the
        # drain would take C's writes to the old head for the new one's)
        with pool._fast():
            return _publish_job(pool, job)
    return _publish_job(pool, job)


def _heads_change(pool, tx: Tx) -> bool:
    """Whether a transaction deletes a volume or gives it another head."""
    return any(v is None or vid not in pool._vols or v["lid"] != pool._vols[vid]["lid"] for vid, v in tx.vols.items())


def _publish_job(pool, job: CommitJob):
    """A job's commit is durable: the pool takes it on, then C (one hold
    of its lock, FastMap.commit_done)."""
    ep = job.epoch
    pool._inflight = None
    pool.catalogue.committed(ep.records)
    _forget_zeroed(pool, ep, job.zeroed)  # before their slots can be reused
    logged = _after_commit(pool, job.tx, ep)
    if pool._fm is None:
        pool.intent.retire(ep.log_gen)  # and no commit in flight
        return job.result
    # C's part in one hold of its lock (FastMap.commit_done): the log's
    # records before the freeze are obsolete, the volumes C may log again
    # are clean, the volumes told again if the commit changed them, the
    # blocks it made backed entries may flip
    ops, gone = fastbridge.volume_ops(pool) if job.tx.vols or job.tx.lins else ((), ())
    vid_of = _served(pool)
    clean = [vid_of[lid] for lid in logged if lid in vid_of]
    backed = array("Q")
    for lid, recs in ep.backed.items():
        vid = vid_of.get(lid)
        if vid is not None:
            backed.extend((vid, len(recs) // 3))
            backed.extend(recs)
    pool._fm.commit_done(pool.intent.handle, ep.log_gen, clean, ops, gone, backed, locked=bool(pool._fm_depth))
    return job.result


def _unfreeze(pool, ep: Epoch) -> None:
    """Put a frozen epoch that was not committed back under the overlay."""
    pool._inflight = None
    pool._unlogged_frozen = {}  # its blocks are all unlogged again (below)
    if pool._fm is None:
        pool.intent.thaw()
    else:
        # (the blocks told below are told as not durable)
        pool._fm.commit_failed(pool.intent.handle, locked=True)
        for vid in pool._fm_heads:  # the merged-back blocks are ours
            fastbridge.set_clean(pool, vid, False)
    _forget_zeroed(pool, ep, _zeroed_plan(pool, ep))
    for slot in ep.zeroed:  # never durable: give them back
        ep.alloc.discard(slot)
        pool._free_cache.append(slot)
    ep.zeroed = []
    ep.zeroed_at = []
    vid_of = _served(pool)
    for lid, frozen in ep.dirty.items():
        live = overlay_of(pool._dirty, lid)
        unlogged = pool._unlogged.setdefault(lid, set())
        vid = vid_of.get(lid)
        for block, d in frozen.items():
            if block not in live:
                live[block] = d
                pool._ndirty += 1
                # the job checksummed it, but a fresh slot may be written
                # in place again from now on (by C too)
                d.crc_ok = d.slot == ZERO_SLOT
                if vid is not None:
                    # C took it as frozen (read-only) at the freeze: a copy
                    # of it on write would read through to a slot that the
                    # overlay, once it drains that copy, holds no more
                    fastbridge.tell(pool, vid, lid, block, d)
            else:
                ld = live[block]
                if ld.back:
                    # C flipped it again (pages it had not flipped in the
                    # frozen epoch): all the flips are since the commit now
                    ld.flip |= d.flip
                    if vid is not None:
                        fastbridge.tell(pool, vid, lid, block, ld)
                elif d.back and ld.slot != ZERO_SLOT and ld.have != FULL_MASK:
                    # a partial entry over the flipped block: it takes the
                    # rest as the flips left it (the committed map holds
                    # older pages in those places)
                    with pool.env.begin(db=pool._db[DB_MAP]) as txn:
                        data = readpath.dirty_block(pool, txn.cursor(), lid, block, d, live=False)
                    _absorb(pool, vid, lid, block, ld, data)
                elif d.have == FULL_MASK and ld.have != FULL_MASK:
                    # the live entry was written over it: it takes the rest now
                    _absorb(pool, vid, lid, block, ld, d.slot)
                if d.slot != ZERO_SLOT and d.fresh:
                    ep.alloc.discard(d.slot)  # overwritten since: never durable
                    pool._free_cache.append(d.slot)
            # the log's records are still the valid ones, but which pages
            # changed since them is no longer known: the whole block
            live[block].pages = FULL_MASK
            unlogged.add(block)
    pool._epoch_alloc |= ep.alloc
    pool._free_cache.sort(reverse=True)
    pool.catalogue.unfreeze(ep.records)
    pool.recount_dirty()


def _zeroed_plan(pool, ep: Epoch) -> tuple[array, dict[int, set[int]], dict[int, int]] | None:
    """What _forget_zeroed does, worked out beforehand (without the map's
    lock: ep.zeroed_at is final once the job ran): (the (vid, block, slot)
    triples C forgets, lid -> the blocks found zeros, _served's lid -> vid);
    None if none was."""
    if not ep.zeroed_at:
        return None
    vid_of = _served(pool)
    triples = array("Q")
    blocks: dict[int, set[int]] = {}
    for lid, block, slot in ep.zeroed_at:
        vid = vid_of.get(lid)
        if vid is not None:
            triples.extend((vid, block, slot))
        blocks.setdefault(lid, set()).add(block)
    return triples, blocks, vid_of


def _forget_zeroed(pool, ep: Epoch, plan) -> None:
    """The commit found these blocks all zeros and frees their slots.  C
    must not read them any more as a block's slot; and a live partial entry
    written over one takes zeros for the pages it lacks (_absorb): what it
    read them from is gone, and what the map holds below may be older (the
    last snapshot point's block, which the commit ended in the head).
    plan: _zeroed_plan's, so that the work under the map's lock is one
    call into C and a look at the live entries of those blocks (a commit of
    16384 blocks of zeros held it 12 ms, one call into C per block)."""
    if plan is None:
        return
    triples, zeroed, vid_of = plan
    if pool._fm is not None:
        pool._fm.forget_slots(triples, locked=bool(pool._fm_depth))
    for lid, blocks in zeroed.items():
        live = pool._dirty.get(lid)
        if not live:
            continue
        for block in live.keys() & blocks:
            d = live[block]
            if d.have != FULL_MASK:
                pool._dirty_pages -= held(d)
                _absorb(pool, vid_of.get(lid), lid, block, d, ZERO_SLOT)
                pool._dirty_pages += held(d)


def _served(pool) -> dict[int, int]:
    """lid -> vid of every volume head C serves (none without a FastMap):
    whom to tell about a block the commit changed back."""
    return {v["lid"]: vid for vid, v in pool._vols.items()} if pool._fm is not None else {}


def _absorb(pool, vid: int | None, lid: int, block: int, d: Dirty, below) -> None:
    """A live partial entry written over a whole frozen block (slot below;
    ZERO_SLOT: zeros; or the block's bytes) that will not be committed as
    it was takes the pages it lacks from it, in place: its slot is fresh.
    vid: the head's volume as C serves it (_served), told the entry; None:
    C is not told."""
    if isinstance(below, int):
        data = bytes(BLOCK_SIZE) if below == ZERO_SLOT else pool.file.pread(BLOCK_SIZE, slot_offset(below))
    else:
        data = below
    mv = memoryview(data)
    for first, count in mask_runs(FULL_MASK & ~d.have):
        pool.file.pwrite(mv[first * PAGE : (first + count) * PAGE], slot_offset(d.slot) + first * PAGE)
    d.have, d.crc_ok = FULL_MASK, False
    if vid is not None:
        fastbridge.tell(pool, vid, lid, block, d)


# The checksum of a whole block of zeros: what a flipped block written all
# zeros records (its slots stay the committed entry's, so it does not
# become a zero block).
ZERO_BLOCK_CRC = native.crc32c(bytes(BLOCK_SIZE))


def _finish_checksums(pool, ep: Epoch) -> None:
    """Checksum the blocks written in place since their allocation.  Runs
    in the job's thread: the frozen slots are no longer written.  A
    partial entry's CRC covers its pages (a whole block's, in C)."""
    todo = [(lid, block, d) for lid, dirty in ep.dirty.items() for block, d in dirty.items()
            if d.slot != ZERO_SLOT and not d.crc_ok]
    sums = pool.file.checksum_slots([slot_offset(d.slot) for _, _, d in todo], BLOCK_SIZE,
                                    [d.have for _, _, d in todo])
    for (lid, block, d), (crc, zero) in zip(todo, sums):
        if d.back:  # flipped: its slots stay the committed entry's, zeros or not
            if zero and d.have == FULL_MASK:
                crc = ZERO_BLOCK_CRC  # checksum_slots gives 0, not a checksum, for a whole block of zeros
        elif zero and d.have != FULL_MASK:  # zeros altogether if what it reads through to is
            ep.blank.add((lid, block))
        elif zero:  # ep.alloc keeps it: the other thread's allocator must not see it free yet
            ep.zeroed.append(d.slot)
            ep.zeroed_at.append((lid, block, d.slot))
            d.slot, d.crc, d.fresh = ZERO_SLOT, 0, False
        d.crc, d.crc_ok = crc, True
    # a flipped block's back slot: of the pages not in its mask (format 5)
    flipped = [(lid, block, d) for lid, dirty in ep.dirty.items() for block, d in dirty.items() if d.back]
    sums = pool.file.checksum_slots([slot_offset(d.back) for _, _, d in flipped], BLOCK_SIZE,
                                    [FULL_MASK & ~d.have for _, _, d in flipped])
    ep.back_sums = {(lid, block): ZERO_BLOCK_CRC if zero and d.have == 0 else crc
                    for (lid, block, d), (crc, zero) in zip(flipped, sums)}


def _apply_dirty(pool, tx: Tx, ep: Epoch) -> None:
    """Write the frozen overlay into the map, at each lineage's head
    generation.  The entry it replaces is freed when nothing can read it
    any more: no snapshot point sees it and no partial entry reads
    through to it (structure.release_base), else it dies here.  A
    partial entry over the head's own whole block keeps that block as
    its back slot (a backed entry, docs/format.md)."""
    txn = tx.txn
    mdb = pool._db[DB_MAP]
    cur = txn.cursor(db=mdb)
    for lid, dirty in ep.dirty.items():
        if not dirty:
            continue
        lin = pool._lins[lid]
        gen = lin.gen
        last = lin.last_point()
        has_parent = lin.parent is not None
        for block in sorted(dirty):
            d = dirty[block]
            if (lid, block) in ep.blank and not layers.layers(pool, cur, lid, gen, block):
                # zero pages over zeros (the committed head, which it
                # was written over): the block is zeros (cursor moved:
                # fine, probed below)
                ep.blank.discard((lid, block))
                ep.zeroed.append(d.slot)
                ep.zeroed_at.append((lid, block, d.slot))
                d.slot, d.crc, d.fresh, d.have = ZERO_SLOT, 0, False, FULL_MASK
            whole = d.have == FULL_MASK
            # the current entry of this block in this lineage, if any
            old = None
            probe = map_key(lid, block, gen)
            if cur.set_range(probe):
                k = cur.key()
                if k[:16] == probe[:16]:
                    oslot, odeath, ocrc, omask, oback, obcrc = map_val_full(cur.value())
                    if odeath == INF:
                        old = (map_key_decode(k)[2], oslot, ocrc, omask, oback, obcrc)
            back = back_crc = 0
            if d.back:  # flipped: the committed entry's two slots, kept
                back = d.back
                if old is None or old[1] != d.slot or old[4] != d.back or old[0] <= last:
                    raise EngineError(
                        "lineage %d block %d: a flipped block whose committed entry is not the head's own "
                        "backed one (%r); the commit is refused, nothing changed" % (lid, block, old))
            if old is not None:
                obirth, oslot, ocrc, omask, oback, obcrc = old
                if d.slot == ZERO_SLOT and oslot == ZERO_SLOT:
                    continue  # tombstone stays a tombstone
                if not whole and obirth > last and not d.back:
                    # The head's own entry (no point sees it) is what a
                    # partial one was written over (overlay.under): a whole
                    # block becomes its back slot, and so does its back
                    # slot; a partial one's pages are all in the new
                    # entry, which reads through to what it read
                    # through to.
                    if omask == FULL_MASK:
                        back, back_crc = oslot, ocrc
                    elif oback:
                        back, back_crc = oback, obcrc
                okey = map_key(lid, block, obirth)
                complete = whole or back != ZERO_SLOT  # reads through to nothing
                if obirth == gen or (obirth > last and complete):
                    # nothing will read it: free it now (deferred), but
                    # for what the new entry keeps as its back slot; a
                    # partial new entry at gen reads through to what the
                    # old one read through to
                    txn.delete(okey, db=mdb)
                    txn.delete(born_key(lid, obirth, block), db=pool._db[DB_BORN])
                    tx.frees.extend(s for s in (oslot, oback) if s != ZERO_SLOT and s != back and s != d.slot)
                    if complete and omask != FULL_MASK and not oback:  # what it read through to
                        structure.release_base(pool, tx, lid, block, obirth)
                else:
                    # a snapshot point sees it, or the new partial
                    # entry reads through to it
                    txn.put(okey, map_val(oslot, gen, ocrc, omask, oback, obcrc), db=mdb)
                    txn.delete(born_key(lid, obirth, block), db=pool._db[DB_BORN])
                    txn.put(dead_key(lid, gen, block), birth_val(obirth), db=pool._db[DB_DEAD])
            if d.slot == ZERO_SLOT and not has_parent:
                continue  # absence reads as zeros in a root lineage
            if d.slot == ZERO_SLOT and old is None and not _parent_has(pool, cur, lin, block):
                continue
            if back:  # of its pages the new entry does not hold
                back_crc = ep.back_sums[(lid, block)] if d.back else layers.back_crc(pool, back, d.have)
                backed = ep.backed.get(lid)
                if backed is None:
                    backed = ep.backed[lid] = array("Q")
                backed.extend((block, d.slot, back))
            txn.put(map_key(lid, block, gen), map_val(d.slot, INF, d.crc, d.have, back, back_crc), db=mdb)
            txn.put(born_key(lid, gen, block), b"", db=pool._db[DB_BORN])


def _parent_has(pool, cur, lin: Lineage, block: int) -> bool:
    plid, pgen = lin.parent
    return bool(pool._lookup(cur, plid, pgen, block))


def _finish_tx(pool, tx: Tx, ep: Epoch) -> None:
    txn = tx.txn
    meta, free = pool._db[DB_META], pool._db[DB_FREE]
    committed_hwm = u64_decode(txn.get(b"hwm", db=meta))
    for slot in ep.alloc:
        if slot < committed_hwm:
            txn.delete(u64(slot), db=free)
    hwm = max(ep.hwm, committed_hwm)
    for slot in ep.free_back:
        if slot >= committed_hwm:  # taken from beyond the old hwm, given back
            txn.put(u64(slot), b"", db=free)
    for slot in ep.zeroed:  # allocated, then found to hold only zeros: free
        txn.put(u64(slot), b"", db=free)
    for slot in tx.frees:
        txn.put(u64(slot), b"", db=free)
    txn.put(b"hwm", u64(hwm), db=meta)
    txn.put(b"log_gen", u64(ep.log_gen), db=meta)  # the log's records before the freeze are in here now
    _write_meta(pool, tx, ep.records)


def _write_meta(pool, tx: Tx, staged: dict) -> None:
    """Write what a change staged in tx (counters, lineages, volumes,
    snapshots, catalogue records) and the catalogue records staged
    before it (staged; the change's win) into tx's transaction."""
    txn = tx.txn
    if tx.counters:
        c = dict(pool._counters)
        c.update(tx.counters)
        txn.put(b"counters", jenc(c), db=pool._db[DB_META])
    for lid, lin in tx.lins.items():
        if lid in tx.dropped_lins:
            txn.delete(u64(lid), db=pool._db[DB_LINEAGE])
        else:
            txn.put(u64(lid), jenc(lin.to_json()), db=pool._db[DB_LINEAGE])
    for vid, v in tx.vols.items():
        if v is None:
            txn.delete(u64(vid), db=pool._db[DB_VOLUME])
        else:
            txn.put(u64(vid), jenc(v), db=pool._db[DB_VOLUME])
    for sid, s in tx.snaps.items():
        if s is None:
            txn.delete(u64(sid), db=pool._db[DB_SNAP])
        else:
            txn.put(u64(sid), jenc(s), db=pool._db[DB_SNAP])
    for k, v in list(staged.items()) + list(tx.records.items()):
        if v is None:
            txn.delete(k.encode(), db=pool._db[DB_RECORD])
        else:
            txn.put(k.encode(), jenc(v), db=pool._db[DB_RECORD])


def _after_commit(pool, tx: Tx, ep: Epoch) -> list[int]:
    """The transaction is durable: publish it and let its frees be reused.
    Returns the lineages nothing of which is unlogged any more (their
    volumes' log flushes may be C's again: the caller tells C with the
    log's retiring, FastMap.commit_done)."""
    _publish(pool, tx)
    frozen, pool._unlogged_frozen = pool._unlogged_frozen, {}
    logged = [lid for lid in frozen if not pool._unlogged.get(lid)]
    pool._committed_hwm = max(pool._committed_hwm, ep.hwm)
    if pool._reserved_beyond:  # recorded free by this commit, unless taken since
        pool._reserved_beyond = {s for s in pool._reserved_beyond if s >= pool._committed_hwm}
    # The free cache keeps what it holds (all of it is free, durable or
    # beyond the hwm); once it runs dry, DB_FREE is scanned again from the
    # start, where this commit's frees (ep.zeroed among them) now are.
    pool._free_scan = b""
    return logged


def _publish(pool, tx: Tx) -> None:
    """A durable transaction's lineages, volumes, snapshots and counters
    become the pool's."""
    for lid, lin in tx.lins.items():
        if lid in tx.dropped_lins or lin.head_dead:
            _drop_overlay(pool, lid)
        if lid in tx.dropped_lins:
            pool._lins.pop(lid, None)
        else:
            pool._lins[lid] = lin
    for vid, v in tx.vols.items():
        if v is None:
            pool._vols.pop(vid, None)
        else:
            pool._vols[vid] = v
    for sid, s in tx.snaps.items():
        if s is None:
            pool._snaps.pop(sid, None)
        else:
            pool._snaps[sid] = s
    pool._counters.update(tx.counters)


def _drop_overlay(pool, lid: int) -> None:
    """A lineage's head is gone (the volume was rolled back, reset or
    deleted): the writes to it since the freeze go with it, and their
    fresh slots are free again.  Left in the overlay, the next commit
    would write them into the dead head, where nothing reads or frees
    them.  (C was or is about to be told in the same hold of its lock
    that the volume has another head or none: commit._heads_change.)"""
    dirty = pool._dirty.pop(lid, None)
    pool._unlogged.pop(lid, None)
    if not dirty:
        return
    for d in dirty.values():
        pool._dirty_pages -= held(d)  # not a count of every volume's entries: the map may be locked
        if d.fresh and d.slot != ZERO_SLOT:
            allocator.release_fresh(pool, d.slot)
    pool._ndirty -= len(dirty)


def grow_map_if_needed(pool) -> None:
    if pool.defer_map_growth:
        return
    info, stat = pool.env.info(), pool.env.stat()
    used = (info["last_pgno"] + 1) * stat["psize"]
    if used > info["map_size"] * 0.6:
        grow_map(pool)


def grow_map(pool, force: bool = False) -> None:
    new = pool.env.info()["map_size"] * 2
    log.info("growing the LMDB map of %s to %d MiB", pool.path, new >> 20)
    pool.env.set_mapsize(new)


