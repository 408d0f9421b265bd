"""Instance snapshots are one point in time across disks: a causal-order
test through the real daemon, on its FUSE files and on loop devices.

A writer writes sequence number i to disk A, and only once that write has
completed, i to disk B; then i+1 to A, and so on.  At every instant A holds
i or i+1 when B holds i, so in a crash-consistent snapshot of both disks
seq(A) - seq(B) is 0 or 1.  Snapshot groups are taken while it runs; every one
must satisfy that.  The control takes per-disk snapshots of A then B some
milliseconds apart, as a tool without the barrier would; it must be caught
(B ahead of A), or this test could not fail.
"""
import base64
import mmap
import os
import struct
import threading
import time

import pytest

from vdisk.config import Paths
from vdisk.daemon import client
from vdiskenv import need_root_fuse_loop

pytestmark = pytest.mark.root


class CausalWriter(threading.Thread):
    def __init__(self, path_a, path_b, direct):
        super().__init__(daemon=True)
        flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
        self.fa, self.fb = os.open(path_a, flags), os.open(path_b, flags)
        self.stop = threading.Event()
        self.count = 0
        self.error = None

    def run(self):
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        try:
            while not self.stop.is_set():
                self.count += 1
                buf[:8] = struct.pack("<Q", self.count)
                os.pwrite(self.fa, buf, 0)  # completes before B is issued
                os.pwrite(self.fb, buf, 0)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            os.close(self.fa)
            os.close(self.fb)


def seq_of(paths, snapshot_id):
    r = client.call(paths, {"Action": "GetSnapshotBlock", "SnapshotId": snapshot_id, "BlockIndex": 0})
    assert "Code" not in r, r
    return struct.unpack("<Q", base64.b64decode(r["BlockData"])[:8])[0]


def run_trials(venv, iid, disk_a, disk_b, path_a, path_b, direct, trials, staggered_gap=None):
    """Returns [(seqA, seqB)] for each snapshot taken while the writer runs."""
    paths = Paths.resolve(venv.data, venv.mnt)
    w = CausalWriter(path_a, path_b, direct)
    w.start()
    out = []
    try:
        while w.count < 50:
            time.sleep(0.01)
        for _ in range(trials):
            if staggered_gap is None:
                r = client.call(paths, {"Action": "CreateSnapshotGroup", "InstanceId": iid, "DiskId": [disk_a, disk_b]})
                assert "Code" not in r, r
                g = client.call(paths, {"Action": "DescribeSnapshotGroups", "SnapshotGroupId": [r["SnapshotGroupId"]]})
                by_disk = {m["SourceDiskId"]: m["SnapshotId"] for m in g["SnapshotGroups"]["SnapshotGroup"][0]["Snapshots"]["Snapshot"]}
                sa, sb = by_disk[disk_a], by_disk[disk_b]
            else:
                sa = client.call(paths, {"Action": "CreateSnapshot", "DiskId": disk_a})["SnapshotId"]
                time.sleep(staggered_gap)
                sb = client.call(paths, {"Action": "CreateSnapshot", "DiskId": disk_b})["SnapshotId"]
            out.append((seq_of(paths, sa), seq_of(paths, sb)))
            time.sleep(0.02)
    finally:
        w.stop.set()
        w.join(30)
    assert w.error is None, w.error
    assert w.count > 100, "the writer hardly ran (%d writes)" % w.count
    return out


def consistent(pair):
    a, b = pair
    return a - b in (0, 1)


@pytest.mark.parametrize("via", ["fuse-file", "loop-device"])
def test_snapshot_groups_respect_causal_order_and_staggered_ones_do_not(venv, via):
    need_root_fuse_loop()
    iid, (disk_a, disk_b) = venv.instance(ndata=2)
    venv.run("instance", "start", iid)
    if via == "fuse-file":
        pa, pb = venv.run("disk", "path", disk_a).stdout.strip(), venv.run("disk", "path", disk_b).stdout.strip()
        direct = False  # the files are direct I/O already (FOPEN_DIRECT_IO)
    else:
        pa, pb = venv.attach(disk_a), venv.attach(disk_b)
        direct = True
    atomic = run_trials(venv, iid, disk_a, disk_b, pa, pb, direct, trials=12)
    bad = [p for p in atomic if not consistent(p)]
    assert not bad, "snapshot groups broke the causal order: %s" % bad
    assert len({a for a, _ in atomic}) > 1, "the snapshots did not see the writer progress: %s" % atomic
    staggered = run_trials(venv, iid, disk_a, disk_b, pa, pb, direct, trials=6, staggered_gap=0.05)
    caught = [p for p in staggered if not consistent(p)]
    print("atomic", atomic, "staggered", staggered)
    assert caught, "staggered per-disk snapshots were never caught; the check is blind: %s" % staggered
