"""The guest's kernel and initramfs, built from Debian's packages and cached.

- The kernel is Debian's cloud kernel (`linux-image-cloud-amd64`'s current
  version), fetched with `apt-get download` and unpacked with `dpkg -x`:
  never installed on the host.
- The initramfs holds busybox (busybox-static), LVM (lvm2), e2fsprogs and
  xfsprogs taken from the host with the libraries `ldd` names, the kernel
  modules the guest needs in dependency order (read from each module's
  `.modinfo`, since the package ships no modules.dep), vdisk's /init (the
  agent, guest/init) and vdisk-load (guest/load.c, built static here).

The cache lives in VDISK_GUEST_CACHE (default /var/cache/vdisk/guest), shared
by every data directory of the host; an initramfs is rebuilt when any input
changed (its name carries a digest of them).  Building takes a few seconds
and about 30 MB of download the first time.

Concurrency: one builder at a time per cache (an flock on its lock file);
the files appear by rename, so a reader never sees half of one.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

GUEST_DIR = os.path.join(os.path.dirname(__file__), "guest")
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# what the guest loads, by module name; their dependencies come along
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "dm_mod", "xfs", "virtio_rng")
# host programs copied in (with their libraries), and the names lvm answers to
LVM_COMMANDS = ("pvcreate", "pvremove", "pvs", "vgcreate", "vgchange", "vgremove", "vgs", "vgscan",
                "vgimportclone", "lvcreate", "lvremove", "lvs", "lvscan")
PROGRAMS = ("lvm", "mke2fs", "e2fsck", "mkfs.xfs", "xfs_repair", "xfs_db", "blkid", "wipefs")
LVM_CONF = """\
# vdisk guest: no udev in the initramfs
devices { obtain_device_list_from_udev = 0 }
activation { udev_sync = 0  udev_rules = 0  monitoring = 0 }
global { use_lvmpolld = 0 }
"""


class AssetError(Exception):
    """The guest cannot be built; the message says what to install or fix."""


@dataclass
class Guest:
    kernel: str  # vmlinuz
    initrd: str  # the initramfs (cpio)
    release: str  # the kernel's release, e.g. 6.1.0-57-cloud-amd64


def cache_dir() -> str:
    return os.environ.get("VDISK_GUEST_CACHE", "/var/cache/vdisk/guest")


def _run(*args, cwd=None) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise AssetError("%s failed (%d): %s" % (" ".join(args), r.returncode, (r.stderr or r.stdout).strip()[-500:]))
    return r.stdout


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise AssetError("the guest needs %s on the host (scripts/setup installs them: qemu-system-x86, busybox-static, "
                         "lvm2, e2fsprogs, xfsprogs, cpio, gcc)" % ", ".join(missing))


def ensure(progress=lambda s: None) -> Guest:
    """The guest's kernel and initramfs, built or fetched if missing."""
    root = cache_dir()
    os.makedirs(root, mode=0o755, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        kdir, release = _kernel(root, progress)
        initrd = _initramfs(root, kdir, release, progress)
    return Guest(os.path.join(kdir, "boot", "vmlinuz-" + release), initrd, release)


def _kernel(root: str, progress) -> tuple[str, str]:
    """Unpack Debian's cloud kernel under root/kernel-RELEASE (once)."""
    pinned = os.environ.get("VDISK_GUEST_KERNEL_PACKAGE")
    for name in sorted(os.listdir(root)):
        if name.startswith("kernel-") and os.path.isdir(os.path.join(root, name, "boot")) and \
                (pinned is None or name == "kernel-" + pinned.removeprefix("linux-image-")):
            return os.path.join(root, name), name[len("kernel-"):]
    _need("apt-get", "apt-cache", "dpkg")
    pkg = pinned or _versioned_kernel_package()
    release = pkg.removeprefix("linux-image-")
    progress("downloading the guest kernel (%s)" % pkg)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg, cwd=tmp)
        except AssetError:
            _run("apt-get", "update", "-qq")
            _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg, cwd=tmp)
        deb = next(f for f in os.listdir(tmp) if f.endswith(".deb"))
        unpacked = os.path.join(tmp, "k")
        _run("dpkg", "-x", os.path.join(tmp, deb), unpacked)
        if not os.path.exists(os.path.join(unpacked, "boot", "vmlinuz-" + release)):
            raise AssetError("%s holds no boot/vmlinuz-%s" % (deb, release))
        final = os.path.join(root, "kernel-" + release)
        os.rename(unpacked, final)
    return final, release


def _versioned_kernel_package() -> str:
    def depends() -> list[str]:
        out = subprocess.run(["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True).stdout
        return re.findall(r"Depends: (linux-image-\S+)", out)

    found = depends()
    if not found:
        _run("apt-get", "update", "-qq")
        found = depends()
    if not found:
        raise AssetError("apt knows no %s: is a Debian package source configured?" % KERNEL_PACKAGE)
    return found[0]


def module_order(moddir: str, wanted=MODULES) -> list[str]:
    """Paths (relative to moddir) of the wanted modules and what they
    depend on, dependencies first.  Reads `depends=` from each module's
    .modinfo section (the strings are NUL-separated key=value)."""
    by_name = {}
    for dirpath, _dirs, files in os.walk(moddir):
        for f in files:
            if f.endswith(".ko"):
                by_name[f[:-3].replace("-", "_")] = os.path.relpath(os.path.join(dirpath, f), moddir)
    order: list[str] = []

    def visit(name: str, trail: tuple) -> None:
        name = name.replace("-", "_")
        if name in order or name in trail:
            return
        if name not in by_name:
            return  # built into the kernel
        with open(os.path.join(moddir, by_name[name]), "rb") as f:
            m = re.search(rb"\x00depends=([^\x00]*)\x00", f.read())
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            visit(dep, trail + (name,))
        order.append(name)

    for w in wanted:
        if w.replace("-", "_") not in by_name:
            continue  # built in, or not in this kernel
        visit(w, ())
    return [by_name[n] for n in order]


def _libraries(binary: str) -> list[str]:
    r = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if r.returncode != 0:  # a static binary
        return []
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _inputs_digest(release: str, binaries: list[str]) -> str:
    h = hashlib.sha256(release.encode())
    for name in sorted(os.listdir(GUEST_DIR)):
        with open(os.path.join(GUEST_DIR, name), "rb") as f:
            h.update(name.encode() + f.read())
    for b in binaries:
        st = os.stat(b)
        h.update(("%s %d %d" % (b, st.st_size, st.st_mtime_ns)).encode())
    h.update(repr((MODULES, LVM_COMMANDS, LVM_CONF)).encode())
    return h.hexdigest()[:16]


def _initramfs(root: str, kdir: str, release: str, progress) -> str:
    _need("busybox", "cpio", "gcc", "ldd", *PROGRAMS)
    busybox = shutil.which("busybox")
    if _libraries(busybox):
        raise AssetError("%s is not static: install Debian's busybox-static" % busybox)
    binaries = [shutil.which(p) for p in PROGRAMS]
    digest = _inputs_digest(release, [busybox] + binaries)
    target = os.path.join(root, "initrd-%s-%s.cpio" % (release, digest))
    if os.path.exists(target):
        return target
    progress("building the guest's initramfs")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tree = os.path.join(tmp, "tree")
        for d in ("bin", "sbin", "etc/lvm", "lib/modules", "proc", "sys", "dev", "run", "tmp", "mnt", "root"):
            os.makedirs(os.path.join(tree, d))
        shutil.copy2(busybox, os.path.join(tree, "bin", "busybox"))
        shutil.copy2(os.path.join(GUEST_DIR, "init"), os.path.join(tree, "init"))
        os.chmod(os.path.join(tree, "init"), 0o755)
        _run("gcc", "-O2", "-static", "-o", os.path.join(tree, "bin", "vdisk-load"), os.path.join(GUEST_DIR, "load.c"))
        libs = set()
        for b in binaries:
            shutil.copy2(b, os.path.join(tree, "sbin", os.path.basename(b)))
            libs.update(_libraries(b))
        for lib in libs:
            dest = os.path.join(tree, lib.lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(os.path.realpath(lib), dest)
        # the dynamic loader's path as the binaries name it (/lib64 -> usr/lib64)
        if os.path.isdir(os.path.join(tree, "usr", "lib64")) and not os.path.exists(os.path.join(tree, "lib64")):
            os.symlink("usr/lib64", os.path.join(tree, "lib64"))
        for c in LVM_COMMANDS:
            os.symlink("lvm", os.path.join(tree, "sbin", c))
        os.symlink("mke2fs", os.path.join(tree, "sbin", "mkfs.ext4"))
        with open(os.path.join(tree, "etc", "lvm", "lvm.conf"), "w") as f:
            f.write(LVM_CONF)
        moddir = os.path.join(kdir, "lib", "modules", release)
        mods = module_order(moddir)
        for m in mods:
            shutil.copy2(os.path.join(moddir, m), os.path.join(tree, "lib", "modules", os.path.basename(m)))
        with open(os.path.join(tree, "etc", "modules"), "w") as f:
            f.write("\n".join(os.path.basename(m) for m in mods) + "\n")
        files = subprocess.run(["find", "."], cwd=tree, capture_output=True, text=True, check=True).stdout
        out = os.path.join(tmp, "initrd.cpio")
        with open(out, "wb") as f:
            r = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=tree, input=files.encode(),
                               stdout=f, stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise AssetError("cpio failed: %s" % r.stderr.decode(errors="replace").strip())
        os.rename(out, target)
    for old in os.listdir(root):  # earlier builds
        if old.startswith("initrd-") and os.path.join(root, old) != target:
            os.unlink(os.path.join(root, old))
    return target


DEFAULT_MIRROR = "http://deb.debian.org/debian"


def rootfs(include: list[str], suite: str = "bookworm", mirror: str = DEFAULT_MIRROR, progress=lambda s: None) -> str:
    """A minimal Debian root filesystem (debootstrap --variant=minbase with
    the packages in include), cached under the guest cache by what it holds;
    its directory.  vdisk image import writes it onto a system disk, which
    the guest's /init switches to (a filesystem labelled vdisk-root)."""
    _need("debootstrap")
    pkgs = sorted(set(include))
    for p in pkgs:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]*", p):
            raise AssetError("%r is not a Debian package name" % p)
    # the suite names a cache directory: a plain name only (no "/", no "..")
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", suite):
        raise AssetError("%r is not a Debian suite name (such as bookworm or stable)" % suite)
    if not re.fullmatch(r"(https?|file)://[\x21-\x7e]+", mirror):
        raise AssetError("%r is not a mirror URL (http://, https:// or file://, printable ASCII)" % mirror)
    root = cache_dir()
    os.makedirs(root, mode=0o755, exist_ok=True)
    digest = hashlib.sha256(repr((suite, mirror, pkgs)).encode()).hexdigest()[:12]
    target = os.path.join(root, "rootfs-%s-%s" % (suite, digest))
    with open(os.path.join(root, ".lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if os.path.isdir(target):
            return target
        progress("debootstrap %s (%s) from %s" % (suite, ", ".join(pkgs) or "minbase", mirror))
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            tree = os.path.join(tmp, "root")
            args = ["debootstrap", "--variant=minbase"] + (["--include=" + ",".join(pkgs)] if pkgs else [])
            _run(*args, suite, tree, mirror)
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                d = os.path.join(tree, junk)
                for f in os.listdir(d):
                    if f.endswith((".deb", "_Packages", "_InRelease", "_Release")):
                        os.unlink(os.path.join(d, f))
            with open(os.path.join(tree, "etc", "fstab"), "w") as f:
                f.write("LABEL=vdisk-root / ext4 defaults 0 1\n")
            os.rename(tree, target)
    return target

