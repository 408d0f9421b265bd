"""Disk categories, their size limits and the performance the cloud quotes,
which the daemon enforces (docs/performance.md).

The ESSD PL1 formulas are confirmed in the vendor's documentation;
PL0/PL2/PL3 are as commonly quoted (shared/reference/cloud-snapshot-facts.md);
the older categories' as the vendor's "Block storage performance" page
gives them (not confirmed here: docs/performance.md says so).
"""
from __future__ import annotations

from .errors import CloudError

CATEGORIES = ("cloud_essd", "cloud_ssd", "cloud_efficiency", "cloud")
LEVELS = ("PL0", "PL1", "PL2", "PL3")

# (min GiB, max GiB)
SIZE_LIMITS = {
    ("cloud_essd", "PL0"): (1, 65536),  # ESSDs: up to 65,536 GiB (the cloud's CreateDisk reference)
    ("cloud_essd", "PL1"): (20, 65536),
    ("cloud_essd", "PL2"): (461, 65536),
    ("cloud_essd", "PL3"): (1261, 65536),
    ("cloud_ssd", None): (20, 32768),
    ("cloud_efficiency", None): (20, 32768),
    ("cloud", None): (5, 2000),
}

# IOPS = min(base + per_gib * size, cap); throughput MB/s = min(tbase + tper * size, tcap)
PERF = {
    "PL0": (1800, 12, 10000, 100, 0.25, 180),
    "PL1": (1800, 50, 50000, 120, 0.5, 350),
    "PL2": (1800, 50, 100000, 120, 0.5, 750),
    "PL3": (1800, 50, 1000000, 120, 0.5, 4000),
    "cloud_ssd": (1800, 30, 25000, 120, 0.5, 300),
    "cloud_efficiency": (1800, 8, 5000, 100, 0.15, 140),
    "cloud": (300, 0, 300, 30, 0, 30),  # "several hundred IOPS, 30-40 MB/s": the low end
}
# The cloud counts an ESSD request of more than this many bytes as several
# operations for its IOPS limit (the facts: "largest I/O 16 KiB for the IOPS
# count"); the older categories count each request once.
ESSD_IO_UNIT = 16 * 1024
MB = 1000 * 1000  # the cloud's MB/s are decimal


def check_disk_spec(category: str, level: str | None, size_gib: int) -> str | None:
    """Validate a category/level/size triple; returns the effective level."""
    if category not in CATEGORIES:
        raise CloudError(
            "InvalidDiskCategory.ValueNotSupported",
            "Disk category %r is not supported; use one of %s." % (category, ", ".join(CATEGORIES)),
        )
    if category == "cloud_essd":
        level = level or "PL1"
        if level not in LEVELS:
            raise CloudError(
                "InvalidPerformanceLevel.ValueNotSupported",
                "Performance level %r is not supported for cloud_essd; use one of %s." % (level, ", ".join(LEVELS)),
            )
    elif level is not None:
        raise CloudError(
            "InvalidPerformanceLevel.ValueNotSupported",
            "PerformanceLevel applies only to cloud_essd disks, not to %s." % category,
        )
    lo, hi = SIZE_LIMITS[(category, level)]
    if not lo <= size_gib <= hi:
        raise CloudError(
            "InvalidDiskSize.ValueNotSupported",
            "A %s%s disk must be %d to %d GiB, not %d GiB."
            % (category, " " + level if level else "", lo, hi, size_gib),
        )
    return level


def min_size(category: str, level: str | None) -> int:
    """The smallest size (GiB) of a category/level; 1 if unknown (checked later)."""
    if category == "cloud_essd":
        level = level or "PL1"
    return SIZE_LIMITS.get((category, level if category == "cloud_essd" else None), (1, 0))[0]


def performance(category: str, level: str | None, size_gib: int) -> dict:
    """IOPS and Throughput (MB/s) as DescribeDisks gives them."""
    b, per, cap, tb, tper, tcap = PERF[level if category == "cloud_essd" else category]
    return {"IOPS": int(min(b + per * size_gib, cap)), "Throughput": int(min(tb + tper * size_gib, tcap))}


def io_limits(category: str, level: str | None, size_gib: int) -> tuple[int, int, int]:
    """(operations a second, bytes a second, bytes that count as one
    operation: 0 for any request) that a disk of this kind is served at."""
    perf = performance(category, level, size_gib)
    return perf["IOPS"], perf["Throughput"] * MB, ESSD_IO_UNIT if category == "cloud_essd" else 0
