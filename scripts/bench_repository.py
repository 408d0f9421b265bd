"""scripts/bench --repository: snapshots leaving the host, on a real
single-node Ceph started for the run (scripts/ceph-local) on this machine.

- the ceiling: `rados bench` writes and sequential reads, 4 MiB objects with
  8 in flight, and 64 KiB objects (vdisk's chunk) with 16 in flight (its
  window);
- vdisk repository archive (full) and restore of a disk written whole;
- incremental archives after changing 1%, 10% and 50% of its blocks (time
  and bytes sent should follow the change);
- the same change sent into an RBD image: `vdisk snapshot export --from
  | rbd import-diff -` against `rbd export-diff --from-snap | rbd import-diff -`;
- the two routes to the cluster for a repository's chunks: librados (the
  one vdisk uses) against S3 through radosgw (boto3), 64 KiB and 4 MiB
  objects, 16 in flight each.

Every figure is the median of --repeat runs, measured in the same run.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time

from vdisk.harness import VDiskEnv, write_random_blocks

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 65536


def _rados_bench(env, pool, seconds, size, threads) -> dict:
    def mbps(out: str) -> float:
        for line in out.splitlines():
            if line.startswith("Bandwidth (MB/sec):"):
                return float(line.split(":")[1])
        raise RuntimeError("rados bench printed no bandwidth:\n" + out)

    w = subprocess.run(["rados", "bench", "-p", pool, str(seconds), "write", "-b", str(size), "-t", str(threads),
                        "--no-cleanup"], env=env, capture_output=True, text=True, check=True).stdout
    r = subprocess.run(["rados", "bench", "-p", pool, str(seconds), "seq", "-t", str(threads)], env=env,
                       capture_output=True, text=True, check=True).stdout
    subprocess.run(["rados", "-p", pool, "cleanup"], env=env, capture_output=True)
    return {"write_MBps": mbps(w), "read_MBps": mbps(r)}


def _routes(ceph: dict, d: str, count: int = 1500, window: int = 16) -> dict:
    """PUT and GET of `count` objects of 64 KiB (and count/16 of 4 MiB)
    through librados (aio, `window` in flight) and through S3 to radosgw
    (boto3, `window` threads)."""
    import concurrent.futures

    import boto3
    import botocore.config
    import rados

    out = {}
    cluster = rados.Rados(conffile=ceph["CEPH_CONF"])
    cluster.connect()
    cluster.create_pool("routes")
    io = cluster.open_ioctx("routes")
    user = json.loads(subprocess.run(["radosgw-admin", "user", "create", "--uid=bench", "--display-name=bench"],
                                     env=ceph, capture_output=True, text=True, check=True).stdout)["keys"][0]
    port = open(os.path.join(d, "rgw.port")).read().strip()
    s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:%s" % port, aws_access_key_id=user["access_key"],
                      aws_secret_access_key=user["secret_key"], region_name="default",
                      config=botocore.config.Config(max_pool_connections=window, retries={"max_attempts": 2}))
    s3.create_bucket(Bucket="routes")
    for size, n in ((64 << 10, count), (4 << 20, max(16, count // 16))):
        data = os.urandom(size)
        key = "%dK" % (size >> 10)

        def lib_put():
            for i in range(0, n, window):
                comps = [io.aio_write_full("o%s.%d" % (key, j), data) for j in range(i, min(n, i + window))]
                for c in comps:
                    c.wait_for_complete()

        def lib_get():
            for i in range(0, n, window):
                comps = [io.aio_read("o%s.%d" % (key, j), size, 0, lambda c, b: None) for j in range(i, min(n, i + window))]
                for c in comps:
                    c.wait_for_complete_and_cb()

        with concurrent.futures.ThreadPoolExecutor(window) as pool:
            def s3_put():
                list(pool.map(lambda j: s3.put_object(Bucket="routes", Key="o%s.%d" % (key, j), Body=data), range(n)))

            def s3_get():
                list(pool.map(lambda j: s3.get_object(Bucket="routes", Key="o%s.%d" % (key, j))["Body"].read(), range(n)))

            r = {}
            for name, fn in (("librados_put", lib_put), ("librados_get", lib_get), ("s3_put", s3_put), ("s3_get", s3_get)):
                t, _ = _timed(fn)
                r[name + "_MBps"] = n * size / 1e6 / t
                r[name + "_ops"] = n / t
            out[key] = r
    io.close()
    cluster.delete_pool("routes")
    cluster.shutdown()
    return out


def _timed(fn):
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def repository_bench(repeat: int, size_gib: int, log) -> dict:
    d = tempfile.mkdtemp(prefix="vdisk-bench-ceph-")
    # sparse; what the run keeps at once: a full archive, three incremental
    # ones, two RBD images with their snapshots (a full cluster hangs its clients)
    osd = "%dG" % max(24, 12 * size_gib + 8)
    subprocess.run([os.path.join(HERE, "ceph-local"), "start", d, "--osd-size", osd, "--rgw"], check=True,
                   capture_output=True, text=True)
    ceph = dict(os.environ, CEPH_CONF=os.path.join(d, "ceph.conf"))
    env = VDiskEnv(prefix="vdisk-bench-", io_limits="unlimited")
    out: dict = {"disk_gib": size_gib, "repeat": repeat}
    try:
        subprocess.run(["ceph", "osd", "pool", "create", "bench", "32"], env=ceph, check=True, capture_output=True)
        log("rados bench: 4 MiB objects x8, 64 KiB objects x16 ...")
        out["rados_bench_4M_t8"] = _rados_bench(ceph, "bench", 10, 4 << 20, 8)
        out["rados_bench_64K_t16"] = _rados_bench(ceph, "bench", 10, 64 << 10, 16)
        log("librados against S3 through radosgw ...")
        out["routes"] = _routes(ceph, d)
        env.start()
        iid, (disk,) = env.instance(ndata=1, size=size_gib)
        env.run("instance", "start", iid)
        path = env.run("disk", "path", disk).stdout.strip()
        nblocks = size_gib * (1 << 30) // BLOCK
        log("writing the disk whole (%d GiB) ..." % size_gib)
        write_random_blocks(path, range(nblocks), 1)
        base = env.run("snapshot", "create", disk, "--name", "base").stdout.strip()
        full, restore = [], []
        for i in range(repeat):
            pool = "full%d" % i
            env.run("repository", "add", pool, "--ceph-conf", ceph["CEPH_CONF"], "--pool", pool)
            log("archive and restore, run %d ..." % (i + 1))
            t, res = _timed(lambda: env.j("repository", "archive", pool, base))
            full.append((t, res["BytesSent"]))
            t, got = _timed(lambda: env.j("repository", "restore", pool, res["ArchiveId"]))
            restore.append(t)
            env.run("snapshot", "delete", got["SnapshotId"])
            env.run("disk", "delete", got["DiskId"])
            if i:  # the first one stays: the incremental archives go on from it
                subprocess.run(["ceph", "osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it"], env=ceph,
                               check=True, capture_output=True)
        nbytes = full[0][1]
        out["archive_full"] = {"seconds": statistics.median(t for t, _ in full), "bytes": nbytes,
                               "MBps": nbytes / 1e6 / statistics.median(t for t, _ in full)}
        out["restore"] = {"seconds": statistics.median(restore), "MBps": nbytes / 1e6 / statistics.median(restore)}
        # incremental: the repository "full0" holds the base archive
        out["incremental"] = {}
        r = random.Random(7)
        prev = base
        for pct in (1, 10, 50):
            blocks = r.sample(range(nblocks), nblocks * pct // 100)
            write_random_blocks(path, blocks, 100 + pct)
            snap = env.run("snapshot", "create", disk, "--name", "p%d" % pct).stdout.strip()
            log("incremental archive after changing %d%% ..." % pct)
            t, res = _timed(lambda: env.j("repository", "archive", "full0", snap))
            out["incremental"]["%d%%" % pct] = {"seconds": t, "bytes_sent": res["BytesSent"],
                                               "chunks_sent": res["ChunksSent"], "blocks_changed": len(blocks),
                                               "vs_full": t / out["archive_full"]["seconds"]}
            prev_pct = (prev, snap)
            prev = snap
        # the last change (50% after 10%): the same change into RBD images both ways
        a, b = prev_pct
        names = {s["SnapshotId"]: s["SnapshotName"]
                 for s in env.j("snapshot", "list", "--disk", disk)["Snapshots"]["Snapshot"]}
        fulldiff = os.path.join(env.dir, "a.diff")
        env.run("snapshot", "export", a, "-o", fulldiff)
        incdiff = os.path.join(env.dir, "b.diff")
        env.run("snapshot", "export", b, "--from", a, "-o", incdiff)
        size = "%dG" % size_gib

        def image(name: str, with_b: bool) -> None:
            subprocess.run(["rbd", "create", name, "--size", size], env=ceph, check=True)
            subprocess.run(["rbd", "--no-progress", "import-diff", fulldiff, name], env=ceph, check=True)
            if with_b:
                subprocess.run(["rbd", "--no-progress", "import-diff", incdiff, name], env=ceph, check=True)

        image("src", True)
        vd, rb = [], []
        for i in range(repeat):
            image("v%d" % i, False)
            image("r%d" % i, False)
            log("the change into RBD, run %d ..." % (i + 1))
            cmd_v = ("%s -m vdisk --data-dir %s --mountpoint %s snapshot export %s --from %s | rbd --no-progress "
                     "import-diff - v%d" % (_py(), env.data, env.mnt, b, a, i))
            vd.append(_timed(lambda: subprocess.run(cmd_v, shell=True, env=ceph, check=True))[0])
            cmd_r = ("rbd --no-progress export-diff --from-snap %s src@%s - | rbd --no-progress import-diff - r%d"
                     % (names[a], names[b], i))
            rb.append(_timed(lambda: subprocess.run(cmd_r, shell=True, env=ceph, check=True))[0])
            for img in ("v%d" % i, "r%d" % i):
                subprocess.run("rbd snap purge %s && rbd rm %s" % (img, img), shell=True, env=ceph, check=True,
                               capture_output=True)
        out["into_rbd"] = {"change": "50%% of the blocks of a %d GiB disk" % size_gib,
                           "stream_bytes": os.path.getsize(incdiff),
                           "vdisk_export_seconds": statistics.median(vd), "rbd_export_seconds": statistics.median(rb),
                           "ratio": statistics.median(rb) / statistics.median(vd)}
    finally:
        env.close()
        subprocess.run([os.path.join(HERE, "ceph-local"), "stop", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
    return out


def _py() -> str:
    import sys

    return sys.executable


def print_repository(res: dict) -> None:
    mb = lambda n: "%.0f MB/s" % n  # noqa: E731
    print("repository on a single-node Ceph (librados), %d GiB disk written whole, median of %d"
          % (res["disk_gib"], res["repeat"]))
    print("  rados bench 4 MiB x8:   write %s, read %s" % (mb(res["rados_bench_4M_t8"]["write_MBps"]),
                                                         mb(res["rados_bench_4M_t8"]["read_MBps"])))
    print("  rados bench 64 KiB x16: write %s, read %s" % (mb(res["rados_bench_64K_t16"]["write_MBps"]),
                                                          mb(res["rados_bench_64K_t16"]["read_MBps"])))
    print("  archive (full): %.1f s, %s" % (res["archive_full"]["seconds"], mb(res["archive_full"]["MBps"])))
    print("  restore:        %.1f s, %s" % (res["restore"]["seconds"], mb(res["restore"]["MBps"])))
    for key, r in res["routes"].items():
        print("  %s objects x16: librados put %s get %s; S3 (radosgw, boto3) put %s get %s" % (
            key, mb(r["librados_put_MBps"]), mb(r["librados_get_MBps"]), mb(r["s3_put_MBps"]), mb(r["s3_get_MBps"])))
    for pct, r in res["incremental"].items():
        print("  incremental after %s changed: %.2f s (%.2fx the full archive), %d chunks sent for %d blocks changed"
              % (pct, r["seconds"], r["vs_full"], r["chunks_sent"], r["blocks_changed"]))
    ir = res["into_rbd"]
    print("  %s into RBD (%d-byte stream): vdisk export | rbd import-diff %.2f s, rbd export-diff | rbd import-diff "
          "%.2f s (vdisk %.2fx)" % (ir["change"], ir["stream_bytes"], ir["vdisk_export_seconds"],
                                    ir["rbd_export_seconds"], ir["ratio"]))
