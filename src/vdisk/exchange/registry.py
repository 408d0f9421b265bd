"""The repositories a data directory knows: DATA_DIR/repositories.json
(mode 0600), name -> {"CephConf", "Pool", "Region"}.  Written whole and
renamed into place; read by the CLI (`vdisk repository`) and by the
control plane (CopySnapshot to another region: the repository that stands
for it)."""
from __future__ import annotations

import json
import os

from ..config import open_private

FILE = "repositories.json"


def load(data_dir: str) -> dict[str, dict]:
    try:
        with open(os.path.join(data_dir, FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save(data_dir: str, reg: dict) -> None:
    path = os.path.join(data_dir, FILE)
    fd = open_private(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        json.dump(reg, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def for_region(data_dir: str, region: str) -> tuple[str, dict] | None:
    """The repository registered as standing for region (the first by
    name when several do), or None."""
    for name, entry in sorted(load(data_dir).items()):
        if entry.get("Region") == region:
            return name, entry
    return None
