"""cffi build script for vdisk.fuse._lowlevel: the libfuse shim that adds
fallocate (csrc/fuse_fallocate.c) and the READ/WRITE fast path
(csrc/fuse_fastpath.c).

Links against libfuse3 (found with pkg-config, as pyfuse3 itself is built).
"""
import re
import shlex
import subprocess

from cffi import FFI


def _pkg(flag: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, "fuse3"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(
            "vdisk: pkg-config cannot find fuse3; install libfuse3-dev and pkg-config "
            "(Debian: apt-get install libfuse3-dev pkg-config)"
        ) from None
    return shlex.split(out)


_CONSTANT = re.compile(r"#define\s+VD_\w+\s+(0x[0-9A-Fa-f]+|\d+)\s*$")


def _declarations(header: str) -> str:
    """A header's declarations for cffi's cdef (which takes no preprocessor
    lines but integer constants, `#define VD_... <number>`, which Python
    reads as lib.VD_...), so that the C interface is written once, in csrc/."""
    with open(header) as f:
        return "".join(line for line in f if not line.lstrip().startswith("#") or _CONSTANT.match(line.strip()))


ffibuilder = FFI()
ffibuilder.cdef(
    """
    extern "Python+C" int vd_py_fallocate(uint64_t fh, int mode, int64_t offset, int64_t length);
    int vd_fallocate_installed(void);
    """
    + _declarations("csrc/fuse_fastpath.h")
    + _declarations("csrc/qos.h")
)
cflags = _pkg("--cflags")
ffibuilder.set_source(
    "vdisk.fuse._lowlevel",
    '#include "fuse_fallocate.h"\n#include "fuse_fastpath.h"\n#include "qos.h"',
    sources=["csrc/fuse_fallocate.c", "csrc/fuse_fastpath.c", "csrc/qos.c"],
    include_dirs=["csrc"] + [f[2:] for f in cflags if f.startswith("-I")],
    extra_compile_args=["-O2"] + [f for f in cflags if not f.startswith("-I")],
    extra_link_args=_pkg("--libs") + ["-ldl", "-lpthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
