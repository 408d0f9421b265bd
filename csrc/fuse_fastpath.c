/*
 * fuse_fastpath.c - READ, WRITE and FSYNC served in C, everything else by pyfuse3.
 *
 * pyfuse3 serves each request in its trio loop with the GIL held: about
 * 13k 4 KiB requests a second on our 2-vCPU VM whatever the handler does
 * (docs/architecture.md, "Performance").  This file puts one thread between
 * the kernel and pyfuse3:
 *
 *     kernel --/dev/fuse--> request threads --READ/WRITE/FSYNC--> engine (C)
 *                                |  else, or -EAGAIN from the engine
 *                                v
 *                       socketpair (SEQPACKET) --> libfuse/pyfuse3
 *     kernel <--/dev/fuse-- reply thread <-- replies
 *     kernel <--/dev/fuse-- notify thread <-- notifications
 *
 * The session's fd number is taken over with dup2(): libfuse keeps reading
 * requests and writing replies through the same number, now one end of a
 * socketpair whose messages keep their boundaries, as /dev/fuse's do.  The
 * engine's read, write and fsync functions come in as pointers (csrc/fastmap.c,
 * vdisk.engine.fastmap): this file knows the FUSE protocol, not blocks.
 *
 * READ and WRITE of a volume with an I/O limit (csrc/qos.c) that must wait
 * go to a delay queue instead: the request is copied, and a delay thread
 * serves it (here, or passes it on) when its time comes, so that a request
 * thread never sleeps for one volume while others' requests wait.
 *
 * Concurrency: several request threads (two by default) read /dev/fuse and
 * call the engine's functions at once (the engine locks what it shares);
 * the node table (FUSE node id -> volume) is changed from Python under its
 * own mutex; the delay queue has its own mutex and condition.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 32
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <fuse_lowlevel.h>

#include "fuse_fallocate.h"
#include "fuse_fastpath.h"
#include "qos.h"

typedef long (*vd_read_fn)(void *ctx, uint64_t vid, uint64_t off, uint32_t len, void *buf);
typedef long (*vd_write_fn)(void *ctx, uint64_t vid, uint64_t off, uint32_t len, const void *buf);
typedef long (*vd_fsync_fn)(void *ctx, uint64_t vid);

#define REQ_BUF ((1u << 20) + 64 * 1024) /* largest request: max_write + headers */
#define REPLY_BUF (4u << 20)
#define SOCK_BUF (8 << 20)
#define MAX_THREADS 8
/* A request due this soon is served now: the limit's pace holds over time
 * (the buckets were charged already), and a delay thread wakes once for a
 * batch instead of once a request (at 65k IOPS they are 15 us apart). */
#define DELAY_SLACK_NS 200000

struct node {
    uint64_t nodeid, vid;
};

/* A notification libfuse sent (its header's unique is 0: pyfuse3's
 * invalidate_entry/invalidate_inode), written to the kernel by the notify
 * thread.  The reply thread must never write one: the kernel's
 * inval_entry takes the directory's lock, which a LOOKUP in that
 * directory holds until its reply arrives - a reply queued behind the
 * notification in the reply thread, which then waits for ever. */
struct note {
    struct note *next;
    size_t n;
    unsigned char buf[];
};

/* a request that waits for its volume's I/O limit */
struct delayed {
    uint64_t due, start, seq, vid;
    unsigned char *buf;
    size_t n;
};

static struct {
    int running;
    int devfd;  /* our own fd on /dev/fuse */
    int sock;   /* our end of the socketpair */
    void *ctx;
    vd_read_fn rd;
    vd_write_fn wr;
    vd_fsync_fn fl;
    pthread_t req_thread[MAX_THREADS], reply_thread, note_thread;
    int nthreads;
    volatile int stopping;
    volatile int req_done[MAX_THREADS], reply_done, note_done;
    /* the notify thread's queue (struct note), in order */
    pthread_mutex_t qlock;
    pthread_cond_t qcond;
    struct note *qhead, *qtail;
    int qclosed;
    pthread_mutex_t nlock;
    struct node *nodes;
    size_t nnodes, capnodes;
    uint64_t st_reads, st_writes, st_fsyncs, st_forwarded, st_delayed;
    uint64_t st_io_forwarded; /* of st_forwarded, the reads, writes and fsyncs of a disk */
    /* the delay queue: a binary heap by (due, seq) */
    pthread_mutex_t dlock;
    pthread_cond_t dcond;
    pthread_t delay_thread[MAX_THREADS];
    volatile int delay_done[MAX_THREADS];
    struct delayed *dq;
    size_t ndq, capdq;
    uint64_t dseq;
} fp = {.nlock = PTHREAD_MUTEX_INITIALIZER, .dlock = PTHREAD_MUTEX_INITIALIZER, .qlock = PTHREAD_MUTEX_INITIALIZER,
       .qcond = PTHREAD_COND_INITIALIZER, .devfd = -1, .sock = -1};

static uint64_t node_vid(uint64_t nodeid)
{
    uint64_t vid = 0;
    pthread_mutex_lock(&fp.nlock);
    for (size_t i = 0; i < fp.nnodes; i++)
        if (fp.nodes[i].nodeid == nodeid) {
            vid = fp.nodes[i].vid;
            break;
        }
    pthread_mutex_unlock(&fp.nlock);
    return vid;
}

int vd_fp_set_node(uint64_t nodeid, uint64_t vid)
{
    int rc = 0;
    pthread_mutex_lock(&fp.nlock);
    size_t i;
    for (i = 0; i < fp.nnodes; i++)
        if (fp.nodes[i].nodeid == nodeid)
            break;
    if (i == fp.nnodes) {
        if (fp.nnodes == fp.capnodes) {
            size_t c = fp.capnodes ? fp.capnodes * 2 : 64;
            struct node *n = realloc(fp.nodes, c * sizeof(*n));
            if (n == NULL) {
                rc = -ENOMEM;
                goto out;
            }
            fp.nodes = n;
            fp.capnodes = c;
        }
        fp.nnodes++;
    }
    fp.nodes[i].nodeid = nodeid;
    fp.nodes[i].vid = vid;
out:
    pthread_mutex_unlock(&fp.nlock);
    return rc;
}

void vd_fp_drop_node(uint64_t nodeid)
{
    pthread_mutex_lock(&fp.nlock);
    for (size_t i = 0; i < fp.nnodes; i++)
        if (fp.nodes[i].nodeid == nodeid) {
            fp.nodes[i] = fp.nodes[--fp.nnodes];
            break;
        }
    pthread_mutex_unlock(&fp.nlock);
}

static void reply(uint64_t unique, long rc, const void *data, size_t len)
{
    struct fuse_out_header h;
    struct iovec iov[2];
    h.unique = unique;
    h.error = rc < 0 ? (int32_t)rc : 0;
    h.len = sizeof(h) + (rc < 0 ? 0 : len);
    iov[0].iov_base = &h;
    iov[0].iov_len = sizeof(h);
    iov[1].iov_base = (void *)data;
    iov[1].iov_len = rc < 0 ? 0 : len;
    /* ENOENT: the request was interrupted and is gone; nothing to do */
    if (writev(fp.devfd, iov, iov[1].iov_len ? 2 : 1) < 0 && errno != ENOENT)
        fprintf(stderr, "vdisk fast path: replying to request %llu: %s\n", (unsigned long long)unique,
                strerror(errno));
}

/* The volume a READ, WRITE or FSYNC is for (0: none, or another request:
 * pyfuse3 serves it). */
static uint64_t request_vid(const unsigned char *buf)
{
    const struct fuse_in_header *h = (const void *)buf;
    if (h->opcode != FUSE_READ && h->opcode != FUSE_WRITE && h->opcode != FUSE_FSYNC)
        return 0;
    return node_vid(h->nodeid);
}

/* 1 if served here, 0 to forward; vid: request_vid's; start: when a READ
 * or WRITE was admitted (csrc/qos.c), for its latency */
static int serve(const unsigned char *buf, size_t n, unsigned char *out, uint64_t vid, uint64_t start)
{
    const struct fuse_in_header *h = (const void *)buf;
    if (vid == 0)
        return 0;
    if (h->opcode == FUSE_FSYNC) {
        if (fp.fl == NULL || fp.fl(fp.ctx, vid) < 0)
            return 0; /* the engine flushes it in Python (a commit, say) */
        reply(h->unique, 0, NULL, 0);
        __atomic_add_fetch(&fp.st_fsyncs, 1, __ATOMIC_RELAXED);
        return 1;
    }
    if (h->opcode == FUSE_READ) {
        const struct fuse_read_in *in = (const void *)(buf + sizeof(*h));
        if (n < sizeof(*h) + sizeof(*in) || in->size > REPLY_BUF)
            return 0;
        long rc = fp.rd(fp.ctx, vid, in->offset, in->size, out);
        if (rc == -EAGAIN)
            return 0;
        reply(h->unique, rc, out, rc > 0 ? (size_t)rc : 0);
        vd_qos_done(vid, 0, start, vd_qos_now());
        __atomic_add_fetch(&fp.st_reads, 1, __ATOMIC_RELAXED);
        return 1;
    }
    const struct fuse_write_in *in = (const void *)(buf + sizeof(*h));
    if (n < sizeof(*h) + sizeof(*in) || n - sizeof(*h) - sizeof(*in) < in->size)
        return 0;
    long rc = fp.wr(fp.ctx, vid, in->offset, in->size, buf + sizeof(*h) + sizeof(*in));
    if (rc == -EAGAIN)
        return 0;
    struct fuse_write_out wo = {.size = rc > 0 ? (uint32_t)rc : 0};
    reply(h->unique, rc, &wo, sizeof(wo));
    vd_qos_done(vid, 1, start, vd_qos_now());
    __atomic_add_fetch(&fp.st_writes, 1, __ATOMIC_RELAXED);
    return 1;
}

/* Count a READ or WRITE of volume vid and take it from its limit (qos.c):
 * *start is when; the nanoseconds it must wait (0: serve it now). */
static uint64_t admit(const unsigned char *buf, size_t n, uint64_t vid, uint64_t *start)
{
    const struct fuse_in_header *h = (const void *)buf;
    *start = 0;
    if (vid == 0 || (h->opcode != FUSE_READ && h->opcode != FUSE_WRITE))
        return 0;
    uint32_t size;
    if (h->opcode == FUSE_READ) {
        if (n < sizeof(*h) + sizeof(struct fuse_read_in))
            return 0;
        size = ((const struct fuse_read_in *)(buf + sizeof(*h)))->size;
    } else {
        if (n < sizeof(*h) + sizeof(struct fuse_write_in))
            return 0;
        size = ((const struct fuse_write_in *)(buf + sizeof(*h)))->size;
    }
    *start = vd_qos_now();
    return vd_qos_admit(vid, h->opcode == FUSE_WRITE, size, *start);
}

/* Pass a request on to libfuse/pyfuse3; 0, or -1 when the session is gone.
 * vid: request_vid's (not 0: a read, write or fsync of a disk, which the
 * engine then serves in Python; counted apart from the rest, such as
 * LOOKUP, OPEN or FALLOCATE, which pyfuse3 always serves). */
static int forward(const unsigned char *buf, size_t n, uint64_t vid)
{
    __atomic_add_fetch(&fp.st_forwarded, 1, __ATOMIC_RELAXED);
    if (vid != 0)
        __atomic_add_fetch(&fp.st_io_forwarded, 1, __ATOMIC_RELAXED);
    while (send(fp.sock, buf, n, MSG_NOSIGNAL) < 0) {
        if (errno == EINTR)
            continue;
        const struct fuse_in_header *h = (const void *)buf;
        if (errno == EPIPE || fp.stopping)
            return -1;
        fprintf(stderr, "vdisk fast path: passing request %llu on: %s\n", (unsigned long long)h->unique,
                strerror(errno));
        reply(h->unique, -EIO, NULL, 0);
        break;
    }
    return 0;
}

static int dq_before(const struct delayed *a, const struct delayed *b)
{
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

/* Keep a copy of the request to serve at due; 0, or -errno (the caller
 * serves it at once then: no memory, or the fast path is stopping). */
static int delay(const unsigned char *buf, size_t n, uint64_t vid, uint64_t due, uint64_t start)
{
    unsigned char *copy = malloc(n);
    if (copy == NULL)
        return -ENOMEM;
    memcpy(copy, buf, n);
    pthread_mutex_lock(&fp.dlock);
    if (fp.stopping) { /* the delay threads may have ended: serve it now */
        pthread_mutex_unlock(&fp.dlock);
        free(copy);
        return -ESHUTDOWN;
    }
    if (fp.ndq == fp.capdq) {
        size_t c = fp.capdq ? fp.capdq * 2 : 64;
        struct delayed *q = realloc(fp.dq, c * sizeof(*q));
        if (q == NULL) {
            pthread_mutex_unlock(&fp.dlock);
            free(copy);
            return -ENOMEM;
        }
        fp.dq = q;
        fp.capdq = c;
    }
    size_t i = fp.ndq++;
    struct delayed d = {due, start, fp.dseq++, vid, copy, n};
    while (i > 0 && dq_before(&d, &fp.dq[(i - 1) / 2])) {
        fp.dq[i] = fp.dq[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    fp.dq[i] = d;
    if (i == 0)
        pthread_cond_signal(&fp.dcond); /* a new earliest */
    pthread_mutex_unlock(&fp.dlock);
    __atomic_add_fetch(&fp.st_delayed, 1, __ATOMIC_RELAXED);
    return 0;
}

/* the earliest delayed request (with dlock held; the queue not empty) */
static struct delayed dq_pop(void)
{
    struct delayed top = fp.dq[0], last = fp.dq[--fp.ndq];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= fp.ndq)
            break;
        if (c + 1 < fp.ndq && dq_before(&fp.dq[c + 1], &fp.dq[c]))
            c++;
        if (!dq_before(&fp.dq[c], &last))
            break;
        fp.dq[i] = fp.dq[c];
        i = c;
    }
    if (fp.ndq)
        fp.dq[i] = last;
    return top;
}

/* Name the calling thread (what top -H, ps -L and /proc/PID/task/TID/comm
 * show): vdisk-io0, vdisk-delay0, vdisk-reply, vdisk-notify. */
static void name_self(const char *base, int i)
{
    char name[16];
    if (i < 0)
        snprintf(name, sizeof name, "vdisk-%s", base);
    else
        snprintf(name, sizeof name, "vdisk-%s%d", base, i);
    pthread_setname_np(pthread_self(), name);
}

/* A delay thread (as many as request threads): serves each delayed request
 * when its time comes, until the fast path stops (what is left then is
 * passed on, so that pyfuse3 answers it or the kernel's abort does). */
static void *delay_loop(void *arg)
{
    int me = (int)(intptr_t)arg;
    name_self("delay", me);
    unsigned char *out = aligned_alloc(4096, REPLY_BUF);
    pthread_mutex_lock(&fp.dlock);
    for (;;) {
        if (fp.ndq == 0) {
            if (fp.stopping)
                break;
            pthread_cond_wait(&fp.dcond, &fp.dlock);
            continue;
        }
        if (fp.dq[0].due > vd_qos_now() + DELAY_SLACK_NS && !fp.stopping) {
            /* dcond waits on CLOCK_MONOTONIC, vd_qos_now's clock */
            uint64_t at = fp.dq[0].due - DELAY_SLACK_NS;
            struct timespec ts = {(time_t)(at / 1000000000u), (long)(at % 1000000000u)};
            pthread_cond_timedwait(&fp.dcond, &fp.dlock, &ts);
            continue;
        }
        struct delayed d = dq_pop();
        if (fp.ndq)
            pthread_cond_signal(&fp.dcond); /* the next may be due too: another thread */
        pthread_mutex_unlock(&fp.dlock);
        if (fp.stopping || out == NULL || !serve(d.buf, d.n, out, d.vid, d.start))
            forward(d.buf, d.n, d.vid);
        free(d.buf);
        pthread_mutex_lock(&fp.dlock);
    }
    pthread_mutex_unlock(&fp.dlock);
    free(out);
    fp.delay_done[me] = 1;
    return NULL;
}

static void *request_loop(void *arg)
{
    int me = (int)(intptr_t)arg;
    name_self("io", me);
    unsigned char *buf = aligned_alloc(4096, REQ_BUF), *out = aligned_alloc(4096, REPLY_BUF);
    if (buf == NULL || out == NULL) {
        fprintf(stderr, "vdisk fast path: out of memory\n");
        goto done;
    }
    for (;;) {
        ssize_t n = read(fp.devfd, buf, REQ_BUF);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue;
            if (errno != ENODEV)
                fprintf(stderr, "vdisk fast path: reading /dev/fuse: %s\n", strerror(errno));
            break;
        }
        if ((size_t)n < sizeof(struct fuse_in_header))
            continue;
        uint64_t vid = request_vid(buf), start, wait = admit(buf, (size_t)n, vid, &start);
        if (wait > DELAY_SLACK_NS && delay(buf, (size_t)n, vid, start + wait, start) == 0)
            continue;
        if (serve(buf, (size_t)n, out, vid, start))
            continue;
        if (forward(buf, (size_t)n, vid) < 0)
            goto done;
    }
    /* the kernel ended the connection (unmounted): end pyfuse3's loop the
     * way libfuse would on ENODEV, unless the daemon is already closing it */
    if (!fp.stopping && vd_shim_session() != NULL)
        fuse_session_exit(vd_shim_session());
    shutdown(fp.sock, SHUT_WR);
done:
    free(buf);
    free(out);
    fp.req_done[me] = 1;
    return NULL;
}

/* No more notifications will come: the notify thread ends once it wrote
 * those queued. */
static void close_notes(void)
{
    pthread_mutex_lock(&fp.qlock);
    fp.qclosed = 1;
    pthread_cond_broadcast(&fp.qcond);
    pthread_mutex_unlock(&fp.qlock);
}

/* Hand a notification to the notify thread (dropped if memory is short:
 * it is only a hint to the kernel's caches). */
static void queue_note(const unsigned char *buf, size_t n)
{
    struct note *m = malloc(sizeof(*m) + n);
    if (m == NULL) {
        fprintf(stderr, "vdisk fast path: a cache invalidation dropped (out of memory)\n");
        return;
    }
    m->next = NULL;
    m->n = n;
    memcpy(m->buf, buf, n);
    pthread_mutex_lock(&fp.qlock);
    if (fp.qtail != NULL)
        fp.qtail->next = m;
    else
        fp.qhead = m;
    fp.qtail = m;
    pthread_cond_signal(&fp.qcond);
    pthread_mutex_unlock(&fp.qlock);
}

static void *reply_loop(void *arg)
{
    (void)arg;
    name_self("reply", -1);
    unsigned char *buf = malloc(REPLY_BUF);
    while (buf != NULL) {
        ssize_t n = recv(fp.sock, buf, REPLY_BUF, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* libfuse closed its end (fuse_session_destroy) */
        const struct fuse_out_header *oh = (const void *)buf;
        if ((size_t)n >= sizeof(*oh) && oh->unique == 0) {
            queue_note(buf, (size_t)n); /* may block in the kernel: not here (struct note) */
            continue;
        }
        if (write(fp.devfd, buf, (size_t)n) < 0 && errno != ENOENT && errno != ENODEV)
            fprintf(stderr, "vdisk fast path: passing a reply on: %s\n", strerror(errno));
    }
    free(buf);
    close_notes();
    fp.reply_done = 1;
    return NULL;
}

static void *note_loop(void *arg)
{
    (void)arg;
    name_self("notify", -1);
    for (;;) {
        pthread_mutex_lock(&fp.qlock);
        while (fp.qhead == NULL && !fp.qclosed)
            pthread_cond_wait(&fp.qcond, &fp.qlock);
        struct note *m = fp.qhead;
        if (m != NULL && (fp.qhead = m->next) == NULL)
            fp.qtail = NULL;
        pthread_mutex_unlock(&fp.qlock);
        if (m == NULL)
            break;
        if (write(fp.devfd, m->buf, m->n) < 0 && errno != ENOENT && errno != ENODEV)
            fprintf(stderr, "vdisk fast path: passing a notification on: %s\n", strerror(errno));
        free(m);
    }
    fp.note_done = 1;
    return NULL;
}

static int big_buffers(int s)
{
    int want = SOCK_BUF, got = 0;
    socklen_t len = sizeof(got);
    if (setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &want, sizeof(want)) < 0)
        setsockopt(s, SOL_SOCKET, SO_SNDBUF, &want, sizeof(want));
    if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &want, sizeof(want)) < 0)
        setsockopt(s, SOL_SOCKET, SO_RCVBUF, &want, sizeof(want));
    if (getsockopt(s, SOL_SOCKET, SO_SNDBUF, &got, &len) < 0)
        return -errno;
    return got >= (int)(REQ_BUF + 4096) ? 0 : -ENOBUFS;
}

/* Take over the session's fd (after fuse_session_mount, before the loop
 * reads anything).  0, or -errno with nothing changed. */
int vd_fp_start(uintptr_t ctx, uintptr_t rd, uintptr_t wr, uintptr_t fl, int nthreads)
{
    struct fuse_session *se = vd_shim_session();
    int sv[2], rc;
    if (fp.running)
        return -EBUSY;
    if (se == NULL)
        return -ENOTCONN;
    int sfd = fuse_session_fd(se);
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    if ((rc = big_buffers(sv[0])) < 0 || (rc = big_buffers(sv[1])) < 0)
        goto fail;
    fp.devfd = fcntl(sfd, F_DUPFD_CLOEXEC, 0);
    if (fp.devfd < 0) {
        rc = -errno;
        goto fail;
    }
    vd_shim_no_splice(1); /* libfuse must read() the socket, not splice it */
    if (dup3(sv[1], sfd, O_CLOEXEC) < 0) {
        rc = -errno;
        close(fp.devfd);
        fp.devfd = -1;
        vd_shim_no_splice(0);
        goto fail;
    }
    close(sv[1]);
    fp.sock = sv[0];
    fp.ctx = (void *)ctx;
    fp.rd = (vd_read_fn)rd;
    fp.wr = (vd_write_fn)wr;
    fp.fl = (vd_fsync_fn)fl;
    static int dcond_ready;
    if (!dcond_ready) {
        pthread_condattr_t a;
        pthread_condattr_init(&a);
        pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
        pthread_cond_init(&fp.dcond, &a);
        pthread_condattr_destroy(&a);
        dcond_ready = 1;
    }
    fp.stopping = fp.reply_done = fp.note_done = fp.qclosed = 0;
    fp.nthreads = nthreads < 1 ? 1 : nthreads > MAX_THREADS ? MAX_THREADS : nthreads;
    pthread_create(&fp.note_thread, NULL, note_loop, NULL);
    pthread_create(&fp.reply_thread, NULL, reply_loop, NULL);
    for (int i = 0; i < fp.nthreads; i++) {
        fp.delay_done[i] = 0;
        pthread_create(&fp.delay_thread[i], NULL, delay_loop, (void *)(intptr_t)i);
    }
    for (int i = 0; i < fp.nthreads; i++) {
        fp.req_done[i] = 0;
        pthread_create(&fp.req_thread[i], NULL, request_loop, (void *)(intptr_t)i);
    }
    fp.running = 1;
    return 0;
fail:
    close(sv[0]);
    close(sv[1]);
    return rc;
}

static void wake_delay_threads(void)
{
    pthread_mutex_lock(&fp.dlock);
    pthread_cond_broadcast(&fp.dcond);
    pthread_mutex_unlock(&fp.dlock);
}

/* Before pyfuse3.close(): from now on the threads only wind down (the
 * delayed requests are passed on to pyfuse3 at once). */
void vd_fp_quiesce(void)
{
    fp.stopping = 1;
    wake_delay_threads();
}

static int join_within(pthread_t t, volatile int *done, int ms)
{
    for (int i = 0; i < ms / 10 && !*done; i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (!*done) {
        pthread_detach(t);
        return -ETIMEDOUT;
    }
    pthread_join(t, NULL);
    return 0;
}

/* After pyfuse3.close() (unmounted, libfuse's end closed): join the threads
 * and close our fds.  -ETIMEDOUT if the request thread did not end (the
 * kernel still holds the connection); it is left detached then. */
int vd_fp_stop(void)
{
    if (!fp.running)
        return 0;
    fp.stopping = 1;
    wake_delay_threads();
    int rc3 = 0;
    for (int i = 0; i < fp.nthreads; i++)
        if (join_within(fp.delay_thread[i], &fp.delay_done[i], 5000) < 0)
            rc3 = -ETIMEDOUT;
    shutdown(fp.sock, SHUT_RDWR);
    int rc = join_within(fp.reply_thread, &fp.reply_done, 5000), rc2 = 0;
    close_notes();
    if (join_within(fp.note_thread, &fp.note_done, 5000) < 0)
        rc2 = -ETIMEDOUT; /* still writing to devfd: keep it open */
    for (int i = 0; i < fp.nthreads; i++)
        if (join_within(fp.req_thread[i], &fp.req_done[i], 5000) < 0)
            rc2 = -ETIMEDOUT;
    if (rc2 == 0) {
        close(fp.devfd);
        close(fp.sock);
        fp.devfd = fp.sock = -1;
    }
    fp.running = 0;
    vd_shim_no_splice(0);
    return rc2 ? rc2 : rc ? rc : rc3;
}

void vd_fp_stats(uint64_t *out)
{
    out[0] = __atomic_load_n(&fp.st_reads, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&fp.st_writes, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&fp.st_forwarded, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&fp.st_fsyncs, __ATOMIC_RELAXED);
    out[4] = __atomic_load_n(&fp.st_delayed, __ATOMIC_RELAXED);
    out[5] = __atomic_load_n(&fp.st_io_forwarded, __ATOMIC_RELAXED);
}
