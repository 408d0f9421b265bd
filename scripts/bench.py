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
    print("\nwritten to %s" % os.path.join(a.out, "bench.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
