/*
 * blockops.c - the hot per-block work of vdisk's storage engine.
 *
 * Everything here is pure computation over caller-owned buffers (plus one
 * thin fallocate wrapper).  The Python side (vdisk.engine.native) calls these
 * through cffi in API mode; cffi releases the GIL around every call, so a
 * checksum of a 64 KiB block does not stall other Python threads.
 *
 * Functions:
 *   vd_crc32c(crc, buf, len)      CRC-32C (Castagnoli), hardware if SSE4.2
 *   vd_is_zero(buf, len)          1 if every byte is zero
 *   vd_crc32c_is_zero(buf,len,*z) both in one pass (used at commit)
 *   vd_diff_sectors(a,b,len,sector,bitmap) per-sector difference bitmap
 *   vd_punch_hole(fd, off, len)   fallocate(PUNCH_HOLE|KEEP_SIZE)
 *   vd_start_writeback(fd)        sync_file_range(SYNC_FILE_RANGE_WRITE), 4 MiB a call
 *   vd_checksum_slots(...)        vd_crc32c_is_zero of many slots read from a file
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <linux/falloc.h>
#include <sys/stat.h>

#include "blockops.h"

/* ---- CRC-32C, software (slicing-by-8) ---------------------------------- */

static uint32_t crc_table[8][256];
static int crc_table_ready = 0;
static int have_sse42 = -1;

static void crc_init_table(void)
{
    const uint32_t poly = 0x82F63B78u; /* reflected Castagnoli */
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = crc_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = crc_table[0][c & 0xff] ^ (c >> 8);
            crc_table[t][i] = c;
        }
    }
    crc_table_ready = 1;
}

static uint32_t crc32c_sw(uint32_t crc, const unsigned char *p, size_t len)
{
    if (!crc_table_ready)
        crc_init_table();
    crc = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc_table[7][v & 0xff] ^ crc_table[6][(v >> 8) & 0xff] ^
              crc_table[5][(v >> 16) & 0xff] ^ crc_table[4][(v >> 24) & 0xff] ^
              crc_table[3][(v >> 32) & 0xff] ^ crc_table[2][(v >> 40) & 0xff] ^
              crc_table[1][(v >> 48) & 0xff] ^ crc_table[0][(v >> 56) & 0xff];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const unsigned char *p, size_t len)
{
    uint64_t c = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    while (len--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

uint32_t vd_crc32c(uint32_t crc, const unsigned char *buf, size_t len)
{
#if defined(__x86_64__)
    if (have_sse42 < 0) {
        __builtin_cpu_init();
        have_sse42 = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    if (have_sse42)
        return crc32c_hw(crc, buf, len);
#endif
    return crc32c_sw(crc, buf, len);
}

int vd_have_hw_crc(void)
{
#if defined(__x86_64__)
    if (have_sse42 < 0) {
        __builtin_cpu_init();
        have_sse42 = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    return have_sse42;
#else
    return 0;
#endif
}

/* ---- zero detection ------------------------------------------------------ */

int vd_is_zero(const unsigned char *buf, size_t len)
{
    size_t i = 0;
    while (i < len && ((uintptr_t)(buf + i) & 7)) {
        if (buf[i])
            return 0;
        i++;
    }
    for (; i + 64 <= len; i += 64) {
        uint64_t acc = 0, v;
        for (int k = 0; k < 64; k += 8) {
            memcpy(&v, buf + i + k, 8);
            acc |= v;
        }
        if (acc)
            return 0;
    }
    for (; i < len; i++)
        if (buf[i])
            return 0;
    return 1;
}

uint32_t vd_crc32c_is_zero(const unsigned char *buf, size_t len, int *is_zero)
{
    /* Zero check first: it is cheap and short-circuits on the first
     * non-zero word, and an all-zero block needs no checksum. */
    *is_zero = vd_is_zero(buf, len);
    if (*is_zero)
        return 0;
    return vd_crc32c(0, buf, len);
}

/* ---- per-sector diff ------------------------------------------------------ */

long vd_diff_sectors(const unsigned char *a, const unsigned char *b, size_t len,
                     size_t sector, unsigned char *bitmap)
{
    /* bitmap must hold ceil(len/sector/8) bytes; bit i set = sector i differs.
     * Returns the number of differing sectors, or -1 on bad arguments. */
    if (sector == 0 || len % sector)
        return -1;
    size_t n = len / sector;
    memset(bitmap, 0, (n + 7) / 8);
    long count = 0;
    for (size_t i = 0; i < n; i++) {
        if (memcmp(a + i * sector, b + i * sector, sector) != 0) {
            bitmap[i / 8] |= (unsigned char)(1u << (i % 8));
            count++;
        }
    }
    return count;
}

/* ---- early writeback -------------------------------------------------------- */

/* The range one sync_file_range call covers.  Writing back the dirty pages
 * of a range runs in the kernel without a point where the scheduler can
 * switch tasks: on ext4, each page written to a preallocated (unwritten)
 * extent splits the extent tree there, so a whole-file call on a pool's
 * data file ran the CPU for 10-56 ms at a time, and every I/O thread,
 * loop worker and block completion queued behind it on that CPU waited as
 * long (docs/perf/2026-12-03-writeback-chunks.md).  A call per 4 MiB (64
 * blocks) returns to user space, where the scheduler may run them, after
 * a fraction of a millisecond. */
#define WRITEBACK_CHUNK (4LL << 20)

int vd_start_writeback(int fd)
{
    /* Start writing dirty pages back without waiting, so that the fdatasync
     * of the next commit finds little left to do.  A clean range costs a
     * lookup of the page cache's dirty tags. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    for (off_t off = 0; off < st.st_size; off += WRITEBACK_CHUNK)
        if (sync_file_range(fd, off, WRITEBACK_CHUNK, SYNC_FILE_RANGE_WRITE) < 0)
            return -errno;
    return 0;
}

/* ---- discard helper ------------------------------------------------------- */

int vd_punch_hole(int fd, long long offset, long long len)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offset, (off_t)len) < 0)
        return -errno;
    return 0;
}

/* ---- whole slots at commit --------------------------------------------- */

/* ---- whole buffers at an offset ------------------------------------------ */

int vd_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) { /* past the end of a sparse file: zeros */
            memset(p, 0, len);
            return 0;
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int vd_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    const unsigned char *p = buf;
    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* For each of n slots of block_size bytes at offsets[i] in fd: crcs[i] and
 * zero[i].  masks[i] (masks NULL: all whole) says which of the slot's 16
 * pages it holds: a whole slot's crc is vd_crc32c_is_zero's (0 when all
 * zeros); a partial one's is the CRC-32C of its pages in order, and only
 * they are read (the others may never have been written: reading them
 * would fill the page cache with zeros).  0, or -errno of the first failed
 * pread.  The buffer is the caller's (block_size bytes), so concurrent
 * callers do not share. */
int vd_checksum_slots(int fd, const uint64_t *offsets, const uint16_t *masks, size_t n, size_t block_size,
                      unsigned char *buf, uint32_t *crcs, unsigned char *zero)
{
    size_t pg = block_size / 16;
    for (size_t i = 0; i < n; i++) {
        uint16_t mask = masks ? masks[i] : 0xFFFF;
        int rc, z = 1;
        if (mask == 0xFFFF) {
            if ((rc = vd_pread_full(fd, buf, block_size, offsets[i])) < 0)
                return rc;
            crcs[i] = vd_crc32c_is_zero(buf, block_size, &z);
            zero[i] = (unsigned char)z;
            continue;
        }
        uint32_t crc = 0;
        for (size_t p = 0; p < 16;) {
            if (!(mask >> p & 1)) {
                p++;
                continue;
            }
            size_t run = 1;
            while (p + run < 16 && (mask >> (p + run) & 1))
                run++;
            if ((rc = vd_pread_full(fd, buf, run * pg, offsets[i] + p * pg)) < 0)
                return rc;
            crc = vd_crc32c(crc, buf, run * pg);
            z = z && vd_is_zero(buf, run * pg);
            p += run;
        }
        crcs[i] = crc;
        zero[i] = (unsigned char)z;
    }
    return 0;
}
