"""Snapshot repositories on a real single-node Ceph (scripts/ceph-local,
librados): archive a snapshot group from one data directory, restore it
into another ("another host"), incremental archives, resume after a
SIGKILL, check, delete with exact reclaim.  Root only; skips without Ceph."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from vdiskenv import VDiskEnv, sha256_file, write_random_blocks

pytestmark = pytest.mark.root

BLOCK = 65536


def rados_objects(ceph, pool) -> list[str]:
    out = subprocess.run(["rados", "-p", pool, "ls"], env=ceph, capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.fixture
def repo(venv, ceph):
    """A repository "r" registered in venv's data directory, on a RADOS
    pool of its own: (pool name, ceph environment)."""
    pool = "vdisk-test-%d-%d" % (os.getpid(), time.monotonic_ns() % 10**6)
    venv.run("repository", "add", "r", "--ceph-conf", ceph["CEPH_CONF"], "--pool", pool)
    yield pool, ceph
    subprocess.run(["ceph", "osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it"], env=ceph,
                   capture_output=True)


@pytest.fixture
def machine(venv):
    """A running instance with two data disks written: (instance, [disk], [path])."""
    iid, disks = venv.instance(ndata=2)
    venv.run("instance", "start", iid)
    paths = [venv.run("disk", "path", d).stdout.strip() for d in disks]
    for i, p in enumerate(paths):
        write_random_blocks(p, random.Random(10 + i).sample(range(16384), 300), i)
    return iid, disks, paths


def restored_digests(env, res) -> dict:
    """source disk -> sha256 of the restored snapshot's image."""
    out = {}
    for d in res["Disks"]:
        f = os.path.join(env.dir, "r.raw")
        env.run("snapshot", "export", d["SnapshotId"], "--format", "raw", "-o", f)
        out[d["SourceDiskId"]] = sha256_file(f)
        os.unlink(f)
    return out


def test_group_archived_then_restored_on_another_host(venv, repo, machine):
    pool, ceph = repo
    iid, disks, paths = machine
    g1 = venv.j("snapshot-group", "create", iid)["SnapshotGroupId"]
    want1 = {d: sha256_file(p) for d, p in zip(disks, paths)}
    a1 = venv.j("repository", "archive", "r", g1)
    assert a1["ChunksSent"] == 600 and a1["BytesSent"] == 600 * BLOCK  # the data disks' blocks; the system disk is empty
    indexes = lambda: {o for o in rados_objects(ceph, pool) if o.startswith("index.")}  # noqa: E731
    index1 = indexes()
    assert len(index1) == 8  # 1 GiB disks: 4 ranges of 4096 blocks each, all written in
    # the second archive after changing 5 blocks sends those 5 chunks only,
    # and the index objects of the ranges they are in
    changed = random.Random(10).sample(range(16384), 300)[:5]  # 5 of the blocks written
    write_random_blocks(paths[0], changed, 99)
    g2 = venv.j("snapshot-group", "create", iid)["SnapshotGroupId"]
    want2 = {d: sha256_file(p) for d, p in zip(disks, paths)}
    a2 = venv.j("repository", "archive", "r", g2)
    assert a2["ChunksSent"] == 5
    assert len(indexes() - index1) == len({b // 4096 for b in changed})
    assert venv.j("repository", "archive", "r", g2)["AlreadyArchived"]  # again: nothing to do
    check = venv.j("repository", "check", "r")
    assert check["Problems"] == [] and check["Groups"] == 2 and check["Chunks"] == 605
    # another data directory, its own daemon, the same repository
    other = VDiskEnv()
    try:
        other.start()
        other.run("repository", "add", "r", "--ceph-conf", ceph["CEPH_CONF"], "--pool", pool)
        for gid, want in ((a1["GroupArchiveId"], want1), (a2["GroupArchiveId"], want2)):
            res = other.j("repository", "restore", "r", gid)
            got = restored_digests(other, res)
            assert {d: got[d] for d in disks} == want
    finally:
        other.close()
    # delete the first group: only the 5 chunks the second replaced go
    res = venv.j("repository", "delete", "r", a1["GroupArchiveId"])
    assert res["ChunksReclaimed"] == 5
    assert venv.j("repository", "check", "r")["Problems"] == []
    res = venv.j("repository", "delete", "r", a2["GroupArchiveId"])
    assert res["ChunksReclaimed"] == 600
    assert not [o for o in rados_objects(ceph, pool) if o.startswith(("chunk.", "index."))]


def test_archive_killed_midway_resumes(venv, repo, machine):
    pool, ceph = repo
    iid, disks, paths = machine
    snap = venv.run("snapshot", "create", disks[0]).stdout.strip()
    want = sha256_file(paths[0])
    cmd = [sys.executable, "-m", "vdisk", "--data-dir", venv.data, "--mountpoint", venv.mnt,
           "repository", "archive", "r", snap]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len([o for o in rados_objects(ceph, pool) if o.startswith("chunk.")]) < 64:
            assert proc.poll() is None and time.monotonic() < deadline, "the archive ended before it could be cut"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    sent_before = len([o for o in rados_objects(ceph, pool) if o.startswith("chunk.")])
    assert 64 <= sent_before < 300
    # no archive appears before it is complete, and the repository is sound
    assert venv.j("repository", "archives", "r")["Archives"] == []
    assert venv.j("repository", "check", "r")["Problems"] == []
    # run again: only the chunks still missing are sent
    res = venv.j("repository", "archive", "r", snap)
    assert res["ChunksSent"] == 300 - sent_before
    other = VDiskEnv()
    try:
        other.start()
        other.run("repository", "add", "r", "--ceph-conf", ceph["CEPH_CONF"], "--pool", pool)
        got = other.j("repository", "restore", "r", res["ArchiveId"])
        assert restored_digests(other, {"Disks": [got]})[disks[0]] == want
    finally:
        other.close()


def test_check_finds_damage_and_restore_refuses_it(venv, repo, machine):
    pool, ceph = repo
    _iid, disks, _paths = machine
    snap = venv.run("snapshot", "create", disks[1]).stdout.strip()
    aid = venv.j("repository", "archive", "r", snap)["ArchiveId"]
    chunks = sorted(o for o in rados_objects(ceph, pool) if o.startswith("chunk."))
    # bit rot in one chunk, another chunk lost
    subprocess.run(["rados", "-p", pool, "put", chunks[0], "/dev/null"], env=ceph, check=True)
    subprocess.run(["rados", "-p", pool, "rm", chunks[1]], env=ceph, check=True)
    r = venv.run("--json", "repository", "check", "r", check=False)
    assert r.returncode == 1
    problems = json.loads(r.stdout)["Problems"]
    assert any(chunks[0][len("chunk."):] in p and "checksum" in p for p in problems), problems
    assert any("lacks 1 chunk" in p for p in problems), problems
    disks_before = {d["DiskId"] for d in venv.j("disk", "list")["Disks"]["Disk"]}
    r = venv.run("repository", "restore", "r", aid, check=False)
    assert r.returncode == 1 and "damaged" in r.stderr, r.stderr
    # the restore left no disk behind
    assert {d["DiskId"] for d in venv.j("disk", "list")["Disks"]["Disk"]} == disks_before


def test_reclaim_waits_for_an_archive_in_progress(venv, repo):
    """An archive's chunks are named by no manifest until it ends: reclaim
    must not run meanwhile (it would delete them)."""
    pool, ceph = repo
    from vdisk.exchange.repository import Repository, RepositoryError

    with Repository(ceph["CEPH_CONF"], pool).open() as archiving, Repository(ceph["CEPH_CONF"], pool).open() as other:
        data = os.urandom(BLOCK)
        d = hashlib.sha256(data).hexdigest()
        archiving.lock_archiving()
        archiving.put_chunks({d: data})
        with pytest.raises(RepositoryError, match="archive is in progress"):
            other.reclaim()
        assert other.missing([d]) == set()
        archiving.unlock()
        assert other.reclaim() == (1, BLOCK)  # nothing names it: now it goes
        assert other.missing([d]) == {d}


def test_copy_snapshot_to_another_region(venv, repo, machine):
    """CopySnapshot with DestinationRegionId: the repository registered for
    that region takes the copy, and the pool of that region shows it under
    the id CopySnapshot answered, with the data of the source."""
    pool, ceph = repo
    _iid, disks, paths = machine
    venv.run("pool", "set", "--region", "cn-source")
    snap = venv.run("snapshot", "create", disks[0], "--name", "before").stdout.strip()
    want = sha256_file(paths[0])
    # no repository stands for cn-far: the cloud's code, nothing recorded
    r = venv.run("api", "CopySnapshot", "SnapshotId=" + snap, "DestinationRegionId=cn-far", check=False)
    assert r.returncode == 1 and "InvalidRegionId.NotFound" in r.stderr
    venv.run("repository", "add", "far", "--ceph-conf", ceph["CEPH_CONF"], "--pool", pool, "--region", "cn-dest")
    copy = venv.j("snapshot", "copy", snap, "--region", "cn-dest", "--name", "copied")["SnapshotId"]
    assert not venv.j("snapshot", "list")["Snapshots"]["Snapshot"][1:]  # nothing new here: the copy is there
    other = VDiskEnv()
    try:
        other.start()
        other.run("pool", "set", "--region", "cn-dest")
        other.run("repository", "add", "home", "--ceph-conf", ceph["CEPH_CONF"], "--pool", pool, "--region", "cn-dest")
        deadline = time.monotonic() + 120
        while True:  # the source's daemon archives, the destination's takes it in
            got = other.j("api", "DescribeSnapshots", "SnapshotIds=[\"%s\"]" % copy)["Snapshots"]["Snapshot"]
            if got:
                break
            assert time.monotonic() < deadline, "the copy never arrived"
            time.sleep(1)
        s = got[0]
        assert (s["SnapshotName"], s["SourceSnapshotId"], s["SourceRegionId"], s["RegionId"]) == \
            ("copied", snap, "cn-source", "cn-dest")
        f = os.path.join(other.dir, "copy.raw")
        other.run("snapshot", "export", copy, "--format", "raw", "-o", f)
        assert sha256_file(f) == want
        # and it makes a disk there like any snapshot
        d = other.run("disk", "create", "--size", 1, "--performance-level", "PL0", "--snapshot", copy).stdout.strip()
        assert d.startswith("d-")
    finally:
        other.close()
