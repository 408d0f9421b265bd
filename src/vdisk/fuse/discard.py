"""Discard (fallocate) support for pyfuse3, through csrc/fuse_fallocate.c.

`install()` loads the C shim with RTLD_GLOBAL so that its fuse_session_new()
wraps libfuse's and adds a fallocate handler to pyfuse3's operations; it must
run before pyfuse3 is imported (vdisk.fuse's __init__ does it).  `set_handler`
names the Python function that serves the requests: handler(fh, mode, offset,
length) -> 0 or -errno.
"""
from __future__ import annotations

import errno
import logging
import os
import sys

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_handler = None
_lib = None
_ffi = None


def install():
    global _lib
    if _lib is not None:
        return
    if "pyfuse3" in sys.modules:
        log.warning("pyfuse3 was imported before vdisk.fuse: discard (fallocate) will not be served")
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from . import _lowlevel as _fallocate
    except ImportError as exc:
        log.warning("the fallocate shim is not built (%s): discard will not be served", exc)
        return
    finally:
        sys.setdlopenflags(flags)

    @_fallocate.ffi.def_extern()
    def vd_py_fallocate(fh, mode, offset, length):
        if _handler is None:
            return -errno.ENOSYS
        try:
            return _handler(fh, mode, offset, length)
        except Exception:  # noqa: BLE001 - must not unwind into C
            log.exception("fallocate failed")
            return -errno.EIO

    _lib = _fallocate.lib
    global _ffi
    _ffi = _fallocate.ffi


def set_handler(fn) -> None:
    global _handler
    _handler = fn


def shim():
    """The loaded shim library (its C functions), or None."""
    return _lib


def shim_ffi():
    return _ffi


def installed() -> bool:
    """True once a FUSE session was created with the fallocate handler."""
    return _lib is not None and bool(_lib.vd_fallocate_installed())
