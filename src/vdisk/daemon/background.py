"""Threads of their own, of a CPU priority that may be set lower, for the
daemon's deferred work: commits, the data file's write-out and writeback,
punching freed slots.

That work does not wait on the disks' requests, and they should not
wait on it.  On a host of few CPUs they did: a commit's Python part (about
150 ms for 16384 blocks after a snapshot, offline; 350 ms under cProfile)
and the kernel's writeback that its fdatasync
and sync_file_range do in the calling thread take the CPUs the threads
serving I/O need.  At nice 10 (VDISK_BACKGROUND_NICE=10), the writers'
worst latency with a snapshot a second fell from 51 to 30 ms in four
barrier-only runs, but read 127 ms in the full bench that followed, with
two rounds of 127 and 192 ms (docs/perf/2026-12-03-background-nice.md):
perhaps a niced thread holding the filesystem's journal open while
normal-priority tasks keep the CPUs busy (priority inversion).  Until
that is settled the default is 0, the I/O threads' own priority.

Linux's nice is per thread, and an unprivileged thread may not lower its
nice again.  So each Worker is one long-lived thread niced once, that
runs nothing but its jobs (trio's own threads are reused for anything).

Concurrency contract: Worker.run is called from the trio thread, by any
number of tasks; one worker runs its jobs one at a time, in the order
they came.  run() waits until its job has returned, and cannot be
cancelled meanwhile (like trio.to_thread.run_sync): its caller then owns
what the job changed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading

import outcome
import trio

log = logging.getLogger(__name__)

# The nice value of the background threads (VDISK_BACKGROUND_NICE; 0, the
# default: as the threads serving I/O).
_nice = os.environ.get("VDISK_BACKGROUND_NICE", "0")
if not (_nice.isdigit() and 0 <= int(_nice) <= 19):
    raise SystemExit("VDISK_BACKGROUND_NICE must be a nice value from 0 to 19, not %r" % _nice)
NICE = int(_nice)

_PR_SET_NAME = 15


def _name_thread(name: str) -> None:
    """The calling thread's name as the kernel shows it (top -H, perf,
    /proc/PID/task/TID/comm), at most 15 bytes.  Best effort."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Worker:
    """One thread named `name`, at nice `nice`, started at the first job."""

    def __init__(self, name: str, nice: int = NICE):
        self.name = name
        self.nice = nice
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.native_id: int | None = None  # the thread's id, once started

    def _loop(self) -> None:
        self.native_id = threading.get_native_id()
        _name_thread(self.name)
        if self.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, self.native_id, self.nice)
            except OSError as exc:  # not fatal: the work is done all the same
                log.warning("could not lower the priority of thread %s: %s", self.name, exc)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    async def run(self, fn, *args):
        """fn(*args) in this worker's thread; its result, or its exception
        raised here."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list = []

        def job():
            result.append(outcome.capture(fn, *args))
            token.run_sync_soon(done.set)

        self._jobs.put(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        return result[0].unwrap()

    def close(self) -> None:
        """Stop the thread once its jobs are done (call when no run() is
        waiting); waits for it."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
