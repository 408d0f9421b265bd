/* fuse_fallocate.h - see fuse_fallocate.c */
#ifndef VDISK_FUSE_FALLOCATE_H
#define VDISK_FUSE_FALLOCATE_H
#include <stdint.h>
/* Implemented in Python (cffi extern "Python"): 0 or -errno. */
int vd_py_fallocate(uint64_t fh, int mode, int64_t offset, int64_t length);
int vd_fallocate_installed(void);

struct fuse_session;
struct fuse_session *vd_shim_session(void);
void vd_shim_no_splice(int on);
#endif
