/* qos.h - per-volume I/O limits (token buckets for operations and bytes a
 * second) and counters, for the FUSE layer (csrc/fuse_fastpath.c and the
 * pyfuse3 handlers).  See qos.c.  Every function is thread-safe. */
#ifndef VDISK_QOS_H
#define VDISK_QOS_H
#include <stdint.h>

/* Limit volume vid to iops operations and bps bytes a second (0: no limit
 * of that kind) from now_ns on (vd_qos_now's clock); an operation counts
 * once per io_unit bytes or part of them (0: once).  Both 0 lifts the
 * limit.  The volume's counters stay.  0, or -ENOMEM. */
int vd_qos_set(uint64_t vid, uint64_t iops, uint64_t bps, uint32_t io_unit, uint64_t now_ns);
/* A request of len bytes to volume vid arrives at now_ns (vd_qos_now's
 * clock): counts it, takes its cost from the buckets and returns how many
 * nanoseconds it must wait before it is served (0: at once).  Requests
 * are paced in the order they arrive. */
uint64_t vd_qos_admit(uint64_t vid, int is_write, uint32_t len, uint64_t now_ns);
/* the request admitted at start_ns was answered at now_ns (its latency,
 * waiting included) */
void vd_qos_done(uint64_t vid, int is_write, uint64_t start_ns, uint64_t now_ns);
uint64_t vd_qos_now(void); /* CLOCK_MONOTONIC, ns */

/* The counters of a volume (0 if unknown, else 1): out[VD_QOS_NSTATS] */
#define VD_QOS_NSTATS 12
/* out: reads, writes, read bytes, write bytes, requests that waited, ns
 * waited in all, read latency ns in all, write latency ns in all, in
 * flight now, iops limit, bps limit, io unit; then VD_QOS_NBUCKETS read
 * and VD_QOS_NBUCKETS write latency histogram counts (bucket i: latency
 * < 2^i * 16 us, the last: the rest) */
#define VD_QOS_NBUCKETS 16
int vd_qos_stats(uint64_t vid, uint64_t *out, uint64_t *hist);
#endif
