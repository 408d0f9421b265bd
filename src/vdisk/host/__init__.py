"""Host-side helpers: loop devices and mounts (commands of the host OS)."""
