"""cffi build script for vdisk.engine._native (the C in csrc/).

Run by setup.py at install time (``cffi_modules``).  API (out-of-line) mode:
cffi compiles csrc/blockops.c, intentlog.c and fastmap.c into a real extension module and releases the
GIL around every call.
"""
import os
import re

from cffi import FFI

# setuptools wants paths relative to the project root (where setup.py runs).
CSRC = "csrc"

_CONSTANT = re.compile(r"#define\s+VD_\w+\s+(0x[0-9A-Fa-f]+|\d+)\s*$")


def _declarations(header: str) -> str:
    """A header's declarations for cffi's cdef, so that the C interface is
    written once, in csrc/: cdef takes no preprocessor lines but integer
    constants (`#define VD_... <number>`), which Python reads as lib.VD_..."""
    with open(os.path.join(CSRC, header)) as f:
        return "".join(line for line in f if not line.lstrip().startswith("#") or _CONSTANT.match(line.strip()))


ffibuilder = FFI()
ffibuilder.cdef(
    _declarations("blockops.h") + _declarations("intentlog.h") + _declarations("fastmap.h") + _declarations("logrecord.h")
)
ffibuilder.set_source(
    "vdisk.engine._native",
    '#include "blockops.h"\n#include "intentlog.h"\n#include "fastmap.h"\n#include "logrecord.h"',
    sources=[os.path.join(CSRC, f) for f in ("blockops.c", "intentlog.c", "fastmap.c")],
    include_dirs=[CSRC],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
