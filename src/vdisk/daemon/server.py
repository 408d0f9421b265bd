"""The vdisk daemon: one process per data directory.

It holds the data directory's lock, opens the pool, mounts the FUSE
filesystem that shows the disks of running instances, and answers the
control socket (JSON lines, mode 0600).  Everything runs in one trio thread:
FUSE requests and control actions never interleave inside one another.

Startup re-exposes the instances the catalogue says are Running (a daemon
restart is like a host restart the instance did not notice); instances that
are virtual machines (vdisk.vm, owned by the Machines supervisor) come back
Stopped, since their machine died with the previous daemon.  SIGTERM/SIGINT
or the Shutdown action stop it cleanly: it refuses while a disk file is held
open (unless forced), unmounts, commits and closes the pool.  So does an
unmount from outside (`umount MOUNTPOINT`, as with sshfs or S3QL): the kernel
ends the FUSE connection, and the daemon commits, closes the pool and exits
0.  Every stop records its reason in daemon.exit (JSON), which `vdisk daemon
status` shows while no daemon runs.  Under systemd (Type=notify) it reports
READY=1 once it serves and STOPPING=1 when it stops (vdisk.daemon.notify).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import trio

from ..config import Paths, fast_path_on, open_private
from ..control.controller import Controller
from ..control.streams import STREAM_ACTIONS
from ..engine.errors import EngineError
from ..engine.pool import Pool
from ..fuse import discard
from ..fuse.fastpath import FastPath
from ..fuse.fs import DiskFS
from ..vm.supervisor import STOP_TIMEOUT, Machines
from . import lock, streams, writeback
from .background import Worker
from .committer import Committer
from .regions import RegionCopies
from .notify import notify

import pyfuse3  # noqa: E402 - after vdisk.fuse, which must load the discard shim first

log = logging.getLogger(__name__)
MAX_REQUEST = 1 << 20
# Actions run in the control thread: their structural commit (a snapshot, a
# deletion, a rollback, a copy) goes through the Committer (frozen between two
# FUSE requests, made durable in a worker) while I/O goes on.  What must be
# atomic with it they stage inside that commit's change (Pool.put_record then
# writes to its transaction): the trio thread may freeze what is staged
# outside at any moment.  Their other records commit alone (Pool.commit_meta,
# run in the trio thread).  The other actions run in the trio thread and
# commit only records and changes that touch no block (Pool.commit_meta: one
# small transaction, no data sync), in milliseconds.
THREADED_ACTIONS = {"CreateSnapshot", "CreateSnapshotGroup", "DeleteSnapshot", "DeleteSnapshotGroup", "CopySnapshot",
                    "DeleteDisk", "DeleteInstance", "ResetDisk", "ResetDisks"}
# Actions through which disks leave their instance: every write is durable
# when they answer, as after a clean power-off.  The answer waits for a
# background commit (Committer.flush), while the trio thread goes on.
DURABLE_AFTER = {"DetachDisk", "StopInstance"}
# Free slots held ready for C's copy-on-write (1 GiB of the data file,
# preallocated).  C asks for more once a quarter is used; the trio thread
# that refills it shares the GIL with a commit's Python, and answered 100-300
# ms late during the commits of an instance snapshot a second, while ten
# disks copied on write at about 17000 slots a second: with 4096 slots the
# writes waited up to 90 ms for slots, with 16384 none waited
# (docs/perf/2026-12-03-reservoir.md).
RESERVOIR_SLOTS = 16384
# How long an action refused because a disk file is held open is tried
# again (Daemon._act): the kernel releases a closed file asynchronously.
RELEASE_GRACE = 2.0


def _clear_stale_mount(mountpoint: str) -> None:
    """A daemon killed with SIGKILL leaves its mount behind ("Transport
    endpoint is not connected"); detach it so we can mount again."""
    if _is_mounted(mountpoint):
        log.warning("detaching the stale mount at %s", mountpoint)
        r = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def _is_mounted(mountpoint: str) -> bool:
    """Whether mountpoint is in this mount namespace (read from mountinfo:
    the daemon must never stat its own mount)."""
    with open("/proc/self/mountinfo") as f:
        return any(len(l.split()) > 4 and l.split()[4] == mountpoint for l in f)


def _tune_connection(mountpoint: str) -> None:
    """Let the kernel keep more requests in flight to us.

    A loop device with direct I/O sends asynchronous requests, which FUSE
    limits to max_background (12 by default): raise it so a queue depth of 32
    reaches the daemon.  pyfuse3 cannot set it at init, so use the FUSE
    control filesystem (root only; skipped with a note otherwise).
    """
    try:
        # mountinfo, not stat(): the daemon must never stat its own mount
        with open("/proc/self/mountinfo") as f:
            devs = [l.split()[2] for l in f if l.split()[4] == mountpoint]
        if not devs:
            raise OSError("%s is not in /proc/self/mountinfo" % mountpoint)
        conn = "/sys/fs/fuse/connections/%s" % devs[-1].split(":")[1]
        if not os.path.exists(conn) and os.geteuid() == 0:
            # systemd mounts the FUSE control filesystem; containers may not
            subprocess.run(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"], capture_output=True)
        with open(conn + "/max_background", "w") as f:
            f.write("128")
        with open(conn + "/congestion_threshold", "w") as f:
            f.write("96")
    except OSError as exc:
        log.info("FUSE max_background left at its default (%s)", exc)


class Daemon:
    def __init__(self, paths: Paths, http: tuple[str, int] | None = None, clock: tuple = (None, None),
                 metrics: tuple[str, int] | None = None):
        self.paths = paths
        self.http = http  # (host, port) to serve the cloud's HTTP API on, or None
        self.http_address = None  # where it listens (the port chosen when 0 was asked)
        self.metrics = metrics  # (host, port) of a listener of /metrics only, or None
        self.metrics_address = None
        self.cancel: trio.CancelScope | None = None
        self._stopping = False
        self.stop_reason = "stopped"  # recorded in daemon.exit
        self.unmounted_outside = False
        self._control = trio.Lock()  # one control action at a time
        self.clock_speed, self.clock_start = clock
        self._schedule_changed = True

    def run(self) -> int:
        try:
            lock_fd = lock.acquire(self.paths.lock)
        except lock.Locked as exc:
            log.error("cannot start: %s (another vdisk daemon?)", exc)
            return 3
        try:
            _forget_last_exit(self.paths)
            pool = Pool(self.paths.pool, commit_via=self._commit_from_thread, fast=fast_path_on(),
                        reservoir=RESERVOIR_SLOTS)
            try:
                rc = self._serve(pool)
            finally:
                pool.close()
            _record_exit(self.paths, self.stop_reason, clean=True)
            return rc
        except BaseException as exc:
            _record_exit(self.paths, "failed: %s: %s" % (type(exc).__name__, exc), clean=False)
            raise
        finally:
            try:
                os.unlink(self.paths.socket)
            except OSError:
                pass
            lock.release(lock_fd)

    def _serve(self, pool: Pool) -> int:
        mp = self.paths.mountpoint
        _clear_stale_mount(mp)
        os.makedirs(mp, mode=0o700, exist_ok=True)
        self.committer = Committer(pool)
        # .snapshot in the mount: every snapshot, by its SnapshotId
        self.fs = DiskFS(pool, mp, self.committer, snapshots=lambda: self.ctl.snapshot_files())
        # the commit thread holds the GIL in stretches; hand it back quickly
        sys.setswitchinterval(0.001)
        self.vms = Machines(self.paths.vm_dir, on_ready=self._vm_ready, on_exit=self._vm_gone)
        self.ctl = Controller(pool, host=self.fs, vms=self.vms)
        self.ctl.clock.configure(self.clock_speed, self.clock_start)
        self.regions = RegionCopies(self)
        self.ctl.region_copier = self.regions.poke
        pool.commit()
        if self.ctl.clock.speed != 1:
            log.info("the control plane's clock runs %g times faster than real time: it is %s now",
                     self.ctl.clock.speed, self.ctl.clock.describe()["Now"])
        self.ctl.start_lifecycle()
        options = set(pyfuse3.default_options)
        options |= {"fsname=vdisk", "subtype=vdisk"}
        pyfuse3.init(self.fs, mp, options)
        self.fs.mounted = True
        _tune_connection(mp)
        if not discard.installed():
            log.warning("discard (fallocate punch-hole) is not served: freed space stays allocated")
        fast = self._start_fast(pool)
        try:
            self._restore_running()
            trio.run(self._main)
        finally:
            self.fs.mounted = False
            if fast is not None:
                fast.quiesce()
            pyfuse3.close(unmount=not self.unmounted_outside)
            if fast is not None:
                self._stop_fast(pool, fast)
        log.info("vdisk daemon stopped")
        return 0

    def _start_fast(self, pool: Pool):
        """Serve READ and WRITE in C (vdisk.fuse.fastpath over the pool's
        FastMap) unless the pool has none (VDISK_FASTPATH=0); None when off."""
        fm = pool.fast_map
        self._efd = None
        if fm is None:
            log.info("the fast path is off (VDISK_FASTPATH=0): pyfuse3 serves every request")
            return None
        try:
            fast = FastPath(fm.io_functions(), threads=int(os.environ.get("VDISK_FAST_THREADS", "2")))
        except OSError as exc:
            log.warning("the fast path is off (%s): pyfuse3 serves every request, the write cache stays in C", exc)
            return None
        self.fs.attach_fast(fast)
        self._efd = pool.fast_event_fd
        log.info("fast path on: READ and WRITE of disk files are served in C")
        return fast

    def _stop_fast(self, pool: Pool, fast) -> None:
        try:
            fast.stop()
        except TimeoutError as exc:  # its thread may still hold the map: keep the memory
            log.error("%s", exc)
            pool.detach_fast()
            return
        log.info("fast path: %s; engine: %s", fast.stats(), pool.fast_map.stats())

    def _restore_running(self) -> None:
        self.ctl.apply_io_limits()  # every disk's speed, before any is served
        for inst in self.ctl._all("instance"):
            if self.ctl._is_vm(inst) and inst["Status"] != "Stopped":
                # its machine died with the previous daemon (as with a host
                # that lost power); a QEMU still running is killed
                self.vms.forget_stale(inst["InstanceId"])
                inst.update(Status="Stopped", StoppedReason="the vdisk daemon stopped while it ran (a power cut)")
                self.ctl._put("instance", inst)
                self.fs.pool.commit()
                log.warning("instance %s was a running virtual machine when the daemon stopped: it is Stopped now",
                            inst["InstanceId"])
            elif inst["Status"] == "Running":
                disks = self.ctl._instance_disks(inst["InstanceId"])
                self.fs.expose(inst["InstanceId"], {d["DiskId"]: d["_volume"] for d in disks})
                log.info("instance %s is Running: its %d disk(s) are back", inst["InstanceId"], len(disks))

    def _commit_from_thread(self, change, meta: bool = False):
        """The pool's commit runner for the control thread: the commit is run
        by the Committer in the trio thread (Pool(commit_via=...)); meta:
        records alone (Pool.commit_meta)."""
        return trio.from_thread.run(self.committer.commit_meta if meta else self.committer.commit_change, change)

    async def _main(self) -> None:
        with trio.CancelScope() as self.cancel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._fuse_main)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._writeback)
                if self._efd is not None:
                    nursery.start_soon(self._feed_fast)
                await nursery.start(self.committer.run)
                await nursery.start(self.vms.run)
                await nursery.start(self._serve_control)
                nursery.start_soon(self._lifecycle)
                nursery.start_soon(self.regions.run)
                nursery.start_soon(self._sample_io)
                if self.http is not None:
                    await nursery.start(self._serve_http)
                if self.metrics is not None:
                    await nursery.start(self._serve_metrics)
                log.info("vdisk daemon %d serving %s at %s", os.getpid(), self.paths.data_dir, self.paths.mountpoint)
                notify(READY=1, MAINPID=os.getpid(), STATUS="serving %s at %s" % (self.paths.data_dir, self.paths.mountpoint))
        notify(STOPPING=1, STATUS=self.stop_reason)

    async def _fuse_main(self) -> None:
        """pyfuse3's request loop.  It returns only when the kernel ends the
        connection: the mount point was unmounted from outside (umount, or a
        lazy umount once the last open file closed).  The disks are gone for
        every user then, so the daemon stops as well, cleanly."""
        await pyfuse3.main()
        if not self.cancel.cancel_called:
            self.stop_reason = "unmounted from outside: %s is no longer mounted" % self.paths.mountpoint
            log.warning("%s; committing and stopping", self.stop_reason)
            self.fs.mounted = False
            self.unmounted_outside = True
            self.cancel.cancel()

    async def _serve_http(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The cloud's API over HTTP (vdisk.http), answered by the same
        handlers as the control socket, one action at a time with them."""
        from ..http.keys import KeyStore
        from ..http.server import ApiServer

        async def answer(req: dict) -> dict:
            async with self._control:
                return await self._act(req)

        api = ApiServer(KeyStore(self.paths.access_keys), answer, metrics=self._metrics_text)
        async with trio.open_nursery() as nursery:
            self.http_address = await nursery.start(api.serve, *self.http)
            log.info("serving the ECS API over HTTP on %s:%d (and /metrics)", *self.http_address)
            task_status.started()

    async def _serve_metrics(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Prometheus metrics on a listener of their own (--metrics)."""
        from ..http.server import ApiServer

        api = ApiServer(None, None, metrics=self._metrics_text)
        async with trio.open_nursery() as nursery:
            self.metrics_address = await nursery.start(api.serve, *self.metrics)
            log.info("serving Prometheus metrics on http://%s:%d/metrics", *self.metrics_address)
            task_status.started()

    def _metrics_text(self) -> tuple[str, bytes]:
        from . import metrics

        if not hasattr(self, "_metrics_registry"):
            self._metrics_registry = metrics.registry(self)
        return metrics.render(self._metrics_registry)

    async def _sample_io(self) -> None:
        """Keep each disk's counters for DescribeDiskMonitorData at every
        multiple of control.monitor.SAMPLE_S seconds of the control plane's
        clock (at most once a real second)."""
        from ..control.monitor import SAMPLE_S

        clock = self.ctl.clock
        while True:
            now = clock.now()
            due = (now // SAMPLE_S + 1) * SAMPLE_S
            await trio.sleep(max(1.0, clock.seconds_of_real(due - now)))
            async with self._control:
                self.ctl.sample_io()

    async def _writeback(self) -> None:
        """Start writeback of what was written when daemon.writeback says
        (as writes pause, every WRITEBACK_MIB while they go on), so that
        the next commit's fdatasync has less to write.  Submitting the I/O
        can block for milliseconds when the device is busy, so it runs in
        a thread (sync_file_range on the data file's fd: no pool state)."""
        pool = self.fs.pool
        policy = writeback.Writeback(trio.current_time())
        thread = Worker("vdisk-writeback")  # at VDISK_BACKGROUND_NICE
        try:
            while True:
                await trio.sleep(writeback.TICK)
                if policy.due(pool.dirty()[0], trio.current_time()):
                    await thread.run(pool.start_writeback)
        finally:
            thread.close()

    def _fast_status(self) -> dict:
        """Whether READ/WRITE/FSYNC are served in C, and how many were."""
        fast = self.fs.fast
        if fast is None:
            return {"Enabled": False}
        f, e = fast.stats(), self.fs.pool.fast_map.stats()
        return {
            "Enabled": True,
            "Reads": f["reads"],
            "Writes": f["writes"],
            "Fsyncs": f["fsyncs"],
            # every request pyfuse3 answered (LOOKUP, OPEN, FALLOCATE, ...);
            # of them, the reads, writes and fsyncs of a disk C handed over
            "PassedToPython": f["passed_on"],
            "IoPassedToPython": f["io_passed_on"],
            # of those, the reads and writes the engine served itself, with
            # the fast path's map locked (C refused them even once taught)
            "ServedByEngine": dict(self.fs.pool.served_here),
            "CopyOnWrite": e["copy_on_write"],
            # writes into a committed backed block's own two slots, each
            # page where the durable map does not use it (no copy)
            "Flips": e["flips"],
            "VerifiedInC": e["verified"],
            # writes that found the reservoir of free slots dry and waited
            # for the engine's refill, and how long
            "ReservoirWaits": e["reservoir_waits"],
            "ReservoirWaitMs": round(e["reservoir_wait_ns"] / 1e6, 3),
            "ReservoirWaitMaxMs": round(e["reservoir_wait_max_ns"] / 1e6, 3),
            # the engine's holds of the map's lock (Python, in the owner
            # thread: a freeze, a commit's end, a write or discard C
            # handed back, ...), and the requests that found the lock
            # taken (by the engine, or by an fsync in C gathering its log
            # record) and waited
            "EngineLockHolds": e["lock_holds"],
            "EngineLockHoldMs": round(e["lock_hold_ns"] / 1e6, 3),
            "EngineLockHoldMaxMs": round(e["lock_hold_max_ns"] / 1e6, 3),
            "LockWaits": e["lock_waits"],
            "LockWaitMs": round(e["lock_wait_ns"] / 1e6, 3),
            "LockWaitMaxMs": round(e["lock_wait_max_ns"] / 1e6, 3),
            # the cache of blocks C serves from: entries, the memory its
            # table takes, and how often the engine trimmed it (a cache of
            # at most 88 MiB, trimmed past fastmap.TRIM_AT entries)
            "CacheEntries": e["entries"],
            "CacheMiB": round(e["table_bytes"] / (1 << 20), 1),
            "CacheTrims": e["trims"],
            # a trim's longest hold of C's inner mutex (a chunk of the table)
            "CacheTrimHoldMaxMs": round(e["trim_hold_max_ns"] / 1e6, 3),
        }

    def _log_status(self) -> dict:
        """What the intent log did since the daemon started."""
        st = self.fs.pool.log_status()
        return {
            "Flushes": st["flushes"],
            "FlushesInC": st.get("flushes_in_c", 0),
            # fsyncs the log made durable while a commit ran, without waiting for it
            "FlushesDuringCommits": st.get("flushes_during_commit", 0),
            # times an fsync in C grew the log's file itself (the engine had not kept enough room ahead)
            "GrowthsInC": st.get("grows_in_c", 0),
            "Bytes": st["bytes"],
            "CommitsInstead": st["commits_instead"],
            # fsyncs that committed because the filesystem is too full for the log to grow
            "RefusedForSpace": st["low_space"],
            "RecordsReplayedAtStart": st["replayed"],
        }

    async def _feed_fast(self) -> None:
        """Keep the fast path's reservoir of free slots full.  C signals the
        eventfd when it runs low; the dirty limit and back-pressure apply
        to what C wrote as to what pyfuse3 did (after_write), and only then
        does C get more slots.  Every 100 ms regardless, in case a refill
        found the pool's filesystem full."""
        efd = self._efd
        while True:
            with trio.move_on_after(0.1):
                await trio.lowlevel.wait_readable(efd)
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                pass
            await self.committer.after_write()
            self.fs.pool.refill_fast()

    async def _vm_ready(self, instance_id: str) -> None:
        await self._vm_event(instance_id, "ready")

    async def _vm_gone(self, instance_id: str, reason: str) -> None:
        # The kernel closes a dead process's files (FUSE RELEASE) a moment
        # later, and QEMU's io_uring keeps them until its ring is torn down:
        # wait for that before the disk files are withdrawn.
        with trio.move_on_after(30):
            while self.fs.busy(instance_id):
                await trio.sleep(0.05)
        await self._vm_event(instance_id, "gone", reason)

    async def _vm_event(self, instance_id: str, state: str, reason: str = "") -> None:
        """A machine booted or went away: the controller updates the
        instance, one control action at a time like any other."""
        async with self._control:
            await self.committer.idle()
            try:
                self.ctl.machine_event(instance_id, state, reason)
                if state == "gone":  # its disks' writes durable, as after a power-off
                    await self.committer.flush()
            except Exception:  # noqa: BLE001 - the daemon must keep serving
                log.exception("recording that the machine of %s is %s failed", instance_id, state)

    async def _power_off_machines(self) -> None:
        """Before a stop by signal: power the virtual machines off (as a
        host's shutdown does), hard after the stop timeout."""
        running = list(self.vms.machines)
        if not running:
            return
        log.info("powering off %d virtual machine(s) before stopping: %s", len(running), ", ".join(running))
        async with self._control:
            await self.committer.idle()  # the records commit alone, with no commit in flight
            for iid in running:
                try:
                    self.ctl.handle({"Action": "StopInstance", "InstanceId": iid})
                except Exception:  # noqa: BLE001
                    log.exception("stopping %s", iid)
        with trio.move_on_after(STOP_TIMEOUT + 10):
            while self.vms.machines or self.vms.booting:
                await trio.sleep(0.2)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                await self._power_off_machines()
                held = self.fs.open_files()
                if held:
                    log.error("ignoring signal %d: disk files are held open: %s", sig, ", ".join(held))
                    continue
                log.info("signal %d: shutting down", sig)
                self.stop_reason = "signal %d (%s)" % (sig, signal.Signals(sig).name)
                self.cancel.cancel()

    async def _serve_control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path = self.paths.socket
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)  # clients that find it full wait and retry (client.call)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._client, [listener])

    def _peer_allowed(self, stream) -> bool:
        try:
            creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        except OSError:
            return False
        return uid in (0, os.getuid())

    async def _client(self, stream) -> None:
        """One control connection.  Contract: nothing a client sends or does
        (garbage, a hang-up at any moment, a request that trips a bug) leaves
        this function as an exception, because trio would pass it up and stop
        the daemon, unmounting every disk.  A client that hangs up is simply
        forgotten; an unexpected error is logged with its traceback and, if
        the connection still stands, answered InternalError."""
        try:
            async with stream:
                await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up; its request, if any, was answered or never started
        except Exception:  # noqa: BLE001 - see the contract above
            log.exception("a control connection failed; the daemon goes on")
        finally:
            if self._stopping:
                self.cancel.cancel()

    async def _converse(self, stream) -> None:
        if not self._peer_allowed(stream):
            await _reply(stream, {"Code": "Forbidden", "Message": "only root and the daemon's user may use this socket",
                                  "HttpStatus": 403})
            return
        buf = b""
        fds: list[int] = []  # passed with the request being read (a stream action's)
        try:
            while True:
                data, got = await _receive(stream)
                fds += got
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        answer = await self._answer(line, fds[0] if fds else None)
                    except Exception as exc:  # noqa: BLE001 - a bug must cost one answer, not the daemon
                        log.exception("internal error answering a control request")
                        answer = {"Code": "InternalError", "Message": "Internal error: %s: %s" % (type(exc).__name__, exc),
                                  "HttpStatus": 500}
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    await _reply(stream, answer)
                    if self._stopping:
                        return
                if len(buf) > MAX_REQUEST:
                    await _reply(stream, {"Code": "InvalidParameter", "HttpStatus": 400,
                                          "Message": "the request is larger than %d bytes without a newline; "
                                                     "send one JSON object per line" % MAX_REQUEST})
                    return
        finally:
            for fd in fds:
                os.close(fd)

    async def _answer(self, line: bytes, fd: int | None = None) -> dict:
        """One request line; fd: the file descriptor passed with it (a
        stream action's, ExportSnapshotDiff and ImportDiskDiff)."""
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as exc:
            # RecursionError: "[[[[...": json recurses once per level
            why = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
            return {"Code": "InvalidParameter", "Message": "the request is not valid JSON: %s" % why, "HttpStatus": 400}
        if isinstance(req, dict) and req.get("Action") == "Ping":
            return {
                "Pong": True,
                "Pid": os.getpid(),
                "DataDir": self.paths.data_dir,
                "MountPoint": self.paths.mountpoint,
                "Http": "%s:%d" % tuple(self.http_address) if self.http_address else None,
                # false after a lazy umount (umount -l) while files are still
                # open: they are served until closed, then the daemon stops
                "Mounted": _is_mounted(self.paths.mountpoint),
                "FastPath": self._fast_status(),
                "IntentLog": self._log_status(),
                "WriteCache": self.committer.status(),
                "Memory": self.committer.heap.status(),
                "Metrics": "%s:%d" % tuple(self.metrics_address) if self.metrics_address else None,
            }
        if isinstance(req, dict) and req.get("Action") == "Shutdown":
            force = req.get("Force", False)
            if not isinstance(force, bool):
                return {"Code": "InvalidParameter", "Message": "The parameter Force is invalid: expected true or false",
                        "HttpStatus": 400}
            held = self.fs.open_files()
            if self.vms.machines and not force:
                return {
                    "Code": "DaemonBusy",
                    "Message": "instances run as virtual machines (%s); stop them first (vdisk instance stop ID), "
                    "or force it (a power cut for them)" % ", ".join(sorted(self.vms.machines)),
                    "HttpStatus": 409,
                }
            if held and not force:
                return {
                    "Code": "DaemonBusy",
                    "Message": "disk files are held open (%s); unmount and detach their loop devices first, "
                    "or force it (their I/O will fail)" % ", ".join(held),
                    "HttpStatus": 409,
                }
            self._stopping = True  # cancelled once the answer is sent
            self.stop_reason = "the Shutdown action (vdisk daemon stop%s)" % (" --force" if force else "")
            return {"ShuttingDown": True}
        if isinstance(req, dict) and req.get("Action") in STREAM_ACTIONS and fd is not None:
            self._schedule_changed = True
            if req["Action"] == "ExportSnapshotDiff":
                return await streams.export(self, req, fd)
            return await streams.import_(self, req, fd)
        async with self._control:
            return await self._act(req)

    async def _act(self, req) -> dict:
        action = str(req.get("Action", "")) if isinstance(req, dict) else ""
        reads = action.startswith(("Describe", "List", "Get"))
        if not reads:
            self._schedule_changed = True  # the lifecycle looks again (policies, retention ...)
        if action in THREADED_ACTIONS:
            return await self._in_control_thread(self.ctl.handle, req)
        await self.committer.idle()
        # no await from here: the action runs between two FUSE requests
        answer = self.ctl.handle(req)
        # The kernel sends a file's RELEASE after close() has returned (a
        # loop device just detached, a umount): a disk refused as held open
        # may be free a moment later, once that request was served.  The
        # refusal changed nothing, so the action is tried again for a while.
        deadline = trio.current_time() + RELEASE_GRACE
        while answer.get("Code") == "IncorrectDiskStatus.InUse" and trio.current_time() < deadline:
            await trio.sleep(0.05)
            await self.committer.idle()
            answer = self.ctl.handle(req)
        if action in DURABLE_AFTER and "Code" not in answer:
            try:
                await self.committer.flush()
            except EngineError as exc:  # done, but its disks' writes are not durable
                return self.ctl.error_answer(exc, req, answer.get("RequestId"))
        return answer

    async def _in_control_thread(self, fn, *args):
        """Run fn in the control thread: its commits go through the
        Committer, so FUSE I/O goes on while they are made durable."""
        pool = self.fs.pool
        pool.defer_map_growth = True  # the control thread reads LMDB meanwhile
        try:
            return await trio.to_thread.run_sync(fn, *args, thread_name="vdisk-control")
        finally:
            pool.defer_map_growth = False

    async def _lifecycle(self) -> None:
        """Run what time makes due (Controller.advance: automatic snapshot
        policies, retention and instant-access expiry, emulated upload
        progress) when it is due or an action changed something, under the
        control lock like any action.  Sleeps until the next due time on the
        (possibly sped-up) clock, at most a second."""
        clock = self.ctl.clock
        next_at = 0.0
        while True:
            now = clock.now()
            if self._schedule_changed or (next_at is not None and now >= next_at):
                self._schedule_changed = False
                async with self._control:
                    try:
                        next_at = await self._in_control_thread(self.ctl.advance)
                    except Exception:  # noqa: BLE001 - the disks must keep being served
                        log.exception("the snapshot lifecycle failed; retried in a minute")
                        self.fs.pool.drop_staged_records()
                        next_at = clock.now() + 60 * clock.speed
            wait = 1.0 if next_at is None else clock.seconds_of_real(next_at - clock.now())
            await trio.sleep(min(1.0, max(0.02, wait)))


def _record_exit(paths: Paths, reason: str, clean: bool) -> None:
    """Say in daemon.exit why and when the daemon stopped (best effort)."""
    try:
        fd = open_private(paths.exit_record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            json.dump({"Pid": os.getpid(), "Time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "Reason": reason, "Clean": clean}, f)
    except OSError as exc:
        log.warning("cannot record why the daemon stopped in %s: %s", paths.exit_record, exc)


def _forget_last_exit(paths: Paths) -> None:
    try:
        os.unlink(paths.exit_record)
    except FileNotFoundError:
        pass


# at most this many file descriptors come with one request (a stream action's one)
MAX_FDS = 4


async def _receive(stream) -> tuple[bytes, list[int]]:
    """Bytes from a control connection, and the file descriptors that came
    with them (SCM_RIGHTS)."""
    try:
        data, anc, _flags, _addr = await stream.socket.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
    except (ConnectionResetError, BrokenPipeError) as exc:  # what SocketStream.receive_some would say
        raise trio.BrokenResourceError(str(exc)) from None
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) - len(payload) % 4
            fds += struct.unpack("%di" % (n // 4), payload[:n])
    return data, fds


async def _reply(stream, answer: dict) -> None:
    """Send one answer line; raises trio.BrokenResourceError if the client
    has gone (the caller's contract handles it)."""
    await stream.send_all(json.dumps(answer).encode() + b"\n")


def run(paths: Paths, http: tuple[str, int] | None = None, clock: tuple = (None, None),
        metrics: tuple[str, int] | None = None) -> int:
    """clock: (speed, start) of the control plane's clock (clock.py);
    metrics: where to serve /metrics on a listener of its own."""
    return Daemon(paths, http, clock, metrics).run()
