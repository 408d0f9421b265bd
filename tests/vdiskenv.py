"""Test helpers: skip reasons, and the daemon harness (vdisk.harness)."""
from __future__ import annotations

import os
import shutil

import pytest

from vdisk.harness import VDiskEnv, sh, sha256_file  # noqa: F401


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
