"""A real vdisk daemon in a temporary data directory, driven through the CLI.

Used by the integration tests, scripts/bench and the consistency suite.
Everything it creates (daemon, FUSE mount, loop devices, filesystem mounts,
the directory) is released by close(), even after a failure.  It only kills
daemon processes it started itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s failed (%d): %s %s" % (" ".join(map(str, args)), r.returncode, r.stdout, r.stderr))
    return r


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL after timeout
    seconds (a slow shutdown must not hang the caller)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process pid is gone; False if it still runs after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def write_random_blocks(path: str, blocks, seed: int, size: int = 65536) -> None:
    """Write a random block of size bytes (random.Random(seed)) at each of
    blocks (indexes of size-byte blocks) of the file or device path, then
    fsync it."""
    r = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    try:
        for b in blocks:
            os.pwrite(fd, r.randbytes(size), b * size)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class VDiskEnv:
    def __init__(self, prefix: str = "vdisk-test-", parent: str | None = None, io_limits: str = "unlimited"):
        """io_limits: the pool's I/O limits, set at the daemon's first start
        (`vdisk pool set --io-limits`): "unlimited" (the default here) for
        tests and benchmarks of vdisk itself, "cloud" for disks at their
        category's speed, as the cloud serves them (and as a pool does by
        default)."""
        self.io_limits = io_limits
        self._limits_set = False
        self.dir = tempfile.mkdtemp(prefix=prefix, dir=parent)
        self.data = os.path.join(self.dir, "data")
        self.mnt = os.path.join(self.dir, "disks")
        self.fs_mounts: list[str] = []
        self.pids: set[int] = set()

    # -------------------------------------------------------------- CLI
    def run(self, *args, check=True, input=None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "vdisk", "--data-dir", self.data, "--mountpoint", self.mnt, *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=600)
        if check and r.returncode != 0:
            raise AssertionError("vdisk %s failed (%d):\n%s%s" % (" ".join(map(str, args)), r.returncode, r.stdout, r.stderr))
        return r

    def j(self, *args):
        return json.loads(self.run("--json", *args).stdout)

    def api(self, action, **params):
        return self.j("api", action, *("%s=%s" % (k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()))

    # -------------------------------------------------------------- daemon
    def start(self, *args):
        """Start the daemon (extra args go to `vdisk daemon start`); its pid."""
        self.run("daemon", "start", *args)
        pid = self.daemon_pid()
        self.pids.add(pid)
        if not self._limits_set:
            self.run("pool", "set", "--io-limits", self.io_limits)
            self._limits_set = True
        return pid

    def daemon_pid(self) -> int:
        return self.j("daemon", "status")["Pid"]

    def stop(self, force=False):
        self.run("daemon", "stop", *(["--force"] if force else []))

    def kill9(self):
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid, 10)

    # -------------------------------------------------------------- resources
    def instance(self, ndata=2, size=1, pl="PL0", name="test"):
        args = ["instance", "create", "--name", name, "--system-size", size, "--system-pl", pl]
        for _ in range(ndata):
            args += ["--data-disk", "%d:cloud_essd:%s" % (size, pl)]
        iid = self.run(*args).stdout.strip()
        disks = self.j("disk", "list", "--instance", iid)["Disks"]["Disk"]
        data = [d["DiskId"] for d in sorted(disks, key=lambda d: d["Device"]) if d["Type"] == "data"]
        return iid, data

    def attach(self, disk) -> str:
        return self.run("loop", "attach", disk).stdout.strip()

    def mount(self, dev, target, *opts) -> str:
        os.makedirs(target, exist_ok=True)
        sh("mount", *(["-o", ",".join(opts)] if opts else []), dev, target)
        self.fs_mounts.append(target)
        return target

    def umount(self, target):
        sh("umount", target)
        self.fs_mounts.remove(target)

    # -------------------------------------------------------------- teardown
    def _my_loops(self):
        out = []
        for d in sorted(os.listdir("/sys/block")):
            p = "/sys/block/%s/loop/backing_file" % d
            try:
                with open(p) as f:
                    if f.read().strip().startswith(self.dir + "/"):
                        out.append("/dev/" + d)
            except OSError:
                pass
        return out

    def close(self):
        for m in reversed(self.fs_mounts):
            if sh("umount", m, check=False).returncode != 0:
                sh("umount", "-l", m, check=False)
        self.fs_mounts = []
        for dev in self._my_loops():
            sh("losetup", "-d", dev, check=False)
        if os.path.exists(os.path.join(self.data, "control.sock")):
            self.run("daemon", "stop", "--force", check=False)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with open("/proc/self/mounts") as f:
            mounted = [l.split()[1] for l in f if l.split()[1].startswith(self.dir)]
        for m in sorted(mounted, reverse=True):
            sh("umount", "-l", m, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
