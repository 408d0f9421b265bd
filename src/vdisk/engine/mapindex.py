"""Reading the block map's indexes: which entries a snapshot point alone
sees, what was born between two points, everything visible at a point,
the blocks a range has.

Functions of a Pool (its LMDB handles and lineages) and a read transaction;
they change nothing.  See docs/format.md for the keys."""
from __future__ import annotations

import bisect

from .format import BLOCK_SIZE, DB_BORN, DB_DEAD, DB_MAP, INF, PAGE, ZERO_SLOT, birth_val_decode, born_key, dead_key, lid_prefix, map_key, map_key_decode, map_val_decode, map_val_full, reads_through, tri_decode
from .lineage import Lineage


def scan_tri(pool, txn, dbname: bytes, lid: int, lo: int, hi: int):
    """(a, b) of keys (lid, a, b) in dbname with lo <= a < hi, as a list."""
    out = []
    cur = txn.cursor(db=pool._db[dbname])
    start = born_key(lid, lo, 0)
    if cur.set_range(start):
        for k in cur.iternext(values=False):
            klid, a, b = tri_decode(k)
            if klid != lid or a >= hi:
                break
            out.append((a, b))
    return out


def point_neighbours(lin: Lineage, s: int) -> tuple[int, int | None]:
    i = bisect.bisect_left(lin.points, s)
    p = lin.points[i - 1] if i > 0 else 0
    n = lin.points[i + 1] if i + 1 < len(lin.points) else None
    return p, n


def seen_by_point(lin: Lineage, birth: int, death: int) -> bool:
    """Whether a snapshot point of lin sees an entry born and dead then."""
    i = bisect.bisect_left(lin.points, birth)
    return i < len(lin.points) and lin.points[i] < death


def needed(pool, txn, lid: int, block: int, death: int) -> bool:
    """Whether the entry of (lid, block) born at `death` is partial (not
    backed), and so reads through to the entry that died then."""
    val = txn.get(map_key(lid, block, death), db=pool._db[DB_MAP])
    return val is not None and reads_through(val)


def exclusive(pool, txn, lin: Lineage, s: int):
    """Entries that only point s sees and that nothing reads through to:
    what deleting s frees, [(block, birth, live)]."""
    p, n = point_neighbours(lin, s)
    hi = n + 1 if n is not None else INF
    out = []
    for death, block in scan_tri(pool, txn, DB_DEAD, lin.lid, s + 1, hi):
        birth = birth_val_decode(txn.get(dead_key(lin.lid, death, block), db=pool._db[DB_DEAD]))
        if p < birth <= s and not needed(pool, txn, lin.lid, block, death):
            out.append((block, birth, False))
    if n is None and lin.head_dead:
        for birth, block in scan_tri(pool, txn, DB_BORN, lin.lid, p + 1, s + 1):
            out.append((block, birth, True))
    return out


def entry_bytes(pool, txn, lid: int, block: int, birth: int) -> int:
    """Bytes of data an entry holds: its pages (none for a tombstone); a
    whole block for a backed one, whose view is all its generation's."""
    slot, _death, _crc, mask, back, _bcrc = map_val_full(txn.get(map_key(lid, block, birth), db=pool._db[DB_MAP]))
    if slot == ZERO_SLOT:
        return 0
    return BLOCK_SIZE if back else mask.bit_count() * PAGE


def born_between(pool, txn, lid: int, p: int, s: int) -> int:
    """Bytes held by the entries visible at s that were born after p."""
    n = 0
    for birth, block in scan_tri(pool, txn, DB_BORN, lid, p + 1, s + 1):
        n += entry_bytes(pool, txn, lid, block, birth)
    for death, block in scan_tri(pool, txn, DB_DEAD, lid, s + 1, INF):
        birth = birth_val_decode(txn.get(dead_key(lid, death, block), db=pool._db[DB_DEAD]))
        if p < birth <= s:
            n += entry_bytes(pool, txn, lid, block, birth)
    return n


def lineage_chain(pool, lid: int, gen: int) -> list[tuple[int, int]]:
    """(lid, gen), then the point each lineage was made from, up to a
    root lineage: where a block missing at (lid, gen) is looked up next."""
    chain = []
    while True:
        chain.append((lid, gen))
        lin = pool._lins[lid]
        if lin.parent is None:
            return chain
        lid, gen = lin.parent


def mapped_blocks(pool, txn, lid: int, first: int, last: int) -> set[int]:
    """The blocks of [first, last) that have an entry in the committed map
    in lineage lid or a lineage it was made from, at any generation: a
    superset of those that may not read as zeros in lid's head.  One seek
    per block found, so a range that holds nothing costs one seek per
    lineage however large it is (a discard of a whole disk)."""
    found: set[int] = set()
    cur = txn.cursor(db=pool._db[DB_MAP])
    for clid, _ in lineage_chain(pool, lid, pool._lins[lid].gen):
        block = first
        while block < last and cur.set_range(map_key(clid, block, INF)):
            klid, kblock, _ = map_key_decode(cur.key())
            if klid != clid or kblock >= last:
                break
            found.add(kblock)
            block = kblock + 1
    return found


def visible_map(pool, txn, lid: int, gen: int) -> dict[int, int]:
    """block -> slot of every non-zero block visible at (lid, gen)."""
    out: dict[int, int] = {}
    seen: set[int] = set()
    for clid, cgen in lineage_chain(pool, lid, gen):
        cur = txn.cursor(db=pool._db[DB_MAP])
        if not cur.set_range(lid_prefix(clid)):
            continue
        for k, v in cur:
            klid, block, birth = map_key_decode(k)
            if klid != clid:
                break
            if block in seen or birth > cgen:
                continue
            seen.add(block)
            slot, death, _ = map_val_decode(v)
            if death > cgen and slot != ZERO_SLOT:
                out[block] = slot
    return out
