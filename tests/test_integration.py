"""Integration tests with the real thing: the daemon, its FUSE mount, loop
devices with direct I/O, mkfs/mount, fio.  Root only; they skip otherwise."""
import json
import mmap
import os
import random
import socket
import stat
import time

import pytest

from vdiskenv import VDiskEnv, need_root_fuse_loop, sh, sha256_file

pytestmark = pytest.mark.root


def write_files(root, n=8, size=256 * 1024, seed=0):
    """Write n random files, fsync them, return {name: sha256}."""
    r = random.Random(seed)
    sums = {}
    for i in range(n):
        p = os.path.join(root, "f%03d" % i)
        with open(p, "wb") as f:
            f.write(r.randbytes(size + r.randrange(0, 65536)))
            f.flush()
            os.fsync(f.fileno())
        sums[os.path.basename(p)] = sha256_file(p)
    return sums


def check_files(root, sums):
    got = {name: sha256_file(os.path.join(root, name)) for name in sums}
    assert got == sums


MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"], ["e2fsck", "-fn"]),
    "xfs": (["mkfs.xfs", "-q", "-f"], ["xfs_repair", "-n"]),
}


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem_survives_clean_restart_and_sigkill(venv, fstype, monkeypatch):
    mkfs, fsck = MKFS[fstype]
    need_root_fuse_loop(mkfs[0], fsck[0])
    # no background commit in the test's few seconds: the fsyncs before the
    # SIGKILL are durable through the intent log alone
    monkeypatch.setenv("VDISK_COMMIT_INTERVAL", "600")
    iid, (disk,) = venv.instance(ndata=1)
    venv.run("instance", "start", iid)
    dev = venv.attach(disk)
    assert open("/sys/block/%s/loop/dio" % os.path.basename(dev)).read().strip() == "1"
    sh(*mkfs, dev)
    mnt = venv.mount(dev, os.path.join(venv.dir, "fs"))
    sums = write_files(mnt, seed=1)
    venv.umount(mnt)
    venv.run("loop", "detach", dev)

    # clean stop and start: the instance is still Running and its disks are back
    venv.stop()
    venv.start()
    dev = venv.attach(disk)
    sh(*fsck, dev)
    mnt = venv.mount(dev, mnt)
    check_files(mnt, sums)
    more = write_files(mnt, n=4, seed=2)  # fsynced: must survive SIGKILL
    os.sync()
    lg = venv.j("daemon", "status")["IntentLog"]
    assert lg["Flushes"] > 0  # the fsyncs went to the log
    assert lg["FlushesInC"] > 0  # most of them written by the fast path's C thread
    # after the restart C's table started empty: the first reads and writes
    # of blocks with data went to Python, which taught C and had C serve
    # them; none was served by the engine itself under C's lock
    fp = venv.j("daemon", "status")["FastPath"]
    assert 0 < fp["IoPassedToPython"] < fp["PassedToPython"], fp  # the rest: LOOKUP, OPEN, ...
    assert fp["ServedByEngine"] == {"reads": 0, "writes": 0}, fp

    # SIGKILL with the filesystem mounted: flushed data must survive
    venv.kill9()
    sh("umount", mnt, check=False)  # I/O to the dead daemon fails; that is expected
    venv.fs_mounts.remove(mnt)
    sh("losetup", "-d", dev, check=False)
    venv.start()
    assert venv.j("daemon", "status")["IntentLog"]["RecordsReplayedAtStart"] > 0
    dev = venv.attach(disk)
    mnt = venv.mount(dev, mnt)  # replays the journal/log if needed
    check_files(mnt, {**sums, **more})
    venv.umount(mnt)
    sh(*fsck, dev)  # clean after replay
    assert venv.j("pool", "scrub")["Clean"]


def test_fsyncs_go_on_while_background_commits_run_and_survive_sigkill(monkeypatch):
    """A database's fsyncs do not wait for the background commit: through
    the disk files, a thread writes 1 MiB at a time to one disk without
    fsync (data each commit must sync) while this one writes 4 KiB records
    to the other and fsyncs each; a commit starts every second
    (VDISK_COMMIT_INTERVAL=1).  The daemon counts the fsyncs the intent log
    made durable while a commit ran (FlushesDuringCommits); once the writes
    stop, the heap the commits freed goes back to the kernel; and after a
    SIGKILL every fsynced record reads back."""
    import threading
    from vdiskenv import VDiskEnv

    need_root_fuse_loop()
    monkeypatch.setenv("VDISK_COMMIT_INTERVAL", "1")
    env = VDiskEnv()
    stop = threading.Event()
    bulk_error = []

    def bulk(path):
        buf = mmap.mmap(-1, 1 << 20)  # O_DIRECT wants aligned buffers
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            for n in range(1 << 30):
                if stop.is_set():
                    return
                buf[:16] = n.to_bytes(16, "little")
                os.pwrite(fd, buf, (256 << 20) + (n % 768 << 20))
        except OSError as exc:
            bulk_error.append(exc)
        finally:
            os.close(fd)

    try:
        env.start()
        iid, (db_disk, bulk_disk) = env.instance(ndata=2)
        env.run("instance", "start", iid)
        db_path, bulk_path = (env.run("disk", "path", d).stdout.strip() for d in (db_disk, bulk_disk))
        before = env.j("daemon", "status")
        writer = threading.Thread(target=bulk, args=(bulk_path,))
        writer.start()
        r = random.Random(7)
        buf = mmap.mmap(-1, 4096)
        records = {}  # page -> what was written there last, fsynced
        written = 0
        fd = os.open(db_path, os.O_RDWR | os.O_DIRECT)
        try:
            deadline = time.monotonic() + 60
            while True:
                for _ in range(50):
                    page, at = r.randbytes(4096), written % 16384  # over the first 64 MiB, again and again
                    buf[:] = page
                    os.pwrite(fd, buf, at * 4096)
                    os.fsync(fd)
                    records[at] = page
                    written += 1
                st = env.j("daemon", "status")
                during = st["IntentLog"]["FlushesDuringCommits"] - before["IntentLog"]["FlushesDuringCommits"]
                commits = st["WriteCache"]["Commits"] - before["WriteCache"]["Commits"]
                if during >= 20 and commits >= 3 or time.monotonic() > deadline:
                    break
        finally:
            os.close(fd)
            stop.set()
            writer.join()
        assert not bulk_error
        assert commits >= 3, "the background commits did not run (%d in 60 s)" % commits
        assert during >= 20, (
            "fsyncs waited for the commits: %d of %d fsyncs written while one of %d commits ran"
            % (during, written, commits))
        # the writes stopped: within a commit interval, the heap the commits
        # freed goes back to the kernel (daemon/memory.py)
        for _ in range(100):
            mem = env.j("daemon", "status")["Memory"]
            if mem["HeapTrims"]:
                break
            time.sleep(0.1)
        assert mem["HeapTrims"] >= 1 and 0 < mem["AnonymousMiB"] < mem["ResidentMiB"], mem

        env.kill9()
        env.start()
        db_path = env.run("disk", "path", db_disk).stdout.strip()
        lost = lost_pages(db_path, {i * 4096: page for i, page in records.items()})
        assert not lost, "%d of %d fsynced records lost, the first at %d" % (len(lost), len(records), lost[0])
        assert env.j("pool", "scrub")["Clean"]
    finally:
        stop.set()
        env.close()


def write_fsynced(path: str, pages: dict[int, bytes]) -> None:
    """Write each 4 KiB page (offset -> bytes) to a disk file with
    O_DIRECT, then fsync it."""
    buf = mmap.mmap(-1, 4096)  # O_DIRECT wants aligned buffers
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        for off, page in pages.items():
            buf[:] = page
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def lost_pages(path: str, pages: dict[int, bytes]) -> list[int]:
    """The offsets of a disk file whose 4 KiB page does not read back as
    written (pages: offset -> bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [off for off, page in pages.items() if os.pread(fd, 4096, off) != page]
    finally:
        os.close(fd)


def test_disks_created_and_grown_under_writes_survive_sigkill():
    """CreateDisk and ResizeDisk commit alone (Pool.commit_meta: no data
    sync, the intent log stays in its generation) while a running disk
    takes fsynced writes through its file.  After a SIGKILL the new disk
    and the new size are there, and so is every fsynced write: those
    before the actions, and one beyond the old end written after the
    growth, whose record only the replay puts back."""
    need_root_fuse_loop()
    env = VDiskEnv()
    try:
        env.start()
        iid, (disk,) = env.instance(ndata=1, size=20)
        env.run("instance", "start", iid)
        path = env.run("disk", "path", disk).stdout.strip()
        r = random.Random(3)
        # offset -> what was written there, fsynced
        pages = {i * 3 * 65536 + 4096 * (i % 16): r.randbytes(4096) for i in range(64)}
        write_fsynced(path, pages)
        new = env.api("CreateDisk", ZoneId="vdisk-local-a", DiskCategory="cloud_essd", Size=20)["DiskId"]
        assert "Code" not in env.api("ResizeDisk", DiskId=disk, NewSize=24)
        assert os.path.getsize(path) == 24 << 30
        beyond = {(22 << 30) + 8192: r.randbytes(4096)}  # past the old end
        write_fsynced(path, beyond)
        pages.update(beyond)

        env.kill9()
        env.start()
        disks = {d["DiskId"]: d for d in env.j("disk", "list")["Disks"]["Disk"]}
        assert disks[disk]["Size"] == 24 and disks[new]["Size"] == 20 and disks[new]["Status"] == "Available"
        path = env.run("disk", "path", disk).stdout.strip()
        assert os.path.getsize(path) == 24 << 30
        lost = lost_pages(path, pages)
        assert not lost, "%d of %d fsynced pages lost, the first at %d" % (len(lost), len(pages), lost[0])
        assert env.j("pool", "scrub")["Clean"]
    finally:
        env.close()


def test_records_of_the_control_thread_commit_alone():
    """An action run in the control thread commits its records alone
    through the trio thread (Committer.commit_meta): CreateSnapshot with a
    ClientToken takes one full commit, the snapshot's, and its token
    record none (it took a second one before).  The token is durable: after
    a SIGKILL the same request answers the same snapshot."""
    need_root_fuse_loop()
    env = VDiskEnv()
    try:
        env.start()
        iid, (disk,) = env.instance(ndata=1)
        before = env.j("daemon", "status")["WriteCache"]["Commits"]
        first = env.api("CreateSnapshot", DiskId=disk, ClientToken="token-1")
        assert "Code" not in first, first
        time.sleep(0.5)  # the snapshot lifecycle runs after each action
        commits = env.j("daemon", "status")["WriteCache"]["Commits"] - before
        assert commits == 1, "%d commits for a snapshot and its token record" % commits
        env.kill9()
        env.start()
        again = env.api("CreateSnapshot", DiskId=disk, ClientToken="token-1")
        assert again["SnapshotId"] == first["SnapshotId"]
    finally:
        env.close()


@pytest.mark.parametrize("action", ["StopInstance", "DetachDisk"])
def test_a_disk_leaving_its_instance_makes_its_writes_durable(action):
    """Writes never flushed are durable once StopInstance or DetachDisk
    answers, as after a clean power-off (the daemon waits for a
    background commit; the action's own records commit alone).  A SIGKILL
    right after the answer finds them."""
    need_root_fuse_loop()
    env = VDiskEnv()
    try:
        env.start()
        iid, (disk,) = env.instance(ndata=1)
        env.run("instance", "start", iid)
        path = env.run("disk", "path", disk).stdout.strip()
        data = random.Random(5).randbytes(1 << 20)
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwrite(fd, buf, 8 << 20)  # no fsync
        finally:
            os.close(fd)
        if action == "StopInstance":
            env.run("instance", "stop", iid)
        else:
            assert "Code" not in env.api("DetachDisk", InstanceId=iid, DiskId=disk)
        env.kill9()
        env.start()
        if action == "DetachDisk":
            assert "Code" not in env.api("AttachDisk", InstanceId=iid, DiskId=disk)
        else:
            env.run("instance", "start", iid)
        path = env.run("disk", "path", disk).stdout.strip()
        with open(path, "rb") as f:
            f.seek(8 << 20)
            assert f.read(len(data)) == data, "writes lost though the disk left its instance"
    finally:
        env.close()


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "pyfuse3-only"])
def test_fio_verify_on_loop_device(fast, monkeypatch):
    """fio writes 64 MiB of 4 KiB random blocks and reads every one back,
    once with READ/WRITE served in C (the default) and once with
    VDISK_FASTPATH=0 (every request through pyfuse3); the daemon's status
    says which path served them."""
    from vdiskenv import VDiskEnv

    need_root_fuse_loop("fio")
    monkeypatch.setenv("VDISK_FASTPATH", "1" if fast else "0")
    venv = VDiskEnv()
    try:
        venv.start()
        _fio_verify(venv)
        fp = venv.j("daemon", "status")["FastPath"]
        assert fp["Enabled"] is fast
        if fast:
            # the verify pass reads everything; the writes copy on write
            # once a block is known (the first touches go through Python)
            assert fp["Reads"] > 10000 and fp["Writes"] > 10000, fp
        assert venv.j("pool", "scrub")["Clean"]
    finally:
        venv.close()


def _fio_verify(venv):
    iid, (disk,) = venv.instance(ndata=1)
    venv.run("instance", "start", iid)
    dev = venv.attach(disk)
    r = sh(
        "fio", "--name=verify", "--filename=" + dev, "--ioengine=libaio", "--direct=1", "--rw=randwrite",
        "--bs=4k", "--iodepth=16", "--size=64M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--randrepeat=0", "--output-format=json",
        cwd=venv.dir,  # fio leaves its verify state file in the working directory
    )
    out = json.loads(r.stdout[r.stdout.index("{"):])
    job = out["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 64 << 20
    assert job["read"]["io_bytes"] >= 64 << 20  # the verify pass read everything back


def test_write_cache_counts_the_data_written(monkeypatch):
    """The write cache (VDISK_WRITE_CACHE_MIB) fills with the data written,
    not with the blocks it lands in: 4 KiB into each of 64 blocks (256 KiB
    over 4 MiB of blocks) stays in a 1 MiB cache, and 2 MiB more start a
    background commit."""
    from vdiskenv import VDiskEnv

    need_root_fuse_loop("dd")
    monkeypatch.setenv("VDISK_WRITE_CACHE_MIB", "1")
    monkeypatch.setenv("VDISK_COMMIT_INTERVAL", "600")
    venv = VDiskEnv()
    try:
        venv.start()
        iid, (disk,) = venv.instance(ndata=1)
        venv.run("instance", "start", iid)
        dev = venv.attach(disk)
        wc = venv.j("daemon", "status")["WriteCache"]
        assert wc["SizeBytes"] == 1 << 20 and wc["Bytes"] == 0, wc
        commits = wc["Commits"]
        page = os.urandom(4096)
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 2 << 20)  # page-aligned, for O_DIRECT
            buf[:4096] = page
            for block in range(64):
                os.pwritev(fd, [memoryview(buf)[:4096]], block * 65536 + 8192)
            wc = venv.j("daemon", "status")["WriteCache"]
            assert (wc["Bytes"], wc["Blocks"], wc["Commits"]) == (64 * 4096, 64, commits), wc
            buf[:] = os.urandom(2 << 20)
            os.pwritev(fd, [buf], 8 << 20)
        finally:
            os.close(fd)
        for _ in range(100):
            wc = venv.j("daemon", "status")["WriteCache"]
            if wc["Commits"] > commits:
                break
            time.sleep(0.1)
        assert wc["Commits"] > commits, wc
        assert venv.j("pool", "scrub")["Clean"]
    finally:
        venv.close()


def test_snapshot_reset_clone_and_delete_through_cli(venv):
    need_root_fuse_loop("mkfs.ext4")
    iid, (disk,) = venv.instance(ndata=1)
    venv.run("instance", "start", iid)
    dev = venv.attach(disk)
    sh(*MKFS["ext4"][0], dev)
    mnt = venv.mount(dev, os.path.join(venv.dir, "fs"))
    before = write_files(mnt, n=4, seed=10)
    venv.umount(mnt)
    snap = venv.run("snapshot", "create", disk, "--name", "before").stdout.strip()
    mnt = venv.mount(dev, mnt)
    after = write_files(mnt, n=4, seed=11)  # same names, new content
    assert after != before
    venv.umount(mnt)
    used_with_both = venv.j("pool", "status")["Pool"]["UsedBytes"]

    # reset needs a Stopped instance: refused while Running, catalogue unchanged
    r = venv.run("disk", "reset", disk, "--snapshot", snap, check=False)
    assert r.returncode == 1 and "IncorrectInstanceStatus" in r.stderr
    # stopping is refused while the loop device holds the disk
    r = venv.run("instance", "stop", iid, check=False)
    assert r.returncode == 1 and dev in r.stderr
    venv.run("loop", "detach", dev)
    venv.run("instance", "stop", iid)
    assert not os.path.exists(os.path.join(venv.mnt, iid))
    venv.run("disk", "reset", disk, "--snapshot", snap)
    venv.run("instance", "start", iid)
    dev = venv.attach(disk)
    mnt = venv.mount(dev, mnt)
    check_files(mnt, before)
    venv.umount(mnt)

    # a new disk from the snapshot, attached to the running instance
    clone = venv.run("disk", "create", "--snapshot", snap, "--performance-level", "PL0").stdout.strip()
    venv.run("disk", "attach", clone, "--instance", iid)
    cdev = venv.attach(clone)
    cmnt = venv.mount(cdev, os.path.join(venv.dir, "clone"), "ro", "noload")
    check_files(cmnt, before)
    venv.umount(cmnt)
    venv.run("loop", "detach", cdev)

    # the snapshot made a disk: deleting it needs --force
    r = venv.run("snapshot", "delete", snap, check=False)
    assert r.returncode == 1 and "SnapshotCreatedDisk" in r.stderr
    venv.run("disk", "detach", clone)
    venv.run("disk", "delete", clone)
    venv.run("snapshot", "delete", snap)
    used_after = venv.j("pool", "status")["Pool"]["UsedBytes"]
    assert used_after < used_with_both  # what only the snapshot used came back
    assert venv.j("snapshot", "list")["Snapshots"]["Snapshot"] == []
    assert venv.j("pool", "scrub")["Clean"]


def test_disk_file_semantics(venv):
    iid, (disk,) = venv.instance(ndata=1)
    venv.run("instance", "start", iid)
    path = venv.run("disk", "path", disk).stdout.strip()
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1 << 30
    with open("/proc/self/mounts") as f:
        opts = [l.split()[3] for l in f if l.split()[1] == venv.mnt][0]
    assert "allow_other" not in opts
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"hello", (1 << 30) - 5)
        assert os.pread(fd, 10, (1 << 30) - 5) == b"hello"  # short read at the end
        assert os.pread(fd, 10, 1 << 30) == b""
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 10, (1 << 30) - 5)  # past the end: no silent grow
        assert e.value.errno == 28  # ENOSPC
        with pytest.raises(OSError):
            os.ftruncate(fd, 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 1 << 30
    # another user cannot read it
    r = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", path, check=False)
    assert r.returncode != 0


def test_control_socket_rejects_bad_requests_and_keeps_serving(venv):
    sock_path = os.path.join(venv.data, "control.sock")
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    for bad in (b"not json\n", b"[1,2]\n", b'{"Action": "DeleteDisk", "DiskId": "../../etc"}\n', b'{"Action": 5}\n'):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        s.sendall(bad)
        answer = json.loads(s.makefile().readline())
        s.close()
        assert "Code" in answer and answer["Code"] != "InternalError", answer
    assert venv.j("daemon", "status")["Running"]


def test_refusals_change_nothing(venv):
    iid, (disk,) = venv.instance(ndata=1)
    before = venv.j("disk", "list")
    cases = [
        (["disk", "delete", disk], "IncorrectDiskStatus"),  # In_use
        (["disk", "resize", disk, "--size", "1"], "InvalidDiskSize.TooSmall"),  # grow only
        (["disk", "create", "--size", "5"], "InvalidDiskSize.ValueNotSupported"),  # PL1 starts at 20 GiB
        (["disk", "create", "--size", "20", "--category", "nope"], "InvalidDiskCategory.ValueNotSupported"),
        (["instance", "stop", iid], "IncorrectInstanceStatus"),  # not Running
        (["disk", "show", "d-doesnotexist"], "InvalidDiskId.NotFound"),
        (["disk", "delete", "../../etc/passwd"], "InvalidDiskId.Malformed"),
        (["instance", "create", "--name", "1bad"], "InvalidInstanceName.Malformed"),
    ]
    for args, code in cases:
        r = venv.run(*args, check=False)
        assert r.returncode == 1, (args, r.stderr)
        assert code in r.stderr, (args, r.stderr)
    assert venv.j("disk", "list")["Disks"] == before["Disks"]


def test_discard_frees_space(venv):
    need_root_fuse_loop("fallocate", "blkdiscard")
    iid, (disk,) = venv.instance(ndata=1)
    venv.run("instance", "start", iid)
    path = venv.run("disk", "path", disk).stdout.strip()
    with open(path, "r+b", buffering=0) as f:
        f.write(os.urandom(8 << 20))
        os.fsync(f.fileno())
    used = venv.j("pool", "status")["Pool"]["UsedBytes"]
    assert used >= 8 << 20
    # punch-hole on the file, as the loop driver does for a discard
    sh("fallocate", "--punch-hole", "--keep-size", "--offset", 0, "--length", 4 << 20, path)
    with open(path, "rb") as f:
        assert f.read(4 << 20) == bytes(4 << 20)
        assert f.read(4096) != bytes(4096)
    assert venv.j("pool", "status")["Pool"]["UsedBytes"] == used - (4 << 20)
    # and through a loop device: blkdiscard
    dev = venv.attach(disk)
    sh("blkdiscard", dev)
    venv.run("loop", "detach", dev)
    assert venv.j("pool", "status")["Pool"]["UsedBytes"] == 0
    assert venv.j("pool", "scrub")["Clean"]


def test_discarding_a_whole_large_disk_costs_what_it_holds(venv, tmp_path):
    """mkfs.ext4 and blkdiscard discard the whole disk first.  On a new
    32 TiB disk that is half a billion blocks: the discard must cost what
    the disk holds (before, an overlay entry per block: about 40 minutes
    by extrapolation, and a few hundred MiB of daemon memory; here a
    timeout of 5 minutes stands for "it hangs").  What was written reads zeros after it and its room is
    given back; the disk then takes a filesystem."""
    need_root_fuse_loop("blkdiscard", "mkfs.ext4")
    size = 32768 << 30  # the cloud's ESSDs go to 65,536 GiB
    iid = venv.run("instance", "create", "--name", "big", "--system-size", 20,
                   "--data-disk", "32768:cloud_essd:PL0").stdout.strip()
    (disk,) = [d["DiskId"] for d in venv.j("disk", "list", "--instance", iid)["Disks"]["Disk"] if d["Type"] == "data"]
    venv.run("instance", "start", iid)
    path = venv.run("disk", "path", disk).stdout.strip()
    assert os.path.getsize(path) == size
    with open(path, "r+b", buffering=0) as f:
        for off in (0, 20 << 40, size - (1 << 20)):
            f.seek(off)
            f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())
    assert venv.j("pool", "status")["Pool"]["UsedBytes"] >= 3 << 20
    dev = venv.attach(disk)
    sh("timeout", 300, "blkdiscard", dev)
    # the write cache holds at most the 48 blocks written, not 512 million
    assert venv.j("daemon", "status")["WriteCache"]["Blocks"] <= 48
    venv.run("loop", "detach", dev)
    with open(path, "rb") as f:
        for off in (0, 20 << 40, size - (1 << 20)):
            f.seek(off)
            assert f.read(1 << 20) == bytes(1 << 20), off
    assert venv.j("pool", "status")["Pool"]["UsedBytes"] == 0
    dev = venv.attach(disk)
    sh("timeout", 300, "mkfs.ext4", "-q", dev)  # discards the whole disk again
    mnt = venv.mount(dev, str(tmp_path / "mnt"))
    sums = write_files(mnt, n=4)
    venv.umount(mnt)
    mnt = venv.mount(dev, mnt)
    check_files(mnt, sums)
    venv.umount(mnt)
    venv.run("loop", "detach", dev)
    assert venv.j("pool", "scrub")["Clean"]


def test_pool_trim_gives_back_space_and_keeps_every_byte(monkeypatch):
    """4 KiB random writes after a snapshot take a preallocated 64 KiB
    slot each (the daemon told to preallocate, as it does close to a full
    filesystem: VDISK_SPARSE_ROOM_MIB); `vdisk pool trim` gives back what
    those slots do not hold, with the daemon serving the disk, and the
    disk and its snapshot read as before."""
    need_root_fuse_loop("fio")
    monkeypatch.setenv("VDISK_SPARSE_ROOM_MIB", str(1 << 40))
    venv = VDiskEnv()
    try:
        venv.start()
        _trim_gives_back_space(venv)
    finally:
        venv.close()


def _trim_gives_back_space(venv) -> None:
    iid, (disk,) = venv.instance(ndata=1)
    venv.run("instance", "start", iid)
    dev = venv.attach(disk)
    sh("fio", "--name=fill", "--filename=" + dev, "--rw=write", "--bs=1M", "--size=64M", "--direct=1",
       "--ioengine=libaio", "--iodepth=4", "--end_fsync=1")
    snap = venv.j("snapshot", "create", disk)["SnapshotId"]
    sh("fio", "--name=cow", "--filename=" + dev, "--rw=randwrite", "--bs=4k", "--size=64M", "--io_size=4M",
       "--direct=1", "--ioengine=libaio", "--iodepth=8", "--randrepeat=0", "--end_fsync=1")
    before = sha256_file(dev)
    res = venv.j("pool", "trim")
    assert res["PartialSlots"] >= 256 and res["TrimmedBytes"] >= res["PartialSlots"] * 8 * 4096, res
    # the host's disk got back most of what was punched
    assert res["DataFileAllocatedBytesBefore"] - res["DataFileAllocatedBytes"] >= 0.9 * res["TrimmedBytes"], res
    assert sha256_file(dev) == before
    venv.run("loop", "detach", dev)
    again = venv.j("pool", "trim")  # nothing more to give back
    assert again["DataFileAllocatedBytesBefore"] - again["DataFileAllocatedBytes"] < 1 << 20, again
    assert venv.j("pool", "scrub")["Clean"]
    assert venv.j("snapshot", "show", snap)["SnapshotId"] == snap


def test_full_pool_filesystem_gives_enospc_and_keeps_data(tmp_path):
    """The pool on a small tmpfs: writing past its capacity fails with ENOSPC,
    what was flushed before stays readable, and the daemon keeps serving."""
    from vdiskenv import small_pool

    with small_pool(tmp_path) as env:
        env.start()
        iid, (disk,) = env.instance(ndata=1)
        env.run("instance", "start", iid)
        path = env.run("disk", "path", disk).stdout.strip()
        first = os.urandom(4 << 20)
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, first, 0)
            os.fsync(fd)
            err = None
            for i in range(1, 64):  # 64 x 1 MiB into 48 MiB: must fail
                try:
                    os.pwrite(fd, os.urandom(1 << 20), (4 << 20) + i * (1 << 20))
                    os.fsync(fd)
                except OSError as exc:
                    err = exc
                    break
            assert err is not None and err.errno == 28, err  # ENOSPC
            assert os.pread(fd, len(first), 0) == first
        finally:
            os.close(fd)
        assert env.j("daemon", "status")["Running"]
        assert env.j("pool", "scrub", "--map-only")["Clean"]


def test_snapshot_groups_images_and_usage_through_cli(venv):
    need_root_fuse_loop("mkfs.ext4")
    iid, (d1, d2) = venv.instance(ndata=2)
    venv.run("instance", "start", iid)
    devs = {d: venv.attach(d) for d in (d1, d2)}
    sums = {}
    for d, dev in devs.items():
        sh(*MKFS["ext4"][0], dev)
        mnt = venv.mount(dev, os.path.join(venv.dir, d))
        sums[d] = write_files(mnt, n=2, seed=hash(d) & 0xFFFF)
        venv.umount(mnt)
    gid = venv.run("snapshot-group", "create", iid, "--name", "before", "--client-token", "tok-1").stdout.strip()
    assert venv.run("snapshot-group", "create", iid, "--name", "before", "--client-token", "tok-1").stdout.strip() == gid
    for d, dev in devs.items():  # change both disks after the group
        mnt = venv.mount(dev, os.path.join(venv.dir, d))
        write_files(mnt, n=2, seed=99)
        venv.umount(mnt)
    g = venv.j("snapshot-group", "show", gid)
    assert g["Status"] == "accomplished" and len(g["Snapshots"]["Snapshot"]) == 3
    groups = venv.j("snapshot-group", "list", "--instance", iid)["SnapshotGroups"]["SnapshotGroup"]
    assert [x["SnapshotGroupId"] for x in groups] == [gid]
    venv.run("snapshot-group", "modify", gid, "--name", "renamed")
    assert venv.j("snapshot-group", "list", "--name", "renamed")["SnapshotGroups"]["SnapshotGroup"][0]["SnapshotGroupId"] == gid

    # reset every disk of the group at once: refused while Running, then done
    r = venv.run("snapshot-group", "reset", gid, check=False)
    assert r.returncode == 1 and "IncorrectInstanceStatus" in r.stderr
    for dev in devs.values():
        venv.run("loop", "detach", dev)
    venv.run("instance", "stop", iid)
    venv.run("snapshot-group", "reset", gid, "--dry-run")
    venv.run("snapshot-group", "reset", gid)
    venv.run("instance", "start", iid)
    for d in (d1, d2):
        dev = venv.attach(d)
        mnt = venv.mount(dev, os.path.join(venv.dir, d))
        check_files(mnt, sums[d])
        venv.umount(mnt)
        venv.run("loop", "detach", dev)

    # an image from the group's system and data snapshots; an instance from it
    members = {m["SourceDiskId"]: m["SnapshotId"] for m in g["Snapshots"]["Snapshot"]}
    system_snap = [m["SnapshotId"] for m in g["Snapshots"]["Snapshot"] if m["SourceDiskType"] == "system"][0]
    img = venv.run("image", "create", "--snapshot", system_snap, "--data-snapshot", members[d1], "--name", "golden").stdout.strip()
    new = venv.run("instance", "create", "--image", img, "--system-pl", "PL0").stdout.strip()
    nd = [d for d in venv.j("disk", "list", "--instance", new)["Disks"]["Disk"] if d["Type"] == "data"]
    assert len(nd) == 1 and nd[0]["SourceSnapshotId"] == members[d1]
    venv.run("instance", "start", new)
    dev = venv.attach(nd[0]["DiskId"])
    mnt = venv.mount(dev, os.path.join(venv.dir, "fromimage"), "ro", "noload")
    check_files(mnt, sums[d1])
    venv.umount(mnt)
    venv.run("loop", "detach", dev)

    usage = venv.j("usage")
    assert usage["Totals"]["SnapshotCount"] == 3
    assert sum(r["BilledSize"] for r in usage["Snapshots"]["Snapshot"]) == usage["Totals"]["BilledSize"] > 0
    # the image protects two members; deleting the group keeps them (exit 1)
    r = venv.run("--json", "snapshot-group", "delete", gid, check=False)
    assert r.returncode == 1
    res = json.loads(r.stdout)["OperationProgressSet"]["OperationProgress"]
    assert sorted(x["ErrorCode"] for x in res) == ["", "SnapshotCreatedImage", "SnapshotCreatedImage"]
    assert venv.j("pool", "scrub")["Clean"]
