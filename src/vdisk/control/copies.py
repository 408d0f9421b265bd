"""CopySnapshot: a snapshot's copy, within the region or to another one.

Within the pool's region, the copy is a new snapshot id that shares every
block of its source (the engine's copy_snapshot: no data is read or
written), with its own name, retention and tags; deleting either leaves the
other whole.

To another region: a repository registered with that region
(`vdisk repository add ... --region R`, vdisk.exchange.registry) stands
for it.  The copy's id is given at once and recorded (`regioncopy/<id>`);
the daemon archives the snapshot there in the background, labelled as the
copy (`vdisk repository archive --copy`), and marks the record accomplished
or failed.  A pool whose region is R, with the same repository registered
for R, takes the copy in (`vdisk repository pull`, which its daemon runs
every few seconds): its DescribeSnapshots then shows the copy under the
same id.  Where no repository stands for the region, the cloud's
InvalidRegionId.NotFound.

A mixin of Controller.
"""
from __future__ import annotations

import os

from ..exchange import registry
from .clock import iso
from .errors import CloudError
from .validate import Params, new_id


class CopyActions:
    def do_CopySnapshot(self, p: Params) -> dict:
        src = self._snapshot(p)
        region = p.str("DestinationRegionId", required=True)
        remote = None
        if region != self.region:
            remote = registry.for_region(os.path.dirname(self.pool.path), region)
            if remote is None:
                raise CloudError("InvalidRegionId.NotFound",
                                 "DestinationRegionId %r is not a region vdisk serves: this pool is %s, and no repository "
                                 "stands for %r here (vdisk repository add NAME --ceph-conf FILE --region %s)."
                                 % (region, self.region, region, region), 404)
        name = p.name("DestinationSnapshotName")
        desc = p.description("DestinationSnapshotDescription")
        retention = p.int("RetentionDays", lo=1, hi=65535)
        tags = self._tags_given(p)
        view = self._progress_view(src, self.clock.now())
        if view["Status"] != "accomplished":
            raise CloudError("IncorrectSnapshotStatus", "Snapshot %s is %s; only an accomplished snapshot can be copied."
                             % (src["SnapshotId"], view["Status"]), 403)
        now = self.clock.now()
        if remote is not None:
            return self._copy_to_region(src, region, remote[0], name, desc, retention, tags, now)
        copy = {k: src[k] for k in ("SourceDiskId", "SourceDiskSize", "SourceDiskType", "SourceDiskCategory",
                                    "SourceInstanceId")}
        copy.update({
            "SnapshotId": new_id("s"),
            "SnapshotName": name or "",
            "Description": desc or "",
            "SnapshotType": "user",
            "Status": "accomplished",
            "Progress": "100%",
            "Available": True,
            "InstantAccess": False,
            "InstantAccessRetentionDays": None,
            "RetentionDays": retention,
            "CreationTime": iso(now),
            "Category": "standard",
            "SourceSnapshotId": src["SnapshotId"],
            "SourceRegionId": self.region,
            "_t": now,
            "_tags": tags,
        })

        def change(tx, sid):
            copy["_snap"] = sid
            self._put("snapshot", copy)

        self.pool.copy_snapshot(src["_snap"], change)
        return {"SnapshotId": copy["SnapshotId"]}

    def _copy_to_region(self, src: dict, region: str, repository: str, name, desc, retention, tags, now) -> dict:
        if self.region_copier is None:
            raise CloudError("DaemonNotRunning", "A copy to another region is archived in the background by the vdisk "
                             "daemon; start it with 'vdisk daemon start'.", 503)
        copy_id = new_id("s")
        rec = {
            "CopySnapshotId": copy_id, "SourceSnapshotId": src["SnapshotId"], "SourceRegionId": self.region,
            "DestinationRegionId": region, "Repository": repository, "SnapshotName": name or "",
            "Description": desc or "", "RetentionDays": retention, "Tags": tags, "Status": "progressing",
            "CreationTime": iso(now),
        }
        self.pool.put_record("regioncopy/" + copy_id, rec)
        self.pool.commit_meta()
        self.region_copier(copy_id)
        return {"SnapshotId": copy_id}

    def region_copies(self, status: str | None = None) -> dict[str, dict]:
        """The copies to other regions (regioncopy records), by copy id."""
        return {k.split("/", 1)[1]: r for k, r in self.pool.records("regioncopy/").items()
                if status is None or r["Status"] == status}

    def region_copy_done(self, copy_id: str, ok: bool, why: str = "") -> None:
        rec = self.pool.get_record("regioncopy/" + copy_id)
        if rec is None:
            return
        rec = dict(rec, Status="accomplished" if ok else "failed", Message=why[-2000:])
        self.pool.put_record("regioncopy/" + copy_id, rec)
        self.pool.commit_meta()
