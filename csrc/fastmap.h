/* fastmap.h - the engine's C fast path for block reads and writes
 * (see fastmap.c and docs/architecture.md, "The fast path").  Also the cffi
 * declarations of vdisk.engine._native: _build_native.py reads this file. */
#ifndef VDISK_FASTMAP_H
#define VDISK_FASTMAP_H
#include <stdint.h>
#include <stddef.h>

struct vd_fastmap;
struct vd_log; /* intentlog.h */

/* A copy-on-write over a whole block the head owns writes only the pages
 * written, in a slot of their own over it, until that slot would hold more
 * than this many pages: then the whole block is copied, which frees the
 * one below at the next commit (the engine's Python writes follow it).
 * Once committed, that pair (a backed entry) is written by flips: no copy. */
enum { VD_FM_COALESCE_PAGES = 8 };

/* The most blocks one request served here spans (2 MiB); a longer one goes
 * to the engine (which reads this too). */
enum { VD_FM_MAX_SPAN = 32 };

/* Created and driven by the engine (Python) */
struct vd_fastmap *vd_fm_new(int data_fd, int event_fd, uint32_t low_water);
void vd_fm_free(struct vd_fastmap *fm);
void vd_fm_lock(struct vd_fastmap *fm);
void vd_fm_unlock(struct vd_fastmap *fm);
/* everything below must be called with the lock held, except
 * vd_fm_read/vd_fm_write (the I/O threads), vd_fm_set_failed, vd_fm_stats,
 * vd_fm_reservoir and vd_fm_drain/vd_fm_reservoir_add/vd_fm_reservoir_take
 * (which take the inner mutex themselves), and the engine's calls that take
 * the lock themselves unless told it is held (locked): vd_fm_add_many,
 * vd_fm_discard, vd_fm_sync_volumes, vd_fm_freeze, vd_fm_commit_done and
 * vd_fm_commit_failed */
/* have: the pages slot holds (0xFFFF: all), the others read from slot base
 * if in bhave, else from slot base2 if in bhave2, else from slot base3 (0:
 * zeros); shared: the head reads the block as its last snapshot point
 * does (a copy-on-write writes only the pages written) */
/* unverified: a committed slot of the view has not been verified against
 * its checksum yet: before C reads from it (a read, a copy-on-write that
 * needs its bytes) it verifies it against the sum vd_fm_expect gave, or
 * returns -EAGAIN when it has none or the sum does not match; the engine
 * adding the mapping again verified clears the flag (vd_fm_add returns 1
 * when it added the entry) */
/* back, flip (vd_fm_set): a flipped block (the engine's overlay holds it
 * with a back slot): its pages not in have are in slot back, and those of
 * flip were flipped since its commit (written where they are from now on);
 * pflip: those flipped in the epoch of the commit in flight, which may not
 * flip again until it is durable.
 * back (vd_fm_add): the committed entry is backed with that back slot and
 * the head's own (no snapshot point sees it), so that a write to it may
 * flip its pages (0: not, or not known) */
int vd_fm_set(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot, int writable, uint16_t have,
              uint64_t base, uint16_t bhave, uint64_t base2, uint16_t bhave2, uint64_t base3, int unverified,
              uint64_t back, uint16_t flip, uint16_t pflip);
int vd_fm_add(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot, uint16_t have, uint64_t base,
              int shared, uint16_t bhave, uint64_t base2, uint16_t bhave2, uint64_t base3, int unverified,
              uint64_t back);
/* vd_fm_add for many blocks of vid in one hold of the lock, which it takes
 * (unless locked: the caller holds it): records of VD_FM_ADD_WORDS words
 * (block, slot, have, base, shared, bhave, base2, bhave2, base3, back,
 * nexp), each followed by nexp triples (slot, mask, crc) for vd_fm_expect
 * (the entry is unverified when nexp > 0); nwords in all.  Then, unless an
 * entry found no room, the nw windows from wfirst are known: the engine
 * taught every block of them the map or its overlay has (an unknown block
 * there reads as zeros, for the head and its snapshot points).  Returns
 * how many entries were added. */
/* A discard of n whole blocks of vid (those the engine found may hold
 * data), in one hold of the lock, which it takes (unless locked): each reads
 * as zeros from now on (as vd_fm_set makes slot 0, read only) and goes into
 * the drain as (vid, block, 0, 0xFFFF, 0, 0, 0), in order with the writes
 * around it, and into the volume's next record written here (vd_fm_fsync:
 * mask 0, the block reads as zeros; whole once written again).  0; -EAGAIN
 * (the volume is not served) or -ENOMEM, having changed nothing. */
int vd_fm_discard(struct vd_fastmap *fm, int locked, uint64_t vid, const uint64_t *blocks, size_t n);
enum { VD_FM_ADD_WORDS = 11 };
/* C knows a volume by windows of 1 << VD_FM_WINDOW_SHIFT blocks (16 MiB): in
 * a known one, a block the table does not hold reads as zeros (for the head
 * and its snapshot points), so reads and writes of it are served here.
 * Every window of a new volume is known, and those the engine taught whole
 * (vd_fm_add_many); forgetting a block (vd_fm_forget,
 * vd_fm_trim, vd_fm_clear, a new head) makes its window unknown. */
enum { VD_FM_WINDOW_SHIFT = 8 };
int vd_fm_add_many(struct vd_fastmap *fm, int locked, uint64_t vid, const uint64_t *recs, size_t nwords,
                   uint64_t wfirst, uint64_t nw);
/* which of n blocks from first the table does not know (bit i of out[i / 64]);
 * the engine's thread, without the lock */
void vd_fm_unknown(struct vd_fastmap *fm, uint64_t vid, uint64_t first, uint32_t n, uint64_t *out);
void vd_fm_forget(struct vd_fastmap *fm, uint64_t vid, uint64_t block);
/* Know nothing of each block of (vid, block, slot) triples (nwords words)
 * whose entry has that slot, in one hold of the lock, which it takes unless
 * locked: the blocks a commit found all zeros, whose slots it frees. */
void vd_fm_forget_slots(struct vd_fastmap *fm, int locked, const uint64_t *triples, size_t nwords);
/* The engine's holds of the lock at a commit: each call takes the lock
 * (unless locked: the caller holds it already), does all of it and lets go,
 * so that no Python runs while the engine holds it.
 *
 * vd_fm_sync_volumes: tell the table the volumes the engine serves, as n
 * records of VD_FM_VOL_WORDS words, (vid, head lineage, size, how): how
 * holds VD_FM_VOL_POINTS (the head has snapshot points), VD_FM_VOL_CLEAN
 * (a new head the engine holds no change of: clean, vd_fm_log_clean),
 * VD_FM_VOL_NEW (the head holds nothing at all: a block the table does not
 * know reads as zeros, until it forgets one), VD_FM_VOL_SHARE (a snapshot
 * was taken: the blocks known, but for those written since the freeze
 * that took it, are its too), VD_FM_VOL_UNSHARE (its last snapshot point
 * was deleted: nothing known is shared).  A volume whose lineage changed
 * starts empty (its old entries stay behind, unreachable, until a trim:
 * no pass over the table).  gone: the volumes no longer served (their
 * entries likewise).
 *
 * vd_fm_freeze: the overlay is frozen for a commit: the log L freezes
 * (vd_log_freeze(L, records); the generation the commit records in *gen),
 * a new epoch starts (no slot known so far is written in place, every
 * volume starts a new log epoch; a volume whose unlogged changes all came
 * from here stays clean, and its next record carries the blocks changed
 * before the freeze whole), state says what is in flight (1 a plain
 * commit, 2 one that changes structure: no flips at all meanwhile), and
 * the volumes of unclean are not clean (the engine says no to their log
 * flushes while it runs).  Returns how many of the drain's records were
 * waiting at that instant: the frozen epoch's, which the engine's next
 * drain takes first.
 *
 * vd_fm_commit_done: that commit is durable: the log retires to gen, the
 * blocks changed before the freeze need no record any more, the volumes
 * of clean are clean again, the volumes are told (ops, gone, as
 * vd_fm_sync_volumes), and blocks the commit made backed entries, the
 * head's own, may flip: backed holds, for each such volume, (vid, n) and
 * n triples (block, slot, back slot), each flipped only if its entry in C
 * is still that one; no commit is in flight any more.
 *
 * vd_fm_commit_failed: that commit failed: the log goes on in its
 * generation, no commit is in flight. */
enum { VD_FM_VOL_WORDS = 4 };
enum { VD_FM_VOL_POINTS = 1, VD_FM_VOL_CLEAN = 2, VD_FM_VOL_NEW = 4, VD_FM_VOL_SHARE = 8, VD_FM_VOL_UNSHARE = 16 };
void vd_fm_sync_volumes(struct vd_fastmap *fm, int locked, const uint64_t *ops, size_t n, const uint64_t *gone,
                        size_t ngone);
size_t vd_fm_freeze(struct vd_fastmap *fm, int locked, struct vd_log *L, int records, int state,
                    const uint64_t *unclean, size_t n, uint64_t *gen);
void vd_fm_commit_done(struct vd_fastmap *fm, int locked, struct vd_log *L, uint64_t gen, const uint64_t *clean,
                       size_t nclean, const uint64_t *ops, size_t nops, const uint64_t *gone, size_t ngone,
                       const uint64_t *backed, size_t nbacked);
void vd_fm_commit_failed(struct vd_fastmap *fm, int locked, struct vd_log *L);
void vd_fm_log_epoch(struct vd_fastmap *fm, uint64_t vid);
uint32_t vd_fm_mask(struct vd_fastmap *fm, uint64_t vid, uint64_t block);
/* Forget every cached mapping (with the lock held) */
void vd_fm_clear(struct vd_fastmap *fm);
size_t vd_fm_entries(struct vd_fastmap *fm);
/* The table of cached blocks takes at most VD_FM_MAX_CAP positions of 88
 * bytes (88 MiB), at most half of them used: a block it has no room for
 * is served by the engine.  Once it holds more than VD_FM_TRIM_AT entries
 * (three eighths of its positions, where it would otherwise grow) the
 * engine trims it at its next refill: vd_fm_trim forgets every entry not
 * set in this epoch (those written since the freeze stay: their pages are
 * the volumes' next log records'), and every entry of a head changed or
 * gone, and the engine teaches C again what requests need. */
enum { VD_FM_MAX_CAP = 1048576, VD_FM_TRIM_AT = 393216 };
/* The engine's thread, without the lock: a trim starts once the table
 * holds more than at entries (VD_FM_TRIM_AT; less in tests) and no growth
 * is under way, and looks at budget positions per call, a chunk per hold
 * of the inner mutex, so that the I/O threads go on (a clear under the
 * lock held them all for 60 ms), and the refill that calls it does not
 * keep the writers waiting for slots.  1 while a trim is under way (call
 * again), 0 once it is done, or when there was nothing to do. */
int vd_fm_trim(struct vd_fastmap *fm, size_t at, size_t budget);
/* grow the table ahead of need and move at most budget of the old table's
 * positions (the engine's thread, without the lock; called at each
 * refill): 1 grown or moved, 0 nothing to do, -ENOMEM */
int vd_fm_grow(struct vd_fastmap *fm, size_t budget);
/* records of 4 words: vid, block, slot, have (the pages the slot holds) */
size_t vd_fm_drain(struct vd_fastmap *fm, uint64_t *out, size_t max_records);
size_t vd_fm_reservoir(struct vd_fastmap *fm);
int vd_fm_reservoir_add(struct vd_fastmap *fm, const uint64_t *slots, size_t n);
size_t vd_fm_reservoir_take(struct vd_fastmap *fm, uint64_t *out, size_t max);
void vd_fm_set_failed(struct vd_fastmap *fm, int failed); /* 1: no writes, 2: nothing */

/* The intent log (intentlog.h) the fast path's fsync writes records to;
 * NULL: every fsync goes to the engine.  Set while no I/O thread runs. */
void vd_fm_set_log(struct vd_fastmap *fm, struct vd_log *L);
/* clean: the engine holds no change of its own to the volume since its
 * last log flush, so vd_fm_fsync may write the next one (map lock held) */
void vd_fm_log_clean(struct vd_fastmap *fm, uint64_t vid, int clean);
/* the drain's records (vd_fm_drain) are VD_FM_DRAIN_WORDS words each:
 * (vid, block, slot, have, back, flip, crc): back 0 for a new or fresh
 * slot, else a flipped block (vd_fm_set); crc, for a new partial slot
 * (have not every page) written here, VD_FM_CRC_KNOWN | its checksum (the
 * CRC-32C of the pages of have, as vd_checksum_slots computes it), which
 * holds until a record of the same block says otherwise (0: not known);
 * (vid, VD_FM_FLUSHED, 0, ...): the volume's changes drained before it
 * are in the log */
enum { VD_FM_DRAIN_WORDS = 7 };
#define VD_FM_CRC_KNOWN 0x100000000
#define VD_FM_FLUSHED 0xFFFFFFFFFFFFFFFF
/* VD_FM_STATS counters: reads, writes, handed back, copies on write,
 * verified; writes that waited for a refill, their total and longest wait
 * (ns); requests that found the map's lock taken (by the engine, or by an
 * fsync gathering its log record) and waited, their total and longest wait
 * (ns); the engine's holds of the lock
 * (vd_fm_lock), their total and longest (ns); block writes that flipped;
 * trims of the table (vd_fm_trim), the entries it holds, and the bytes
 * its positions take (both tables while it grows); the trims' holds of the
 * inner mutex (a chunk each), their total and longest (ns); passes over the
 * whole table with the map's lock held */
enum { VD_FM_STATS = 22 };
void vd_fm_stats(struct vd_fastmap *fm, uint64_t *out);
/* the checksum of a committed slot an unverified entry reads from (the
 * CRC-32C of the pages of mask, as vd_checksum_slots computes it): C
 * verifies the slot against it, once, before it reads from it */
void vd_fm_expect(struct vd_fastmap *fm, uint64_t slot, uint32_t crc, uint16_t mask);

/* The request side: called by the I/O threads (the FUSE fast path) without
 * the GIL.  Return the byte count, -EAGAIN when the engine in Python must
 * serve the request instead (nothing was changed then), or -errno. */
long vd_fm_read(void *fm, uint64_t vid, uint64_t offset, uint32_t len, void *buf);
long vd_fm_write(void *fm, uint64_t vid, uint64_t offset, uint32_t len, const void *buf);
/* vd_fm_write for the I/O threads: a write that finds the reservoir short
 * waits for the engine's refill (letting go of every lock meanwhile), a
 * second at a time and five times at most, instead of going to the engine
 * at once: the engine would have to refill first anyway, and serves the
 * write far slower.  Not for the engine's own thread (it refills). */
long vd_fm_write_io(void *fm, uint64_t vid, uint64_t offset, uint32_t len, const void *buf);
/* fsync of a volume: 0 once its writes so far are durable through the
 * intent log; -EAGAIN when the engine must flush instead (a volume that is
 * not clean, a commit in flight, a record too big for the room left, a log
 * write that failed).  Blocks on the log's fdatasync. */
long vd_fm_fsync(void *fm, uint64_t vid);
#endif
