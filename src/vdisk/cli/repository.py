"""`vdisk repository`: snapshot repositories on Ceph (vdisk.exchange).

Repositories are registered per data directory in DATA_DIR/repositories.json
(mode 0600): name -> the cluster's ceph.conf, the RADOS pool, and the
region it stands for.  The work runs in this process: the snapshot's data
comes from the daemon (or the pool in-process) as an RBD diff stream, and
goes to Ceph through librados.
"""
from __future__ import annotations

import argparse
import json
import os
import re

from ..exchange import archive, registry
from ..exchange.repository import Repository, RepositoryError
from .common import EXIT_OK, EXIT_USAGE, CLIError, _human, _show, _table
from .streams import Progress

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
POOL = re.compile(r"[A-Za-z0-9_.-]{1,63}")


def _registry(app) -> dict:
    return registry.load(app.paths.data_dir)


def _save(app, reg: dict) -> None:
    registry.save(app.paths.data_dir, reg)


def _open(app, name: str) -> Repository:
    reg = _registry(app).get(name)
    if reg is None:
        raise CLIError("no repository named %r here (vdisk repository list; vdisk repository add)" % name)
    try:
        return Repository(reg["CephConf"], reg["Pool"]).open()
    except RepositoryError as exc:
        raise CLIError("repository %s: %s" % (name, exc)) from None


def _source(app) -> str:
    """This pool, as archives name where they came from."""
    return os.path.realpath(app.paths.data_dir)


def _run(app, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except RepositoryError as exc:
        raise CLIError(str(exc)) from None


def cmd_add(app) -> int:
    a = app.args
    if not NAME.fullmatch(a.name):
        raise CLIError("a repository's name is a letter, then up to 63 letters, digits, '_', '.' or '-'", EXIT_USAGE)
    if not POOL.fullmatch(a.pool):
        raise CLIError("a RADOS pool's name here is 1 to 63 letters, digits, '_', '.' or '-'", EXIT_USAGE)
    if not os.path.isdir(app.paths.data_dir):
        raise CLIError("%s is not a vdisk data directory (--data-dir, $VDISK_HOME)" % app.paths.data_dir, EXIT_USAGE)
    reg = _registry(app)
    if a.name in reg:
        raise CLIError("a repository named %r is registered already (%s, pool %s)" % (a.name, reg[a.name]["CephConf"],
                                                                                     reg[a.name]["Pool"]))
    try:
        conf = os.path.realpath(a.ceph_conf)
        is_file = os.path.isfile(conf)
    except ValueError:  # a NUL, or bytes that are no file name
        is_file = False
    if not is_file:
        raise CLIError("%r is not a file: give the cluster's ceph.conf" % a.ceph_conf, EXIT_USAGE)
    try:
        Repository(conf, a.pool).open(create=True).close()
    except RepositoryError as exc:
        raise CLIError(str(exc)) from None
    reg[a.name] = {"CephConf": conf, "Pool": a.pool, "Region": a.region or ""}
    _save(app, reg)
    res = {"Name": a.name, **reg[a.name]}
    app.out(res, _show(res))
    return EXIT_OK


def cmd_list(app) -> int:
    reg = _registry(app)
    rows = [{"Name": n, **r} for n, r in sorted(reg.items())]
    app.out({"Repositories": rows}, _table(rows, [("NAME", "Name"), ("POOL", "Pool"), ("REGION", "Region"),
                                                   ("CEPH CONF", "CephConf")]) or "no repositories")
    return EXIT_OK


def _with_progress(app, name: str, what: str, fn):
    """fn(repository, progress) on repository name, with progress shown on
    a terminal; a RepositoryError becomes the command's error."""
    progress = Progress(what, None)
    with _open(app, name) as repo:
        ok = False
        try:
            res = _run(app, fn, repo, progress)
            ok = True
        finally:
            progress.end(ok)
    return res


COPY_FIELDS = ("CopySnapshotId", "SourceSnapshotId", "SourceRegionId", "DestinationRegionId", "SnapshotName",
               "Description")


def _copy_record(text: str) -> dict:
    """--copy (the daemon's, for a CopySnapshot to another region): the
    copy's record as JSON, with the fields a pull reads."""
    try:
        rec = json.loads(text)
    except (ValueError, RecursionError):
        rec = None
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in COPY_FIELDS) \
            or not isinstance(rec.get("RetentionDays"), (int, type(None))):
        raise CLIError("--copy takes a copy's record as the daemon writes it (JSON with %s and RetentionDays)"
                       % ", ".join(COPY_FIELDS), EXIT_USAGE)
    return rec


def cmd_archive(app) -> int:
    a = app.args
    group = a.snapshot.startswith("ssg-")
    copy = _copy_record(a.copy) if a.copy is not None else None

    def run(repo, progress):
        if group:
            return archive.archive_group(repo, app.call, app.stream, a.snapshot, _source(app), a.full, progress)
        return archive.archive_snapshot(repo, app.call, app.stream, a.snapshot, _source(app), full=a.full,
                                        progress=progress, copy=copy)

    res = _with_progress(app, a.repository, "Archiving %s" % a.snapshot, run)
    res.pop("Index", None)
    ident = res["GroupArchiveId"] if group else res["ArchiveId"]
    app.out(res, "%s: %s sent in %d chunk(s)%s" % (ident, _human(res["BytesSent"]), res["ChunksSent"],
                                                   " (already archived)" if res.get("AlreadyArchived") else ""))
    return EXIT_OK


def cmd_archives(app) -> int:
    with _open(app, app.args.repository) as repo:
        arch = repo.manifests("archive")
        groups = repo.manifests("group")
    rows = [{"ArchiveId": aid, "SnapshotId": m["SnapshotId"], "SnapshotName": m["SnapshotName"],
             "DiskId": m["SourceDiskId"], "Size": m["SourceDiskSize"], "Blocks": m["BlockCount"],
             "Group": m.get("GroupArchiveId") or "", "Base": m.get("BaseArchiveId") or ""}
            for aid, m in sorted(arch.items(), key=lambda kv: kv[1]["ArchivedAt"])]
    grows = [{"GroupArchiveId": gid, "SnapshotGroupId": g["SnapshotGroupId"], "Archives": g["Archives"]}
             for gid, g in sorted(groups.items(), key=lambda kv: kv[1]["ArchivedAt"])]
    human = _table(rows, [("ARCHIVE", "ArchiveId"), ("SNAPSHOT", "SnapshotId"), ("NAME", "SnapshotName"),
                          ("DISK", "DiskId"), ("GIB", "Size"), ("BLOCKS", "Blocks"), ("GROUP", "Group"),
                          ("BASE", "Base")]) or "no archives"
    if grows:
        human += "\n\n" + _table(grows, [("GROUP ARCHIVE", "GroupArchiveId"), ("SNAPSHOT GROUP", "SnapshotGroupId"),
                                         ("ARCHIVES", "Archives")])
    app.out({"Archives": rows, "GroupArchives": grows}, human)
    return EXIT_OK


def cmd_restore(app) -> int:
    a = app.args

    def run(repo, progress):
        if a.archive.startswith("ag-"):
            return archive.restore_group(repo, app.call, app.stream, a.archive, progress)
        return archive.restore_archive(repo, app.call, app.stream, a.archive, a.name, progress)

    res = _with_progress(app, a.repository, "Restoring %s" % a.archive, run)
    disks = res["Disks"] if "Disks" in res else [res]
    app.out(res, "\n".join("%s  %s  snapshot %s" % (d["ArchiveId"], d["DiskId"], d["SnapshotId"]) for d in disks))
    return EXIT_OK


def cmd_pull(app) -> int:
    """Take in the copies other regions sent to this pool's region."""
    region = app.call("DescribePool")["Pool"]["RegionId"]
    with _open(app, app.args.repository) as repo:
        got = _run(app, archive.pull, repo, app.call, app.stream, region)
    app.out({"RegionId": region, "Copies": got}, "\n".join("%s from %s (%s)" % (c["SnapshotId"], c["SourceRegionId"],
                                                                              c["ArchiveId"]) for c in got)
            or "no new copies for %s" % region)
    return EXIT_OK


def cmd_delete(app) -> int:
    with _open(app, app.args.repository) as repo:
        res = _run(app, archive.delete, repo, app.args.archive)
    app.out(res, "deleted %s; %d chunk(s) reclaimed (%s)" % (", ".join(res["Deleted"]), res["ChunksReclaimed"],
                                                              _human(res["BytesReclaimed"])))
    return EXIT_OK


def cmd_check(app) -> int:
    progress = Progress("Checking chunks", None)
    with _open(app, app.args.repository) as repo:
        problems, counts = _run(app, repo.check, not app.args.no_verify_data, progress)
    progress.end(not problems)
    res = {**counts, "Problems": problems}
    app.out(res, "\n".join(problems + ["%d archive(s), %d group(s), %d chunk(s)%s: %s" % (
        counts["Archives"], counts["Groups"], counts["Chunks"],
        ", every chunk read and verified" if counts["ChunksVerified"] else "",
        "%d problem(s)" % len(problems) if problems else "no problem")]))
    return 1 if problems else EXIT_OK


def add_commands(group, verb) -> None:
    g = group("repository", "snapshot repositories on Ceph: archive snapshots off the host, restore them anywhere")
    v = verb(g, "add", cmd_add, "register a Ceph cluster's RADOS pool as a repository (created when new)")
    v.add_argument("name", metavar="NAME")
    v.add_argument("--ceph-conf", required=True, metavar="FILE", help="the cluster's ceph.conf (with its keyring)")
    v.add_argument("--pool", default="vdisk-snapshots", help="the RADOS pool (default vdisk-snapshots)")
    v.add_argument("--region", help="the cloud region this repository stands for")
    verb(g, "list", cmd_list, "list the repositories registered here")
    v = verb(g, "archive", cmd_archive, "archive a snapshot, or a snapshot group as one unit; only the chunks the "
             "repository lacks are sent; run again to resume")
    v.add_argument("repository", metavar="NAME")
    v.add_argument("snapshot", metavar="SNAPSHOT_ID|SNAPSHOT_GROUP_ID")
    v.add_argument("--full", action="store_true", help="read the whole snapshot, not only the change since the "
                   "disk's last archived snapshot")
    v.add_argument("--copy", metavar="JSON", help=argparse.SUPPRESS)  # the daemon's: a CopySnapshot to another region
    v = verb(g, "pull", cmd_pull, "take in the snapshots other regions copied to this pool's region (CopySnapshot "
             "with DestinationRegionId); the daemon does it every few seconds")
    v.add_argument("repository", metavar="NAME")
    v = verb(g, "archives", cmd_archives, "list a repository's archives and group archives")
    v.add_argument("repository", metavar="NAME")
    v = verb(g, "restore", cmd_restore, "restore an archive (or a group archive) as new disks with their snapshots")
    v.add_argument("repository", metavar="NAME")
    v.add_argument("archive", metavar="ARCHIVE_ID|GROUP_ARCHIVE_ID")
    v.add_argument("--name", help="the new disk's name")
    v = verb(g, "delete", cmd_delete, "delete an archive (a group archive with its members) and reclaim the chunks "
             "nothing else uses")
    v.add_argument("repository", metavar="NAME")
    v.add_argument("archive", metavar="ARCHIVE_ID|GROUP_ARCHIVE_ID")
    v = verb(g, "check", cmd_check, "check that every archive's chunks are there and (by default) that every chunk "
             "matches its checksum; exit 1 on a problem")
    v.add_argument("repository", metavar="NAME")
    v.add_argument("--no-verify-data", action="store_true", help="only that the chunks exist")
