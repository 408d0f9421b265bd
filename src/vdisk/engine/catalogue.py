"""Catalogue records: JSON values under string keys (DB_RECORD), which the
control plane keeps beside the block map (instances, snapshot groups,
images, policies...).

A put is staged in memory and becomes durable with the next commit; a put
made from inside a commit's change goes into that commit's own transaction
(atomic with the change).  Reads see the change's puts, then the staged
ones, then an in-flight commit's, then the committed map.

Concurrency contract: puts and reads may come from the owner thread or one
other (the daemon's control thread); the freeze that hands the staged puts
to a commit (`freeze`), and every change to them, hold `lock`, so a put is
never lost into a dict a commit has already written out.
"""
from __future__ import annotations

import threading

from .format import DB_RECORD, jdec


class Catalogue:
    def __init__(self, pool):
        self._pool = pool  # its env, the change running and the commit in flight
        self._staged: dict[str, dict | None] = {}  # key -> value (None: delete)
        self._kept: set[str] = set()  # staged records no request failure drops
        self.lock = threading.Lock()

    def put(self, key: str, value: dict | None, keep: bool = False) -> None:
        """Stage a record (None deletes).  keep=True: a record of what
        happened (a failure's reason) that must survive the failed
        request's drop_staged() and be retried by every commit until one
        succeeds (on a full filesystem it is shown meanwhile)."""
        tx = self._pool._change_tx
        if tx is not None:
            tx.records[key] = value
            return
        with self.lock:  # not into a dict a freeze has just taken
            self._staged[key] = value
            if keep:
                self._kept.add(key)

    def get(self, key: str):
        tx = self._pool._change_tx
        if tx is not None and key in tx.records:
            return tx.records[key]
        if key in self._staged:
            return self._staged[key]
        ep = self._pool._inflight  # read once: another thread may finish it meanwhile
        if ep is not None and key in ep.records:
            return ep.records[key]
        env = self._pool.env
        with env.begin(db=self._pool._db[DB_RECORD]) as txn:
            v = txn.get(key.encode())
        return None if v is None else jdec(v)

    def scan(self, prefix: str) -> dict[str, dict]:
        """Every record whose key starts with prefix, as get() sees it."""
        out = {}
        p = prefix.encode()
        with self._pool.env.begin(db=self._pool._db[DB_RECORD]) as txn:
            cur = txn.cursor()
            if cur.set_range(p):
                for k, v in cur:
                    if not k.startswith(p):
                        break
                    out[k.decode()] = jdec(v)
        ep = self._pool._inflight  # read once: another thread may finish it meanwhile
        staged = dict(ep.records) if ep is not None else {}
        staged.update(self._staged)
        tx = self._pool._change_tx
        if tx is not None:
            staged.update(tx.records)
        for k, v in staged.items():
            if k.startswith(prefix):
                if v is None:
                    out.pop(k, None)
                else:
                    out[k] = v
        return out

    def drop_staged(self) -> None:
        """Forget what a request that failed staged (but for kept records)."""
        with self.lock:
            self._staged = {k: v for k, v in self._staged.items() if k in self._kept}

    def pending(self) -> bool:
        return bool(self._staged)

    def freeze(self) -> dict[str, dict | None]:
        """Hand the staged records to a commit (with lock held by the caller
        across the overlay's freeze, so that both are one instant)."""
        staged, self._staged = self._staged, {}
        return staged

    def unfreeze(self, frozen: dict[str, dict | None]) -> None:
        """A commit that took frozen failed: stage them again (newer puts win)."""
        with self.lock:
            merged = dict(frozen)
            merged.update(self._staged)
            self._staged = merged

    def committed(self, frozen: dict[str, dict | None]) -> None:
        """A commit made frozen durable: kept records in it are done, unless
        put again since."""
        with self.lock:
            self._kept.difference_update(k for k in frozen if k not in self._staged)
