"""The control plane's clock: the real time, or a simulated time that runs
faster, so that a week of automatic snapshot policies and retention can be
watched in minutes.

Everything in the control plane that reads the time (CreationTime and the
other timestamps, policy due times, retention and instant-access expiry,
emulated snapshot progress) reads Clock.now().  The engine and the FUSE
layer never do.

Simulated time is stored in the pool (record "settings/clock") as an
anchor: sim = SimOrigin + (real - RealOrigin) * Speed.  It goes on while
the daemon is down, as the cloud's time does, and it never runs backwards:
a daemon started with another speed (1 is the real pace) re-anchors at the
current simulated time, so a pool that was run fast stays ahead of the real
clock by what it gained.  The daemon sets it (`vdisk daemon start
--clock-speed N --clock-start TIME`, or $VDISK_CLOCK_SPEED and
$VDISK_CLOCK_START); the offline CLI only reads it.

Concurrency contract: used from the Controller's thread only.
"""
from __future__ import annotations

import datetime
import time

KEY = "settings/clock"
UTC = datetime.timezone.utc
# The cloud's automatic snapshot policies take their TimePoints in UTC+8
# (China Standard Time); so does vdisk.
POLICY_TZ = datetime.timezone(datetime.timedelta(hours=8), "UTC+8")
MAX_SPEED = 1_000_000


class ClockError(ValueError):
    """A clock setting that cannot be used; the message says why."""


def iso(t: float) -> str:
    """The cloud's timestamp form (UTC, seconds): 2026-12-01T16:00:00Z."""
    return datetime.datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    """Seconds since the epoch of a timestamp (ISO 8601; no zone means UTC)."""
    try:
        d = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ClockError("%r is not a time in ISO 8601 form, such as 2026-12-07T00:00:00+08:00" % text) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.timestamp()


def check_speed(speed) -> float:
    try:
        s = float(speed)
    except (TypeError, ValueError):
        raise ClockError("the clock speed %r is not a number" % (speed,)) from None
    if not 1 <= s <= MAX_SPEED:
        raise ClockError("the clock speed must be between 1 (real time) and %d simulated seconds per second, not %s"
                         % (MAX_SPEED, speed))
    return s


class Clock:
    """Simulated (or real) time of one pool.  real: the source of real time
    (injectable for tests)."""

    def __init__(self, pool, real=time.time):
        self.pool = pool
        self.real = real
        self._anchor = None  # (real origin, sim origin, speed), read once

    def _load(self):
        if self._anchor is None:
            rec = self.pool.get_record(KEY)
            if rec is None:
                self._anchor = (0.0, 0.0, 1.0)
            else:
                self._anchor = (rec["RealOrigin"], rec["SimOrigin"], rec["Speed"])
        return self._anchor

    def now(self) -> float:
        r0, s0, speed = self._load()
        return s0 + (self.real() - r0) * speed

    @property
    def speed(self) -> float:
        return self._load()[2]

    def seconds_of_real(self, sim_seconds: float) -> float:
        """How long, in real seconds, sim_seconds of simulated time take."""
        return sim_seconds / self.speed

    def configure(self, speed=None, start: float | None = None) -> None:
        """Set the speed (and, if given, the simulated time now), staged as
        a record for the caller's next commit.  Never moves time backwards
        (start before the time of a pool whose clock was set is refused)."""
        speed = check_speed(1 if speed is None else speed)
        now = self.now()
        sim = now if start is None else start
        if start is not None and start < now - 1 and self.pool.get_record(KEY) is not None:
            raise ClockError("the clock never runs backwards: %s is before this pool's time, %s (it was sped up "
                             "before); leave --clock-start out" % (iso(start), iso(now)))
        if start is None and speed == self.speed and self.pool.get_record(KEY) is not None:
            return
        if start is None and speed == 1 and self.pool.get_record(KEY) is None:
            return  # the real clock: nothing to record
        self._anchor = (self.real(), sim, speed)
        self.pool.put_record(KEY, {"RealOrigin": self._anchor[0], "SimOrigin": sim, "Speed": speed})

    def describe(self) -> dict:
        now = self.now()
        return {"Now": iso(now), "NowSeconds": now, "Speed": self.speed,
                "Simulated": self.pool.get_record(KEY) is not None,
                "PolicyTimeZone": "UTC+8",
                "PolicyLocalTime": datetime.datetime.fromtimestamp(now, POLICY_TZ).strftime("%Y-%m-%d %H:%M:%S %a")}
