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

from ..harness import stop_process
from .checks import judge_files
from .guest import LvmInGuest, MariaDBOnLvmInGuest

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
            stop_process(self.proc, 30)
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

    def durable_count(self, expected: dict, t_ns: int) -> int:
        """How many units of work (files, transactions) were durable before t_ns."""
        return sum(1 for f in expected["files"] if f[3] < t_ns)

    def check_files(self, root: str, expected: dict) -> list[str]:
        """The files must look like a power cut at one instant: every file
        fsynced before the snapshot began is whole; no file is present at its
        full size with other content (its metadata reached the disk, its data
        did not); and the whole files form a prefix of the log (file k+1 was
        created only after file k's fsync returned)."""
        state = []
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
        return judge_files(state, expected["before"])

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


class MariaDBThreeDisks(Scenario):
    """MariaDB with its data directory, InnoDB redo log and binary log on
    three disks (ext4 each), innodb_flush_log_at_trx_commit=1, sync_binlog=1,
    small redo log and buffer pool so that checkpoints are frequent.  The
    copies are mounted where the originals were, so every absolute path the
    server recorded (the binlog index) still holds."""

    name = "mariadb-data-redo-binlog"
    ndisks = 3
    tools = ("mariadbd", "mariadb-install-db")

    def skip_reason(self):
        why = super().skip_reason()
        if why:
            return why + " (Debian package mariadb-server)"
        try:
            import pymysql  # noqa: F401
        except ImportError:
            return "needs the Python package pymysql"
        return None

    def _dirs(self):
        return [os.path.join(self.mnt, d) for d in ("data", "redo", "binlog")]

    def _opts(self):
        data, redo, binlog = self._dirs()
        run_dir = os.path.join(self.workdir, "mariadb-run")
        os.makedirs(run_dir, exist_ok=True)
        self.socket = os.path.join(run_dir, "mysqld.sock")
        return [
            "--no-defaults", "--user=root", "--datadir=" + os.path.join(data, "db"),
            "--innodb-log-group-home-dir=" + redo, "--log-bin=" + os.path.join(binlog, "mysql-bin"),
            "--server-id=1", "--sync-binlog=1", "--innodb-flush-log-at-trx-commit=1",
            "--innodb-log-file-size=8M", "--innodb-buffer-pool-size=8M", "--innodb-max-dirty-pages-pct=0",
            "--skip-networking", "--skip-grant-tables", "--socket=" + self.socket,
            "--pid-file=" + os.path.join(run_dir, "mysqld.pid"), "--log-error=" + os.path.join(run_dir, "error.log"),
        ]

    def _mount_all(self, devs):
        for dev, d in zip(devs, self._dirs()):
            self.mount(d, dev)

    def _start_server(self, timeout=120):
        import pymysql

        self.server = subprocess.Popen(["mariadbd", *self._opts()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError("mariadbd exited (%d): %s" % (self.server.returncode, self._error_log()))
            try:
                pymysql.connect(unix_socket=self.socket, user="root").close()
                return
            except pymysql.err.OperationalError:
                time.sleep(0.2)
        raise RuntimeError("mariadbd did not answer within %ds" % timeout)

    def _error_log(self):
        try:
            with open(os.path.join(self.workdir, "mariadb-run", "error.log")) as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def _stop_server(self):
        srv = getattr(self, "server", None)
        if srv is not None:
            stop_process(srv, 60)

    def create(self, devs):
        for dev in devs:
            run("mkfs.ext4", *MKE2FS, dev)
        self._mount_all(devs)
        data, _, _ = self._dirs()
        os.makedirs(os.path.join(data, "db"))
        opts = [o for o in self._opts() if not o.startswith(("--socket", "--pid-file", "--skip-networking", "--log-error"))]
        run("mariadb-install-db", *opts, "--auth-root-authentication-method=normal", timeout=300)
        self._start_server()
        from .bank import setup

        setup(self.socket)

    def start(self, seed):
        if os.path.exists(self.log):
            os.unlink(self.log)
        self.proc = subprocess.Popen([sys.executable, "-m", "vdisk.consistency.bank", self.socket, self.log],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def release(self):
        self._stop_server()
        for d in reversed(self._dirs()):
            self.umount(d)

    def cleanup(self):
        self._stop_server()
        super().cleanup()

    def durable_before(self, t_ns):
        with open(self.log) as f:
            acked = [int(l.split()[0]) for l in f if len(l.split()) == 2 and int(l.split()[1]) < t_ns]
        return {"acked": acked}

    def durable_count(self, expected, t_ns):
        return len(expected["acked"])

    def check(self, devs, expected):
        import pymysql

        from .bank import ACCOUNTS, START_BALANCE

        try:
            self._mount_all(devs)
            self._start_server()  # InnoDB crash recovery, as after a power cut
        except RuntimeError as exc:
            return ["the server did not start on the restored disks: %s" % exc]
        problems = []
        try:
            c = pymysql.connect(unix_socket=self.socket, user="root", database="bank")
            with c.cursor() as cur:
                for table in ("accounts", "transfers"):
                    cur.execute("CHECK TABLE " + table)
                    bad = [r for r in cur.fetchall() if r[2] in ("error", "warning") or (r[2] == "status" and r[3] != "OK")]
                    if bad:
                        problems.append("CHECK TABLE %s: %s" % (table, bad[:2]))
                cur.execute("SELECT SUM(balance), COUNT(*) FROM accounts")
                total, n = cur.fetchone()
                if (int(total), n) != (ACCOUNTS * START_BALANCE, ACCOUNTS):
                    problems.append("the balances sum to %s over %d accounts, not %d" % (total, n, ACCOUNTS * START_BALANCE))
                cur.execute("SELECT seq FROM transfers")
                present = {r[0] for r in cur.fetchall()}
            c.close()
            missing = [s for s in expected["acked"] if s not in present]
            if missing:
                problems.append("%d of %d transfers acknowledged before the snapshot are missing (e.g. %s)"
                                % (len(missing), len(expected["acked"]), missing[:3]))
        except pymysql.err.MySQLError as exc:
            problems.append("query failed on the restored copy: %s" % exc)
        finally:
            self._stop_server()
            for d in reversed(self._dirs()):
                if d in self.mounted:
                    self.umount(d)
        return problems


SCENARIOS = {cls.name: cls for cls in (Ext4ExternalJournal, XfsExternalLog, BtrfsAcrossDisks, LvmStriped, MariaDBThreeDisks,
                                       LvmInGuest, MariaDBOnLvmInGuest)}
