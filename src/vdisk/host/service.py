"""Running vdisk the way other storage daemons run: a systemd unit and the
mount helper, installed by `vdisk service install`.

- vdisk@.service, a template whose instance is the data directory, escaped
  as systemd does for paths (`systemd-escape --path /var/lib/vdisk` gives
  var-lib-vdisk): `systemctl enable --now vdisk@var-lib-vdisk` brings the
  disks back after every boot.  Type=notify: systemd counts the unit as
  started once the daemon reports READY=1 (disks mounted, control socket
  answering).  It stops with SIGTERM, which the daemon refuses (and logs)
  while a disk file is held open; after TimeoutStopSec systemd kills it,
  which the engine survives like a power cut (nothing flushed is lost).
  An unmount from outside ends the daemon cleanly (exit 0), so
  Restart=on-failure does not bring it back against the user's will.
- /sbin/mount.fuse.vdisk (vdisk.host.mount), for `mount -t fuse.vdisk` and
  fstab lines such as
      /var/lib/vdisk  /var/lib/vdisk/disks  fuse.vdisk  defaults,nofail  0  0

Both run this installation's Python (sys.executable), so a virtualenv
install keeps working without activating it.
"""
from __future__ import annotations

import os
import sys

UNIT_NAME = "vdisk@.service"
HELPER_NAME = "mount.fuse.vdisk"


def unit_text(python: str | None = None) -> str:
    py = python or sys.executable
    return """\
# vdisk daemon for the data directory %%f (installed by 'vdisk service install')
# Enable for /var/lib/vdisk:  systemctl enable --now vdisk@$(systemd-escape --path /var/lib/vdisk)
[Unit]
Description=vdisk emulated cloud disks in %%f
RequiresMountsFor=%%f
After=local-fs.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=%(py)s -m vdisk --data-dir %%f daemon run
KillMode=mixed
TimeoutStopSec=90
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
""" % {"py": py}


def helper_text(python: str | None = None) -> str:
    py = python or sys.executable
    return "#!/bin/sh\n# mount -t fuse.vdisk DATA_DIR MOUNTPOINT (installed by 'vdisk service install')\nexec %s -m vdisk.host.mount \"$@\"\n" % py


def targets(root: str = "/") -> dict[str, tuple[str, int]]:
    """path -> (content, mode) of what install() writes under root."""
    return {
        os.path.join(root, "etc/systemd/system", UNIT_NAME): (unit_text(), 0o644),
        os.path.join(root, "sbin", HELPER_NAME): (helper_text(), 0o755),
    }


def install(root: str = "/", only: str | None = None) -> list[str]:
    """Write the unit and the helper under root (only: 'unit' or 'helper');
    the paths written.  Replaces files an earlier install wrote; refuses
    (FileExistsError) a file of the same name that vdisk did not write."""
    written = []
    for path, (text, mode) in targets(root).items():
        if only == "unit" and not path.endswith(UNIT_NAME) or only == "helper" and not path.endswith(HELPER_NAME):
            continue
        if os.path.exists(path) and not _ours(path):
            raise FileExistsError("%s exists and was not written by vdisk; remove it first" % path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".vdisk-new"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        written.append(path)
    return written


def uninstall(root: str = "/") -> list[str]:
    """Remove what install() wrote (and only that); the paths removed."""
    removed = []
    for path in targets(root):
        if os.path.exists(path) and _ours(path):
            os.unlink(path)
            removed.append(path)
    return removed


def _ours(path: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            return "installed by 'vdisk service install'" in f.read(4096)
    except OSError:
        return False
