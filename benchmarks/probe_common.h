/* probe_common.h - what the standalone C probes of benchmarks/ share: a monotonic clock, and large buffers
 * as NumPy gets them (2 MiB aligned, MADV_HUGEPAGE, zeroed). A file that includes it defines its feature
 * macro first (_GNU_SOURCE, or _POSIX_C_SOURCE 200112L), for clock_gettime and posix_memalign. */
#ifndef PROBE_COMMON_H
#define PROBE_COMMON_H
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

static inline double probe_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* NULL when out of memory */
static inline void *probe_alloc(size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, 2 << 20, bytes)) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    memset(p, 0, bytes);
    return p;
}

#endif
