"""The daemon's virtual machines: the one owner of every Machine.

The control plane asks (start, stop, invoke, describe) from the daemon's trio
thread between two FUSE requests, and never waits: a start or stop runs as a
task in the supervisor's nursery, and its end is reported back through the
daemon's callbacks (`on_ready`, `on_exit`), which take the control lock and
update the catalogue.  A daemon that stops takes its machines down with it
(a power cut: the disks' files close only when QEMU is gone).
"""
from __future__ import annotations

import logging
import os

import trio

from . import assets
from .machine import Drive, Invocation, Machine, MachineError, accelerator_note, kill_stale, qmp

log = logging.getLogger(__name__)
STOP_TIMEOUT = float(os.environ.get("VDISK_VM_STOP_TIMEOUT", "60"))


class Machines:
    def __init__(self, rundir: str, on_ready, on_exit):
        self.rundir = rundir
        self.on_ready, self.on_exit = on_ready, on_exit  # async (instance_id) / (instance_id, reason)
        self.machines: dict[str, Machine] = {}
        self.booting: set[str] = set()  # assets being built, no Machine yet
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def dir_of(self, instance_id: str) -> str:
        return os.path.join(self.rundir, instance_id)

    def forget_stale(self, instance_id: str) -> None:
        """An instance the catalogue says runs, after a daemon restart: its
        QEMU died with the old daemon, or is killed now (by its pidfile)."""
        if kill_stale(self.dir_of(instance_id)):
            log.warning("killed the QEMU that the previous daemon left for %s", instance_id)

    def start(self, instance_id: str, cpus: int, memory_mib: int, drives: list[tuple[str, str]]) -> None:
        if instance_id in self.machines or instance_id in self.booting:
            raise MachineError("instance %s already has a machine" % instance_id)
        self.booting.add(instance_id)
        self._nursery.start_soon(self._life, instance_id, cpus, memory_mib, [Drive(p, s) for p, s in drives])

    async def _life(self, instance_id, cpus, memory_mib, drives) -> None:
        reason = ""
        try:
            try:
                guest = await trio.to_thread.run_sync(assets.ensure, lambda s: log.info("%s: %s", instance_id, s))
            except (assets.AssetError, OSError) as exc:
                reason = "the guest could not be built: %s" % exc
                return
            m = Machine(instance_id, self.dir_of(instance_id), guest, cpus, memory_mib, drives)
            self.machines[instance_id] = m
            self.booting.discard(instance_id)
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(m.run)
                except (MachineError, OSError) as exc:
                    reason = "QEMU did not start: %s" % exc
                    return
                log.info("%s: QEMU %d started (%s)", instance_id, m.process.pid, m.accel)
                nursery.start_soon(self._announce, m)
                await m.gone.wait()
            reason = m.exit_reason
        finally:
            self.booting.discard(instance_id)
            self.machines.pop(instance_id, None)
            log.info("%s: the machine stopped: %s", instance_id, reason)
            with trio.CancelScope(shield=True):
                await self.on_exit(instance_id, reason)

    async def _announce(self, m: Machine) -> None:
        await _first(m.ready, m.gone)
        if m.ready.is_set() and not m.gone.is_set():
            await self.on_ready(m.name)

    def stop(self, instance_id: str, force: bool, timeout: float = STOP_TIMEOUT) -> None:
        """Power off (ACPI and the agent, then a hard stop after timeout),
        or at once with force (a power cut)."""
        m = self.machines.get(instance_id)
        if m is None:
            if instance_id in self.booting:
                raise MachineError("instance %s is still being prepared; try again in a moment" % instance_id)
            raise MachineError("instance %s has no machine" % instance_id)
        if force:
            m.kill("stopped with ForceStop (a power cut)")
            return
        self._nursery.start_soon(self._stop, m, timeout)

    async def _stop(self, m: Machine, timeout: float) -> None:
        if not m.ready.is_set():
            m.kill("stopped while booting")
            return
        await m.powerdown()
        with trio.move_on_after(timeout):
            await m.gone.wait()
            m.exit_reason = m.exit_reason if m.exit_reason and m.exit_reason != "powered off" else "stopped (powered off)"
            return
        m.kill("did not power off within %d s: stopped hard" % timeout)

    def resize(self, instance_id: str, serial: str, size: int) -> None:
        """Tell a running machine that a disk grew (its file already did):
        QMP block_resize, so the guest sees the new capacity at once (the
        cloud's online ResizeDisk)."""
        m = self.machines.get(instance_id)
        if m is None or m.gone.is_set():
            return
        drive = next(("disk%d" % n for n, d in enumerate(m.drives) if d.serial == serial), None)
        if drive is None:
            return

        async def tell():
            try:
                with trio.fail_after(10):
                    await qmp(m.qmp_path, "block_resize", device=drive, size=size)
            except (OSError, MachineError, trio.TooSlowError, ValueError) as exc:
                log.error("%s: the guest was not told that %s grew: %s", instance_id, drive, exc)

        self._nursery.start_soon(tell)

    def machine(self, instance_id: str) -> Machine | None:
        return self.machines.get(instance_id)

    def describe(self, instance_id: str) -> dict | None:
        m = self.machines.get(instance_id)
        if m is None:
            if instance_id in self.booting:
                return {"State": "preparing", "Accelerator": accelerator_note()}
            return None
        return {"State": m.state, "Accelerator": accelerator_note(), "Pid": m.process.pid if m.process else None,
                "Cpu": m.cpus, "MemoryMiB": m.memory_mib, "KernelRelease": m.kernel_release,
                "ConsoleLog": m.console, "Disks": [{"File": d.path, "Serial": d.serial} for d in m.drives]}

    def invoke(self, instance_id: str, inv: Invocation) -> None:
        m = self.machines.get(instance_id)
        if m is None or not m.ready.is_set():
            raise MachineError("the guest agent of %s is not ready" % instance_id)

        async def send():
            try:
                await m.invoke(inv)
            except (MachineError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                inv.finish("Failed", error_code="InstanceStopped", error_info=str(exc))
                return
            await m.watch_timeout(inv)

        self._nursery.start_soon(send)

    def stop_invocation(self, instance_id: str, invoke_id: str) -> None:
        m = self.machines.get(instance_id)
        if m is not None and invoke_id in m.invocations:
            self._nursery.start_soon(m.stop_invocation, invoke_id)


async def _first(*events: trio.Event) -> None:
    async with trio.open_nursery() as n:
        for e in events:
            async def wait(e=e):
                await e.wait()
                n.cancel_scope.cancel()
            n.start_soon(wait)
