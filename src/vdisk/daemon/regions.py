"""Copies between regions, in the daemon's background (vdisk.control.copies).

RegionCopies runs each CopySnapshot to another region that is still
progressing as `vdisk repository archive REPO SNAP --copy ...` in a child
process (it reads the snapshot back through this daemon's control socket,
and talks to Ceph itself, so a slow cluster never holds the daemon up), and
records the outcome; copies a crash interrupted start again when the daemon
does (an archive resumes: chunks already sent are not sent again).  Every
PULL_INTERVAL seconds, when a repository is registered for this pool's own
region, it runs `vdisk repository pull REPO`, which takes in the copies
other regions sent here.

Concurrency contract: a trio task of the daemon; records change under the
daemon's control lock (CopySnapshot's in the control thread, the outcome's
in the trio thread); poke() may come from either; the children are killed
when the daemon stops.
"""
from __future__ import annotations

import json
import logging
import sys
import threading

import trio

from ..exchange import registry

log = logging.getLogger(__name__)

PULL_INTERVAL = 5.0


class RegionCopies:
    def __init__(self, daemon):
        self.daemon = daemon
        self._thread = threading.get_ident()  # the daemon's trio thread
        self._wake = trio.Event()
        self._running: set[str] = set()
        self._pulling = False

    def poke(self, _copy_id: str | None = None) -> None:
        """A copy was asked for (Controller.region_copier), in the trio
        thread or in the control thread (CopySnapshot runs there)."""
        if threading.get_ident() == self._thread:
            self._wake.set()
        else:
            trio.from_thread.run_sync(self.poke)

    def _cli(self, *args) -> list[str]:
        p = self.daemon.paths
        return [sys.executable, "-m", "vdisk", "--data-dir", p.data_dir, "--mountpoint", p.mountpoint, *args]

    async def run(self) -> None:
        ctl = self.daemon.ctl
        async with trio.open_nursery() as nursery:
            while True:
                for cid, rec in ctl.region_copies("progressing").items():
                    if cid not in self._running:
                        self._running.add(cid)
                        nursery.start_soon(self._copy, cid, rec)
                home = registry.for_region(self.daemon.paths.data_dir, ctl.region)
                if home is not None and not self._pulling:
                    self._pulling = True
                    nursery.start_soon(self._pull, home[0])
                with trio.move_on_after(PULL_INTERVAL):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _copy(self, cid: str, rec: dict) -> None:
        try:
            log.info("copying snapshot %s to region %s as %s (repository %s)", rec["SourceSnapshotId"],
                     rec["DestinationRegionId"], cid, rec["Repository"])
            done = await trio.run_process(
                self._cli("repository", "archive", rec["Repository"], rec["SourceSnapshotId"], "--copy",
                          json.dumps(rec)), capture_stdout=True, capture_stderr=True, check=False)
            why = done.stderr.decode(errors="replace").strip()
            if done.returncode:
                log.error("the copy %s to region %s failed: %s", cid, rec["DestinationRegionId"], why)
            async with self.daemon._control:
                await self.daemon.committer.idle()  # its record commits alone, with no commit in flight
                self.daemon.ctl.region_copy_done(cid, done.returncode == 0, why)
        finally:
            self._running.discard(cid)

    async def _pull(self, repository: str) -> None:
        try:
            done = await trio.run_process(self._cli("--json", "repository", "pull", repository), capture_stdout=True,
                                          capture_stderr=True, check=False)
            if done.returncode:
                log.warning("taking in copies from repository %s failed: %s", repository,
                            done.stderr.decode(errors="replace").strip())
            else:
                for c in json.loads(done.stdout)["Copies"]:
                    log.info("took in snapshot %s, a copy from region %s", c["SnapshotId"], c["SourceRegionId"])
        finally:
            self._pulling = False
