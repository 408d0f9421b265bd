"""Instances as virtual machines: the guest (assets), one QEMU process with
its agent (machine), and the daemon's set of them (supervisor).  Knows
nothing of the cloud's rules: the control plane decides when a machine
starts and stops and what its disks are."""
