/* fuse_fastpath.h - READ/WRITE/FSYNC served in C, the rest by pyfuse3 (see
 * fuse_fastpath.c).  Also the cffi declarations of vdisk.fuse._lowlevel's
 * fast path: src/vdisk/fuse/_build_lowlevel.py reads this file. */
#ifndef VDISK_FUSE_FASTPATH_H
#define VDISK_FUSE_FASTPATH_H
#include <stdint.h>

int vd_fp_start(uintptr_t ctx, uintptr_t rd, uintptr_t wr, uintptr_t fl, int nthreads);
void vd_fp_quiesce(void);
int vd_fp_stop(void);
int vd_fp_set_node(uint64_t nodeid, uint64_t vid);
void vd_fp_drop_node(uint64_t nodeid);
/* reads, writes, passed on (every request pyfuse3 answered), fsyncs,
 * delayed by an I/O limit, and of those passed on the reads, writes and
 * fsyncs of a disk (the engine served them in Python) */
void vd_fp_stats(uint64_t *out);
#endif
