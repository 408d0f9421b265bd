"""The cloud's actions (CreateDisk, StartInstance, CreateSnapshot, ...).

Requests and answers use the cloud's action, parameter and field names, so the
same handlers can later serve the cloud's HTTP API.  Every handler validates
all of its input first and changes nothing when it refuses; every change is
durable (one synchronous LMDB transaction) when the handler returns.

Concurrency contract: a Controller runs one action at a time, in the
daemon's trio thread or its control thread (the actions whose commits are
structural: daemon/server.py, THREADED_ACTIONS), or in the CLI's process when
no daemon runs.  Handlers may block on fsync through the pool.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import re
import uuid

from ..engine.errors import Busy, EngineError, NoSpace
from ..engine.pool import Pool
from . import categories, schedule
from .clock import Clock, iso
from .cloud_params import CLOUD_PARAMS
from .copies import CopyActions
from .io_limits import IoLimitActions
from .monitor import MonitorActions
from .direct import DirectActions
from .errors import CloudError, invalid, not_found
from .images import ImageActions
from .lifecycle import LifecycleActions
from .machines import MachineActions
from .policies import PolicyActions
from .snapshot_groups import SnapshotGroupActions
from .streams import STREAM_ACTIONS, StreamActions
from .tags import TagActions
from .validate import CLIENT_TOKEN, Params, check_id, check_request, new_id, shown

log = logging.getLogger(__name__)

GIB = 1 << 30
MAX_DATA_DISKS = 16
MAX_MANUAL_SNAPSHOTS_PER_DISK = 256
# Actions whose cloud API takes a ClientToken (CreateSnapshotGroup keeps its
# own, recorded in the same transaction as the group).
IDEMPOTENT = {"CreateDisk", "CreateInstance", "CreateSnapshot", "CreateImage", "ResizeDisk", "CopySnapshot"}
# Fields the cloud fills on every disk, with what is true of every vdisk disk
# (pay-as-you-go, not encrypted, no bursting or multi-attach, no locks or
# resource group).
DISK_FIXED = {
    "DiskChargeType": "PostPaid", "Encrypted": False, "BurstingEnabled": False, "MultiAttach": "Disabled",
    "DeleteAutoSnapshot": True, "ResourceGroupId": "", "OperationLocks": {"OperationLock": []},
    "Attachments": {"Attachment": []}, "MountInstanceNum": 0,
}
# ... for snapshots (local: nothing encrypted) ...
SNAPSHOT_FIXED = {"Encrypted": False, "ResourceGroupId": "", "SourceStorageType": "disk"}
# The same for instances (not virtual machines yet: no CPU, memory or network).
INSTANCE_FIXED = {
    "InstanceChargeType": "PostPaid", "DeletionProtection": False, "ResourceGroupId": "",
    "OperationLocks": {"LockReason": []}, "Tags": {"Tag": []}, "SecurityGroupIds": {"SecurityGroupId": []},
}

# The cloud's common request parameters (any action may carry them).
COMMON_PARAMS = {"Action", "Version", "Format", "AccessKeyId", "Signature", "SignatureMethod", "SignatureVersion",
                 "SignatureNonce", "SignatureType", "Timestamp", "RegionId", "OwnerId", "OwnerAccount",
                 "ResourceOwnerId", "ResourceOwnerAccount", "SecurityToken", "BearerToken",
                 "regionId"}  # the automatic snapshot policy actions' spelling
# Parameters vdisk reads beside the cloud's (cloud_params.py): its own
# actions', and names it accepted before it followed the cloud's.
VDISK_PARAMS = {
    "CreateDisk": ("Category",),
    "DescribePool": (),
    "ScrubPool": ("MapOnly",),
    "TrimPool": (),
    "ListChangedBlocks": ("FirstSnapshotId", "SecondSnapshotId"),
    "GetSnapshotBlock": ("SnapshotId", "BlockIndex"),
    "DescribeSnapshotUsage": (),
    "DescribeClock": (),
    "ModifyPoolAttribute": ("SnapshotUploadRate", "IoLimits", "PoolRegionId"),
    "ModifyDiskAttribute": ("IoLimits",),
    "DescribeDiskStats": ("DiskId",),
    "CreateSnapshotGroup": ("RetentionDays",),
    # the policy actions' lower-camel names, capitalised; and policies on instances
    "CreateAutoSnapshotPolicy": ("AutoSnapshotPolicyName", "TimePoints", "RepeatWeekdays", "RetentionDays"),
    "ModifyAutoSnapshotPolicyEx": ("AutoSnapshotPolicyId", "AutoSnapshotPolicyName", "TimePoints", "RepeatWeekdays",
                                   "RetentionDays"),
    "DeleteAutoSnapshotPolicy": ("AutoSnapshotPolicyId",),
    "ApplyAutoSnapshotPolicy": ("AutoSnapshotPolicyId", "DiskIds", "instanceIds", "InstanceIds"),
    "CancelAutoSnapshotPolicy": ("AutoSnapshotPolicyId", "DiskIds", "instanceIds", "InstanceIds"),
}
# Filters the cloud's Describe actions take that vdisk does not apply (names
# from the cloud's API; a trailing "." stands for Name.N...).  Refused with
# UnsupportedParameter: an answer that ignored them would hold resources
# that do not match, and a script acting on it would act on the wrong ones.
UNAPPLIED_FILTERS = {
    "DescribeDisks": ("DeleteAutoSnapshot", "DiskChargeType", "EnableShared", "Encrypted", "KMSKeyId", "LockReason",
                      "MultiAttach", "ResourceGroupId", "Filter."),
    "DescribeInstances": ("DeviceAvailable", "EipAddresses", "HpcClusterId", "InnerIpAddresses", "InstanceChargeType",
                          "InstanceNetworkType", "InstanceTypeFamily", "InternetChargeType",
                          "IoOptimized", "KeyPairName", "LockReason", "PrivateIpAddresses", "PublicIpAddresses",
                          "RdmaIpAddresses", "ResourceGroupId", "SecurityGroupId", "VSwitchId", "VpcId", "Filter."),
    "DescribeSnapshots": ("Encrypted", "KMSKeyId", "SnapshotLinkId", "Usage", "ResourceGroupId", "Filter."),
    "DescribeImages": ("ActionType", "Architecture", "ImageFamily", "ImageOwnerId", "InstanceType", "IsPublic",
                       "IsSupportCloudinit", "IsSupportIoOptimized", "OSType", "ShowExpired", "Usable", "Usage",
                       "ResourceGroupId", "Filter."),
    "DescribeSnapshotGroups": ("ResourceGroupId",),
}
REGION = "vdisk-local"
REGION_ID = re.compile(r"[a-z][a-z0-9-]{1,63}")
ZONE = "vdisk-local-a"


class Host:
    """What the control plane needs from whatever serves disks as files.

    The daemon's FUSE layer implements it; offline (no daemon) there is none.
    expose/withdraw raise vdisk.engine.errors.Busy naming what holds a file.
    """

    def expose(self, instance_id: str, disks: dict[str, int]) -> None: ...
    def add_disk(self, instance_id: str, disk_id: str, volume: int) -> None: ...
    def remove_disk(self, instance_id: str, disk_id: str) -> None: ...
    def withdraw(self, instance_id: str) -> None: ...
    def busy(self, instance_id: str) -> str: ...
    def path(self, instance_id: str, disk_id: str) -> str: ...
    def resized(self, instance_id: str, disk_id: str) -> None: ...
    def limit(self, volume: int, iops: int, bps: int, io_unit: int = 0) -> None: ...
    def io_stats(self, volume: int) -> dict | None: ...
    def io_clock(self) -> int: ...


class Controller(SnapshotGroupActions, ImageActions, MachineActions, DirectActions, PolicyActions, LifecycleActions,
                 TagActions, CopyActions, IoLimitActions, MonitorActions, StreamActions):
    def __init__(self, pool: Pool, host: Host | None = None, settings: dict | None = None, vms=None):
        self.pool = pool
        self.clock = Clock(pool)
        # the region this pool stands for (vdisk's own setting: ModifyPoolAttribute RegionId)
        self.region = (pool.get_record("settings/region") or {}).get("RegionId", REGION)
        self.region_copier = None  # the daemon's: starts the archive of a copy to another region (copies.py)
        self.host = host
        self.vms = vms  # vdisk.vm.supervisor.Machines in the daemon; None offline
        self.invocations = {}
        self.importing: dict[str, str] = {}  # disk id -> its instance's ("") while an import runs (streams.py)
        self.settings = dict(settings or {})
        # strict: refuse parameters that neither the cloud's API nor vdisk
        # knows for the action (a typo), instead of ignoring them as the cloud does
        self.strict = bool(self.settings.get("strict", os.environ.get("VDISK_STRICT", "") not in ("", "0")))
        self.actions = {
            name[len("do_") :]: getattr(self, name) for name in dir(self) if name.startswith("do_")
        }
        self.recover_imports()

    # ------------------------------------------------------------ dispatch

    def handle(self, req) -> dict:
        """Run one request; always answers a dict (an error has Code/Message)."""
        request_id = str(uuid.uuid4()).upper()
        try:
            action = check_request(req)
            if action in STREAM_ACTIONS:
                raise CloudError(
                    "InvalidAction.NeedsStream",
                    "Action %s reads or writes a byte stream: send it over vdisk's control socket with the stream's "
                    "file descriptor (vdisk snapshot export, vdisk disk import-diff)." % action, 400)
            self.check_not_importing(action, req)
            if action not in self.actions:
                raise CloudError(
                    "InvalidAction.NotFound",
                    "Action %s is not known; known actions: %s." % (shown(action), ", ".join(sorted(self.actions))),
                    404,
                )
            p = Params(req)
            if self.strict:
                _refuse_unknown(action, req)
            _refuse_unapplied(action, p)
            prior, token = self._idempotency(action, p)
            if prior is not None:
                result = dict(prior)
            else:
                result = dict(self.actions[action](p) or {})
                if token is not None:
                    self._remember(token, result)
            result["RequestId"] = request_id
            return result
        except Exception as exc:  # noqa: BLE001 - the daemon must keep serving
            return self.error_answer(exc, req, request_id)

    def error_answer(self, exc: Exception, req, request_id: str | None = None) -> dict:
        """The answer to a request that raised exc (staged records dropped):
        the cloud's code and message, InternalError for the unexpected."""
        self.pool.drop_staged_records()
        if isinstance(exc, CloudError):
            d = exc.to_dict()
        elif isinstance(exc, NoSpace):
            d = CloudError("InsufficientStorage", "The pool is out of space: %s" % exc, 507).to_dict()
        elif isinstance(exc, EngineError):
            d = CloudError("InternalError", "The storage engine refused: %s" % exc, 500).to_dict()
        else:
            log.error("internal error in %r", req, exc_info=exc)
            d = CloudError("InternalError", "Internal error: %s: %s" % (type(exc).__name__, exc), 500).to_dict()
        d["RequestId"] = request_id or str(uuid.uuid4()).upper()
        return d

    # ------------------------------------------------------------ cloud conventions

    @staticmethod
    def _dry_run(p: Params) -> None:
        """The point in a handler where everything is checked and nothing is
        changed yet: with DryRun=true the answer is the cloud's
        DryRunOperation (the actions whose cloud API has DryRun call this)."""
        if p.bool("DryRun"):
            raise CloudError("DryRunOperation", "Request validation has been passed with DryRun flag set.", 400)

    def _idempotency(self, action: str, p: Params):
        """ClientToken, for the actions that take one in the cloud: (the first
        answer to replay, None) when the token was used with the same
        parameters; (None, token record to write after success) when new;
        IdempotentParameterMismatch when used with others."""
        token = p.str("ClientToken")
        if token is None or action not in IDEMPOTENT:
            return None, None
        if not CLIENT_TOKEN.fullmatch(token):
            raise invalid("ClientToken", "at most 64 printable ASCII characters")
        key = "clienttoken/%s/%s" % (action, token)
        fingerprint = hashlib.sha256(json.dumps(
            {k: v for k, v in p.req.items() if k != "ClientToken"}, sort_keys=True, default=str).encode()).hexdigest()
        prior = self.pool.get_record(key)
        if prior is None:
            return None, (key, fingerprint)
        if prior["Fingerprint"] != fingerprint:
            raise CloudError("IdempotentParameterMismatch",
                             "ClientToken %r was already used for a %s request with other parameters." % (token, action),
                             400)
        return prior["Result"], None

    def _remember(self, token, result: dict) -> None:
        """Record a token's first answer.  A second, small commit after the
        action's own: a crash between the two forgets the token (a retry then
        acts again); kept staged until durable if the commit fails."""
        key, fingerprint = token
        self.pool.put_record(key, {"Fingerprint": fingerprint, "Result": result}, keep=True)
        try:
            self.pool.commit_meta()
        except EngineError as exc:
            log.warning("the ClientToken record %s is not durable yet: %s", key, exc)

    # ------------------------------------------------------------ records

    def _now(self) -> str:
        return iso(self.clock.now())

    @staticmethod
    def _page(p: Params, items: list, outer: str, inner: str, default_max: int = 100, numbered: bool = False) -> dict:
        return _page(p, items, outer, inner, default_max, numbered)

    def _get(self, kind: str, ident: str) -> dict:
        rec = self.pool.get_record("%s/%s" % (kind, ident))
        if rec is None:
            raise not_found(kind, ident)
        return rec

    def _all(self, kind: str) -> list[dict]:
        return list(self.pool.records(kind + "/").values())

    def _put(self, kind: str, rec: dict) -> None:
        key = {"instance": "InstanceId", "disk": "DiskId", "snapshot": "SnapshotId"}[kind]
        self.pool.put_record("%s/%s" % (kind, rec[key]), rec)

    def _delete(self, kind: str, ident: str) -> None:
        self.pool.put_record("%s/%s" % (kind, ident), None)

    def _instance(self, p: Params, name: str = "InstanceId") -> dict:
        return self._get("instance", check_id("i", p.str(name, required=True), name))

    def _disk(self, p: Params, name: str = "DiskId") -> dict:
        return self._get("disk", check_id("d", p.str(name, required=True), name))

    def _snapshot(self, p: Params, name: str = "SnapshotId") -> dict:
        return self._get("snapshot", check_id("s", p.str(name, required=True), name))

    def _instance_disks(self, instance_id: str) -> list[dict]:
        disks = [d for d in self._all("disk") if d.get("InstanceId") == instance_id and d["Status"] == "In_use"]
        return sorted(disks, key=lambda d: d["Device"])

    def _public(self, rec: dict) -> dict:
        out = {k: v for k, v in rec.items() if not k.startswith("_")}
        out["Tags"] = self._tags_public(rec)
        if "DiskId" in rec and "SnapshotId" not in rec:
            out.update(DISK_FIXED)
            policy = rec.get("AutoSnapshotPolicyId", "")
            out.update(AutoSnapshotPolicyId=policy, EnableAutoSnapshot=bool(policy),
                       EnableAutomatedSnapshotPolicy=bool(policy))
            if rec["Status"] == "In_use":
                out["Attachments"] = {"Attachment": [{"InstanceId": rec["InstanceId"], "Device": rec["Device"],
                                                      "AttachedTime": rec["AttachedTime"]}]}
                out["MountInstanceNum"] = 1
            out.update(categories.performance(rec["Category"], rec.get("PerformanceLevel"), rec["Size"],
                                              rec.get("ProvisionedIops", 0)))
            out["BurstingEnabled"] = rec.get("BurstingEnabled", False)
            out["IoLimits"] = rec.get("IoLimits") or self._pool_io_limits()  # vdisk's own: Unlimited or Cloud
            inst = rec.get("InstanceId")
            if inst and self.host is not None and rec["Status"] == "In_use":
                irec = self.pool.get_record("instance/" + inst)
                if irec and irec["Status"] == "Running":
                    out["FilePath"] = self.host.path(inst, rec["DiskId"])
        return out

    def _require_host(self, what: str) -> Host:
        if self.host is None:
            raise CloudError(
                "DaemonNotRunning",
                "%s needs the vdisk daemon (it serves the disk files); start it with 'vdisk daemon start'." % what,
                503,
            )
        return self.host

    def _busy(self, exc: Busy, what: str) -> CloudError:
        return CloudError(
            "IncorrectDiskStatus.InUse",
            "%s: %s. Unmount the filesystem and detach the loop device ('vdisk loop detach DEVICE'), "
            "then try again." % (what, exc),
            403,
        )

    # ------------------------------------------------------------ disks

    def _new_disk(self, p: Params, prefix: str, dtype: str, size_default=None, snapshot=None,
                  create_disk: bool = False) -> dict:
        """Validate a disk spec given as <prefix>Size, <prefix>Category ...; no side effects.

        create_disk: CreateDisk's rules, as the cloud documents them: the
        category is DiskCategory, default cloud (a basic disk); from a
        snapshot, the size is the larger of Size and the snapshot's.  Disks of
        CreateInstance (SystemDisk., DataDisk.N.) default to cloud_essd (the
        cloud's default depends on the instance type, which vdisk has not) and
        must be at least their snapshot's size."""
        if create_disk:
            # Category alone, which vdisk took before, is still read
            category = p.str("DiskCategory") or p.str("Category") or "cloud"
        else:
            category = p.str(prefix + "Category", default="cloud_essd")
        level = p.str(prefix + "PerformanceLevel")
        size = p.int(prefix + "Size", required=size_default is None and snapshot is None, default=size_default)
        if snapshot is not None:
            src_size = snapshot["SourceDiskSize"]
            if create_disk:
                size = max(size or 0, src_size)
            elif size is None:  # an image's data disk: the snapshot's size, at least the category's minimum
                size = max(src_size, categories.min_size(category, level))
            if size < src_size:
                raise CloudError(
                    "InvalidDiskSize.TooSmall",
                    "A disk created from snapshot %s must be at least its source disk's size (%d GiB), not %d GiB."
                    % (snapshot["SnapshotId"], src_size, size),
                )
        level = categories.check_disk_spec(category, level, size)
        provisioned = p.int("ProvisionedIops", lo=0) if create_disk else None
        burst = p.bool("BurstingEnabled") if create_disk else False
        categories.check_auto(category, size, provisioned, burst)
        name = p.name(prefix + "DiskName", "DiskName")
        desc = p.description(prefix + "Description")
        return {
            "DiskId": new_id("d"),
            "DiskName": name or "",
            "Description": desc or "",
            "Size": size,
            "Category": category,
            "PerformanceLevel": level,
            **({"ProvisionedIops": provisioned or 0, "BurstingEnabled": burst} if category == "cloud_auto" else {}),
            "Type": dtype,
            "Status": "Available",
            "InstanceId": "",
            "Device": "",
            "SourceSnapshotId": snapshot["SnapshotId"] if snapshot else "",
            "CreationTime": self._now(),
            "AttachedTime": "",
            "DetachedTime": "",
            "DeleteWithInstance": p.bool(prefix + "DeleteWithInstance", default=dtype == "system"),
            "Portable": dtype == "data",
            "RegionId": self.region,
            "ZoneId": ZONE,
        }

    def _create_disks(self, disks: list[tuple[dict, dict | None]], extra: dict | None = None) -> None:
        """Create the volumes of new disk records and store the records, all in
        one durable transaction (with the instance record extra, if given)."""

        def stage(vids):
            for (disk, _snap), vid in zip(disks, vids):
                disk["_volume"] = vid
                self._put("disk", disk)
            if extra is not None:
                self._put("instance", extra)

        specs = [(d["Size"] * GIB, s["_snap"] if s else None) for d, s in disks]
        self.pool.create_volumes(specs, on_created=stage)
        self.apply_io_limits([d for d, _s in disks])

    def do_CreateDisk(self, p: Params) -> dict:
        snap = self._snapshot(p) if p.str("SnapshotId") else None
        if snap is not None:
            self._usable(snap, "make a disk")
        disk = self._new_disk(p, "", "data", snapshot=snap, create_disk=True)
        disk["_tags"] = self._tags_given(p)
        self._create_disks([(disk, snap)])
        return {"DiskId": disk["DiskId"]}

    def do_DescribeDisks(self, p: Params) -> dict:
        ids = p.list("DiskIds")
        inst = p.str("InstanceId")
        status = p.str("Status")
        dtype = p.str("DiskType", choices=("all", "system", "data"))
        match = _matching(p, {"DiskName": "DiskName", "Category": "Category", "PerformanceLevel": "PerformanceLevel",
                              "SnapshotId": "SourceSnapshotId"}, {"Portable": "Portable", "DeleteWithInstance": "DeleteWithInstance"})
        tagged = self._tag_filter(p)
        policy = p.str("AutoSnapshotPolicyId")
        enabled = [p.bool(k) for k in ("EnableAutoSnapshot", "EnableAutomatedSnapshotPolicy") if p.req.get(k) is not None]
        self._dry_run(p)
        disks = []
        for d in sorted(self._all("disk"), key=lambda d: (d["CreationTime"], d["DiskId"])):
            if ids and d["DiskId"] not in ids:
                continue
            if not match(d) or not tagged(d):
                continue
            if policy is not None and d.get("AutoSnapshotPolicyId", "") != policy:
                continue
            if any(bool(d.get("AutoSnapshotPolicyId")) != want for want in enabled):
                continue
            if inst and d.get("InstanceId") != inst:
                continue
            if status and d["Status"] != status:
                continue
            if dtype and dtype != "all" and d["Type"] != dtype:
                continue
            disks.append(d)
        res = self._page(p, disks, "Disks", "Disk")  # the public form of the page only
        res["Disks"]["Disk"] = [self._public(d) for d in res["Disks"]["Disk"]]
        return res

    def _next_device(self, instance_id: str, dtype: str) -> str:
        used = {d["Device"] for d in self._instance_disks(instance_id)}
        if dtype == "system":
            return "/dev/xvda"
        for c in "bcdefghijklmnopq":
            dev = "/dev/xvd" + c
            if dev not in used:
                return dev
        raise CloudError(
            "InstanceDiskNumber.LimitExceed",
            "Instance %s already has %d data disks, the most an instance can have." % (instance_id, MAX_DATA_DISKS),
        )

    def do_AttachDisk(self, p: Params) -> dict:
        inst = self._instance(p)
        disk = self._disk(p)
        if disk["Status"] != "Available":
            raise CloudError(
                "IncorrectDiskStatus",
                "Disk %s is %s; only an Available (detached) disk can be attached." % (disk["DiskId"], disk["Status"]),
                403,
            )
        if inst["Status"] not in ("Running", "Stopped"):
            raise _instance_status(inst, "attach a disk", "Running or Stopped")
        if self._is_vm(inst) and inst["Status"] != "Stopped":
            raise _instance_status(inst, "attach a disk to its virtual machine (vdisk does not hot-plug)", "Stopped")
        if disk["Type"] == "system":
            if any(d["Type"] == "system" for d in self._instance_disks(inst["InstanceId"])):
                raise CloudError(
                    "InvalidOperation.SystemDiskExists",
                    "Instance %s already has a system disk; detach it first." % inst["InstanceId"],
                    403,
                )
            if inst["Status"] != "Stopped":
                raise _instance_status(inst, "attach a system disk", "Stopped")
        disk.update(
            Status="In_use",
            InstanceId=inst["InstanceId"],
            Device=self._next_device(inst["InstanceId"], disk["Type"]),
            AttachedTime=self._now(),
        )
        if p.bool("DeleteWithInstance", default=disk["DeleteWithInstance"]) != disk["DeleteWithInstance"]:
            disk["DeleteWithInstance"] = p.bool("DeleteWithInstance")
        if inst["Status"] == "Running":
            self._require_host("Attaching a disk to a running instance").add_disk(
                inst["InstanceId"], disk["DiskId"], disk["_volume"]
            )
        self._put("disk", disk)
        self.pool.commit_meta()
        return {}

    def do_DetachDisk(self, p: Params) -> dict:
        inst = self._instance(p)
        disk = self._disk(p)
        if disk["Status"] != "In_use" or disk["InstanceId"] != inst["InstanceId"]:
            raise CloudError(
                "IncorrectDiskStatus",
                "Disk %s is not attached to instance %s." % (disk["DiskId"], inst["InstanceId"]),
                403,
            )
        if disk["Type"] == "system" and inst["Status"] != "Stopped":
            raise _instance_status(inst, "detach its system disk", "Stopped")
        if self._is_vm(inst) and inst["Status"] != "Stopped":
            raise _instance_status(inst, "detach a disk from its virtual machine (vdisk does not hot-plug)", "Stopped")
        if inst["Status"] == "Running":
            try:
                self._require_host("Detaching a disk from a running instance").remove_disk(inst["InstanceId"], disk["DiskId"])
            except Busy as exc:
                raise self._busy(exc, "Disk %s cannot be detached" % disk["DiskId"]) from None
        disk.update(Status="Available", InstanceId="", Device="", DetachedTime=self._now())
        self._put("disk", disk)
        self.pool.commit_meta()  # the daemon answers once the writes are durable (DURABLE_AFTER)
        return {}

    def do_ResizeDisk(self, p: Params) -> dict:
        disk = self._disk(p)
        new = p.int("NewSize", required=True)
        if new <= disk["Size"]:
            raise CloudError(
                "InvalidDiskSize.TooSmall",
                "NewSize (%d GiB) must be larger than the disk's current size (%d GiB): disks only grow."
                % (new, disk["Size"]),
            )
        categories.check_disk_spec(disk["Category"], disk.get("PerformanceLevel"), new)
        # the record in the growth's own transaction: both or neither
        self.pool.resize_volume(disk["_volume"], new * GIB, on_resized=lambda: self._put("disk", dict(disk, Size=new)))
        disk["Size"] = new
        self.apply_io_limits([disk])  # the speed grows with the size
        inst = self.pool.get_record("instance/" + disk["InstanceId"]) if disk["InstanceId"] else None
        if inst and inst["Status"] == "Running" and self.host is not None:
            self.host.resized(inst["InstanceId"], disk["DiskId"])
            if self._is_vm(inst) and self.vms is not None:  # the guest sees it at once
                self.vms.resize(inst["InstanceId"], disk["DiskId"].removeprefix("d-"), new * GIB)
        return {}

    def do_ModifyDiskAttribute(self, p: Params) -> dict:
        disk = self._disk(p)
        p.rename(disk, "DiskName")
        if p.req.get("DeleteWithInstance") is not None:
            disk["DeleteWithInstance"] = p.bool("DeleteWithInstance")
        io = self._set_io_limits(p, disk)  # vdisk's own
        if p.req.get("BurstingEnabled") is not None:
            burst = p.bool("BurstingEnabled")
            categories.check_auto(disk["Category"], disk["Size"], None, burst)
            disk["BurstingEnabled"] = burst
            io = True
        self._put("disk", disk)
        self.pool.commit_meta()
        if io:
            self.apply_io_limits([disk])
        return {}

    def do_DeleteDisk(self, p: Params) -> dict:
        disk = self._disk(p)
        if disk["Status"] != "Available":
            raise CloudError(
                "IncorrectDiskStatus",
                "Disk %s is %s (instance %s); detach it before deleting it." % (disk["DiskId"], disk["Status"], disk["InstanceId"]),
                403,
            )
        # the record in the deletion's own transaction: both or neither
        self.pool.delete_volume(disk["_volume"], on_deleted=lambda: self._delete("disk", disk["DiskId"]))
        return {}

    # ------------------------------------------------------------ instances

    def do_CreateInstance(self, p: Params) -> dict:
        name = p.name("InstanceName")
        desc = p.description()
        image = self._image(p) if p.str("ImageId") else None
        itype = self._instance_type(p)
        data_specs = p.struct_list("DataDisk", ("Size", "Category", "PerformanceLevel", "DiskName", "Description", "SnapshotId", "DeleteWithInstance"))
        sysnap = None
        if image is not None:
            maps = image["DiskDeviceMappings"]["DiskDeviceMapping"]
            sysnap = self._get("snapshot", maps[0]["SnapshotId"])
            image_data = []
            for m in maps[1:]:
                spec = {"SnapshotId": m["SnapshotId"]}
                if m["Size"] > self._get("snapshot", m["SnapshotId"])["SourceDiskSize"]:
                    spec["Size"] = m["Size"]  # else: the snapshot's size, at least the category's minimum
                image_data.append(spec)
            # the image's data disks come first, then any the request adds
            data_specs = image_data + data_specs
        system = self._new_disk(p, "SystemDisk.", "system", size_default=None if sysnap else 40, snapshot=sysnap)
        if image is not None:
            system["ImageId"] = image["ImageId"]
        if len(data_specs) > MAX_DATA_DISKS:
            raise CloudError("InstanceDiskNumber.LimitExceed", "An instance can have at most %d data disks." % MAX_DATA_DISKS)
        data = []
        for i, spec in enumerate(data_specs, 1):
            sp = Params({k: v for k, v in spec.items()})
            snap = self._snapshot(sp) if spec.get("SnapshotId") else None
            d = self._new_disk(sp, "", "data", snapshot=snap)
            d["DeleteWithInstance"] = sp.bool("DeleteWithInstance", default=True)
            data.append((d, snap))
        self._dry_run(p)
        inst = {
            "InstanceId": new_id("i"),
            "InstanceName": name or "",
            "Description": desc or "",
            "Status": "Stopped",
            "CreationTime": self._now(),
            "StartTime": "",
            "RegionId": self.region,
            "ZoneId": ZONE,
            "_tags": self._tags_given(p),
        }
        system.update(Status="In_use", InstanceId=inst["InstanceId"], Device="/dev/xvda", AttachedTime=self._now())
        for n, (d, _snap) in enumerate(data):
            d.update(Status="In_use", InstanceId=inst["InstanceId"], Device="/dev/xvd" + "bcdefghijklmnopq"[n], AttachedTime=self._now())
        if image is not None:
            inst["ImageId"] = image["ImageId"]
        if itype is not None:
            inst.update(InstanceType=itype[0], Cpu=itype[1], Memory=itype[2] * 1024)
        self._create_disks([(system, sysnap)] + data, extra=inst)
        return {"InstanceId": inst["InstanceId"], "SystemDiskId": system["DiskId"], "DataDiskIds": [d["DiskId"] for d, _ in data]}

    def do_DescribeInstances(self, p: Params) -> dict:
        ids = p.list("InstanceIds")
        status = p.str("Status")
        match = _matching(p, {"InstanceName": "InstanceName", "ImageId": "ImageId", "InstanceType": "InstanceType"})
        tagged = self._tag_filter(p)
        self._dry_run(p)
        out = []
        for inst in sorted(self._all("instance"), key=lambda r: (r["CreationTime"], r["InstanceId"])):
            if ids and inst["InstanceId"] not in ids:
                continue
            if not match(inst) or not tagged(inst):
                continue
            if status and inst["Status"] != status:
                continue
            out.append(inst)
        res = self._page(p, out, "Instances", "Instance")
        attached: dict[str, list] = {}  # one pass over the disks, not one per instance
        for d in sorted(self._all("disk"), key=lambda d: d["Device"]):
            if d.get("InstanceId") and d["Status"] == "In_use":
                attached.setdefault(d["InstanceId"], []).append(d["DiskId"])
        page = []
        for inst in res["Instances"]["Instance"]:
            rec = {**INSTANCE_FIXED, **self._public(inst)}
            rec["Disks"] = attached.get(inst["InstanceId"], [])
            if inst["Status"] != "Stopped" and self.host is not None:
                rec["DiskDirectory"] = self.host.path(inst["InstanceId"], "")
            vm = self._machine_view(inst)
            if vm is not None:
                rec["VirtualMachine"] = vm
            page.append(rec)
        res["Instances"]["Instance"] = page
        return res

    def do_StartInstance(self, p: Params) -> dict:
        inst = self._instance(p)
        if inst["Status"] != "Stopped":
            raise _instance_status(inst, "start it", "Stopped")
        host = self._require_host("Starting an instance")
        disks = self._instance_disks(inst["InstanceId"])
        if not any(d["Type"] == "system" for d in disks):
            raise CloudError("InvalidOperation.NoSystemDisk", "Instance %s has no system disk; attach one first." % inst["InstanceId"], 403)
        if self._is_vm(inst):
            self._require_vms("Starting a virtual machine")
        self._dry_run(p)
        host.expose(inst["InstanceId"], {d["DiskId"]: d["_volume"] for d in disks})
        try:
            if self._is_vm(inst):
                self._start_machine(inst, disks)  # Running once its agent answers (machine_event)
            inst.update(Status="Starting" if self._is_vm(inst) else "Running", StartTime=self._now(), StoppedReason="")
            self._put("instance", inst)
            self.pool.commit_meta()
        except Exception:
            if self._is_vm(inst) and self.vms.machine(inst["InstanceId"]) is not None:
                self.vms.stop(inst["InstanceId"], force=True)  # its exit withdraws the disks
            else:
                host.withdraw(inst["InstanceId"])
            raise
        return {}

    def do_StopInstance(self, p: Params) -> dict:
        inst = self._instance(p)
        if self._is_vm(inst):
            return self._stop_vm_instance(inst, p)
        if inst["Status"] != "Running":
            raise _instance_status(inst, "stop it", "Running")
        host = self._require_host("Stopping an instance")
        if p.bool("DryRun"):
            busy = host.busy(inst["InstanceId"])
            if busy:
                raise self._busy(Busy(busy), "Instance %s cannot stop" % inst["InstanceId"])
            self._dry_run(p)
        try:
            host.withdraw(inst["InstanceId"])
        except Busy as exc:
            raise self._busy(exc, "Instance %s cannot stop" % inst["InstanceId"]) from None
        inst["Status"] = "Stopped"
        self._put("instance", inst)
        self.pool.commit_meta()  # the daemon answers once the writes are durable (DURABLE_AFTER)
        return {}

    def _stop_vm_instance(self, inst: dict, p: Params) -> dict:
        """Power off (ForceStop: cut the power); the instance is Stopping
        until the machine is gone (machine_event)."""
        force = p.bool("ForceStop")
        # a stop in progress may be forced, as in the cloud's console
        allowed = ("Running", "Starting", "Stopping") if force else ("Running", "Starting")
        if inst["Status"] not in allowed:
            raise _instance_status(inst, "stop it", " or ".join(allowed))
        self._dry_run(p)
        if not self._stop_machine(inst, force):
            self.machine_event(inst["InstanceId"], "gone", "stopped (it had no machine)")
            return {}
        inst["Status"] = "Stopping"
        self._put("instance", inst)
        self.pool.commit_meta()
        return {}

    def do_ModifyInstanceAttribute(self, p: Params) -> dict:
        inst = self._instance(p)
        p.rename(inst, "InstanceName")
        self._put("instance", inst)
        self.pool.commit_meta()
        return {}

    def do_DeleteInstance(self, p: Params) -> dict:
        inst = self._instance(p)
        if inst["Status"] != "Stopped":
            raise _instance_status(inst, "delete it", "Stopped")
        self._dry_run(p)
        disks = self._instance_disks(inst["InstanceId"])
        now = self._now()

        def records():  # in the deletion's own transaction: all or nothing
            for d in disks:
                if d["DeleteWithInstance"]:
                    self._delete("disk", d["DiskId"])
                else:
                    self._put("disk", dict(d, Status="Available", InstanceId="", Device="", DetachedTime=now))
            self._delete("instance", inst["InstanceId"])

        self.pool.delete_volumes([d["_volume"] for d in disks if d["DeleteWithInstance"]], on_deleted=records)
        return {}

    # ------------------------------------------------------------ snapshots

    def _check_can_snapshot(self, disk: dict, manual: bool = True) -> None:
        """Whether disk can be snapshotted now; manual: a user's snapshot
        (counted against the 256 manual snapshots of a disk)."""
        if disk["DiskId"] in self.importing:
            raise CloudError("IncorrectDiskStatus", "Disk %s is being imported into (vdisk disk import-diff) and "
                             "cannot be snapshotted now." % disk["DiskId"], 403)
        if disk["Status"] not in ("In_use", "Available"):
            raise CloudError("IncorrectDiskStatus", "Disk %s is %s and cannot be snapshotted now." % (disk["DiskId"], disk["Status"]), 403)
        if disk["InstanceId"]:
            inst = self._get("instance", disk["InstanceId"])
            if inst["Status"] not in ("Running", "Stopped"):
                raise _instance_status(inst, "snapshot its disks", "Running or Stopped")
        snaps = [s for s in self._all("snapshot") if s["SourceDiskId"] == disk["DiskId"]]
        now = self.clock.now()
        if any(self._progress_view(s, now)["Status"] == "progressing" for s in snaps):
            raise CloudError(
                "IncorrectDiskStatus.CreatingSnapshot",
                "Disk %s already has a snapshot in progress; wait for it to finish." % disk["DiskId"],
                403,
            )
        users = [s for s in snaps if s["SnapshotType"] == "user"]
        limit = int(self.settings.get("max_snapshots_per_disk", MAX_MANUAL_SNAPSHOTS_PER_DISK))
        if manual and len(users) >= limit:
            raise CloudError(
                "QuotaExceed.Snapshot",
                "Disk %s already has %d manual snapshots, the most a disk can have; delete some first." % (disk["DiskId"], limit),
                403,
            )

    def do_CreateSnapshot(self, p: Params) -> dict:
        disk = self._disk(p)
        name = p.name("SnapshotName")
        desc = p.description()
        instant = p.bool("InstantAccess")
        days = p.int("InstantAccessRetentionDays", lo=1, hi=65535)
        retention = p.int("RetentionDays", lo=1, hi=65536)
        tags = self._tags_given(p)
        self._check_can_snapshot(disk)
        snap = self._snapshot_record(disk, name, desc, instant, days, retention)
        snap["_tags"] = tags

        def change(tx, sids):
            snap["_snap"] = sids[0]
            self._put("snapshot", snap)

        self.pool.snapshot([disk["_volume"]], change)
        self._begin_progress([snap])
        return {"SnapshotId": snap["SnapshotId"]}

    def _snapshot_record(self, disk: dict, name, desc, instant: bool, days, retention=None, group_id=None,
                         auto: str | None = None) -> dict:
        """A new snapshot record of disk (the engine snapshot id is added
        later); auto: the automatic snapshot policy that takes it."""
        t = self.clock.now()
        rec = {
            "SnapshotId": new_id("s"),
            "SnapshotName": name or "",
            "Description": desc or "",
            "SourceDiskId": disk["DiskId"],
            "SourceDiskSize": disk["Size"],
            "SourceDiskType": disk["Type"],
            "SourceDiskCategory": disk["Category"],
            "SourceInstanceId": disk["InstanceId"],
            "SnapshotType": "auto" if auto else "user",
            "Status": "accomplished",
            "Progress": "100%",
            "Available": True,
            "InstantAccess": instant,
            "InstantAccessRetentionDays": days if instant else None,
            "RetentionDays": retention,
            "CreationTime": iso(t),
            "Category": "flash" if instant else "standard",
            "_t": t,
        }
        if auto:
            rec["_policy"] = auto
        if group_id:
            rec["SnapshotGroupId"] = group_id
        return rec

    def _snapshot_public(self, s: dict, uses: dict | None = None) -> dict:
        """A snapshot as DescribeSnapshots shows it; uses: _snapshot_uses(),
        when many are shown (read once, not once per snapshot)."""
        now = self.clock.now()
        out = {**SNAPSHOT_FIXED, "RegionId": self.region, "LastModifiedTime": s["CreationTime"], **self._public(s),
               **self._progress_view(s, now)}
        # vdisk's own: when retention and instant access end (the cloud shows the days only)
        created = s.get("_t")
        if created is not None:
            end = schedule.expires_at(created, s.get("RetentionDays"))
            out["RetentionEndTime"] = iso(end) if end is not None else ""
            ia = schedule.expires_at(created, s.get("InstantAccessRetentionDays")) if s.get("InstantAccess") else None
            out["InstantAccessEndTime"] = iso(ia) if ia is not None else ""
        out["Usage"] = (uses if uses is not None else self._snapshot_uses()).get(s["SnapshotId"], "none")
        try:
            u = self.pool.snapshot_usage(s["_snap"])
        except EngineError:
            u = {"exclusive_bytes": 0, "incremental_bytes": 0}
        out["SourceDiskSize"] = s["SourceDiskSize"]
        out["SnapshotSize"] = u["incremental_bytes"]  # billed: what the previous one lacks
        out["ExclusiveSize"] = u["exclusive_bytes"]  # freed if deleted
        return out

    def _snapshot_uses(self) -> dict[str, str]:
        """The cloud's Usage of every snapshot something was made from:
        image, disk or image_disk (the others: none)."""
        made = {}
        for img in self._all("image"):
            for m in img["DiskDeviceMappings"]["DiskDeviceMapping"]:
                made.setdefault(m["SnapshotId"], set()).add("image")
        for d in self._all("disk"):
            if d.get("SourceSnapshotId"):
                made.setdefault(d["SourceSnapshotId"], set()).add("disk")
        return {sid: "image_disk" if len(kinds) == 2 else kinds.pop() for sid, kinds in made.items()}

    def do_DescribeSnapshots(self, p: Params) -> dict:
        ids = p.list("SnapshotIds")
        disk = p.str("DiskId")
        inst = p.str("InstanceId")
        name = p.str("SnapshotName")
        status = p.str("Status", choices=("progressing", "accomplished", "failed", "all"))
        stype = p.str("SnapshotType", choices=("auto", "user", "all"))
        source = p.str("SourceDiskType", choices=("System", "Data", "system", "data"))
        category = p.str("Category", choices=("standard", "flash"))
        tagged = self._tag_filter(p)
        self._dry_run(p)
        now = self.clock.now()
        out = []
        for s in sorted(self._all("snapshot"), key=lambda s: (s["CreationTime"], s["_snap"])):
            if ids and s["SnapshotId"] not in ids:
                continue
            if stype and stype != "all" and s["SnapshotType"] != stype:
                continue
            if source and s["SourceDiskType"] != source.lower():
                continue
            if category and s["Category"] != category:
                continue
            if disk and s["SourceDiskId"] != disk:
                continue
            if inst and s.get("SourceInstanceId") != inst:
                continue
            if name and s["SnapshotName"] != name:
                continue
            if not tagged(s):
                continue
            if status and status != "all" and self._progress_view(s, now)["Status"] != status:
                continue
            out.append(s)
        res = self._page(p, out, "Snapshots", "Snapshot")
        uses = self._snapshot_uses()
        res["Snapshots"]["Snapshot"] = [self._snapshot_public(s, uses) for s in res["Snapshots"]["Snapshot"]]
        return res

    def do_ModifySnapshotAttribute(self, p: Params) -> dict:
        snap = self._snapshot(p)
        p.rename(snap, "SnapshotName")
        self._put("snapshot", snap)
        self.pool.commit_meta()
        return {}

    def do_DeleteSnapshot(self, p: Params) -> dict:
        snap = self._snapshot(p)
        force = p.bool("Force")
        images = self._images_using(snap["SnapshotId"])
        if images:
            raise CloudError(
                "SnapshotCreatedImage",
                "Snapshot %s was used to create image(s) %s; delete the image(s) first." % (snap["SnapshotId"], ", ".join(images)),
                403,
            )
        users = [d["DiskId"] for d in self._all("disk") if d.get("SourceSnapshotId") == snap["SnapshotId"]]
        if users and not force:
            raise CloudError(
                "SnapshotCreatedDisk",
                "Snapshot %s was used to create disk(s) %s; pass Force=true to delete it anyway "
                "(the disks keep their data)." % (snap["SnapshotId"], ", ".join(users)),
                403,
            )
        gid = snap.get("SnapshotGroupId")
        group = self.pool.get_record("snapshotgroup/" + gid) if gid else None

        def records(tx):  # in the deletion's transaction: both or neither
            self._delete("snapshot", snap["SnapshotId"])
            if group is not None:
                group["Members"] = [m for m in group["Members"] if m != snap["SnapshotId"]]
                self.pool.put_record("snapshotgroup/" + gid, group if group["Members"] else None)

        self.pool.delete_snapshots([snap["_snap"]], change=records)
        return {}

    def do_ResetDisk(self, p: Params) -> dict:
        disk = self._disk(p)
        snap = self._snapshot(p)
        self._check_reset(disk, snap)
        self._dry_run(p)
        self.pool.rollback(disk["_volume"], snap["_snap"])
        return {}

    def _check_reset(self, disk: dict, snap: dict) -> None:
        if snap["SourceDiskId"] != disk["DiskId"]:
            raise CloudError(
                "InvalidSnapshotId.NotMatchDisk",
                "Snapshot %s was taken from disk %s, not %s; a disk can only be reset to its own snapshots."
                % (snap["SnapshotId"], snap["SourceDiskId"], disk["DiskId"]),
                403,
            )
        self._usable(snap, "roll a disk back")
        if disk["InstanceId"]:
            inst = self._get("instance", disk["InstanceId"])
            if inst["Status"] != "Stopped":
                raise _instance_status(inst, "reset its disks", "Stopped")

    # ------------------------------------------------------------ pool

    def do_DescribePool(self, p: Params) -> dict:
        st = self.pool.stats()
        return {"Pool": {"Path": self.pool.path, "RegionId": self.region, **{_camel(k): v for k, v in st.items()},
                         "SnapshotUploadRate": self._upload_rate() / 1e6, "Clock": self.clock.describe()}}

    def do_ModifyPoolAttribute(self, p: Params) -> dict:
        """vdisk's own: SnapshotUploadRate (MB/s of simulated time; 0, the
        default, turns the emulated upload off: snapshots are accomplished
        at once); IoLimits (Cloud, the default: every disk at its
        category's speed; Unlimited: as fast as the host goes);
        PoolRegionId (the region this pool stands for: RegionId in answers,
        and where CopySnapshot copies within; vdisk-local by default)."""
        rate = p.int("SnapshotUploadRate", lo=0, hi=1_000_000)
        # not RegionId: every request of the cloud's API may carry that one (the region it is sent to)
        region = p.str("PoolRegionId")
        if region is not None and not REGION_ID.fullmatch(region):
            raise invalid("PoolRegionId", "a region id is a lowercase letter, then 1 to 63 lowercase letters, digits or "
                                      "'-' (cn-hangzhou)")
        io = self._set_io_limits(p)
        if rate is None and not io and region is None:
            raise CloudError("MissingParameter", "ModifyPoolAttribute needs SnapshotUploadRate, IoLimits or PoolRegionId.")
        if rate is not None:
            rec = dict(self.pool.get_record("settings/lifecycle") or {})
            rec["SnapshotUploadRate"] = rate
            self.pool.put_record("settings/lifecycle", rec)
        if region is not None:
            self.pool.put_record("settings/region", {"RegionId": region})
        self.pool.commit_meta()
        if region is not None:
            self.region = region
        if io:
            self.apply_io_limits()
        return {}

    def do_DescribeClock(self, p: Params) -> dict:
        """vdisk's own: the control plane's time (simulated when sped up)."""
        return {"Clock": self.clock.describe()}

    def do_ScrubPool(self, p: Params) -> dict:
        problems = self.pool.scrub(verify_data=not p.bool("MapOnly"))
        return {"Problems": problems, "Clean": not problems}

    def do_TrimPool(self, p: Params) -> dict:
        """vdisk's own: give the host's disk back the pages partial slots do
        not hold (vdisk.engine.trim; writes to the pool wait while it runs)."""
        done = self.pool.trim()
        return {"PartialSlots": done["partial_slots"], "Holes": done["holes"], "TrimmedBytes": done["bytes"],
                "DataFileAllocatedBytesBefore": done["allocated_before"],
                "DataFileAllocatedBytes": done["allocated_after"], "Seconds": round(done["seconds"], 3)}


def _instance_status(inst: dict, what: str, need: str) -> CloudError:
    return CloudError(
        "IncorrectInstanceStatus",
        "Instance %s is %s; to %s it must be %s." % (inst["InstanceId"], inst["Status"], what, need),
        403,
    )


def _camel(k: str) -> str:
    return "".join(w.capitalize() for w in k.split("_"))


def _page(p: Params, items: list, outer: str, inner: str, default_max: int = 100, numbered: bool = False) -> dict:
    """The cloud's paging: MaxResults + NextToken, or PageNumber + PageSize
    (numbered: always, for the actions that take no MaxResults)."""
    if numbered or p.req.get("PageNumber") is not None or p.req.get("PageSize") is not None:
        size = p.int("PageSize", default=10, lo=1, hi=100)
        number = p.int("PageNumber", default=1, lo=1)
        start = (number - 1) * size
        return {
            outer: {inner: items[start : start + size]},
            "TotalCount": len(items),
            "PageNumber": number,
            "PageSize": size,
        }
    maxr = p.int("MaxResults", default=default_max, lo=1, hi=100)
    token = p.str("NextToken", default="")
    try:
        start = int(token) if token else 0
    except ValueError:
        raise CloudError("InvalidParameter.NextToken", "NextToken %r is not one this service issued." % token) from None
    page = items[start : start + maxr]
    res = {outer: {inner: page}, "TotalCount": len(items)}
    if start + maxr < len(items):
        res["NextToken"] = str(start + maxr)
    return res


def _refuse_unapplied(action: str, p: Params) -> None:
    for name in UNAPPLIED_FILTERS.get(action, ()):
        given = [k for k in p.req if (k.startswith(name) if name.endswith(".") else k == name) and p.req[k] not in (None, "")]
        if given:
            raise CloudError(
                "UnsupportedParameter",
                "The parameter %s is not supported: vdisk does not filter %s by it, and an answer that ignored it "
                "would list resources that do not match. Remove it and filter the answer yourself." % (given[0], action),
            )


def _matching(p: Params, text: dict, flags: dict | None = None):
    """A record filter from equality filters: request parameter -> record
    field, for text values and for true/false values."""
    want = {field: p.str(param) for param, field in text.items() if p.req.get(param) is not None}
    want.update({field: p.bool(param) for param, field in (flags or {}).items() if p.req.get(param) is not None})
    return lambda rec: all(rec.get(field) == value for field, value in want.items())


@functools.lru_cache(maxsize=None)
def _known(action: str) -> tuple[re.Pattern, list[str]]:
    """A matcher of the parameter names action takes (the cloud's, vdisk's,
    the common ones), and those names as written, for suggestions."""
    names = list(CLOUD_PARAMS.get(action, ())) + list(VDISK_PARAMS.get(action, ())) + sorted(COMMON_PARAMS)
    alts = []
    for n in names:
        alts.append(re.escape(n).replace(r"\.N", r"\.[0-9]+"))
        if ".N" not in n:
            alts.append(re.escape(n) + r"\.[0-9]+")  # a list sent as Name.1, Name.2, ...
    return re.compile("(?:%s)" % "|".join(alts)), names


def _refuse_unknown(action: str, req: dict) -> None:
    matcher, names = _known(action)
    for key in req:
        if not matcher.fullmatch(key):
            close = difflib.get_close_matches(re.sub(r"\.[0-9]+", ".N", key), names, n=1)
            raise CloudError(
                "UnsupportedParameter",
                "The parameter %s is not one that %s takes (strict mode, VDISK_STRICT)%s"
                % (key, action, "; did you mean %s?" % close[0] if close else "."),
            )
