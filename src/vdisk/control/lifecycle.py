"""What happens to snapshots as time passes: automatic snapshot policies run
at their due times, snapshots and groups past their RetentionDays are
deleted, instant access ends after InstantAccessRetentionDays, and (when the
pool emulates the cloud's upload time) progressing snapshots complete.

advance() does all that is due at the clock's current time (clock.py) and
says when something is next due.  The daemon calls it from one task, under
its control lock like any action, whenever that time comes or an action
changed something; the offline CLI never does (nothing runs on a schedule
without the daemon, as nothing runs in the cloud's region while it is down).

Rules (docs/consistency.md, "Snapshot lifecycle"):
- A policy is due at each of its TimePoints (UTC+8) on its RepeatWeekdays.
  A disk whose previous snapshot is still progressing is skipped, as the
  cloud skips it; so is a disk that cannot be snapshotted now (its instance
  is Starting or Stopping).  An instance's run is one snapshot group of its
  ESSDs, or nothing (never a partial group).
- A due time that passed while the daemon was down is skipped, not made up
  (the cloud does not take yesterday's snapshot today); it is logged.
- Expiry deletes oldest first.  A snapshot that a disk or image was created
  from is kept past its retention (the cloud does not delete those either);
  a group expires as a whole, so it is kept whole while one member is used.

A mixin of Controller.
"""
from __future__ import annotations

import logging
import math

from ..engine.errors import EngineError
from . import schedule
from .clock import iso, parse_iso
from .errors import CloudError

log = logging.getLogger(__name__)


class LifecycleActions:
    lifecycle_started: float | None = None  # simulated time the daemon began running policies

    def start_lifecycle(self) -> None:
        """The daemon begins to run the schedule: due times before now were
        missed while it was down."""
        self.lifecycle_started = self.clock.now()

    # ------------------------------------------------------------ progress

    def _upload_rate(self) -> float:
        """Bytes per (simulated) second of the emulated upload, 0 when off."""
        rec = self.pool.get_record("settings/lifecycle") or {}
        return float(rec.get("SnapshotUploadRate", 0)) * 1e6

    def _begin_progress(self, snaps: list[dict]) -> None:
        """With upload emulation on, mark just-taken snapshots progressing for
        as long as their data (full for a disk's first snapshot, the change
        since the previous one after that) takes at the configured rate.
        The data was captured already; only the reported lifecycle changes."""
        rate = self._upload_rate()
        if not rate or not snaps:
            return
        now = self.clock.now()
        for s in snaps:
            try:
                size = self.pool.snapshot_usage(s["_snap"])["incremental_bytes"]
            except EngineError:
                continue
            if size <= 0:
                continue
            s.update(Status="progressing", Progress="0%", Available=bool(s.get("InstantAccess")),
                     _started=now, _done_at=now + size / rate, _upload_bytes=size)
            self._put("snapshot", s)
        self.pool.commit_meta()

    @staticmethod
    def _progress_view(s: dict, now: float) -> dict:
        """Status, Progress, RemainTime and Available of a snapshot at now."""
        done = s.get("_done_at")
        if s.get("Status") != "progressing" or done is None:
            return {"Status": s["Status"], "Progress": s["Progress"], "RemainTime": 0, "Available": s.get("Available", True)}
        if now >= done:
            return {"Status": "accomplished", "Progress": "100%", "RemainTime": 0, "Available": True}
        span = max(done - s["_started"], 1e-9)
        pct = min(99, int(100 * (now - s["_started"]) / span))
        return {"Status": "progressing", "Progress": "%d%%" % pct, "RemainTime": int(math.ceil(done - now)),
                "Available": bool(s.get("InstantAccess"))}

    def _usable(self, snap: dict, what: str) -> None:
        """Refuse to use a snapshot that is still progressing without instant
        access (to create a disk, roll back, make an image)."""
        view = self._progress_view(snap, self.clock.now())
        if view["Status"] == "accomplished" or (view["Status"] == "progressing" and view["Available"]):
            return
        raise CloudError(
            "IncorrectSnapshotStatus",
            "Snapshot %s is %s (%s, %d s left) and has no instant access; it cannot %s until it is accomplished."
            % (snap["SnapshotId"], view["Status"], view["Progress"], view["RemainTime"], what),
            403,
        )

    # ------------------------------------------------------------ the schedule

    def advance(self) -> float | None:
        """Do everything that is due now; the simulated time at which
        something is next due (None: nothing ever is)."""
        now = self.clock.now()
        self._settle_progress(now)
        self._end_instant_access(now)
        self._expire(now)
        self._run_policies(now)
        # from the time this began: what fell due while it ran is next (at once)
        return self._next_event(now)

    def _settle_progress(self, now: float) -> None:
        changed = False
        for s in self._all("snapshot"):
            if s.get("Status") == "progressing" and self._progress_view(s, now)["Status"] == "accomplished":
                s.update(Status="accomplished", Progress="100%", Available=True)
                self._put("snapshot", s)
                changed = True
        for g in self._all("snapshotgroup"):  # after its members: their records are staged already
            if g.get("Status") == "progressing" and self._group_progress(g, now)[0] == "accomplished":
                g.update(Status="accomplished", ProgressStatus="100%")
                self.pool.put_record("snapshotgroup/" + g["SnapshotGroupId"], g)
                changed = True
        if changed:
            self.pool.commit_meta()

    def _end_instant_access(self, now: float) -> None:
        changed = False
        for kind, key in (("snapshot", "SnapshotId"), ("snapshotgroup", "SnapshotGroupId")):
            for r in self._all(kind):
                end = schedule.expires_at(_created(r), r.get("InstantAccessRetentionDays")) if r.get("InstantAccess") else None
                if end is not None and end <= now:
                    r["InstantAccess"] = False
                    if kind == "snapshot":
                        r["Category"] = "standard"
                    self.pool.put_record("%s/%s" % (kind, r[key]), r)
                    changed = True
                    log.info("instant access of %s %s ended (InstantAccessRetentionDays %s)", kind, r[key],
                             r["InstantAccessRetentionDays"])
        if changed:
            self.pool.commit_meta()

    def _expire(self, now: float) -> None:
        """Delete what is past its RetentionDays, oldest first, in one
        transaction; keep what a disk or image was made from."""
        uses = self._snapshot_uses()
        doomed = []
        snaps = {s["SnapshotId"]: s for s in self._all("snapshot")}
        for g in sorted(self._all("snapshotgroup"), key=_created):
            end = schedule.expires_at(_created(g), g.get("RetentionDays"))
            if end is None or end > now:
                continue
            members = [snaps[m] for m in g["Members"] if m in snaps]
            used = [m["SnapshotId"] for m in members if m["SnapshotId"] in uses]
            if used:
                self._note_kept("snapshot group %s is past its retention but kept whole: %s made disks or images"
                                % (g["SnapshotGroupId"], ", ".join(used)))
                continue
            doomed += members
            self.pool.put_record("snapshotgroup/" + g["SnapshotGroupId"], None)
            log.info("snapshot group %s expired (RetentionDays %s): deleted", g["SnapshotGroupId"], g["RetentionDays"])
        for s in sorted(snaps.values(), key=_created):
            if s.get("SnapshotGroupId"):
                continue  # expires with its group
            end = schedule.expires_at(_created(s), s.get("RetentionDays"))
            if end is None or end > now:
                continue
            if s["SnapshotId"] in uses:
                self._note_kept("snapshot %s is past its retention but kept: a disk or image was made from it"
                                % s["SnapshotId"])
                continue
            doomed.append(s)
            log.info("snapshot %s expired (RetentionDays %s): deleted", s["SnapshotId"], s["RetentionDays"])
        if not doomed:
            return
        for s in doomed:
            self._delete("snapshot", s["SnapshotId"])
        try:
            self.pool.delete_snapshots([s["_snap"] for s in doomed])
        except EngineError as exc:
            self.pool.drop_staged_records()
            log.error("expiring %d snapshot(s) failed, retried later: %s", len(doomed), exc)

    def _note_kept(self, message: str) -> None:
        """Log once per daemon that something is kept past its retention."""
        noted = self.__dict__.setdefault("_kept_noted", set())
        if message not in noted:
            noted.add(message)
            log.info("%s", message)

    def _run_policies(self, now: float) -> None:
        for pol in sorted(self._all("autosnapshotpolicy"), key=lambda r: r["AutoSnapshotPolicyId"]):
            due = schedule.latest_due(pol["_hours"], pol["_days"], pol["_last"], now)
            if due is None:
                continue
            pol["_last"] = now
            started = self.lifecycle_started if self.lifecycle_started is not None else now
            if due < started:
                log.warning("policy %s was due at %s while the daemon was down: that run is skipped",
                            pol["AutoSnapshotPolicyId"], iso(due))
                pol.update(LastSkippedTime=iso(due))
                self.pool.put_record("autosnapshotpolicy/" + pol["AutoSnapshotPolicyId"], pol)
                self.pool.commit_meta()
                continue
            pol.update(LastRunTime=iso(due))
            self.pool.put_record("autosnapshotpolicy/" + pol["AutoSnapshotPolicyId"], pol)
            self.pool.commit_meta()
            self._run_policy(pol, due)

    def _run_policy(self, pol: dict, due: float) -> None:
        pid = pol["AutoSnapshotPolicyId"]
        name = schedule.auto_name(due, pol["_hours"])
        retention = None if pol["RetentionDays"] == -1 else pol["RetentionDays"]
        disks = []
        for d in sorted(self._all("disk"), key=lambda d: d["DiskId"]):
            if d.get("AutoSnapshotPolicyId") != pid:
                continue
            try:
                self._check_can_snapshot(d, manual=False)
            except CloudError as exc:
                log.info("policy %s skips disk %s at %s: %s", pid, d["DiskId"], iso(due), exc.message)
                continue
            disks.append(d)
        if disks:
            snaps = [self._snapshot_record(d, name, "", False, None, retention, auto=pid) for d in disks]

            def change(tx, sids):
                for s, sid in zip(snaps, sids):
                    s["_snap"] = sid
                    self._put("snapshot", s)

            try:
                self.pool.snapshot([d["_volume"] for d in disks], change)
            except EngineError as exc:
                self.pool.drop_staged_records()
                log.error("policy %s could not snapshot %d disk(s) at %s: %s", pid, len(disks), iso(due), exc)
            else:
                log.info("policy %s took %s of %d disk(s)", pid, name, len(disks))
                self._begin_progress(snaps)
        for inst in sorted(self._all("instance"), key=lambda i: i["InstanceId"]):
            if inst.get("AutoSnapshotPolicyId") == pid:
                self._run_instance_policy(pol, inst, name, retention, due)

    def _run_instance_policy(self, pol: dict, inst: dict, name: str, retention, due: float) -> None:
        pid, iid = pol["AutoSnapshotPolicyId"], inst["InstanceId"]
        disks = [d for d in self._instance_disks(iid) if d["Category"] == "cloud_essd"]
        try:
            if not disks:
                raise CloudError("InvalidParameter.NoDisk", "it has no ESSD")
            for d in disks:
                self._check_can_snapshot(d, manual=False)
        except CloudError as exc:
            log.info("policy %s skips instance %s at %s (no partial group): %s", pid, iid, iso(due), exc.message)
            return
        try:
            gid = self._take_group(inst, disks, name=name, description="", instant=False, days=None,
                                   retention=retention, auto=pid)
        except CloudError as exc:
            log.error("policy %s could not take a snapshot group of instance %s at %s: %s", pid, iid, iso(due), exc.message)
            return
        log.info("policy %s took snapshot group %s of instance %s (%d disks)", pid, gid, iid, len(disks))

    def _next_event(self, now: float) -> float | None:
        times = [schedule.next_due(pol["_hours"], pol["_days"], now) for pol in self._all("autosnapshotpolicy")]
        for kind in ("snapshot", "snapshotgroup"):
            for r in self._all(kind):
                if r.get("Status") == "progressing" and r.get("_done_at"):
                    times.append(r["_done_at"])
                if r.get("InstantAccess"):
                    times.append(schedule.expires_at(_created(r), r.get("InstantAccessRetentionDays")))
                if not (kind == "snapshot" and r.get("SnapshotGroupId")):  # a member expires with its group
                    times.append(schedule.expires_at(_created(r), r.get("RetentionDays")))
        # past ones are done, or kept (made disks or images): an action that
        # ends that use wakes the schedule again
        future = [t for t in times if t is not None and t > now]
        return min(future) if future else None


def _created(rec: dict) -> float:
    """A record's creation time on the clock (seconds)."""
    return rec["_t"] if "_t" in rec else parse_iso(rec["CreationTime"])
