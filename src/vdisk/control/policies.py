"""Automatic snapshot policies: the cloud's CreateAutoSnapshotPolicy,
ModifyAutoSnapshotPolicyEx, DescribeAutoSnapshotPolicyEx,
DeleteAutoSnapshotPolicy, ApplyAutoSnapshotPolicy and
CancelAutoSnapshotPolicy, with their parameter names (the policy actions
take lower-camel names on the wire: autoSnapshotPolicyId, diskIds,
timePoints ...; the capitalised forms are read too).

A policy applied to disks snapshots each of them at its due times.  Beyond
the cloud, a policy applied to an instance (instanceIds) takes a snapshot
group of the instance's ESSDs at each due time, so that "the same backup
policy for all disks" is also crash-consistent across them.  The policies
are run by lifecycle.py; this module holds their records and rules.

A mixin of Controller.
"""
from __future__ import annotations

from . import schedule
from .clock import iso
from .errors import CloudError
from .validate import Params, check_id, new_id

# The cloud: at most 100 automatic snapshot policies per region and account.
MAX_POLICIES = 100
RETENTION_MAX = 65536


def _param(p: Params, *names: str, required: bool = False):
    """The first of names that the request carries (the cloud's lower-camel
    wire name first), and the name it came under."""
    for n in names:
        if p.req.get(n) is not None:
            return p.req[n], n
    if required:
        raise CloudError("MissingParameter", "The input parameter %s that is mandatory for processing this request "
                         "is not supplied." % names[0])
    return None, names[0]


def _id_list(p: Params, kind: str, *names: str) -> list[str]:
    value, name = _param(p, *names)
    if value is None:  # Name.1, Name.2 ..., or none
        name = names[-1]
        ids = p.list(name)
    else:
        ids = schedule.listed(value, name)
    for i, v in enumerate(ids, 1):
        check_id(kind, v, "%s.%d" % (name, i))
    if len(set(ids)) != len(ids):
        raise CloudError("InvalidParameter", "The parameter %s lists an id twice." % name)
    return ids


class PolicyActions:
    def _policy(self, p: Params) -> dict:
        value, name = _param(p, "autoSnapshotPolicyId", "AutoSnapshotPolicyId", required=True)
        pid = check_id("sp", value, name)
        rec = self.pool.get_record("autosnapshotpolicy/" + pid)
        if rec is None:
            raise CloudError("ParameterInvalid", "The specified automatic snapshot policy %s does not exist." % pid, 404)
        return rec

    def _policy_spec(self, p: Params, rec: dict, creating: bool) -> None:
        """Apply timePoints, repeatWeekdays, retentionDays, the name to rec
        (all checked first; rec untouched when one is refused)."""
        tp, tp_name = _param(p, "timePoints", "TimePoints", required=creating)
        wd, wd_name = _param(p, "repeatWeekdays", "RepeatWeekdays", required=creating)
        rd, rd_name = _param(p, "retentionDays", "RetentionDays", required=creating)
        nm, nm_name = _param(p, "autoSnapshotPolicyName", "AutoSnapshotPolicyName")
        hours = schedule.time_points(tp, tp_name) if tp is not None else rec["_hours"]
        days = schedule.weekdays(wd, wd_name) if wd is not None else rec["_days"]
        retention = rec.get("RetentionDays", -1)
        if rd is not None:
            retention = Params({rd_name: rd}).int(rd_name)
            if retention != -1 and not 1 <= retention <= RETENTION_MAX:
                raise CloudError("InvalidParameter",
                                 "The parameter %s must be -1 (keep until deleted) or 1 to %d days, not %d."
                                 % (rd_name, RETENTION_MAX, retention))
        name = Params({nm_name: nm}).name(nm_name) if nm is not None else None
        rec.update(_hours=hours, _days=days, TimePoints=schedule.shown(hours), RepeatWeekdays=schedule.shown(days),
                   RetentionDays=retention)
        if name is not None:
            rec["AutoSnapshotPolicyName"] = name

    def do_CreateAutoSnapshotPolicy(self, p: Params) -> dict:
        if len(self._all("autosnapshotpolicy")) >= MAX_POLICIES:
            raise CloudError("QuotaExceed.AutoSnapshotPolicy",
                             "A region holds at most %d automatic snapshot policies; delete one first." % MAX_POLICIES, 403)
        rec = {"AutoSnapshotPolicyId": new_id("sp"), "AutoSnapshotPolicyName": "", "_hours": [], "_days": []}
        self._policy_spec(p, rec, creating=True)
        tags = self._tags_given(p)
        now = self.clock.now()
        rec.update(Status="Normal", Type="Custom", RegionId=self.region, CreationTime=iso(now), ResourceGroupId="",
                   EnableCrossRegionCopy=False, TargetCopyRegions="", CopiedSnapshotsRetentionDays=-1,
                   _t=now, _last=now, _tags=tags)
        self.pool.put_record("autosnapshotpolicy/" + rec["AutoSnapshotPolicyId"], rec)
        self.pool.commit_meta()
        return {"AutoSnapshotPolicyId": rec["AutoSnapshotPolicyId"]}

    def do_ModifyAutoSnapshotPolicyEx(self, p: Params) -> dict:
        rec = self._policy(p)
        self._policy_spec(p, rec, creating=False)
        rec["_last"] = self.clock.now()  # new time points count from now, not from the last run
        self.pool.put_record("autosnapshotpolicy/" + rec["AutoSnapshotPolicyId"], rec)
        self.pool.commit_meta()
        return {}

    def _policy_targets(self, pid: str) -> tuple[list[dict], list[dict]]:
        """The disks and the instances a policy is applied to."""
        return ([d for d in self._all("disk") if d.get("AutoSnapshotPolicyId") == pid],
                [i for i in self._all("instance") if i.get("AutoSnapshotPolicyId") == pid])

    def _policy_public(self, rec: dict) -> dict:
        disks, instances = self._policy_targets(rec["AutoSnapshotPolicyId"])
        out = {k: v for k, v in rec.items() if not k.startswith("_")}
        out.update(DiskNums=len(disks), VolumeNums=0, Tags=self._tags_public(rec),
                   # vdisk's own, beside the cloud's fields
                   InstanceNums=len(instances),
                   NextRunTime=iso(schedule.next_due(rec["_hours"], rec["_days"], self.clock.now())))
        return out

    def do_DescribeAutoSnapshotPolicyEx(self, p: Params) -> dict:
        pid = p.str("AutoSnapshotPolicyId")
        name = p.str("AutoSnapshotPolicyName")
        match = self._tag_filter(p)
        out = []
        for rec in sorted(self._all("autosnapshotpolicy"), key=lambda r: (r["_t"], r["AutoSnapshotPolicyId"])):
            if pid and rec["AutoSnapshotPolicyId"] != pid:
                continue
            if name and rec["AutoSnapshotPolicyName"] != name:
                continue
            if not match(rec):
                continue
            out.append(rec)
        res = self._page(p, out, "AutoSnapshotPolicies", "AutoSnapshotPolicy", numbered=True)
        res["AutoSnapshotPolicies"]["AutoSnapshotPolicy"] = [
            self._policy_public(r) for r in res["AutoSnapshotPolicies"]["AutoSnapshotPolicy"]]
        return res

    def do_DeleteAutoSnapshotPolicy(self, p: Params) -> dict:
        """The policy stops applying to its disks and instances; the
        automatic snapshots it took stay, each with its own retention."""
        rec = self._policy(p)
        pid = rec["AutoSnapshotPolicyId"]
        disks, instances = self._policy_targets(pid)
        for d in disks:
            d["AutoSnapshotPolicyId"] = ""
            self._put("disk", d)
        for i in instances:
            i["AutoSnapshotPolicyId"] = ""
            self._put("instance", i)
        self.pool.put_record("autosnapshotpolicy/" + pid, None)
        self.pool.commit_meta()
        return {}

    def _apply_targets(self, p: Params) -> tuple[list[dict], list[dict]]:
        disk_ids = _id_list(p, "d", "diskIds", "DiskIds")
        inst_ids = _id_list(p, "i", "instanceIds", "InstanceIds")
        if not disk_ids and not inst_ids:
            raise CloudError("MissingParameter", "The input parameter diskIds that is mandatory for processing this "
                             "request is not supplied (or vdisk's instanceIds).")
        return [self._get("disk", d) for d in disk_ids], [self._get("instance", i) for i in inst_ids]

    def do_ApplyAutoSnapshotPolicy(self, p: Params) -> dict:
        """Apply a policy to disks (diskIds) and, vdisk's own, to instances
        (instanceIds: a snapshot group of the instance's ESSDs at each due
        time).  A disk or instance has one policy: this one replaces any."""
        rec = self._policy(p)
        disks, instances = self._apply_targets(p)
        for d in disks:
            d["AutoSnapshotPolicyId"] = rec["AutoSnapshotPolicyId"]
            self._put("disk", d)
        for i in instances:
            i["AutoSnapshotPolicyId"] = rec["AutoSnapshotPolicyId"]
            self._put("instance", i)
        self.pool.commit_meta()
        return {}

    def do_CancelAutoSnapshotPolicy(self, p: Params) -> dict:
        """Take the policy off disks (diskIds) and instances (instanceIds).
        With autoSnapshotPolicyId, only that policy is taken off."""
        given = _param(p, "autoSnapshotPolicyId", "AutoSnapshotPolicyId")[0] is not None
        only = self._policy(p)["AutoSnapshotPolicyId"] if given else None
        disks, instances = self._apply_targets(p)
        for kind, recs in (("disk", disks), ("instance", instances)):
            for r in recs:
                if r.get("AutoSnapshotPolicyId") and (only is None or r["AutoSnapshotPolicyId"] == only):
                    r["AutoSnapshotPolicyId"] = ""
                    self._put(kind, r)
        self.pool.commit_meta()
        return {}
