"""Engine tests that need no root: durability across simulated power cuts,
checksums, space accounting, map growth, format checks, the C helpers."""
import errno
import os
import random
import struct

import lmdb
import pytest

from powercut import PowerCutFile
from vdisk.engine import allocator, native, trim
from vdisk.engine.blockio import DataFile
from vdisk.engine.errors import ChecksumError, FormatError, NoSpace, NotFound, OutOfRange, PoolFailed
from vdisk.engine.format import (DATA_FILE, DB_MAP, DB_META, FORMAT_VERSION, FULL_MASK, LMDB_DIR, LOG_FILE, LOG_FILE_ODD,
                                 map_val_full, u64, u64_decode)
from vdisk.engine.pool import BLOCK_SIZE, Pool

MIB = 1 << 20


def rnd(n, seed):
    return random.Random(seed).randbytes(n)


def reopen(pool, mode="drop", seed=0):
    """Simulate a power cut: lose (or tear) what was not synced, reopen."""
    path = pool.path
    f = pool.file
    pool.env.close()
    pool.env = None
    f.power_cut(mode, random.Random(seed))
    f.close()
    return Pool(path, datafile_factory=PowerCutFile)


@pytest.fixture
def pool(tmp_path):
    p = Pool(str(tmp_path / "pool"), datafile_factory=PowerCutFile)
    yield p
    if p.env is not None:
        p._abandon()


# ---------------------------------------------------------------- C helpers


def test_crc32c_known_vectors():
    assert native.crc32c(b"123456789") == 0xE3069283
    assert native.crc32c(b"") == 0
    data = rnd(BLOCK_SIZE, 1)
    assert native.crc32c(data[100:], native.crc32c(data[:100])) == native.crc32c(data)


def test_zero_detection_and_diff():
    z = bytearray(BLOCK_SIZE)
    assert native.is_zero(z) and native.crc32c_is_zero(z) == (0, True)
    z[BLOCK_SIZE - 1] = 1
    assert not native.is_zero(z)
    crc, zero = native.crc32c_is_zero(z)
    assert not zero and crc == native.crc32c(z)
    a = rnd(BLOCK_SIZE, 2)
    b = bytearray(a)
    b[512 * 3] ^= 1
    b[512 * 100 + 7] ^= 1
    n, bitmap = native.diff_sectors(a, b)
    assert n == 2
    bits = [i for i in range(BLOCK_SIZE // 512) if bitmap[i // 8] >> (i % 8) & 1]
    assert bits == [3, 100]


def test_checksum_slots_of_partial_slots_reads_their_pages_only(tmp_path):
    """A commit checksums a partial slot by its pages (layers.page_crc), in
    C: the pages it does not hold do not count, for the CRC or for being
    zeros; a whole slot's CRC is 0 when it is all zeros."""
    from vdisk.engine.layers import page_crc

    path = str(tmp_path / "slots")
    junk = rnd(BLOCK_SIZE, 7)
    zeros_in_0_and_5 = bytearray(junk)
    for pg in (0, 5):
        zeros_in_0_and_5[pg * 4096 : (pg + 1) * 4096] = bytes(4096)
    with open(path, "wb") as f:
        f.write(junk + bytes(zeros_in_0_and_5) + bytes(BLOCK_SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        masks = [0b1010_0000_0110, FULL_MASK, 0b10_0001, FULL_MASK, 0b1]
        offs = [0, 0, BLOCK_SIZE, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE]  # the last one past the end: zeros
        got = native.checksum_slots(fd, offs, BLOCK_SIZE, masks)
        assert got[0] == (page_crc(junk, masks[0]), False)
        assert got[1] == (native.crc32c(junk), False)
        assert got[2] == (page_crc(zeros_in_0_and_5, masks[2]), True)
        assert got[3] == (0, True)
        assert got[4] == (page_crc(bytes(BLOCK_SIZE), 1), True)
        assert native.checksum_slots(fd, offs[:2], BLOCK_SIZE) == [got[1], got[1]]  # no masks: whole
    finally:
        os.close(fd)


# ---------------------------------------------------------------- durability


def test_flushed_data_survives_power_cut_unflushed_is_lost(pool):
    v = pool.create_volume(16 * BLOCK_SIZE)
    a = rnd(3 * BLOCK_SIZE + 4096, 1)
    pool.write(v, 4096, a)
    pool.commit()  # a is durable
    pool.write(v, 4096, rnd(BLOCK_SIZE, 2))  # not flushed
    pool.write(v, 10 * BLOCK_SIZE, rnd(100, 3))
    pool = reopen(pool, "drop")
    assert pool.read(v, 4096, len(a)) == a
    assert pool.read(v, 10 * BLOCK_SIZE, 100) == bytes(100)
    assert pool.scrub() == []
    pool._abandon()


@pytest.mark.parametrize("seed", range(5))
def test_torn_unflushed_writes_never_damage_flushed_blocks(pool, seed):
    v = pool.create_volume(8 * BLOCK_SIZE)
    base = rnd(8 * BLOCK_SIZE, seed)
    pool.write(v, 0, base)
    pool.commit()
    r = random.Random(seed)
    for _ in range(30):  # overwrite pieces; some blocks are rewritten in place
        off = r.randrange(0, 8 * BLOCK_SIZE // 512) * 512
        n = min(r.choice([512, 4096, BLOCK_SIZE]), 8 * BLOCK_SIZE - off)
        pool.write(v, off, rnd(n, r.random()))
    pool = reopen(pool, "tear", seed)
    assert pool.read(v, 0, 8 * BLOCK_SIZE) == base  # every checksum verified too
    assert pool.scrub() == []
    pool._abandon()


def test_freed_slots_not_reused_before_commit(pool):
    v = pool.create_volume(4 * BLOCK_SIZE)
    a = rnd(BLOCK_SIZE, 1)
    pool.write(v, 0, a)
    pool.commit()
    slot_a = pool.stats()["slots_total"]
    # overwrite: the old slot is freed by the next commit, not before
    pool.write(v, 0, rnd(BLOCK_SIZE, 2))
    pool.write(v, BLOCK_SIZE, rnd(BLOCK_SIZE, 3))
    assert slot_a not in pool._epoch_alloc
    pool = reopen(pool, "keep")  # the unflushed writes reached the disk, the map did not
    assert pool.read(v, 0, BLOCK_SIZE) == a
    pool._abandon()


def test_checksum_mismatch_is_detected(tmp_path):
    """A slot damaged on disk is found by its first read after the pool is
    opened (the write cache in C verifies a committed slot before it reads
    it and hands the read to the Pool, which reports the damage), and by
    scrub."""
    path = str(tmp_path / "p")
    p = Pool(path)
    v = p.create_volume(4 * BLOCK_SIZE)
    p.write(v, 0, rnd(BLOCK_SIZE, 1))
    p.close()
    fd = os.open(os.path.join(path, DATA_FILE), os.O_RDWR)
    os.pwrite(fd, b"X", 1000)
    os.close(fd)
    p = Pool(path)
    assert p.fast_map is not None
    with pytest.raises(ChecksumError):
        p.read(v, 0, 4096)
    problems = p.scrub()
    assert any("checksum" in x for x in problems)
    p.close()


def test_out_of_range_io_is_an_error(pool):
    v = pool.create_volume(2 * BLOCK_SIZE)
    with pytest.raises(OutOfRange):
        pool.write(v, 2 * BLOCK_SIZE - 10, b"x" * 20)
    assert pool.read(v, 2 * BLOCK_SIZE - 10, 20) == bytes(10)  # short read at EOF
    assert pool.read(v, 2 * BLOCK_SIZE, 20) == b""
    assert pool.stats()["slots_used"] == 0


# ---------------------------------------------------------------- space


def test_thin_provisioning_zero_blocks_and_discard(pool):
    v = pool.create_volume(1 << 30)
    pool.write(v, 0, bytes(4 * BLOCK_SIZE))  # zeros cost nothing
    pool.commit()
    assert pool.stats()["slots_used"] == 0
    pool.write(v, 0, rnd(4 * BLOCK_SIZE, 1))
    pool.commit()
    assert pool.stats()["slots_used"] == 4
    pool.discard(v, BLOCK_SIZE, 2 * BLOCK_SIZE)
    pool.commit()
    assert pool.stats()["slots_used"] == 2
    assert pool.read(v, BLOCK_SIZE, 2 * BLOCK_SIZE) == bytes(2 * BLOCK_SIZE)
    pool.discard(v, 100, 200)  # partial: reads zero, block kept
    assert pool.read(v, 100, 200) == bytes(200)


def test_an_overlay_lists_the_blocks_of_a_range_as_a_scan_would():
    """Overlay.blocks_in, which a discard asks once per request, against
    the plain scan: ranges smaller and larger than the overlay, within a
    region, across regions, over none."""
    from vdisk.engine.overlay import REGION_SHIFT, Dirty, Overlay, overlay_of

    r = random.Random(7)
    region = 1 << REGION_SHIFT
    overlays: dict = {}
    o = overlay_of(overlays, 3)
    assert overlay_of(overlays, 3) is o and isinstance(o, Overlay)
    blocks = {r.randrange(0, 1 << 29) for _ in range(3000)}  # 32 TiB of blocks
    blocks |= {5 * region - 1, 5 * region, 7 * region + 3}
    for b in blocks:
        o[b] = Dirty(0, 0, True, False)
    o[5 * region] = Dirty(1, 0, True, False)  # set again: noted once
    ranges = [(0, 1 << 29), (5 * region - 1, 5 * region + 1), (5 * region, 5 * region + 1),
              (7 * region, 8 * region), (6 * region, 7 * region), (1, 2)]
    ranges += [sorted((r.randrange(0, 1 << 29), r.randrange(0, 1 << 29))) for _ in range(200)]
    ranges += [(b, b + r.choice([1, 100, 5000, region * 3])) for b in r.sample(sorted(blocks), 50)]
    for first, last in ranges:
        got = o.blocks_in(first, last)
        assert sorted(got) == sorted(b for b in blocks if first <= b < last), (first, last)
    with pytest.raises(TypeError):
        o.setdefault(1, None)  # would not note its region


def test_a_discard_of_a_whole_large_disk_touches_only_the_blocks_that_hold_data(tmp_path):
    """mkfs and blkdiscard discard the whole disk first: that must cost what
    the disk holds, not its size (a 64 GiB disk is a million blocks; before,
    each got an overlay entry, seconds of work and hundreds of MiB).  The
    blocks that held data read zeros after it, durably; the volume it was
    cloned from keeps them."""
    size = 64 << 30
    p = Pool(str(tmp_path / "pool"))  # a real data file: C serves the writes
    try:
        assert p.fast_map is not None
        v = p.create_volume(size)
        p.write(v, 0, rnd(BLOCK_SIZE, 1))  # committed, then snapshotted
        p.write(v, size - BLOCK_SIZE, rnd(BLOCK_SIZE, 2))
        (s,) = p.snapshot([v])
        c = p.create_volume(size, parent_snapshot=s)  # reads both from its parent
        p.write(v, 5 * BLOCK_SIZE, rnd(4096, 3))  # in the overlay only
        p.write(c, 7 * BLOCK_SIZE, rnd(2 * BLOCK_SIZE, 4))
        p.commit()
        p.write(v, 9 * BLOCK_SIZE + 512, rnd(1024, 5))  # uncommitted, partial
        p.write(c, 1000 * BLOCK_SIZE, rnd(BLOCK_SIZE, 6))
        assert p.dirty_blocks() == 2
        p.discard(v, 0, size)
        p.discard(c, 4096, size - 8192)  # from inside the first block to inside the last
        # at most an entry per volume for each block written in either
        # lineage (0, 5, 7, 8, 9, 1000 and the last), not a million
        assert 9 <= p.dirty_blocks() <= 2 * 7
        assert p.read(v, 0, 10 * BLOCK_SIZE) == bytes(10 * BLOCK_SIZE)
        assert p.read(v, size - BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
        assert p.read(c, 4096, 2 * BLOCK_SIZE) == bytes(2 * BLOCK_SIZE)
        assert p.read(c, 0, 4096) == rnd(BLOCK_SIZE, 1)[:4096]  # outside the range
        assert p.read(c, size - 4096, 4096) == rnd(BLOCK_SIZE, 2)[-4096:]
        assert p.read(c, 1000 * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
        p.commit()
        assert p.read_snapshot(s, 0, BLOCK_SIZE) == rnd(BLOCK_SIZE, 1)
        assert p.read_snapshot(s, size - BLOCK_SIZE, BLOCK_SIZE) == rnd(BLOCK_SIZE, 2)
    finally:
        p.close()
    p = Pool(str(tmp_path / "pool"))
    try:
        assert p.read(v, 0, 10 * BLOCK_SIZE) == bytes(10 * BLOCK_SIZE)
        assert p.read(c, 4096, 8 * BLOCK_SIZE) == bytes(8 * BLOCK_SIZE)
        assert p.read(c, size - 4096, 4096) == rnd(BLOCK_SIZE, 2)[-4096:]
        assert p.scrub() == []
    finally:
        p.close()


def test_snapshot_delete_frees_exactly_its_blocks(pool):
    v = pool.create_volume(64 * BLOCK_SIZE)
    pool.write(v, 0, rnd(10 * BLOCK_SIZE, 1))
    (s1,) = pool.snapshot([v])
    pool.write(v, 0, rnd(3 * BLOCK_SIZE, 2))  # 3 blocks diverge from s1
    (s2,) = pool.snapshot([v])
    pool.write(v, 0, rnd(1 * BLOCK_SIZE, 3))  # 1 block diverges from s2
    pool.commit()
    assert pool.stats()["slots_used"] == 10 + 3 + 1
    assert pool.snapshot_usage(s1)["exclusive_bytes"] == 3 * BLOCK_SIZE
    assert pool.snapshot_usage(s2)["exclusive_bytes"] == 1 * BLOCK_SIZE
    assert pool.snapshot_usage(s1)["incremental_bytes"] == 10 * BLOCK_SIZE
    assert pool.snapshot_usage(s2)["incremental_bytes"] == 3 * BLOCK_SIZE
    pool.delete_snapshot(s1)
    assert pool.stats()["slots_used"] == 11
    pool.delete_snapshot(s2)
    assert pool.stats()["slots_used"] == 10
    assert pool.scrub() == []


def test_snapshot_creation_does_not_touch_the_map(pool):
    v = pool.create_volume(1 << 40)  # 1 TiB, sparse
    for i in range(50):
        pool.write(v, i * 997 * BLOCK_SIZE, rnd(4096, i))
    pool.commit()
    with pool.env.begin() as txn:
        before = {name: txn.stat(pool._db[name])["entries"] for name in pool._db}
    pool.snapshot([v])
    with pool.env.begin() as txn:
        after = {name: txn.stat(pool._db[name])["entries"] for name in pool._db}
    # one snapshot record, nothing else in proportion to the volume
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {b"snap": 1}


def test_changed_blocks_from_the_map(pool):
    v = pool.create_volume(100 * BLOCK_SIZE)
    pool.write(v, 0, rnd(5 * BLOCK_SIZE, 1))
    (s1,) = pool.snapshot([v])
    pool.write(v, 2 * BLOCK_SIZE + 100, b"x")  # block 2
    pool.write(v, 50 * BLOCK_SIZE, b"y")  # block 50
    pool.discard(v, 4 * BLOCK_SIZE, BLOCK_SIZE)  # block 4
    pool.write(v, 70 * BLOCK_SIZE, b"z")  # written and zeroed again: no change
    pool.write(v, 70 * BLOCK_SIZE, b"\0")
    (s2,) = pool.snapshot([v])
    assert pool.changed_blocks(s1, s2) == [2, 4, 50]
    assert pool.changed_blocks(None, s1) == [0, 1, 2, 3, 4]
    pool.write(v, 99 * BLOCK_SIZE, b"q")
    assert pool.changed_blocks(s2, None, vid=v) == [99]


def test_clone_outlives_deleted_snapshot_then_frees(pool):
    v = pool.create_volume(8 * BLOCK_SIZE)
    data = rnd(8 * BLOCK_SIZE, 5)
    pool.write(v, 0, data)
    (s,) = pool.snapshot([v])
    c = pool.create_volume(8 * BLOCK_SIZE, parent_snapshot=s)
    pool.write(v, 0, rnd(8 * BLOCK_SIZE, 6))
    pool.delete_snapshot(s)  # the clone still reads it
    assert pool.read(c, 0, 8 * BLOCK_SIZE) == data
    assert pool.stats()["slots_used"] == 16
    pool.delete_volume(c)
    assert pool.stats()["slots_used"] == 8
    assert pool.scrub() == []


def test_lmdb_map_grows(tmp_path):
    p = Pool(str(tmp_path / "p"), map_size=1 << 20)
    v = p.create_volume(1 << 34)
    for i in range(12000):
        p.write(v, i * BLOCK_SIZE, b"\1" * 512)
    p.commit()
    assert p.env.info()["map_size"] > 1 << 20
    assert p.read(v, 11999 * BLOCK_SIZE, 1) == b"\1"
    p.close()


class FullDisk(DataFile):
    """A data file whose filesystem is full after `budget` bytes."""

    budget = 3 * BLOCK_SIZE

    def pwrite(self, data, offset):
        if offset + len(data) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().pwrite(data, offset)


def test_full_pool_gives_enospc_and_keeps_data(tmp_path):
    p = Pool(str(tmp_path / "p"), datafile_factory=FullDisk)
    v = p.create_volume(16 * BLOCK_SIZE)
    first = rnd(3 * BLOCK_SIZE, 1)
    p.write(v, 0, first)
    p.commit()
    with pytest.raises(NoSpace):
        p.write(v, 5 * BLOCK_SIZE, rnd(BLOCK_SIZE, 2))
    p.commit()
    assert p.read(v, 0, 3 * BLOCK_SIZE) == first
    assert p.scrub() == []
    p.close()


def _snapshot_then_a_page_per_block(p, before_pages=None):
    """A volume of 16 blocks written whole, a snapshot of it, then one
    4 KiB page written into each block (a copy on write each):
    (volume, snapshot, its data now, the snapshot's data).
    before_pages(), if given, runs between the snapshot and the pages."""
    v = p.create_volume(16 * BLOCK_SIZE)
    data = bytearray(rnd(16 * BLOCK_SIZE, 1))
    p.write(v, 0, bytes(data))
    (s1,) = p.snapshot([v])
    old = bytes(data)
    if before_pages is not None:
        before_pages()
    for b in range(16):
        off = b * BLOCK_SIZE + b * 4096
        data[off : off + 4096] = page = rnd(4096, 100 + b)
        p.write(v, off, page)
    return v, s1, data, old


def _roomy_or_skip(path: str) -> None:
    st = os.statvfs(path)
    room = st.f_bavail * st.f_frsize - allocator.keep_free(st.f_blocks * st.f_frsize)
    if room <= allocator.SPARSE_ROOM:
        pytest.skip("the test directory's filesystem has %d MiB to spare, not the %d MiB "
                    "for which the data file grows sparse" % (room >> 20, allocator.SPARSE_ROOM >> 20))


def test_data_file_grows_sparse_and_a_copy_on_write_takes_only_its_pages(tmp_path):
    """With room on the filesystem the data file grows sparse: a page
    written over a block a snapshot holds takes 4 KiB of the filesystem,
    not its slot's 64 KiB, and not a 64 MiB step of preallocation."""
    _roomy_or_skip(str(tmp_path))
    p = Pool(str(tmp_path / "p"))
    try:
        at = []
        v, _, data, _ = _snapshot_then_a_page_per_block(p, lambda: at.append(p.file.allocated_bytes()))
        before = at[0]
        assert before < 4 << 20, before  # the blocks written, not 64 MiB preallocated
        p.commit()
        assert os.fstat(p.file.fd).st_size >= 32 * BLOCK_SIZE
        grown = p.file.allocated_bytes() - before
        assert 16 * 4096 <= grown <= 16 * 4096 + (1 << 20), grown  # not 16 slots of 64 KiB
        assert p.read(v, 0, 16 * BLOCK_SIZE) == bytes(data)
        assert p.scrub() == []
    finally:
        p.close()


def test_close_to_full_the_slots_handed_out_are_allocated_first(tmp_path, monkeypatch):
    """With little room to spare (SPARSE_ROOM), the data file is
    preallocated and a reused slot that is a hole (punched when it was
    freed) is allocated before it is handed out, so that a write into it
    cannot meet a full filesystem."""
    monkeypatch.setattr(allocator, "SPARSE_ROOM", 1 << 62)
    p = Pool(str(tmp_path / "p"))
    try:
        v = p.create_volume(32 * BLOCK_SIZE)
        p.write(v, 0, rnd(32 * BLOCK_SIZE, 1))
        p.commit()
        assert p.file.allocated_bytes() >= 64 << 20  # preallocated in 64 MiB steps
        p.delete_volume(v)  # its slots are freed and punched
        punched = p.file.allocated_bytes()
        slots = allocator.reserve_many(p, 8, 0)
        assert len(slots) == 8
        assert p.file.allocated_bytes() - punched >= 8 * BLOCK_SIZE
    finally:
        p.close()


def test_filling_up_the_slots_a_sparse_growth_left_are_allocated_first(tmp_path, monkeypatch):
    """The data file grew sparse while there was room; once there is
    not, new slots from that sparse stretch are allocated before they are
    handed out."""
    _roomy_or_skip(str(tmp_path))
    p = Pool(str(tmp_path / "p"))
    try:
        v = p.create_volume(BLOCK_SIZE)
        p.write(v, 0, rnd(BLOCK_SIZE, 1))
        p.commit()
        assert os.fstat(p.file.fd).st_size >= 64 << 20 and p.file.allocated_bytes() < 4 << 20
        monkeypatch.setattr(allocator, "SPARSE_ROOM", 1 << 62)
        p._room_checked = (0.0, False)  # look again now, not in a second
        before = p.file.allocated_bytes()
        slots = allocator.reserve_many(p, 8, 8)
        assert len(slots) == 8 and p.file.reserved() < 128 << 20  # from the sparse stretch
        assert p.file.allocated_bytes() - before >= 8 * BLOCK_SIZE
    finally:
        p.close()


def test_format_version_is_checked(tmp_path):
    path = str(tmp_path / "p")
    Pool(path).close()
    env = lmdb.open(os.path.join(path, LMDB_DIR), max_dbs=16)
    with env.begin(write=True, db=env.open_db(DB_META)) as txn:
        txn.put(b"format_version", u64(99))
    env.close()
    with pytest.raises(FormatError, match="version 99"):
        Pool(path)


def test_version_1_pool_is_upgraded_when_opened(tmp_path):
    """A pool of format version 1 (no intent log) opens, is marked this
    version, and keeps its data; log flushes work on it."""
    path = str(tmp_path / "p")
    p = Pool(path)
    v = p.create_volume(4 * BLOCK_SIZE)
    data = rnd(2 * BLOCK_SIZE, 1)
    p.write(v, 0, data)
    p.close()
    os.unlink(os.path.join(path, LOG_FILE))
    env = lmdb.open(os.path.join(path, LMDB_DIR), max_dbs=16)
    with env.begin(write=True, db=env.open_db(DB_META)) as txn:
        txn.put(b"format_version", u64(1))
        txn.delete(b"log_gen")
    env.close()
    p = Pool(path)
    try:
        assert p.read(v, 0, 2 * BLOCK_SIZE) == data
        p.write(v, 0, b"x" * 4096)
        assert p.log_flush(v)
    finally:
        p._abandon()  # a crash: the record must carry the write
    p = Pool(path)
    with p.env.begin(db=p._db[DB_META]) as txn:
        assert u64_decode(txn.get(b"format_version")) == FORMAT_VERSION == 6
    assert p.read(v, 0, 4096) == b"x" * 4096
    assert p.intent.stats["replayed"] == 1
    p.close()


def _as_version(path: str, version: int) -> int:
    """Rewrite a closed pool as format version 2 or 3 wrote it: map values
    of 20 bytes (slot, death, crc: no page mask) or of 22 (no back slot).
    Returns how many values it rewrote."""
    env = lmdb.open(os.path.join(path, LMDB_DIR), max_dbs=16)
    mdb, meta = env.open_db(DB_MAP), env.open_db(DB_META)
    n = 0
    with env.begin(write=True) as txn:
        for k, v in list(txn.cursor(db=mdb)):
            slot, death, crc, mask, back, _bcrc = map_val_full(v)
            assert back == 0, "versions 2 and 3 have no backed entries"
            if version == 2:
                assert mask == FULL_MASK, "a version 2 pool has whole-block entries only"
                txn.put(k, struct.pack("<QQI", slot, death, crc), db=mdb)
            else:
                txn.put(k, struct.pack("<QQIH", slot, death, crc, mask), db=mdb)
            n += 1
        txn.put(b"format_version", u64(version), db=meta)
    env.close()
    return n


@pytest.mark.parametrize("version", [2, 3])
def test_older_pool_is_upgraded_when_opened(tmp_path, version):
    """A version 2 pool (whole-block entries of 20 bytes) or 3 (22 bytes,
    no back slot) opens as this version without rewriting its map.  Snapshots,
    partial writes over its entries (backed ones over the head's own) and
    deletions then work, and scrub finds nothing wrong at any step."""
    path = str(tmp_path / "p")
    p = Pool(path)
    v = p.create_volume(4 * BLOCK_SIZE)
    data = bytearray(rnd(3 * BLOCK_SIZE, 7))
    p.write(v, 0, data)
    (s1,) = p.snapshot([v])
    p.write(v, BLOCK_SIZE, rnd(BLOCK_SIZE, 8))
    data[BLOCK_SIZE : 2 * BLOCK_SIZE] = rnd(BLOCK_SIZE, 8)
    p.close()
    assert _as_version(path, version) >= 4
    p = Pool(path)
    try:
        with p.env.begin(db=p._db[DB_META]) as txn:
            assert u64_decode(txn.get(b"format_version")) == FORMAT_VERSION
        assert p.read(v, 0, 3 * BLOCK_SIZE) == data
        assert p.scrub() == []
        (s2,) = p.snapshot([v])
        p.write(v, 4096, b"y" * 4096)  # partial entries over version 2 ones
        data[4096:8192] = b"y" * 4096
        p.write(v, BLOCK_SIZE + 100, b"z" * 10)
        data[BLOCK_SIZE + 100 : BLOCK_SIZE + 110] = b"z" * 10
        p.commit()
        p.write(v, BLOCK_SIZE + 8192, b"w" * 4096)  # over the head's own partial entry
        data[BLOCK_SIZE + 8192 : BLOCK_SIZE + 12288] = b"w" * 4096
        p.commit()
        assert p.read(v, 0, 3 * BLOCK_SIZE) == data
        assert p.scrub() == []
        p.delete_snapshot(s1)
        p.delete_snapshot(s2)
        assert p.scrub() == []
        assert p.read(v, 0, 3 * BLOCK_SIZE) == data
    finally:
        p.close()
    p = Pool(path)
    assert p.read(v, 0, 3 * BLOCK_SIZE) == data
    p.close()


def test_version_4_pool_gets_its_back_slots_checksummed_again(tmp_path):
    """Version 4 checksummed a backed entry's back slot whole (64 KiB);
    version 5 checksums only its pages not in the entry's mask, since the
    others may be written in place.  A version 4 pool's backed entries
    are checksummed again when it is opened: it reads, scrubs clean and
    keeps its data.  Without the upgrade, scrub finds the old sums wrong."""
    from vdisk.engine.layers import page_crc
    from vdisk.engine.format import map_val, slot_offset

    path = str(tmp_path / "p")
    p = Pool(path, fast=False)
    v = p.create_volume(4 * BLOCK_SIZE)
    data = bytearray(rnd(3 * BLOCK_SIZE, 3))
    p.write(v, 0, data)
    p.commit()
    p.write(v, 4096, b"b" * 4096)  # over the head's own whole block: backed
    data[4096:8192] = b"b" * 4096
    p.commit()
    p.close()
    env = lmdb.open(os.path.join(path, LMDB_DIR), max_dbs=16)
    mdb, meta = env.open_db(DB_MAP), env.open_db(DB_META)
    backed = 0
    with open(os.path.join(path, DATA_FILE), "rb") as f:
        with env.begin(write=True) as txn:
            for k, val in list(txn.cursor(db=mdb)):
                slot, death, crc, mask, back, _bcrc = map_val_full(val)
                if back:
                    f.seek(slot_offset(back))
                    whole = page_crc(f.read(BLOCK_SIZE), FULL_MASK)  # as version 4 summed it
                    txn.put(k, map_val(slot, death, crc, mask, back, whole), db=mdb)
                    backed += 1
            txn.put(b"format_version", u64(4), db=meta)
    env.close()
    assert backed == 1
    p = Pool(path, fast=False)
    try:
        with p.env.begin(db=p._db[DB_META]) as txn:
            assert u64_decode(txn.get(b"format_version")) == FORMAT_VERSION
        assert p.scrub() == []
        assert p.read(v, 0, 3 * BLOCK_SIZE) == data
    finally:
        p.close()


def test_version_5_pool_replays_its_log_from_the_one_file(tmp_path):
    """Version 5 wrote every generation's records to intent.log; version
    6 writes odd generations to intent-odd.log.  A version 5 pool that
    crashed at an odd generation with records to replay has them replayed
    from intent.log when opened (without that, the fsynced write is
    lost), and is version 6 from then on."""
    path = str(tmp_path / "p")
    p = Pool(path, fast=False)
    v = p.create_volume(4 * BLOCK_SIZE)  # records only: generation 0
    p.write(v, 8192, b"z" * 4096)
    p.commit()  # generation 1
    p.write(v, 0, b"a" * 4096)
    assert p.log_flush(v)
    assert p.intent.gen % 2 == 1
    p._abandon()  # a crash, the record in intent-odd.log
    os.replace(os.path.join(path, LOG_FILE_ODD), os.path.join(path, LOG_FILE))  # where version 5 put it
    env = lmdb.open(os.path.join(path, LMDB_DIR), max_dbs=16)
    with env.begin(write=True, db=env.open_db(DB_META)) as txn:
        txn.put(b"format_version", u64(5))
    env.close()
    p = Pool(path, fast=False)
    try:
        assert p.intent.stats["replayed"] == 1
        assert p.read(v, 0, 4096) == b"a" * 4096
        with p.env.begin(db=p._db[DB_META]) as txn:
            assert u64_decode(txn.get(b"format_version")) == FORMAT_VERSION == 6
        p.write(v, 4096, b"b" * 4096)
        assert p.log_flush(v)
    finally:
        p._abandon()
    p = Pool(path, fast=False)
    try:
        assert p.intent.stats["replayed"] == 1  # the new record only
        assert p.read(v, 0, 12288) == b"a" * 4096 + b"b" * 4096 + b"z" * 4096
    finally:
        p.close()


def test_a_log_that_may_not_grow_says_so_once(tmp_path, monkeypatch, caplog):
    """When the filesystem is too full for the intent log to grow, each
    fsync commits instead (counted), and the daemon's log says so once,
    then once more when the log grows again."""
    from vdisk.engine import allocator

    p = Pool(str(tmp_path / "p"))
    try:
        v = p.create_volume(4 * BLOCK_SIZE)
        monkeypatch.setattr(allocator, "spare_bytes", lambda pool: 0)
        for i in range(3):
            p.write(v, i * BLOCK_SIZE, rnd(4096, i))
            assert not p.log_flush(v)  # the caller commits instead
        assert p.log_status()["low_space"] == 3
        said = [r.getMessage() for r in caplog.records if "intent log" in r.getMessage()]
        assert len(said) == 1 and "may not grow" in said[0], said
        monkeypatch.undo()
        p.write(v, 0, rnd(4096, 9))
        assert p.log_flush(v)
        said = [r.getMessage() for r in caplog.records if "intent log" in r.getMessage()]
        assert len(said) == 2 and "grows again" in said[1], said
    finally:
        p.close()


def test_log_replay_stops_at_the_first_bad_record(tmp_path):
    """Three log flushes, then a crash with the second record damaged: the
    first is replayed, the second and third are not (the third could not
    have been written before the second was durable); records of an older
    generation are never replayed."""
    path = str(tmp_path / "p")
    p = Pool(path)
    v = p.create_volume(4 * BLOCK_SIZE)
    for i, ch in enumerate(b"abc"):
        p.write(v, i * BLOCK_SIZE + 8192, bytes([ch]) * 4096)
        assert p.log_flush(v)
    assert p.log_status()["flushes"] == 3 and p.intent.pos == 3 * 2 * 4096
    records = p.intent.file.path  # the file of the generation they are in
    p._abandon()
    with open(records, "r+b") as f:
        f.seek(2 * 4096 + 4096 + 100)  # the page of the second record
        f.write(b"?")
    p = Pool(path)
    assert p.intent.stats["replayed"] == 1
    assert p.read(v, 8192, 4096) == b"a" * 4096
    assert p.read(v, BLOCK_SIZE + 8192, 4096) == bytes(4096)
    assert p.read(v, 2 * BLOCK_SIZE + 8192, 4096) == bytes(4096)
    assert p.scrub() == []
    p._abandon()  # the old records are still in the file, a generation behind
    p = Pool(path)
    assert p.intent.stats["replayed"] == 0
    assert p.read(v, 0, 3 * BLOCK_SIZE).count(b"a") == 4096
    p.close()


def test_c_extension_releases_the_gil():
    import threading

    big = bytes(256 << 20)
    started, done = threading.Event(), threading.Event()

    def work():
        started.set()
        for _ in range(4):
            native.crc32c(big)  # an all-zero buffer still takes a full pass
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    spins = 0
    while not done.is_set():
        spins += 1
    t.join()
    # with the GIL held by the C call this loop could not run meanwhile
    assert spins > 10000, spins


def test_commit_job_in_a_thread_while_writes_go_on(tmp_path):
    """The daemon's pattern: freeze the overlay, run the commit in another
    thread, keep writing (partial, full, zero) meanwhile.  Reads must see the
    newest data throughout; after finishing, a second commit and a reopen,
    everything reads back and scrub is clean."""
    import threading

    pool = Pool(str(tmp_path / "p"), datafile_factory=PowerCutFile)
    vid = pool.create_volume(64 * BLOCK_SIZE)
    rng = random.Random(7)
    model = bytearray(64 * BLOCK_SIZE)

    def scribble(n):
        for _ in range(n):
            off = rng.randrange(0, 64 * BLOCK_SIZE // 4096) * 4096
            size = min(rng.choice([4096, 8192, BLOCK_SIZE, 3 * BLOCK_SIZE]), len(model) - off)
            data = bytes(size) if rng.random() < 0.1 else rnd(size, rng.randrange(1 << 30))
            pool.write(vid, off, data)
            model[off:off + size] = data

    for round_ in range(5):
        scribble(200)
        frozen = bytes(model)
        job = pool.begin_commit()
        t = threading.Thread(target=job.run)
        t.start()
        scribble(200)
        assert pool.read(vid, 0, len(model)) == bytes(model)
        t.join()
        pool.finish_commit(job)
        assert job.error is None
        # the frozen state is durable: a power cut now keeps exactly it
        if round_ == 2:
            pool = reopen(pool, "drop", seed=round_)
            assert pool.read(vid, 0, len(model)) == frozen
            model[:] = frozen
        assert pool.read(vid, 0, len(model)) == bytes(model)
    pool.commit()
    assert pool.scrub() == []
    pool.close()
    pool = Pool(str(tmp_path / "p"))
    assert pool.read(vid, 0, len(model)) == bytes(model)
    pool.close()


def test_structural_change_refused_while_a_commit_is_in_flight(pool):
    from vdisk.engine.errors import CommitInFlight

    vid = pool.create_volume(4 * BLOCK_SIZE)
    pool.write(vid, 0, rnd(4096, 1))
    job = pool.begin_commit()
    with pytest.raises(CommitInFlight):
        pool.snapshot([vid])
    with pytest.raises(CommitInFlight):
        pool.commit()
    job.run()
    pool.finish_commit(job)
    assert pool.snapshot([vid])


def test_records_staged_by_a_change_are_in_its_transaction(pool):
    """Catalogue records a snapshot's change stages must be durable with the
    snapshot itself (one transaction), not in some later commit."""
    vid = pool.create_volume(4 * BLOCK_SIZE)
    pool.put_record("before/1", {"n": 1})  # staged outside: also in this commit

    def change(tx, sids):
        pool.put_record("snap/%d" % sids[0], {"sid": sids[0]})
        assert pool.get_record("snap/%d" % sids[0]) == {"sid": sids[0]}

    (sid,) = pool.snapshot([vid], change)
    pool = reopen(pool, "drop")  # a power cut right after: no later commit
    assert pool.get_record("snap/%d" % sid) == {"sid": sid}
    assert pool.get_record("before/1") == {"n": 1}
    pool._abandon()


def test_records_of_a_failed_change_are_dropped(pool):
    vid = pool.create_volume(4 * BLOCK_SIZE)

    def change(tx, sids):
        pool.put_record("snap/x", {"bad": True})
        raise NotFound("refused on purpose")

    with pytest.raises(NotFound):
        pool.snapshot([vid], change)
    assert pool.get_record("snap/x") is None
    pool.commit()
    assert pool.get_record("snap/x") is None


def test_write_out_syncs_and_a_failure_fails_the_pool(tmp_path):
    """write_out (a background commit's first step) makes the data file's
    writes durable without a commit; if its fdatasync fails, the pool
    refuses every later sync and write: the kernel reports a lost write
    only once, so a later fdatasync could succeed over it."""
    p = Pool(str(tmp_path), datafile_factory=PowerCutFile)
    vid = p.create_volume(1 << 20)
    p.write(vid, 0, b"x" * 4096)
    p.write_out()
    assert p.file._undo == []  # synced: a power cut would put nothing back
    assert p.pending()  # but not committed
    p.write(vid, 4096, b"y" * 4096)
    p.file.fail_next_sync = True
    with pytest.raises(PoolFailed, match="syncing .* failed"):
        p.write_out()
    with pytest.raises(PoolFailed):
        p.commit()
    with pytest.raises(PoolFailed):
        p.write(vid, 0, b"z" * 4096)


def _one_page_into_eight_blocks(p, v, data: bytearray) -> None:
    """Write page b of block b for b < 8 (data follows), commit, and check
    the file grew by at most two pages a block.  (The data file is
    preallocated in 64 MiB steps, so this bound catches only a pool that
    grew it; what a write took shows in the map, which the callers check.)"""
    before = p.file.allocated_bytes()
    for b in range(8):
        off = b * BLOCK_SIZE + (b % 16) * 4096
        p.write(v, off, b"%d" % b * 4096)
        data[off : off + 4096] = (b"%d" % b * 4096)[:4096]
    p.commit()
    grown = p.file.allocated_bytes() - before
    assert grown <= 8 * 2 * 4096, "8 pages written took %d bytes of new space" % grown


def test_writes_after_a_snapshot_copy_only_the_pages_written(tmp_path):
    """Sub-block copy-on-write: 4 KiB written into blocks a snapshot shares
    take 4 KiB of new space each, not a 64 KiB copy; the head reads the
    rest through to the snapshot's entries, which deleting the snapshot
    keeps until the head no longer needs them.  Reads, usage figures and
    scrub agree at every step, across a reopen."""
    path = str(tmp_path / "p")
    p = Pool(path)
    nb = 16
    v = p.create_volume(nb * BLOCK_SIZE)
    data = bytearray(rnd(nb * BLOCK_SIZE, 3))
    p.write(v, 0, data)
    (s1,) = p.snapshot([v])
    _one_page_into_eight_blocks(p, v, data)
    assert p.read(v, 0, nb * BLOCK_SIZE) == data
    assert p.read_snapshot(s1, 0, nb * BLOCK_SIZE) == rnd(nb * BLOCK_SIZE, 3)
    (s2,) = p.snapshot([v])
    assert p.snapshot_usage(s2)["incremental_bytes"] == 8 * 4096
    assert p.scrub() == []
    # the snapshot goes; the blocks the head reads through to stay
    p.delete_snapshot(s1)
    assert p.scrub() == []
    p.delete_snapshot(s2)
    assert p.scrub() == []
    assert p.read(v, 0, nb * BLOCK_SIZE) == data
    # a partial write over a partial entry of the head's own, a write in
    # part of a page, and a whole-block rewrite that frees what was read through to
    p.write(v, 4096 + 10, b"q" * 5000)
    data[4096 + 10 : 4096 + 5010] = b"q" * 5000
    p.write(v, 3 * BLOCK_SIZE, b"w" * BLOCK_SIZE)
    data[3 * BLOCK_SIZE : 4 * BLOCK_SIZE] = b"w" * BLOCK_SIZE
    p.commit()
    assert p.scrub() == []
    assert p.read(v, 0, nb * BLOCK_SIZE) == data
    p.close()
    p = Pool(path)
    try:
        assert p.read(v, 0, nb * BLOCK_SIZE) == data
        p.delete_volume(v)
        assert p.scrub() == []
    finally:
        p.close()


def _chain(p, v, block):
    lid = p._vols[v]["lid"]
    with p.env.begin(db=p._db[DB_MAP]) as txn:
        return p._lookup(txn.cursor(), lid, p._lins[lid].gen, block)


def _used_slots(p):
    from vdisk.engine.format import DB_FREE

    with p.env.begin(db=p._db[DB_FREE]) as txn:
        return p._hwm - 1 - txn.stat(p._db[DB_FREE])["entries"]


def test_writes_after_a_commit_copy_only_the_pages_written(tmp_path):
    """Backed entries: 4 KiB written into blocks the head holds whole (no
    snapshot, committed) take a slot of those pages over the old block,
    which becomes the new entry's back slot, not a 64 KiB copy.  Later
    writes to such a block copy its pages (not the back slot) until more
    than COALESCE_PAGES would be in it; then the block is copied whole and
    the back slot freed.  A snapshot sees a backed entry whole; deleting
    everything frees every slot.  Scrub agrees at every step, across a
    reopen."""
    from vdisk.engine.fastmap import COALESCE_PAGES

    path = str(tmp_path / "p")
    p = Pool(path)
    nb = 16
    v = p.create_volume(nb * BLOCK_SIZE)
    data = bytearray(rnd(nb * BLOCK_SIZE, 3))
    p.write(v, 0, data)
    p.commit()
    _one_page_into_eight_blocks(p, v, data)
    chain = _chain(p, v, 1)
    assert [m for _, m, _ in chain] == [0b10, FULL_MASK & ~0b10], chain  # page 1 over its back slot
    assert p.read(v, 0, nb * BLOCK_SIZE) == data
    assert p.scrub() == []
    # another commit's write copies the pages, keeps the back slot
    p.write(v, BLOCK_SIZE + 5 * 4096, b"e" * 4096)
    data[BLOCK_SIZE + 5 * 4096 : BLOCK_SIZE + 6 * 4096] = b"e" * 4096
    p.commit()
    back = chain[1][0]
    chain = _chain(p, v, 1)
    assert [m for _, m, _ in chain] == [0b100010, FULL_MASK & ~0b100010] and chain[1][0] == back, chain
    assert p.read(v, 0, nb * BLOCK_SIZE) == data
    # a snapshot sees it whole; the head writes over it through to it
    (s1,) = p.snapshot([v])
    snap = bytes(data)
    p.write(v, BLOCK_SIZE + 9 * 4096, b"s" * 4096)
    data[BLOCK_SIZE + 9 * 4096 : BLOCK_SIZE + 10 * 4096] = b"s" * 4096
    p.commit()
    assert p.read(v, 0, nb * BLOCK_SIZE) == data
    assert p.read_snapshot(s1, 0, nb * BLOCK_SIZE) == snap
    assert p.scrub() == []
    p.delete_snapshot(s1)
    assert p.scrub() == []
    assert p.read(v, 0, nb * BLOCK_SIZE) == data
    # more than COALESCE_PAGES pages: the block is copied whole, its back slot freed
    used0 = _used_slots(p)
    p.write(v, 2 * BLOCK_SIZE, b"c" * (COALESCE_PAGES + 1) * 4096)
    data[2 * BLOCK_SIZE : 2 * BLOCK_SIZE + (COALESCE_PAGES + 1) * 4096] = b"c" * (COALESCE_PAGES + 1) * 4096
    p.commit()
    assert [m for _, m, _ in _chain(p, v, 2)] == [FULL_MASK]
    assert _used_slots(p) == used0 - 1  # the backed entry's slot and back, for one new slot
    assert p.scrub() == []
    p.close()
    p = Pool(path)
    try:
        assert p.read(v, 0, nb * BLOCK_SIZE) == data
        p.write(v, 3 * BLOCK_SIZE, b"w" * BLOCK_SIZE)  # a whole rewrite frees slot and back
        data[3 * BLOCK_SIZE : 4 * BLOCK_SIZE] = b"w" * BLOCK_SIZE
        p.commit()
        assert p.scrub() == []
        assert p.read(v, 0, nb * BLOCK_SIZE) == data
        p.delete_volume(v)
        assert p.scrub() == []
    finally:
        p.close()


def test_a_failed_commit_leaves_a_write_over_its_block_whole(tmp_path):
    """A partial write over a block that a commit in flight holds whole
    reads the rest from it; when that commit fails, the write takes the
    rest into its own slot before the frozen one is given back."""
    p = Pool(str(tmp_path / "p"))
    try:
        v = p.create_volume(4 * BLOCK_SIZE)
        data = bytearray(rnd(2 * BLOCK_SIZE, 5))
        p.write(v, 0, data)

        def refuse(tx):
            raise NotFound("refused on purpose")

        job = p.begin_commit(refuse)
        p.write(v, 4096, b"n" * 4096)  # over the frozen whole block
        data[4096:8192] = b"n" * 4096
        assert p.read(v, 0, 2 * BLOCK_SIZE) == data
        job.run()
        with pytest.raises(NotFound):
            p.finish_commit(job)
        p.write(v, BLOCK_SIZE, rnd(BLOCK_SIZE, 9))  # reuses the slot given back
        data[BLOCK_SIZE:] = rnd(BLOCK_SIZE, 9)
        assert p.read(v, 0, 2 * BLOCK_SIZE) == data
        p.commit()
        assert p.read(v, 0, 2 * BLOCK_SIZE) == data
        assert p.scrub() == []
    finally:
        p.close()


def test_partial_zero_pages_over_zeros_leave_no_entry(tmp_path):
    """A page written and zeroed again on a block that reads as zeros
    underneath is no change: the commit keeps no partial entry for it."""
    p = Pool(str(tmp_path / "p"))
    try:
        v = p.create_volume(4 * BLOCK_SIZE)
        (s1,) = p.snapshot([v])
        p.write(v, 8192, b"a" * 4096)
        p.write(v, 8192, bytes(4096))
        (s2,) = p.snapshot([v])
        assert p.changed_blocks(s1, s2) == []
        assert p.scrub() == []
    finally:
        p.close()


def test_slots_a_deletion_frees_are_not_reused_before_they_are_punched(tmp_path):
    """A structural change's freed slots are punched once it is durable (in
    the daemon, by another thread, later).  Between its transaction's
    commit and then, a write that scans the free list must not take one of
    them: the punch would turn what it wrote into zeros."""
    from vdisk.engine import structure

    p = Pool(str(tmp_path / "p"))
    try:
        v = p.create_volume(64 * BLOCK_SIZE)
        p.write(v, 0, rnd(32 * BLOCK_SIZE, 1))
        (sid,) = p.snapshot([v])
        p.write(v, 0, rnd(32 * BLOCK_SIZE, 2))  # the snapshot alone holds the old blocks
        p.commit()
        s = p._snaps[sid]

        def change(tx):
            structure.delete_point(p, tx, s["lid"], s["gen"])
            tx.snaps[sid] = None

        job = p.begin_commit(change)
        job.run()  # durable: the freed slots are in the free list now
        assert len(job.to_punch) == 32
        p._free_cache.clear()
        p._free_scan = b""  # the next allocation scans the free list
        data = rnd(4 * BLOCK_SIZE, 3)
        p.write(v, 40 * BLOCK_SIZE, data)
        p.finish_commit(job)  # punches them
        assert p.read(v, 40 * BLOCK_SIZE, 4 * BLOCK_SIZE) == data
        p.commit()
        assert p.read(v, 40 * BLOCK_SIZE, 4 * BLOCK_SIZE) == data
        assert p.scrub() == []
    finally:
        p.close()


def test_trim_gives_back_the_pages_partial_slots_do_not_hold(tmp_path, monkeypatch):
    """A page written over a block a snapshot holds takes a slot of its own,
    preallocated whole (a filesystem close to full: the data file does not
    grow sparse); trim punches the pages that slot does not hold,
    and every block, the snapshot's and the head's, still reads right (and
    after more writes, another snapshot and a reopen)."""
    monkeypatch.setattr(allocator, "SPARSE_ROOM", 1 << 62)
    p = Pool(str(tmp_path / "p"))
    try:
        v, s1, data, old = _snapshot_then_a_page_per_block(p)
        p.commit()
        partial = trim.partial_slots(p)
        assert len(partial) == 16 and all(m.bit_count() == 1 for m in partial.values()), partial
        before = p.file.allocated_bytes()  # the slots were preallocated whole
        done = p.trim()
        assert done["partial_slots"] == 16 and done["bytes"] == 16 * 15 * 4096, done
        freed = before - p.file.allocated_bytes()
        assert freed >= 0.9 * done["bytes"], (freed, done)
        assert p.read(v, 0, 16 * BLOCK_SIZE) == bytes(data)
        assert p.read_snapshot(s1, 0, 16 * BLOCK_SIZE) == old
        p.write(v, 5 * BLOCK_SIZE + 4096, rnd(8192, 7))
        data[5 * BLOCK_SIZE + 4096 : 5 * BLOCK_SIZE + 12288] = rnd(8192, 7)
        p.snapshot([v])
        assert p.scrub() == []
    finally:
        p.close()
    p = Pool(str(tmp_path / "p"))
    try:
        assert p.read(v, 0, 16 * BLOCK_SIZE) == bytes(data)
        assert p.read_snapshot(s1, 0, 16 * BLOCK_SIZE) == old
        assert p.scrub() == []
    finally:
        p.close()


def test_trim_leaves_slots_the_fast_path_holds_alone(tmp_path):
    """Slots in C's reservoir may be written any moment: trim never
    punches them, even where the map still names them (it cannot, after a
    commit; the check is the last line of defence)."""
    from vdisk.engine.fastmap import FastMap

    p = Pool(str(tmp_path / "p"), fast=False)
    fm = FastMap(p.file.fd, reservoir=8)
    p.attach_fast(fm)
    try:
        v = p.create_volume(8 * BLOCK_SIZE)
        p.write(v, 0, rnd(8 * BLOCK_SIZE, 1))
        p.snapshot([v])
        p.refill_fast()  # the write above may have been served from the reservoir
        for b in range(8):
            assert fm.write(v, b * BLOCK_SIZE, rnd(4096, 20 + b))  # copy on write, in C
        p.commit()
        partial = trim.partial_slots(p)
        assert len(partial) == 8
        p._reserved |= set(list(partial)[:3])  # as if C held them
        done = p.trim()
        assert done["holes"] == 5, done
        p._reserved -= set(partial)
        assert p.scrub() == []
    finally:
        p.detach_fast()
        fm.close()
        p.close()


def test_what_stays_free_is_a_tenth_of_the_filesystem_within_bounds():
    """The reservoir and the intent log leave a tenth of the pool's
    filesystem free, never less than 256 MiB (a small one) nor more than
    4 GiB (a large host disk with tens of GiB free must not send every
    write down the slow path)."""
    from vdisk.engine.allocator import keep_free

    GiB = 1 << 30
    assert keep_free(1 * GiB) == 256 << 20
    assert keep_free(20 * GiB) == 2 * GiB
    assert keep_free(252 * GiB) == 4 * GiB
