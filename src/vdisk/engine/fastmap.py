"""Python face of csrc/fastmap.c: the engine's C fast path.

A FastMap caches, for each (volume, block), the slot the engine would read
right now, and holds a reservoir of free slots, so that one I/O thread can
serve reads, in-place writes and copy-on-write of 64 KiB blocks in C
without the GIL.  The Pool keeps it in step (`Pool.attach_fast`); the FUSE
layer only passes requests to `io_functions()` and falls back to the Pool
when they return -EAGAIN.  See docs/architecture.md, "The fast path".

Concurrency contract: the mutators (set, forget, ...) must be called with
`lock()` held, by the thread that owns the Pool; add_many, discard,
sync_volumes, freeze, commit_done and commit_failed take the lock
themselves (unless locked=True: the caller holds it), so that no Python
runs while the engine holds it; drain, reservoir_add and reservoir_take take
C's inner mutex themselves and may be called without it, and so do grow and
trim (the owner's thread only: they change the table, a chunk at a time).  `read` and `write`
(and the C functions behind `io_functions()`) take the lock for reading and
may be called from any one thread at a time; they block on the data file's
pread/pwrite, and on the lock while the Pool holds it.
"""
from __future__ import annotations

import errno
from array import array

from .native import ffi, lib

EAGAIN = -errno.EAGAIN
READ_ONLY, WRITABLE, WRITABLE_REPORT = 0, 1, 2
DRAIN_BATCH = 4096
DRAIN_WORDS = lib.VD_FM_DRAIN_WORDS  # one drain record (csrc/fastmap.h)
# the drain's (vid, FLUSHED, 0, 0): C wrote the volume's changes drained
# before it to the intent log (csrc/fastmap.h)
FLUSHED = lib.VD_FM_FLUSHED
# the drain's crc word: this bit, and the new partial slot's checksum below it
CRC_KNOWN = lib.VD_FM_CRC_KNOWN
FULL = 0xFFFF  # every page of a block (have)
COALESCE_PAGES = lib.VD_FM_COALESCE_PAGES  # see csrc/fastmap.h
# FastMap.freeze's state: no commit in flight, a plain one, one with a structural change
COMMIT_NONE, COMMIT_PLAIN, COMMIT_STRUCTURAL = 0, 1, 2
MAX_SPAN = lib.VD_FM_MAX_SPAN  # the most blocks one request served in C spans
# the table of cached blocks: trimmed (trim) once it holds more than this
# many entries, so that it never needs more than VD_FM_MAX_CAP positions
# (88 MiB, csrc/fastmap.h)
TRIM_AT = lib.VD_FM_TRIM_AT
# C knows a volume by windows of this many blocks (16 MiB): in a known one,
# a block C does not hold reads as zeros (add_many's windows)
WINDOW = 1 << lib.VD_FM_WINDOW_SHIFT
# positions of the table C outgrew that one grow() moves (in chunks of 4096,
# between which the I/O threads go on): the rest at the next refill
GROW_BUDGET = 1 << 16


VOL_WORDS = lib.VD_FM_VOL_WORDS  # one record of sync_volumes' ops
VOL_POINTS, VOL_CLEAN, VOL_NEW = lib.VD_FM_VOL_POINTS, lib.VD_FM_VOL_CLEAN, lib.VD_FM_VOL_NEW
VOL_SHARE, VOL_UNSHARE = lib.VD_FM_VOL_SHARE, lib.VD_FM_VOL_UNSHARE


# add()'s defaults from have on (add_many)
_ADD_DEFAULTS = (FULL, 0, False, FULL, 0, FULL, 0, (), 0)


def _words(values) -> tuple:
    """(a uint64_t array C reads, its length) of a sequence of integers
    (an array('Q') is passed as it is, without a copy)."""
    if not isinstance(values, array):
        values = array("Q", values)
    if not values:
        return ffi.NULL, 0
    return ffi.from_buffer("uint64_t[]", values), len(values)


def _records(ops) -> tuple:
    """_words of sync_volumes' ops, with their count of records."""
    words, n = _words(ops)
    return words, n // VOL_WORDS


class FastMap:
    def __init__(self, data_fd: int, event_fd: int = -1, reservoir: int = 4096):
        self.reservoir_target = reservoir
        # C asks for a refill once a quarter of the reservoir is used, so
        # that the Pool has time to refill before it runs dry
        self._fm = lib.vd_fm_new(data_fd, event_fd, reservoir * 3 // 4)
        if self._fm == ffi.NULL:
            raise MemoryError("vdisk fast path: cannot allocate its block table")
        self._out = ffi.new("uint64_t[]", DRAIN_BATCH * DRAIN_WORDS)

    def close(self) -> None:
        if self._fm is not None:
            lib.vd_fm_free(self._fm)
            self._fm = None

    # ------------------------------------------------------------ engine side

    def lock(self) -> None:
        lib.vd_fm_lock(self._fm)

    def unlock(self) -> None:
        lib.vd_fm_unlock(self._fm)

    def set(self, vid: int, block: int, slot: int, writable: int, have: int = FULL, base: int = 0,
            bhave: int = FULL, base2: int = 0, bhave2: int = FULL, base3: int = 0, unverified=(),
            back: int = 0, flip: int = 0, held: int = 0) -> None:
        """The overlay maps the block to slot now (0: zeros).  writable: a
        fresh slot, written in place; READ_ONLY, WRITABLE (the engine knows
        the block changed since its volume's log flush) or WRITABLE_REPORT
        (C reports the next write in the drain).  have: the pages the slot
        holds; the others read from slot base (0: zeros) if in bhave, else
        from slot base2 if in bhave2, else from slot base3 (layers.below).
        unverified: the committed slots
        of the view not verified since the pool was opened, as (slot,
        mask, crc) layers: C verifies each against its checksum before it
        reads from it.  back, flip: a flipped block (Dirty.back, Dirty.flip):
        the pages not in have are in slot back, those of flip were flipped
        since its commit, those of held in the epoch of the commit in
        flight (C flips them again only once it is durable)."""
        lib.vd_fm_set(self._fm, vid, block, slot, writable, have, base, bhave, base2, bhave2, base3,
                      self._expect(unverified), back, flip, held)

    def add(self, vid: int, block: int, slot: int, have: int = FULL, base: int = 0, shared: bool = False,
            bhave: int = FULL, base2: int = 0, bhave2: int = FULL, base3: int = 0, unverified=(),
            back: int = 0) -> bool:
        """A mapping looked up in the committed map, kept unless a newer one
        is known (the same mapping added again with no unverified layers
        clears C's flag; see set for `unverified`).  shared: the head reads
        the block as its last snapshot point does (a copy-on-write may
        write only the pages written).  back: the entry is a backed one the
        head owns, over that back slot (base): C may flip it.  True when
        the entry was added."""
        return lib.vd_fm_add(self._fm, vid, block, slot, have, base, int(shared), bhave, base2, bhave2, base3,
                             self._expect(unverified), back) > 0

    def add_many(self, vid: int, entries, locked: bool = False, windows: tuple[int, int] = (0, 0)) -> int:
        """add() for many blocks of a volume in one hold of the lock,
        which it takes (unless locked): entries are add()'s arguments after
        vid, as tuples (block, slot, have, base, shared, bhave, base2,
        bhave2, base3, unverified, back; the trailing ones may be left
        out).  windows: (first, n) windows of WINDOW blocks that C knows
        whole once the entries are in (every block of them the map, at any
        generation of the lineage or those it was made from, or the
        overlay has is known to C: the rest read as zeros for the head and
        its points), unless an entry found no room.  Returns how many
        entries were added."""
        recs = array("Q")
        for e in entries:
            block, slot, have, base, shared, bhave, base2, bhave2, base3, unverified, back = (
                e + _ADD_DEFAULTS[len(e) - 2 :])
            recs.extend((block, slot, have, base, int(shared), bhave, base2, bhave2, base3, back, len(unverified)))
            for x in unverified:
                recs.extend(x)
        return lib.vd_fm_add_many(self._fm, int(locked), vid, *_words(recs), *windows)

    def discard(self, vid: int, blocks, locked: bool = False) -> bool:
        """Make whole blocks of a volume read as zeros, in one hold of the
        lock, which it takes (unless locked): each goes into the drain as
        (vid, block, 0, FULL, ...), in order with C's writes around it,
        and into the volume's next log record written in C (as reading
        zeros, or whole once written again).  False, having changed
        nothing, when C cannot (the volume is not served, no memory)."""
        return lib.vd_fm_discard(self._fm, int(locked), vid, *_words(blocks)) == 0

    def _expect(self, layers) -> int:
        """Give C the checksums of the unverified layers ((slot, mask,
        crc) each) so that it verifies them itself: 1 if there are any."""
        for slot, mask, crc in layers:
            lib.vd_fm_expect(self._fm, slot, crc, mask)
        return int(bool(layers))

    def unknown(self, vid: int, first: int, n: int) -> list[int]:
        """The blocks of [first, first + n) the table does not know (the
        engine's thread, without the lock)."""
        words = ffi.new("uint64_t[]", (n + 63) // 64)
        lib.vd_fm_unknown(self._fm, vid, first, n, words)
        return [first + i for i in range(n) if words[i // 64] >> (i % 64) & 1]

    def forget(self, vid: int, block: int) -> None:
        """Know nothing of the block: its requests go to the engine."""
        lib.vd_fm_forget(self._fm, vid, block)

    def forget_slots(self, triples, locked: bool = False) -> None:
        """Know nothing of each block of (vid, block, slot) triples (an
        array('Q') of them, flat) whose entry has that slot, in one call:
        one hold of the lock, which it takes unless locked."""
        lib.vd_fm_forget_slots(self._fm, int(locked), *_words(triples))

    # The engine's holds of the lock at a commit, each one call into C that
    # takes the lock, does all of it and lets go (csrc/fastmap.h): no
    # Python runs while the engine holds it.  locked: this thread holds the
    # lock already (lock()).

    def sync_volumes(self, ops, gone=(), locked: bool = False) -> None:
        """Tell C the volumes the engine serves: ops, an array('Q') of
        (vid, head lineage, size, how) records, how of VOL_* bits; gone,
        the volumes no longer served."""
        lib.vd_fm_sync_volumes(self._fm, int(locked), *_records(ops), *_words(gone))

    def freeze(self, log, records: bool, state: int, unclean=(), locked: bool = False) -> tuple[int, int]:
        """The overlay is frozen for a commit (vd_fm_freeze): the intent
        log (IntentLog.handle) freezes, a new epoch starts, state
        (COMMIT_PLAIN or COMMIT_STRUCTURAL) is in flight, the volumes of
        unclean are not clean.  Returns (the generation the commit records,
        how many of the drain's records are the frozen epoch's: the next
        drain's first)."""
        gen = ffi.new("uint64_t *")
        before = lib.vd_fm_freeze(self._fm, int(locked), log, int(records), state, *_words(unclean), gen)
        return gen[0], before

    def commit_done(self, log, gen: int, clean=(), ops=(), gone=(), backed=(), locked: bool = False) -> None:
        """The commit of the last freeze is durable (vd_fm_commit_done):
        the log retires to gen, the volumes of clean are clean, the volumes
        are told (ops, gone: see sync_volumes), backed, an array('Q') of
        (vid, n, then n (block, slot, back slot) triples) per volume, may
        flip; no commit is in flight."""
        lib.vd_fm_commit_done(self._fm, int(locked), log, gen, *_words(clean), *_records(ops), *_words(gone),
                              *_words(backed))

    def commit_failed(self, log, locked: bool = False) -> None:
        """The commit of the last freeze failed: the log goes on in its
        generation, no commit is in flight."""
        lib.vd_fm_commit_failed(self._fm, int(locked), log)

    def log_epoch(self, vid: int) -> None:
        """The volume's writes so far are in the intent log: the next write
        to each block is reported in the drain again, and its page mask
        starts over."""
        lib.vd_fm_log_epoch(self._fm, vid)

    def mask(self, vid: int, block: int) -> int:
        """The 4 KiB pages of the block C wrote since the volume's last log
        epoch (a bit per page)."""
        return lib.vd_fm_mask(self._fm, vid, block)

    def clear(self) -> None:
        """Forget the cached mappings (with the lock held)."""
        lib.vd_fm_clear(self._fm)

    def trim(self, at: int = TRIM_AT, budget: int = GROW_BUDGET) -> bool:
        """Once the table holds more than `at` entries, forget those not
        set in this epoch (a cache: the engine teaches C again what
        requests need), budget positions of the table per call (from the
        last call's on), a chunk per hold of C's inner mutex, so that the
        I/O threads go on: True while a trim is under way (call again),
        False once it is done, or when there was nothing to do (or the
        table is growing).  The Pool's thread, without the lock
        (vd_fm_trim)."""
        return lib.vd_fm_trim(self._fm, at, budget) == 1

    def entries(self) -> int:
        return lib.vd_fm_entries(self._fm)

    def grow(self, budget: int = GROW_BUDGET) -> bool:
        """Grow C's table ahead of need, and move at most budget positions
        of the table it outgrew (vd_fm_grow): True when it grew or moved
        some, False when there was nothing to do.  False also when memory
        is short: the table then grows when a write needs it (or that
        write goes to the Pool).  The Pool's thread, without the lock."""
        return lib.vd_fm_grow(self._fm, budget) == 1

    def drain(self, limit: int | None = None) -> list[tuple[int, int, int, int, int, int, int]]:
        """(vid, block, slot, have, back, flip, crc) of every block given a
        new slot in C, written for the first time since its volume's log
        flush, or whose slot now holds more pages (have), or flipped
        (back: its back slot, else 0), or written in place after a record
        that gave its checksum (crc: CRC_KNOWN | the checksum of a new
        partial slot, else 0), and (vid, FLUSHED, 0, ...) for a log flush
        C wrote; oldest first.  limit: at most that many (the frozen
        epoch's, after freeze)."""
        got = []
        out = self._out
        while limit is None or len(got) < limit:
            want = DRAIN_BATCH if limit is None else min(DRAIN_BATCH, limit - len(got))
            n = lib.vd_fm_drain(self._fm, out, want)
            w = DRAIN_WORDS
            words = ffi.unpack(out, n * w)  # one conversion for the batch
            got.extend(tuple(words[w * i : w * i + w]) for i in range(n))
            if n < want:
                break
        return got

    def reservoir(self) -> int:
        return lib.vd_fm_reservoir(self._fm)

    def reservoir_add(self, slots: list[int]) -> None:
        """Hand free slots over (any time: C's inner mutex covers it).
        None at all still counts as a refill: the I/O threads waiting for
        one stop waiting and, after their five tries, hand their writes to
        the Pool (a full filesystem) instead of waiting out a second."""
        if lib.vd_fm_reservoir_add(self._fm, ffi.new("uint64_t[]", slots), len(slots)) < 0:
            raise MemoryError("vdisk fast path: cannot grow the reservoir")

    def reservoir_take(self) -> list[int]:
        n = self.reservoir()
        out = ffi.new("uint64_t[]", max(n, 1))
        got = lib.vd_fm_reservoir_take(self._fm, out, n)
        return [out[i] for i in range(got)]

    # ------------------------------------------------------------ intent log

    def set_log(self, intent_log) -> None:
        """Let the fast path's fsync write records through this writer
        (IntentLog.handle), or none (None: every fsync goes to the Pool).
        With the map's lock held, while no I/O thread runs."""
        lib.vd_fm_set_log(self._fm, ffi.NULL if intent_log is None else intent_log)

    def log_clean(self, vid: int, clean: bool) -> None:
        """clean: the engine holds no change of its own to the volume since
        its last log flush, so C may write the next one (map lock held)."""
        lib.vd_fm_log_clean(self._fm, vid, int(clean))

    def fsync(self, vid: int) -> bool:
        """A log flush of the volume in C: True once its writes are durable,
        False when the Pool must flush instead (as for the FUSE layer)."""
        return lib.vd_fm_fsync(self._fm, vid) == 0

    def set_failed(self, failed: bool) -> None:
        """Any thread: refuse fast writes (the pool failed)."""
        lib.vd_fm_set_failed(self._fm, int(failed))

    def stats(self) -> dict:
        out = ffi.new("uint64_t[]", lib.VD_FM_STATS)
        lib.vd_fm_stats(self._fm, out)
        return {"reads": out[0], "writes": out[1], "handed_back": out[2], "copy_on_write": out[3],
                "verified": out[4], "reservoir_waits": out[5], "reservoir_wait_ns": out[6],
                "reservoir_wait_max_ns": out[7], "lock_waits": out[8], "lock_wait_ns": out[9],
                "lock_wait_max_ns": out[10], "lock_holds": out[11], "lock_hold_ns": out[12],
                "lock_hold_max_ns": out[13], "flips": out[14], "trims": out[15], "entries": out[16],
                "table_bytes": out[17], "trim_holds": out[18], "trim_hold_ns": out[19],
                "trim_hold_max_ns": out[20], "scans": out[21]}

    # ------------------------------------------------------------ I/O side

    def read(self, vid: int, offset: int, length: int):
        """Serve a read in C: the bytes, or None when the Pool must."""
        buf = bytearray(length)
        rc = lib.vd_fm_read(self._fm, vid, offset, length, ffi.from_buffer(buf))
        if rc == EAGAIN:
            return None
        if rc < 0:
            raise OSError(-rc, "fast read failed")
        return buf

    def write(self, vid: int, offset: int, data, wait_for_slots: bool = False) -> bool:
        """Serve a write in C: True, or False when the Pool must.
        wait_for_slots: as the I/O threads do (vd_fm_write_io), wait for
        the Pool's refill when the reservoir runs short, a second at a time
        and five times at most; never from the thread that refills."""
        fn = lib.vd_fm_write_io if wait_for_slots else lib.vd_fm_write
        rc = fn(self._fm, vid, offset, len(data), ffi.from_buffer(data))
        if rc == EAGAIN:
            return False
        if rc < 0:
            raise OSError(-rc, "fast write failed")
        return True

    def io_functions(self) -> tuple[int, int, int, int]:
        """(context, read, write and fsync functions) as addresses, for the
        FUSE fast path's C (csrc/fuse_fastpath.c)."""
        return (
            int(ffi.cast("uintptr_t", self._fm)),
            int(ffi.cast("uintptr_t", ffi.addressof(lib, "vd_fm_read"))),
            int(ffi.cast("uintptr_t", ffi.addressof(lib, "vd_fm_write_io"))),
            int(ffi.cast("uintptr_t", ffi.addressof(lib, "vd_fm_fsync"))),
        )
