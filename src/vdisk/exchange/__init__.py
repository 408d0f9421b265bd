"""Snapshots leaving the host: streams other systems read and write
(rbddiff: Ceph RBD's diff format).  Knows nothing of FUSE or the cloud's
rules: the control plane (vdisk.control.streams) feeds it extents and data
and applies what it reads."""
