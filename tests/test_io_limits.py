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
