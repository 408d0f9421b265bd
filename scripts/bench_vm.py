"""What a virtual machine costs here (scripts/bench --vm): boot, stop and
power-cut times, QEMU's memory, and the same work inside the guest and on
the host in the same run (ratios guest/host): direct 1 MiB writes, direct
4 KiB writes at queue depth 1, fsynced file creation (vdisk-load), and a
shell loop (pure CPU).  Host and guest write to disks of the same pool
(the host through a loop device with direct I/O, the guest through virtio
with cache=none).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time

from vdisk.harness import VDiskEnv, sh
from vdisk.vm import assets
from vdisk.vm.machine import accelerator_note

CPU_LOOP = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"


def _secs(text: str) -> float:
    """The elapsed time of `time -p`'s output ('real 1.23')."""
    m = re.search(r"real\s+([0-9.]+)", text)
    if not m:
        raise RuntimeError("no 'real' in %r" % text[-300:])
    return float(m.group(1))


def _timed_host(cmd: str) -> float:
    r = subprocess.run(["busybox", "sh", "-c", "time -p sh -c '%s' 2>&1" % cmd.replace("'", "'\\''")],
                       capture_output=True, text=True)
    return _secs(r.stdout + r.stderr)


def _timed_guest(env: VDiskEnv, iid: str, cmd: str) -> float:
    out = env.run("instance", "run", "--timeout", "3600", iid,
                  "time -p sh -c '%s' 2>&1" % cmd.replace("'", "'\\''")).stdout
    return _secs(out)


def _wait(env: VDiskEnv, iid: str, want: str) -> float:
    t = time.monotonic()
    while env.j("instance", "show", iid)["Status"] != want:
        time.sleep(0.05)
    return time.monotonic() - t


def vm_costs(repeat: int, log) -> dict:
    guest = assets.ensure(log)
    loadbin = os.path.join(os.path.dirname(guest.initrd), "vdisk-load-host")
    sh("gcc", "-O2", "-static", "-o", loadbin, os.path.join(assets.GUEST_DIR, "load.c"))
    env = VDiskEnv(prefix="vdisk-bench-vm-", io_limits="unlimited")
    res: dict = {"accelerator": accelerator_note()}
    try:
        env.start()
        iid = env.run("instance", "create", "--vm", "--system-size", "1", "--system-pl", "PL0",
                      "--data-disk", "20:cloud_essd:PL1").stdout.strip()
        host_inst, host_disks = env.instance(ndata=1, size=20, pl="PL1", name="hostside")
        env.run("instance", "start", host_inst)
        boots, stops, cuts = [], [], []
        for _ in range(repeat):
            t = time.monotonic()
            env.run("instance", "start", "--no-wait", iid)
            _wait(env, iid, "Running")
            boots.append(time.monotonic() - t)
            t = time.monotonic()
            env.run("instance", "stop", "--no-wait", iid)
            _wait(env, iid, "Stopped")
            stops.append(time.monotonic() - t)
        for _ in range(repeat):
            env.run("instance", "start", iid)
            t = time.monotonic()
            env.run("instance", "crash", iid)
            cuts.append(time.monotonic() - t)
        res["boot_s"] = statistics.median(boots)
        res["stop_s"] = statistics.median(stops)
        res["power_cut_s"] = statistics.median(cuts)
        env.run("instance", "start", iid)
        vm = env.j("instance", "show", iid)["VirtualMachine"]
        with open("/proc/%d/status" % vm["Pid"]) as f:
            res["qemu_rss_idle_mib"] = int(next(l for l in f if l.startswith("VmRSS")).split()[1]) // 1024
        dev = env.attach(host_disks[0])
        mnt = os.path.join(env.dir, "hostfs")
        os.makedirs(mnt)
        work = {
            "seqwrite 1M direct, 512 MiB (MB/s)": ("dd if=/dev/zero of={dev} bs=1M count=512 oflag=direct 2>/dev/null", 512),
            "write 4k direct qd1, 4000 (IOPS)": ("dd if=/dev/zero of={dev} bs=4k count=4000 seek=1000 oflag=direct 2>/dev/null", 4000),
            "shell loop, 200000 iterations (per s)": (CPU_LOOP, 200000),
        }
        rows = {}
        for name, (cmd, amount) in work.items():
            g = statistics.median(_timed_guest(env, iid, cmd.format(dev="/dev/vdb")) for _ in range(repeat))
            h = statistics.median(_timed_host(cmd.format(dev=dev)) for _ in range(repeat))
            rows[name] = {"guest": amount / g, "host": amount / h, "ratio": h / g}  # guest rate / host rate
        # fsynced files for 5 s (ext4 on each side)
        env.run("instance", "run", iid, "mkfs.ext4 -q -F /dev/vdb && mount /dev/vdb /mnt")
        sh("mkfs.ext4", "-q", "-F", dev)
        sh("mount", dev, mnt)
        try:
            out = env.run("instance", "run", iid, "mkdir /mnt/f && timeout -s TERM 5 vdisk-load files /mnt/f 1 x | wc -l").stdout
            gfiles = int(out.split()[-1]) / 5
            os.makedirs(os.path.join(mnt, "f"))
            r = subprocess.run("timeout -s TERM 5 %s files %s/f 1 x | wc -l" % (loadbin, mnt), shell=True,
                               capture_output=True, text=True)
            hfiles = int(r.stdout.split()[-1]) / 5
        finally:
            sh("umount", mnt)
            sh("losetup", "-d", dev)
        rows["fsynced files on ext4 (per s)"] = {"guest": gfiles, "host": hfiles, "ratio": gfiles / hfiles}
        res["work"] = rows
        with open("/proc/%d/status" % vm["Pid"]) as f:
            res["qemu_rss_after_mib"] = int(next(l for l in f if l.startswith("VmRSS")).split()[1]) // 1024
        env.run("instance", "crash", iid)
    finally:
        env.close()
    return res


def print_vm(res: dict) -> None:
    print("virtual machine costs (%s)" % res["accelerator"])
    print("  boot to Running %.1f s, power off %.1f s, power cut %.2f s; QEMU RSS %d MiB idle, %d MiB after the work"
          % (res["boot_s"], res["stop_s"], res["power_cut_s"], res["qemu_rss_idle_mib"], res["qemu_rss_after_mib"]))
    print("  %-42s %12s %12s %10s" % ("work", "guest", "host", "guest/host"))
    for name, r in res["work"].items():
        print("  %-42s %12.1f %12.1f %10.3f" % (name, r["guest"], r["host"], r["ratio"]))


if __name__ == "__main__":
    r = vm_costs(3, print)
    print(json.dumps(r, indent=2))
    print_vm(r)
