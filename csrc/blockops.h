/* blockops.h - C interface of vdisk's hot per-block work (see blockops.c). */
#ifndef VDISK_BLOCKOPS_H
#define VDISK_BLOCKOPS_H
#include <stdint.h>
#include <stddef.h>

uint32_t vd_crc32c(uint32_t crc, const unsigned char *buf, size_t len);
int vd_have_hw_crc(void);
int vd_is_zero(const unsigned char *buf, size_t len);
uint32_t vd_crc32c_is_zero(const unsigned char *buf, size_t len, int *is_zero);
long vd_diff_sectors(const unsigned char *a, const unsigned char *b, size_t len,
                     size_t sector, unsigned char *bitmap);
int vd_punch_hole(int fd, long long offset, long long len);
int vd_start_writeback(int fd);
/* len bytes at off (past the end of the file: zeros); 0 or -errno */
int vd_pread_full(int fd, void *buf, size_t len, uint64_t off);
int vd_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int vd_checksum_slots(int fd, const uint64_t *offsets, const uint16_t *masks, size_t n, size_t block_size,
                      unsigned char *buf, uint32_t *crcs, unsigned char *zero);
#endif
