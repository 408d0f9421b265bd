"""The intent log file (docs/format.md, "The intent log"): the Python face
of its writer in C (csrc/intentlog.c), and the records a pool replays when
it opens.

The C writer owns the log's state - the generation whose records are valid,
where the next record goes and its sequence number, how far the file is
written (with zeros at least), whether it is still usable - and writes every
record: the engine's log flushes (logflush.flush decides what a record holds,
then calls append) and the fast path's fsyncs (csrc/fastmap.c, vd_fm_fsync).
This module adds the engine's policy (when the file may grow) and counters,
and reads records back.

Two files take turns by generation (even, odd): a commit's freeze moves
the writer on to the next generation in the other file, so that fsyncs go
on while the commit runs.

Concurrency contract: append, growth and the properties are used by the
pool's owner thread with the log's lock held (`with intent:`), which C's
writer takes too, before the fast path's map lock; freeze, thaw and retire
with the map's lock held; status at any time.
"""
from __future__ import annotations

import logging
import os

from . import native
from .format import LOG_HEADER, LOG_PAGE, log_header_decode, log_set_crc
from .native import ffi, lib

log = logging.getLogger(__name__)

# A log flush writes at most FLUSH_MAX bytes (more is made durable by a
# commit instead, whose cost is then the smaller part), and the log grows to
# at most MAX bytes before a commit empties it.
FLUSH_MAX = 4 << 20
MAX = 64 << 20
GROW = lib.VD_LOG_GROW  # the file grows in zero-filled steps of this size
# C writes its records only into bytes the file holds (zeros at least), and
# grows the file itself (csrc/intentlog.c), by at most what the engine
# allows it: ALLOW, granted again by grow_ahead while the filesystem can
# spare it.  grow_ahead (the daemon's feeder, every 100 ms) keeps AHEAD
# written ahead of the records, in C with the GIL let go; an fsync that
# finds less than a step left grows the file itself.  So an fsync neither
# waits for the daemon's thread, which a control action's commit may hold
# for a second, nor for the engine to let go of the log's mutex (held
# across a wait for the GIL, that could take 5 ms).
AHEAD = 4 * GROW
ALLOW = 8 * GROW

_STATE = ("gen", "pos", "seq", "end", "ok", "inflight", "flushes", "bytes", "flushes_in_c", "max", "wgen",
          "flushes_during_commit", "allow", "grows_in_c")
assert len(_STATE) == lib.VD_LOG_STATE_WORDS


def _usable(st: dict) -> bool:
    return bool(st["ok"]) and not st["inflight"]


def _open_direct(files) -> tuple[int, int]:
    """The log files opened again with O_DIRECT, for C to write its
    records with RWF_DSYNC (csrc/intentlog.c, write_direct); (-1, -1)
    where the filesystem has no O_DIRECT (tmpfs before Linux 6.6):
    records are then written and fdatasync()ed as before."""
    fds = []
    try:
        for f in files:
            fds.append(os.open(f.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        return -1, -1
    return fds[0], fds[1]


class IntentLog:
    """files: the log files of even and of odd generations; gen: the
    generation the durable map names (log_gen); legacy: the pool was of
    format version 5 or older when opened, whose records are all in the
    first file (they are replayed as such once; the commit that follows
    moves to this version's rule)."""

    def __init__(self, files, gen: int, legacy: bool = False):
        self.files = tuple(files)
        self.legacy = legacy
        ends = [os.fstat(f.fd).st_size for f in self.files]
        self._log = lib.vd_log_new(self.files[0].fd, self.files[1].fd, gen, ends[0], ends[1], MAX, FLUSH_MAX)
        if self._log == ffi.NULL:
            raise MemoryError("vdisk: cannot allocate the intent log's buffer")
        self._direct = _open_direct(self.files)
        lib.vd_log_set_direct(self._log, *self._direct)
        self.stats = {"commits_instead": 0, "replayed": 0, "pages_unknown": 0, "low_space": 0}
        self.low_space = False  # growth was refused for want of space, and said so
        # what a crash may have left: no record is written before a commit
        # (the one after the replay) moves past it
        self.had_records = any(ends)

    def close(self) -> None:
        """Free the writer (once nothing can write: the fast path let go
        of it, see Pool._abandon)."""
        if self._log is not None:
            lib.vd_log_free(self._log)
            self._log = None
            for fd in self._direct:
                if fd >= 0:
                    os.close(fd)

    @property
    def handle(self):
        """The writer, for the fast path (FastMap.set_log)."""
        return self._log

    def __enter__(self):
        lib.vd_log_lock(self._log)
        return self

    def __exit__(self, *exc):
        lib.vd_log_unlock(self._log)

    def state(self) -> dict:
        out = ffi.new("uint64_t[]", lib.VD_LOG_STATE_WORDS)
        lib.vd_log_get(self._log, out)
        return dict(zip(_STATE, out))

    gen = property(lambda self: self.state()["gen"])  # the generation the durable map names
    wgen = property(lambda self: self.state()["wgen"])  # the one records are written in now
    pos = property(lambda self: self.state()["pos"])  # where the next record goes in wgen's file
    end = property(lambda self: self.state()["end"])  # wgen's file is written (zeros at least) up to here
    ok = property(lambda self: bool(self.state()["ok"]))  # False once a write failed: commits only

    @property
    def usable(self) -> bool:
        """Whether a record may be written now: the log works and no
        commit in flight holds it (IntentLog.freeze)."""
        return _usable(self.state())

    @property
    def fill(self) -> float:
        """How full the file being written is (0 to 1; 0 while no record
        may be written)."""
        st = self.state()
        return st["pos"] / st["max"] if _usable(st) else 0.0

    @property
    def file(self):
        """The file records are written to now."""
        return self.files[self.wgen & 1]

    @property
    def max(self) -> int:
        return self.state()["max"]

    @max.setter
    def max(self, value: int) -> None:  # tests make it small
        lib.vd_log_set_max(self._log, value)

    def freeze(self, records: bool) -> int:
        """A commit froze the writes so far: the generation its transaction
        records (log_gen).  records: it changes no volume's existence,
        size or contents, so fsyncs may go on meanwhile, in that
        generation's file (csrc/intentlog.h, vd_log_freeze)."""
        return lib.vd_log_freeze(self._log, int(records))

    def thaw(self) -> None:
        """The commit failed: records go on in the generation they were in."""
        lib.vd_log_thaw(self._log)

    def retire(self, gen: int) -> None:
        """The commit that recorded gen is durable: the records before its
        freeze are obsolete."""
        lib.vd_log_retire(self._log, gen)

    def fail_next(self, fail: bool = True) -> None:
        """For tests: the next record written fails before its fdatasync
        (as if the power went then)."""
        lib.vd_log_fail_next(self._log, int(fail))

    def status(self) -> dict:
        """The counters, the writer's (flushes, bytes, flushes_in_c: those
        the fast path wrote, flushes_during_commit: those written while a
        commit was in flight, which did not wait for it, grows_in_c: fsyncs
        that grew the file themselves) and the engine's."""
        st = self.state()
        return dict(self.stats, **{k: st[k] for k in ("flushes", "bytes", "flushes_in_c", "flushes_during_commit",
                                                      "grows_in_c")})

    def growth(self, npages: int, spare_bytes) -> int | None:
        """How many zero bytes a record of npages pages needs the file to
        grow by first (0: none), or None when it does not fit: the log
        would pass its maximum, or the filesystem has too little to spare
        (spare_bytes(): what growing may take)."""
        st = self.state()
        end = st["pos"] + LOG_HEADER + npages * LOG_PAGE
        grow = max(GROW, end - st["end"]) if end > st["end"] else 0
        if end > st["max"]:
            return None
        if grow and spare_bytes() < grow:
            self.stats["low_space"] += 1
            if not self.low_space:
                log.warning("the intent log %s may not grow: its filesystem has less than a tenth (at most 4 GiB) free; "
                            "every fsync commits instead (slower) until space is freed", self.file.path)
                self.low_space = True
            return None
        if grow and self.low_space:
            log.warning("the intent log %s grows again: fsyncs go to it", self.file.path)
            self.low_space = False
        return grow

    def grow_ahead(self, spare_bytes) -> int:
        """Let C grow the log's files by ALLOW bytes from now on
        (vd_log_allow), once it used some of what it was allowed, if the
        filesystem can spare that and a step more (spare_bytes(): what
        growing may take), else by nothing until it can; and keep AHEAD
        bytes written ahead of the records (vd_log_grow_ahead, in C, which
        takes the log's mutex).  Returns the bytes grown.  The owner's
        thread, without the log's mutex."""
        st = self.state()
        if not _usable(st):
            return 0
        if st["allow"] != ALLOW:
            lib.vd_log_allow(self._log, ALLOW if spare_bytes() >= ALLOW + GROW else 0)
        if st["end"] - st["pos"] >= AHEAD:
            return 0
        return lib.vd_log_grow_ahead(self._log, AHEAD)

    def append(self, vid: int, entries, pages: list[bytes], grow: int) -> bool:
        """Write one record (entries: (block, page mask); pages: their
        contents in order) at the log's end and fdatasync it, after growing
        the file by grow zero bytes.  False when it was not written, or
        the write failed: the log is unusable from then on."""
        body = b"".join(pages)
        blocks = ffi.new("uint64_t[]", [b for b, _ in entries] or [0])
        masks = ffi.new("uint32_t[]", [m for _, m in entries] or [0])
        rc = lib.vd_log_append(self._log, vid, blocks, masks, len(entries), ffi.from_buffer(body),
                               len(body) // LOG_PAGE, grow)
        return rc == 0

    def valid_records(self):
        """The records a crash left to replay, as (vid, entries, body): the
        durable generation's, then the next one's (written while a commit
        that had not become durable was in flight), each in sequence from
        its file's start with a good CRC.  A record that fails a check ends
        its generation: it was being written when the flush that wrote it
        was interrupted, so nothing after it was ever acknowledged."""
        gen = self.gen
        if self.legacy:
            yield from self._records(self.files[0], gen)
            return
        for g in (gen, gen + 1):
            yield from self._records(self.files[g & 1], g)

    @staticmethod
    def _records(file, gen: int):
        pos = seq = 0
        while True:
            hdr = bytearray(file.pread(LOG_HEADER, pos))
            got = log_header_decode(hdr)
            if got is None:
                break
            rgen, rseq, vid, entries, crc = got
            if rgen != gen or rseq != seq:
                break
            npages = sum(m.bit_count() for _, m in entries)
            body = file.pread(npages * LOG_PAGE, pos + LOG_HEADER)
            log_set_crc(hdr, 0)
            if native.crc32c(body, native.crc32c(hdr)) != crc:
                break
            yield vid, entries, body
            pos += LOG_HEADER + npages * LOG_PAGE
            seq += 1
