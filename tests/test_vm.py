"""Instances as virtual machines (vdisk.vm): a real QEMU guest booting
Debian's cloud kernel with the instance's vdisk disk files as virtio disks.

Pure tests first (module order, the accelerator's choice), then one VM's
life end to end through the CLI and the API: start, commands in the guest,
power off, power cut, restart, the rules around a running machine, and a
daemon killed under a running machine.  Root, FUSE and QEMU only; they skip
with the reason otherwise.  TCG boots in 5-10 s here."""
import json
import os
import signal
import time

import pytest

from vdisk.vm import assets
from vdisk.vm import machine as vm_machine
from vdiskenv import VDiskEnv, need_root_fuse_loop, wait_exit

# ------------------------------------------------------------------ pure


def _fake_module(path, depends):
    with open(path, "wb") as f:
        f.write(b"\x7fELF" + b"\0" * 64 + b"\0license=GPL\0depends=%s\0vermagic=6.1\0" % depends.encode())


def test_module_order_puts_dependencies_first(tmp_path):
    (tmp_path / "a").mkdir()
    _fake_module(tmp_path / "a" / "virtio_blk.ko", "virtio,virtio_ring")
    _fake_module(tmp_path / "a" / "virtio.ko", "")
    _fake_module(tmp_path / "a" / "virtio_ring.ko", "virtio")
    _fake_module(tmp_path / "a" / "dm-mod.ko", "")
    _fake_module(tmp_path / "a" / "unrelated.ko", "")
    order = [os.path.basename(p) for p in assets.module_order(str(tmp_path), ("virtio_blk", "dm_mod", "builtin_one"))]
    assert order == ["virtio.ko", "virtio_ring.ko", "virtio_blk.ko", "dm-mod.ko"]


def test_accelerator_is_tcg_without_hardware_virtualisation(monkeypatch):
    monkeypatch.setenv("VDISK_VM_ACCEL", "tcg")
    assert vm_machine.accelerator() == "tcg"
    monkeypatch.setenv("VDISK_VM_ACCEL", "kvm")
    assert vm_machine.accelerator() == "kvm"
    monkeypatch.delenv("VDISK_VM_ACCEL")
    with open("/proc/cpuinfo") as f:
        flags = next(l for l in f if l.startswith("flags")).split()
    hw = ("vmx" in flags or "svm" in flags) and (os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd"))
    assert vm_machine.accelerator() == ("kvm" if hw and os.access("/dev/kvm", os.W_OK) else "tcg")
    if os.path.exists("/sys/module/kvm_pvm") and not hw:
        assert "PVM" in vm_machine.accelerator_note()


def test_qemu_command_line_orders_disks_and_sets_serials(tmp_path):
    g = assets.Guest("/k/vmlinuz", "/k/initrd", "6.1")
    m = vm_machine.Machine("i-x", str(tmp_path), g, 2, 1024, [vm_machine.Drive("/d/sys", "aaa"), vm_machine.Drive("/d/data", "bbb")])
    try:
        argv = m.argv()
    except vm_machine.MachineError as exc:
        pytest.skip(str(exc))
    drives = [a for a in argv if a.startswith("file=")]
    assert [d.split(",")[0] for d in drives] == ["file=/d/sys", "file=/d/data"]
    assert all("cache=none" in d for d in drives)
    assert "virtio-blk-pci,drive=disk0,serial=aaa" in argv and "virtio-blk-pci,drive=disk1,serial=bbb" in argv


# ------------------------------------------------------------------ a real guest


def need_vm():
    need_root_fuse_loop()
    if vm_machine.accelerator() == "tcg" and not os.path.exists("/usr/bin/qemu-system-x86_64"):
        pytest.skip("needs qemu-system-x86_64 (Debian package qemu-system-x86; scripts/setup)")
    try:
        assets.ensure()
    except assets.AssetError as exc:
        pytest.skip("the guest cannot be built here: %s" % exc)


@pytest.fixture(scope="module")
def vm():
    need_vm()
    env = VDiskEnv(prefix="vdisk-vm-test-")
    try:
        env.start("--http", "127.0.0.1:0")
        iid = env.run("instance", "create", "--vm", "--name", "vmtest", "--system-size", "1", "--system-pl", "PL0",
                      "--data-disk", "1:cloud_essd:PL0", "--data-disk", "2:cloud_essd:PL0").stdout.strip()
        yield env, iid
    finally:
        env.close()


def api(env, action, **params) -> dict:
    """The action's answer, or {"Code", "Message"} when it was refused."""
    r = env.run("--json", "api", action, *("%s=%s" % (k, v) for k, v in params.items()), check=False)
    if r.returncode == 0:
        return json.loads(r.stdout)
    code = r.stderr.strip().rsplit("(", 1)[-1].rstrip(")")
    return {"Code": code, "Message": r.stderr.strip()}


def instance(env, iid) -> dict:
    return env.j("instance", "show", iid)


def run(env, iid, script, check=True):
    r = env.run("instance", "run", iid, script, check=check)
    return r


def test_start_boots_the_disks_in_the_clouds_order(vm):
    env, iid = vm
    r = env.j("instance", "start", iid)
    assert r["Status"] == "Running"
    v = r["VirtualMachine"]
    assert v["State"] == "running" and v["Accelerator"].split()[0] in ("kvm", "tcg")
    assert v["KernelRelease"].endswith("-cloud-amd64")
    disks = sorted(env.j("disk", "list", "--instance", iid)["Disks"]["Disk"], key=lambda d: (d["Type"] != "system", d["Device"]))
    out = run(env, iid, "for b in /sys/block/vd*; do echo ${b##*/} $(cat $b/serial) $(cat $b/size); done").stdout.split("\n")
    got = [l.split() for l in out if l]
    assert [g[0] for g in got] == ["vda", "vdb", "vdc"]
    assert [g[1] for g in got] == [d["DiskId"].removeprefix("d-") for d in disks]
    assert [int(g[2]) * 512 for g in got] == [d["Size"] << 30 for d in disks]
    links = run(env, iid, "ls /dev/disk/by-id").stdout.split()
    assert "virtio-" + disks[1]["DiskId"].removeprefix("d-") in links


def test_an_online_resize_reaches_the_guest(vm):
    """ResizeDisk of a running machine's disk: the guest's block device grows
    at once, as with the cloud's online resize."""
    env, iid = vm
    disk = sorted((d for d in env.j("disk", "list", "--instance", iid)["Disks"]["Disk"] if d["Type"] == "data"),
                  key=lambda d: d["Device"])[1]
    assert disk["Size"] == 2
    env.run("disk", "resize", disk["DiskId"], "--size", "3")
    out = run(env, iid, "for i in $(seq 100); do [ $(cat /sys/block/vdc/size) = %d ] && break; sleep 0.1; done; "
                        "cat /sys/block/vdc/size" % (3 << 21)).stdout
    assert int(out) * 512 == 3 << 30


def test_run_command_reports_output_and_exit_code(vm):
    env, iid = vm
    r = env.run("instance", "run", iid, "echo out; echo err >&2; exit 3", check=False)
    assert r.returncode == 3 and r.stdout.split() == ["out", "err"]
    res = api(env, "RunCommand", Type="RunShellScript", CommandContent="c2xlZXAgMzA=", ContentEncoding="Base64",
              **{"InstanceId.1": iid, "Timeout": "10"})
    inv = res["InvokeId"]
    assert inv.startswith("t-")
    deadline = time.monotonic() + 60
    while True:
        r = api(env, "DescribeInvocationResults", InvokeId=inv)["Invocation"]["InvocationResults"]["InvocationResult"][0]
        if r["InvocationStatus"] != "Running" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (r["InvocationStatus"], r["ErrorCode"], r["InvokeRecordStatus"]) == ("Failed", "InvocationTimeout", "Failed")
    res = api(env, "RunCommand", Type="RunShellScript", CommandContent="echo started; sleep 600", **{"InstanceId.1": iid})
    time.sleep(1)
    api(env, "StopInvocation", InvokeId=res["InvokeId"])
    r = api(env, "DescribeInvocationResults", InvokeId=res["InvokeId"], ContentEncoding="PlainText")
    r = r["Invocation"]["InvocationResults"]["InvocationResult"][0]
    assert r["InvocationStatus"] == "Stopped" and r["Output"] == "started\n"
    bad = api(env, "RunCommand", Type="RunBatScript", CommandContent="dir", **{"InstanceId.1": iid})
    assert bad["Code"] == "InvalidParameter" and "RunShellScript" in bad["Message"]
    missing = api(env, "DescribeInvocationResults", InvokeId="t-doesnotexist")
    assert missing["Code"] == "InvalidInvokeId.NotFound"


def test_a_running_machine_refuses_what_would_pull_disks_from_under_it(vm):
    env, iid = vm
    disk = env.j("disk", "create", "--size", "1", "--performance-level", "PL0")["DiskId"]
    r = env.run("disk", "attach", disk, "--instance", iid, check=False)
    assert r.returncode == 1 and "IncorrectInstanceStatus" in r.stderr and "hot-plug" in r.stderr
    r = env.run("instance", "delete", iid, check=False)
    assert r.returncode == 1 and "IncorrectInstanceStatus" in r.stderr
    r = env.run("daemon", "stop", check=False)
    assert r.returncode != 0 and "virtual machines" in r.stderr
    assert instance(env, iid)["Status"] == "Running"
    env.run("disk", "delete", disk)


def test_stop_powers_off_and_keeps_what_the_guest_wrote(vm):
    env, iid = vm
    run(env, iid, "mkfs.ext4 -q -F /dev/vdb && mount /dev/vdb /mnt && echo kept > /mnt/a && umount /mnt")
    t = time.monotonic()
    r = env.j("instance", "stop", iid)
    assert r["Status"] == "Stopped" and "powered off" in r["StoppedReason"]
    assert time.monotonic() - t < 30, "the guest did not power off by itself (hard stop after the timeout?)"
    env.j("instance", "start", iid)
    assert run(env, iid, "mount /dev/vdb /mnt && cat /mnt/a").stdout == "kept\n"


def test_crash_is_a_power_cut(vm):
    """ForceStop kills QEMU: what the guest flushed survives, what sat in
    its page cache is gone (the cloud's ForceStop: 'data in the cache that
    was not written to storage may be lost')."""
    env, iid = vm
    run(env, iid, "mountpoint -q /mnt || mount /dev/vdb /mnt; "
                  "dd if=/dev/urandom of=/mnt/flushed bs=64k count=16 conv=fsync 2>/dev/null; sha256sum /mnt/flushed > /mnt/flushed.sum; "
                  "sync /mnt/flushed.sum /mnt; "
                  "echo 100000 > /proc/sys/vm/dirty_expire_centisecs; echo 0 > /proc/sys/vm/dirty_writeback_centisecs; "
                  "dd if=/dev/urandom of=/mnt/cached bs=64k count=16 2>/dev/null")
    r = env.j("instance", "crash", iid)
    assert r["Status"] == "Stopped" and "ForceStop" in r["StoppedReason"]
    env.j("instance", "start", iid)
    out = run(env, iid, "mount /dev/vdb /mnt && cd /mnt && sha256sum -c flushed.sum && "
                        "echo cached $(stat -c %s cached 2>/dev/null || echo missing)").stdout
    assert "flushed: OK" in out
    assert "cached 1048576" not in out, "data never flushed by the guest survived a power cut: %s" % out
    run(env, iid, "umount /mnt")


def test_snapshot_group_of_a_running_machine_restores_on_another(vm):
    env, iid = vm
    run(env, iid, "mkfs.ext4 -q -F /dev/vdc && mount /dev/vdc /mnt && "
                  "dd if=/dev/urandom of=/mnt/x bs=64k count=32 conv=fsync 2>/dev/null && sha256sum /mnt/x > /tmp/sum && sync /mnt")
    want = run(env, iid, "cat /tmp/sum").stdout.split()[0]
    gid = env.run("snapshot-group", "create", iid).stdout.strip()
    g = env.j("snapshot-group", "show", gid)
    members = {m["SourceDiskId"]: m["SnapshotId"] for m in g["Snapshots"]["Snapshot"]}
    data = sorted((d for d in env.j("disk", "list", "--instance", iid)["Disks"]["Disk"] if d["Type"] == "data"),
                  key=lambda d: d["Device"])
    other = env.run("instance", "create", "--vm", "--system-size", "1", "--system-pl", "PL0").stdout.strip()
    for d in data:
        copy = env.j("disk", "create", "--snapshot", members[d["DiskId"]], "--performance-level", "PL0")["DiskId"]
        env.run("disk", "attach", copy, "--instance", other)
    env.j("instance", "start", other)
    try:
        out = run(env, other, "mount /dev/vdc /mnt && sha256sum /mnt/x && e2fsck -fn /dev/vdb >/dev/null && echo fsck-ok").stdout
    finally:
        env.j("instance", "crash", other)
    assert want in out and "fsck-ok" in out


def test_a_daemon_killed_under_a_running_machine(vm):
    """SIGKILL of the daemon: its machine dies with it (or is killed at the
    next start, by its pid file); the instance comes back Stopped and
    starts again."""
    env, iid = vm
    if instance(env, iid)["Status"] != "Running":
        env.j("instance", "start", iid)
    qemu = instance(env, iid)["VirtualMachine"]["Pid"]
    pid = env.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_exit(pid, 10)
    env.start("--http", "127.0.0.1:0")
    wait_exit(qemu, 10)
    inst = instance(env, iid)
    assert inst["Status"] == "Stopped" and "power cut" in inst["StoppedReason"]
    assert env.j("instance", "start", iid)["Status"] == "Running"
    env.j("instance", "stop", iid)


def test_the_official_sdk_boots_runs_and_power_cuts_a_machine(vm):
    """The cloud's own flow through its SDK over HTTP: CreateInstance with an
    InstanceType, StartInstance, poll Starting -> Running, RunCommand and
    DescribeInvocationResults (Base64 both ways), StopInstance with
    ForceStop, poll Stopping -> Stopped, DeleteInstance."""
    ecs = pytest.importorskip("alibabacloud_ecs20140526.client")
    from alibabacloud_ecs20140526 import models as m
    from alibabacloud_tea_openapi import models as om

    env, _ = vm
    key = env.j("accesskey", "create")
    host, port = env.j("daemon", "status")["Http"].rsplit(":", 1)
    c = ecs.Client(om.Config(access_key_id=key["AccessKeyId"], access_key_secret=key["AccessKeySecret"],
                             endpoint="%s:%s" % (host, port), protocol="http", region_id="cn-hangzhou"))
    r = c.create_instance(m.CreateInstanceRequest(
        region_id="cn-hangzhou", instance_type="ecs.c7.large", instance_name="sdkvm",
        system_disk=m.CreateInstanceRequestSystemDisk(size=1, category="cloud_essd", performance_level="PL0")))
    iid = r.body.instance_id

    def status():
        got = c.describe_instances(m.DescribeInstancesRequest(region_id="cn-hangzhou", instance_ids=json.dumps([iid])))
        inst = got.body.instances.instance[0]
        assert (inst.instance_type, inst.cpu, inst.memory) == ("ecs.c7.large", 2, 4096)
        return inst.status

    def wait(want, timeout=300):
        seen, deadline = set(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = status()
            seen.add(st)
            if st == want:
                return seen
            time.sleep(0.3)
        raise AssertionError("still %s, not %s" % (st, want))

    c.start_instance(m.StartInstanceRequest(instance_id=iid))
    assert "Starting" in wait("Running")
    import base64

    inv = c.run_command(m.RunCommandRequest(region_id="cn-hangzhou", type="RunShellScript", instance_id=[iid],
                                            command_content=base64.b64encode(b"echo $((6*7)); nproc").decode(),
                                            content_encoding="Base64")).body
    deadline = time.monotonic() + 120
    while True:
        res = c.describe_invocation_results(m.DescribeInvocationResultsRequest(region_id="cn-hangzhou",
                                                                              invoke_id=inv.invoke_id)).body
        one = res.invocation.invocation_results.invocation_result[0]
        if one.invocation_status != "Running" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert (one.invocation_status, one.exit_code, one.instance_id) == ("Success", 0, iid)
    assert base64.b64decode(one.output).decode().split() == ["42", "2"]
    c.stop_instance(m.StopInstanceRequest(instance_id=iid, force_stop=True))
    wait("Stopped")
    c.delete_instance(m.DeleteInstanceRequest(instance_id=iid))



def test_a_debian_system_image_boots_and_a_snapshot_of_it_makes_another(vm):
    """The cloud's image flow on a real system: a Debian root (debootstrap)
    imported as an image; an instance from it boots that system; a file
    written there survives a stop; CreateImage from a snapshot of its system
    disk gives an image whose instances boot with the file."""
    from vdisk.consistency.guest import MariaDBOnLvmInGuest

    env, _ = vm
    try:
        root = assets.rootfs(list(MariaDBOnLvmInGuest.image_packages))  # shared with the consistency suite's cache
    except assets.AssetError as exc:
        pytest.skip("no Debian system can be built here: %s" % exc)
    image = env.j("image", "import", root, "--name", "debian-test")["ImageId"]
    a = env.run("instance", "create", "--vm", "--image", image).stdout.strip()
    env.j("instance", "start", a)
    out = run(env, a, "cat /etc/debian_version; command -v mariadbd; echo marker > /root/marker; sync").stdout.split()
    assert out[0].startswith("12.") and out[1] == "/usr/sbin/mariadbd"
    env.j("instance", "stop", a)
    system = next(d for d in env.j("disk", "list", "--instance", a)["Disks"]["Disk"] if d["Type"] == "system")
    snap = env.run("snapshot", "create", system["DiskId"]).stdout.strip()
    image2 = env.run("image", "create", "--snapshot", snap, "--name", "debian-test-2").stdout.strip()
    b = env.run("instance", "create", "--vm", "--image", image2).stdout.strip()
    env.j("instance", "start", b)
    assert run(env, b, "cat /root/marker; cat /proc/cmdline").stdout.split()[0] == "marker"
    env.j("instance", "crash", b)
