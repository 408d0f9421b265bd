"""A block as the committed map describes it: a chain of entries.

An entry holds the 4 KiB pages of its mask; a *backed* one has the others
in a whole block of its own (its back slot); a *partial* one (mask not full,
no back slot) reads the others as the block was just before the entry's
birth, which is the lookup at (lineage, birth - 1), then the parent point,
then zeros (docs/format.md, "Partial entries").  `layers()` walks that chain in a read
transaction; `assemble()` reads the pages, verifying each slot's checksum
once.  Functions of a Pool (its LMDB handles, lineages, data file); they
change nothing in the map."""
from __future__ import annotations

from . import native
from .errors import ChecksumError
from .format import BLOCK_SIZE, FULL_MASK, PAGE, ZERO_SLOT, map_key, map_key_decode, map_val_full, mask_runs, slot_offset

# (slot, mask, crc) of one entry, or of its back slot (the pages not in the
# entry's mask): the slot holds the pages of mask
Layer = tuple[int, int, int]


def layers(pool, cur, lid: int, gen: int, block: int) -> list[Layer]:
    """The entries that make up block as seen at (lid, gen), newest first,
    until every page is covered (leaving out those that add no page);
    pages none of them holds read as zeros."""
    out: list[Layer] = []
    need = FULL_MASK
    while True:
        key = map_key(lid, block, gen)
        if cur.set_range(key) and cur.key()[:16] == key[:16]:
            slot, death, crc, mask, back, bcrc = map_val_full(cur.value())
            if death <= gen or slot == ZERO_SLOT:
                return out  # dead, or a tombstone: the rest is zeros
            if mask & need:  # an entry whose pages newer ones all hide adds nothing
                out.append((slot, mask, crc))
            need &= ~mask
            if need and back:  # the rest is in its back slot
                out.append((back, FULL_MASK & ~mask, bcrc))
                need = 0
            if not need:
                return out
            gen = map_key_decode(cur.key())[2] - 1  # just before its birth
            continue
        lin = pool._lins[lid]
        if lin.parent is None:
            return out
        lid, gen = lin.parent


def head_state(cur, lid: int, gen: int, last: int, block: int) -> tuple:
    """How the head (lid at its generation gen, last: its last snapshot
    point) relates to its points for one block, in the committed map:
    ("own", slot, mask, crc, back, back_crc) when its entry was born after
    the last point (no point sees it), ("dead", ...) when the head reads
    zeros where gen - 1 saw an entry that died at gen, or ("shared", ...)
    when its last point sees the same (zeros after the state)."""
    key = map_key(lid, block, gen)
    if cur.set_range(key) and cur.key()[:16] == key[:16]:
        birth = map_key_decode(cur.key())[2]
        slot, death, crc, mask, back, bcrc = map_val_full(cur.value())
        if birth > last and death > gen:
            return "own", slot, mask, crc, back, bcrc
        if death == gen:
            return "dead", 0, 0, 0, 0, 0
    return "shared", 0, 0, 0, 0, 0


def checked(pool, slot: int, mask: int, crc: int, where: str) -> bytes:
    """A slot's 64 KiB, the pages of mask verified against crc (once per
    slot since the pool was opened: the page cache serves it after that;
    crc None: an overlay's slot, which has none yet).  Pages outside mask
    are whatever the slot holds."""
    data = pool.file.pread(BLOCK_SIZE, slot_offset(slot))
    if crc is not None and slot not in pool._verified:
        if page_crc(data, mask) != crc:
            raise ChecksumError("checksum mismatch in slot %d (%s)" % (slot, where))
        pool._note_verified(slot)
    return data


def page_crc(data, mask: int) -> int:
    """CRC-32C of the pages of mask in a block's buffer, in page order (the
    whole block's CRC when mask is full)."""
    if mask == FULL_MASK:
        return native.crc32c(data)
    crc = 0
    mv = memoryview(data)
    for first, count in mask_runs(mask):
        crc = native.crc32c(mv[first * PAGE : (first + count) * PAGE], crc)
    return crc


def back_crc(pool, back: int, mask: int) -> int:
    """The checksum a backed entry of mask keeps of its back slot: of the
    pages not in mask (docs/format.md, version 5)."""
    return page_crc(pool.file.pread(BLOCK_SIZE, slot_offset(back)), FULL_MASK & ~mask)


def assemble(pool, chain: list[Layer], where: str, out: bytearray | None = None, need: int = FULL_MASK) -> bytearray:
    """The block the chain describes (the pages of need; others zero)."""
    if out is None:
        out = bytearray(BLOCK_SIZE)
    for slot, mask, crc in chain:
        take = mask & need
        if not take:
            continue
        copy_pages(out, checked(pool, slot, mask, crc, where), take)
        need &= ~mask
        if not need:
            break
    return out


def copy_pages(out: bytearray, data, mask: int) -> None:
    """Copy the pages of mask from one block's buffer into another's."""
    if mask == FULL_MASK:
        out[:] = data
        return
    for first, count in mask_runs(mask):
        out[first * PAGE : (first + count) * PAGE] = data[first * PAGE : (first + count) * PAGE]


def visible(chain: list[Layer], have: int) -> list[Layer]:
    """The layers of a chain under an entry holding the pages of have that
    add a page to what is above them (as layers() leaves out those
    newer entries hide): a copy-on-write in C may copy a middle layer's
    pages into the new slot so that it reads through the others."""
    need = FULL_MASK & ~have
    out = []
    for layer in chain:
        if not need:
            break
        if layer[1] & need:
            out.append(layer)
        need &= ~layer[1]
    return out


def below(chain: list[Layer]) -> tuple[int, int, int, int, int] | None:
    """What the C fast path keeps of the layers under an entry's slot
    (csrc/fastmap.c, struct below): (base, bhave, base2, bhave2, base3),
    the pages of bhave from slot base, the others of bhave2 from slot
    base2, the rest from slot base3 (ZERO_SLOT: zeros), when at most three
    slots make them; None otherwise."""
    if not chain:
        return ZERO_SLOT, FULL_MASK, ZERO_SLOT, FULL_MASK, ZERO_SLOT
    slot, mask, _crc = chain[0]
    if mask == FULL_MASK:
        return slot, FULL_MASK, ZERO_SLOT, FULL_MASK, ZERO_SLOT
    if len(chain) == 1:
        return slot, mask, ZERO_SLOT, FULL_MASK, ZERO_SLOT
    slot2, mask2, _crc = chain[1]
    if (mask | mask2) == FULL_MASK:  # the second holds the rest
        return slot, mask, slot2, FULL_MASK, ZERO_SLOT
    if len(chain) == 2:
        return slot, mask, slot2, mask2, ZERO_SLOT
    if len(chain) == 3 and (mask | mask2 | chain[2][1]) == FULL_MASK:
        return slot, mask, slot2, mask2, chain[2][0]
    return None


def single(chain: list[Layer]) -> int | None:
    """The one slot that holds the whole block (ZERO_SLOT for zeros), or
    None when it takes more than one entry."""
    if not chain:
        return ZERO_SLOT
    if chain[0][1] == FULL_MASK:
        return chain[0][0]
    return None
