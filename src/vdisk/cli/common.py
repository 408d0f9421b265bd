"""What every `vdisk` command shares: exit codes, the error a command
raises, and the plain-text tables and listings it prints (--json aside)."""
from __future__ import annotations

import json

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_DAEMON, EXIT_INTERNAL = 0, 1, 2, 3, 4


class CLIError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED, error_code: str = ""):
        super().__init__(message)
        self.code = code
        self.error_code = error_code


# ---------------------------------------------------------------- output


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    head = [h for h, _ in cols]
    data = [[_fmt(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(d, widths)).rstrip() for d in data]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024
    return str(n)


def _show(rec: dict) -> str:
    w = max(len(k) for k in rec) if rec else 0
    return "\n".join("%s  %s" % (k.ljust(w), _fmt(v)) for k, v in rec.items())
