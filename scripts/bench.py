"""fio through loop devices (direct I/O): vdisk against a plain sparse file.

Run through scripts/bench (which sets up first).  Every target is measured in
the same run, each pattern repeated (median reported), so only the ratios
mean something on a shared, noisy machine.  Writes bench-results/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from vdisk.harness import VDiskEnv, sh

GIB = 1 << 30

PATTERNS = [
    # name, fio args, what to report
    ("seqwrite 1M qd8", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw"),
    ("seqread 1M qd8", ["--rw=read", "--bs=1M", "--iodepth=8"], "bw"),
    ("randwrite 4k qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops"),
    ("randread 4k qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "iops"),
    ("randwrite 4k qd1 fsync", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "iops"),
]


def fio(dev: str, args: list[str], size: str, runtime: int | None, cwd: str, extra=()) -> dict:
    cmd = ["fio", "--name=bench", "--filename=" + dev, "--ioengine=libaio", "--direct=1", "--size=" + size,
           "--group_reporting", "--output-format=json", "--randrepeat=0", *args, *extra]
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


def barrier_bench(runtime: int, interval: float, cwd: str) -> dict:
    """Ten disks under fio 4 KiB random writes; an instance snapshot of all
    ten every `interval` seconds.  Reports how long each snapshot took and
    the writers' latency (p50/p99/max), against the same load without
    snapshots (the baseline, measured in the same run)."""
    from vdisk.config import Paths
    from vdisk.daemon import client

    env = VDiskEnv(prefix="vdisk-barrier-")
    try:
        env.start()
        iid, disks = env.instance(ndata=9)  # + the system disk = 10 disks
        disks = [d["DiskId"] for d in env.j("disk", "list", "--instance", iid)["Disks"]["Disk"]]
        env.run("instance", "start", iid)
        devs = [env.attach(d) for d in disks]
        paths = Paths.resolve(env.data, env.mnt)

        def load(snapshots: bool) -> dict:
            cmd = ["fio", "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=4",
                   "--size=256M", "--time_based", "--runtime=%d" % runtime, "--group_reporting",
                   "--output-format=json", "--percentile_list=50:99:99.9", "--randrepeat=0"]
            for i, dev in enumerate(devs):
                cmd += ["--name=d%d" % i, "--filename=" + dev]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
            times = []
            time.sleep(1.5)
            while snapshots and proc.poll() is None:
                t0 = time.monotonic()
                r = client.call(paths, {"Action": "CreateSnapshotGroup", "InstanceId": iid})
                if "Code" in r:
                    raise SystemExit("snapshot group failed: %s" % r)
                times.append((time.monotonic() - t0) * 1000)
                time.sleep(interval)
            out, err = proc.communicate()
            job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
            pct = job["clat_ns"]["percentile"]
            res = {"iops": job["iops"], "lat_p50_ms": pct["50.000000"] / 1e6, "lat_p99_ms": pct["99.000000"] / 1e6,
                   "lat_max_ms": job["clat_ns"]["max"] / 1e6}
            if snapshots:
                times.sort()
                res.update(snapshots=len(times), create_p50_ms=statistics.median(times), create_max_ms=times[-1])
            return res

        print("barrier: 10 disks under fio, no snapshots (baseline) ...", file=sys.stderr)
        base = load(False)
        print("barrier: 10 disks under fio, an instance snapshot every %.1fs ..." % interval, file=sys.stderr)
        with_snaps = load(True)
        for dev in devs:
            env.run("loop", "detach", dev)
        return {"baseline": base, "with_snapshots": with_snaps}
    finally:
        env.close()


def snapshot_time_by_size(cwd: str) -> dict:
    """CreateSnapshot time for a 1 GiB and a 1 TiB (sparse) disk: the same."""
    from vdisk.config import Paths
    from vdisk.daemon import client

    env = VDiskEnv(prefix="vdisk-snaptime-")
    try:
        env.start()
        paths = Paths.resolve(env.data, env.mnt)
        out = {}
        for gib in (1, 1024):
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


def proc_wchar(pid: int) -> int:
    with open("/proc/%d/io" % pid) as f:
        return int(dict(l.split(": ") for l in f.read().splitlines())["wchar"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per measurement (default 10)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per measurement (default 3)")
    ap.add_argument("--size-gib", type=int, default=1, help="region fio works on (default 1 GiB)")
    ap.add_argument("--out", default="bench-results", help="directory for bench.json")
    ap.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    ap.add_argument("--no-barrier", action="store_true", help="skip the instance-snapshot measurements")
    ap.add_argument("--barrier-runtime", type=int, default=20, help="seconds of load per barrier run (default 20)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("scripts/bench needs root (loop devices)")
    size = "%dG" % a.size_gib
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "runtime_s": a.runtime, "repeat": a.repeat, "region": size, "targets": {},
    }
    env = VDiskEnv(prefix="vdisk-bench-")
    plain_dev = None
    try:
        env.start()
        iid, (disk,) = env.instance(ndata=1, size=max(a.size_gib, 1) + 1)
        env.run("instance", "start", iid)
        vdev = env.attach(disk)
        plain = os.path.join(env.dir, "plain.img")
        with open(plain, "wb") as f:
            f.truncate((a.size_gib + 1) * GIB)
        plain_dev = sh("losetup", "--find", "--show", "--direct-io=on", plain).stdout.strip()
        targets = {"vdisk": vdev, "plain": plain_dev}
        for name, dev in targets.items():  # fill the region so reads read data
            print("filling %s on %s ..." % (size, name), file=sys.stderr)
            fio(dev, ["--rw=write", "--bs=1M", "--iodepth=8"], size, None, env.dir)
        for pname, args, _ in PATTERNS:
            for name, dev in targets.items():
                runs = []
                for i in range(a.repeat):
                    print("%-24s %-6s run %d/%d" % (pname, name, i + 1, a.repeat), file=sys.stderr)
                    runs.append(fio(dev, args, size, a.runtime, env.dir))
                results["targets"].setdefault(name, {})[pname] = {
                    "iops": statistics.median(r["iops"] for r in runs),
                    "bw_mib": statistics.median(r["bw_mib"] for r in runs),
                    "p99_us": statistics.median(r["p99_us"] for r in runs),
                    "runs": runs,
                }
        # write amplification of 4 KiB random writes: right after a snapshot
        # of the filled region, and again with no snapshot in between
        pid = env.daemon_pid()
        wa = {}
        for label, snap in (("after snapshot", True), ("no snapshot", False)):
            if snap:
                env.run("snapshot", "create", disk)
            used0 = env.j("pool", "status")["Pool"]["UsedBytes"]
            w0 = proc_wchar(pid)
            t0 = time.monotonic()
            r = fio(vdev, ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=64M", "--end_fsync=1"], size, None, env.dir)
            dt = time.monotonic() - t0
            w1 = proc_wchar(pid)
            used1 = env.j("pool", "status")["Pool"]["UsedBytes"]
            wa[label] = {
                "fio_bytes": r["bytes"],
                "daemon_bytes_written": w1 - w0,
                "write_amplification": (w1 - w0) / r["bytes"],
                "new_space_bytes": used1 - used0,
                "iops": r["bytes"] / 4096 / dt,
            }
        results["write_amplification_4k"] = wa
    finally:
        if plain_dev:
            sh("losetup", "-d", plain_dev, check=False)
        env.close()

    if not a.no_barrier:
        results["barrier"] = barrier_bench(a.barrier_runtime, 1.0, tempfile.gettempdir())
        results["snapshot_time_by_size"] = snapshot_time_by_size(tempfile.gettempdir())

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=2)
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    t = results["targets"]
    print("\nfio through loop devices (--direct-io=on), libaio, direct=1; median of %d x %ds; region %s"
          % (a.repeat, a.runtime, size))
    print("%-24s %14s %14s %12s %12s" % ("pattern", "vdisk", "plain", "vdisk/plain", "vdisk p99"))
    for pname, _, what in PATTERNS:
        v, p = t["vdisk"][pname], t["plain"][pname]
        key, unit = ("iops", "IOPS") if what == "iops" else ("bw_mib", "MiB/s")
        print("%-24s %9.0f %-4s %9.0f %-4s %12.2f %9.0f us" % (pname, v[key], unit, p[key], unit, v[key] / p[key], v["p99_us"]))
    print("\nvdisk write amplification, 4 KiB random writes (64 MiB over %s, then fsync):" % size)
    for label, w in wa.items():
        print("  %-15s %5.1fx  (%d MiB written by the daemon for %d MiB, %.0f IOPS, %d MiB new space)"
              % (label, w["write_amplification"], w["daemon_bytes_written"] >> 20, w["fio_bytes"] >> 20, w["iops"], w["new_space_bytes"] >> 20))
    if "barrier" in results:
        b, base = results["barrier"]["with_snapshots"], results["barrier"]["baseline"]
        print("\ninstance snapshot of 10 disks under fio (4 KiB randwrite, qd4 each), one a second:")
        print("  %d snapshots: create p50 %.1f ms, max %.1f ms" % (b["snapshots"], b["create_p50_ms"], b["create_max_ms"]))
        print("  writers' latency     p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%.0f IOPS)" % (b["lat_p50_ms"], b["lat_p99_ms"], b["lat_max_ms"], b["iops"]))
        print("  baseline, no snaps   p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%.0f IOPS)" % (base["lat_p50_ms"], base["lat_p99_ms"], base["lat_max_ms"], base["iops"]))
        print("snapshot creation time by disk size (sparse, 64 blocks written):")
        for k, v in results["snapshot_time_by_size"].items():
            print("  %-8s median %.1f ms, max %.1f ms" % (k, v["median_ms"], v["max_ms"]))
    print("\nwritten to %s" % os.path.join(a.out, "bench.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
