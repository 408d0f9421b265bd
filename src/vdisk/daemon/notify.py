"""systemd's readiness protocol (sd_notify), for `Type=notify` units.

When systemd starts the daemon it sets $NOTIFY_SOCKET; the daemon sends
READY=1 once the disks are mounted and the control socket answers, and
STOPPING=1 when it begins to stop.  Without $NOTIFY_SOCKET nothing is sent.

Written here rather than taken from a library: the protocol is one datagram
of KEY=VALUE lines to a Unix socket (an abstract one when the path starts
with "@"), and the packages that wrap it (sdnotify, systemd-python) add a
dependency, or libsystemd, for these few lines.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(**fields) -> bool:
    """Send KEY=VALUE fields (READY=1, STATUS=..., MAINPID=...); True if sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    msg = "\n".join("%s=%s" % (k, v) for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg, path)
        return True
    except OSError as exc:
        log.warning("cannot notify systemd on %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
