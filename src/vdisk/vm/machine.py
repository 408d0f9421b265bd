"""One virtual machine: a QEMU process, its console log, QMP and the agent.

The disks are the instance's FUSE disk files, given to QEMU as raw virtio-blk
devices with `cache=none` (O_DIRECT: no host page cache between the guest and
vdisk, so a flush from the guest is a FLUSH to vdisk) in the cloud's order:
the system disk first, then the data disks by device name.  Each device's
serial is the disk's id without "d-", as /dev/disk/by-id shows it in the
cloud.

The accelerator is KVM where the host CPU has hardware virtualisation
(vmx/svm, kvm_intel/kvm_amd loaded, /dev/kvm usable) and TCG otherwise; a PVM
/dev/kvm (kvm_pvm, no vmx/svm) runs only guests built for it, so it counts as
none.  VDISK_VM_ACCEL=kvm|tcg overrides.

Concurrency: a Machine lives in the daemon's trio thread; `run` is its one
task (process, agent reader); everything else is called from the same
thread.  QMP is three JSON messages, spoken here directly: the well-kept
client (qemu.qmp) is asyncio-only and the daemon runs on trio.
"""
from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

import trio

from .assets import Guest

log = logging.getLogger(__name__)
BOOT_TIMEOUT = float(os.environ.get("VDISK_VM_BOOT_TIMEOUT", "300"))
OUTPUT_LIMIT = 1 << 20  # bytes of output kept per invocation (the cloud keeps 24 KB)


class MachineError(Exception):
    pass


def accelerator() -> str:
    """'kvm' where hardware virtualisation is usable here, else 'tcg'."""
    forced = os.environ.get("VDISK_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        flags = []
    hw = "vmx" in flags or "svm" in flags
    loaded = os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    return "kvm" if hw and loaded and usable else "tcg"


def accelerator_note() -> str:
    """Why that accelerator (shown in status)."""
    acc = accelerator()
    if acc == "kvm":
        return "kvm (hardware virtualisation)"
    if os.environ.get("VDISK_VM_ACCEL") == "tcg":
        return "tcg (VDISK_VM_ACCEL=tcg)"
    if os.path.exists("/sys/module/kvm_pvm"):
        return "tcg (/dev/kvm is PVM, which runs only PVM guest kernels)"
    return "tcg (no hardware virtualisation: no vmx/svm or kvm_intel/kvm_amd)"


@dataclass
class Drive:
    path: str
    serial: str


@dataclass
class Invocation:
    """One command run in the guest (the cloud's RunCommand invocation)."""

    invoke_id: str
    command: str
    timeout: float
    command_id: str = ""
    clock: object = None  # a callable giving the time as the cloud shows it (the control plane's); else real time
    started: str = ""
    lines: list = field(default_factory=list)  # (monotonic_ns received, text)
    size: int = 0
    dropped: int = 0
    exit_code: int | None = None
    status: str = "Running"  # Running, Success, Failed, Stopped
    error_code: str = ""
    error_info: str = ""
    finished: str = ""
    done: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.started = self.started or (self.clock or _now)()

    def add(self, text: str) -> None:
        self.lines.append((time.monotonic_ns(), text))
        self.size += len(text) + 1
        while self.size > OUTPUT_LIMIT and self.lines:
            _, old = self.lines.pop(0)
            self.size -= len(old) + 1
            self.dropped += len(old) + 1

    def output(self) -> str:
        return "".join(t + "\n" for _, t in self.lines)

    def finish(self, status: str, exit_code: int | None = None, error_code: str = "", error_info: str = "") -> None:
        if self.done.is_set():
            return
        self.status, self.exit_code = status, exit_code
        self.error_code, self.error_info = error_code, error_info
        self.finished = (self.clock or _now)()
        self.done.set()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Machine:
    """A QEMU guest.  States: booting -> running (the agent said READY) ->
    gone (the process exited; `exit_reason` says how)."""

    def __init__(self, name: str, rundir: str, guest: Guest, cpus: int, memory_mib: int, drives: list[Drive]):
        self.name, self.rundir, self.guest = name, rundir, guest
        self.cpus, self.memory_mib, self.drives = cpus, memory_mib, drives
        self.accel = accelerator()
        self.state = "booting"
        self.exit_reason = ""
        self.process: trio.Process | None = None
        self.ready = trio.Event()
        self.gone = trio.Event()
        self._agent: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self.invocations: dict[str, Invocation] = {}
        self.console = os.path.join(rundir, "console.log")
        self.agent_path = os.path.join(rundir, "agent.sock")
        self.qmp_path = os.path.join(rundir, "qmp.sock")
        self.pidfile = os.path.join(rundir, "qemu.pid")
        self.kernel_release = ""

    def argv(self) -> list[str]:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise MachineError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86; scripts/setup)")
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
        a = [qemu, "-name", self.name, *accel, "-M", "pc", "-m", str(self.memory_mib), "-smp", str(self.cpus),
             "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
             "-kernel", self.guest.kernel, "-initrd", self.guest.initrd,
             "-append", "console=ttyS0 panic=-1 quiet vdisk.hostname=%s" % self.name,
             "-chardev", "file,id=console,path=%s,append=on" % self.console, "-serial", "chardev:console",
             "-chardev", "socket,id=qmp,path=%s,server=on,wait=off" % self.qmp_path, "-mon", "chardev=qmp,mode=control",
             "-device", "virtio-serial-pci",
             "-chardev", "socket,id=agent,path=%s,server=on,wait=off" % self.agent_path,
             "-device", "virtserialport,chardev=agent,name=org.vdisk.agent.0",
             "-device", "virtio-rng-pci",
             "-pidfile", self.pidfile]
        for n, d in enumerate(self.drives):
            a += ["-drive", "file=%s,format=raw,if=none,id=disk%d,cache=none,aio=io_uring,discard=unmap" % (d.path, n),
                  "-device", "virtio-blk-pci,drive=disk%d,serial=%s" % (n, d.serial)]
        return a

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start QEMU and serve the agent until the process exits.  Reports
        started once the process runs; `ready` is set when the agent greets."""
        os.makedirs(self.rundir, mode=0o700, exist_ok=True)
        for p in (self.agent_path, self.qmp_path, self.pidfile):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        argv = self.argv()
        with open(self.console, "ab") as f:
            f.write(("\n--- vdisk: %s starting %s (%s)\n" % (_now(), self.name, self.accel)).encode())
        self.process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                        stderr=open(os.path.join(self.rundir, "qemu.err"), "wb"),
                                                        start_new_session=True)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._agent_loop)
                await self.process.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):  # a daemon that stops takes QEMU down, and waits for it
                if self.process.returncode is None:
                    if not self.exit_reason:
                        self.exit_reason = "the vdisk daemon stopped (a power cut)"
                    self.process.kill()
                await self.process.wait()
                rc = self.process.returncode
                if not self.exit_reason:
                    self.exit_reason = "powered off" if rc == 0 else "QEMU exited %s: %s" % (rc, self.qemu_error())
                self.state = "gone"
                for inv in self.invocations.values():
                    inv.finish("Failed", error_code="InstanceStopped", error_info="the instance stopped: %s" % self.exit_reason)
                self.gone.set()
                if self._agent is not None:
                    await trio.aclose_forcefully(self._agent)

    def qemu_error(self) -> str:
        try:
            with open(os.path.join(self.rundir, "qemu.err"), errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    async def _agent_loop(self) -> None:
        deadline = trio.current_time() + BOOT_TIMEOUT
        while True:
            try:
                self._agent = await trio.open_unix_socket(self.agent_path)
                break
            except OSError:
                if trio.current_time() > deadline:
                    self.exit_reason = "the agent socket never appeared"
                    self.kill()
                    return
                await trio.sleep(0.05)
        buf = b""
        with trio.move_on_after(BOOT_TIMEOUT) as boot:
            while not self.ready.is_set():
                data = await self._agent.receive_some(65536)
                if not data:
                    return
                buf += data
                buf = self._lines(buf)
        if boot.cancelled_caught:
            self.exit_reason = "the guest did not boot within %d s (see %s)" % (BOOT_TIMEOUT, self.console)
            self.kill()
            return
        while True:
            data = await self._agent.receive_some(65536)
            if not data:
                return
            buf = self._lines(buf + data)

    def _lines(self, buf: bytes) -> bytes:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            verb, _, rest = line.decode(errors="replace").partition(" ")
            if verb == "READY":
                self.kernel_release = rest
                self.state = "running"
                self.ready.set()
            elif verb == "OUT":
                iid, _, text = rest.partition(" ")
                if iid in self.invocations:
                    self.invocations[iid].add(text)
            elif verb == "END":
                iid, _, code = rest.partition(" ")
                inv = self.invocations.get(iid)
                if inv is not None:
                    rc = int(code) if code.strip().isdigit() else 255
                    if inv.status == "Running":
                        inv.finish("Success" if rc == 0 else "Failed", rc,
                                   "" if rc == 0 else "NonZeroExitCode",
                                   "" if rc == 0 else "the command exited with %d" % rc)
                    else:
                        inv.exit_code = rc
        return buf

    async def _send(self, line: str) -> None:
        if self._agent is None or not self.ready.is_set() or self.gone.is_set():
            raise MachineError("the guest agent of %s is not ready (state %s)" % (self.name, self.state))
        async with self._send_lock:
            await self._agent.send_all(line.encode() + b"\n")

    async def invoke(self, inv: Invocation) -> None:
        """Run inv.command in the guest; returns once it was sent.  Its
        output arrives in inv; a timeout stops it (ErrorCode
        InvocationTimeout)."""
        self.invocations[inv.invoke_id] = inv
        await self._send("RUN %s %s" % (inv.invoke_id, base64.b64encode(inv.command.encode()).decode()))

    async def watch_timeout(self, inv: Invocation) -> None:
        with trio.move_on_after(inv.timeout):
            await inv.done.wait()
            return
        inv.finish("Failed", error_code="InvocationTimeout", error_info="the command ran longer than %d s" % inv.timeout)
        await self.stop_invocation(inv.invoke_id, already_finished=True)

    async def stop_invocation(self, invoke_id: str, already_finished: bool = False) -> None:
        inv = self.invocations[invoke_id]
        if not already_finished:
            inv.finish("Stopped", error_code="", error_info="stopped by StopInvocation")
        try:
            await self._send("KILL %s" % invoke_id)
        except (MachineError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def powerdown(self) -> None:
        """Ask the guest to power off: the agent's POWEROFF, and the ACPI
        power button (QMP system_powerdown) for guests without the agent."""
        try:
            await self._send("POWEROFF")
        except (MachineError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        try:
            with trio.fail_after(5):
                await qmp(self.qmp_path, "system_powerdown")
        except (OSError, trio.TooSlowError, MachineError, ValueError) as exc:
            log.info("%s: QMP system_powerdown: %s", self.name, exc)

    def kill(self, reason: str = "") -> None:
        """A power cut: SIGKILL to QEMU; nothing in the guest is flushed."""
        if reason:
            self.exit_reason = reason
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


async def qmp(path: str, command: str, **arguments) -> dict:
    """Run one QMP command on QEMU's monitor socket."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        buf = b""

        async def message() -> dict:
            nonlocal buf
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    raise MachineError("QMP closed the connection")
                buf += data
            line, buf = buf.split(b"\n", 1)
            return json.loads(line)

        await message()  # the greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, **({"arguments": arguments} if arguments else {})}):
            await stream.send_all(json.dumps(cmd).encode() + b"\n")
            while True:
                m = await message()
                if "event" not in m:
                    break
            if "error" in m:
                raise MachineError("QMP %s: %s" % (cmd["execute"], m["error"].get("desc")))
        return m.get("return", {})


def kill_stale(rundir: str) -> bool:
    """Kill a QEMU that a daemon killed with SIGKILL left behind: the pid in
    rundir/qemu.pid, only if that process is QEMU using this rundir's agent
    socket (never another process that reuses the pid)."""
    try:
        with open(os.path.join(rundir, "qemu.pid")) as f:
            pid = int(f.read().strip())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return False
    if b"qemu-system" not in cmdline or os.path.join(rundir, "agent.sock").encode() not in cmdline:
        return False
    os.kill(pid, signal.SIGKILL)
    return True
