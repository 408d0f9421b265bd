"""A DataFile that can lose or tear what was not synced: a simulated power cut.

It stands in for vdisk.engine.blockio.DataFile (the engine's only data I/O
seam).  Every write or punch since the last sync() is remembered with the
bytes it replaced; power_cut() puts some or all of them back, sector by
sector, as a disk with a volatile cache may after losing power.
"""
from __future__ import annotations

import errno
import os
import random

from vdisk.engine.blockio import DataFile

SECTOR = 512


class PowerCutFile(DataFile):
    def __init__(self, path: str):
        super().__init__(path)
        self._undo: list[tuple[int, bytes]] = []  # (offset, old bytes), oldest first
        self.fail_next_sync = False  # the next sync() fails (EIO) without syncing: a crash during it

    def _remember(self, offset: int, length: int) -> None:
        self._undo.append((offset, os.pread(self.fd, length, offset)))

    def remember(self, offset: int, length: int) -> None:
        """Undo this range at a power cut, as if written since the last
        sync, for writes this object does not see (the intent log's C
        writer's): beyond the file's end it comes back as zeros."""
        old = os.pread(self.fd, length, offset)
        self._undo.append((offset, old + bytes(length - len(old))))

    def pwrite(self, data, offset: int) -> None:
        self._remember(offset, len(data))
        super().pwrite(data, offset)

    def punch(self, offset: int, length: int) -> None:
        self._remember(offset, length)
        super().punch(offset, length)

    def sync(self) -> None:
        if self.fail_next_sync:
            self.fail_next_sync = False
            raise OSError(errno.EIO, "simulated crash during fdatasync")
        super().sync()
        self._undo.clear()

    def power_cut(self, mode: str = "drop", rng: random.Random | None = None) -> int:
        """Undo unsynced writes.  mode: 'drop' undoes all of them, 'tear'
        undoes a random subset of sectors (some writes half-done), 'keep'
        undoes nothing.  Returns the number of sectors put back."""
        rng = rng or random.Random(0)
        restored = 0
        for offset, old in reversed(self._undo):
            if mode == "keep":
                break
            for i in range(0, len(old), SECTOR):
                if mode == "drop" or rng.random() < 0.5:
                    chunk = old[i : i + SECTOR]
                    os.pwrite(self.fd, chunk, offset + i)
                    restored += 1
        self._undo.clear()
        return restored
