"""vdisk: emulated cloud disks with crash-consistent snapshots.

A thin front-end: every command becomes one cloud action (CreateDisk,
StartInstance, ...) sent to the daemon, or run in-process when no daemon
runs and the action does not need one.

Exit codes: 0 done; 1 refused by a rule (the message names it, nothing was
changed); 2 bad usage; 3 the daemon is not running or not reachable;
4 internal or storage error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from ..config import DataDirError, Paths, open_private, secure_data_dir
from ..control.machines import DEFAULT_INSTANCE_TYPE, INSTANCE_TYPES
from ..daemon import client

from . import lifecycle, repository, streams
from .common import EXIT_DAEMON, EXIT_INTERNAL, EXIT_OK, EXIT_REFUSED, EXIT_USAGE, CLIError, _human, _show, _table

# ---------------------------------------------------------------- plumbing


class App:
    def __init__(self, args):
        self.args = args
        self.paths = Paths.resolve(args.data_dir, args.mountpoint)
        self.json = args.json

    def call(self, action: str, **params) -> dict:
        req = {"Action": action}
        req.update({k: v for k, v in params.items() if v is not None})
        try:
            res = client.request(self.paths, req)
        except client.DaemonUnavailable as exc:
            raise CLIError(str(exc), EXIT_DAEMON) from None
        return self.answer(res)

    def stream(self, action: str, fd: int, progress=None, **params) -> dict:
        """A stream action (client.stream) with the stream's descriptor."""
        req = {"Action": action}
        req.update({k: v for k, v in params.items() if v is not None})
        try:
            res = client.stream(self.paths, req, fd, progress)
        except client.DaemonUnavailable as exc:
            raise CLIError(str(exc), EXIT_DAEMON) from None
        return self.answer(res)

    @staticmethod
    def answer(res: dict) -> dict:
        """An action's answer, or the CLIError (with its exit code) of its error."""
        if "Code" in res:
            status = res.get("HttpStatus", 400)
            if res["Code"] in ("DaemonNotRunning", "Forbidden"):
                code = EXIT_DAEMON
            elif res["Code"] == "MissingParameter":
                code = EXIT_USAGE  # a required option or parameter was left out
            else:
                code = EXIT_INTERNAL if status >= 500 else EXIT_REFUSED
            raise CLIError("%s (%s)" % (res["Message"], res["Code"]), code, res["Code"])
        return res

    def out(self, res, human: str | None = None, force_json: bool = False) -> None:
        """Print the answer (JSON with --json).  A reader that stops early
        (`| head`) is not an error: the action is done, so the rest of the
        output goes nowhere and the exit status stays the command's own."""
        text = json.dumps(res, indent=2, sort_keys=True) if self.json or force_json else human
        if not text:
            return
        try:
            print(text, flush=True)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def mountpoint(self) -> str:
        """Where the running daemon shows disk files (it may have been started
        with another --mountpoint than this command's), else the default."""
        try:
            return client.call(self.paths, {"Action": "Ping"}, timeout=5)["MountPoint"]
        except (client.DaemonUnavailable, KeyError, TypeError):
            return self.paths.mountpoint

    def one(self, action: str, param: str, ident: str, path: tuple[str, str], what: str, code: str) -> dict:
        """Describe one resource by id: action filtered by param=[ident],
        the rows at res[path[0]][path[1]]; a clear error naming the cloud's
        code when it does not exist."""
        rows = self.call(action, **{param: [ident]})[path[0]][path[1]]
        if not rows:
            raise CLIError("%s %s does not exist (%s)" % (what, ident, code))
        return rows[0]

    def disk(self, disk_id: str) -> dict:
        return self.one("DescribeDisks", "DiskIds", disk_id, ("Disks", "Disk"), "disk", "InvalidDiskId.NotFound")


DISK_COLS = [("DISK", "DiskId"), ("NAME", "DiskName"), ("SIZE", "Size"), ("CATEGORY", "Category"), ("PL", "PerformanceLevel"),
             ("TYPE", "Type"), ("STATUS", "Status"), ("INSTANCE", "InstanceId"), ("DEVICE", "Device")]
INST_COLS = [("INSTANCE", "InstanceId"), ("NAME", "InstanceName"), ("STATUS", "Status"), ("TYPE", "InstanceType"),
             ("DISKS", "Disks"), ("CREATED", "CreationTime")]
SNAP_COLS = [("SNAPSHOT", "SnapshotId"), ("NAME", "SnapshotName"), ("DISK", "SourceDiskId"), ("DISK SIZE", "SourceDiskSize"),
             ("STATUS", "Status"), ("SIZE", "SnapshotSizeH"), ("CREATED", "CreationTime")]


# ---------------------------------------------------------------- daemon


def _http_address(app: App, option: str = "http") -> tuple[str, int] | None:
    """--http HOST:PORT (or $VDISK_HTTP): where to serve the cloud's API;
    option "metrics": --metrics (or $VDISK_METRICS), where to serve
    Prometheus metrics alone.  Loopback unless --http-allow-remote: anyone
    who can reach the port and holds an access key drives the disks, and
    the traffic is plain HTTP."""
    spec = getattr(app.args, option) or os.environ.get("VDISK_" + option.upper())
    if not spec:
        return None
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CLIError("--%s %r: expected HOST:PORT, such as 127.0.0.1:8080" % (option, spec), EXIT_USAGE)
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise CLIError("--%s %r: HOST must be an IP address or localhost" % (option, spec), EXIT_USAGE) from None
    if not loopback and not app.args.http_allow_remote:
        raise CLIError("--%s %s listens beyond this host: add --http-allow-remote if you mean it (plain HTTP; "
                       "anyone who reaches the port with an access key drives the disks)" % (option, spec), EXIT_USAGE)
    return host, int(port)


def cmd_daemon_run(app: App) -> int:
    from ..daemon.server import run

    logging.basicConfig(
        level=logging.DEBUG if app.args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    http = _http_address(app)
    metrics = _http_address(app, "metrics")
    if app.args.strict:
        os.environ["VDISK_STRICT"] = "1"
    clock = _clock_options(app)
    for note in secure_data_dir(app.paths.data_dir):
        logging.getLogger("vdisk").warning("%s", note)
    return run(app.paths, http, clock, metrics)


def _clock_options(app: App) -> tuple:
    """(speed, start seconds) from --clock-speed/--clock-start, checked."""
    from ..control.clock import ClockError, check_speed, parse_iso

    try:
        speed = check_speed(app.args.clock_speed) if app.args.clock_speed else None
        start = parse_iso(app.args.clock_start) if app.args.clock_start else None
    except ClockError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    return speed, start


def cmd_daemon_start(app: App) -> int:
    if client.daemon_running(app.paths):
        res = client.call(app.paths, {"Action": "Ping"})
        app.out(res, "vdisk daemon already running (pid %d), disks under %s" % (res["Pid"], res["MountPoint"]))
        return EXIT_OK
    http = _http_address(app)
    metrics = _http_address(app, "metrics")
    for note in secure_data_dir(app.paths.data_dir):
        print("vdisk: %s" % note, file=sys.stderr)
    cmd = [sys.executable, "-m", "vdisk", "--data-dir", app.paths.data_dir, "--mountpoint", app.paths.mountpoint, "daemon", "run"]
    if http is not None:
        cmd += ["--http", "[%s]:%d" % http, "--http-allow-remote"]
    if metrics is not None:
        cmd += ["--metrics", "[%s]:%d" % metrics, "--http-allow-remote"]
    if app.args.strict:
        cmd.append("--strict")
    speed, start = _clock_options(app)
    if speed is not None:
        cmd += ["--clock-speed", repr(speed)]
    if start is not None:
        cmd += ["--clock-start", app.args.clock_start]
    logfd = open_private(app.paths.log)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, start_new_session=True)
    finally:
        os.close(logfd)
    deadline = time.monotonic() + app.args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = open(app.paths.log, errors="replace").read()[-2000:]
            raise CLIError("the vdisk daemon exited at once (status %d); its log %s ends:\n%s" % (proc.returncode, app.paths.log, tail), EXIT_DAEMON)
        if client.daemon_running(app.paths):
            res = client.call(app.paths, {"Action": "Ping"})
            app.out(res, "vdisk daemon started (pid %d), disks under %s%s" % (
                res["Pid"], res["MountPoint"], ", ECS API on http://%s/" % res["Http"] if res.get("Http") else ""))
            return EXIT_OK
        time.sleep(0.1)
    raise CLIError("the vdisk daemon (pid %d) did not answer within %ds; see %s" % (proc.pid, app.args.timeout, app.paths.log), EXIT_DAEMON)


def cmd_daemon_stop(app: App) -> int:
    try:
        ping = client.call(app.paths, {"Action": "Ping"}, timeout=5)
    except client.NotRunning:
        app.out({"Running": False}, "vdisk daemon is not running")
        return EXIT_OK
    res = client.call(app.paths, {"Action": "Shutdown", "Force": app.args.force})
    if "Code" in res:
        raise CLIError("%s (%s)" % (res["Message"], res["Code"]))
    deadline = time.monotonic() + app.args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(ping["Pid"], 0)
        except ProcessLookupError:
            app.out({"Stopped": True, "Pid": ping["Pid"]}, "vdisk daemon stopped (pid %d)" % ping["Pid"])
            return EXIT_OK
        time.sleep(0.05)
    raise CLIError("the vdisk daemon (pid %d) did not exit within %ds" % (ping["Pid"], app.args.timeout), EXIT_DAEMON)


def _last_exit(paths: Paths) -> dict | None:
    """What the last daemon recorded when it stopped (daemon.exit), if anything."""
    try:
        with open(paths.exit_record) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def cmd_daemon_status(app: App) -> int:
    try:
        res = client.call(app.paths, {"Action": "Ping"}, timeout=5)
    except client.NotRunning:
        res = {"Running": False, "DataDir": app.paths.data_dir}
        human = "vdisk daemon is not running (data directory %s)" % app.paths.data_dir
        last = _last_exit(app.paths)
        if last:
            res["LastExit"] = last
            human += "\nlast stop       %s: %s%s" % (last.get("Time"), last.get("Reason"), "" if last.get("Clean") else " (not clean)")
        app.out(res, human)
        return EXIT_DAEMON
    res["Running"] = True
    fp = res.get("FastPath") or {}
    fast = (
        "on (%d reads, %d writes and %d fsyncs served in C, %d requests passed to Python, "
        "%d of them reads, writes or fsyncs)"
        % (fp["Reads"], fp["Writes"], fp.get("Fsyncs", 0), fp["PassedToPython"], fp.get("IoPassedToPython", 0))
        if fp.get("Enabled")
        else "off"
    )
    lg = res.get("IntentLog") or {}
    wc = res.get("WriteCache") or {}
    mem = res.get("Memory") or {}
    app.out(
        res,
        "vdisk daemon running (pid %d)\ndata directory  %s\nmount point     %s%s\nECS API         %s\nfast path       %s\n"
        "intent log      %d flushes (%d in C, %d KiB), %d done by a commit instead%s; %d records replayed at start\n"
        "write cache     %d MiB in %d blocks written since the last commit (commits at %d MiB or %d blocks); "
        "%d commits\nmemory          %.0f MiB resident (%.0f MiB its own, %.0f MiB of mapped files); "
        "%.0f MiB of freed heap given back to the kernel in %d trims"
        % (res["Pid"], res["DataDir"], res["MountPoint"],
           "" if res.get("Mounted", True) else " (unmounted lazily: open files are served until closed, then the daemon stops)",
           "http://%s/ (version 2014-05-26)" % res["Http"] if res.get("Http") else "off (vdisk daemon start --http HOST:PORT)",
           fast, lg.get("Flushes", 0), lg.get("FlushesInC", 0),
           lg.get("Bytes", 0) >> 10,
           lg.get("CommitsInstead", 0),
           " (%d because the filesystem is too full for the log to grow)" % lg["RefusedForSpace"]
           if lg.get("RefusedForSpace") else "",
           lg.get("RecordsReplayedAtStart", 0),
           wc.get("Bytes", 0) >> 20, wc.get("Blocks", 0), wc.get("SizeBytes", 0) >> 20, wc.get("SizeBlocks", 0),
           wc.get("Commits", 0), mem.get("ResidentMiB", 0), mem.get("AnonymousMiB", 0), mem.get("FileMiB", 0),
           mem.get("HeapGivenBackMiB", 0), mem.get("HeapTrims", 0)),
    )
    return EXIT_OK


# ---------------------------------------------------------------- instances


def _parse_data_disk(spec: str) -> dict:
    """SIZE[:CATEGORY[:PL]] -> DataDisk entry."""
    parts = spec.split(":")
    try:
        d = {"Size": int(parts[0])}
    except ValueError:
        raise CLIError("--data-disk %r: expected SIZE[:CATEGORY[:PL]] with SIZE in GiB" % spec, EXIT_USAGE) from None
    if len(parts) > 1 and parts[1]:
        d["Category"] = parts[1]
    if len(parts) > 2 and parts[2]:
        d["PerformanceLevel"] = parts[2]
    return d


def cmd_instance_create(app: App) -> int:
    a = app.args
    params = {
        "ImageId": a.image,
        "InstanceName": a.name,
        "Description": a.description,
        "SystemDisk.Size": a.system_size,
        "SystemDisk.Category": a.system_category,
        "SystemDisk.PerformanceLevel": a.system_pl,
        "InstanceType": a.instance_type or (DEFAULT_INSTANCE_TYPE if a.vm else None),
    }
    for i, spec in enumerate(a.data_disk or [], 1):
        for k, v in _parse_data_disk(spec).items():
            params["DataDisk.%d.%s" % (i, k)] = v
    res = app.call("CreateInstance", **params)
    app.out(res, res["InstanceId"])
    return EXIT_OK


def cmd_instance_list(app: App) -> int:
    res = app.call("DescribeInstances", Status=app.args.status)
    rows = res["Instances"]["Instance"]
    app.out(res, _table(rows, INST_COLS) or "no instances")
    return EXIT_OK


def cmd_instance_show(app: App) -> int:
    inst = _describe_instance(app, app.args.instance)
    app.out(inst, _show(inst))
    return EXIT_OK


def _simple(action: str, key: str, done: str):
    def cmd(app: App) -> int:
        res = app.call(action, **{key: getattr(app.args, key.lower().replace("id", ""))})
        app.out(res, done % getattr(app.args, key.lower().replace("id", "")))
        return EXIT_OK

    return cmd


def _describe_instance(app: App, iid: str) -> dict:
    return app.one("DescribeInstances", "InstanceIds", iid, ("Instances", "Instance"), "instance", "InvalidInstanceId.NotFound")


def _wait_status(app: App, iid: str, want: str, timeout: float, what: str) -> dict:
    """Poll until the instance is `want` (StartInstance and StopInstance of
    a virtual machine return at once, as the cloud's do); progress on a
    terminal."""
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        inst = _describe_instance(app, iid)
        if inst["Status"] == want:
            if shown and sys.stderr.isatty():
                print(file=sys.stderr)
            return inst
        if inst["Status"] == "Stopped" and want == "Running":
            raise CLIError("%s did not start: %s" % (iid, inst.get("StoppedReason") or "see its console log"), EXIT_REFUSED)
        if time.monotonic() > deadline:
            raise CLIError("%s is still %s after %d s (%s); it goes on in the background" % (iid, inst["Status"], timeout, what),
                           EXIT_REFUSED)
        if sys.stderr.isatty():
            shown = "%s: %s (%s), %d s" % (iid, inst["Status"], what, timeout - (deadline - time.monotonic()))
            print("\r" + shown, end="", file=sys.stderr, flush=True)
        time.sleep(0.5)


def cmd_instance_start(app: App) -> int:
    a = app.args
    app.call("StartInstance", InstanceId=a.instance)
    res = _describe_instance(app, a.instance)
    if res.get("InstanceType") and not a.no_wait:
        res = _wait_status(app, a.instance, "Running", a.timeout, "booting")
    if res.get("InstanceType"):
        vm = res.get("VirtualMachine") or {}
        human = "%s %s: a virtual machine (%s, %s vCPU, %s MiB), console log %s" % (
            a.instance, res["Status"], vm.get("Accelerator", "?"), vm.get("Cpu", "?"), vm.get("MemoryMiB", "?"),
            vm.get("ConsoleLog", "?"))
    else:
        human = "%s Running; its disks are under %s" % (a.instance, res.get("DiskDirectory", "?"))
    app.out(res, human)
    return EXIT_OK


def cmd_instance_stop(app: App) -> int:
    a = app.args
    app.call("StopInstance", InstanceId=a.instance, ForceStop=True if a.force else None)
    res = _describe_instance(app, a.instance)
    if res.get("InstanceType") and not a.no_wait:
        res = _wait_status(app, a.instance, "Stopped", a.timeout, "powering off" if not a.force else "power cut")
    app.out(res, "%s %s%s" % (a.instance, res["Status"], (": " + res["StoppedReason"]) if res.get("StoppedReason") else ""))
    return EXIT_OK


def cmd_instance_run(app: App) -> int:
    """Run a shell script in the guest (the cloud's RunCommand) and print
    its output; exit with its exit code, as ssh does."""
    a = app.args
    script = " ".join(a.command) if a.command != ["-"] else sys.stdin.read()
    res = app.call("RunCommand", Type="RunShellScript", CommandContent=script, InstanceId=[a.instance],
                   Timeout=a.timeout)
    invoke = res["InvokeId"]
    while True:
        r = app.call("DescribeInvocationResults", InvokeId=invoke, ContentEncoding="PlainText")
        r = r["Invocation"]["InvocationResults"]["InvocationResult"][0]
        if r["InvocationStatus"] != "Running":
            break
        time.sleep(0.2)
    if app.json:
        app.out(r)
    else:
        sys.stdout.write(r["Output"])
        sys.stdout.flush()
        if r["ErrorCode"] and r["ErrorCode"] != "NonZeroExitCode":
            print("vdisk: %s: %s (%s)" % (a.instance, r["ErrorInfo"], r["ErrorCode"]), file=sys.stderr)
    if r["InvocationStatus"] == "Success":
        return EXIT_OK
    return r["ExitCode"] if r["ErrorCode"] == "NonZeroExitCode" and 0 < r["ExitCode"] < 126 else EXIT_REFUSED


def cmd_instance_console(app: App) -> int:
    inst = _describe_instance(app, app.args.instance)
    path = (inst.get("VirtualMachine") or {}).get("ConsoleLog") or os.path.join(app.paths.vm_dir, app.args.instance, "console.log")
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise CLIError("%s has no console log yet (%s): it never ran as a virtual machine" % (app.args.instance, path),
                       EXIT_REFUSED) from None
    app.out({"ConsoleLog": path, "Lines": lines[-app.args.lines:]}, "\n".join(lines[-app.args.lines:]))
    return EXIT_OK


def cmd_guest_rootfs(app: App) -> int:
    """A minimal Debian root filesystem (debootstrap), cached; prints its directory."""
    from ..vm import assets

    include = [p for spec in app.args.include or [] for p in spec.split(",") if p]
    try:
        path = assets.rootfs(include, app.args.suite, app.args.mirror,
                             lambda s: print(s + " ...", file=sys.stderr, flush=True))
    except assets.AssetError as exc:
        raise CLIError(str(exc), EXIT_REFUSED) from None
    app.out({"RootFs": path}, path)
    return EXIT_OK


def cmd_guest_prepare(app: App) -> int:
    """Fetch the guest kernel and build the initramfs now (else the first
    start of a virtual machine does it)."""
    from ..vm import assets
    from ..vm.machine import accelerator_note

    try:
        g = assets.ensure(lambda s: print(s + " ...", file=sys.stderr, flush=True))
    except assets.AssetError as exc:
        raise CLIError(str(exc), EXIT_REFUSED) from None
    res = {"Kernel": g.kernel, "Initramfs": g.initrd, "KernelRelease": g.release, "Accelerator": accelerator_note()}
    app.out(res, _show(res))
    return EXIT_OK


# ---------------------------------------------------------------- disks


def cmd_disk_create(app: App) -> int:
    a = app.args
    res = app.call(
        # the CLI's default category is cloud_essd; the API's is the cloud's, cloud
        "CreateDisk", Size=a.size, DiskCategory=a.category or "cloud_essd", PerformanceLevel=a.performance_level,
        DiskName=a.name, Description=a.description, SnapshotId=a.snapshot, ProvisionedIops=a.provisioned_iops,
        BurstingEnabled=True if a.bursting else None,
    )
    app.out(res, res["DiskId"])
    return EXIT_OK


def cmd_disk_list(app: App) -> int:
    res = app.call("DescribeDisks", InstanceId=app.args.instance, Status=app.args.status)
    app.out(res, _table(res["Disks"]["Disk"], DISK_COLS) or "no disks")
    return EXIT_OK


def cmd_disk_show(app: App) -> int:
    d = app.disk(app.args.disk)
    app.out(d, _show(d))
    return EXIT_OK


def cmd_disk_path(app: App) -> int:
    d = app.disk(app.args.disk)
    if not d.get("FilePath"):
        raise CLIError("disk %s has no file now: it is served only while it is attached to a Running instance "
                       "and the daemon runs (status %s, instance %s)" % (d["DiskId"], d["Status"], d["InstanceId"] or "-"))
    app.out({"DiskId": d["DiskId"], "FilePath": d["FilePath"]}, d["FilePath"])
    return EXIT_OK


def cmd_disk_attach(app: App) -> int:
    res = app.call("AttachDisk", DiskId=app.args.disk, InstanceId=app.args.instance)
    app.out(res, "%s attached to %s" % (app.args.disk, app.args.instance))
    return EXIT_OK


def cmd_disk_detach(app: App) -> int:
    inst = app.args.instance or app.disk(app.args.disk).get("InstanceId")
    if not inst:
        raise CLIError("disk %s is not attached to any instance" % app.args.disk)
    res = app.call("DetachDisk", DiskId=app.args.disk, InstanceId=inst)
    app.out(res, "%s detached from %s" % (app.args.disk, inst))
    return EXIT_OK


def cmd_disk_resize(app: App) -> int:
    res = app.call("ResizeDisk", DiskId=app.args.disk, NewSize=app.args.size)
    app.out(res, "%s is now %d GiB" % (app.args.disk, app.args.size))
    return EXIT_OK


def cmd_disk_modify_spec(app: App) -> int:
    req = {"DiskId": app.args.disk}
    if app.args.performance_level:
        req["PerformanceLevel"] = app.args.performance_level
    if app.args.category:
        req["DiskCategory"] = app.args.category
    if app.args.provisioned_iops is not None:
        req["ProvisionedIops"] = app.args.provisioned_iops
    res = app.call("ModifyDiskSpec", **req)
    d = app.disk(app.args.disk)
    app.out(res, "%s is now %s%s: %d IOPS, %d MB/s" % (
        d["DiskId"], d["Category"], " " + d["PerformanceLevel"] if d.get("PerformanceLevel") else "",
        d["IOPS"], d["Throughput"]))
    return EXIT_OK


def cmd_disk_set(app: App) -> int:
    mode = {"cloud": "Cloud", "unlimited": "Unlimited", "pool": ""}[app.args.io_limits]
    res = app.call("ModifyDiskAttribute", DiskId=app.args.disk, IoLimits=mode)
    d = app.disk(app.args.disk)
    app.out(res, "%s: I/O %s" % (d["DiskId"], "unlimited" if d["IoLimits"] == "Unlimited" else
                                  "at its category's speed (%d IOPS, %d MB/s)" % (d["IOPS"], d["Throughput"])))
    return EXIT_OK


def _disk_rates(before: dict, after: dict) -> list[dict]:
    """iostat's figures for each disk between two DescribeDiskStats answers."""
    dt = max(1e-9, (after["MonotonicNs"] - before["MonotonicNs"]) / 1e9)
    old = {d["DiskId"]: d for d in before["Disks"]["Disk"]}
    rows = []
    for d in after["Disks"]["Disk"]:
        o = old.get(d["DiskId"])
        if o is None:
            continue
        reads, writes = d["Reads"] - o["Reads"], d["Writes"] - o["Writes"]
        rbytes, wbytes = d["ReadBytes"] - o["ReadBytes"], d["WriteBytes"] - o["WriteBytes"]
        iops, bps = (reads + writes) / dt, (rbytes + wbytes) / dt
        use = [iops / d["IopsLimit"] if d["IopsLimit"] else 0, bps / d["BpsLimit"] if d["BpsLimit"] else 0]
        rows.append({
            "DiskId": d["DiskId"], "InstanceId": d["InstanceId"],
            "ReadsPerSecond": round(reads / dt, 1), "WritesPerSecond": round(writes / dt, 1),
            "ReadMBps": round(rbytes / dt / 1e6, 2), "WriteMBps": round(wbytes / dt / 1e6, 2),
            "ReadAwaitMs": round((d["ReadLatencyNs"] - o["ReadLatencyNs"]) / reads / 1e6, 3) if reads else 0.0,
            "WriteAwaitMs": round((d["WriteLatencyNs"] - o["WriteLatencyNs"]) / writes / 1e6, 3) if writes else 0.0,
            "InFlight": d["InFlight"],
            "PercentOfLimit": round(100 * max(use), 1) if d["IopsLimit"] or d["BpsLimit"] else None,
        })
    return rows


# `vdisk disk stats --interval`: at most an hour (a larger one was an
# OverflowError in time.sleep past 2**63 ns, or a command that never returns)
STATS_INTERVAL_MAX = 3600


def cmd_disk_stats(app: App) -> int:
    req = {"DiskId": app.args.disk} if app.args.disk else {}
    cols = [("DISK", "DiskId"), ("INSTANCE", "InstanceId"), ("r/s", "ReadsPerSecond"), ("w/s", "WritesPerSecond"),
            ("rMB/s", "ReadMBps"), ("wMB/s", "WriteMBps"), ("r_await_ms", "ReadAwaitMs"),
            ("w_await_ms", "WriteAwaitMs"), ("queue", "InFlight"), ("%limit", "PercentOfLimit")]
    if not 0 < app.args.interval <= STATS_INTERVAL_MAX:
        raise CLIError("--interval is more than 0 and at most %d seconds" % STATS_INTERVAL_MAX, EXIT_USAGE)
    before = app.call("DescribeDiskStats", **req)
    n = 0
    try:
        while True:
            time.sleep(app.args.interval)
            after = app.call("DescribeDiskStats", **req)
            rows = _disk_rates(before, after)
            if app.json:
                app.out({"Disks": rows, "IntervalSeconds": app.args.interval})
            else:
                app.out(None, (time.strftime("%H:%M:%S") + "\n" if app.args.watch else "")
                        + (_table(rows, cols) or "no disk is served (none is In_use on a Running instance)"))
            before, n = after, n + 1
            if not app.args.watch or (app.args.count and n >= app.args.count):
                return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_disk_delete(app: App) -> int:
    res = app.call("DeleteDisk", DiskId=app.args.disk)
    app.out(res, "%s deleted" % app.args.disk)
    return EXIT_OK


def cmd_disk_reset(app: App) -> int:
    res = app.call("ResetDisk", DiskId=app.args.disk, SnapshotId=app.args.snapshot)
    app.out(res, "%s reset to %s" % (app.args.disk, app.args.snapshot))
    return EXIT_OK


# ---------------------------------------------------------------- snapshots


def cmd_snapshot_create(app: App) -> int:
    a = app.args
    res = app.call("CreateSnapshot", DiskId=a.disk, SnapshotName=a.name, Description=a.description,
                   InstantAccess=a.instant_access or None, InstantAccessRetentionDays=a.instant_access_days,
                   RetentionDays=a.retention_days, **_tags(a.tag))
    app.out(res, res["SnapshotId"])
    return EXIT_OK


def _tags(pairs) -> dict:
    return lifecycle.tag_params(pairs)


def cmd_snapshot_list(app: App) -> int:
    res = app.call("DescribeSnapshots", DiskId=app.args.disk, InstanceId=app.args.instance, Status=app.args.status)
    rows = res["Snapshots"]["Snapshot"]
    for r in rows:
        r["SnapshotSizeH"] = _human(r["SnapshotSize"])
    app.out(res, _table(rows, SNAP_COLS) or "no snapshots")
    return EXIT_OK


def cmd_snapshot_show(app: App) -> int:
    snap = app.one("DescribeSnapshots", "SnapshotIds", app.args.snapshot, ("Snapshots", "Snapshot"),
                   "snapshot", "InvalidSnapshotId.NotFound")
    app.out(snap, _show(snap))
    return EXIT_OK


def cmd_snapshot_delete(app: App) -> int:
    res = app.call("DeleteSnapshot", SnapshotId=app.args.snapshot, Force=app.args.force or None)
    app.out(res, "%s deleted" % app.args.snapshot)
    return EXIT_OK


# ---------------------------------------------------------------- snapshot groups

GROUP_COLS = [("GROUP", "SnapshotGroupId"), ("NAME", "Name"), ("INSTANCE", "InstanceId"), ("STATUS", "Status"),
              ("PROGRESS", "ProgressStatus"), ("SNAPSHOTS", "Members"), ("CREATED", "CreationTime")]


def cmd_group_create(app: App) -> int:
    a = app.args
    res = app.call(
        "CreateSnapshotGroup", InstanceId=a.instance, DiskId=a.disk or None, ExcludeDiskId=a.exclude_disk or None,
        Name=a.name, Description=a.description, InstantAccess=a.instant_access or None,
        InstantAccessRetentionDays=a.instant_access_days, ClientToken=a.client_token, RetentionDays=a.retention_days,
        **_tags(a.tag),
    )
    app.out(res, res["SnapshotGroupId"])
    return EXIT_OK


def _group_rows(groups: list[dict]) -> list[dict]:
    for g in groups:
        g["Members"] = [s["SnapshotId"] for s in g["Snapshots"]["Snapshot"]]
    return groups


def cmd_group_list(app: App) -> int:
    res = app.call("DescribeSnapshotGroups", InstanceId=app.args.instance, Name=app.args.name,
                   Status=app.args.status or None, MaxResults=100)
    rows = _group_rows(res["SnapshotGroups"]["SnapshotGroup"])
    app.out(res, _table(rows, GROUP_COLS) or "no snapshot groups")
    return EXIT_OK


def _one_group(app: App) -> dict:
    return app.one("DescribeSnapshotGroups", "SnapshotGroupId", app.args.group, ("SnapshotGroups", "SnapshotGroup"),
                   "snapshot group", "InvalidSnapshotGroupId.NotFound")


def cmd_group_show(app: App) -> int:
    g = _one_group(app)
    members = g["Snapshots"]["Snapshot"]
    for m in members:
        m["SnapshotSizeH"] = _human(m["SnapshotSize"])
    head = {k: v for k, v in g.items() if k != "Snapshots"}
    app.out(g, _show(head) + "\n\n" + (_table(members, SNAP_COLS) or "no member snapshots"))
    return EXIT_OK


def cmd_group_modify(app: App) -> int:
    res = app.call("ModifySnapshotGroup", SnapshotGroupId=app.args.group, Name=app.args.name, Description=app.args.description)
    app.out(res, "%s modified" % app.args.group)
    return EXIT_OK


def cmd_group_delete(app: App) -> int:
    res = app.call("DeleteSnapshotGroup", SnapshotGroupId=app.args.group)
    rows = res["OperationProgressSet"]["OperationProgress"]
    app.out(res, _table(rows, [("SNAPSHOT", "SnapshotId"), ("RESULT", "OperationStatus"), ("CODE", "ErrorCode"), ("MESSAGE", "ErrorMsg")]))
    return EXIT_OK if all(r["OperationStatus"] == "Success" for r in rows) else EXIT_REFUSED


def cmd_group_reset(app: App) -> int:
    g = _one_group(app)
    params = {}
    for i, m in enumerate(g["Snapshots"]["Snapshot"], 1):
        params["Disk.%d.DiskId" % i] = m["SourceDiskId"]
        params["Disk.%d.SnapshotId" % i] = m["SnapshotId"]
    try:
        res = app.call("ResetDisks", DryRun=app.args.dry_run or None, **params)
    except CLIError as exc:
        if app.args.dry_run and exc.error_code == "DryRunOperation":
            app.out({"DryRun": True, "Passed": True}, "dry run: the reset would succeed")
            return EXIT_OK
        raise
    rows = res["OperationProgressSet"]["OperationProgress"]
    app.out(res, _table(rows, [("DISK", "DiskId"), ("SNAPSHOT", "SnapshotId"), ("RESULT", "OperationStatus")]))
    return EXIT_OK


# ---------------------------------------------------------------- images, usage


def cmd_image_create(app: App) -> int:
    params = {"SnapshotId": app.args.snapshot, "ImageName": app.args.name, "Description": app.args.description}
    for i, sid in enumerate(app.args.data_snapshot or [], 1):
        params["DiskDeviceMapping.%d.SnapshotId" % i] = sid
        params["DiskDeviceMapping.%d.DiskType" % i] = "data"
    res = app.call("CreateImage", **params)
    app.out(res, res["ImageId"])
    return EXIT_OK


def cmd_image_import(app: App) -> int:
    """A root filesystem (a directory, such as `vdisk guest rootfs` makes)
    as a custom image whose instances boot it."""
    from ..host import loop
    from ..vm import system_image

    try:
        res = system_image.import_rootfs(app.call, app.args.rootfs, app.args.name, app.args.size,
                                         lambda s: print(s + " ...", file=sys.stderr, flush=True))
    except (system_image.ImageImportError, loop.LoopError) as exc:
        raise CLIError(str(exc), EXIT_REFUSED) from None
    app.out(res, res["ImageId"])
    return EXIT_OK


def cmd_image_list(app: App) -> int:
    res = app.call("DescribeImages")
    rows = res["Images"]["Image"]
    for r in rows:
        r["Snapshots"] = [m["SnapshotId"] for m in r["DiskDeviceMappings"]["DiskDeviceMapping"]]
    app.out(res, _table(rows, [("IMAGE", "ImageId"), ("NAME", "ImageName"), ("STATUS", "Status"), ("SIZE", "Size"),
                               ("SNAPSHOTS", "Snapshots"), ("CREATED", "CreationTime")]) or "no images")
    return EXIT_OK


def cmd_image_delete(app: App) -> int:
    res = app.call("DeleteImage", ImageId=app.args.image)
    app.out(res, "%s deleted" % app.args.image)
    return EXIT_OK


def cmd_usage(app: App) -> int:
    res = app.call("DescribeSnapshotsUsage")
    rows = res["Snapshots"]["Snapshot"]
    for r in rows:
        for k in ("BilledSize", "ExclusiveSize", "SharedSize", "ReferencedSize"):
            r[k + "H"] = _human(r[k])
    t = res["Totals"]
    human = (_table(rows, [("SNAPSHOT", "SnapshotId"), ("GROUP", "SnapshotGroupId"), ("DISK", "SourceDiskId"),
                           ("BILLED", "BilledSizeH"), ("EXCLUSIVE", "ExclusiveSizeH"), ("SHARED", "SharedSizeH"),
                           ("REFERENCED", "ReferencedSizeH"), ("INSTANT DAYS", "InstantAccessRetentionDays")]) or "no snapshots")
    human += "\n\n%d snapshots, billed %s, exclusive %s; pool uses %s (%s on disk)" % (
        t["SnapshotCount"], _human(t["BilledSize"]), _human(t["ExclusiveSize"]), _human(t["PoolUsedBytes"]), _human(t["PoolOnDiskBytes"]))
    app.out(res, human)
    return EXIT_OK


# ---------------------------------------------------------------- loop devices


def cmd_loop_attach(app: App) -> int:
    from ..host import loop

    d = app.disk(app.args.disk)
    if not d.get("FilePath"):
        raise CLIError("disk %s has no file to attach: attach it to an instance and start the instance "
                       "(status %s, instance %s)" % (d["DiskId"], d["Status"], d["InstanceId"] or "-"))
    try:
        dev = loop.attach(d["FilePath"], read_only=app.args.read_only)
    except loop.LoopError as exc:
        raise CLIError(str(exc), EXIT_INTERNAL) from None
    app.out({"DiskId": d["DiskId"], "Device": dev, "FilePath": d["FilePath"], "DirectIO": True}, dev)
    return EXIT_OK


def cmd_loop_detach(app: App) -> int:
    from ..host import loop

    target = app.args.target
    if target.startswith("/dev/"):
        backing = loop.backing_file(target)
        if backing is None:
            raise CLIError("%s is not an attached loop device" % target)
        mp = app.mountpoint()
        if not backing.startswith(mp + "/"):
            raise CLIError("%s is not a vdisk disk of this pool: it is backed by %s, not by a file under %s; "
                           "detach it with losetup -d if you mean it" % (target, backing, mp))
        devs = [target]
    else:
        d = app.disk(target)
        devs = loop.loop_devices_for(d["FilePath"]) if d.get("FilePath") else []
        if not devs:
            raise CLIError("no loop device is attached to disk %s" % target)
    for dev in devs:
        try:
            loop.detach(dev)
        except loop.LoopError as exc:
            raise CLIError(str(exc), EXIT_INTERNAL) from None
    app.out({"Detached": devs}, "\n".join(devs))
    return EXIT_OK


def cmd_loop_list(app: App) -> int:
    from ..host import loop

    mp = app.mountpoint() + "/"
    rows = []
    for l in loop.list_loops():
        if l["back-file"].startswith(mp):
            rel = l["back-file"][len(mp):].split("/")
            l["instance"], l["disk"] = (rel + ["", ""])[:2]
            rows.append(l)
    app.out({"loopdevices": rows}, _table(rows, [("NAME", "name"), ("DISK", "disk"), ("INSTANCE", "instance"), ("DIO", "dio"), ("BACK-FILE", "back-file")]) or "no loop devices on vdisk disks")
    return EXIT_OK


# ---------------------------------------------------------------- pool / api


def cmd_pool_status(app: App) -> int:
    res = app.call("DescribePool")
    p = res["Pool"]
    human = "\n".join([
        "pool          %s" % p["Path"],
        "block size    %s" % _human(p["BlockSize"]),
        "used          %s (%d blocks)" % (_human(p["UsedBytes"]), p["SlotsUsed"]),
        "free blocks   %d (reused before the data file grows)" % p["SlotsFree"],
        "on disk       %s" % _human(p["DataFileAllocatedBytes"]),
        "volumes       %d" % p["Volumes"],
        "snapshots     %d" % p["Snapshots"],
    ])
    app.out(res, human)
    return EXIT_OK


def cmd_pool_create(app: App) -> int:
    """The explicit way to make a pool without starting the daemon (the
    daemon's first start makes one too); every other command refuses a data
    directory without one."""
    if client.daemon_running(app.paths):
        raise CLIError("a vdisk daemon already serves a pool in %s" % app.paths.data_dir, EXIT_REFUSED, "PoolExists")
    for note in secure_data_dir(app.paths.data_dir):
        print("vdisk: %s" % note, file=sys.stderr)
    if not client.create_pool(app.paths):
        raise CLIError("%s already holds a vdisk pool" % app.paths.data_dir, EXIT_REFUSED, "PoolExists")
    app.out({"Created": True, "DataDir": app.paths.data_dir}, "vdisk pool created in %s" % app.paths.data_dir)
    return EXIT_OK


def cmd_pool_scrub(app: App) -> int:
    if not app.json:
        print("scrubbing %s (every block's checksum and the map's integrity)..." % app.paths.pool, file=sys.stderr)
    res = app.call("ScrubPool", MapOnly=app.args.map_only or None)
    app.out(res, "clean" if res["Clean"] else "\n".join(["PROBLEMS:"] + res["Problems"]))
    return EXIT_OK if res["Clean"] else EXIT_INTERNAL


def cmd_pool_trim(app: App) -> int:
    if not app.json:
        print("trimming %s (the pages partial blocks do not hold; writes wait meanwhile)..." % app.paths.pool,
              file=sys.stderr)
    res = app.call("TrimPool")
    app.out(res, "%d partial blocks, %s punched in %d holes; on disk %s -> %s (%.1f s)" % (
        res["PartialSlots"], _human(res["TrimmedBytes"]), res["Holes"], _human(res["DataFileAllocatedBytesBefore"]),
        _human(res["DataFileAllocatedBytes"]), res["Seconds"]))
    return EXIT_OK


def cmd_service_install(app: App) -> int:
    from ..host import service

    try:
        written = service.install(app.args.root, app.args.only)
    except FileExistsError as exc:
        raise CLIError(str(exc), EXIT_REFUSED, "FileExists") from None
    hint = ("\nnow: systemctl daemon-reload && systemctl enable --now vdisk@$(systemd-escape --path %s)"
            % app.paths.data_dir) if app.args.root == "/" and app.args.only != "helper" else ""
    app.out({"Installed": written}, "\n".join("installed %s" % w for w in written) + hint)
    return EXIT_OK


def cmd_service_uninstall(app: App) -> int:
    from ..host import service

    removed = service.uninstall(app.args.root)
    app.out({"Removed": removed}, "\n".join("removed %s" % r for r in removed) or "nothing of vdisk's was installed")
    return EXIT_OK


def cmd_service_show(app: App) -> int:
    from ..host import service

    app.out({"Unit": service.unit_text(), "MountHelper": service.helper_text()},
            "# %s\n%s\n# /sbin/%s\n%s" % (service.UNIT_NAME, service.unit_text(), service.HELPER_NAME, service.helper_text()))
    return EXIT_OK


def _keys(app: App):
    from ..http.keys import KeyStore

    if not os.path.isdir(app.paths.data_dir):
        raise client.NoPool("%s is not a vdisk data directory (no such directory): check --data-dir or $VDISK_HOME"
                            % app.paths.data_dir)
    return KeyStore(app.paths.access_keys)


def cmd_accesskey_create(app: App) -> int:
    rec = _keys(app).create()
    app.out(rec, "AccessKeyId      %s\nAccessKeySecret  %s" % (rec["AccessKeyId"], rec["AccessKeySecret"]))
    return EXIT_OK


def cmd_accesskey_list(app: App) -> int:
    rows = _keys(app).list()
    app.out({"AccessKeys": {"AccessKey": rows}},
            _table(rows, [("ACCESSKEYID", "AccessKeyId"), ("STATUS", "Status"), ("CREATED", "CreateDate")]) or "no access keys")
    return EXIT_OK


def cmd_accesskey_delete(app: App) -> int:
    from ..http.keys import AccessKeyNotFound

    try:
        _keys(app).delete(app.args.key)
    except AccessKeyNotFound as exc:
        raise CLIError(str(exc), EXIT_REFUSED, "InvalidAccessKeyId.NotFound") from None
    app.out({"Deleted": app.args.key}, "%s deleted" % app.args.key)
    return EXIT_OK


def cmd_api(app: App) -> int:
    params = {}
    for kv in app.args.params:
        if "=" not in kv:
            raise CLIError("parameter %r: expected Name=Value" % kv, EXIT_USAGE)
        k, v = kv.split("=", 1)
        params[k] = v  # a string, as on the cloud's wire: Description=12345 stays text
    res = app.call(app.args.action, **params)
    app.out(res, force_json=True)
    return EXIT_OK


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the answer as JSON (for scripts)")

    p = argparse.ArgumentParser(
        prog="vdisk",
        description="Emulated Alibaba Cloud ECS disks (ESSDs) with crash-consistent snapshots, served as files over FUSE.",
        epilog="Data directory: --data-dir, $VDISK_HOME, or /var/lib/vdisk (root). Mount point: --mountpoint, "
        "$VDISK_MOUNT, or DATA_DIR/disks. Exit codes: 0 ok, 1 refused by a rule, 2 usage, 3 daemon not running, "
        "4 internal error.",
    )
    p.add_argument("--data-dir", metavar="DIR", help="the pool's data directory")
    p.add_argument("--mountpoint", metavar="DIR", help="where the daemon shows disk files")
    p.add_argument("--json", action="store_true", help="print the answer as JSON (for scripts)")
    sub = p.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def group(name, help_):
        g = sub.add_parser(name, help=help_, description=help_)
        return g.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(gsub, name, func, help_, **kw):
        v = gsub.add_parser(name, help=help_, description=help_, parents=[common], **kw)
        v.set_defaults(func=func)
        return v

    def http_options(v):
        v.add_argument("--http", metavar="HOST:PORT", help="also serve the cloud's ECS API over HTTP here "
                       "(default $VDISK_HTTP, else off; port 0 picks a free one)")
        v.add_argument("--http-allow-remote", action="store_true", help="allow a HOST that is not loopback")
        v.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics (GET /metrics) here, on a "
                       "listener of their own (default $VDISK_METRICS, else off; the --http listener serves them too)")
        v.add_argument("--strict", action="store_true", help="refuse parameters an action does not take (typos), "
                       "where the cloud ignores them ($VDISK_STRICT=1)")
        v.add_argument("--clock-speed", metavar="N", default=os.environ.get("VDISK_CLOCK_SPEED"),
                       help="run the control plane's clock N times faster than real time (3600: an hour a second), "
                       "for watching policies and retention; default $VDISK_CLOCK_SPEED, else 1")
        v.add_argument("--clock-start", metavar="TIME", default=os.environ.get("VDISK_CLOCK_START"),
                       help="set the clock to TIME (ISO 8601, e.g. 2026-12-07T00:00:00+08:00) at this start; it "
                       "never runs backwards (default $VDISK_CLOCK_START)")

    d = group("daemon", "run, start, stop the vdisk daemon (one per data directory)")
    v = verb(d, "run", cmd_daemon_run, "run the daemon in the foreground")
    v.add_argument("--debug", action="store_true", help="log every request")
    http_options(v)
    v = verb(d, "start", cmd_daemon_start, "start the daemon in the background and wait until it answers")
    v.add_argument("--timeout", type=int, default=30, help="seconds to wait (default 30)")
    http_options(v)
    v = verb(d, "stop", cmd_daemon_stop, "stop the daemon cleanly (refused while disk files are held open)")
    v.add_argument("--force", action="store_true", help="stop even if disk files are open (their I/O will fail)")
    v.add_argument("--timeout", type=int, default=60, help="seconds to wait (default 60)")
    verb(d, "status", cmd_daemon_status, "say whether the daemon runs (exit 3 if not)")

    g = group("instance", "create, start, stop, list and delete instances")
    v = verb(g, "create", cmd_instance_create, "create a Stopped instance with a system disk and data disks")
    v.add_argument("--name", help="instance name (2-128 chars, starts with a letter)")
    v.add_argument("--description")
    v.add_argument("--image", metavar="IMAGE_ID", help="make the disks from this custom image's snapshots")
    v.add_argument("--system-size", type=int, default=None, metavar="GIB", help="system disk size in GiB (default 40, or the image's)")
    v.add_argument("--system-category", default=None, help="system disk category (default cloud_essd)")
    v.add_argument("--system-pl", default=None, metavar="PL", help="system disk performance level (default PL1)")
    v.add_argument("--data-disk", action="append", metavar="SIZE[:CATEGORY[:PL]]", help="add a data disk (repeatable)")
    v.add_argument("--instance-type", metavar="TYPE", help="a virtual machine of this type (%s)" % ", ".join(INSTANCE_TYPES))
    v.add_argument("--vm", action="store_true", help="a virtual machine of type %s" % DEFAULT_INSTANCE_TYPE)
    v = verb(g, "list", cmd_instance_list, "list instances")
    v.add_argument("--status", choices=("Running", "Stopped", "Starting", "Stopping"))
    for name, func, help_ in (
        ("show", cmd_instance_show, "show one instance"),
        ("delete", _simple("DeleteInstance", "InstanceId", "%s deleted"), "delete a Stopped instance and the disks set to go with it"),
    ):
        verb(g, name, func, help_).add_argument("instance", metavar="INSTANCE_ID")
    v = verb(g, "start", cmd_instance_start, "start an instance: its disks appear as files; a virtual machine boots")
    v.add_argument("instance", metavar="INSTANCE_ID")
    v.add_argument("--no-wait", action="store_true", help="return while a virtual machine is still Starting")
    v.add_argument("--timeout", type=int, default=300, help="seconds to wait for Running (default 300)")
    v = verb(g, "stop", cmd_instance_stop, "stop an instance (disk files: refused while open; a virtual machine: "
             "power off, hard after VDISK_VM_STOP_TIMEOUT)")
    v.add_argument("instance", metavar="INSTANCE_ID")
    v.add_argument("--force", action="store_true", help="ForceStop: cut a virtual machine's power at once")
    v.add_argument("--no-wait", action="store_true", help="return while it is still Stopping")
    v.add_argument("--timeout", type=int, default=120, help="seconds to wait for Stopped (default 120)")
    v = verb(g, "crash", cmd_instance_stop, "cut a virtual machine's power (StopInstance with ForceStop): "
             "what the guest had not flushed is lost, as in a power cut")
    v.add_argument("instance", metavar="INSTANCE_ID")
    v.set_defaults(force=True, no_wait=False, timeout=60)
    v = verb(g, "run", cmd_instance_run, "run a shell script in a virtual machine (RunCommand) and print its "
             "output; exits with its exit code")
    v.add_argument("instance", metavar="INSTANCE_ID")
    v.add_argument("command", nargs="+", metavar="SCRIPT", help="the script (words joined by spaces), or - for stdin")
    v.add_argument("--timeout", type=int, default=60, help="seconds before it is stopped (10-86400, default 60)")
    v = verb(g, "console", cmd_instance_console, "print the end of a virtual machine's console log")
    v.add_argument("instance", metavar="INSTANCE_ID")
    v.add_argument("-n", "--lines", type=int, default=40, help="how many lines (default 40)")

    g = group("guest", "the guest that virtual machines boot (Debian's cloud kernel and vdisk's initramfs)")
    verb(g, "prepare", cmd_guest_prepare, "fetch the kernel and build the initramfs now (cached for the host)")
    v = verb(g, "rootfs", cmd_guest_rootfs, "a minimal Debian root filesystem (debootstrap), for `vdisk image import`")
    v.add_argument("--include", action="append", metavar="PKG[,PKG...]", help="Debian packages to add (repeatable)")
    v.add_argument("--suite", default="bookworm", help="Debian suite (default bookworm)")
    v.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror")

    g = disk_group = group("disk", "create, attach, detach, resize, reset and delete disks")
    v = verb(g, "create", cmd_disk_create, "create an Available disk, empty or from a snapshot")
    v.add_argument("--size", type=int, metavar="GIB", help="size in GiB (default: the snapshot's source disk size)")
    v.add_argument("--category", help="cloud_essd (default), cloud_auto (ESSD AutoPL), cloud_essd_entry, cloud_ssd, "
                   "cloud_efficiency, cloud")
    v.add_argument("--performance-level", metavar="PL", help="PL0-PL3 for cloud_essd (default PL1)")
    v.add_argument("--provisioned-iops", type=int, metavar="N", help="cloud_auto: IOPS on top of the baseline")
    v.add_argument("--bursting", action="store_true", help="cloud_auto: performance burst (BurstingEnabled)")
    v.add_argument("--name")
    v.add_argument("--description")
    v.add_argument("--snapshot", metavar="SNAPSHOT_ID", help="create the disk from this snapshot")
    v = verb(g, "list", cmd_disk_list, "list disks")
    v.add_argument("--instance", metavar="INSTANCE_ID")
    v.add_argument("--status", choices=("In_use", "Available"))
    verb(g, "show", cmd_disk_show, "show one disk").add_argument("disk", metavar="DISK_ID")
    verb(g, "path", cmd_disk_path, "print the file that serves a disk").add_argument("disk", metavar="DISK_ID")
    v = verb(g, "attach", cmd_disk_attach, "attach an Available disk to an instance")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--instance", required=True, metavar="INSTANCE_ID")
    v = verb(g, "detach", cmd_disk_detach, "detach a disk from its instance")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--instance", metavar="INSTANCE_ID")
    v = verb(g, "resize", cmd_disk_resize, "grow a disk")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--size", type=int, required=True, metavar="GIB", help="new size in GiB")
    v = verb(g, "reset", cmd_disk_reset, "roll a disk back to one of its snapshots (instance Stopped)")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--snapshot", required=True, metavar="SNAPSHOT_ID")
    v = verb(g, "modify-spec", cmd_disk_modify_spec, "change a disk's performance level or category, online "
             "(ModifyDiskSpec): its speed changes at once")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--performance-level", metavar="PL", help="PL1-PL3 (a cloud_essd disk; not back to PL0)")
    v.add_argument("--category", help="cloud_essd, cloud_auto, cloud_essd_entry, cloud_ssd or cloud_efficiency")
    v.add_argument("--provisioned-iops", type=int, metavar="N", help="a cloud_auto disk's provisioned IOPS")
    v = verb(g, "stats", cmd_disk_stats, "what the disks are doing, as iostat shows it: IOPS, MB/s, latency, "
             "queue and %% of the disk's I/O limit (DescribeDiskStats)")
    v.add_argument("disk", nargs="?", metavar="DISK_ID", help="one disk (default: every disk being served)")
    v.add_argument("--watch", action="store_true", help="a report every interval until Ctrl-C")
    v.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds a report covers (default 1, at most 3600)")
    v.add_argument("--count", type=int, metavar="N", help="with --watch, stop after N reports")
    v = verb(g, "set", cmd_disk_set, "vdisk's own disk settings (ModifyDiskAttribute)")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--io-limits", required=True, choices=("cloud", "unlimited", "pool"),
                   help="cloud: its category's IOPS and throughput; unlimited: as fast as the host goes; "
                   "pool: as the pool says (vdisk pool set --io-limits)")
    verb(g, "delete", cmd_disk_delete, "delete an Available disk").add_argument("disk", metavar="DISK_ID")

    g = snap_group = group("snapshot", "create, list, copy and delete disk snapshots")
    v = verb(g, "create", cmd_snapshot_create, "snapshot a disk (durable when this returns)")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--name")
    v.add_argument("--description")
    v.add_argument("--instant-access", action="store_true")
    v.add_argument("--instant-access-days", type=int, metavar="DAYS")
    v.add_argument("--retention-days", type=int, metavar="DAYS", help="delete it after DAYS days")
    v.add_argument("--tag", action="append", metavar="KEY[=VALUE]")
    v = verb(g, "list", cmd_snapshot_list, "list snapshots")
    v.add_argument("--disk", metavar="DISK_ID")
    v.add_argument("--instance", metavar="INSTANCE_ID")
    v.add_argument("--status", choices=("progressing", "accomplished", "failed"))
    verb(g, "show", cmd_snapshot_show, "show one snapshot").add_argument("snapshot", metavar="SNAPSHOT_ID")
    v = verb(g, "delete", cmd_snapshot_delete, "delete a snapshot; frees what nothing else uses")
    v.add_argument("snapshot", metavar="SNAPSHOT_ID")
    v.add_argument("--force", action="store_true", help="delete even if disks were created from it")
    streams.add_commands(verb, disk_group, g)

    repository.add_commands(group, verb)

    g = group("snapshot-group", "instance snapshots: several disks of one instance at one point in time")
    v = verb(g, "create", cmd_group_create, "snapshot disks of an instance together (all of its disks by default)")
    v.add_argument("instance", metavar="INSTANCE_ID")
    v.add_argument("--disk", action="append", metavar="DISK_ID", help="include only these disks (repeatable)")
    v.add_argument("--exclude-disk", action="append", metavar="DISK_ID", help="include all disks but these (repeatable)")
    v.add_argument("--name")
    v.add_argument("--description")
    v.add_argument("--instant-access", action="store_true", help="usable at once even while progressing "
                   "(vdisk pool set --snapshot-upload-rate)")
    v.add_argument("--instant-access-days", type=int, metavar="DAYS", help="instant access retention, 1-65535 days")
    v.add_argument("--retention-days", type=int, metavar="DAYS", help="delete the whole group after DAYS days")
    v.add_argument("--tag", action="append", metavar="KEY[=VALUE]")
    v.add_argument("--client-token", metavar="TOKEN", help="idempotency token: a retry returns the first group")
    v = verb(g, "list", cmd_group_list, "list snapshot groups")
    v.add_argument("--instance", metavar="INSTANCE_ID")
    v.add_argument("--name")
    v.add_argument("--status", action="append", choices=("progressing", "accomplished", "failed"))
    verb(g, "show", cmd_group_show, "show a snapshot group and its snapshots").add_argument("group", metavar="GROUP_ID")
    v = verb(g, "modify", cmd_group_modify, "change a group's name or description")
    v.add_argument("group", metavar="GROUP_ID")
    v.add_argument("--name")
    v.add_argument("--description")
    v = verb(g, "delete", cmd_group_delete, "delete a group's snapshots (those an image or a disk was made from are kept, as DeleteSnapshot keeps them; exit 1 then)")
    v.add_argument("group", metavar="GROUP_ID")
    v = verb(g, "reset", cmd_group_reset, "roll every disk of the group back at once (ResetDisks; instance Stopped)")
    v.add_argument("group", metavar="GROUP_ID")
    v.add_argument("--dry-run", action="store_true", help="only check that the reset would succeed")

    g = group("image", "custom images made of snapshots")
    v = verb(g, "create", cmd_image_create, "create an image from a system-disk snapshot and data-disk snapshots")
    v.add_argument("--snapshot", required=True, metavar="SNAPSHOT_ID", help="the system disk's snapshot")
    v.add_argument("--data-snapshot", action="append", metavar="SNAPSHOT_ID", help="a data disk's snapshot (repeatable)")
    v.add_argument("--name")
    v.add_argument("--description")
    v = verb(g, "import", cmd_image_import, "make an image whose system disk holds a root filesystem "
             "(virtual machines made from it boot that system)")
    v.add_argument("rootfs", metavar="DIR", help="the root filesystem, e.g. from `vdisk guest rootfs`")
    v.add_argument("--name")
    v.add_argument("--size", type=int, metavar="GIB", help="system disk size (default: twice the tree, at least 2)")
    verb(g, "list", cmd_image_list, "list images")
    verb(g, "delete", cmd_image_delete, "delete an image (its snapshots can then be deleted)").add_argument("image", metavar="IMAGE_ID")

    v = sub.add_parser("usage", help="snapshot space: billed, exclusive, shared, referenced", parents=[common])
    v.set_defaults(func=cmd_usage)

    g = group("loop", "attach disk files as loop devices (losetup --direct-io=on)")
    v = verb(g, "attach", cmd_loop_attach, "attach a disk's file as a loop device with direct I/O; prints the device")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("--read-only", action="store_true")
    verb(g, "detach", cmd_loop_detach, "detach a loop device (by device or disk id)").add_argument("target", metavar="DEVICE|DISK_ID")
    verb(g, "list", cmd_loop_list, "list loop devices on vdisk disks")

    lifecycle.register(group, verb)
    v = verb(snap_group, "copy", lifecycle.cmd_snapshot_copy, "copy a snapshot (CopySnapshot: a new id that shares "
             "the source's blocks, with its own retention)")
    v.add_argument("snapshot", metavar="SNAPSHOT_ID")
    v.add_argument("--name")
    v.add_argument("--description")
    v.add_argument("--retention-days", type=int, metavar="DAYS")
    v.add_argument("--region", metavar="REGION_ID", help="DestinationRegionId (default this region)")

    g = group("pool", "the storage pool")
    verb(g, "create", cmd_pool_create, "create an empty pool in the data directory (the daemon's first start does too)")
    verb(g, "status", cmd_pool_status, "space used, free, on disk")
    v = verb(g, "scrub", cmd_pool_scrub, "verify every block's checksum and the map (exit 4 on problems)")
    v.add_argument("--map-only", action="store_true", help="check the map only, not the data")
    verb(g, "trim", cmd_pool_trim, "give the host's disk back the unused pages of partial blocks (writes wait meanwhile)")
    v = verb(g, "set", lifecycle.cmd_pool_set, "pool settings (ModifyPoolAttribute)")
    v.add_argument("--snapshot-upload-rate", type=int, metavar="MB/S",
                   help="emulate the cloud's snapshot creation time: a snapshot is progressing while its data "
                   "(all of a disk's first, the change after) uploads at this rate; 0 (default) turns it off")
    v.add_argument("--io-limits", choices=("cloud", "unlimited"),
                   help="cloud (default): every disk at its category's IOPS and throughput, as in the cloud; "
                   "unlimited: as fast as the host goes (a disk's own setting wins: vdisk disk set)")
    v.add_argument("--region", metavar="REGION_ID", help="the region this pool stands for (default vdisk-local): "
                   "RegionId in answers; CopySnapshot to another region goes to the repository registered for it")

    g = group("accesskey", "access keys for the HTTP API (the cloud's AccessKeyId and AccessKeySecret)")
    verb(g, "create", cmd_accesskey_create, "create a key; prints its id and secret (kept in DATA_DIR/accesskeys.json, 0600)")
    verb(g, "list", cmd_accesskey_list, "list keys (without their secrets)")
    verb(g, "delete", cmd_accesskey_delete, "delete a key: requests signed with it are refused at once").add_argument(
        "key", metavar="ACCESS_KEY_ID")

    g = group("service", "run vdisk as a system service: a systemd unit (vdisk@.service) and mount -t fuse.vdisk")
    v = verb(g, "install", cmd_service_install, "write /etc/systemd/system/vdisk@.service and /sbin/mount.fuse.vdisk")
    v.add_argument("--root", default="/", metavar="DIR", help="install under DIR instead of / (for images and packages)")
    v.add_argument("--only", choices=("unit", "helper"), help="only the systemd unit, or only the mount helper")
    v = verb(g, "uninstall", cmd_service_uninstall, "remove what 'service install' wrote (nothing else)")
    v.add_argument("--root", default="/", metavar="DIR")
    verb(g, "show", cmd_service_show, "print the unit and the mount helper without installing them")

    v = sub.add_parser("api", help="send one cloud action with Name=Value parameters, as the cloud's API takes them "
                       "(values are text; lists as Name.1=... or a JSON list: DiskIds='[\"d-...\"]')", parents=[common])
    v.add_argument("action", metavar="ACTION")
    v.add_argument("params", nargs="*", metavar="Name=Value")
    v.set_defaults(func=cmd_api)
    return p


def main(argv=None) -> int:
    # text that is not valid Unicode (a lone surrogate from undecodable
    # bytes in argv) is printed escaped, never as a UnicodeEncodeError
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad usage
    as_json = getattr(args, "json", False)
    try:
        return args.func(App(args))
    except CLIError as exc:
        return _fail(as_json, str(exc), exc.code, exc.error_code or "Error")
    except client.NoPool as exc:
        return _fail(as_json, str(exc), EXIT_DAEMON, "PoolNotFound")
    except client.DaemonUnavailable as exc:
        return _fail(as_json, str(exc), EXIT_DAEMON, "DaemonUnavailable")
    except DataDirError as exc:
        return _fail(as_json, str(exc), EXIT_USAGE, "InvalidDataDir")
    except PermissionError as exc:
        return _fail(as_json, "not permitted: %s; run vdisk as root or as the pool's owner" % exc, EXIT_DAEMON, "Forbidden")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, exit 4, no traceback
        if os.environ.get("VDISK_DEBUG"):
            raise
        return _fail(as_json, "internal error: %s: %s (a bug in vdisk; VDISK_DEBUG=1 shows the traceback)"
                     % (type(exc).__name__, exc), EXIT_INTERNAL, "InternalError")


def _fail(as_json: bool, message: str, code: int, error_code: str) -> int:
    if as_json:
        print(json.dumps({"Code": error_code, "Message": message}), file=sys.stderr)
    print("vdisk: %s" % message, file=sys.stderr)
    return code
