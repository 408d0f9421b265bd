"""The daemon's edges with the real thing (root, FUSE, loop devices): hostile
control-socket clients, the CLI's exit codes and messages, the data
directory's permissions, a full pool filesystem, external umount, the mount
helper and systemd's readiness protocol.  Each test goes on to prove that the
daemon still serves and that data reads back intact."""
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from vdiskenv import VDiskEnv, need_root_fuse_loop, sh, small_pool, wait_exit

pytestmark = pytest.mark.root
NOBODY = 65534


def connect(env) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(os.path.join(env.data, "control.sock"))
    return s


def ask(env, raw: bytes) -> dict:
    with connect(env) as s:
        s.sendall(raw)
        return json.loads(s.makefile("rb").readline())


def alive(env, pid):
    os.kill(pid, 0)  # raises if the daemon died
    assert env.j("daemon", "status")["Pid"] == pid


def running_disk(env):
    """A running instance's data disk file holding 1 MiB of known, flushed data."""
    iid, (disk,) = env.instance(ndata=1)
    env.run("instance", "start", iid)
    path = env.run("disk", "path", disk).stdout.strip()
    data = os.urandom(1 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return iid, disk, path, data


def read_back(path, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def as_nobody(fn) -> tuple[int, str]:
    """Run fn() in a child process with uid/gid nobody; (its exit code, what
    it wrote to stderr).  fn returns the exit code."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(r)
            os.dup2(w, 2)
            os.dup2(w, 1)
            sys.stdout = open(1, "w", closefd=False)  # not pytest's capture
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = fn()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe
            os.write(w, ("child raised %r" % exc).encode())
        finally:
            os._exit(code if isinstance(code, int) else 98)
    os.close(w)
    out = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


# ------------------------------------------------------------ control socket


def test_hostile_control_clients_do_not_take_the_disks_down(venv):
    pid = venv.daemon_pid()
    _, _, path, data = running_disk(venv)
    # 1. deeply nested JSON: RecursionError used to escape and stop the daemon
    a = ask(venv, b"[" * 2000 + b"]" * 2000 + b"\n")
    assert a["Code"] == "InvalidParameter" and "nest" in a["Message"], a
    a = ask(venv, b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n")
    assert a["Code"] == "InvalidParameter", a
    alive(venv, pid)
    # 2. a client that sends too much without a newline and hangs up (10 of 10 crashed it)
    for _ in range(10):
        with connect(venv) as s:
            try:
                s.sendall(b"y" * (1100 * 1024))
            except (BrokenPipeError, ConnectionResetError):
                pass  # past 1 MiB the daemon answers and closes while we still send
    # ... or hangs up half-way through a line, or at once
    for _ in range(20):
        with connect(venv) as s:
            s.sendall(b'{"Action": "DescribeDisks", "Disk')
    for _ in range(20):
        connect(venv).close()
    # 5. a value of the wrong type where the dispatcher hashes it
    assert ask(venv, b'{"Action": []}\n')["Code"] == "InvalidParameter"
    assert ask(venv, b'{"Action": "Shutdown", "Force": "yes"}\n')["Code"] == "InvalidParameter"
    # invalid UTF-8 and a lone surrogate
    assert ask(venv, b'{"Action": "DescribeDisks", "X": "\xff\xfe"}\n')["Code"] == "InvalidParameter"
    assert ask(venv, b'{"Action": "CreateDisk", "Size": 20, "Description": "\\udcff"}\n')["Code"] == "InvalidParameter"
    time.sleep(0.2)
    alive(venv, pid)
    assert read_back(path, len(data)) == data
    assert "Traceback" not in open(os.path.join(venv.data, "daemon.log")).read()


def test_forbidden_peer_that_hangs_up(venv):
    """A peer of another user gets Forbidden; one that hangs up before the
    answer used to crash the daemon at that reply."""
    pid = venv.daemon_pid()
    sock = os.path.join(venv.data, "control.sock")
    os.chmod(venv.dir, 0o711)
    os.chmod(venv.data, 0o711)
    os.chmod(sock, 0o666)
    try:
        def hang_up():
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.close()
            return 0

        def read_answer():
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            try:
                s.sendall(b'{"Action": "DescribeDisks"}\n')
            except BrokenPipeError:
                pass  # the daemon may have answered Forbidden and closed already
            os.write(1, s.makefile("rb").readline())
            return 0

        code, out = as_nobody(hang_up)
        assert code == 0, out
        code, out = as_nobody(read_answer)
        assert code == 0 and json.loads(out)["Code"] == "Forbidden", out
    finally:
        os.chmod(sock, 0o600)
        os.chmod(venv.data, 0o700)
        os.chmod(venv.dir, 0o700)
    time.sleep(0.2)
    alive(venv, pid)


def test_clients_wait_while_the_daemon_is_stopped(venv):
    """SIGSTOP the daemon while 40 clients call it: they wait (the queue, then
    the connect retry), and all get their answer after SIGCONT."""
    pid = venv.daemon_pid()
    cmd = [sys.executable, "-m", "vdisk", "--data-dir", venv.data, "--json", "disk", "list"]
    os.kill(pid, signal.SIGSTOP)
    try:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(40)]
        time.sleep(2)
    finally:
        os.kill(pid, signal.SIGCONT)
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [rc for rc, _ in results] == [0] * 40, [r for r in results if r[0]]
    alive(venv, pid)


# ------------------------------------------------------------ the CLI


def test_cli_exit_codes_and_messages(venv):
    iid, disk, path, data = running_disk(venv)
    cases = [
        (["loop", "detach", "/dev/nonexistent"], 1, "not an attached loop device"),
        (["disk", "create"], 2, "MissingParameter"),
        (["api", "CreateDisk", "Size=²"], 1, "Size"),
        (["api", "CreateDisk", "Size=" + "9" * 5000], 1, "Size"),
        (["disk", "create", "--size", "20", "--description", "bad \udcff text"], 1, "Unicode"),
        (["instance", "create", "--name", "abc\n"], 1, "InvalidInstanceName.Malformed"),
        (["disk", "create", "--size", "20", "--name", "abc\n"], 1, "InvalidDiskName.Malformed"),
        # an interval past an hour (9 x 25 was an OverflowError in time.sleep)
        (["disk", "stats", "--interval", "9" * 25], 2, "at most 3600 seconds"),
    ]
    before = venv.j("disk", "list")["Disks"]
    for args, code, text in cases:
        r = venv.run(*args, check=False)
        assert (r.returncode, text in r.stderr) == (code, True), (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert venv.j("disk", "list")["Disks"] == before
    assert venv.run("disk", "show", disk).returncode == 0
    # a reader that stops early: no BrokenPipeError traceback, the command's own status
    for _ in range(2):
        venv.run("disk", "create", "--size", "20")
    r = subprocess.run("set -o pipefail; %s -m vdisk --data-dir %s api DescribeDisks | head -c 10"
                       % (sys.executable, venv.data), shell=True, executable="/bin/bash",
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert read_back(path, len(data)) == data


def test_loop_detach_refuses_devices_of_others(venv, tmp_path):
    _, disk, path, _ = running_disk(venv)
    foreign = tmp_path / "foreign.img"
    with open(foreign, "wb") as f:
        f.truncate(16 << 20)
    dev = sh("losetup", "--find", "--show", foreign).stdout.strip()
    try:
        r = venv.run("loop", "detach", dev, check=False)
        assert r.returncode == 1 and str(foreign) in r.stderr, r.stderr
        assert sh("losetup", dev).returncode == 0  # still attached
        ours = venv.attach(disk)
        assert venv.run("loop", "detach", ours).stdout.strip() == ours
    finally:
        sh("losetup", "-d", dev, check=False)


def test_mistyped_data_dir_creates_nothing(tmp_path):
    need_root_fuse_loop()
    typo = tmp_path / "typo"
    cmd = [sys.executable, "-m", "vdisk", "--data-dir", str(typo)]
    for args in (["disk", "list"], ["pool", "status"], ["api", "DescribeDisks"]):
        r = subprocess.run(cmd + args, capture_output=True, text=True)
        assert r.returncode == 3 and "holds no vdisk pool" in r.stderr, (args, r.returncode, r.stderr)
    assert not typo.exists()
    r = subprocess.run(cmd + ["daemon", "status"], capture_output=True, text=True)
    assert r.returncode == 3 and not typo.exists()
    # a regular file, a path under /proc: clear errors, no traceback
    f = tmp_path / "file"
    f.write_text("")
    for d, args, code in ((f, ["disk", "list"], 3), (f, ["daemon", "start"], 2), ("/proc/vdisk/x", ["daemon", "start"], 2),
                          ("/proc/vdisk/x", ["pool", "create"], 2)):
        r = subprocess.run([sys.executable, "-m", "vdisk", "--data-dir", str(d)] + args, capture_output=True, text=True)
        assert r.returncode == code and "Traceback" not in r.stderr and r.stderr.startswith("vdisk: "), (d, args, r.stderr)
    # the explicit way
    r = subprocess.run(cmd + ["pool", "create"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(typo).st_mode) == 0o700
    r = subprocess.run(cmd + ["--json", "pool", "status"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["Pool"]["Volumes"] == 0
    assert subprocess.run(cmd + ["pool", "create"], capture_output=True, text=True).returncode == 1


def test_non_root_cli_gets_a_message_not_a_traceback(venv):
    from vdisk.cli.main import main

    os.chmod(venv.dir, 0o711)  # let nobody reach the socket's permission check
    os.chmod(venv.data, 0o711)
    try:
        for args in (["disk", "list"], ["daemon", "status"], ["pool", "status"]):
            code, err = as_nobody(lambda: main(["--data-dir", venv.data] + args))
            assert code == 3 and "Traceback" not in err and "not permitted" in err, (args, code, err)
    finally:
        os.chmod(venv.data, 0o700)
    code, err = as_nobody(lambda: main(["--data-dir", venv.data, "disk", "list"]))
    assert code == 3 and "Traceback" not in err, err
    os.chmod(venv.dir, 0o700)


def test_data_directory_and_log_are_private(tmp_path):
    need_root_fuse_loop()
    env = VDiskEnv()
    try:
        os.makedirs(env.data, mode=0o755)
        os.chmod(env.data, 0o755)
        with open(os.path.join(env.data, "daemon.log"), "w") as f:
            f.write("old\n")
        os.chmod(os.path.join(env.data, "daemon.log"), 0o644)
        r = env.run("daemon", "start")
        env.pids.add(env.daemon_pid())
        assert "now 0700" in r.stderr
        assert stat.S_IMODE(os.stat(env.data).st_mode) == 0o700
        for name in ("daemon.log", "daemon.lock", "control.sock"):
            assert stat.S_IMODE(os.stat(os.path.join(env.data, name)).st_mode) == 0o600, name
        # a data directory of another user is refused
        other = os.path.join(env.dir, "other")
        os.makedirs(other)
        os.chown(other, NOBODY, NOBODY)
        r = subprocess.run([sys.executable, "-m", "vdisk", "--data-dir", other, "daemon", "start"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "belongs to uid %d" % NOBODY in r.stderr, r.stderr
    finally:
        env.close()


# ------------------------------------------------------------ a full pool


def test_full_pool_filesystem_read_only_actions_answer(tmp_path):
    """Pool on a 48 MiB tmpfs filled to the last byte: pool status and the
    listings answer (they used to commit first and fail), a snapshot group
    that fails for lack of space is shown with its reason, and once there is
    room again it is durable."""
    with small_pool(tmp_path) as env:
        filler = os.path.join(str(tmp_path / "small"), "filler")
        env.start()
        iid, (disk,) = env.instance(ndata=1)
        env.run("instance", "start", iid)
        path = env.run("disk", "path", disk).stdout.strip()
        first = os.urandom(1 << 20)
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, first, 0)
            os.fsync(fd)
            os.pwrite(fd, os.urandom(1 << 20), 8 << 20)  # written, not flushed: a commit must write it
        finally:
            os.close(fd)
        with open(filler, "wb") as f:  # fill the filesystem to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        r = env.run("--json", "pool", "status", check=False)
        assert r.returncode == 0, r.stderr
        assert env.run("disk", "list").returncode == 0
        r = env.run("snapshot-group", "create", iid, "--name", "nospace", check=False)
        assert r.returncode in (1, 4), r.stderr
        if r.returncode == 4:  # it failed for lack of space: the id it names must be shown
            gid = [w for w in r.stderr.split() if w.startswith("ssg-")][0]
            shown = env.j("snapshot-group", "list", "--status", "failed")["SnapshotGroups"]["SnapshotGroup"]
            assert [g["SnapshotGroupId"] for g in shown] == [gid], shown
            assert shown[0]["FailReason"]
        else:
            pytest.fail("the snapshot group was refused, not failed: %s" % r.stderr)
        os.unlink(filler)
        env.stop()
        env.start()
        shown = env.j("snapshot-group", "list", "--status", "failed")["SnapshotGroups"]["SnapshotGroup"]
        assert [g["SnapshotGroupId"] for g in shown] == [gid]  # made durable once there was room
        assert read_back(env.run("disk", "path", disk).stdout.strip(), len(first)) == first
        assert env.j("pool", "scrub")["Clean"]


# ------------------------------------------------------------ the mount's life


def test_external_umount_stops_the_daemon_cleanly(venv):
    pid = venv.daemon_pid()
    _, disk, path, data = running_disk(venv)
    dev = venv.attach(disk)
    # busy: a loop device holds a disk file; umount refuses and nothing changes
    assert sh("umount", venv.mnt, check=False).returncode != 0
    alive(venv, pid)
    venv.run("loop", "detach", dev)
    sh("umount", venv.mnt)
    assert wait_exit(pid, 10), "the daemon did not stop after its mount was unmounted"
    r = venv.run("--json", "daemon", "status", check=False)
    assert r.returncode == 3
    last = json.loads(r.stdout)["LastExit"]
    assert last["Clean"] and "unmounted from outside" in last["Reason"], last
    with open("/proc/self/mounts") as f:
        assert venv.mnt not in f.read()
    venv.start()
    assert read_back(venv.run("disk", "path", disk).stdout.strip(), len(data)) == data
    assert "LastExit" not in venv.j("daemon", "status")


def test_mount_helper_mount_and_umount(tmp_path):
    need_root_fuse_loop("mount", "umount")
    from vdisk.host import service

    helper = "/sbin/" + service.HELPER_NAME
    if os.path.exists(helper) and not service._ours(helper):
        pytest.skip("%s exists and is not vdisk's" % helper)
    env = VDiskEnv()
    installed = not os.path.exists(helper)
    try:
        env.run("service", "install", "--only", "helper")
        r = sh("mount", "-t", "fuse.vdisk", "-o", "defaults,nofail,x-test", env.data, env.mnt, check=False)
        assert r.returncode == 0, r.stderr
        pid = env.daemon_pid()
        env.pids.add(pid)
        assert env.j("daemon", "status")["MountPoint"] == env.mnt
        iid, disk, path, data = running_disk(env)
        r = sh("mount", "-t", "fuse.vdisk", "-o", "ro", env.data, env.mnt, check=False)
        assert r.returncode != 0 and "read-write" in r.stderr
        sh("umount", env.mnt)
        assert wait_exit(pid, 10), "umount did not stop the daemon"
        sh("mount", "-t", "fuse.vdisk", env.data, env.mnt)
        env.pids.add(env.daemon_pid())
        assert read_back(path, len(data)) == data
    finally:
        env.close()
        if installed:
            service.uninstall()


def test_systemd_notify_ready_and_stopping(tmp_path):
    """`vdisk daemon run` as systemd runs it (Type=notify): READY=1 once it
    serves, STOPPING=1 and exit 0 when its mount is unmounted."""
    need_root_fuse_loop()
    env = VDiskEnv()
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(os.path.join(env.dir, "notify"))
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vdisk", "--data-dir", env.data, "--mountpoint", env.mnt,
                                 "daemon", "run"], env={**os.environ, "NOTIFY_SOCKET": os.path.join(env.dir, "notify")},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env.pids.add(proc.pid)

        def next_message(timeout=60):
            if not select.select([ns], [], [], timeout)[0]:
                pytest.fail("no notification within %ds" % timeout)
            return dict(line.split("=", 1) for line in ns.recv(4096).decode().splitlines())

        msg = next_message()
        assert msg["READY"] == "1" and msg["MAINPID"] == str(proc.pid), msg
        assert env.j("daemon", "status")["Pid"] == proc.pid  # ready means it answers
        sh("umount", env.mnt)
        msg = next_message()
        assert msg["STOPPING"] == "1" and "unmounted" in msg["STATUS"], msg
        assert proc.wait(60) == 0
    finally:
        ns.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        env.close()


def test_service_unit_is_valid(tmp_path):
    from vdisk.host import service

    root = tmp_path / "root"
    written = service.install(str(root))
    unit = [w for w in written if w.endswith(service.UNIT_NAME)][0]
    text = open(unit).read()
    assert "Type=notify" in text and "ExecStart=%s -m vdisk --data-dir %%f daemon run" % sys.executable in text
    if not os.path.exists("/usr/bin/systemd-analyze"):
        pytest.skip("needs systemd-analyze to verify the unit")
    inst = tmp_path / "vdisk@var-lib-vdisk.service"
    inst.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(inst)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "vdisk@" not in r.stderr, r.stderr
    # install refuses to overwrite a file that is not vdisk's; uninstall removes only its own
    helper = root / "sbin" / service.HELPER_NAME
    helper.write_text("#!/bin/sh\nsomeone else's\n")
    with pytest.raises(FileExistsError):
        service.install(str(root))
    assert service.uninstall(str(root)) == [unit]
    assert helper.exists()


# ------------------------------------------------------------ FUSE edges

def test_lookups_racing_cache_invalidations_are_answered(venv):
    """Lookups in the mount and an instance's directory while the instance
    starts and stops again and again (each time the daemon tells the kernel
    to forget those entries) are all answered.  The fast path's reply
    thread used to write those invalidations to the kernel itself: the
    kernel's inval_entry waits for the directory's lock, which a LOOKUP
    there holds until its reply comes - a reply queued behind the
    invalidation in that same thread.  The mount then hung for ever (CI's
    losetup did, in the consistency suite).  Fails so within a few cycles
    without the notify thread (csrc/fuse_fastpath.c)."""
    env = venv
    iid, _ = env.instance(ndata=1)
    env.run("instance", "start", iid)
    conn = os.minor(os.stat(env.mnt).st_dev)  # /sys/fs/fuse/connections/<conn>: to abort a hung mount
    dirs = [env.mnt, os.path.join(env.mnt, iid)]
    answered = [0]
    stop = threading.Event()

    def look(i):
        n = 0
        while not stop.is_set():
            for d in dirs:
                try:
                    os.stat(os.path.join(d, "absent-%d-%d" % (i, n)))
                except OSError:
                    pass
            n += 1
            answered[0] += 1

    lookers = [threading.Thread(target=look, args=(i,), daemon=True) for i in range(4)]
    for t in lookers:
        t.start()
    hung_at = None
    try:
        for cycle in range(20):
            env.run("instance", "stop", iid)
            env.run("instance", "start", iid)
            before, deadline = answered[0], time.monotonic() + 10
            while answered[0] == before and time.monotonic() < deadline:
                time.sleep(0.05)
            if answered[0] == before:
                hung_at = cycle
                break
    finally:
        stop.set()
        if hung_at is not None:  # let the stuck lookups (and the daemon) go
            with open("/sys/fs/fuse/connections/%d/abort" % conn, "w") as f:
                f.write("1")
        for t in lookers:
            t.join(timeout=10)
    assert hung_at is None, "lookups stopped being answered after %d start/stop cycles" % hung_at
    assert answered[0] > 20
    # the disks still serve: a data disk reads back what was written to it
    disk = env.j("disk", "list", "--instance", iid)["Disks"]["Disk"][0]["DiskId"]
    path = env.run("disk", "path", disk).stdout.strip()
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        assert os.pread(fd, 4096, 0) == b"x" * 4096
    finally:
        os.close(fd)
