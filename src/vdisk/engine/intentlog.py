"""The intent log file (docs/format.md, "The intent log"): where a log
flush's record is appended, and the records a pool replays when it opens.

An IntentLog owns the file's state on the Python side: the generation whose
records are valid, where the next record goes and its sequence number, how
far the file is written (with zeros at least), whether it is still usable,
and the counters.  logflush.flush decides what a record holds (the pages of
the overlay); this module only writes and reads records.  When a fast path
is attached, C appends records too, under the log's lock: `pull` takes in
where C left the log before Python writes.

Concurrency contract: used by the pool's owner thread, with the log's lock
held when a fast path is attached (logflush.writer_lock).
"""
from __future__ import annotations

import logging
import os

from . import native
from .format import LOG_HEADER, LOG_PAGE, log_header, log_header_decode, log_set_crc

log = logging.getLogger(__name__)

# A log flush writes at most FLUSH_MAX bytes (more is made durable by a
# commit instead, whose cost is then the smaller part), and the log grows to
# at most MAX bytes before a commit empties it.
FLUSH_MAX = 4 << 20
MAX = 64 << 20
GROW = 1 << 20  # the file grows in zero-filled steps of this size


class IntentLog:
    def __init__(self, file, gen: int):
        self.file = file
        self.gen = gen  # records of this generation are valid; every commit moves to the next
        self.pos = 0  # where the next record goes
        self.seq = 0  # its sequence number
        self.ok = True  # False once a write failed: commits only from then on
        self.end = os.fstat(file.fd).st_size  # written (zeros at least) up to here
        self.max = MAX  # tests make it small
        self.stats = {"flushes": 0, "bytes": 0, "commits_instead": 0, "replayed": 0, "pages_unknown": 0,
                      "low_space": 0}
        self.low_space = False  # growth was refused for want of space, and said so

    def pull(self, fm) -> None:
        """Take in where C left the log (with the log's lock held)."""
        if fm is None:
            return
        st = fm.log_state()
        self.pos, self.seq = st["pos"], st["seq"]
        self.ok = self.ok and st["ok"]

    def status(self, fm) -> dict:
        """The counters, with the flushes C wrote counted in."""
        st = dict(self.stats)
        if fm is not None:
            c = fm.log_state()
            st["flushes"] += c["flushes"]
            st["bytes"] += c["bytes"]
            st["flushes_in_c"] = c["flushes"]
        return st

    def growth(self, npages: int, spare_bytes) -> int | None:
        """How many zero bytes a record of npages pages needs the file to
        grow by first (0: none), or None when it does not fit: the log
        would pass its maximum, or the filesystem has too little to spare
        (spare_bytes(): what growing may take)."""
        end = self.pos + LOG_HEADER + npages * LOG_PAGE
        grow = max(GROW, end - self.end) if end > self.end else 0
        if end > self.max:
            return None
        if grow and spare_bytes() < grow:
            self.stats["low_space"] += 1
            if not self.low_space:
                log.warning("the intent log %s may not grow: its filesystem has less than a tenth free; "
                            "every fsync commits instead (slower) until space is freed", self.file.path)
                self.low_space = True
            return None
        if grow and self.low_space:
            log.warning("the intent log %s grows again: fsyncs go to it", self.file.path)
            self.low_space = False
        return grow

    def append(self, vid: int, entries, pages: list[bytes], grow: int) -> bool:
        """Write one record (entries: (block, page mask); pages: their
        contents in order) at the log's end and fdatasync it.  False when
        the write failed: the log is unusable from then on (a half-written
        record is never replayed: its CRC fails, or the next commit makes it
        obsolete)."""
        hdr = log_header(self.gen, self.seq, vid, entries)
        body = b"".join(pages)
        log_set_crc(hdr, native.crc32c(body, native.crc32c(hdr)))
        try:
            if grow:  # in zero-filled steps: rewrites are cheaper than growth
                self.file.pwrite(bytes(grow), self.end)
                self.end += grow
            self.file.pwrite(hdr + body, self.pos)
            self.file.sync()
        except OSError as exc:
            log.warning("writing the intent log %s failed (%s); flushes commit instead", self.file.path, exc)
            self.ok = False
            return False
        self.pos += len(hdr) + len(body)
        self.seq += 1
        self.stats["flushes"] += 1
        self.stats["bytes"] += len(hdr) + len(body)
        return True

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

    def retire(self) -> int:
        """A commit made every record durable: the next generation starts at
        offset 0 (its number, which the commit recorded)."""
        self.gen += 1
        self.pos = self.seq = 0
        return self.gen
