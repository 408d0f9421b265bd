"""How busy each disk is: the cloud's DescribeDiskMonitorData (IOPS, bytes
a second and latency per period), and vdisk's own DescribeDiskStats (the
counters now, which `vdisk disk stats` turns into rates).

The host counts each disk's requests (Host.io_stats: the FUSE layer's
counters, csrc/qos.c).  The daemon calls sample_io() at every multiple of
SAMPLE_S seconds of the control plane's time (VDISK_MONITOR_INTERVAL,
default 60: the cloud's finest period); each In_use disk's counters are
kept with that time in a history of HISTORY samples (7 days at a minute),
which is all vdisk answers for (the cloud keeps 30 days).  A period's rate
is the counters' difference between the samples at or before its start
(or the first in it) and its end, over the time between those samples.
With a sped-up clock (--clock-speed) the rates are per simulated second.
A disk's history begins with zeros at the time the host began counting its
requests (apply_io_limits: the daemon's start, or the disk's creation), so
what it did before its first sample is in the first period, not lost.

A mixin of Controller.
"""
from __future__ import annotations

import bisect
import collections
import os

from .clock import ClockError, iso, parse_iso
from .errors import CloudError
from .validate import Params

SAMPLE_S = max(1.0, float(os.environ.get("VDISK_MONITOR_INTERVAL", "60")))
HISTORY = 7 * 24 * 60
PERIODS = (60, 600, 3600)
MAX_ENTRIES = 400
QUERY_DAYS = 30
# a sample: (time, reads, writes, read bytes, write bytes, read latency ns, write latency ns)
_FIELDS = ("reads", "writes", "read_bytes", "write_bytes", "read_latency_ns", "write_latency_ns")


class MonitorActions:
    def _history(self) -> dict:
        if not hasattr(self, "_io_history"):
            self._io_history: dict[str, collections.deque] = {}
        return self._io_history

    def _io_counted_since(self) -> dict:
        """disk id -> when the host began counting its requests (its counters
        were all 0 then): the first sample of a disk's history."""
        if not hasattr(self, "_io_since"):
            self._io_since: dict[str, float] = {}
        return self._io_since

    def served_disks(self) -> list[tuple[str, str, int]]:
        """(disk id, instance id, volume) of every In_use disk."""
        return [(d["DiskId"], d["InstanceId"], d["_volume"]) for d in self._all("disk") if d["Status"] == "In_use"]

    def sample_io(self) -> None:
        """Keep every In_use disk's counters now (the daemon's sampler)."""
        if self.host is None:
            return
        now = self.clock.now()
        hist = self._history()
        for disk in self._all("disk"):
            st = self.host.io_stats(disk["_volume"]) if disk["Status"] == "In_use" else None
            if st is None:
                continue
            h = hist.get(disk["DiskId"])
            if h is None:  # its first sample: the requests since counting began are in this one
                h = hist[disk["DiskId"]] = collections.deque(maxlen=HISTORY)
                since = self._io_counted_since().get(disk["DiskId"])
                if since is not None and since < now:
                    h.append((since,) + (0,) * len(_FIELDS))
            h.append((now,) + tuple(st[f] for f in _FIELDS))
        for gone in hist.keys() - {d["DiskId"] for d in self._all("disk")}:
            del hist[gone]

    def do_DescribeDiskMonitorData(self, p: Params) -> dict:
        disk = self._disk(p)
        start = _minute_up(self._time(p, "StartTime"))
        end = _minute_up(self._time(p, "EndTime"))
        period = p.int("Period", default=60)
        if period not in PERIODS:
            raise CloudError("InvalidPeriod.ValueNotSupported",
                             "Period %d is not supported; use one of %s (seconds)." % (period, ", ".join(map(str, PERIODS))))
        if end < start:
            raise CloudError("InvalidParameter", "EndTime must not be earlier than StartTime.")
        if (end - start) / period > MAX_ENTRIES:
            raise CloudError("InvalidParameter.TooManyDataQueried",
                             "(EndTime - StartTime) / Period is %d; at most %d entries are returned at a time."
                             % ((end - start) // period, MAX_ENTRIES))
        if start < self.clock.now() - QUERY_DAYS * 86400:
            raise CloudError("InvalidStartTime.ValueNotSupported",
                             "StartTime is more than %d days ago; monitoring data is kept that long (vdisk keeps %d "
                             "days)." % (QUERY_DAYS, HISTORY * SAMPLE_S // 86400))
        samples = list(self._history().get(disk["DiskId"], ()))
        out = []
        t = start
        while t < end:
            entry = _rates(samples, t, min(t + period, end))
            if entry is not None:
                out.append({"DiskId": disk["DiskId"], "TimeStamp": iso(t), **entry})
            t += period
        return {"TotalCount": len(out), "MonitorData": {"DiskMonitorData": out}}

    def _time(self, p: Params, name: str) -> float:
        v = p.str(name, required=True)
        try:
            return parse_iso(v)
        except ClockError:
            raise CloudError("Invalid%s.Malformed" % name,
                             "%s %r is not a UTC time in the form yyyy-MM-ddTHH:mm:ssZ." % (name, v)) from None

    def do_DescribeDiskStats(self, p: Params) -> dict:
        """vdisk's own: every In_use disk's counters since the daemon started
        (or one disk's: DiskId), and its limits, for `vdisk disk stats`."""
        self._require_host("Disk statistics")
        want = p.str("DiskId")
        disks = [self._disk(p)] if want else self._all("disk")
        out = []
        for d in disks:
            st = self.host.io_stats(d["_volume"]) if d["Status"] == "In_use" else None
            if st is None:
                continue
            iops, bps, unit = self.io_limits_of(d)
            out.append({"DiskId": d["DiskId"], "InstanceId": d["InstanceId"], "Reads": st["reads"],
                        "Writes": st["writes"], "ReadBytes": st["read_bytes"], "WriteBytes": st["write_bytes"],
                        "ReadLatencyNs": st["read_latency_ns"], "WriteLatencyNs": st["write_latency_ns"],
                        "Waited": st["waited"], "WaitNs": st["wait_ns"], "InFlight": st["in_flight"],
                        "IopsLimit": iops, "BpsLimit": bps, "IoUnit": unit})
        return {"Disks": {"Disk": out}, "MonotonicNs": self.host.io_clock()}


def _minute_up(t: float) -> float:
    """The cloud rounds a time whose seconds are not 00 up to the next minute."""
    return -(-t // 60) * 60


def _at(samples: list, t: float):
    """The last sample at or before t, or None."""
    i = bisect.bisect_right(samples, t, key=lambda s: s[0])
    return samples[i - 1] if i else None


def _rates(samples: list, a: float, b: float) -> dict | None:
    """The cloud's figures for [a, b): rates between the samples at or
    before a (or the first after it: the disk came into use meanwhile) and
    b (None: no data for that time)."""
    s0, s1 = _at(samples, a), _at(samples, b)
    if s0 is None:
        i = bisect.bisect_left(samples, a, key=lambda s: s[0])
        s0 = samples[i] if i < len(samples) and samples[i][0] < b else None
    if s0 is None or s1 is None or s1[0] <= s0[0]:
        return None
    dt = s1[0] - s0[0]
    d = [y - x for x, y in zip(s0[1:], s1[1:])]
    reads, writes, rbytes, wbytes, rlat, wlat = d
    r = {
        "IOPSRead": round(reads / dt), "IOPSWrite": round(writes / dt),
        "BPSRead": round(rbytes / dt), "BPSWrite": round(wbytes / dt),
        "LatencyRead": round(rlat / reads / 1000) if reads else 0,  # microseconds
        "LatencyWrite": round(wlat / writes / 1000) if writes else 0,
    }
    r["IOPSTotal"] = r["IOPSRead"] + r["IOPSWrite"]
    r["BPSTotal"] = r["BPSRead"] + r["BPSWrite"]
    return r
