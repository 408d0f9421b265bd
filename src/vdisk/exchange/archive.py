"""Archive snapshots (and snapshot groups, as one unit) into a Repository,
and restore them as new disks, through the cloud's actions and the RBD diff
stream actions: `call(action, **params) -> answer` (raising on an error)
and `stream(action, fd, **params) -> answer` are given by the caller (the
CLI: the daemon, or the pool in-process).

An archive reads its snapshot as an RBD diff stream (ExportSnapshotDiff),
from the disk's previous archived snapshot when that snapshot is still in
the pool, so its time follows the change; a restore writes the archive as
one stream into a new disk (ImportDiskDiff), which takes the snapshot.
"""
from __future__ import annotations

import hashlib
import time

from . import rbddiff
from .pipe import piped
from .repository import BLOCK, Repository, RepositoryError, new_id

ZERO = bytes(BLOCK)
BATCH = 64  # chunks looked up and sent together


def _one_snapshot(call, sid: str) -> dict:
    snaps = call("DescribeSnapshots", SnapshotIds=[sid])["Snapshots"]["Snapshot"]
    if not snaps:
        raise RepositoryError("snapshot %s does not exist" % sid)
    return snaps[0]


def _disk_spec(call, disk_id: str) -> dict:
    disks = call("DescribeDisks", DiskIds=[disk_id])["Disks"]["Disk"]
    if not disks:
        return {}
    return {"Category": disks[0]["Category"], "PerformanceLevel": disks[0].get("PerformanceLevel")}


def _base(repo: Repository, call, snap: dict, source: str):
    """The newest archive of the same disk from this pool whose snapshot is
    older and still in the pool: (its manifest, its id), or (None, None)."""
    best = None
    for aid, m in repo.manifests("archive").items():
        if m["SourceDiskId"] != snap["SourceDiskId"] or m["Source"] != source:
            continue
        if m["SnapshotCreationTime"] >= snap["CreationTime"] or m["SnapshotId"] == snap["SnapshotId"]:
            continue
        if best is None or m["SnapshotCreationTime"] > best[0]["SnapshotCreationTime"]:
            best = (m, aid)
    if best is None:
        return None, None
    if not call("DescribeSnapshots", SnapshotIds=[best[0]["SnapshotId"]])["Snapshots"]["Snapshot"]:
        return None, None  # deleted here since: a full read
    return best


def archive_snapshot(repo: Repository, call, stream, sid: str, source: str, group: str | None = None,
                     full: bool = False, progress=None, copy: dict | None = None) -> dict:
    """Archive one snapshot; its manifest (written last).  An archive of a
    snapshot already in the repository is that archive (nothing sent).
    copy: the record of a CopySnapshot to another region this archive is
    (vdisk.control.copies), kept in the manifest for that region's pull."""
    snap = _one_snapshot(call, sid)
    for aid, m in repo.manifests("archive").items():
        if copy is not None:
            if (m.get("Copy") or {}).get("CopySnapshotId") == copy["CopySnapshotId"]:
                return dict(m, ArchiveId=aid, ChunksSent=0, BytesSent=0, AlreadyArchived=True)
        elif m["SnapshotId"] == sid and m["Source"] == source and m.get("GroupArchiveId") == group \
                and not m.get("Copy"):
            return dict(m, ArchiveId=aid, ChunksSent=0, BytesSent=0, AlreadyArchived=True)
    base, base_id = (None, None) if full else _base(repo, call, snap, source)
    blocks = repo.block_map(base)
    repo.lock_archiving()
    try:
        sent = [0, 0]  # chunks, bytes
        pending: dict[str, bytes] = {}

        def flush():
            if pending:
                lacking = repo.missing(list(pending))
                sent[1] += repo.put_chunks({d: pending[d] for d in lacking})
                sent[0] += len(lacking)
                pending.clear()

        def take(r: int):
            """The stream into the block map and chunks: (its header, bytes read)."""
            read = 0
            with open(r, "rb", buffering=1 << 20, closefd=False) as inp:
                reader = rbddiff.Reader(inp)
                header = reader.header()
                for kind, off, arg in reader.records():
                    if off % BLOCK:
                        raise RepositoryError("the stream's extent at %d is not block-aligned" % off)
                    if kind == "z":
                        for b in range(off // BLOCK, (off + arg) // BLOCK):
                            blocks.set(b, None)
                        continue
                    for i in range(0, len(arg), BLOCK):
                        data = bytes(arg[i : i + BLOCK])
                        if data == ZERO:
                            blocks.set((off + i) // BLOCK, None)
                            continue
                        d = hashlib.sha256(data).hexdigest()
                        blocks.set((off + i) // BLOCK, d)
                        pending[d] = data
                    read += len(arg)
                    if len(pending) >= BATCH:
                        flush()
                    if progress:
                        progress(read, None)
                flush()
            return header, read

        export = {"SnapshotId": sid, "FromSnapshotId": base["SnapshotId"] if base else None}
        try:
            _, (header, read) = piped(lambda w: stream("ExportSnapshotDiff", w, **export), take)
        except rbddiff.StreamError as exc:
            raise RepositoryError("the snapshot's stream broke: %s" % exc) from None
        index = blocks.save()  # after every chunk it names
        aid = new_id("a")
        manifest = {
            "Layout": 1, "SnapshotId": sid, "SnapshotName": snap.get("SnapshotName") or "",
            "SnapshotCreationTime": snap["CreationTime"], "SourceDiskId": snap["SourceDiskId"],
            "SourceDiskSize": snap["SourceDiskSize"], "Source": source, "ArchivedAt": time.time(),
            "BaseArchiveId": base_id, "GroupArchiveId": group, "Index": index, "BlockCount": blocks.count,
            "ImageSize": header.size, "Copy": copy,
            **_disk_spec(call, snap["SourceDiskId"]),
        }
        repo.put_manifest("archive", aid, manifest)
        return dict(manifest, ArchiveId=aid, ChunksSent=sent[0], BytesSent=sent[1], BytesRead=read)
    finally:
        repo.unlock()


def archive_group(repo: Repository, call, stream, group_id: str, source: str, full: bool = False,
                  progress=None) -> dict:
    """Archive every member of a snapshot group, then the group's manifest:
    the group exists in the repository only once all its members do."""
    groups = call("DescribeSnapshotGroups", SnapshotGroupId=[group_id])["SnapshotGroups"]["SnapshotGroup"]
    if not groups:
        raise RepositoryError("snapshot group %s does not exist" % group_id)
    g = groups[0]
    for ident, m in repo.manifests("group").items():
        if m["SnapshotGroupId"] == group_id and m["Source"] == source:
            return dict(m, GroupArchiveId=ident, ChunksSent=0, BytesSent=0, AlreadyArchived=True)
    gid = new_id("ag")
    members = []
    for s in g["Snapshots"]["Snapshot"]:
        members.append(archive_snapshot(repo, call, stream, s["SnapshotId"], source, group=gid, full=full,
                                        progress=progress))
    manifest = {"SnapshotGroupId": group_id, "Name": g.get("Name") or "", "InstanceId": g.get("InstanceId"),
                "Source": source, "ArchivedAt": time.time(), "Archives": [m["ArchiveId"] for m in members]}
    repo.put_manifest("group", gid, manifest)
    return dict(manifest, GroupArchiveId=gid, ChunksSent=sum(m["ChunksSent"] for m in members),
                BytesSent=sum(m["BytesSent"] for m in members))


def _write_archive(repo: Repository, m: dict, name: str, w: int, progress=None) -> None:
    """Write an archive as one full RBD diff stream into fd w."""
    with open(w, "wb", buffering=1 << 20, closefd=False) as out:
        writer = rbddiff.Writer(out, None, name, m["ImageSize"])
        order = list(repo.block_map(m).items())
        done = 0
        for i in range(0, len(order), BATCH):
            batch = order[i : i + BATCH]
            got = repo.get_chunks(sorted({d for _b, d in batch}))
            run_start, run = None, []
            for b, d in batch:
                if run and b != run_start + len(run):
                    writer.data(run_start * BLOCK, b"".join(run))
                    run = []
                if not run:
                    run_start = b
                run.append(got[d])
            if run:
                writer.data(run_start * BLOCK, b"".join(run))
            done += len(batch) * BLOCK
            if progress:
                progress(done, len(order) * BLOCK)
        writer.end()


def restore_archive(repo: Repository, call, stream, aid: str, name: str | None = None, progress=None,
                    snapshot: dict | None = None) -> dict:
    """A new disk holding the archive, with a snapshot of it (named as the
    archived snapshot, else by the archive's id).  snapshot: ImportDiskDiff's
    parameters for that snapshot (a copy from another region keeps its id)."""
    m = repo.manifest("archive", aid)
    params = {"Size": m["SourceDiskSize"], "DiskCategory": m.get("Category") or "cloud_essd",
              "PerformanceLevel": m.get("PerformanceLevel"), "DiskName": name,
              "Description": "restored from archive %s of snapshot %s" % (aid, m["SnapshotId"])}
    disk = call("CreateDisk", **params)["DiskId"]
    try:
        _, res = piped(lambda w: _write_archive(repo, m, m["SnapshotName"] or aid, w, progress),
                       lambda r: stream("ImportDiskDiff", r, DiskId=disk, **(snapshot or {})))
    except BaseException:
        call("DeleteDisk", DiskId=disk)  # the import changed nothing: the disk is empty
        raise
    return {"ArchiveId": aid, "SourceDiskId": m["SourceDiskId"], "DiskId": disk, "SnapshotId": res.get("SnapshotId"),
            "WrittenBytes": res["WrittenBytes"]}


def restore_group(repo: Repository, call, stream, gid: str, progress=None) -> dict:
    """A new disk for every member of a group archive (each with its
    snapshot): the disks hold what the group's disks held at one point."""
    g = repo.manifest("group", gid)
    out = []
    try:
        for aid in g["Archives"]:
            out.append(restore_archive(repo, call, stream, aid, progress=progress))
    except BaseException:
        for done in out:  # all or nothing: a partial group is no crash-consistent copy
            try:
                call("DeleteSnapshot", SnapshotId=done["SnapshotId"], Force=True)
                call("DeleteDisk", DiskId=done["DiskId"])
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise
    return {"GroupArchiveId": gid, "SnapshotGroupId": g["SnapshotGroupId"], "Disks": out}


def delete(repo: Repository, ident: str) -> dict:
    """Delete an archive (or a group archive with its members), then
    reclaim the chunks nothing else names."""
    if ident.startswith("ag-"):
        g = repo.manifest("group", ident)
        repo.delete_manifest("group", ident)
        for aid in g["Archives"]:
            try:
                repo.delete_manifest("archive", aid)
            except RepositoryError:
                pass  # a member a crash left undeleted goes with the next delete
        deleted = [ident] + g["Archives"]
    else:
        m = repo.manifest("archive", ident)
        if m.get("GroupArchiveId") and m["GroupArchiveId"] in repo.manifests("group"):
            raise RepositoryError("archive %s is a member of group archive %s: delete the group" % (ident, m["GroupArchiveId"]))
        repo.delete_manifest("archive", ident)
        deleted = [ident]
    chunks, nbytes = repo.reclaim()
    return {"Deleted": deleted, "ChunksReclaimed": chunks, "BytesReclaimed": nbytes}


def pull(repo: Repository, call, stream, region: str) -> list[dict]:
    """Take in the copies to `region` this repository holds and the pool
    lacks: each is restored into a disk made for it, which is deleted again,
    leaving the snapshot under the copy's id (DescribeSnapshots shows it)."""
    out = []
    for aid, m in sorted(repo.manifests("archive").items(), key=lambda kv: kv[1]["ArchivedAt"]):
        c = m.get("Copy")
        if not c or c["DestinationRegionId"] != region:
            continue
        if call("DescribeSnapshots", SnapshotIds=[c["CopySnapshotId"]])["Snapshots"]["Snapshot"]:
            continue  # taken in already
        params = {"SnapshotId": c["CopySnapshotId"], "SnapshotName": c["SnapshotName"] or None,
                  "Description": c["Description"] or None, "RetentionDays": c["RetentionDays"],
                  "SourceSnapshotId": c["SourceSnapshotId"], "SourceRegionId": c["SourceRegionId"]}
        res = restore_archive(repo, call, stream, aid, snapshot={k: v for k, v in params.items() if v is not None})
        call("DeleteDisk", DiskId=res["DiskId"])
        out.append({"ArchiveId": aid, "SnapshotId": res["SnapshotId"], "SourceRegionId": c["SourceRegionId"]})
    return out
