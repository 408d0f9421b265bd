"""The one narrow seam through which the engine touches block data on disk.

`DataFile` is the only object in the engine that reads, writes, syncs or
punches the data file.  Tests replace it with `tests/powercut.py`'s
`PowerCutFile`, which remembers what was written since the last sync and can
drop or tear it to simulate a power cut.  LMDB does its own I/O, but every
LMDB commit of vdisk is synchronous (durable when it returns), so a power cut
never loses a committed transaction; only block data needs simulating.

Concurrency contract: not thread-safe; the engine calls it from one thread.
Every method may block on disk I/O (pread/pwrite on the page cache are fast;
`sync` waits for the device).
"""
from __future__ import annotations

import errno
import os

from . import native


PREALLOCATE = 64 << 20


class DataFile:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._reserved = os.fstat(self.fd).st_size

    def reserve(self, end: int, sparse: bool = False) -> None:
        """Make the file reach end, in 64 MiB steps: sparse (ftruncate)
        when the caller says the filesystem has room to spare, else
        allocated (fallocate), so that a full filesystem shows up here as
        ENOSPC and writes into the range cannot meet it.

        Writing into either costs the filesystem far less than growing the
        file one block at a time (about 20 against 130 us for 64 KiB on
        ext4).  A sparse range costs far less at writeback when its slots
        are written a page here and a page there (a copy on write after a
        snapshot writes 4 KiB of a slot's 64): ext4 allocates the pages
        written, where a preallocated range has its unwritten extent split
        around each page, in one long stretch of kernel time on a CPU
        (docs/perf/2026-12-03-sparse-data-file.md).  It also takes from the
        filesystem only the pages written.
        """
        if end <= self._reserved:
            return
        new = max(end, self._reserved + PREALLOCATE)
        if sparse:
            if new > os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, new)
            self._reserved = new
            return
        try:
            os.posix_fallocate(self.fd, self._reserved, new - self._reserved)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSPC):
                raise
            if exc.errno == errno.ENOSPC and end < new:
                os.posix_fallocate(self.fd, self._reserved, end - self._reserved)
                new = end
            elif exc.errno == errno.ENOSPC:
                raise
        self._reserved = new

    def reserved(self) -> int:
        """Where the file is reserved up to (reserve)."""
        return self._reserved

    def allocate(self, offset: int, length: int) -> None:
        """Allocate a range inside the reserved end (slots reused from a
        sparse stretch or a punched one), so that writes into it cannot
        meet ENOSPC; raises OSError(ENOSPC) when the filesystem is full."""
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # beyond the end of a sparse file: zeros
            data += bytes(length - len(data))
        return data

    def pwrite(self, data, offset: int) -> None:
        mv = memoryview(data)
        while mv:
            n = os.pwrite(self.fd, mv, offset)
            mv = mv[n:]
            offset += n

    def checksum_slots(self, offsets: list[int], length: int, masks: list[int] | None = None) -> list[tuple[int, bool]]:
        """(crc32c, all_zero) of the slot of length bytes at each offset, or
        of the pages of its mask (native.checksum_slots; thread-safe: preads
        only)."""
        return native.checksum_slots(self.fd, offsets, length, masks)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def start_writeback(self) -> None:
        native.start_writeback(self.fd)

    def punch(self, offset: int, length: int) -> None:
        native.punch_hole(self.fd, offset, length)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
