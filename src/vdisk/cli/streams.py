"""`vdisk snapshot export` and `vdisk disk import-diff`: snapshots as Ceph
RBD diff streams (ExportSnapshotDiff, ImportDiskDiff), and whole images
as raw or qcow2 files.

The stream goes between the daemon and the file (or pipe) through a file
descriptor passed with the request; with progress shown (stderr a
terminal) or an image format asked for, this process sits in between: it
reads the stream from a pipe, counts it, and writes it on (rbd-diff) or
applies it to a sparse file (raw; qcow2 through qemu-img convert).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from ..exchange import pipe, rbddiff
from .common import EXIT_OK, EXIT_USAGE, CLIError, _human, _show


class Progress:
    """A one-line progress report on stderr when it is a terminal, at most
    five times a second, as rbd does ("Exporting image: 42% complete...")."""

    def __init__(self, what: str, total: int | None):
        self.what = what
        self.total = total
        self.on = sys.stderr.isatty()
        self._last = 0.0
        self._t0 = time.monotonic()

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        total = total if total is not None else self.total
        rate = done / max(now - self._t0, 1e-6)
        pct = " %3d%%" % (100 * done // total) if total else ""
        sys.stderr.write("\r%s:%s %s (%s/s)   " % (self.what, pct, _human(done), _human(int(rate))))
        sys.stderr.flush()

    def end(self, ok: bool) -> None:
        if self.on:
            sys.stderr.write("\r%s: %s%s\n" % (self.what, "done" if ok else "failed", " " * 30))


def _pump(src: int, sink, progress: Progress) -> None:
    """Copy everything from fd src into sink (a file object), counting."""
    done = 0
    while True:
        b = os.read(src, 1 << 20)
        if not b:
            return
        sink.write(b)
        done += len(b)
        progress(done)


def _through_pipe(app, action: str, consume, **params) -> dict:
    """Run an export with this process reading the stream from a pipe
    (consume(read_fd)) while the daemon writes it."""
    try:
        res, _ = pipe.piped(lambda w: app.stream(action, w, **params), consume)
    except CLIError:
        raise
    except (OSError, rbddiff.StreamError) as exc:
        raise CLIError("writing the export failed: %s" % exc) from None
    return res


def cmd_snapshot_export(app) -> int:
    a = app.args
    fmt = a.format
    if fmt != "rbd-diff" and a.base:
        raise CLIError("--from makes a diff: it needs --format rbd-diff (raw and qcow2 are whole images)", EXIT_USAGE)
    out = a.output
    if fmt != "rbd-diff" and out in (None, "-"):
        raise CLIError("--format %s writes a file: give it with -o FILE" % fmt, EXIT_USAGE)
    if out not in (None, "-") and os.path.isdir(out):
        raise CLIError("%s is a directory: give the file to write" % out, EXIT_USAGE)
    if out in (None, "-") and sys.stdout.isatty():
        raise CLIError("refusing to write a binary stream to a terminal: give -o FILE, or pipe it "
                       "(vdisk snapshot export SNAP | rbd import-diff - IMAGE)", EXIT_USAGE)
    params = {"SnapshotId": a.snapshot, "FromSnapshotId": a.base}
    if fmt == "rbd-diff":
        res = _export_diff(app, out, params)
    else:
        res = _export_image(app, out, fmt, params)
    if out in (None, "-"):  # standard output holds the stream: the answer goes to stderr, with --json only
        if app.json:
            print(json.dumps(res, indent=2, sort_keys=True), file=sys.stderr)
    else:
        app.out(res, _show(res))
    return EXIT_OK


def _std_fd(f, what: str) -> int:
    """The descriptor behind standard input or output, or a clear error."""
    try:
        return f.buffer.fileno()
    except (AttributeError, OSError, ValueError):
        raise CLIError("standard %s is not a file or pipe here: %s" % (
            what, "give -o FILE" if what == "output" else "give a FILE instead of -"), EXIT_USAGE) from None


def _temp_beside(out: str) -> str:
    """A new file beside out (written, then renamed over out only when the
    export succeeded: a refused export leaves an existing file untouched)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vdisk-export-", dir=os.path.dirname(os.path.abspath(out)))
    except OSError as exc:
        raise CLIError("cannot write beside %s: %s" % (out, exc.strerror), EXIT_USAGE) from None
    except ValueError:  # a NUL, or bytes that are no file name (UnicodeEncodeError)
        raise CLIError("%r is not a file name" % out, EXIT_USAGE) from None
    os.close(fd)
    return tmp


def _export_diff(app, out, params) -> dict:
    progress = Progress("Exporting %s" % params["SnapshotId"], None)
    tmp = None
    if out in (None, "-"):
        sink_fd = _std_fd(sys.stdout, "output")
    else:
        tmp = _temp_beside(out)
        sink_fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    ok = False
    try:
        if not progress.on:
            res = app.stream("ExportSnapshotDiff", sink_fd, **params)
        else:
            with os.fdopen(os.dup(sink_fd), "wb") as sink:
                res = _through_pipe(app, "ExportSnapshotDiff", lambda r: _pump(r, sink, progress), **params)
        if tmp is not None:
            os.fsync(sink_fd)
            _put_in_place(tmp, out)
        ok = True
    finally:
        progress.end(ok)
        if tmp is not None:
            os.close(sink_fd)
            if not ok:
                _unlink(tmp)
    return res


def _apply_raw(r: int, path: str, progress: Progress) -> None:
    """Apply a full diff stream from fd r to the sparse file path."""
    with open(r, "rb", buffering=1 << 20, closefd=False) as inp, open(path, "r+b") as f:
        reader = rbddiff.Reader(inp)
        h = reader.header()
        f.truncate(h.size)
        for kind, off, arg in reader.records():
            if kind == "w":
                if any(arg):  # what is all zeros stays a hole
                    os.pwrite(f.fileno(), arg, off)
                progress(off + len(arg), h.size)
        f.flush()
        os.fsync(f.fileno())


def _export_image(app, out: str, fmt: str, params: dict) -> dict:
    if fmt == "qcow2" and shutil.which("qemu-img") is None:
        raise CLIError("--format qcow2 needs qemu-img (apt-get install qemu-utils)")
    progress = Progress("Exporting %s" % params["SnapshotId"], None)
    raw = _temp_beside(out)
    image = raw if fmt == "raw" else _temp_beside(out)
    ok = False
    try:
        res = _through_pipe(app, "ExportSnapshotDiff", lambda r: _apply_raw(r, raw, progress), **params)
        progress.end(True)
        if fmt == "qcow2":
            cmd = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"] + (["-p"] if progress.on else []) + [raw, image]
            if subprocess.run(cmd).returncode != 0:
                raise CLIError("qemu-img convert to %s failed (its message is above)" % out)
        _put_in_place(image, out)
        ok = True
    finally:
        if not ok:
            progress.end(False)
        _unlink(raw)
        _unlink(image)
    return {"SnapshotId": params["SnapshotId"], "Format": fmt, "File": out, "ImageSize": res["ImageSize"],
            "DataBytes": res["DataBytes"]}


def _put_in_place(tmp: str, out: str) -> None:
    """The finished export under its name (the temporary file stays for
    the caller to remove when that fails)."""
    try:
        os.replace(tmp, out)
    except OSError as exc:
        raise CLIError("cannot write %s: %s" % (out, exc.strerror)) from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def cmd_disk_import_diff(app) -> int:
    a = app.args
    if a.file == "-":
        fd = _std_fd(sys.stdin, "input")
        close = False
    else:
        try:
            fd = os.open(a.file, os.O_RDONLY)
        except OSError as exc:
            raise CLIError("cannot read %s: %s" % (a.file, exc.strerror), EXIT_USAGE) from None
        except ValueError:  # a NUL, or bytes that are no file name (UnicodeEncodeError)
            raise CLIError("%r is not a file name" % a.file, EXIT_USAGE) from None
        close = True
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise CLIError("%s is a directory: give the stream's file, or - for standard input" % a.file, EXIT_USAGE)
    try:
        res = app.stream("ImportDiskDiff", fd, DiskId=a.disk, SnapshotName=a.snapshot_name)
    finally:
        if close:
            os.close(fd)
    human = "%s: %s written, %s zeroed%s" % (res["DiskId"], _human(res["WrittenBytes"]), _human(res["ZeroedBytes"]),
                                            ", snapshot " + res["SnapshotId"] if res.get("SnapshotId") else "")
    app.out(res, human)
    return EXIT_OK


def add_commands(verb, disk_group, snapshot_group) -> None:
    v = verb(snapshot_group, "export", cmd_snapshot_export,
             "write a snapshot (or its change since an older one) as a Ceph RBD diff stream, or as a raw or qcow2 image")
    v.add_argument("snapshot", metavar="SNAPSHOT_ID")
    v.add_argument("--from", dest="base", metavar="SNAPSHOT_ID",
                   help="only the change since this older snapshot of the same disk (rbd export-diff --from-snap)")
    v.add_argument("-o", "--output", metavar="FILE", help="where to write (default: standard output, for a pipe)")
    v.add_argument("--format", choices=("rbd-diff", "raw", "qcow2"), default="rbd-diff",
                   help="rbd-diff (default: what rbd import-diff reads), raw (a sparse file) or qcow2 (qemu-img)")
    v = verb(disk_group, "import-diff", cmd_disk_import_diff,
             "apply a Ceph RBD diff stream to a disk and take the snapshot it ends at (rbd import-diff); "
             "all or nothing; the disk's instance must be Stopped")
    v.add_argument("disk", metavar="DISK_ID")
    v.add_argument("file", metavar="FILE", help="the stream (rbd export-diff's output), or - for standard input")
    v.add_argument("--snapshot-name", metavar="NAME", help="name the snapshot this instead of the stream's end snapshot")
