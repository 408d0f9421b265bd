"""The pool's integrity check: every map entry against its indexes and the
free list, every slot owned once, every block's checksum."""
from __future__ import annotations

from .format import BLOCK_SIZE, DB_BORN, DB_DEAD, DB_FREE, DB_MAP, FULL_MASK, INF, ZERO_SLOT, birth_val_decode, born_key, dead_key, map_key_decode, map_val_full, slot_offset, tri_decode, u64_decode
from .layers import page_crc
from .mapindex import needed, seen_by_point


def check(pool, verify_data: bool = True, progress=None) -> list[str]:
    """Check the map's integrity and every block's checksum.

    Returns a list of problems (empty when the pool is sound): slots owned
    twice or leaked, index entries out of step with the map, entries that
    no snapshot point or head can see, checksum mismatches.
    """
    pool.commit()
    problems: list[str] = []
    owner: dict[int, tuple] = {}
    with pool.env.begin() as txn:
        free = {u64_decode(k) for k in txn.cursor(db=pool._db[DB_FREE]).iternext(values=False)}
        born = set(txn.cursor(db=pool._db[DB_BORN]).iternext(values=False))
        dead = dict(txn.cursor(db=pool._db[DB_DEAD]))
        total = txn.stat(pool._db[DB_MAP])["entries"]
        for i, (k, v) in enumerate(txn.cursor(db=pool._db[DB_MAP])):
            if progress and i % 4096 == 0:
                progress(i, total)
            lid, block, birth = map_key_decode(k)
            slot, death, crc, mask, back, bcrc = map_val_full(v)
            where = "lineage %d block %d birth %d" % (lid, block, birth)
            lin = pool._lins.get(lid)
            if lin is None:
                problems.append("%s: entry of a lineage that does not exist" % where)
                continue
            if death == INF:
                if born_key(lid, birth, block) not in born:
                    problems.append("%s: live entry missing from the birth index" % where)
                born.discard(born_key(lid, birth, block))
                if lin.head_dead and birth > lin.last_point():
                    problems.append("%s: leaked (head deleted, no snapshot sees it)" % where)
            else:
                dk = dead_key(lid, death, block)
                if dk not in dead or birth_val_decode(dead[dk]) != birth:
                    problems.append("%s: dead entry missing from the death index" % where)
                dead.pop(dk, None)
                if not seen_by_point(lin, birth, death) and not needed(pool, txn, lid, block, death):
                    problems.append("%s: leaked (no snapshot point sees it, no partial entry reads through to it)" % where)
            if slot == ZERO_SLOT:
                if mask != FULL_MASK or back:
                    problems.append("%s: a partial or backed tombstone" % where)
                continue
            if not mask and not back:
                problems.append("%s: an entry that holds no page" % where)
            for s_, m_, c_, what in ((slot, mask, crc, where), (back, FULL_MASK & ~mask, bcrc, where + " (back slot)")):
                if s_ == ZERO_SLOT:
                    continue
                if s_ in owner:
                    problems.append("slot %d owned twice: %s and %s" % (s_, owner[s_], what))
                owner[s_] = what
                if s_ in free:
                    problems.append("slot %d is both free and used by %s" % (s_, what))
                if s_ >= pool._hwm:
                    problems.append("slot %d beyond the high-water mark %d" % (s_, pool._hwm))
                if verify_data:
                    data = pool.file.pread(BLOCK_SIZE, slot_offset(s_))
                    if page_crc(data, m_) != c_:
                        problems.append("slot %d (%s): checksum mismatch" % (s_, what))
        for k in born:
            problems.append("birth index entry %r has no map entry" % (tri_decode(k),))
        for k in dead:
            problems.append("death index entry %r has no map entry" % (tri_decode(k),))
        leaked = set(range(1, pool._hwm)) - set(owner) - free
        if leaked:
            problems.append("%d slots leaked (neither used nor free), e.g. %s" % (len(leaked), sorted(leaked)[:5]))
    for vid, v in pool._vols.items():
        if v["lid"] not in pool._lins or pool._lins[v["lid"]].head_dead:
            problems.append("volume %d points at a missing or deleted lineage %d" % (vid, v["lid"]))
    return problems
