"""Disk categories, their size limits and the performance the cloud quotes,
which the daemon enforces (docs/performance.md).

The ESSD PL1 formulas are confirmed in the vendor's documentation;
PL0/PL2/PL3 are as commonly quoted (shared/reference/cloud-snapshot-facts.md);
the older categories' as the vendor's "Block storage performance" page
gives them (not confirmed here: docs/performance.md says so).
"""
from __future__ import annotations

from .errors import CloudError

CATEGORIES = ("cloud_essd", "cloud_auto", "cloud_essd_entry", "cloud_ssd", "cloud_efficiency", "cloud")
ESSDS = ("cloud_essd", "cloud_auto", "cloud_essd_entry")
LEVELS = ("PL0", "PL1", "PL2", "PL3")

# (min GiB, max GiB)
SIZE_LIMITS = {
    ("cloud_essd", "PL0"): (1, 65536),  # ESSDs: up to 65,536 GiB (the cloud's CreateDisk reference)
    ("cloud_essd", "PL1"): (20, 65536),
    ("cloud_essd", "PL2"): (461, 65536),
    ("cloud_essd", "PL3"): (1261, 65536),
    ("cloud_auto", None): (1, 65536),  # ESSD AutoPL: the vendor's page
    ("cloud_essd_entry", None): (10, 32768),  # ESSD Entry: as commonly quoted
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
    "cloud_essd_entry": (1800, 8, 6000, 100, 0.15, 150),
    "cloud_ssd": (1800, 30, 25000, 120, 0.5, 300),
    "cloud_efficiency": (1800, 8, 5000, 100, 0.15, 140),
    "cloud": (300, 0, 300, 30, 0, 30),  # "several hundred IOPS, 30-40 MB/s": the low end
}
# ESSD AutoPL (cloud_auto), from the vendor's page: a baseline of
# max(min(1800 + 50 x GiB, 50000), 3000) IOPS and max(min(120 + 0.5 x GiB,
# 350), 125) MB/s; plus ProvisionedIops (from 4 GiB: up to min(1000 x GiB -
# baseline, 50000)), each adding 16 KB/s; with BurstingEnabled (from 4 GiB)
# up to min(1000000, 1000 x GiB) IOPS and max(min(16 KB x those / 1024,
# 4000) MB/s, baseline + provisioned).
AUTO_MAX_PROVISIONED = 50000
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


def check_auto(category: str, size_gib: int, provisioned: int | None, burst: bool | None) -> None:
    """ProvisionedIops and BurstingEnabled: an AutoPL disk's only, within
    what its size allows."""
    if category != "cloud_auto":
        for name, v in (("ProvisionedIops", provisioned), ("BurstingEnabled", burst)):
            if v:
                raise CloudError("InvalidParameter", "%s applies only to cloud_auto (ESSD AutoPL) disks, not to %s."
                                 % (name, category))
        return
    if provisioned and not 0 <= provisioned <= max_provisioned(size_gib):
        raise CloudError("InvalidProvisionedIops.ValueNotSupported",
                         "ProvisionedIops of a %d GiB ESSD AutoPL disk must be 0 to %d (min(1000 x GiB - baseline, "
                         "50000); none up to 3 GiB), not %d." % (size_gib, max_provisioned(size_gib), provisioned))
    if burst and size_gib <= 3:
        raise CloudError("InvalidParameter", "Performance burst needs an ESSD AutoPL disk of 4 GiB or more.")


def min_size(category: str, level: str | None) -> int:
    """The smallest size (GiB) of a category/level; 1 if unknown (checked later)."""
    if category == "cloud_essd":
        level = level or "PL1"
    return SIZE_LIMITS.get((category, level if category == "cloud_essd" else None), (1, 0))[0]


def auto_baseline(size_gib: int) -> tuple[int, float]:
    """An ESSD AutoPL disk's baseline (IOPS, MB/s)."""
    return max(min(1800 + 50 * size_gib, 50000), 3000), max(min(120 + 0.5 * size_gib, 350), 125)


def max_provisioned(size_gib: int) -> int:
    """The most ProvisionedIops an AutoPL disk of this size takes (0: none)."""
    return 0 if size_gib <= 3 else max(0, min(1000 * size_gib - auto_baseline(size_gib)[0], AUTO_MAX_PROVISIONED))


def performance(category: str, level: str | None, size_gib: int, provisioned: int = 0) -> dict:
    """IOPS and Throughput (MB/s) as DescribeDisks gives them (an AutoPL
    disk's: baseline and provisioned; with its burst in io_limits)."""
    if category == "cloud_auto":
        iops, mbs = auto_baseline(size_gib)
        return {"IOPS": int(iops + provisioned), "Throughput": int(mbs + 16 * provisioned / 1024)}
    b, per, cap, tb, tper, tcap = PERF[level if category == "cloud_essd" else category]
    return {"IOPS": int(min(b + per * size_gib, cap)), "Throughput": int(min(tb + tper * size_gib, tcap))}


def io_limits(category: str, level: str | None, size_gib: int, provisioned: int = 0,
              burst: bool = False) -> tuple[int, int, int]:
    """(operations a second, bytes a second, bytes that count as one
    operation: 0 for any request) that a disk of this kind is served at:
    what it may reach, its burst included."""
    perf = performance(category, level, size_gib, provisioned)
    iops, mbs = perf["IOPS"], perf["Throughput"]
    if category == "cloud_auto" and burst and size_gib >= 4:
        iops = min(1_000_000, 1000 * size_gib)
        mbs = max(min(16 * iops / 1024, 4000), mbs)
    return iops, int(mbs * MB), ESSD_IO_UNIT if category in ESSDS else 0
