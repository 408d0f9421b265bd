"""The I/O limits' token buckets (csrc/qos.c) with a made-up clock: pure
unit tests, no root.  What fio measures against a real disk at its limit
is in the benchmark (scripts/bench --levels), not here."""
import itertools

import pytest

pytest.importorskip("pyfuse3", reason="the FUSE shim (vdisk.fuse._lowlevel) needs pyfuse3")

import vdisk.fuse  # noqa: E402,F401 - loads the shim
from vdisk.fuse import discard, qos  # noqa: E402

if discard.shim() is None:
    pytest.skip("the FUSE shim (vdisk.fuse._lowlevel) is not built", allow_module_level=True)

S = 1_000_000_000  # ns
T = 10**15  # a made-up time
_vids = itertools.count(1 << 40)  # volumes of their own: the table is the process's


def test_a_volume_without_a_limit_never_waits_and_is_counted():
    vid = next(_vids)
    t = T
    assert all(qos.admit(vid, True, 4096, t) == 0 for _ in range(1000))
    assert qos.admit(vid, False, 1 << 20, t) == 0
    st = qos.stats(vid)
    assert (st["writes"], st["write_bytes"], st["reads"], st["read_bytes"]) == (1000, 1000 * 4096, 1, 1 << 20)
    assert st["waited"] == 0 and st["in_flight"] == 1001


def test_requests_over_the_iops_limit_are_paced_in_order():
    vid = next(_vids)
    qos.set_limit(vid, 1000, 0, now=T)
    t = T
    waits = [qos.admit(vid, True, 4096, t) for _ in range(150)]
    # a full bucket (50 ms of the rate) goes at once, then one every ms
    assert waits[:50] == [0] * 50
    assert waits[50:] == pytest.approx([(i + 1) / 1000 for i in range(100)], abs=1e-6)
    # a second later the debt is paid and the bucket full again
    assert qos.admit(vid, True, 4096, t + 2 * S) == 0
    st = qos.stats(vid)
    assert st["waited"] == 100 and st["iops_limit"] == 1000


def test_a_sustained_load_gets_the_limit():
    """Requests arriving twice as fast as the limit for 10 s: those served
    by the end number the limit's 10 s plus one bucket."""
    vid = next(_vids)
    qos.set_limit(vid, 2000, 0, now=T)
    t0 = T
    served = 0
    for i in range(40000):  # 4000 a second
        at = t0 + i * S // 4000
        if at + qos.admit(vid, False, 4096, at) * S <= t0 + 10 * S:
            served += 1
    assert served == pytest.approx(2000 * 10 + 100, rel=0.01)


def test_throughput_limit_and_large_requests_count_as_several_operations():
    vid = next(_vids)
    qos.set_limit(vid, 0, 100_000_000, now=T)  # 100 MB/s
    t = T
    qos.admit(vid, True, 5_000_000, t)  # the bucket: 50 ms worth
    assert qos.admit(vid, True, 1_000_000, t) == pytest.approx(0.010, abs=1e-6)
    vid = next(_vids)
    qos.set_limit(vid, 1000, 0, io_unit=16384, now=T)
    t = T
    assert qos.admit(vid, True, 50 * 16384, t) == 0  # 50 operations: the bucket
    assert qos.admit(vid, True, 65536, t) == pytest.approx(0.004, abs=1e-6)  # 4 more
    assert qos.admit(vid, True, 1, t) == pytest.approx(0.005, abs=1e-6)  # a request counts once at least


def test_a_changed_limit_applies_at_once():
    vid = next(_vids)
    qos.set_limit(vid, 100, 0, now=T)
    for _ in range(5):
        qos.admit(vid, True, 4096, T)  # the bucket: 5 operations
    assert qos.admit(vid, True, 4096, T) == pytest.approx(0.01, abs=1e-6)
    qos.set_limit(vid, 10000, 0, now=T)  # a hundred times faster: the debt (1) is paid at the new rate
    assert qos.admit(vid, True, 4096, T) == pytest.approx(0.0002, abs=1e-7)
    qos.set_limit(vid, 0, 0, now=T)  # no limit
    assert all(qos.admit(vid, True, 4096, T) == 0 for _ in range(10000))


def test_latency_histogram():
    vid = next(_vids)
    lib = discard.shim()
    t = T
    for lat_us in (10, 20, 40, 1000, 10**7):
        qos.admit(vid, False, 4096, t)
        lib.vd_qos_done(vid, 0, t, t + lat_us * 1000)
    st = qos.stats(vid)
    bounds = qos.bucket_bounds_s()
    hist = st["read_hist"]
    assert sum(hist) == 5 and st["in_flight"] == 0
    assert hist[0] == 1 and hist[1] == 1 and hist[2] == 1  # < 16, < 32, < 64 us
    assert hist[bounds.index(next(b for b in bounds if b > 1e-3))] == 1  # 1 ms
    assert hist[-1] == 1  # 10 s: the last bucket
    assert st["read_latency_ns"] == sum((10, 20, 40, 1000, 10**7)) * 1000
