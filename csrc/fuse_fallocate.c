/*
 * fuse_fallocate.c - give pyfuse3 a FUSE fallocate handler.
 *
 * pyfuse3 (3.5) fills a struct fuse_lowlevel_ops without .fallocate, so the
 * kernel's FUSE_FALLOCATE - what a loop device sends for DISCARD and
 * WRITE_ZEROES, and what fallocate(1) --punch-hole sends - gets ENOSYS and
 * discard frees nothing.  This library defines fuse_session_new(): loaded
 * with RTLD_GLOBAL before pyfuse3, it is found before libfuse's own, copies
 * pyfuse3's operations, adds .fallocate and calls the real function.
 *
 * The handler runs inside fuse_session_process_buf(), i.e. in pyfuse3's
 * trio thread, and calls vd_py_fallocate() (a cffi "extern Python"
 * callback, which takes the GIL itself) synchronously; it returns 0 or a
 * negative errno, which is the reply.
 *
 * It also keeps the session it created (vd_shim_session) and wraps the init
 * handler, for the fast path in fuse_fastpath.c.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 32
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <fuse_lowlevel.h>

#include "fuse_fallocate.h"

static struct fuse_lowlevel_ops patched_ops;
static int installed = 0;
static struct fuse_session *the_session;
static void (*pyfuse3_init)(void *userdata, struct fuse_conn_info *conn);
static volatile int no_splice;

/* libfuse asks for SPLICE_READ because pyfuse3 has write_buf; the fast path
 * (fuse_fastpath.c) puts a socket where /dev/fuse was and needs read(). */
static void vd_init(void *userdata, struct fuse_conn_info *conn)
{
    if (pyfuse3_init != NULL)
        pyfuse3_init(userdata, conn);
    if (no_splice)
        conn->want &= ~FUSE_CAP_SPLICE_READ;
}

static void vd_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                         off_t length, struct fuse_file_info *fi)
{
    (void)ino;
    int rc = vd_py_fallocate((uint64_t)fi->fh, mode, (int64_t)offset, (int64_t)length);
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    session_new_fn real = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (real == NULL)
        real = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
    if (real == NULL)
        return NULL;
    memset(&patched_ops, 0, sizeof(patched_ops));
    memcpy(&patched_ops, op, op_size < sizeof(patched_ops) ? op_size : sizeof(patched_ops));
    if (patched_ops.fallocate == NULL) {
        patched_ops.fallocate = vd_fallocate;
        installed = 1;
    }
    pyfuse3_init = patched_ops.init;
    patched_ops.init = vd_init;
    the_session = real(args, &patched_ops, sizeof(patched_ops), userdata);
    return the_session;
}

struct fuse_session *vd_shim_session(void)
{
    return the_session;
}

void vd_shim_no_splice(int on)
{
    no_splice = on;
}

int vd_fallocate_installed(void)
{
    return installed;
}
