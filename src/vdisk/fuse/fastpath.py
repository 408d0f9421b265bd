"""READ, WRITE and FSYNC of disk files served in C (csrc/fuse_fastpath.c).

`FastPath(io)` takes over the FUSE session that pyfuse3.init() created: C
threads (two by default) read /dev/fuse, serve READ, WRITE and FSYNC of
registered files through the engine functions `io` = (context, read, write,
fsync) - the addresses that
vdisk.engine.fastmap.FastMap.io_functions() gives - and passes every other
request, and every one the engine hands back (-EAGAIN), on to pyfuse3
through a socketpair put in place of the session's fd.  It knows the FUSE
protocol, not blocks or the cloud.

Lifecycle (the daemon's order): pyfuse3.init(); FastPath(io); register
files with set_node(); pyfuse3.main(); quiesce(); pyfuse3.close();
stop().  Concurrency contract: every method is called from the trio
thread; the C threads take the node table's mutex themselves.
"""
from __future__ import annotations

import errno
import os

from . import discard


class FastPath:
    def __init__(self, io: tuple[int, int, int, int], threads: int = 2):
        lib = discard.shim()
        if lib is None:
            raise OSError(errno.ENOSYS, "the libfuse shim (vdisk.fuse._lowlevel) is not loaded")
        rc = lib.vd_fp_start(*io, threads)
        if rc < 0:
            raise OSError(-rc, "cannot start the FUSE fast path: %s" % os.strerror(-rc))
        self._lib = lib
        self._running = True

    def set_node(self, inode: int, vid: int) -> None:
        """Serve READ/WRITE/FSYNC of FUSE node inode from volume vid."""
        if self._lib.vd_fp_set_node(inode, vid) < 0:
            raise MemoryError("FUSE fast path: node table full")

    def drop_node(self, inode: int) -> None:
        self._lib.vd_fp_drop_node(inode)

    def quiesce(self) -> None:
        """The session is about to be closed by the daemon (not by umount)."""
        self._lib.vd_fp_quiesce()

    def stop(self) -> None:
        """After pyfuse3.close(): join the threads.  Raises TimeoutError if
        the kernel kept the connection (the thread is left behind then)."""
        if not self._running:
            return
        self._running = False
        rc = self._lib.vd_fp_stop()
        if rc < 0:
            raise TimeoutError("the FUSE fast path's thread did not end: %s" % os.strerror(-rc))

    def stats(self) -> dict:
        """Requests served in C, passed on to pyfuse3 (all of them, and
        io_passed_on: the reads, writes and fsyncs of a disk among them,
        which the engine then served in Python), and delayed by an I/O
        limit (csrc/qos.c)."""
        out = discard.shim_ffi().new("uint64_t[6]")
        self._lib.vd_fp_stats(out)
        return {"reads": out[0], "writes": out[1], "passed_on": out[2], "fsyncs": out[3], "delayed": out[4],
                "io_passed_on": out[5]}
