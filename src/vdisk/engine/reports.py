"""Read-only reports over the block map: a snapshot's space (exclusive,
incremental, referenced) and the blocks that changed between two points."""
from __future__ import annotations

from .format import BLOCK_SIZE, DB_BORN, DB_DEAD, DB_MAP, INF, birth_val_decode, dead_key
from .mapindex import born_between, entry_bytes, exclusive, point_neighbours, scan_tri, visible_map


def snapshot_usage(pool, sid: int, referenced: bool = False) -> dict:
    """Bytes only this snapshot holds (freed by deleting it), and what it
    holds that the previous snapshot of its lineage does not (billed)."""
    s = pool.snapshot_info(sid)
    lin = pool._lins[s["lid"]]
    with pool.env.begin() as txn:
        excl = sum(entry_bytes(pool, txn, lin.lid, block, birth) for block, birth, _ in exclusive(pool, txn, lin, s["gen"]))
        p, _n = point_neighbours(lin, s["gen"])
        out = {"exclusive_bytes": excl, "incremental_bytes": born_between(pool, txn, lin.lid, p, s["gen"])}
        if referenced:  # a scan of everything the snapshot sees (reports only)
            out["referenced_bytes"] = len(visible_map(pool, txn, lin.lid, s["gen"])) * BLOCK_SIZE
    return out


def changed_blocks(pool, sid_from: int | None, sid_to: int | None, vid: int | None = None) -> list[int]:
    """Blocks that differ between two snapshots of one lineage (or between
    a snapshot and the volume's head when sid_to is None), from the map
    alone.  sid_from None means "since nothing" (every written block).

    Work is proportional to what changed since sid_from when both are in
    the same lineage; otherwise the visible maps are compared.
    """
    return [block for block, _zero in changed_extents(pool, sid_from, sid_to, vid)]


def changed_extents(pool, sid_from: int | None, sid_to: int | None, vid: int | None = None) -> list[tuple[int, bool]]:
    """changed_blocks, each as (block, zero): zero when the block reads as
    zeros at sid_to (no entry holds a page of it), known from the map
    without reading data."""
    pool.commit()
    if sid_to is None:
        v = pool._vols[vid]
        lid_b, gen_b = v["lid"], pool._lins[v["lid"]].gen
    else:
        sb = pool.snapshot_info(sid_to)
        lid_b, gen_b = sb["lid"], sb["gen"]
    if sid_from is None:
        lid_a, gen_a = lid_b, 0
    else:
        sa = pool.snapshot_info(sid_from)
        lid_a, gen_a = sa["lid"], sa["gen"]
    with pool.env.begin() as txn:
        if lid_a == lid_b and gen_a <= gen_b and (gen_a > 0 or pool._lins[lid_b].parent is None):
            out = set()
            for birth, block in scan_tri(pool, txn, DB_BORN, lid_b, gen_a + 1, gen_b + 1):
                out.add(block)
            for death, block in scan_tri(pool, txn, DB_DEAD, lid_b, gen_a + 1, INF):
                birth = birth_val_decode(txn.get(dead_key(lid_b, death, block), db=pool._db[DB_DEAD]))
                if birth <= gen_b and (birth > gen_a or death <= gen_b):
                    out.add(block)
            # a block written and zeroed again is no change
            cur = txn.cursor(db=pool._db[DB_MAP])
            changed = []
            for b in sorted(out):
                now = pool._lookup(cur, lid_b, gen_b, b)
                if pool._lookup(cur, lid_a, gen_a, b) != now:
                    changed.append((b, not now))
            return changed
        a = visible_map(pool, txn, lid_a, gen_a) if sid_from is not None else {}
        b = visible_map(pool, txn, lid_b, gen_b)
        return sorted((k, k not in b) for k in set(a) | set(b) if a.get(k) != b.get(k))
