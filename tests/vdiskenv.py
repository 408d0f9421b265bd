"""Test helpers: skip reasons, and the daemon harness (vdisk.harness)."""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

from vdisk.harness import VDiskEnv, sh, sha256_file, wait_exit, write_random_blocks  # noqa: F401


def need_root_fuse_loop(*tools: str) -> None:
    """Skip (with the reason) unless this machine can run the real thing."""
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mounts)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("needs loop devices (/dev/loop-control)")
    for t in ("losetup",) + tools:
        if shutil.which(t) is None:
            pytest.skip("needs %s" % t)


@contextlib.contextmanager
def small_pool(tmp_path, size="48m"):
    """A VDiskEnv (not started) whose data directory is on a tmpfs of size:
    a pool filesystem that fills up.  Unmounted and removed afterwards."""
    need_root_fuse_loop()
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", small)
    env = VDiskEnv(parent=str(small))
    try:
        yield env
    finally:
        env.close()
        sh("umount", "-l", small, check=False)
