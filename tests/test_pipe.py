"""exchange.pipe.piped, pure: neither side waits for ever on the other, and
the first error is the one raised."""
import os
import threading

import pytest

from vdisk.exchange.pipe import piped


def within(seconds, fn):
    """fn() in a thread; its result, or a failure if it hangs."""
    box = {}

    def run():
        try:
            box["r"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["e"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "piped() hung"
    if "e" in box:
        raise box["e"]
    return box["r"]


def test_both_sides_results():
    def produce(w):
        os.write(w, b"x" * 100000)
        return "made"

    def consume(r):
        n = 0
        while b := os.read(r, 65536):
            n += len(b)
        return n

    assert within(10, lambda: piped(produce, consume)) == ("made", 100000)


def test_a_consumer_that_fails_at_once_does_not_leave_the_producer_blocked():
    """(A refused import used to leave the archive's writer blocked on a
    full pipe while the caller waited for it.)"""
    def produce(w):
        while True:  # more than a pipe holds: blocks until the read end is closed
            os.write(w, b"x" * 65536)

    def consume(r):
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):  # the first error, not the producer's EPIPE
        within(10, lambda: piped(produce, consume))


def test_the_producers_failure_is_the_cause():
    def produce(w):
        os.write(w, b"abc")
        raise KeyError("chunk missing")

    def consume(r):
        while os.read(r, 10):
            pass
        raise EOFError("cut short")  # what the reader sees of it

    with pytest.raises(KeyError, match="chunk missing"):
        within(10, lambda: piped(produce, consume))
