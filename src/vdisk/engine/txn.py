"""The staging area of one structural change, applied in one LMDB
transaction by Pool.commit(change)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from .errors import NotFound
from .lineage import Lineage

if TYPE_CHECKING:
    from .pool import Pool


def changes_volumes(change, vids):
    """Mark a change(tx) that changes the existence, size or contents of
    the volumes vids and of no other that exists (their deletion, growth
    or rollback; a new volume's creation changes none that exists yet):
    the fsyncs of every other volume go on through the intent log while
    its commit runs, as during a commit of writes alone; those of vids
    wait until it is durable (commit.begin, logflush.flush,
    docs/format.md "Generations and commits").  Returns change."""
    change.held_volumes = frozenset(vids)
    return change


def keeps_volumes(change):
    """Mark a change(tx) that changes no volume's existence, size or
    contents (a snapshot's creation or deletion, say): changes_volumes
    of none.  Returns change."""
    return changes_volumes(change, ())


def touches_no_block(change):
    """Mark a change(tx) that changes no block map entry and frees
    nothing (a volume's creation, its growth): its commit need not make
    the writes so far durable with it (commit.commit_meta).  Returns
    change."""
    change.touches_no_block = True
    return change


def held_volumes(change) -> frozenset | None:
    """The volumes whose fsyncs a commit of change holds until it is
    durable: none for writes alone (change None), those it was marked
    with (changes_volumes), or None, every volume, for a change that
    does not say."""
    if change is None:
        return frozenset()
    return getattr(change, "held_volumes", None)


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
