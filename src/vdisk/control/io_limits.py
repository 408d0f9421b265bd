"""The speed a disk is served at: its category's IOPS and throughput
(vdisk.control.categories), enforced by the host (the FUSE layer's
token buckets), changed online by ModifyDiskSpec and ResizeDisk, or turned
off per pool or per disk for users who want speed rather than fidelity.

Settings: the pool's record "settings/io" {"IoLimits": "Cloud" |
"Unlimited"} (ModifyPoolAttribute IoLimits; default Cloud), and a disk's
own "IoLimits" field (ModifyDiskAttribute IoLimits, vdisk's own
parameter; "" follows the pool).

A mixin of Controller.
"""
from __future__ import annotations

from . import categories
from .errors import CloudError
from .validate import Params

MODES = ("Cloud", "Unlimited")


class IoLimitActions:
    def _pool_io_limits(self) -> str:
        return (self.pool.get_record("settings/io") or {}).get("IoLimits", "Cloud")

    def io_limits_of(self, disk: dict) -> tuple[int, int, int]:
        """(IOPS, bytes a second, bytes one operation counts) the disk is
        served at; (0, 0, 0) when unlimited."""
        if (disk.get("IoLimits") or self._pool_io_limits()) == "Unlimited":
            return 0, 0, 0
        return categories.io_limits(disk["Category"], disk.get("PerformanceLevel"), disk["Size"],
                                    disk.get("ProvisionedIops", 0), disk.get("BurstingEnabled", False))

    def _set_io_limits(self, p: Params, disk: dict | None = None) -> bool:
        """IoLimits of ModifyPoolAttribute (disk None) or ModifyDiskAttribute
        ("" there: as the pool); staged, applied after the commit by the
        caller.  Whether it was given."""
        mode = p.str("IoLimits", choices=MODES if disk is None else MODES + ("",))
        if mode is None:
            return False
        if disk is None:
            self.pool.put_record("settings/io", {"IoLimits": mode})
        elif mode:
            disk["IoLimits"] = mode
        else:
            disk.pop("IoLimits", None)
        return True

    def apply_io_limits(self, disks: list[dict] | None = None) -> None:
        """Tell the host the speed of these disks (None: every disk); what
        the daemon does at start and after every change of them."""
        if self.host is None:
            return
        now = self.clock.now()
        for d in self._all("disk") if disks is None else disks:
            self.host.limit(d["_volume"], *self.io_limits_of(d))
            # the host counts its requests from now on (control.monitor)
            self._io_counted_since().setdefault(d["DiskId"], now)

    def do_ModifyDiskSpec(self, p: Params) -> dict:
        """The cloud's rules for a pay-as-you-go disk: an ESSD's performance
        level goes up or down but not to PL0; the category changes among
        those that can change (not to or from the basic disk); the new
        level must allow the disk's size (ResizeDisk first); the disk is
        In_use or Available and its instance Running or Stopped.  The new
        speed applies at once."""
        disk = self._disk(p)
        for name in ("DestinationZoneId", "PerformanceControlOptions."):
            given = [k for k in p.req if k.startswith(name) and p.req[k] not in (None, "")]
            if given:
                raise CloudError("UnsupportedParameter",
                                 "The parameter %s is not supported: vdisk emulates neither other zones nor "
                                 "performance control options (docs/performance.md)." % given[0])
        level = p.str("PerformanceLevel", choices=categories.LEVELS)
        category = p.str("DiskCategory", choices=categories.CATEGORIES)
        provisioned = p.int("ProvisionedIops", lo=0)
        if level is None and category is None and provisioned is None:
            raise CloudError("MissingParameter", "ModifyDiskSpec needs PerformanceLevel, DiskCategory or "
                             "ProvisionedIops.")
        if disk["Status"] not in ("In_use", "Available"):
            raise CloudError("IncorrectDiskStatus", "Disk %s is %s; its spec changes only when it is In_use or "
                             "Available." % (disk["DiskId"], disk["Status"]), 403)
        if disk.get("InstanceId"):
            inst = self.pool.get_record("instance/" + disk["InstanceId"])
            if inst and inst["Status"] not in ("Running", "Stopped"):
                raise CloudError("IncorrectInstanceStatus", "Instance %s is %s; a disk's spec changes while its "
                                 "instance is Running or Stopped." % (inst["InstanceId"], inst["Status"]), 403)
        new_category = category or disk["Category"]
        if "cloud" in (new_category, disk["Category"]) and new_category != disk["Category"]:
            raise CloudError("InvalidDiskCategory.ValueNotSupported",
                             "A basic disk (cloud) cannot change category, nor can a disk become one.")
        if disk["Category"] == "cloud_essd_entry" and new_category not in ("cloud_essd_entry", "cloud_essd", "cloud_auto"):
            raise CloudError("InvalidDiskCategory.ValueNotSupported",
                             "An ESSD Entry disk changes only to cloud_essd or cloud_auto, not to %s." % new_category)
        if new_category != "cloud_essd" and level is not None:
            raise CloudError("InvalidPerformanceLevel.ValueNotSupported",
                             "PerformanceLevel applies only to cloud_essd disks, not to %s." % new_category)
        new_level = (level or disk.get("PerformanceLevel") or "PL1") if new_category == "cloud_essd" else None
        if new_level == "PL0" and disk.get("PerformanceLevel") != "PL0":
            raise CloudError("InvalidPerformanceLevel.ValueNotSupported",
                             "A disk's performance level cannot be changed to PL0 (only created so).")
        lo, hi = categories.SIZE_LIMITS[(new_category, new_level)]
        if not lo <= disk["Size"] <= hi:
            raise CloudError("InvalidDiskSize.ValueNotSupported",
                             "A %s%s disk must be %d to %d GiB; disk %s has %d GiB (ResizeDisk it first)."
                             % (new_category, " " + new_level if new_level else "", lo, hi, disk["DiskId"],
                                disk["Size"]))
        categories.check_auto(new_category, disk["Size"], provisioned, None)
        self._dry_run(p)
        disk["Category"] = new_category
        disk["PerformanceLevel"] = new_level
        if new_category == "cloud_auto":
            disk["ProvisionedIops"] = disk.get("ProvisionedIops", 0) if provisioned is None else provisioned
            disk.setdefault("BurstingEnabled", False)
        else:
            disk.pop("ProvisionedIops", None)
            disk.pop("BurstingEnabled", None)
        self._put("disk", disk)
        self.pool.commit_meta()
        self.apply_io_limits([disk])
        return {}
