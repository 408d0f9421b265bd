"""Custom images made of snapshots, and the snapshot usage report.

CreateImage takes a system-disk snapshot (SnapshotId) and/or a
DiskDeviceMapping of a system snapshot plus data-disk snapshots; an instance
created with ImageId gets disks made from them.  A snapshot an image uses
cannot be deleted (SnapshotCreatedImage) until the image is.

A mixin of Controller.
"""
from __future__ import annotations


from .errors import CloudError, invalid
from .validate import Params, check_id, new_id


class ImageActions:
    def _images_using(self, snapshot_id: str) -> list[str]:
        return sorted(
            img["ImageId"]
            for img in self._all("image")
            if any(m["SnapshotId"] == snapshot_id for m in img["DiskDeviceMappings"]["DiskDeviceMapping"])
        )

    def _image(self, p: Params) -> dict:
        iid = check_id("m", p.str("ImageId", required=True), "ImageId")
        rec = self.pool.get_record("image/" + iid)
        if rec is None:
            raise CloudError("InvalidImageId.NotFound", "The specified image %s does not exist." % iid, 404)
        return rec

    def do_CreateImage(self, p: Params) -> dict:
        name = p.name("ImageName")
        desc = p.description()
        mappings = p.struct_list("DiskDeviceMapping", ("SnapshotId", "Size", "DiskType", "Device"))
        if p.str("SnapshotId"):
            if any(m.get("DiskType", "data") == "system" for m in mappings):
                raise invalid("SnapshotId", "give the system disk either as SnapshotId or in DiskDeviceMapping, not both")
            mappings.insert(0, {"SnapshotId": p.str("SnapshotId"), "DiskType": "system"})
        if not mappings:
            raise CloudError("MissingParameter", "CreateImage needs SnapshotId or DiskDeviceMapping.N.SnapshotId.")
        out = []
        systems = 0
        for i, m in enumerate(mappings, 1):
            sid = check_id("s", m.get("SnapshotId"), "DiskDeviceMapping.%d.SnapshotId" % i)
            snap = self._get("snapshot", sid)
            self._usable(snap, "make an image")
            dtype = m.get("DiskType") or ("system" if i == 1 else "data")
            if dtype not in ("system", "data"):
                raise invalid("DiskDeviceMapping.%d.DiskType" % i, "system or data")
            systems += dtype == "system"
            if dtype == "system" and snap["SourceDiskType"] != "system":
                raise CloudError(
                    "InvalidSnapshotId.NotSystemDisk",
                    "Snapshot %s was taken from a data disk; the image's system disk needs a system-disk snapshot." % sid,
                    403,
                )
            size = Params(m).int("Size", default=snap["SourceDiskSize"])
            if size < snap["SourceDiskSize"]:
                raise CloudError(
                    "InvalidDiskSize.TooSmall",
                    "DiskDeviceMapping.%d.Size must be at least the snapshot's source disk size (%d GiB)." % (i, snap["SourceDiskSize"]),
                )
            out.append({"SnapshotId": sid, "Type": dtype, "Size": size})
        if systems != 1:
            raise CloudError("InvalidParameter.SystemDisk", "An image needs exactly one system disk snapshot, not %d." % systems)
        out.sort(key=lambda m: m["Type"] != "system")
        tags = self._tags_given(p)
        self._dry_run(p)
        image = {
            "ImageId": new_id("m"),
            "ImageName": name or "",
            "Description": desc or "",
            "Status": "Available",
            "Progress": "100%",
            "ImageOwnerAlias": "self",
            "CreationTime": self._now(),
            "Size": out[0]["Size"],
            "DiskDeviceMappings": {"DiskDeviceMapping": out},
            "_tags": tags,
        }
        self.pool.put_record("image/" + image["ImageId"], image)
        self.pool.commit_meta()
        return {"ImageId": image["ImageId"]}

    def do_DescribeImages(self, p: Params) -> dict:
        ids = [x.strip() for x in (p.str("ImageId") or "").split(",") if x.strip()]
        name = p.str("ImageName")
        owner = p.str("ImageOwnerAlias", choices=("system", "self", "others", "marketplace"))
        status = [x.strip() for x in (p.str("Status") or "").split(",") if x.strip()]
        snap = p.str("SnapshotId")
        tagged = self._tag_filter(p)
        self._dry_run(p)
        out = []
        for img in sorted(self._all("image"), key=lambda r: (r["CreationTime"], r["ImageId"])):
            if ids and img["ImageId"] not in ids:
                continue
            if owner and owner != "self":  # every image here is the user's own custom image
                continue
            if status and img["Status"] not in status:
                continue
            if snap and snap not in [m["SnapshotId"] for m in img["DiskDeviceMappings"]["DiskDeviceMapping"]]:
                continue
            if name and img["ImageName"] != name:
                continue
            if not tagged(img):
                continue
            out.append(img)
        res = self._page(p, out, "Images", "Image")
        res["Images"]["Image"] = [self._public(img) for img in res["Images"]["Image"]]
        return res

    def do_DeleteImage(self, p: Params) -> dict:
        img = self._image(p)
        self._dry_run(p)
        self.pool.put_record("image/" + img["ImageId"], None)
        self.pool.commit_meta()
        return {}

    # ------------------------------------------------------------ usage

    def do_DescribeSnapshotsUsage(self, p: Params) -> dict:
        """The cloud's DescribeSnapshotsUsage (SnapshotCount, SnapshotSize),
        with vdisk's per-snapshot report (billed, exclusive, shared,
        referenced bytes; groups; the pool) in the same answer."""
        return self._snapshot_usage(p)

    def do_DescribeSnapshotUsage(self, p: Params) -> dict:
        """The name vdisk used before; the same answer."""
        return self._snapshot_usage(p)

    def _snapshot_usage(self, p: Params) -> dict:
        """vdisk's usage report: per snapshot and group, what is billed
        (incremental), exclusive (freed by deleting it), shared, referenced."""
        snaps = []
        groups: dict[str, dict] = {}
        for s in sorted(self._all("snapshot"), key=lambda s: (s["CreationTime"], s["_snap"])):
            u = self.pool.snapshot_usage(s["_snap"], referenced=True)
            row = {
                "SnapshotId": s["SnapshotId"],
                "SnapshotGroupId": s.get("SnapshotGroupId", ""),
                "SourceDiskId": s["SourceDiskId"],
                "BilledSize": u["incremental_bytes"],
                "ExclusiveSize": u["exclusive_bytes"],
                "ReferencedSize": u["referenced_bytes"],
                "SharedSize": u["referenced_bytes"] - u["exclusive_bytes"],
                "InstantAccess": s.get("InstantAccess", False),
                "InstantAccessRetentionDays": s.get("InstantAccessRetentionDays"),
            }
            snaps.append(row)
            gid = row["SnapshotGroupId"]
            if gid:
                g = groups.setdefault(gid, {"SnapshotGroupId": gid, "BilledSize": 0, "ExclusiveSize": 0,
                                            "ReferencedSize": 0, "SharedSize": 0, "Snapshots": 0})
                for k in ("BilledSize", "ExclusiveSize", "ReferencedSize", "SharedSize"):
                    g[k] += row[k]
                g["Snapshots"] += 1
        st = self.pool.stats()
        return {
            # the cloud's DescribeSnapshotsUsage fields: how many, and the bytes billed
            "SnapshotCount": len(snaps),
            "SnapshotSize": sum(r["BilledSize"] for r in snaps),
            # vdisk's report beside them
            "Snapshots": {"Snapshot": snaps},
            "SnapshotGroups": {"SnapshotGroup": list(groups.values())},
            "Totals": {
                "SnapshotCount": len(snaps),
                "BilledSize": sum(r["BilledSize"] for r in snaps),
                "ExclusiveSize": sum(r["ExclusiveSize"] for r in snaps),
                "PoolUsedBytes": st["used_bytes"],
                "PoolOnDiskBytes": st["data_file_allocated_bytes"],
            },
        }
