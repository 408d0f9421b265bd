"""On-disk format constants and key/value encodings (see docs/format.md).

Everything that is written to LMDB or the data file is encoded here and only
here, so that docs/format.md and the code can be compared side by side.
"""
from __future__ import annotations

import json
import struct

from .native import ffi as _ffi, lib as _lib  # csrc/logrecord.h: the log record's layout

FORMAT_VERSION = 6
# versions this vdisk opens: older ones are upgraded in place when opened
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
BLOCK_SIZE = 64 * 1024  # bytes per block (a "slot" in the data file)
SECTOR = 512
PAGE = 4096  # the unit of a partial entry's mask and of the intent log
PAGES_PER_BLOCK = BLOCK_SIZE // PAGE
FULL_MASK = (1 << PAGES_PER_BLOCK) - 1  # every page of a block
INF = 0xFFFF_FFFF_FFFF_FFFF  # "death" of a live entry
ZERO_SLOT = 0  # slot number meaning "all zeros" (tombstone); slots start at 1

DATA_FILE = "blocks.dat"
LMDB_DIR = "meta.lmdb"
LOG_FILE = "intent.log"  # the intent log's records of even generations
LOG_FILE_ODD = "intent-odd.log"  # ... and of odd ones (version 6)

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
_MAPVAL = struct.Struct("<QQIH")  # version 3: slot, death, crc32c, page mask
_MAPVAL4 = struct.Struct("<QQIHQI")  # version 4, a backed entry: ..., back slot, its crc32c
_MAPVAL2 = struct.Struct("<QQI")  # versions 1 and 2: no mask (the whole block)
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


def map_val(slot: int, death: int, csum: int, mask: int = FULL_MASK, back: int = 0, back_crc: int = 0) -> bytes:
    """mask: the 4 KiB pages of the block the slot holds.  The others come
    from slot `back` (a slot the entry owns, back_crc the checksum of its
    pages not in mask since version 5: a *backed* entry) or, without one,
    read as the block was just before the entry's birth (a *partial* entry
    reads through)."""
    if back:
        return _MAPVAL4.pack(slot, death, csum, mask, back, back_crc)
    return _MAPVAL.pack(slot, death, csum, mask)


def map_val_decode(val: bytes) -> tuple[int, int, int]:
    """(slot, death, crc) of an entry (see map_val_full for the rest)."""
    return _MAPVAL2.unpack_from(val)


def map_val_full(val: bytes) -> tuple[int, int, int, int, int, int]:
    """(slot, death, crc, mask, back, back_crc) of an entry: a version 2
    value (20 bytes) holds the whole block, a version 3 one (22) has no
    back slot."""
    n = len(val)
    if n == _MAPVAL.size:
        return _MAPVAL.unpack(val) + (0, 0)
    if n == _MAPVAL4.size:
        return _MAPVAL4.unpack(val)
    return _MAPVAL2.unpack(val) + (FULL_MASK, 0, 0)


def reads_through(val: bytes) -> bool:
    """Whether an entry reads the pages it lacks through to the entry that
    died at its birth (partial, and not backed)."""
    return len(val) == _MAPVAL.size and _MAPVAL.unpack(val)[3] != FULL_MASK


def entry_slots(val: bytes) -> list[int]:
    """The slots an entry owns (none for a tombstone)."""
    slot, _d, _c, _m, back, _bc = map_val_full(val)
    return [s for s in (slot, back) if s != ZERO_SLOT]


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


# ---------------------------------------------------------------- intent log
# A record: a 4096-byte header, then 4096 bytes for each page of its mask,
# entry by entry, pages in ascending order (see docs/format.md).  Its layout
# is written once, in csrc/logrecord.h, which the C writer compiles with and
# cffi reads: the sizes and offsets here come from there.
LOG_MAGIC = _ffi.string(_lib.vd_log_magic)
LOG_HEADER = _lib.VD_LOG_HEADER
LOG_PAGE = _lib.VD_LOG_PAGE
LOG_ENTRIES_AT = _ffi.sizeof("struct vd_log_head")
_LOGENT_SIZE = _ffi.sizeof("struct vd_log_entry")
LOG_MAX_ENTRIES = _lib.VD_LOG_MAX_ENTRIES
LOG_CRC_AT = _ffi.offsetof("struct vd_log_head", "crc")
# (offset, bytes) of the header's integer fields and an entry's (little endian)
_LOG_FIELDS = {f: (_ffi.offsetof("struct vd_log_head", f), 8 if f in ("gen", "seq", "vid") else 4)
               for f in ("gen", "seq", "vid", "count", "crc")}
_ENT_FIELDS = {f: (_ffi.offsetof("struct vd_log_entry", f), 8 if f == "block" else 4) for f in ("block", "mask")}
assert PAGE == LOG_PAGE and LOG_ENTRIES_AT + LOG_MAX_ENTRIES * _LOGENT_SIZE <= LOG_HEADER


def _put(buf, at: int, field: tuple[int, int], value: int) -> None:
    off, n = field
    buf[at + off : at + off + n] = value.to_bytes(n, "little")


def _get(buf, at: int, field: tuple[int, int]) -> int:
    off, n = field
    return int.from_bytes(buf[at + off : at + off + n], "little")


def page_mask(intra: int, length: int) -> int:
    """The pages of a block that bytes [intra, intra + length) touch."""
    first, last = intra // LOG_PAGE, (intra + length - 1) // LOG_PAGE
    return ((2 << last) - 1) & ~((1 << first) - 1)


def mask_pages(mask: int) -> list[int]:
    return [p for p in range(PAGES_PER_BLOCK) if mask >> p & 1]


def mask_runs(mask: int) -> list[tuple[int, int]]:
    """(first page, count) of each run of set bits, ascending."""
    out = []
    p = 0
    while p < PAGES_PER_BLOCK:
        if mask >> p & 1:
            q = p
            while q < PAGES_PER_BLOCK and mask >> q & 1:
                q += 1
            out.append((p, q - p))
            p = q
        else:
            p += 1
    return out


def log_set_crc(hdr: bytearray, crc: int) -> None:
    _put(hdr, 0, _LOG_FIELDS["crc"], crc)


def log_header_decode(hdr: bytes):
    """(gen, seq, vid, entries, crc) of a header, or None if it is not one;
    the CRC is the caller's to check (over the header with the field zero)."""
    if len(hdr) < LOG_HEADER or bytes(hdr[: len(LOG_MAGIC)]) != LOG_MAGIC:
        return None
    gen, seq, vid, count, crc = (_get(hdr, 0, _LOG_FIELDS[f]) for f in ("gen", "seq", "vid", "count", "crc"))
    if count > LOG_MAX_ENTRIES:
        return None
    entries = []
    for i in range(count):
        at = LOG_ENTRIES_AT + i * _LOGENT_SIZE
        entries.append((_get(hdr, at, _ENT_FIELDS["block"]), _get(hdr, at, _ENT_FIELDS["mask"])))
    if any(m > FULL_MASK for _, m in entries):
        return None
    return gen, seq, vid, entries, crc
