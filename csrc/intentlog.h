/* intentlog.h - the intent log's writer (see intentlog.c and docs/format.md,
 * "The intent log").  Also cffi declarations of vdisk.engine._native:
 * _build_native.py reads this file. */
#ifndef VDISK_INTENTLOG_H
#define VDISK_INTENTLOG_H
#include <stdint.h>
#include <stddef.h>

struct vd_log;

/* Created by the engine (vdisk.engine.intentlog) at open, for every pool:
 * fd0 and fd1 are the log files of even and of odd generations (the
 * engine's; not closed here), gen the generation the durable map names,
 * end0 and end1 how far each file is written (zeros at least).  A record
 * holds at most flush_max bytes of pages, and a file grows to at most max
 * bytes.  When either file holds anything, no record is written before the
 * first commit (which follows the replay of what they hold). */
struct vd_log *vd_log_new(int fd0, int fd1, uint64_t gen, uint64_t end0, uint64_t end1, uint64_t max,
                          uint64_t flush_max);
void vd_log_free(struct vd_log *L);

/* The writer's mutex: held by one log writer (the engine's log flush, or
 * vd_fm_fsync) from the gathering of its record to its fdatasync.  Taken
 * before the fast path's map lock. */
void vd_log_lock(struct vd_log *L);
void vd_log_unlock(struct vd_log *L);

/* Everything below with the mutex held, except vd_log_get and
 * vd_log_allow (any time: a snapshot of the counters; an atomic store) and
 * vd_log_freeze/vd_log_thaw/vd_log_retire, which the engine calls with the
 * fast path's map lock held (a log writer in C holds it while it reserves
 * its record's place). */

/* Append one record: count entries (blocks[i], masks[i]: the pages of
 * pages, in order, or 0 for a block that now reads as zeros), npages pages
 * at pages.  grow zero bytes are first appended at the file's end.  Then
 * fdatasync.  0, -EAGAIN when the record does not fit (too many entries or
 * pages, past max, past the file's end after growing) or the log is off,
 * with nothing written; -errno when a write or the fdatasync failed: the
 * log is off from then on (a half-written record is never replayed: its
 * CRC fails, or the next commit makes it obsolete). */
long vd_log_append(struct vd_log *L, uint64_t vid, const uint64_t *blocks, const uint32_t *masks, uint32_t count,
                   const unsigned char *pages, uint64_t npages, uint64_t grow);
/* A commit froze the writes so far: returns the generation its transaction
 * records (log_gen).  With records 1 (a commit that changes no volume's
 * existence, size or contents) and no record of the next generation yet,
 * records go on during the commit, in that generation, from the start of
 * the other file; otherwise none is written until the commit is durable
 * (vd_log_retire) or failed (vd_log_thaw). */
uint64_t vd_log_freeze(struct vd_log *L, int records);
/* The commit failed: records go on in the generation they were in. */
void vd_log_thaw(struct vd_log *L);
/* The commit that recorded gen is durable: the records before its freeze
 * are obsolete, and those after it are gen's. */
void vd_log_retire(struct vd_log *L, uint64_t gen);
/* The file being written grows in zero-filled steps of this size (C's own
 * growth, and the engine's for its records). */
enum { VD_LOG_GROW = 1 << 20 };
/* How many bytes C may grow the files by itself from now on
 * (vd_log_keep_ahead): the engine grants it when its filesystem has that
 * much to spare, and grants it again as C uses it.  Without the mutex
 * (an atomic store), so that the engine's thread never holds up a record. */
void vd_log_allow(struct vd_log *L, uint64_t bytes);
/* Grow the file being written, VD_LOG_GROW zero bytes at a time, each
 * step fdatasync()ed, while less than ahead bytes are written ahead of
 * the records, as far as the engine allows (vd_log_allow) and the log's
 * maximum permits; returns the bytes grown.  Takes the mutex itself: the
 * engine calls it from its thread, with the GIL let go, every 100 ms (the
 * daemon's feeder), so that most fsyncs find the room there.  A
 * filesystem too full for a step ends the allowance (the engine's flush
 * then decides: a commit instead); a failed fdatasync turns the log off,
 * as a failed record's write does. */
uint64_t vd_log_grow_ahead(struct vd_log *L, uint64_t ahead);
/* For the fast path, with the mutex held, before it gathers a record:
 * one step of vd_log_grow_ahead's when less than VD_LOG_GROW is left (the
 * engine's thread fell behind), counted (grows_in_c), so that an fsync
 * never waits for the engine's thread to grow the file. */
void vd_log_keep_ahead(struct vd_log *L);
void vd_log_set_max(struct vd_log *L, uint64_t max); /* tests make the log small */
void vd_log_fail_next(struct vd_log *L, int fail);   /* tests: the next record fails before its fdatasync */
/* The log files opened O_DIRECT too (-1: none), for records written with
 * RWF_DSYNC (the engine's; not closed here; mutex held or no writer yet) */
void vd_log_set_direct(struct vd_log *L, int dfd0, int dfd1);
/* gen, pos, seq, end (of wgen's file), ok, inflight, flushes, bytes,
 * flushes_in_c, max, wgen, flushes_during_commit (records written while a
 * commit was in flight, in the generation it moved to), allow (what C may
 * still grow the files by: vd_log_allow), grows_in_c (fsyncs that grew the
 * file themselves: vd_log_keep_ahead) */
enum { VD_LOG_STATE_WORDS = 14 };
void vd_log_get(struct vd_log *L, uint64_t *out);

/* For the fast path (fastmap.c), with the mutex held: whether it may write
 * now (1: the log works and no commit blocks it, see vd_log_freeze); whether a record of npages pages fits now
 * without growing the file (0, or -EAGAIN); the
 * buffer its pages go to (flush_max bytes); and, once they are there,
 * vd_log_seal fills the header in, reserves the record's place and
 * returns its size (*at: where it goes), vd_log_write writes it and
 * fdatasyncs (as vd_log_append). */
int vd_log_usable(struct vd_log *L);
int vd_log_room(struct vd_log *L, uint64_t npages);
unsigned char *vd_log_body(struct vd_log *L);
uint64_t vd_log_seal(struct vd_log *L, uint64_t vid, const uint64_t *blocks, const uint32_t *masks, uint32_t count,
                     uint64_t npages, uint64_t *at);
long vd_log_write(struct vd_log *L, uint64_t at, uint64_t size);
#endif
