"""A snapshot repository in a Ceph cluster, through librados (Debian's
python3-rados): content-addressed chunks and manifests in one RADOS pool.
Knows nothing of the pool or the cloud: vdisk.cli.repository feeds it a
snapshot's diff stream and turns a manifest back into one.

Objects of the RADOS pool (the layout, version 1):

    chunk.<sha256 hex>   one 64 KiB block of data (never a block of zeros),
                         named by the SHA-256 of its bytes
    index.<sha256 hex>   the block map of one range of RANGE blocks (256
                         MiB of disk): sorted (le32 block within the range,
                         32-byte chunk digest) pairs, named by their SHA-256;
                         a range no block of which changed keeps its index
                         object from one archive to the next
    archive.<id>         an archive's manifest (JSON): what it was taken
                         from, and range -> index object for every range
                         holding a block that is not zeros; written last, so
                         an archive exists only once all its objects do
    group.<id>           a group archive's manifest: its member archives;
                         written after every member's
    vdisk.repository     the layout's version; the object archives lock
                         shared and reclaim locks exclusive

An archive sends a chunk only when the repository lacks it (a stat first),
so an archive interrupted anywhere resumes by running it again, and a later
archive of the same disk sends only what changed.  Reclaim deletes every
chunk no manifest names, holding the exclusive lock: while an archive
holds the shared one (uploaded chunks not named yet), reclaim waits or
says so, never deletes them.

Concurrency contract: a Repository is used from one thread; it keeps at
most WINDOW librados operations in flight.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid

BLOCK = 65536
RANGE = 4096  # blocks per index object
LAYOUT = 1
META = "vdisk.repository"
LOCK = "vdisk.archives"
WINDOW = 16  # librados operations in flight
LOCK_SECONDS = 600  # a crashed archive's shared lock lapses after this


class RepositoryError(Exception):
    """The repository cannot do what was asked (the message says why)."""


_ENTRY = struct.Struct("<I32s")


def chunk_name(digest: str) -> str:
    return "chunk." + digest


def encode_index(entries: dict[int, str]) -> bytes:
    """One range's block map (block within the range -> chunk digest)."""
    return b"".join(_ENTRY.pack(b, bytes.fromhex(d)) for b, d in sorted(entries.items()))


def decode_index(data: bytes) -> dict[int, str]:
    if len(data) % _ENTRY.size:
        raise RepositoryError("an index object of %d bytes is not whole entries" % len(data))
    return {b: d.hex() for b, d in _ENTRY.iter_unpack(data)}


class BlockMap:
    """An archive's block map (block -> chunk digest), kept as index
    objects of RANGE blocks: loaded range by range when a block of it is
    read or set, so that an incremental archive reads and writes the index
    of the ranges it changes only."""

    def __init__(self, repo: "Repository", index: dict[str, str], count: int = 0):
        self.repo = repo
        self.index = dict(index)  # range (as a string: JSON) -> index object digest
        self.count = count  # blocks mapped
        self._ranges: dict[int, dict[int, str]] = {}
        self._changed: set[int] = set()

    def _range(self, r: int) -> dict[int, str]:
        got = self._ranges.get(r)
        if got is None:
            d = self.index.get(str(r))
            got = self._ranges[r] = decode_index(self.repo.get_index(d)) if d else {}
        return got

    def set(self, block: int, digest: str | None) -> None:
        r, rel = divmod(block, RANGE)
        entries = self._range(r)
        had = rel in entries
        if digest is None:
            if had:
                del entries[rel]
                self.count -= 1
                self._changed.add(r)
        elif entries.get(rel) != digest:
            entries[rel] = digest
            self.count += not had
            self._changed.add(r)

    def items(self):
        """(block, digest) of every block mapped, in order."""
        for r in sorted(int(k) for k in self.index):
            for rel, d in sorted(self._range(r).items()):
                yield r * RANGE + rel, d

    def save(self) -> dict[str, str]:
        """Write the changed ranges' index objects; the new range -> digest."""
        for r in sorted(self._changed):
            entries = self._ranges[r]
            if entries:
                self.index[str(r)] = self.repo.put_index(encode_index(entries))
            else:
                self.index.pop(str(r), None)
        self._changed.clear()
        return dict(self.index)


def new_id(prefix: str) -> str:
    return "%s-%s" % (prefix, uuid.uuid4().hex[:20])


def _rados():
    try:
        import rados  # Debian's python3-rados (scripts/setup links it into .venv)
    except ImportError:
        raise RepositoryError("librados' Python binding is missing: install Debian's python3-rados "
                              "(scripts/ceph-local install) and run scripts/setup again") from None
    return rados


class Repository:
    def __init__(self, conffile: str, pool: str, timeout: float = 30):
        self.conffile = conffile
        self.pool = pool
        rados = _rados()
        self._rados = rados
        try:
            self.cluster = rados.Rados(conffile=conffile, conf={
                "rados_osd_op_timeout": str(int(timeout)), "rados_mon_op_timeout": str(int(timeout))})
        except (rados.Error, ValueError) as exc:
            raise RepositoryError("%r is not a Ceph configuration librados can read: %s" % (conffile, exc)) from None
        try:
            self.cluster.connect(timeout=int(timeout))
        except rados.Error as exc:
            raise RepositoryError("cannot reach the Ceph cluster of %s: %s" % (conffile, exc)) from None
        self.ioctx = None
        self._cookie = uuid.uuid4().hex
        self._locked_at = 0.0

    def open(self, create: bool = False) -> "Repository":
        """Open the RADOS pool (create: make it and the layout object)."""
        rados = self._rados
        try:
            if create and not self.cluster.pool_exists(self.pool):
                self.cluster.create_pool(self.pool)
            self.ioctx = self.cluster.open_ioctx(self.pool)
        except rados.ObjectNotFound:
            raise RepositoryError("the Ceph cluster has no pool %r" % self.pool) from None
        except rados.Error as exc:
            raise RepositoryError("cannot open pool %r: %s" % (self.pool, exc)) from None
        try:
            meta = json.loads(self.ioctx.read(META))
        except rados.ObjectNotFound:
            if not create:
                raise RepositoryError("pool %r holds no vdisk repository (vdisk repository add creates one)" % self.pool) from None
            meta = {"Layout": LAYOUT, "BlockSize": BLOCK, "CreatedAt": time.time()}
            self.ioctx.write_full(META, json.dumps(meta).encode())
        if meta.get("Layout") != LAYOUT or meta.get("BlockSize") != BLOCK:
            raise RepositoryError("pool %r holds a repository of layout %s, block size %s; this vdisk reads layout %d "
                                  "with %d-byte blocks" % (self.pool, meta.get("Layout"), meta.get("BlockSize"), LAYOUT, BLOCK))
        return self

    def close(self) -> None:
        if self.ioctx is not None:
            self.ioctx.close()
            self.ioctx = None
        self.cluster.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ chunks

    def _wait(self, completions) -> None:
        for c in completions:
            c.wait_for_complete()

    def missing(self, digests: list[str]) -> set[str]:
        """Which of these chunks the repository lacks (stats in flight)."""
        return {name[len("chunk.") :] for name in self.missing_objects([chunk_name(d) for d in digests])}

    def missing_objects(self, names: list[str]) -> set[str]:
        lacking = set()
        for i in range(0, len(names), WINDOW):
            comps = [(d, self.ioctx.aio_stat(d, lambda comp, size, mtime: None))
                     for d in names[i : i + WINDOW]]
            for d, c in comps:
                c.wait_for_complete()
                rv = c.get_return_value()
                if rv == -2:  # ENOENT
                    lacking.add(d)
                elif rv < 0:
                    raise RepositoryError("stat of %s failed: error %d" % (d, -rv))
        return lacking

    def put_chunks(self, chunks: dict[str, bytes]) -> int:
        """Write these chunks (digest -> data); the bytes written."""
        items = list(chunks.items())
        n = 0
        for i in range(0, len(items), WINDOW):
            comps = [self.ioctx.aio_write_full(chunk_name(d), data) for d, data in items[i : i + WINDOW]]
            for c in comps:
                c.wait_for_complete()
                if c.get_return_value() < 0:
                    raise RepositoryError("writing a chunk failed: %s" % c.get_return_value())
            n += sum(len(data) for _d, data in items[i : i + WINDOW])
        self.renew()
        return n

    def get_chunks(self, digests: list[str]) -> dict[str, bytes]:
        """Read these chunks, each checked against its name."""
        out = {}
        for i in range(0, len(digests), WINDOW):
            batch = digests[i : i + WINDOW]
            got = {}

            def keep(d):
                def cb(comp, data):
                    got[d] = data
                return cb

            comps = [(d, self.ioctx.aio_read(chunk_name(d), BLOCK + 1, 0, keep(d))) for d in batch]
            for d, c in comps:
                c.wait_for_complete_and_cb()
                rv = c.get_return_value()
                if rv < 0:
                    raise RepositoryError("chunk %s cannot be read (%s): the repository is damaged "
                                          "(vdisk repository check)" % (d, "missing" if rv == -2 else rv))
                data = got[d]
                if hashlib.sha256(data).hexdigest() != d:
                    raise RepositoryError("chunk %s does not match its checksum: the repository is damaged "
                                          "(vdisk repository check)" % d)
                out[d] = data
        return out

    def put_index(self, data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        if self.missing_objects(["index." + d]):
            self.ioctx.write_full("index." + d, data)
        return d

    def get_index(self, digest: str) -> bytes:
        rados = self._rados
        try:
            size, _mtime = self.ioctx.stat("index." + digest)
            data = self.ioctx.read("index." + digest, size)
        except rados.ObjectNotFound:
            raise RepositoryError("index object %s is missing: the repository is damaged (vdisk repository check)"
                                  % digest) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise RepositoryError("index object %s does not match its checksum: the repository is damaged "
                                  "(vdisk repository check)" % digest)
        return data

    def block_map(self, manifest: dict | None) -> BlockMap:
        if manifest is None:
            return BlockMap(self, {})
        return BlockMap(self, manifest["Index"], manifest["BlockCount"])

    # ------------------------------------------------------------ manifests

    def put_manifest(self, kind: str, ident: str, manifest: dict) -> None:
        self.ioctx.write_full("%s.%s" % (kind, ident), json.dumps(manifest, sort_keys=True).encode())

    def manifest(self, kind: str, ident: str) -> dict:
        rados = self._rados
        name = "%s.%s" % (kind, ident)
        try:
            size, _mtime = self.ioctx.stat(name)
            return json.loads(self.ioctx.read(name, size))
        except rados.ObjectNotFound:
            raise RepositoryError("the repository has no %s %s" % (kind, ident)) from None

    def manifests(self, kind: str) -> dict[str, dict]:
        out = {}
        for obj in self.ioctx.list_objects():
            if obj.key.startswith(kind + "."):
                ident = obj.key[len(kind) + 1 :]
                out[ident] = self.manifest(kind, ident)
        return out

    def delete_manifest(self, kind: str, ident: str) -> None:
        rados = self._rados
        try:
            self.ioctx.remove_object("%s.%s" % (kind, ident))
        except rados.ObjectNotFound:
            raise RepositoryError("the repository has no %s %s" % (kind, ident)) from None

    # ------------------------------------------------------------ locks

    def lock_archiving(self) -> None:
        """Hold the shared lock while an archive uploads chunks no manifest
        names yet (reclaim needs the exclusive one)."""
        rados = self._rados
        try:
            self.ioctx.lock_shared(META, LOCK, self._cookie, "archive", "an archive in progress", LOCK_SECONDS)
        except rados.Error as exc:
            raise RepositoryError("a reclaim is running in this repository; archive again when it ends (%s)" % exc) from None
        self._locked_at = time.monotonic()

    def renew(self) -> None:
        if self._locked_at and time.monotonic() - self._locked_at > LOCK_SECONDS / 4:
            self.ioctx.lock_shared(META, LOCK, self._cookie, "archive", "an archive in progress", LOCK_SECONDS,
                                   flags=1)  # LIBRADOS_LOCK_FLAG_RENEW
            self._locked_at = time.monotonic()

    def unlock(self) -> None:
        if self._locked_at:
            try:
                self.ioctx.unlock(META, LOCK, self._cookie)
            except self._rados.Error:
                pass
            self._locked_at = 0.0

    # ------------------------------------------------------------ reclaim, check

    def referenced(self) -> tuple[set[str], set[str]]:
        """(chunks, index objects) the archives name."""
        indexes = {d for m in self.manifests("archive").values() for d in m["Index"].values()}
        chunks = set()
        for d in indexes:
            chunks.update(decode_index(self.get_index(d)).values())
        return chunks, indexes

    def chunks(self) -> list[str]:
        return [o.key[len("chunk.") :] for o in self.ioctx.list_objects() if o.key.startswith("chunk.")]

    def indexes(self) -> list[str]:
        return [o.key[len("index.") :] for o in self.ioctx.list_objects() if o.key.startswith("index.")]

    def reclaim(self) -> tuple[int, int]:
        """Delete every chunk no archive names: (chunks, bytes) deleted.
        Refused while an archive runs (it holds the shared lock)."""
        rados = self._rados
        try:
            self.ioctx.lock_exclusive(META, LOCK, self._cookie, "reclaim", LOCK_SECONDS)
        except rados.Error:
            raise RepositoryError("an archive is in progress in this repository: its chunks are not named by a "
                                  "manifest yet, so nothing is reclaimed now; try again when it ends") from None
        try:
            keep, keep_index = self.referenced()
            gone = [d for d in self.chunks() if d not in keep]
            names = [chunk_name(d) for d in gone] + ["index." + d for d in self.indexes() if d not in keep_index]
            for i in range(0, len(names), WINDOW):
                comps = [self.ioctx.aio_remove(n) for n in names[i : i + WINDOW]]
                self._wait(comps)
            return len(gone), len(gone) * BLOCK
        finally:
            self.ioctx.unlock(META, LOCK, self._cookie)

    def check(self, verify_data: bool = True, progress=None) -> tuple[list[str], dict]:
        """Every manifest's chunks present; with verify_data every chunk's
        bytes match its name.  (problems, counts)."""
        problems = []
        archives = self.manifests("archive")
        groups = self.manifests("group")
        present = set(self.chunks())
        for gid, g in sorted(groups.items()):
            for aid in g["Archives"]:
                if aid not in archives:
                    problems.append("group %s names archive %s, which is missing" % (gid, aid))
        for aid, m in sorted(archives.items()):
            try:
                lost = [b for b, d in self.block_map(m).items() if d not in present]
            except RepositoryError as exc:
                problems.append("archive %s: %s" % (aid, exc))
                continue
            if lost:
                problems.append("archive %s lacks %d chunk(s), first for block %d" % (aid, len(lost), lost[0]))
        bad = 0
        if verify_data:
            names = sorted(present)
            for i in range(0, len(names), WINDOW):
                for d in names[i : i + WINDOW]:
                    try:
                        self.get_chunks([d])
                    except RepositoryError as exc:
                        problems.append(str(exc))
                        bad += 1
                if progress:
                    progress(min(i + WINDOW, len(names)), len(names))
        return problems, {"Archives": len(archives), "Groups": len(groups), "Chunks": len(present),
                          "ChunksVerified": len(present) if verify_data else 0, "BadChunks": bad}
