"""A filesystem workload that knows what it made durable.

Creates files of random content, fsyncs each file and its directory, and
only then appends "name sha256 size monotonic_ns" to a log outside the disks under
test.  Every file logged before a snapshot began must be in a consistent
restore, whole.  Files are never rewritten, so a file's content is one
version or absent.

    python -m vdisk.consistency.workload DIR LOG [--seed N]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("log")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    r = random.Random(a.seed)
    dfd = os.open(a.dir, os.O_RDONLY | os.O_DIRECTORY)
    with open(a.log, "a", buffering=1) as log:
        n = 0
        while not stop:
            n += 1
            name = "f%06d" % n
            data = r.randbytes(r.choice([4096, 16384, 65536, 200000]))
            fd = os.open(os.path.join(a.dir, name), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dfd)
            log.write("%s %s %d %d\n" % (name, hashlib.sha256(data).hexdigest(), len(data), time.monotonic_ns()))
    os.close(dfd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
