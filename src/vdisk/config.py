"""Where things live: data directory, mount point, control socket.

Data directory: --data-dir, else $VDISK_HOME, else /var/lib/vdisk for root and
$XDG_DATA_HOME/vdisk (~/.local/share/vdisk) for other users.
Mount point: --mountpoint, else $VDISK_MOUNT, else <data dir>/disks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def default_data_dir() -> str:
    env = os.environ.get("VDISK_HOME")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/vdisk"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "vdisk")


@dataclass(frozen=True)
class Paths:
    data_dir: str
    mountpoint: str

    @classmethod
    def resolve(cls, data_dir: str | None = None, mountpoint: str | None = None) -> "Paths":
        d = os.path.realpath(data_dir or default_data_dir())
        m = os.path.abspath(mountpoint or os.environ.get("VDISK_MOUNT") or os.path.join(d, "disks"))
        # Resolve symlinks in the parent only: the mount point itself may be a
        # live or stale FUSE mount that must not be stat'ed.
        m = os.path.join(os.path.realpath(os.path.dirname(m)), os.path.basename(m))
        return cls(d, m)

    @property
    def pool(self) -> str:
        return os.path.join(self.data_dir, "pool")

    @property
    def socket(self) -> str:
        return os.path.join(self.data_dir, "control.sock")

    @property
    def lock(self) -> str:
        return os.path.join(self.data_dir, "daemon.lock")

    @property
    def log(self) -> str:
        return os.path.join(self.data_dir, "daemon.log")
