"""Errors of the storage engine.  Each carries the errno a disk would give."""
import errno


class EngineError(Exception):
    errno = errno.EIO


class OutOfRange(EngineError):
    """I/O beyond the end of a volume."""

    errno = errno.ENOSPC


class NoSpace(EngineError):
    """The pool's filesystem (or the LMDB map) is full."""

    errno = errno.ENOSPC


class ChecksumError(EngineError):
    """A stored block does not match its checksum."""

    errno = errno.EIO


class PoolFailed(EngineError):
    """A sync failed; the pool refuses writes until it is reopened."""

    errno = errno.EIO


class NotFound(EngineError):
    errno = errno.ENOENT


class Busy(EngineError):
    errno = errno.EBUSY


class CommitInFlight(EngineError):
    """A structural change was asked for while a commit runs in another thread."""

    errno = errno.EBUSY


class FormatError(EngineError):
    """The data directory's on-disk format is unknown or damaged."""
