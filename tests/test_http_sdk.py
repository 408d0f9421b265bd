"""The official Python SDK (alibabacloud-ecs20140526) against a real daemon
serving the ECS API over HTTP (root, FUSE, loop devices): the same calls a
user's automation makes against the cloud, with data written and read back
through a loop device at each step, every answer parsed by the SDK's models,
signatures and their refusals, and hostile HTTP clients."""
import json
import os
import socket
import subprocess
import time

import pytest

from vdiskenv import VDiskEnv, need_root_fuse_loop, sh

ecs = pytest.importorskip("alibabacloud_ecs20140526.client", reason="needs the SDK: pip install alibabacloud-ecs20140526")
from alibabacloud_ecs20140526 import models as m  # noqa: E402
from alibabacloud_tea_openapi import models as om  # noqa: E402

pytestmark = pytest.mark.root
REGION = "cn-hangzhou"  # what the user's scripts say; vdisk serves one local region whatever it is
MIB = 1 << 20


@pytest.fixture(scope="module")
def api():
    need_root_fuse_loop("dd")
    env = VDiskEnv(prefix="vdisk-sdk-")
    os.environ["VDISK_MONITOR_INTERVAL"] = "1"  # DescribeDiskMonitorData's samples, every second
    try:
        env.start("--http", "127.0.0.1:0")
        del os.environ["VDISK_MONITOR_INTERVAL"]
        key = env.j("accesskey", "create")
        port = int(env.j("daemon", "status")["Http"].rsplit(":", 1)[1])
        yield env, port, key
    finally:
        env.close()


def client(port, key, secret=None, v1=False, key_id=None):
    return ecs.Client(om.Config(access_key_id=key_id or key["AccessKeyId"], access_key_secret=secret or key["AccessKeySecret"],
                                endpoint="127.0.0.1:%d" % port, protocol="http", region_id=REGION,
                                signature_algorithm="v2" if v1 else None))



def _dd_write(dev, data, offset=0):
    p = subprocess.run(["dd", "of=" + dev, "bs=1M", "oflag=direct,seek_bytes", "seek=%d" % offset, "conv=notrunc,fsync",
                        "status=none"], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr


def read(dev, n, offset=0):
    p = subprocess.run(["dd", "if=" + dev, "bs=1M", "iflag=direct,skip_bytes,count_bytes", "skip=%d" % offset,
                        "count=%d" % n, "status=none"], capture_output=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def no_none(model, *fields):
    """Fields the cloud always fills must come back filled through the SDK's model."""
    for f in fields:
        assert getattr(model, f) is not None, "%s.%s is None: %s" % (type(model).__name__, f, model.to_map())


@pytest.mark.parametrize("v1", [False, True], ids=["v3-acs3", "v1-rpc"])
def test_the_official_sdk_drives_instances_disks_and_snapshot_groups(api, v1):
    env, port, key = api
    c = client(port, key, v1=v1)
    r = c.create_instance(m.CreateInstanceRequest(
        region_id=REGION, instance_name="sdk-%s" % ("v1" if v1 else "v3"),
        system_disk=m.CreateInstanceRequestSystemDisk(size=1, category="cloud_essd", performance_level="PL0"),
        data_disk=[m.CreateInstanceRequestDataDisk(size=1, category="cloud_essd", performance_level="PL0")]))
    no_none(r.body, "instance_id", "request_id")
    iid = r.body.instance_id
    c.start_instance(m.StartInstanceRequest(instance_id=iid))
    inst = c.describe_instances(m.DescribeInstancesRequest(region_id=REGION, instance_ids=json.dumps([iid]))).body
    assert inst.total_count == 1 and inst.instances.instance[0].status == "Running"
    no_none(inst.instances.instance[0], "instance_id", "status", "creation_time", "instance_charge_type",
            "deletion_protection", "region_id", "zone_id")
    disks = c.describe_disks(m.DescribeDisksRequest(region_id=REGION, instance_id=iid)).body.disks.disk
    assert len(disks) == 2
    for d in disks:
        no_none(d, "disk_id", "size", "category", "performance_level", "status", "instance_id", "device", "type",
                "creation_time", "delete_with_instance", "attachments", "disk_charge_type", "encrypted",
                "delete_auto_snapshot", "enable_auto_snapshot", "portable", "iops", "region_id", "zone_id")
        assert d.attachments.attachment[0].instance_id == iid
    data = [d for d in disks if d.type == "data"][0]
    system = [d for d in disks if d.type == "system"][0]
    assert (data.size, data.category, data.performance_level, data.status) == (1, "cloud_essd", "PL0", "In_use")

    dev = env.attach(data.disk_id)
    a, b = os.urandom(MIB), os.urandom(MIB)
    _dd_write(dev, a)
    snap = c.create_snapshot(m.CreateSnapshotRequest(disk_id=data.disk_id, snapshot_name="sdk-a")).body.snapshot_id
    _dd_write(dev, b)
    group = c.create_snapshot_group(m.CreateSnapshotGroupRequest(region_id=REGION, instance_id=iid, name="sdk-group",
                                                                 description="both disks at once")).body
    no_none(group, "snapshot_group_id", "request_id")
    g = c.describe_snapshot_groups(m.DescribeSnapshotGroupsRequest(
        region_id=REGION, snapshot_group_id=[group.snapshot_group_id])).body.snapshot_groups.snapshot_group
    assert len(g) == 1 and g[0].status == "accomplished" and g[0].name == "sdk-group"
    no_none(g[0], "snapshot_group_id", "instance_id", "creation_time", "progress_status", "snapshots")
    members = g[0].snapshots.snapshot
    assert sorted(s.source_disk_id for s in members) == sorted([data.disk_id, system.disk_id])
    for s in members:
        no_none(s, "snapshot_id", "source_disk_id", "source_disk_type", "progress", "instant_access", "available", "tags")

    # filters and paging, as the cloud pages
    page = c.describe_snapshots(m.DescribeSnapshotsRequest(region_id=REGION, disk_id=data.disk_id, page_size=1,
                                                           page_number=2)).body
    assert page.total_count == 2 and page.page_number == 2 and page.page_size == 1 and len(page.snapshots.snapshot) == 1
    no_none(page.snapshots.snapshot[0], "snapshot_id", "source_disk_id", "status", "progress", "snapshot_type",
            "creation_time", "usage", "encrypted", "region_id", "source_disk_size", "category")
    first = c.describe_snapshots(m.DescribeSnapshotsRequest(region_id=REGION, disk_id=data.disk_id, max_results=1)).body
    assert first.next_token and len(first.snapshots.snapshot) == 1
    rest = c.describe_snapshots(m.DescribeSnapshotsRequest(region_id=REGION, disk_id=data.disk_id, max_results=1,
                                                           next_token=first.next_token)).body
    assert {first.snapshots.snapshot[0].snapshot_id, rest.snapshots.snapshot[0].snapshot_id} == \
        {snap, [s.snapshot_id for s in members if s.source_disk_id == data.disk_id][0]}

    # a new disk from the first snapshot holds A
    new = c.create_disk(m.CreateDiskRequest(region_id=REGION, snapshot_id=snap, disk_category="cloud_essd", performance_level="PL0",
                                            disk_name="from-sdk")).body.disk_id
    nd = c.describe_disks(m.DescribeDisksRequest(region_id=REGION, disk_ids=json.dumps([new]))).body.disks.disk[0]
    assert (nd.size, nd.status, nd.source_snapshot_id) == (1, "Available", snap)
    c.attach_disk(m.AttachDiskRequest(disk_id=new, instance_id=iid))
    ndev = env.attach(new)
    assert read(ndev, MIB) == a
    env.run("loop", "detach", ndev)
    env.run("loop", "detach", dev)

    # roll both disks back to the group: B; then the data disk to the first snapshot: A
    c.stop_instance(m.StopInstanceRequest(instance_id=iid))
    c.reset_disks(m.ResetDisksRequest(region_id=REGION, disk=[
        m.ResetDisksRequestDisk(disk_id=s.source_disk_id, snapshot_id=s.snapshot_id) for s in members]))
    c.start_instance(m.StartInstanceRequest(instance_id=iid))
    dev = env.attach(data.disk_id)
    assert read(dev, MIB) == b
    env.run("loop", "detach", dev)
    c.stop_instance(m.StopInstanceRequest(instance_id=iid))
    c.reset_disk(m.ResetDiskRequest(disk_id=data.disk_id, snapshot_id=snap))
    c.start_instance(m.StartInstanceRequest(instance_id=iid))
    dev = env.attach(data.disk_id)
    assert read(dev, MIB) == a
    env.run("loop", "detach", dev)

    # an image from the group's system snapshot; deleting the group keeps what the image uses
    sys_snap = [s.snapshot_id for s in members if s.source_disk_id == system.disk_id][0]
    image = c.create_image(m.CreateImageRequest(region_id=REGION, snapshot_id=sys_snap, image_name="sdk-image")).body
    no_none(image, "image_id")
    res = c.delete_snapshot_group(m.DeleteSnapshotGroupRequest(region_id=REGION,
                                                               snapshot_group_id=group.snapshot_group_id)).body
    progress = {p.related_item_set.related_item[0].value: p.operation_status
                for p in res.operation_progress_set.operation_progress}
    assert progress[sys_snap] != "Success" and set(progress) == {s.snapshot_id for s in members}


def test_the_sdk_changes_a_disks_speed_and_reads_what_it_did(api):
    """ModifyDiskSpec and DescribeDiskMonitorData as the SDK sends and
    parses them; /metrics beside the API on the same listener."""
    import datetime
    import urllib.request

    from Tea.exceptions import TeaException

    env, port, key = api
    c = client(port, key)
    iid = c.create_instance(m.CreateInstanceRequest(
        region_id=REGION, instance_name="sdk-speed",
        system_disk=m.CreateInstanceRequestSystemDisk(size=1, category="cloud_essd", performance_level="PL0"),
        data_disk=[m.CreateInstanceRequestDataDisk(size=40, category="cloud_essd", performance_level="PL0")])).body.instance_id
    c.start_instance(m.StartInstanceRequest(instance_id=iid))
    disks = c.describe_disks(m.DescribeDisksRequest(region_id=REGION, instance_id=iid)).body.disks.disk
    data = [d for d in disks if d.type == "data"][0]
    assert data.iops == 1800 + 12 * 40
    c.modify_disk_spec(m.ModifyDiskSpecRequest(disk_id=data.disk_id, performance_level="PL1"))
    d = c.describe_disks(m.DescribeDisksRequest(region_id=REGION, disk_ids=json.dumps([data.disk_id]))).body.disks.disk[0]
    assert (d.performance_level, d.iops) == ("PL1", 1800 + 50 * 40)
    for req, code in ((m.ModifyDiskSpecRequest(disk_id=data.disk_id, performance_level="PL0"),
                       "InvalidPerformanceLevel.ValueNotSupported"),
                      (m.ModifyDiskSpecRequest(disk_id=data.disk_id, performance_level="PL2"),
                       "InvalidDiskSize.ValueNotSupported")):
        with pytest.raises(TeaException) as e:
            c.modify_disk_spec(req)
        assert e.value.code == code
    assert c.describe_disks(m.DescribeDisksRequest(region_id=REGION, disk_ids=json.dumps([data.disk_id]))
                            ).body.disks.disk[0].performance_level == "PL1"

    t0 = time.time()
    dev = env.attach(data.disk_id)
    _dd_write(dev, os.urandom(4 * MIB))
    assert len(read(dev, 4 * MIB)) == 4 * MIB
    env.run("loop", "detach", dev)
    time.sleep(2.5)  # a sample after the I/O
    start = datetime.datetime.fromtimestamp(t0 // 60 * 60, datetime.UTC)
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    body = c.describe_disk_monitor_data(m.DescribeDiskMonitorDataRequest(
        disk_id=data.disk_id, start_time=start.strftime(fmt),
        end_time=(start + datetime.timedelta(minutes=2)).strftime(fmt), period=60)).body
    entries = body.monitor_data.disk_monitor_data
    assert body.total_count == len(entries) >= 1
    for e in entries:
        no_none(e, "disk_id", "iopsread", "iopswrite", "iopstotal", "bpsread", "bpswrite", "bpstotal",
                "latency_read", "latency_write", "time_stamp")
    assert sum(e.bpswrite for e in entries) > 0 and sum(e.bpsread for e in entries) > 0
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        text = r.read().decode()
    assert 'vdisk_disk_written_bytes_total{disk_id="%s",instance_id="%s"}' % (data.disk_id, iid) in text


def test_refused_calls_change_nothing(api):
    env, port, key = api
    from Tea.exceptions import TeaException

    before = env.j("disk", "list")["Disks"]["Disk"]
    cases = [
        (client(port, key, secret="wrong" * 6), "SignatureDoesNotMatch", 400),
        (client(port, key, key_id="LTAInosuchkeynosuchkey"), "InvalidAccessKeyId.NotFound", 404),
        (client(port, key, secret="wrong" * 6, v1=True), "SignatureDoesNotMatch", 400),
    ]
    for c, code, status in cases:
        with pytest.raises(TeaException) as e:
            c.create_disk(m.CreateDiskRequest(region_id=REGION, size=20))
        assert (e.value.code, e.value.data.get("statusCode")) == (code, status), (e.value.code, e.value.data)
    with pytest.raises(TeaException) as e:
        client(port, key).create_disk(m.CreateDiskRequest(region_id=REGION, size=5, disk_category="cloud_essd"))  # PL1: 20 GiB up
    assert e.value.code == "InvalidDiskSize.ValueNotSupported"
    # a deleted key stops working at once
    other = env.j("accesskey", "create")
    assert client(port, other).describe_disks(m.DescribeDisksRequest(region_id=REGION)).body.total_count == len(before)
    env.run("accesskey", "delete", other["AccessKeyId"])
    with pytest.raises(TeaException) as e:
        client(port, other).create_disk(m.CreateDiskRequest(region_id=REGION, size=20))
    assert e.value.code == "InvalidAccessKeyId.NotFound"
    assert env.j("disk", "list")["Disks"]["Disk"] == before


def _raw(port, data: bytes, timeout=10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def _rpc_url(key, params):
    from alibabacloud_tea_openapi.utils import Utils
    from urllib.parse import urlencode

    p = {"Version": "2014-05-26", "AccessKeyId": key["AccessKeyId"], "SignatureMethod": "HMAC-SHA1",
         "SignatureVersion": "1.0", "SignatureNonce": "nonce-%d" % time.monotonic_ns(),
         "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **params}
    p["Signature"] = Utils.get_rpcsignature(dict(p), "GET", key["AccessKeySecret"])
    return "/?" + urlencode(p)


def test_v1_get_xml_by_default_and_replays_refused(api):
    env, port, key = api
    url = _rpc_url(key, {"Action": "DescribeDisks"})
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % url).encode()
    out = _raw(port, req)
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"text/xml" in head, head
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?><DescribeDisksResponse><RequestId>'), body[:200]
    again = _raw(port, req)  # the same signed request replayed
    assert again.startswith(b"HTTP/1.1 400") and b"<Code>SignatureNonceUsed</Code>" in again, again[:400]
    js = _raw(port, ("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     % _rpc_url(key, {"Action": "NoSuchAction", "Format": "JSON"})).encode())
    assert js.startswith(b"HTTP/1.1 404") and json.loads(js.split(b"\r\n\r\n", 1)[1])["Code"] == "InvalidAction.NotFound"
    unsigned = _raw(port, b"GET /?Action=DescribeDisks&Version=2014-05-26&Format=JSON HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
    assert json.loads(unsigned.split(b"\r\n\r\n", 1)[1])["Code"] == "IncompleteSignature"


def test_hostile_http_clients_do_not_take_the_disks_down(api):
    env, port, key = api
    pid = env.daemon_pid()
    iid, (disk,) = env.instance(ndata=1, name="guarded")
    env.run("instance", "start", iid)
    path = env.run("disk", "path", disk).stdout.strip()
    data = os.urandom(MIB)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 200000 + b"\r\n\r\n",
                    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n" + b"y" * 2000000,
                    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"\x00\xff" * 1000,
                    b"GET /%ff%fe?%ff=%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"DELETE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
            try:
                _raw(port, raw, timeout=5)
            except (BrokenPipeError, ConnectionResetError):
                pass
        # malformed HTTP is answered 400 before the connection closes (it was closed without an answer)
        out = _raw(port, b"GARBAGE\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400") and b"Malformed HTTP request" in out, out[:300]
        out = _raw(port, b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 200000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431") or out.startswith(b"HTTP/1.1 400"), out[:300]
        # many connections at once, some left half-open (a slow client)
        socks = []
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHo" if i % 2 else b"")
            socks.append(s)
        assert client(port, key).describe_disks(m.DescribeDisksRequest(region_id=REGION)).body.request_id
        for s in socks:
            s.close()
        os.kill(pid, 0)
        assert env.j("daemon", "status")["Pid"] == pid
        assert os.pread(fd, MIB, 0) == data
    finally:
        os.close(fd)
    with open(os.path.join(env.data, "daemon.log")) as f:
        assert "Traceback" not in f.read()
