/*
 * qos.c - per-volume I/O limits and counters.
 *
 * Each limited volume has two token buckets, one of operations and one of
 * bytes, filled at the limit's rate up to BURST_S seconds' worth.  A
 * request takes its cost from both at once, even when that leaves them in
 * debt, and waits until the debt is paid: debt / rate.  So requests are
 * paced in the order they arrive, a queue deeper than the limit allows
 * waits as on a disk at its limit (latency = queue depth / rate), and a
 * request never fails for being over the limit.  The wait is computed
 * here; the caller holds the request meanwhile (fuse_fastpath.c's delay
 * queue, or the pyfuse3 handler's trio.sleep) so that no thread sleeps
 * for one volume while another's requests wait behind it.
 *
 * The caller decides what the limits are (the cloud's formulas live in
 * vdisk.control.categories); this file knows buckets, not disks.
 *
 * Concurrency: one mutex covers the table; every call is short.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qos.h"

#define BURST_S 0.05 /* a bucket holds this many seconds of its rate */

struct bucket {
    double rate, tokens; /* per second; tokens may be negative (debt) */
};

struct qvol {
    uint64_t vid;
    uint32_t unit;
    uint64_t last_ns;
    struct bucket ops, bytes;
    uint64_t st[VD_QOS_NSTATS];
    uint64_t hist[2][VD_QOS_NBUCKETS];
};

/* the counters' places in st (qos.h, vd_qos_stats); the limits are the
 * buckets' rates, put in the answer there */
enum { S_READS, S_WRITES, S_RBYTES, S_WBYTES, S_WAITED, S_WAIT_NS, S_RLAT_NS, S_WLAT_NS, S_INFLIGHT, S_IOPS, S_BPS,
       S_UNIT };
_Static_assert(S_UNIT + 1 == VD_QOS_NSTATS, "qos.h lists every counter");

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct qvol *vols;
static size_t nvols, capvols;

uint64_t vd_qos_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct qvol *find(uint64_t vid)
{
    for (size_t i = 0; i < nvols; i++)
        if (vols[i].vid == vid)
            return &vols[i];
    return NULL;
}

static struct qvol *find_or_add(uint64_t vid)
{
    struct qvol *q = find(vid);
    if (q != NULL)
        return q;
    if (nvols == capvols) {
        size_t c = capvols ? capvols * 2 : 16;
        struct qvol *n = realloc(vols, c * sizeof(*n));
        if (n == NULL)
            return NULL;
        vols = n;
        capvols = c;
    }
    q = &vols[nvols++];
    memset(q, 0, sizeof(*q));
    q->vid = vid;
    return q;
}

/* fill both buckets for the time since the last request */
static void refill(struct qvol *q, uint64_t now)
{
    double dt = now > q->last_ns ? (double)(now - q->last_ns) / 1e9 : 0.0;
    q->last_ns = now;
    struct bucket *bs[2] = {&q->ops, &q->bytes};
    for (int i = 0; i < 2; i++) {
        struct bucket *b = bs[i];
        if (b->rate <= 0)
            continue;
        b->tokens += b->rate * dt;
        if (b->tokens > b->rate * BURST_S)
            b->tokens = b->rate * BURST_S;
    }
}

int vd_qos_set(uint64_t vid, uint64_t iops, uint64_t bps, uint32_t io_unit, uint64_t now_ns)
{
    pthread_mutex_lock(&mu);
    struct qvol *q = find_or_add(vid);
    if (q == NULL) {
        pthread_mutex_unlock(&mu);
        return -ENOMEM;
    }
    refill(q, now_ns); /* what the old rates earned so far */
    q->unit = io_unit;
    /* a bucket that had no limit starts full; a debt run up under the old
     * limit is paid at the new rate (a raised limit applies at once) */
    struct bucket *bs[2] = {&q->ops, &q->bytes};
    double rates[2] = {(double)iops, (double)bps};
    for (int i = 0; i < 2; i++) {
        double cap = rates[i] * BURST_S;
        if (bs[i]->rate <= 0 || bs[i]->tokens > cap)
            bs[i]->tokens = cap;
        bs[i]->rate = rates[i];
    }
    pthread_mutex_unlock(&mu);
    return 0;
}

static double wait_for(const struct bucket *b)
{
    return b->rate > 0 && b->tokens < 0 ? -b->tokens / b->rate : 0.0;
}

uint64_t vd_qos_admit(uint64_t vid, int is_write, uint32_t len, uint64_t now_ns)
{
    pthread_mutex_lock(&mu);
    struct qvol *q = find_or_add(vid);
    if (q == NULL) {
        pthread_mutex_unlock(&mu);
        return 0;
    }
    q->st[is_write ? S_WRITES : S_READS]++;
    q->st[is_write ? S_WBYTES : S_RBYTES] += len;
    q->st[S_INFLIGHT]++;
    uint64_t wait_ns = 0;
    if (q->ops.rate > 0 || q->bytes.rate > 0) {
        refill(q, now_ns);
        double ops = q->unit ? (double)((len + q->unit - 1) / q->unit) : 1.0;
        q->ops.tokens -= ops < 1 ? 1 : ops;
        q->bytes.tokens -= (double)len;
        double w = wait_for(&q->ops), wb = wait_for(&q->bytes);
        wait_ns = (uint64_t)((w > wb ? w : wb) * 1e9);
        if (wait_ns) {
            q->st[S_WAITED]++;
            q->st[S_WAIT_NS] += wait_ns;
        }
    }
    pthread_mutex_unlock(&mu);
    return wait_ns;
}

void vd_qos_done(uint64_t vid, int is_write, uint64_t start_ns, uint64_t now_ns)
{
    uint64_t lat = now_ns > start_ns ? now_ns - start_ns : 0;
    int b = 0;
    while (b < VD_QOS_NBUCKETS - 1 && lat >= (16000ull << b))
        b++;
    pthread_mutex_lock(&mu);
    struct qvol *q = find(vid);
    if (q != NULL) {
        if (q->st[S_INFLIGHT])
            q->st[S_INFLIGHT]--;
        q->st[is_write ? S_WLAT_NS : S_RLAT_NS] += lat;
        q->hist[is_write ? 1 : 0][b]++;
    }
    pthread_mutex_unlock(&mu);
}

int vd_qos_stats(uint64_t vid, uint64_t *out, uint64_t *hist)
{
    pthread_mutex_lock(&mu);
    struct qvol *q = find(vid);
    if (q != NULL) {
        memcpy(out, q->st, sizeof(q->st));
        out[S_IOPS] = (uint64_t)q->ops.rate;
        out[S_BPS] = (uint64_t)q->bytes.rate;
        out[S_UNIT] = q->unit;
        if (hist != NULL)
            memcpy(hist, q->hist, sizeof(q->hist));
    }
    pthread_mutex_unlock(&mu);
    return q != NULL;
}
