"""The daemon's background threads (vdisk.daemon.background): real threads
under a real trio loop, then the running daemon's commit thread.  Their
effect on the writers' latency is measured by scripts/bench
(docs/perf/2026-12-03-background-nice.md), not here."""
import os
import subprocess
import sys
import threading

import pytest
import trio

from vdisk.daemon.background import Worker

from vdiskenv import VDiskEnv, need_root_fuse_loop, write_random_blocks


def task_stat(tid: int, pid: str = "self") -> tuple[str, int]:
    """A thread's name and nice value, as the kernel has them."""
    with open("/proc/%s/task/%d/stat" % (pid, tid)) as f:
        stat = f.read()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    return name, int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19: nice


def test_a_worker_runs_jobs_in_its_own_lowered_thread_in_order():
    w = Worker("vdisk-test", nice=7)
    seen = []

    def job(i):
        seen.append((i, threading.get_native_id()))
        return i * 2

    async def main():
        results = []
        async with trio.open_nursery() as n:
            for i in range(5):
                async def one(i=i):
                    results.append(await w.run(job, i))
                n.start_soon(one)
                await trio.sleep(0)  # queued in this order
        return results

    try:
        results = trio.run(main)
        assert sorted(results) == [0, 2, 4, 6, 8]
        assert [i for i, _ in seen] == [0, 1, 2, 3, 4]  # one at a time, as they came
        tids = {tid for _, tid in seen}
        assert tids == {w.native_id} and w.native_id != threading.get_native_id()
        assert task_stat(w.native_id) == ("vdisk-test", 7)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0  # the caller's is untouched
    finally:
        w.close()


def test_a_jobs_exception_is_raised_to_its_caller_and_the_worker_goes_on():
    w = Worker("vdisk-test", nice=0)

    def fail():
        raise ValueError("the job's own error")

    async def main():
        with pytest.raises(ValueError, match="the job's own error"):
            await w.run(fail)
        return await w.run(lambda: "still serving")

    try:
        assert trio.run(main) == "still serving"
        assert task_stat(w.native_id)[1] == 0
    finally:
        w.close()


def test_cancelling_the_caller_waits_for_the_job():
    """A commit's caller may be cancelled; the job it handed over must
    still end before the caller goes on (its caller owns what it changed)."""
    w = Worker("vdisk-test", nice=0)
    release = threading.Event()
    finished = []

    def slow():
        release.wait(10)
        finished.append(True)

    async def main():
        threading.Timer(0.3, release.set).start()
        with trio.move_on_after(0.05):
            await w.run(slow)

    try:
        trio.run(main)
        assert finished == [True]
    finally:
        w.close()


@pytest.mark.root
def test_the_daemons_commits_run_in_a_thread_of_lower_priority(tmp_path, monkeypatch):
    need_root_fuse_loop()
    monkeypatch.setenv("VDISK_BACKGROUND_NICE", "10")  # the daemon's, set at its start
    env = VDiskEnv(parent=str(tmp_path))
    try:
        pid = env.start()
        iid, (disk,) = env.instance(ndata=1, size=1)
        env.run("instance", "start", iid)
        dev = env.attach(disk)
        write_random_blocks(dev, range(64), seed=1)
        env.run("snapshot", "create", disk)  # a structural commit: in the commit thread
        threads = [task_stat(int(t), str(pid)) for t in os.listdir("/proc/%d/task" % pid)]
        commit = [nice for name, nice in threads if name == "vdisk-commit"]
        assert commit == [10], threads
        io = [nice for name, nice in threads if name.startswith("vdisk-io")]
        assert io and set(io) == {0}, threads
    finally:
        env.close()


@pytest.mark.parametrize("value", ["abc", "-3", "20", ""])
def test_a_bad_nice_setting_is_refused_by_name(value):
    env = dict(os.environ, VDISK_BACKGROUND_NICE=value)
    r = subprocess.run([sys.executable, "-c", "import vdisk.daemon.background"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "VDISK_BACKGROUND_NICE must be a nice value from 0 to 19, not %r" % value in r.stderr
