/* logrecord.h - the intent log's record layout (docs/format.md, "The intent
 * log"), written once: csrc/fastmap.c writes records with it, and
 * vdisk.engine.format takes its sizes and offsets from it through cffi
 * (_build_native.py reads this file's declarations).  Integers are little
 * endian on disk; both writers store them byte by byte at these offsets. */
#ifndef VDISK_LOGRECORD_H
#define VDISK_LOGRECORD_H
#include <stdint.h>

/* A record: this header, padded to VD_LOG_HEADER bytes with its entries
 * and zeros, then one VD_LOG_PAGE for each page of each entry's mask, entry
 * by entry, pages in ascending order. */
struct vd_log_head {
    char magic[8];    /* vd_log_magic */
    uint64_t gen;     /* log_gen of the LMDB state it applies to */
    uint64_t seq;     /* 0 for a generation's first record, then +1 */
    uint64_t vid;     /* the volume */
    uint32_t count;   /* entries, at most VD_LOG_MAX_ENTRIES */
    uint32_t crc;     /* CRC-32C of the header (this field zero), then of the pages */
    uint8_t zero[24]; /* entries start at sizeof(struct vd_log_head) */
};
struct vd_log_entry {
    uint64_t block;
    uint32_t mask; /* the pages that follow; 0: the block now reads as zeros */
    uint32_t zero;
};
enum {
    VD_LOG_HEADER = 4096,
    VD_LOG_PAGE = 4096,
    /* (VD_LOG_HEADER - sizeof(struct vd_log_head)) / sizeof(struct vd_log_entry) */
    VD_LOG_MAX_ENTRIES = 252
};
extern const char vd_log_magic[9]; /* "vdlogv2\n" and a NUL */
#endif
