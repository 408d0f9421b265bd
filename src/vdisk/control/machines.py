"""Instances that run as virtual machines, and commands run in them.

An instance created with an InstanceType is a virtual machine (vdisk.vm):
StartInstance boots it with its disks as virtio disks (system disk first),
StopInstance powers it off (ACPI and the guest agent, then a hard stop after
VDISK_VM_STOP_TIMEOUT seconds), StopInstance with ForceStop cuts its power.
Both are asynchronous as in the cloud: the instance is Starting or Stopping
until the machine is up (its agent answered) or gone, and DescribeInstances
shows it.  An instance without an InstanceType is, as before, a set of disk
files that the user attaches as loop devices or gives to their own VM.

The cloud's Cloud Assistant runs commands in the guest: RunCommand,
DescribeInvocationResults, StopInvocation.  Invocations live in the daemon's
memory (the cloud keeps them for weeks).

A mixin of Controller.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os

from ..engine.errors import Busy
from .errors import CloudError, invalid, missing
from .validate import Params, new_id

log = logging.getLogger(__name__)

# (vCPUs, memory GiB) of some of the cloud's instance types.
INSTANCE_TYPES = {
    "ecs.t6-c1m1.large": (2, 2),
    "ecs.t6-c1m2.large": (2, 4),
    "ecs.c7.large": (2, 4),
    "ecs.g7.large": (2, 8),
    "ecs.r7.large": (2, 16),
    "ecs.c7.xlarge": (4, 8),
    "ecs.g7.xlarge": (4, 16),
    "ecs.g7.2xlarge": (8, 32),
}
DEFAULT_INSTANCE_TYPE = "ecs.t6-c1m1.large"
# the cloud's RunCommand: Timeout 10..86400 s, default 60; CommandContent at most 18 KB
RUN_TIMEOUT_DEFAULT, RUN_TIMEOUT_MAX = 60, 86400
COMMAND_MAX = 18 * 1024
MAX_INVOCATIONS = 1000  # kept in memory for DescribeInvocationResults


def guest_memory_mib(memory_gib: int) -> int:
    """The instance type's memory, capped by VDISK_VM_MEMORY_MIB (default
    2048: QEMU under TCG on a small host; the guest sees the cap)."""
    cap = int(os.environ.get("VDISK_VM_MEMORY_MIB", "2048"))
    return min(memory_gib * 1024, cap)


class MachineActions:
    vms = None  # vdisk.vm.supervisor.Machines, in the daemon
    invocations: dict  # InvokeId -> {InstanceId: vdisk.vm.machine.Invocation}

    def _instance_type(self, p: Params) -> tuple[str, int, int] | None:
        itype = p.str("InstanceType")
        if not itype:
            return None
        if itype not in INSTANCE_TYPES:
            raise CloudError("InvalidInstanceType.ValueNotSupported",
                             "InstanceType %s is not one vdisk emulates; choose one of %s." % (itype, ", ".join(INSTANCE_TYPES)))
        cpus, mem = INSTANCE_TYPES[itype]
        return itype, cpus, mem

    @staticmethod
    def _is_vm(inst: dict) -> bool:
        return bool(inst.get("InstanceType"))

    def _require_vms(self, what: str):
        if self.vms is None:
            raise CloudError("InvalidOperation.NoDaemon", "%s needs the vdisk daemon (vdisk daemon start)." % what, 403)
        return self.vms

    def _start_machine(self, inst: dict, disks: list[dict]) -> None:
        """StartInstance of a VM instance: its disk files are exposed; boot."""
        vms = self._require_vms("Starting a virtual machine")
        order = sorted(disks, key=lambda d: (d["Type"] != "system", d["Device"]))
        drives = [(self.host.path(inst["InstanceId"], d["DiskId"]), d["DiskId"].removeprefix("d-")) for d in order]
        with _refused():
            vms.start(inst["InstanceId"], inst["Cpu"], guest_memory_mib(inst["Memory"] // 1024), drives)

    def _stop_machine(self, inst: dict, force: bool) -> bool:
        """StopInstance of a VM instance; False when it has no machine."""
        vms = self._require_vms("Stopping a virtual machine")
        if vms.machine(inst["InstanceId"]) is None and inst["InstanceId"] not in vms.booting:
            return False
        with _refused():
            vms.stop(inst["InstanceId"], force)
        return True

    def machine_event(self, instance_id: str, state: str, reason: str = "") -> None:
        """The daemon reports a machine's change: "ready" (the agent
        answered) or "gone" (QEMU exited: powered off, crashed, killed)."""
        inst = self.pool.get_record("instance/" + instance_id)
        if inst is None:
            return
        if state == "ready":
            if inst["Status"] == "Starting":
                inst["Status"] = "Running"
        else:
            try:
                self.host.withdraw(instance_id)
            except Busy as exc:
                log.error("instance %s stopped, but its disk files stay: %s", instance_id, exc)
                inst["Status"] = "Stopping"
            else:
                inst["Status"] = "Stopped"
            inst["StoppedReason"] = reason
        self._put("instance", inst)
        self.pool.commit_meta()  # the daemon then makes the writes durable (Daemon._vm_event)

    def _machine_view(self, inst: dict) -> dict | None:
        return self.vms.describe(inst["InstanceId"]) if self.vms is not None and self._is_vm(inst) else None

    # ------------------------------------------------------------ Cloud Assistant

    def do_RunCommand(self, p: Params) -> dict:
        ctype = p.str("Type", required=True)
        if ctype != "RunShellScript":
            raise invalid("Type", "vdisk's guests are Linux: only RunShellScript runs")
        content = p.str("CommandContent", required=True)
        encoding = p.str("ContentEncoding", default="PlainText")
        if encoding.lower() not in ("plaintext", "base64"):
            raise invalid("ContentEncoding", "must be PlainText or Base64")
        if encoding.lower() == "base64":
            try:
                content = base64.b64decode(content, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise invalid("CommandContent", "is not valid Base64 of UTF-8 text") from None
        if len(content.encode()) > COMMAND_MAX:
            raise invalid("CommandContent", "is longer than %d bytes" % COMMAND_MAX)
        timeout = p.int("Timeout", default=RUN_TIMEOUT_DEFAULT, lo=10, hi=RUN_TIMEOUT_MAX)
        ids = p.list("InstanceId")
        if not ids:
            raise missing("InstanceId")
        insts = [self._instance(Params({"InstanceId": i})) for i in ids]
        vms = self._require_vms("RunCommand")
        for inst in insts:
            if not self._is_vm(inst) or inst["Status"] != "Running":
                raise CloudError("InstanceIds.NotRunning" if self._is_vm(inst) else "InvalidInstance.NotVirtualMachine",
                                 "Instance %s %s." % (inst["InstanceId"], "is %s, not Running" % inst["Status"]
                                                      if self._is_vm(inst) else
                                                      "has no InstanceType: it is disk files, not a virtual machine"), 403)
        self._dry_run(p)
        from ..vm.machine import Invocation

        command_id, invoke_id = new_id("c"), new_id("t")
        invs = self.invocations
        while len(invs) >= MAX_INVOCATIONS:  # the oldest finished first (dicts keep their order)
            done = next((k for k, per in invs.items() if all(i.status != "Running" for i in per.values())), None)
            if done is None:
                break
            del invs[done]
        invs[invoke_id] = {}
        for inst in insts:
            inv = Invocation(invoke_id, content, timeout, command_id, clock=self._now)
            with _refused():
                vms.invoke(inst["InstanceId"], inv)
            invs[invoke_id][inst["InstanceId"]] = inv
        return {"CommandId": command_id, "InvokeId": invoke_id}

    def _invocation(self, p: Params) -> dict:
        invoke_id = p.str("InvokeId", required=True)
        found = self.invocations.get(invoke_id)
        if found is None:
            raise CloudError("InvalidInvokeId.NotFound", "The specified InvokeId %s does not exist." % invoke_id, 404)
        return found

    def do_DescribeInvocationResults(self, p: Params) -> dict:
        per_instance = self._invocation(p)
        only = p.str("InstanceId")
        encoding = p.str("ContentEncoding", default="Base64")
        if encoding.lower() not in ("plaintext", "base64"):
            raise invalid("ContentEncoding", "must be PlainText or Base64")
        status = p.str("InvokeRecordStatus")
        self._dry_run(p)
        results = []
        for iid, inv in per_instance.items():
            if only and iid != only:
                continue
            record = {"Running": "Running", "Success": "Finished", "Failed": "Failed", "Stopped": "Stopped"}[inv.status]
            if status and record != status:
                continue
            out = inv.output()
            results.append({
                "CommandId": inv.command_id, "InvokeId": inv.invoke_id, "InstanceId": iid,
                "InvocationStatus": inv.status, "InvokeRecordStatus": record,
                "ExitCode": inv.exit_code if inv.exit_code is not None else 0,
                "Output": base64.b64encode(out.encode()).decode() if encoding.lower() == "base64" else out,
                "Dropped": inv.dropped, "ErrorCode": inv.error_code, "ErrorInfo": inv.error_info,
                "StartTime": inv.started, "FinishedTime": inv.finished if inv.status != "Stopped" else "",
                "StopTime": inv.finished if inv.status == "Stopped" else "", "Repeats": 1, "Username": "root",
                "ContainerId": "", "ContainerName": "", "TerminationMode": "ProcessTree", "Launcher": "",
            })
        return {"Invocation": {"InvocationResults": {"InvocationResult": results}, "TotalCount": len(results),
                               "PageNumber": 1, "PageSize": max(len(results), 10), "NextToken": ""}}

    def do_StopInvocation(self, p: Params) -> dict:
        per_instance = self._invocation(p)
        ids = p.list("InstanceId") or list(per_instance)
        self._dry_run(p)
        for iid in ids:
            inv = per_instance.get(iid)
            if inv is not None and inv.status == "Running":
                self._require_vms("StopInvocation").stop_invocation(iid, inv.invoke_id)
        return {}


@contextlib.contextmanager
def _refused():
    """A machine that cannot do it now (still being prepared, its agent not
    ready) is the instance's state, answered as the cloud answers one."""
    from ..vm.machine import MachineError

    try:
        yield
    except MachineError as exc:
        raise CloudError("IncorrectInstanceStatus", "%s; try again in a moment." % exc, 403) from None

