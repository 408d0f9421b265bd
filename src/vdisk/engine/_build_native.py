"""cffi build script for vdisk.engine._native (the C in csrc/).

Run by setup.py at install time (``cffi_modules``).  API (out-of-line) mode:
cffi compiles csrc/blockops.c and csrc/fastmap.c into a real extension module and releases the
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
    int vd_checksum_slots(int fd, const uint64_t *offsets, size_t n, size_t block_size, unsigned char *buf,
                          uint32_t *crcs, unsigned char *zero);

    struct vd_fastmap;
    struct vd_fastmap *vd_fm_new(int data_fd, int event_fd, uint32_t low_water);
    void vd_fm_free(struct vd_fastmap *fm);
    void vd_fm_lock(struct vd_fastmap *fm);
    void vd_fm_unlock(struct vd_fastmap *fm);
    void vd_fm_set_volume(struct vd_fastmap *fm, uint64_t vid, uint64_t lid, uint64_t size, int has_points);
    void vd_fm_drop_volume(struct vd_fastmap *fm, uint64_t vid);
    int vd_fm_set(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot, int writable);
    int vd_fm_add(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot);
    void vd_fm_forget(struct vd_fastmap *fm, uint64_t vid, uint64_t block);
    void vd_fm_forget_slot(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot);
    void vd_fm_new_epoch(struct vd_fastmap *fm);
    void vd_fm_clear(struct vd_fastmap *fm);
    size_t vd_fm_entries(struct vd_fastmap *fm);
    size_t vd_fm_drain(struct vd_fastmap *fm, uint64_t *out, size_t max_triples);
    size_t vd_fm_reservoir(struct vd_fastmap *fm);
    int vd_fm_reservoir_add(struct vd_fastmap *fm, const uint64_t *slots, size_t n);
    size_t vd_fm_reservoir_take(struct vd_fastmap *fm, uint64_t *out, size_t max);
    void vd_fm_set_failed(struct vd_fastmap *fm, int failed);
    void vd_fm_stats(struct vd_fastmap *fm, uint64_t *out4);
    long vd_fm_read(void *fm, uint64_t vid, uint64_t offset, uint32_t len, void *buf);
    long vd_fm_write(void *fm, uint64_t vid, uint64_t offset, uint32_t len, const void *buf);
    """
)
ffibuilder.set_source(
    "vdisk.engine._native",
    '#include "blockops.h"\n#include "fastmap.h"',
    sources=[os.path.join(CSRC, "blockops.c"), os.path.join(CSRC, "fastmap.c")],
    include_dirs=[CSRC],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
