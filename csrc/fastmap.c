/*
 * fastmap.c - the engine's fast path: block reads and writes in C.
 *
 * The engine (vdisk/engine/pool.py) owns the block map, the overlay of
 * uncommitted writes and the allocator.  This file keeps a *cache* of what
 * the engine would answer for (volume, block) right now, so that one I/O
 * thread can serve most reads and writes without Python:
 *
 *   entry (vid, block) -> slot   slot 0 means "reads as zeros"
 *                                writable when its epoch is the map's epoch:
 *                                the slot was allocated since the last freeze
 *                                (the overlay's "fresh") and may be written
 *                                in place
 *     have, b                    the pages the slot holds (0xFFFF: all); the
 *                                others as `struct below` b says: from slot
 *                                b.base (b.bhave's pages), b.base2 (the
 *                                others of b.bhave2) or b.base3 (0: zeros),
 *                                a partial or backed entry (docs/format.md):
 *                                at most four slots
 *     shared                     the head reads the block as its last
 *                                snapshot point does: a copy-on-write here
 *                                writes only the pages written, over the
 *                                entry (else it copies the pages of have)
 *     back, flip, pflip          a committed backed entry the head owns
 *                                (its back slot, as the engine said): a
 *                                write *flips* each page into the place of
 *                                slot and back that the durable map does
 *                                not use for it (docs/format.md, "Writing a
 *                                backed entry in place"); flip: the pages
 *                                flipped in this epoch (written where they
 *                                are now), pflip: in the one before, not
 *                                flipped again while its commit is in
 *                                flight
 *   reservoir                    free slots handed over by the engine; a
 *                                copy-on-write takes one
 *   log                          (vid, block, slot) of every block that got
 *                                a new slot here, or was written in place
 *                                for the first time since the volume's last
 *                                log flush; the engine drains it into its
 *                                overlay before it looks at the overlay
 *   page mask (per entry)        the 4 KiB pages of the block written here
 *                                since the volume's last log flush (valid
 *                                while the entry's lepoch is the volume's):
 *                                a log flush (Pool.log_flush) writes only
 *                                those pages to the intent log
 *
 * Anything this file cannot answer from the cache (an unknown block, a
 * request past the end, an empty reservoir, a failed pool) returns -EAGAIN
 * and changes nothing: the caller hands the request to the engine.
 *
 * Concurrency contract: the engine takes the map's lock (vd_fm_lock, a
 * writer-preferring rwlock held for writing) around every operation that
 * reads or changes the overlay, and only then calls the vd_fm_* mutators,
 * or calls one that takes the lock itself for all it does (a commit's
 * freeze and end, telling the volumes, teaching blocks: "the engine's
 * holds" below);
 * vd_fm_read/vd_fm_write hold it for reading for the whole request, I/O
 * included.  So an engine operation and a fast request never overlap, a
 * slot is never reused while a fast request may still touch it, and a
 * freeze (vd_fm_freeze) falls between two fast requests.  Several I/O
 * threads may call vd_fm_read/vd_fm_write at once: an inner mutex covers
 * the table, the reservoir, the log and the verification buffer, and every
 * request lets go of it for its data I/O.  Reads and writes only in place
 * change the table (if at all) before; the other writes (new slots, pages
 * filled from below) after, as *flights*: until one landed, the table shows
 * its blocks as they were, and no other write plans them (vd_fm_write).
 * vd_fm_read and vd_fm_write may block on pread/pwrite of the data file
 * (the page cache, normally), but never while holding the inner mutex,
 * except verification reads and the rare write beyond MAX_FLIGHTS.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blockops.h"
#include "fastmap.h"
#include "intentlog.h"
#include "logrecord.h"

#define BS (64 * 1024)
#define MAX_SPAN VD_FM_MAX_SPAN
#define MAX_CAP VD_FM_MAX_CAP /* the table's positions, at most (fastmap.h) */
#define MAX_ENTRIES (MAX_CAP / 2) /* the table is at most half full */
#define LOG_REC VD_FM_DRAIN_WORDS /* the drain's records (fastmap.h) */

/* Where the pages an entry's slot does not hold read from: those of bhave
 * from slot base, the others of bhave2 from slot base2, the rest from slot
 * base3 (0: zeros).  bhave is FULL for a view of two slots (a partial entry
 * over a whole block), bhave2 FULL for a view of three (a partial entry
 * over the last snapshot point's partial entry); a view of four is a
 * partial entry over the point's view of three. */
struct below {
    uint64_t base, base2, base3;
    uint16_t bhave, bhave2;
};
static const struct below ZEROS = {0, 0, 0, 0xFFFF, 0xFFFF};

struct ent {
    uint64_t vid, block, slot;
    struct below b;  /* the pages not in have (have FULL: unused) */
    uint32_t epoch;  /* == fm->epoch: writable in place; 0: read-only */
    uint32_t lepoch; /* == the volume's lepoch: mask is valid */
    uint32_t sepoch; /* fm->epoch when the entry was last set */
    uint16_t mask;   /* pages written since the volume's last log flush */
    uint16_t have;   /* pages the slot holds */
    uint16_t flip;   /* back: pages flipped in the entry's epoch (now in place) */
    /* back: pages flipped in the epoch before, kept when the entry flips
     * in this one while that epoch's commit is in flight: both places of
     * each are in use then (the durable map's and the commit's) */
    uint16_t pflip;
    uint8_t shared;  /* the view is the last snapshot point's: copy only what is written */
    /* a slot of the view that this engine has not verified against its
     * checksum since the pool was opened (one taught ahead of reads,
     * vd_fm_add): nothing is read from it here, neither for a read nor to
     * fill a copy-on-write; writes that need none of its bytes go on */
    uint8_t unverified;
    uint8_t used; /* 0 free, 1 an entry, MOVED (in otab only): moved to tab */
    /* the engine was told the slot's checksum (the drain's crc word): the
     * next write into the slot in place tells it that it no longer holds */
    uint8_t crc_live;
    /* the head's own back slot (0: none known): the committed entry is a
     * backed one (docs/format.md) that no snapshot point sees, with the
     * pages not in have in this slot, so that a write here goes into the
     * page position of slot or back that the durable map does not use
     * (a flip) instead of a copy-on-write.  Set by the engine only (at
     * the commit that made the entry backed, or teaching it), never while
     * a structural change is in flight; cleared when sharing is unsure */
    uint64_t back;
};
#define MOVED 2
_Static_assert(sizeof(struct ent) == 88, "an entry stays 88 bytes (crc_live takes padding)");
#define FULL 0xFFFF

/* blocks a volume's log flush in C can hold: a record's entries
 * (logrecord.h); a volume with more goes to the engine */
#define CHG_MAX VD_LOG_MAX_ENTRIES
#define PRE_FREEZE (1ULL << 63) /* in chg: a block changed before the last freeze */

struct vol {
    uint64_t vid, lid, size;
    /* what the table's entries of this head carry as their volume (ent.vid):
     * the vid for the volume's first head, then the vid with a new
     * incarnation above KEY_SHIFT for each new head, so that a head's change
     * or the volume's end leaves its entries behind unreachable (stale)
     * without a pass over the table; trims remove them */
    uint64_t key;
    int has_points;
    uint32_t lepoch; /* bumped at each log flush of the volume, and at a freeze */
    /* clean: the engine holds no change of its own to this volume since its
     * last log flush or freeze (every changed block is in chg, with its
     * pages in the table's mask), so a log flush may be done here */
    int clean;
    /* known: a bit per window of 1 << VD_FM_WINDOW_SHIFT blocks, set when
     * the table holds every block of the window that the map has an entry
     * for (in the volume's lineage or one it was made from, at any
     * generation) or the engine's overlay holds: an unknown block of such a
     * window reads as zeros, the same for the head and its snapshot points.
     * Every window of a new volume, and those the engine taught whole
     * (vd_fm_add_many); forgetting a block clears its window's bit.  nwin:
     * how many windows the bits cover (0: no memory for them, none known). */
    uint64_t *known;
    uint64_t nwin;
    uint32_t nchg; /* CHG_MAX + 1: overflowed */
    /* how many blocks of chg (marked PRE_FREEZE) were changed before the
     * last freeze and are in no record: the volume's next record carries
     * them whole, as the head reads them then, so that a crash before that
     * commit is durable loses none (new_epoch; the engine's
     * _unlogged_frozen) */
    uint32_t nfrozen;
    /* entries set before this epoch are shared with the volume's last
     * snapshot point, whatever their flag says (vd_fm_share) */
    uint32_t share_epoch;
    uint64_t chg[CHG_MAX]; /* blocks reported in this log epoch (may repeat) */
};

/* A committed slot's checksum, which C verifies the slot against before it
 * reads from it for an unverified entry (vd_fm_expect): the CRC-32C of the
 * pages of mask, as the commit computed it (vd_checksum_slots).  A table of
 * fixed size that starts over when it is three quarters full: a slot it
 * does not know is left to the engine. */
#define EXP_CAP (1u << 18) /* 262144 slots, 4 MiB */
enum { EXP_EMPTY, EXP_EXPECTED, EXP_VERIFIED, EXP_BAD };
struct expect {
    uint64_t slot;
    uint32_t crc;
    uint16_t mask;
    uint8_t state;
};

/* A write whose data I/O runs without the inner mutex: its blocks, which no
 * other write plans until it landed (see vd_fm_write). */
#define MAX_FLIGHTS 32
struct flight {
    uint64_t vid, first;
    size_t nb;
    int used;
};

/* how many times something waited (or held a lock), and the total and
 * longest of those spans (ns); read by vd_fm_stats without the writer's
 * lock, hence the atomic stores */
struct spans {
    uint64_t n, ns, max_ns;
};

static void spans_add(struct spans *s, uint64_t ns)
{
    __atomic_store_n(&s->n, s->n + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->ns, s->ns + ns, __ATOMIC_RELAXED);
    if (ns > s->max_ns)
        __atomic_store_n(&s->max_ns, ns, __ATOMIC_RELAXED);
}

static void spans_get(struct spans *s, uint64_t *out3)
{
    out3[0] = __atomic_load_n(&s->n, __ATOMIC_RELAXED);
    out3[1] = __atomic_load_n(&s->ns, __ATOMIC_RELAXED);
    out3[2] = __atomic_load_n(&s->max_ns, __ATOMIC_RELAXED);
}

struct vd_fastmap {
    pthread_rwlock_t lock;
    pthread_mutex_t io; /* one request plans (or changes the table) at a time */
    /* requests writing their data without the inner mutex (flights), and
     * the signal that one landed; see vd_fm_write */
    pthread_cond_t landed;
    /* refills: how many times the engine added slots to the reservoir (its
     * signal: refilled), which an I/O thread that ran dry waits for */
    pthread_cond_t refilled;
    uint64_t refills;
    struct flight fl[MAX_FLIGHTS];
    size_t pending_new; /* entries the flights will add */
    int data_fd, event_fd;
    uint32_t low_water;
    int signalled;
    uint32_t epoch, lepoch; /* lepoch: the last log epoch handed out */
    /* the epoch a commit in flight makes durable (0: none), and whether
     * that commit changes structure (a snapshot, say): then nothing flips,
     * since what the head owns may change with it (commit_state) */
    uint32_t inflight;
    int hold;
    struct ent *tab;
    size_t cap, n; /* n: entries in tab and otab */
    /* while the table grows: the old table, whose entries move to tab a
     * chunk at a time (vd_fm_grow) or when looked up, and the next of its
     * positions to move (see "The table" below) */
    struct ent *otab;
    size_t ocap, opos;
    /* while the table is trimmed (vd_fm_trim): the position below the
     * last one looked at (0: no trim under way) */
    size_t trim_pos;
    struct vol *vols;
    size_t nvols, capvols;
    uint64_t *res;
    size_t nres, capres;
    uint64_t *log;
    size_t loghead, nlog, caplog; /* in records of LOG_REC words: [loghead, nlog) not drained yet */
    volatile int failed;
    uint64_t st_reads, st_writes, st_again, st_cow, st_verified, st_flips, st_trims;
    /* passes over the whole table with the map's lock held (a growth with
     * nobody growing it ahead, a last snapshot point's deletion, a clear) */
    uint64_t st_scans;
    uint64_t incarnations; /* the last head incarnation handed out (struct vol.key) */
    /* writes that found the reservoir dry and waited for a refill: how
     * many, and their waits' total and longest (ns; under the inner mutex) */
    struct spans dry;
    /* the engine's holds of the map's lock (vd_fm_lock; written by the
     * holder), and when this one began */
    struct spans held;
    /* the trims' holds of the inner mutex, a chunk each (vd_fm_trim) */
    struct spans trim_hold;
    uint64_t held_since;
    /* requests that found the map's lock taken (by the engine, or by an
     * fsync in C gathering its record) and waited for it (under the inner
     * mutex) */
    struct spans blocked;
    unsigned char *scratch;
    struct expect *exp; /* checksums C may verify slots against (vd_fm_expect) */
    size_t nexp;
    struct vd_log *lg; /* the intent log (intentlog.c), or NULL: every fsync goes to the engine */
};

static inline uint64_t mix(uint64_t vid, uint64_t block)
{
    uint64_t z = block * 0x9E3779B97F4A7C15ull ^ (vid + 0x632BE59BD9B4E5ull) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
    return z ^ (z >> 29);
}

struct vd_fastmap *vd_fm_new(int data_fd, int event_fd, uint32_t low_water)
{
    struct vd_fastmap *fm = calloc(1, sizeof(*fm));
    if (fm == NULL)
        return NULL;
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&fm->lock, &a);
    pthread_rwlockattr_destroy(&a);
    pthread_mutex_init(&fm->io, NULL);
    pthread_cond_init(&fm->landed, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&fm->refilled, &ca);
    pthread_condattr_destroy(&ca);
    fm->data_fd = data_fd;
    fm->event_fd = event_fd;
    fm->low_water = low_water;
    fm->epoch = 1;
    fm->lepoch = 1;
    fm->cap = 1 << 16; /* 3 MiB: the first few hundred MiB written need no growth */
    fm->tab = calloc(fm->cap, sizeof(struct ent));
    fm->scratch = aligned_alloc(4096, BS);
    fm->exp = calloc(EXP_CAP, sizeof(struct expect));
    if (fm->tab == NULL || fm->scratch == NULL || fm->exp == NULL) {
        vd_fm_free(fm);
        return NULL;
    }
    return fm;
}

void vd_fm_free(struct vd_fastmap *fm)
{
    if (fm == NULL)
        return;
    free(fm->tab);
    free(fm->otab);
    for (size_t i = 0; i < fm->nvols; i++)
        free(fm->vols[i].known);
    free(fm->vols);
    free(fm->res);
    free(fm->log);
    free(fm->scratch);
    free(fm->exp);
    pthread_rwlock_destroy(&fm->lock);
    pthread_mutex_destroy(&fm->io);
    pthread_cond_destroy(&fm->landed);
    pthread_cond_destroy(&fm->refilled);
    free(fm);
}

static uint64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void vd_fm_lock(struct vd_fastmap *fm)
{
    pthread_rwlock_wrlock(&fm->lock);
    fm->held_since = mono_ns();
}

void vd_fm_unlock(struct vd_fastmap *fm)
{
    spans_add(&fm->held, mono_ns() - fm->held_since);
    pthread_rwlock_unlock(&fm->lock);
}

/* The engine's calls that take the lock themselves (locked: the engine
 * holds it already, vd_fm_lock), so that none of its Python runs while it
 * is held: see "the engine's holds" below. */
static void take(struct vd_fastmap *fm, int locked)
{
    if (!locked)
        vd_fm_lock(fm);
}

static void give(struct vd_fastmap *fm, int locked)
{
    if (!locked)
        vd_fm_unlock(fm);
}

/* ------------------------------------------------------------ the table
 *
 * Open addressing with linear probing, at most half full.  It grows
 * without stopping the I/O threads for longer than a chunk: vd_fm_grow
 * swaps in a table twice the size and keeps the old one as otab; the old
 * entries move over GROW_CHUNK positions per hold of the inner mutex, and
 * any entry looked up before its turn moves at once.  An entry lives in
 * exactly one of the two tables, and lookup() always returns it in tab,
 * so that every other function knows only tab.  A moved entry leaves a
 * MOVED mark in otab, which keeps the probe chains of those after it
 * whole (nothing is inserted into or deleted from otab; find_old skips
 * the run of marks the chunks leave).  Passes over the whole table (a
 * rebuild for a growth nobody did ahead, a clear, an unshare: under the
 * map's lock) first finish the move. */

#define GROW_CHUNK 4096     /* old positions moved per hold of the inner mutex */

/* A volume's key (struct vol.key): its vid below KEY_SHIFT bits, the head's
 * incarnation above; a volume whose vid does not fit is not served here. */
#define KEY_SHIFT 40
#define VID_MASK ((1ULL << KEY_SHIFT) - 1)

static struct vol *find_vol(struct vd_fastmap *fm, uint64_t vid);

/* the key the table knows vid's current head by (v: vid's volume, NULL
 * when it is not served): the vid itself for its first head (and an
 * unserved vid), the vid with an incarnation above KEY_SHIFT after a head
 * change */
static inline uint64_t vol_key(const struct vol *v, uint64_t vid) { return v != NULL ? v->key : vid; }

static inline uint64_t key_of(struct vd_fastmap *fm, uint64_t vid) { return vol_key(find_vol(fm, vid), vid); }

/* the volume whose current head an entry's key is, or NULL: a stale entry,
 * of a head changed or a volume gone */
static inline struct vol *vol_of_key(struct vd_fastmap *fm, uint64_t key)
{
    struct vol *v = find_vol(fm, key & VID_MASK);
    return v != NULL && v->key == key ? v : NULL;
}

static struct ent *find(struct ent *tab, size_t cap, uint64_t vid, uint64_t block)
{
    size_t mask = cap - 1, i = mix(vid, block) & mask;
    for (;;) {
        struct ent *e = &tab[i];
        if (!e->used)
            return NULL;
        if (e->vid == vid && e->block == block)
            return e;
        i = (i + 1) & mask;
    }
}

static struct ent *place(struct ent *tab, size_t cap, const struct ent *src)
{
    size_t mask = cap - 1, i = mix(src->vid, src->block) & mask;
    while (tab[i].used)
        i = (i + 1) & mask;
    tab[i] = *src;
    return &tab[i];
}

/* Move the old table's entries at positions [opos, opos + budget) to tab;
 * frees it once all moved.  1 when none is left. */
static int move_old(struct vd_fastmap *fm, size_t budget)
{
    if (fm->otab == NULL)
        return 1;
    size_t end = fm->ocap - fm->opos < budget ? fm->ocap : fm->opos + budget;
    for (; fm->opos < end; fm->opos++) {
        struct ent *o = &fm->otab[fm->opos];
        if (o->used == 1)
            place(fm->tab, fm->cap, o);
        o->used = MOVED;
    }
    if (fm->opos < fm->ocap)
        return 0;
    free(fm->otab);
    fm->otab = NULL;
    fm->ocap = fm->opos = 0;
    return 1;
}

static void finish_growth(struct vd_fastmap *fm) { move_old(fm, SIZE_MAX); }

/* find() in the old table.  Its positions [0, opos) hold only MOVED marks,
 * which neither match nor end a probe chain, so the probe skips them: from
 * the key's home to opos at once, and past the end back to opos.  That is
 * both the speed (a miss does not walk the moved part) and the end (once
 * the unmoved part is full, a chain has no free position left: the probe
 * stops when it comes back to where it started). */
static struct ent *find_old(struct vd_fastmap *fm, uint64_t vid, uint64_t block)
{
    size_t start = mix(vid, block) & (fm->ocap - 1), i;
    if (start < fm->opos)
        start = fm->opos;
    if (start >= fm->ocap)
        return NULL;
    i = start;
    do {
        struct ent *e = &fm->otab[i];
        if (!e->used)
            return NULL;
        if (e->used == 1 && e->vid == vid && e->block == block)
            return e;
        if (++i == fm->ocap)
            i = fm->opos;
    } while (i != start);
    return NULL;
}

static struct ent *lookup_key(struct vd_fastmap *fm, uint64_t key, uint64_t block)
{
    struct ent *e = find(fm->tab, fm->cap, key, block);
    if (e != NULL || fm->otab == NULL)
        return e;
    struct ent *o = find_old(fm, key, block);
    if (o == NULL)
        return NULL;
    e = place(fm->tab, fm->cap, o); /* its turn, now */
    o->used = MOVED;
    return e;
}

/* the entry of (vid, block) of vid's current head, or NULL */
static inline struct ent *lookup(struct vd_fastmap *fm, uint64_t vid, uint64_t block)
{
    return lookup_key(fm, key_of(fm, vid), block);
}

/* rebuild into a table of cap entries (a growth nobody did ahead) */
static int rebuild(struct vd_fastmap *fm, size_t cap)
{
    finish_growth(fm);
    struct ent *tab = calloc(cap, sizeof(struct ent));
    if (tab == NULL)
        return -ENOMEM;
    __atomic_add_fetch(&fm->st_scans, 1, __ATOMIC_RELAXED);
    size_t n = 0;
    for (size_t i = 0; i < fm->cap; i++) {
        struct ent *e = &fm->tab[i];
        if (e->used) {
            place(tab, cap, e);
            n++;
        }
    }
    free(fm->tab);
    fm->tab = tab;
    fm->cap = cap;
    fm->n = n;
    return 0;
}

/* What an entry keeps of below: nothing for a whole slot, no base2 when
 * base holds every page the slot lacks (one form per view, so that views
 * compare equal). */
static inline struct below view_below(uint16_t have, struct below b)
{
    if (have == FULL)
        return ZEROS;
    if (b.bhave == FULL)
        b.base2 = 0;
    if ((uint16_t)(b.bhave | b.bhave2) == FULL) { /* base2 (or base) holds the rest */
        b.bhave2 = FULL;
        b.base3 = 0;
    }
    return b;
}

static inline int same_below(struct below a, struct below b)
{
    return a.base == b.base && a.base2 == b.base2 && a.base3 == b.base3 && a.bhave == b.bhave && a.bhave2 == b.bhave2;
}

/* Insert or update; 0 on success, -ENOSPC when the table is at its limit.
 * bits: pages just written (the mask starts over in a new log epoch). */
static int put(struct vd_fastmap *fm, uint64_t key, uint64_t block, uint64_t slot, uint32_t epoch,
               uint32_t lepoch, uint16_t bits, uint16_t have, struct below b, int shared, int unverified,
               uint64_t back, uint16_t flip, uint16_t pflip)
{
    if (have == FULL && epoch == fm->epoch)
        unverified = 0; /* a fresh whole slot: written here, nothing below it */
    b = view_below(have, b);
    struct ent *e = lookup_key(fm, key, block);
    if (e != NULL) {
        if (e->lepoch != lepoch)
            e->mask = 0;
        e->slot = slot;
        e->epoch = epoch;
        e->lepoch = lepoch;
        e->mask |= bits;
        e->have = have;
        e->b = b;
        e->shared = (uint8_t)shared;
        e->unverified = (uint8_t)unverified;
        e->sepoch = fm->epoch;
        e->back = back;
        e->flip = flip;
        e->pflip = pflip;
        e->crc_live = 0;
        return 0;
    }
    if (fm->n >= MAX_ENTRIES)
        return -ENOSPC;
    if ((fm->n + 1) * 2 > fm->cap && rebuild(fm, fm->cap * 2) < 0)
        return -ENOMEM;
    struct ent ne = {.vid = key, .block = block, .slot = slot, .b = b, .epoch = epoch,
                     .lepoch = lepoch, .mask = bits, .sepoch = fm->epoch, .have = have, .shared = (uint8_t)shared,
                     .unverified = (uint8_t)unverified, .used = 1, .back = back, .flip = flip,
                     .pflip = pflip};
    place(fm->tab, fm->cap, &ne);
    fm->n++;
    return 0;
}

static void del(struct vd_fastmap *fm, struct ent *e)
{
    /* backward-shift deletion keeps every probe chain unbroken */
    size_t mask = fm->cap - 1, i = (size_t)(e - fm->tab), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!fm->tab[j].used)
            break;
        size_t k = mix(fm->tab[j].vid, fm->tab[j].block) & mask;
        int move = (j > i) ? (k <= i || k > j) : (k <= i && k > j);
        if (move) {
            fm->tab[i] = fm->tab[j];
            i = j;
        }
    }
    fm->tab[i].used = 0;
    fm->n--;
}

static struct vol *find_vol(struct vd_fastmap *fm, uint64_t vid)
{
    for (size_t i = 0; i < fm->nvols; i++)
        if (fm->vols[i].vid == vid)
            return &fm->vols[i];
    return NULL;
}

/* ------------------------------------------------------------ known windows */

static inline int window_known(const struct vol *v, uint64_t block)
{
    uint64_t w = block >> VD_FM_WINDOW_SHIFT;
    return w < v->nwin && (v->known[w >> 6] >> (w & 63) & 1);
}

/* windows [first, first + n) known (clipped to the volume's) */
static void know_windows(struct vol *v, uint64_t first, uint64_t n)
{
    for (uint64_t w = first; w < first + n && w < v->nwin; w++)
        v->known[w >> 6] |= 1ULL << (w & 63);
}

/* the table no longer knows a block of v: its window's unknown blocks are
 * no longer zeros */
static inline void unknow_window(struct vol *v, uint64_t block)
{
    uint64_t w = block >> VD_FM_WINDOW_SHIFT;
    if (w < v->nwin)
        v->known[w >> 6] &= ~(1ULL << (w & 63));
}

static void unknow_all(struct vol *v)
{
    if (v->nwin)
        memset(v->known, 0, ((v->nwin + 63) >> 6) * sizeof(uint64_t));
}

/* The bits for a volume of size bytes; a growth's new windows are not
 * known (a write of the engine's may have landed there before C was told
 * of the new size, and the engine teaches them at the first request).
 * No memory: none known. */
static void size_windows(struct vol *v, uint64_t size)
{
    uint64_t nwin = ((size + BS - 1) / BS + (1ULL << VD_FM_WINDOW_SHIFT) - 1) >> VD_FM_WINDOW_SHIFT;
    if (nwin <= v->nwin)
        return;
    size_t old_words = (v->nwin + 63) >> 6, words = (nwin + 63) >> 6;
    uint64_t *k = realloc(v->known, words * sizeof(uint64_t));
    if (k == NULL) {
        unknow_all(v);
        return;
    }
    memset(k + old_words, 0, (words - old_words) * sizeof(uint64_t));
    v->known = k;
    v->nwin = nwin;
}

/* ------------------------------------------------------------ engine side */

/* A key for vid's new head.  At the (unreachable in practice) wrap the
 * table starts over and every volume takes a new key, so that no key
 * handed out before can match again. */
static uint64_t new_key(struct vd_fastmap *fm, uint64_t vid)
{
    if (++fm->incarnations >> (64 - KEY_SHIFT)) {
        vd_fm_clear(fm);
        fm->incarnations = 0;
        for (size_t i = 0; i < fm->nvols; i++)
            fm->vols[i].key = fm->vols[i].vid | ++fm->incarnations << KEY_SHIFT;
        ++fm->incarnations;
    }
    return vid | fm->incarnations << KEY_SHIFT;
}

static void set_volume(struct vd_fastmap *fm, uint64_t vid, uint64_t lid, uint64_t size, int has_points)
{
    if (vid > VID_MASK)
        return; /* not served here */
    struct vol *v = find_vol(fm, vid);
    if (v != NULL && v->lid != lid) {
        /* new contents: the old ones are left behind, unreachable */
        v->key = new_key(fm, vid);
        v->clean = 0;
        v->nchg = 0;
        v->nfrozen = 0;
        unknow_all(v);
    }
    if (v == NULL) {
        if (fm->nvols == fm->capvols) {
            size_t c = fm->capvols ? fm->capvols * 2 : 16;
            struct vol *nv = realloc(fm->vols, c * sizeof(*nv));
            if (nv == NULL)
                return; /* unknown volumes are simply not served here */
            fm->vols = nv;
            fm->capvols = c;
        }
        v = &fm->vols[fm->nvols++];
        v->vid = vid;
        /* its first head: the vid itself, the key anything the engine told
         * of the vid before had (no head change since) */
        v->key = vid;
        v->lepoch = fm->lepoch;
        v->clean = 0; /* until the engine says it holds nothing of its own */
        v->known = NULL; /* none known until the engine says the volume is new */
        v->nwin = 0;
        v->share_epoch = 0;
        v->nchg = 0;
        v->nfrozen = 0;
    }
    v->lid = lid;
    v->size = size;
    v->has_points = has_points;
    size_windows(v, size);
}

static void drop_volume(struct vd_fastmap *fm, uint64_t vid)
{
    struct vol *v = find_vol(fm, vid);
    if (v == NULL)
        return;
    free(v->known);
    *v = fm->vols[--fm->nvols]; /* its entries are stale from now on */
}

/* The overlay now maps (vid, block) to slot (0: zeros).  writable: 0 read
 * only; 1 a fresh slot the engine knows is changed since the volume's log
 * flush; 2 a fresh slot whose next write here must be reported (the log
 * flush has it already).  If the table is full the entry is forgotten
 * instead: never left stale. */
int vd_fm_set(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot, int writable, uint16_t have,
              uint64_t base, uint16_t bhave, uint64_t base2, uint16_t bhave2, uint64_t base3, int unverified,
              uint64_t back, uint16_t flip, uint16_t pflip)
{
    struct vol *v = find_vol(fm, vid);
    if (back && (!slot || v == NULL || fm->hold)) {
        /* a flipped block C may not flip now: the engine serves it */
        vd_fm_forget(fm, vid, block);
        return 0;
    }
    if (!back)
        flip = 0;
    /* a flipped block is in this epoch (its flips in place), never written
     * in place as a fresh slot is */
    int w = (writable || flip) && slot && v != NULL;
    struct below b = back ? (struct below){back, 0, 0, FULL, FULL} : (struct below){base, base2, base3, bhave, bhave2};
    int rc = put(fm, vol_key(v, vid), block, slot, w ? fm->epoch : 0, (w && writable == 1) ? v->lepoch : 0, 0,
                 slot ? have : FULL, b, 0, slot && unverified, back, flip, back ? pflip : 0);
    if (rc < 0)
        vd_fm_forget(fm, vid, block);
    return rc;
}

/* A mapping the engine looked up (read-only); kept only if nothing newer is
 * known and there is room.  unverified: a slot of the view has not been
 * verified yet (the engine taught it ahead of any read); the same mapping
 * added again verified clears that.  1 when the entry was added. */
int vd_fm_add(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot, uint16_t have, uint64_t base,
              int shared, uint16_t bhave, uint64_t base2, uint16_t bhave2, uint64_t base3, int unverified,
              uint64_t back)
{
    uint64_t key = key_of(fm, vid);
    struct ent *e = lookup_key(fm, key, block);
    uint16_t h = slot ? have : FULL;
    struct below b = view_below(h, (struct below){base, base2, base3, bhave, bhave2});
    if (e != NULL) {
        if (!unverified && e->epoch != fm->epoch && e->slot == slot && e->have == h && same_below(e->b, b))
            e->unverified = 0; /* the same read-only mapping, verified by the engine */
        return 0;
    }
    if (shared || fm->hold || !slot || h == FULL || b.base != back || (uint16_t)(h | b.bhave) != FULL)
        back = 0;
    int rc = put(fm, key, block, slot, 0, 0, 0, h, b, shared, slot && unverified, back, 0, 0);
    return rc < 0 ? rc : 1;
}

int vd_fm_add_many(struct vd_fastmap *fm, int locked, uint64_t vid, const uint64_t *recs, size_t nwords,
                   uint64_t wfirst, uint64_t nw)
{
    int added = 0, failed = 0;
    take(fm, locked);
    for (size_t i = 0; i + VD_FM_ADD_WORDS <= nwords;) {
        const uint64_t *r = recs + i;
        uint64_t nexp = r[10];
        if (nexp > (nwords - i - VD_FM_ADD_WORDS) / 3) {
            failed = 1; /* malformed: the engine's bug; add nothing more, know no window */
            break;
        }
        for (uint64_t j = 0; j < nexp; j++) {
            const uint64_t *x = r + VD_FM_ADD_WORDS + 3 * j;
            vd_fm_expect(fm, x[0], (uint32_t)x[2], (uint16_t)x[1]);
        }
        int rc = vd_fm_add(fm, vid, r[0], r[1], (uint16_t)r[2], r[3], (int)r[4], (uint16_t)r[5], r[6],
                           (uint16_t)r[7], r[8], nexp > 0, r[9]);
        if (rc > 0)
            added++;
        failed |= rc < 0;
        i += VD_FM_ADD_WORDS + 3 * nexp;
    }
    struct vol *v = find_vol(fm, vid);
    if (v != NULL && nw > 0 && !failed) /* every block of them that is not zeros is known now */
        know_windows(v, wfirst, nw);
    give(fm, locked);
    return added;
}

/* Room in the drain for n more records (with the inner mutex held): the
 * records not drained yet moved down over those drained, else the buffer
 * doubled.  0, or -ENOMEM with nothing changed but that move.  log_block
 * asks for one; vd_fm_discard for a batch before it changes anything. */
static int log_room(struct vd_fastmap *fm, size_t n)
{
    if (fm->nlog + n <= fm->caplog)
        return 0;
    if (fm->loghead > 0) { /* room below what is not drained yet */
        memmove(fm->log, fm->log + fm->loghead * LOG_REC, (fm->nlog - fm->loghead) * LOG_REC * sizeof(uint64_t));
        fm->nlog -= fm->loghead;
        fm->loghead = 0;
    }
    if (fm->nlog + n <= fm->caplog)
        return 0;
    size_t c = fm->caplog ? fm->caplog * 2 : 1024;
    while (c < fm->nlog + n)
        c *= 2;
    uint64_t *l = realloc(fm->log, c * LOG_REC * sizeof(uint64_t));
    if (l == NULL)
        return -ENOMEM;
    fm->log = l;
    fm->caplog = c;
    return 0;
}

static int log_block(struct vd_fastmap *fm, struct vol *v, uint64_t vid, uint64_t block, uint64_t slot,
                     uint16_t have, uint64_t back, uint16_t flip, uint64_t crcw);

int vd_fm_discard(struct vd_fastmap *fm, int locked, uint64_t vid, const uint64_t *blocks, size_t n)
{
    int rc = 0;
    take(fm, locked);
    struct vol *v = find_vol(fm, vid);
    if (v == NULL) {
        rc = -EAGAIN;
        goto out;
    }
    /* room in the drain first, so that nothing changes unless all of it
     * can (no request runs meanwhile: the lock is held for writing) */
    pthread_mutex_lock(&fm->io);
    rc = log_room(fm, n);
    pthread_mutex_unlock(&fm->io);
    if (rc < 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        vd_fm_set(fm, vid, blocks[i], 0, 0, FULL, 0, FULL, 0, FULL, 0, 0, 0, 0, 0);
        struct ent *e = lookup_key(fm, v->key, blocks[i]);
        if (e != NULL) {
            /* changed in this log epoch, all of it: the volume's next
             * record here says the block reads as zeros (mask 0), or
             * carries it whole once written again (gather) */
            e->lepoch = v->lepoch;
            e->mask = FULL;
        }
    }
    /* in the volume's changed blocks for its next record here (a block
     * the table could not keep sends that record to the engine) */
    pthread_mutex_lock(&fm->io);
    for (size_t i = 0; i < n; i++)
        log_block(fm, v, vid, blocks[i], 0, FULL, 0, 0, 0); /* cannot fail: room made above */
    pthread_mutex_unlock(&fm->io);
out:
    give(fm, locked);
    return rc;
}

/* The commit that just became durable wrote n blocks of vid as backed
 * entries, the head's own: recs[3i..3i+2] is (block, slot, back slot).  C
 * may flip each from now on, if its entry is still that one (a later write
 * may have replaced it) and no structural change is in flight.  One call
 * per volume, so that the engine's commit holds the lock for a loop in C,
 * not one in Python over tens of thousands of blocks. */
static void mark_backed(struct vd_fastmap *fm, uint64_t vid, const uint64_t *recs, size_t n)
{
    if (fm->hold)
        return;
    uint64_t key = key_of(fm, vid);
    for (size_t i = 0; i < n; i++) {
        uint64_t slot = recs[3 * i + 1], back = recs[3 * i + 2];
        struct ent *e = lookup_key(fm, key, recs[3 * i]);
        if (e != NULL && e->slot == slot && e->have != FULL && e->b.base == back &&
            (uint16_t)(e->have | e->b.bhave) == FULL && e->epoch != fm->epoch)
            e->back = back;
    }
}

static void commit_state(struct vd_fastmap *fm, int state)
{
    fm->inflight = state ? fm->epoch - 1 : 0;
    fm->hold = state == 2;
}

/* Which of n blocks from first the table does not know: bit i of out[i /
 * 64] set for block first + i.  Called by the engine's thread (the only
 * one that changes the table besides the I/O threads) without the lock:
 * the inner mutex keeps the I/O threads' changes out meanwhile. */
void vd_fm_unknown(struct vd_fastmap *fm, uint64_t vid, uint64_t first, uint32_t n, uint64_t *out)
{
    memset(out, 0, ((n + 63) / 64) * sizeof(uint64_t));
    pthread_mutex_lock(&fm->io);
    uint64_t key = key_of(fm, vid);
    for (uint32_t i = 0; i < n; i++)
        if (lookup_key(fm, key, first + i) == NULL)
            out[i / 64] |= 1ull << (i % 64);
    pthread_mutex_unlock(&fm->io);
}

static struct expect *exp_slot(struct vd_fastmap *fm, uint64_t slot)
{
    size_t i = (size_t)(mix(slot, 0) & (EXP_CAP - 1));
    while (fm->exp[i].state != EXP_EMPTY && fm->exp[i].slot != slot)
        i = (i + 1) & (EXP_CAP - 1);
    return &fm->exp[i];
}

/* The checksum of a committed slot an unverified entry reads from: the
 * CRC-32C of the pages of mask.  A slot C verified against the same sum
 * stays verified. */
void vd_fm_expect(struct vd_fastmap *fm, uint64_t slot, uint32_t crc, uint16_t mask)
{
    if (fm->nexp >= EXP_CAP / 4 * 3) {
        memset(fm->exp, 0, EXP_CAP * sizeof(struct expect));
        fm->nexp = 0;
    }
    struct expect *x = exp_slot(fm, slot);
    if (x->state == EXP_EMPTY)
        fm->nexp++;
    else if (x->crc == crc && x->mask == mask)
        return;
    *x = (struct expect){.slot = slot, .crc = crc, .mask = mask, .state = EXP_EXPECTED};
}

/* A snapshot of the volume was taken: every block it read so far (all but
 * the fresh ones, written since the freeze that took the snapshot, whose
 * entries were set in this epoch) is now the snapshot point's too. */
static void share_volume(struct vd_fastmap *fm, uint64_t vid)
{
    struct vol *v = find_vol(fm, vid);
    if (v != NULL)
        v->share_epoch = fm->epoch;
}

/* The volume's last snapshot point changed other than by a new snapshot
 * (it was deleted): no known block counts as shared any more (a
 * copy-on-write then copies the entry's own pages, which is right whatever
 * the older points see). */
static void unshare_volume(struct vd_fastmap *fm, uint64_t vid)
{
    struct vol *v = find_vol(fm, vid);
    if (v == NULL)
        return;
    v->share_epoch = 0;
    finish_growth(fm);
    __atomic_add_fetch(&fm->st_scans, 1, __ATOMIC_RELAXED);
    for (size_t i = 0; i < fm->cap; i++)
        if (fm->tab[i].used && fm->tab[i].vid == v->key) {
            struct ent *e = &fm->tab[i];
            e->shared = 0;
            /* an older point may see a committed block marked the head's
             * own before it (only the engine knows); a block flipped in
             * this epoch is the head's own, and stays so */
            if (!(e->epoch == fm->epoch && e->flip))
                e->back = 0;
        }
}

static inline int is_shared(const struct ent *e, const struct vol *v)
{
    return e->shared || e->sepoch < v->share_epoch;
}

/* a new volume: nothing maps any of its blocks */
static void know_volume(struct vd_fastmap *fm, uint64_t vid)
{
    struct vol *v = find_vol(fm, vid);
    if (v != NULL)
        know_windows(v, 0, v->nwin);
}

/* the table no longer knows a block of vid: its window's unknown blocks
 * are no longer zeros */
static void unknow_block(struct vd_fastmap *fm, uint64_t vid, uint64_t block)
{
    struct vol *v = find_vol(fm, vid);
    if (v != NULL)
        unknow_window(v, block);
}

void vd_fm_forget(struct vd_fastmap *fm, uint64_t vid, uint64_t block)
{
    struct ent *e = lookup(fm, vid, block);
    unknow_block(fm, vid, block);
    if (e != NULL)
        del(fm, e);
}

static void forget_slot(struct vd_fastmap *fm, uint64_t vid, uint64_t block, uint64_t slot)
{
    struct ent *e = lookup(fm, vid, block);
    if (e != NULL && e->slot == slot) {
        unknow_block(fm, vid, block);
        del(fm, e);
    }
}

void vd_fm_forget_slots(struct vd_fastmap *fm, int locked, const uint64_t *triples, size_t nwords)
{
    take(fm, locked);
    for (size_t i = 0; i + 3 <= nwords; i += 3)
        forget_slot(fm, triples[i], triples[i + 1], triples[i + 2]);
    give(fm, locked);
}

/* A fresh log epoch; at the (unreachable in practice) wrap the table
 * starts over, so that no old entry can match again. */
static uint32_t next_lepoch(struct vd_fastmap *fm)
{
    if (++fm->lepoch == 0) {
        vd_fm_clear(fm);
        fm->lepoch = 1;
    }
    return fm->lepoch;
}

static void new_log_epoch(struct vd_fastmap *fm, struct vol *v)
{
    v->lepoch = next_lepoch(fm);
    v->nchg = 0;
    v->nfrozen = 0;
}

/* The freeze: a new epoch, and a new log epoch for every volume.  A volume
 * whose every change since its last log flush came from here (clean, its
 * blocks in chg) stays clean: its next record carries those blocks whole
 * (nfrozen), which the commit makes durable only once it is.  Any other
 * volume is clean if nothing of it is unlogged (the engine's record
 * carries them otherwise, and tells us when it did). */
static void new_epoch(struct vd_fastmap *fm)
{
    if (++fm->epoch == 0) {
        vd_fm_clear(fm);
        fm->epoch = 1;
    }
    for (size_t i = 0; i < fm->nvols; i++) {
        struct vol *v = &fm->vols[i];
        int carry = v->clean && v->nchg > 0 && v->nchg <= CHG_MAX;
        int unlogged = v->nchg > 0 || !v->clean;
        uint32_t n = v->nchg;
        new_log_epoch(fm, v);
        if (carry) {
            for (uint32_t j = 0; j < n; j++)
                v->chg[j] |= PRE_FREEZE;
            v->nchg = v->nfrozen = n;
        }
        v->clean = carry || !unlogged;
    }
}

/* The commit of the last freeze is durable: the blocks changed before it
 * need no record any more (those changed again since stay in chg). */
static void frozen_durable(struct vd_fastmap *fm)
{
    for (size_t i = 0; i < fm->nvols; i++) {
        struct vol *v = &fm->vols[i];
        if (v->nfrozen == 0)
            continue;
        if (v->nchg <= CHG_MAX) { /* (overflowed, it stays so: a record is the engine's) */
            uint32_t k = 0;
            for (uint32_t j = 0; j < v->nchg; j++)
                if (!(v->chg[j] & PRE_FREEZE))
                    v->chg[k++] = v->chg[j];
            v->nchg = k;
        }
        v->nfrozen = 0;
    }
}

/* ------------------------------------------------------------ the engine's holds
 *
 * The engine changes the table at three moments of every commit: the
 * freeze, the end, and (for a commit that changed volumes) telling the
 * volumes again.  Each is one call here, which takes the lock, does all of
 * it in C and lets go: the engine's Python never runs while it holds the
 * lock, so a hold is never made longer by its thread waiting for the GIL
 * (every call into C lets the GIL go; a commit's worker thread, running
 * Python, may keep it for the interpreter's switch interval, 5 ms). */

/* ops: n records of VD_FM_VOL_WORDS words, gone: the volumes no longer
 * served (see fastmap.h) */
static void sync_volumes(struct vd_fastmap *fm, const uint64_t *ops, size_t n, const uint64_t *gone, size_t ngone)
{
    for (size_t i = 0; i < n; i++) {
        const uint64_t *op = ops + i * VD_FM_VOL_WORDS;
        uint64_t vid = op[0], how = op[3];
        set_volume(fm, vid, op[1], op[2], !!(how & VD_FM_VOL_POINTS));
        if (how & VD_FM_VOL_CLEAN)
            vd_fm_log_clean(fm, vid, 1);
        if (how & VD_FM_VOL_NEW)
            know_volume(fm, vid);
        if (how & VD_FM_VOL_SHARE)
            share_volume(fm, vid);
        if (how & VD_FM_VOL_UNSHARE)
            unshare_volume(fm, vid);
    }
    for (size_t i = 0; i < ngone; i++)
        drop_volume(fm, gone[i]);
}

void vd_fm_sync_volumes(struct vd_fastmap *fm, int locked, const uint64_t *ops, size_t n, const uint64_t *gone,
                        size_t ngone)
{
    take(fm, locked);
    sync_volumes(fm, ops, n, gone, ngone);
    give(fm, locked);
}

size_t vd_fm_freeze(struct vd_fastmap *fm, int locked, struct vd_log *L, int records, int state,
                    const uint64_t *unclean, size_t n, uint64_t *gen)
{
    take(fm, locked);
    *gen = vd_log_freeze(L, records);
    new_epoch(fm);
    commit_state(fm, state);
    for (size_t i = 0; i < n; i++)
        vd_fm_log_clean(fm, unclean[i], 0);
    pthread_mutex_lock(&fm->io);
    size_t before = fm->nlog - fm->loghead; /* the drain's records of the frozen epoch */
    pthread_mutex_unlock(&fm->io);
    give(fm, locked);
    return before;
}

void vd_fm_commit_done(struct vd_fastmap *fm, int locked, struct vd_log *L, uint64_t gen, const uint64_t *clean,
                       size_t nclean, const uint64_t *ops, size_t nops, const uint64_t *gone, size_t ngone,
                       const uint64_t *backed, size_t nbacked)
{
    take(fm, locked);
    vd_log_retire(L, gen);
    frozen_durable(fm);
    for (size_t i = 0; i < nclean; i++)
        vd_fm_log_clean(fm, clean[i], 1);
    sync_volumes(fm, ops, nops, gone, ngone);
    for (size_t i = 0; i + 2 <= nbacked;) {
        uint64_t vid = backed[i], count = backed[i + 1];
        if (count > (nbacked - i - 2) / 3)
            break; /* malformed: the engine's bug; flip nothing more */
        mark_backed(fm, vid, backed + i + 2, count);
        i += 2 + 3 * count;
    }
    commit_state(fm, 0);
    give(fm, locked);
}

void vd_fm_commit_failed(struct vd_fastmap *fm, int locked, struct vd_log *L)
{
    take(fm, locked);
    vd_log_thaw(L);
    commit_state(fm, 0);
    give(fm, locked);
}

void vd_fm_log_epoch(struct vd_fastmap *fm, uint64_t vid)
{
    struct vol *v = find_vol(fm, vid);
    if (v != NULL)
        new_log_epoch(fm, v);
}

uint32_t vd_fm_mask(struct vd_fastmap *fm, uint64_t vid, uint64_t block)
{
    struct vol *v = find_vol(fm, vid);
    struct ent *e = lookup(fm, vid, block);
    return (v != NULL && e != NULL && e->lepoch == v->lepoch) ? e->mask : 0;
}

void vd_fm_clear(struct vd_fastmap *fm)
{
    for (size_t i = 0; i < fm->nvols; i++) {
        unknow_all(&fm->vols[i]);
        fm->vols[i].share_epoch = 0; /* the epoch may start over */
    }
    finish_growth(fm);
    __atomic_add_fetch(&fm->st_scans, 1, __ATOMIC_RELAXED);
    memset(fm->tab, 0, fm->cap * sizeof(struct ent));
    fm->n = 0;
    fm->trim_pos = 0;
}

/* Positions of the table one hold of the inner mutex looks at while
 * trimming (about 0.1 ms); the I/O threads take turns in between. */
#define TRIM_CHUNK 4096

static int overlaps_flight(struct vd_fastmap *fm, uint64_t vid, uint64_t first, size_t nb);

/* Whether a trim may forget an entry of v's current head (inner mutex
 * held): any not set in this epoch (those hold the pages written since the
 * freeze, which the volume's next log flush needs), unless a write in
 * flight looks it up again when it lands (a flip: see book).  A stale
 * entry (v NULL) goes in any case: nothing looks it up. */
static int trimmable(struct vd_fastmap *fm, const struct vol *v, const struct ent *e)
{
    return v == NULL || (e->epoch != fm->epoch && !overlaps_flight(fm, v->vid, e->block, 1));
}

int vd_fm_trim(struct vd_fastmap *fm, size_t at, size_t budget)
{
    pthread_mutex_lock(&fm->io);
    if (fm->trim_pos == 0) {
        if (fm->otab != NULL || fm->n <= at) { /* a growth moves its entries first */
            pthread_mutex_unlock(&fm->io);
            return 0;
        }
        fm->trim_pos = fm->cap;
    }
    pthread_mutex_unlock(&fm->io);
    /* From the table's end to its start, so that a deletion shifts back
     * only entries looked at already (kept, mostly few): a run of
     * positions costs its length, not its length squared.  An entry a
     * deletion pulls back from the table's start (a run that wraps) is
     * left as it is. */
    for (size_t done = 0; done < budget; done += TRIM_CHUNK) {
        pthread_mutex_lock(&fm->io);
        uint64_t t0 = mono_ns();
        size_t pos = fm->trim_pos < fm->cap ? fm->trim_pos : fm->cap; /* (put() may have doubled it) */
        size_t n = budget - done < TRIM_CHUNK ? budget - done : TRIM_CHUNK;
        size_t end = pos < n ? 0 : pos - n;
        for (; pos > end; pos--) {
            struct ent *e = &fm->tab[pos - 1];
            if (!e->used)
                continue;
            struct vol *v = vol_of_key(fm, e->vid);
            if (trimmable(fm, v, e)) {
                /* an unknown block of a known window reads as zeros: not
                 * this one's window any more (in this same hold) */
                if (v != NULL)
                    unknow_window(v, e->block);
                del(fm, e);
            }
        }
        fm->trim_pos = pos;
        if (pos == 0)
            __atomic_add_fetch(&fm->st_trims, 1, __ATOMIC_RELAXED);
        spans_add(&fm->trim_hold, mono_ns() - t0);
        pthread_mutex_unlock(&fm->io);
        if (pos == 0)
            return 0;
        sched_yield(); /* an I/O thread waiting for the mutex takes it now */
    }
    return 1;
}

size_t vd_fm_entries(struct vd_fastmap *fm) { return fm->n; }

/* Grow the table ahead of need once it is more than 3/8 full (put() grows
 * it at 1/2, under the inner mutex, when nobody did), and move the old
 * table's entries over (see "The table"): the new table is allocated and
 * its pages touched before the inner mutex is taken, and the entries move
 * GROW_CHUNK positions per hold of it, so that the I/O threads never wait
 * for the page faults of tens of MiB (a growth in put() held them up to
 * 50 ms) nor for the copy of every entry (a growth of 65536 positions held
 * them 7-29 ms in a barrier run, 1 Mi would hold them 16 times that), and
 * not for the requests in flight (as the map's lock would).  At most
 * budget old positions move per call; what is left moves at the next call
 * or when looked up.  Every user of the table holds the inner mutex
 * (the I/O side, vd_fm_fsync's gather) or is the engine's thread, which
 * calls this without the map's lock.  1 when it grew or moved entries, 0
 * when there was nothing to do, -ENOMEM. */
int vd_fm_grow(struct vd_fastmap *fm, size_t budget)
{
    pthread_mutex_lock(&fm->io);
    int moving = fm->otab != NULL;
    size_t cap = fm->cap, n = fm->n + fm->pending_new;
    pthread_mutex_unlock(&fm->io);
    if (!moving) {
        if (n * 8 <= cap * 3 || cap >= MAX_CAP || fm->trim_pos != 0)
            return 0; /* (a full one is trimmed instead: vd_fm_trim) */
        size_t ncap = cap * 2;
        struct ent *tab = malloc(ncap * sizeof(struct ent));
        if (tab == NULL)
            return -ENOMEM;
        memset(tab, 0, ncap * sizeof(struct ent));
        pthread_mutex_lock(&fm->io);
        if (fm->cap != cap || fm->otab != NULL) { /* put() grew it meanwhile */
            pthread_mutex_unlock(&fm->io);
            free(tab);
            return 0;
        }
        fm->otab = fm->tab;
        fm->ocap = cap;
        fm->opos = 0;
        fm->tab = tab;
        fm->cap = ncap;
        pthread_mutex_unlock(&fm->io);
    }
    for (size_t done = 0; done < budget; done += GROW_CHUNK) {
        pthread_mutex_lock(&fm->io);
        int all = move_old(fm, budget - done < GROW_CHUNK ? budget - done : GROW_CHUNK);
        pthread_mutex_unlock(&fm->io);
        if (all)
            break;
        sched_yield(); /* an I/O thread waiting for the mutex takes it now */
    }
    return 1;
}

size_t vd_fm_drain(struct vd_fastmap *fm, uint64_t *out, size_t max_records)
{
    pthread_mutex_lock(&fm->io);
    size_t left = fm->nlog - fm->loghead, n = left < max_records ? left : max_records;
    memcpy(out, fm->log + fm->loghead * LOG_REC, n * LOG_REC * sizeof(uint64_t));
    fm->loghead += n; /* a batch at a time without moving the rest (a drain of 40000 moved it ten times) */
    if (fm->loghead == fm->nlog)
        fm->loghead = fm->nlog = 0;
    pthread_mutex_unlock(&fm->io);
    return n;
}

size_t vd_fm_reservoir(struct vd_fastmap *fm) { return fm->nres; }

int vd_fm_reservoir_add(struct vd_fastmap *fm, const uint64_t *slots, size_t n)
{
    int rc = 0;
    pthread_mutex_lock(&fm->io);
    if (fm->nres + n > fm->capres) {
        size_t c = (fm->nres + n) * 2;
        uint64_t *r = realloc(fm->res, c * sizeof(uint64_t));
        if (r == NULL) {
            rc = -ENOMEM;
            goto out;
        }
        fm->res = r;
        fm->capres = c;
    }
    memcpy(fm->res + fm->nres, slots, n * sizeof(uint64_t));
    fm->nres += n;
    fm->signalled = 0;
out:
    fm->refills++; /* even with none added (a full filesystem): waiters give up */
    pthread_cond_broadcast(&fm->refilled);
    pthread_mutex_unlock(&fm->io);
    return rc;
}

size_t vd_fm_reservoir_take(struct vd_fastmap *fm, uint64_t *out, size_t max)
{
    pthread_mutex_lock(&fm->io);
    size_t n = fm->nres < max ? fm->nres : max;
    memcpy(out, fm->res + fm->nres - n, n * sizeof(uint64_t));
    fm->nres -= n;
    pthread_mutex_unlock(&fm->io);
    return n;
}

void vd_fm_set_failed(struct vd_fastmap *fm, int failed)
{
    fm->failed = failed;
    pthread_cond_broadcast(&fm->refilled); /* writers waiting for slots give up (or time out) */
}

void vd_fm_stats(struct vd_fastmap *fm, uint64_t *out)
{
    out[0] = __atomic_load_n(&fm->st_reads, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&fm->st_writes, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&fm->st_again, __ATOMIC_RELAXED);
    out[3] = __atomic_load_n(&fm->st_cow, __ATOMIC_RELAXED);
    out[4] = __atomic_load_n(&fm->st_verified, __ATOMIC_RELAXED);
    spans_get(&fm->dry, out + 5);
    spans_get(&fm->blocked, out + 8);
    spans_get(&fm->held, out + 11);
    out[14] = __atomic_load_n(&fm->st_flips, __ATOMIC_RELAXED);
    out[15] = __atomic_load_n(&fm->st_trims, __ATOMIC_RELAXED);
    out[21] = __atomic_load_n(&fm->st_scans, __ATOMIC_RELAXED);
    spans_get(&fm->trim_hold, out + 18);
    pthread_mutex_lock(&fm->io);
    out[16] = fm->n;
    out[17] = (fm->cap + fm->ocap) * sizeof(struct ent);
    pthread_mutex_unlock(&fm->io);
}

/* ------------------------------------------------------------ I/O side */

static inline uint64_t slot_off(uint64_t slot) { return (slot - 1) * (uint64_t)BS; }

#define PG 4096 /* a page: the unit of have, base and the log's masks */

/* the 4 KiB pages of a block that [intra, intra + n) touches */
static inline uint16_t pages(uint64_t intra, uint64_t n)
{
    uint32_t first = (uint32_t)(intra / 4096), last = (uint32_t)((intra + n - 1) / 4096);
    return (uint16_t)(((2u << last) - 1) & ~((1u << first) - 1));
}

/* the pages [intra, intra + n) covers whole */
static inline uint16_t covered(uint64_t intra, uint64_t n)
{
    uint32_t first = (uint32_t)((intra + PG - 1) / PG), end = (uint32_t)((intra + n) / PG);
    return end > first ? (uint16_t)(((1u << end) - 1) & ~((1u << first) - 1)) : 0;
}


/* Whether slot holds what its checksum says, verified here once (a slot
 * whose sum C was not given counts as not verified).  With the inner mutex
 * held; reads the slot's pages into buf. */
static int slot_verified(struct vd_fastmap *fm, uint64_t slot, unsigned char *buf)
{
    struct expect *x = exp_slot(fm, slot);
    if (x->state == EXP_VERIFIED)
        return 1;
    if (x->state != EXP_EXPECTED)
        return 0;
    uint64_t off = slot_off(slot);
    uint32_t crc;
    unsigned char zero;
    if (vd_checksum_slots(fm->data_fd, &off, &x->mask, 1, BS, buf, &crc, &zero) < 0)
        return 0; /* the engine reads it, and reports the error */
    x->state = crc == x->crc ? EXP_VERIFIED : EXP_BAD;
    __atomic_add_fetch(&fm->st_verified, 1, __ATOMIC_RELAXED);
    return x->state == EXP_VERIFIED;
}

/* Make an unverified entry verified by checking the committed slots of its
 * view against their checksums: 1 when every one matched (the entry is
 * then verified), 0 when C must leave the request to the engine (a slot
 * whose sum it does not know, or one that does not match: the engine
 * reports that).  With the inner mutex held; uses the scratch buffer. */
static int verify_entry(struct vd_fastmap *fm, struct ent *e)
{
    if (!e->unverified)
        return 1;
    if (e->slot && e->epoch != fm->epoch && !slot_verified(fm, e->slot, fm->scratch))
        return 0; /* a fresh slot was written here: only what is below it counts */
    if (e->have != FULL) {
        if (e->b.base && !slot_verified(fm, e->b.base, fm->scratch))
            return 0;
        if (e->b.bhave != FULL && e->b.base2 && !slot_verified(fm, e->b.base2, fm->scratch))
            return 0;
        if (e->b.bhave != FULL && e->b.bhave2 != FULL && e->b.base3 && !slot_verified(fm, e->b.base3, fm->scratch))
            return 0;
    }
    e->unverified = 0;
    return 1;
}

static void begin_io(struct vd_fastmap *fm)
{
    if (pthread_rwlock_tryrdlock(&fm->lock) == 0) {
        pthread_mutex_lock(&fm->io);
        return;
    }
    /* the engine (or an fsync gathering its record) holds the map, or
     * waits for it: count how long this request waits, as daemon status
     * reports it */
    uint64_t t0 = mono_ns();
    pthread_rwlock_rdlock(&fm->lock);
    uint64_t ns = mono_ns() - t0;
    pthread_mutex_lock(&fm->io);
    spans_add(&fm->blocked, ns);
}

/* end of a request that already let go of the inner mutex */
static long end_shared(struct vd_fastmap *fm, long rc)
{
    pthread_rwlock_unlock(&fm->lock);
    return rc;
}

static long end_io(struct vd_fastmap *fm, long rc)
{
    pthread_mutex_unlock(&fm->io);
    pthread_rwlock_unlock(&fm->lock);
    return rc;
}

/* what a public read or write returns: -EAGAIN counts as handed back */
static long handed_back(struct vd_fastmap *fm, long rc)
{
    if (rc == -EAGAIN)
        __atomic_add_fetch(&fm->st_again, 1, __ATOMIC_RELAXED);
    return rc;
}

/* the volume and the block span of a request, or -EAGAIN */
static long span(struct vd_fastmap *fm, uint64_t vid, uint64_t off, uint32_t len, uint64_t *first,
                 size_t *nblocks, struct vol **vp)
{
    struct vol *v = find_vol(fm, vid);
    if (fm->failed > 1 || v == NULL || len == 0 || off + len > v->size || off + len < off)
        return -EAGAIN;
    *first = off / BS;
    *nblocks = (size_t)((off + len - 1) / BS - *first + 1);
    if (*nblocks > MAX_SPAN)
        return -EAGAIN;
    *vp = v;
    return 0;
}

/* The slot page pg of an entry's view comes from (0: zeros). */
static inline uint64_t source(uint64_t slot, uint16_t have, struct below b, int pg)
{
    if (have >> pg & 1)
        return slot;
    if (b.bhave >> pg & 1)
        return b.base;
    return (b.bhave2 >> pg & 1) ? b.base2 : b.base3;
}

/* Bytes [intra, intra + n) of a partial block: pages of have from slot, the
 * others from base (0: zeros); one pread per run of pages from one place. */
static int read_pages(struct vd_fastmap *fm, uint64_t slot, uint16_t have, struct below b, uint64_t intra,
                      uint64_t n, unsigned char *out)
{
    uint64_t pos = intra, end = intra + n;
    while (pos < end) {
        uint64_t src = source(slot, have, b, (int)(pos / PG));
        uint64_t stop = (pos / PG + 1) * PG;
        while (stop < end && source(slot, have, b, (int)(stop / PG)) == src)
            stop += PG;
        if (stop > end)
            stop = end;
        if (src == 0)
            memset(out + (pos - intra), 0, stop - pos);
        else {
            int rc = vd_pread_full(fm->data_fd, out + (pos - intra), stop - pos, slot_off(src) + pos);
            if (rc < 0)
                return rc;
        }
        pos = stop;
    }
    return 0;
}

static long read_once(struct vd_fastmap *fm, uint64_t vid, uint64_t off, uint32_t len, void *buf)
{
    uint64_t first, slots[MAX_SPAN];
    uint16_t haves[MAX_SPAN];
    struct below bs[MAX_SPAN];
    size_t nb;
    struct vol *v;
    begin_io(fm);
    long rc = span(fm, vid, off, len, &first, &nb, &v);
    if (rc < 0)
        return end_io(fm, rc);
    for (size_t i = 0; i < nb; i++) {
        struct ent *e = lookup_key(fm, v->key, first + i);
        if (e == NULL && !window_known(v, first + i))
            return end_io(fm, -EAGAIN);
        if (e != NULL && e->unverified) {
            /* only the pages a fresh slot holds were written here; the
             * rest is read once the slots it comes from are verified */
            uint64_t lo = (i == 0) ? off % BS : 0, hi = (i + 1 == nb) ? (off + len - 1) % BS + 1 : BS;
            if ((e->epoch != fm->epoch || (pages(lo, hi - lo) & (uint16_t)~e->have)) && !verify_entry(fm, e))
                return end_io(fm, -EAGAIN);
        }
        slots[i] = e ? e->slot : 0;
        haves[i] = e && e->slot ? e->have : FULL;
        bs[i] = e ? e->b : ZEROS;
    }
    /* the slots stay valid while the lock is held for reading: only the
     * engine frees or reuses a slot, with the lock held for writing */
    pthread_mutex_unlock(&fm->io);
    unsigned char *out = buf;
    uint64_t pos = off, end = off + len;
    for (size_t i = 0; i < nb;) {
        uint64_t intra = pos % BS, n = BS - intra;
        if (n > end - pos)
            n = end - pos;
        if (haves[i] != FULL) {
            if ((rc = read_pages(fm, slots[i], haves[i], bs[i], intra, n, out)) < 0)
                return end_shared(fm, rc);
            out += n;
            pos += n;
            i++;
            continue;
        }
        if (slots[i] == 0) {
            memset(out, 0, n);
            out += n;
            pos += n;
            i++;
            continue;
        }
        /* whole blocks in consecutive slots: one pread */
        uint64_t from = slot_off(slots[i]) + intra, run = n;
        size_t j = i + 1;
        for (; j < nb && haves[j] == FULL && slots[j] == slots[j - 1] + 1; j++)
            run += (end - pos - run < BS) ? end - pos - run : BS;
        if ((rc = vd_pread_full(fm->data_fd, out, run, from)) < 0)
            return end_shared(fm, rc);
        out += run;
        pos += run;
        i = j;
    }
    __atomic_add_fetch(&fm->st_reads, 1, __ATOMIC_RELAXED);
    return end_shared(fm, (long)len);
}

long vd_fm_read(void *arg, uint64_t vid, uint64_t off, uint32_t len, void *buf)
{
    return handed_back(arg, read_once(arg, vid, off, len, buf));
}

/* Wake the engine (once until it refills): the reservoir runs low.  With the
 * inner mutex held. */
static void ask_for_slots(struct vd_fastmap *fm)
{
    uint64_t one = 1;
    if (fm->signalled || fm->event_fd < 0)
        return;
    fm->signalled = 1;
    if (write(fm->event_fd, &one, sizeof(one)) < 0) { /* the engine polls every 100 ms anyway */
    }
}

enum { INPLACE, NEW, COW, COMPARE, FLIP };

/* The next run of pages in mask at or after *pg: its length (0: none
 * left), with *pg moved to its first page. */
static inline int page_run(uint16_t mask, int *pg)
{
    while (*pg < BS / PG && !(mask >> *pg & 1))
        (*pg)++;
    int run = 0;
    while (*pg + run < BS / PG && (mask >> (*pg + run) & 1))
        run++;
    return run;
}

/* Copy the pages of mask from slot src (0: zeros) into buf, a block's
 * buffer. */
static int fetch_pages(struct vd_fastmap *fm, uint64_t src, uint16_t mask, unsigned char *buf)
{
    for (int pg = 0, run; (run = page_run(mask, &pg)) > 0; pg += run) {
        if (src == 0)
            memset(buf + (size_t)pg * PG, 0, (size_t)run * PG);
        else {
            int rc = vd_pread_full(fm->data_fd, buf + (size_t)pg * PG, (size_t)run * PG, slot_off(src) + (uint64_t)pg * PG);
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

/* The pages of mask as below an entry: bhave's from base, the others of
 * bhave2 from base2, the rest from base3. */
static int fetch_below(struct vd_fastmap *fm, struct below b, uint16_t mask, unsigned char *buf)
{
    int rc = fetch_pages(fm, b.base, mask & b.bhave, buf);
    if (rc >= 0)
        rc = fetch_pages(fm, b.base2, mask & (uint16_t)~b.bhave & b.bhave2, buf);
    return rc < 0 ? rc : fetch_pages(fm, b.base3, mask & (uint16_t)~b.bhave & (uint16_t)~b.bhave2, buf);
}

/* Write the pages of mask from buf (a block's buffer) into slot dst. */
static int store_pages(struct vd_fastmap *fm, uint64_t dst, uint16_t mask, const unsigned char *buf)
{
    if (mask == FULL)
        return vd_pwrite_full(fm->data_fd, buf, BS, slot_off(dst));
    for (int pg = 0, run; (run = page_run(mask, &pg)) > 0; pg += run) {
        int rc = vd_pwrite_full(fm->data_fd, buf + (size_t)pg * PG, (size_t)run * PG, slot_off(dst) + (uint64_t)pg * PG);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Append (vid, block, slot, have, back, flip) to the log (back, flip: a
 * flipped block's back slot and pages flipped since its commit; 0 for a
 * fresh slot), and the block to v's changed
 * list (v: the volume; NULL for a FLUSHED marker); with the inner mutex held. */
static int log_block(struct vd_fastmap *fm, struct vol *v, uint64_t vid, uint64_t block, uint64_t slot,
                     uint16_t have, uint64_t back, uint16_t flip, uint64_t crcw)
{
    if (v != NULL && v->nchg <= CHG_MAX) { /* for a log flush here */
        if (v->nchg < CHG_MAX)
            v->chg[v->nchg] = block;
        v->nchg++;
    }
    if (log_room(fm, 1) < 0)
        return -ENOMEM;
    uint64_t *r = fm->log + fm->nlog * LOG_REC;
    r[0] = vid;
    r[1] = block;
    r[2] = slot;
    r[3] = have;
    r[4] = back;
    r[5] = flip;
    r[6] = crcw;
    fm->nlog++;
    return 0;
}

/* What one write does to each block it spans (vd_fm_write): planned under
 * the inner mutex, carried out by write_data, entered in the table by
 * book.  Slots are read-only outside the current epoch, and only the
 * engine frees or reuses one (with the lock held for writing), so every
 * slot a plan names stays as it is while the request holds the lock for
 * reading. */
struct plan {
    uint64_t vid, off, first;
    uint32_t len;
    size_t nb, need;
    int merging;
    uint64_t base[MAX_SPAN];   /* the block's slot now (0: zeros) */
    uint64_t ns[MAX_SPAN];     /* NEW, COW, COMPARE: the new slot, from the reservoir */
    uint64_t osrc[MAX_SPAN];   /* COW: the slot the pages of own are copied from */
    struct below nb_[MAX_SPAN]; /* what a new or merged slot's missing pages read from */
    uint16_t own[MAX_SPAN], merge[MAX_SPAN], missing[MAX_SPAN], nhave[MAX_SPAN], edges[MAX_SPAN];
    uint16_t ohave[MAX_SPAN]; /* FLIP: the pages base holds now (the others are in osrc, the back slot) */
    unsigned char act[MAX_SPAN], unv[MAX_SPAN];
    unsigned char same[MAX_SPAN]; /* COMPARE: the block held these bytes already */
    uint64_t crcw[MAX_SPAN];      /* COW: the new partial slot's checksum, as the drain gives it (0: not known) */
};

/* the [intra, hi) bytes block i of the plan writes */
static inline void block_range(const struct plan *p, size_t i, uint64_t *intra, uint64_t *hi)
{
    *intra = (i == 0) ? p->off % BS : 0;
    *hi = (i + 1 == p->nb) ? (p->off + p->len - 1) % BS + 1 : BS;
}

static int overlaps_flight(struct vd_fastmap *fm, uint64_t vid, uint64_t first, size_t nb)
{
    for (size_t i = 0; i < MAX_FLIGHTS; i++) {
        struct flight *f = &fm->fl[i];
        if (f->used && f->vid == vid && first < f->first + f->nb && f->first < first + nb)
            return 1;
    }
    return 0;
}

/* Plan a write (with the inner mutex held): 0, or -EAGAIN when the engine
 * must serve it (then nothing was changed). */
static long plan_write(struct vd_fastmap *fm, struct vol *v, struct plan *p)
{
    p->need = 0;
    p->merging = 0;
    for (size_t i = 0; i < p->nb; i++) {
        uint64_t intra, hi;
        block_range(p, i, &intra, &hi);
        uint64_t n = hi - intra;
        int full = n == BS;
        uint16_t pgs = pages(intra, n);
        struct ent *e = lookup_key(fm, v->key, p->first + i);
        p->merge[i] = p->missing[i] = 0;
        p->unv[i] = p->same[i] = 0;
        p->base[i] = p->osrc[i] = e ? e->slot : 0;
        if (e != NULL && e->back && e->slot && !full && !is_shared(e, v) && !fm->hold &&
            !(e->epoch == fm->inflight && (pgs & e->flip)) &&
            !(fm->inflight && e->epoch == fm->epoch && (pgs & e->pflip))) {
            /* a flip: each page goes to the place (slot or back slot) the
             * durable map does not use for it, once per epoch (own: the
             * pages already flipped in this epoch, written where they are
             * now); not while a commit in flight holds a page flipped in
             * its epoch (both places are in use then: a copy-on-write) */
            uint16_t f = e->epoch == fm->epoch ? e->flip : 0;
            p->act[i] = FLIP;
            p->own[i] = f;
            p->ohave[i] = e->have;
            p->osrc[i] = e->back;
            p->nhave[i] = e->have ^ (pgs & (uint16_t)~f);
            /* pages moved but written in part: the rest from where they are */
            p->edges[i] = pgs & (uint16_t)~f & (uint16_t)~covered(intra, n);
            /* pages that move fly: the table changes once they are written;
             * a write only in place goes on as INPLACE's do */
            p->merging |= (pgs & (uint16_t)~f) != 0;
            if (e->epoch != fm->epoch && !verify_entry(fm, e))
                return -EAGAIN;
            continue;
        }
        if (e != NULL && e->epoch == fm->epoch && !e->back) { /* never a flipped block's: both slots are committed */
            p->act[i] = INPLACE;
            /* pages the partial slot lacks: those written in part get the
             * rest of them from below first (the table says the slot holds
             * them only once they are written: book) */
            p->missing[i] = pgs & (uint16_t)~e->have;
            p->merge[i] = p->missing[i] & (uint16_t)~covered(intra, n);
            p->nb_[i] = e->b;
            p->merging |= p->missing[i] != 0;
            if (p->merge[i] && !verify_entry(fm, e))
                return -EAGAIN;
        } else if (e != NULL) {
            p->need++;
            if (full) {
                p->act[i] = (v->has_points && e->slot && e->have == FULL) ? COMPARE : NEW;
                continue;
            }
            p->act[i] = COW;
            /* what the new slot copies (own) and what it reads the rest
             * from (nb_): only the pages written over a whole block, the
             * last snapshot point's or the head's own (the engine makes it
             * a backed entry at commit), over the point's entry of two
             * slots (a view of three), or over zeros the point sees too;
             * over the head's own, the whole block once the slot would
             * hold more than VD_FM_COALESCE_PAGES */
            int coal = e->slot && !is_shared(e, v);
            if (e->slot == 0) {
                p->own[i] = is_shared(e, v) ? 0 : FULL;
                p->nb_[i] = ZEROS;
            } else if (e->have == FULL) {
                p->own[i] = 0;
                p->nb_[i] = (struct below){e->slot, 0, 0, FULL, FULL};
            } else if (is_shared(e, v) && e->b.bhave2 == FULL) {
                /* over the point's view of two or three slots: a view of
                 * one more, with only the pages written */
                p->own[i] = 0;
                p->nb_[i] = (struct below){e->slot, e->b.base, e->b.base2, e->have, e->b.bhave};
            } else if (is_shared(e, v)) {
                /* over the point's view of four (top, two middles,
                 * bottom): the new slot takes the pages that show of the
                 * upper layer that shows the fewest beyond those written,
                 * and reads through the others (the committed map's chain
                 * then hides the layer copied: layers.layers).  Copying
                 * the top every time would copy more with every snapshot. */
                uint16_t t = e->have, m1 = e->b.bhave & (uint16_t)~t, m2 = e->b.bhave2 & (uint16_t)~t & (uint16_t)~e->b.bhave;
                int ct = __builtin_popcount(t & ~pgs), c1 = __builtin_popcount(m1 & ~pgs), c2 = __builtin_popcount(m2 & ~pgs);
                if (c2 <= c1 && c2 <= ct) {
                    p->own[i] = m2;
                    p->osrc[i] = e->b.base2;
                    p->nb_[i] = (struct below){e->slot, e->b.base, e->b.base3, t, e->b.bhave};
                } else if (c1 <= ct) {
                    p->own[i] = m1;
                    p->osrc[i] = e->b.base;
                    p->nb_[i] = (struct below){e->slot, e->b.base2, e->b.base3, t, e->b.bhave2};
                } else {
                    p->own[i] = t;
                    p->nb_[i] = e->b;
                }
            } else {
                p->own[i] = e->have;
                p->nb_[i] = e->b;
            }
            p->nhave[i] = p->own[i] | pgs;
            if (coal && __builtin_popcount(p->nhave[i]) > VD_FM_COALESCE_PAGES)
                p->nhave[i] = FULL;
            /* the pages written in part get the rest from below; a whole
             * copy takes every page not written from there */
            p->edges[i] = (p->nhave[i] == FULL ? (uint16_t)~p->own[i] : (uint16_t)(pgs & ~p->own[i])) &
                          (uint16_t)~covered(intra, n);
            if (((p->own[i] && e->slot) || p->edges[i]) && !verify_entry(fm, e))
                return -EAGAIN; /* nothing unverified is copied */
            p->unv[i] = e->unverified; /* the new slot reads the rest from the same slots */
        } else if (full && (!v->has_points || window_known(v, p->first + i))) {
            p->act[i] = NEW;
            p->need++;
        } else if (window_known(v, p->first + i)) { /* zeros, for its snapshot points too: only the pages written */
            p->act[i] = COW;
            p->nb_[i] = ZEROS;
            p->own[i] = 0;
            p->nhave[i] = pgs;
            p->edges[i] = pgs & (uint16_t)~covered(intra, n);
            p->need++;
        } else {
            return -EAGAIN;
        }
    }
    return 0;
}

/* Where page pg of a flipped block is now (FLIP): its slot or back slot. */
static inline uint64_t flip_cur(const struct plan *p, size_t i, int pg)
{
    return (p->ohave[i] >> pg & 1) ? p->base[i] : p->osrc[i];
}

/* Where page pg of a flipped block goes (FLIP): where it is now if it was
 * flipped in this epoch already, else the other of slot and back slot. */
static inline uint64_t flip_dst(const struct plan *p, size_t i, int pg)
{
    uint64_t cur = flip_cur(p, i, pg);
    if (p->own[i] >> pg & 1)
        return cur;
    return cur == p->base[i] ? p->osrc[i] : p->base[i];
}

/* A FLIP's data: bytes [intra, intra + n) of block i from data, each page
 * into its place (flip_dst), one pwrite per run of pages with the same
 * place; a page moved but written in part gets the rest of it from where
 * it is now first. */
static long flip_data(struct vd_fastmap *fm, const struct plan *p, size_t i, uint64_t intra, uint64_t n,
                      const unsigned char *data, unsigned char *scratch)
{
    uint64_t hi = intra + n, at = intra;
    long rc;
    while (at < hi) {
        int pg = (int)(at / PG);
        uint64_t dst = flip_dst(p, i, pg), end = (uint64_t)(pg + 1) * PG < hi ? (uint64_t)(pg + 1) * PG : hi;
        if (p->edges[i] >> pg & 1) {
            unsigned char *page = scratch + (size_t)pg * PG;
            if ((rc = vd_pread_full(fm->data_fd, page, PG, slot_off(flip_cur(p, i, pg)) + (uint64_t)pg * PG)) < 0)
                return rc;
            memcpy(scratch + at, data + (at - intra), end - at);
            if ((rc = vd_pwrite_full(fm->data_fd, page, PG, slot_off(dst) + (uint64_t)pg * PG)) < 0)
                return rc;
            at = end;
            continue;
        }
        /* whole pages (or in place) with the same place: one run */
        while (end < hi && !(p->edges[i] >> (end / PG) & 1) && flip_dst(p, i, (int)(end / PG)) == dst)
            end = (end + PG < hi) ? end + PG : hi;
        if ((rc = vd_pwrite_full(fm->data_fd, data + (at - intra), end - at, slot_off(dst) + at)) < 0)
            return rc;
        at = end;
    }
    return 0;
}

/* A partial slot's checksum as the drain gives it (fastmap.h): the CRC-32C
 * of the pages of have in buf (a block's image), in order, as
 * vd_checksum_slots computes it, with VD_FM_CRC_KNOWN; 0 (not known: the
 * commit reads the slot back) when every page is zeros, so that the
 * commit finds such a block as before. */
static uint64_t partial_crc(const unsigned char *buf, uint16_t have)
{
    uint32_t crc = 0;
    int zero = 1;
    for (int pg = 0, run; (run = page_run(have, &pg)) > 0; pg += run) {
        crc = vd_crc32c(crc, buf + (size_t)pg * PG, (size_t)run * PG);
        zero = zero && vd_is_zero(buf + (size_t)pg * PG, (size_t)run * PG);
    }
    return zero ? 0 : VD_FM_CRC_KNOWN | crc;
}

/* Carry a plan's data out: the writes in place, the pages filled from
 * below, the new slots.  scratch: a block's buffer of the caller's own. */
static long write_data(struct vd_fastmap *fm, struct plan *p, const unsigned char *in, unsigned char *scratch)
{
    long rc;
    for (size_t i = 0; i < p->nb; i++) {
        uint64_t intra, hi;
        block_range(p, i, &intra, &hi);
        uint64_t n = hi - intra;
        const unsigned char *data = in;
        if (p->act[i] == INPLACE) {
            if (p->merge[i] && ((rc = fetch_below(fm, p->nb_[i], p->merge[i], scratch)) < 0 ||
                                (rc = store_pages(fm, p->base[i], p->merge[i], scratch)) < 0))
                return rc;
            /* blocks already ours in consecutive slots: one pwrite */
            uint64_t run = n, from = slot_off(p->base[i]) + intra;
            while (i + 1 < p->nb && p->act[i + 1] == INPLACE && !p->merge[i + 1] && p->base[i + 1] == p->base[i] + 1) {
                uint64_t lo, h;
                block_range(p, ++i, &lo, &h);
                run += h - lo;
            }
            if ((rc = vd_pwrite_full(fm->data_fd, data, run, from)) < 0)
                return rc;
            in += run;
            continue;
        }
        if (p->act[i] == FLIP) {
            if ((rc = flip_data(fm, p, i, intra, n, data, scratch)) < 0)
                return rc;
            in += n;
            continue;
        }
        in += n;
        if (p->act[i] == COMPARE) { /* rewriting what a snapshot shares, unchanged: keep sharing */
            if ((rc = vd_pread_full(fm->data_fd, scratch, BS, slot_off(p->base[i]))) < 0)
                return rc;
            if (memcmp(scratch, data, BS) == 0) {
                p->same[i] = 1;
                continue;
            }
        }
        uint16_t have = FULL;
        if (p->act[i] == COW) {
            have = p->nhave[i];
            if ((rc = fetch_pages(fm, p->osrc[i], p->own[i], scratch)) < 0 ||
                (rc = fetch_below(fm, p->nb_[i], p->edges[i], scratch)) < 0)
                return rc;
            memcpy(scratch + intra, data, n);
            data = scratch;
            if (have != FULL)
                p->crcw[i] = partial_crc(scratch, have);
        }
        if ((rc = store_pages(fm, p->ns[i], have, data)) < 0)
            return rc;
    }
    return 0;
}

/* Enter a plan whose data was written into the table (inner mutex held):
 * the pages written in place in their entries' masks, the pages filled
 * from below in their slots' have, the new slots as entries; the engine
 * hears of each block through the log.  Entries are looked up again: the
 * table may have grown since the plan. */
static long book(struct vd_fastmap *fm, struct vol *v, struct plan *p)
{
    long rc;
    for (size_t i = 0; i < p->nb; i++) {
        uint64_t block = p->first + i, intra, hi;
        block_range(p, i, &intra, &hi);
        uint16_t bits = pages(intra, hi - intra);
        if (p->act[i] == INPLACE) {
            struct ent *e = lookup_key(fm, v->key, block);
            if (e->lepoch != v->lepoch || p->missing[i] || e->crc_live) {
                /* first write since the volume's log flush, or pages the
                 * slot did not hold, or a slot whose checksum the engine
                 * was told: the engine must hear of it */
                if ((rc = log_block(fm, v, p->vid, block, e->slot, e->have | p->missing[i], 0, 0, 0)) < 0)
                    return rc;
                e->crc_live = 0;
                if (e->lepoch != v->lepoch) {
                    e->lepoch = v->lepoch;
                    e->mask = 0;
                }
                e->have |= p->missing[i];
            }
            e->mask |= bits;
            continue;
        }
        if (p->act[i] == FLIP) {
            struct ent *e = lookup_key(fm, v->key, block);
            uint16_t moved = bits & (uint16_t)~p->own[i];
            int news = e->lepoch != v->lepoch;
            if (e->epoch != fm->epoch) /* its first flip in this epoch */
                e->pflip = e->epoch == fm->inflight ? e->flip : 0;
            if (news) {
                e->lepoch = v->lepoch;
                e->mask = 0;
            }
            if ((moved || news || e->crc_live) &&
                (rc = log_block(fm, v, p->vid, block, e->slot, p->nhave[i], e->back, p->own[i] | bits, 0)) < 0)
                return rc;
            e->crc_live = 0;
            e->have = p->nhave[i];
            e->flip = p->own[i] | bits;
            e->epoch = fm->epoch;
            e->b = view_below(e->have, (struct below){e->back, 0, 0, FULL, FULL});
            e->mask |= bits;
            __atomic_add_fetch(&fm->st_flips, 1, __ATOMIC_RELAXED);
            continue;
        }
        if (p->same[i])
            continue; /* its slot goes back (unreserve) */
        uint16_t have = FULL;
        struct below hb = ZEROS;
        if (p->act[i] == COW) {
            have = p->nhave[i];
            hb = p->nb_[i];
            __atomic_add_fetch(&fm->st_cow, 1, __ATOMIC_RELAXED);
        } else
            bits = 0xFFFF;
        if ((rc = log_block(fm, v, p->vid, block, p->ns[i], have, 0, 0, p->crcw[i])) < 0)
            return rc;
        /* room was checked at the plan; a new slot differs from the log
         * flush's state in the pages written and, for copy-on-write, in
         * none else */
        put(fm, v->key, block, p->ns[i], fm->epoch, v->lepoch, bits, have, hb, 0, p->unv[i], 0, 0, 0);
        if (p->crcw[i])
            lookup_key(fm, v->key, block)->crc_live = 1;
        p->ns[i] = 0; /* entered */
    }
    return 0;
}

/* Give the new slots a plan did not enter (an unchanged COMPARE, a write
 * that failed) back to the reservoir (inner mutex held). */
static void unreserve(struct vd_fastmap *fm, struct plan *p)
{
    for (size_t i = 0; i < p->nb; i++)
        if (p->act[i] != INPLACE && p->ns[i])
            fm->res[fm->nres++] = p->ns[i];
}

/* A write.  Planned under the inner mutex (all or nothing goes to Python);
 * its data is then written without it, so that a slow pwrite (the page
 * cache's writeback, the journal) does not hold other requests up:
 *  - writes only in place, over pages their slots hold, enter the table
 *    first (marks of pages written) and go on beside other requests;
 *  - the others (new slots, pages filled from below) fly: their blocks stay
 *    as they were in the table, so reads see the data before the write,
 *    and no other write plans them (it waits for the landing), until the
 *    data is written and book() enters it.
 * The lock stays held for reading throughout: the engine's freezes, log
 * flushes and changes wait for every request in flight. */
static long write_once(struct vd_fastmap *fm, uint64_t vid, uint64_t off, uint32_t len, const void *buf,
                       uint64_t *dry)
{
    struct plan p = {.vid = vid, .off = off, .len = len};
    unsigned char scratch[BS] __attribute__((aligned(64)));
    struct vol *v;
    begin_io(fm);
    long rc = span(fm, vid, off, len, &p.first, &p.nb, &v);
    if (rc < 0)
        return end_io(fm, rc);
    while (overlaps_flight(fm, vid, p.first, p.nb))
        pthread_cond_wait(&fm->landed, &fm->io);
    if (fm->failed || plan_write(fm, v, &p) < 0)
        return end_io(fm, -EAGAIN);
    if (p.need > fm->nres || fm->n + fm->pending_new + p.need > MAX_ENTRIES) {
        ask_for_slots(fm);
        if (dry != NULL && p.need > fm->nres)
            *dry = fm->refills;
        return end_io(fm, -EAGAIN);
    }
    if (p.need == 0 && !p.merging) {
        /* only writes in place: marked now, under the inner mutex (a
         * shared request must not touch the table after letting go of it);
         * their slots stay fresh until the engine takes the lock for
         * writing (a freeze) */
        if ((rc = book(fm, v, &p)) < 0)
            return end_io(fm, rc);
        pthread_mutex_unlock(&fm->io);
        rc = write_data(fm, &p, buf, scratch);
        if (rc == 0)
            __atomic_add_fetch(&fm->st_writes, 1, __ATOMIC_RELAXED);
        return end_shared(fm, rc < 0 ? rc : (long)len);
    }
    for (size_t i = 0; i < p.nb; i++)
        p.ns[i] = (p.act[i] == INPLACE || p.act[i] == FLIP) ? 0 : fm->res[--fm->nres];
    struct flight *f = NULL;
    for (size_t i = 0; i < MAX_FLIGHTS && f == NULL; i++)
        if (!fm->fl[i].used)
            f = &fm->fl[i];
    if (f != NULL) { /* else (many requests at once) the data is written under the inner mutex */
        *f = (struct flight){vid, p.first, p.nb, 1};
        fm->pending_new += p.need;
        pthread_mutex_unlock(&fm->io);
    }
    rc = write_data(fm, &p, buf, scratch);
    if (f != NULL) {
        pthread_mutex_lock(&fm->io);
        f->used = 0;
        fm->pending_new -= p.need;
        pthread_cond_broadcast(&fm->landed);
    }
    if (rc == 0)
        rc = book(fm, v, &p);
    unreserve(fm, &p);
    if (fm->nres < fm->low_water)
        ask_for_slots(fm);
    if (rc < 0)
        return end_io(fm, rc);
    __atomic_add_fetch(&fm->st_writes, 1, __ATOMIC_RELAXED);
    return end_io(fm, (long)len);
}

long vd_fm_write(void *arg, uint64_t vid, uint64_t off, uint32_t len, const void *buf)
{
    return handed_back(arg, write_once(arg, vid, off, len, buf, NULL));
}

/* Wait until the engine refilled the reservoir since refill number gen
 * (1 s at most): 1 if it did.  Holds only the inner mutex, and only to
 * wait on it, never the map's lock: the engine may freeze, commit and
 * refill meanwhile. */
static int wait_for_refill(struct vd_fastmap *fm, uint64_t gen)
{
    uint64_t t0 = mono_ns();
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += 1;
    int rc = 0;
    pthread_mutex_lock(&fm->io);
    while (fm->refills == gen && !fm->failed && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&fm->refilled, &fm->io, &until);
    int refilled = fm->refills != gen && !fm->failed;
    spans_add(&fm->dry, mono_ns() - t0);
    pthread_mutex_unlock(&fm->io);
    return refilled;
}

long vd_fm_write_io(void *arg, uint64_t vid, uint64_t off, uint32_t len, const void *buf)
{
    struct vd_fastmap *fm = arg;
    for (int tries = 0;; tries++) {
        uint64_t dry = UINT64_MAX;
        long rc = write_once(fm, vid, off, len, buf, &dry);
        if (rc != -EAGAIN || dry == UINT64_MAX || tries == 4 || !wait_for_refill(fm, dry))
            return handed_back(fm, rc);
    }
}

/* ------------------------------------------------------------ intent log */

void vd_fm_set_log(struct vd_fastmap *fm, struct vd_log *L) { fm->lg = L; }

void vd_fm_log_clean(struct vd_fastmap *fm, uint64_t vid, int clean)
{
    struct vol *v = find_vol(fm, vid);
    if (v != NULL)
        v->clean = clean;
}

/* chg's order: by block, PRE_FREEZE aside */
static int cmp_chg(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a & ~PRE_FREEZE, y = *(const uint64_t *)b & ~PRE_FREEZE;
    return x < y ? -1 : x > y;
}

/* Gather the volume's record into the log's buffer and reserve its place
 * there (intentlog.c): 0 (*size 0 when there is nothing to write), or
 * -EAGAIN with nothing changed.  With the log's mutex and the map's lock
 * (for writing) held: no write is half done, and no engine operation runs. */
static long gather(struct vd_fastmap *fm, uint64_t vid, uint64_t *size, uint64_t *at)
{
    struct vd_log *L = fm->lg;
    struct vol *v = find_vol(fm, vid);
    uint64_t slots[CHG_MAX];
    uint64_t blocks[CHG_MAX];
    uint32_t masks[CHG_MAX];
    uint16_t haves[CHG_MAX];
    struct below bs[CHG_MAX];
    uint32_t count = 0;
    uint64_t npages = 0;
    *size = 0;
    if (!vd_log_usable(L) || fm->failed || v == NULL || !v->clean || v->nchg > CHG_MAX)
        return -EAGAIN;
    if (v->nchg == 0)
        return 0; /* nothing written since the volume's last log flush or freeze */
    qsort(v->chg, v->nchg, sizeof(uint64_t), cmp_chg);
    /* the table under the inner mutex (vd_fm_grow may replace it), the
     * pages without it */
    pthread_mutex_lock(&fm->io);
    for (uint32_t i = 0; i < v->nchg;) {
        uint64_t block = v->chg[i] & ~PRE_FREEZE;
        int pre = 0;
        for (; i < v->nchg && (v->chg[i] & ~PRE_FREEZE) == block; i++)
            pre |= !!(v->chg[i] & PRE_FREEZE);
        struct ent *e = lookup_key(fm, v->key, block);
        /* a block whose pages are no longer known here: the engine's job.
         * One changed before the freeze goes whole (its pages as the head
         * reads them now): none of its view may be unverified */
        int known = e != NULL && (e->slot != 0 ? (pre ? !e->unverified : e->lepoch == v->lepoch && e->mask != 0)
                                               : (pre || e->lepoch == v->lepoch)); /* zeros: a discard */
        if (!known) {
            pthread_mutex_unlock(&fm->io);
            return -EAGAIN;
        }
        slots[count] = e->slot;
        haves[count] = e->have;
        bs[count] = e->b;
        blocks[count] = e->block;
        masks[count] = e->slot == 0 ? 0 : pre ? FULL : e->mask; /* 0: the block reads as zeros */
        npages += (uint64_t)__builtin_popcount(masks[count++]);
    }
    pthread_mutex_unlock(&fm->io);
    if (vd_log_room(L, npages) < 0)
        return -EAGAIN; /* the engine grows the log, or commits */
    unsigned char *p = vd_log_body(L);
    for (uint32_t c = 0; c < count; c++) {
        /* one pread per run of pages from one slot of the view (a flipped
         * block's pages not in have are in its back slot) */
        for (int pg = 0, run; (run = page_run((uint16_t)masks[c], &pg)) > 0; pg += run) {
            for (int q = pg, r; q < pg + run; q += r) {
                uint64_t src = source(slots[c], haves[c], bs[c], q);
                for (r = 1; q + r < pg + run && source(slots[c], haves[c], bs[c], q + r) == src; r++)
                    ;
                if (src == 0) /* zeros below (a block carried whole) */
                    memset(p, 0, (size_t)r * PG);
                else if (vd_pread_full(fm->data_fd, p, (size_t)r * PG, slot_off(src) + (uint64_t)q * PG) < 0)
                    return -EAGAIN;
                p += (size_t)r * PG;
            }
        }
    }
    /* the engine hears of the flush after the blocks it covers (the drain
     * keeps the order), and forgets them as unlogged */
    pthread_mutex_lock(&fm->io);
    int rc = log_block(fm, NULL, vid, VD_FM_FLUSHED, 0, 0, 0, 0, 0);
    pthread_mutex_unlock(&fm->io);
    if (rc < 0)
        return -EAGAIN;
    *size = vd_log_seal(L, vid, blocks, masks, count, npages, at);
    new_log_epoch(fm, v); /* the next write to any block is news again */
    return 0;
}

long vd_fm_fsync(void *arg, uint64_t vid)
{
    struct vd_fastmap *fm = arg;
    struct vd_log *L = fm->lg;
    uint64_t size = 0, at = 0;
    if (L == NULL)
        return -EAGAIN;
    vd_log_lock(L);
    vd_log_keep_ahead(L); /* room for the record, without the map's lock */
    pthread_rwlock_wrlock(&fm->lock);
    long rc = gather(fm, vid, &size, &at);
    pthread_rwlock_unlock(&fm->lock);
    /* other requests go on meanwhile; the next log writer waits.  A write
     * that failed turned the log off: what the record held is still in the
     * engine's overlay, and the engine's flush commits it */
    if (rc == 0 && size > 0 && vd_log_write(L, at, size) < 0)
        rc = -EAGAIN;
    vd_log_unlock(L);
    return rc;
}
