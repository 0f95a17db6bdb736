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

/* ---- bn_scratch_take / bn_scratch_give and bn_block_* (see bn_internal.h and batchnorm.h) ---- */

/* A block's bytes start on a 64-byte boundary (a cache line: vector loads from a pooled NumPy array
 * then never straddle two; malloc's 16-byte alignment cost (64, 512) float32 inference ~10%), with
 * malloc's own pointer and the capacity in the header before them. */
#define BN_SCRATCH_ALIGN 64
typedef struct {
    void *raw;
    size_t cap;
} bn_block_header;

static bn_block_header *scratch_header(const void *p)
{
    return (bn_block_header *)((char *)(uintptr_t)p - sizeof(bn_block_header));
}

static void *scratch_new(size_t bytes)
{
    const size_t extra = sizeof(bn_block_header) + BN_SCRATCH_ALIGN;
    if (bytes > (size_t)-1 - extra) return NULL;
    char *raw = malloc(extra + bytes);
    if (raw == NULL) return NULL;
    uintptr_t at = (uintptr_t)(raw + sizeof(bn_block_header));
    char *p = raw + sizeof(bn_block_header) + ((BN_SCRATCH_ALIGN - at % BN_SCRATCH_ALIGN) % BN_SCRATCH_ALIGN);
    bn_block_header h = {raw, bytes};
    memcpy(scratch_header(p), &h, sizeof h);
    return p;
}

static void scratch_free(void *p)
{
    if (p) {
        bn_block_header h;
        memcpy(&h, scratch_header(p), sizeof h);
        free(h.raw);
    }
}

static size_t scratch_capacity(const void *p)
{
    bn_block_header h;
    memcpy(&h, scratch_header(p), sizeof h);
    return h.cap;
}

/* The block pool's fit: a block serves, or keeps through a resize, requests of more than half its size
 * (an array may outlive the call and should not hold much more than it uses). */
static int snug_fit(size_t cap, size_t bytes)
{
    return cap >= bytes && cap / 2 < bytes;
}

#if BN_SCRATCH_KEEPS
#include <stdatomic.h>

/* Kept blocks: `n` slots, each empty or holding a freed block of at most `keep` bytes; with `limit`, the
 * kept blocks' capacities (`kept`) add up to at most *limit. */
typedef struct {
    _Atomic(void *) *slots;
    _Atomic(unsigned) *turn; /* the slot a full pool's next freed block displaces */
    int n;
    size_t keep;
    int snug; /* serve only requests of more than half a block (blocks that outlive the call) */
    _Atomic(size_t) *kept, *limit;
} bn_pool;

static _Atomic(void *) scratch_slots[BN_SCRATCH_SLOTS], block_slots[BN_BLOCK_SLOTS], large_slots[BN_LARGE_SLOTS];
static _Atomic(unsigned) scratch_turn, block_turn, large_turn;
static _Atomic(size_t) large_kept, large_limit = BN_LARGE_LIMIT_DEFAULT;
static const bn_pool scratch_pool = {scratch_slots, &scratch_turn, BN_SCRATCH_SLOTS, BN_SCRATCH_KEEP_BYTES, 0,
                                     NULL, NULL};
static const bn_pool block_pool = {block_slots, &block_turn, BN_BLOCK_SLOTS, BN_BLOCK_MAX_BYTES, 1, NULL, NULL};
static const bn_pool large_pool = {large_slots, &large_turn, BN_LARGE_SLOTS, (size_t)-1, 1, &large_kept,
                                   &large_limit};

/* Whether a kept block of capacity cap serves a request of bytes. Under AddressSanitizer only an exact
 * fit, so that a kernel writing past its request still runs into the allocation's redzone. */
static int pool_fits(const bn_pool *pool, size_t cap, size_t bytes)
{
#if defined(__SANITIZE_ADDRESS__)
    (void)pool;
    return cap == bytes;
#else
    return pool->snug ? snug_fit(cap, bytes) : cap >= bytes;
#endif
}

/* A block leaves the pool (taken, displaced or released): its bytes no longer count against the limit. */
static void *pool_unkeep(const bn_pool *pool, void *p)
{
    if (p != NULL && pool->kept) atomic_fetch_sub(pool->kept, scratch_capacity(p));
    return p;
}

/* The slot next in turn takes p (NULL: is emptied), and the block it held is freed. */
static void pool_displace(const bn_pool *pool, void *p)
{
    const unsigned turn = atomic_fetch_add_explicit(pool->turn, 1u, memory_order_relaxed);
    scratch_free(pool_unkeep(pool, atomic_exchange(&pool->slots[turn % (unsigned)pool->n], p)));
}

/* A freed block goes to an empty slot or, when all are full, displaces the block of the next slot in
 * turn: blocks kept for sizes a program no longer uses (a model built before) would otherwise keep the
 * sizes it now uses out for good. Likewise for a limited pool's bytes; a block larger than the limit is
 * freed. */
static void pool_give(const bn_pool *pool, void *p)
{
    if (p == NULL) return;
    const size_t cap = scratch_capacity(p);
    if (cap > pool->keep) {
        scratch_free(p);
        return;
    }
    if (pool->kept) {
        /* over the limit, kept blocks go in turn, as from a full pool: blocks of sizes no longer used
         * would otherwise keep out the sizes used now (a run of smaller tensors before). */
        const size_t limit = atomic_load(pool->limit);
        for (int i = 0; i < pool->n && cap <= limit && atomic_load(pool->kept) + cap > limit; i++)
            pool_displace(pool, NULL);
        const size_t before = atomic_fetch_add(pool->kept, cap);
        if (before + cap < before || before + cap > limit) {
            atomic_fetch_sub(pool->kept, cap);
            scratch_free(p);
            return;
        }
    }
    for (int i = 0; i < pool->n; i++) {
        void *expected = NULL;
        if (atomic_compare_exchange_strong(&pool->slots[i], &expected, p)) return;
    }
    pool_displace(pool, p);
}

/* All kept blocks are taken out at once, the smallest that serves is used and the others go back: a call
 * takes two blocks of different sizes (coefficients, then the driver's), and a first fit would hand the
 * larger one to the smaller request. Another thread meanwhile finds the slots empty and allocates. */
static void *pool_take(const bn_pool *pool, size_t bytes)
{
    void *got[BN_SCRATCH_SLOTS + BN_BLOCK_SLOTS + BN_LARGE_SLOTS]; /* more than any one pool has */
    int n = 0, best = -1;
    for (int i = 0; i < pool->n; i++) {
        if (atomic_load_explicit(&pool->slots[i], memory_order_relaxed) == NULL) continue;
        void *p = pool_unkeep(pool, atomic_exchange(&pool->slots[i], NULL));
        if (p != NULL) got[n++] = p;
    }
    for (int j = 0; j < n; j++)
        if (pool_fits(pool, scratch_capacity(got[j]), bytes) &&
            (best < 0 || scratch_capacity(got[j]) < scratch_capacity(got[best])))
            best = j;
    for (int j = 0; j < n; j++)
        if (j != best) pool_give(pool, got[j]);
    return best >= 0 ? got[best] : scratch_new(bytes);
}

static size_t pool_release(const bn_pool *pool)
{
    size_t bytes = 0;
    for (int i = 0; i < pool->n; i++) {
        void *p = pool_unkeep(pool, atomic_exchange(&pool->slots[i], NULL));
        if (p != NULL) bytes += scratch_capacity(p);
        scratch_free(p);
    }
    return bytes;
}

void *bn_scratch_take(size_t bytes) { return pool_take(&scratch_pool, bytes); }
void bn_scratch_give(void *p) { pool_give(&scratch_pool, p); }
void *bn_block_take(size_t bytes) { return pool_take(bytes > BN_BLOCK_MAX_BYTES ? &large_pool : &block_pool, bytes); }
void bn_block_give(void *p)
{
    if (p) pool_give(scratch_capacity(p) > BN_BLOCK_MAX_BYTES ? &large_pool : &block_pool, p);
}
size_t bn_cache_release(void)
{
    return pool_release(&scratch_pool) + pool_release(&block_pool) + pool_release(&large_pool);
}
size_t bn_cache_set_limit(size_t bytes)
{
    const size_t old = atomic_exchange(&large_limit, bytes);
    if (atomic_load(&large_kept) > bytes) pool_release(&large_pool);
    return old;
}
#else
void *bn_scratch_take(size_t bytes) { return scratch_new(bytes); }
void bn_scratch_give(void *p) { scratch_free(p); }
void *bn_block_take(size_t bytes) { return scratch_new(bytes); }
void bn_block_give(void *p) { scratch_free(p); }
size_t bn_cache_release(void) { return 0; }
static size_t large_limit = BN_LARGE_LIMIT_DEFAULT; /* nothing is kept without atomics; the value is kept */
size_t bn_cache_set_limit(size_t bytes)
{
    const size_t old = large_limit;
    large_limit = bytes;
    return old;
}
#endif

void *bn_block_resize(void *p, size_t bytes)
{
    if (p == NULL) return bn_block_take(bytes);
    const size_t cap = scratch_capacity(p);
    if (snug_fit(cap, bytes)) return p;
    void *q = bn_block_take(bytes);
    if (q == NULL) return NULL;
    memcpy(q, p, cap < bytes ? cap : bytes);
    bn_block_give(p);
    return q;
}
