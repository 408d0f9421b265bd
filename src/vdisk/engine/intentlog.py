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

Concurrency contract: append, growth and the properties are used by the
pool's owner thread with the log's lock held (`with intent:`), which C's
writer takes too, before the fast path's map lock; inflight and retire with
the map's lock held; status at any time.
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
GROW = 1 << 20  # the file grows in zero-filled steps of this size

_STATE = ("gen", "pos", "seq", "end", "ok", "inflight", "flushes", "bytes", "flushes_in_c", "max")
assert len(_STATE) == lib.VD_LOG_STATE_WORDS


class IntentLog:
    def __init__(self, file, gen: int):
        self.file = file
        self._log = lib.vd_log_new(file.fd, gen, os.fstat(file.fd).st_size, MAX, FLUSH_MAX)
        if self._log == ffi.NULL:
            raise MemoryError("vdisk: cannot allocate the intent log's buffer")
        self.stats = {"commits_instead": 0, "replayed": 0, "pages_unknown": 0, "low_space": 0}
        self.low_space = False  # growth was refused for want of space, and said so

    def close(self) -> None:
        """Free the writer (once nothing can write: the fast path let go
        of it, see Pool._abandon)."""
        if self._log is not None:
            lib.vd_log_free(self._log)
            self._log = None

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

    gen = property(lambda self: self.state()["gen"])
    pos = property(lambda self: self.state()["pos"])  # where the next record goes
    end = property(lambda self: self.state()["end"])  # written (zeros at least) up to here
    ok = property(lambda self: bool(self.state()["ok"]))  # False once a write failed: commits only

    @property
    def max(self) -> int:
        return self.state()["max"]

    @max.setter
    def max(self, value: int) -> None:  # tests make it small
        lib.vd_log_set_max(self._log, value)

    def inflight(self, inflight: bool) -> None:
        """A commit is in flight (or no longer): the fast path writes no
        record meanwhile."""
        lib.vd_log_set_inflight(self._log, int(inflight))

    def retire(self) -> int:
        """A commit made every record durable: the next generation starts at
        offset 0 (its number, which the commit recorded)."""
        return lib.vd_log_retire(self._log)

    def fail_next(self, fail: bool = True) -> None:
        """For tests: the next record written fails before its fdatasync
        (as if the power went then)."""
        lib.vd_log_fail_next(self._log, int(fail))

    def status(self) -> dict:
        """The counters, the writer's (flushes, bytes, and flushes_in_c: those
        the fast path wrote) and the engine's."""
        st = self.state()
        return dict(self.stats, flushes=st["flushes"], bytes=st["bytes"], flushes_in_c=st["flushes_in_c"])

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
        """The records a crash left to replay: this generation's, in sequence
        from offset 0, each with a good CRC, as (vid, entries, body).  A
        record that fails a check ends the log: it was being written when the
        flush that wrote it was interrupted, so nothing after it was ever
        acknowledged."""
        pos = seq = 0
        while True:
            hdr = bytearray(self.file.pread(LOG_HEADER, pos))
            got = log_header_decode(hdr)
            if got is None:
                break
            gen, rseq, vid, entries, crc = got
            if gen != self.gen or rseq != seq:
                break
            npages = sum(m.bit_count() for _, m in entries)
            body = self.file.pread(npages * LOG_PAGE, pos + LOG_HEADER)
            log_set_crc(hdr, 0)
            if native.crc32c(body, native.crc32c(hdr)) != crc:
                break
            yield vid, entries, body
            pos += LOG_HEADER + npages * LOG_PAGE
            seq += 1

