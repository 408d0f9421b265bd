"""Instance snapshots (snapshot groups) and the cloud's rules, through the
control plane's handlers on a real pool (no daemon, no root).  Every refusal
is checked to leave the catalogue and the pool exactly as they were."""
import base64

import pytest

from vdisk.control.controller import Controller
from vdisk.engine.pool import BLOCK_SIZE, Pool

GIB = 1 << 30


class Cloud:
    def __init__(self, path, **settings):
        self.pool = Pool(path)
        self.ctl = Controller(self.pool, host=None, settings=settings)

    def __call__(self, action, **params):
        res = self.ctl.handle({"Action": action, **params})
        assert "Code" not in res, res
        return res

    def state(self):
        return self.pool.records(""), self.pool.stats()

    def refused(self, code, action, **params):
        before = self.state()
        res = self.ctl.handle({"Action": action, **params})
        assert res.get("Code") == code, res
        assert res["Message"]
        assert self.state() == before, "a refused %s changed something" % action
        return res

    def instance(self, ndata=2, size=1, **extra):
        params = {"SystemDisk.Size": size, "SystemDisk.PerformanceLevel": "PL0"}
        for i in range(1, ndata + 1):
            params["DataDisk.%d.Size" % i] = size
            params["DataDisk.%d.PerformanceLevel" % i] = "PL0"
        params.update(extra)
        r = self("CreateInstance", **params)
        return r["InstanceId"], [r["SystemDiskId"]] + r["DataDiskIds"]

    def volume(self, disk_id):
        return self.pool.get_record("disk/" + disk_id)["_volume"]

    def group(self, gid):
        return self("DescribeSnapshotGroups", SnapshotGroupId=[gid])["SnapshotGroups"]["SnapshotGroup"][0]


@pytest.fixture
def cloud(tmp_path):
    c = Cloud(str(tmp_path / "pool"))
    yield c
    c.pool.close()


def test_group_covers_all_disks_at_one_point(cloud):
    iid, disks = cloud.instance(ndata=2)
    for n, d in enumerate(disks):
        cloud.pool.write(cloud.volume(d), 0, bytes([n + 1]) * 4096)
    gid = cloud("CreateSnapshotGroup", InstanceId=iid, Name="nightly", Description="all disks")["SnapshotGroupId"]
    for d in disks:  # written after: in no member
        cloud.pool.write(cloud.volume(d), 0, b"\xff" * 4096)
    g = cloud.group(gid)
    assert g["Status"] == "accomplished" and g["ProgressStatus"] == "100%" and g["InstanceId"] == iid
    members = g["Snapshots"]["Snapshot"]
    assert sorted(m["SourceDiskId"] for m in members) == sorted(disks)
    for m in members:
        n = disks.index(m["SourceDiskId"])
        blk = cloud("GetSnapshotBlock", SnapshotId=m["SnapshotId"], BlockIndex=0)
        data = base64.b64decode(blk["BlockData"])
        assert data[:4096] == bytes([n + 1]) * 4096
        # billed: the one 4 KiB page written (a partial entry), not its 64 KiB block
        assert m["SnapshotSize"] == 4096 and m["Available"] and m["Status"] == "accomplished"
        assert m["SourceDiskSize"] == 1


def test_include_exclude_and_client_token(cloud):
    iid, disks = cloud.instance(ndata=3)
    g1 = cloud("CreateSnapshotGroup", InstanceId=iid, DiskId=disks[1:3], ClientToken="t-1")["SnapshotGroupId"]
    assert sorted(m["SourceDiskId"] for m in cloud.group(g1)["Snapshots"]["Snapshot"]) == sorted(disks[1:3])
    again = cloud("CreateSnapshotGroup", InstanceId=iid, DiskId=disks[1:3], ClientToken="t-1")["SnapshotGroupId"]
    assert again == g1
    assert len(cloud("DescribeSnapshotGroups", InstanceId=iid)["SnapshotGroups"]["SnapshotGroup"]) == 1
    g2 = cloud("CreateSnapshotGroup", InstanceId=iid, **{"ExcludeDiskId.1": disks[0]})["SnapshotGroupId"]
    assert disks[0] not in [m["SourceDiskId"] for m in cloud.group(g2)["Snapshots"]["Snapshot"]]
    iid2, _ = cloud.instance(ndata=1)
    cloud.refused("IdempotentParameterMismatch", "CreateSnapshotGroup", InstanceId=iid2, ClientToken="t-1")


def test_refusals_one_by_one(cloud):
    iid, disks = cloud.instance(ndata=2)
    other, odisks = cloud.instance(ndata=1)
    cloud.refused("InvalidInstanceId.NotFound", "CreateSnapshotGroup", InstanceId="i-" + "0" * 20)
    cloud.refused("InvalidInstanceId.Malformed", "CreateSnapshotGroup", InstanceId="../x")
    cloud.refused("InvalidParameter.Conflict", "CreateSnapshotGroup", InstanceId=iid, DiskId=[disks[0]], ExcludeDiskId=[disks[1]])
    cloud.refused("InvalidDiskId.NotInUseByInstance", "CreateSnapshotGroup", InstanceId=iid, DiskId=[odisks[1]])
    cloud.refused("InvalidName.Malformed", "CreateSnapshotGroup", InstanceId=iid, Name="1-starts-with-digit")
    cloud.refused("InvalidDescription.Malformed", "CreateSnapshotGroup", InstanceId=iid, Description="x")
    cloud.refused("InvalidInstantAccessRetentionDays.ValueNotSupported", "CreateSnapshotGroup", InstanceId=iid,
                  InstantAccess=True, InstantAccessRetentionDays=0)
    cloud.refused("InvalidParameter.NoDisk", "CreateSnapshotGroup", InstanceId=iid, ExcludeDiskId=disks)
    # a non-ESSD disk
    ssd = cloud("CreateDisk", Size=20, Category="cloud_ssd")["DiskId"]
    cloud("AttachDisk", InstanceId=iid, DiskId=ssd)
    cloud.refused("InvalidDiskCategory.NotSupported", "CreateSnapshotGroup", InstanceId=iid)
    cloud("DetachDisk", InstanceId=iid, DiskId=ssd)
    # the instance is starting: neither Running nor Stopped
    rec = cloud.pool.get_record("instance/" + iid)
    cloud.pool.put_record("instance/" + iid, dict(rec, Status="Starting"))
    cloud.pool.commit()
    cloud.refused("IncorrectInstanceStatus", "CreateSnapshotGroup", InstanceId=iid)
    cloud.pool.put_record("instance/" + iid, rec)
    cloud.pool.commit()
    # a snapshot of a disk still in progress
    gid = cloud("CreateSnapshotGroup", InstanceId=iid)["SnapshotGroupId"]
    sid = cloud.group(gid)["Snapshots"]["Snapshot"][0]["SnapshotId"]
    srec = cloud.pool.get_record("snapshot/" + sid)
    cloud.pool.put_record("snapshot/" + sid, dict(srec, Status="progressing"))
    cloud.pool.commit()
    cloud.refused("IncorrectDiskStatus.CreatingSnapshot", "CreateSnapshotGroup", InstanceId=iid)


def test_disk_count_and_size_limits(cloud):
    iid, _ = cloud.instance(ndata=16)  # 17 disks with the system disk: one more than the cloud's 16
    cloud.refused("QuotaExceed.SnapshotGroupDisks", "CreateSnapshotGroup", InstanceId=iid)
    one = [d["DiskId"] for d in cloud("DescribeDisks", InstanceId=iid)["Disks"]["Disk"] if d["Type"] == "data"][0]
    cloud("CreateSnapshotGroup", InstanceId=iid, **{"ExcludeDiskId.1": one})  # 16 disks: allowed
    big, _ = cloud.instance(ndata=2, size=32768)
    cloud.refused("QuotaExceed.SnapshotGroupSize", "CreateSnapshotGroup", InstanceId=big)


def test_disk_limit_is_a_setting(tmp_path):
    c = Cloud(str(tmp_path / "p"), max_group_disks=10)  # the seed document's older limit
    iid, _ = c.instance(ndata=10)
    c.refused("QuotaExceed.SnapshotGroupDisks", "CreateSnapshotGroup", InstanceId=iid)
    c.pool.close()


def test_256_manual_snapshots_per_disk(cloud):
    iid, disks = cloud.instance(ndata=1)
    for _ in range(256):
        cloud("CreateSnapshot", DiskId=disks[1])
    cloud.refused("QuotaExceed.Snapshot", "CreateSnapshotGroup", InstanceId=iid)
    cloud("CreateSnapshotGroup", InstanceId=iid, DiskId=[disks[0]])  # the other disk is fine


def test_reset_disks_rules_and_effect(cloud):
    iid, disks = cloud.instance(ndata=2)
    vols = [cloud.volume(d) for d in disks]
    for n, v in enumerate(vols):
        cloud.pool.write(v, 0, bytes([n + 1]) * 512)
    gid = cloud("CreateSnapshotGroup", InstanceId=iid)["SnapshotGroupId"]
    members = {m["SourceDiskId"]: m["SnapshotId"] for m in cloud.group(gid)["Snapshots"]["Snapshot"]}
    for v in vols:
        cloud.pool.write(v, 0, b"\xee" * 512)
    args = {}
    for i, d in enumerate(disks[1:], 1):
        args["Disk.%d.DiskId" % i] = d
        args["Disk.%d.SnapshotId" % i] = members[d]
    cloud.refused("DryRunOperation", "ResetDisks", DryRun=True, **args)
    wrong = dict(args, **{"Disk.1.SnapshotId": members[disks[2]]})
    cloud.refused("InvalidSnapshotId.NotMatchDisk", "ResetDisks", **wrong)
    rec = cloud.pool.get_record("instance/" + iid)
    cloud.pool.put_record("instance/" + iid, dict(rec, Status="Running"))
    cloud.pool.commit()
    cloud.refused("IncorrectInstanceStatus", "ResetDisks", **args)
    cloud.pool.put_record("instance/" + iid, rec)
    cloud.pool.commit()
    cloud("ResetDisks", **args)
    assert cloud.pool.read(vols[0], 0, 1) == b"\xee"  # not in the request
    assert cloud.pool.read(vols[1], 0, 512) == b"\x02" * 512
    assert cloud.pool.read(vols[2], 0, 512) == b"\x03" * 512


def test_delete_group_keeps_what_an_image_uses_and_frees_the_rest(cloud):
    iid, disks = cloud.instance(ndata=1)
    vols = [cloud.volume(d) for d in disks]
    for v in vols:
        cloud.pool.write(v, 0, b"\x01" * (4 * BLOCK_SIZE))
    gid = cloud("CreateSnapshotGroup", InstanceId=iid)["SnapshotGroupId"]
    for v in vols:  # diverge: each member now holds 4 blocks alone
        cloud.pool.write(v, 0, b"\x02" * (4 * BLOCK_SIZE))
    cloud.pool.commit()
    members = {m["SourceDiskType"]: m["SnapshotId"] for m in cloud.group(gid)["Snapshots"]["Snapshot"]}
    img = cloud("CreateImage", SnapshotId=members["system"], ImageName="golden")["ImageId"]
    cloud.refused("SnapshotCreatedImage", "DeleteSnapshot", SnapshotId=members["system"])
    used = cloud.pool.stats()["used_bytes"]
    res = cloud("DeleteSnapshotGroup", SnapshotGroupId=gid)["OperationProgressSet"]["OperationProgress"]
    by = {r["SnapshotId"]: r for r in res}
    assert by[members["system"]]["OperationStatus"] == "Failed"
    assert by[members["system"]]["ErrorCode"] == "SnapshotCreatedImage"
    assert by[members["data"]]["OperationStatus"] == "Success"
    assert cloud.pool.stats()["used_bytes"] == used - 4 * BLOCK_SIZE
    assert [m["SnapshotId"] for m in cloud.group(gid)["Snapshots"]["Snapshot"]] == [members["system"]]
    # an instance from the image gets the system disk's data
    new = cloud("CreateInstance", ImageId=img, **{"SystemDisk.PerformanceLevel": "PL0"})["InstanceId"]
    sysd = cloud("DescribeDisks", InstanceId=new)["Disks"]["Disk"][0]
    assert sysd["Type"] == "system" and sysd["SourceSnapshotId"] == members["system"]
    assert cloud.pool.read(cloud.volume(sysd["DiskId"]), 0, 1) == b"\x01"
    cloud("DeleteImage", ImageId=img)
    # the new instance's system disk was made from it: kept, as DeleteSnapshot keeps it without Force
    res = cloud("DeleteSnapshotGroup", SnapshotGroupId=gid)["OperationProgressSet"]["OperationProgress"]
    assert (res[0]["OperationStatus"], res[0]["ErrorCode"]) == ("Failed", "SnapshotCreatedDisk"), res
    cloud.refused("SnapshotCreatedDisk", "DeleteSnapshot", SnapshotId=members["system"])
    cloud("DeleteSnapshot", SnapshotId=members["system"], Force="true")
    assert cloud("DescribeSnapshotGroups")["SnapshotGroups"]["SnapshotGroup"] == []
    assert cloud.pool.scrub() == []


def test_usage_report_and_changed_blocks(cloud):
    iid, disks = cloud.instance(ndata=1)
    v = cloud.volume(disks[1])
    cloud.pool.write(v, 0, b"\x01" * (3 * BLOCK_SIZE))
    g1 = cloud("CreateSnapshotGroup", InstanceId=iid, DiskId=[disks[1]])["SnapshotGroupId"]
    cloud.pool.write(v, BLOCK_SIZE, b"\x02" * BLOCK_SIZE)
    g2 = cloud("CreateSnapshotGroup", InstanceId=iid, DiskId=[disks[1]], InstantAccess=True,
               InstantAccessRetentionDays=3)["SnapshotGroupId"]
    s1 = cloud.group(g1)["Snapshots"]["Snapshot"][0]["SnapshotId"]
    s2 = cloud.group(g2)["Snapshots"]["Snapshot"][0]["SnapshotId"]
    u = {r["SnapshotId"]: r for r in cloud("DescribeSnapshotUsage")["Snapshots"]["Snapshot"]}
    assert u[s1]["BilledSize"] == 3 * BLOCK_SIZE and u[s2]["BilledSize"] == BLOCK_SIZE
    # s1 alone holds the old block 1; blocks 0 and 2 it shares with s2 and the disk
    assert u[s1]["ExclusiveSize"] == BLOCK_SIZE and u[s1]["SharedSize"] == 2 * BLOCK_SIZE
    assert u[s1]["ReferencedSize"] == 3 * BLOCK_SIZE
    assert u[s2]["InstantAccessRetentionDays"] == 3
    changed = cloud("ListChangedBlocks", FirstSnapshotId=s1, SecondSnapshotId=s2)
    assert [b["BlockIndex"] for b in changed["ChangedBlocks"]] == [1]


def test_failed_group_is_recorded_and_leaves_no_snapshot(cloud, monkeypatch):
    from vdisk.engine.errors import NoSpace

    iid, disks = cloud.instance(ndata=2)
    stats = cloud.pool.stats()

    def no_space(vids, change=None):  # the engine's transaction fails as a whole
        raise NoSpace("the pool's filesystem is full")

    monkeypatch.setattr(cloud.pool, "snapshot", no_space)
    res = cloud.ctl.handle({"Action": "CreateSnapshotGroup", "InstanceId": iid, "Name": "doomed"})
    assert res["Code"] == "SnapshotGroup.Failed" and "full" in res["Message"]
    monkeypatch.undo()
    failed = cloud("DescribeSnapshotGroups", Status=["failed"])["SnapshotGroups"]["SnapshotGroup"]
    assert len(failed) == 1 and failed[0]["Name"] == "doomed" and "full" in failed[0]["FailReason"]
    assert failed[0]["Snapshots"]["Snapshot"] == []
    assert cloud("DescribeSnapshots")["Snapshots"]["Snapshot"] == []
    assert cloud.pool.stats() == stats
    # and the disks can be snapshotted afterwards
    cloud("CreateSnapshotGroup", InstanceId=iid)


def test_describe_filters_and_paging(cloud):
    iid, _ = cloud.instance(ndata=1)
    other, _ = cloud.instance(ndata=1)
    made = [cloud("CreateSnapshotGroup", InstanceId=iid, Name="g%02d" % i)["SnapshotGroupId"] for i in range(12)]
    cloud("CreateSnapshotGroup", InstanceId=other, Name="g00")
    first = cloud("DescribeSnapshotGroups", InstanceId=iid)  # the cloud's default page: 10
    assert len(first["SnapshotGroups"]["SnapshotGroup"]) == 10 and first["TotalCount"] == 12
    rest = cloud("DescribeSnapshotGroups", InstanceId=iid, NextToken=first["NextToken"])
    got = [g["SnapshotGroupId"] for g in first["SnapshotGroups"]["SnapshotGroup"] + rest["SnapshotGroups"]["SnapshotGroup"]]
    assert got == made and "NextToken" not in rest
    named = cloud("DescribeSnapshotGroups", Name="g00")["SnapshotGroups"]["SnapshotGroup"]
    assert {g["InstanceId"] for g in named} == {iid, other}
    both = cloud("DescribeSnapshotGroups", Name="g00", InstanceId=other)["SnapshotGroups"]["SnapshotGroup"]
    assert [g["InstanceId"] for g in both] == [other]  # filters combine with AND
    assert cloud("DescribeSnapshotGroups", SnapshotGroupId=made[3:5], MaxResults=1)["TotalCount"] == 2
    cloud.refused("InvalidMaxResults.ValueNotSupported", "DescribeSnapshotGroups", MaxResults=101)
    cloud.refused("InvalidParameter.NextToken", "DescribeSnapshotGroups", NextToken="bogus")
