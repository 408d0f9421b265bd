"""The vdisk daemon (one per data directory) and its control-socket client."""
