"""Talk to the daemon over its control socket, or act offline without one.

Protocol: one JSON object per line each way.  A request carries the cloud's
Action and parameters; the answer is the cloud's response (or Code/Message).
"""
from __future__ import annotations

import json
import socket

from ..config import Paths
from . import lock


class DaemonUnavailable(Exception):
    pass


def call(paths: Paths, req: dict, timeout: float = 600) -> dict:
    """Send one request to the running daemon."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(paths.socket)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        s.close()
        raise DaemonUnavailable("no vdisk daemon answers on %s (%s)" % (paths.socket, exc.strerror)) from None
    with s:
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise DaemonUnavailable("the vdisk daemon did not answer within %ds" % timeout) from None
            if not chunk:
                raise DaemonUnavailable("the vdisk daemon closed the connection without answering")
            buf += chunk
    return json.loads(buf)


def daemon_running(paths: Paths) -> bool:
    try:
        call(paths, {"Action": "Ping"}, timeout=5)
        return True
    except (DaemonUnavailable, OSError):
        return False


def request(paths: Paths, req: dict) -> dict:
    """Run a request through the daemon, or in this process when none runs."""
    try:
        return call(paths, req)
    except DaemonUnavailable:
        pass
    try:
        fd = lock.acquire(paths.lock)
    except lock.Locked as exc:
        raise DaemonUnavailable(
            "%s, but its control socket does not answer; is the daemon starting or hung? "
            "(see %s)" % (exc, paths.log)
        ) from None
    try:
        from ..control.controller import Controller
        from ..engine.pool import Pool

        pool = Pool(paths.pool)
        try:
            return Controller(pool, host=None).handle(req)
        finally:
            pool.close()
    finally:
        lock.release(fd)
