"""Structural changes: volumes, snapshots, snapshot copies, rollback.

Each public function makes one durable transaction through Pool.commit(change),
or, for a volume's creation and growth, which touch no block, through
Pool.commit_meta(change) (no data sync, no freeze): the change works on a Tx
(txn.py) and frees map entries through the DB_DEAD and DB_BORN indexes
(mapindex.py), in proportion to what changed.  See the
model in pool.py's docstring and docs/format.md."""
from __future__ import annotations

from .errors import EngineError, NotFound
from .format import DB_BORN, DB_DEAD, DB_MAP, INF, birth_val_decode, born_key, dead_key, entry_slots, map_key, map_val_full, reads_through
from .lineage import Lineage
from .mapindex import exclusive, needed, scan_tri, seen_by_point
from .txn import Tx, changes_volumes, keeps_volumes, touches_no_block


def create_volumes(pool, specs: list[tuple[int, int | None]], on_created=None) -> list[int]:
    """Several new volumes in one durable transaction.

    specs: (size in bytes, parent snapshot id or None).  on_created(vids)
    runs inside the transaction (to stage catalogue records with them).
    """
    for size, _ in specs:
        check_size(size)

    def change(tx: Tx):
        vids = []
        for size, parent_snapshot in specs:
            parent = None
            if parent_snapshot is not None:
                s = tx.snap(parent_snapshot)
                if s.get("deleted"):
                    raise NotFound("snapshot %d does not exist" % parent_snapshot)
                parent = (s["lid"], s["gen"])
            lid = new_lineage(pool, tx, parent)
            vid = tx.new_id("volume")
            tx.vols[vid] = {"lid": lid, "size": size}
            vids.append(vid)
        if on_created is not None:
            on_created(vids)
        return vids

    # none that exists yet; no block either: the writes so far need not be synced with it
    return pool.commit_meta(touches_no_block(changes_volumes(change, ())))


def new_lineage(pool, tx: Tx, parent) -> int:
    lid = tx.new_id("lineage")
    tx.lins[lid] = Lineage(lid, 1, parent)
    if parent is not None:
        plin = tx.lin(parent[0])
        plin.pins[parent[1]] = plin.pins.get(parent[1], 0) + 1
    return lid


def resize_volume(pool, vid: int, size: int, on_resized=None) -> None:
    """Grow a volume.  on_resized() runs inside the transaction (to stage
    catalogue records with it)."""
    check_size(size)

    def change(tx: Tx):
        v = tx.vol(vid)
        if size < v["size"]:
            raise EngineError("volumes only grow: %d < %d bytes" % (size, v["size"]))
        v["size"] = size
        if on_resized is not None:
            on_resized()

    pool.commit_meta(touches_no_block(changes_volumes(change, [vid])))


def delete_volumes(pool, vids: list[int], on_deleted=None) -> None:
    """Delete volumes in one durable transaction; their snapshots stay.
    Frees what nothing else uses.  on_deleted() runs inside the
    transaction (to stage catalogue records with it)."""

    def change(tx: Tx):
        for vid in vids:
            v = tx.vol(vid)
            kill_head(pool, tx, v["lid"])
            tx.vols[vid] = None
        if on_deleted is not None:
            on_deleted()

    pool.commit(changes_volumes(change, vids))


def kill_head(pool, tx: Tx, lid: int) -> None:
    lin = tx.lin(lid)
    lin.head_dead = True
    txn = tx.txn
    for birth, block in scan_tri(pool, txn, DB_BORN, lid, lin.last_point() + 1, INF):
        free_entry(pool, tx, lid, block, birth, live=True)
    maybe_drop_lineage(pool, tx, lid)


def free_entry(pool, tx: Tx, lid: int, block: int, birth: int, live: bool) -> None:
    """Free one entry (its slot, and its back slot if it has one); if it
    was partial, what it read through to may be free now too
    (release_base)."""
    txn = tx.txn
    key = map_key(lid, block, birth)
    val = txn.get(key, db=pool._db[DB_MAP])
    death = map_val_full(val)[1]
    txn.delete(key, db=pool._db[DB_MAP])
    if live:
        txn.delete(born_key(lid, birth, block), db=pool._db[DB_BORN])
    else:
        txn.delete(dead_key(lid, death, block), db=pool._db[DB_DEAD])
    tx.frees.extend(entry_slots(val))
    if reads_through(val):
        release_base(pool, tx, lid, block, birth)


def release_base(pool, tx: Tx, lid: int, block: int, death: int) -> None:
    """The entry of (lid, block) that died at `death` is no longer read
    through to by the entry born then (freed, or now whole): free it unless
    a snapshot point sees it or another partial entry still needs it.
    Frees cascade down a chain of partial entries."""
    txn = tx.txn
    val = txn.get(dead_key(lid, death, block), db=pool._db[DB_DEAD])
    if val is None:
        return
    birth = birth_val_decode(val)
    if seen_by_point(tx.lin(lid), birth, death) or needed(pool, txn, lid, block, death):
        return
    free_entry(pool, tx, lid, block, birth, live=False)


def maybe_drop_lineage(pool, tx: Tx, lid: int) -> None:
    lin = tx.lin(lid)
    if not lin.head_dead or lin.points or lin.pins:
        return
    tx.dropped_lins.add(lid)
    # Nothing can see its entries any more; there should be none left.
    for birth, block in scan_tri(pool, tx.txn, DB_BORN, lid, 0, INF):
        free_entry(pool, tx, lid, block, birth, live=True)
    if lin.parent is not None:
        release_pin(pool, tx, *lin.parent)


def release_pin(pool, tx: Tx, lid: int, gen: int) -> None:
    lin = tx.lin(lid)
    lin.pins[gen] -= 1
    if lin.pins[gen] == 0:
        del lin.pins[gen]
        if gen in lin.zombies:
            lin.zombies.remove(gen)
            delete_point(pool, tx, lid, gen)
            for sid, s in pool._snaps.items():
                if s["lid"] == lid and s["gen"] == gen:
                    tx.snaps[sid] = None
    maybe_drop_lineage(pool, tx, lid)


def snapshot(pool, vids: list[int], change=None) -> list[int]:
    """Snapshot several volumes at one point in time, durably.

    Every write completed before the call is in the snapshots.  change(tx,
    sids), if given, runs in the same transaction (catalogue records).
    """

    def _change(tx: Tx):
        sids = []
        for vid in vids:
            v = tx.vol(vid)
            lin = tx.lin(v["lid"])
            s = lin.gen
            lin.points.append(s)
            lin.gen += 1
            sid = tx.new_id("snapshot")
            tx.snaps[sid] = {"lid": v["lid"], "gen": s, "size": v["size"], "volume": vid, "deleted": False}
            sids.append(sid)
        if change is not None:
            change(tx, sids)
        return sids

    return pool.commit(keeps_volumes(_change))


def copy_snapshot(pool, sid: int, change=None) -> int:
    """A new snapshot with the contents of snapshot sid, sharing all its
    blocks, durably: a lineage whose parent is sid's point (pinning it,
    as a clone does), with one point of its own and no head.  Deleting
    either snapshot leaves the other whole.  change(tx, new sid), if
    given, runs in the same transaction (catalogue records)."""

    def _change(tx: Tx):
        s = tx.snap(sid)
        if s.get("deleted"):
            raise NotFound("snapshot %d does not exist" % sid)
        lid = new_lineage(pool, tx, (s["lid"], s["gen"]))
        lin = tx.lin(lid)
        point = lin.gen
        lin.points.append(point)
        lin.gen += 1
        lin.head_dead = True  # nothing writes to it: only its point is read
        nsid = tx.new_id("snapshot")
        tx.snaps[nsid] = {"lid": lid, "gen": point, "size": s["size"], "volume": None, "deleted": False}
        if change is not None:
            change(tx, nsid)
        return nsid

    return pool.commit(keeps_volumes(_change))


def delete_snapshots(pool, sids: list[int], change=None) -> None:
    """Delete several snapshots in one durable transaction.  change(tx), if
    given, runs in the same transaction (catalogue records)."""

    def _change(tx: Tx):
        for sid in sids:
            s = tx.snap(sid)
            if s.get("deleted"):
                raise NotFound("snapshot %d does not exist" % sid)
            lin = tx.lin(s["lid"])
            if lin.pins.get(s["gen"]):
                lin.zombies.append(s["gen"])  # a clone still reads it
                s["deleted"] = True
            else:
                delete_point(pool, tx, s["lid"], s["gen"])
                tx.snaps[sid] = None
                maybe_drop_lineage(pool, tx, s["lid"])
        if change is not None:
            change(tx)

    pool.commit(keeps_volumes(_change))


def delete_point(pool, tx: Tx, lid: int, s: int) -> None:
    """Forget snapshot point s of lid and free what only it saw (entries
    that a partial entry reads through to stay, until it no longer does)."""
    lin = tx.lin(lid)
    todo = exclusive(pool, tx.txn, lin, s)
    lin.points.remove(s)
    for block, birth, live in todo:
        if tx.txn.get(map_key(lid, block, birth), db=pool._db[DB_MAP]) is not None:  # not freed by a cascade
            free_entry(pool, tx, lid, block, birth, live)


def rollback_many(pool, pairs: list[tuple[int, int]], change=None) -> None:
    """Roll several volumes back in one durable transaction: all or none.

    change(tx), if given, runs in the same transaction (catalogue records).
    """

    def _change(tx: Tx):
        for vid, sid in pairs:
            v = tx.vol(vid)
            s = tx.snap(sid)
            if s.get("deleted"):
                raise NotFound("snapshot %d does not exist" % sid)
            old = v["lid"]
            v["lid"] = new_lineage(pool, tx, (s["lid"], s["gen"]))
            kill_head(pool, tx, old)
        if change is not None:
            change(tx)

    pool.commit(changes_volumes(_change, [vid for vid, _ in pairs]))


def check_size(size: int) -> None:
    if size <= 0 or size % 4096:
        raise EngineError("a volume's size must be a positive multiple of 4096 bytes, not %d" % size)
