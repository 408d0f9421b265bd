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

The Pool itself holds the state, opens and closes; the rest lives in
modules of functions over it: readpath.py (reads), writepath.py (writes
into the overlay), commit.py (commits), allocator.py (free slots),
fastbridge.py (keeping the C fast path in step), logflush.py (the intent
log's flushes and replay), catalogue.py (catalogue records), structure.py
(volumes, snapshots, rollback), reports.py and scrub.py.

Concurrency contract: a Pool is used from one thread, except
`CommitJob.run()`, which may run in one other thread at a time: it touches
only its frozen epoch, the data file's fdatasync and its own LMDB write
transaction, never the live overlay or the allocator.  While a job is in
flight, structural changes (`commit(change)` and everything that calls it)
raise CommitInFlight: finish the job first (`commit_meta()` too, which then
falls back to `commit()`).  Every method may block on disk I/O; `commit()`
and everything that calls it block on fdatasync and an LMDB fsync,
`commit_meta()` on an LMDB fsync.
"""
from __future__ import annotations

import logging
import os
import threading

import lmdb

from . import allocator, commit, fastbridge, layers, logflush, readpath, reports, scrub, structure, trim, writepath
from .blockio import DataFile
from .fastmap import FastMap
from .catalogue import Catalogue
from .intentlog import IntentLog
from .lineage import Lineage
from .overlay import Dirty, Epoch, held
from .txn import Tx
from .errors import (
    EngineError,
    FormatError,
    NotFound,
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
    LMDB_DIR,
    LOG_FILE,
    LOG_FILE_ODD,
    READABLE_VERSIONS,
    jdec,
    map_val,
    map_val_full,
    jenc,
    PAGE,
    u64,
    u64_decode,
)

log = logging.getLogger(__name__)

INITIAL_MAP_SIZE = 256 << 20
# How many slots the verified-once set remembers (about 64 MiB of memory at
# most); it starts over when full.
VERIFIED_MAX = 1 << 20


class Pool:
    """A vdisk storage pool in one directory.  See the module docstring."""

    @staticmethod
    def exists(path: str) -> bool:
        """Whether path holds a pool (opening one that does not creates it)."""
        return os.path.exists(os.path.join(path, LMDB_DIR, "data.mdb"))

    def __init__(self, path: str, datafile_factory=DataFile, map_size: int | None = None, commit_via=None,
                 fast: bool = True, reservoir: int = 256):
        self.path = path
        # commit_via(change, meta=False) -> result: how a commit asked for
        # from another thread than the owner's (the one that opened the
        # pool) is run; the daemon passes one that marshals it back to the
        # trio thread, which freezes the overlay and runs it like its own
        # (meta: records alone, commit.commit_meta).  None: in the caller.
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
        ver = self._check_format(existing)
        self.file = datafile_factory(os.path.join(path, DATA_FILE))
        self._upgrade(ver)
        # the intent log's files, of even and of odd generations
        self.logs = tuple(datafile_factory(os.path.join(path, name)) for name in (LOG_FILE, LOG_FILE_ODD))
        self._load(legacy_log=ver < 6)
        logflush.replay(self)
        # fast: the write cache lives in C (fastmap.py) for every write,
        # this thread's and the I/O threads' (fast_map); not over a data file
        # of the tests' that simulates what a power cut loses, which C would
        # bypass.  reservoir: the free slots C holds for new blocks (each
        # takes 64 KiB of the data file until the pool closes, when the
        # unused ones are recorded free)
        if fast and datafile_factory is DataFile:
            self._open_fast(reservoir)

    # ------------------------------------------------------------ open/close

    def _check_format(self, existing: bool) -> int:
        """The pool's format version (a new pool's is this vdisk's), after
        checking that this vdisk reads it (FormatError otherwise)."""
        with self.env.begin(write=True, db=self._db[DB_META]) as txn:
            v = txn.get(b"format_version")
            if v is None:
                if existing and txn.get(b"hwm") is not None:
                    raise FormatError("%s: LMDB has no format_version; not a vdisk pool" % self.path)
                txn.put(b"format_version", u64(FORMAT_VERSION))
                txn.put(b"block_size", u64(BLOCK_SIZE))
                txn.put(b"hwm", u64(1))
                txn.put(b"counters", jenc({}))
                return FORMAT_VERSION
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
            return ver
        return FORMAT_VERSION

    def _upgrade(self, ver: int) -> None:
        """Bring a pool of an older format version up to this one, in one
        transaction (an older vdisk refuses the pool from then on): 1 -> 2
        adds the intent log, whose generation starts at 0 (absent); 2 -> 3
        partial entries, whose mask a 20-byte value lacks (whole); 3 -> 4
        backed entries, which no older pool has; 4 -> 5 checksums a back
        slot's pages not in its entry's mask instead of its 64 KiB; 5 -> 6
        the intent log's second file (odd generations), which opening
        creates: the records of a version 5 log are replayed from the
        first file (IntentLog's legacy) and the commit after the replay
        moves on to version 6's rule."""
        if ver == FORMAT_VERSION:
            return
        log.info("upgrading %s from format version %d to %d", self.path, ver, FORMAT_VERSION)
        with self.env.begin(write=True) as txn:
            if ver == 4:
                mdb = self._db[DB_MAP]
                for k, v in list(txn.cursor(db=mdb)):
                    slot, death, crc, mask, back, _bcrc = map_val_full(v)
                    if back:
                        txn.put(k, map_val(slot, death, crc, mask, back, layers.back_crc(self, back, mask)), db=mdb)
            txn.put(b"format_version", u64(FORMAT_VERSION), db=self._db[DB_META])

    def _load(self, legacy_log: bool = False) -> None:
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
        self.intent = IntentLog(self.logs, u64_decode(g) if g is not None else 0, legacy_log)
        self._unlogged: dict[int, set[int]] = {}  # lid -> blocks changed since their log flush
        # ... and those of them frozen by the commit in flight (which the
        # next record of the volume carries too: logflush)
        self._unlogged_frozen: dict[int, set[int]] = {}
        self._dirty: dict[int, dict[int, Dirty]] = {}
        self._ndirty = 0
        self._dirty_pages = 0  # overlay.held() summed over _dirty: the write cache's fill
        self._inflight: Epoch | None = None  # frozen by begin_commit, not yet finished
        self._change_tx: Tx | None = None  # the transaction whose change is running
        # Committed slots whose checksum was verified since the pool was
        # opened: a partial read of one reads only what it needs.  A slot
        # leaves the set when it is allocated again.
        self._verified: set[int] = set()
        # write() commits by itself at writepath.DIRTY_LIMIT; a daemon that runs commits
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
        self._fm_own = None  # (FastMap, eventfd) this pool made (_open_fast) and frees
        self._fm_held = None  # the map fastbridge.FastLock locked
        self._fast_lock = fastbridge.FastLock(self)  # one for all: its state is _fm_depth
        self._fm_depth = 0
        # the reads and writes the Pool served itself, with the map's lock
        # held, while a FastMap was attached (C refused them even once
        # taught: writepath._write_here, readpath.read)
        self.served_here = {"reads": 0, "writes": 0}
        # vid -> (head lineage, generation, last snapshot point) as the map was told (fastbridge.sync_volumes)
        self._fm_heads: dict[int, tuple[int, int, int]] = {}
        self._reserved: set[int] = set()
        self._reserved_beyond: set[int] = set()  # those beyond the durable hwm
        self._punching: set[int] = set()  # freed, being punched: not allocated yet (finish_commit)
        self._room_checked = (0.0, False)  # (until when, whether the data file may grow sparse): allocator.roomy

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
        if self._fm_own is not None:
            fm, efd = self._fm_own
            self._fm_own = None
            fm.close()
            os.close(efd)
        if self.env is not None:
            self.intent.close()
            self.file.close()
            for f in self.logs:
                f.close()
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

    def _open_fast(self, reservoir: int) -> None:
        """Own a FastMap, the write cache in C, and keep it in step.  Its
        eventfd (fast_event_fd) is signalled when C wants its reservoir of
        free slots refilled (refill_fast); this thread's writes refill it
        themselves."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            fm = FastMap(self.file.fd, efd, reservoir)
        except MemoryError as exc:
            os.close(efd)
            log.warning("the write cache is in Python (%s)", exc)
            return
        self._fm_own = (fm, efd)
        fastbridge.attach(self, fm)

    @property
    def fast_map(self):
        """The FastMap this pool keeps in step (None: every request is
        the Pool's), for an I/O layer to serve requests through
        (FastMap.io_functions), falling back to read() and write()."""
        return self._fm

    @property
    def fast_event_fd(self) -> int | None:
        """Readable when the FastMap wants refill_fast() (None: none)."""
        return self._fm_own[1] if self._fm_own is not None and self._fm is not None else None

    def attach_fast(self, fm) -> None:
        """Keep a FastMap of the caller's in step from now on
        (fastbridge.attach): a pool opened with fast=False."""
        fastbridge.attach(self, fm)

    def detach_fast(self) -> None:
        """Stop keeping the FastMap in step (fastbridge.detach).  One the
        pool owns is then never freed: call this when an I/O thread may
        still use it."""
        fastbridge.detach(self)
        self._fm_own = None

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

    # ------------------------------------------------------------ I/O (readpath.py, writepath.py)

    def read(self, vid: int, offset: int, length: int) -> bytearray:
        """Read from a volume's head.  Reads beyond the end are short (EOF)."""
        return readpath.read(self, vid, offset, length)

    def read_snapshot(self, sid: int, offset: int, length: int) -> bytearray:
        """Read from a snapshot.  Reads beyond the end are short (EOF)."""
        return readpath.read_snapshot(self, sid, offset, length)

    def write(self, vid: int, offset: int, data) -> None:
        """Write to a volume's head (writepath.write).  Durable only after
        `commit()` or a `log_flush()` of the volume.  Raises OutOfRange
        beyond the end, NoSpace when the pool is full."""
        writepath.write(self, vid, offset, data)

    def discard(self, vid: int, offset: int, length: int) -> None:
        """Make a range read as zeros and free what it held (writepath.discard)."""
        writepath.discard(self, vid, offset, length)

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

    def commit_meta(self, change=None):
        """Make the staged records durable, plus a change that touches no
        block, without syncing the writes so far (commit.commit_meta)."""
        return commit.commit_meta(self, change)

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

    def log_fill(self) -> float:
        """How full the intent log's file being written is (IntentLog.fill)."""
        return self.intent.fill

    def log_flush(self, vid: int) -> bool:
        """Make every write to volume vid durable through the intent log (logflush.flush)."""
        return logflush.flush(self, vid)

    def log_grow_ahead(self) -> int:
        """Keep room written ahead in the intent log's file, and let C grow
        it as it needs, by as much as the filesystem can spare, so that its
        records never wait for this thread (IntentLog.grow_ahead)."""
        if self._failed:
            return 0
        return self.intent.grow_ahead(lambda: allocator.spare_bytes(self))

    def log_status(self) -> dict:
        """The intent log's counters (IntentLog.status)."""
        return self.intent.status()


    # ------------------------------------------------------------ structural changes (structure.py)

    def create_volume(self, size: int, parent_snapshot: int | None = None, on_created=None) -> int:
        """A new volume of size bytes, empty or a clone of a snapshot."""
        return self.create_volumes([(size, parent_snapshot)], on_created)[0]

    def create_volumes(self, specs: list[tuple[int, int | None]], on_created=None) -> list[int]:
        return structure.create_volumes(self, specs, on_created)

    def resize_volume(self, vid: int, size: int, on_resized=None) -> None:
        structure.resize_volume(self, vid, size, on_resized)

    def delete_volume(self, vid: int, on_deleted=None) -> None:
        self.delete_volumes([vid], on_deleted)

    def delete_volumes(self, vids: list[int], on_deleted=None) -> None:
        structure.delete_volumes(self, vids, on_deleted)

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
