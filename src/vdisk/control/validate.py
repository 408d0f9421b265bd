"""Validation of request parameters and of names/ids, before anything is used.

Ids from users become file names in the FUSE mount and record keys, so they
are checked against the cloud's id pattern here, once, before any use.
"""
from __future__ import annotations

import json
import re
import secrets
import string

from .errors import CloudError, invalid, missing

# Every pattern is applied with fullmatch(): "$" alone would also match
# before a final newline, and "abc\n" would pass as a name.
ID_PATTERN = {
    "i": re.compile(r"i-[a-z0-9]{20}"),
    "d": re.compile(r"d-[a-z0-9]{20}"),
    "s": re.compile(r"s-[a-z0-9]{20}"),
    "ssg": re.compile(r"ssg-[a-z0-9]{20}"),
    "m": re.compile(r"m-[a-z0-9]{20}"),
    "sp": re.compile(r"sp-[a-z0-9]{20}"),
}
ID_ERROR = {
    "i": "InvalidInstanceId.Malformed",
    "d": "InvalidDiskId.Malformed",
    "s": "InvalidSnapshotId.Malformed",
    "ssg": "InvalidSnapshotGroupId.Malformed",
    "m": "InvalidImageId.Malformed",
    "sp": "InvalidAutoSnapshotPolicyId.Malformed",
}
_NAME = re.compile(r"[A-Za-z\u4e00-\u9fff][A-Za-z0-9\u4e00-\u9fff_.:\-]{1,127}")
# The cloud's ClientToken: at most 64 printable ASCII characters.
CLIENT_TOKEN = re.compile(r"[\x21-\x7e]{1,64}")
# An integer parameter given as text: ASCII digits only ("²".isdigit() is
# true, and int() then fails), at most 19 of them (a 64-bit value).
_INTEGER = re.compile(r"-?[0-9]{1,19}")
INT_LIMIT = 1 << 63
# How deep a request's values may nest (the cloud's deepest is a list of
# objects, Name.N.Field); deeper input is refused before anything walks it.
MAX_DEPTH = 8
_ALPHABET = string.ascii_lowercase + string.digits


def shown(value, limit: int = 80) -> str:
    """A value as an error message quotes it: repr, cut to limit characters
    (a request may carry a megabyte where a name belongs)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "...(%d characters)" % len(r)


def new_id(prefix: str) -> str:
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(20))


def check_id(kind: str, value, param: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN[kind].fullmatch(value):
        raise CloudError(
            ID_ERROR[kind],
            "%s %s is not a valid id: it must look like %s-followed by 20 lowercase letters or digits."
            % (param, shown(value), kind),
        )
    return value


def check_name(value, param: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.lower().startswith(("http://", "https://")):
        raise CloudError(
            "Invalid%s.Malformed" % param,
            "%s %s is invalid: it must be 2 to 128 characters, start with a letter, and contain only "
            "letters, digits, colons (:), underscores (_), periods (.) and hyphens (-)." % (param, shown(value)),
        )
    return value


def check_description(value, param: str = "Description") -> str:
    if not isinstance(value, str) or not 2 <= len(value) <= 256 or value.lower().startswith(("http://", "https://")):
        raise CloudError(
            "Invalid%s.Malformed" % param,
            "%s is invalid: it must be 2 to 256 characters and must not start with http:// or https://." % param,
        )
    return value


def check_request(req) -> str:
    """The shape every request must have, whoever sent it: a JSON object
    whose Action is a string, whose keys are strings, nested at most
    MAX_DEPTH deep, and whose text is valid Unicode (a lone surrogate such
    as "\\ud800" cannot be stored and printed again).  Returns the action.
    Walks the request with an explicit stack: no input can make it recurse."""
    if not isinstance(req, dict):
        raise invalid("request", "a request must be a JSON object")
    action = req.get("Action")
    if not isinstance(action, str):
        raise CloudError("MissingParameter" if action is None else "InvalidParameter",
                         "The parameter Action is %s: it must be the name of an action, as a string."
                         % ("missing" if action is None else "not a string"))
    check_value(req, "request")
    return action


def check_value(value, where: str) -> None:
    """Every string in value valid Unicode without NUL, every key a string,
    nesting at most MAX_DEPTH: for requests, and for values decoded from
    JSON text inside them."""
    stack = [(value, where, 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise invalid(where, "values nest more than %d deep" % MAX_DEPTH)
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise invalid(where, "a key is not a string")
                _check_text(k, where)
                stack.append((v, k if where == "request" else "%s.%s" % (where, k), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, "%s.%d" % (where, i), depth + 1) for i, v in enumerate(value, 1))


def _check_text(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(where, "the text is not valid Unicode (it holds a lone surrogate)") from None
    if "\x00" in value:
        raise invalid(where, "the text holds a NUL character")


def _json_list(name: str, v):
    """A list given as JSON text (the cloud's form for DiskIds and the like;
    every value on the cloud's wire is text); other values as they are."""
    if isinstance(v, str) and v.startswith("["):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError):
            raise invalid(name, "not a JSON list") from None
        check_value(v, name)
    return v


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
        if isinstance(v, str) and _INTEGER.fullmatch(v):
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise invalid(name, "expected an integer (decimal digits)")
        if not -INT_LIMIT < v < INT_LIMIT:
            raise invalid(name, "the integer is out of range")
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
            v = _json_list(name, v)
            if not isinstance(v, list):
                raise invalid(name, "expected a list")
        else:
            v = []
            n = 1
            while "%s.%d" % (name, n) in self.req:
                v.append(self.req["%s.%d" % (name, n)])
                n += 1
        if not all(isinstance(x, str) for x in v):
            raise invalid(name, "expected a list of strings")
        return v

    def struct_list(self, name: str, fields: tuple) -> list[dict]:
        """Name.N.Field entries (or Name: [{...}]) as a list of dicts."""
        v = self.req.get(name)
        if v is not None:
            v = _json_list(name, v)
            if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
                raise invalid(name, "expected a list of objects")
            return v
        out = []
        n = 1
        while any("%s.%d.%s" % (name, n, f) in self.req for f in fields):
            out.append({f: self.req["%s.%d.%s" % (name, n, f)] for f in fields if "%s.%d.%s" % (name, n, f) in self.req})
            n += 1
        return out
