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
# Both guest scenarios: a volume group "vg" over the three data disks (their
# first 8 MiB zeroed, so nothing of the previous trial's layout is found).
VG_OVER_THREE_DISKS = """set -e
for d in vdb vdc vdd; do dd if=/dev/zero of=/dev/$d bs=1M count=8 oflag=direct 2>/dev/null; done
pvcreate -qq -ff -y /dev/vdb /dev/vdc /dev/vdd
vgcreate -qq vg /dev/vdb /dev/vdc /dev/vdd
"""


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
        return VG_OVER_THREE_DISKS + """lvcreate -qq -y -n lin -L 512m vg /dev/vdb:0-63 /dev/vdc:0-63
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

    def check_script(self, seed: int, after: dict) -> str:
        """The check, given what the workload acknowledged in all (after)."""
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
""".format(s=seed, l=seed + 1, r=seed + 2, p=PAGES, ns=len(after["s"]), nl=len(after["l"]))

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

    def judge(self, check_output: str, before: dict) -> list[str]:
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


MARIADB_OPTS = ("--no-defaults --user=root --datadir=/srv/db/data --innodb-log-group-home-dir=/srv/logs/redo "
                "--log-bin=/srv/logs/binlog/mysql-bin --server-id=1 --sync-binlog=1 --innodb-flush-log-at-trx-commit=1 "
                "--innodb-log-file-size=8M --innodb-buffer-pool-size=16M --innodb-max-dirty-pages-pct=0 "
                "--skip-networking --socket=/run/mysqld/mysqld.sock --log-error=/tmp/mariadb.err")
ACCOUNTS, START_BALANCE = 100, 1000


class MariaDBOnLvmInGuest:
    """MariaDB inside a guest that boots a Debian system (vdisk image
    import of a debootstrap root with mariadb-server), its data directory on
    a striped LV over three disks and its InnoDB redo log and binary log on a
    linear LV spanning two of them (ext4 each); one client commits
    transfers and prints an acknowledgement after each COMMIT returned."""

    name = "mariadb-lvm-in-guest"
    ndisks = 3
    vm = True
    image_packages = ("mariadb-server", "mariadb-client", "lvm2")
    # the control's order that breaks InnoDB: the log disks (vdb, vdc) first,
    # the data-only disk last, so data pages are newer than their redo log
    # (the other way round is what crash recovery is for)
    control_order = [0, 1, 2]

    def __init__(self, workdir: str):
        self.workdir = workdir

    def skip_reason(self) -> str | None:
        why = LvmInGuest(self.workdir).skip_reason()
        if why:
            return why
        if shutil.which("debootstrap") is None:
            return "needs debootstrap (Debian package debootstrap; scripts/setup installs it) for the guest's Debian system"
        return None

    def setup_script(self) -> str:
        return VG_OVER_THREE_DISKS + """lvcreate -qq -y -n logs -L 512m vg /dev/vdb:0-63 /dev/vdc:0-63
lvcreate -qq -y -n db -i 3 -I 64k -L 600m vg
mkfs.ext4 -q -F /dev/vg/db
mkfs.ext4 -q -F /dev/vg/logs
mkdir -p /srv/db /srv/logs /run/mysqld
mount /dev/vg/db /srv/db
mount /dev/vg/logs /srv/logs
mkdir -p /srv/db/data /srv/logs/redo /srv/logs/binlog
mariadb-install-db {o} --auth-root-authentication-method=normal >/tmp/install.log 2>&1 || {{ tail -5 /tmp/install.log; exit 1; }}
setsid mariadbd {o} </dev/null >/dev/null 2>&1 &
for i in $(seq 600); do mariadb -S /run/mysqld/mysqld.sock -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done
mariadb -S /run/mysqld/mysqld.sock -e "CREATE DATABASE bank;
  CREATE TABLE bank.accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB;
  CREATE TABLE bank.transfers (seq INT PRIMARY KEY, a INT NOT NULL, b INT NOT NULL) ENGINE=InnoDB;
  INSERT INTO bank.accounts VALUES $(seq 0 {last} | sed 's/.*/(&, {bal})/' | paste -sd,);"
sync
""".format(o=MARIADB_OPTS, bal=START_BALANCE, last=ACCOUNTS - 1)

    def load_script(self, seed: int) -> str:
        return """i=0
while :; do
  i=$((i + 1)); a=$(( (i * {s1}) % {n} )); b=$(( (i * {s2} + 1) % {n} ))
  echo "START TRANSACTION; UPDATE accounts SET balance = balance - 1 WHERE id = $a;
        UPDATE accounts SET balance = balance + 1 WHERE id = $b; INSERT INTO transfers VALUES ($i, $a, $b);
        COMMIT; SELECT 'ack $i';"
done | mariadb -S /run/mysqld/mysqld.sock -N -B --unbuffered bank
""".format(s1=seed % 97 + 1, s2=seed % 89 + 3, n=ACCOUNTS)

    def check_script(self, seed: int, after: dict) -> str:
        """The check, given what the workload acknowledged in all (after)."""
        return """vgscan --mknodes >/dev/null 2>&1; vgchange -ay vg >/dev/null || {{ echo "PROBLEM vgchange -ay failed"; echo CHECKED; exit 0; }}
mkdir -p /srv/db /srv/logs /run/mysqld
mount /dev/vg/db /srv/db || echo "PROBLEM the data LV does not mount"
mount /dev/vg/logs /srv/logs || echo "PROBLEM the log LV does not mount"
setsid mariadbd {o} </dev/null >/dev/null 2>&1 &
server=$!
up=""
for i in $(seq 600); do  # crash recovery; give up as soon as the server is gone
  mariadb -S /run/mysqld/mysqld.sock -e 'SELECT 1' >/dev/null 2>&1 && up=1 && break
  kill -0 $server 2>/dev/null || break
  sleep 0.2
done
if [ -z "$up" ]; then
  echo "PROBLEM the server did not start on the restored disks: $(tail -3 /tmp/mariadb.err | tr '\\n' ' ')"
else
  mariadb -S /run/mysqld/mysqld.sock -N -B bank -e "CHECK TABLE accounts, transfers" | sed 's/^/CHECK /'
  mariadb -S /run/mysqld/mysqld.sock -N -B bank -e "SELECT 'SUM', COUNT(*), SUM(balance) FROM accounts;
      SELECT 'RANGE', COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0), COUNT(*) FROM transfers" ||
    echo "PROBLEM a query failed on the restored copy"
  mariadb-admin -S /run/mysqld/mysqld.sock shutdown >/dev/null 2>&1
fi
echo CHECKED
""".format(o=MARIADB_OPTS)

    @staticmethod
    def acked(output: str) -> dict:
        seqs = [int(l.split()[1]) for l in output.splitlines() if l.startswith("ack ") and l.split()[1].isdigit()]
        return {"max": max(seqs, default=0), "count": len(seqs)}

    def durable_count(self, before: dict) -> int:
        return before["count"]

    def judge(self, check_output: str, before: dict) -> list[str]:
        """The server recovers; CHECK TABLE is clean; the balances still sum
        to the total; the transfers are 1..k without a gap (one client,
        committing in order) and k reaches every transfer acknowledged
        before the snapshot."""
        problems = [l[len("PROBLEM "):] for l in check_output.splitlines() if l.startswith("PROBLEM ")]
        if "CHECKED" not in check_output:
            problems.append("the check did not finish: %s" % check_output.strip()[-300:])
        for line in check_output.splitlines():
            parts = line.split("\t")
            if line.startswith("CHECK ") and len(parts) >= 4 and (parts[2] in ("error", "warning")
                                                                 or (parts[2] == "status" and parts[3] != "OK")):
                problems.append("CHECK TABLE: %s" % line[6:])
            elif parts[0] == "SUM" and len(parts) == 3:
                if (int(parts[1]), int(parts[2])) != (ACCOUNTS, ACCOUNTS * START_BALANCE):
                    problems.append("the balances sum to %s over %s accounts, not %d" % (parts[2], parts[1], ACCOUNTS * START_BALANCE))
            elif parts[0] == "RANGE" and len(parts) == 4:
                lo, hi, n = map(int, parts[1:])
                if n and (lo != 1 or hi != n):
                    problems.append("the transfers are not 1..k: %d rows from %d to %d" % (n, lo, hi))
                if hi < before["max"]:
                    problems.append("transfers up to %d were acknowledged before the snapshot, the copy has up to %d"
                                    % (before["max"], hi))
        if not problems and not any(l.startswith("RANGE") for l in check_output.splitlines()):
            problems.append("the check printed no result")
        return problems
