"""I/O limits with the real thing: the daemon, disk files as loop devices
with direct I/O, fio.  The limits are upper bounds that hold whatever the
machine's speed; fio's figures against the published caps (within 10%)
are measured by `scripts/bench --levels`, not asserted here.  Root only."""
import json
import subprocess

import pytest

from vdiskenv import VDiskEnv, need_root_fuse_loop

pytestmark = pytest.mark.root

PL0_1GIB = 1800 + 12  # IOPS of a 1 GiB PL0 ESSD
PL1_40GIB = 1800 + 50 * 40


def fio_iops(devs, runtime=3):
    """4 KiB random reads, queue depth 16, on each device at once."""
    cmd = ["fio", "--ioengine=libaio", "--direct=1", "--rw=randread", "--bs=4k", "--iodepth=16", "--size=1G",
           "--time_based", "--runtime=%d" % runtime, "--ramp_time=1", "--output-format=json", "--randrepeat=0"]
    for i, dev in enumerate(devs):
        cmd += ["--name=d%d" % i, "--filename=" + dev]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [j["read"]["iops"] for j in json.loads(out[out.index("{"):])["jobs"]]


def test_disks_run_at_their_category_speed_and_as_told():
    need_root_fuse_loop("fio")
    venv = VDiskEnv(io_limits="cloud")
    try:
        venv.start()
        iid, (d1, d2) = venv.instance(ndata=2, size=1, pl="PL0")
        venv.run("instance", "start", iid)
        devs = [venv.attach(d1), venv.attach(d2)]
        shown = venv.j("disk", "show", d1)
        assert (shown["IOPS"], shown["Throughput"], shown["IoLimits"]) == (PL0_1GIB, 100, "Cloud"), shown

        # two disks at their limit at once: neither above it, neither starved by the other
        both = fio_iops(devs)
        assert all(0.5 * PL0_1GIB < iops < 1.1 * PL0_1GIB for iops in both), both

        # one disk unlimited: it runs far past its category's speed; the other keeps its limit
        venv.run("disk", "set", d1, "--io-limits", "unlimited")
        assert venv.j("disk", "show", d1)["IoLimits"] == "Unlimited"
        fast, slow = fio_iops(devs)
        assert fast > 3 * PL0_1GIB and slow < 1.1 * PL0_1GIB, (fast, slow)
        venv.run("disk", "set", d1, "--io-limits", "pool")

        # a level the size does not allow is refused, and changes nothing
        r = venv.run("disk", "modify-spec", d2, "--performance-level", "PL1", check=False)
        assert r.returncode != 0 and "InvalidDiskSize.ValueNotSupported" in r.stderr, r.stderr
        assert venv.j("disk", "show", d2)["PerformanceLevel"] == "PL0"
        # ResizeDisk, then ModifyDiskSpec online: the new speed at once
        venv.run("disk", "resize", d2, "--size", 40)
        venv.run("disk", "modify-spec", d2, "--performance-level", "PL1")
        shown = venv.j("disk", "show", d2)
        assert (shown["PerformanceLevel"], shown["IOPS"]) == ("PL1", PL1_40GIB), shown
        limited, faster = fio_iops(devs)
        assert limited < 1.1 * PL0_1GIB and 1.2 * PL0_1GIB < faster < 1.1 * PL1_40GIB, (limited, faster)
        r = venv.run("disk", "modify-spec", d2, "--performance-level", "PL0", check=False)
        assert r.returncode != 0 and "InvalidPerformanceLevel.ValueNotSupported" in r.stderr, r.stderr
        assert venv.j("pool", "scrub")["Clean"]
    finally:
        venv.close()


def _scrape(address: str) -> dict:
    """GET /metrics, parsed with prometheus_client's own parser:
    {(name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen("http://%s/metrics" % address, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_stats_and_monitor_data_follow_the_load(monkeypatch):
    """Prometheus metrics (their own listener), `vdisk disk stats` and
    DescribeDiskMonitorData against fio on a disk at its limit."""
    import datetime
    import time

    need_root_fuse_loop("fio")
    monkeypatch.setenv("VDISK_MONITOR_INTERVAL", "1")
    venv = VDiskEnv(io_limits="cloud")
    try:
        venv.start("--metrics", "127.0.0.1:0")
        address = venv.j("daemon", "status")["Metrics"]
        iid, (d1,) = venv.instance(ndata=1, size=1, pl="PL0")
        venv.run("instance", "start", iid)
        dev = venv.attach(d1)
        t0 = time.time()
        labels = (("disk_id", d1), ("instance_id", iid))
        before = _scrape(address)
        reads0 = before.get(("vdisk_disk_reads_total", labels), 0)
        fio = subprocess.Popen(["fio", "--name=m", "--filename=" + dev, "--ioengine=libaio", "--direct=1",
                                "--rw=randread", "--bs=4k", "--iodepth=16", "--size=1G", "--time_based",
                                "--runtime=4", "--output-format=json", "--randrepeat=0"],
                               stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        stats = json.loads(venv.run("--json", "disk", "stats", d1, "--interval", "1").stdout)
        (row,) = stats["Disks"]
        assert 0.5 * PL0_1GIB < row["ReadsPerSecond"] < 1.1 * PL0_1GIB, row
        assert row["WritesPerSecond"] == 0 and 50 < row["PercentOfLimit"] <= 110 and row["ReadAwaitMs"] > 0, row
        done = json.loads(fio.communicate()[0])["jobs"][0]["read"]["total_ios"]
        after = _scrape(address)
        reads = after[("vdisk_disk_reads_total", labels)] - reads0
        assert done <= reads <= done + 64, (done, reads)  # fio counts what it completed; udev probes the device too
        assert after[("vdisk_disk_request_duration_seconds_count", labels + (("op", "read"),))] >= reads
        assert after[("vdisk_disk_iops_limit", labels)] == PL0_1GIB
        assert after[("vdisk_disk_throttled_requests_total", labels)] > 0
        assert after[("vdisk_commits_total", ())] >= before[("vdisk_commits_total", ())]
        # reads take no slots: no write waited for C's reservoir
        assert after[("vdisk_fastpath_reservoir_wait_seconds_count", ())] == 0
        assert after[("vdisk_pool_volumes", ())] == 2
        # the client library's process metrics, and the heap given back after commits
        assert after[("process_resident_memory_bytes", ())] > 0 and after[("process_open_fds", ())] > 0
        assert after[("vdisk_heap_given_back_bytes_total", ())] >= 0
        status = venv.j("daemon", "status")
        assert after[("vdisk_intent_log_fsync_growths_total", ())] == status["IntentLog"]["GrowthsInC"]
        # C's cache and lock, as daemon status shows them (a disk never
        # written: its reads need no entry, so the count may be 0)
        st = status["FastPath"]
        assert after[("vdisk_fastpath_cache_bytes", ())] == st["CacheMiB"] * (1 << 20) > 0
        assert after[("vdisk_fastpath_cache_entries", ())] >= 0 and after[("vdisk_fastpath_cache_trims_total", ())] == 0
        for name in ("vdisk_fastpath_lock_wait_seconds_count", "vdisk_fastpath_engine_lock_hold_seconds_count"):
            assert after[(name, ())] >= 0
        # requests handed to Python: all, the disks' reads, writes and fsyncs among them, those the engine served
        assert after[("vdisk_fastpath_requests_total", (("op", "io_passed_on"),))] <= \
            after[("vdisk_fastpath_requests_total", (("op", "passed_on"),))]
        for op in ("read", "write"):
            assert after[("vdisk_engine_served_requests_total", (("op", op),))] == st["ServedByEngine"][op + "s"]

        time.sleep(2)  # a sample after the load
        start = datetime.datetime.fromtimestamp(t0 // 60 * 60, datetime.UTC)
        end = start + datetime.timedelta(minutes=3)
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        res = venv.api("DescribeDiskMonitorData", DiskId=d1, StartTime=start.strftime(fmt),
                       EndTime=end.strftime(fmt), Period=60)
        data = res["MonitorData"]["DiskMonitorData"]
        assert res["TotalCount"] == len(data) >= 1, res
        assert sum(e["IOPSRead"] for e in data) > 0
        for e in data:
            assert e["DiskId"] == d1 and e["IOPSTotal"] == e["IOPSRead"] + e["IOPSWrite"]
            assert e["BPSRead"] == pytest.approx(4096 * e["IOPSRead"], rel=0.01, abs=4096)
            assert e["IOPSRead"] < 1.1 * PL0_1GIB and (e["LatencyRead"] > 0) == (e["IOPSRead"] > 0)
            datetime.datetime.strptime(e["TimeStamp"], fmt)
        bad = venv.run("api", "DescribeDiskMonitorData", "DiskId=" + d1, "StartTime=" + start.strftime(fmt),
                       "EndTime=" + end.strftime(fmt), "Period=30", check=False)
        assert "InvalidPeriod.ValueNotSupported" in bad.stdout + bad.stderr
        far = (start + datetime.timedelta(minutes=401)).strftime(fmt)
        bad = venv.run("api", "DescribeDiskMonitorData", "DiskId=" + d1, "StartTime=" + start.strftime(fmt),
                       "EndTime=" + far, check=False)
        assert "InvalidParameter.TooManyDataQueried" in bad.stdout + bad.stderr
    finally:
        venv.close()
