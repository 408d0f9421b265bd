"""Ceph RBD's diff stream, version 1 ("rbd diff v1"), both ways.

The format (Ceph's doc/dev/rbd-diff.rst): the banner ``rbd diff v1\\n``, then
metadata records, then data records, then the end record; integers are
little-endian, every record starts with a one-byte tag:

    'f' le32 n, n bytes      the snapshot the diff starts from (none: from nothing)
    't' le32 n, n bytes      the snapshot it ends at (none: the image's head)
    's' le64                 the image's size at the end
    'w' le64 off, le64 len, len bytes    data
    'z' le64 off, le64 len   zeros (discarded)
    'e'                      end

`rbd import-diff` applies data records concurrently, so a stream must never
overlap itself: Writer refuses an extent that does not start at or after
the end of the one before, and Reader refuses a stream whose extents go
backwards or overlap (rbd's own streams never do).  Reader also refuses
metadata after data, records past the image's size, and unknown tags, each
naming the rule and the byte offset; it reads incrementally, so a pipe
works, and a stream cut short is an error, never a silent end.
"""
from __future__ import annotations

import struct
import typing

BANNER = b"rbd diff v1\n"
# rbd's own limit on a snapshot name it accepts is larger; names here come
# from and go to the cloud's SnapshotName (at most 128 characters)
MAX_NAME = 4096
# one 'w' record is read and handed on in pieces of at most this many bytes
PIECE = 1 << 20

_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")
_EXTENT = struct.Struct("<QQ")


class StreamError(ValueError):
    """The stream breaks a rule of the format (the message names it and
    where, as a byte offset from the start of the stream)."""


class Header(typing.NamedTuple):
    from_snap: str | None
    to_snap: str | None
    size: int | None


class Writer:
    """Writes a stream to a binary file object (anything with write())."""

    def __init__(self, out, from_snap: str | None, to_snap: str | None, size: int):
        self.out = out
        self.size = size
        self._end = 0  # where the last extent ended: extents must not overlap
        self.bytes = 0
        self._put(BANNER)
        if from_snap is not None:
            self._name(b"f", from_snap)
        if to_snap is not None:
            self._name(b"t", to_snap)
        self._put(b"s" + _LE64.pack(size))

    def _put(self, b) -> None:
        self.out.write(b)
        self.bytes += len(b)

    def _name(self, tag: bytes, name: str) -> None:
        raw = name.encode()
        self._put(tag + _LE32.pack(len(raw)) + raw)

    def _extent(self, offset: int, length: int) -> None:
        if length <= 0 or offset < self._end or offset + length > self.size:
            raise ValueError("extent %d+%d overlaps the one before (ending at %d), is empty, or ends beyond the "
                             "image's %d bytes" % (offset, length, self._end, self.size))
        self._end = offset + length

    def data(self, offset: int, data) -> None:
        self._extent(offset, len(data))
        self._put(b"w" + _EXTENT.pack(offset, len(data)))
        self._put(data)

    def zero(self, offset: int, length: int) -> None:
        self._extent(offset, length)
        self._put(b"z" + _EXTENT.pack(offset, length))

    def put(self, rec) -> None:
        """A record as Reader.records() gives it: ("w", offset, data) or
        ("z", offset, length)."""
        if rec[0] == "w":
            self.data(rec[1], rec[2])
        else:
            self.zero(rec[1], rec[2])

    def end(self) -> None:
        self._put(b"e")


class Reader:
    """Reads a stream from a binary file object (anything with read(n);
    a pipe is fine).  header() first, then records() yields
    ("w", offset, bytes) in pieces of at most PIECE bytes and
    ("z", offset, length); the end record ends it."""

    def __init__(self, inp):
        self.inp = inp
        self.pos = 0
        self._header: Header | None = None
        self._pending: bytes | None = None  # the tag after the metadata
        self._end = 0

    def _read(self, n: int, what: str) -> bytes:
        parts = []
        got = 0
        while got < n:
            b = self.inp.read(n - got)
            if not b:
                raise StreamError("the stream ends at byte %d in the middle of %s (%d of %d bytes): it was cut short"
                                  % (self.pos + got, what, got, n))
            parts.append(b)
            got += len(b)
        self.pos += n
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def header(self) -> Header:
        banner = self._read(len(BANNER), "the banner")
        if banner != BANNER:
            if banner.startswith(b"rbd diff v2"):
                raise StreamError("the stream is 'rbd diff v2' (rbd export-diff --export-format 2); vdisk reads "
                                  "version 1, rbd export-diff's default")
            raise StreamError("the stream does not start with the banner 'rbd diff v1\\n': not an RBD diff stream")
        f = t = size = None
        while True:
            tag = self._read(1, "a record's tag")
            if tag in (b"f", b"t"):
                (n,) = _LE32.unpack(self._read(4, "a snapshot name's length"))
                if n == 0 or n > MAX_NAME:
                    raise StreamError("a snapshot name of %d bytes at byte %d (allowed: 1 to %d)" % (n, self.pos - 4, MAX_NAME))
                raw = self._read(n, "a snapshot name")
                try:
                    name = raw.decode()
                except UnicodeDecodeError:
                    raise StreamError("the snapshot name at byte %d is not UTF-8" % (self.pos - n)) from None
                if tag == b"f":
                    f = name
                else:
                    t = name
            elif tag == b"s":
                (size,) = _LE64.unpack(self._read(8, "the image size"))
            else:
                self._pending = tag
                break
        self._header = Header(f, t, size)
        return self._header

    def records(self):
        if self._header is None:
            raise RuntimeError("header() first")
        size = self._header.size
        tag = self._pending
        while True:
            at = self.pos - 1
            if tag == b"e":
                return
            if tag in (b"w", b"z"):
                off, length = _EXTENT.unpack(self._read(16, "an extent"))
                if length == 0:
                    raise StreamError("an empty extent at byte %d" % at)
                if size is not None and off + length > size:
                    raise StreamError("the extent %d+%d at byte %d ends beyond the image's size %d"
                                      % (off, length, at, size))
                if off < self._end:
                    raise StreamError("the extent %d+%d at byte %d starts before the one before it ended (%d): "
                                      "extents must not overlap or go backwards (rbd import-diff applies them at once)"
                                      % (off, length, at, self._end))
                self._end = off + length
                if tag == b"z":
                    yield ("z", off, length)
                else:
                    done = 0
                    while done < length:
                        n = min(PIECE, length - done)
                        yield ("w", off + done, self._read(n, "an extent's data"))
                        done += n
            elif tag in (b"f", b"t", b"s"):
                raise StreamError("a metadata record (%r) at byte %d after the data records" % (tag.decode(), at))
            else:
                raise StreamError("an unknown record tag %r at byte %d" % (tag, at))
            tag = self._read(1, "a record's tag")
