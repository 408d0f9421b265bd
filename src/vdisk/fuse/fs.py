"""DiskFS: a pyfuse3 filesystem with one directory per group of volumes
(the control plane uses one per running instance) and one regular file per
volume in it.

    <mountpoint>/<group>/<name>      mode 0600, size = volume size
    <mountpoint>/.snapshot/<name>    mode 0400, a snapshot, read-only

The .snapshot directory (as ZFS's .zfs/snapshot; not listed in the root,
reachable by name) shows what `snapshots()` (given at construction) names:
name -> engine snapshot id, asked again whenever the directory is read or
a name in it looked up.  Its files are read through the pool
(Pool.read_snapshot); opening one for writing is EROFS, reading one whose
snapshot was deleted meanwhile ESTALE.

Files are opened with FOPEN_DIRECT_IO (no page cache between a loop device
and the daemon: what the daemon has acknowledged is what the filesystem
above wrote, in that order).  fsync/fdatasync make the file's writes durable
(a log flush of its volume, or a commit of the pool).
Reads past the end return EOF, writes past it fail with ENOSPC; the file
cannot be truncated.

Concurrency contract: every handler runs in the trio thread and calls the
pool synchronously, so each FUSE request is atomic with respect to every
other request and to control-plane actions (which run in the same thread).
With a FastPath attached, most READ and WRITE requests never reach these
handlers: a C thread serves them through the engine's FastMap, whose lock
makes each of them atomic with respect to the pool's operations too.
A volume's I/O limit (`limit`, csrc/qos.c) paces its READ and WRITE
requests: in C when the fast path is on (it admits every one, including
those it passes on to these handlers), else here, with trio.sleep.
Commits go through the `committer` given at construction (the daemon's
vdisk.daemon.committer.Committer): fsync and the dirty limit run them in a
worker thread, so write and fsync may wait for one while other requests go on.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pyfuse3
import trio

from ..engine.errors import Busy, EngineError
from ..engine.pool import BLOCK_SIZE, Pool
from . import discard, qos

log = logging.getLogger(__name__)


SNAPDIR = ".snapshot"


class Node:
    __slots__ = ("inode", "name", "parent", "volume", "snap", "children", "opens")

    def __init__(self, inode: int, name: str, parent: int, volume: int | None, snap: int | None = None):
        self.inode = inode
        self.name = name
        self.parent = parent
        self.volume = volume  # None for a directory (and a snapshot)
        self.snap = snap  # a snapshot's file: the engine's snapshot id
        self.children: dict[str, int] = {}
        self.opens = 0

    @property
    def is_dir(self) -> bool:
        return self.volume is None and self.snap is None


class DiskFS(pyfuse3.Operations):
    def __init__(self, pool: Pool, mountpoint: str, committer, snapshots=None):
        super().__init__()
        self.pool = pool
        self.mountpoint = mountpoint
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(pyfuse3.ROOT_INODE, "", pyfuse3.ROOT_INODE, None)}
        self.handles: dict[int, int] = {}  # fh -> inode
        self.snapshots = snapshots or dict  # () -> {name: engine snapshot id}: what .snapshot shows
        self._snapdir = Node(pyfuse3.ROOT_INODE + 1, SNAPDIR, pyfuse3.ROOT_INODE, None)
        self.nodes[self._snapdir.inode] = self._snapdir
        self._next_inode = pyfuse3.ROOT_INODE + 2
        self._next_fh = 1
        self._uid, self._gid = os.getuid(), os.getgid()
        self._t = time.time_ns()
        self.mounted = False
        self.committer = committer  # async flush() and after_write()
        self.fast = None  # a vdisk.fuse.fastpath.FastPath serving READ/WRITE in C
        discard.set_handler(self.fallocate)

    def attach_fast(self, fast) -> None:
        """Let a FastPath serve the files' READ and WRITE requests."""
        self.fast = fast
        for node in self.nodes.values():
            if node.volume is not None:
                fast.set_node(node.inode, node.volume)

    # ------------------------------------------------------------ exposure API

    def _root(self) -> Node:
        return self.nodes[pyfuse3.ROOT_INODE]

    def _new_node(self, name: str, parent: Node, volume: int | None) -> Node:
        node = Node(self._next_inode, name, parent.inode, volume)
        self._next_inode += 1
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
        if volume is not None and self.fast is not None:
            self.fast.set_node(node.inode, volume)
        return node

    def expose(self, group: str, files: dict[str, int]) -> None:
        """Show files (name -> volume id) in directory group."""
        root = self._root()
        if group in root.children:
            raise Busy("%s is already shown" % group)
        d = self._new_node(group, root, None)
        for name, vid in sorted(files.items()):
            self._new_node(name, d, vid)
        self._invalidate(root.inode, group)

    def add_disk(self, group: str, name: str, volume: int) -> None:
        d = self.nodes[self._root().children[group]]
        self._new_node(name, d, volume)
        self._invalidate(d.inode, name)

    def remove_disk(self, group: str, name: str) -> None:
        d = self.nodes[self._root().children[group]]
        node = self.nodes[d.children[name]]
        self._check_idle([node])
        self._drop(node)

    def withdraw(self, group: str) -> None:
        """Remove directory group and its files; Busy if any is open."""
        root = self._root()
        if group not in root.children:
            return
        d = self.nodes[root.children[group]]
        files = [self.nodes[i] for i in d.children.values()]
        self._check_idle(files)
        for f in files:
            self._drop(f)
        self._drop(d)

    def path(self, group: str, name: str) -> str:
        return os.path.join(self.mountpoint, group, name) if name else os.path.join(self.mountpoint, group)

    def limit(self, volume: int, iops: int, bps: int, io_unit: int = 0) -> None:
        """Serve the volume's READ and WRITE at most at iops operations
        (each io_unit bytes or part of them counting once) and bps bytes a
        second; 0 and 0: as fast as it goes (vdisk.fuse.qos)."""
        if discard.shim() is not None:
            qos.set_limit(volume, iops, bps, io_unit)

    def io_stats(self, volume: int) -> dict | None:
        """The volume's request counters (vdisk.fuse.qos.stats), or None."""
        return qos.stats(volume) if discard.shim() is not None else None

    def io_clock(self) -> int:
        """The counters' clock (CLOCK_MONOTONIC, ns)."""
        return qos.now_ns() if discard.shim() is not None else 0

    def resized(self, group: str, name: str) -> None:
        d = self.nodes[self._root().children[group]]
        inode = d.children[name]
        if self.mounted:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError:
                pass

    def open_files(self) -> list[str]:
        return [self.path(self.nodes[n.parent].name, n.name) for n in self.nodes.values() if n.opens]

    def _held(self, files: list[Node]) -> str:
        """Which of files are open and by what ("" when none is)."""
        held = [f for f in files if f.opens]
        if not held:
            return ""
        from ..host.loop import loop_devices_for  # what holds it, for the message

        parts = []
        for f in held:
            p = self.path(self.nodes[f.parent].name, f.name)
            devs = loop_devices_for(p)
            parts.append("%s is held open %d time(s)%s" % (f.name, f.opens, " by " + ", ".join(devs) if devs else ""))
        return "; ".join(parts)

    def _check_idle(self, files: list[Node]) -> None:
        held = self._held(files)
        if held:
            raise Busy(held)

    def busy(self, group: str) -> str:
        """What holds files of directory group open ("" when nothing does):
        what withdraw() would refuse for, without withdrawing."""
        root = self._root()
        if group not in root.children:
            return ""
        return self._held([self.nodes[i] for i in self.nodes[root.children[group]].children.values()])

    def _drop(self, node: Node) -> None:
        parent = self.nodes[node.parent]
        parent.children.pop(node.name, None)
        del self.nodes[node.inode]
        if self.fast is not None:
            self.fast.drop_node(node.inode)
        self._invalidate(parent.inode, node.name)

    def _invalidate(self, parent_inode: int, name: str) -> None:
        if not self.mounted:
            return
        try:
            pyfuse3.invalidate_entry_async(parent_inode, name.encode(), ignore_enoent=True)
        except Exception:  # noqa: BLE001 - only a cache hint
            pass

    # ------------------------------------------------------------ attributes

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        if node.snap is not None:
            a.st_mode = stat.S_IFREG | 0o400
            a.st_nlink = 1
            try:
                a.st_size = self.pool.snapshot_info(node.snap)["size"]
            except EngineError:
                a.st_size = 0  # deleted meanwhile
        elif node.volume is None:
            a.st_mode = stat.S_IFDIR | 0o700
            a.st_nlink = 2 + sum(1 for c in node.children.values() if self.nodes[c].is_dir)
            a.st_size = 0
        else:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.pool.volume_size(node.volume)
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = 0
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._t
        a.entry_timeout = 1
        a.attr_timeout = 1
        a.generation = 0
        return a

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def getattr(self, inode, ctx=None):
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._node(parent_inode)
        name = os.fsdecode(name)
        if name == ".":
            return self._attr(parent)
        if name == "..":
            return self._attr(self._node(parent.parent))
        if parent is self._root() and name == SNAPDIR:
            return self._attr(self._snapdir)
        if parent is self._snapdir:
            self._refresh_snapshots()
        inode = parent.children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.nodes[inode])

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if node.snap is not None and (fields.update_size or fields.update_mode or fields.update_uid
                                      or fields.update_gid):
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_size:
            if node.volume is None or attr.st_size != self.pool.volume_size(node.volume):
                # a disk's size changes only through the cloud's ResizeDisk
                raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(node)

    async def statfs(self, ctx):
        s = os.statvfs(self.pool.path)
        r = pyfuse3.StatvfsData()
        r.f_bsize = r.f_frsize = s.f_frsize
        r.f_blocks, r.f_bfree, r.f_bavail = s.f_blocks, s.f_bfree, s.f_bavail
        r.f_files = r.f_ffree = r.f_favail = 0
        r.f_namemax = 255
        return r

    # ------------------------------------------------------------ directories

    async def opendir(self, inode, ctx):
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def _refresh_snapshots(self) -> None:
        """Bring .snapshot's files in step with what snapshots() names now
        (a file still open stays until it is closed)."""
        d = self._snapdir
        now = self.snapshots()
        for name, inode in list(d.children.items()):
            node = self.nodes[inode]
            if now.get(name) != node.snap and not node.opens:
                del d.children[name]
                del self.nodes[inode]
        for name, sid in now.items():
            if name not in d.children:
                node = Node(self._next_inode, name, d.inode, None, sid)
                self._next_inode += 1
                self.nodes[node.inode] = node
                d.children[name] = node.inode

    async def readdir(self, fh, start_id, token):
        node = self._node(fh)
        if node is self._snapdir:
            self._refresh_snapshots()
        entries = sorted(node.children.items(), key=lambda kv: kv[1])
        for name, inode in entries:
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name.encode(), self._attr(self.nodes[inode]), inode):
                break

    async def releasedir(self, fh):
        pass

    # ------------------------------------------------------------ files

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if node.snap is not None and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = inode
        node.opens += 1
        fi = pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        return fi

    def _open_node(self, fh) -> Node:
        inode = self.handles.get(fh)
        node = self.nodes.get(inode) if inode is not None else None
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return node

    def _vol(self, fh) -> int:
        node = self._open_node(fh)
        if node.snap is not None:
            raise pyfuse3.FUSEError(errno.EROFS)  # only reads of a snapshot reach here
        return node.volume

    def _read_snapshot(self, sid: int, off: int, size: int):
        try:
            return self.pool.read_snapshot(sid, off, size)
        except EngineError as exc:
            if exc.errno == errno.ENOENT:  # deleted since it was opened
                raise pyfuse3.FUSEError(errno.ESTALE) from None
            log.error("read of %d bytes at %d of snapshot %d failed: %s", size, off, sid, exc)
            raise pyfuse3.FUSEError(exc.errno) from None

    async def _admit(self, vid: int, is_write: bool, length: int) -> int | None:
        """Wait for the volume's I/O limit (unless the fast path did, which
        admits every READ and WRITE it passes on); when the request started,
        for qos.done (None: no limits here, the shim is not loaded)."""
        if discard.shim() is None:
            return None
        start = qos.now_ns()
        if self.fast is None:
            wait = qos.admit(vid, is_write, length, start)
            if wait:
                await trio.sleep(wait)
        return start

    async def read(self, fh, off, size):
        node = self._open_node(fh)
        if node.snap is not None:
            return self._read_snapshot(node.snap, off, size)
        vid = node.volume
        start = await self._admit(vid, False, size)
        try:
            return self.pool.read(vid, off, size)
        except EngineError as exc:
            log.error("read of %d bytes at %d failed: %s", size, off, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        finally:
            if start is not None:
                qos.done(vid, False, start)

    async def write(self, fh, off, buf):
        vid = self._vol(fh)
        start = await self._admit(vid, True, len(buf))
        try:
            self.pool.write(vid, off, buf)
        except EngineError as exc:
            log.error("write of %d bytes at %d failed: %s", len(buf), off, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        finally:
            if start is not None:
                qos.done(vid, True, start)
        await self.committer.after_write()
        return len(buf)

    async def fsync(self, fh, datasync):
        node = self._open_node(fh)
        if node.snap is not None:
            return  # nothing to make durable: a snapshot is
        vid = node.volume
        try:
            await self.committer.flush(vid)
        except EngineError as exc:
            log.error("flush failed: %s", exc)
            raise pyfuse3.FUSEError(exc.errno) from None

    def fallocate(self, fh, mode, offset, length) -> int:
        """FUSE fallocate (called synchronously from the C shim): punch-hole
        and zero-range discard; plain allocation succeeds within the disk
        (thin provisioning promises nothing more).  Returns 0 or -errno."""
        inode = self.handles.get(fh)
        node = self.nodes.get(inode) if inode is not None else None
        if node is None:
            return -errno.EBADF
        if node.snap is not None:
            return -errno.EROFS
        size = self.pool.volume_size(node.volume)
        if offset < 0 or length <= 0:
            return -errno.EINVAL
        keep = mode & discard.FALLOC_FL_KEEP_SIZE
        try:
            if mode & (discard.FALLOC_FL_PUNCH_HOLE | discard.FALLOC_FL_ZERO_RANGE):
                if offset + length > size and not keep:
                    return -errno.ENOSPC
                end = min(offset + length, size)
                if end > offset:
                    self.pool.discard(node.volume, offset, end - offset)
                return 0
            if mode & ~discard.FALLOC_FL_KEEP_SIZE:
                return -errno.EOPNOTSUPP
            return 0 if keep or offset + length <= size else -errno.ENOSPC
        except EngineError as exc:
            log.error("discard of %d bytes at %d failed: %s", length, offset, exc)
            return -exc.errno

    async def flush(self, fh):
        pass

    async def release(self, fh):
        inode = self.handles.pop(fh, None)
        node = self.nodes.get(inode) if inode is not None else None
        if node is not None:
            node.opens -= 1
