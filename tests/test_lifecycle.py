"""The snapshot lifecycle on a real pool and controller, with an injected
clock (no waiting for real hours): the schedule's arithmetic, automatic
snapshot policies on disks and on an instance over two simulated weeks with a
"daemon restart" in the middle, retention and instant-access expiry, emulated
upload progress and its rules, tags, CopySnapshot and its space accounting.
The daemon's fast clock is tested end to end in test_lifecycle_daemon.py."""
import datetime
import json

import pytest

from vdisk.control import schedule
from vdisk.control.clock import POLICY_TZ, Clock, iso
from vdisk.control.controller import Controller
from vdisk.engine.pool import Pool

HOUR, DAY = 3600, 86400
# Monday 2026-12-07 00:00 in the policy time zone (UTC+8)
MONDAY = datetime.datetime(2026, 12, 7, tzinfo=POLICY_TZ).timestamp()


class FakeTime:
    """The real-time source the clock reads, moved by the test."""

    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def world(tmp_path):
    pool = Pool(str(tmp_path / "pool"))
    real = FakeTime(MONDAY)
    ctl = Controller(pool, host=None)
    ctl.clock = Clock(pool, real=real)
    yield ctl, real
    pool.close()


def ok(ctl, action, **params):
    res = ctl.handle({"Action": action, **params})
    assert "Code" not in res, res
    return res


def refused(ctl, code, action, **params):
    before = ctl.pool.records("")
    res = ctl.handle({"Action": action, **params})
    assert res.get("Code") == code, res
    assert ctl.pool.records("") == before, "a refused request changed the catalogue"
    return res


def snaps(ctl, **filters):
    return ok(ctl, "DescribeSnapshots", MaxResults=100, **filters)["Snapshots"]["Snapshot"]


# ---------------------------------------------------------------- schedule (pure)

def test_due_times_are_hours_of_weekdays_in_utc_plus_8():
    hours, days = [1, 13], [1, 3]  # Monday and Wednesday
    got = schedule.dues_between(hours, days, MONDAY - 1, MONDAY + 7 * DAY)
    want = [MONDAY + d * DAY + h * HOUR for d in (0, 2) for h in (1, 13)]
    assert got == want
    assert datetime.datetime.fromtimestamp(got[0], datetime.timezone.utc).hour == 17  # 01:00 UTC+8
    assert schedule.latest_due(hours, days, MONDAY, MONDAY + 13 * HOUR) == MONDAY + 13 * HOUR
    assert schedule.latest_due(hours, days, MONDAY + 13 * HOUR, MONDAY + DAY) is None  # Tuesday: none
    assert schedule.next_due(hours, days, MONDAY + 13 * HOUR) == MONDAY + 2 * DAY + HOUR
    assert schedule.auto_name(MONDAY + 13 * HOUR, hours) == "auto_20261207_2"
    assert schedule.expires_at(MONDAY, 3) == MONDAY + 3 * DAY
    assert schedule.expires_at(MONDAY, -1) is None and schedule.expires_at(MONDAY, None) is None


@pytest.mark.parametrize("value", ['["24"]', '["-1"]', "[]", '["x"]', "[1", '["1.5"]'])
def test_bad_time_points_are_refused(world, value):
    ctl, _ = world
    res = refused(ctl, "InvalidParameter", "CreateAutoSnapshotPolicy", timePoints=value, repeatWeekdays='["1"]',
                  retentionDays=1)
    assert "timePoints" in res["Message"]


def test_policy_rules(world):
    ctl, _ = world
    refused(ctl, "InvalidParameter", "CreateAutoSnapshotPolicy", timePoints='["1"]', repeatWeekdays='["0"]', retentionDays=1)
    refused(ctl, "InvalidParameter", "CreateAutoSnapshotPolicy", timePoints='["1"]', repeatWeekdays='["8"]', retentionDays=1)
    refused(ctl, "InvalidParameter", "CreateAutoSnapshotPolicy", timePoints='["1"]', repeatWeekdays='["1"]', retentionDays=0)
    refused(ctl, "MissingParameter", "CreateAutoSnapshotPolicy", timePoints='["1"]', repeatWeekdays='["1"]')
    refused(ctl, "ParameterInvalid", "DeleteAutoSnapshotPolicy", autoSnapshotPolicyId="sp-" + "a" * 20)
    refused(ctl, "InvalidAutoSnapshotPolicyId.Malformed", "DeleteAutoSnapshotPolicy", autoSnapshotPolicyId="sp-x")
    pid = ok(ctl, "CreateAutoSnapshotPolicy", timePoints='["23","1","1"]', repeatWeekdays="[\"7\"]",
             retentionDays=-1)["AutoSnapshotPolicyId"]
    pol = ok(ctl, "DescribeAutoSnapshotPolicyEx", AutoSnapshotPolicyId=pid)["AutoSnapshotPolicies"]["AutoSnapshotPolicy"][0]
    assert pol["TimePoints"] == '["1","23"]' and pol["RepeatWeekdays"] == '["7"]' and pol["RetentionDays"] == -1
    assert pol["Status"] == "Normal" and pol["DiskNums"] == 0
    # a disk that does not exist: nothing applied
    refused(ctl, "InvalidDiskId.NotFound", "ApplyAutoSnapshotPolicy", autoSnapshotPolicyId=pid,
            diskIds=json.dumps(["d-" + "a" * 20]))
    for _ in range(99):
        ok(ctl, "CreateAutoSnapshotPolicy", timePoints='["1"]', repeatWeekdays='["1"]', retentionDays=1)
    refused(ctl, "QuotaExceed.AutoSnapshotPolicy", "CreateAutoSnapshotPolicy", timePoints='["1"]',
            repeatWeekdays='["1"]', retentionDays=1)


# ---------------------------------------------------------------- two weeks of policies

def _instance(ctl, ndata=2):
    params = {"SystemDisk.Size": 20, "SystemDisk.Category": "cloud_essd"}
    for n in range(1, ndata + 1):
        params.update({"DataDisk.%d.Size" % n: 20, "DataDisk.%d.Category" % n: "cloud_essd"})
    res = ok(ctl, "CreateInstance", **params)
    return res["InstanceId"], [res["SystemDiskId"]] + res["DataDiskIds"]


def _expected(hours, days, created_after, now, retention, down=()):
    """Due times whose snapshot must exist at now: due in (created_after, now],
    not past retention, not inside a window the daemon was down."""
    out = []
    for d in schedule.dues_between(hours, days, created_after, now):
        if any(lo < d < hi for lo, hi in down):
            continue
        if d + retention * DAY > now:
            out.append(d)
    return out


def test_two_weeks_of_policies_on_disks_and_an_instance(world):
    ctl, real = world
    iid, inst_disks = _instance(ctl)
    lone = [ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd")["DiskId"] for _ in range(3)]
    disk_pol = dict(hours=[2, 14], days=[1, 2, 3, 4, 5], retention=3)  # weekdays, twice a day, 3 days
    inst_pol = dict(hours=[0, 6, 12, 18], days=[1, 2, 3, 4, 5, 6, 7], retention=2)
    dp = ok(ctl, "CreateAutoSnapshotPolicy", timePoints=schedule.shown(disk_pol["hours"]),
            repeatWeekdays=schedule.shown(disk_pol["days"]), retentionDays=disk_pol["retention"])["AutoSnapshotPolicyId"]
    ip = ok(ctl, "CreateAutoSnapshotPolicy", timePoints=schedule.shown(inst_pol["hours"]),
            repeatWeekdays=schedule.shown(inst_pol["days"]), retentionDays=inst_pol["retention"])["AutoSnapshotPolicyId"]
    ok(ctl, "ApplyAutoSnapshotPolicy", autoSnapshotPolicyId=dp, diskIds=json.dumps(lone))
    ok(ctl, "ApplyAutoSnapshotPolicy", autoSnapshotPolicyId=ip, instanceIds=json.dumps([iid]))
    d = ok(ctl, "DescribeDisks", DiskIds=json.dumps(lone[:1]))["Disks"]["Disk"][0]
    assert d["AutoSnapshotPolicyId"] == dp and d["EnableAutoSnapshot"] is True
    assert ok(ctl, "DescribeDisks", AutoSnapshotPolicyId=dp)["TotalCount"] == 3
    # a user's own data, written once, must be in every automatic snapshot
    ctl.pool.write(ctl._get("disk", lone[0])["_volume"], 0, b"precious" * 512)

    start = ctl.clock.now()
    ctl.start_lifecycle()
    down = []
    step = 20 * 60  # the daemon's tick, coarse: 20 simulated minutes
    for i in range(14 * DAY // step):
        real.t += step
        if i == 7 * DAY // step:  # "the daemon is down" for 9 hours, then a new controller
            gap_from = ctl.clock.now()
            real.t += 9 * HOUR
            pool = ctl.pool
            ctl = Controller(pool, host=None)
            ctl.clock = Clock(pool, real=real)
            ctl.start_lifecycle()
            down.append((gap_from, ctl.clock.now()))
        ctl.advance()
        now = ctl.clock.now()
        if i % (DAY // step) or not i:
            continue
        # every simulated day: exactly the expected snapshots and groups exist
        by_disk = {}
        for s in snaps(ctl, SnapshotType="auto"):
            by_disk.setdefault(s["SourceDiskId"], []).append(s)
        want_disk = _expected(disk_pol["hours"], disk_pol["days"], start, now, disk_pol["retention"], down)
        for did in lone:
            got = sorted(s["CreationTime"] for s in by_disk.get(did, []))
            assert len(got) == len(want_disk), (did, got, [iso(t) for t in want_disk])
            for c, due in zip(got, want_disk):  # taken at the first tick after its due time
                t = datetime.datetime.strptime(c, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()
                assert due <= t < due + step + 1
        groups = ok(ctl, "DescribeSnapshotGroups", InstanceId=iid, MaxResults=100)["SnapshotGroups"]["SnapshotGroup"]
        want_inst = _expected(inst_pol["hours"], inst_pol["days"], start, now, inst_pol["retention"], down)
        assert len(groups) == len(want_inst), ([g["CreationTime"] for g in groups], [iso(t) for t in want_inst])
        for g in groups:  # never a partial group: every disk of the instance, at one point
            assert sorted(s["SourceDiskId"] for s in g["Snapshots"]["Snapshot"]) == sorted(inst_disks)
            assert {s["SnapshotType"] for s in g["Snapshots"]["Snapshot"]} == {"auto"}
            assert len({s["CreationTime"] for s in g["Snapshots"]["Snapshot"]}) == 1
        for did in inst_disks:  # the instance's disks have no other automatic snapshots
            assert len(by_disk.get(did, [])) == len(want_inst)
    # runs due while "down" were skipped, not made up afterwards
    assert down and not any(down[0][0] < s["_t"] < down[0][1] for s in ctl._all("snapshot"))
    pol = ok(ctl, "DescribeAutoSnapshotPolicyEx", AutoSnapshotPolicyId=dp)["AutoSnapshotPolicies"]["AutoSnapshotPolicy"][0]
    assert pol["DiskNums"] == 3 and pol["LastSkippedTime"]
    # the data is in the newest automatic snapshot of that disk
    newest = max(by_disk[lone[0]], key=lambda s: s["CreationTime"])
    assert bytes(ctl.pool.read_snapshot(ctl._get("snapshot", newest["SnapshotId"])["_snap"], 0, 4096)) == b"precious" * 512
    assert ctl.pool.scrub() == []


def test_expiry_keeps_what_a_disk_was_made_from_and_ends_instant_access(world):
    ctl, real = world
    did = ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd")["DiskId"]
    kept = ok(ctl, "CreateSnapshot", DiskId=did, RetentionDays=1)["SnapshotId"]
    gone = ok(ctl, "CreateSnapshot", DiskId=did, RetentionDays=2, InstantAccess=True,
              InstantAccessRetentionDays=1)["SnapshotId"]
    forever = ok(ctl, "CreateSnapshot", DiskId=did)["SnapshotId"]
    clone = ok(ctl, "CreateDisk", SnapshotId=kept)["DiskId"]
    ctl.start_lifecycle()
    real.t += DAY + 60
    nxt = ctl.advance()
    left = {s["SnapshotId"]: s for s in snaps(ctl)}
    assert set(left) == {kept, gone, forever}  # kept: a disk was made from it
    assert left[gone]["InstantAccess"] is False and left[gone]["Category"] == "standard"
    assert nxt == pytest.approx(ctl._get("snapshot", gone)["_t"] + 2 * DAY)
    real.t += DAY
    ctl.advance()
    assert {s["SnapshotId"] for s in snaps(ctl)} == {kept, forever}
    ok(ctl, "DeleteDisk", DiskId=clone)
    ctl.advance()  # the daemon runs it after any action
    assert {s["SnapshotId"] for s in snaps(ctl)} == {forever}
    assert ctl.pool.scrub() == []


def test_a_modified_policy_counts_its_new_hours_from_now(world):
    ctl, real = world
    did = ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd")["DiskId"]
    pid = ok(ctl, "CreateAutoSnapshotPolicy", timePoints='["2"]', repeatWeekdays='["1","2","3","4","5","6","7"]',
             retentionDays=-1)["AutoSnapshotPolicyId"]
    ok(ctl, "ApplyAutoSnapshotPolicy", autoSnapshotPolicyId=pid, diskIds=json.dumps([did]))
    ctl.start_lifecycle()
    real.t = MONDAY + 2 * HOUR + 60
    ctl.advance()
    assert [s["SnapshotName"] for s in snaps(ctl)] == ["auto_20261207_1"]
    real.t = MONDAY + 10 * HOUR + 30 * 60
    ok(ctl, "ModifyAutoSnapshotPolicyEx", autoSnapshotPolicyId=pid, timePoints='["2","10"]')
    ctl.advance()  # 10:00 passed before the change: not taken now
    assert len(snaps(ctl)) == 1
    real.t = MONDAY + DAY + 2 * HOUR + 60
    ctl.advance()
    real.t = MONDAY + DAY + 10 * HOUR + 60
    ctl.advance()
    assert [s["SnapshotName"] for s in snaps(ctl)] == ["auto_20261207_1", "auto_20261208_1", "auto_20261208_2"]
    ok(ctl, "CancelAutoSnapshotPolicy", diskIds=json.dumps([did]))
    assert ok(ctl, "DescribeDisks", DiskIds=json.dumps([did]))["Disks"]["Disk"][0]["AutoSnapshotPolicyId"] == ""
    real.t += DAY
    ctl.advance()
    assert len(snaps(ctl)) == 3


class Ticking(FakeTime):
    """Real time that passes while the controller works: a second per read."""

    def __call__(self):
        self.t += 1
        return self.t


def test_what_falls_due_while_the_lifecycle_runs_is_next(world):
    ctl, _ = world
    real = Ticking(MONDAY)
    ctl.clock = Clock(ctl.pool, real=real)
    did = ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd")["DiskId"]
    pid = ok(ctl, "CreateAutoSnapshotPolicy", timePoints='["1"]', repeatWeekdays='["1","2","3","4","5","6","7"]',
             retentionDays=1)["AutoSnapshotPolicyId"]
    ok(ctl, "ApplyAutoSnapshotPolicy", autoSnapshotPolicyId=pid, diskIds=json.dumps([did]))
    ctl.start_lifecycle()
    real.t = MONDAY + HOUR + 10
    ctl.advance()
    first = snaps(ctl)[0]
    expiry = ctl._get("snapshot", first["SnapshotId"])["_t"] + DAY
    real.t = expiry - 3  # the next day's run begins just before the first snapshot expires, ends after
    nxt = ctl.advance()
    assert first["SnapshotId"] in {s["SnapshotId"] for s in snaps(ctl)}
    assert nxt <= expiry, "an expiry that fell due during the run must be next, not tomorrow's run"
    ctl.advance()
    assert first["SnapshotId"] not in {s["SnapshotId"] for s in snaps(ctl)}


def test_a_group_with_retention_expires_whole(world):
    ctl, real = world
    iid, _ = _instance(ctl)
    gid = ok(ctl, "CreateSnapshotGroup", InstanceId=iid, RetentionDays=1)["SnapshotGroupId"]
    member = ok(ctl, "DescribeSnapshotGroups", SnapshotGroupId=json.dumps([gid]))["SnapshotGroups"]["SnapshotGroup"][0][
        "Snapshots"]["Snapshot"][0]["SnapshotId"]
    image = ok(ctl, "CreateImage", SnapshotId=member)["ImageId"]
    ctl.start_lifecycle()
    real.t += 2 * DAY
    ctl.advance()
    assert len(snaps(ctl)) == 3  # kept whole: an image uses a member
    ok(ctl, "DeleteImage", ImageId=image)
    ctl.advance()
    assert snaps(ctl) == [] and ok(ctl, "DescribeSnapshotGroups")["TotalCount"] == 0


# ---------------------------------------------------------------- progress

def test_emulated_upload_progress_and_the_instant_access_rule(world):
    ctl, real = world
    did = ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd")["DiskId"]
    vol = ctl._get("disk", did)["_volume"]
    ctl.pool.write(vol, 0, b"x" * (8 << 20))  # 8 MiB: the first snapshot uploads all of it
    ok(ctl, "ModifyPoolAttribute", SnapshotUploadRate=1)  # 1 MB/s
    sid = ok(ctl, "CreateSnapshot", DiskId=did)["SnapshotId"]
    s = snaps(ctl, SnapshotIds=json.dumps([sid]))[0]
    assert s["Status"] == "progressing" and s["Available"] is False and 8 <= s["RemainTime"] <= 9, s
    refused(ctl, "IncorrectSnapshotStatus", "CreateDisk", SnapshotId=sid)
    refused(ctl, "IncorrectSnapshotStatus", "CreateImage", SnapshotId=sid)
    refused(ctl, "IncorrectDiskStatus.CreatingSnapshot", "CreateSnapshot", DiskId=did)  # one in progress per disk
    real.t += 4
    s = snaps(ctl, SnapshotIds=json.dumps([sid]))[0]
    assert s["Status"] == "progressing" and s["Progress"] == "%d%%" % (100 * 4 // 8.388608) and s["RemainTime"] == 5
    real.t += 5
    s = snaps(ctl, SnapshotIds=json.dumps([sid]))[0]
    assert s["Status"] == "accomplished" and s["Progress"] == "100%" and s["Available"] is True
    ok(ctl, "CreateDisk", SnapshotId=sid)
    # incremental: only the change (1 MiB) uploads; with instant access it is usable at once
    ctl.pool.write(vol, 0, b"y" * (1 << 20))
    sid2 = ok(ctl, "CreateSnapshot", DiskId=did, InstantAccess=True, InstantAccessRetentionDays=1)["SnapshotId"]
    s2 = snaps(ctl, SnapshotIds=json.dumps([sid2]))[0]
    assert s2["Status"] == "progressing" and s2["Available"] is True and 1 <= s2["RemainTime"] <= 2, s2
    ok(ctl, "CreateDisk", SnapshotId=sid2)
    ctl.advance()
    real.t += 2
    ctl.advance()
    assert ctl._get("snapshot", sid2)["Status"] == "accomplished"  # persisted by the lifecycle


def test_a_group_reports_its_members_progress(world):
    ctl, real = world
    iid, disks = _instance(ctl)
    for n, did in enumerate(disks):
        ctl.pool.write(ctl._get("disk", did)["_volume"], 0, b"z" * ((n + 1) << 20))
    ok(ctl, "ModifyPoolAttribute", SnapshotUploadRate=1)
    gid = ok(ctl, "CreateSnapshotGroup", InstanceId=iid)["SnapshotGroupId"]
    g = ok(ctl, "DescribeSnapshotGroups", SnapshotGroupId=json.dumps([gid]))["SnapshotGroups"]["SnapshotGroup"][0]
    assert g["Status"] == "progressing" and g["ProgressStatus"] == "0%"
    assert ok(ctl, "DescribeSnapshotGroups", Status=json.dumps(["progressing"]))["TotalCount"] == 1
    real.t += 1.5  # the 1 MiB member is done (1.05 s), the 2 and 3 MiB ones are not
    g = ok(ctl, "DescribeSnapshotGroups", SnapshotGroupId=json.dumps([gid]))["SnapshotGroups"]["SnapshotGroup"][0]
    states = sorted(s["Status"] for s in g["Snapshots"]["Snapshot"])
    assert states == ["accomplished", "progressing", "progressing"] and g["Status"] == "progressing"
    real.t += 2
    g = ok(ctl, "DescribeSnapshotGroups", SnapshotGroupId=json.dumps([gid]))["SnapshotGroups"]["SnapshotGroup"][0]
    assert g["Status"] == "accomplished" and g["ProgressStatus"] == "100%"


# ---------------------------------------------------------------- tags

def test_tags_on_create_as_filters_and_through_tag_resources(world):
    ctl, _ = world
    a = ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd", **{"Tag.1.Key": "team", "Tag.1.Value": "db"})["DiskId"]
    b = ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd")["DiskId"]
    sid = ok(ctl, "CreateSnapshot", DiskId=a, **{"Tag.1.Key": "team", "Tag.1.Value": "db"})["SnapshotId"]

    def disk_ids(**f):
        return [d["DiskId"] for d in ok(ctl, "DescribeDisks", **f)["Disks"]["Disk"]]

    assert disk_ids(**{"Tag.1.Key": "team"}) == [a]
    assert disk_ids(**{"Tag.1.Key": "team", "Tag.1.Value": "web"}) == []
    ok(ctl, "TagResources", ResourceType="disk", ResourceId=json.dumps([a, b]),
       **{"Tag.1.Key": "owner", "Tag.1.Value": "terraform"})
    assert sorted(disk_ids(**{"Tag.1.Key": "owner", "Tag.1.Value": "terraform"})) == sorted([a, b])
    assert disk_ids(**{"Tag.1.Key": "owner", "Tag.2.Key": "team"}) == [a]
    shown = ok(ctl, "DescribeDisks", DiskIds=json.dumps([a]))["Disks"]["Disk"][0]["Tags"]["Tag"]
    assert {"TagKey": "team", "TagValue": "db"} in shown
    assert [s["SnapshotId"] for s in snaps(ctl, **{"Tag.1.Key": "team"})] == [sid]
    rows = ok(ctl, "ListTagResources", ResourceType="disk", **{"Tag.1.Key": "owner"})["TagResources"]["TagResource"]
    assert {(r["ResourceId"], r["TagKey"]) for r in rows} >= {(a, "owner"), (b, "owner"), (a, "team")}
    ok(ctl, "UntagResources", ResourceType="disk", ResourceId=json.dumps([a]), TagKey=json.dumps(["owner"]))
    assert disk_ids(**{"Tag.1.Key": "owner"}) == [b]
    ok(ctl, "UntagResources", ResourceType="disk", ResourceId=json.dumps([b]), All=True)
    assert disk_ids(**{"Tag.1.Key": "owner"}) == []
    # the cloud's limits, refused with nothing changed
    refused(ctl, "InvalidTagKey.Malformed", "TagResources", ResourceType="disk", ResourceId=json.dumps([a]),
            **{"Tag.1.Key": "aliyun:x", "Tag.1.Value": "v"})
    refused(ctl, "InvalidTagValue.Malformed", "TagResources", ResourceType="disk", ResourceId=json.dumps([a]),
            **{"Tag.1.Key": "k", "Tag.1.Value": "http://x"})
    many = {("Tag.%d.Key" % n): "k%d" % n for n in range(1, 21)}  # 20 more: 21 on the disk
    refused(ctl, "InvalidTagCount", "TagResources", ResourceType="disk", ResourceId=json.dumps([a]), **many)
    refused(ctl, "InvalidResourceType.NotFound", "TagResources", ResourceType="vpc", ResourceId=json.dumps([a]),
            **{"Tag.1.Key": "k"})
    refused(ctl, "InvalidResourceId.NotFound", "TagResources", ResourceType="disk",
            ResourceId=json.dumps(["d-" + "b" * 20]), **{"Tag.1.Key": "k"})
    refused(ctl, "InvalidTagKey.Malformed", "CreateDisk", Size=20, **{"Tag.1.Key": "acs:x"})


# ---------------------------------------------------------------- copies

def test_copy_snapshot_shares_blocks_and_outlives_its_source(world):
    ctl, real = world
    did = ok(ctl, "CreateDisk", Size=20, DiskCategory="cloud_essd")["DiskId"]
    vol = ctl._get("disk", did)["_volume"]
    data = bytes(range(256)) * 4096  # 1 MiB
    ctl.pool.write(vol, 0, data)
    src = ok(ctl, "CreateSnapshot", DiskId=did)["SnapshotId"]
    ctl.pool.write(vol, 0, b"\0" * len(data))
    ctl.pool.commit()
    used = ctl.pool.stats()["used_bytes"]
    cp = ok(ctl, "CopySnapshot", SnapshotId=src, DestinationRegionId="vdisk-local", DestinationSnapshotName="copy1",
            RetentionDays=5)["SnapshotId"]
    assert ctl.pool.stats()["used_bytes"] == used  # shares every block
    c = snaps(ctl, SnapshotIds=json.dumps([cp]))[0]
    assert c["SourceSnapshotId"] == src and c["SnapshotName"] == "copy1" and c["RetentionDays"] == 5
    assert c["SourceDiskId"] == did and c["ExclusiveSize"] == 0
    refused(ctl, "InvalidRegionId.NotFound", "CopySnapshot", SnapshotId=src, DestinationRegionId="cn-hangzhou")
    refused(ctl, "MissingParameter", "CopySnapshot", SnapshotId=src)
    ok(ctl, "DeleteSnapshot", SnapshotId=src)
    assert ctl.pool.stats()["used_bytes"] == used  # the copy holds the data now
    assert bytes(ctl.pool.read_snapshot(ctl._get("snapshot", cp)["_snap"], 0, len(data))) == data
    d2 = ok(ctl, "CreateDisk", SnapshotId=cp)["DiskId"]
    assert bytes(ctl.pool.read(ctl._get("disk", d2)["_volume"], 0, len(data))) == data
    ok(ctl, "DeleteDisk", DiskId=d2)
    ok(ctl, "DeleteSnapshot", SnapshotId=cp)
    assert ctl.pool.stats()["used_bytes"] < used  # freed once nothing holds it
    assert ctl.pool.scrub() == []


def test_the_clock_never_runs_backwards(world):
    ctl, real = world
    ctl.clock.configure(3600)
    ctl.pool.commit()
    t = ctl.clock.now()
    real.t += 10
    assert ctl.clock.now() == pytest.approx(t + 36000)
    from vdisk.control.clock import ClockError

    with pytest.raises(ClockError, match="never runs backwards"):
        ctl.clock.configure(1, start=t)
    c2 = Clock(ctl.pool, real=real)  # another process reads the same anchor
    assert c2.now() == pytest.approx(ctl.clock.now())
    c2.configure(1)  # back to the real pace, from where it is
    real.t += 10
    assert c2.now() == pytest.approx(t + 36010)
