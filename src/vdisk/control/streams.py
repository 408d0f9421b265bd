"""Snapshots as Ceph RBD diff streams, both ways (vdisk extensions).

ExportSnapshotDiff writes a snapshot, or its change since an older snapshot
of the same disk, as an `rbd diff v1` stream (vdisk.exchange.rbddiff): the
extents come from the block map alone (Pool.changed_extents), blocks that
read as zeros become zero records, and only changed blocks are read.

ImportDiskDiff applies such a stream to a disk and takes the snapshot the
stream ends at, as `rbd import-diff` does: the disk must have the stream's
starting snapshot (by SnapshotName, or SnapshotId), must not have one named
like its end snapshot, and must be as large as the stream's image.  Unlike
rbd, an import is all or nothing: a hidden engine snapshot taken first is
what the disk goes back to when the stream breaks a rule or ends short,
and what a daemon started after a crash in the middle goes back to
(recover_imports).

Both take a byte stream, so they are not actions of Controller.handle: the
daemon runs them for its control socket with the client's file descriptor
(daemon/server.py), and the CLI runs them in-process when no daemon runs.
The functions here are synchronous and do one step of pool work per call,
so the daemon can interleave them with FUSE requests.

A mixin of Controller.
"""
from __future__ import annotations

import logging
import re

from ..engine.pool import BLOCK_SIZE
from ..exchange import rbddiff
from .errors import CloudError
from .validate import Params, check_id, check_name

log = logging.getLogger(__name__)

GIB = 1 << 30
# one 'w' record covers at most this many bytes of consecutive changed blocks,
# read from the pool in one call
EXTENT_MAX = 1 << 20
STREAM_ACTIONS = ("ExportSnapshotDiff", "ImportDiskDiff")
SOURCE = re.compile(r"[A-Za-z0-9-]{1,64}")


def stream_error(exc: Exception) -> CloudError:
    """A stream that breaks the format's rules (rbddiff.StreamError), or
    cannot be read (OSError: a directory given, a pipe gone), as the
    cloud's error."""
    if isinstance(exc, OSError):
        return CloudError("InvalidParameter.DiffStream", "Reading the stream failed: %s." % (exc.strerror or exc))
    return CloudError("InvalidParameter.DiffStream", "The RBD diff stream is invalid: %s." % exc)


class Export:
    """An export planned by Controller.export_diff: header (rbddiff.Header)
    and records(), which yields ("w", offset, data) and ("z", offset,
    length), reading each data extent from the pool when asked for it."""

    def __init__(self, pool, sid: int, header: rbddiff.Header, extents: list[tuple[int, bool]]):
        self.pool = pool
        self.sid = sid
        self.header = header
        self.extents = extents
        self.data_bytes = sum(BLOCK_SIZE for _b, zero in extents if not zero)

    def records(self):
        runs = []  # (first block, count, zero): consecutive blocks of one kind
        for block, zero in self.extents:
            if runs and runs[-1][2] == zero and runs[-1][0] + runs[-1][1] == block \
                    and (zero or (runs[-1][1] + 1) * BLOCK_SIZE <= EXTENT_MAX):
                runs[-1][1] += 1
            else:
                runs.append([block, 1, zero])
        for first, count, zero in runs:
            off = first * BLOCK_SIZE
            if zero:
                yield ("z", off, count * BLOCK_SIZE)
            else:
                yield ("w", off, self.pool.read_snapshot(self.sid, off, count * BLOCK_SIZE))


class Import:
    """An import begun by Controller.import_diff: apply() each record of
    the stream, then finish() (the answer), or abort() when anything went
    wrong (the disk goes back to what it held before)."""

    def __init__(self, ctl, disk: dict, name: str | None, tmp: int, snap: dict):
        self.ctl = ctl
        self.disk = disk
        self.name = name
        self.tmp = tmp
        self.snap = snap  # the end snapshot's record fields given with the request (a copy's)
        self.written = 0
        self.zeroed = 0

    def apply(self, rec) -> None:
        kind, off, arg = rec
        vid = self.disk["_volume"]
        if kind == "w":
            self.ctl.pool.write(vid, off, arg)
            self.written += len(arg)
        else:
            self.ctl.pool.discard(vid, off, arg)
            self.zeroed += arg

    def finish(self) -> dict:
        ctl = self.ctl
        ctl.importing.pop(self.disk["DiskId"], None)
        out = {"DiskId": self.disk["DiskId"], "WrittenBytes": self.written, "ZeroedBytes": self.zeroed}
        if self.name is not None:
            snap = ctl._snapshot_record(self.disk, self.name, "imported from an RBD diff stream", False, None,
                                        self.snap.get("RetentionDays"))
            snap.update({k: v for k, v in self.snap.items() if v is not None})

            def change(tx, sids):
                snap["_snap"] = sids[0]
                ctl._put("snapshot", snap)
                ctl.pool.put_record("import/" + self.disk["DiskId"], {"_tmp": self.tmp, "_volume": self.disk["_volume"],
                                                                     "Done": True})

            try:
                ctl.pool.snapshot([self.disk["_volume"]], change)
            except BaseException:
                self.abort()
                raise
            ctl._begin_progress([snap])
            out["SnapshotId"] = snap["SnapshotId"]
        _drop_hidden(ctl, self.disk["DiskId"], self.tmp)
        return out

    def abort(self) -> None:
        self.ctl.importing.pop(self.disk["DiskId"], None)
        _undo(self.ctl, self.disk["DiskId"], self.disk["_volume"], self.tmp)

    def fail(self, exc: BaseException) -> BaseException:
        """abort() after exc; what to raise: a broken stream as the
        cloud's error, anything else as it is."""
        self.abort()
        return stream_error(exc) if isinstance(exc, (rbddiff.StreamError, OSError)) else exc


def _drop_hidden(ctl, disk_id: str, tmp: int) -> None:
    ctl.pool.delete_snapshots([tmp], change=lambda tx: ctl.pool.put_record("import/" + disk_id, None))


def _undo(ctl, disk_id: str, vid: int, tmp: int) -> None:
    ctl.pool.rollback_many([(vid, tmp)])
    _drop_hidden(ctl, disk_id, tmp)


def _stream_name(snap: dict) -> str:
    """A snapshot's name in a stream: its SnapshotName, else its id."""
    return snap.get("SnapshotName") or snap["SnapshotId"]


class StreamActions:
    def export_diff(self, req: dict) -> Export:
        """Plan ExportSnapshotDiff (SnapshotId, optional FromSnapshotId);
        raises CloudError.  Commits first (the map is what is read)."""
        p = Params(req)
        snap = self._snapshot(p)
        base = self._snapshot(p, "FromSnapshotId") if p.str("FromSnapshotId") else None
        self._usable(snap, "export it")
        if base is not None:
            if base["SourceDiskId"] != snap["SourceDiskId"]:
                raise CloudError(
                    "InvalidParameter.SnapshotsOfDifferentDisks",
                    "FromSnapshotId %s and SnapshotId %s come from different disks." % (base["SnapshotId"], snap["SnapshotId"]),
                )
            if base["_snap"] == snap["_snap"] or base["CreationTime"] > snap["CreationTime"]:
                raise CloudError(
                    "InvalidParameter.FromSnapshotId",
                    "FromSnapshotId %s must be an older snapshot of the same disk than SnapshotId %s." % (base["SnapshotId"], snap["SnapshotId"]),
                )
        extents = self.pool.changed_extents(base["_snap"] if base else None, snap["_snap"])
        header = rbddiff.Header(_stream_name(base) if base else None, _stream_name(snap), snap["SourceDiskSize"] * GIB)
        return Export(self.pool, snap["_snap"], header, extents)

    def import_diff(self, req: dict, header: rbddiff.Header) -> Import:
        """Begin ImportDiskDiff (DiskId, optional SnapshotName to use instead
        of the stream's end snapshot name) once the stream's header is read:
        every rule is checked, then the hidden snapshot is taken."""
        p = Params(req)
        disk = self._disk(p)
        if disk["InstanceId"]:
            inst = self._get("instance", disk["InstanceId"])
            if inst["Status"] != "Stopped":
                from .controller import _instance_status

                raise _instance_status(inst, "import into its disks", "Stopped")
        size = disk["Size"] * GIB
        if header.size is not None and header.size != size:
            raise CloudError(
                "InvalidParameter.DiffStream",
                "The stream's image is %d bytes and disk %s is %d GiB (%d bytes): %s" % (
                    header.size, disk["DiskId"], disk["Size"], size,
                    "resize the disk first (vdisk disk resize)" if header.size > size and header.size % GIB == 0
                    else "a disk is a whole number of GiB and never shrinks, so the stream cannot be applied to it"),
            )
        mine = [s for s in self._all("snapshot") if s["SourceDiskId"] == disk["DiskId"]]
        if header.from_snap is not None:
            starts = [s for s in mine if header.from_snap in (s["SnapshotId"], s.get("SnapshotName"))]
            if not starts:
                raise CloudError(
                    "InvalidSnapshotId.NotFound",
                    "The stream starts at snapshot %r, and disk %s has no snapshot of that name or id: apply the "
                    "stream that ends there first." % (header.from_snap, disk["DiskId"]), 404)
            if len(starts) > 1:
                raise CloudError(
                    "InvalidParameter.DiffStream",
                    "The stream starts at snapshot %r, and disk %s has %d snapshots of that name (%s): rename all but "
                    "one (vdisk snapshot modify)." % (header.from_snap, disk["DiskId"], len(starts),
                                                      ", ".join(s["SnapshotId"] for s in starts)))
        name = p.name("SnapshotName")
        # a copy from another region (exchange.archive.pull) keeps its id and what it was copied from
        snap = {"SnapshotId": check_id("s", p.str("SnapshotId"), "SnapshotId") if p.str("SnapshotId") else None,
                "Description": p.description(), "RetentionDays": p.int("RetentionDays", lo=1, hi=65536),
                "SourceSnapshotId": p.str("SourceSnapshotId"), "SourceRegionId": p.str("SourceRegionId")}
        if snap["SnapshotId"] and self.pool.get_record("snapshot/" + snap["SnapshotId"]) is not None:
            raise CloudError("InvalidParameter.SnapshotIdExists", "Snapshot %s exists already." % snap["SnapshotId"])
        for k in ("SourceSnapshotId", "SourceRegionId"):
            if snap[k] is not None and not SOURCE.fullmatch(snap[k]):
                raise CloudError("InvalidParameter", "The parameter %s is invalid: an id of letters, digits and '-'" % k)
        if name is None and header.to_snap is not None:
            try:
                name = check_name(header.to_snap, "SnapshotName")
            except CloudError as exc:
                raise CloudError(exc.code, "%s The stream's end snapshot %r cannot be the snapshot's name: give "
                                 "another with SnapshotName." % (exc.message, header.to_snap)) from None
        if name is not None:
            if any(s.get("SnapshotName") == name for s in mine):
                raise CloudError(
                    "InvalidParameter.SnapshotNameExists",
                    "Disk %s already has a snapshot named %r, the stream's end snapshot." % (disk["DiskId"], name))
            self._check_can_snapshot(disk)
        if disk["DiskId"] in self.importing or self.pool.get_record("import/" + disk["DiskId"]) is not None:
            raise CloudError("IncorrectDiskStatus", "Disk %s is being imported into already." % disk["DiskId"], 403)
        rec = {"_volume": disk["_volume"]}

        def change(tx, sids):
            rec["_tmp"] = sids[0]
            self.pool.put_record("import/" + disk["DiskId"], rec)

        self.pool.snapshot([disk["_volume"]], change)
        self.importing[disk["DiskId"]] = disk["InstanceId"] or ""
        return Import(self, disk, name, rec["_tmp"], snap)

    def check_not_importing(self, action: str, req: dict) -> None:
        """While an import runs, refuse every action but a read that names
        the disk or its instance (a snapshot, reset, attach or start of a
        disk half imported would see or change what the import may undo)."""
        if not self.importing or action.startswith(("Describe", "List", "Get")):
            return
        named = set()
        for v in req.values():
            if isinstance(v, str):
                named.add(v)
            elif isinstance(v, list):
                named.update(x for x in v if isinstance(x, str))
            if isinstance(v, str) and v.startswith("["):  # DiskIds as a JSON list
                named.update(x.strip(' "') for x in v.strip("[]").split(","))
        for disk_id, inst in self.importing.items():
            if disk_id in named or (inst and inst in named):
                raise CloudError("IncorrectDiskStatus",
                                 "An import into disk %s is in progress (vdisk disk import-diff); try again when it "
                                 "ends." % disk_id, 403)

    def snapshot_files(self) -> dict[str, int]:
        """What the mount's .snapshot directory shows: SnapshotId -> the
        engine's snapshot (a read-only file of the snapshot's image)."""
        return {s["SnapshotId"]: s["_snap"] for s in self._all("snapshot")}

    def recover_imports(self) -> None:
        """Imports a crash left in the middle go back to where they began;
        those that had taken their snapshot only lose their hidden one."""
        for key, rec in self.pool.records("import/").items():
            disk_id = key.split("/", 1)[1]
            log.warning("an import into disk %s was interrupted: %s", disk_id,
                        "dropping its hidden snapshot" if rec.get("Done") else "the disk goes back to before it")
            if rec.get("Done"):
                _drop_hidden(self, disk_id, rec["_tmp"])
            else:
                _undo(self, disk_id, rec["_volume"], rec["_tmp"])


# ---------------------------------------------------------------- in one thread
# The drivers for a process that owns the pool and may block on the stream:
# the CLI without a daemon, and tests.  The daemon has its own
# (vdisk.daemon.streams), which does the same steps between FUSE requests.


def run_stream(ctl, req: dict, fileobj, progress=None) -> dict:
    """Run a stream action with a binary file object (written for an export,
    read for an import); the answer, an error's included.  progress(done,
    total) after each record of an export."""
    try:
        if req.get("Action") == "ExportSnapshotDiff":
            return export_to(ctl.export_diff(req), fileobj.write, progress)
        reader = rbddiff.Reader(fileobj)
        imp = ctl.import_diff(req, read_header(reader))
        try:
            for rec in reader.records():
                imp.apply(rec)
        except BaseException as exc:
            raise imp.fail(exc) from None
        return imp.finish()
    except Exception as exc:  # noqa: BLE001 - answered, as handle() does
        return ctl.error_answer(exc, req)


def read_header(reader: rbddiff.Reader) -> rbddiff.Header:
    try:
        return reader.header()
    except (rbddiff.StreamError, OSError) as exc:
        raise stream_error(exc) from None


def export_to(plan: Export, write, progress=None) -> dict:
    w = rbddiff.Writer(_Sink(write), plan.header.from_snap, plan.header.to_snap, plan.header.size)
    done = 0
    for rec in plan.records():
        w.put(rec)
        if rec[0] == "w":
            done += len(rec[2])
        if progress is not None:
            progress(done, plan.data_bytes)
    w.end()
    return export_answer(plan, w)


def export_answer(plan: Export, w: rbddiff.Writer) -> dict:
    return {"FromSnapshot": plan.header.from_snap, "ToSnapshot": plan.header.to_snap, "ImageSize": plan.header.size,
            "StreamBytes": w.bytes, "DataBytes": plan.data_bytes,
            "ZeroBytes": sum(BLOCK_SIZE for _b, zero in plan.extents if zero)}


class _Sink:
    __slots__ = ("write",)

    def __init__(self, write):
        self.write = write
