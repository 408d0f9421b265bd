"""The storage pool: volumes, copy-on-write snapshots and the block map.

A pool is one data directory holding an LMDB environment (the block map and
every record) and one data file of 64 KiB slots.  It knows nothing of FUSE or
of the cloud; see docs/architecture.md and docs/format.md.

Model (ZFS-like birth generations, flat map):

* A *lineage* is a chain of generations of one volume's contents.  Writes are
  born at the lineage's current generation G; a snapshot records the point
  s = G and bumps G.  A map entry (lineage, block, birth) -> (slot, death,
  crc) is visible at generation g when birth <= g < death; live entries have
  death = INF.  Overwriting a block that some snapshot point still sees sets
  the old entry's death instead of freeing it (and indexes it in DB_DEAD);
  otherwise the old slot is freed.  Snapshot creation is O(1).
* A lineage may have a parent point (lineage, gen): blocks it never wrote are
  read from there.  Clones and rollbacks create such child lineages, so no
  slot is ever owned by two entries and no refcounts are needed.  A parent
  point is *pinned* while a child needs it; a pinned snapshot that the user
  deletes is kept hidden until the last child goes.
* Deleting a snapshot point frees the entries only it saw, found through
  DB_DEAD (by death) and DB_BORN (by birth): work in proportion to what
  changed, not to the volume's size.

Durability: writes land in fresh slots (never over a slot the committed map
references) and in an in-memory overlay.  `commit()` fdatasyncs the data file,
then writes the overlay to LMDB in one synchronous transaction.  Slots freed by
a transaction go to DB_FREE in that same transaction and are only allocated
again after it committed, so a crash can never leave the map pointing at
reused data.

A commit comes in three steps so that its slow part can run in another
thread while writes go on: `begin_commit()` freezes the overlay into an
Epoch (new writes start a new overlay, which reads through to the frozen
one), `CommitJob.run()` does the fdatasync and the LMDB transaction, and
`finish_commit()` publishes the result.  `commit()` is the three in a row.

The Pool itself holds the state and the write path; the rest lives in
modules of functions over it: commit.py (commits), allocator.py (free
slots), fastbridge.py (keeping the C fast path in step), logflush.py (the
intent log's flushes and replay), catalogue.py (catalogue records),
structure.py (volumes, snapshots, rollback), reports.py and scrub.py.

Concurrency contract: a Pool is used from one thread, except
`CommitJob.run()`, which may run in one other thread at a time: it touches
only its frozen epoch, the data file's fdatasync and its own LMDB write
transaction, never the live overlay or the allocator.  While a job is in
flight, structural changes (`commit(change)` and everything that calls it)
raise CommitInFlight: finish the job first.  Every method may block on disk
I/O; `commit()` and everything that calls it block on fdatasync and an LMDB
fsync.
"""
from __future__ import annotations

import errno
import logging
import os
import threading

import lmdb

from . import allocator, commit, fastbridge, layers, logflush, native, reports, scrub, structure, trim
from .blockio import DataFile
from .catalogue import Catalogue
from .intentlog import IntentLog
from .lineage import Lineage
from .overlay import Dirty, Epoch, held
from .txn import Tx
from .fastmap import COALESCE_PAGES, READ_ONLY
from .errors import (
    EngineError,
    FormatError,
    NoSpace,
    NotFound,
    OutOfRange,
    PoolFailed,
)
from .format import (
    BLOCK_SIZE,
    DATA_FILE,
    DB_BORN,
    DB_DEAD,
    DB_FREE,
    DB_LINEAGE,
    DB_MAP,
    DB_META,
    DB_RECORD,
    DB_SNAP,
    DB_VOLUME,
    FORMAT_VERSION,
    FULL_MASK,
    LMDB_DIR,
    LOG_FILE,
    READABLE_VERSIONS,
    ZERO_SLOT,
    jdec,
    jenc,
    mask_runs,
    PAGE,
    page_mask,
    slot_offset,
    u64,
    u64_decode,
)

log = logging.getLogger(__name__)

ZERO_BLOCK = bytes(BLOCK_SIZE)
INITIAL_MAP_SIZE = 256 << 20
# Commit on our own once this many blocks are dirty (bounds memory and the
# amount of unflushed data, like a disk's write cache).
DIRTY_LIMIT = 1024
# How many slots the verified-once set remembers (about 64 MiB of memory at
# most); it starts over when full.
VERIFIED_MAX = 1 << 20


class Pool:
    """A vdisk storage pool in one directory.  See the module docstring."""

    @staticmethod
    def exists(path: str) -> bool:
        """Whether path holds a pool (opening one that does not creates it)."""
        return os.path.exists(os.path.join(path, LMDB_DIR, "data.mdb"))

    def __init__(self, path: str, datafile_factory=DataFile, map_size: int | None = None, commit_via=None):
        self.path = path
        # commit_via(change) -> result: how a commit asked for from another
        # thread than the owner's (the one that opened the pool) is run; the
        # daemon passes one that marshals it back to the trio thread, which
        # freezes the overlay and runs it like its own.  None: in the caller.
        self.commit_via = commit_via
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._failed: str | None = None
        lmdb_path = os.path.join(path, LMDB_DIR)
        existing = os.path.exists(os.path.join(lmdb_path, "data.mdb"))
        if map_size is None:
            map_size = INITIAL_MAP_SIZE
            if existing:
                map_size = max(map_size, os.path.getsize(os.path.join(lmdb_path, "data.mdb")))
        self.env = lmdb.open(
            lmdb_path,
            map_size=map_size,
            max_dbs=16,
            subdir=True,
            sync=True,
            metasync=True,
            mode=0o600,
            readahead=False,
            lock=True,
        )
        self._db = {
            name: self.env.open_db(name)
            for name in (DB_META, DB_MAP, DB_DEAD, DB_BORN, DB_FREE, DB_LINEAGE, DB_VOLUME, DB_SNAP, DB_RECORD)
        }
        self._check_format(existing)
        self.file = datafile_factory(os.path.join(path, DATA_FILE))
        self.log = datafile_factory(os.path.join(path, LOG_FILE))
        self._load()
        logflush.replay(self)

    # ------------------------------------------------------------ open/close

    def _check_format(self, existing: bool) -> None:
        with self.env.begin(write=True, db=self._db[DB_META]) as txn:
            v = txn.get(b"format_version")
            if v is None:
                if existing and txn.get(b"hwm") is not None:
                    raise FormatError("%s: LMDB has no format_version; not a vdisk pool" % self.path)
                txn.put(b"format_version", u64(FORMAT_VERSION))
                txn.put(b"block_size", u64(BLOCK_SIZE))
                txn.put(b"hwm", u64(1))
                txn.put(b"counters", jenc({}))
                return
            ver = u64_decode(v)
            if ver not in READABLE_VERSIONS:
                raise FormatError(
                    "%s: on-disk format version %d, this vdisk reads versions %s; "
                    "use a vdisk release that matches the pool"
                    % (self.path, ver, ", ".join(map(str, READABLE_VERSIONS)))
                )
            bs = u64_decode(txn.get(b"block_size"))
            if bs != BLOCK_SIZE:
                raise FormatError("%s: block size %d, this vdisk uses %d" % (self.path, bs, BLOCK_SIZE))
            if ver < FORMAT_VERSION:
                # 1 -> 2 adds the intent log, whose generation starts at 0
                # (absent); 2 -> 3 partial entries, whose mask a 20-byte
                # value lacks (whole).  An older vdisk refuses the pool from
                # now on.
                log.info("upgrading %s from format version %d to %d", self.path, ver, FORMAT_VERSION)
                txn.put(b"format_version", u64(FORMAT_VERSION))

    def _load(self) -> None:
        with self.env.begin() as txn:
            self._hwm = u64_decode(txn.get(b"hwm", db=self._db[DB_META]))
            self._committed_hwm = self._hwm
            self._counters = jdec(txn.get(b"counters", db=self._db[DB_META]))
            self._lins = {
                u64_decode(k): Lineage.from_json(u64_decode(k), jdec(v))
                for k, v in txn.cursor(db=self._db[DB_LINEAGE])
            }
            self._vols = {u64_decode(k): jdec(v) for k, v in txn.cursor(db=self._db[DB_VOLUME])}
            self._snaps = {u64_decode(k): jdec(v) for k, v in txn.cursor(db=self._db[DB_SNAP])}
            g = txn.get(b"log_gen", db=self._db[DB_META])
        # The intent log (see log_flush and intentlog.py)
        self.intent = IntentLog(self.log, u64_decode(g) if g is not None else 0)
        self._unlogged: dict[int, set[int]] = {}  # lid -> blocks changed since their log flush
        self._dirty: dict[int, dict[int, Dirty]] = {}
        self._ndirty = 0
        self._dirty_pages = 0  # overlay.held() summed over _dirty: the write cache's fill
        self._inflight: Epoch | None = None  # frozen by begin_commit, not yet finished
        self._change_tx: Tx | None = None  # the transaction whose change is running
        # Committed slots whose checksum was verified since the pool was
        # opened: a partial read of one reads only what it needs.  A slot
        # leaves the set when it is allocated again.
        self._verified: set[int] = set()
        # write() commits by itself at DIRTY_LIMIT; a daemon that runs commits
        # in a worker thread turns this off and watches dirty_blocks() itself
        self.auto_commit = True
        self._owner = threading.get_ident()
        # True while another thread may hold an LMDB transaction: growing
        # the map (mdb_env_set_mapsize) is only safe with none open anywhere
        # in the process, so pre-emptive growth waits.
        self.defer_map_growth = False
        self._epoch_alloc: set[int] = set()  # slots allocated since the last commit
        self._free_cache: list[int] = []  # free slots ready to allocate (descending)
        self._free_scan: bytes | None = b""  # where to continue scanning DB_FREE
        self.catalogue = Catalogue(self)  # staged catalogue records
        # The C fast path (attach_fast): a cache of the head's mapping that
        # an I/O thread reads and writes through, and the free slots it
        # holds for copy-on-write (neither free nor in _epoch_alloc here).
        self._fm = None
        self._fm_held = None  # the map fastbridge.FastLock locked
        self._fast_lock = fastbridge.FastLock(self)  # one for all: its state is _fm_depth
        self._fm_depth = 0
        # vid -> (head lineage, generation, last snapshot point) as the map was told (fastbridge.sync_volumes)
        self._fm_heads: dict[int, tuple[int, int, int]] = {}
        self._reserved: set[int] = set()
        self._reserved_beyond: set[int] = set()  # those beyond the durable hwm
        self._punching: set[int] = set()  # freed, being punched: not allocated yet (finish_commit)

    def close(self) -> None:
        """Commit everything and close.  May block on fsync."""
        if self.env is None:
            return
        try:
            if self._failed is None:
                self.commit()
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """Close without committing: what a crash does (used by tests)."""
        if self._fm is not None:  # the data file closes: C must not touch it
            self._fm.lock()
            self._fm.set_failed(2)
            self._fm.set_log(None)
            self._fm.unlock()
            self._fm = None
        if self.env is not None:
            self.intent.close()
            self.file.close()
            self.log.close()
            self.env.close()
            self.env = None

    # ------------------------------------------------------------ accessors

    def _lineage(self, lid: int) -> Lineage:
        return self._lins[lid]

    def _volume(self, vid: int):
        return self._vols.get(vid)

    def _snapshot(self, sid: int):
        return self._snaps.get(sid)

    def volume_size(self, vid: int) -> int:
        v = self._vols.get(vid)
        if v is None:
            raise NotFound("volume %d does not exist" % vid)
        return v["size"]

    def volumes(self) -> dict[int, dict]:
        return {k: dict(v) for k, v in self._vols.items()}

    def snapshot_info(self, sid: int) -> dict:
        s = self._snaps.get(sid)
        if s is None or s.get("deleted"):
            raise NotFound("snapshot %d does not exist" % sid)
        return dict(s)

    # ------------------------------------------------------------ fast path (fastbridge.py)

    def attach_fast(self, fm) -> None:
        """Keep a FastMap in step with this pool from now on (fastbridge.attach)."""
        fastbridge.attach(self, fm)

    def detach_fast(self) -> None:
        """Stop keeping the FastMap in step (fastbridge.detach)."""
        fastbridge.detach(self)

    def refill_fast(self) -> int:
        """Take in what C wrote and top its reservoir up (fastbridge.refill)."""
        return fastbridge.refill(self)

    def _fast(self) -> "fastbridge.FastLock":
        return self._fast_lock

    # ------------------------------------------------------------ lookups

    def _lookup(self, cur, lid: int, gen: int, block: int) -> tuple:
        """The entries that make up block at (lid, gen) in the committed map
        (layers.layers): equal tuples mean the same contents."""
        return tuple(layers.layers(self, cur, lid, gen, block))

    def _note_verified(self, slot: int) -> None:
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified.add(slot)

    def _inflight_dirty(self, lid: int):
        return self._inflight.dirty.get(lid) if self._inflight is not None else None

    def _dirty_block(self, cur, lid: int, block: int, d: Dirty, live: bool = True) -> bytes | None:
        """The block an overlay entry stands for (None: zeros): its slot's
        pages, and for a partial one the rest from what it covers
        (_under).  live: d is the live overlay's (else an in-flight
        commit's)."""
        if d.slot == ZERO_SLOT:
            return None
        data = self.file.pread(BLOCK_SIZE, slot_offset(d.slot))
        if d.have == FULL_MASK:
            return data
        out = layers.assemble(self, self._under(cur, lid, block, live), self._where(lid, block), need=FULL_MASK & ~d.have)
        layers.copy_pages(out, data, d.have)
        return out

    def _under(self, cur, lid: int, block: int, live: bool = True) -> list:
        """What an overlay entry of lid's head reads the pages it lacks
        from, as a chain of layers (layers.layers): for the live overlay,
        an in-flight commit's entry over the committed head; for that
        commit's, the committed head (at the head's generation: its own
        entry if it has one, else what its last point sees).  The overlay's
        slots carry no checksum yet (crc None: not verified)."""
        frozen = self._inflight_dirty(lid) if live else None
        f = frozen.get(block) if frozen else None
        if f is not None and f.slot == ZERO_SLOT:
            return []
        if f is not None and f.have == FULL_MASK:
            return [(f.slot, FULL_MASK, None)]
        committed = layers.layers(self, cur, lid, self._lins[lid].gen, block)  # only when it is read
        return committed if f is None else [(f.slot, f.have, None)] + committed

    @staticmethod
    def _where(lid: int, block: int) -> str:
        return "lineage %d block %d" % (lid, block)

    def _head_block(self, lid: int, block: int) -> bytes | None:
        """A block of a lineage's head as durable or about to be: the frozen
        overlay of an in-flight commit first, then the committed map."""
        frozen = self._inflight_dirty(lid)
        d = frozen.get(block) if frozen else None
        with self.env.begin(db=self._db[DB_MAP]) as txn:
            cur = txn.cursor()
            if d is not None:
                return self._dirty_block(cur, lid, block, d, live=False)
            return self._chain_block(cur, lid, self._lins[lid].gen, block)

    def _chain_block(self, cur, lid: int, gen: int, block: int) -> bytes | None:
        chain = layers.layers(self, cur, lid, gen, block)
        if not chain:
            return None
        return layers.assemble(self, chain, self._where(lid, block))

    # ------------------------------------------------------------ I/O

    def _check_range(self, size: int, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > size:
            raise OutOfRange(
                "%s of %d bytes at offset %d is beyond the end of the volume (%d bytes)"
                % (what, length, offset, size)
            )

    def read(self, vid: int, offset: int, length: int) -> bytearray:
        """Read from a volume's head.  Reads beyond the end are short (EOF)."""
        # a read C handed back for blocks it did not know: teach it them
        # (and the window around them), and let it serve the read after all
        if self._fm is not None and fastbridge.teach(self, vid, offset, length):
            got = fastbridge.read_in_c(self, vid, offset, length)
            if got is not None:
                return got
        with self._fast():
            vol = self._vols.get(vid)
            if vol is None:
                raise NotFound("volume %d does not exist" % vid)
            length = max(0, min(length, vol["size"] - offset))
            lid = vol["lid"]
            return self._read(
                lid, self._lins[lid].gen, offset, length, self._dirty.get(lid), self._inflight_dirty(lid), vid
            )

    def read_snapshot(self, sid: int, offset: int, length: int) -> bytearray:
        s = self.snapshot_info(sid)
        length = max(0, min(length, s["size"] - offset))
        return self._read(s["lid"], s["gen"], offset, length, None, None)

    def _read(self, lid: int, gen: int, offset: int, length: int, dirty, frozen, vid=None) -> bytearray:
        """dirty, frozen: the live overlay and an in-flight commit's (or None).
        Returns the buffer it filled (no copy into bytes: FUSE takes it as is).
        vid: the head's volume, whose mappings the fast path learns here
        (whole-block ones only: C knows nothing of partial entries)."""
        fm = self._fm if vid is not None else None
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
                    txn = self.env.begin(db=self._db[DB_MAP])
                    cur = txn.cursor()
                if d is not None:
                    if d.slot == ZERO_SLOT:
                        pass
                    elif d.have == FULL_MASK:
                        out[pos : pos + n] = self.file.pread(n, slot_offset(d.slot) + intra)
                    else:
                        out[pos : pos + n] = memoryview(self._dirty_block(cur, lid, block, d, live))[intra : intra + n]
                    if fm is not None and live:  # after the read, which verified what is below
                        fastbridge.tell(self, vid, lid, block, d, cur if d.have != FULL_MASK else None)
                    elif fm is not None:
                        view = fastbridge.frozen_view(self, cur, lid, block, d)
                        if view is not None:
                            fm.add(vid, block, *view)
                else:
                    chain = layers.layers(self, cur, lid, gen, block)
                    slot = layers.single(chain)
                    if slot is None:  # partial entries: pages from several slots
                        data = layers.assemble(self, chain, self._where(lid, block))
                        out[pos : pos + n] = memoryview(data)[intra : intra + n]
                    elif slot != ZERO_SLOT:
                        if n < BLOCK_SIZE and slot in self._verified:
                            out[pos : pos + n] = self.file.pread(n, slot_offset(slot) + intra)
                        else:
                            data = layers.checked(self, slot, FULL_MASK, chain[0][2], self._where(lid, block))
                            out[pos : pos + n] = memoryview(data)[intra : intra + n]
                    if fm is not None:  # verified (or zeros): C may serve it from now on
                        fastbridge.tell_committed(self, vid, lid, gen, block, chain, cur)
                pos += n
        finally:
            if txn is not None:
                txn.abort()
        return out

    def write(self, vid: int, offset: int, data) -> None:
        """Write to a volume's head.  Durable only after `commit()` or a
        `log_flush()` of the volume.

        Raises OutOfRange beyond the end, NoSpace when the pool is full.
        """
        if self._failed:
            raise PoolFailed(self._failed)
        # a write C handed back for blocks it did not know: teach it them,
        # and let it serve the write after all
        if self._fm is not None and fastbridge.teach(self, vid, offset, len(data)):
            if fastbridge.write_in_c(self, vid, offset, data):
                return
        with self._fast():
            vol = self._vols.get(vid)
            if vol is None:
                raise NotFound("volume %d does not exist" % vid)
            mv = memoryview(data)
            self._check_range(vol["size"], offset, len(mv), "write")
            lid = vol["lid"]
            dirty = self._dirty.setdefault(lid, {})
            pos = 0
            while pos < len(mv):
                block, intra = divmod(offset + pos, BLOCK_SIZE)
                n = min(BLOCK_SIZE - intra, len(mv) - pos)
                self._write_block(vid, lid, dirty, block, intra, mv[pos : pos + n])
                pos += n
            if self._ndirty >= DIRTY_LIMIT and self.auto_commit and self._inflight is None:
                self.commit()

    def discard(self, vid: int, offset: int, length: int) -> None:
        """Make a range read as zeros and free what it held (punch-hole)."""
        with self._fast():
            vol = self._vols.get(vid)
            if vol is None:
                raise NotFound("volume %d does not exist" % vid)
            self._check_range(vol["size"], offset, length, "discard")
            lid = vol["lid"]
            dirty = self._dirty.setdefault(lid, {})
            end = offset + length
            pos = offset
            while pos < end:
                block, intra = divmod(pos, BLOCK_SIZE)
                n = min(BLOCK_SIZE - intra, end - pos)
                if n == BLOCK_SIZE:
                    self._set_zero(vid, lid, dirty, block)
                else:
                    self._write_block(vid, lid, dirty, block, intra, memoryview(ZERO_BLOCK)[:n])
                pos += n

    def _set_zero(self, vid: int, lid: int, dirty: dict, block: int) -> None:
        if self._fm is not None:  # before the slot can be reused
            self._fm.set(vid, block, ZERO_SLOT, READ_ONLY)
        d = dirty.get(block)
        if d is None:
            self._ndirty += 1
            d = dirty[block] = Dirty(ZERO_SLOT, 0, True, False)
        else:
            self._dirty_pages -= held(d)
            if d.fresh:
                allocator.release_fresh(self, d.slot)
            d.slot, d.crc, d.crc_ok, d.fresh, d.have = ZERO_SLOT, 0, True, False, FULL_MASK
        fastbridge.changed(self, vid, lid, d, block, FULL_MASK)

    def _write_block(self, vid: int, lid: int, dirty: dict, block: int, intra: int, chunk: memoryview) -> None:
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
        full = len(chunk) == BLOCK_SIZE
        wmask = page_mask(intra, len(chunk))
        if d is not None and d.fresh:
            # Allocated since the last commit: nothing durable points here
            # (the intent log holds copies of what it needs).
            had = d.have
            if full:
                if native.is_zero(chunk):
                    self._set_zero(vid, lid, dirty, block)
                    return
                self.file.pwrite(chunk, slot_offset(d.slot))
                d.have = FULL_MASK
            else:
                if wmask & ~d.have:
                    self._fill_edges(lid, block, d.slot, d.have, intra, len(chunk))
                self.file.pwrite(chunk, slot_offset(d.slot) + intra)
                d.have |= wmask
            grown = wmask & ~had
            self._dirty_pages += (d.have & ~had).bit_count()
            d.crc_ok = False
            fastbridge.changed(self, vid, lid, d, block, wmask)
            if self._fm is not None and grown:  # C must know what the slot holds now
                fastbridge.tell(self, vid, lid, block, d)
            return
        # The new slot holds the pages written and those of the head's own
        # partial entry (own_mask); the rest reads from below it (_under).
        # Over a whole block (the head's own, or its last point's) only the
        # pages written are written.  A block that reads as zeros now is
        # written whole.
        zeros = d is not None  # a dirty zero block
        own_mask = 0
        may_coalesce = False  # the head owns the block: a whole copy frees what is below at commit
        if not zeros and not full:
            frozen = self._inflight_dirty(lid)
            f = frozen.get(block) if frozen else None
            if f is not None:
                zeros = f.slot == ZERO_SLOT
                may_coalesce = True
                own_mask = 0 if f.have == FULL_MASK else f.have
            else:
                with self.env.begin(db=self._db[DB_MAP]) as txn:
                    lin = self._lins[lid]
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
                    with self.env.begin(db=self._db[DB_MAP]) as txn:
                        buf = layers.assemble(self, self._under(txn.cursor(), lid, block), self._where(lid, block))
                buf[intra : intra + len(chunk)] = chunk
            if native.is_zero(buf):
                self._set_zero(vid, lid, dirty, block)
                return
            if d is None and full and self._lins[lid].points:
                # Rewriting a block with what it already holds must not make the
                # snapshot that shares it diverge (its billed size would grow).
                old = self._head_block(lid, block)
                if old is not None and native.diff_sectors(old, buf)[0] == 0:
                    return
            slot = self._new_slot(buf, FULL_MASK)
            have = FULL_MASK
        else:
            # sub-block copy-on-write: the head's own pages, the rest of the
            # pages written in part as below, and the new ones
            buf = bytearray(BLOCK_SIZE)
            need = own_mask | (wmask & ~_covered(intra, len(chunk)))
            if need:
                with self.env.begin(db=self._db[DB_MAP]) as txn:
                    layers.assemble(self, self._under(txn.cursor(), lid, block), self._where(lid, block),
                                    out=buf, need=need)
            buf[intra : intra + len(chunk)] = chunk
            have = own_mask | wmask
            slot = self._new_slot(buf, have)
        if d is None:
            self._ndirty += 1
            d = dirty[block] = Dirty(slot, 0, False, True, 0, have)
        else:
            self._dirty_pages -= held(d)
            d.slot, d.crc, d.crc_ok, d.fresh, d.have = slot, 0, False, True, have
        self._dirty_pages += held(d)
        # the rest of the block is as the log's replay finds it: the head as
        # committed (no record of this generation has it), or zeros that a
        # record has (FULL_MASK until that record is written)
        fastbridge.changed(self, vid, lid, d, block, wmask)
        if self._fm is not None:
            fastbridge.tell(self, vid, lid, block, d)

    def _new_slot(self, buf, have: int) -> int:
        """A fresh slot holding the pages of have from buf (a whole block)."""
        slot = allocator.alloc(self)
        try:
            if have == FULL_MASK:
                self.file.pwrite(buf, slot_offset(slot))
            else:
                mv = memoryview(buf)
                for first, count in mask_runs(have):
                    self.file.pwrite(mv[first * PAGE : (first + count) * PAGE], slot_offset(slot) + first * PAGE)
        except OSError as exc:
            allocator.release_fresh(self, slot)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("the pool's filesystem is full (%s)" % self.path) from exc
            raise
        return slot

    def _fill_edges(self, lid: int, block: int, slot: int, have: int, intra: int, length: int) -> None:
        """Before a write of [intra, intra + length) into a partial fresh
        slot: the pages it touches in part and the slot lacks get the rest
        of their contents from the view before the head's generation."""
        edges = page_mask(intra, length) & ~have & ~_covered(intra, length)
        if not edges:
            return
        with self.env.begin(db=self._db[DB_MAP]) as txn:
            buf = layers.assemble(self, self._under(txn.cursor(), lid, block), self._where(lid, block), need=edges)
        mv = memoryview(buf)
        for first, count in mask_runs(edges):
            self.file.pwrite(mv[first * PAGE : (first + count) * PAGE], slot_offset(slot) + first * PAGE)

    # ------------------------------------------------------------ commit

    def start_writeback(self) -> None:
        """Let the kernel start writing dirty data now (does not wait), so that
        the next commit's fdatasync, and the pause it causes, is short."""
        if (self._ndirty or self._fm is not None) and self.env is not None:
            self.file.start_writeback()

    def dirty_blocks(self) -> int:
        fastbridge.drain_light(self)
        return self._ndirty

    def dirty_bytes(self) -> int:
        """The data written since the last commit (the pages its slots
        hold; what C wrote up to now included)."""
        return self.dirty()[0]

    def dirty(self) -> tuple[int, int]:
        """(dirty_bytes, dirty_blocks), taking in what C wrote once."""
        fastbridge.drain_light(self)
        return self._dirty_pages * PAGE, self._ndirty

    def recount_dirty(self) -> None:
        """Count the overlay's pages again, after a change that moved whole
        entries (a failed commit's put back, say)."""
        self._dirty_pages = sum(held(d) for dirty in self._dirty.values() for d in dirty.values())

    def drop_staged_records(self) -> None:
        """Forget records staged by a request that failed (see Catalogue)."""
        self.catalogue.drop_staged()

    def put_record(self, key: str, value: dict | None, keep: bool = False) -> None:
        """Stage a catalogue record (None deletes); durable at the next
        commit, or with the change that puts it (see Catalogue.put)."""
        self.catalogue.put(key, value, keep)

    def get_record(self, key: str):
        return self.catalogue.get(key)

    def records(self, prefix: str) -> dict[str, dict]:
        return self.catalogue.scan(prefix)

    def pending(self) -> bool:
        """True if a commit would have anything to make durable (every write
        C completed before the call included)."""
        fastbridge.drain_light(self)
        return bool(
            self._ndirty or self.catalogue.pending() or self._epoch_alloc or self._hwm != self._committed_hwm
        )

    def inflight(self) -> bool:
        """True between begin_commit() and finish_commit()."""
        return self._inflight is not None

    # ------------------------------------------------------------ commits (commit.py)

    def commit(self, change=None):
        """Make every write so far durable, plus `change(tx)` if given (commit.commit)."""
        return commit.commit(self, change)

    def begin_commit(self, change=None) -> "commit.CommitJob":
        """Freeze the overlay into a job whose run() makes it durable (commit.begin)."""
        return commit.begin(self, change)

    def finish_commit(self, job: "commit.CommitJob", punch: bool = True):
        """Publish a job that ran (commit.finish)."""
        return commit.finish(self, job, punch)

    def write_out(self) -> None:
        """fdatasync what was written so far, without a commit (commit.write_out)."""
        commit.write_out(self)

    def punch_slots(self, slots: list[int]) -> None:
        """Give freed slots back to the filesystem (commit.punch_slots)."""
        commit.punch_slots(self, slots)

    def punched(self, slots: list[int]) -> None:
        """The slots finish_commit(punch=False) left are punched (commit.punched)."""
        commit.punched(self, slots)

    # ------------------------------------------------------------ intent log (logflush.py)

    def log_flush(self, vid: int) -> bool:
        """Make every write to volume vid durable through the intent log (logflush.flush)."""
        return logflush.flush(self, vid)

    def log_status(self) -> dict:
        """The intent log's counters (IntentLog.status)."""
        return self.intent.status()


    # ------------------------------------------------------------ structural changes (structure.py)

    def create_volume(self, size: int, parent_snapshot: int | None = None, on_created=None) -> int:
        """A new volume of size bytes, empty or a clone of a snapshot."""
        return self.create_volumes([(size, parent_snapshot)], on_created)[0]

    def create_volumes(self, specs: list[tuple[int, int | None]], on_created=None) -> list[int]:
        return structure.create_volumes(self, specs, on_created)

    def resize_volume(self, vid: int, size: int) -> None:
        structure.resize_volume(self, vid, size)

    def delete_volume(self, vid: int) -> None:
        structure.delete_volume(self, vid)

    def snapshot(self, vids: list[int], change=None) -> list[int]:
        return structure.snapshot(self, vids, change)

    def copy_snapshot(self, sid: int, change=None) -> int:
        return structure.copy_snapshot(self, sid, change)

    def delete_snapshot(self, sid: int) -> None:
        """Delete a snapshot; frees exactly what nothing else uses."""
        self.delete_snapshots([sid])

    def delete_snapshots(self, sids: list[int], change=None) -> None:
        structure.delete_snapshots(self, sids, change)

    def rollback(self, vid: int, sid: int) -> None:
        """Make a volume's contents those of a snapshot (of any volume)."""
        self.rollback_many([(vid, sid)])

    def rollback_many(self, pairs: list[tuple[int, int]], change=None) -> None:
        structure.rollback_many(self, pairs, change)

    # ------------------------------------------------------------ reports (reports.py, scrub.py)

    def snapshot_usage(self, sid: int, referenced: bool = False) -> dict:
        return reports.snapshot_usage(self, sid, referenced)

    def changed_blocks(self, sid_from: int | None, sid_to: int | None, vid: int | None = None) -> list[int]:
        return reports.changed_blocks(self, sid_from, sid_to, vid)

    def changed_extents(self, sid_from: int | None, sid_to: int | None, vid: int | None = None) -> list[tuple[int, bool]]:
        return reports.changed_extents(self, sid_from, sid_to, vid)

    def scrub(self, verify_data: bool = True, progress=None) -> list[str]:
        return scrub.check(self, verify_data, progress)

    def trim(self) -> dict:
        """Give back the pages partial slots do not hold (trim.trim)."""
        return trim.trim(self)

    def stats(self, commit: bool = True) -> dict:
        """The pool's space figures, as of a commit when one can be made
        (commit False: as of the last one).  A read-only question: when the
        commit fails (a full filesystem), the figures are those last made
        durable and commit_error says why."""
        commit_error = None
        try:
            if commit:
                self.commit()
        except EngineError as exc:
            commit_error = str(exc)
        with self.env.begin() as txn:
            nfree = txn.stat(self._db[DB_FREE])["entries"]
            nmap = txn.stat(self._db[DB_MAP])["entries"]
        used = self._hwm - 1 - nfree
        return {
            "block_size": BLOCK_SIZE,
            "slots_total": self._hwm - 1,
            "slots_free": nfree,
            "slots_used": used,
            "used_bytes": used * BLOCK_SIZE,
            "map_entries": nmap,
            "data_file_allocated_bytes": self.file.allocated_bytes(),
            "volumes": len(self._vols),
            "snapshots": sum(1 for s in self._snaps.values() if not s.get("deleted")),
            **({"commit_error": commit_error} if commit_error else {}),
        }

def _covered(intra: int, length: int) -> int:
    """The pages of a block that bytes [intra, intra + length) cover whole."""
    first = -(-intra // PAGE)
    end = (intra + length) // PAGE
    return ((1 << end) - 1) & ~((1 << first) - 1) if end > first else 0
