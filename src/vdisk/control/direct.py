"""Direct snapshot access, after AWS EBS's direct APIs (vdisk extensions).

ListChangedBlocks answers from the block map alone (no data is read);
GetSnapshotBlock returns one block of a snapshot with its CRC-32C.  Block
indexes count the pool's blocks (BlockSize in every answer).

A mixin of Controller.
"""
from __future__ import annotations

import base64

from ..engine import native
from ..engine.pool import BLOCK_SIZE
from .errors import CloudError
from .validate import Params

GIB = 1 << 30


class DirectActions:
    def do_ListChangedBlocks(self, p: Params) -> dict:
        second = self._snapshot(p, "SecondSnapshotId")
        first = self._snapshot(p, "FirstSnapshotId") if p.str("FirstSnapshotId") else None
        if first is not None and first["SourceDiskId"] != second["SourceDiskId"]:
            raise CloudError(
                "InvalidParameter.SnapshotsOfDifferentDisks",
                "FirstSnapshotId %s and SecondSnapshotId %s come from different disks." % (first["SnapshotId"], second["SnapshotId"]),
            )
        blocks = self.pool.changed_blocks(first["_snap"] if first else None, second["_snap"])
        return {
            "BlockSize": BLOCK_SIZE,
            "VolumeSize": second["SourceDiskSize"],
            "ChangedBlocks": [{"BlockIndex": b} for b in blocks],
        }

    def do_GetSnapshotBlock(self, p: Params) -> dict:
        snap = self._snapshot(p)
        nblocks = snap["SourceDiskSize"] * GIB // BLOCK_SIZE
        index = p.int("BlockIndex", required=True, lo=0, hi=nblocks - 1)
        data = self.pool.read_snapshot(snap["_snap"], index * BLOCK_SIZE, BLOCK_SIZE)
        return {
            "BlockSize": BLOCK_SIZE,
            "BlockIndex": index,
            "BlockData": base64.b64encode(data).decode(),
            "Checksum": "%08x" % native.crc32c(data),
            "ChecksumAlgorithm": "CRC32C",
        }
