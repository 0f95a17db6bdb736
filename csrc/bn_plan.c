/* bn_plan.c - cutting a tensor into work items (bn_make_plan: by shape alone, never by thread count),
 * and the thread controls over the OpenMP runtime. */
#include "bn_internal.h"

void bn_make_plan(bn_plan *p, bn_dims d, size_t elsize, int nthreads, ptrdiff_t min_elems)
{
    p->N = d.N; p->C = d.C; p->S = d.S; p->W = d.C * d.S;
    p->colmode = d.S < BN_ROW_MIN_S;
    if ((double)d.N * (double)p->W < (double)min_elems || nthreads < 1) nthreads = 1;
    if (p->colmode) {
        /* Whole rows where they fit the scratch: long unit-stride inner loops over the channels, and
         * the hardware prefetcher sees plain sequential streams. A channel's statistics then need all
         * row groups, so the normalize pass reuses the data from cache only when the whole block does. */
        ptrdiff_t cpb = BN_COL_MAX_W / d.S;
        if (cpb < 1) cpb = 1;
        if (cpb > d.C) cpb = d.C;
        p->ch_per_block = cpb;
        p->nblocks = (d.C + cpb - 1) / cpb;
        double block_bytes = (double)d.N * (double)(cpb * d.S) * (double)elsize;
        if (block_bytes <= BN_CACHE_ITEM_BYTES) {
            p->rows_per_group = d.N;
        } else {
            ptrdiff_t r = BN_COL_GROUP_ELEMS / (cpb * d.S);
            r = (r + BN_COL_ROWS - 1) / BN_COL_ROWS * BN_COL_ROWS;
            p->rows_per_group = r < d.N ? r : d.N;
        }
    } else {
        /* One channel per item, and no attempt to keep a block of channels in cache between its
         * statistics and its normalize pass: a channel's rows are short runs C * S apart, and reading
         * memory in such strided runs costs more than a second sequential pass over x (kernel_bench
         * showed it about twice as slow for NCHW float32, in place or through a contiguous copy).
         * A group holds enough rows of a channel (>= BN_ROW_GROUP_ELEMS values) that the per-group
         * partials stay a small fraction of x. */
        ptrdiff_t r = (BN_ROW_GROUP_ELEMS + d.S - 1) / d.S;
        p->ch_per_block = 1;
        p->rows_per_group = r < d.N ? r : d.N;
        p->nblocks = (d.C + p->ch_per_block - 1) / p->ch_per_block;
    }
    /* At most BN_MAX_GROUPS row groups: the per-group partials (C * ngroups of them) stay O(C) memory
     * however large N is. */
    if ((d.N + p->rows_per_group - 1) / p->rows_per_group > BN_MAX_GROUPS) {
        ptrdiff_t r = (d.N + BN_MAX_GROUPS - 1) / BN_MAX_GROUPS;
        if (p->colmode) r = (r + BN_COL_ROWS - 1) / BN_COL_ROWS * BN_COL_ROWS;
        p->rows_per_group = r < d.N ? r : d.N;
    }
    p->ngroups = (d.N + p->rows_per_group - 1) / p->rows_per_group;
    p->nitems = p->nblocks * p->ngroups;
    double item_bytes = (double)p->rows_per_group * (double)(p->ch_per_block * d.S) * (double)elsize;
    p->fused = p->ngroups == 1 && item_bytes <= BN_CACHE_ITEM_BYTES;
    if (nthreads > p->nitems) nthreads = (int)p->nitems;
#ifdef _OPENMP
    /* A thread count far beyond the CPUs (set_num_threads(10000)) would only start threads that wait
     * for a core; cap the team at twice the processors OpenMP may use. Results do not depend on it.
     * omp_get_num_procs is a sched_getaffinity system call (a tenth of a (2, 4) call's time), and the
     * cap cannot bite below 3 threads. */
    if (nthreads > 2 && nthreads > 2 * omp_get_num_procs()) nthreads = 2 * omp_get_num_procs();
#endif
    p->nthreads = nthreads < 1 ? 1 : nthreads;
}

/*
 * fork: GNU libgomp's thread pool does not survive fork(), and a child's first parallel region waits
 * forever for the parent's workers. Once a kernel has run on several threads (so the pool exists), a
 * pthread_atfork child handler marks the child, which then runs the kernels on one thread until the user
 * sets a thread count again (PyTorch does the same). A child of a process that never went parallel, and
 * processes started with spawn or forkserver, keep full parallelism.
 */
#if defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
#define BN_HAVE_ATFORK 1
#else
#define BN_HAVE_ATFORK 0
#endif

static volatile int pool_started = 0, forked_child = 0;

#if BN_HAVE_ATFORK
static void on_fork_child(void)
{
    if (pool_started) forked_child = 1;
    pool_started = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }
#endif

void bn_note_parallel(void)
{
    if (pool_started) return;
#if BN_HAVE_ATFORK
    pthread_once(&atfork_once, register_atfork);
#endif
    pool_started = 1;
}

int bn_get_num_threads(void)
{
#ifdef _OPENMP
    return forked_child ? 1 : omp_get_max_threads();
#else
    return 1;
#endif
}

void bn_set_num_threads(int n)
{
#ifdef _OPENMP
    if (n >= 1) {
        forked_child = 0; /* the user's explicit choice, also in a forked child */
        omp_set_num_threads(n);
    }
#else
    (void)n;
#endif
}

int bn_openmp_version(void)
{
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}
