"""Multi-disk layouts to prove crash consistency on, one class each.

A scenario makes its layout on the original loop devices (`create`), runs a
workload (`start`/`stop`), releases the originals (`release`), and checks
copies restored from snapshots as after a power cut (`check`), returning the
problems it found (empty: consistent).  `skip_reason` says why it cannot run
on this machine.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

MKE2FS = ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]


def run(*args, check=True, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(map(str, args)), r.returncode, (r.stderr or r.stdout).strip()[-800:]))
    return r


def kmsg_marker() -> str:
    """Write a unique line to the kernel log; kernel_errors_since() reads after it."""
    marker = "vdisk-consistency-%d" % time.monotonic_ns()
    try:
        with open("/dev/kmsg", "w") as f:
            f.write(marker + "\n")
    except OSError:
        pass
    return marker


def kernel_errors_since(marker: str, patterns=("parent transid verify failed", "csum failed", "corrupt",
                                               "Corruption", "EXT4-fs error", "metadata I/O error")) -> list[str]:
    out = run("dmesg", check=False).stdout.splitlines()
    idx = max((i for i, l in enumerate(out) if marker in l), default=None)
    if idx is None:
        return []
    return [l for l in out[idx + 1:] if any(p in l for p in patterns)]


def _few(items, n=3) -> str:
    return "; ".join("%s: %s" % x for x in items[:n]) + (" ..." if len(items) > n else "")


class Scenario:
    name = ""
    ndisks = 2
    tools: tuple[str, ...] = ()

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.mnt = os.path.join(workdir, "orig-" + self.name)
        self.copy_mnt = os.path.join(workdir, "copy-" + self.name)
        self.log = os.path.join(workdir, "workload-%s.log" % self.name)
        self.proc = None
        self.mounted: list[str] = []

    def skip_reason(self) -> str | None:
        missing = [t for t in self.tools if shutil.which(t) is None]
        return ("needs %s" % ", ".join(missing)) if missing else None

    # -------------------------------------------------------------- workload
    def start(self, seed: int) -> None:
        if os.path.exists(self.log):
            os.unlink(self.log)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vdisk.consistency.workload", self.mnt, self.log, "--seed", str(seed)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def durable_before(self, t_ns: int) -> dict:
        """The workload's log: {"before": t_ns, "files": [(name, sha, size, t_done)]} in order."""
        files = []
        with open(self.log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    files.append((parts[0], parts[1], int(parts[2]), int(parts[3])))
        return {"before": t_ns, "files": files}

    def check_files(self, root: str, expected: dict) -> list[str]:
        """The files must look like a power cut at one instant: every file
        fsynced before the snapshot began is whole; no file is present at its
        full size with other content (its metadata reached the disk, its data
        did not); and the whole files form a prefix of the log (file k+1 was
        created only after file k's fsync returned)."""
        problems, state = [], []
        for name, sha, size, t_done in expected["files"]:
            p = os.path.join(root, name)
            try:
                with open(p, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                state.append((name, "missing", t_done))
                continue
            except OSError as exc:
                state.append((name, "unreadable (%s)" % exc.strerror, t_done))
                continue
            if hashlib.sha256(data).hexdigest() == sha:
                state.append((name, "whole", t_done))
            elif len(data) == size:
                state.append((name, "full size, wrong content", t_done))
            else:
                state.append((name, "partial (%d of %d bytes)" % (len(data), size), t_done))
        lost = [(n, s) for n, s, t in state if t < expected["before"] and s != "whole"]
        if lost:
            problems.append("%d of %d files fsynced before the snapshot are not whole (%s)" % (
                len(lost), sum(1 for *_, t in state if t < expected["before"]), _few(lost)))
        garbled = [(n, s) for n, s, _ in state if s.startswith("full size") or s.startswith("unreadable")]
        if garbled:
            problems.append("%d files have their full size but not their data (%s)" % (len(garbled), _few(garbled)))
        first_bad = next((i for i, (_, s, _) in enumerate(state) if s != "whole"), None)
        if first_bad is not None:
            later_whole = [n for n, s, _ in state[first_bad + 1:] if s == "whole"]
            if later_whole:
                problems.append("%s is %s but %d later files are whole (e.g. %s): not one point in time" % (
                    state[first_bad][0], state[first_bad][1], len(later_whole), later_whole[0]))
        return problems

    # -------------------------------------------------------------- mounts
    def mount(self, target: str, *args) -> None:
        os.makedirs(target, exist_ok=True)
        run("mount", *args, target)
        self.mounted.append(target)

    def umount(self, target: str) -> None:
        run("umount", target)
        self.mounted.remove(target)

    def cleanup(self) -> None:
        self.stop()
        for m in reversed(self.mounted):
            if run("umount", m, check=False).returncode != 0:
                run("umount", "-l", m, check=False)
        self.mounted = []

    def release(self) -> None:
        """Unmount the originals (after stop())."""
        self.umount(self.mnt)

    # to implement
    def create(self, devs: list[str]) -> None: ...
    def check(self, devs: list[str], expected: dict[str, str]) -> list[str]: ...


class Ext4ExternalJournal(Scenario):
    """ext4 on disk 2 with its journal on disk 1 (mke2fs -O journal_dev)."""

    name = "ext4-external-journal"
    tools = ("mkfs.ext4", "e2fsck")

    def create(self, devs):
        journal, fs = devs
        # a small journal (8 MiB) so that checkpoints happen often
        run("mke2fs", "-q", "-F", "-O", "journal_dev", "-b", "4096", journal, "2048")
        run("mkfs.ext4", *MKE2FS, "-b", "4096", "-J", "device=" + journal, fs)
        self.mount(self.mnt, "-o", "journal_path=" + journal, fs)

    def check(self, devs, expected):
        journal, fs = devs
        problems = []
        try:  # mounting replays the journal, as after a power cut
            self.mount(self.copy_mnt, "-o", "journal_path=" + journal, fs)
        except RuntimeError as exc:
            return ["mount failed: %s" % exc]
        problems += self.check_files(self.copy_mnt, expected)
        self.umount(self.copy_mnt)
        r = run("e2fsck", "-fn", "-j", journal, fs, check=False)
        if r.returncode != 0:
            problems.append("e2fsck -fn: exit %d: %s" % (r.returncode, r.stdout.strip().splitlines()[-1:] or ""))
        return problems


class XfsExternalLog(Scenario):
    """XFS on disk 2 with its log on disk 1 (mkfs.xfs -l logdev=)."""

    name = "xfs-external-log"
    tools = ("mkfs.xfs", "xfs_repair")

    def create(self, devs):
        log, fs = devs
        run("mkfs.xfs", "-q", "-f", "-l", "logdev=%s,size=64m" % log, fs)
        self.mount(self.mnt, "-o", "logdev=" + log, fs)

    def check(self, devs, expected):
        log, fs = devs
        try:
            self.mount(self.copy_mnt, "-o", "logdev=%s,nouuid" % log, fs)
        except RuntimeError as exc:
            return ["mount failed: %s" % exc]
        problems = self.check_files(self.copy_mnt, expected)
        self.umount(self.copy_mnt)
        r = run("xfs_repair", "-n", "-l", log, fs, check=False)
        if r.returncode != 0:
            problems.append("xfs_repair -n: exit %d" % r.returncode)
        return problems


class BtrfsAcrossDisks(Scenario):
    """btrfs over three disks: data raid0, metadata raid1."""

    name = "btrfs-raid0-raid1"
    ndisks = 3
    tools = ("mkfs.btrfs", "btrfs")

    def create(self, devs):
        run("mkfs.btrfs", "-q", "-f", "-d", "raid0", "-m", "raid1", *devs)
        run("btrfs", "device", "scan", *devs)
        self.mount(self.mnt, devs[0])

    def release(self):
        super().release()
        run("btrfs", "device", "scan", "--forget", check=False)  # the copies share its fsid

    def check(self, devs, expected):
        for d in devs:
            run("btrfs", "device", "scan", d, check=False)
        marker = kmsg_marker()
        try:
            self.mount(self.copy_mnt, devs[0])
        except RuntimeError as exc:
            run("btrfs", "device", "scan", "--forget", check=False)
            return ["mount failed: %s" % exc] + kernel_errors_since(marker)[:3]
        problems = self.check_files(self.copy_mnt, expected)
        r = run("btrfs", "scrub", "start", "-B", "-r", self.copy_mnt, check=False)
        if r.returncode != 0 or "no errors found" not in (r.stdout + r.stderr):
            problems.append("btrfs scrub: %s" % (r.stdout + r.stderr).strip().splitlines()[-1:])
        self.umount(self.copy_mnt)
        problems += ["kernel: " + l for l in kernel_errors_since(marker)[:3]]
        r = run("btrfs", "check", "--readonly", devs[0], check=False)
        if r.returncode != 0:
            problems.append("btrfs check --readonly: exit %d" % r.returncode)
        run("btrfs", "device", "scan", "--forget", check=False)
        return problems


class LvmStriped(Scenario):
    """A striped LVM logical volume over three disks with ext4 on it."""

    name = "lvm-striped-ext4"
    ndisks = 3
    tools = ("pvcreate", "vgcreate", "lvcreate")

    def skip_reason(self):
        if not os.path.exists("/dev/mapper/control"):
            return "this kernel has no device-mapper (/dev/mapper/control is missing), so LVM cannot run"
        return super().skip_reason()

    def create(self, devs):
        self.vg = "vdiskcons%d" % (time.monotonic_ns() % 10**6)
        run("pvcreate", "-qq", "-f", *devs)
        run("vgcreate", "-qq", self.vg, *devs)
        run("lvcreate", "-qq", "-y", "-i", str(len(devs)), "-I", "64k", "-l", "90%VG", "-n", "lv", self.vg)
        self.lv = "/dev/%s/lv" % self.vg
        run("mkfs.ext4", *MKE2FS, self.lv)
        self.mount(self.mnt, self.lv)

    def release(self):
        super().release()
        run("vgchange", "-an", self.vg, check=False)

    def check(self, devs, expected):
        # the copies carry the original's VG name and PV UUIDs: import them under a new name
        vg2 = self.vg + "c"
        r = run("vgimportclone", "--basevgname", vg2, *devs, check=False)
        if r.returncode != 0:
            return ["vgimportclone failed: %s" % r.stderr.strip()[-300:]]
        run("vgchange", "-ay", vg2)
        lv = "/dev/%s/lv" % vg2
        problems = []
        try:
            self.mount(self.copy_mnt, lv)
            problems += self.check_files(self.copy_mnt, expected)
            self.umount(self.copy_mnt)
            if run("e2fsck", "-fn", lv, check=False).returncode != 0:
                problems.append("e2fsck -fn found errors")
        finally:
            run("vgchange", "-an", vg2, check=False)
        return problems


SCENARIOS = {cls.name: cls for cls in (Ext4ExternalJournal, XfsExternalLog, BtrfsAcrossDisks, LvmStriped)}
