"""The daemon's drivers of the stream actions (vdisk.control.streams):
ExportSnapshotDiff writes into, and ImportDiskDiff reads from, a file
descriptor the client passed with its request (SCM_RIGHTS on the control
socket), so the stream never goes through JSON.

Concurrency contract: called in the trio thread.  Every pool step (one
extent read, one record applied, the snapshots taken) runs in the trio
thread between FUSE requests; every read from or write to the client's
descriptor, which may block on a pipe, runs in a worker thread.  Neither
holds the daemon's control lock while it waits for the client: an export
takes it while it is planned, an import while it begins and ends (between
them the control plane refuses what names the disk: Controller.importing).
"""
from __future__ import annotations

import io
import os

import trio

from ..control import streams
from ..exchange import rbddiff

# the export sends the stream to the client's descriptor in pieces of this size
FLUSH = 1 << 20


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


async def export(daemon, req: dict, fd: int) -> dict:
    ctl = daemon.ctl
    try:
        async with daemon._control:
            await daemon.committer.idle()  # no await from here: the plan commits first
            plan = ctl.export_diff(req)
        buf = io.BytesIO()
        w = rbddiff.Writer(buf, plan.header.from_snap, plan.header.to_snap, plan.header.size)
        for rec in plan.records():  # each step reads one extent from the pool
            w.put(rec)
            if buf.tell() >= FLUSH:
                await trio.to_thread.run_sync(_write_all, fd, buf.getvalue())
                buf.seek(0)
                buf.truncate()
            else:
                await trio.lowlevel.checkpoint()
        w.end()
        await trio.to_thread.run_sync(_write_all, fd, buf.getvalue())
        return streams.export_answer(plan, w)
    except OSError as exc:
        return ctl.error_answer(streams.CloudError(
            "InvalidParameter.DiffStream", "Writing the stream failed: %s (the reader went away?)" % exc.strerror), req)
    except Exception as exc:  # noqa: BLE001 - answered, as Controller.handle does
        return ctl.error_answer(exc, req)


async def import_(daemon, req: dict, fd: int) -> dict:
    """The control lock is held while the import begins and ends, not while
    it waits for the client's stream: meanwhile the control plane refuses
    whatever names the disk or its instance (Controller.importing), and
    answers the rest."""
    ctl = daemon.ctl
    mine = os.dup(fd)
    try:
        f = os.fdopen(mine, "rb", buffering=FLUSH)
    except OSError as exc:  # a directory passed as the stream (fdopen leaves the descriptor open)
        os.close(mine)
        return ctl.error_answer(streams.stream_error(exc), req)
    try:
        reader = rbddiff.Reader(f)
        header = await trio.to_thread.run_sync(streams.read_header, reader)
        async with daemon._control:
            await daemon.committer.idle()  # the hidden snapshot is a structural commit
            imp = ctl.import_diff(req, header)
        records = reader.records()
        try:
            while True:
                rec = await trio.to_thread.run_sync(next, records, None)
                if rec is None:
                    break
                imp.apply(rec)
                await daemon.committer.after_write()  # the write cache's limit, as for FUSE writes
        except BaseException as exc:  # cancelled too (the daemon stops): the disk as it was
            with trio.CancelScope(shield=True):
                async with daemon._control:
                    await daemon.committer.idle()
                    err = imp.fail(exc)
            raise err from None
        async with daemon._control:
            await daemon.committer.idle()
            return imp.finish()
    except Exception as exc:  # noqa: BLE001 - answered, as Controller.handle does
        return ctl.error_answer(exc, req)
    finally:
        f.close()
