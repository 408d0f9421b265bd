"""Validation of request parameters and of names/ids, before anything is used.

Ids from users become file names in the FUSE mount and record keys, so they
are checked against the cloud's id pattern here, once, before any use.
"""
from __future__ import annotations

import re
import secrets
import string

from .errors import CloudError, invalid, missing

ID_PATTERN = {
    "i": re.compile(r"^i-[a-z0-9]{20}$"),
    "d": re.compile(r"^d-[a-z0-9]{20}$"),
    "s": re.compile(r"^s-[a-z0-9]{20}$"),
}
_NAME = re.compile(r"^[A-Za-z\u4e00-\u9fff][A-Za-z0-9\u4e00-\u9fff_.:\-]{1,127}$")
_ALPHABET = string.ascii_lowercase + string.digits


def new_id(prefix: str) -> str:
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(20))


def check_id(kind: str, value, param: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN[kind].match(value):
        raise CloudError(
            {"i": "InvalidInstanceId.Malformed", "d": "InvalidDiskId.Malformed", "s": "InvalidSnapshotId.Malformed"}[kind],
            "%s %r is not a valid id: it must look like %s-followed by 20 lowercase letters or digits."
            % (param, value, kind),
        )
    return value


def check_name(value, param: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or value.lower().startswith(("http://", "https://")):
        raise CloudError(
            "Invalid%s.Malformed" % param,
            "%s %r is invalid: it must be 2 to 128 characters, start with a letter, and contain only "
            "letters, digits, colons (:), underscores (_), periods (.) and hyphens (-)." % (param, value),
        )
    return value


def check_description(value, param: str = "Description") -> str:
    if not isinstance(value, str) or not 2 <= len(value) <= 256 or value.lower().startswith(("http://", "https://")):
        raise CloudError(
            "Invalid%s.Malformed" % param,
            "%s is invalid: it must be 2 to 256 characters and must not start with http:// or https://." % param,
        )
    return value


class Params:
    """Typed access to a request's parameters with the cloud's errors."""

    def __init__(self, req: dict):
        if not isinstance(req, dict):
            raise invalid("request", "a request must be a JSON object")
        self.req = req

    def _get(self, name, required):
        v = self.req.get(name)
        if v is None and required:
            raise missing(name)
        return v

    def str(self, name: str, required: bool = False, default=None, choices=None):
        v = self._get(name, required)
        if v is None:
            return default
        if not isinstance(v, str):
            raise invalid(name, "expected a string")
        if choices is not None and v not in choices:
            raise CloudError(
                "Invalid%s.ValueNotSupported" % name,
                "%s %r is not supported; use one of: %s." % (name, v, ", ".join(choices)),
            )
        return v

    def name(self, param: str, rule: str | None = None):
        """An optional resource name, checked against the cloud's naming rule."""
        v = self.str(param)
        return None if v is None else check_name(v, rule or param)

    def description(self, param: str = "Description"):
        """An optional description, checked against the cloud's rule."""
        v = self.str(param)
        return None if v is None else check_description(v)

    def rename(self, record: dict, name_param: str) -> None:
        """Apply an optional new name (record[name_param]) and Description to
        a record, both checked against the cloud's rules first."""
        name, desc = self.name(name_param), self.description()
        if name is not None:
            record[name_param] = name
        if desc is not None:
            record["Description"] = desc

    def int(self, name: str, required: bool = False, default=None, lo=None, hi=None):
        v = self._get(name, required)
        if v is None:
            return default
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise invalid(name, "expected an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise CloudError("Invalid%s.ValueNotSupported" % name, "%s must be between %s and %s, not %d." % (name, lo, hi, v))
        return v

    def bool(self, name: str, default: bool = False) -> bool:
        v = self.req.get(name)
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise invalid(name, "expected true or false")

    def list(self, name: str) -> list:
        """A list given as Name: [...] or as Name.1, Name.2 ... (the cloud's form)."""
        v = self.req.get(name)
        if v is not None:
            if isinstance(v, str) and v.startswith("["):
                import json

                try:
                    v = json.loads(v)
                except ValueError:
                    raise invalid(name, "not a JSON list") from None
            if not isinstance(v, list):
                raise invalid(name, "expected a list")
            return v
        out = []
        n = 1
        while "%s.%d" % (name, n) in self.req:
            out.append(self.req["%s.%d" % (name, n)])
            n += 1
        return out

    def struct_list(self, name: str, fields: tuple) -> list[dict]:
        """Name.N.Field entries (or Name: [{...}]) as a list of dicts."""
        v = self.req.get(name)
        if v is not None:
            if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
                raise invalid(name, "expected a list of objects")
            return v
        out = []
        n = 1
        while any("%s.%d.%s" % (name, n, f) in self.req for f in fields):
            out.append({f: self.req["%s.%d.%s" % (name, n, f)] for f in fields if "%s.%d.%s" % (name, n, f) in self.req})
            n += 1
        return out
