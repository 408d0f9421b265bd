"""CopySnapshot: a snapshot's copy, within the region.

The copy is a new snapshot id that shares every block of its source (the
engine's copy_snapshot: no data is read or written), with its own name,
retention and tags; deleting either leaves the other whole.  vdisk serves
one region, so a copy to another DestinationRegionId is refused with the
cloud's code for a region that does not exist (issue 18 brings remote
repositories that can stand for regions).

A mixin of Controller.
"""
from __future__ import annotations

from .clock import iso
from .errors import CloudError
from .validate import Params, new_id


class CopyActions:
    def do_CopySnapshot(self, p: Params) -> dict:
        src = self._snapshot(p)
        region = p.str("DestinationRegionId", required=True)
        if region != self.region:
            raise CloudError("InvalidRegionId.NotFound",
                             "DestinationRegionId %r is not a region vdisk serves; it serves one, %s (copies to other "
                             "regions are not emulated)." % (region, self.region), 404)
        name = p.name("DestinationSnapshotName")
        desc = p.description("DestinationSnapshotDescription")
        retention = p.int("RetentionDays", lo=1, hi=65535)
        tags = self._tags_given(p)
        view = self._progress_view(src, self.clock.now())
        if view["Status"] != "accomplished":
            raise CloudError("IncorrectSnapshotStatus", "Snapshot %s is %s; only an accomplished snapshot can be copied."
                             % (src["SnapshotId"], view["Status"]), 403)
        now = self.clock.now()
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
