"""The snapshot lifecycle in a real daemon with its clock sped up (root,
FUSE): automatic snapshot policies on three disks and on an instance run for
a simulated week, with a daemon restart in the middle, checked against the
policies at every sample (created at their due times, expired at theirs, no
group ever partial, runs missed while the daemon was down not made up), with
data written to a disk file found in the automatic snapshots; and the same
actions through the cloud's SDK over HTTP."""
import base64
import datetime
import json
import os
import time

import pytest

from vdiskenv import VDiskEnv, need_root_fuse_loop, sh

pytestmark = pytest.mark.root
SPEED = 14400  # four simulated hours per real second
HOUR, DAY = 3600, 86400
SLACK = 4 * HOUR  # one real second: how late a busy daemon may take a run (exact times: test_lifecycle.py)
START = "2026-12-07T00:00:00+08:00"  # a Monday, in the policies' time zone
UTC8 = datetime.timezone(datetime.timedelta(hours=8))
DISK_HOURS, DISK_KEEP = [2, 8, 14, 20], 2
INST_HOURS, INST_KEEP = [0, 6, 12, 18], 1


def ts(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def dues(hours, lo, hi):
    """Every due time (all weekdays) in (lo, hi]."""
    out = []
    day = datetime.datetime.fromtimestamp(lo, UTC8).date()
    while True:
        for h in hours:
            t = datetime.datetime(day.year, day.month, day.day, h, tzinfo=UTC8).timestamp()
            if t > hi:
                return out
            if t > lo:
                out.append(t)
        day += datetime.timedelta(days=1)


def due_of(name, hours):
    """The due time an automatic snapshot's name (auto_YYYYMMDD_N) stands for."""
    _, date, n = name.split("_")
    d = datetime.datetime.strptime(date, "%Y%m%d")
    return datetime.datetime(d.year, d.month, d.day, hours[int(n) - 1], tzinfo=UTC8).timestamp()


def now(env):
    return env.j("clock", "show")["Clock"]["NowSeconds"]


def check(env, start, down, lone, inst_disks, iid):
    """One sample: everything that must exist does, nothing that must be gone is."""
    t1 = now(env)
    snaps = env.api("DescribeSnapshots", SnapshotType="auto", MaxResults=100)
    groups = env.api("DescribeSnapshotGroups", InstanceId=iid, MaxResults=100)["SnapshotGroups"]["SnapshotGroup"]
    t2 = now(env)
    assert snaps.get("NextToken") is None
    snaps = snaps["Snapshots"]["Snapshot"]
    for g in groups:  # never partial; one point in time; named and taken at a due time
        members = g["Snapshots"]["Snapshot"]
        assert sorted(s["SourceDiskId"] for s in members) == sorted(inst_disks), g
        due = due_of(g["Name"], INST_HOURS)
        assert due <= ts(g["CreationTime"]) <= due + SLACK, g
        assert ts(g["CreationTime"]) + INST_KEEP * DAY > t1 - SLACK, "expired group still there: %s" % g
    assert len({g["Name"] for g in groups}) == len(groups), "a due time taken twice"
    by = {}
    for s in snaps:
        if s["SourceDiskId"] in lone:
            due = due_of(s["SnapshotName"], DISK_HOURS)
            assert due <= ts(s["CreationTime"]) <= due + SLACK, s
            assert ts(s["CreationTime"]) + DISK_KEEP * DAY > t1 - SLACK, "expired snapshot still there: %s" % s
            by.setdefault(s["SourceDiskId"], set()).add(s["SnapshotName"])
        else:
            assert s["SourceDiskId"] in inst_disks and s.get("SnapshotGroupId"), s

    def must(hours, keep):
        return [d for d in dues(hours, start + SLACK, t1 - SLACK)
                if d + keep * DAY > t2 + SLACK and not any(lo - SLACK < d < hi + SLACK for lo, hi in down)]

    want = {datetime.datetime.fromtimestamp(d, UTC8).strftime("auto_%Y%m%d_") + str(DISK_HOURS.index(
        datetime.datetime.fromtimestamp(d, UTC8).hour) + 1) for d in must(DISK_HOURS, DISK_KEEP)}
    for did in lone:
        assert want <= by.get(did, set()), (did, sorted(want - by.get(did, set())))
    names = {g["Name"] for g in groups}
    for d in must(INST_HOURS, INST_KEEP):
        local = datetime.datetime.fromtimestamp(d, UTC8)
        assert local.strftime("auto_%Y%m%d_") + str(INST_HOURS.index(local.hour) + 1) in names
    return len(snaps), len(groups)


def test_a_simulated_week_of_policies_with_a_restart(tmp_path):
    need_root_fuse_loop("dd")
    env = VDiskEnv(prefix="vdisk-lifecycle-")
    try:
        env.start("--clock-start", START)  # the set-up at the real pace: no run falls due during it
        iid, data = env.instance(ndata=2)
        inst_disks = [d["DiskId"] for d in env.j("disk", "list", "--instance", iid)["Disks"]["Disk"]]
        lone = [env.run("disk", "create", "--size", "1", "--category", "cloud_essd", "--performance-level", "PL0")
                .stdout.strip() for _ in range(3)]
        dp = env.run("policy", "create", "--hours", ",".join(map(str, DISK_HOURS)), "--retention-days", DISK_KEEP,
                     "--name", "disks", "--tag", "owner=test").stdout.strip()
        ip = env.run("policy", "create", "--hours", ",".join(map(str, INST_HOURS)), "--retention-days", INST_KEEP,
                     "--name", "instance").stdout.strip()
        env.run("policy", "apply", dp, *lone)
        env.run("policy", "apply", ip, iid)
        env.run("daemon", "stop")
        env.start("--clock-speed", SPEED)  # now fast, from the time it was
        start = now(env)
        env.run("instance", "start", iid)
        # data on the instance's first data disk, through its file (direct I/O, flushed)
        path = env.run("disk", "path", data[0]).stdout.strip()
        pattern = os.urandom(1 << 16)
        with open(tmp_path / "pattern", "wb") as f:
            f.write(pattern)
        sh("dd", "if=%s" % (tmp_path / "pattern"), "of=" + path, "bs=64K", "oflag=direct", "conv=notrunc,fsync",
           "status=none")
        down = []
        counts = []
        for phase in range(2):
            deadline = time.monotonic() + 3.5 * DAY / SPEED
            while time.monotonic() < deadline:
                time.sleep(1)
                counts.append(check(env, start, down, lone, inst_disks, iid))
            if phase == 0:
                stopped = now(env)
                env.run("daemon", "stop")
                time.sleep(2)  # eight simulated hours without the daemon
                env.start("--clock-speed", SPEED)  # the clock goes on from where it is
                down.append((stopped, now(env)))
        assert down[0][1] - down[0][0] >= 8 * HOUR
        # the schedule filled and expiry trimmed: a steady count, not a growing one
        assert counts[-1][0] == pytest.approx(3 * 4 * DISK_KEEP + 3 * 4 * INST_KEEP, abs=6), counts
        assert counts[-1][1] == pytest.approx(4 * INST_KEEP, abs=1), counts
        # the data written before is in the newest automatic group's member of that disk
        groups = env.api("DescribeSnapshotGroups", InstanceId=iid, MaxResults=100)["SnapshotGroups"]["SnapshotGroup"]
        newest = max(groups, key=lambda g: g["CreationTime"])
        member = [s for s in newest["Snapshots"]["Snapshot"] if s["SourceDiskId"] == data[0]][0]
        block = env.api("GetSnapshotBlock", SnapshotId=member["SnapshotId"], BlockIndex=0)
        assert base64.b64decode(block["BlockData"])[:len(pattern)] == pattern
        pol = env.j("policy", "show", dp)
        assert pol["DiskNums"] == 3 and pol["Tags"]["Tag"] == [{"TagKey": "owner", "TagValue": "test"}]
        assert env.j("pool", "scrub")["Clean"] is True
    finally:
        env.close()


def test_policies_and_tags_through_the_official_sdk():
    need_root_fuse_loop()
    ecs = pytest.importorskip("alibabacloud_ecs20140526.client", reason="needs the SDK: pip install alibabacloud-ecs20140526")
    from alibabacloud_ecs20140526 import models as m
    from alibabacloud_tea_openapi import models as om

    env = VDiskEnv(prefix="vdisk-lifecycle-sdk-")
    try:
        env.start("--http", "127.0.0.1:0", "--clock-speed", 3600, "--clock-start", START)
        key = env.j("accesskey", "create")
        port = int(env.j("daemon", "status")["Http"].rsplit(":", 1)[1])
        c = ecs.Client(om.Config(access_key_id=key["AccessKeyId"], access_key_secret=key["AccessKeySecret"],
                                 endpoint="127.0.0.1:%d" % port, protocol="http", region_id="cn-hangzhou"))
        r = c.create_disk(m.CreateDiskRequest(region_id="cn-hangzhou", size=1, disk_category="cloud_essd",
                                              performance_level="PL0",
                                              tag=[m.CreateDiskRequestTag(key="app", value="mysql")]))
        did = r.body.disk_id
        pid = c.create_auto_snapshot_policy(m.CreateAutoSnapshotPolicyRequest(
            region_id="cn-hangzhou", time_points='["0","1","2","3","4","5","6","7","8","9","10","11","12","13","14",'
            '"15","16","17","18","19","20","21","22","23"]', repeat_weekdays='["1","2","3","4","5","6","7"]',
            retention_days=1, auto_snapshot_policy_name="hourly")).body.auto_snapshot_policy_id
        c.apply_auto_snapshot_policy(m.ApplyAutoSnapshotPolicyRequest(region_id="cn-hangzhou",
                                                                      auto_snapshot_policy_id=pid,
                                                                      disk_ids=json.dumps([did])))
        pols = c.describe_auto_snapshot_policy_ex(m.DescribeAutoSnapshotPolicyExRequest(
            region_id="cn-hangzhou", auto_snapshot_policy_id=pid)).body.auto_snapshot_policies.auto_snapshot_policy
        assert pols[0].disk_nums == 1 and pols[0].retention_days == 1 and pols[0].status == "Normal"
        disk = c.describe_disks(m.DescribeDisksRequest(region_id="cn-hangzhou", tag=[
            m.DescribeDisksRequestTag(key="app", value="mysql")])).body.disks.disk
        assert [d.disk_id for d in disk] == [did] and disk[0].auto_snapshot_policy_id == pid
        assert disk[0].enable_auto_snapshot is True
        time.sleep(3)  # three simulated hours: three automatic snapshots
        got = c.describe_snapshots(m.DescribeSnapshotsRequest(region_id="cn-hangzhou", disk_id=did,
                                                              snapshot_type="auto")).body.snapshots.snapshot
        assert 2 <= len(got) <= 4 and all(s.snapshot_name.startswith("auto_") for s in got), [s.to_map() for s in got]
        sid = got[0].snapshot_id
        c.tag_resources(m.TagResourcesRequest(region_id="cn-hangzhou", resource_type="snapshot", resource_id=[sid],
                                              tag=[m.TagResourcesRequestTag(key="keep", value="yes")]))
        rows = c.list_tag_resources(m.ListTagResourcesRequest(region_id="cn-hangzhou", resource_type="snapshot",
                                                              resource_id=[sid])).body.tag_resources.tag_resource
        assert [(t.tag_key, t.tag_value) for t in rows] == [("keep", "yes")]
        cp = c.copy_snapshot(m.CopySnapshotRequest(region_id="cn-hangzhou", snapshot_id=sid,
                                                   destination_region_id="vdisk-local",
                                                   destination_snapshot_name="kept-copy")).body.snapshot_id
        c.cancel_auto_snapshot_policy(m.CancelAutoSnapshotPolicyRequest(region_id="cn-hangzhou",
                                                                        disk_ids=json.dumps([did])))
        c.delete_auto_snapshot_policy(m.DeleteAutoSnapshotPolicyRequest(region_id="cn-hangzhou",
                                                                        auto_snapshot_policy_id=pid))
        with pytest.raises(Exception, match="ParameterInvalid"):
            c.delete_auto_snapshot_policy(m.DeleteAutoSnapshotPolicyRequest(region_id="cn-hangzhou",
                                                                            auto_snapshot_policy_id=pid))
        copy = c.describe_snapshots(m.DescribeSnapshotsRequest(region_id="cn-hangzhou",
                                                               snapshot_ids=json.dumps([cp]))).body.snapshots.snapshot
        assert copy[0].source_snapshot_id == sid and copy[0].snapshot_name == "kept-copy"
    finally:
        env.close()
