"""Property-based test of the engine against a simple in-memory model.

Random sequences of writes, discards, commits (whole, or begun, run and
finished as separate steps with writes in between, as the daemon does in a
worker thread), snapshots, rollbacks, clones, deletions and simulated power
cuts; every read is checked against the model,
and the pool's scrub (no slot owned twice, none leaked, indexes in step, every
checksum right) must come back clean after every step that changes structure.
"""
import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

import pytest
from powercut import PowerCutFile
from vdisk.engine import writepath
from vdisk.engine.errors import EngineError
from vdisk.engine.pool import BLOCK_SIZE, Pool

NBLOCKS = 3
SIZE = NBLOCKS * BLOCK_SIZE
offsets = st.integers(0, SIZE // 4096 - 1).map(lambda s: s * 4096)
lengths = st.sampled_from([512, 4096, 8192, BLOCK_SIZE - 512, BLOCK_SIZE, BLOCK_SIZE + 4096, 2 * BLOCK_SIZE])
# a discard may also cover the whole volume (mkfs, blkdiscard)
discard_lengths = st.one_of(lengths, st.just(SIZE))


def pattern(seed: int, n: int) -> bytes:
    if seed == 0:
        return bytes(n)
    unit = bytes((seed * 7 + i) & 0xFF or 1 for i in range(251))
    return (unit * (n // 251 + 1))[:n]


class PoolModel(RuleBasedStateMachine):
    vols = Bundle("vols")
    snaps = Bundle("snaps")

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vdisk-model-")
        self.pool = Pool(self.dir, datafile_factory=PowerCutFile)
        self._opened()
        self.model: dict[int, bytearray] = {}
        self.durable: dict[int, bytes] = {}
        self.snapdata: dict[int, bytes] = {}
        self.job = None  # a commit begun and not finished
        self.job_model: dict[int, bytes] = {}
        self.flushed_after_freeze: dict[int, bytes] = {}  # fsyncs that succeeded while it was in flight
        # discards make their blocks zeros a few at a time, the map's lock
        # let go in between (writepath.DISCARD_BATCH): batches of 2 here (of 3 blocks)
        self._discard_batch, writepath.DISCARD_BATCH = writepath.DISCARD_BATCH, 2

    def _opened(self):
        """Called after the pool is (re)opened."""
        self.pool.intent.max = 320 << 10  # a few records, then a full log

    def teardown(self):
        writepath.DISCARD_BATCH = self._discard_batch
        self.pool._abandon()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _durable_now(self):
        self.durable = {v: bytes(d) for v, d in self.model.items()}

    def _check_scrub(self):
        problems = self.pool.scrub()
        assert problems == [], problems
        self._durable_now()  # scrub commits

    @initialize(target=vols)
    def first_volume(self):
        return self.create()

    @precondition(lambda self: len(self.model) < 3 and self.job is None)
    @rule(target=vols)
    def create(self):
        vid = self.pool.create_volume(SIZE)
        self.model[vid] = bytearray(SIZE)
        # a commit of the new volume alone (commit_meta): the writes so
        # far are as durable as before it
        self.durable[vid] = bytes(SIZE)
        return vid

    @rule(vid=vols, off=offsets, n=lengths, seed=st.integers(0, 5))
    def write(self, vid, off, n, seed):
        self._write(vid, off, n, seed)

    def _write(self, vid, off, n, seed):
        if vid not in self.model:
            return
        n = min(n, SIZE - off)
        data = pattern(seed, n)
        self.pool.write(vid, off, data)
        self.model[vid][off : off + n] = data

    # the same rule twice: writes should be the commonest step
    @rule(vid=vols, off=offsets, n=lengths, seed=st.integers(0, 5))
    def write_more(self, vid, off, n, seed):
        self._write(vid, off, n, seed)

    @rule(vid=vols, off=offsets, n=discard_lengths)
    def discard(self, vid, off, n):
        if vid not in self.model:
            return
        n = min(n, SIZE - off)
        self.pool.discard(vid, off, n)
        self.model[vid][off : off + n] = bytes(n)

    @precondition(lambda self: self.job is None)
    @rule()
    def commit(self):
        self.pool.commit()
        self._durable_now()

    @precondition(lambda self: self.job is None)
    @rule()
    def failed_commit(self):
        """A commit whose change fails: its writes go back under the overlay
        (commit._unfreeze), nothing becomes durable."""
        def boom(tx):
            raise EngineError("the change fails")

        with pytest.raises(EngineError, match="the change fails"):
            self.pool.commit(change=boom)

    @precondition(lambda self: self.job is None)
    @rule()
    def begin_commit(self, change=None):
        self.job = self.pool.begin_commit(change)
        self.job_model = {v: bytes(d) for v, d in self.model.items()}
        self.flushed_after_freeze = {}

    @precondition(lambda self: self.job is not None and not self.job.done)
    @rule()
    def run_commit_job(self):
        self.job.run()  # the worker thread's part, between other steps

    @precondition(lambda self: self.job is not None)
    @rule()
    def finish_commit(self):
        if not self.job.done:
            self.job.run()
        self.pool.finish_commit(self.job)
        self._job_durable()
        self.job = None

    def _job_durable(self):
        """The job's transaction is durable: what it froze, and what was
        flushed to the log since (which the commit must not undo)."""
        self.durable = dict(self.job_model)
        self.durable.update(self.flushed_after_freeze)

    def _flushed(self, vid):
        """An fsync of vid succeeded: every write to it so far is durable."""
        self.durable[vid] = bytes(self.model[vid])
        if self.job is not None:
            self.flushed_after_freeze[vid] = self.durable[vid]

    @precondition(lambda self: self.job is None)
    @rule(target=snaps, vid=vols)
    def snapshot(self, vid):
        if vid not in self.model:
            return -1
        (sid,) = self.pool.snapshot([vid])
        self.snapdata[sid] = bytes(self.model[vid])
        self._durable_now()
        return sid

    @precondition(lambda self: self.job is None)
    @rule(vid=vols, sid=snaps)
    def rollback(self, vid, sid):
        if vid not in self.model or sid not in self.snapdata:
            return
        self.pool.rollback(vid, sid)
        self.model[vid][:] = self.snapdata[sid]
        self._durable_now()
        self._check_scrub()

    @precondition(lambda self: len(self.model) < 4 and self.job is None)
    @rule(target=vols, sid=snaps)
    def clone(self, sid):
        if sid not in self.snapdata:
            return -1
        vid = self.pool.create_volume(SIZE, parent_snapshot=sid)
        self.model[vid] = bytearray(self.snapdata[sid])
        self.durable[vid] = bytes(self.snapdata[sid])  # the clone alone (commit_meta)
        return vid

    @precondition(lambda self: self.job is None)
    @rule(sid=consumes(snaps))
    def delete_snapshot(self, sid):
        if sid not in self.snapdata:
            return
        self.pool.delete_snapshot(sid)
        del self.snapdata[sid]
        self._durable_now()
        self._check_scrub()

    @precondition(lambda self: self.job is None)
    @rule(vid=consumes(vols))
    def delete_volume(self, vid):
        if vid not in self.model:
            return
        self.pool.delete_volume(vid)
        del self.model[vid]
        self._durable_now()
        self._check_scrub()

    @rule(vid=vols)
    def log_flush(self, vid):
        """An fsync of one volume through the intent log (False: the daemon
        would commit instead)."""
        if vid in self.model and self.pool.log_flush(vid):
            self._flushed(vid)

    @rule(vid=vols)
    def log_flush_more(self, vid):
        self.log_flush(vid)

    @precondition(lambda self: self.job is None)
    @rule(vid=vols, mode=st.sampled_from(["drop", "tear", "keep"]), seed=st.integers(0, 1000))
    def crash_in_log_flush(self, vid, mode, seed):
        """The power goes while a log record is being synced: afterwards the
        volume reads as before the flush or as after it, nothing else."""
        if vid not in self.model:
            return
        self._fail_next_log_sync()
        if self.pool.log_flush(vid):  # nothing to write: it never synced
            self._flushed(vid)
        self.pool.intent.fail_next(False)
        self._power_cut(mode, seed, maybe={vid: bytes(self.model[vid])})

    def _fail_next_log_sync(self):
        """The next record's fdatasync fails (its write was done): what
        the log file held from the record's place on may come back after
        a power cut, whole, torn or not at all (PowerCutFile sees the
        data file's writes; the log's writer is C's)."""
        il = self.pool.intent
        il.file.remember(il.pos, il.max - il.pos)
        il.fail_next()

    @rule(mode=st.sampled_from(["drop", "tear", "keep"]), seed=st.integers(0, 1000))
    def power_cut(self, mode, seed):
        self._power_cut(mode, seed)

    def _power_cut(self, mode, seed, maybe=None):
        if self.job is not None and self.job.done:  # its transaction is durable
            self._job_durable()
        self.job = None
        files = (self.pool.file, *self.pool.logs)
        self.pool.intent.close()  # its C writer's 4 MiB buffer, which a dropped pool would keep
        self.pool.env.close()
        self.pool.env = None
        for f in files:
            f.power_cut(mode, random.Random(seed))
            f.close()
        self.pool = Pool(self.dir, datafile_factory=PowerCutFile)
        self._opened()
        for vid, after in (maybe or {}).items():
            now = self.pool.read(vid, 0, SIZE)
            assert now in (self.durable[vid], after), "volume %d is neither before nor after the flush" % vid
            self.durable[vid] = bytes(now)
        self.model = {v: bytearray(d) for v, d in self.durable.items()}
        self._check_scrub()

    @rule(vid=vols, off=offsets, n=lengths)
    def read(self, vid, off, n):
        if vid not in self.model:
            return
        n = min(n, SIZE - off)
        assert self.pool.read(vid, off, n) == bytes(self.model[vid][off : off + n])

    @invariant()
    def log_knows_its_pages(self):
        """Every block a log flush wrote had its changed pages tracked (the
        whole-block fallback would hide a page left out)."""
        assert self.pool.intent.stats["pages_unknown"] == 0

    @invariant()
    def write_cache_is_counted(self):
        """The write cache's fill, kept up as writes come (in C too), is
        the data its entries hold (a commit starts on it)."""
        from vdisk.engine.overlay import held

        got = self.pool.dirty_bytes()
        want = sum(held(d) for dirty in self.pool._dirty.values() for d in dirty.values()) * 4096
        assert got == want, "the write cache counts %d bytes, its entries hold %d" % (got, want)

    @invariant()
    def snapshots_read_back(self):
        for sid, data in self.snapdata.items():
            assert self.pool.read_snapshot(sid, 0, SIZE) == data, "snapshot %d differs" % sid

    @invariant()
    def volumes_read_back(self):
        for vid, data in self.model.items():
            assert self.pool.read(vid, 0, SIZE) == bytes(data), "volume %d differs" % vid


def model_settings(steps: int):
    """Settings of a model state machine (VDISK_MODEL_EXAMPLES runs longer)."""
    return settings(
        max_examples=int(os.environ.get("VDISK_MODEL_EXAMPLES", "60")),
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


PoolModel.TestCase.settings = model_settings(40)
TestPoolModel = PoolModel.TestCase


@settings(max_examples=int(os.environ.get("VDISK_MODEL_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.sampled_from(["step", "snap", "commit", "snap-a-only"]), min_size=5, max_size=60),
       offsets=st.lists(st.integers(0, 2 * BLOCK_SIZE // 512 - 8).map(lambda s: s * 512), min_size=1, max_size=3))
def test_multi_volume_snapshot_keeps_causal_order(steps, offsets):
    """Writes with a causal order across two volumes (B gets i only after A
    got i), multi-volume snapshots at arbitrary points, including between
    in-place rewrites of blocks not yet committed: every snapshot pair must
    show seq(A) - seq(B) in {0, 1}."""
    d = tempfile.mkdtemp(prefix="vdisk-causal-")
    pool = Pool(d)
    try:
        a, b = pool.create_volume(2 * BLOCK_SIZE), pool.create_volume(2 * BLOCK_SIZE)
        seq, half, pairs = 0, False, []
        for s in steps:
            if s == "step":  # one half-step of the writer
                if not half:
                    seq += 1
                    for off in offsets:
                        pool.write(a, off, seq.to_bytes(8, "little"))
                else:
                    for off in offsets:
                        pool.write(b, off, seq.to_bytes(8, "little"))
                half = not half
            elif s == "snap":
                pairs.append(tuple(pool.snapshot([a, b])))
            elif s == "commit":
                pool.commit()
            else:  # a single-volume snapshot in between must not disturb the others
                pool.snapshot([a])
        for sa, sb in pairs:
            for off in offsets:
                va = int.from_bytes(pool.read_snapshot(sa, off, 8), "little")
                vb = int.from_bytes(pool.read_snapshot(sb, off, 8), "little")
                assert va - vb in (0, 1), (va, vb)
        assert pool.scrub() == []
    finally:
        pool._abandon()
        shutil.rmtree(d, ignore_errors=True)
