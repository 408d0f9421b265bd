"""A lineage record: one chain of generations of a volume's contents (see
pool.py's model and docs/format.md)."""
from __future__ import annotations


class Lineage:
    """A lineage record (see module docstring).  Stored as JSON in DB_LINEAGE."""

    __slots__ = ("lid", "gen", "parent", "head_dead", "points", "pins", "zombies")

    def __init__(self, lid, gen=1, parent=None, head_dead=False, points=(), pins=None, zombies=()):
        self.lid = lid
        self.gen = gen
        self.parent = tuple(parent) if parent else None
        self.head_dead = head_dead
        self.points = list(points)  # sorted snapshot generations that exist
        self.pins = dict(pins or {})  # gen -> number of child lineages
        self.zombies = list(zombies)  # points the user deleted, kept for pins

    def to_json(self):
        return {
            "gen": self.gen,
            "parent": list(self.parent) if self.parent else None,
            "head_dead": self.head_dead,
            "points": self.points,
            "pins": {str(k): v for k, v in self.pins.items()},
            "zombies": self.zombies,
        }

    @classmethod
    def from_json(cls, lid, d):
        return cls(
            lid,
            d["gen"],
            d["parent"],
            d["head_dead"],
            d["points"],
            {int(k): v for k, v in d["pins"].items()},
            d["zombies"],
        )

    def last_point(self) -> int:
        return self.points[-1] if self.points else 0
