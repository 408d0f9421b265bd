"""cffi build script for vdisk.engine._native (the C in csrc/).

Run by setup.py at install time (``cffi_modules``).  API (out-of-line) mode:
cffi compiles csrc/blockops.c into a real extension module and releases the
GIL around every call.
"""
import os

from cffi import FFI

# setuptools wants paths relative to the project root (where setup.py runs).
CSRC = "csrc"

ffibuilder = FFI()
ffibuilder.cdef(
    """
    uint32_t vd_crc32c(uint32_t crc, const unsigned char *buf, size_t len);
    int vd_have_hw_crc(void);
    int vd_is_zero(const unsigned char *buf, size_t len);
    uint32_t vd_crc32c_is_zero(const unsigned char *buf, size_t len, int *is_zero);
    long vd_diff_sectors(const unsigned char *a, const unsigned char *b, size_t len,
                         size_t sector, unsigned char *bitmap);
    int vd_punch_hole(int fd, long long offset, long long len);
    int vd_start_writeback(int fd);
    """
)
ffibuilder.set_source(
    "vdisk.engine._native",
    '#include "blockops.h"',
    sources=[os.path.join(CSRC, "blockops.c")],
    include_dirs=[CSRC],
    extra_compile_args=["-O2", "-std=gnu99"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
