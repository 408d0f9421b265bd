"""Talk to the daemon over its control socket, or act offline without one.

Protocol: one JSON object per line each way.  A request carries the cloud's
Action and parameters; the answer is the cloud's response (or Code/Message).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time

from ..config import Paths, fast_path_on
from . import lock

# How long a client waits for a daemon whose listen queue is full (busy, or
# stopped with SIGSTOP) before it says so.
CONNECT_TIMEOUT = float(os.environ.get("VDISK_CONNECT_TIMEOUT", "30"))


class DaemonUnavailable(Exception):
    pass


class NotRunning(DaemonUnavailable):
    """Nothing listens on the control socket."""


class NoPool(DaemonUnavailable):
    """No daemon answers and the data directory holds no pool."""


def _connect(paths: Paths, timeout: float, connect_timeout: float) -> socket.socket:
    """Connect to the control socket.  A full listen queue (EAGAIN from a
    Unix socket) is waited out, retrying with backoff, up to connect_timeout."""
    deadline = time.monotonic() + connect_timeout
    delay = 0.005
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(paths.socket)
            return s
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            s.close()
            raise NotRunning("no vdisk daemon answers on %s (%s)" % (paths.socket, exc.strerror)) from None
        except PermissionError:
            s.close()
            raise DaemonUnavailable(
                "not permitted to use the vdisk daemon's control socket %s (it belongs to uid %s and is mode 0600): "
                "run vdisk as root or as the daemon's user" % (paths.socket, _owner(paths.socket))
            ) from None
        except (BlockingIOError, TimeoutError) as exc:
            s.close()
            if not isinstance(exc, TimeoutError) and exc.errno != errno.EAGAIN:
                raise
            if time.monotonic() >= deadline:
                raise DaemonUnavailable(
                    "the vdisk daemon did not accept a connection within %ds: its queue of waiting clients stayed "
                    "full (it is very busy, or stopped: see its state in ps and its log %s); set "
                    "VDISK_CONNECT_TIMEOUT to wait longer" % (connect_timeout, paths.log)
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _owner(path: str) -> str:
    try:
        return str(os.stat(path).st_uid)
    except OSError:
        return "?"


def call(paths: Paths, req: dict, timeout: float | None = 600, connect_timeout: float | None = None,
         fd: int | None = None) -> dict:
    """Send one request to the running daemon; its answer.  Raises
    DaemonUnavailable (with what to do) when there is no answer.  fd: a file
    descriptor passed with the request (SCM_RIGHTS), a stream action's."""
    s = _connect(paths, timeout, CONNECT_TIMEOUT if connect_timeout is None else connect_timeout)
    with s:
        buf = b""
        try:
            line = json.dumps(req).encode() + b"\n"
            if fd is None:
                s.sendall(line)
            else:
                sent = socket.send_fds(s, [line], [fd])
                s.sendall(line[sent:])
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise DaemonUnavailable("the vdisk daemon closed the connection without answering")
                buf += chunk
        except TimeoutError:
            raise DaemonUnavailable("the vdisk daemon did not answer within %ds" % timeout) from None
        except (BrokenPipeError, ConnectionResetError):
            raise DaemonUnavailable("the vdisk daemon closed the connection without answering") from None
    try:
        return json.loads(buf)
    except ValueError:
        raise DaemonUnavailable("the vdisk daemon's answer is not JSON: %r" % buf[:200]) from None


def daemon_running(paths: Paths) -> bool:
    try:
        call(paths, {"Action": "Ping"}, timeout=5)
        return True
    except (DaemonUnavailable, OSError):
        return False


def request(paths: Paths, req: dict) -> dict:
    """Run a request through the daemon, or in this process when none runs.
    Offline, the data directory must already hold a pool: only the daemon's
    start and `vdisk pool create` make one (create_pool), so that a mistyped
    directory is an error, not a new empty pool."""
    try:
        return call(paths, req)
    except NotRunning:
        pass
    _need_pool(paths)
    return _offline(paths, req)


def _need_pool(paths: Paths) -> None:
    """Offline, the data directory must already hold a pool."""
    from ..engine.pool import Pool

    if os.path.exists(paths.data_dir) and not os.path.isdir(paths.data_dir):
        raise NoPool("%s is not a directory: --data-dir (or $VDISK_HOME) must name a vdisk data directory" % paths.data_dir)
    if not Pool.exists(paths.pool):
        raise NoPool(
            "%s holds no vdisk pool and no daemon answers there: check --data-dir or $VDISK_HOME, or create a pool "
            "with 'vdisk pool create' or 'vdisk daemon start'" % paths.data_dir
        )


def create_pool(paths: Paths) -> bool:
    """Create the pool of paths (no daemon may run); False if it existed."""
    from ..engine.pool import Pool

    if Pool.exists(paths.pool):
        return False
    _offline(paths, None)
    return True


def stream(paths: Paths, req: dict, fd: int, progress=None) -> dict:
    """Run a stream action (vdisk.control.streams: ExportSnapshotDiff writes
    the stream into fd, ImportDiskDiff reads it from fd) through the daemon,
    or in this process when none runs.  No timeout: a stream takes as long
    as its data.  progress(done, total): offline exports only."""
    try:
        return call(paths, req, timeout=None, fd=fd)
    except NotRunning:
        pass
    _need_pool(paths)
    from ..control.streams import run_stream

    mode = "wb" if req.get("Action") == "ExportSnapshotDiff" else "rb"
    with os.fdopen(os.dup(fd), mode, buffering=1 << 20) as f:
        out = _offline(paths, None, lambda ctl: run_stream(ctl, req, f, progress))
        f.flush()
    return out


def _offline(paths: Paths, req: dict | None, run=None) -> dict:
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

        pool = Pool(paths.pool, fast=fast_path_on())
        try:
            ctl = Controller(pool, host=None)
            if run is not None:
                return run(ctl)
            return ctl.handle(req) if req is not None else {}
        finally:
            pool.close()
    finally:
        lock.release(fd)
