"""The snapshot lifecycle's commands: automatic snapshot policies
(vdisk policy ...), tags (vdisk tag ...), snapshot copies and the clock.

Thin: each command is one cloud action (CreateAutoSnapshotPolicy,
TagResources, CopySnapshot, ...); see vdisk.control.policies and friends.
"""
from __future__ import annotations

import json
import re

from .common import EXIT_OK, EXIT_USAGE, CLIError, _show, _table

POLICY_COLS = [("POLICY", "AutoSnapshotPolicyId"), ("NAME", "AutoSnapshotPolicyName"), ("HOURS(UTC+8)", "TimePoints"),
               ("WEEKDAYS", "RepeatWeekdays"), ("KEEP DAYS", "RetentionDays"), ("DISKS", "DiskNums"),
               ("INSTANCES", "InstanceNums"), ("NEXT RUN", "NextRunTime")]
TAG_TYPES = {"i": "instance", "d": "disk", "s": "snapshot", "m": "image", "sp": "snapshotpolicy", "ssg": "snapshotgroup"}


def _hours(text: str | None) -> str | None:
    """'1,13' or '0-23' as the cloud's JSON array text."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            if not (re.fullmatch(r"[0-9]{1,2}", lo) and re.fullmatch(r"[0-9]{1,2}", hi)):
                raise CLIError("%r is not a range such as 1-5" % part, EXIT_USAGE)
            out += [str(n) for n in range(int(lo), int(hi) + 1)]
        elif part:
            out.append(part)
    return "[%s]" % ",".join('"%s"' % v for v in out)


def _kind(ident: str) -> str:
    prefix = ident.split("-", 1)[0]
    if prefix not in TAG_TYPES:
        raise CLIError("%s is not an instance, disk, snapshot, image, policy or snapshot group id" % ident, EXIT_USAGE)
    return prefix


def cmd_policy_create(app) -> int:
    a = app.args
    res = app.call("CreateAutoSnapshotPolicy", autoSnapshotPolicyName=a.name, timePoints=_hours(a.hours),
                   repeatWeekdays=_hours(a.weekdays), retentionDays=a.retention_days,
                   **tag_params(a.tag))
    app.out(res, res["AutoSnapshotPolicyId"])
    return EXIT_OK


def cmd_policy_modify(app) -> int:
    a = app.args
    res = app.call("ModifyAutoSnapshotPolicyEx", autoSnapshotPolicyId=a.policy, autoSnapshotPolicyName=a.name,
                   timePoints=_hours(a.hours), repeatWeekdays=_hours(a.weekdays), retentionDays=a.retention_days)
    app.out(res, "%s modified" % a.policy)
    return EXIT_OK


def _ranges(text: str) -> str:
    """'["0","1","2","6"]' as 0-2,6 for a table."""
    try:
        values = sorted(int(v) for v in json.loads(text))
    except (ValueError, TypeError):
        return text
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else "%d-%d" % (values[i], values[j]))
        i = j + 1
    return ",".join(out)


def cmd_policy_list(app) -> int:
    res = app.call("DescribeAutoSnapshotPolicyEx", PageSize=100)
    rows = [dict(r, TimePoints=_ranges(r["TimePoints"]), RepeatWeekdays=_ranges(r["RepeatWeekdays"]))
            for r in res["AutoSnapshotPolicies"]["AutoSnapshotPolicy"]]
    app.out(res, _table(rows, POLICY_COLS) or "no policies")
    return EXIT_OK


def cmd_policy_show(app) -> int:
    rows = app.call("DescribeAutoSnapshotPolicyEx", AutoSnapshotPolicyId=app.args.policy)["AutoSnapshotPolicies"]["AutoSnapshotPolicy"]
    if not rows:
        raise CLIError("policy %s does not exist (ParameterInvalid)" % app.args.policy)
    app.out(rows[0], _show(rows[0]))
    return EXIT_OK


def cmd_policy_delete(app) -> int:
    res = app.call("DeleteAutoSnapshotPolicy", autoSnapshotPolicyId=app.args.policy)
    app.out(res, "%s deleted" % app.args.policy)
    return EXIT_OK


def _targets(ids: list[str]) -> dict:
    disks = [i for i in ids if _kind(i) == "d"]
    insts = [i for i in ids if _kind(i) == "i"]
    if len(disks) + len(insts) != len(ids):
        raise CLIError("a policy applies to disks (d-...) and instances (i-...) only", EXIT_USAGE)
    out = {}
    if disks:
        out["diskIds"] = disks
    if insts:
        out["instanceIds"] = insts
    return out


def cmd_policy_apply(app) -> int:
    res = app.call("ApplyAutoSnapshotPolicy", autoSnapshotPolicyId=app.args.policy, **_targets(app.args.target))
    app.out(res, "%s applied to %s" % (app.args.policy, ", ".join(app.args.target)))
    return EXIT_OK


def cmd_policy_cancel(app) -> int:
    res = app.call("CancelAutoSnapshotPolicy", autoSnapshotPolicyId=app.args.policy, **_targets(app.args.target))
    app.out(res, "automatic snapshots off for %s" % ", ".join(app.args.target))
    return EXIT_OK


def tag_params(pairs: list[str] | None, name: str = "Tag") -> dict:
    out = {}
    for n, pair in enumerate(pairs or [], 1):
        key, sep, value = pair.partition("=")
        out["%s.%d.Key" % (name, n)] = key
        if sep:
            out["%s.%d.Value" % (name, n)] = value
    return out


def cmd_tag_add(app) -> int:
    a = app.args
    res = app.call("TagResources", ResourceType=TAG_TYPES[_kind(a.resource)], ResourceId=[a.resource],
                   **tag_params(a.tags))
    app.out(res, "%s tagged" % a.resource)
    return EXIT_OK


def cmd_tag_remove(app) -> int:
    a = app.args
    res = app.call("UntagResources", ResourceType=TAG_TYPES[_kind(a.resource)], ResourceId=[a.resource],
                   TagKey=a.keys or None, All=True if a.all else None)
    app.out(res, "tags removed from %s" % a.resource)
    return EXIT_OK


def cmd_tag_list(app) -> int:
    a = app.args
    if a.resource:
        res = app.call("ListTagResources", ResourceType=TAG_TYPES[_kind(a.resource)], ResourceId=[a.resource])
    elif a.type and a.tag:
        res = app.call("ListTagResources", ResourceType=a.type, **tag_params(a.tag))
    else:
        raise CLIError("give a resource id, or --type and --tag KEY[=VALUE]", EXIT_USAGE)
    rows = res["TagResources"]["TagResource"]
    app.out(res, _table(rows, [("RESOURCE", "ResourceId"), ("TYPE", "ResourceType"), ("KEY", "TagKey"),
                               ("VALUE", "TagValue")]) or "no tags")
    return EXIT_OK


def cmd_snapshot_copy(app) -> int:
    a = app.args
    res = app.call("CopySnapshot", SnapshotId=a.snapshot, DestinationRegionId=a.region or _region(app),
                   DestinationSnapshotName=a.name, DestinationSnapshotDescription=a.description,
                   RetentionDays=a.retention_days)
    app.out(res, res["SnapshotId"])
    return EXIT_OK


def _region(app) -> str:
    """The pool's own region (vdisk pool set --region)."""
    return app.call("DescribePool")["Pool"]["RegionId"]


def cmd_clock_show(app) -> int:
    res = app.call("DescribeClock")
    app.out(res, _show(res["Clock"]))
    return EXIT_OK


def cmd_pool_set(app) -> int:
    req, said = {}, []
    if app.args.snapshot_upload_rate is not None:
        req["SnapshotUploadRate"] = app.args.snapshot_upload_rate
        said.append("snapshot upload emulation: %s" % (
            "%d MB/s" % app.args.snapshot_upload_rate if app.args.snapshot_upload_rate else "off"))
    if app.args.io_limits is not None:
        req["IoLimits"] = {"cloud": "Cloud", "unlimited": "Unlimited"}[app.args.io_limits]
        said.append("disks' I/O: %s" % ("at their category's speed" if app.args.io_limits == "cloud" else "unlimited"))
    if getattr(app.args, "region", None) is not None:
        req["PoolRegionId"] = app.args.region
        said.append("region: %s" % app.args.region)
    if not req:
        raise CLIError("say what to set: --snapshot-upload-rate, --io-limits and/or --region", EXIT_USAGE)
    res = app.call("ModifyPoolAttribute", **req)
    app.out(res, "\n".join(said))
    return EXIT_OK


def register(group, verb) -> None:
    """Add the commands to the parser (main.build_parser's helpers)."""
    g = group("policy", "automatic snapshot policies: snapshots of disks, or snapshot groups of instances, "
              "at set hours (UTC+8) and weekdays, kept for set days")
    v = verb(g, "create", cmd_policy_create, "create a policy (CreateAutoSnapshotPolicy)")
    v.add_argument("--hours", required=True, metavar="H[,H...]", help="hours of the day, UTC+8 (0-23; ranges like 0-23)")
    v.add_argument("--weekdays", default="1-7", metavar="D[,D...]", help="days of the week, 1=Monday..7 (default 1-7)")
    v.add_argument("--retention-days", type=int, default=-1, metavar="DAYS", help="keep each snapshot DAYS days "
                   "(-1, the default: until deleted)")
    v.add_argument("--name")
    v.add_argument("--tag", action="append", metavar="KEY[=VALUE]")
    v = verb(g, "modify", cmd_policy_modify, "change a policy (ModifyAutoSnapshotPolicyEx)")
    v.add_argument("policy", metavar="POLICY_ID")
    v.add_argument("--hours", metavar="H[,H...]")
    v.add_argument("--weekdays", metavar="D[,D...]")
    v.add_argument("--retention-days", type=int, metavar="DAYS")
    v.add_argument("--name")
    verb(g, "list", cmd_policy_list, "list policies")
    verb(g, "show", cmd_policy_show, "show one policy").add_argument("policy", metavar="POLICY_ID")
    verb(g, "delete", cmd_policy_delete, "delete a policy (its snapshots stay)").add_argument("policy", metavar="POLICY_ID")
    for name, func, help_ in (
        ("apply", cmd_policy_apply, "apply a policy to disks and instances (an instance: one snapshot group of its "
         "ESSDs at each due time)"),
        ("cancel", cmd_policy_cancel, "take a policy off disks and instances"),
    ):
        v = verb(g, name, func, help_)
        v.add_argument("policy", metavar="POLICY_ID")
        v.add_argument("target", nargs="+", metavar="DISK_ID|INSTANCE_ID")

    g = group("tag", "tags on instances, disks, snapshots, groups, images and policies")
    v = verb(g, "add", cmd_tag_add, "add or change tags (TagResources)")
    v.add_argument("resource", metavar="ID")
    v.add_argument("tags", nargs="+", metavar="KEY=VALUE")
    v = verb(g, "remove", cmd_tag_remove, "remove tags (UntagResources)")
    v.add_argument("resource", metavar="ID")
    v.add_argument("keys", nargs="*", metavar="KEY")
    v.add_argument("--all", action="store_true", help="remove every tag")
    v = verb(g, "list", cmd_tag_list, "list a resource's tags, or the resources of a type with a tag (ListTagResources)")
    v.add_argument("resource", nargs="?", metavar="ID")
    v.add_argument("--type", choices=sorted(TAG_TYPES.values()))
    v.add_argument("--tag", action="append", metavar="KEY[=VALUE]")

    g = group("clock", "the control plane's clock (sped up with vdisk daemon start --clock-speed)")
    verb(g, "show", cmd_clock_show, "the current (simulated) time, its speed, and the policy time zone")
