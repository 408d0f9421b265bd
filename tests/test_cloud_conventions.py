"""The cloud's conventions that scripts rely on, on the control plane with a
real pool (no daemon, no root): DryRun on the actions whose cloud API has
it, ClientToken on those that take one, values as text (the wire's form),
the cloud's parameter and action names."""
import pytest

from vdisk.control.controller import IDEMPOTENT, Controller
from vdisk.engine.pool import Pool


@pytest.fixture
def ctl(tmp_path):
    pool = Pool(str(tmp_path / "pool"))
    yield Controller(pool, host=None)
    pool.close()


def ok(ctl, action, **params):
    res = ctl.handle({"Action": action, **params})
    assert "Code" not in res, res
    return res


def state(ctl):
    return ctl.pool.records(""), ctl.pool.stats()


def setup(ctl):
    r = ok(ctl, "CreateInstance", **{"SystemDisk.Size": "1", "SystemDisk.PerformanceLevel": "PL0",
                                     "DataDisk.1.Size": "1", "DataDisk.1.PerformanceLevel": "PL0"})
    iid, sysd, data = r["InstanceId"], r["SystemDiskId"], r["DataDiskIds"][0]
    snap = ok(ctl, "CreateSnapshot", DiskId=data)["SnapshotId"]
    sysnap = ok(ctl, "CreateSnapshot", DiskId=sysd)["SnapshotId"]
    image = ok(ctl, "CreateImage", SnapshotId=sysnap, ImageName="img")["ImageId"]
    return iid, sysd, data, snap, sysnap, image


def test_dry_run_checks_everything_and_changes_nothing(ctl):
    iid, sysd, data, snap, sysnap, image = setup(ctl)
    valid = [
        ("CreateInstance", {"SystemDisk.Size": "1", "SystemDisk.PerformanceLevel": "PL0"}),
        ("CreateImage", {"SnapshotId": sysnap, "ImageName": "dry"}),
        ("DeleteImage", {"ImageId": image}),
        ("DeleteInstance", {"InstanceId": iid}),
        ("ResetDisk", {"DiskId": data, "SnapshotId": snap}),
        ("ResetDisks", {"Disk.1.DiskId": data, "Disk.1.SnapshotId": snap}),
        ("DescribeDisks", {}), ("DescribeInstances", {}), ("DescribeSnapshots", {}), ("DescribeImages", {}),
    ]
    for action, params in valid:
        before = state(ctl)
        res = ctl.handle({"Action": action, "DryRun": "true", **params})
        assert res.get("Code") == "DryRunOperation", (action, res)
        assert state(ctl) == before, "DryRun %s changed something" % action
    # and a request that would fail says why, not DryRunOperation
    invalid = [
        ("CreateInstance", {"SystemDisk.Size": "5000000"}, "InvalidDiskSize.ValueNotSupported"),
        ("CreateImage", {"SnapshotId": snap}, "InvalidSnapshotId.NotSystemDisk"),
        ("ResetDisk", {"DiskId": sysd, "SnapshotId": snap}, "InvalidSnapshotId.NotMatchDisk"),
        ("DeleteImage", {"ImageId": "m-" + "0" * 20}, "InvalidImageId.NotFound"),
    ]
    for action, params, code in invalid:
        assert ctl.handle({"Action": action, "DryRun": "true", **params})["Code"] == code, action
    # DryRun=false acts
    assert "Code" not in ctl.handle({"Action": "DescribeDisks", "DryRun": "false"})


def test_client_token_makes_creation_idempotent(ctl):
    iid, sysd, data, snap, sysnap, image = setup(ctl)
    first = ok(ctl, "CreateDisk", Size="20", ClientToken="tok-1")
    again = ok(ctl, "CreateDisk", Size="20", ClientToken="tok-1")
    assert again["DiskId"] == first["DiskId"] and again["RequestId"] != first["RequestId"]
    disks = ok(ctl, "DescribeDisks")["Disks"]["Disk"]
    assert sum(d["Size"] == 20 for d in disks) == 1
    res = ctl.handle({"Action": "CreateDisk", "Size": "30", "ClientToken": "tok-1"})
    assert res["Code"] == "IdempotentParameterMismatch", res
    # the same token for another action is another token
    s1 = ok(ctl, "CreateSnapshot", DiskId=data, ClientToken="tok-1")["SnapshotId"]
    assert ok(ctl, "CreateSnapshot", DiskId=data, ClientToken="tok-1")["SnapshotId"] == s1
    i1 = ok(ctl, "CreateInstance", **{"SystemDisk.Size": "1", "SystemDisk.PerformanceLevel": "PL0", "ClientToken": "t"})
    assert ok(ctl, "CreateInstance", **{"SystemDisk.Size": "1", "SystemDisk.PerformanceLevel": "PL0",
                                       "ClientToken": "t"})["InstanceId"] == i1["InstanceId"]
    m1 = ok(ctl, "CreateImage", SnapshotId=sysnap, ClientToken="img")["ImageId"]
    assert ok(ctl, "CreateImage", SnapshotId=sysnap, ClientToken="img")["ImageId"] == m1
    # a retried resize is not refused as "not larger"
    ok(ctl, "ResizeDisk", DiskId=first["DiskId"], NewSize="40", ClientToken="grow")
    ok(ctl, "ResizeDisk", DiskId=first["DiskId"], NewSize="40", ClientToken="grow")
    assert ctl.handle({"Action": "ResizeDisk", "DiskId": first["DiskId"], "NewSize": "40"})["Code"] == "InvalidDiskSize.TooSmall"
    # a refused request records no token
    assert ctl.handle({"Action": "CreateDisk", "Size": "3", "ClientToken": "bad"})["Code"] == "InvalidDiskSize.ValueNotSupported"
    assert "Code" not in ctl.handle({"Action": "CreateDisk", "Size": "20", "DiskCategory": "cloud_essd", "PerformanceLevel": "PL0",
                                     "ClientToken": "bad"})
    assert ctl.handle({"Action": "CreateDisk", "Size": "20", "ClientToken": "x" * 65})["Code"] == "InvalidParameter"
    assert IDEMPOTENT >= {"CreateDisk", "CreateInstance", "CreateSnapshot", "CreateImage"}


def test_tokens_survive_a_reopen(tmp_path):
    path = str(tmp_path / "pool")
    pool = Pool(path)
    first = ok(Controller(pool), "CreateDisk", Size="20", ClientToken="durable")
    pool.close()
    pool = Pool(path)
    try:
        assert ok(Controller(pool), "CreateDisk", Size="20", ClientToken="durable")["DiskId"] == first["DiskId"]
    finally:
        pool.close()


def test_the_clouds_names(ctl):
    ssd = ok(ctl, "CreateDisk", Size="20", DiskCategory="cloud_ssd")["DiskId"]
    assert ok(ctl, "DescribeDisks", DiskIds='["%s"]' % ssd)["Disks"]["Disk"][0]["Category"] == "cloud_ssd"
    u = ok(ctl, "DescribeSnapshotsUsage")
    assert u["SnapshotCount"] == 0 and u["SnapshotSize"] == 0
    d = ok(ctl, "CreateDisk", Size="20", Description="12345")["DiskId"]
    assert ok(ctl, "DescribeDisks", DiskIds='["%s"]' % d)["Disks"]["Disk"][0]["Description"] == "12345"


def test_describe_filters_apply_or_are_refused(ctl):
    """A filter the cloud has either narrows the answer or is refused: an
    answer that ignored it (DiskName used to) lists disks that do not match,
    and a script deleting "the disk named x" would delete another."""
    a = ok(ctl, "CreateDisk", Size="20", DiskName="alpha")["DiskId"]
    b = ok(ctl, "CreateDisk", Size="1", DiskCategory="cloud_essd", PerformanceLevel="PL0", DiskName="beta")["DiskId"]
    ids = lambda **f: [d["DiskId"] for d in ok(ctl, "DescribeDisks", **f)["Disks"]["Disk"]]  # noqa: E731
    assert ids(DiskName="alpha") == [a]
    assert ids(PerformanceLevel="PL0") == [b]
    assert ids(DiskName="nobody") == []
    assert sorted(ids(Portable="true")) == sorted([a, b]) and ids(Portable="false") == []
    snap = ok(ctl, "CreateSnapshot", DiskId=b)["SnapshotId"]
    c = ok(ctl, "CreateDisk", SnapshotId=snap, DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"]
    assert ids(SnapshotId=snap) == [c]
    for action, param in (("DescribeDisks", "Filter.1.Key"), ("DescribeDisks", "Encrypted"), ("DescribeInstances", "VpcId"),
                          ("DescribeSnapshots", "Usage"), ("DescribeImages", "OSType")):
        res = ctl.handle({"Action": action, param: "x"})
        assert res["Code"] == "UnsupportedParameter" and param in res["Message"], res
    snaps = lambda **f: [s["SnapshotId"] for s in ok(ctl, "DescribeSnapshots", **f)["Snapshots"]["Snapshot"]]  # noqa: E731
    assert snaps(SnapshotType="user") == [snap] and snaps(SnapshotType="auto") == []
    assert snaps(SourceDiskType="Data") == [snap] and snaps(SourceDiskType="System") == []


def test_strict_mode_refuses_unknown_parameters_and_names_the_right_one(tmp_path):
    pool = Pool(str(tmp_path / "pool"))
    try:
        strict = Controller(pool, settings={"strict": True})
        res = strict.handle({"Action": "CreateDisk", "Size": "20", "DiskNmae": "typo"})
        assert res["Code"] == "UnsupportedParameter" and "did you mean DiskName" in res["Message"], res
        assert strict.handle({"Action": "DescribeDisks", "DiskIdz": '["d-x"]'})["Code"] == "UnsupportedParameter"
        assert ok(strict, "DescribeDisks")["Disks"]["Disk"] == []  # nothing was created
        # what the SDK sends passes: the cloud's parameters (even those vdisk ignores), common ones, lists as Name.N
        ok(strict, "CreateDisk", Size="20", DiskName="fine", ZoneId="cn-hangzhou-h", RegionId="cn-hangzhou",
           **{"Tag.1.Key": "k", "Tag.1.Value": "v"})
        ok(strict, "DescribeSnapshotGroups", **{"SnapshotGroupId.1": "ssg-" + "a" * 20, "Status.1": "failed"})
        ok(strict, "ScrubPool", MapOnly="true")  # vdisk's own action and parameter
        # not strict (the default, as the cloud): ignored
        assert "Code" not in Controller(pool).handle({"Action": "DescribeDisks", "DiskIdz": "x"})
    finally:
        pool.close()


def test_the_cloud_parameter_table_is_current():
    """src/vdisk/control/cloud_params.py is what scripts/cloud-params makes
    from the installed SDK's request models."""
    import os
    import subprocess
    import sys

    pytest.importorskip("alibabacloud_ecs20140526.models", reason="needs the SDK")
    from importlib.metadata import version

    from vdisk.control.cloud_params import SDK_VERSION

    if version("alibabacloud-ecs20140526") != SDK_VERSION:
        pytest.skip("the table was made from SDK %s, %s is installed: run scripts/cloud-params"
                    % (SDK_VERSION, version("alibabacloud-ecs20140526")))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "cloud-params"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_create_disk_defaults_as_the_cloud_documents(ctl):
    """CreateDisk: DiskCategory defaults to cloud (a basic disk, 5-2000 GiB),
    an ESSD to PL1; from a snapshot the size is the larger of Size and the
    snapshot's, not "20 GiB PL1" whatever the source was."""
    d = lambda i: ok(ctl, "DescribeDisks", DiskIds='["%s"]' % i)["Disks"]["Disk"][0]  # noqa: E731
    basic = d(ok(ctl, "CreateDisk", Size="5")["DiskId"])
    assert (basic["Category"], basic["Size"]) == ("cloud", 5)
    essd = d(ok(ctl, "CreateDisk", Size="20", DiskCategory="cloud_essd")["DiskId"])
    assert essd["PerformanceLevel"] == "PL1"
    src = ok(ctl, "CreateDisk", Size="30", DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"]
    snap = ok(ctl, "CreateSnapshot", DiskId=src)["SnapshotId"]
    same = d(ok(ctl, "CreateDisk", SnapshotId=snap, DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"])
    assert same["Size"] == 30  # the snapshot's size, not 20
    smaller = d(ok(ctl, "CreateDisk", SnapshotId=snap, Size="10", DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"])
    assert smaller["Size"] == 30  # a smaller Size gives the snapshot's size
    larger = d(ok(ctl, "CreateDisk", SnapshotId=snap, Size="50", DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"])
    assert larger["Size"] == 50
    tiny = ok(ctl, "CreateDisk", Size="1", DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"]
    tiny_snap = ok(ctl, "CreateSnapshot", DiskId=tiny)["SnapshotId"]
    res = ctl.handle({"Action": "CreateDisk", "SnapshotId": tiny_snap})  # a 1 GiB basic disk: below its 5 GiB
    assert res["Code"] == "InvalidDiskSize.ValueNotSupported" and "cloud" in res["Message"], res
    big = d(ok(ctl, "CreateDisk", Size="65536", DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"])
    assert big["Size"] == 65536  # ESSDs now go to 64 TiB


def test_snapshot_usage_says_what_was_made_from_it(ctl):
    iid, sysd, data, snap, sysnap, image = setup(ctl)
    use = lambda sid: ok(ctl, "DescribeSnapshots", SnapshotIds='["%s"]' % sid)["Snapshots"]["Snapshot"][0]["Usage"]  # noqa: E731
    assert (use(snap), use(sysnap)) == ("none", "image")
    ok(ctl, "CreateDisk", SnapshotId=snap, DiskCategory="cloud_essd", PerformanceLevel="PL0")
    ok(ctl, "CreateDisk", SnapshotId=sysnap, DiskCategory="cloud_essd", PerformanceLevel="PL0")
    assert (use(snap), use(sysnap)) == ("disk", "image_disk")


def test_deleting_an_instance_deletes_its_records_and_volumes_at_once(tmp_path):
    """DeleteInstance: the instance and its disks that go with it
    (DeleteWithInstance) are gone, volumes and records, and a data disk
    that stays is Available, its volume and data kept; all in one
    transaction, so the same after a reopen.  Refused while the instance
    is not Stopped, with nothing changed."""
    path = str(tmp_path / "pool")
    pool = Pool(path)
    ctl = Controller(pool, host=None)
    r = ok(ctl, "CreateInstance", **{"SystemDisk.Size": "20", "DataDisk.1.Size": "20",
                                     "DataDisk.2.Size": "20", "DataDisk.2.DeleteWithInstance": "false"})
    iid, sysd, (gone, kept) = r["InstanceId"], r["SystemDiskId"], r["DataDiskIds"]
    vol = {d: pool.get_record("disk/" + d)["_volume"] for d in (sysd, gone, kept)}
    pool.write(vol[kept], 0, b"k" * 4096)
    ctl._put("instance", dict(pool.get_record("instance/" + iid), Status="Running"))
    pool.commit_meta()
    before = state(ctl)
    assert ctl.handle({"Action": "DeleteInstance", "InstanceId": iid})["Code"] == "IncorrectInstanceStatus"
    assert state(ctl) == before
    ctl._put("instance", dict(pool.get_record("instance/" + iid), Status="Stopped"))
    pool.commit_meta()
    ok(ctl, "DeleteInstance", InstanceId=iid)
    pool.close()
    pool = Pool(path)
    try:
        assert pool.get_record("instance/" + iid) is None
        assert pool.get_record("disk/" + sysd) is None and pool.get_record("disk/" + gone) is None
        rec = pool.get_record("disk/" + kept)
        assert (rec["Status"], rec["InstanceId"], rec["Device"]) == ("Available", "", "")
        assert sorted(pool.volumes()) == [vol[kept]]
        assert pool.read(vol[kept], 0, 4096) == b"k" * 4096
        assert pool.scrub() == []
    finally:
        pool.close()
