"""Scenarios that run inside a virtual machine (vdisk.vm), for layouts the
host cannot make: LVM needs device-mapper, which the host kernel may lack.

A trial (Runner.vm_trial): boot the instance, make the layout and run the
workload in the guest through the agent (RunCommand), snapshot under load
(an instance snapshot, or the staggered control), cut the guest's power
(ForceStop), make new disks from the snapshots, attach them to a second
virtual machine and check them there, as after a power cut.

The workload (vdisk-load, guest/load.c) acknowledges on its output; the
output the daemon had received before the snapshot began is what was
durable before it: those files must be whole, and the rounds of the large
file at least as new as the last acknowledged round.
"""
from __future__ import annotations

import shutil

from .checks import judge_files

PAGES = 2048  # the large file: 8 MiB, rewritten in rounds across the stripes


class LvmInGuest:
    """A volume group over three disks inside a guest: a striped LV (3
    stripes of 64 KiB) with ext4 holding fsynced files and a large file
    rewritten in rounds, and a linear LV spanning two disks with XFS
    holding fsynced files."""

    name = "lvm-in-guest"
    ndisks = 3
    vm = True

    def __init__(self, workdir: str):
        self.workdir = workdir

    def skip_reason(self) -> str | None:
        missing = [t for t in ("qemu-system-x86_64", "busybox", "lvm", "mkfs.xfs", "cpio", "gcc", "apt-get")
                   if shutil.which(t) is None]
        if missing:
            return "needs %s (scripts/setup installs qemu-system-x86, busybox-static, lvm2, cpio)" % ", ".join(missing)
        from ..vm import assets

        try:
            assets.ensure()
        except (assets.AssetError, OSError) as exc:
            return "the guest cannot be built here: %s" % exc
        return None

    def setup_script(self) -> str:
        return """set -e
for d in vdb vdc vdd; do dd if=/dev/zero of=/dev/$d bs=1M count=8 oflag=direct 2>/dev/null; done
pvcreate -qq -ff -y /dev/vdb /dev/vdc /dev/vdd
vgcreate -qq vg /dev/vdb /dev/vdc /dev/vdd
lvcreate -qq -y -n lin -L 512m vg /dev/vdb:0-63 /dev/vdc:0-63
lvcreate -qq -y -n str -i 3 -I 64k -L 600m vg
vgchange -qq -ay vg
mkfs.ext4 -q -F /dev/vg/str
mkfs.xfs -q -f /dev/vg/lin
mkdir -p /mnt/str /mnt/lin
mount /dev/vg/str /mnt/str
mount /dev/vg/lin /mnt/lin
mkdir /mnt/str/files /mnt/lin/files
sync
lvs --noheadings -o lv_name,segtype,stripes,devices vg
"""

    def load_script(self, seed: int) -> str:
        return """vdisk-load files /mnt/str/files {s} s &
vdisk-load files /mnt/lin/files {l} l &
vdisk-load rounds /mnt/str/big {p} {r} &
trap 'kill %1 %2 %3' TERM
wait
""".format(s=seed, l=seed + 1, r=seed + 2, p=PAGES)

    def check_script(self, seed: int, counts: dict) -> str:
        return """vgscan --mknodes >/dev/null 2>&1; vgchange -ay vg >/dev/null || {{ echo "PROBLEM vgchange -ay failed"; exit 0; }}
mkdir -p /mnt/str /mnt/lin
if mount /dev/vg/str /mnt/str; then
  vdisk-load check-files /mnt/str/files {s} {ns} | sed 's/^/s /'
  vdisk-load check-rounds /mnt/str/big {p} {r}
  umount /mnt/str
else echo "PROBLEM the striped LV's ext4 does not mount"; fi
if mount /dev/vg/lin /mnt/lin; then
  vdisk-load check-files /mnt/lin/files {l} {nl} | sed 's/^/l /'
  umount /mnt/lin
else echo "PROBLEM the linear LV's XFS does not mount"; fi
e2fsck -fn /dev/vg/str >/tmp/fsck 2>&1 || echo "PROBLEM e2fsck -fn: exit $? $(tail -1 /tmp/fsck)"
xfs_repair -n /dev/vg/lin >/tmp/xr 2>&1 || echo "PROBLEM xfs_repair -n: exit $? $(tail -1 /tmp/xr)"
echo CHECKED
""".format(s=seed, l=seed + 1, r=seed + 2, p=PAGES, ns=counts.get("s", 0), nl=counts.get("l", 0))

    @staticmethod
    def acked(output: str) -> dict:
        """From the workload's output: {"s": [names], "l": [names], "round": last round}."""
        out = {"s": [], "l": [], "round": 0}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in ("s", "l"):
                out[parts[0]].append(parts[1])
            elif len(parts) == 2 and parts[0] == "round" and parts[1].isdigit():
                out["round"] = max(out["round"], int(parts[1]))
        return out

    def durable_count(self, before: dict) -> int:
        return len(before["s"]) + len(before["l"])

    def judge(self, check_output: str, before: dict, after: dict) -> list[str]:
        """Problems in the check's output: files acknowledged before the
        snapshot must be whole and the whole files a prefix of the log (per
        directory); every page of the large file holds a whole round, no
        older than the last round acknowledged before the snapshot, and at
        most one round apart (a round starts only after the previous one's
        fdatasync); the filesystems mount and check clean."""
        problems, states = [], {"s": [], "l": []}
        rounds = None
        if "CHECKED" not in check_output:
            problems.append("the check did not finish: %s" % check_output.strip()[-300:])
        for line in check_output.splitlines():
            parts = line.split()
            if line.startswith("PROBLEM "):
                problems.append(line[len("PROBLEM "):])
            elif len(parts) == 3 and parts[0] in states:
                states[parts[0]].append((parts[1], parts[2]))
            elif len(parts) == 5 and parts[0] == "rounds" and parts[3] == "bad":
                rounds = (int(parts[1]), int(parts[2]), int(parts[4]))
        for tag, where in (("s", "ext4 on the striped LV"), ("l", "XFS on the linear LV")):
            acked_before = set(before[tag])
            state = [(name, {"whole": "whole", "missing": "missing", "partial": "partial",
                             "wrong": "full size, wrong content", "unreadable": "unreadable (EIO)"}[s],
                      0 if name in acked_before else 1) for name, s in states[tag]]
            problems += ["%s: %s" % (where, p) for p in judge_files(state, before=1)]
        if rounds is not None:
            lo, hi, bad = rounds
            if bad:
                problems.append("the large file has %d pages that hold no round's content" % bad)
            if lo < before["round"]:
                problems.append("the large file has pages of round %d, older than round %d acknowledged before the "
                                "snapshot" % (lo, before["round"]))
            if hi - lo > 1:
                problems.append("the large file mixes rounds %d to %d: not one point in time" % (lo, hi))
        elif "CHECKED" in check_output and not any("striped" in p for p in problems):
            problems.append("the large file was not checked")
        return problems
