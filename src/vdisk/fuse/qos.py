"""Per-volume I/O limits and counters (csrc/qos.c), the FUSE layer's side.

A limit is a number of operations and of bytes a second, each paced by a
token bucket in C: a request over the limit waits (it never fails), in
the order it came.  READ and WRITE served by the C fast path are paced
there (its delay queue); those served by pyfuse3 here, with trio.sleep,
when the fast path is off.  What the limits are is the control plane's
business (vdisk.control.categories): this module knows volumes, not disks.

Every function is thread-safe (the C table has its own mutex).
"""
from __future__ import annotations

from . import discard

# the counters vd_qos_stats gives, in order (csrc/qos.h)
_STATS = ("reads", "writes", "read_bytes", "write_bytes", "waited", "wait_ns", "read_latency_ns",
          "write_latency_ns", "in_flight", "iops_limit", "bps_limit", "io_unit")


def _lib():
    lib = discard.shim()
    if lib is None:
        raise OSError("the FUSE shim (vdisk.fuse._lowlevel) is not loaded: I/O limits need it")
    return lib


def set_limit(vid: int, iops: int, bps: int, io_unit: int = 0, now: int | None = None) -> None:
    """At most iops operations (each io_unit bytes or part of them counts
    once; 0: every request once) and bps bytes a second for volume vid,
    from now (now_ns()) on; 0 and 0: no limit."""
    lib = _lib()
    if lib.vd_qos_set(vid, iops, bps, io_unit, lib.vd_qos_now() if now is None else now) < 0:
        raise MemoryError("I/O limits: out of memory")


def now_ns() -> int:
    return _lib().vd_qos_now()


def admit(vid: int, is_write: bool, length: int, now: int) -> float:
    """Count a request arriving at now (now_ns()) and take it from the
    volume's limit: the seconds it must wait before it is served."""
    return _lib().vd_qos_admit(vid, int(is_write), length, now) / 1e9


def done(vid: int, is_write: bool, start: int) -> None:
    """The request admitted at start (now_ns()) was answered now."""
    lib = _lib()
    lib.vd_qos_done(vid, int(is_write), start, lib.vd_qos_now())


def stats(vid: int) -> dict | None:
    """The volume's counters since it was first seen (None: never), with
    its latency histograms: "read_hist"/"write_hist" count the requests
    answered within 16 us * 2**i (the last bucket: the rest)."""
    lib, ffi = _lib(), discard.shim_ffi()
    out = ffi.new("uint64_t[]", lib.VD_QOS_NSTATS)
    hist = ffi.new("uint64_t[]", 2 * lib.VD_QOS_NBUCKETS)
    if not lib.vd_qos_stats(vid, out, hist):
        return None
    st = dict(zip(_STATS, out))
    n = lib.VD_QOS_NBUCKETS
    st["read_hist"] = list(hist[0:n])
    st["write_hist"] = list(hist[n : 2 * n])
    return st


def bucket_bounds_s() -> list[float]:
    """The latency histograms' upper bounds in seconds (the last: +inf)."""
    n = _lib().VD_QOS_NBUCKETS
    return [16e-6 * 2**i for i in range(n - 1)] + [float("inf")]
