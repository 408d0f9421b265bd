"""Loop devices over disk files, the way a user attaches them.

`attach` runs `losetup --find --show --direct-io=on FILE`: direct I/O keeps the
loop driver from putting the page cache between the filesystem and the vdisk
daemon, which would reorder writes and make snapshots inconsistent (see
docs/consistency.md).
"""
from __future__ import annotations

import glob
import os
import stat
import subprocess
import time


class LoopError(Exception):
    pass


def _run(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LoopError("%s is not installed (Debian package util-linux/mount)" % args[0]) from None
    if r.returncode != 0:
        raise LoopError("%s failed: %s" % (" ".join(args), (r.stderr or r.stdout).strip()))
    return r.stdout.strip()


def attach(path: str, read_only: bool = False) -> str:
    args = ["losetup", "--find", "--show", "--direct-io=on"]
    if read_only:
        args.append("--read-only")
    dev = _run(args + [path])
    dio = _sysfs(dev, "loop/dio")
    if dio != "1":
        detach(dev)
        raise LoopError(
            "the loop driver did not turn direct I/O on for %s (loop/dio=%s); "
            "without it snapshots are not crash-consistent" % (path, dio)
        )
    return dev


# how long detach() waits for the kernel to let go of the backing file
DETACH_WAIT = 10.0


def detach(dev: str) -> None:
    """Detach dev, and return once the kernel has let go of its backing
    file.  `losetup --detach` of a device something still has open (udev
    probing it after an umount) only marks it to be cleared at the last
    close, so the file would still count as open for a moment: a StopInstance
    right after it was refused as "held open"."""
    backing = backing_file(dev)
    _run(["losetup", "--detach", dev])
    deadline = time.monotonic() + DETACH_WAIT
    while backing is not None and backing_file(dev) == backing and time.monotonic() < deadline:
        time.sleep(0.02)


def _sysfs(dev: str, what: str) -> str | None:
    try:
        with open("/sys/block/%s/%s" % (os.path.basename(dev), what)) as f:
            return f.read().strip()
    except OSError:
        return None


def backing_file(dev: str) -> str | None:
    """The file behind loop device dev, or None if dev is not an attached
    loop device (a name that is not one, a loop device with nothing behind
    it, a path that does not exist).  Reads sysfs only."""
    name = os.path.basename(dev)
    if not name.startswith("loop") or os.path.dirname(dev) != "/dev":
        return None
    try:
        if not stat.S_ISBLK(os.stat(dev).st_mode):
            return None
    except OSError:
        return None
    backing = _sysfs(dev, "loop/backing_file")
    return backing.removesuffix(" (deleted)") if backing else None


def list_loops() -> list[dict]:
    out = []
    for d in sorted(glob.glob("/sys/block/loop*")):
        backing = _sysfs(d, "loop/backing_file")
        if backing:
            dev = "/dev/" + os.path.basename(d)
            out.append({"name": dev, "back-file": backing, "dio": _sysfs(d, "loop/dio") == "1"})
    return out


def loop_devices_for(path: str) -> list[str]:
    """Loop devices backed by path.  path must already be absolute and free
    of symlinks: this never touches it (the daemon calls this about files in
    its own FUSE mount, and a stat there from the daemon's thread would wait
    for itself)."""
    return [l["name"] for l in list_loops() if l["back-file"] in (path, path + " (deleted)")]
