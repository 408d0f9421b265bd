"""Instance snapshots (the cloud's snapshot groups) and multi-disk reset.

A snapshot group covers chosen disks of one instance at one point in time:
the engine snapshots all their volumes in one durable transaction, run in
the daemon's single thread between two FUSE requests, so every write that
completed before the request is in every member and none that had not been
started is (see docs/consistency.md).  The records and rules follow
CreateSnapshotGroup / DescribeSnapshotGroups / ModifySnapshotGroup /
DeleteSnapshotGroup / ResetDisks of Alibaba ECS.

A mixin of Controller: uses its record helpers (_get, _put, _all, ...).
"""
from __future__ import annotations

import os
import time

from ..engine.errors import EngineError
from .clock import iso
from .errors import CloudError, invalid
from .validate import CLIENT_TOKEN, Params, check_id, new_id

GIB = 1 << 30
# Disks per snapshot group: 16, the live API's limit (the seed document says
# 10, the limit when it was written).  $VDISK_MAX_GROUP_DISKS (or the
# Controller setting max_group_disks) sets another, 10 for the older rule.
MAX_GROUP_DISKS = 16
MAX_GROUP_BYTES = 32 * 1024 * GIB


class SnapshotGroupActions:
    def _group(self, p: Params, name: str = "SnapshotGroupId") -> dict:
        gid = check_id("ssg", p.str(name, required=True), name)
        rec = self.pool.get_record("snapshotgroup/" + gid)
        if rec is None:
            raise CloudError("InvalidSnapshotGroupId.NotFound", "The specified snapshot group %s does not exist." % gid, 404)
        return rec

    def _group_disks(self, p: Params, inst: dict) -> list[dict]:
        """The disks a CreateSnapshotGroup request covers, validated."""
        include = p.list("DiskId")
        exclude = p.list("ExcludeDiskId")
        if include and exclude:
            raise CloudError(
                "InvalidParameter.Conflict",
                "DiskId and ExcludeDiskId cannot be used together: list the disks to include or those to exclude.",
            )
        attached = {d["DiskId"]: d for d in self._instance_disks(inst["InstanceId"])}
        for i, did in enumerate(include + exclude, 1):
            check_id("d", did, "DiskId.%d" % i)
        for did in include:
            if did not in attached:
                self._get("disk", did)  # NotFound if it does not exist at all
                raise CloudError(
                    "InvalidDiskId.NotInUseByInstance",
                    "Disk %s is not attached to (In_use by) instance %s; a snapshot group covers only "
                    "that instance's disks." % (did, inst["InstanceId"]),
                    403,
                )
        if len(set(include)) != len(include):
            raise invalid("DiskId", "a disk is listed twice")
        chosen = [attached[d] for d in include] if include else [d for k, d in attached.items() if k not in exclude]
        if not chosen:
            raise CloudError("InvalidParameter.NoDisk", "The snapshot group would cover no disk of instance %s." % inst["InstanceId"])
        limit = int(self.settings.get("max_group_disks") or os.environ.get("VDISK_MAX_GROUP_DISKS") or MAX_GROUP_DISKS)
        if len(chosen) > limit:
            raise CloudError(
                "QuotaExceed.SnapshotGroupDisks",
                "A snapshot group covers at most %d disks; %d were chosen. Exclude some with ExcludeDiskId."
                % (limit, len(chosen)),
                403,
            )
        total = sum(d["Size"] for d in chosen) * GIB
        if total > MAX_GROUP_BYTES:
            raise CloudError(
                "QuotaExceed.SnapshotGroupSize",
                "A snapshot group covers at most 32 TiB of disks; the chosen disks add up to %d GiB." % (total // GIB),
                403,
            )
        for d in chosen:
            if d["Category"] != "cloud_essd":
                raise CloudError(
                    "InvalidDiskCategory.NotSupported",
                    "Disk %s is %s; snapshot groups cover only ESSDs (cloud_essd)." % (d["DiskId"], d["Category"]),
                    403,
                )
            self._check_can_snapshot(d)
        return chosen

    def do_CreateSnapshotGroup(self, p: Params) -> dict:
        inst = self._instance(p)
        token = p.str("ClientToken")
        if token is not None:
            if not CLIENT_TOKEN.fullmatch(token):
                raise invalid("ClientToken", "at most 64 printable ASCII characters")
            prior = self.pool.get_record("clienttoken/CreateSnapshotGroup/" + token)
            if prior is not None:
                if prior["InstanceId"] != inst["InstanceId"]:
                    raise CloudError(
                        "IdempotentParameterMismatch",
                        "ClientToken %r was already used for a request with other parameters." % token,
                        409,
                    )
                return {"SnapshotGroupId": prior["SnapshotGroupId"]}
        if inst["Status"] not in ("Running", "Stopped"):
            raise CloudError(
                "IncorrectInstanceStatus",
                "Instance %s is %s; a snapshot group needs it Running or Stopped." % (inst["InstanceId"], inst["Status"]),
                403,
            )
        name = p.name("Name")
        desc = p.description()
        instant = p.bool("InstantAccess")
        days = p.int("InstantAccessRetentionDays", lo=1, hi=65535)
        retention = p.int("RetentionDays", lo=1, hi=65536)  # vdisk's own: the group expires as a whole
        tags = self._tags_given(p)
        disks = self._group_disks(p, inst)
        gid = self._take_group(inst, disks, name, desc, instant, days, retention, tags=tags, token=token)
        return {"SnapshotGroupId": gid}

    def _take_group(self, inst: dict, disks: list[dict], name, description, instant: bool, days, retention,
                    auto: str | None = None, tags: dict | None = None, token: str | None = None) -> str:
        """Snapshot disks of inst as one group, in one durable transaction;
        its id.  auto: the policy that takes it (automatic snapshots)."""
        now = self.clock.now()
        group = {
            "SnapshotGroupId": new_id("ssg"),
            "Name": name or "",
            "Description": description or "",
            "InstanceId": inst["InstanceId"],
            "Status": "accomplished",
            "ProgressStatus": "100%",
            "CreationTime": iso(now),
            "InstantAccess": instant,
            "InstantAccessRetentionDays": days if instant else None,
            "RetentionDays": retention,
            "Members": [],
            "_t": now,
            "_ns": time.time_ns(),  # creation order within one second
            "_tags": tags or {},
        }
        if auto:
            group["AutoSnapshotPolicyId"] = auto
        snaps = [self._snapshot_record(d, name, description, instant, days, retention,
                                       group_id=group["SnapshotGroupId"], auto=auto) for d in disks]
        group["Members"] = [s["SnapshotId"] for s in snaps]

        def change(tx, sids):
            for s, sid in zip(snaps, sids):
                s["_snap"] = sid
                self._put("snapshot", s)
            self.pool.put_record("snapshotgroup/" + group["SnapshotGroupId"], group)
            if token is not None:
                self.pool.put_record(
                    "clienttoken/CreateSnapshotGroup/" + token,
                    {"SnapshotGroupId": group["SnapshotGroupId"], "InstanceId": inst["InstanceId"]},
                )

        try:
            self.pool.snapshot([d["_volume"] for d in disks], change)
        except EngineError as exc:
            # Nothing of the group was written (one transaction); record why.
            self.pool.drop_staged_records()
            group.update(Status="failed", ProgressStatus="0%", Members=[], FailReason=str(exc))
            # kept: shown at once and retried by every commit until one
            # succeeds (on a full filesystem this one fails too)
            self.pool.put_record("snapshotgroup/" + group["SnapshotGroupId"], group, keep=True)
            try:
                self.pool.commit_meta()
            except EngineError:
                pass
            raise CloudError(
                "SnapshotGroup.Failed",
                "Snapshot group %s failed and holds no snapshot: %s" % (group["SnapshotGroupId"], exc),
                500,
            ) from None
        self._begin_progress(snaps)
        if any(s["Status"] == "progressing" for s in snaps):
            group.update(Status="progressing", ProgressStatus="0%")
            self.pool.put_record("snapshotgroup/" + group["SnapshotGroupId"], group)
            self.pool.commit_meta()
        return group["SnapshotGroupId"]

    def _group_public(self, g: dict) -> dict:
        out = {"ResourceGroupId": "", "Tags": self._tags_public(g, "Key", "Value"),
               **{k: v for k, v in g.items() if k != "Members" and not k.startswith("_")}}
        members = []
        uses = self._snapshot_uses()
        for sid in g["Members"]:
            s = self.pool.get_record("snapshot/" + sid)
            if s is not None:
                members.append(self._snapshot_public(s, uses))
        out["Snapshots"] = {"Snapshot": members}
        out["Status"], out["ProgressStatus"] = self._group_progress(g)
        return out

    def _group_progress(self, g: dict, now: float | None = None) -> tuple[str, str]:
        """Status and ProgressStatus of a group at now (default: the clock's):
        while progressing, its members' (done when all are, the mean of
        their percentages)."""
        if g["Status"] != "progressing":
            return g["Status"], g["ProgressStatus"]
        now = self.clock.now() if now is None else now
        views = [self._progress_view(s, now) for s in
                 (self.pool.get_record("snapshot/" + sid) for sid in g["Members"]) if s is not None]
        if all(v["Status"] == "accomplished" for v in views):
            return "accomplished", "100%"
        return "progressing", "%d%%" % (sum(int(v["Progress"].rstrip("%")) for v in views) // len(views))

    def do_DescribeSnapshotGroups(self, p: Params) -> dict:
        inst = p.str("InstanceId")
        name = p.str("Name")
        ids = p.list("SnapshotGroupId")
        statuses = p.list("Status")
        tagged = self._tag_filter(p)
        for st in statuses:
            if st not in ("progressing", "accomplished", "failed"):
                raise CloudError("InvalidStatus.ValueNotSupported", "Status %r is not one of progressing, accomplished, failed." % st)
        out = []
        for g in sorted(self._all("snapshotgroup"), key=lambda g: (g.get("_ns", 0), g["SnapshotGroupId"])):
            if inst and g["InstanceId"] != inst:
                continue
            if name and g["Name"] != name:
                continue
            if ids and g["SnapshotGroupId"] not in ids:
                continue
            if not tagged(g):
                continue
            if statuses and self._group_progress(g)[0] not in statuses:
                continue
            out.append(g)
        res = self._page(p, out, "SnapshotGroups", "SnapshotGroup", default_max=10)
        res["SnapshotGroups"]["SnapshotGroup"] = [self._group_public(g) for g in res["SnapshotGroups"]["SnapshotGroup"]]
        return res

    def do_ModifySnapshotGroup(self, p: Params) -> dict:
        g = self._group(p)
        p.rename(g, "Name")
        self.pool.put_record("snapshotgroup/" + g["SnapshotGroupId"], g)
        self.pool.commit_meta()
        return {}

    def do_DeleteSnapshotGroup(self, p: Params) -> dict:
        g = self._group(p)
        results, keep, doomed = [], [], []
        for sid in g["Members"]:
            s = self.pool.get_record("snapshot/" + sid)
            if s is None:
                continue
            images = self._images_using(sid)
            disks = [d["DiskId"] for d in self._all("disk") if d.get("SourceSnapshotId") == sid]
            if images or disks:
                # as DeleteSnapshot refuses them (it takes Force for disks;
                # DeleteSnapshotGroup has no Force): kept, and said why
                keep.append(sid)
                results.append(_progress(
                    "Failed", {"SnapshotId": sid}, "SnapshotCreatedImage" if images else "SnapshotCreatedDisk",
                    "Snapshot %s was used to create %s; %s." % (
                        sid, "image(s) %s" % ", ".join(images) if images else "disk(s) %s" % ", ".join(disks),
                        "delete the image(s) first" if images else
                        "delete it with DeleteSnapshot Force=true if you mean it (the disks keep their data)")))
                continue
            doomed.append(s)
            results.append(_progress("Success", {"SnapshotId": sid}))
        def records(tx):  # in the deletion's transaction: both or neither
            for s in doomed:
                self._delete("snapshot", s["SnapshotId"])
            if keep:
                g["Members"] = keep
                self.pool.put_record("snapshotgroup/" + g["SnapshotGroupId"], g)
            else:
                self.pool.put_record("snapshotgroup/" + g["SnapshotGroupId"], None)

        self.pool.delete_snapshots([s["_snap"] for s in doomed], change=records)
        return {"OperationProgressSet": {"OperationProgress": results}}

    def do_ResetDisks(self, p: Params) -> dict:
        pairs = p.struct_list("Disk", ("DiskId", "SnapshotId"))
        if not pairs:
            raise CloudError("MissingParameter", "ResetDisks needs Disk.N.DiskId and Disk.N.SnapshotId.")
        work = []
        seen = set()
        for i, pair in enumerate(pairs, 1):
            did = check_id("d", pair.get("DiskId"), "Disk.%d.DiskId" % i)
            sid = check_id("s", pair.get("SnapshotId"), "Disk.%d.SnapshotId" % i)
            if did in seen:
                raise invalid("Disk.%d.DiskId" % i, "disk %s is listed twice" % did)
            seen.add(did)
            disk, snap = self._get("disk", did), self._get("snapshot", sid)
            self._check_reset(disk, snap)
            work.append((disk, snap))
        self._dry_run(p)
        self.pool.rollback_many([(d["_volume"], s["_snap"]) for d, s in work])
        return {"OperationProgressSet": {"OperationProgress": [
            _progress("Success", {"DiskId": d["DiskId"], "SnapshotId": s["SnapshotId"]}) for d, s in work
        ]}}


def _progress(status: str, related: dict, code: str = "", message: str = "") -> dict:
    """One OperationProgress entry as the cloud shapes it: what it concerns in
    RelatedItemSet (Name/Value pairs, which the SDK's models read), and the
    same ids as plain fields for vdisk's CLI."""
    return {
        **related,
        "OperationStatus": status,
        "ErrorCode": code,
        "ErrorMsg": message,
        "RelatedItemSet": {"RelatedItem": [{"Name": k, "Value": v} for k, v in related.items()]},
    }
