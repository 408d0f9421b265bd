"""The control plane: the emulated cloud's resources and rules.

Instances, disks and snapshots with Alibaba ECS names, states and error codes.
It sits above the storage engine (vdisk.engine) and drives whatever exposes
disks as files through the small `Host` interface; it knows nothing of FUSE.
"""
