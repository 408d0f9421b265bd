"""When automatic snapshot policies are due, and when snapshots expire.

Pure functions of times (seconds since the epoch, simulated or real: see
clock.py) and of a policy's TimePoints (hours 0-23) and RepeatWeekdays
(1 = Monday ... 7 = Sunday), both read in the cloud's policy time zone,
UTC+8.  No state, no I/O: the lifecycle module decides what to do with them.
"""
from __future__ import annotations

import datetime
import json

from .clock import POLICY_TZ
from .errors import CloudError

DAY = 86400


def listed(value, param: str) -> list:
    """A list given the cloud's way (JSON array text, '["1","2"]'), as a
    comma-separated text ("1,2"), or as a list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise CloudError("InvalidParameter", "The parameter %s is not a JSON array such as [\"1\", \"2\"]." % param) from None
        else:
            value = [v for v in text.split(",") if v.strip()]
    if not isinstance(value, list):
        raise CloudError("InvalidParameter", "The parameter %s must be a JSON array such as [\"1\", \"2\"]." % param)
    return value


def _ints(value, param: str, lo: int, hi: int, most: int) -> list[int]:
    out = set()
    for v in listed(value, param):
        try:
            n = int(str(v).strip()) if not isinstance(v, bool) else None
        except ValueError:
            n = None
        if n is None or not lo <= n <= hi:
            raise CloudError("InvalidParameter", "The parameter %s holds %r; each value must be a whole number from %d to %d."
                             % (param, v, lo, hi))
        out.add(n)
    if not out:
        raise CloudError("InvalidParameter", "The parameter %s is empty; give at least one value from %d to %d." % (param, lo, hi))
    if len(out) > most:
        raise CloudError("InvalidParameter", "The parameter %s holds %d values; at most %d." % (param, len(out), most))
    return sorted(out)


def time_points(value, param: str = "timePoints") -> list[int]:
    """Hours of the day (UTC+8), 0-23, at most 24."""
    return _ints(value, param, 0, 23, 24)


def weekdays(value, param: str = "repeatWeekdays") -> list[int]:
    """Days of the week, 1 (Monday) to 7 (Sunday), at most 7."""
    return _ints(value, param, 1, 7, 7)


def shown(values: list[int]) -> str:
    """The cloud's form in answers: a JSON array of strings, as text."""
    return json.dumps([str(v) for v in values], separators=(",", ":"))


def _local(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, POLICY_TZ)


def _dues_of_day(day: datetime.date, hours: list[int], days: list[int]) -> list[float]:
    if day.isoweekday() not in days:
        return []
    return [datetime.datetime(day.year, day.month, day.day, h, tzinfo=POLICY_TZ).timestamp() for h in hours]


def latest_due(hours: list[int], days: list[int], after: float, until: float) -> float | None:
    """The latest due time in (after, until], or None."""
    if until <= after:
        return None
    day = _local(until).date()
    for _ in range(8):  # every weekday appears within a week
        for t in reversed(_dues_of_day(day, hours, days)):
            if t <= until:
                return t if t > after else None
        day -= datetime.timedelta(days=1)
    return None


def dues_between(hours: list[int], days: list[int], after: float, until: float, most: int = 1000) -> list[float]:
    """Every due time in (after, until], oldest first (at most `most`, the
    latest ones)."""
    out = []
    t = until
    while len(out) < most:
        d = latest_due(hours, days, after, t)
        if d is None:
            break
        out.append(d)
        t = d - 1
    return out[::-1]


def next_due(hours: list[int], days: list[int], after: float) -> float:
    """The first due time strictly after `after`."""
    day = _local(after).date()
    for _ in range(9):
        for t in _dues_of_day(day, hours, days):
            if t > after:
                return t
        day += datetime.timedelta(days=1)
    raise ValueError("a policy without hours or days is never due")  # refused at creation


def auto_name(due: float, hours: list[int]) -> str:
    """The cloud's name for an automatic snapshot: auto_YYYYMMDD_N, the date
    in the policy time zone and N the time point's place in the day."""
    local = _local(due)
    n = hours.index(local.hour) + 1 if local.hour in hours else 1
    return "auto_%s_%d" % (local.strftime("%Y%m%d"), n)


def expires_at(created: float, days) -> float | None:
    """When something kept for `days` days (None or -1: for ever) expires."""
    if days is None or days == -1:
        return None
    return created + int(days) * DAY
