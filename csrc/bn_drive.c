/* bn_drive.c - the one OpenMP driver every kernel runs on: reduce -> finish -> apply over a plan (the
 * steps are described beside bn_job in bn_internal.h). Type-independent: the steps are the kernels'. */
#include <string.h>
#include "bn_internal.h"

/* The steps over the plan, as run by each thread of a team: the loops are OpenMP worksharing constructs
 * that also work orphaned, outside any parallel region, where the calling thread is a team of one. */
static void drive_team(const bn_job *job, double *scratch, char *parts, int fused)
{
    const bn_plan *p = job->plan;
    const ptrdiff_t C = p->C, per = job->scratch_doubles;
    const size_t pb = job->part_bytes;
    double *scr = scratch ? scratch + per * bn_thread_num() : NULL;
    if (fused) {
        BN_PRAGMA(omp for schedule(static))
        for (ptrdiff_t it = 0; it < p->nitems; it++) {
            const bn_item w = bn_item_at(p, it);
            job->reduce(job, w, scr, parts + pb * (size_t)w.c0);
            job->finish(job, w.c0, w.c1, parts);
            job->apply(job, w, scr);
        }
        return;
    }
    if (job->reduce) {
        BN_PRAGMA(omp for schedule(static))
        for (ptrdiff_t it = 0; it < p->nitems; it++) {
            const bn_item w = bn_item_at(p, it);
            const ptrdiff_t g = w.n0 / p->rows_per_group;
            job->reduce(job, w, scr, parts + pb * (size_t)(g * C + w.c0));
        }
    }
    if (job->finish) {
        /* schedule(static) by hand: one call per thread over a contiguous range of channels */
        const ptrdiff_t nt = bn_team_size(), t = bn_thread_num(), chunk = (C + nt - 1) / nt;
        const ptrdiff_t c0 = t * chunk, c1 = c0 + chunk < C ? c0 + chunk : C;
        if (c0 < c1) job->finish(job, c0, c1, parts);
        BN_PRAGMA(omp barrier)
    }
    if (job->apply_rows && !p->colmode) {
        /* schedule(static) by hand: one call per thread over a contiguous range of rows */
        const ptrdiff_t rows = p->N * C, nt = bn_team_size(), t = bn_thread_num();
        const ptrdiff_t chunk = (rows + nt - 1) / nt, r0 = t * chunk;
        const ptrdiff_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
        if (r0 < r1) job->apply_rows(job, r0, r1);
    } else if (job->apply) {
        BN_PRAGMA(omp for schedule(static))
        for (ptrdiff_t it = 0; it < p->nitems; it++) job->apply(job, bn_item_at(p, it), scr);
    }
}

/* Scratch and partial results up to this many bytes live on the stack: malloc and free of a few KiB
 * were a visible part of a call on a tensor of a few hundred values. Small enough for any thread's stack. */
#define BN_STACK_BYTES 8192

int bn_drive(const bn_job *job)
{
    const bn_plan *p = job->plan;
    const size_t scratch_bytes = sizeof(double) * (size_t)job->scratch_doubles * (size_t)p->nthreads;
    const size_t parts_bytes = job->reduce ? job->part_bytes * (size_t)p->C * (size_t)p->ngroups : 0;
    double stack[BN_STACK_BYTES / sizeof(double)];
    double *scratch = NULL, *heap = NULL;
    char *parts = NULL;
    /* parts first (their slots are doubles), scratch after, both in one block */
    const size_t parts_doubles = (parts_bytes + sizeof(double) - 1) / sizeof(double);
    const size_t total = parts_bytes ? parts_doubles * sizeof(double) + scratch_bytes : scratch_bytes;
    if (total > sizeof stack && !(heap = bn_scratch_take(total))) return BN_ENOMEM;
    double *block = heap ? heap : stack;
    if (parts_bytes) parts = (char *)block;
    if (scratch_bytes) scratch = block + (parts_bytes ? parts_doubles : 0);
    /* Reusing x from cache needs a whole channel block in one item (one row group). */
    const int fused = job->reduce && job->apply && p->fused;
    if (p->nthreads > 1) {
        bn_note_parallel();
        BN_PRAGMA(omp parallel num_threads(p->nthreads))
        drive_team(job, scratch, parts, fused);
    } else {
        /* no parallel region for one thread: entering one costs a call on a small tensor dearly */
        drive_team(job, scratch, parts, fused);
    }
    bn_scratch_give(heap);
    return BN_OK;
}

/* ---- bn_scratch_take / bn_scratch_give (see bn_internal.h) ---- */

/* A block is a header (its capacity) and the caller's bytes after it; the header keeps malloc's alignment. */
#define BN_SCRATCH_HEADER 64

static void *scratch_new(size_t bytes)
{
    if (bytes > (size_t)-1 - BN_SCRATCH_HEADER) return NULL;
    char *b = malloc(BN_SCRATCH_HEADER + bytes);
    if (b == NULL) return NULL;
    memcpy(b, &bytes, sizeof bytes);
    return b + BN_SCRATCH_HEADER;
}

static void scratch_free(void *p)
{
    if (p) free((char *)p - BN_SCRATCH_HEADER);
}

#if BN_SCRATCH_KEEPS
#include <stdatomic.h>
static _Atomic(void *) scratch_slots[BN_SCRATCH_SLOTS];

static size_t scratch_capacity(const void *p)
{
    size_t cap;
    memcpy(&cap, (const char *)p - BN_SCRATCH_HEADER, sizeof cap);
    return cap;
}

/* Whether a kept block of capacity cap serves a request of bytes. Under AddressSanitizer only an exact
 * fit, so that a kernel writing past its request still runs into the allocation's redzone. */
static int scratch_fits(size_t cap, size_t bytes)
{
#if defined(__SANITIZE_ADDRESS__)
    return cap == bytes;
#else
    return cap >= bytes;
#endif
}

/* All kept blocks are taken out at once, the smallest that serves is used and the others go back: a call
 * takes two blocks of different sizes (coefficients, then the driver's), and a first fit would hand the
 * larger one to the smaller request. Another thread meanwhile finds the slots empty and allocates. */
void *bn_scratch_take(size_t bytes)
{
    void *got[BN_SCRATCH_SLOTS];
    int n = 0, best = -1;
    for (int i = 0; i < BN_SCRATCH_SLOTS; i++) {
        if (atomic_load_explicit(&scratch_slots[i], memory_order_relaxed) == NULL) continue;
        void *p = atomic_exchange(&scratch_slots[i], NULL);
        if (p != NULL) got[n++] = p;
    }
    for (int j = 0; j < n; j++)
        if (scratch_fits(scratch_capacity(got[j]), bytes) &&
            (best < 0 || scratch_capacity(got[j]) < scratch_capacity(got[best])))
            best = j;
    for (int j = 0; j < n; j++)
        if (j != best) bn_scratch_give(got[j]);
    return best >= 0 ? got[best] : scratch_new(bytes);
}

void bn_scratch_give(void *p)
{
    if (p == NULL) return;
    if (scratch_capacity(p) <= BN_SCRATCH_KEEP_BYTES)
        for (int i = 0; i < BN_SCRATCH_SLOTS; i++) {
            void *expected = NULL;
            if (atomic_compare_exchange_strong(&scratch_slots[i], &expected, p)) return;
        }
    scratch_free(p);
}
#else
void *bn_scratch_take(size_t bytes)
{
    return scratch_new(bytes);
}

void bn_scratch_give(void *p)
{
    scratch_free(p);
}
#endif
