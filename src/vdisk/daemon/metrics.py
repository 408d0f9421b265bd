"""The daemon's Prometheus metrics (GET /metrics on the HTTP listener, or on
its own with `vdisk daemon start --metrics HOST:PORT`).

Built with prometheus_client (the well-kept client library): a custom
collector reads the counters where they live at each scrape - each In_use
disk's requests, bytes, latency histogram, waits at its I/O limit and
queue (the FUSE layer's, csrc/qos.c); the pool's space and snapshots (as
of the last commit: a scrape never commits); commits, the write cache, the
intent log and the fast path (the daemon's) - so nothing is counted twice
and a scrape costs nothing between scrapes.  Names and labels follow
Prometheus's conventions: `vdisk_` prefix, base units (seconds, bytes),
`_total` for counters; labels disk_id, instance_id and op (read, write).
The client's standard process_* metrics (resident memory, CPU seconds,
open descriptors) come with them.

Concurrency: render() runs in the trio thread, as every control action.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily

from ..fuse import qos

class DaemonCollector:
    def __init__(self, daemon):
        self.d = daemon

    def collect(self):
        yield from self._disks()
        yield from self._pool()

    def _disks(self):
        labels = ["disk_id", "instance_id"]
        fam = {
            "reads": CounterMetricFamily("vdisk_disk_reads", "Read requests served", labels=labels),
            "writes": CounterMetricFamily("vdisk_disk_writes", "Write requests served", labels=labels),
            "read_bytes": CounterMetricFamily("vdisk_disk_read_bytes", "Bytes read", labels=labels),
            "write_bytes": CounterMetricFamily("vdisk_disk_written_bytes", "Bytes written", labels=labels),
            "waited": CounterMetricFamily("vdisk_disk_throttled_requests",
                                          "Requests that waited for the disk's I/O limit", labels=labels),
            "wait": CounterMetricFamily("vdisk_disk_throttle_wait_seconds",
                                        "Time requests waited for the disk's I/O limit", labels=labels),
            "in_flight": GaugeMetricFamily("vdisk_disk_requests_in_flight",
                                           "Requests received and not yet answered (the queue depth)", labels=labels),
            "iops": GaugeMetricFamily("vdisk_disk_iops_limit", "The disk's IOPS limit (0: none)", labels=labels),
            "bps": GaugeMetricFamily("vdisk_disk_throughput_limit_bytes",
                                     "The disk's throughput limit in bytes a second (0: none)", labels=labels),
        }
        lat = HistogramMetricFamily("vdisk_disk_request_duration_seconds",
                                    "Time from a request's arrival to its answer, waits included",
                                    labels=labels + ["op"])
        bounds = qos.bucket_bounds_s()
        for disk_id, instance_id, vid in self.d.ctl.served_disks():
            st = qos.stats(vid)
            if st is None:
                continue
            lv = [disk_id, instance_id]
            for key in ("reads", "writes", "read_bytes", "write_bytes", "waited"):
                fam[key].add_metric(lv, st[key])
            fam["wait"].add_metric(lv, st["wait_ns"] / 1e9)
            fam["in_flight"].add_metric(lv, st["in_flight"])
            fam["iops"].add_metric(lv, st["iops_limit"])
            fam["bps"].add_metric(lv, st["bps_limit"])
            for op, hist, total in (("read", st["read_hist"], st["read_latency_ns"]),
                                    ("write", st["write_hist"], st["write_latency_ns"])):
                acc, buckets = 0, []
                for bound, n in zip(bounds, hist):
                    acc += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
                lat.add_metric(lv + [op], buckets, total / 1e9)
        yield from fam.values()
        yield lat

    def _pool(self):
        d = self.d
        st = d.fs.pool.stats(commit=False)
        for key, name, help_ in (
            ("used_bytes", "vdisk_pool_used_bytes", "Bytes the pool's blocks hold, as of the last commit"),
            ("data_file_allocated_bytes", "vdisk_pool_data_file_allocated_bytes", "Bytes the data file takes on disk"),
            ("slots_free", "vdisk_pool_free_blocks", "Free 64 KiB blocks below the data file's end"),
            ("slots_total", "vdisk_pool_blocks", "64 KiB blocks in the data file"),
            ("volumes", "vdisk_pool_volumes", "Volumes (disks and clones)"),
            ("snapshots", "vdisk_pool_snapshots", "Snapshots held by the engine"),
        ):
            yield GaugeMetricFamily(name, help_, value=st[key])
        c = d.committer.status()
        yield CounterMetricFamily("vdisk_commits", "Commits the daemon began", value=c["Commits"])
        yield SummaryMetricFamily("vdisk_commit_duration_seconds", "How long commits took (freeze to publish)",
                                  count_value=d.committer.commit_count, sum_value=d.committer.commit_seconds)
        yield GaugeMetricFamily("vdisk_write_cache_bytes", "Data written since the last commit", value=c["Bytes"])
        yield GaugeMetricFamily("vdisk_write_cache_blocks", "Blocks written since the last commit", value=c["Blocks"])
        heap = d.committer.heap
        yield CounterMetricFamily("vdisk_heap_given_back_bytes", "Freed heap memory given back to the kernel after "
                                  "commits (malloc_trim)", value=heap.given_back)
        lg = d.fs.pool.log_status()
        yield CounterMetricFamily("vdisk_intent_log_flushes", "fsyncs made durable by the intent log",
                                  value=lg["flushes"])
        yield CounterMetricFamily("vdisk_intent_log_flushes_during_commits",
                                  "fsyncs the intent log made durable while a commit ran, without waiting for it",
                                  value=lg["flushes_during_commit"])
        yield CounterMetricFamily("vdisk_intent_log_written_bytes", "Bytes written to the intent log",
                                  value=lg["bytes"])
        yield CounterMetricFamily("vdisk_intent_log_commits_instead", "fsyncs made durable by a commit instead",
                                  value=lg["commits_instead"])
        yield CounterMetricFamily("vdisk_intent_log_fsync_growths", "fsyncs that grew the intent log's file "
                                  "themselves (the daemon had not kept room ahead of the records)",
                                  value=lg["grows_in_c"])
        if d.fs.fast is not None:
            f = d.fs.fast.stats()
            fp = CounterMetricFamily("vdisk_fastpath_requests", "FUSE requests the C fast path served, by kind "
                                     "(passed_on: handed to pyfuse3, io_passed_on: of those, the reads, writes "
                                     "and fsyncs of a disk; delayed: waited for an I/O limit)",
                                     labels=["op"])
            for op in ("reads", "writes", "fsyncs", "passed_on", "io_passed_on", "delayed"):
                fp.add_metric([op.removesuffix("s") if not op.endswith("passed_on") else op], f[op])
            yield fp
            eng = CounterMetricFamily("vdisk_engine_served_requests", "Reads and writes of a disk the engine "
                                      "served itself in Python, with the fast path's map locked (C refused them "
                                      "even once taught)", labels=["op"])
            for op, n in d.fs.pool.served_here.items():
                eng.add_metric([op.removesuffix("s")], n)
            yield eng
            e = d.fs.pool.fast_map.stats()
            yield SummaryMetricFamily("vdisk_fastpath_reservoir_wait_seconds",
                                      "Writes that found C's reservoir of free slots empty and waited for the "
                                      "engine's refill, and how long",
                                      count_value=e["reservoir_waits"], sum_value=e["reservoir_wait_ns"] / 1e9)
            yield SummaryMetricFamily("vdisk_fastpath_lock_wait_seconds",
                                      "Requests that found the fast path's map locked (by the engine, or an fsync "
                                      "gathering its log record) and waited, and how long",
                                      count_value=e["lock_waits"], sum_value=e["lock_wait_ns"] / 1e9)
            yield SummaryMetricFamily("vdisk_fastpath_engine_lock_hold_seconds",
                                      "The engine's holds of the fast path's map lock, and how long",
                                      count_value=e["lock_holds"], sum_value=e["lock_hold_ns"] / 1e9)
            yield GaugeMetricFamily("vdisk_fastpath_cache_entries", "Blocks C's cache knows", value=e["entries"])
            yield GaugeMetricFamily("vdisk_fastpath_cache_bytes", "Memory C's cache of blocks takes",
                                    value=e["table_bytes"])
            yield CounterMetricFamily("vdisk_fastpath_cache_trims", "Trims of C's cache of blocks", value=e["trims"])


def registry(daemon) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(daemon))
    ProcessCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> tuple[str, bytes]:
    """The Prometheus text exposition of everything, now."""
    return CONTENT_TYPE_LATEST, generate_latest(reg)
