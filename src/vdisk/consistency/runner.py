"""Run crash-consistency trials and report them (scripts/consistency).

Each trial: make the scenario's layout on fresh vdisk disks attached as loop
devices with direct I/O, run its workload, snapshot the disks under load
(an instance snapshot, or -- the control -- per-disk snapshots taken one
after another in random order with a gap), stop, restore new disks from the
snapshots, attach them and check them as after a power cut.  With the barrier
every restore must be consistent; the staggered control must catch
inconsistencies, or the scenario is not sensitive enough to prove anything.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time

from ..config import Paths
from ..control.machines import DEFAULT_INSTANCE_TYPE
from ..daemon import client
from ..harness import VDiskEnv
from ..host import loop
from .scenarios import SCENARIOS, Scenario


class HookScenario(Scenario):
    """The user's own workload: VDISK_DEVICES names the loop devices (space
    separated) for both commands.  The load command runs until SIGTERM (it
    makes the layout itself on its first start); the check command gets the
    restored copies and exits 0 when they are consistent."""

    name = "hook"

    def __init__(self, workdir, load: str, check: str, ndisks: int):
        super().__init__(workdir)
        self.load_cmd, self.check_cmd, self.ndisks = load, check, ndisks

    def create(self, devs):
        self.devs = devs

    def start(self, seed):
        env = dict(os.environ, VDISK_DEVICES=" ".join(self.devs), VDISK_SEED=str(seed))
        self.proc = subprocess.Popen(shlex.split(self.load_cmd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def release(self):
        pass

    def durable_before(self, t_ns):
        return {}

    def durable_count(self, expected, t_ns):
        return 0

    def check(self, devs, expected):
        env = dict(os.environ, VDISK_DEVICES=" ".join(devs))
        r = subprocess.run(shlex.split(self.check_cmd), env=env, capture_output=True, text=True, timeout=1800)
        return [] if r.returncode == 0 else ["check command exit %d: %s" % (r.returncode, (r.stdout + r.stderr).strip()[-500:])]


# units of work (files, transactions) a guest's workload has acknowledged
# before a trial's snapshot is taken
VM_MIN_PROGRESS = 40


class Runner:
    def __init__(self, env: VDiskEnv, warmup: float = 1.5, progress=print, staggered_order: str = "random"):
        self.env = env
        self.staggered_order = staggered_order
        self.paths = Paths.resolve(env.data, env.mnt)
        self.warmup = warmup
        self.images: dict[str, str | None] = {}  # scenario -> the image its guests boot
        self.progress = progress

    def call(self, action, **params):
        r = client.call(self.paths, {"Action": action, **params})
        if "Code" in r:
            raise RuntimeError("%s: %s (%s)" % (action, r["Message"], r["Code"]))
        return r

    def file_of(self, disk: str) -> str:
        return self.call("DescribeDisks", DiskIds=[disk])["Disks"]["Disk"][0]["FilePath"]

    def trial(self, scen: Scenario, iid: str, disks: list[str], mode: str, gap: float, rng: random.Random) -> dict:
        devs, copies, copy_devs, snaps = [], [], [], []
        result = {"scenario": scen.name, "mode": mode}
        try:
            devs = [loop.attach(self.file_of(d)) for d in disks]
            scen.create(devs)
            scen.start(rng.randrange(1 << 30))
            time.sleep(self.warmup)
            t0 = time.monotonic_ns()
            snaps = self._snapshot(scen, iid, disks, mode, gap, rng, result)
            result["snapshot_ms"] = (time.monotonic_ns() - t0) / 1e6
            time.sleep(0.3)
            scen.stop()
            scen.release()
            for dev in devs:
                loop.detach(dev)
            devs = []
            expected = scen.durable_before(t0)
            result["durable_before"] = scen.durable_count(expected, t0)
            for s in snaps:
                d = self.call("CreateDisk", SnapshotId=s, DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"]
                copies.append(d)
                self.call("AttachDisk", InstanceId=iid, DiskId=d)
                copy_devs.append(loop.attach(self.file_of(d)))
            problems = scen.check(copy_devs, expected)
            result["consistent"] = not problems
            result["problems"] = problems
        except Exception as exc:  # noqa: BLE001 - a broken trial is reported, not hidden
            result["consistent"] = None
            result["error"] = "%s: %s" % (type(exc).__name__, exc)
        finally:
            scen.cleanup()
            for dev in devs + copy_devs:
                try:
                    loop.detach(dev)
                except loop.LoopError:
                    pass
            for d in copies:
                for action, params in (("DetachDisk", {"InstanceId": iid}), ("DeleteDisk", {})):
                    try:
                        self.call(action, DiskId=d, **params)
                    except RuntimeError:
                        pass
            for s in snaps:
                if s:
                    try:
                        self.call("DeleteSnapshot", SnapshotId=s, Force=True)
                    except RuntimeError:
                        pass
        return result

    # ------------------------------------------------------------ in a guest

    def _system_image(self, scen) -> str | None:
        """The image a guest scenario boots (a Debian system with its
        packages, `vdisk guest rootfs` + `vdisk image import`), made once per
        run; None: vdisk's initramfs alone."""
        pkgs = getattr(scen, "image_packages", None)
        if not pkgs:
            return None
        from ..vm import assets, system_image

        rootfs = assets.rootfs(list(pkgs), progress=self.progress)
        return system_image.import_rootfs(self.call, rootfs, "cons-" + scen.name, None, self.progress)["ImageId"]

    def _vm_instance(self, ndata: int, name: str, image: str | None = None) -> tuple[str, list[str]]:
        params = {"InstanceName": name, "InstanceType": DEFAULT_INSTANCE_TYPE, "SystemDisk.PerformanceLevel": "PL0"}
        params.update({"ImageId": image} if image else {"SystemDisk.Size": 1})
        for i in range(1, ndata + 1):
            params.update({"DataDisk.%d.Size" % i: 1, "DataDisk.%d.Category" % i: "cloud_essd",
                           "DataDisk.%d.PerformanceLevel" % i: "PL0"})
        res = self.call("CreateInstance", **params)
        return res["InstanceId"], res["DataDiskIds"]

    def _wait_status(self, iid: str, want: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            inst = self.call("DescribeInstances", InstanceIds=[iid])["Instances"]["Instance"][0]
            if inst["Status"] == want:
                return inst
            if want == "Running" and inst["Status"] == "Stopped":
                raise RuntimeError("instance %s did not boot: %s" % (iid, inst.get("StoppedReason")))
            if time.monotonic() > deadline:
                raise RuntimeError("instance %s is still %s after %d s" % (iid, inst["Status"], timeout))
            time.sleep(0.2)

    def _invocation(self, invoke_id: str) -> dict:
        r = self.call("DescribeInvocationResults", InvokeId=invoke_id, ContentEncoding="PlainText")
        return r["Invocation"]["InvocationResults"]["InvocationResult"][0]

    def guest_run(self, iid: str, script: str, timeout: int = 600) -> str:
        """Run a script in the guest and wait: its output (exit 0 required)."""
        inv = self.call("RunCommand", Type="RunShellScript", CommandContent=script, InstanceId=[iid], Timeout=timeout)
        while True:
            r = self._invocation(inv["InvokeId"])
            if r["InvocationStatus"] != "Running":
                break
            time.sleep(0.2)
        if r["InvocationStatus"] != "Success":
            raise RuntimeError("in the guest: %s (%s): %s" % (r["ErrorInfo"], r["ErrorCode"], r["Output"].strip()[-500:]))
        return r["Output"]

    def _power_cut(self, iid: str) -> None:
        inst = self.call("DescribeInstances", InstanceIds=[iid])["Instances"]["Instance"][0]
        if inst["Status"] != "Stopped":
            self.call("StopInstance", InstanceId=iid, ForceStop=True)
            self._wait_status(iid, "Stopped", 120)

    def vm_trial(self, scen, iid: str, disks: list[str], mode: str, gap: float, rng: random.Random) -> dict:
        """One trial of a scenario that runs in a guest (vdisk.consistency.guest)."""
        result = {"scenario": scen.name, "mode": mode}
        snaps, checker = [], None
        try:
            self.call("StartInstance", InstanceId=iid)
            self._wait_status(iid, "Running")
            self.guest_run(iid, scen.setup_script(), timeout=600)
            seed = rng.randrange(1 << 30)
            load = self.call("RunCommand", Type="RunShellScript", CommandContent=scen.load_script(seed),
                             InstanceId=[iid], Timeout=86400)["InvokeId"]
            # the guest starts its writers first; under software emulation a
            # cold guest may take seconds before its first commits, so wait
            # for the workload's progress (at most a minute), not a fixed time
            time.sleep(self.warmup + 1.5)
            deadline = time.monotonic() + 60
            while True:
                # what the daemon had received before the snapshot began was durable before it
                before = scen.acked(self._invocation(load)["Output"])
                if scen.durable_count(before) >= VM_MIN_PROGRESS or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            t0 = time.monotonic_ns()
            snaps = self._snapshot(scen, iid, disks, mode, gap, rng, result)
            result["snapshot_ms"] = (time.monotonic_ns() - t0) / 1e6
            time.sleep(0.3)
            self._power_cut(iid)
            after = scen.acked(self._invocation(load)["Output"])
            result["durable_before"] = scen.durable_count(before)
            copies = [self.call("CreateDisk", SnapshotId=s, DiskCategory="cloud_essd", PerformanceLevel="PL0")["DiskId"]
                      for s in snaps]
            checker = self._vm_instance(0, "check", self.images.get(scen.name))[0]
            for d in copies:
                self.call("AttachDisk", InstanceId=checker, DiskId=d, DeleteWithInstance=True)
            self.call("StartInstance", InstanceId=checker)
            self._wait_status(checker, "Running")
            out = self.guest_run(checker, scen.check_script(seed, after), timeout=1800)
            problems = scen.judge(out, before)
            result["consistent"] = not problems
            result["problems"] = problems
        except Exception as exc:  # noqa: BLE001 - a broken trial is reported, not hidden
            result["consistent"] = None
            result["error"] = "%s: %s" % (type(exc).__name__, exc)
        finally:
            for inst in (iid, checker):
                if inst is None:
                    continue
                try:
                    self._power_cut(inst)
                except RuntimeError:
                    pass
            if checker is not None:
                try:
                    self.call("DeleteInstance", InstanceId=checker)
                except RuntimeError:
                    pass
            for s in snaps:
                try:
                    self.call("DeleteSnapshot", SnapshotId=s, Force=True)
                except RuntimeError:
                    pass
        return result

    def _snapshot(self, scen, iid, disks, mode, gap, rng, result) -> list[str]:
        """An instance snapshot of the disks, or (the control) per-disk
        snapshots in random or reverse order, gap seconds apart."""
        if mode == "atomic":
            gid = self.call("CreateSnapshotGroup", InstanceId=iid, DiskId=disks)["SnapshotGroupId"]
            g = self.call("DescribeSnapshotGroups", SnapshotGroupId=[gid])["SnapshotGroups"]["SnapshotGroup"][0]
            by_disk = {m["SourceDiskId"]: m["SnapshotId"] for m in g["Snapshots"]["Snapshot"]}
            return [by_disk[d] for d in disks]
        if self.staggered_order == "reverse":  # the order the layout is known to break in
            order = getattr(scen, "control_order", None) or list(reversed(range(len(disks))))
        else:
            order = sorted(range(len(disks)), key=lambda _: rng.random())
        result["order"] = order
        snaps = [None] * len(disks)
        for n, i in enumerate(order):
            if n:
                time.sleep(gap)
            snaps[i] = self.call("CreateSnapshot", DiskId=disks[i])["SnapshotId"]
        return snaps

    def scenario(self, scen: Scenario, trials: int, staggered: int, gap_range: tuple[float, float], seed: int) -> list[dict]:
        vm = getattr(scen, "vm", False)
        if vm:
            if scen.name not in self.images:
                self.images[scen.name] = self._system_image(scen)
            iid, disks = self._vm_instance(scen.ndisks, "cons", self.images[scen.name])
        else:
            os.makedirs(scen.mnt, exist_ok=True)
            iid = self.env.instance(ndata=scen.ndisks, name="cons")[0]
            disks = [d["DiskId"] for d in self.call("DescribeDisks", InstanceId=iid)["Disks"]["Disk"] if d["Type"] == "data"]
            disks.sort(key=lambda d: self.call("DescribeDisks", DiskIds=[d])["Disks"]["Disk"][0]["Device"])
            self.call("StartInstance", InstanceId=iid)
        rng = random.Random(seed)
        modes = ["atomic"] * trials + ["staggered"] * staggered
        rng.shuffle(modes)
        out = []
        for n, mode in enumerate(modes, 1):
            gap = rng.uniform(*gap_range)
            r = (self.vm_trial if vm else self.trial)(scen, iid, disks, mode, gap, rng)
            if mode == "staggered":
                r["gap_ms"] = round(gap * 1000)
            verdict = {True: "consistent", False: "INCONSISTENT", None: "ERROR"}[r["consistent"]]
            self.progress("%-22s %3d/%d %-9s %-12s %s" % (scen.name, n, len(modes), mode, verdict,
                                                          "; ".join(r.get("problems") or [r.get("error", "")])[:160]))
            out.append(r)
        return out


def summarize(results: list[dict], skipped: dict[str, str]) -> dict:
    table = {}
    for r in results:
        t = table.setdefault(r["scenario"], {"atomic_trials": 0, "atomic_inconsistent": 0, "staggered_trials": 0,
                                             "staggered_inconsistent": 0, "errors": 0})
        if r["consistent"] is None:
            t["errors"] += 1
            continue
        t[r["mode"] + "_trials"] += 1
        if not r["consistent"]:
            t[r["mode"] + "_inconsistent"] += 1
    for name, t in table.items():
        t["sensitive"] = t["staggered_inconsistent"] > 0
        t["ok"] = t["atomic_inconsistent"] == 0 and t["errors"] == 0 and (t["staggered_trials"] == 0 or t["sensitive"])
    return {"scenarios": table, "skipped": skipped}


def markdown(summary: dict) -> str:
    lines = ["| scenario | trials (barrier) | inconsistent with the barrier | staggered trials | inconsistent staggered | errors |",
             "|---|---|---|---|---|---|"]
    for name, t in summary["scenarios"].items():
        lines.append("| %s | %d | %d | %d | %d | %d |" % (name, t["atomic_trials"], t["atomic_inconsistent"],
                                                        t["staggered_trials"], t["staggered_inconsistent"], t["errors"]))
    for name, why in summary["skipped"].items():
        lines.append("| %s | skipped: %s | | | | |" % (name, why))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/consistency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS) + ["hook"],
                    help="run only these (repeatable; default all but hook)")
    ap.add_argument("--trials", type=int, default=3, help="trials with the barrier per scenario (default 3)")
    ap.add_argument("--staggered", type=int, default=None, help="staggered control trials per scenario (default: as --trials)")
    ap.add_argument("--gap-ms", default="500-1000", help="gap between staggered snapshots, ms, a range (default 500-1000)")
    ap.add_argument("--staggered-order", choices=("random", "reverse"), default="random",
                    help="order of the staggered snapshots: random (default), or reverse: the one the layout is "
                    "known to break in (the last disk first, unless the scenario says otherwise)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--out", default="consistency-results", help="directory for report.json and report.md")
    ap.add_argument("--hook-load", metavar="CMD", help="your workload command (scenario hook)")
    ap.add_argument("--hook-check", metavar="CMD", help="your check command (scenario hook)")
    ap.add_argument("--hook-disks", type=int, default=2, help="disks for the hook scenario (default 2)")
    ap.add_argument("--json", action="store_true", help="print the JSON report")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/consistency needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    lo, _, hi = a.gap_ms.partition("-")
    gap = (int(lo) / 1000, int(hi or lo) / 1000)
    staggered = a.trials if a.staggered is None else a.staggered
    names = a.scenario or sorted(SCENARIOS)
    env = VDiskEnv(prefix="vdisk-consistency-", io_limits="unlimited")
    results, skipped = [], {}
    try:
        env.start()
        runner = Runner(env, progress=lambda s: print(s, file=sys.stderr, flush=True), staggered_order=a.staggered_order)
        for name in names:
            if name == "hook":
                if not (a.hook_load and a.hook_check):
                    print("the hook scenario needs --hook-load and --hook-check", file=sys.stderr)
                    return 2
                scen = HookScenario(env.dir, a.hook_load, a.hook_check, a.hook_disks)
            else:
                scen = SCENARIOS[name](env.dir)
            why = scen.skip_reason()
            if why:
                skipped[name] = why
                print("%-22s skipped: %s" % (name, why), file=sys.stderr)
                continue
            results += runner.scenario(scen, a.trials, staggered, gap, a.seed)
    finally:
        env.close()
    summary = summarize(results, skipped)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump({"summary": summary, "trials": results}, f, indent=2)
    md = markdown(summary)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    print(json.dumps(summary, indent=2) if a.json else md)
    return 0 if all(t["ok"] for t in summary["scenarios"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
