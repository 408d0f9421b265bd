/*
 * intentlog.c - the intent log's only writer (docs/format.md, "The intent
 * log"; the record's layout is logrecord.h).
 *
 * A log flush makes a volume's writes since its last one durable with one
 * record appended at the log's end and one fdatasync, where a commit needs
 * three.  Two callers write records, both through here: the engine's log
 * flush (vdisk.engine.logflush, which gathers the pages from its overlay
 * and calls vd_log_append) and the fast path's fsync (fastmap.c, which
 * gathers them from its table into vd_log_body and calls vd_log_seal and
 * vd_log_write).  This file owns the log's state - the generation whose
 * records are valid, where the next record goes and its sequence number,
 * how far the file is written, whether it is still usable - and the
 * counters; the engine reads it (vd_log_get) and replays records itself.
 *
 * Two files take turns by generation (even, odd).  A commit's freeze
 * moves the writer to the next generation in the other file, so fsyncs go
 * on while the commit runs: their records follow the freeze, and the
 * records before it stay in their file until the commit is durable.
 *
 * Concurrency contract: one writer at a time holds mu from the gathering
 * of its record to its fdatasync, so records follow each other in their
 * file in the order of their sequence numbers.  The engine freezes, thaws
 * and retires the log with the fast path's map lock held for writing,
 * which a writer in C also holds while it checks whether it may write and
 * reserves its record's place: a commit's freeze falls before or after a
 * whole reservation, and a record goes to the file it was sealed for.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "blockops.h"
#include "intentlog.h"
#include "logrecord.h"

#define HDR VD_LOG_HEADER
#define PG VD_LOG_PAGE
#define ENTRIES_AT sizeof(struct vd_log_head)
#define AT(field) offsetof(struct vd_log_head, field)
#define ZEROS (64 * 1024)

const char vd_log_magic[9] = "vdlogv2\n";
_Static_assert(VD_LOG_GROW % ZEROS == 0, "the log grows by whole runs of zeros");
_Static_assert(sizeof(struct vd_log_head) + VD_LOG_MAX_ENTRIES * sizeof(struct vd_log_entry) <= VD_LOG_HEADER,
               "a record's entries fit in its header");
_Static_assert(sizeof(struct vd_log_head) + (VD_LOG_MAX_ENTRIES + 1) * sizeof(struct vd_log_entry) > VD_LOG_HEADER,
               "VD_LOG_MAX_ENTRIES is as many as fit");

struct vd_log {
    pthread_mutex_t mu;
    int fd[2];     /* the files of even and of odd generations */
    int dfd[2];    /* the same files opened O_DIRECT (-1: none; see write_direct) */
    int sealed;    /* the file (0 or 1) the record sealed last goes to */
    int sealed_ahead; /* ... and it is of the generation a commit in flight
                       * moved to (wgen != gen when it was sealed) */
    int ok;        /* 0 once a write failed: commits only from then on */
    int inflight;  /* no record may be written now (see vd_log_freeze) */
    int stale;     /* the written generation's file may hold records of a
                    * crash: none is written before a commit retires them */
    int fail_next; /* tests */
    uint64_t gen;  /* the generation the durable map names (log_gen) */
    uint64_t wgen; /* the generation records are written in: gen, or gen + 1
                    * once a commit froze (its records follow its freeze) */
    uint64_t pos, seq, end[2], max, flush_max;
    uint64_t allow; /* bytes vd_log_keep_ahead may still grow the files by */
    unsigned char *buf; /* a record: its header, then up to flush_max of pages */
    uint64_t st_flushes, st_bytes, st_flushes_c, st_flushes_during, st_grows_c;
};

struct vd_log *vd_log_new(int fd0, int fd1, uint64_t gen, uint64_t end0, uint64_t end1, uint64_t max,
                          uint64_t flush_max)
{
    struct vd_log *L = calloc(1, sizeof(*L));
    if (L == NULL)
        return NULL;
    L->buf = aligned_alloc(PG, HDR + (flush_max + PG - 1) / PG * PG);
    if (L->buf == NULL) {
        free(L);
        return NULL;
    }
    pthread_mutex_init(&L->mu, NULL);
    L->fd[0] = fd0;
    L->fd[1] = fd1;
    L->dfd[0] = L->dfd[1] = -1;
    L->ok = 1;
    L->gen = L->wgen = gen;
    L->end[0] = end0;
    L->end[1] = end1;
    L->max = max;
    L->flush_max = flush_max;
    if (end0 > 0 || end1 > 0) {
        /* records of gen and gen + 1 may be there, the engine replays them:
         * none is written before the commit that follows, which moves on
         * to gen + 2 */
        L->wgen = gen + 1;
        L->stale = L->inflight = 1;
    }
    return L;
}

void vd_log_free(struct vd_log *L)
{
    if (L == NULL)
        return;
    pthread_mutex_destroy(&L->mu);
    free(L->buf);
    free(L);
}

void vd_log_lock(struct vd_log *L) { pthread_mutex_lock(&L->mu); }
void vd_log_unlock(struct vd_log *L) { pthread_mutex_unlock(&L->mu); }
void vd_log_set_max(struct vd_log *L, uint64_t max) { L->max = max; }
void vd_log_fail_next(struct vd_log *L, int fail) { L->fail_next = fail; }
void vd_log_set_direct(struct vd_log *L, int dfd0, int dfd1)
{
    L->dfd[0] = dfd0;
    L->dfd[1] = dfd1;
}

uint64_t vd_log_freeze(struct vd_log *L, int records)
{
    if (records && !L->inflight && L->wgen == L->gen) {
        /* the other file, from its start: the records of gen stay where
         * they are until the commit is durable */
        L->wgen = L->gen + 1;
        L->pos = L->seq = 0;
        return L->wgen;
    }
    /* gen + 1's file may hold records already (a commit that failed after
     * its freeze, or a crash's): this commit's generation is past them,
     * and nothing is written until it is durable */
    L->inflight = 1;
    return L->wgen + 1;
}

void vd_log_thaw(struct vd_log *L) { L->inflight = L->stale; }

void vd_log_retire(struct vd_log *L, uint64_t gen)
{
    L->gen = gen;
    if (L->wgen != gen) {
        L->wgen = gen;
        L->pos = L->seq = 0;
    }
    L->inflight = L->stale = 0;
}

void vd_log_get(struct vd_log *L, uint64_t *out)
{
    uint64_t v[VD_LOG_STATE_WORDS] = {L->gen,          L->pos,      L->seq,          L->end[L->wgen & 1],
                                      (uint64_t)L->ok, (uint64_t)L->inflight, L->st_flushes, L->st_bytes,
                                      L->st_flushes_c, L->max,     L->wgen,         L->st_flushes_during,
                                      __atomic_load_n(&L->allow, __ATOMIC_RELAXED), L->st_grows_c};
    memcpy(out, v, sizeof(v));
}

/* whether a record fits: its entries and pages, and its end within the
 * file's written end (end) and the log's maximum */
static int fits(struct vd_log *L, uint32_t count, uint64_t npages, uint64_t end)
{
    uint64_t need = HDR + npages * PG;
    return count <= VD_LOG_MAX_ENTRIES && npages * PG <= L->flush_max && L->pos + need <= end &&
           L->pos + need <= L->max;
}

int vd_log_usable(struct vd_log *L) { return L->ok && !L->inflight; }

int vd_log_room(struct vd_log *L, uint64_t npages)
{
    return vd_log_usable(L) && fits(L, 0, npages, L->end[L->wgen & 1]) ? 0 : -EAGAIN;
}

unsigned char *vd_log_body(struct vd_log *L) { return L->buf + HDR; }

static void put_le(unsigned char *p, uint64_t x, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (unsigned char)(x >> (8 * i));
}

uint64_t vd_log_seal(struct vd_log *L, uint64_t vid, const uint64_t *blocks, const uint32_t *masks, uint32_t count,
                     uint64_t npages, uint64_t *at)
{
    unsigned char *hdr = L->buf;
    memset(hdr, 0, HDR);
    memcpy(hdr + AT(magic), vd_log_magic, sizeof(((struct vd_log_head *)0)->magic));
    put_le(hdr + AT(gen), L->wgen, 8);
    put_le(hdr + AT(seq), L->seq, 8);
    put_le(hdr + AT(vid), vid, 8);
    put_le(hdr + AT(count), count, 4);
    for (uint32_t i = 0; i < count; i++) {
        unsigned char *e = hdr + ENTRIES_AT + sizeof(struct vd_log_entry) * i;
        put_le(e + offsetof(struct vd_log_entry, block), blocks[i], 8);
        put_le(e + offsetof(struct vd_log_entry, mask), masks[i], 4);
    }
    /* CRC-32C of the header with its crc field zero, then of the pages */
    put_le(hdr + AT(crc), vd_crc32c(vd_crc32c(0, hdr, HDR), L->buf + HDR, npages * PG), 4);
    uint64_t size = HDR + npages * PG;
    *at = L->pos;
    L->sealed = (int)(L->wgen & 1);
    L->sealed_ahead = L->wgen != L->gen;
    L->pos += size;
    L->seq++;
    return size;
}

static long failed(struct vd_log *L, long rc)
{
    fprintf(stderr, "vdisk: writing the intent log failed (%s); flushes commit instead\n", strerror((int)-rc));
    L->ok = 0;
    return rc;
}

/* One write that is durable when it returns: O_DIRECT with RWF_DSYNC over
 * bytes the file already holds (zeros at least: grow_file), so that no
 * metadata changes and the device sees one write with FUA (or a write
 * and a flush), not a copy into the page cache, its writeback and then a
 * flush (about 100 us a record against 125-135 us on the test VM).  1
 * when it was written so; 0 when this file cannot (no O_DIRECT file,
 * EINVAL: a filesystem without O_DIRECT, such as tmpfs before Linux
 * 6.6): the caller writes it the buffered way; -errno when it failed. */
static long write_direct(struct vd_log *L, uint64_t at, uint64_t size)
{
    int dfd = L->dfd[L->sealed];
    if (dfd < 0 || L->fail_next)
        return 0;
    struct iovec iov = {L->buf, (size_t)size};
    ssize_t n = pwritev2(dfd, &iov, 1, (off_t)at, RWF_DSYNC);
    if (n == (ssize_t)size)
        return 1;
    if (n < 0 && errno == EINVAL) {
        L->dfd[0] = L->dfd[1] = -1; /* buffered from now on */
        return 0;
    }
    return n < 0 ? -errno : -EIO;
}

static long write_record(struct vd_log *L, uint64_t at, uint64_t size)
{
    /* a record sealed before a commit retired the log is obsolete, and
     * harmless where it lands: written all the same */
    long rc = write_direct(L, at, size);
    if (rc == 0) {
        rc = vd_pwrite_full(L->fd[L->sealed], L->buf, size, at);
        if (rc == 0 && L->fail_next)
            rc = -EIO;
        else if (rc == 0 && fdatasync(L->fd[L->sealed]) < 0)
            rc = -errno;
    }
    L->fail_next = 0;
    if (rc < 0)
        return failed(L, rc);
    L->st_flushes++;
    L->st_flushes_during += L->sealed_ahead; /* while a commit ran: it did not wait for it */
    L->st_bytes += size;
    return 0;
}

/* zero bytes at the file's end: a record rewrites them, which costs no
 * metadata at its fdatasync */
static long grow_file(struct vd_log *L, uint64_t grow)
{
    static const unsigned char zeros[ZEROS];
    while (grow > 0) {
        size_t n = grow < ZEROS ? (size_t)grow : ZEROS;
        uint64_t *end = &L->end[L->wgen & 1];
        int rc = vd_pwrite_full(L->fd[L->wgen & 1], zeros, n, *end);
        if (rc < 0)
            return failed(L, rc);
        *end += n;
        grow -= n;
    }
    return 0;
}

void vd_log_allow(struct vd_log *L, uint64_t bytes) { __atomic_store_n(&L->allow, bytes, __ATOMIC_RELAXED); }

/* One step of growth, if the room ahead of the records is less than
 * ahead and the allowance and the log's maximum permit: 1 when the file
 * grew, 0 when it did not (and need not, or may not now). */
static int grow_step(struct vd_log *L, uint64_t ahead)
{
    static const unsigned char zeros[ZEROS];
    int w = L->wgen & 1;
    uint64_t end = L->end[w];
    if (!vd_log_usable(L) || end - L->pos >= ahead || end + VD_LOG_GROW > L->max)
        return 0;
    /* take the step out of the allowance first: the engine may set it
     * meanwhile, without the mutex (vd_log_allow) */
    uint64_t a = __atomic_load_n(&L->allow, __ATOMIC_RELAXED);
    do {
        if (a < VD_LOG_GROW)
            return 0;
    } while (!__atomic_compare_exchange_n(&L->allow, &a, a - VD_LOG_GROW, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    /* the file's end moves only once the zeros are durable: a step cut
     * short by a full filesystem is written over by the next one */
    for (uint64_t done = 0; done < VD_LOG_GROW; done += ZEROS) {
        if (vd_pwrite_full(L->fd[w], zeros, ZEROS, end + done) < 0) {
            vd_log_allow(L, 0); /* until the engine finds room to spare again */
            return 0;
        }
    }
    if (fdatasync(L->fd[w]) < 0) {
        failed(L, -errno);
        return 0;
    }
    L->end[w] = end + VD_LOG_GROW;
    return 1;
}

void vd_log_keep_ahead(struct vd_log *L)
{
    if (grow_step(L, VD_LOG_GROW))
        L->st_grows_c++;
}

uint64_t vd_log_grow_ahead(struct vd_log *L, uint64_t ahead)
{
    uint64_t grown = 0;
    pthread_mutex_lock(&L->mu);
    while (grow_step(L, ahead))
        grown += VD_LOG_GROW;
    pthread_mutex_unlock(&L->mu);
    return grown;
}

long vd_log_append(struct vd_log *L, uint64_t vid, const uint64_t *blocks, const uint32_t *masks, uint32_t count,
                   const unsigned char *pages, uint64_t npages, uint64_t grow)
{
    if (!vd_log_usable(L) || !fits(L, count, npages, L->end[L->wgen & 1] + grow))
        return -EAGAIN;
    long rc = grow_file(L, grow);
    if (rc < 0)
        return rc;
    memcpy(L->buf + HDR, pages, npages * PG);
    uint64_t at;
    uint64_t size = vd_log_seal(L, vid, blocks, masks, count, npages, &at);
    return write_record(L, at, size);
}

long vd_log_write(struct vd_log *L, uint64_t at, uint64_t size)
{
    long rc = write_record(L, at, size);
    if (rc == 0)
        L->st_flushes_c++; /* counted apart: the flushes the fast path wrote */
    return rc;
}
