/* vdisk-load: the consistency workload and its checks, inside a guest.
 *
 * Content is derived from (seed, name), so a check regenerates what each
 * file or page must hold instead of carrying checksums around.
 *
 *   vdisk-load files DIR SEED TAG     create f000001, f000002, ... of random
 *                                     size and content; fsync each file and
 *                                     DIR, then print "TAG fNNNNNN" (acked)
 *   vdisk-load rounds FILE PAGES SEED rewrite FILE's PAGES 4 KiB pages in
 *                                     rounds, page by page; fdatasync; print
 *                                     "round R" (acked)
 *   vdisk-load check-files DIR SEED N print "fNNNNNN STATE" for 1..N: whole,
 *                                     missing, partial, wrong (full size,
 *                                     other content), unreadable
 *   vdisk-load check-rounds FILE PAGES SEED
 *                                     print "rounds MIN MAX bad B": the
 *                                     oldest and newest round any page holds
 *                                     (0: never written) and the pages that
 *                                     hold no round's content
 * SIGTERM ends the writers after the current file or page.
 * Built static by vdisk.vm.assets (gcc -static); no library beyond libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096
static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static uint64_t mix(uint64_t x) { /* splitmix64 */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fill(unsigned char *buf, size_t n, uint64_t key) {
    uint64_t s = mix(key);
    for (size_t i = 0; i < n; i += 8) {
        s = mix(s);
        size_t k = n - i < 8 ? n - i : 8;
        memcpy(buf + i, &s, k);
    }
}

static size_t file_size(uint64_t seed, unsigned n) {
    static const size_t sizes[] = {4096, 16384, 65536, 200000};
    return sizes[mix(seed * 1000003ULL + n) % 4];
}

static uint64_t file_key(uint64_t seed, unsigned n) { return mix(seed) ^ (0xf11e5ULL << 40) ^ n; }
static uint64_t page_key(uint64_t seed, uint32_t r, uint32_t p) { return mix(seed ^ ((uint64_t)r << 32)) ^ p; }

static int die(const char *what) { fprintf(stderr, "vdisk-load: %s: %s\n", what, strerror(errno)); return 1; }

static int write_all(int fd, const unsigned char *b, size_t n, off_t off) {
    while (n) {
        ssize_t w = pwrite(fd, b, n, off);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        b += w; n -= (size_t)w; off += w;
    }
    return 0;
}

static int files(const char *dir, uint64_t seed, const char *tag) {
    static unsigned char buf[200000];
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd < 0) return die(dir);
    for (unsigned n = 1; !stop; n++) {
        char name[32];
        snprintf(name, sizeof name, "f%06u", n);
        size_t size = file_size(seed, n);
        fill(buf, size, file_key(seed, n));
        int fd = openat(dfd, name, O_CREAT | O_EXCL | O_WRONLY, 0644);
        if (fd < 0) return die(name);
        if (write_all(fd, buf, size, 0) || fsync(fd)) return die(name);
        close(fd);
        if (fsync(dfd)) return die(dir);
        printf("%s %s\n", tag, name);
        fflush(stdout);
    }
    return 0;
}

static void page(unsigned char *b, uint64_t seed, uint32_t r, uint32_t p) {
    fill(b, PAGE, page_key(seed, r, p));
    memcpy(b, "VDRP", 4);
    memcpy(b + 4, &r, 4);
    memcpy(b + 8, &p, 4);
}

static int rounds(const char *path, uint32_t pages, uint64_t seed) {
    unsigned char b[PAGE];
    int fd = open(path, O_CREAT | O_RDWR, 0644);
    if (fd < 0) return die(path);
    for (uint32_t r = 1; !stop; r++) {
        for (uint32_t p = 0; p < pages; p++) {
            page(b, seed, r, p);
            if (write_all(fd, b, PAGE, (off_t)p * PAGE)) return die(path);
        }
        if (fdatasync(fd)) return die(path);
        printf("round %u\n", r);
        fflush(stdout);
    }
    return 0;
}

static int check_files(const char *dir, uint64_t seed, unsigned count) {
    static unsigned char want[200000], got[200001];
    for (unsigned n = 1; n <= count; n++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/f%06u", dir, n);
        size_t size = file_size(seed, n);
        fill(want, size, file_key(seed, n));
        int fd = open(path, O_RDONLY);
        const char *state;
        if (fd < 0) {
            state = errno == ENOENT ? "missing" : "unreadable";
        } else {
            size_t len = 0;
            ssize_t r;
            while ((r = read(fd, got + len, sizeof got - len)) > 0) len += (size_t)r;
            close(fd);
            if (r < 0) state = "unreadable";
            else if (len == size && !memcmp(got, want, size)) state = "whole";
            else if (len == size) state = "wrong";
            else state = "partial";
        }
        printf("f%06u %s\n", n, state);
    }
    return 0;
}

static int check_rounds(const char *path, uint32_t pages, uint64_t seed) {
    unsigned char b[PAGE], w[PAGE];
    static const unsigned char zero[PAGE];
    int fd = open(path, O_RDONLY);
    if (fd < 0) return die(path);
    uint32_t lo = UINT32_MAX, hi = 0, bad = 0;
    for (uint32_t p = 0; p < pages; p++) {
        ssize_t n = pread(fd, b, PAGE, (off_t)p * PAGE);
        uint32_t r = 0;
        if (n < 0) return die(path);
        if (n == PAGE && memcmp(b, zero, PAGE)) {
            uint32_t pp;
            memcpy(&r, b + 4, 4);
            memcpy(&pp, b + 8, 4);
            page(w, seed, r, p);
            if (pp != p || memcmp(b, w, PAGE)) { bad++; continue; }
        }
        if (r < lo) lo = r;
        if (r > hi) hi = r;
    }
    printf("rounds %u %u bad %u\n", lo == UINT32_MAX ? 0 : lo, hi, bad);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGTERM, on_term);
    if (argc == 5 && !strcmp(argv[1], "files")) return files(argv[2], strtoull(argv[3], 0, 10), argv[4]);
    if (argc == 5 && !strcmp(argv[1], "rounds")) return rounds(argv[2], strtoul(argv[3], 0, 10), strtoull(argv[4], 0, 10));
    if (argc == 5 && !strcmp(argv[1], "check-files")) return check_files(argv[2], strtoull(argv[3], 0, 10), strtoul(argv[4], 0, 10));
    if (argc == 5 && !strcmp(argv[1], "check-rounds")) return check_rounds(argv[2], strtoul(argv[3], 0, 10), strtoull(argv[4], 0, 10));
    fprintf(stderr, "usage: vdisk-load files DIR SEED TAG | rounds FILE PAGES SEED | "
                    "check-files DIR SEED N | check-rounds FILE PAGES SEED\n");
    return 2;
}
