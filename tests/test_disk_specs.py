"""Disk categories and their speed on the control plane with a real pool
(no daemon, no root): the cloud's formulas as DescribeDisks shows them and
as the daemon enforces them (Controller.io_limits_of), ESSD AutoPL's
provisioned IOPS and burst, ESSD Entry, ModifyDiskSpec's rules, the
IoLimits settings; every refusal changes nothing."""
import pytest

from test_cloud_conventions import ctl  # noqa: F401 - the fixture: a Controller on a real pool, no host
from test_lifecycle import ok, refused
from vdisk.control import categories

MB = 1000 * 1000


def disk(ctl, disk_id):
    return ok(ctl, "DescribeDisks", DiskIds='["%s"]' % disk_id)["Disks"]["Disk"][0]


def new_disk(ctl, **params):
    return ok(ctl, "CreateDisk", **params)["DiskId"]


def limits(ctl, disk_id):
    return ctl.io_limits_of(ctl.pool.get_record("disk/" + disk_id))


def test_each_category_at_its_published_speed(ctl):
    cases = [  # (params, IOPS, MB/s)
        ({"DiskCategory": "cloud_essd", "PerformanceLevel": "PL0", "Size": "40"}, 2280, 110),
        ({"DiskCategory": "cloud_essd", "PerformanceLevel": "PL1", "Size": "1000"}, 50000, 350),
        ({"DiskCategory": "cloud_essd", "PerformanceLevel": "PL2", "Size": "461"}, 24850, 350),
        ({"DiskCategory": "cloud_essd", "PerformanceLevel": "PL3", "Size": "1261"}, 64850, 750),
        ({"DiskCategory": "cloud_auto", "Size": "20"}, 3000, 130),  # the baseline's floors
        ({"DiskCategory": "cloud_auto", "Size": "40"}, 3800, 140),
        ({"DiskCategory": "cloud_essd_entry", "Size": "20"}, 1960, 103),
        ({"DiskCategory": "cloud_ssd", "Size": "100"}, 4800, 170),
        ({"DiskCategory": "cloud_efficiency", "Size": "100"}, 2600, 115),
        ({"DiskCategory": "cloud", "Size": "100"}, 300, 30),
    ]
    for params, iops, mbs in cases:
        d = disk(ctl, new_disk(ctl, **params))
        assert (d["IOPS"], d["Throughput"], d["IoLimits"]) == (iops, mbs, "Cloud"), (params, d)
        unit = 16384 if params["DiskCategory"].startswith("cloud_essd") or params["DiskCategory"] == "cloud_auto" else 0
        lim = limits(ctl, d["DiskId"])
        assert (lim[0], lim[2]) == (iops, unit) and lim[1] == pytest.approx(mbs * MB, rel=0.002), (params, lim)


def test_autopl_provisioned_iops_and_burst(ctl):
    d = new_disk(ctl, DiskCategory="cloud_auto", Size="40", ProvisionedIops="10000")
    shown = disk(ctl, d)
    assert (shown["IOPS"], shown["Throughput"], shown["ProvisionedIops"], shown["BurstingEnabled"]) == \
        (13800, 296, 10000, False)
    assert limits(ctl, d)[:2] == (13800, 296 * MB)
    # the most a 40 GiB disk takes: 1000 x 40 - 3800
    refused(ctl, "InvalidProvisionedIops.ValueNotSupported", "CreateDisk", DiskCategory="cloud_auto", Size="40",
            ProvisionedIops="36201")
    refused(ctl, "InvalidProvisionedIops.ValueNotSupported", "CreateDisk", DiskCategory="cloud_auto", Size="3",
            ProvisionedIops="1")
    refused(ctl, "InvalidParameter", "CreateDisk", DiskCategory="cloud_essd", Size="40", ProvisionedIops="100")
    refused(ctl, "InvalidParameter", "CreateDisk", DiskCategory="cloud_auto", Size="3", BurstingEnabled="true")
    # burst: up to min(1000000, 1000 x GiB) IOPS, 16 KB each
    ok(ctl, "ModifyDiskAttribute", DiskId=d, BurstingEnabled="true")
    assert disk(ctl, d)["BurstingEnabled"] is True
    assert limits(ctl, d)[:2] == (40000, int(16 * 40000 / 1024 * MB))
    refused(ctl, "InvalidParameter", "ModifyDiskAttribute", DiskId=new_disk(ctl, Size="40"), BurstingEnabled="true")
    ok(ctl, "ModifyDiskSpec", DiskId=d, ProvisionedIops="20000")
    assert disk(ctl, d)["IOPS"] == 23800


def test_modify_disk_spec_follows_the_clouds_rules(ctl):
    pl1 = new_disk(ctl, DiskCategory="cloud_essd", PerformanceLevel="PL1", Size="100")
    refused(ctl, "InvalidPerformanceLevel.ValueNotSupported", "ModifyDiskSpec", DiskId=pl1, PerformanceLevel="PL0")
    refused(ctl, "InvalidDiskSize.ValueNotSupported", "ModifyDiskSpec", DiskId=pl1, PerformanceLevel="PL2")
    refused(ctl, "MissingParameter", "ModifyDiskSpec", DiskId=pl1)
    refused(ctl, "UnsupportedParameter", "ModifyDiskSpec", DiskId=pl1, PerformanceLevel="PL1",
            **{"PerformanceControlOptions.IOPS": "1000"})
    refused(ctl, "InvalidParameter", "ModifyDiskSpec", DiskId=pl1, ProvisionedIops="100")
    refused(ctl, "DryRunOperation", "ModifyDiskSpec", DiskId=pl1, DiskCategory="cloud_ssd", DryRun="true")
    ok(ctl, "ResizeDisk", DiskId=pl1, NewSize="461")
    ok(ctl, "ModifyDiskSpec", DiskId=pl1, PerformanceLevel="PL2")
    assert (disk(ctl, pl1)["PerformanceLevel"], disk(ctl, pl1)["IOPS"]) == ("PL2", 24850)
    ok(ctl, "ModifyDiskSpec", DiskId=pl1, PerformanceLevel="PL1")  # down, not to PL0
    ok(ctl, "ModifyDiskSpec", DiskId=pl1, DiskCategory="cloud_auto", ProvisionedIops="1000")
    d = disk(ctl, pl1)
    assert (d["Category"], d["PerformanceLevel"], d["ProvisionedIops"], d["IOPS"]) == ("cloud_auto", None, 1000, 25850)
    ok(ctl, "ModifyDiskSpec", DiskId=pl1, DiskCategory="cloud_ssd")
    d = disk(ctl, pl1)
    assert (d["Category"], d["IOPS"], "ProvisionedIops" in d) == ("cloud_ssd", 15630, False)
    entry = new_disk(ctl, DiskCategory="cloud_essd_entry", Size="40")
    refused(ctl, "InvalidDiskCategory.ValueNotSupported", "ModifyDiskSpec", DiskId=entry, DiskCategory="cloud_ssd")
    ok(ctl, "ModifyDiskSpec", DiskId=entry, DiskCategory="cloud_essd", PerformanceLevel="PL1")
    basic = new_disk(ctl, DiskCategory="cloud", Size="20")
    refused(ctl, "InvalidDiskCategory.ValueNotSupported", "ModifyDiskSpec", DiskId=basic, DiskCategory="cloud_ssd")


def test_io_limits_settings(ctl):
    d = new_disk(ctl, DiskCategory="cloud_essd", PerformanceLevel="PL0", Size="40")
    assert limits(ctl, d)[0] == 2280
    ok(ctl, "ModifyPoolAttribute", IoLimits="Unlimited")
    assert limits(ctl, d) == (0, 0, 0) and disk(ctl, d)["IoLimits"] == "Unlimited"
    ok(ctl, "ModifyDiskAttribute", DiskId=d, IoLimits="Cloud")  # the disk's own setting wins
    assert limits(ctl, d)[0] == 2280
    ok(ctl, "ModifyDiskAttribute", DiskId=d, IoLimits="")  # back to the pool's
    assert limits(ctl, d) == (0, 0, 0)
    refused(ctl, "InvalidIoLimits.ValueNotSupported", "ModifyPoolAttribute", IoLimits="Fast")
    refused(ctl, "MissingParameter", "ModifyPoolAttribute")
    assert categories.io_limits("cloud_essd", "PL0", 40) == (2280, 110 * MB, 16384)
