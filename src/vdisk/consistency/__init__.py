"""Crash-consistency trials: workloads on vdisk disks, instance snapshots
taken under load, restores checked as after a power cut.  See
docs/consistency.md and scripts/consistency."""
