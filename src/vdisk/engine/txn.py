"""The staging area of one structural change, applied in one LMDB
transaction by Pool.commit(change)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from .errors import NotFound
from .lineage import Lineage

if TYPE_CHECKING:
    from .pool import Pool


class Tx:
    """Staging area of one structural change, applied in one LMDB txn.

    Lineage objects are copied on first touch so that an aborted transaction
    leaves the pool's cache untouched.
    """

    def __init__(self, pool: "Pool", txn):
        self.pool = pool
        self.txn = txn
        self.lins: dict[int, Lineage] = {}
        self.dropped_lins: set[int] = set()
        self.frees: list[int] = []
        self.change_frees_from = 0  # tx.frees[change_frees_from:] came from the change
        self.vols: dict[int, dict | None] = {}
        self.snaps: dict[int, dict | None] = {}
        self.counters: dict[str, int] = {}
        self.records: dict[str, dict | None] = {}  # staged by the change: same transaction

    def lin(self, lid: int) -> Lineage:
        if lid not in self.lins:
            self.lins[lid] = copy.deepcopy(self.pool._lineage(lid))
        return self.lins[lid]

    def new_id(self, kind: str) -> int:
        if kind not in self.counters:
            self.counters[kind] = self.pool._counters.get(kind, 1)
        n = self.counters[kind]
        self.counters[kind] = n + 1
        return n

    def vol(self, vid: int) -> dict:
        if vid not in self.vols:
            v = self.pool._volume(vid)
            self.vols[vid] = None if v is None else dict(v)
        v = self.vols[vid]
        if v is None:
            raise NotFound("volume %d does not exist" % vid)
        return v

    def snap(self, sid: int) -> dict:
        if sid not in self.snaps:
            s = self.pool._snapshot(sid)
            self.snaps[sid] = None if s is None else dict(s)
        s = self.snaps[sid]
        if s is None:
            raise NotFound("snapshot %d does not exist" % sid)
        return s
