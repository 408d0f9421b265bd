"""The RBD diff stream format (vdisk.exchange.rbddiff), pure: what Writer
writes is what Ceph's doc/dev/rbd-diff.rst specifies, byte for byte, and
Reader refuses every stream that breaks a rule, naming it."""
import io
import struct

import pytest

from vdisk.exchange import rbddiff


def stream(from_snap, to_snap, size, records, end=True) -> bytes:
    out = io.BytesIO()
    w = rbddiff.Writer(out, from_snap, to_snap, size)
    for r in records:
        w.put(r)
    if end:
        w.end()
    return out.getvalue()


def read_all(data: bytes):
    r = rbddiff.Reader(io.BytesIO(data))
    return r.header(), list(r.records())


def test_writer_bytes_follow_the_specification():
    got = stream("a", "bc", 1 << 20, [("w", 4096, b"xy"), ("z", 8192, 4096)])
    want = (b"rbd diff v1\n"
            + b"f" + struct.pack("<I", 1) + b"a"
            + b"t" + struct.pack("<I", 2) + b"bc"
            + b"s" + struct.pack("<Q", 1 << 20)
            + b"w" + struct.pack("<QQ", 4096, 2) + b"xy"
            + b"z" + struct.pack("<QQ", 8192, 4096)
            + b"e")
    assert got == want


def test_round_trip_and_pieces():
    big = bytes(range(256)) * (3 * rbddiff.PIECE // 256 + 7)
    h, recs = read_all(stream(None, "snap", 64 << 20, [("z", 0, 65536), ("w", 65536, big)]))
    assert h == rbddiff.Header(None, "snap", 64 << 20)
    assert recs[0] == ("z", 0, 65536)
    # a large data record comes in pieces of at most PIECE bytes, in order
    assert all(len(r[2]) <= rbddiff.PIECE for r in recs[1:])
    assert b"".join(r[2] for r in recs[1:]) == big
    assert [r[1] for r in recs[1:]] == [65536 + i * rbddiff.PIECE for i in range(len(recs) - 1)]


def test_reader_takes_a_pipe_that_returns_short_reads():
    class Dribble(io.RawIOBase):
        def __init__(self, data):
            self.data = data

        def read(self, n=-1):
            k = min(3, n)
            b, self.data = self.data[:k], self.data[k:]
            return b

    data = stream("a", "b", 1 << 20, [("w", 0, b"hello world")])
    r = rbddiff.Reader(Dribble(data))
    assert r.header().to_snap == "b"
    assert list(r.records()) == [("w", 0, b"hello world")]


@pytest.mark.parametrize("mangle, rule", [
    (lambda d: b"not a diff at all", "banner"),
    (lambda d: b"rbd diff v2\n" + d[12:], "rbd diff v2"),
    (lambda d: d[:-1], "cut short"),
    (lambda d: d[:40], "cut short"),
    (lambda d: d[:-1] + b"q", "unknown record tag"),
    (lambda d: d[:-1] + b"s" + struct.pack("<Q", 1), "after the data records"),
    (lambda d: d[:-1] + b"w" + struct.pack("<QQ", 0, 4) + b"abcd" + b"e", "overlap"),
    (lambda d: d[:-1] + b"z" + struct.pack("<QQ", 1 << 20, 4096) + b"e", "beyond the image's size"),
    (lambda d: d[:-1] + b"z" + struct.pack("<QQ", 900000, 0) + b"e", "empty extent"),
])
def test_reader_refuses_what_breaks_a_rule(mangle, rule):
    good = stream("a", "b", 1 << 20, [("w", 4096, b"x" * 100), ("z", 65536, 4096)])
    read_all(good)  # the stream before it was mangled is fine
    with pytest.raises(rbddiff.StreamError, match=rule):
        read_all(mangle(good))


def test_writer_never_writes_an_overlapping_stream():
    w = rbddiff.Writer(io.BytesIO(), None, None, 1 << 20)
    w.data(4096, b"x" * 4096)
    with pytest.raises(ValueError):
        w.data(4096, b"y")  # rbd import-diff would apply the two at once
    with pytest.raises(ValueError):
        w.zero(1 << 20, 4096)  # beyond the image
