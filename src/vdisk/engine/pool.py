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

import contextlib
import errno
import itertools
import logging
import os
import threading

import lmdb

from . import intentlog, layers, native, reports, scrub, structure
from .blockio import DataFile
from .intentlog import IntentLog
from .lineage import Lineage
from .overlay import Dirty, Epoch
from .txn import Tx
from .fastmap import COALESCE_PAGES, FLUSHED, READ_ONLY, WRITABLE, WRITABLE_REPORT
from .errors import (
    CommitInFlight,
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
    INF,
    LMDB_DIR,
    LOG_FILE,
    LOG_HEADER,
    LOG_MAX_ENTRIES,
    LOG_PAGE,
    READABLE_VERSIONS,
    ZERO_SLOT,
    birth_val,
    born_key,
    dead_key,
    jdec,
    jenc,
    lid_prefix,
    map_key,
    map_key_decode,
    map_val,
    map_val_full,
    mask_pages,
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
# The fast path's map is a cache: emptied when it holds more than this many
# blocks (about 64 MiB of C memory).
FAST_MAX_ENTRIES = 900_000
# The fast path's reservoir grows the data file only while the pool's
# filesystem keeps this much (or a tenth of itself) free.
RESERVE_KEEP_FREE = 256 << 20
# How many slots the verified-once set remembers (about 64 MiB of memory at
# most); it starts over when full.
VERIFIED_MAX = 1 << 20


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

    def blocks(self) -> int:
        """How many blocks the job makes durable."""
        return sum(len(d) for d in self.epoch.dirty.values())

    def run(self) -> None:
        try:
            self.pool._run_job(self)
        except BaseException as exc:  # noqa: BLE001 - handed to finish_commit
            self.error = exc
        self.done = True


class _FastLock:
    """`with pool._fast():` holds the fast path's map (if attached) for the
    duration, taking in what C wrote first.  Re-entrant within the owner
    thread."""

    __slots__ = ("pool",)

    def __init__(self, pool: "Pool"):
        self.pool = pool

    def __enter__(self):
        p = self.pool
        if p._fm_depth:
            p._fm_depth += 1
        elif p._fm is not None:
            p._fm.lock()
            p._fm_held = p._fm
            p._fm_depth = 1
            try:
                p._drain_fast()
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


class _LogLock:
    """The intent log's writer lock, C's mutex (see Pool._log_lock)."""

    __slots__ = ("fm",)

    def __init__(self, fm):
        self.fm = fm

    def __enter__(self):
        self.fm.log_lock()

    def __exit__(self, *exc):
        self.fm.log_unlock()


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
        self._replay_log()

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
        self._records: dict[str, dict | None] = {}  # staged record puts
        self._kept: set[str] = set()  # staged records that no request failure drops
        # Records may be staged from another thread (the daemon's control
        # thread) while the owner freezes the overlay: the swap and every
        # change to _records and _kept hold this.
        self._staging = threading.Lock()
        # The C fast path (attach_fast): a cache of the head's mapping that
        # an I/O thread reads and writes through, and the free slots it
        # holds for copy-on-write (neither free nor in _epoch_alloc here).
        self._fm = None
        self._fm_held = None  # the map _FastLock locked
        self._fast_lock = _FastLock(self)  # one for all: its state is _fm_depth
        self._fm_depth = 0
        self._fm_vids: dict[int, int] = {}  # vid -> the head lineage the map serves
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
            self._fm.unlock()
            self._fm = None
        if self.env is not None:
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

    # ------------------------------------------------------------ allocator

    def _alloc(self, reserve: bool = False) -> int:
        """A slot nobody references, durable map included.  reserve: for the
        fast path's reservoir (allocated in the epoch only once it is used)."""
        if not self._free_cache and self._free_scan is not None:
            self._refill_free_cache()
        if self._free_cache:
            slot = self._free_cache.pop()
            if reserve and slot >= self._committed_hwm:
                # given back beyond the durable hwm: a commit records it free
                self._reserved_beyond.add(slot)
        else:
            slot = self._hwm
            try:
                self.file.reserve(slot_offset(slot + 1))
            except OSError as exc:
                raise NoSpace("the pool's filesystem is full (%s): %s" % (self.path, exc)) from exc
            self._hwm += 1
            if reserve:
                self._reserved_beyond.add(slot)
        if reserve:
            self._reserved.add(slot)
        else:
            self._epoch_alloc.add(slot)
        self._verified.discard(slot)
        return slot

    def _refill_free_cache(self) -> None:
        got = []
        with self.env.begin(db=self._db[DB_FREE]) as txn:
            cur = txn.cursor()
            if cur.set_range(self._free_scan):
                for k in cur.iternext(values=False):
                    s = u64_decode(k)
                    self._free_scan = u64(s + 1)
                    if (
                        s not in self._epoch_alloc
                        and s not in self._reserved
                        and s not in self._punching
                        and not (self._inflight and s in self._inflight.alloc)
                    ):
                        got.append(s)
                    if len(got) >= 4096:
                        break
                else:
                    self._free_scan = None
            else:
                self._free_scan = None
        got.reverse()
        self._free_cache = got

    def _release_fresh(self, slot: int) -> None:
        """Give back a slot allocated since the last commit (never durable)."""
        self._epoch_alloc.discard(slot)
        floor = max(self._committed_hwm, self._inflight.hwm if self._inflight else 0)
        if slot == self._hwm - 1 and slot >= floor:
            self._hwm -= 1
        else:
            self._free_cache.append(slot)
            self._free_cache.sort(reverse=True)

    # ------------------------------------------------------------ fast path

    def attach_fast(self, fm) -> None:
        """Keep a FastMap (vdisk.engine.fastmap) in step with this pool from
        now on, so that an I/O thread may serve reads and writes through it.
        From here on every operation that touches the overlay holds the
        map's lock and first takes in what C wrote (see docs/architecture.md,
        "The fast path")."""
        if self._fm is not None:
            raise EngineError("a fast path is already attached")
        self._fm = fm
        with self._fast():
            self._fm_vids, self._fm_gens = {}, {}
            self._fast_volumes()
            il = self.intent
            fm.log_setup(self.log.fd, il.gen, il.pos, il.seq, il.end, il.max, intentlog.FLUSH_MAX)
            if not il.ok:
                fm.log_disable()
            fm.log_inflight(self._inflight is not None)
        self.refill_fast()

    def detach_fast(self) -> None:
        """Stop keeping the FastMap in step: its reservoir comes back, and it
        serves nothing more.  Call once no I/O thread uses it."""
        fm = self._fm
        if fm is None:
            return
        with self._log_lock(), self._fast():
            self.intent.pull(fm)
            for slot in fm.reservoir_take():
                self._reserved.discard(slot)
                self._reserved_beyond.discard(slot)
                self._free_cache.append(slot)
            self._free_cache.sort(reverse=True)
            fm.set_failed(2)
            fm.clear()
            self._fm = None

    def refill_fast(self) -> int:
        """Take in what C wrote and top its reservoir up; returns how many
        slots were added (fewer when the pool's filesystem is full).

        Runs without the map's lock: it changes only the allocator (this
        thread's) and the reservoir (under C's inner mutex), so the I/O
        threads go on meanwhile, even while this thread waits for the GIL."""
        fm = self._fm
        if fm is None or self._failed:
            return 0
        self._drain_light()
        if fm.entries() > FAST_MAX_ENTRIES:
            with self._fast():
                fm.clear(keep_writable=True)  # a cache: it fills again as blocks are used
        want = fm.reservoir_target - fm.reservoir()
        if want <= 0:
            return 0
        # growing the data file for the reservoir must not take the room
        # LMDB and the writes themselves need: only reused slots then
        grow = max(0, self._spare_bytes() // BLOCK_SIZE)
        slots = []
        try:
            while len(slots) < want:
                if not self._free_cache and self._free_scan is not None:
                    self._refill_free_cache()
                if not self._free_cache:
                    if grow <= 0:
                        break
                    grow -= 1
                slots.append(self._alloc(reserve=True))
        except NoSpace:
            pass
        fm.reservoir_add(slots[::-1])  # C takes from the end: ascending slots
        return len(slots)

    def _spare_bytes(self) -> int:
        """Room on the pool's filesystem beyond what must stay free for LMDB
        and the writes themselves (a tenth of it, and RESERVE_KEEP_FREE at
        least): what the reservoir and the intent log may grow into."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize - max(RESERVE_KEEP_FREE, st.f_blocks * st.f_frsize // 10)

    def _fast(self) -> "_FastLock":
        return self._fast_lock

    def _drain_light(self) -> None:
        """Take in what C wrote so far without stopping it (for counting:
        what C writes meanwhile comes in at the next drain)."""
        if self._fm is not None and not self._fm_depth:
            self._drain_fast()

    def _drain_fast(self) -> None:
        """Put the blocks C gave new slots into the overlay, as write() would
        have.  Called with the map locked, or by _drain_light: the log is
        taken under C's inner mutex, and nothing here touches C's table or
        frees a slot C could still know."""
        got = self._fm.drain()
        for vid, block, slot, have in got:
            if block == FLUSHED:  # C wrote a log flush of the volume
                v = self._vols.get(vid)
                if v is not None:
                    self._unlogged.pop(v["lid"], None)  # only C's blocks: the volume was clean
                continue
            self._reserved.discard(slot)
            self._reserved_beyond.discard(slot)
            self._epoch_alloc.add(slot)
            v = self._vols.get(vid)
            if v is None:  # cannot happen while volumes change only under the lock
                self._release_fresh(slot)
                continue
            dirty = self._dirty.setdefault(v["lid"], {})
            self._unlogged.setdefault(v["lid"], set()).add(block)  # C has its pages
            d = dirty.get(block)
            if d is None:
                self._ndirty += 1
                dirty[block] = Dirty(slot, 0, False, True, 0, have)
                continue
            if d.fresh and d.slot != slot:
                self._release_fresh(d.slot)
            d.slot, d.crc, d.crc_ok, d.fresh, d.have = slot, 0, False, True, have

    def _fast_volumes(self) -> None:
        """Tell the map every volume's head, size and whether a snapshot
        shares its blocks; a volume whose head changed starts empty, and
        clean when this engine holds no unlogged change to it (so that its
        first fsync is served in C too)."""
        fm = self._fm
        for vid, v in self._vols.items():
            lid = v["lid"]
            gen = self._lins[lid].gen
            fm.set_volume(vid, lid, v["size"], bool(self._lins[lid].points))
            if self._fm_vids.get(vid) != lid:
                if not self._unlogged.get(lid):  # C starts it not clean
                    self._set_clean(vid, True)
                if self._is_new(lid):  # C may take unknown blocks as zeros
                    fm.set_complete(vid)
            elif self._fm_gens.get(vid) != gen:  # a snapshot
                fm.share(vid)
        for vid in self._fm_vids.keys() - self._vols.keys():
            fm.drop_volume(vid)
        self._fm_vids = {vid: v["lid"] for vid, v in self._vols.items()}
        self._fm_gens = {vid: self._lins[v["lid"]].gen for vid, v in self._vols.items()}

    def _is_new(self, lid: int) -> bool:
        """Whether a lineage holds nothing at all: no parent, no block in
        the committed map, none in the overlay."""
        if self._lins[lid].parent is not None or self._dirty.get(lid) or self._inflight_dirty(lid):
            return False
        with self.env.begin(db=self._db[DB_MAP]) as txn:
            cur = txn.cursor()
            return not (cur.set_range(lid_prefix(lid)) and cur.key()[:8] == lid_prefix(lid))

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
        committed = layers.layers(self, cur, lid, self._lins[lid].gen, block)
        frozen = self._inflight_dirty(lid) if live else None
        f = frozen.get(block) if frozen else None
        if f is None:
            return committed
        if f.slot == ZERO_SLOT:
            return []
        if f.have == FULL_MASK:
            return [(f.slot, FULL_MASK, None)]
        return [(f.slot, f.have, None)] + committed

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
        txn = None
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
                if fm is not None and d is not None:
                    if live:
                        self._tell_fast(vid, lid, block, d, cur if d.have != FULL_MASK else None)
                    elif d.have == FULL_MASK:
                        fm.add(vid, block, d.slot)
                    else:
                        base = layers.single(self._under(cur, lid, block, live=False))
                        if base is not None:
                            fm.add(vid, block, d.slot, d.have, base)
                if d is not None:
                    if d.slot == ZERO_SLOT:
                        pass
                    elif d.have == FULL_MASK:
                        out[pos : pos + n] = self.file.pread(n, slot_offset(d.slot) + intra)
                    else:
                        out[pos : pos + n] = memoryview(self._dirty_block(cur, lid, block, d, live))[intra : intra + n]
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
                        self._tell_fast_committed(vid, lid, gen, block, chain, cur)
                pos += n
        finally:
            if txn is not None:
                txn.abort()
        return out

    def _writable(self, lid: int, block: int, d: Dirty) -> int:
        """How the fast path may write a dirty block: in place if its slot
        is fresh, reporting the first write if the block is in the log."""
        if not d.fresh:
            return READ_ONLY
        return WRITABLE if block in self._unlogged.get(lid, ()) else WRITABLE_REPORT

    def _tell_fast(self, vid: int, lid: int, block: int, d: Dirty, cur=None) -> None:
        """Tell C what a live overlay entry holds (with the map's lock held):
        a partial one with the one slot it reads the rest from (_under), or
        nothing when that takes more than one (then C leaves the block to
        us)."""
        if d.have == FULL_MASK:
            self._fm.set(vid, block, d.slot, self._writable(lid, block, d))
            return
        if cur is None:
            with self.env.begin(db=self._db[DB_MAP]) as txn:
                return self._tell_fast(vid, lid, block, d, txn.cursor())
        base = layers.single(self._under(cur, lid, block))
        if base is None:
            d.pages |= self._fm.mask(vid, block)  # what C wrote since the log flush: ours to log now
            self._fm.forget(vid, block)
        else:
            self._fm.set(vid, block, d.slot, self._writable(lid, block, d), d.have, base)

    def _tell_fast_committed(self, vid: int, lid: int, gen: int, block: int, chain, cur) -> None:
        """Tell C the head's committed view of a block (verified, or zeros)
        if one or two slots make it (an entry over its back slot or over
        the whole block it reads through to), and whether its last snapshot
        point sees the same.  A copy-on-write in C writes only the pages
        written over a whole block, the head's own or its point's."""
        slot = layers.single(chain)
        if slot is not None:
            have, base = FULL_MASK, ZERO_SLOT
        elif len(chain) == 1 or (len(chain) == 2 and chain[1][1] == FULL_MASK):
            slot, have, crc = chain[0]
            if slot not in self._verified:
                return
            base = chain[1][0] if len(chain) == 2 else ZERO_SLOT
            if base != ZERO_SLOT and base not in self._verified:
                return
        else:
            return
        shared = layers.head_state(cur, lid, gen, self._lins[lid].last_point(), block)[0] == "shared"
        self._fm.add(vid, block, slot, have, base, shared)

    def _changed(self, vid: int, lid: int, d: Dirty, block: int, pages: int) -> None:
        """Note pages of a block this engine changed (for the log flush)."""
        d.pages |= pages
        self._unlogged.setdefault(lid, set()).add(block)
        self._set_clean(vid, False)

    def _set_clean(self, vid: int, clean: bool) -> None:
        """Tell C whether it may write the volume's next log flush: only
        while every change to it since its last one came from C (whose table
        has their pages).  With the map's lock held."""
        if self._fm is not None:
            self._fm.log_clean(vid, clean)

    def write(self, vid: int, offset: int, data) -> None:
        """Write to a volume's head.  Durable only after `commit()` or a
        `log_flush()` of the volume.

        Raises OutOfRange beyond the end, NoSpace when the pool is full.
        """
        if self._failed:
            raise PoolFailed(self._failed)
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
            if d.fresh:
                self._release_fresh(d.slot)
            d.slot, d.crc, d.crc_ok, d.fresh, d.have = ZERO_SLOT, 0, True, False, FULL_MASK
        self._changed(vid, lid, d, block, FULL_MASK)

    def _write_block(self, vid: int, lid: int, dirty: dict, block: int, intra: int, chunk: memoryview) -> None:
        """Write into one block.  Checksums of what is written here are
        computed at commit (_finish_checksums, in the commit's thread when
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
            d.crc_ok = False
            self._changed(vid, lid, d, block, wmask)
            if self._fm is not None and grown:  # C must know what the slot holds now
                self._tell_fast(vid, lid, block, d)
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
            d.slot, d.crc, d.crc_ok, d.fresh, d.have = slot, 0, False, True, have
        # the rest of the block is as the log's replay finds it: the head as
        # committed (no record of this generation has it), or zeros that a
        # record has (FULL_MASK until that record is written)
        self._changed(vid, lid, d, block, wmask)
        if self._fm is not None:
            self._tell_fast(vid, lid, block, d)

    def _new_slot(self, buf, have: int) -> int:
        """A fresh slot holding the pages of have from buf (a whole block)."""
        slot = self._alloc()
        try:
            if have == FULL_MASK:
                self.file.pwrite(buf, slot_offset(slot))
            else:
                mv = memoryview(buf)
                for first, count in mask_runs(have):
                    self.file.pwrite(mv[first * PAGE : (first + count) * PAGE], slot_offset(slot) + first * PAGE)
        except OSError as exc:
            self._release_fresh(slot)
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
        self._drain_light()
        return self._ndirty

    def drop_staged_records(self) -> None:
        """Forget records staged by a request that failed (but those staged
        with keep=True: they stay until a commit makes them durable)."""
        with self._staging:
            self._records = {k: v for k, v in self._records.items() if k in self._kept}

    def put_record(self, key: str, value: dict | None, keep: bool = False) -> None:
        """Stage a catalogue record (None deletes); durable at the next commit.
        Called from inside a commit's change, it goes into that commit's
        transaction (atomic with the change).  keep=True: a record of what
        happened (a failure's reason) that must survive the failed request's
        drop_staged_records and be retried by every commit until one succeeds
        (on a full filesystem, it is shown meanwhile and made durable once
        there is room)."""
        if self._change_tx is not None:
            self._change_tx.records[key] = value
        else:
            with self._staging:  # not into a dict a freeze has just taken
                self._records[key] = value
                if keep:
                    self._kept.add(key)

    def get_record(self, key: str):
        if self._change_tx is not None and key in self._change_tx.records:
            return self._change_tx.records[key]
        if key in self._records:
            return self._records[key]
        ep = self._inflight  # read once: another thread may finish it meanwhile
        if ep is not None and key in ep.records:
            return ep.records[key]
        with self.env.begin(db=self._db[DB_RECORD]) as txn:
            v = txn.get(key.encode())
        return None if v is None else jdec(v)

    def records(self, prefix: str) -> dict[str, dict]:
        out = {}
        p = prefix.encode()
        with self.env.begin(db=self._db[DB_RECORD]) as txn:
            cur = txn.cursor()
            if cur.set_range(p):
                for k, v in cur:
                    if not k.startswith(p):
                        break
                    out[k.decode()] = jdec(v)
        ep = self._inflight  # read once: another thread may finish it meanwhile
        staged = dict(ep.records) if ep is not None else {}
        staged.update(self._records)
        if self._change_tx is not None:
            staged.update(self._change_tx.records)
        for k, v in staged.items():
            if k.startswith(prefix):
                if v is None:
                    out.pop(k, None)
                else:
                    out[k] = v
        return out

    def pending(self) -> bool:
        """True if a commit would have anything to make durable (every write
        C completed before the call included)."""
        self._drain_light()
        return bool(
            self._ndirty or self._records or self._epoch_alloc or self._hwm != self._committed_hwm
        )

    def inflight(self) -> bool:
        """True between begin_commit() and finish_commit()."""
        return self._inflight is not None

    # ------------------------------------------------------------ intent log

    def log_flush(self, vid: int) -> bool:
        """Make every write to volume vid so far durable through the intent
        log: one record of the pages changed since the volume's last log
        flush, written at the log's end and fdatasync()ed (one device flush,
        where a commit needs three).  Returns False, having changed nothing
        that matters, when a commit must do it instead: a commit in flight,
        more than intentlog.FLUSH_MAX to write, a full log, a filesystem too full
        to grow it (see _spare_bytes), a log that failed.

        Runs in the owner's thread; blocks on the log file's fdatasync, and
        on a log flush C is writing (vdisk.engine.fastmap.FastMap.fsync).
        The fast path's lock is held only while the pages are gathered."""
        if self._failed:
            raise PoolFailed(self._failed)
        il = self.intent
        with self._log_lock():
            il.pull(self._fm)
            if not il.ok or self._inflight is not None:
                return False
            ok = self._log_flush(vid)
            if self._fm is not None:
                if il.ok:
                    self._fm.log_advance(il.pos, il.seq, il.end)
                else:
                    self._fm.log_disable()
            return ok

    def _log_lock(self):
        """The log's writer lock (C's, when a fast path is attached, so that
        C's log flushes and ours take turns); taken before the map's lock."""
        return _LogLock(self._fm) if self._fm is not None else contextlib.nullcontext()

    def log_status(self) -> dict:
        """The intent log's counters, with the flushes C wrote counted in."""
        return self.intent.status(self._fm)

    def _log_flush(self, vid: int) -> bool:
        with self._fast():
            vol = self._vols.get(vid)
            if vol is None:
                raise NotFound("volume %d does not exist" % vid)
            lid = vol["lid"]
            blocks = self._unlogged.get(lid)
            if not blocks:
                self._set_clean(vid, True)
                return True
            if len(blocks) > LOG_MAX_ENTRIES:
                self.intent.stats["commits_instead"] += 1
                return False
            dirty = self._dirty.get(lid, {})
            entries, pages, npages = [], [], 0
            for block in sorted(blocks):
                d = dirty[block]
                if d.slot == ZERO_SLOT:
                    entries.append((block, 0))
                    continue
                mask = d.pages | (self._fm.mask(vid, block) if self._fm is not None else 0)
                if not mask:  # a block changed, and no page of it?  The whole is safe
                    self.intent.stats["pages_unknown"] += 1
                    mask = FULL_MASK
                entries.append((block, mask))
                npages += mask.bit_count()
                if npages * LOG_PAGE > intentlog.FLUSH_MAX:
                    self.intent.stats["commits_instead"] += 1
                    return False
                if mask & ~d.have:  # partial: the pages it lacks as the view before
                    with self.env.begin(db=self._db[DB_MAP]) as txn:
                        data = self._dirty_block(txn.cursor(), lid, block, d)
                    for first, count in mask_runs(mask):
                        pages.append(data[first * LOG_PAGE : (first + count) * LOG_PAGE])
                    continue
                for first, count in mask_runs(mask):
                    pages.append(self.file.pread(count * LOG_PAGE, slot_offset(d.slot) + first * LOG_PAGE))
            grow = self.intent.growth(npages, self._spare_bytes)
            if grow is None:
                # a full log, or a filesystem too full to grow it: commit
                self.intent.stats["commits_instead"] += 1
                return False
            # from here on the next write to any of these blocks is news
            if self._fm is not None:
                self._fm.log_epoch(vid)
            del self._unlogged[lid]
            for block, _ in entries:
                dirty[block].pages = 0
            self._set_clean(vid, True)
        if not self.intent.append(vid, entries, pages, grow):
            # what the record held is still in the overlay: commits make it
            # durable from now on
            with self._fast():
                unlogged = self._unlogged.setdefault(lid, set())
                for block, _ in entries:
                    if block in dirty:
                        dirty[block].pages = FULL_MASK
                        unlogged.add(block)
                self._set_clean(vid, False)
            return False
        return True

    def _replay_log(self) -> None:
        """At open: apply the intent log's valid records (IntentLog.valid_records)
        to the heads, as the writes they stand for, then commit them, which
        also retires the log."""
        seq = nbytes = 0
        auto, self.auto_commit = self.auto_commit, False  # one commit, at the end
        try:
            for vid, entries, body in self.intent.valid_records():
                self._replay_record(vid, entries, body)
                seq += 1
                nbytes += LOG_HEADER + len(body)
        finally:
            self.auto_commit = auto
        if seq:
            log.info("%s: replayed %d intent log record(s) (%d bytes)", self.path, seq, nbytes)
            self.intent.stats["replayed"] = seq
        if seq or self.intent.end:
            # a generation no record on disk has: the old records are dead
            self.commit(change=lambda tx: None)

    def _replay_record(self, vid: int, entries, body: bytes) -> None:
        vol = self._vols.get(vid)
        if vol is None:
            raise FormatError(
                "%s: the intent log has a record for volume %d, which does not exist; "
                "move %s aside to open the pool without it (losing what it holds)"
                % (self.path, vid, self.log.path)
            )
        size = vol["size"]
        at = 0
        for block, mask in entries:
            base = block * BLOCK_SIZE
            if base >= size:
                raise FormatError("%s: the intent log has block %d beyond the end of volume %d"
                                  % (self.path, block, vid))
            if mask == 0:
                self.discard(vid, base, min(BLOCK_SIZE, size - base))
                continue
            for p in mask_pages(mask):
                off = base + p * LOG_PAGE
                if off < size:
                    self.write(vid, off, body[at : at + min(LOG_PAGE, size - off)])
                at += LOG_PAGE

    def commit(self, change=None):
        """Make every write so far durable, plus `change(tx)` if given.

        change is called inside the LMDB write transaction with a `Tx`; it may
        raise EngineError to abort (nothing is changed then).  May be called
        again after a MapFull retry, so it must act only through tx.
        Returns change's result.  Blocks on fdatasync and LMDB's fsync.
        Raises CommitInFlight while a job from begin_commit() is unfinished.
        """
        if self.commit_via is not None and threading.get_ident() != self._owner:
            return self.commit_via(change)
        if self._failed:
            raise PoolFailed(self._failed)
        if self._inflight is not None:
            raise CommitInFlight(
                "a commit is running in the background; wait for it to finish, then try again"
            )
        if change is None and not self.pending():
            return None
        job = self.begin_commit(change)
        job.run()
        return self.finish_commit(job)

    def begin_commit(self, change=None) -> CommitJob:
        """Freeze the overlay into a job whose run() makes it durable.

        Writes after this go to a new overlay, which reads through to the
        frozen one; they are made durable by the next commit.  Only one job
        may be in flight.  Must be called with no LMDB transaction open in
        this process (it may grow the map).
        """
        if self._failed:
            raise PoolFailed(self._failed)
        if self._inflight is not None:
            raise CommitInFlight("a commit is already in flight")
        with self._fast():
            # free slots beyond the durable high-water mark must be recorded
            # free; the reservoir's count as free for this commit
            beyond = self._committed_hwm
            free_back = list(itertools.takewhile(lambda s: s >= beyond, self._free_cache))
            free_back += self._reserved_beyond
            with self._staging:
                ep = Epoch(self._dirty, self._epoch_alloc, self._hwm, free_back, self._records)
                self._dirty, self._ndirty, self._epoch_alloc, self._records = {}, 0, set(), {}
            self._unlogged = {}  # the commit makes the log's records obsolete
            self._inflight = ep
            if self._fm is not None:
                self._fm.new_epoch()  # the instant of the freeze, for C writes too (all clean)
                self._fm.log_inflight(True)
            try:
                self._grow_map_if_needed()
            except BaseException:
                self._unfreeze(ep)
                raise
        return CommitJob(self, ep, change)

    def _run_job(self, job: CommitJob) -> None:
        """The blocking part of a commit: see CommitJob.run()."""
        ep = job.epoch
        self._finish_checksums(ep)
        self._sync_data()
        self._punching.difference_update(job.to_punch)  # a retry (MapFull) frees again
        job.to_punch = []
        try:
            with self.env.begin(write=True) as txn:
                tx = Tx(self, txn)
                self._apply_dirty(tx, ep)
                tx.change_frees_from = len(tx.frees)  # the change's own frees follow
                result = None
                if job.change is not None:
                    self._change_tx = tx
                    try:
                        result = job.change(tx)
                    finally:
                        self._change_tx = None
                    # The change's frees are punched once it is durable, and
                    # must not be allocated before: the owner thread may scan
                    # DB_FREE the moment this transaction commits, before
                    # finish_commit runs.  (Set operations are atomic.)
                    job.to_punch = sorted(tx.frees[tx.change_frees_from :])
                    self._punching.update(job.to_punch)
                self._finish_tx(tx, ep)
        except lmdb.MapFullError:
            job.map_full = True
            return
        except lmdb.Error as exc:
            if "No space" in str(exc) or "ENOSPC" in str(exc):
                raise NoSpace("the pool's filesystem is full: %s" % exc) from exc
            raise
        job.tx, job.result = tx, result

    def _sync_data(self) -> None:
        """fdatasync the data file; a failure fails the pool (the kernel
        reports a lost write once: nothing may sync this file as if all
        were well after it).  Any thread; raises PoolFailed."""
        try:
            self.file.sync()
        except OSError as exc:
            self._failed = (
                "syncing %s failed (%s); the pool refuses I/O until the daemon is "
                "restarted, which recovers the last durable state" % (self.file.path, exc)
            )
            if self._fm is not None:
                self._fm.set_failed(True)
            raise PoolFailed(self._failed) from exc

    def write_out(self) -> None:
        """Make what was written to the data file so far durable, without a
        commit (a background commit's first step, in a worker thread: the
        commit that follows then has little left to sync, and fsyncs, which
        wait for a commit in flight, wait less).  Any thread: it touches no
        pool state but the failure flag.  Raises PoolFailed."""
        if self._failed:
            raise PoolFailed(self._failed)
        self._sync_data()

    def finish_commit(self, job: CommitJob, punch: bool = True):
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
        assert job.done and self._inflight is job.epoch
        try:
            with self._fast():
                result = self._finish_commit(job)
        except BaseException:
            self._punching.difference_update(job.to_punch)  # nothing was freed
            job.to_punch = []
            raise
        if punch and job.to_punch:
            self.punch_slots(job.to_punch)
            self.punched(job.to_punch)
            job.to_punch = []
        return result

    def punch_slots(self, slots: list[int]) -> None:
        """Give freed slots (ascending) back to the filesystem.  Slots freed by
        overwrites are not punched: the next writes reuse them, and punching
        would only make the filesystem allocate again.  Any thread: it
        touches only the data file, and the slots are not allocated meanwhile."""
        for start, count in _runs(slots):
            try:
                self.file.punch(slot_offset(start), count * BLOCK_SIZE)
            except OSError as exc:  # space is reused anyway; only du suffers
                log.warning("punching freed slots %d+%d failed: %s", start, count, exc)

    def punched(self, slots: list[int]) -> None:
        """The slots finish_commit(punch=False) left are punched: they may be
        allocated from now on."""
        self._punching.difference_update(slots)
        self._free_scan = b""

    def _finish_commit(self, job: CommitJob):
        for _ in range(8):
            if not job.map_full:
                break
            self._grow_map(force=True)  # no transaction is open: safe here
            job.map_full, job.done = False, False
            job.run()
        else:  # pragma: no cover
            job.error = job.error or NoSpace("LMDB map cannot grow enough")
        if job.error is not None:
            self._unfreeze(job.epoch)
            raise job.error
        self._inflight = None
        with self._staging:
            self._kept.difference_update(k for k in job.epoch.records if k not in self._records)
        self._forget_zeroed(job.epoch)  # before their slots can be reused
        self._after_commit(job.tx, job.epoch)
        if self._fm is not None and (job.tx.vols or job.tx.lins):
            self._fast_volumes()
        return job.result

    def _unfreeze(self, ep: Epoch) -> None:
        """Put a frozen epoch that was not committed back under the overlay."""
        self._inflight = None
        if self._fm is not None:
            self._fm.log_inflight(False)
            for vid in self._fm_vids:  # the merged-back blocks are ours
                self._set_clean(vid, False)
        self._forget_zeroed(ep)
        for slot in ep.zeroed:  # never durable: give them back
            ep.alloc.discard(slot)
            self._free_cache.append(slot)
        ep.zeroed = []
        ep.zeroed_at = []
        for lid, frozen in ep.dirty.items():
            live = self._dirty.setdefault(lid, {})
            unlogged = self._unlogged.setdefault(lid, set())
            for block, d in frozen.items():
                if block not in live:
                    live[block] = d
                    self._ndirty += 1
                    # the job checksummed it, but a fresh slot may be written
                    # in place again from now on (by C too)
                    d.crc_ok = d.slot == ZERO_SLOT
                else:
                    if d.have == FULL_MASK and live[block].have != FULL_MASK:
                        # the live entry was written over it: it takes the rest now
                        self._absorb(lid, block, live[block], d)
                    if d.slot != ZERO_SLOT and d.fresh:
                        ep.alloc.discard(d.slot)  # overwritten since: never durable
                        self._free_cache.append(d.slot)
                # the log's records are still the valid ones, but which pages
                # changed since them is no longer known: the whole block
                live[block].pages = FULL_MASK
                unlogged.add(block)
        self._epoch_alloc |= ep.alloc
        self._free_cache.sort(reverse=True)
        with self._staging:
            merged = dict(ep.records)
            merged.update(self._records)
            self._records = merged

    def _forget_zeroed(self, ep: Epoch) -> None:
        """The commit found these blocks all zeros and frees their slots: C
        must not read them any more, as a block's slot or as the base of a
        live entry written over it (which reads zeros there now)."""
        if self._fm is not None and ep.zeroed_at:
            vid_of = {v["lid"]: vid for vid, v in self._vols.items()}
            for lid, block, slot in ep.zeroed_at:
                if lid in vid_of:
                    self._fm.forget_slot(vid_of[lid], block, slot)
                    d = self._dirty.get(lid, {}).get(block)
                    if d is not None and d.have != FULL_MASK:
                        self._tell_fast(vid_of[lid], lid, block, d)

    def _absorb(self, lid: int, block: int, d: Dirty, f: Dirty) -> None:
        """A live partial entry written over a whole frozen one that will
        not be committed takes the pages it lacks from it (zeros if it was
        found to be zeros), in place: its slot is fresh."""
        data = ZERO_BLOCK if f.slot == ZERO_SLOT else self.file.pread(BLOCK_SIZE, slot_offset(f.slot))
        mv = memoryview(data)
        for first, count in mask_runs(FULL_MASK & ~d.have):
            self.file.pwrite(mv[first * PAGE : (first + count) * PAGE], slot_offset(d.slot) + first * PAGE)
        d.have, d.crc_ok = FULL_MASK, False
        vid = next((v for v, vol in self._vols.items() if vol["lid"] == lid), None)
        if self._fm is not None and vid is not None:
            self._tell_fast(vid, lid, block, d)

    def _finish_checksums(self, ep: Epoch) -> None:
        """Checksum the blocks written in place since their allocation.  Runs
        in the job's thread: the frozen slots are no longer written.  A
        partial entry's CRC covers its pages (a whole block's, in C)."""
        todo, part = [], []
        for lid, dirty in ep.dirty.items():
            for block, d in dirty.items():
                if d.slot != ZERO_SLOT and not d.crc_ok:
                    (todo if d.have == FULL_MASK else part).append((lid, block, d))
        sums = self.file.checksum_slots([slot_offset(d.slot) for _, _, d in todo], BLOCK_SIZE)
        for (lid, block, d), (crc, zero) in zip(todo, sums):
            if zero:  # ep.alloc keeps it: the other thread's allocator must not see it free yet
                ep.zeroed.append(d.slot)
                ep.zeroed_at.append((lid, block, d.slot))
                d.slot, d.crc, d.fresh = ZERO_SLOT, 0, False
            d.crc, d.crc_ok = crc, True
        for lid, block, d in part:
            data = self.file.pread(BLOCK_SIZE, slot_offset(d.slot))
            d.crc, d.crc_ok = layers.page_crc(data, d.have), True
            if all(native.is_zero(data[f * PAGE : (f + c) * PAGE]) for f, c in mask_runs(d.have)):
                ep.blank.add((lid, block))

    def _apply_dirty(self, tx: Tx, ep: Epoch) -> None:
        """Write the frozen overlay into the map, at each lineage's head
        generation.  The entry it replaces is freed when nothing can read it
        any more: no snapshot point sees it and no partial entry reads
        through to it (structure.release_base), else it dies here.  A
        partial entry over the head's own whole block keeps that block as
        its back slot (a backed entry, docs/format.md)."""
        txn = tx.txn
        mdb = self._db[DB_MAP]
        cur = txn.cursor(db=mdb)
        for lid, dirty in ep.dirty.items():
            if not dirty:
                continue
            lin = self._lins[lid]
            gen = lin.gen
            last = lin.last_point()
            has_parent = lin.parent is not None
            for block in sorted(dirty):
                d = dirty[block]
                if (lid, block) in ep.blank and not layers.layers(self, cur, lid, gen, block):
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
                if old is not None:
                    obirth, oslot, ocrc, omask, oback, obcrc = old
                    if d.slot == ZERO_SLOT and oslot == ZERO_SLOT:
                        continue  # tombstone stays a tombstone
                    if not whole and obirth > last:
                        # The head's own entry (no point sees it) is what a
                        # partial one was written over (_under): a whole
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
                        txn.delete(born_key(lid, obirth, block), db=self._db[DB_BORN])
                        tx.frees.extend(s for s in (oslot, oback) if s != ZERO_SLOT and s != back)
                        if complete and omask != FULL_MASK and not oback:  # what it read through to
                            structure.release_base(self, tx, lid, block, obirth)
                    else:
                        # a snapshot point sees it, or the new partial
                        # entry reads through to it
                        txn.put(okey, map_val(oslot, gen, ocrc, omask, oback, obcrc), db=mdb)
                        txn.delete(born_key(lid, obirth, block), db=self._db[DB_BORN])
                        txn.put(dead_key(lid, gen, block), birth_val(obirth), db=self._db[DB_DEAD])
                if d.slot == ZERO_SLOT and not has_parent:
                    continue  # absence reads as zeros in a root lineage
                if d.slot == ZERO_SLOT and old is None and not self._parent_has(cur, lin, block):
                    continue
                txn.put(map_key(lid, block, gen), map_val(d.slot, INF, d.crc, d.have, back, back_crc), db=mdb)
                txn.put(born_key(lid, gen, block), b"", db=self._db[DB_BORN])

    def _parent_has(self, cur, lin: Lineage, block: int) -> bool:
        plid, pgen = lin.parent
        return bool(self._lookup(cur, plid, pgen, block))

    def _finish_tx(self, tx: Tx, ep: Epoch) -> None:
        txn = tx.txn
        meta, free = self._db[DB_META], self._db[DB_FREE]
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
        txn.put(b"log_gen", u64(self.intent.gen + 1), db=meta)  # the log's records are in here now
        if tx.counters:
            c = dict(self._counters)
            c.update(tx.counters)
            txn.put(b"counters", jenc(c), db=meta)
        for lid, lin in tx.lins.items():
            if lid in tx.dropped_lins:
                txn.delete(u64(lid), db=self._db[DB_LINEAGE])
            else:
                txn.put(u64(lid), jenc(lin.to_json()), db=self._db[DB_LINEAGE])
        for vid, v in tx.vols.items():
            if v is None:
                txn.delete(u64(vid), db=self._db[DB_VOLUME])
            else:
                txn.put(u64(vid), jenc(v), db=self._db[DB_VOLUME])
        for sid, s in tx.snaps.items():
            if s is None:
                txn.delete(u64(sid), db=self._db[DB_SNAP])
            else:
                txn.put(u64(sid), jenc(s), db=self._db[DB_SNAP])
        for k, v in list(ep.records.items()) + list(tx.records.items()):
            if v is None:
                txn.delete(k.encode(), db=self._db[DB_RECORD])
            else:
                txn.put(k.encode(), jenc(v), db=self._db[DB_RECORD])

    def _after_commit(self, tx: Tx, ep: Epoch) -> None:
        """The transaction is durable: publish it and let its frees be reused."""
        for lid, lin in tx.lins.items():
            if lid in tx.dropped_lins:
                self._lins.pop(lid, None)
                self._dirty.pop(lid, None)
                self._unlogged.pop(lid, None)
            else:
                self._lins[lid] = lin
        for vid, v in tx.vols.items():
            if v is None:
                self._vols.pop(vid, None)
            else:
                self._vols[vid] = v
        for sid, s in tx.snaps.items():
            if s is None:
                self._snaps.pop(sid, None)
            else:
                self._snaps[sid] = s
        self._counters.update(tx.counters)
        gen = self.intent.retire()
        if self._fm is not None:
            self._fm.log_reset(gen)  # and no commit in flight
        self._committed_hwm = max(self._committed_hwm, ep.hwm)
        if self._reserved_beyond:  # recorded free by this commit, unless taken since
            self._reserved_beyond = {s for s in self._reserved_beyond if s >= self._committed_hwm}
        # The free cache keeps what it holds (all of it is free, durable or
        # beyond the hwm); once it runs dry, DB_FREE is scanned again from the
        # start, where this commit's frees (ep.zeroed among them) now are.
        self._free_scan = b""

    def _grow_map_if_needed(self) -> None:
        if self.defer_map_growth:
            return
        info, stat = self.env.info(), self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        if used > info["map_size"] * 0.6:
            self._grow_map()

    def _grow_map(self, force: bool = False) -> None:
        new = self.env.info()["map_size"] * 2
        log.info("growing the LMDB map of %s to %d MiB", self.path, new >> 20)
        self.env.set_mapsize(new)

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

    def scrub(self, verify_data: bool = True, progress=None) -> list[str]:
        return scrub.check(self, verify_data, progress)

    def stats(self) -> dict:
        """The pool's space figures, as of a commit when one can be made.  A
        read-only question: when the commit fails (a full filesystem), the
        figures are those last made durable and commit_error says why."""
        commit_error = None
        try:
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


def _runs(nums: list[int]):
    """Group sorted numbers (slots, pages) into (start, count) runs."""
    start = prev = None
    for s in nums:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            yield start, prev - start + 1
            start = prev = s
    if start is not None:
        yield start, prev - start + 1


__all__ = ["Pool", "BLOCK_SIZE"]
