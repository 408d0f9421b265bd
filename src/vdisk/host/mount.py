"""`mount -t fuse.vdisk DATA_DIR MOUNTPOINT`: the mount helper.

mount(8) runs /sbin/mount.fuse.vdisk DATA_DIR MOUNTPOINT [-o OPTIONS] [-n]
[-s] [-f] [-v] for filesystems of type fuse.vdisk (from the command line or
/etc/fstab).  The helper starts the data directory's daemon on that mount
point and returns once the disks are mounted and the daemon answers, as
mount(8) expects; `umount MOUNTPOINT` then stops the daemon cleanly
(vdisk.daemon.server).  `vdisk service install` puts the helper in /sbin.

Options: the generic ones mount(8) and fstab pass (rw, defaults, auto,
noauto, nofail, _netdev, user, nouser, nosuid, nodev, noexec, x-*, comment=)
are accepted and need nothing (a FUSE mount is always nosuid and nodev);
`ro` is refused (vdisk's disks are written by the loop devices and guests
on them), as is any option vdisk does not know.  Exit status as mount(8)
documents for helpers: 0 mounted, 1 bad invocation, 32 mount failure.
"""
from __future__ import annotations

import os
import subprocess
import sys

IGNORED = {"rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "nosuid",
           "nodev", "noexec", "exec", "suid", "dev", "async", "atime", "noatime", "relatime", "silent", "loud"}


class Usage(Exception):
    pass


def parse(argv: list[str]) -> tuple[str, str, list[str]]:
    """(data_dir, mountpoint, options) from mount(8)'s helper arguments."""
    pos, opts, verbose = [], [], False
    it = iter(argv)
    for a in it:
        if a == "-o":
            try:
                opts += [o for o in next(it).split(",") if o]
            except StopIteration:
                raise Usage("-o needs a list of options") from None
        elif a.startswith("-o") and len(a) > 2:
            opts += [o for o in a[2:].split(",") if o]
        elif a in ("-n", "-s", "-f", "-v", "-r", "-w"):
            if a == "-r":
                opts.append("ro")
            verbose = verbose or a == "-v"
        elif a == "-t":
            next(it, None)  # the type itself: fuse.vdisk
        elif a == "-N":
            raise Usage("mount namespaces (-N) are not supported")
        elif a.startswith("-"):
            raise Usage("unknown option %s" % a)
        else:
            pos.append(a)
    if len(pos) != 2:
        raise Usage("expected DATA_DIR MOUNTPOINT, got %d operand(s)" % len(pos))
    for o in opts:
        if o == "ro":
            raise Usage("option ro: vdisk mounts are read-write (attach a disk read-only with 'vdisk loop attach --read-only')")
        if o not in IGNORED and not o.startswith(("x-", "comment=")):
            raise Usage("option %s is not one vdisk knows (see 'vdisk service --help')" % o)
    return pos[0], pos[1], opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        data_dir, mountpoint, _opts = parse(argv)
    except Usage as exc:
        print("mount.fuse.vdisk: %s\nusage: mount -t fuse.vdisk DATA_DIR MOUNTPOINT [-o OPTIONS]" % exc, file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "vdisk", "--data-dir", os.path.abspath(data_dir), "--mountpoint",
           os.path.abspath(mountpoint), "daemon", "start"]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    return 0 if r.returncode == 0 else 1 if r.returncode == 2 else 32


if __name__ == "__main__":
    sys.exit(main())
