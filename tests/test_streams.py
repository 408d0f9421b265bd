"""Snapshots as Ceph RBD diff streams, with the real thing: the daemon and
its FUSE mount, the CLI, and (where Ceph is installed) a real single-node
cluster started by scripts/ceph-local with the real `rbd import-diff` and
`rbd export-diff`.  Root only; the Ceph test skips where Ceph is missing."""
import hashlib
import json
import os
import random
import shutil
import subprocess
import time

import pytest

from vdiskenv import sh, sha256_file

pytestmark = pytest.mark.root

GIB = 1 << 30
BLOCK = 65536
ZEROS_1G = hashlib.sha256(bytes(GIB)).hexdigest()


def scribble(path, seed, n, punch=None) -> set:
    """n random writes (4 KiB to 160 KiB) into the disk file; the 64 KiB
    blocks they touched."""
    r = random.Random(seed)
    touched = set()
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(n):
            length = 4096 * r.randrange(1, 40)
            off = r.randrange(0, GIB - length) & ~4095
            os.pwrite(fd, r.randbytes(length), off)
            touched.update(range(off // BLOCK, (off + length - 1) // BLOCK + 1))
        os.fsync(fd)
    finally:
        os.close(fd)
    if punch:
        sh("fallocate", "-p", "-o", str(punch[0]), "-l", str(punch[1]), path)
        touched.update(range(punch[0] // BLOCK, (punch[0] + punch[1] - 1) // BLOCK + 1))
    return touched


def raw_digest(venv, snap) -> str:
    """The snapshot's whole image, through `vdisk snapshot export --format raw`."""
    out = os.path.join(venv.dir, "img-%s.raw" % snap)
    venv.run("snapshot", "export", snap, "--format", "raw", "-o", out)
    try:
        return sha256_file(out)
    finally:
        os.unlink(out)


@pytest.fixture
def source(venv):
    """A running instance's data disk with two snapshots, "one" and "two":
    (disk, {name: (snapshot id, sha256 of the disk then)}, blocks changed
    between them)."""
    iid, (disk,) = venv.instance(ndata=1)
    venv.run("instance", "start", iid)
    path = venv.run("disk", "path", disk).stdout.strip()
    scribble(path, 1, 60)
    s1 = venv.run("snapshot", "create", disk, "--name", "one").stdout.strip()
    d1 = sha256_file(path)
    changed = scribble(path, 2, 15, punch=(64 << 20, 8 << 20))
    s2 = venv.run("snapshot", "create", disk, "--name", "two").stdout.strip()
    d2 = sha256_file(path)
    assert d1 != d2
    return disk, {"one": (s1, d1), "two": (s2, d2)}, changed


def new_disk(venv, size=1) -> str:
    return venv.run("disk", "create", "--size", size, "--performance-level", "PL0").stdout.strip()


def snaps_of(venv, disk) -> dict:
    return {s["SnapshotName"]: s["SnapshotId"]
            for s in venv.j("snapshot", "list", "--disk", disk)["Snapshots"]["Snapshot"]}


def test_export_then_import_into_another_disk(venv, source):
    disk, snaps, changed = source
    full = os.path.join(venv.dir, "full.diff")
    inc = os.path.join(venv.dir, "inc.diff")
    a = venv.j("snapshot", "export", snaps["one"][0], "-o", full)
    b = venv.j("snapshot", "export", snaps["two"][0], "--from", snaps["one"][0], "-o", inc)
    assert (a["FromSnapshot"], a["ToSnapshot"], b["FromSnapshot"], b["ToSnapshot"]) == (None, "one", "one", "two")
    # the incremental stream carries the change only: data of the blocks
    # written after "one", the punched range as zero records
    assert b["DataBytes"] <= len(changed) * BLOCK
    assert b["ZeroBytes"] > 0 and b["StreamBytes"] < b["DataBytes"] + 4096 + 25 * len(changed)
    assert os.path.getsize(inc) == b["StreamBytes"]
    # applied in order to a new disk, each stream leaves the snapshot it names
    target = new_disk(venv)
    r1 = venv.j("disk", "import-diff", target, full)
    with open(inc, "rb") as f:  # from a pipe: standard input
        r2 = json.loads(subprocess.run(
            [*venv_cmd(venv), "--json", "disk", "import-diff", target, "-"], stdin=f, capture_output=True,
            text=True, check=True).stdout)
    got = snaps_of(venv, target)
    assert set(got) == {"one", "two"} and got["one"] == r1["SnapshotId"] and got["two"] == r2["SnapshotId"]
    for name, (_sid, want) in snaps.items():
        assert raw_digest(venv, got[name]) == want, name
    # a stream exported from the copy is the same stream
    again = os.path.join(venv.dir, "again.diff")
    venv.run("snapshot", "export", got["two"], "--from", got["one"], "-o", again)
    assert sha256_file(again) == sha256_file(inc)


def venv_cmd(venv):
    import sys

    return [sys.executable, "-m", "vdisk", "--data-dir", venv.data, "--mountpoint", venv.mnt]


def refused(venv, *args, code):
    r = venv.run(*args, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "(%s)" % code in r.stderr, r.stderr
    return r.stderr


def test_import_refuses_and_changes_nothing(venv, source):
    disk, snaps, _ = source
    full = os.path.join(venv.dir, "full.diff")
    inc = os.path.join(venv.dir, "inc.diff")
    venv.run("snapshot", "export", snaps["one"][0], "-o", full)
    venv.run("snapshot", "export", snaps["two"][0], "--from", snaps["one"][0], "-o", inc)
    target = new_disk(venv)
    # rbd's rules: the start snapshot must be there, the end one must not
    msg = refused(venv, "disk", "import-diff", target, inc, code="InvalidSnapshotId.NotFound")
    assert "'one'" in msg
    venv.run("disk", "import-diff", target, full)
    refused(venv, "disk", "import-diff", target, full, code="InvalidParameter.SnapshotNameExists")
    # a disk of another size, a disk in use by a running instance
    refused(venv, "disk", "import-diff", new_disk(venv, 2), full, code="InvalidParameter.DiffStream")
    refused(venv, "disk", "import-diff", disk, inc, code="IncorrectInstanceStatus")
    # a stream cut short, a stream mangled after half its data: the disk is
    # as it was (all or nothing), no snapshot was taken
    data = open(inc, "rb").read()
    for bad in (data[: len(data) // 2], data[: len(data) // 2] + b"q" + data[len(data) // 2:]):
        with open(os.path.join(venv.dir, "bad.diff"), "wb") as f:
            f.write(bad)
        refused(venv, "disk", "import-diff", target, os.path.join(venv.dir, "bad.diff"),
                code="InvalidParameter.DiffStream")
        assert set(snaps_of(venv, target)) == {"one"}
        probe = venv.run("snapshot", "create", target, "--name", "probe").stdout.strip()
        assert raw_digest(venv, probe) == snaps["one"][1]
        venv.run("snapshot", "delete", probe)
    # and the good stream still applies after all that
    venv.run("disk", "import-diff", target, inc)
    assert raw_digest(venv, snaps_of(venv, target)["two"]) == snaps["two"][1]
    # no hidden snapshot left behind: the engine holds the cloud's snapshots only
    assert venv.j("pool", "status")["Pool"]["Snapshots"] == len(venv.j("snapshot", "list")["Snapshots"]["Snapshot"])


def test_import_cut_by_a_crash_leaves_the_disk_as_it_was(venv, source):
    _disk, snaps, _ = source
    full = os.path.join(venv.dir, "full.diff")
    venv.run("snapshot", "export", snaps["one"][0], "-o", full)
    data = open(full, "rb").read()
    target = new_disk(venv)
    before = venv.j("pool", "status")["Pool"]["Snapshots"]
    r, w = os.pipe()
    proc = subprocess.Popen([*venv_cmd(venv), "disk", "import-diff", target, "-"], stdin=r,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(r)
    try:
        os.write(w, data[: len(data) * 2 // 3])  # the daemon applies this much, then waits for more
        deadline = time.monotonic() + 30
        while venv.j("pool", "status")["Pool"]["Snapshots"] == before:  # the hidden snapshot is taken
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1)
        venv.kill9()
    finally:
        os.close(w)
        proc.wait(timeout=60)
    assert proc.returncode != 0
    venv.start()
    assert snaps_of(venv, target) == {}
    assert venv.j("pool", "status")["Pool"]["Snapshots"] == before
    probe = venv.run("snapshot", "create", target, "--name", "probe").stdout.strip()
    assert raw_digest(venv, probe) == ZEROS_1G
    # the whole stream then applies as if nothing had happened
    venv.run("snapshot", "delete", probe)
    venv.run("disk", "import-diff", target, full)
    assert raw_digest(venv, snaps_of(venv, target)["one"]) == snaps["one"][1]


def test_offline_export_is_the_same_stream(venv, source):
    _disk, snaps, _ = source
    online = os.path.join(venv.dir, "online.diff")
    offline = os.path.join(venv.dir, "offline.diff")
    venv.run("snapshot", "export", snaps["two"][0], "--from", snaps["one"][0], "-o", online)
    venv.stop(force=True)
    venv.run("snapshot", "export", snaps["two"][0], "--from", snaps["one"][0], "-o", offline)
    assert sha256_file(online) == sha256_file(offline)
    target = new_disk(venv)  # offline too: an import needs no daemon
    full = os.path.join(venv.dir, "full.diff")
    venv.run("snapshot", "export", snaps["one"][0], "-o", full)
    venv.run("disk", "import-diff", target, full)
    venv.run("disk", "import-diff", target, offline)
    assert raw_digest(venv, snaps_of(venv, target)["two"]) == snaps["two"][1]


def test_export_refuses_what_it_cannot_write(venv, source):
    disk, snaps, _ = source
    other = venv.j("snapshot", "create", disk, "--name", "three")["SnapshotId"]
    refused(venv, "snapshot", "export", snaps["one"][0], "--from", other, "-o", os.path.join(venv.dir, "x"),
            code="InvalidParameter.FromSnapshotId")
    r = venv.run("snapshot", "export", snaps["one"][0], "--from", snaps["one"][0], "--format", "raw", "-o",
                 os.path.join(venv.dir, "x"), check=False)
    assert r.returncode == 2 and "--from makes a diff" in r.stderr
    # the cloud's API has no byte streams: over HTTP or without a descriptor it says how to send one
    assert venv.run("api", "ExportSnapshotDiff", "SnapshotId=" + snaps["one"][0], check=False).returncode == 1
    # a directory is no stream (both were internal errors, found by the fuzzer)
    r = venv.run("snapshot", "export", snaps["one"][0], "-o", venv.dir, check=False)
    assert r.returncode == 2 and "is a directory" in r.stderr, r.stderr
    r = venv.run("disk", "import-diff", new_disk(venv), venv.dir, check=False)
    assert r.returncode == 2 and "is a directory" in r.stderr, r.stderr
    from vdisk.config import Paths
    from vdisk.daemon import client

    fd = os.open(venv.dir, os.O_RDONLY)  # what another client might pass the daemon
    try:
        res = client.stream(Paths.resolve(venv.data, venv.mnt), {"Action": "ImportDiskDiff", "DiskId": new_disk(venv)}, fd)
    finally:
        os.close(fd)
    assert res["Code"] == "InvalidParameter.DiffStream" and "Is a directory" in res["Message"], res


# ---------------------------------------------------------------- with Ceph


def rbd(env, *args, **kw):
    return subprocess.run(["rbd", "--no-progress", *args], env=env, check=True, capture_output=True, timeout=300, **kw)


def test_round_trip_through_real_rbd(venv, source, ceph):
    """vdisk -> rbd import-diff -> rbd export-diff -> vdisk import-diff into
    another pool: every snapshot's checksum matches at every step."""
    _disk, snaps, _ = source
    full = os.path.join(venv.dir, "full.diff")
    inc = os.path.join(venv.dir, "inc.diff")
    venv.run("snapshot", "export", snaps["one"][0], "-o", full)
    venv.run("snapshot", "export", snaps["two"][0], "--from", snaps["one"][0], "-o", inc)
    image = "vdisk-%d" % os.getpid()
    rbd(ceph, "create", image, "--size", "1G")
    try:
        rbd(ceph, "import-diff", full, image)
        rbd(ceph, "import-diff", inc, image)
        for name, (_sid, want) in snaps.items():
            got = hashlib.sha256(rbd(ceph, "export", "%s@%s" % (image, name), "-").stdout).hexdigest()
            assert got == want, name
        back1 = os.path.join(venv.dir, "back1.diff")
        back2 = os.path.join(venv.dir, "back2.diff")
        rbd(ceph, "export-diff", "%s@one" % image, back1)
        rbd(ceph, "export-diff", "--from-snap", "one", "%s@two" % image, back2)
    finally:
        subprocess.run(["rbd", "snap", "purge", image], env=ceph, capture_output=True)
        subprocess.run(["rbd", "rm", image], env=ceph, capture_output=True)
    # "another host": a second data directory with its own daemon
    from vdiskenv import VDiskEnv

    other = VDiskEnv()
    try:
        other.start()
        target = new_disk(other)
        other.run("disk", "import-diff", target, back1)
        with open(back2, "rb") as f:  # through a pipe, as `rbd export-diff ... - | vdisk disk import-diff` does
            subprocess.run([*venv_cmd(other), "disk", "import-diff", target, "-"], stdin=f, check=True,
                           capture_output=True)
        got = snaps_of(other, target)
        for name, (_sid, want) in snaps.items():
            assert raw_digest(other, got[name]) == want, name
    finally:
        other.close()


def test_snapshots_are_read_only_files_in_the_mount(venv, source):
    """<mountpoint>/.snapshot/<SnapshotId>: read by dd, losetup -r and
    qemu-img as the snapshot's image; never written."""
    disk, snaps, _ = source
    sid, want = snaps["one"]
    f = os.path.join(venv.mnt, ".snapshot", sid)
    assert sid in os.listdir(os.path.join(venv.mnt, ".snapshot"))
    assert ".snapshot" not in os.listdir(venv.mnt)  # hidden, as ZFS's .zfs
    assert os.path.getsize(f) == GIB and sha256_file(f) == want
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.open(f, flags)
        assert e.value.errno == 30  # EROFS
    dev = sh("losetup", "-r", "-f", "--show", f).stdout.strip()
    try:
        assert sha256_file(dev) == want
    finally:
        sh("losetup", "-d", dev)
    if shutil.which("qemu-img"):
        info = json.loads(sh("qemu-img", "info", "--output=json", "-f", "raw", f).stdout)
        assert info["virtual-size"] == GIB
    # a snapshot taken now shows up, a deleted one goes
    s3 = venv.run("snapshot", "create", disk, "--name", "three").stdout.strip()
    assert os.path.getsize(os.path.join(venv.mnt, ".snapshot", s3)) == GIB
    venv.run("snapshot", "delete", s3)
    deadline = time.monotonic() + 5  # the kernel may keep the name for its entry timeout (1 s)
    while os.path.exists(os.path.join(venv.mnt, ".snapshot", s3)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
