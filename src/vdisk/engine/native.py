"""Python face of the C extension (csrc/blockops.c, built by cffi).

Every function takes any buffer (bytes, bytearray, memoryview) and the C code
runs without the GIL.
"""
from __future__ import annotations

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "vdisk's C extension (vdisk.engine._native) is not built: "
        "install vdisk with 'pip install .' (it needs gcc and the Python headers)"
    ) from exc

SECTOR = 512


def crc32c(buf, crc: int = 0) -> int:
    """CRC-32C of buf (continuing from crc)."""
    return lib.vd_crc32c(crc, ffi.from_buffer(buf), len(buf))


def is_zero(buf) -> bool:
    return bool(lib.vd_is_zero(ffi.from_buffer(buf), len(buf)))




def crc32c_is_zero(buf) -> tuple[int, bool]:
    """(crc32c, all_zero) in one pass; crc is 0 for an all-zero buffer.
    Thread-safe: the out-parameter is the caller's own.  Commits use
    checksum_slots(), which does this in C for each of many slots."""
    zflag = ffi.new("int *")
    crc = lib.vd_crc32c_is_zero(ffi.from_buffer(buf), len(buf), zflag)
    return crc, bool(zflag[0])


def checksum_slots(fd: int, offsets: list[int], block_size: int,
                   masks: list[int] | None = None) -> list[tuple[int, bool]]:
    """(crc32c, all_zero) of the slots of block_size bytes at each offset of
    fd, read and checksummed in C without the GIL (a commit's many blocks
    in one call).  masks: the 16 pages each slot holds (None: all); a
    partial slot's CRC is its pages' in order, and only they are read."""
    n = len(offsets)
    if not n:
        return []
    offs = ffi.new("uint64_t[]", offsets)
    cmasks = ffi.NULL if masks is None else ffi.new("uint16_t[]", masks)
    crcs = ffi.new("uint32_t[]", n)
    zero = ffi.new("unsigned char[]", n)
    buf = ffi.new("unsigned char[]", block_size)
    rc = lib.vd_checksum_slots(fd, offs, cmasks, n, block_size, buf, crcs, zero)
    if rc < 0:
        import os

        raise OSError(-rc, os.strerror(-rc))
    return [(crcs[i], bool(zero[i])) for i in range(n)]


def diff_sectors(old, new, sector: int = SECTOR) -> tuple[int, bytes]:
    """Compare two equal-sized blocks sector by sector.

    Returns (number of differing sectors, bitmap with bit i set where sector i
    differs).
    """
    if len(old) != len(new):
        raise ValueError("diff_sectors: blocks differ in length")
    nbits = len(old) // sector
    bitmap = ffi.new("unsigned char[]", (nbits + 7) // 8)
    n = lib.vd_diff_sectors(ffi.from_buffer(old), ffi.from_buffer(new), len(old), sector, bitmap)
    if n < 0:
        raise ValueError("diff_sectors: length %d is not a multiple of %d" % (len(old), sector))
    return n, bytes(ffi.buffer(bitmap))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE); raises OSError on failure."""
    rc = lib.vd_punch_hole(fd, offset, length)
    if rc < 0:
        import os

        raise OSError(-rc, os.strerror(-rc))


def start_writeback(fd: int) -> None:
    """sync_file_range(WRITE), 4 MiB at a time: begin writeback of dirty
    pages, do not wait."""
    lib.vd_start_writeback(fd)


def have_hw_crc() -> bool:
    return bool(lib.vd_have_hw_crc())
