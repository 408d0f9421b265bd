"""The staging area of one structural change, applied in one LMDB
transaction by Pool.commit(change)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from .errors import NotFound
from .lineage import Lineage

if TYPE_CHECKING:
    from .pool import Pool


def keeps_volumes(change):
    """Mark a change(tx) that changes no volume's existence, size or
    contents (a snapshot's creation or deletion, say): fsyncs go on
    through the intent log while its commit runs, as during a commit of
    writes alone (commit.begin, docs/format.md "Generations and commits").
    Returns change."""
    change.keeps_volumes = True
    return change


def volumes_kept(change) -> bool:
    """Whether a commit of change (None: writes alone) leaves every
    volume as its writes make it."""
    return change is None or getattr(change, "keeps_volumes", False)


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
        return _staged(self.vols, vid, self.pool._volume, "volume")

    def snap(self, sid: int) -> dict:
        return _staged(self.snaps, sid, self.pool._snapshot, "snapshot")


def _staged(staged: dict, key: int, load, what: str) -> dict:
    """The transaction's copy of a record (loaded on first use); NotFound
    when it does not exist or was deleted in the transaction."""
    if key not in staged:
        r = load(key)
        staged[key] = None if r is None else dict(r)
    r = staged[key]
    if r is None:
        raise NotFound("%s %d does not exist" % (what, key))
    return r
