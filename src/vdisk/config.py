"""Where things live: data directory, mount point, control socket.

Data directory: --data-dir, else $VDISK_HOME, else /var/lib/vdisk for root and
$XDG_DATA_HOME/vdisk (~/.local/share/vdisk) for other users.
Mount point: --mountpoint, else $VDISK_MOUNT, else <data dir>/disks.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass


def default_data_dir() -> str:
    env = os.environ.get("VDISK_HOME")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/vdisk"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "vdisk")


def fast_path_on() -> bool:
    """Whether the write cache lives in C and the daemon's C threads serve
    READ and WRITE ($VDISK_FASTPATH, 1 unless 0: everything in Python then,
    slower, same results)."""
    return os.environ.get("VDISK_FASTPATH", "1") != "0"


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

    @property
    def access_keys(self) -> str:
        """The HTTP API's access keys (vdisk.http.keys)."""
        return os.path.join(self.data_dir, "accesskeys.json")

    @property
    def vm_dir(self) -> str:
        """Per instance: the virtual machine's console log, sockets, pid file."""
        return os.path.join(self.data_dir, "vm")

    @property
    def exit_record(self) -> str:
        """Why and when the daemon last stopped (JSON; vdisk daemon status)."""
        return os.path.join(self.data_dir, "daemon.exit")


class DataDirError(Exception):
    """The data directory cannot be used; the message says why and what to do."""


def secure_data_dir(path: str) -> list[str]:
    """Create the data directory (mode 0700) or make an existing one private.

    It holds the pool, the control socket and the daemon's log, which only
    its owner may read: an existing directory that others can read or enter
    is tightened to 0700 (the returned notes say so); one that is not a
    directory, or belongs to another user, is refused with DataDirError."""
    notes = []
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except FileExistsError:
        raise DataDirError("the data directory %s exists and is not a directory" % path) from None
    except OSError as exc:
        raise DataDirError("cannot create the data directory %s: %s" % (path, exc.strerror)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataDirError("the data directory %s exists and is not a directory" % path)
    if st.st_uid != os.geteuid():
        raise DataDirError(
            "the data directory %s belongs to uid %d, not to you (uid %d): a pool is used by the user who owns it"
            % (path, st.st_uid, os.geteuid())
        )
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise DataDirError("the data directory %s is mode %04o (others can read it) and cannot be made 0700: %s"
                               % (path, stat.S_IMODE(st.st_mode), exc.strerror)) from None
        notes.append("the data directory %s was mode %04o; it is now 0700 (only its owner may read the pool and the log)"
                     % (path, stat.S_IMODE(st.st_mode)))
    return notes


def open_private(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """Open (or create) a file only its owner may read: mode 0600, tightened
    if it already existed with a wider mode."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd
