"""A root filesystem made into a custom image, so that CreateInstance with
its ImageId gives virtual machines that boot that system, as in the cloud.

`import_rootfs` drives the cloud's own actions through `call` (the CLI's
client): a scratch instance with a system disk of the size asked, its file
attached as a loop device, ext4 labelled `vdisk-root` made on it and the
tree copied in, a snapshot of the disk, CreateImage from the snapshot; the
scratch instance and its disk go, the snapshot stays (the image uses it).
The guest's /init switches to a filesystem with that label on the system
disk (vm/guest/init, stage 2).  Root only (loop devices, mount).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from ..host import loop

LABEL = "vdisk-root"


class ImageImportError(Exception):
    pass


def _run(*args) -> None:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageImportError("%s failed (%d): %s" % (" ".join(args), r.returncode, (r.stderr or r.stdout).strip()[-400:]))


def tree_size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def import_rootfs(call, rootfs: str, name: str | None, size_gib: int | None, progress=lambda s: None) -> dict:
    """Make an image whose system disk holds rootfs; returns
    {"ImageId", "SnapshotId", "SizeGiB"}."""
    if not os.path.isdir(rootfs) or not os.path.isdir(os.path.join(rootfs, "etc")):
        raise ImageImportError("%s is not a root filesystem (a directory with etc/ in it)" % rootfs)
    need = tree_size(rootfs)
    size = size_gib or max(2, -(-need * 2 // (1 << 30)))  # twice the tree, at least 2 GiB
    if need > (size << 30) * 0.9:
        raise ImageImportError("%s holds %.1f GiB: --size %d GiB is too small" % (rootfs, need / (1 << 30), size))
    progress("a scratch instance with a %d GiB system disk" % size)
    inst = call("CreateInstance", InstanceName="image-import", **{"SystemDisk.Size": size,
                                                                  "SystemDisk.Category": "cloud_essd",
                                                                  "SystemDisk.PerformanceLevel": "PL0"})
    iid, dev, mnt, started = inst["InstanceId"], None, None, False
    disk = call("DescribeDisks", InstanceId=iid)["Disks"]["Disk"][0]["DiskId"]
    try:
        call("StartInstance", InstanceId=iid)
        started = True
        path = call("DescribeDisks", DiskIds=[disk])["Disks"]["Disk"][0]["FilePath"]
        dev = loop.attach(path)
        progress("ext4 labelled %s on %s (%s)" % (LABEL, disk, dev))
        _run("mkfs.ext4", "-q", "-F", "-L", LABEL, dev)
        mnt = tempfile.mkdtemp(prefix="vdisk-image-import-")
        _run("mount", dev, mnt)
        progress("copying %s (%.0f MiB)" % (rootfs, need / (1 << 20)))
        _run("cp", "-a", rootfs.rstrip("/") + "/.", mnt)
        _run("umount", mnt)
        os.rmdir(mnt)
        mnt = None
        loop.detach(dev)
        dev = None
        call("StopInstance", InstanceId=iid)
        started = False
        progress("snapshot and image")
        snap = call("CreateSnapshot", DiskId=disk, SnapshotName="image-import")["SnapshotId"]
        img = call("CreateImage", SnapshotId=snap, **({"ImageName": name} if name else {}))["ImageId"]
        return {"ImageId": img, "SnapshotId": snap, "SizeGiB": size}
    finally:
        if mnt is not None:
            subprocess.run(["umount", mnt], capture_output=True)
            shutil.rmtree(mnt, ignore_errors=True)
        if dev is not None:
            try:
                loop.detach(dev)
            except loop.LoopError:
                pass
        try:
            if started:
                call("StopInstance", InstanceId=iid)
            call("DeleteInstance", InstanceId=iid)
        except Exception:  # noqa: BLE001 - cleanup must not hide the first error
            pass
