"""On-disk format constants and key/value encodings (see docs/format.md).

Everything that is written to LMDB or the data file is encoded here and only
here, so that docs/format.md and the code can be compared side by side.
"""
from __future__ import annotations

import json
import struct

FORMAT_VERSION = 1
BLOCK_SIZE = 64 * 1024  # bytes per block (a "slot" in the data file)
SECTOR = 512
INF = 0xFFFF_FFFF_FFFF_FFFF  # "death" of a live entry
ZERO_SLOT = 0  # slot number meaning "all zeros" (tombstone); slots start at 1

DATA_FILE = "blocks.dat"
LMDB_DIR = "meta.lmdb"

# LMDB named databases
DB_META = b"meta"
DB_MAP = b"map"
DB_DEAD = b"dead"
DB_BORN = b"born"
DB_FREE = b"free"
DB_LINEAGE = b"lineage"
DB_VOLUME = b"volume"
DB_SNAP = b"snap"
DB_RECORD = b"record"

_Q3 = struct.Struct(">QQQ")
_Q2 = struct.Struct(">QQ")
_Q1 = struct.Struct(">Q")
_MAPVAL = struct.Struct("<QQI")
_BIRTH = struct.Struct("<Q")


def slot_offset(slot: int) -> int:
    """Byte offset of a slot in the data file (slot 1 is at offset 0)."""
    return (slot - 1) * BLOCK_SIZE


def map_key(lid: int, block: int, birth: int) -> bytes:
    # Births are stored inverted so that one set_range(lid, block, INF-gen)
    # lands on the newest entry born at or before gen.
    return _Q3.pack(lid, block, INF - birth)


def map_key_decode(key: bytes) -> tuple[int, int, int]:
    lid, block, inv = _Q3.unpack(key)
    return lid, block, INF - inv


def map_val(slot: int, death: int, csum: int) -> bytes:
    return _MAPVAL.pack(slot, death, csum)


def map_val_decode(val: bytes) -> tuple[int, int, int]:
    return _MAPVAL.unpack(val)


def dead_key(lid: int, death: int, block: int) -> bytes:
    return _Q3.pack(lid, death, block)


def born_key(lid: int, birth: int, block: int) -> bytes:
    return _Q3.pack(lid, birth, block)


tri_decode = _Q3.unpack


def birth_val(birth: int) -> bytes:
    return _BIRTH.pack(birth)


def birth_val_decode(val: bytes) -> int:
    return _BIRTH.unpack(val)[0]


def u64(n: int) -> bytes:
    return _Q1.pack(n)


def u64_decode(b: bytes) -> int:
    return _Q1.unpack(b)[0]


def lid_prefix(lid: int) -> bytes:
    return _Q1.pack(lid)


def jenc(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def jdec(b: bytes):
    return json.loads(bytes(b))
