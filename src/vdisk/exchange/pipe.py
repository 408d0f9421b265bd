"""A pipe with a producer in a thread and a consumer in the caller: how a
stream goes between the daemon (or the pool in-process) and this process
while this process reads or writes the other side (an export read here,
an archive written into an import)."""
from __future__ import annotations

import os
import threading


def piped(produce, consume):
    """Run produce(write_fd) in a thread and consume(read_fd) here, over a
    new pipe; (produce's result, consume's result).

    Neither side closes its descriptor: each is closed here as soon as its
    side returns or raises, so the other side sees the end (EOF, or EPIPE)
    instead of waiting for ever.  When a side raises, the first error is
    raised: it is the cause, since the other side's error (a stream cut
    short, a broken pipe) can only follow it."""
    r, w = os.pipe()
    errors: list[BaseException] = []  # in the order they happened
    box: dict = {}

    def run():
        try:
            box["produced"] = produce(w)
        except BaseException as exc:  # noqa: BLE001 - raised again below
            errors.append(exc)
        finally:
            os.close(w)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    consumed = None
    try:
        consumed = consume(r)
    except BaseException as exc:  # noqa: BLE001 - raised again below
        errors.append(exc)
    finally:
        os.close(r)
        t.join()
    if errors:
        raise errors[0]
    return box.get("produced"), consumed
