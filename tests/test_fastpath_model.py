"""The engine's C fast path (csrc/fastmap.c) against the same in-memory model.

FastPoolModel runs every rule of the engine's model test (writes, discards,
commits in three steps, snapshots, rollbacks, clones, deletions, power cuts)
with a FastMap attached (log flushes and crashes during them included), and
adds reads, writes and fsyncs served by the C fast path
the way the FUSE layer does: in C when it can, by the Pool when C hands the
request back.  A tiny reservoir makes C run dry often.  Every read, through
either path, must match the model; scrub must stay clean.  C writes bypass
the power-cut simulation (they always "survive" until the next sync): a
subset of what a real power cut may do.  C's log records are written and
fdatasync()ed by C, so they survive too, except where a rule makes the
fdatasync fail (crash_in_fast_fsync).
"""
import contextlib
import os

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from test_engine_model import SIZE, PoolModel, lengths, model_settings, offsets, pattern
from vdisk.engine import structure
from vdisk.engine.errors import ChecksumError, EngineError
from vdisk.engine.fastmap import WINDOW, FastMap
from vdisk.engine.format import DB_MAP
from vdisk.engine.pool import BLOCK_SIZE, Pool


# writes of a few pages or less, at any sector: what flips a backed block
small_offsets = st.integers(0, SIZE // 512 - 1).map(lambda s: s * 512)
small_lengths = st.sampled_from([512, 4096, 8192, 3 * 4096 + 512])


class FastPoolModel(PoolModel):
    RESERVOIR = 4  # tiny: C runs dry often

    fm = None

    def _opened(self):
        super()._opened()
        if self.fm is not None:  # the map of the pool a power cut dropped
            self.fm.close()
        self.fm = FastMap(self.pool.file.fd, reservoir=self.RESERVOIR)
        self.pool.attach_fast(self.fm)

    def teardown(self):
        self.pool.detach_fast()
        self.fm.close()
        super().teardown()

    def _fast_write(self, vid, off, n, seed):
        if vid not in self.model:
            return
        n = min(n, SIZE - off)
        data = pattern(seed, n)
        if not self.fm.write(vid, off, data):
            self.pool.write(vid, off, data)  # what the FUSE layer does on -EAGAIN
        self.model[vid][off : off + n] = data

    @rule(vid=PoolModel.vols, off=offsets, n=lengths, seed=st.integers(0, 5))
    def fast_write(self, vid, off, n, seed):
        self._fast_write(vid, off, n, seed)

    @rule(vid=PoolModel.vols, off=offsets, n=lengths, seed=st.integers(0, 5))
    def fast_write_more(self, vid, off, n, seed):
        self._fast_write(vid, off, n, seed)

    @precondition(lambda self: self.job is None)
    @rule(vid=PoolModel.vols, seed=st.integers(1, 5))
    def fill_and_commit(self, vid, seed):
        """A volume written whole and committed: its blocks are the head's
        own and whole, so that small writes then make backed entries, and
        small writes after their commit flip (csrc/fastmap.c, FLIP)."""
        if vid in self.model:
            self._fast_write(vid, 0, SIZE, seed)
            self.pool.commit()
            self._durable_now()

    @rule(vid=PoolModel.vols, off=small_offsets, n=small_lengths, seed=st.integers(0, 5))
    def small_fast_write(self, vid, off, n, seed):
        self._fast_write(vid, off, n, seed)

    @rule(vid=PoolModel.vols, off=small_offsets, n=small_lengths, seed=st.integers(0, 5))
    def small_fast_write_more(self, vid, off, n, seed):
        self._fast_write(vid, off, n, seed)

    @rule(vid=PoolModel.vols, off=offsets, n=lengths)
    def fast_read(self, vid, off, n):
        if vid not in self.model:
            return
        n = min(n, SIZE - off)
        got = self.fm.read(vid, off, n)
        if got is None:
            got = self.pool.read(vid, off, n)
        assert got == bytes(self.model[vid][off : off + n]), "volume %d differs at %d+%d" % (vid, off, n)

    @rule()
    def refill(self):
        self.pool.refill_fast()

    @rule(vid=PoolModel.vols)
    def fast_fsync(self, vid):
        """An fsync as the FUSE layer serves it: a log flush written by C
        when it can, else by the Pool (else the daemon would commit)."""
        if vid in self.model and (self.fm.fsync(vid) or self.pool.log_flush(vid)):
            self._flushed(vid)

    @rule(vid=PoolModel.vols)
    def fast_fsync_more(self, vid):
        self.fast_fsync(vid)

    @precondition(lambda self: self.job is None)
    @rule(vid=PoolModel.vols, mode=st.sampled_from(["drop", "tear", "keep"]), seed=st.integers(0, 1000))
    def crash_in_fast_fsync(self, vid, mode, seed):
        """The power goes while C's log record is being synced (the record
        was written, so it may come back): the volume reads as before the
        flush or as after it."""
        if vid not in self.model:
            return
        self._fail_next_log_sync()
        if self.fm.fsync(vid):  # nothing to write: it never synced
            self._flushed(vid)
        self.pool.intent.fail_next(False)
        self._power_cut(mode, seed, maybe={vid: bytes(self.model[vid])})

    @invariant()
    def fast_reads_agree(self):
        for vid, data in self.model.items():
            got = self.fm.read(vid, 0, SIZE)
            assert got is None or got == bytes(data), "volume %d differs in C" % vid


FastPoolModel.TestCase.settings = model_settings(50)
TestFastPoolModel = FastPoolModel.TestCase


def without_rules(*names):
    """A class decorator: the named rules of a state machine become plain
    methods that do nothing, which hypothesis leaves out of the subclass."""
    def nothing(self, *args, **kwargs):
        pass

    def apply(cls):
        for name in names:
            setattr(cls, name, nothing)
        return cls
    return apply


@without_rules("snapshot", "rollback", "clone", "delete_snapshot", "delete_volume")
class LogModel(FastPoolModel):
    """The same machine without snapshots, clones, rollbacks and deletions,
    so that its steps are mostly writes through both paths, reads, log
    flushes, commits that succeed or fail, and crashes: the intent log's
    interleavings come up far more often than among all the rules."""


LogModel.TestCase.settings = model_settings(50)
TestLogModel = LogModel.TestCase


@without_rules("write_more", "log_flush_more")
class CFlushModel(LogModel):
    """LogModel with most writes served in C (a larger reservoir, fewer
    Python-side writes), so that volumes stay "clean" and C writes their
    log flushes itself (FastMap.fsync) between commits, Python writes and
    Python log flushes, crashes included."""

    RESERVOIR = 64


CFlushModel.TestCase.settings = model_settings(50)
TestCFlushModel = CFlushModel.TestCase


@without_rules("write_more", "fast_write_more", "log_flush_more", "fill_and_commit", "rollback", "clone",
               "delete_volume")
class FlipModel(FastPoolModel):
    """FastPoolModel over one volume written whole and committed first,
    with mostly small writes served in C: its blocks become backed
    entries at the next commit, and writes after that flip them (each
    page into the place of the block's two slots the durable map does not
    use, csrc/fastmap.c).  Commits in flight (whose flipped pages must not
    flip again until durable), failed ones (whose flips go back under the
    overlay), snapshots and their deletion (which stop and restart the
    flips), log flushes in C and crashes come between."""

    RESERVOIR = 64

    def create(self):  # once (first_volume): a plain method, not a rule here
        vid = self.pool.create_volume(SIZE)
        data = pattern(3, SIZE)
        if not self.fm.write(vid, 0, data):
            self.pool.write(vid, 0, data)
        self.pool.commit()
        self.model[vid] = bytearray(data)
        self._durable_now()
        return vid

    @precondition(lambda self: self.job is None)
    @rule(vid=PoolModel.vols,
          writes=st.lists(st.tuples(small_offsets, small_lengths, st.integers(0, 5)), min_size=1, max_size=6))
    def commit_then_small_writes(self, vid, writes):
        """A commit and small writes after it: the commonest way to flips."""
        self.commit()
        for off, n, seed in writes:
            self._fast_write(vid, off, n, seed)

    @precondition(lambda self: self.job is None)
    @rule(vid=PoolModel.vols,
          writes=st.lists(st.tuples(small_offsets, small_lengths, st.integers(0, 5)), min_size=1, max_size=6))
    def commit_then_small_writes_more(self, vid, writes):
        self.commit_then_small_writes(vid, writes)

    job_snap = None  # (vid, its data) of a snapshot whose commit is in flight

    @precondition(lambda self: self.job is None)
    @rule(vid=PoolModel.vols)
    def begin_snapshot(self, vid):
        """A snapshot whose commit is in flight while writes go on, as the
        daemon runs it (in a worker): nothing may flip meanwhile, since the
        snapshot point will see the blocks.  finish_commit ends it."""
        if vid not in self.model:
            return
        changes = []
        self.pool.commit = changes.append  # structure.snapshot's change, not committed here
        try:
            structure.snapshot(self.pool, [vid])
        finally:
            del self.pool.commit
        self.begin_commit(changes[0])
        self.job_snap = (vid, bytes(self.model[vid]))

    def _opened(self):
        super()._opened()
        self.job_snap = None  # a power cut dropped the job

    def _job_durable(self):
        super()._job_durable()
        if self.job_snap is not None:
            (sid,) = self.job.result
            self.snapdata[sid] = self.job_snap[1]
            self.job_snap = None


FlipModel.TestCase.settings = model_settings(50)
TestFlipModel = FlipModel.TestCase


def test_fast_path_serves_in_c(tmp_path):
    """Not a model: once a block is known, C serves reads and writes of it,
    copies on write after a commit, and hands back what it cannot serve."""
    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=8)
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(4 * BLOCK_SIZE)
        assert fm.read(vid, 0, 4096) == bytes(4096)  # a new volume: what C does not know is zeros
        assert fm.write(vid, 0, b"a" * BLOCK_SIZE)  # a whole block needs no base
        assert fm.write(vid, 100, b"b" * 10)  # in place
        pool.commit()
        assert fm.write(vid, 200, b"c" * 10)  # copy-on-write from the committed slot
        st_ = fm.stats()
        assert st_["copy_on_write"] == 1 and st_["writes"] == 3, st_
        assert not fm.write(vid, 4 * BLOCK_SIZE - 10, b"x" * 20)  # past the end: handed back
        want = bytearray(b"a" * BLOCK_SIZE)
        want[100:110] = b"b" * 10
        want[200:210] = b"c" * 10
        assert pool.read(vid, 0, BLOCK_SIZE) == want
        pool.commit()
        assert pool.scrub() == []
        pool.detach_fast()
        assert fm.read(vid, 0, 10) is None  # detached: serves nothing
    finally:
        fm.close()
        pool.close()


def test_c_copies_only_the_pages_written_after_a_snapshot(tmp_path):
    """Not a model: after a snapshot, C writes 4 KiB into a block the
    snapshot shares by giving it a slot of its own pages (a partial entry
    over the snapshot's slot), takes more pages into that slot in place
    (one written in part gets the rest from the snapshot), serves reads
    that mix both, and the commit records a partial entry that reads the
    same.  After a second snapshot, a write over that partial entry takes
    only the page written too: a view of three slots, which C serves."""
    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=8)
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(4 * BLOCK_SIZE)
        old = bytes(range(256)) * (3 * BLOCK_SIZE // 256)
        pool.write(vid, 0, old)
        (sid,) = pool.snapshot([vid])
        assert pool.read(vid, 0, 3 * BLOCK_SIZE) == old  # C learns the blocks (shared with the snapshot)
        want = bytearray(old)
        before = pool.file.allocated_bytes()
        assert fm.write(vid, 8192, b"n" * 4096)  # a partial copy-on-write in C
        want[8192:12288] = b"n" * 4096
        assert fm.write(vid, 3 * 4096 + 100, b"m" * 50)  # in place, a page written in part
        want[3 * 4096 + 100 : 3 * 4096 + 150] = b"m" * 50
        assert fm.read(vid, 0, BLOCK_SIZE) == want[:BLOCK_SIZE]
        assert pool.file.allocated_bytes() - before <= 2 * 4096 * 2
        st_ = fm.stats()
        assert st_["copy_on_write"] == 1, st_
        pool.commit()
        lid = pool._vols[vid]["lid"]
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            chain = pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, 0)
        assert len(chain) == 2 and chain[0][1] == 0b1100, chain  # pages 2 and 3, over the snapshot's block
        assert pool.read(vid, 0, 3 * BLOCK_SIZE) == want
        assert pool.read_snapshot(sid, 0, 3 * BLOCK_SIZE) == old
        assert pool.scrub() == []
        assert fm.read(vid, 0, BLOCK_SIZE) == want[:BLOCK_SIZE]
        pool.snapshot([vid])
        assert fm.write(vid, 5 * 4096, b"k" * 4096)
        want[5 * 4096 : 6 * 4096] = b"k" * 4096
        pool.commit()
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            chain = pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, 0)
        # only the page written, over the point's partial entry over its block
        assert [m for _, m, _ in chain] == [0b100000, 0b1100, 0xFFFF], chain
        assert pool.read(vid, 0, BLOCK_SIZE) == want[:BLOCK_SIZE]
        assert fm.read(vid, 0, BLOCK_SIZE) == want[:BLOCK_SIZE]
        pool.delete_snapshot(sid)
        assert pool.scrub() == []
        assert pool.read(vid, 0, 3 * BLOCK_SIZE) == want
    finally:
        pool.detach_fast()
        fm.close()
        pool.close()


def test_c_copies_the_layer_that_shows_the_fewest_over_a_view_of_four(tmp_path):
    """Not a model: a block written through C after each of four
    snapshots.  The second and third writes take only their pages (views
    of three and four slots); the fourth finds the point's view of four
    (top: two pages, middles: three and one, bottom: the whole block) and
    copies the lower middle's one page into the new slot, not the top's
    two, so that the new slot reads through the others.  Every snapshot
    reads what it held, through the Pool and after a reopening; scrub is
    clean.  Copying the top every time copied more with every snapshot
    (the bench's after-snapshot runs slowed down run after run)."""
    pool = Pool(str(tmp_path), fast=False)
    chains = []
    with fast_path(pool, reservoir=16) as fm:
        vid = pool.create_volume(BLOCK_SIZE)
        lid = pool._vols[vid]["lid"]
        want = bytearray(bytes(range(256)) * (BLOCK_SIZE // 256))
        pool.write(vid, 0, want)
        views, sids = [], []
        for pages in ([1], [4, 5, 6], [9, 10], [12]):
            sids.append(pool.snapshot([vid])[0])
            views.append(bytes(want))
            assert fm.read(vid, 0, BLOCK_SIZE) == want  # C learns the block as the head sees it
            for pg in pages:
                data = bytes([pg + 1]) * 4096
                assert fm.write(vid, pg * 4096, data)
                want[pg * 4096 : (pg + 1) * 4096] = data
            pool.commit()
            with pool.env.begin(db=pool._db[DB_MAP]) as txn:
                chains.append([m for _, m, _ in pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, 0)])
            assert fm.read(vid, 0, BLOCK_SIZE) == want
        assert chains[1] == [0b1110000, 0b10, 0xFFFF], chains  # only the pages written
        assert chains[2] == [0b11 << 9, 0b1110000, 0b10, 0xFFFF], chains  # a view of four
        # page 1 copied up from the lower middle, which the chain now hides
        assert chains[3] == [1 << 12 | 1 << 1, 0b11 << 9, 0b1110000, 0xFFFF], chains
        assert fm.stats()["copy_on_write"] == 4, fm.stats()  # one a snapshot: pages 5 and 6 in place
        assert pool.read(vid, 0, BLOCK_SIZE) == want
        for sid, view in zip(sids, views):
            assert pool.read_snapshot(sid, 0, BLOCK_SIZE) == view
        assert pool.scrub() == []
    again = Pool(str(tmp_path), fast=False)
    try:
        assert again.read(vid, 0, BLOCK_SIZE) == want
        for sid, view in zip(sids, views):
            assert again.read_snapshot(sid, 0, BLOCK_SIZE) == view
    finally:
        again.close()


def test_c_copies_only_the_pages_written_after_a_commit(tmp_path):
    """Not a model: with no snapshot, C writes 4 KiB into a block the head
    holds whole and committed by giving it a slot of its own pages over the
    old one, which the commit keeps as the entry's back slot.  A write of
    more than COALESCE_PAGES pages copies the block whole instead.  A
    partial write over a block a commit in flight holds whole reads the
    rest from it, and takes it into its own slot when that commit fails."""
    from vdisk.engine.errors import NotFound
    from vdisk.engine.fastmap import COALESCE_PAGES

    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=8)
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(4 * BLOCK_SIZE)
        want = bytearray(bytes(range(256)) * (3 * BLOCK_SIZE // 256))
        pool.write(vid, 0, want)
        pool.commit()
        assert pool.read(vid, 0, 3 * BLOCK_SIZE) == want  # C learns the blocks (the head's own)
        before = pool.file.allocated_bytes()
        assert fm.write(vid, 8192, b"n" * 4096)
        want[8192:12288] = b"n" * 4096
        assert fm.read(vid, 0, BLOCK_SIZE) == want[:BLOCK_SIZE]
        assert pool.file.allocated_bytes() - before <= 2 * 4096
        assert fm.stats()["copy_on_write"] == 1
        n = (COALESCE_PAGES + 1) * 4096
        assert fm.write(vid, BLOCK_SIZE, b"c" * n)  # more than COALESCE_PAGES: whole
        want[BLOCK_SIZE : BLOCK_SIZE + n] = b"c" * n
        pool.commit()
        lid = pool._vols[vid]["lid"]
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            chains = [pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, b) for b in range(2)]
        assert [m for _, m, _ in chains[0]] == [0b100, 0xFFFF & ~0b100], chains  # page 2 over its back slot
        assert [m for _, m, _ in chains[1]] == [0xFFFF], chains
        assert pool.read(vid, 0, 3 * BLOCK_SIZE) == want
        assert fm.read(vid, 0, 3 * BLOCK_SIZE) == want
        assert pool.scrub() == []

        def refuse(tx):
            raise NotFound("refused on purpose")

        pool.write(vid, 2 * BLOCK_SIZE, b"f" * BLOCK_SIZE)  # a fresh whole block, frozen next
        want[2 * BLOCK_SIZE :] = b"f" * BLOCK_SIZE
        job = pool.begin_commit(refuse)
        assert fm.write(vid, 2 * BLOCK_SIZE + 4096, b"g" * 4096)  # over the frozen block
        want[2 * BLOCK_SIZE + 4096 : 2 * BLOCK_SIZE + 8192] = b"g" * 4096
        assert fm.read(vid, 2 * BLOCK_SIZE, BLOCK_SIZE) == want[2 * BLOCK_SIZE :]
        job.run()
        with pytest.raises(NotFound):
            pool.finish_commit(job)
        if not fm.write(vid, 3 * BLOCK_SIZE, b"r" * BLOCK_SIZE):  # it may take the slot given back
            pool.write(vid, 3 * BLOCK_SIZE, b"r" * BLOCK_SIZE)
        want += b"r" * BLOCK_SIZE
        assert fm.read(vid, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE) == want[2 * BLOCK_SIZE :]
        pool.commit()
        assert pool.read(vid, 0, 4 * BLOCK_SIZE) == want
        assert pool.scrub() == []
    finally:
        pool.detach_fast()
        fm.close()
        pool.close()


@pytest.mark.parametrize("where", ["slot", "back slot"])
def test_a_block_flipped_all_zeros_keeps_its_checksum(tmp_path, where):
    """Found by the model test (CFlushModel): a committed backed block
    whose pages C flips until the block is all zeros keeps its two slots
    (flips never make a zero block), so the commit must record the
    checksum of those zeros; the commit's checksumming gives none (0) for
    a whole block of zeros, which scrub, C's verification and every read
    then found wrong.  All the pages in the slot (the block's last page
    flipped into it), or all in the back slot (its only page in the slot
    flipped out).  Fails without commit.ZERO_BLOCK_CRC (for the slot, and
    for the back slot): a checksum mismatch at scrub, the block
    unreadable."""
    path = str(tmp_path / "p")
    pool = Pool(path, fast=False)
    with fast_path(pool, reservoir=16) as fm:
        vid = pool.create_volume(BLOCK_SIZE)
        first = b"\x01" * 4096 + bytes(BLOCK_SIZE - 4096)
        if where == "slot":
            first = b"\x01" * BLOCK_SIZE
        assert fm.write(vid, 0, first)
        pool.commit()
        half = BLOCK_SIZE // 2
        if where == "slot":  # pages 8-15 zeros over the whole block: a backed entry, pages 0-7 in the back slot
            assert fm.write(vid, half, bytes(half))
        else:  # page 0 over the whole block: a backed entry, pages 1-15 (zeros) in the back slot
            assert fm.write(vid, 0, b"\x02" * 4096)
        pool.commit()
        flips = fm.stats()["flips"]
        # flipped: pages 0-7 into the slot, or page 0 into the back slot; the block is all zeros
        assert fm.write(vid, 0, bytes(half if where == "slot" else 4096))
        assert fm.stats()["flips"] == flips + 1
        pool.commit()
        assert pool.scrub() == []
        assert pool.read(vid, 0, BLOCK_SIZE) == bytes(BLOCK_SIZE)
        assert fm.read(vid, 0, BLOCK_SIZE) in (None, bytes(BLOCK_SIZE))
    pool.close()
    again = Pool(path, fast=False)  # nothing verified yet: every read checks the map's checksums
    try:
        assert again.read(vid, 0, BLOCK_SIZE) == bytes(BLOCK_SIZE)
        assert again.scrub() == []
    finally:
        again.close()


def test_c_flips_a_committed_backed_block_instead_of_copying(tmp_path):
    """Not a model: once a block is a committed backed entry the head owns
    (a slot of the pages written over its own whole block), C writes each
    page into the place of the two slots the durable map does not use for
    it (a flip): no slot is taken and nothing is copied, commit after
    commit.  A page flipped in the epoch of a commit in flight is copied
    on write instead (both its places are in use until that commit is
    durable); a snapshot stops the flips.  Reads through C and the Pool,
    scrub and a reopening agree at every step."""
    path = str(tmp_path / "p")
    pool = Pool(path, fast=False)
    with fast_path(pool, reservoir=16) as fm:
        vid = pool.create_volume(2 * BLOCK_SIZE)
        lid = pool._vols[vid]["lid"]
        want = bytearray(bytes(range(256)) * (2 * BLOCK_SIZE // 256))
        assert fm.write(vid, 0, want)
        pool.commit()
        assert fm.write(vid, 4096, b"a" * 4096)  # a copy-on-write of that page only
        want[4096:8192] = b"a" * 4096
        pool.commit()  # a backed entry: page 1 over the whole block
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            (slot, _, _), (back, _, _) = pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, 0)
        cow = fm.stats()["copy_on_write"]
        for rnd in range(3):  # page 1 in the slot, page 2 in the back slot, half of page 3
            for off, n in ((4096, 4096), (8192, 4096), (3 * 4096 + 1024, 512)):
                data = bytes([rnd * 16 + off // 4096]) * n
                assert fm.write(vid, off, data)
                want[off : off + n] = data
                assert fm.read(vid, 0, BLOCK_SIZE) == want[:BLOCK_SIZE]
            assert pool.read(vid, 0, 2 * BLOCK_SIZE) == want
            pool.commit()
            with pool.env.begin(db=pool._db[DB_MAP]) as txn:
                chain = pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, 0)
            assert [s for s, _, _ in chain] == [slot, back], chain  # the same two slots
            assert pool.scrub() == []
        st_ = fm.stats()
        assert st_["copy_on_write"] == cow and st_["flips"] == 9, st_
        # a commit in flight holds page 1 flipped in its epoch
        assert fm.write(vid, 4096, b"b" * 4096)
        want[4096:8192] = b"b" * 4096
        job = pool.begin_commit()
        assert fm.write(vid, 8192, b"c" * 4096)  # not flipped in that epoch: flips
        assert fm.write(vid, 4096, b"d" * 4096)  # flipped in it: copied instead
        want[8192:12288], want[4096:8192] = b"c" * 4096, b"d" * 4096
        assert fm.stats()["copy_on_write"] == cow + 1 and fm.stats()["flips"] == 11, fm.stats()
        assert fm.read(vid, 0, BLOCK_SIZE) == want[:BLOCK_SIZE]
        job.run()
        pool.finish_commit(job)
        pool.commit()
        assert pool.read(vid, 0, 2 * BLOCK_SIZE) == want
        assert pool.scrub() == []
        (sid,) = pool.snapshot([vid])
        old = bytes(want)
        pool.commit()
        flips = fm.stats()["flips"]
        assert fm.write(vid, BLOCK_SIZE + 4096, b"e" * 4096)  # block 1: a copy-on-write over the point's
        assert fm.write(vid, 4096, b"f" * 4096)
        want[BLOCK_SIZE + 4096 : BLOCK_SIZE + 8192], want[4096:8192] = b"e" * 4096, b"f" * 4096
        assert fm.stats()["flips"] == flips, fm.stats()  # the point sees both blocks
        pool.commit()
        assert pool.read_snapshot(sid, 0, 2 * BLOCK_SIZE) == old
        assert pool.read(vid, 0, 2 * BLOCK_SIZE) == want
        assert pool.scrub() == []
    pool = Pool(path)  # fast_path closed it
    try:
        assert pool.read(vid, 0, 2 * BLOCK_SIZE) == want
        assert pool.read_snapshot(sid, 0, 2 * BLOCK_SIZE) == old
    finally:
        pool.close()


def test_a_write_over_a_block_a_commit_finds_zeros_reads_zeros_below(tmp_path):
    """Found by the model test: C writes 512 bytes over a whole block that a
    commit in flight holds (a partial slot over it); that commit finds the
    block all zeros and drops it, which also ends what the last snapshot
    saw of the block in the head.  The partial write must read zeros below
    it from then on, not the snapshot's data."""
    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=8)
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(4 * BLOCK_SIZE)
        pool.write(vid, BLOCK_SIZE + 4096, b"x" * 4096)
        (sid,) = pool.snapshot([vid])
        pool.write(vid, BLOCK_SIZE, bytes(BLOCK_SIZE - 512))  # all zeros, in a slot of its own
        job = pool.begin_commit()
        assert fm.write(vid, BLOCK_SIZE, b"n" * 512)  # over the frozen block
        job.run()
        pool.finish_commit(job)  # finds it zeros
        want = b"n" * 512 + bytes(BLOCK_SIZE - 512)
        assert fm.read(vid, BLOCK_SIZE, BLOCK_SIZE) == want
        pool.commit()
        assert pool.read(vid, BLOCK_SIZE, BLOCK_SIZE) == want
        assert fm.read(vid, BLOCK_SIZE, BLOCK_SIZE) == want
        assert pool.read_snapshot(sid, BLOCK_SIZE + 4096, 4096) == b"x" * 4096
        assert pool.scrub() == []
    finally:
        pool.detach_fast()
        fm.close()
        pool.close()


def test_c_checksums_the_partial_slots_it_writes(tmp_path):
    """C gives the engine the checksum of each new partial slot it writes
    (the drain's crc word), so that the commit need not read those slots
    back: the overlay takes it as the slot's checksum, the commit records
    it, and the data reads back and scrubs clean.  A slot of zeros pages
    gets none (the commit still finds such blocks), nor does a slot
    written in place after its record: the engine hears that its checksum
    no longer holds (fails when C keeps telling a stale one: a wrong
    checksum in the map)."""
    from vdisk.engine import native

    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=8)
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(16 * BLOCK_SIZE)
        lid = pool._vols[vid]["lid"]
        a, c, d = b"a" * 4096, bytes(range(256)) * 16, b"d" * 10
        assert fm.write(vid, BLOCK_SIZE + 4096, a)  # a page of block 1: its slot's checksum known
        assert fm.write(vid, 2 * BLOCK_SIZE + 8192, bytes(4096))  # zeros in block 2: not known
        assert fm.write(vid, 3 * BLOCK_SIZE, c)  # block 3, then in place: known, then not
        with pool._fast():  # takes C's records in
            ov = pool._dirty[lid]
            assert (ov[1].crc_ok, ov[1].crc, ov[1].have) == (True, native.crc32c(a), 0b10)
            assert (ov[3].crc_ok, ov[3].crc) == (True, native.crc32c(c))
            assert not ov[2].crc_ok
        assert fm.write(vid, 3 * BLOCK_SIZE + 100, d)
        with pool._fast():
            assert not pool._dirty[lid][3].crc_ok, "C wrote block 3 in place after telling its checksum"
        want = bytearray(4 * BLOCK_SIZE)
        want[BLOCK_SIZE + 4096 : BLOCK_SIZE + 8192] = a
        want[3 * BLOCK_SIZE : 3 * BLOCK_SIZE + 4096] = c
        want[3 * BLOCK_SIZE + 100 : 3 * BLOCK_SIZE + 110] = d
        pool.commit()
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            chain = pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, 1)
        assert [(slot_mask, crc) for _, slot_mask, crc in chain][:1] == [(0b10, native.crc32c(a))], chain
        assert pool.read(vid, 0, 4 * BLOCK_SIZE) == want
        assert pool.scrub() == []
        pool.close()
        pool = Pool(str(tmp_path))  # read back by a pool that verifies what it reads
        assert pool.read(vid, 0, 4 * BLOCK_SIZE) == want
        assert pool.scrub() == []
    finally:
        if pool._fm is fm:
            pool.detach_fast()
        fm.close()
        pool.close()


def test_c_serves_a_new_volume_from_its_first_write(tmp_path):
    """A volume created while the fast path is attached holds nothing: C
    reads its unknown blocks as zeros and writes 4 KiB into one as a
    partial slot of its own, from the first request on; once the table
    forgets one of its blocks, unknown blocks go back to the Pool."""
    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=8)
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(16 * BLOCK_SIZE)
        assert fm.read(vid, 3 * BLOCK_SIZE, 8192) == bytes(8192)
        before = pool.file.allocated_bytes()
        assert fm.write(vid, BLOCK_SIZE + 4096, b"a" * 4096)
        assert fm.write(vid, 2 * BLOCK_SIZE + 10, b"b" * 10)  # a page in part: the rest zeros
        assert pool.file.allocated_bytes() - before <= 2 * 4096 * 2
        want = bytearray(8 * BLOCK_SIZE)
        want[BLOCK_SIZE + 4096 : BLOCK_SIZE + 8192] = b"a" * 4096
        want[2 * BLOCK_SIZE + 10 : 2 * BLOCK_SIZE + 20] = b"b" * 10
        assert fm.read(vid, 0, 8 * BLOCK_SIZE) == want
        pool.commit()
        assert pool.read(vid, 0, 8 * BLOCK_SIZE) == want
        assert pool.scrub() == []
        assert fm.read(vid, 12 * BLOCK_SIZE, 4096) == bytes(4096)
        fm.forget(vid, 1)  # the table forgets a block: unknown is unknown again
        assert fm.read(vid, 12 * BLOCK_SIZE, 4096) is None
        assert pool.read(vid, 0, 8 * BLOCK_SIZE) == want
        # a volume that existed when the fast path was attached is not new
        pool.detach_fast()
        fm2 = FastMap(pool.file.fd, reservoir=8)
        try:
            pool.attach_fast(fm2)
            assert fm2.read(vid, 12 * BLOCK_SIZE, 4096) is None
            pool.detach_fast()
        finally:
            fm2.close()
    finally:
        pool.detach_fast()
        fm.close()
        pool.close()


def test_io_threads_with_commits_between(tmp_path):
    """Two threads write through C at once (in place, and copy-on-write after
    every commit) while this thread commits in three steps and refills the
    reservoir, as the daemon does; afterwards every block holds what its
    writer wrote last, through C and through the Pool, and scrub is clean."""
    import threading

    import sys

    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=256)
    nblocks, rounds = 16, 400
    datas = [[[(b"%d:%d:%d;" % (t, r, b) * 600)[:4096] for b in range(nblocks)] for r in range(rounds)] for t in (0, 1)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the writers' C calls as much as possible
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(2 * nblocks * BLOCK_SIZE)
        pool.read(vid, 0, 2 * nblocks * BLOCK_SIZE)  # C learns every block (holes)
        last = {}
        errors = []

        enough = threading.Event()  # the writers go on until several commits came between

        def writer(t):
            try:
                r = 0
                while r < rounds or not enough.is_set():
                    for b in range(nblocks):
                        off = (t * nblocks + b) * BLOCK_SIZE + (r % 16) * 4096
                        data = datas[t][r % rounds][b]
                        while not fm.write(vid, off, data):  # handed back: wait for a refill
                            pass
                        last[off] = data
                    r += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in (0, 1)]
        for th in threads:
            th.start()
        commits = 0
        while any(th.is_alive() for th in threads):
            pool.refill_fast()
            job = pool.begin_commit()
            job.run()
            pool.finish_commit(job)
            commits += 1
            if commits > 5:
                enough.set()
        for th in threads:
            th.join()
        assert not errors, errors
        assert commits > 3 and fm.stats()["copy_on_write"] > nblocks, (commits, fm.stats())
        for off, data in last.items():
            assert pool.read(vid, off, len(data)) == data
            assert fm.read(vid, off, len(data)) == data
        pool.commit()
        assert pool.scrub() == []
    finally:
        sys.setswitchinterval(switch)
        pool.detach_fast()
        fm.close()
        pool.close()


@contextlib.contextmanager
def _writers_in_c(fm, vids, nblocks, last):
    """For the body: a thread per volume of vids writing through C as
    the I/O threads do, round after round, page r % 16 of each of its
    first nblocks blocks (again while C hands it back, until a refill or
    a teach), each write noted in last[vid, offset].  The switch interval
    is made short, so that their C calls interleave with the body's.  The
    threads are stopped and joined when the body ends, even when it fails;
    an error in one of them fails the test."""
    import sys
    import threading

    errors: list = []
    stop = threading.Event()

    def writer(v):
        try:
            r = 0
            while not stop.is_set():
                for b in range(nblocks):
                    off = b * BLOCK_SIZE + (r % 16) * 4096
                    data = (b"%d:%d:%d;" % (v, r, b) * 600)[:4096]
                    while not fm.write(v, off, data):  # handed back: wait for a refill or a teach
                        if stop.is_set():
                            return
                    last[v, off] = data
                r += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=writer, args=(v,)) for v in vids]
    for th in threads:
        th.start()
    try:
        yield
    finally:
        stop.set()
        for th in threads:
            th.join()
        sys.setswitchinterval(switch)
    assert not errors, errors


@contextlib.contextmanager
def _two_volumes_in_c(tmp_path, nblocks):
    """For the body: a pool with a FastMap attached (a reservoir of 256)
    and two new volumes of nblocks blocks, as (pool, fm, vid, other).
    Then the map is detached and the pool closed, or abandoned when the
    body failed (it may have left a commit in flight), and the map freed."""
    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=256)
    ok = False
    try:
        pool.attach_fast(fm)
        yield pool, fm, pool.create_volume(nblocks * BLOCK_SIZE), pool.create_volume(nblocks * BLOCK_SIZE)
        ok = True
    finally:
        pool.detach_fast()
        if ok:
            pool.close()
        else:
            pool._abandon()
        fm.close()


def test_discards_in_batches_while_io_threads_write(tmp_path, monkeypatch):
    """A discard lets go of the map's lock between batches of blocks
    (writepath.DISCARD_BATCH, 4 here), so C's I/O threads write meanwhile:
    one into another volume, one into the very blocks being discarded,
    while this thread discards its volume whole again and again, with the
    committed map, the overlay and a commit in flight all holding blocks
    of it.  Afterwards the other volume holds every write, each block of
    the discarded one reads zeros or the last write to it (never older
    data), the same after a reopen, and scrub is clean."""
    from vdisk.engine import writepath

    monkeypatch.setattr(writepath, "DISCARD_BATCH", 4)
    nblocks = 48
    with _two_volumes_in_c(tmp_path, nblocks) as (pool, fm, vid, other):
        pool.read(vid, 0, nblocks * BLOCK_SIZE)  # C learns every block (holes)
        pool.read(other, 0, nblocks * BLOCK_SIZE)
        last: dict = {}
        with _writers_in_c(fm, (vid, other), nblocks, last):  # interleaved with the batches
            for i in range(30):
                if i % 3 == 0:
                    pool.commit()  # the committed map holds blocks of it
                job = pool.begin_commit() if i % 3 == 1 else None  # and a commit in flight
                pool.refill_fast()
                pool.discard(vid, 0, nblocks * BLOCK_SIZE)
                pool.read(vid, 0, nblocks * BLOCK_SIZE)  # C learns the blocks again
                if job is not None:
                    job.run()
                    pool.finish_commit(job)
        zeros = bytes(4096)

        def check(p):
            for (v, off), data in last.items():
                got = p.read(v, off, 4096)
                if v == other:
                    assert got == data, (v, off)
                else:
                    assert got in (data, zeros), (v, off, got[:12])
            # pages never written since a discard read zeros or what was written last there
            for b in range(nblocks):
                for pg in range(16):
                    off = b * BLOCK_SIZE + pg * 4096
                    if (vid, off) not in last:
                        assert p.read(vid, off, 4096) == zeros

        check(pool)
        # once more with the writers stopped, on a new volume whose blocks
        # the committed map, a commit in flight and the overlay each hold
        # (some in two of them): all of it reads zeros
        fresh = pool.create_volume(nblocks * BLOCK_SIZE)
        half = nblocks // 2 * BLOCK_SIZE
        pool.write(fresh, 0, pattern(1, half))
        pool.commit()
        pool.write(fresh, half - BLOCK_SIZE, pattern(2, 2 * BLOCK_SIZE))
        job = pool.begin_commit()
        pool.write(fresh, half + BLOCK_SIZE, pattern(3, half - 2 * BLOCK_SIZE))
        pool.discard(fresh, 0, nblocks * BLOCK_SIZE)
        assert pool.read(fresh, 0, nblocks * BLOCK_SIZE) == bytes(nblocks * BLOCK_SIZE)
        job.run()
        pool.finish_commit(job)
        assert pool.read(fresh, 0, nblocks * BLOCK_SIZE) == bytes(nblocks * BLOCK_SIZE)
        pool.commit()
        assert pool.scrub() == []
    pool = Pool(str(tmp_path))
    try:
        check(pool)
        assert pool.read(fresh, 0, nblocks * BLOCK_SIZE) == bytes(nblocks * BLOCK_SIZE)
        assert pool.scrub() == []
    finally:
        pool.close()


def test_io_threads_share_blocks_across_copy_on_writes(tmp_path):
    """Four threads write 4 KiB pages of the same blocks through C at once,
    each its own pages, in rounds with a snapshot or a commit between: so
    the threads copy-on-write the same block at the same time, with their
    data written outside C's inner mutex.  Afterwards every page holds what
    its writer wrote last (a copy that raced another would lose the other's
    page), through C and through the Pool, and scrub is clean."""
    import sys
    import threading

    nthreads, nblocks, rounds = 4, 16, 400
    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=4 * nthreads * nblocks)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    start = threading.Barrier(nthreads + 1)
    done = threading.Barrier(nthreads + 1)
    try:
        pool.attach_fast(fm)
        vid = pool.create_volume(nblocks * BLOCK_SIZE)
        pool.write(vid, 0, bytes(range(256)) * (nblocks * BLOCK_SIZE // 256))
        pool.commit()
        pool.read(vid, 0, nblocks * BLOCK_SIZE)  # C learns every block
        last, errors = {}, []

        def writer(t):
            try:
                for r in range(rounds):
                    start.wait()
                    page = t + nthreads * (r % (16 // nthreads))  # this thread's pages only
                    for b in range(nblocks):
                        off = b * BLOCK_SIZE + page * 4096
                        data = (b"%d:%d:%d;" % (t, r, b) * 600)[:4096]
                        while not fm.write(vid, off, data):  # handed back: the reservoir is refilled below
                            pass
                        last[off] = data
                    done.wait()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                start.abort()
                done.abort()

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
        for th in threads:
            th.start()
        try:
            for r in range(rounds):  # every block's first write in a round is a copy-on-write
                pool.refill_fast()
                if r % 2:
                    pool.snapshot([vid])
                else:
                    pool.commit()
                start.wait()
                done.wait()
        except threading.BrokenBarrierError:
            pass
        for th in threads:
            th.join()
        assert not errors, errors
        assert fm.stats()["copy_on_write"] >= rounds * nblocks, fm.stats()
        for off, data in last.items():
            assert fm.read(vid, off, len(data)) in (data, None), "page at %d lost" % off  # None: handed back
            assert pool.read(vid, off, len(data)) == data, "page at %d lost" % off
        pool.commit()
        assert pool.scrub() == []
    finally:
        sys.setswitchinterval(switch)
        start.abort()
        done.abort()
        pool.detach_fast()
        fm.close()
        pool.close()


def test_an_io_thread_waits_for_slots_instead_of_handing_back(tmp_path):
    """An I/O thread's write that finds the reservoir empty waits for the
    Pool's refill and is then served in C (not handed back to Python,
    which would have to refill first anyway and serves writes far slower);
    when the fast path fails meanwhile, it gives up at once."""
    import threading
    import time

    pool = Pool(str(tmp_path), fast=False)
    with fast_path(pool, reservoir=4) as fm:
        vid = pool.create_volume(64 * BLOCK_SIZE)
        for b in range(4):  # a new volume: each first write takes a slot
            assert fm.write(vid, b * BLOCK_SIZE, b"x" * 4096)
        assert fm.reservoir() == 0
        assert not fm.write(vid, 4 * BLOCK_SIZE, b"y" * 4096)  # the engine's own thread: handed back
        handed = fm.stats()["handed_back"]
        result = []
        writer = threading.Thread(target=lambda: result.append(fm.write(vid, 5 * BLOCK_SIZE, b"z" * 4096,
                                                                        wait_for_slots=True)))
        writer.start()
        time.sleep(0.2)
        assert writer.is_alive() and not result, "the write did not wait for slots"
        pool.refill_fast()
        writer.join(5)
        assert result == [True]
        st = fm.stats()
        assert st["handed_back"] == handed
        # counted for `vdisk daemon status`: one wait, as long as the sleep at least
        assert st["reservoir_waits"] == 1
        assert 0.2e9 <= st["reservoir_wait_ns"] == st["reservoir_wait_max_ns"] < 5e9
        assert pool.read(vid, 5 * BLOCK_SIZE, 4096) == b"z" * 4096

        while fm.reservoir():  # empty again
            b = 6 + fm.stats()["writes"]
            assert fm.write(vid, b * BLOCK_SIZE, b"w" * 4096)
        writer = threading.Thread(target=lambda: result.append(fm.write(vid, 63 * BLOCK_SIZE, b"v" * 4096,
                                                                        wait_for_slots=True)))
        t0 = time.monotonic()
        writer.start()
        time.sleep(0.1)
        fm.set_failed(1)
        writer.join(5)
        assert result == [True, False] and time.monotonic() - t0 < 0.9


def test_a_refill_that_finds_no_room_sends_the_waiting_write_to_the_pool(tmp_path, monkeypatch):
    """When the pool's filesystem has no room to spare for C's reservoir
    (allocator.spare_bytes), a refill adds no slot; it must still wake the
    I/O thread waiting for one, which then hands its write to the Pool at
    once after its five tries (the Pool writes it, or answers ENOSPC),
    instead of waiting out a second for every write.  Fails when an empty
    refill is not told to C: the wait then ends by its one-second timeout."""
    import threading
    import time

    from vdisk.engine import allocator

    pool = Pool(str(tmp_path), fast=False)
    with fast_path(pool, reservoir=4) as fm:
        vid = pool.create_volume(64 * BLOCK_SIZE)
        for b in range(4):
            assert fm.write(vid, b * BLOCK_SIZE, b"x" * 4096)
        assert fm.reservoir() == 0
        monkeypatch.setattr(allocator, "spare_bytes", lambda pool: 0)  # nothing to grow into
        result = []
        writer = threading.Thread(target=lambda: result.append(fm.write(vid, 5 * BLOCK_SIZE, b"z" * 4096,
                                                                        wait_for_slots=True)))
        writer.start()
        deadline = time.monotonic() + 10
        while writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
            assert pool.refill_fast() == 0  # no room: no slot
        writer.join(1)
        assert result == [False], "the write was not handed back"
        st = fm.stats()
        assert st["reservoir_waits"] == 4, st  # it tried five times
        assert st["reservoir_wait_max_ns"] < 0.9e9, "a wait ran into its timeout: %s" % st
        pool.write(vid, 5 * BLOCK_SIZE, b"z" * 4096)  # the Pool's own thread writes it (Python)
        assert pool.read(vid, 5 * BLOCK_SIZE, 4096) == b"z" * 4096


def _learn(pool, vid, nblocks):
    """Read the volume's first nblocks blocks through the Pool, so that C's
    table learns every one of them."""
    for b in range(0, nblocks, 256):
        pool.read(vid, b * BLOCK_SIZE, min(256, nblocks - b) * BLOCK_SIZE)


def _learned_volume(pool, nblocks):
    """A volume of nblocks blocks, one page written every 97 blocks and
    committed, every block known to C: (vid, {block: the page at 8192})."""
    vid = pool.create_volume(nblocks * BLOCK_SIZE)
    written = {b: (b"%d;" % b * 2100)[:4096] for b in range(0, nblocks, 97)}
    for b, data in written.items():
        pool.write(vid, b * BLOCK_SIZE + 8192, data)
    pool.commit()
    _learn(pool, vid, nblocks)
    return vid, written


def test_c_grows_its_table_ahead_of_need(tmp_path):
    """The Pool's refill grows C's table once it is more than 3/8 full
    (vd_fm_grow), and every entry is still there after: C serves the same
    reads without handing any back."""
    nblocks = 30000  # > 3/8 of the first table (65536)
    pool = Pool(str(tmp_path), fast=False)
    with fast_path(pool, reservoir=64) as fm:
        vid, written = _learned_volume(pool, nblocks)
        n = fm.entries()
        assert n >= nblocks
        assert fm.grow() and not fm.grow()  # grown once; then less than 3/8 full
        assert fm.entries() == n
        handed = fm.stats()["handed_back"]
        for b, data in written.items():
            assert fm.read(vid, b * BLOCK_SIZE + 8192, 4096) == data
            assert fm.read(vid, b * BLOCK_SIZE, 4096) == bytes(4096)
        assert fm.stats()["handed_back"] == handed


def _home(vid, block, bits=17):
    """Where C's table of 2**bits positions looks for (vid, block) first
    (csrc/fastmap.c, mix)."""
    m = (1 << 64) - 1
    z = ((block * 0x9E3779B97F4A7C15) & m) ^ (((vid + 0x632BE59BD9B4E5) * 0xBF58476D1CE4E5B9) & m)
    z = ((z ^ (z >> 31)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 29)) & ((1 << bits) - 1)


def test_c_moves_its_outgrown_table_a_chunk_at_a_time(tmp_path):
    """A growth moves the old table's entries over in steps (the I/O
    threads wait for a chunk, never for the whole table): between the
    steps, C still finds every block - in the old table or the new - for
    reads and for writes, in place and copy-on-write, and nothing is lost
    or found twice once the move is done.  A lookup of a block C does not
    know ends even when every position left to move is taken (a lookup
    that walked the moved positions as a probe chain went round for ever
    there, holding the inner mutex: this test hangs on such a build)."""
    nblocks = 30000  # > 3/8 of the first table (65536 positions)
    pool = Pool(str(tmp_path), fast=False)
    with fast_path(pool, reservoir=4096) as fm:
        vid, written = _learned_volume(pool, nblocks)
        pool.refill_fast()  # fills the reservoir; grows the table at once (a whole step)
        while fm.grow():
            pass
        n = fm.entries()
        assert n >= nblocks
        # now the second growth, a step of 4096 positions of 131072 at a time
        more = 24000  # with the 30000: > 3/8 of 131072, < the half at which a write grows it
        vid2 = pool.create_volume(more * BLOCK_SIZE)
        _learn(pool, vid2, more)
        # a block whose home is the old table's last position: that position
        # is taken, so once it is the only one left to move, every position
        # not moved yet is taken (see the lookups at the end)
        last = next(b for b in range(1 << 24) if _home(vid2, b) == (1 << 17) - 1)
        pool.resize_volume(vid2, (last + 1) * BLOCK_SIZE)
        pool.read(vid2, last * BLOCK_SIZE, 4096)
        n = fm.entries()
        assert fm.grow(4096) and fm.grow(0)  # grown, and still moving
        handed = fm.stats()["handed_back"]
        for b, data in written.items():  # most are still in the old table
            assert fm.read(vid, b * BLOCK_SIZE + 8192, 4096) == data
            assert fm.read(vid, b * BLOCK_SIZE, 4096) == bytes(4096)
        news = {}
        for i, b in enumerate(list(written)[::2]):  # copy-on-write (committed blocks), then in place
            news[b] = (b"new %d;" % b * 700)[:4096]
            assert fm.write(vid, b * BLOCK_SIZE + (i % 4) * 4096, news[b])
            assert fm.write(vid, b * BLOCK_SIZE + (i % 4) * 4096, news[b][::-1])
            news[b] = (i % 4, news[b][::-1])
        for b in range(1, more, 61):
            assert fm.write(vid2, b * BLOCK_SIZE + 4096, b"%08d" % b * 512)
        assert fm.stats()["handed_back"] == handed
        assert fm.grow(0)  # the move is still under way
        steps = 0
        while fm.grow(4096) and steps < 25:
            steps += 1
        # the last positions one at a time, a lookup of a block C does not
        # know after each: a probe must end even when every position not
        # moved yet is taken (none of them is free to end its chain)
        vid3 = pool.create_volume(64 * BLOCK_SIZE)
        while fm.grow(1):
            steps += 1
            assert fm.read(vid3, (steps % 64) * BLOCK_SIZE, 4096) == bytes(4096)
        assert steps >= 20 and not fm.grow(0)
        assert fm.entries() == n
        for b, data in written.items():
            pg, new = news.get(b, (None, None))
            want = bytearray(BLOCK_SIZE)
            want[8192:12288] = data
            if new is not None:
                want[pg * 4096 : pg * 4096 + 4096] = new
            assert fm.read(vid, b * BLOCK_SIZE, BLOCK_SIZE) == bytes(want)
            assert pool.read(vid, b * BLOCK_SIZE, BLOCK_SIZE) == bytes(want)
        for b in range(1, more, 61):
            assert fm.read(vid2, b * BLOCK_SIZE + 4096, 4096) == b"%08d" % b * 512
        assert fm.stats()["handed_back"] == handed
        # each block is in the table once: forgotten, C no longer knows it
        with pool._fast():
            for b in written:
                fm.forget(vid, b)
        for b in written:
            assert fm.read(vid, b * BLOCK_SIZE + 8192, 4096) is None
        pool.commit()
        assert pool.scrub() == []


def test_a_trim_forgets_what_c_need_not_keep_and_c_learns_it_again(tmp_path):
    """C's table is a cache of bounded size: a trim (FastMap.trim, which
    the Pool's refill calls once it holds more than TRIM_AT entries; every
    entry here) forgets every block not written since the last freeze.
    A block of a new volume that C forgot is handed back, not read as
    zeros (its window's unknown blocks are no longer zeros to C; those of
    a window where nothing was forgotten still are); those
    written since the freeze stay, with the pages the volume's next log
    record needs, which C writes itself and a crash replays.  A read
    through the Pool teaches C again."""
    pool = Pool(str(tmp_path), fast=False)
    fm = FastMap(pool.file.fd, reservoir=64)
    pool.attach_fast(fm)
    nblocks = 40
    vid = pool.create_volume(2 * WINDOW * BLOCK_SIZE)  # new: C takes its unknown blocks as zeros
    want = bytearray(2 * WINDOW * BLOCK_SIZE)
    for b in range(nblocks):
        want[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = bytes([b + 1]) * BLOCK_SIZE
        assert fm.write(vid, b * BLOCK_SIZE, want[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE])
    pool.commit()
    news = [0, nblocks, nblocks + 1, nblocks + 2]
    for b in news:  # written since the freeze: a page of an old block, and new blocks
        want[b * BLOCK_SIZE + 4096 : b * BLOCK_SIZE + 8192] = b"n" * 4096
        assert fm.write(vid, b * BLOCK_SIZE + 4096, b"n" * 4096)
    n = fm.entries()
    assert n >= nblocks + 3
    assert not fm.trim(at=n)  # not above at: nothing to do
    steps = 0
    while fm.trim(at=0, budget=4096):  # a step at a time, as the refills do
        steps += 1
    assert steps == 65536 // 4096 - 1  # the whole (first) table, a step per call
    assert fm.entries() == len(news) and fm.stats()["trims"] == 1
    for b in range(1, nblocks):  # forgotten: handed back, not zeros
        assert fm.read(vid, b * BLOCK_SIZE, 4096) is None, b
    for b in news:
        assert fm.read(vid, b * BLOCK_SIZE, BLOCK_SIZE) == want[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
    far = WINDOW + 44  # in the volume's other window, where nothing was forgotten
    assert fm.read(vid, far * BLOCK_SIZE, 4096) == bytes(4096)  # zeros to C still
    assert fm.write(vid, far * BLOCK_SIZE + 4096, b"f" * 4096)  # never written: served in C
    want[far * BLOCK_SIZE + 4096 : far * BLOCK_SIZE + 8192] = b"f" * 4096
    pool.log_grow_ahead()  # room for C's record, as the daemon keeps it
    assert fm.fsync(vid)  # C writes the volume's record: it kept what the record needs
    assert pool.log_status()["flushes_in_c"] == 1
    assert pool.read(vid, 0, len(want)) == want  # the Pool teaches C again
    handed = fm.stats()["handed_back"]
    assert fm.read(vid, 0, nblocks * BLOCK_SIZE // 2) == want[: nblocks * BLOCK_SIZE // 2]
    assert fm.stats()["handed_back"] == handed
    _crash(pool, fm)  # the record holds the writes since the commit
    again = Pool(str(tmp_path), fast=False)
    try:
        assert again.intent.stats["replayed"] == 1
        assert again.read(vid, 0, len(want)) == want
        assert again.scrub() == []
    finally:
        again.close()


def test_a_head_changed_or_gone_leaves_its_entries_behind_without_a_pass(tmp_path):
    """A rollback gives a volume a new head and a deletion takes it away:
    C's entries of the old head become unreachable at once, since every
    entry carries its head's incarnation (csrc/fastmap.c, struct vol.key),
    where C used to rehash the whole table without them, every disk's I/O
    held meanwhile (60-107 ms for a table of 44-88 MiB:
    docs/perf/2026-12-05-heads-dropped-without-a-pass.md).  They serve
    nothing, the other volumes' entries stay, and a trim removes them
    later, those written since the freeze too.  Fails if a head change
    passes over the table (stats()["scans"]), if a stale entry is served,
    or if a trim keeps stale entries of this epoch."""
    path = str(tmp_path / "p")
    pool = Pool(path, fast=False)
    with fast_path(pool, reservoir=64) as fm:
        a, b, c = (pool.create_volume(WINDOW * BLOCK_SIZE) for _ in range(3))
        old = {v: bytes([v]) * (4 * BLOCK_SIZE) for v in (a, b, c)}
        for v in (a, b, c):
            assert fm.write(v, 0, old[v])
        pool.commit()
        sid = pool.snapshot([a])[0]
        for v in (a, b):  # copies on write since the snapshot, committed
            assert fm.write(v, 0, b"x" * (2 * BLOCK_SIZE))
        pool.commit()
        for v in (a, b):  # and a block in place, in this epoch
            assert fm.write(v, 2 * BLOCK_SIZE, b"y" * BLOCK_SIZE)
        entries, scans = fm.entries(), fm.stats()["scans"]
        pool.rollback(a, sid)
        late = []  # a write C takes while the deletion's commit runs: stale in this epoch
        pool.delete_volume(b, on_deleted=lambda: late.append(fm.write(b, 3 * BLOCK_SIZE, b"l" * 4096)))
        assert late == [True]
        assert fm.stats()["scans"] == scans  # no pass over the table
        assert fm.entries() == entries  # the old heads' entries are still there ...
        assert fm.read(b, 0, 4096) is None  # ... and serve nothing
        for off in (0, 2 * BLOCK_SIZE):
            assert fm.read(a, off, 4096) in (None, old[a][off : off + 4096])
        assert pool.read(a, 0, 4 * BLOCK_SIZE) == old[a]  # the snapshot's blocks, taught to C
        assert fm.read(a, 0, 4 * BLOCK_SIZE) == old[a]
        assert fm.read(c, 0, 4 * BLOCK_SIZE) == old[c]  # another disk's, as they were
        while fm.trim(at=0):
            pass
        assert fm.entries() == 0  # the stale ones gone, those of this epoch too
        assert fm.read(c, 0, 4096) is None  # (forgotten: a cache)
        assert pool.read(c, 0, 4 * BLOCK_SIZE) == old[c]
        new = b"z" * BLOCK_SIZE
        if not fm.write(a, 2 * BLOCK_SIZE, new):
            pool.write(a, 2 * BLOCK_SIZE, new)
        want = old[a][: 2 * BLOCK_SIZE] + new + old[a][3 * BLOCK_SIZE :]
        assert fm.read(a, 0, 4 * BLOCK_SIZE) in (None, want)
        pool.commit()
        assert pool.scrub() == []
    again = Pool(path, fast=False)
    try:
        assert again.read(a, 0, 4 * BLOCK_SIZE) == want
        assert again.read(c, 0, 4 * BLOCK_SIZE) == old[c]
        assert b not in again.volumes()
        assert again.scrub() == []
    finally:
        again.close()


def test_trims_while_io_threads_write_and_flip(tmp_path):
    """A trim runs without the map's lock, a chunk of C's table at a time,
    while C's I/O threads write: here into committed backed blocks (flips,
    whose write looks its entry up again when it lands: a trim must not
    forget an entry a write in flight holds) and the blocks of another
    volume, with commits and a commit in flight between the trims.  Every
    page then reads what was written last, through C and the Pool, and
    after a reopen; scrub is clean."""
    nblocks = 48
    last: dict = {}
    with _two_volumes_in_c(tmp_path, nblocks) as (pool, fm, vid, other):
        for v in (vid, other):
            for b in range(nblocks):
                data = bytes([v, b]) * (BLOCK_SIZE // 2)
                assert fm.write(v, b * BLOCK_SIZE, data)
                for pg in range(16):
                    last[v, b * BLOCK_SIZE + pg * 4096] = data[:4096]
        pool.commit()
        for b in range(nblocks):  # a page over the head's own whole block: backed entries at the commit
            assert fm.write(vid, b * BLOCK_SIZE, b"b" * 4096)
            last[vid, b * BLOCK_SIZE] = b"b" * 4096
        pool.commit()
        flips = fm.stats()["flips"]
        trimmed = 0
        with _writers_in_c(fm, (vid, other), nblocks, last):  # interleaved with the trims
            for i in range(60):
                for _ in range(4):  # in steps, or the whole at once
                    trimmed += fm.trim(at=0, budget=8192 if i % 2 else 1 << 20)
                if i % 5 == 0:
                    pool.commit()
                job = pool.begin_commit() if i % 5 == 2 else None
                pool.refill_fast()
                pool.read(vid, 0, nblocks * BLOCK_SIZE)  # C learns the blocks again
                pool.read(other, 0, nblocks * BLOCK_SIZE)
                if job is not None:
                    job.run()
                    pool.finish_commit(job)
        st_ = fm.stats()
        assert trimmed > 0 and st_["trims"] > 0 and st_["flips"] > flips, st_

        def check(p):
            for (v, off), data in last.items():
                assert p.read(v, off, 4096) == data, (v, off)

        check(pool)
        while fm.trim(at=0):
            pass
        for (v, off), data in last.items():
            got = fm.read(v, off, 4096)
            assert got is None or got == data, (v, off)
        pool.commit()
        assert pool.scrub() == []
    again = Pool(str(tmp_path))
    try:
        check(again)
        assert again.scrub() == []
    finally:
        again.close()


@pytest.mark.parametrize("where", ["tmp_path", "tmpfs"])
def test_log_records_are_written_direct_where_the_filesystem_allows(tmp_path, where):
    """The log's records are written with O_DIRECT and RWF_DSYNC (one
    durable write, no page-cache copy and fdatasync) where the pool's
    filesystem allows O_DIRECT, and written then fdatasync()ed where it
    does not (tmpfs before Linux 6.6; the test probes which); a crash
    replays C's and the Pool's records either way (fails when the log
    never opens its files O_DIRECT)."""
    import subprocess

    d = tmp_path / "pool"
    d.mkdir()
    if where == "tmpfs":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], check=True)
    try:
        try:
            os.close(os.open(str(d / "probe"), os.O_CREAT | os.O_WRONLY | os.O_DIRECT))
            can = True
        except OSError:
            can = False
        pool = Pool(str(d), fast=False)
        assert (pool.intent._direct[0] >= 0) == can and (pool.intent._direct[1] >= 0) == can
        vid = pool.create_volume(1 << 20)
        fm = FastMap(pool.file.fd, reservoir=16)
        pool.attach_fast(fm)
        pool.write(vid, 0, b"a" * BLOCK_SIZE)
        assert pool.log_flush(vid)  # the Pool's record
        assert fm.write(vid, 4096, b"b" * 4096)
        assert fm.fsync(vid)  # C's
        assert pool.log_status()["flushes"] == 2
        _crash(pool, fm)
        again = Pool(str(d), fast=False)
        try:
            assert again.intent.stats["replayed"] == 2
            assert again.read(vid, 0, BLOCK_SIZE) == b"a" * 4096 + b"b" * 4096 + b"a" * (BLOCK_SIZE - 8192)
        finally:
            again.close()
    finally:
        if where == "tmpfs":
            subprocess.run(["umount", "-l", str(d)], check=False)


def test_fsync_in_c_survives_a_crash(tmp_path):
    """A log flush written by C (the FUSE fast path's FSYNC) is replayed when
    the pool is opened again; a volume the Pool itself wrote to since its
    last log flush is left to the Pool (C declines it)."""
    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(1 << 20)
    fm = FastMap(pool.file.fd, reservoir=16)
    pool.attach_fast(fm)
    pool.write(vid, 0, b"a" * BLOCK_SIZE)  # through the Pool: not clean
    assert not fm.fsync(vid)
    assert pool.log_flush(vid)  # the Pool's record; the volume is clean now
    assert fm.write(vid, 4096, b"b" * 4096)  # in place, in C
    assert fm.write(vid, 3 * BLOCK_SIZE, b"c" * BLOCK_SIZE)  # a new block, in C
    assert fm.fsync(vid)
    st = pool.log_status()
    assert st["flushes"] == 2 and st["flushes_in_c"] == 1, st  # the Pool's record and C's, one writer
    assert st["bytes"] == 4096 + BLOCK_SIZE + 4096 + 4096 + BLOCK_SIZE, st
    assert fm.fsync(vid) and pool.log_status()["flushes_in_c"] == 1  # nothing new: no record
    pool.detach_fast()
    fm.close()
    pool.env.close()  # a crash: nothing committed since the volume was created
    pool.env = None
    again = Pool(str(tmp_path), fast=False)
    assert again.intent.stats["replayed"] == 2
    got = again.read(vid, 0, 4 * BLOCK_SIZE)
    want = bytearray(4 * BLOCK_SIZE)
    want[0:BLOCK_SIZE] = b"a" * BLOCK_SIZE
    want[4096:8192] = b"b" * 4096
    want[3 * BLOCK_SIZE :] = b"c" * BLOCK_SIZE
    assert got == want
    again.close()


def test_a_crash_after_flips_finds_the_last_commit_and_the_fsynced_flips(tmp_path):
    """Flips write only places the durable map does not use: a crash
    before the next commit finds the committed block, checksums right,
    plus what an fsync made durable (C's log record gathers a flipped
    block's pages from both of its slots).  A flip written over the
    durable place would show here (new data, a checksum mismatch)."""
    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=16)
    pool.attach_fast(fm)
    committed = bytearray(bytes(range(256)) * (BLOCK_SIZE // 256))
    assert fm.write(vid, 0, committed)
    pool.commit()
    assert fm.write(vid, 4096, b"a" * 4096)
    committed[4096:8192] = b"a" * 4096
    pool.commit()  # backed: page 1 in the slot, the others in the back slot
    want = bytearray(committed)
    assert fm.write(vid, 10 * 4096, b"g" * 4096)  # into the slot
    want[10 * 4096 : 11 * 4096] = b"g" * 4096
    assert pool.log_flush(vid)  # the Pool's record (it grows the log, which C only writes into)
    for off, n, byte in ((4096, 4096, b"b"), (8192, 4096, b"c"), (3 * 4096 + 100, 200, b"d")):
        assert fm.write(vid, off, byte * n)
        want[off : off + n] = byte * n
    assert fm.stats()["flips"] == 4, fm.stats()
    assert fm.fsync(vid)  # C's record of pages 1 (now in the back slot), 2 and 3 (now in the slot)
    assert pool.log_status()["flushes_in_c"] == 1
    synced = bytes(want)
    assert fm.write(vid, 5 * 4096, b"e" * 4096)  # flipped, never synced
    assert fm.write(vid, 4096, b"f" * 4096)  # flipped in this epoch already: in place
    want[5 * 4096 : 6 * 4096], want[4096:8192] = b"e" * 4096, b"f" * 4096
    assert fm.read(vid, 0, BLOCK_SIZE) == want
    pool.detach_fast()
    fm.close()
    pool.env.close()  # a crash: the data file keeps every write, LMDB its last commit
    pool.env = None
    again = Pool(str(tmp_path), fast=False)
    try:
        assert again.intent.stats["replayed"] == 2
        got = again.read(vid, 0, BLOCK_SIZE)
        assert got[: 5 * 4096] == synced[: 5 * 4096], "the fsynced flips"
        assert got[6 * 4096 :] == synced[6 * 4096 :]
        assert got[5 * 4096 : 6 * 4096] in (synced[5 * 4096 : 6 * 4096], b"e" * 4096)
        assert again.scrub() == []
    finally:
        again.close()


@contextlib.contextmanager
def fast_path(pool, reservoir):
    """A FastMap attached to pool for the body; then detached, and both
    closed (the pool too), even when the body fails."""
    fm = FastMap(pool.file.fd, reservoir=reservoir)
    try:
        pool.attach_fast(fm)
        yield fm
    finally:
        pool.detach_fast()
        fm.close()
        pool.close()


def _cold_pool(tmp_path, nblocks, seed=1):
    """A pool whose volume's blocks were written and committed by another
    opening (so that no slot is verified yet), with a snapshot of it, for a
    FastMap that knows none of its blocks (fast_path): as after a daemon
    restart."""
    path = str(tmp_path / "p")
    pool = Pool(path, fast=False)
    vid = pool.create_volume(4 * nblocks * BLOCK_SIZE)
    old = bytes((i * 7 + seed) % 251 for i in range(nblocks * BLOCK_SIZE))
    pool.write(vid, 0, old)
    pool.close()
    pool = Pool(path, fast=False)
    pool.snapshot([vid])
    return pool, vid, bytearray(old)


def test_a_write_c_hands_back_teaches_it_the_blocks_around(tmp_path):
    """Not a model: a write to a block C does not know is taught (the
    block and the blocks the map has around it), then served in C; the
    next writes nearby never reach the Pool."""
    pool, vid, want = _cold_pool(tmp_path, 8)
    with fast_path(pool, 64) as fm:
        assert not fm.write(vid, 4096, b"a" * 4096)  # C knows nothing yet
        pool.write(vid, 4096, b"a" * 4096)  # what the FUSE layer does then
        want[4096:8192] = b"a" * 4096
        assert fm.stats()["writes"] == 1  # served in C after all
        for b in range(1, 8):  # taught with the first: C serves them at once
            assert fm.write(vid, b * BLOCK_SIZE + 8192, b"b" * 4096), b
            want[b * BLOCK_SIZE + 8192 : b * BLOCK_SIZE + 12288] = b"b" * 4096
        assert fm.read(vid, 4 * BLOCK_SIZE, BLOCK_SIZE) == want[4 * BLOCK_SIZE : 5 * BLOCK_SIZE]
        assert fm.stats()["verified"] == 1  # C checked the slot it read from first
        assert fm.write(vid, 5 * BLOCK_SIZE + 100, b"c" * 100)  # a page in part: the rest from a slot C verifies
        want[5 * BLOCK_SIZE + 100 : 5 * BLOCK_SIZE + 200] = b"c" * 100
        assert fm.stats()["verified"] == 2
        assert pool.read(vid, 0, 8 * BLOCK_SIZE) == want
        assert fm.read(vid, 0, 8 * BLOCK_SIZE) == want
        pool.commit()
        assert pool.read(vid, 0, 8 * BLOCK_SIZE) == want
        assert pool.scrub() == []


def test_a_read_c_hands_back_teaches_it_too(tmp_path):
    """Not a model: the same for reads: the first read C cannot serve
    teaches it the window, C serves it (verifying the slot it reads), and
    the next reads there never reach the Pool, those of blocks never
    written too (the window is known: they read as zeros in C, without an
    entry each)."""
    pool, vid, want = _cold_pool(tmp_path, 8)
    with fast_path(pool, 64) as fm:
        assert fm.read(vid, 3 * BLOCK_SIZE, 4096) is None  # C knows nothing yet
        assert pool.read(vid, 3 * BLOCK_SIZE, 4096) == want[3 * BLOCK_SIZE : 3 * BLOCK_SIZE + 4096]
        st_ = fm.stats()
        assert st_["reads"] == 1 and st_["verified"] == 1, st_  # served in C after all
        assert fm.read(vid, 0, 8 * BLOCK_SIZE) == want  # every block of the window
        assert fm.read(vid, 8 * BLOCK_SIZE, 4096) == bytes(4096)  # zeros past what was written
        assert fm.unknown(vid, 8, 24) == list(range(8, 32))  # not taught ahead: no entry each
        assert fm.stats()["verified"] == 8


def test_a_window_taught_whole_serves_blocks_never_written_in_c(tmp_path):
    """Not a model: once a window was taught whole, a write to a block of it
    that was never written is served in C (no hand-back, no entry taught
    for it first), and what it wrote is the block's after a commit and a
    reopen; so is a read of one (zeros).  After a growth, the new windows
    are taught at their first request (a write of the Pool's may have
    landed there before C was told of the new size), then known."""
    pool, vid, want = _cold_pool(tmp_path, 8)  # blocks 0-7 written, 32 in all
    path = pool.path
    with fast_path(pool, 64) as fm:
        assert fm.read(vid, 0, 4096) is None  # C knows nothing yet
        pool.read(vid, 0, 4096)  # teaches the window
        assert fm.write(vid, 20 * BLOCK_SIZE + 8192, b"n" * 4096)  # never written: served in C
        assert fm.unknown(vid, 20, 1) == []  # C holds it now, as its own write
        assert fm.read(vid, 21 * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
        pool.resize_volume(vid, 2 * WINDOW * BLOCK_SIZE)
        pool.commit()
        far = WINDOW + 40  # beyond the old end, in a window the growth added
        assert not fm.write(vid, far * BLOCK_SIZE, b"g" * BLOCK_SIZE)  # not known yet
        pool.write(vid, far * BLOCK_SIZE, b"g" * BLOCK_SIZE)  # teaches its window, then served in C
        assert fm.write(vid, (far + 1) * BLOCK_SIZE + 4096, b"h" * 4096)  # known now
        pool.commit()
    pool = Pool(path, fast=False)
    try:
        block20 = bytearray(BLOCK_SIZE)
        block20[8192:12288] = b"n" * 4096
        assert pool.read(vid, 20 * BLOCK_SIZE, BLOCK_SIZE) == block20
        block = bytearray(2 * BLOCK_SIZE)
        block[:BLOCK_SIZE] = b"g" * BLOCK_SIZE
        block[BLOCK_SIZE + 4096 : BLOCK_SIZE + 8192] = b"h" * 4096
        assert pool.read(vid, (WINDOW + 40) * BLOCK_SIZE, 2 * BLOCK_SIZE) == block
        assert pool.read(vid, 0, 8 * BLOCK_SIZE) == want
        assert pool.scrub() == []
    finally:
        pool.close()


def test_a_block_only_a_snapshot_sees_is_taught_as_the_heads_zeros(tmp_path):
    """Not a model: a block the head discarded after a snapshot reads as
    zeros in the head but has an entry its snapshot point sees.  Teaching
    its window teaches that block too, as the head's own zeros (a partial
    write served in C as over unknown zeros would become an entry reading
    its other pages through to the snapshot's block), and the window is
    known: C serves the partial write, whose other pages stay zeros after
    a commit and a reopen, the snapshot keeping its block."""
    path = str(tmp_path / "p")
    pool = Pool(path, fast=False)
    vid = pool.create_volume(32 * BLOCK_SIZE)
    old = bytes((i * 7 + 1) % 251 for i in range(8 * BLOCK_SIZE))
    pool.write(vid, 0, old)
    (sid,) = pool.snapshot([vid])
    pool.discard(vid, 5 * BLOCK_SIZE, BLOCK_SIZE)
    pool.close()
    pool = Pool(path, fast=False)
    with fast_path(pool, 64) as fm:
        assert fm.read(vid, 0, 4096) is None
        pool.read(vid, 0, 4096)  # teaches the window
        assert fm.unknown(vid, 0, 32) == list(range(8, 32))  # block 5 held (as zeros), not those never written
        assert fm.read(vid, 5 * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
        assert fm.write(vid, 5 * BLOCK_SIZE + 8192, b"z" * 4096)  # served in C
        assert fm.write(vid, 9 * BLOCK_SIZE, b"w" * 4096)  # never written: the window is known
        pool.commit()
    block5 = bytearray(BLOCK_SIZE)
    block5[8192:12288] = b"z" * 4096
    pool = Pool(path, fast=False)
    try:
        assert pool.read(vid, 5 * BLOCK_SIZE, BLOCK_SIZE) == block5
        assert pool.read(vid, 9 * BLOCK_SIZE, 4096) == b"w" * 4096
        assert pool.read_snapshot(sid, 5 * BLOCK_SIZE, BLOCK_SIZE) == old[5 * BLOCK_SIZE : 6 * BLOCK_SIZE]
        assert pool.scrub() == []
    finally:
        pool.close()


def test_c_never_reads_a_slot_that_fails_its_checksum(tmp_path):
    """Not a model: C may be taught a block whose slot was never verified
    since the pool was opened.  It writes whole pages over it without
    reading it; before it reads from it, for a read or to fill a page
    written in part, it checks the slot against its checksum, and when
    that fails it hands the request to the Pool, which reports the
    damage."""
    pool, vid, want = _cold_pool(tmp_path, 2)
    with fast_path(pool, 64) as fm:
        lid = pool._vols[vid]["lid"]
        with pool.env.begin(db=pool._db[DB_MAP]) as txn:
            ((slot, _mask, _crc),) = pool._lookup(txn.cursor(), lid, pool._lins[lid].gen, 0)
        fd = os.open(pool.file.path, os.O_RDWR)
        os.pwrite(fd, b"X" * 16, (slot - 1) * BLOCK_SIZE + 20000)  # bit rot in page 4 of block 0
        os.close(fd)
        pool.write(vid, 0, b"a" * 4096)  # taught, then written in C: page 0 only
        assert fm.stats()["writes"] == 1
        assert fm.read(vid, 0, 4096) == b"a" * 4096  # its own page, from its new slot
        assert fm.read(vid, 16384, 8192) is None  # pages of the damaged slot: not from C
        assert fm.stats()["verified"] == 1  # it checked, and found the damage
        assert not fm.write(vid, 4096 + 100, b"c" * 100)  # a page written in part needs the slot's bytes
        with pytest.raises(ChecksumError):
            pool.read(vid, 16384, 8192)
        with pytest.raises(ChecksumError):
            pool.write(vid, 4096 + 100, b"c" * 100)


def test_the_pools_own_writes_are_served_by_the_write_cache_in_c(tmp_path):
    """Not a model: a pool opened the usual way owns its FastMap, and the
    writes it is given itself (the offline CLI's, a stream import's) go to
    C, in runs of at most MAX_SPAN blocks, after an out-of-range check
    that changes nothing; reads too.  Fails when Pool.write serves them
    in Python (no C write counted) or gives C more than it serves (the
    write goes to Python whole)."""
    from vdisk.engine.errors import OutOfRange
    from vdisk.engine.fastmap import MAX_SPAN

    path = str(tmp_path / "p")
    pool = Pool(path)
    try:
        fm = pool.fast_map
        assert fm is not None and pool.fast_event_fd is not None
        span = MAX_SPAN * BLOCK_SIZE
        vid = pool.create_volume(3 * span)
        data = bytes((i * 7 + 3) % 251 for i in range(2 * span + 3 * BLOCK_SIZE))
        pool.write(vid, span // 2, data)  # 3 runs: to the span's end, a whole span, the rest
        assert fm.stats()["writes"] == 3, fm.stats()
        with pytest.raises(OutOfRange):
            pool.write(vid, 3 * span - 4096, bytes(8192))
        assert fm.stats()["writes"] == 3
        reads = fm.stats()["reads"]
        assert pool.read(vid, span // 2, len(data)) == data  # more than C serves: Python
        assert pool.read(vid, span, 4096) == data[span // 2 : span // 2 + 4096]
        assert fm.stats()["reads"] == reads + 1
        assert pool.served_here == {"reads": 1, "writes": 0}  # what daemon status counts (ServedByEngine)
        pool.commit()
        assert pool.scrub() == []
    finally:
        pool.close()
    pool = Pool(path, fast=False)
    try:
        assert pool.fast_map is None
        assert pool.read(vid, span // 2, len(data)) == data
    finally:
        pool.close()


def test_a_failed_commit_gives_c_its_blocks_back_to_write_in_place(tmp_path):
    """Not a model: a commit that fails puts its frozen blocks back in the
    overlay.  C took them as frozen (read-only) at the freeze; if it still
    did, its next write would copy one into a new slot reading the rest
    from the old one, which the overlay gives back when it drains that
    write: the commit after it then records a block that lost its other
    pages.  Found by the CFlushModel once the Pool's own reads went through
    C (it fails when commit._unfreeze does not tell C the blocks)."""
    path = str(tmp_path / "p")
    pool = Pool(path)  # the write cache in C: every write below is C's
    fm = pool.fast_map
    vid = pool.create_volume(4 * BLOCK_SIZE)
    want = bytearray(4 * BLOCK_SIZE)
    want[4096:BLOCK_SIZE] = b"a" * (BLOCK_SIZE - 4096)
    pool.write(vid, 4096, want[4096:BLOCK_SIZE])
    pool.commit()
    pool.write(vid, 0, b"b" * 512)  # copies the block (more pages than a partial slot takes)
    want[0:512] = b"b" * 512

    def boom(tx):
        raise RuntimeError("the change fails")

    with pytest.raises(RuntimeError):
        pool.commit(change=boom)
    pool.write(vid, 0, b"c" * 512)  # the slot of the failed commit's: in place
    want[0:512] = b"c" * 512
    assert fm.stats()["writes"] == 3
    assert pool.read(vid, 0, 4 * BLOCK_SIZE) == want
    pool.commit()
    pool.close()
    pool = Pool(path)
    try:
        assert pool.read(vid, 0, 4 * BLOCK_SIZE) == want
        assert pool.scrub() == []
    finally:
        pool.close()


def test_a_write_c_hands_back_changes_nothing_in_c(tmp_path):
    """Not a model: a write over two blocks, the first written in place
    (taking in a page it writes in part), the second needing a slot C does
    not have, is handed back whole: C must not have marked the first
    block's pages as held before it knew it would serve the request, or
    the Pool would skip filling that page from below."""
    pool = Pool(str(tmp_path), fast=False)
    with fast_path(pool, 8) as fm:
        vid = pool.create_volume(4 * BLOCK_SIZE)
        old = bytes((i * 13 + 5) % 251 for i in range(2 * BLOCK_SIZE))
        pool.write(vid, 0, old)
        pool.snapshot([vid])
        assert pool.read(vid, 0, 2 * BLOCK_SIZE) == old  # C knows both blocks (shared)
        pool.refill_fast()
        want = bytearray(old)
        assert fm.write(vid, 0, b"a" * 4096)  # block 0: a slot holding page 0
        want[0:4096] = b"a" * 4096
        for slot in fm.reservoir_take():  # C runs dry (its slots back to the allocator, as detach does)
            pool._reserved.discard(slot)
            pool._reserved_beyond.discard(slot)
            pool._free_cache.append(slot)
        pool._free_cache.sort(reverse=True)
        off, n = 4096 + 512, BLOCK_SIZE - 4096 - 512 + 4096  # page 1 in part, then into block 1
        assert not fm.write(vid, off, b"w" * n)
        pool.write(vid, off, b"w" * n)
        want[off : off + n] = b"w" * n
        assert pool.read(vid, 0, 2 * BLOCK_SIZE) == want
        pool.commit()
        assert pool.read(vid, 0, 2 * BLOCK_SIZE) == want
        assert pool.scrub() == []


def test_c_stops_sharing_when_the_last_snapshot_is_deleted(tmp_path):
    """Not a model (found by it): once the volume's last snapshot is
    deleted, the head owns its blocks again.  C must not go on writing
    only the pages written over an entry of the head's own pages, as for
    a block a snapshot shares: the commit makes such a slot a backed entry
    over the block below, and the entry's own pages would be lost."""
    pool = Pool(str(tmp_path), fast=False)
    with fast_path(pool, 8) as fm:
        vid = pool.create_volume(2 * BLOCK_SIZE)
        want = bytearray(b"a" * BLOCK_SIZE)
        pool.write(vid, 0, want)
        pool.commit()
        assert pool.read(vid, 0, BLOCK_SIZE) == want  # C knows the block
        assert fm.write(vid, 4096, b"b" * 4096)  # page 1 over the head's own block
        want[4096:8192] = b"b" * 4096
        pool.commit()  # a backed entry: page 1, over the whole block
        (sid,) = pool.snapshot([vid])
        assert pool.read(vid, 0, BLOCK_SIZE) == want
        pool.delete_snapshot(sid)
        pool.refill_fast()
        assert fm.write(vid, 0, b"c" * 4096)  # page 0: the head's own entry again
        want[0:4096] = b"c" * 4096
        assert pool.read(vid, 0, BLOCK_SIZE) == want
        pool.commit()
        assert pool.read(vid, 0, BLOCK_SIZE) == want
        assert fm.read(vid, 0, BLOCK_SIZE) in (None, want)
        assert pool.scrub() == []


def test_c_counts_the_engines_holds_of_the_map_and_the_requests_that_waited(tmp_path):
    """Not a model: while the engine holds the map's lock (Python, `with
    pool._fast()`), a C write waits for it; the map counts the engine's
    holds and their longest, and the requests that waited and their
    longest wait (`vdisk daemon status`: FastPath.EngineLockHold*,
    LockWait*).  A request that finds the lock free counts no wait."""
    import threading
    import time

    pool = Pool(str(tmp_path), fast=False)
    with fast_path(pool, reservoir=16) as fm:
        vid = pool.create_volume(BLOCK_SIZE * 4)
        assert fm.write(vid, 0, b"a" * 4096)  # the lock is free: no wait
        st0 = fm.stats()
        assert st0["lock_waits"] == 0, st0
        served = []
        with pool._fast():
            writer = threading.Thread(target=lambda: served.append(fm.write(vid, 8192, b"b" * 4096)))
            writer.start()
            time.sleep(0.2)
            assert served == []  # it waits for the engine
        writer.join()
        assert served == [True]
        st = fm.stats()
        assert st["lock_waits"] == 1, st
        assert 0.15e9 <= st["lock_wait_max_ns"] <= st["lock_wait_ns"], st
        assert st["lock_holds"] > st0["lock_holds"], st
        assert st["lock_hold_max_ns"] >= 0.2e9, st
        assert pool.read(vid, 8192, 4096) == b"b" * 4096


def _crash(pool, fm):
    """What a power cut leaves: the data file keeps every write (this one
    is not PowerCutFile's), LMDB its last commit, the log what was synced."""
    pool.detach_fast()
    fm.close()
    pool.env.close()
    pool.env = None


@pytest.mark.parametrize("durable", [False, True])
def test_fsyncs_go_on_during_a_commit_and_survive_a_crash(tmp_path, durable):
    """While a commit that changes no volume is in flight, fsyncs are log
    flushes (in the log's next generation, the other file) instead of
    waiting for it.  The first record of a volume after the freeze carries
    its blocks written before the freeze that no record held, whole: C
    writes it when C wrote those blocks (its table keeps them, marked,
    until that record or the commit is durable).  A crash before the commit is durable replays both
    generations over the map as it was; one after it replays the new
    generation over the new map.  Either way every write before the last
    fsync is there."""
    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(8 * BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=16)
    pool.attach_fast(fm)
    want = bytearray(8 * BLOCK_SIZE)
    # a commit with a record during it first: both files have room for C
    # (which writes only into room the Pool's records grew)
    assert fm.write(vid, 7 * BLOCK_SIZE, b"z" * 4096)
    assert pool.log_flush(vid)
    job = pool.begin_commit()
    assert fm.write(vid, 7 * BLOCK_SIZE + 4096, b"y" * 4096)
    assert pool.log_flush(vid)
    job.run()
    pool.finish_commit(job)
    want[7 * BLOCK_SIZE : 7 * BLOCK_SIZE + 8192] = b"z" * 4096 + b"y" * 4096
    for off, n, byte in ((0, BLOCK_SIZE, b"a"), (BLOCK_SIZE + 4096, 4096, b"b")):
        assert fm.write(vid, off, byte * n)
        want[off : off + n] = byte * n
    assert pool.log_flush(vid)  # gen g
    assert fm.write(vid, BLOCK_SIZE + 8192, b"b" * 4096)
    want[BLOCK_SIZE + 8192 : BLOCK_SIZE + 3 * 4096] = b"b" * 4096
    assert fm.fsync(vid)  # C's, in gen g
    assert fm.write(vid, 2 * BLOCK_SIZE, b"c" * 8192)  # before the freeze, in no record
    want[2 * BLOCK_SIZE : 2 * BLOCK_SIZE + 8192] = b"c" * 8192
    gen = pool.intent.gen
    job = pool.begin_commit()
    assert pool.intent.usable and pool.intent.wgen == gen + 1
    assert fm.write(vid, 3 * BLOCK_SIZE, b"d" * 4096)  # after the freeze
    want[3 * BLOCK_SIZE : 3 * BLOCK_SIZE + 4096] = b"d" * 4096
    assert fm.write(vid, 2 * BLOCK_SIZE + 5 * 4096, b"C" * 4096)  # block 2 again: its page mask starts over
    want[2 * BLOCK_SIZE + 5 * 4096 : 2 * BLOCK_SIZE + 6 * 4096] = b"C" * 4096
    assert fm.fsync(vid)  # C's: carries blocks 2 (whole, as the head reads it) and 3
    assert pool.log_flush(vid) and pool.log_status()["flushes_in_c"] == 2  # nothing left for the Pool
    assert fm.write(vid, 4 * BLOCK_SIZE + 8192, b"e" * 4096)
    want[4 * BLOCK_SIZE + 8192 : 4 * BLOCK_SIZE + 3 * 4096] = b"e" * 4096
    assert fm.fsync(vid)  # C's, in gen g + 1
    assert pool.log_status()["flushes_in_c"] == 3
    assert fm.write(vid, 5 * BLOCK_SIZE, b"f" * 4096)  # never synced
    if durable:
        job.run()
        pool.finish_commit(job)
        assert pool.intent.gen == gen + 1
    _crash(pool, fm)
    again = Pool(str(tmp_path), fast=False)
    try:
        assert again.intent.stats["replayed"] == (2 if durable else 5)
        got = again.read(vid, 0, 8 * BLOCK_SIZE)
        assert got[: 5 * BLOCK_SIZE] == want[: 5 * BLOCK_SIZE]
        assert got[5 * BLOCK_SIZE : 5 * BLOCK_SIZE + 4096] in (bytes(4096), b"f" * 4096)
        assert got[7 * BLOCK_SIZE :] == want[7 * BLOCK_SIZE :]
        assert again.scrub() == []
        # the open's commit moved past both generations: no record of
        # them is replayed again, and new ones are
        again.write(vid, 6 * BLOCK_SIZE, b"g" * 4096)
        assert again.log_flush(vid)
    finally:
        again._abandon()
    third = Pool(str(tmp_path), fast=False)
    try:
        assert third.intent.stats["replayed"] == 1
        assert third.read(vid, 0, 5 * BLOCK_SIZE) == got[: 5 * BLOCK_SIZE]
        assert third.read(vid, 6 * BLOCK_SIZE, 4096) == b"g" * 4096
    finally:
        third.close()


def test_the_log_grows_ahead_so_that_c_writes_every_record(tmp_path):
    """C writes a record only into bytes the log file holds (zeros), and
    grows the file only by what the engine allows it.  The daemon lets it
    and keeps room written ahead (Pool.log_grow_ahead, from the
    Committer's after_write, which the daemon's feeder calls every 100 ms;
    the growth itself in C): then 400 fsyncs in a row, 3.2 MiB of records
    from an empty file, half of them in the other file while a commit
    runs, are all C's, and all survive a crash."""
    from vdisk.engine.intentlog import AHEAD, GROW

    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(64 * BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=64)
    pool.attach_fast(fm)
    st = pool.intent.state()
    assert st["end"] - st["pos"] == 0  # a new pool's log holds nothing yet
    assert fm.write(vid, 0, b"a" * 4096)
    assert not fm.fsync(vid), "a record where the file holds no bytes, or C grew it unasked"
    assert pool.log_grow_ahead() == AHEAD == 4 * GROW
    assert pool.log_grow_ahead() == 0  # as far ahead as it keeps
    last = {}
    job = None
    for i in range(400):
        off = (i * 7 % 64) * BLOCK_SIZE + (i % 16) * 4096
        data = bytes([i % 250 + 1]) * 4096
        pool.refill_fast()  # C's free slots, as the daemon keeps them
        assert fm.write(vid, off, data)
        assert fm.fsync(vid), "fsync %d went to the engine" % i
        last[off] = data
        if i == 150:  # records go on in the other file, empty, during the commit
            job = pool.begin_commit()
        if i == 300:
            job.run()
            pool.finish_commit(job)
        pool.log_grow_ahead()  # what the daemon's feeder does every 100 ms
    assert pool.log_status()["flushes_in_c"] == 400
    assert all(os.fstat(f.fd).st_size > 0 for f in pool.intent.files)  # both generations' files grown
    _crash(pool, fm)
    again = Pool(str(tmp_path), fast=False)
    try:
        for off, data in last.items():
            assert again.read(vid, off, 4096) == data
        assert again.read(vid, 0, 4096) in (b"a" * 4096, last.get(0))
        assert again.scrub() == []
    finally:
        again.close()


def test_an_fsync_grows_the_log_itself_by_what_the_engine_allows(tmp_path):
    """When the engine's thread falls behind (a control action's commit
    holds it), an fsync in C grows the log's file itself, a step at a
    time once less than a step is left, by at most what is left of the
    allowance the engine granted (IntentLog.ALLOW): 1000 fsyncs in a row,
    7.8 MiB of records, with one grow_ahead before them and none after,
    are all C's, and all survive a crash.  Once the allowance is spent
    (or withheld: a filesystem without room to spare) C hands the fsync
    back, and the engine's flush decides (it grows the log here)."""
    from vdisk.engine.intentlog import AHEAD, ALLOW, GROW

    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(64 * BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=64)
    pool.attach_fast(fm)
    assert pool.log_grow_ahead() == AHEAD
    assert pool.intent.state()["allow"] == ALLOW - AHEAD
    last = {}
    for i in range(1000):
        off = (i * 7 % 64) * BLOCK_SIZE + (i % 16) * 4096
        data = bytes([i % 250 + 1]) * 4096
        pool.refill_fast()  # C's free slots (refill leaves the log alone)
        assert fm.write(vid, off, data)
        assert fm.fsync(vid), "fsync %d went to the engine" % i
        last[off] = data
    st = pool.log_status()
    assert st["flushes_in_c"] == 1000
    assert st["grows_in_c"] == (ALLOW - AHEAD) // GROW  # a step at a time: the allowance, spent
    state = pool.intent.state()
    assert state["allow"] == 0 and state["end"] == ALLOW
    # C grows nothing more: once the room left is used, the engine's flush writes the record
    while state["end"] - state["pos"] >= 8192:
        assert fm.write(vid, 0, b"y" * 4096) and fm.fsync(vid)
        state = pool.intent.state()
    last[0] = b"z" * 4096
    assert fm.write(vid, 0, last[0])
    assert not fm.fsync(vid), "C grew the log past its allowance"
    assert pool.log_flush(vid)
    assert pool.log_status()["grows_in_c"] == (ALLOW - AHEAD) // GROW
    _crash(pool, fm)
    again = Pool(str(tmp_path), fast=False)
    try:
        for off, data in last.items():
            assert again.read(vid, off, 4096) == data, off
        assert again.scrub() == []
    finally:
        again.close()


def test_a_filesystem_too_full_for_c_to_grow_the_log_leaves_the_log_working(tmp_path):
    """The allowance was granted, then the pool's filesystem filled up
    (another file took it): C's growth finds no room.  It ends the
    allowance and hands the fsync back; the log stays usable (not turned
    off for good, as a failed write turns it), the engine's flush commits
    instead, and once room is freed the engine grants the allowance again
    and C's fsyncs grow the log once more.  A tmpfs, filled (512 MiB: the
    engine keeps 256 MiB of a filesystem to itself before it grows
    anything, allocator.spare_bytes)."""
    import subprocess

    from vdisk.engine.intentlog import AHEAD, GROW
    from vdisk.engine.native import lib

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "pool"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(d)], check=True)
    pool = fm = None
    try:
        pool = Pool(str(d), fast=False)
        vid = pool.create_volume(16 * BLOCK_SIZE)
        fm = FastMap(pool.file.fd, reservoir=16)
        pool.attach_fast(fm)
        assert fm.write(vid, 0, b"a" * 4096)
        assert not fm.fsync(vid)  # a new log: no room, no allowance
        pool.refill_fast()  # C's free slots, before the filesystem fills
        filler = d / "filler"
        with open(filler, "wb") as f:  # the filesystem, to its last page
            try:
                while True:
                    f.write(b"\xff" * 65536)
                    f.flush()
            except OSError:
                pass
        lib.vd_log_allow(pool.intent.handle, 4 * GROW)  # granted before it filled
        assert not fm.fsync(vid), "C wrote a record where the file holds no bytes"
        state = pool.intent.state()
        assert state["ok"] and state["allow"] == 0 and state["end"] == 0
        assert not pool.log_flush(vid)  # the engine's flush: no room to grow either, a commit instead
        assert pool.log_status()["low_space"] == 1
        os.unlink(filler)  # (the commit needs room too)
        pool.commit()
        assert pool.log_grow_ahead() == AHEAD  # room again: the allowance, and room ahead
        for i in range(600):  # 4.7 MiB of records: C grows the log past what the engine wrote
            assert fm.write(vid, (i % 16) * BLOCK_SIZE, bytes([i % 250 + 1]) * 4096)
            assert fm.fsync(vid), "fsync %d went to the engine" % i
        assert pool.log_status()["grows_in_c"] >= 1 and pool.intent.state()["ok"]
        _crash(pool, fm)
        pool = None
        again = Pool(str(d), fast=False)
        try:
            for i in range(584, 600):
                assert again.read(vid, (i % 16) * BLOCK_SIZE, 4096) == bytes([i % 250 + 1]) * 4096
        finally:
            again.close()
    finally:
        try:
            if pool is not None:
                pool.detach_fast()
                pool.close()
        finally:
            subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_structural_commit_holds_fsyncs_until_it_is_durable(tmp_path):
    """A commit that changes volumes (here: a new one) lets no record be
    written while it is in flight (replayed over the map as it was, a
    record could name what does not exist yet); a commit that failed
    after records went on leaves them valid, and the next commit moves
    past their generation."""
    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(2 * BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=16)
    pool.attach_fast(fm)
    assert fm.write(vid, 0, b"a" * 4096)
    job = pool.begin_commit(lambda tx: None)
    assert not pool.intent.usable
    assert fm.write(vid, 4096, b"b" * 4096)
    assert not fm.fsync(vid) and not pool.log_flush(vid)
    job.run()
    pool.finish_commit(job)
    assert pool.log_flush(vid)  # the Pool's: the other file may need room first
    gen = pool.intent.gen

    def boom(tx):
        raise EngineError("the commit fails")

    job = pool.begin_commit()  # a plain one: records go on
    assert fm.write(vid, BLOCK_SIZE, b"c" * 4096)
    assert pool.log_flush(vid) and pool.intent.wgen == gen + 1  # the other file, grown by the Pool
    job.change = boom  # as if its transaction failed
    job.run()
    with pytest.raises(EngineError, match="the commit fails"):
        pool.finish_commit(job)
    assert pool.intent.gen == gen and pool.intent.wgen == gen + 1
    assert fm.write(vid, BLOCK_SIZE + 4096, b"d" * 4096)
    assert fm.fsync(vid) or pool.log_flush(vid)  # still in gen + 1, after the first
    job = pool.begin_commit()  # gen + 1's file holds records: it moves to gen + 2
    assert not pool.intent.usable
    job.run()
    pool.finish_commit(job)
    assert pool.intent.gen == gen + 2 and pool.intent.usable
    assert fm.write(vid, 8192, b"e" * 4096)
    assert fm.fsync(vid)
    _crash(pool, fm)
    again = Pool(str(tmp_path), fast=False)
    try:
        assert again.intent.stats["replayed"] == 1
        want = b"a" * 4096 + b"b" * 4096 + b"e" * 4096
        assert again.read(vid, 0, 3 * 4096) == want
        assert again.read(vid, BLOCK_SIZE, 8192) == b"c" * 4096 + b"d" * 4096
        assert again.scrub() == []
    finally:
        again.close()


@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.parametrize("op", ["create", "resize", "delete", "rollback"])
def test_a_commit_that_changes_a_volume_holds_its_fsyncs_only(tmp_path, op, durable):
    """A commit that creates a volume, or grows, deletes or rolls back one
    (structure.py marks each with the volumes it changes:
    txn.changes_volumes) holds the fsyncs of those volumes until it is
    durable, in C and in the Pool, while every other volume's go on in
    the log's next generation.  A crash before the commit is durable finds
    the other volume's fsynced writes and none of the change; one after
    finds both, and the changed volume as the change left it.  (A creation
    or growth commits alone where it can, with no commit in flight:
    test_a_volume_created_or_grown_commits_alone; this is the full commit
    it falls back to.)"""
    pool = Pool(str(tmp_path), fast=False)
    vid, other = pool.create_volume(4 * BLOCK_SIZE), pool.create_volume(4 * BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=16)
    pool.attach_fast(fm)
    first = pattern(1, 2 * BLOCK_SIZE)
    assert fm.write(vid, 0, first) and fm.write(other, 0, first)
    (sid,) = pool.snapshot([vid])  # what the rollback goes back to
    assert fm.write(vid, 0, b"v" * 4096) and (fm.fsync(vid) or pool.log_flush(vid))
    changes = []
    # the change, run as a full commit in flight
    pool.commit = pool.commit_meta = lambda change: changes.append(change) or [0]
    try:
        if op == "create":
            pool.create_volume(BLOCK_SIZE)
        elif op == "resize":
            pool.resize_volume(vid, 8 * BLOCK_SIZE)
        elif op == "delete":
            pool.delete_volume(vid)
        else:
            pool.rollback(vid, sid)
    finally:
        del pool.commit, pool.commit_meta
    job = pool.begin_commit(changes[0])
    assert pool.intent.usable
    assert fm.write(other, BLOCK_SIZE, b"o" * 4096)
    assert fm.fsync(other) or pool.log_flush(other)  # goes on
    assert fm.write(vid, 4096, b"w" * 4096)
    if op == "create":  # the new volume's is not served yet; vid's goes on
        assert fm.fsync(vid) or pool.log_flush(vid)
    else:
        assert not fm.fsync(vid) and not pool.log_flush(vid), "a changed volume's fsync during its change"
    if durable:
        job.run()
        result = pool.finish_commit(job)
    _crash(pool, fm)
    again = Pool(str(tmp_path), fast=False)
    try:
        want = bytearray(first)
        want[BLOCK_SIZE : BLOCK_SIZE + 4096] = b"o" * 4096
        assert again.read(other, 0, 2 * BLOCK_SIZE) == want
        vols = again.volumes()
        if not durable:
            assert sorted(vols) == [vid, other] and vols[vid]["size"] == 4 * BLOCK_SIZE
            assert again.read(vid, 0, 4096) == b"v" * 4096
        elif op == "create":
            (new,) = result
            assert sorted(vols) == [vid, other, new]
            assert again.read(vid, 0, 8192) == b"v" * 4096 + b"w" * 4096
        elif op == "resize":
            assert vols[vid]["size"] == 8 * BLOCK_SIZE and again.read(vid, 0, 4096) == b"v" * 4096
        elif op == "delete":
            assert sorted(vols) == [other]
        else:
            assert again.read(vid, 0, 2 * BLOCK_SIZE) == first
        assert again.scrub() == []
    finally:
        again.close()


def _written_in_c(tmp_path, seed: int):
    """(pool, vid, fm, data): a pool with a volume of four blocks and a
    FastMap attached, data written whole through C, nothing committed."""
    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(4 * BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=16)
    pool.attach_fast(fm)
    data = pattern(seed, 4 * BLOCK_SIZE)
    assert fm.write(vid, 0, data)
    return pool, vid, fm, data


@pytest.mark.parametrize("write", ["part of a page", "most of the block"])
def test_c_writes_during_a_rollback_stay_with_the_head_they_were_written_to(tmp_path, write):
    """A write C serves while a rollback's commit is in flight lands in
    the head as it was then: its copy on write fills what it does not
    write (the rest of a page written in part; the whole block once more
    than VD_FM_COALESCE_PAGES pages are written) from that head.  The
    rollback's end must take it in with that head (the engine drains C
    under the lock before the volume gets its new head): taken for the
    new head, the block would read the old head's bytes around the write
    instead of the snapshot's.  The write is rolled back with the head
    it was written to (or, were it ordered after the rollback, it would
    read over the snapshot's bytes); the old head's bytes never show."""
    pool, vid, fm, snap = _written_in_c(tmp_path, 1)
    (sid,) = pool.snapshot([vid])
    assert fm.write(vid, 0, b"x" * BLOCK_SIZE)  # the head's own block 0, after the snapshot
    pool.commit()
    changes = []
    pool.commit = lambda change: changes.append(change)  # the rollback, run as a commit in flight
    try:
        pool.rollback(vid, sid)
    finally:
        del pool.commit
    job = pool.begin_commit(changes[0])
    off, data = (4096 + 512, b"w" * 512) if write == "part of a page" else (0, b"w" * 10 * 4096)
    assert fm.write(vid, off, data)
    job.run()
    pool.finish_commit(job)
    after = bytearray(snap[:BLOCK_SIZE])
    after[off : off + len(data)] = data
    got = pool.read(vid, 0, BLOCK_SIZE)
    assert got in (snap[:BLOCK_SIZE], bytes(after)), "old head's bytes: %d" % got.count(b"x")
    assert fm.read(vid, 0, BLOCK_SIZE) in (None, got)
    assert pool.read(vid, BLOCK_SIZE, 3 * BLOCK_SIZE) == snap[BLOCK_SIZE:]
    pool.commit()
    pool.detach_fast()
    fm.close()
    pool.close()
    again = Pool(str(tmp_path), fast=False)  # the map's own answer, C's cache aside
    try:
        assert again.read(vid, 0, BLOCK_SIZE) == got, "old head's bytes: %d" % again.read(vid, 0, BLOCK_SIZE).count(b"x")
        assert again.scrub() == []
    finally:
        again.close()


@pytest.mark.parametrize("flush", ["C", "Pool"])
def test_a_discard_in_c_and_a_write_over_it_survive_a_crash(tmp_path, flush):
    """A discard's whole blocks are made zeros by C (FastMap.discard, one
    hold of its lock) and come to the overlay through the drain, in order
    with C's writes; its ends get zeros written.  The volume's next log
    flush, C's or the Pool's, records each discarded block whole (C's: as
    reading zeros, mask 0, or whole once written again): a write C serves
    over one afterwards must not bring back, after a crash, the data the
    discard removed (a record of the written pages only, replayed over the
    last commit, did).  C's writes before the discard are gone with it,
    those after it stay."""
    pool, vid, fm, old = _written_in_c(tmp_path, 2)
    pool.commit()
    assert fm.write(vid, 2 * BLOCK_SIZE, b"b" * 4096)  # before the discard, not committed
    pool.discard(vid, 512, 3 * BLOCK_SIZE + 4096 - 512)  # a page's end, two whole blocks, a page of the last
    want = bytearray(old)
    want[512 : 3 * BLOCK_SIZE + 4096] = bytes(3 * BLOCK_SIZE + 4096 - 512)
    assert fm.read(vid, 0, 4 * BLOCK_SIZE) in (None, want)
    assert fm.write(vid, BLOCK_SIZE + 512, b"w" * 512)  # over a discarded block
    want[BLOCK_SIZE + 512 : BLOCK_SIZE + 1024] = b"w" * 512
    assert pool.read(vid, 0, 4 * BLOCK_SIZE) == want
    if flush == "C":
        pool.log_grow_ahead()  # room for C's record (the daemon's feeder keeps it)
        assert fm.fsync(vid), "C declined a log flush after its discard"
        assert pool.log_status()["flushes_in_c"] == 1
    else:
        assert pool.log_flush(vid) and pool.log_status()["flushes_in_c"] == 0
    _crash(pool, fm)
    again = Pool(str(tmp_path), fast=False)
    try:
        assert again.read(vid, 0, 4 * BLOCK_SIZE) == want
        assert again.scrub() == []
    finally:
        again.close()


@pytest.mark.parametrize("fast", [False, True])
def test_a_volume_created_or_grown_commits_alone(tmp_path, fast):
    """Creating or growing a volume touches no block: in the owner thread
    it is one LMDB transaction of its own (Pool.commit_meta), with the
    records staged so far, that neither syncs the writes so far nor
    freezes the overlay nor moves the log to its next generation.  The
    writes stay as durable as they were: after a crash the fsynced ones
    are back (replayed over the new volumes), the others are gone; a
    record written after the growth, of a block beyond the old end, is
    replayed too."""
    pool = Pool(str(tmp_path), fast=False)
    vid, quiet = pool.create_volume(4 * BLOCK_SIZE), pool.create_volume(4 * BLOCK_SIZE)
    pool.commit()
    fm = None
    if fast:
        fm = FastMap(pool.file.fd, reservoir=16)
        pool.attach_fast(fm)
    gen = pool.intent.gen
    pool.write(vid, 0, b"f" * 4096)
    assert pool.log_flush(vid)
    pool.write(quiet, 4096, b"u" * 4096)  # never flushed
    pool.put_record("disk/d-1", {"Size": 4})
    new = pool.create_volume(2 * BLOCK_SIZE)
    pool.put_record("disk/d-1", {"Size": 8})
    pool.resize_volume(vid, 8 * BLOCK_SIZE)
    assert pool.intent.gen == gen, "the log moved to its next generation: a full commit"
    assert pool.pending(), "the writes were committed with the volume"
    pool.write(vid, 6 * BLOCK_SIZE, b"g" * 4096)  # beyond the old end
    pool.write(new, 0, b"n" * 4096)
    assert pool.log_flush(vid) and pool.log_flush(new)
    if fm is not None:
        _crash(pool, fm)
    else:
        pool._abandon()
    again = Pool(str(tmp_path), fast=False)
    try:
        vols = again.volumes()
        assert sorted(vols) == [vid, quiet, new] and vols[vid]["size"] == 8 * BLOCK_SIZE
        assert again.get_record("disk/d-1") == {"Size": 8}
        assert again.read(vid, 0, 4096) == b"f" * 4096
        assert again.read(quiet, 4096, 4096) == bytes(4096)
        assert again.read(vid, 6 * BLOCK_SIZE, 4096) == b"g" * 4096
        assert again.read(new, 0, 4096) == b"n" * 4096
        assert again.scrub() == []
    finally:
        again.close()


@pytest.mark.parametrize("durable", [False, True])
def test_fsyncs_go_on_during_a_snapshot_and_stay_out_of_it(tmp_path, durable):
    """A snapshot changes no volume, so fsyncs go on while its commit runs
    (structure.snapshot marks its change keeps_volumes).  What they made
    durable survives a crash before the snapshot is durable (the snapshot
    is lost: it was never acknowledged) and after it (the snapshot holds
    what was written before its freeze, not the fsynced writes after)."""
    pool = Pool(str(tmp_path), fast=False)
    vid = pool.create_volume(4 * BLOCK_SIZE)
    fm = FastMap(pool.file.fd, reservoir=16)
    pool.attach_fast(fm)
    before = bytearray(pattern(5, 4 * BLOCK_SIZE))
    assert fm.write(vid, 0, bytes(before))
    assert pool.log_flush(vid)
    assert fm.write(vid, BLOCK_SIZE, b"p" * 4096)  # before the freeze, in no record
    before[BLOCK_SIZE : BLOCK_SIZE + 4096] = b"p" * 4096
    changes = []
    pool.commit = changes.append  # structure.snapshot's change, run as the daemon does
    try:
        structure.snapshot(pool, [vid])
    finally:
        del pool.commit
    job = pool.begin_commit(changes[0])
    assert pool.intent.usable
    after = bytearray(before)
    assert fm.write(vid, 2 * BLOCK_SIZE + 4096, b"q" * 4096)
    after[2 * BLOCK_SIZE + 4096 : 2 * BLOCK_SIZE + 8192] = b"q" * 4096
    assert pool.log_flush(vid)  # carries block 1 whole, and block 2
    if durable:
        job.run()
        (sid,) = pool.finish_commit(job)
    _crash(pool, fm)
    again = Pool(str(tmp_path), fast=False)
    try:
        assert again.read(vid, 0, 4 * BLOCK_SIZE) == after
        if durable:
            assert again.read_snapshot(sid, 0, 4 * BLOCK_SIZE) == before
        else:
            assert again._snaps == {}, "a snapshot that was never durable"
        assert again.scrub() == []
    finally:
        again.close()
