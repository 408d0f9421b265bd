"""Access keys for the HTTP API: DATA_DIR/accesskeys.json, mode 0600.

`vdisk accesskey create|list|delete` edits the file (with or without a
daemon); the daemon reads it for every request whose key it has not seen
since the file last changed, so a new key works at once and a deleted one
stops working at once.  Writes are atomic (a temporary file renamed over the
old one) and serialised by an flock on accesskeys.json.lock.

The formats follow the cloud's: an AccessKeyId of "LTAI" and 20 letters and
digits, an AccessKeySecret of 30.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import secrets
import string

from ..config import open_private

_ALNUM = string.ascii_letters + string.digits


class AccessKeyNotFound(Exception):
    """No such access key; the message says what to do."""


class KeyStore:
    def __init__(self, path: str):
        self.path = path
        self._cache: dict[str, dict] = {}
        self._stamp = None

    # ------------------------------------------------------------ reading

    def _load(self) -> dict[str, dict]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._cache, self._stamp = {}, None
            return self._cache
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            with open(self.path) as f:
                data = json.load(f)
            self._cache = {k["AccessKeyId"]: k for k in data.get("AccessKeys", [])}
            self._stamp = stamp
        return self._cache

    def secret(self, key_id: str) -> str | None:
        """The secret of an active key, or None if there is no such key."""
        k = self._load().get(key_id)
        return k["AccessKeySecret"] if k and k.get("Status") == "Active" else None

    def list(self) -> list[dict]:
        """Every key, without its secret."""
        return [{k: v for k, v in rec.items() if k != "AccessKeySecret"} for rec in self._load().values()]

    # ------------------------------------------------------------ writing

    def _edit(self, change) -> object:
        lockfd = open_private(self.path + ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lockfd, fcntl.LOCK_EX)
            self._stamp = None
            keys = dict(self._load())
            result = change(keys)
            tmp = self.path + ".new"
            fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(fd, "w") as f:
                json.dump({"AccessKeys": list(keys.values())}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._stamp = None
            return result
        finally:
            os.close(lockfd)

    def create(self) -> dict:
        """A new active key: {AccessKeyId, AccessKeySecret, Status, CreateDate}."""
        rec = {
            "AccessKeyId": "LTAI" + "".join(secrets.choice(_ALNUM) for _ in range(20)),
            "AccessKeySecret": "".join(secrets.choice(_ALNUM) for _ in range(30)),
            "Status": "Active",
            "CreateDate": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

        def add(keys):
            keys[rec["AccessKeyId"]] = rec
            return rec

        return self._edit(add)

    def delete(self, key_id: str) -> None:
        def remove(keys):
            if key_id not in keys:
                raise AccessKeyNotFound("there is no access key %s (vdisk accesskey list shows them)" % key_id)
            del keys[key_id]

        self._edit(remove)
