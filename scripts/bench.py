"""fio through loop devices (direct I/O): vdisk against qemu-storage-daemon
(qcow2 exported through FUSE) and a plain sparse file, plus vdisk's snapshot
costs.

Run through scripts/bench (which sets up and installs qemu first).  Every
target is measured in the same run and every pattern repeated (median
reported), so only the ratios mean something on a shared, noisy machine.
Writes bench-results/bench.json; prints a table (or the JSON with --json).
Its pools run unlimited (vdisk pool set --io-limits unlimited): it measures
vdisk itself; --levels measures disks at the cloud's I/O limits.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock

from vdisk.config import Paths
from vdisk.engine.format import DATA_FILE
from vdisk.harness import VDiskEnv, sh, stop_process

GIB = 1 << 30
# fio writing a region whole in 1 MiB writes (a disk's data before it is measured)
FILL = ["--rw=write", "--bs=1M", "--iodepth=8"]
# the fio table's columns, vdisk first (see the classes below)
TARGETS = ["vdisk", "qsd", "qsd-sub", "plain", "plain-buffered"]
COW_IO = "64M"  # how much the after-snapshot pattern writes (not time based)

PATTERNS = [
    # name, fio args, what to report, needs a fresh snapshot before each run
    ("randwrite 4k qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops", False),
    ("randread 4k qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "iops", False),
    ("seqwrite 1M qd8", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw", False),
    ("seqread 1M qd8", ["--rw=read", "--bs=1M", "--iodepth=8"], "bw", False),
    ("randwrite 4k qd1 fsync", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "iops", False),
    ("randwrite 4k qd32 after snapshot", ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=" + COW_IO],
     "iops", True),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fio(dev: str, args: list[str], size: str, runtime: int | None, cwd: str) -> dict:
    cmd = ["fio", "--name=bench", "--filename=" + dev, "--ioengine=libaio", "--direct=1", "--size=" + size,
           "--group_reporting", "--output-format=json", "--randrepeat=0", *args]
    if runtime:
        cmd += ["--time_based", "--runtime=%d" % runtime, "--ramp_time=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit("fio failed: %s" % r.stderr)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    rw = "write" if "write" in " ".join(args) else "read"
    d = job[rw]
    lat = d.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": d["iops"],
        "bw_mib": d["bw_bytes"] / (1 << 20),
        "bytes": d["io_bytes"],
        "p99_us": lat.get("99.000000", 0) / 1000,
    }


# --------------------------------------------------------------- targets

class VdiskTarget:
    name = "vdisk"

    def __init__(self, env: VDiskEnv, size_gib: int):
        self.env = env
        self.iid, (self.disk,) = env.instance(ndata=1, size=size_gib + 1)
        self.cached = os.path.join(Paths(env.data, env.mnt).pool, DATA_FILE)  # the data file
        env.run("instance", "start", self.iid)
        self.dev = env.attach(self.disk)

    def snapshot(self) -> None:
        self.env.run("snapshot", "create", self.disk)

    def close(self) -> None:
        pass  # the env detaches its loop devices and stops the daemon


class QsdTarget:
    """qemu-storage-daemon exporting a qcow2 image as a file through FUSE,
    attached as a loop device.  Snapshots are qcow2 internal snapshots taken
    over QMP (blockdev-snapshot-internal-sync)."""

    name = "qsd"

    def __init__(self, workdir: str, size_gib: int, subclusters: bool = False):
        """subclusters: the image made with extended_l2=on (32 subclusters
        of 2 KiB per 64 KiB cluster), the target "qsd-sub"."""
        if subclusters:
            self.name = "qsd-sub"
        self.dir = workdir
        self.image = os.path.join(workdir, self.name + ".qcow2")
        self.cached = self.image
        self.export = os.path.join(workdir, self.name + "-export.img")
        self.qmp_path = os.path.join(workdir, self.name + "-qmp.sock")
        self.nsnap = 0
        self.dev = None
        opts = ["-o", "extended_l2=on,cluster_size=64k"] if subclusters else []
        sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, self.image, "%dG" % (size_gib + 1))
        open(self.export, "w").close()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", "driver=file,node-name=file0,filename=%s" % self.image,
             "--blockdev", "driver=qcow2,node-name=qcow0,file=file0",
             "--export", "type=fuse,id=exp0,node-name=qcow0,mountpoint=%s,writable=on" % self.export,
             "--chardev", "socket,path=%s,server=on,wait=off,id=qmp0" % self.qmp_path,
             "--monitor", "chardev=qmp0"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, self.name + ".log"), "w"))
        try:
            self._connect(size_gib)
        except BaseException:
            self.close()
            raise

    def _connect(self, size_gib: int) -> None:
        deadline = time.monotonic() + 20
        while os.path.getsize(self.export) != (size_gib + 1) * GIB:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("qemu-storage-daemon did not export %s (see %s/%s.log)" % (self.export, self.dir, self.name))
            time.sleep(0.05)
        self.qmp = socket.socket(socket.AF_UNIX)
        self.qmp.connect(self.qmp_path)
        self.qf = self.qmp.makefile("rw")
        self.qf.readline()  # greeting
        self._qmp("qmp_capabilities")
        self.dev = sh("losetup", "--find", "--show", "--direct-io=on", self.export).stdout.strip()

    def _qmp(self, cmd: str, **args) -> dict:
        self.qf.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.qf.flush()
        while True:
            r = json.loads(self.qf.readline())
            if "event" not in r:
                break
        if "error" in r:
            raise SystemExit("qemu-storage-daemon: %s: %s" % (cmd, r["error"]))
        return r

    def snapshot(self) -> None:
        self.nsnap += 1
        self._qmp("blockdev-snapshot-internal-sync", device="qcow0", name="s%d" % self.nsnap)

    def close(self) -> None:
        if self.dev:
            sh("losetup", "-d", self.dev, check=False)
        stop_process(self.proc, 20)
        subprocess.run(["umount", "-l", self.export], capture_output=True)


class PlainTarget:
    """A sparse file behind a loop device.  direct: the loop device reads and
    writes its file with direct I/O ("plain", what the disk under the
    filesystem gives); otherwise through the page cache ("plain-buffered",
    the ceiling for a stack that goes through the host's page cache, as
    vdisk and qemu-storage-daemon's FUSE export do)."""

    name = "plain"
    snapshot = None  # a plain file has no snapshots

    def __init__(self, workdir: str, size_gib: int, direct: bool = True):
        if not direct:
            self.name = "plain-buffered"
        path = os.path.join(workdir, self.name + ".img")
        self.cached = path  # with direct I/O ("plain") it holds none
        with open(path, "wb") as f:
            f.truncate((size_gib + 1) * GIB)
        self.dev = sh("losetup", "--find", "--show", "--direct-io=%s" % ("on" if direct else "off"), path).stdout.strip()

    def close(self) -> None:
        sh("losetup", "-d", self.dev, check=False)


def drop_cached(targets, keep=None) -> None:
    """Drop the clean page cache of every target's backing file but keep's
    (after os.sync(), all of it is clean).

    On a VM whose host backs only part of the guest's memory (this one:
    touching anonymous memory beyond about 4 GiB cost about 40 us a page,
    ten times the first 4 GiB; docs/perf/2026-12-04-memory-interference.md),
    the page cache that the other targets hold makes every new page the
    running one takes wait on the host.  vdisk takes new pages on every
    copy on write (the slots it writes into are new), qcow2 and a plain file
    write in place: with five targets' data cached, vdisk's randwrite runs
    fell to a quarter of their speed alone.  Each run therefore has the host's
    memory to itself, as a user's storage stack would."""
    for t in targets:
        if t is keep:
            continue
        fd = os.open(t.cached, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def in_turn(items, i: int) -> list:
    """The order things take turns in at round i: forwards in even rounds,
    backwards in odd ones (A B B A), so that a drift of the machine weighs
    on each alike and none always runs right after the same one."""
    return list(items) if i % 2 == 0 else list(items)[::-1]


def fio_patterns(a, size: str, cwd: str, env: VDiskEnv) -> dict:
    """The fio table: every pattern on every target, a.repeat times."""
    out: dict = {}
    targets = []
    try:
        targets.append(VdiskTarget(env, a.size_gib))
        if "qsd" in a.targets:
            targets.append(QsdTarget(env.dir, a.size_gib))
        if "qsd-sub" in a.targets:
            targets.append(QsdTarget(env.dir, a.size_gib, subclusters=True))
        if "plain" in a.targets:
            targets.append(PlainTarget(env.dir, a.size_gib))
        if "plain-buffered" in a.targets:
            targets.append(PlainTarget(env.dir, a.size_gib, direct=False))
        for t in targets:  # fill the region so reads read data and snapshots share it
            log("filling %s on %s ..." % (size, t.name))
            fio(t.dev, FILL, size, None, cwd)
        for pname, args, _, snap in a.patterns:
            ran = [t for t in targets if not snap or t.snapshot is not None]
            runs: dict = {t.name: [] for t in ran}
            # the targets take turns, run by run, forwards then backwards
            # (A B B A): a drift of the machine (this VM's device flushes
            # vary by 40% over minutes) then weighs on every target's
            # median alike, and no target always runs right after the
            # same one (with forwards only, vdisk's 1 MiB writes, each
            # run right after plain-buffered's, were 35% below the same
            # build's against qsd alone: 2026-12-03-engine-v14.md)
            for i in range(a.repeat):
                for t in in_turn(ran, i):
                    log("%-34s %-6s run %d/%d" % (pname, t.name, i + 1, a.repeat))
                    if snap:
                        t.snapshot()
                    # every run starts with no dirty page cache: a pattern
                    # must not pay for the writeback of the one before it
                    # (vdisk, qsd and plain-buffered write through the page
                    # cache; 30 s of 1 MiB writes left the next patterns at
                    # half their speed, and vdisk's after-snapshot writes at
                    # a fifth)
                    os.sync()
                    # and with only its own data cached: the others' is
                    # dropped (drop_cached); a read pattern reads its region
                    # once first, so that it is measured warm as before
                    drop_cached(targets, keep=t)
                    if "read" in pname:
                        fio(t.dev, ["--rw=read", "--bs=1M", "--iodepth=8"], size, None, cwd)
                    runs[t.name].append(fio(t.dev, args, size, None if snap else a.runtime, cwd))
            for t in ran:
                mine = runs[t.name]
                out.setdefault(t.name, {})[pname] = {
                    "iops": statistics.median(r["iops"] for r in mine),
                    "bw_mib": statistics.median(r["bw_mib"] for r in mine),
                    "p99_us": statistics.median(r["p99_us"] for r in mine),
                    "runs": mine,
                }
        out["_write_amplification_4k"] = write_amplification(env, targets[0], size, cwd)
    finally:
        for t in reversed(targets):
            t.close()
    return out


def proc_wchar(pid: int) -> int:
    with open("/proc/%d/io" % pid) as f:
        return int(dict(l.split(": ") for l in f.read().splitlines())["wchar"])


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def fast_path(env: VDiskEnv) -> dict:
    """The daemon's fast-path counters so far (`vdisk daemon status`)."""
    return env.j("daemon", "status")["FastPath"]


def passed_to_python(env: VDiskEnv) -> int:
    """How many requests the daemon's C fast path handed to Python so far."""
    return fast_path(env)["PassedToPython"]


def write_amplification(env: VDiskEnv, t: VdiskTarget, size: str, cwd: str) -> dict:
    """What the daemon writes per byte of 4 KiB random writes: over the
    region written whole and made durable (no snapshot: every block the
    head's own, the case a copy-on-write engine copies most), then again
    right after a snapshot of it, and right after the fifth snapshot with
    the same writes after each (blocks written after several snapshots
    read through several slots: what a copy-on-write copies to keep C's
    views at three slots grows with them)."""
    pid = env.daemon_pid()
    wa = {}
    args = ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=64M", "--end_fsync=1"]
    fio(t.dev, FILL + ["--end_fsync=1"], size, None, cwd)
    for label, snaps in (("no snapshot", 0), ("after snapshot", 1), ("after the 5th snapshot", 4)):
        for i in range(snaps):
            if i:  # the same writes after each snapshot before the one measured
                fio(t.dev, args, size, None, cwd)
            t.snapshot()
        used0 = env.j("pool", "status")["Pool"]["DataFileAllocatedBytes"]
        w0 = proc_wchar(pid)
        t0 = time.monotonic()
        r = fio(t.dev, args, size, None, cwd)
        dt = time.monotonic() - t0
        w1 = proc_wchar(pid)
        used1 = env.j("pool", "status")["Pool"]["DataFileAllocatedBytes"]
        wa[label] = {
            "fio_bytes": r["bytes"],
            "daemon_bytes_written": w1 - w0,
            "write_amplification": (w1 - w0) / r["bytes"],
            "new_space_bytes": used1 - used0,
            "iops": r["bytes"] / 4096 / dt,
        }
    return wa


def wa_across_commits(size_gib: int, cwd: str, cycles: int = 10) -> dict:
    """What the daemon writes per byte of 4 KiB random writes that live
    through many commits, no snapshot: a disk's region written whole, then
    `cycles` rounds of one 4 KiB write per 64 KiB block of it (fio, random
    offsets, then fsync), a commit between rounds.  The one-pass figure
    above sees each block's first copy on write only; here a block that
    gathers pages over the commits is copied again and again
    (docs/perf/2026-12-04-engine-v20.md, "Write amplification across
    commits").  Its own daemon commits every second
    (VDISK_COMMIT_INTERVAL=1, not the default 30) so that the rounds take
    a minute, not five."""
    env = VDiskEnv(prefix="vdisk-wa-", io_limits="unlimited")
    with unittest.mock.patch.dict(os.environ, {"VDISK_COMMIT_INTERVAL": "1"}):  # the daemon reads it at start
        env.start()
    try:
        t = VdiskTarget(env, size_gib)
        size = "%dG" % size_gib
        fio(t.dev, FILL + ["--end_fsync=1"], size, None, cwd)
        per_block = ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=%dM" % (size_gib * 1024 // 16),
                     "--end_fsync=1"]
        pid = env.daemon_pid()
        rounds = []
        for _ in range(cycles):
            time.sleep(2.5)  # a commit takes what the round before wrote
            w0 = proc_wchar(pid)
            r = fio(t.dev, per_block, size, None, cwd)
            rounds.append((proc_wchar(pid) - w0) / r["bytes"])
        return {"rounds": rounds, "last_three_median": statistics.median(rounds[-3:]),
                "commit_interval_s": 1, "writes_per_block_per_round": 1}
    finally:
        env.close()


# --------------------------------------------------------------- snapshot costs

def start_writers(devs: list[str], runtime: int, cwd: str) -> subprocess.Popen:
    """fio 4 KiB random writes at qd4 on each of devs (a job each,
    reported as one group) for runtime seconds, started after a sync()
    (no load pays for the writeback the one before left)."""
    cmd = ["fio", "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=4",
           "--size=256M", "--time_based", "--runtime=%d" % runtime, "--group_reporting",
           "--output-format=json", "--percentile_list=50:99:99.9", "--randrepeat=0"]
    for i, dev in enumerate(devs):
        cmd += ["--name=d%d" % i, "--filename=" + dev]
    os.sync()
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def writers_result(proc: subprocess.Popen) -> dict:
    """The writers' IOPS and latency (p50, p99, max) once they end."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit("fio failed: %s" % err)
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    pct = job["clat_ns"]["percentile"]
    return {"iops": job["iops"], "lat_p50_ms": pct["50.000000"] / 1e6, "lat_p99_ms": pct["99.000000"] / 1e6,
            "lat_max_ms": job["clat_ns"]["max"] / 1e6}


@contextlib.contextmanager
def plain_devices(prefix: str, sizes: list[int]):
    """Plain sparse files of these sizes through loop devices (direct
    I/O): the machine's own floor.  Yields the devices; detaches them and
    removes the files afterwards."""
    devs = []
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        try:
            for i, size in enumerate(sizes):
                path = os.path.join(d, "plain%d.img" % i)
                with open(path, "wb") as f:
                    f.truncate(size)
                devs.append(sh("losetup", "--find", "--show", "--direct-io=on", path).stdout.strip())
            yield devs
        finally:
            for dev in devs:
                sh("losetup", "-d", dev, check=False)


def medians(runs: dict) -> dict:
    """name -> each figure's median over the rounds, every round kept."""
    out = {}
    for name, mine in runs.items():
        out[name] = {k: statistics.median(m[k] for m in mine) for k in mine[0]}
        out[name]["rounds"] = mine
    return out


def barrier_bench(runtime: int, interval: float, cwd: str, rounds: int = 3) -> dict:
    """Ten disks under fio 4 KiB random writes; an instance snapshot of all
    ten every `interval` seconds.  Reports how long each snapshot took and
    the writers' latency (p50/p99/max), against the same load without
    snapshots (the baseline) and the same load on ten plain sparse files
    through loop devices (what this machine itself gives), in the same run.

    A load's maximum is one completion out of about a million, and this
    VM's own (the plain files') moved between 4 and 120 ms from run to run
    (docs/perf/2026-12-03-writeback-chunks.md), so the loads run in
    `rounds` rounds and each figure is the median over them, every round's
    kept beside it.  Every vdisk load writes to fresh disks of a new pool
    and daemon, as the target says ("10 fresh disks"): on a pool that had
    been through a round already the baseline ran at 0.6x, and a second
    pass over disks that random writes filled is the pass that copies
    their blocks whole once (the same load without snapshots then ran at
    a third to a half of the first pass, its maximum 77-116 ms;
    docs/perf/2026-12-04-engine-v20.md), which the snapshots load used to
    pay as it ran second on the baseline's disks.  That second pass is
    measured too (`second_pass`: the baseline's disks again, no
    snapshots), so its cost stays in view.  The plain files are new each
    round; vdisk's loads and the plain files take turns,
    forwards then backwards, and every load starts after a sync(), as the
    fio patterns do: none pays for the writeback that the one before left
    (with the plain files always right after vdisk's snapshots, their
    maximum was 15-48 ms in runs where it was 5-8 ms otherwise)."""
    from vdisk.config import Paths
    from vdisk.daemon import client

    def load(env: VDiskEnv, devs: list, vdisk: bool, iid: str | None = None) -> dict:
        """fio on devs; with iid, an instance snapshot of it every interval."""
        before = fast_path(env) if vdisk else None
        proc = start_writers(devs, runtime, cwd)
        times = []
        time.sleep(1.5)
        while iid and proc.poll() is None:
            t0 = time.monotonic()
            r = client.call(Paths.resolve(env.data, env.mnt), {"Action": "CreateSnapshotGroup", "InstanceId": iid})
            if "Code" in r:
                raise SystemExit("snapshot group failed: %s" % r)
            times.append((time.monotonic() - t0) * 1000)
            time.sleep(interval)
        res = writers_result(proc)
        if vdisk:  # the requests C handed back to the Python engine, the
            # writes that waited for the engine to refill C's free slots,
            # and the requests that waited while the engine held the map
            after = fast_path(env)
            res["passed_to_python"] = after["PassedToPython"] - before["PassedToPython"]
            res["reservoir_waits"] = after["ReservoirWaits"] - before["ReservoirWaits"]
            res["lock_waits"] = after["LockWaits"] - before["LockWaits"]
            res["lock_wait_max_ms"] = after["LockWaitMaxMs"]  # since the daemon started
            res["engine_lock_hold_max_ms"] = after["EngineLockHoldMaxMs"]
        if iid:
            times.sort()
            res.update(snapshots=len(times), create_p50_ms=statistics.median(times), create_max_ms=times[-1])
        return res

    def fresh_disks(snapshots: bool, r: int, runs: dict) -> None:
        """A new pool and daemon, one instance of 10 fresh disks under
        the load: with an instance snapshot every interval, or without
        (the baseline, then the same disks once more: second_pass)."""
        env = VDiskEnv(prefix="vdisk-barrier-", io_limits="unlimited")
        try:
            env.start()
            iid, _ = env.instance(ndata=9)  # + the system disk = 10 disks
            disks = [d["DiskId"] for d in env.j("disk", "list", "--instance", iid)["Disks"]["Disk"]]
            env.run("instance", "start", iid)
            devs = [env.attach(d) for d in disks]
            if snapshots:
                log("barrier round %d: 10 fresh disks, an instance snapshot every %.1fs ..." % (r + 1, interval))
                runs["with_snapshots"].append(load(env, devs, True, iid))
                return
            log("barrier round %d: 10 fresh disks under fio, no snapshots (baseline) ..." % (r + 1))
            runs["baseline"].append(load(env, devs, True))
            log("barrier round %d: the same disks again, no snapshots (second pass) ..." % (r + 1))
            runs["second_pass"].append(load(env, devs, True))
        finally:
            env.close()

    def plain_load(r: int, runs: dict) -> None:
        log("barrier round %d: the same load on 10 plain files (the machine's floor) ..." % (r + 1))
        with plain_devices("vdisk-barrier-plain-", [GIB] * 10) as devs:
            runs["plain_floor"].append(load(None, devs, False))

    runs: dict = {"baseline": [], "second_pass": [], "with_snapshots": [], "plain_floor": []}
    for r in range(rounds):
        loads = (functools.partial(fresh_disks, False), functools.partial(fresh_disks, True), plain_load)
        for part in in_turn(loads, r):
            part(r, runs)
    return medians(runs)


def churn_bench(runtime: int, clients: int, cwd: str) -> dict:
    """fio writing 4 KiB at random to a disk with verification (every block
    read back and checked while the load goes on) while `clients` control
    clients create and delete snapshots of the disk and snapshot groups of
    its instance as fast as they can.  Reports fio's worst write latency,
    whether verification passed, and the control calls' latency."""
    import threading

    from vdisk.config import Paths
    from vdisk.daemon import client

    env = VDiskEnv(prefix="vdisk-churn-", io_limits="unlimited")
    try:
        env.start()
        iid, (disk,) = env.instance(ndata=1, size=2)
        env.run("instance", "start", iid)
        dev = env.attach(disk)
        paths = Paths.resolve(env.data, env.mnt)
        stop = threading.Event()
        calls: dict[str, list[float]] = {"CreateSnapshot": [], "DeleteSnapshot": [], "CreateSnapshotGroup": [],
                                         "DeleteSnapshotGroup": []}
        refused: list[str] = []

        def call(req: dict) -> dict:
            t0 = time.monotonic()
            r = client.call(paths, req)
            calls[req["Action"]].append((time.monotonic() - t0) * 1000)
            if "Code" in r:
                refused.append("%s: %s" % (req["Action"], r["Code"]))
            return r

        def worker(i: int) -> None:
            while not stop.is_set():
                if i % 2:
                    r = call({"Action": "CreateSnapshotGroup", "InstanceId": iid})
                    if "SnapshotGroupId" in r:
                        call({"Action": "DeleteSnapshotGroup", "SnapshotGroupId": r["SnapshotGroupId"]})
                else:
                    r = call({"Action": "CreateSnapshot", "DiskId": disk})
                    if "SnapshotId" in r:
                        call({"Action": "DeleteSnapshot", "SnapshotId": r["SnapshotId"]})

        cmd = ["fio", "--name=churn", "--filename=" + dev, "--ioengine=libaio", "--direct=1", "--rw=randwrite",
               "--bs=4k", "--iodepth=8", "--size=512M", "--time_based", "--runtime=%d" % runtime,
               "--verify=crc32c", "--verify_backlog=1024", "--verify_fatal=1", "--output-format=json",
               "--randrepeat=0"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
        time.sleep(1)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for th in threads:
            th.start()
        out, err = proc.communicate()
        stop.set()
        for th in threads:
            th.join()
        res: dict = {"clients": clients, "runtime_s": runtime, "fio_exit": proc.returncode,
                     "verify_ok": proc.returncode == 0 and "verify" not in err.lower(), "fio_stderr": err[-2000:]}
        if "{" in out:
            job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
            res.update(iops=job["iops"], lat_max_ms=job["lat_ns"]["max"] / 1e6,
                       lat_p99_ms=job["clat_ns"]["percentile"]["99.000000"] / 1e6)
        res["calls"] = {k: {"n": len(v), "p50_ms": statistics.median(v), "max_ms": max(v)}
                        for k, v in calls.items() if v}
        res["refused"] = sorted(set(refused))[:10]
        res["refused_n"] = len(refused)
        return res
    finally:
        env.close()


def trim_bench(runtime: int, cwd: str, rounds: int = 3, fill_gib: int = 2) -> dict:
    """Four disks of an instance under fio 4 KiB random writes (qd4 each)
    while a fifth one, holding `fill_gib` GiB written just before, is
    discarded whole with blkdiscard (what mkfs does, and fstrim or an ext4
    mounted with -o discard after files are deleted): the writers'
    latency and how long the discard took, against the same on five plain
    sparse files through loop devices, in the same run.  The engine serves
    a discard in the daemon's thread; whatever it does while it holds the
    write cache's lock in C, every disk's writers wait for.  Medians over
    `rounds` rounds (vdisk on a new pool and daemon each round, then the
    plain files), every round kept."""
    def load(devs: list, trim_dev: str, env: VDiskEnv | None) -> dict:
        sh("fio", "--name=fill", "--filename=" + trim_dev, "--ioengine=libaio", "--direct=1", *FILL,
           "--size=%dG" % fill_gib, "--end_fsync=1", "--output-format=json", cwd=cwd)
        before = fast_path(env) if env else None
        proc = start_writers(devs, runtime, cwd)
        time.sleep(min(5, runtime / 3))
        t0 = time.monotonic()
        sh("blkdiscard", trim_dev)
        discard_ms = (time.monotonic() - t0) * 1000
        res = {**writers_result(proc), "discard_ms": discard_ms}
        if env:
            after = fast_path(env)
            res["lock_waits"] = after["LockWaits"] - before["LockWaits"]
            res["lock_wait_max_ms"] = after["LockWaitMaxMs"]  # since the daemon started (the fill's commits too)
            res["engine_lock_hold_max_ms"] = after["EngineLockHoldMaxMs"]
        return res

    def vdisk_round(r: int, runs: dict) -> None:
        log("trim round %d: 4 disks under fio, a fifth with %d GiB discarded (vdisk) ..." % (r + 1, fill_gib))
        env = VDiskEnv(prefix="vdisk-trim-", io_limits="unlimited")
        try:
            env.start()
            iid = env.run("instance", "create", "--name", "trim", "--system-size", 1, "--system-pl", "PL0",
                          *[a for _ in range(3) for a in ("--data-disk", "1:cloud_essd:PL0")],
                          "--data-disk", "%d:cloud_essd:PL0" % (fill_gib * 4)).stdout.strip()
            disks = sorted(env.j("disk", "list", "--instance", iid)["Disks"]["Disk"], key=lambda d: d["Device"])
            env.run("instance", "start", iid)
            devs = [env.attach(d["DiskId"]) for d in disks]
            runs["vdisk"].append(load(devs[:4], devs[4], env))
        finally:
            env.close()

    def plain_round(r: int, runs: dict) -> None:
        log("trim round %d: the same on 5 plain files ..." % (r + 1))
        with plain_devices("vdisk-trim-plain-", [GIB] * 4 + [GIB * fill_gib * 4]) as devs:
            runs["plain"].append(load(devs[:4], devs[4], None))

    runs: dict = {"vdisk": [], "plain": []}
    for r in range(rounds):
        for part in in_turn((vdisk_round, plain_round), r):
            part(r, runs)
    return {"fill_gib": fill_gib, "runtime_s": runtime, **medians(runs)}


def print_trim(r: dict) -> None:
    v, p = r["vdisk"], r["plain"]
    print("4 disks under fio (4 KiB randwrite, qd4 each) while a fifth disk holding %d GiB is discarded whole"
          " (blkdiscard); medians of %d rounds:" % (r["fill_gib"], len(v["rounds"])))
    for name, x in (("vdisk", v), ("5 plain files", p)):
        print("  %-14s writers p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%.0f IOPS)  blkdiscard %7.1f ms"
              % (name, x["lat_p50_ms"], x["lat_p99_ms"], x["lat_max_ms"], x["iops"], x["discard_ms"]))
    print("  writers' max %.1fx the plain files'; the engine held the write cache's lock at most %.1f ms"
          % (v["lat_max_ms"] / p["lat_max_ms"], v["engine_lock_hold_max_ms"]))
    print("  each round's maxima (vdisk / plain, ms): " + ", ".join(
        "%.1f / %.1f" % (a["lat_max_ms"], b["lat_max_ms"]) for a, b in zip(v["rounds"], p["rounds"])))


def structure_bench(runtime: int, rounds: int = 2) -> dict:
    """One disk written 4 KiB at a time at random, each write fsynced (a
    database's log), while another disk of the instance takes fio's 4 KiB
    random writes at qd32 and a control client creates a disk, grows it and
    deletes it, over and over (CreateDisk, ResizeDisk, DeleteDisk, each a
    commit that changes volumes): the fsyncs' latency, and how many took
    over 20 and over 100 ms.  Each round on a new pool and daemon."""
    import mmap
    import random
    import threading

    from vdisk.config import Paths
    from vdisk.daemon import client

    def one(r: int) -> dict:
        log("structure round %d: fsyncs on one disk while disks are created, grown and deleted ..." % (r + 1))
        env = VDiskEnv(prefix="vdisk-structure-", io_limits="unlimited")
        try:
            env.start()
            iid, (a, b) = env.instance(ndata=2, size=2)
            env.run("instance", "start", iid)
            da, db = env.attach(a), env.attach(b)
            paths = Paths.resolve(env.data, env.mnt)
            stop = threading.Event()
            actions: list[float] = []
            each: dict[str, list[float]] = {}  # action -> its times (ms)
            errors: list[str] = []

            def churn() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    d = client.call(paths, {"Action": "CreateDisk", "Size": "20"}).get("DiskId")
                    each.setdefault("CreateDisk", []).append((time.monotonic() - t0) * 1000)
                    for req in ({"Action": "ResizeDisk", "DiskId": d, "NewSize": "40"},
                                {"Action": "DeleteDisk", "DiskId": d}):
                        t1 = time.monotonic()
                        got = client.call(paths, req)
                        each.setdefault(req["Action"], []).append((time.monotonic() - t1) * 1000)
                        if "Code" in got:
                            errors.append("%s: %s" % (req["Action"], got["Code"]))
                    actions.append((time.monotonic() - t0) * 1000)

            def probe() -> None:
                # an open and a close of a disk file, which pyfuse3 answers
                # in the daemon's thread (as it does a loop device's attach,
                # or what C hands back): how long that thread was held
                while not stop.is_set():
                    t0 = time.monotonic()
                    os.close(os.open(probe_path, os.O_RDONLY))
                    opens.append((time.monotonic() - t0) * 1000)
                    time.sleep(0.05)

            opens: list[float] = []
            probe_path = env.run("disk", "path", a).stdout.strip()
            load = subprocess.Popen(["fio", "--ioengine=libaio", "--direct=1", "--time_based",
                                     "--runtime=%d" % (runtime + 4), "--randrepeat=0", "--size=512M", "--name=load",
                                     "--filename=" + db, "--rw=randwrite", "--bs=4k", "--iodepth=32",
                                     "--output-format=json", "--percentile_list=50:99:99.9"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(2)
            th = threading.Thread(target=churn)
            th.start()
            pr = threading.Thread(target=probe)
            pr.start()
            lat = []
            fd = os.open(da, os.O_RDWR | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)
                buf.write(os.urandom(4096))
                rnd = random.Random(r)
                end = time.monotonic() + runtime
                while time.monotonic() < end:
                    os.pwrite(fd, buf, rnd.randrange(0, (2 * GIB) // 4096) * 4096)
                    t0 = time.monotonic()
                    os.fsync(fd)
                    lat.append((time.monotonic() - t0) * 1000)
            finally:
                os.close(fd)
                stop.set()
                th.join()
                pr.join()
            b_load = writers_result(load)
            lat.sort()
            n = len(lat)
            st = env.j("daemon", "status")
            return {"log_flushes": st["IntentLog"]["Flushes"], "log_flushes_in_c": st["IntentLog"]["FlushesInC"],
                    "passed_to_python": st["FastPath"]["PassedToPython"], "fsyncs": n, "p50_ms": lat[n // 2], "p99_ms": lat[int(n * 0.99)], "p999_ms": lat[int(n * 0.999)],
                    "max_ms": lat[-1], "over_20_ms": sum(x > 20 for x in lat), "over_100_ms": sum(x > 100 for x in lat),
                    "cycles": len(actions), "cycle_p50_ms": statistics.median(actions) if actions else None,
                    "refused": errors[:5], "b_iops": b_load["iops"], "b_p99_ms": b_load["lat_p99_ms"],
                    "b_max_ms": b_load["lat_max_ms"], "opens": len(opens), "open_max_ms": max(opens) if opens else None,
                    "opens_over_100_ms": sum(x > 100 for x in opens),
                    "action_p50_ms": {k: statistics.median(v) for k, v in each.items()}}
        finally:
            env.close()

    runs = [one(r) for r in range(rounds)]
    return {"runtime_s": runtime, "rounds": runs,
            **{k: statistics.median(x[k] for x in runs) for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms")}}


def print_structure(r: dict) -> None:
    print("fsyncs of one disk (4 KiB random write + fsync, one at a time) while another takes 4 KiB random writes"
          " at qd32 and a client creates, grows and deletes disks, %d s a round:" % r["runtime_s"])
    for i, x in enumerate(r["rounds"]):
        print("  round %d: %d fsyncs, p50 %.2f ms, p99 %.2f ms, p99.9 %.1f ms, max %.1f ms; over 20 ms %d, over 100 ms"
              " %d; %d create/grow/delete cycles, p50 %.0f ms%s"
              % (i + 1, x["fsyncs"], x["p50_ms"], x["p99_ms"], x["p999_ms"], x["max_ms"], x["over_20_ms"],
                 x["over_100_ms"], x["cycles"], x["cycle_p50_ms"] or 0,
                 ("; refused: " + ", ".join(x["refused"])) if x["refused"] else ""))
        print("           the log's records: %d, %d of them written by C; %d requests passed to Python"
              % (x["log_flushes"], x["log_flushes_in_c"], x["passed_to_python"]))
        print("           the qd32 disk: %.0f IOPS, p99 %.1f ms, max %.1f ms; opens of a disk file: %d, max %.1f ms,"
              " over 100 ms %d" % (x["b_iops"], x["b_p99_ms"], x["b_max_ms"], x["opens"], x["open_max_ms"] or 0,
                                   x["opens_over_100_ms"]))
        print("           each action's p50: %s" % ", ".join("%s %.0f ms" % kv for kv in x["action_p50_ms"].items()))


def snapshot_time_by_size(cwd: str) -> dict:
    """CreateSnapshot time for a 1 GiB and a 1 TiB (sparse) disk: the same."""
    from vdisk.config import Paths
    from vdisk.daemon import client

    env = VDiskEnv(prefix="vdisk-snaptime-", io_limits="unlimited")
    try:
        env.start()
        paths = Paths.resolve(env.data, env.mnt)
        out = {}
        for gib in (1, 1024):
            log("snapshot creation time, %d GiB disk ..." % gib)
            iid, (disk,) = env.instance(ndata=1, size=gib, pl="PL0" if gib < 20 else "PL1")
            env.run("instance", "start", iid)
            path = env.run("disk", "path", disk).stdout.strip()
            with open(path, "r+b", buffering=0) as f:  # a little data spread over the disk
                for i in range(64):
                    f.seek(i * (gib * GIB // 64))
                    f.write(os.urandom(65536))
            times = []
            for _ in range(7):
                t0 = time.monotonic()
                r = client.call(paths, {"Action": "CreateSnapshot", "DiskId": disk})
                assert "Code" not in r, r
                times.append((time.monotonic() - t0) * 1000)
            out["%d GiB" % gib] = {"median_ms": statistics.median(times), "max_ms": max(times)}
            env.run("instance", "stop", iid)
        return out
    finally:
        env.close()


def deletion_time(cwd: str) -> dict:
    """DeleteSnapshot time against how much changed between it and the next
    snapshot (the blocks only it still sees, which the delete frees)."""
    from vdisk.config import Paths
    from vdisk.daemon import client

    env = VDiskEnv(prefix="vdisk-deltime-", io_limits="unlimited")
    try:
        env.start()
        paths = Paths.resolve(env.data, env.mnt)
        iid, (disk,) = env.instance(ndata=1, size=2)
        env.run("instance", "start", iid)
        dev = env.attach(disk)
        fio(dev, FILL, "1G", None, cwd)
        out = {}
        for mib in (0, 16, 128, 1024):
            log("snapshot deletion time, %d MiB changed ..." % mib)
            old = client.call(paths, {"Action": "CreateSnapshot", "DiskId": disk})["SnapshotId"]
            if mib:
                fio(dev, ["--rw=randwrite", "--bs=64k", "--iodepth=8", "--io_size=%dM" % mib,
                          "--end_fsync=1"], "1G", None, cwd)
            new = client.call(paths, {"Action": "CreateSnapshot", "DiskId": disk})["SnapshotId"]
            used0 = env.j("pool", "status")["Pool"]["DataFileAllocatedBytes"]
            t0 = time.monotonic()
            r = client.call(paths, {"Action": "DeleteSnapshot", "SnapshotId": old})
            dt = (time.monotonic() - t0) * 1000
            assert "Code" not in r, r
            used1 = env.j("pool", "status")["Pool"]["DataFileAllocatedBytes"]
            out["%d MiB" % mib] = {"delete_ms": dt, "freed_mib": (used0 - used1) / (1 << 20)}
            client.call(paths, {"Action": "DeleteSnapshot", "SnapshotId": new})
        return out
    finally:
        env.close()


def memory_10x1tib(cwd: str, total_gib: int) -> dict:
    """The daemon's resident memory with 10 disks of 1 TiB, total_gib written
    across them (random 1 MiB writes spread over each whole disk)."""
    env = VDiskEnv(prefix="vdisk-mem-", io_limits="unlimited")
    try:
        env.start()
        pid = env.daemon_pid()
        rss_idle = proc_status(pid, "VmRSS")
        iid, _ = env.instance(ndata=9, size=1024, pl="PL1")
        disks = [d["DiskId"] for d in env.j("disk", "list", "--instance", iid)["Disks"]["Disk"]]
        env.run("instance", "start", iid)
        devs = [env.attach(d) for d in disks]
        per = total_gib * 1024 // len(devs)
        log("memory: writing %d GiB over 10 disks of 1 TiB ..." % total_gib)
        cmd = ["fio", "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=1M", "--iodepth=4",
               "--size=1T", "--io_size=%dM" % per, "--group_reporting", "--output-format=json",
               "--randrepeat=0", "--end_fsync=1"]
        for i, dev in enumerate(devs):
            cmd += ["--name=d%d" % i, "--filename=" + dev]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
        if r.returncode != 0:
            raise SystemExit("fio failed: %s" % r.stderr)
        dt = time.monotonic() - t0
        w = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]
        st = env.j("daemon", "status")
        fp = st["FastPath"]
        rss_end = {k: proc_status(pid, k) / (1 << 20) for k in ("VmRSS", "RssAnon", "RssFile")}
        # once the writes stop: within a commit interval or two (30 s), the
        # heap the commits freed goes back to the kernel (daemon/memory.py)
        trims, t_end = st["Memory"]["HeapTrims"], time.monotonic()
        while True:
            heap = env.j("daemon", "status")["Memory"]
            if heap["HeapTrims"] > trims or time.monotonic() - t_end > 75:
                break
            time.sleep(1)
        idle_after = {k: proc_status(pid, k) / (1 << 20) for k in ("VmRSS", "RssAnon")}
        idle_after["seconds"] = time.monotonic() - t_end
        return {
            "disks": len(devs), "disk_gib": 1024, "written_gib": w["io_bytes"] / GIB, "seconds": dt,
            "rss_idle_mib": rss_idle / (1 << 20),
            "rss_mib": rss_end["VmRSS"],
            "rss_peak_mib": proc_status(pid, "VmHWM") / (1 << 20),
            "rss_idle_after_mib": idle_after["VmRSS"], "rss_anon_idle_after_mib": idle_after["RssAnon"],
            "idle_after_s": idle_after["seconds"],
            # of the RSS: the daemon's own memory, and the pages of files it
            # maps (LMDB's map, the libraries), which the kernel may drop
            "rss_anon_mib": rss_end["RssAnon"],
            "rss_file_mib": rss_end["RssFile"],
            "pool_used_gib": env.j("pool", "status")["Pool"]["UsedBytes"] / GIB,
            # the writers' latency, and the fast path's cache of blocks
            # (its size, how often it was trimmed) and lock (the engine's
            # longest hold, the longest wait for it)
            "lat_p99_ms": w["clat_ns"]["percentile"]["99.000000"] / 1e6,
            "lat_max_ms": w["clat_ns"]["max"] / 1e6,
            "fast_path": {k: fp.get(k) for k in ("CacheEntries", "CacheMiB", "CacheTrims", "CacheTrimHoldMaxMs", "EngineLockHoldMaxMs",
                                                  "LockWaitMaxMs", "PassedToPython")},
            # the freed heap given back to the kernel once commits paused (daemon/memory.py)
            "heap": {k: heap[k] for k in ("HeapTrims", "HeapTrimMsMax", "HeapGivenBackMiB")},
        }
    finally:
        env.close()


# --------------------------------------------------------------- report

# --------------------------------------------------------------- I/O limits

# (category, performance level, GiB): each ESSD level, and two sizes of PL1
LEVEL_DISKS = [("cloud_essd", "PL0", 40), ("cloud_essd", "PL1", 40), ("cloud_essd", "PL1", 400),
               ("cloud_essd", "PL2", 461), ("cloud_essd", "PL3", 1261)]


def _fio_on(devs: list[str], args: list[str], runtime: int, cwd: str, extra: list[str] = ()) -> list[dict]:
    """fio on several devices at once (a job each): per device IOPS and MB/s."""
    cmd = ["fio", "--ioengine=libaio", "--direct=1", "--size=1G", "--time_based", "--runtime=%d" % runtime,
           "--ramp_time=1", "--output-format=json", "--randrepeat=0", *args, *extra]
    for i, dev in enumerate(devs):
        cmd += ["--name=d%d" % i, "--filename=" + dev]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit("fio failed: %s" % r.stderr)
    jobs = json.loads(r.stdout[r.stdout.index("{"):])["jobs"]
    rw = "write" if "write" in " ".join(args) else "read"
    return [{"iops": j[rw]["iops"], "mb_s": j[rw]["bw_bytes"] / 1e6} for j in jobs]


def levels_bench(runtime: int, cwd: str) -> dict:
    """Disks of each ESSD level (and two sizes of PL1) at the cloud's I/O
    limits (the pool's default): fio's 4 KiB random reads (qd32) and 1 MiB
    sequential reads (qd8) on each alone, against the limits; two disks at
    their limits at once (neither slows the other); and a PL1 disk
    modified to PL2 (ModifyDiskSpec) under load: how long until fio sees
    the new rate."""
    from vdisk.control import categories

    env = VDiskEnv(prefix="vdisk-levels-", io_limits="cloud")
    try:
        env.start()
        args = ["instance", "create", "--name", "levels", "--system-size", 20, "--system-pl", "PL1"]
        for cat, pl, gib in LEVEL_DISKS:
            args += ["--data-disk", "%d:%s:%s" % (gib, cat, pl)]
        iid = env.run(*args).stdout.strip()
        env.run("instance", "start", iid)
        disks = env.j("disk", "list", "--instance", iid)["Disks"]["Disk"]
        data = [d for d in sorted(disks, key=lambda d: d["Device"]) if d["Type"] == "data"]
        devs = [env.attach(d["DiskId"]) for d in data]
        out = {"disks": []}
        for (cat, pl, gib), d, dev in zip(LEVEL_DISKS, data, devs):
            iops, bps, unit = categories.io_limits(cat, pl, gib)
            log("levels: %s %s %d GiB (%d IOPS, %d MB/s) ..." % (cat, pl, gib, iops, bps // 1_000_000))
            rnd = _fio_on([dev], ["--rw=randread", "--bs=4k", "--iodepth=32"], runtime, cwd)[0]
            seq = _fio_on([dev], ["--rw=read", "--bs=1M", "--iodepth=8"], runtime, cwd)[0]
            # a 1 MiB request counts as 1 MiB / unit operations: the IOPS limit may come first
            ops = -(-(1 << 20) // unit) if unit else 1
            seq_cap = min(bps, iops / ops * (1 << 20)) / 1e6
            out["disks"].append({"category": cat, "level": pl, "gib": gib, "iops_cap": iops, "mb_s_cap": bps / 1e6,
                                 "iops": rnd["iops"], "seq_mb_s_cap": seq_cap, "seq_mb_s": seq["mb_s"]})
        log("levels: two disks at their limits at once ...")
        pair = _fio_on(devs[:2], ["--rw=randread", "--bs=4k", "--iodepth=32"], runtime, cwd)
        out["neighbours"] = [{"level": LEVEL_DISKS[i][1], "gib": LEVEL_DISKS[i][2],
                              "iops_cap": out["disks"][i]["iops_cap"], "iops": pair[i]["iops"]} for i in range(2)]
        out["modify_under_load"] = _modify_under_load(env, data[0]["DiskId"], devs[0], cwd)
        return out
    finally:
        env.close()


def _modify_under_load(env: VDiskEnv, disk: str, dev: str, cwd: str) -> dict:
    """fio's IOPS every 100 ms on the 40 GiB PL0 disk while ModifyDiskSpec
    makes it PL1 after 3 s: how long until the new rate shows."""
    from vdisk.control import categories

    before = categories.io_limits("cloud_essd", "PL0", 40)[0]
    after = categories.io_limits("cloud_essd", "PL1", 40)[0]
    logdir = tempfile.mkdtemp(prefix="vdisk-levels-log-", dir=cwd)
    try:
        cmd = ["fio", "--name=m", "--filename=" + dev, "--ioengine=libaio", "--direct=1", "--size=1G",
               "--rw=randread", "--bs=4k", "--iodepth=32", "--time_based", "--runtime=6", "--randrepeat=0",
               "--write_iops_log=" + os.path.join(logdir, "m"), "--log_avg_msec=100", "--output-format=json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
        time.sleep(3)
        t0 = time.monotonic()
        env.run("disk", "modify-spec", disk, "--performance-level", "PL1")
        call_s = time.monotonic() - t0
        proc.communicate()
        rows = []
        for name in os.listdir(logdir):
            with open(os.path.join(logdir, name)) as f:
                rows += [(int(r.split(",")[0]), int(r.split(",")[1])) for r in f if r.strip()]
        rows.sort()
        # the first 100 ms window past the old rate by half the difference
        threshold = before + (after - before) / 2
        changed_ms = next((ms for ms, iops in rows if ms > 2500 and iops > threshold), None)
        return {"iops_before_cap": before, "iops_after_cap": after, "call_s": call_s,
                "modify_at_ms": 3000, "new_rate_seen_at_ms": changed_ms,
                "iops_last_second": statistics.mean([v for ms, v in rows if ms > 5000] or [0])}
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def print_levels(r: dict) -> None:
    print("disks at the cloud's I/O limits (fio, 4 KiB random reads qd32 and 1 MiB sequential reads qd8):")
    print("%-22s %10s %10s %7s %12s %12s %7s" % ("disk", "IOPS cap", "measured", "ratio", "MB/s cap", "measured",
                                                "ratio"))
    for d in r["disks"]:
        print("%-22s %10d %10.0f %7.2f %12.1f %12.1f %7.2f" % (
            "%s %s %d GiB" % (d["category"], d["level"], d["gib"]), d["iops_cap"], d["iops"],
            d["iops"] / d["iops_cap"], d["seq_mb_s_cap"], d["seq_mb_s"], d["seq_mb_s"] / d["seq_mb_s_cap"]))
    print("two disks at once: " + ", ".join("%s %d GiB %.0f of %d IOPS" % (n["level"], n["gib"], n["iops"], n["iops_cap"])
                                             for n in r["neighbours"]))
    m = r["modify_under_load"]
    print("ModifyDiskSpec PL0 -> PL1 under load (%d -> %d IOPS): called at %d ms (took %.2f s), new rate seen at %s ms; "
          "last second %.0f IOPS" % (m["iops_before_cap"], m["iops_after_cap"], m["modify_at_ms"], m["call_s"],
                                     m["new_rate_seen_at_ms"], m["iops_last_second"]))


def cold_bench(repeat: int, cwd: str) -> dict:
    """4 KiB random writes (qd32, 64 MiB) over a 1 GiB region written
    whole, where the fast path's table is warm (right after a snapshot of
    the disk it just wrote) and where it starts empty: after a daemon
    restart (then a snapshot), after a reset of the disk to a snapshot, and
    on a disk created from a snapshot; and after the restart, over the
    disk's other GiB, never written (C's known windows at work).  Reports
    IOPS and how many requests C handed back to Python (the teaching of
    fastbridge.teach at work)."""
    args = ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=" + COW_IO]
    cases = ("warm, after a snapshot", "after a daemon restart and a snapshot", "after a reset to a snapshot",
             "on a disk created from a snapshot", "after a restart, over a GiB never written")
    runs: dict = {c: [] for c in cases}
    for r in range(repeat):
        env = VDiskEnv(prefix="vdisk-bench-cold-", io_limits="unlimited")
        try:
            env.start()
            t = VdiskTarget(env, 2)
            iid, disk, dev = t.iid, t.disk, t.dev
            fio(dev, FILL, "1G", None, cwd)

            def measure(case, dev, where=()):
                passed = passed_to_python(env)
                os.sync()
                log("cold: %s, run %d/%d" % (case, r + 1, repeat))
                res = fio(dev, args + list(where), "1G", None, cwd)
                res["passed_to_python"] = passed_to_python(env) - passed
                runs[case].append(res)

            snap = env.run("snapshot", "create", disk).stdout.strip()
            measure(cases[0], dev)
            env.run("loop", "detach", dev)
            env.stop()
            env.start()
            dev = env.attach(disk)
            env.run("snapshot", "create", disk)
            measure(cases[1], dev)
            measure(cases[4], dev, ["--offset=1G"])
            env.run("loop", "detach", dev)
            env.run("instance", "stop", iid)
            env.run("disk", "reset", disk, "--snapshot", snap)
            clone = env.run("disk", "create", "--snapshot", snap, "--size", 3, "--performance-level", "PL0").stdout.strip()
            env.run("disk", "attach", clone, "--instance", iid)
            env.run("instance", "start", iid)
            measure(cases[2], env.attach(disk))
            measure(cases[3], env.attach(clone))
        finally:
            env.close()
    return {c: {"iops": statistics.median(x["iops"] for x in v),
                "passed_to_python": statistics.median(x["passed_to_python"] for x in v), "runs": v}
            for c, v in runs.items()}


def print_cold(r: dict) -> None:
    print("4 KiB randwrite qd32, %s over a 1 GiB region written whole (the last: never written), where C's table is"
          " warm or starts empty:" % COW_IO)
    for case, v in r.items():
        print("  %-40s %8.0f IOPS   %6d requests handed back to Python" % (case, v["iops"], v["passed_to_python"]))


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    qsd = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem / GIB, 1), "kernel": platform.release(),
            "python": platform.python_version(), "qemu_storage_daemon": qsd}


def print_churn(c: dict) -> None:
    print("\nfio 4 KiB randwrite qd8 with verification, %d s, while %d clients create and delete snapshots"
          " and snapshot groups:" % (c["runtime_s"], c["clients"]))
    print("  writes: max latency %.1f ms, p99 %.2f ms, %.0f IOPS; verification %s   target: max < 250 ms, no error"
          % (c.get("lat_max_ms", -1), c.get("lat_p99_ms", -1), c.get("iops", 0),
             "passed" if c["verify_ok"] else "FAILED (fio exit %d): %s" % (c["fio_exit"], c["fio_stderr"][-300:])))
    for k, v in c["calls"].items():
        print("  %-20s %5d calls, p50 %7.1f ms, max %7.1f ms" % (k, v["n"], v["p50_ms"], v["max_ms"]))
    if c["refused_n"]:
        print("  %d calls refused: %s" % (c["refused_n"], "; ".join(c["refused"])))


def paired_ratio(v: dict, r: dict, key: str) -> float:
    """vdisk's figure over a peer's: the median of the rounds' ratios.
    Within a round the two ran next to each other (the targets take turns),
    so a drift of the machine from round to round (this VM's device
    flushes vary by 40% over minutes) cancels out of each round's ratio; the
    ratio of the two medians may pair vdisk's run of one round with the
    peer's of another (in v14, fsync: rounds of 1.02x, 0.93x and 1.07x, but
    0.93x for the medians, the machine having slowed by 20% meanwhile)."""
    return statistics.median(x[key] / y[key] for x, y in zip(v["runs"], r["runs"]) if y[key])


def print_report(results: dict, a) -> None:
    t = results["targets"]
    m = results["machine"]
    print("\nmachine: %d x %s, %.0f GiB, Linux %s, Python %s, %s"
          % (m["cpus"], m["cpu"], m["mem_gib"], m["kernel"], m["python"], m["qemu_storage_daemon"]))
    print("fio through loop devices (--direct-io=on), libaio, direct=1; median of %d runs of %ds, the targets "
          "taking turns run by run, forwards then backwards "
          "(after-snapshot runs: %s each, a new snapshot first); each run after sync(); region %s; "
          "vdisk/peer: the median of the rounds' ratios"
          % (a.repeat, a.runtime, COW_IO, results["region"]))
    names = [n for n in TARGETS if n in t]
    peers = names[1:]
    print("%-34s %s %s %10s" % ("pattern", " ".join("%14s" % n for n in names),
                                " ".join("%14s" % ("vdisk/" + n) for n in peers), "vdisk p99"))
    for pname, _, what, _ in a.patterns:
        key, unit = ("iops", "IOPS") if what == "iops" else ("bw_mib", "MiB/s")
        v = t["vdisk"].get(pname)
        cell = lambda r: "%8.0f %-5s" % (r[key], unit) if r else "%14s" % "-"  # noqa: E731
        ratio = lambda r: "%14.2f" % paired_ratio(v, r, key) if r and r[key] else "%14s" % "-"  # noqa: E731
        print("%-34s %s %s %7.0f us" % (pname, " ".join(cell(t[n].get(pname)) for n in names),
                                         " ".join(ratio(t[n].get(pname)) for n in peers), v["p99_us"]))
    d = results.get("vdisk_daemon")
    if d:
        fp = d["fast_path"]
        eng = fp.get("ServedByEngine", {})
        print("vdisk daemon: fast path %s; settings: %s" % (
            "on (%d reads, %d writes, %d fsyncs served in C; %d requests passed to Python, %d of them reads, "
            "writes or fsyncs, %d reads and %d writes served by the engine itself)"
            % (fp["Reads"], fp["Writes"], fp.get("Fsyncs", 0), fp["PassedToPython"], fp.get("IoPassedToPython", 0),
               eng.get("reads", 0), eng.get("writes", 0))
            if fp.get("Enabled") else "off",
            " ".join("%s=%s" % kv for kv in d["settings"].items()) or "defaults"))
        lg = d.get("intent_log")
        if lg:
            print("vdisk intent log: %d fsyncs flushed to it (%d MiB), %d done by a commit instead "
                  "(%d because the filesystem was too full for the log to grow)" % (
                      lg["Flushes"], lg["Bytes"] >> 20, lg["CommitsInstead"], lg.get("RefusedForSpace", 0)))
    print("\nvdisk write amplification, 4 KiB random writes (64 MiB, then fsync):")
    for label, w in results["write_amplification_4k"].items():
        print("  %-22s %5.1fx  (%d MiB written by the daemon for %d MiB, %.0f IOPS, %d MiB more on disk)"
              % (label, w["write_amplification"], w["daemon_bytes_written"] >> 20, w["fio_bytes"] >> 20, w["iops"],
                 w["new_space_bytes"] >> 20))
    wc = results.get("write_amplification_across_commits")
    if wc:
        print("  across %d commits (one 4 KiB write per block between commits, no snapshot): %s; settles at %.1fx"
              "   target: <= 2x" % (len(wc["rounds"]), " ".join("%.1f" % x for x in wc["rounds"]),
                                   wc["last_three_median"]))
    if "churn" in results:
        print_churn(results["churn"])
    if "barrier" in results:
        print_barrier(results["barrier"])
    if "snapshot_time_by_size" in results:
        print("snapshot creation time by disk size (sparse, 64 blocks written, median of 7):")
        for k, v in results["snapshot_time_by_size"].items():
            print("  %-8s median %.1f ms, max %.1f ms" % (k, v["median_ms"], v["max_ms"]))
    if "deletion_time" in results:
        print("snapshot deletion time by what changed since it (1 GiB written, then a snapshot after the change):")
        for k, v in results["deletion_time"].items():
            print("  %-9s changed: delete %7.1f ms, %6.0f MiB freed" % (k, v["delete_ms"], v["freed_mib"]))
    if "memory" in results:
        print_memory(results["memory"])
    print("\nwritten to %s" % os.path.join(a.out, "bench.json"))


def print_memory(mm: dict) -> None:
    print("daemon memory, %d disks of %d GiB, %.1f GiB written in %.0f s: RSS %.0f MiB (peak %.0f, idle %.0f)"
          "   target: < 300 MiB"
          % (mm["disks"], mm["disk_gib"], mm["written_gib"], mm["seconds"], mm["rss_mib"], mm["rss_peak_mib"],
             mm["rss_idle_mib"]))
    if "rss_anon_mib" in mm:
        print("  of the RSS: %.0f MiB the daemon's own (anonymous), %.0f MiB pages of files it maps (LMDB)"
              % (mm["rss_anon_mib"], mm["rss_file_mib"]))
    if "rss_idle_after_mib" in mm:
        print("  %.0f s after the writes (the heap the commits freed given back): RSS %.0f MiB, %.0f MiB its own"
              % (mm["idle_after_s"], mm["rss_idle_after_mib"], mm["rss_anon_idle_after_mib"]))
    fp = mm.get("fast_path")
    if fp:
        print("  writers' latency p99 %.2f ms, max %.1f ms; C's cache of blocks: %s entries, %s MiB, trimmed %s times"
              " (longest hold %s ms); the engine's longest hold of its lock %s ms, the longest wait for it %s ms;"
              " %s requests passed to Python"
              % (mm["lat_p99_ms"], mm["lat_max_ms"], fp["CacheEntries"], fp["CacheMiB"], fp["CacheTrims"],
                 fp.get("CacheTrimHoldMaxMs"), fp["EngineLockHoldMaxMs"], fp["LockWaitMaxMs"], fp["PassedToPython"]))
    heap = mm.get("heap")
    if heap:
        print("  freed heap given back to the kernel once commits paused: %.0f MiB in %d trims (longest %.1f ms)"
              % (heap["HeapGivenBackMiB"], heap["HeapTrims"], heap["HeapTrimMsMax"]))


def print_barrier(r: dict) -> None:
    b, base, pf = r["with_snapshots"], r["baseline"], r["plain_floor"]
    print("\ninstance snapshot of 10 disks under fio (4 KiB randwrite, qd4 each), the next 1 s after each answer;"
          " medians of %d rounds:" % len(b["rounds"]))
    print("  snapshots: create p50 %.1f ms, max %.1f ms (%d a round)" % (b["create_p50_ms"], b["create_max_ms"],
                                                                        b["snapshots"]))
    print("  writers' latency     p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%.0f IOPS)   max %.1fx the plain"
          " files' (target: at most 3x)"
          % (b["lat_p50_ms"], b["lat_p99_ms"], b["lat_max_ms"], b["iops"], b["lat_max_ms"] / pf["lat_max_ms"]))
    print("  baseline, no snaps   p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%.0f IOPS)"
          % (base["lat_p50_ms"], base["lat_p99_ms"], base["lat_max_ms"], base["iops"]))
    if "second_pass" in r:  # bench.json files before 2026-12-04 ran the snapshots on the baseline's disks
        sp = r["second_pass"]
        print("  same disks again     p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%.0f IOPS: the pass that copies whole,"
              " once, the blocks random writes left partial)"
              % (sp["lat_p50_ms"], sp["lat_p99_ms"], sp["lat_max_ms"], sp["iops"]))
    print("  10 plain files       p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%.0f IOPS: the machine's own floor;"
          " vdisk without snapshots %.2fx of it, target at least 0.5x)"
          % (pf["lat_p50_ms"], pf["lat_p99_ms"], pf["lat_max_ms"], pf["iops"], base["iops"] / pf["iops"]))
    print("  each round's maxima (with snapshots / baseline / plain files, ms): " + ", ".join(
        "%.1f / %.1f / %.1f" % (w["lat_max_ms"], o["lat_max_ms"], p["lat_max_ms"])
        for w, o, p in zip(b["rounds"], base["rounds"], pf["rounds"])))


def only(a, key: str, measure, printer, **extra) -> int:
    """One measurement alone (--cold, --vm, --levels, --only-churn, --only-barrier): its
    results under `key` in bench-KEY.json, printed by printer (or as JSON)."""
    if os.geteuid() != 0:
        raise SystemExit("scripts/bench needs root (loop devices)")
    results = {"machine": machine(), **extra, key: measure()}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench-%s.json" % key), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2)) if a.json else printer(results[key])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per measurement (default 10)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per measurement (default 3)")
    ap.add_argument("--size-gib", type=int, default=1, help="region fio works on (default 1 GiB)")
    ap.add_argument("--out", default="bench-results", help="directory for bench.json")
    ap.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    ap.add_argument("--no-snapshot-costs", action="store_true",
                    help="only the fio table: skip the barrier, creation, deletion and memory measurements")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated; vdisk is always measured (default %s)" % ",".join(TARGETS))
    ap.add_argument("--patterns", default="",
                    help="comma-separated parts of fio pattern names to run (say 'fsync'); default all")
    ap.add_argument("--barrier-runtime", type=int, default=20, help="seconds of load per barrier run (default 20)")
    ap.add_argument("--barrier-rounds", type=int, default=3,
                    help="rounds of the barrier's four loads, medians reported (default 3)")
    ap.add_argument("--memory-gib", type=int, default=10, help="GiB written for the memory figure (default 10)")
    ap.add_argument("--churn-clients", type=int, default=8,
                    help="control clients creating and deleting snapshots in the churn run (default 8)")
    ap.add_argument("--only-churn", action="store_true",
                    help="only the churn run: fio with verification while clients create and delete snapshots")
    ap.add_argument("--only-memory", action="store_true",
                    help="only the daemon's memory: 10 disks of 1 TiB, --memory-gib written across them")
    ap.add_argument("--only-barrier", action="store_true",
                    help="only the barrier run: ten disks under fio with an instance snapshot a second, against "
                    "no snapshots and ten plain files")
    ap.add_argument("--structure", action="store_true",
                    help="only fsyncs under disk changes: one disk fsyncs each 4 KiB write while another takes load "
                    "and a client creates, grows and deletes disks")
    ap.add_argument("--trim", action="store_true",
                    help="only discards under load: four disks under fio while a fifth, holding 2 GiB, is discarded "
                    "whole (blkdiscard), against five plain files")
    ap.add_argument("--levels", action="store_true",
                    help="only the I/O limits: disks of each ESSD level at the cloud's limits, fio against the caps; "
                    "two at once; ModifyDiskSpec under load")
    ap.add_argument("--vm", action="store_true",
                    help="only what a virtual machine costs: boot, stop, memory, guest/host ratios (scripts/bench_vm.py)")
    ap.add_argument("--cold", action="store_true",
                    help="only first writes to blocks the fast path has not seen: after a restart, a reset to a "
                    "snapshot, on a disk created from one, against warm")
    ap.add_argument("--repository", action="store_true",
                    help="only snapshots leaving the host: archive, restore and incremental archives on a local Ceph "
                    "against rados bench, and the change into RBD against rbd export-diff (scripts/bench_repository.py)")
    a = ap.parse_args()
    if a.repository:
        from bench_repository import print_repository, repository_bench

        return only(a, "repository", lambda: repository_bench(a.repeat, a.size_gib, log), print_repository,
                    repeat=a.repeat)
    if a.cold:
        return only(a, "cold", lambda: cold_bench(a.repeat, tempfile.gettempdir()), print_cold, repeat=a.repeat)
    if a.vm:
        from bench_vm import print_vm, vm_costs

        return only(a, "vm", lambda: vm_costs(a.repeat, log), print_vm, repeat=a.repeat)
    if a.levels:
        return only(a, "levels", lambda: levels_bench(a.runtime, tempfile.gettempdir()), print_levels)
    if a.only_churn:
        return only(a, "churn", lambda: churn_bench(a.barrier_runtime * 3, a.churn_clients, tempfile.gettempdir()),
                    print_churn)
    if a.structure:
        return only(a, "structure", lambda: structure_bench(a.barrier_runtime, a.barrier_rounds), print_structure)
    if a.trim:
        return only(a, "trim", lambda: trim_bench(a.barrier_runtime, tempfile.gettempdir(), a.barrier_rounds),
                    print_trim)
    if a.only_memory:
        return only(a, "memory", lambda: memory_10x1tib(tempfile.gettempdir(), a.memory_gib), print_memory)
    if a.only_barrier:
        return only(a, "barrier", lambda: barrier_bench(a.barrier_runtime, 1.0, tempfile.gettempdir(),
                                                        a.barrier_rounds), print_barrier)
    a.targets = set(a.targets.split(","))
    wanted = [w for w in a.patterns.split(",") if w]
    a.patterns = [p for p in PATTERNS if not wanted or any(w in p[0] for w in wanted)]
    if not a.patterns:
        ap.error("no fio pattern matches %r; the patterns are: %s" % (",".join(wanted), "; ".join(p[0] for p in PATTERNS)))
    unknown = a.targets - set(TARGETS)
    if unknown:
        ap.error("unknown target(s) %s: choose among %s" % (", ".join(sorted(unknown)), ", ".join(TARGETS)))
    if os.geteuid() != 0:
        raise SystemExit("scripts/bench needs root (loop devices)")
    size = "%dG" % a.size_gib
    results: dict = {"machine": machine(), "runtime_s": a.runtime, "repeat": a.repeat, "region": size}
    cwd = tempfile.gettempdir()
    env = VDiskEnv(prefix="vdisk-bench-", io_limits="unlimited")
    try:
        env.start()
        t = fio_patterns(a, size, cwd, env)
        results["write_amplification_4k"] = t.pop("_write_amplification_4k")
        results["targets"] = t
        status = env.j("daemon", "status")
        results["vdisk_daemon"] = {
            "fast_path": status["FastPath"],
            "intent_log": status["IntentLog"],
            "settings": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("VDISK_")},
        }
    finally:
        env.close()
    log("write amplification across commits ...")
    results["write_amplification_across_commits"] = wa_across_commits(a.size_gib, cwd)
    if not a.no_snapshot_costs:
        log("churn: fio with verification under %d clients creating and deleting snapshots ..." % a.churn_clients)
        results["churn"] = churn_bench(a.barrier_runtime * 3, a.churn_clients, cwd)
        results["barrier"] = barrier_bench(a.barrier_runtime, 1.0, cwd, a.barrier_rounds)
        results["snapshot_time_by_size"] = snapshot_time_by_size(cwd)
        results["deletion_time"] = deletion_time(cwd)
        results["memory"] = memory_10x1tib(cwd, a.memory_gib)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=2)
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
