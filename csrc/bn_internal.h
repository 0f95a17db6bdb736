/*
 * bn_internal.h - what the kernels share: how a tensor is cut into work items, moment merging, and the
 * driver skeleton (reduce -> finish -> apply) every kernel is written as.
 *
 * The plan is a function of (N, C, S) and the element size alone, never of the thread count: that is
 * what makes every result bit-identical for any number of threads.
 */
#ifndef BN_INTERNAL_H
#define BN_INTERNAL_H

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "batchnorm.h"

#ifdef _OPENMP
#include <omp.h>
#if defined(_MSC_VER) && !defined(__clang__)
#define BN_PRAGMA(x) __pragma(x) /* MSVC before VS 2019 16.6 has no _Pragma in C */
#else
#define BN_PRAGMA(x) _Pragma(#x)
#endif
#else
#define BN_PRAGMA(x)
#endif

/*
 * Two ways to walk a channel:
 *  - row mode (S >= BN_ROW_MIN_S): a channel is N contiguous rows of S values; the inner loops run
 *    along a row. One work item = one channel x a group of rows.
 *  - column mode (S < BN_ROW_MIN_S, channels-last and (N, C) included): a row of W = C * S values holds
 *    every channel; the inner loops run across the row, one lane per position. One work item = a block
 *    of channels x a group of rows.
 * Rows are cut into groups; the per-group partial results of a channel are merged in group order.
 * Items are visited group-major, which is memory order. When a whole channel block is one item small
 * enough to stay in cache, its normalize pass follows its statistics pass right away.
 */
#define BN_ROW_MIN_S 32
#define BN_SEG 4096              /* row mode: longest contiguous run reduced as one two-pass chunk */
#define BN_STREAM_BYTES (16.0 * 1024 * 1024) /* a tensor this large is read from memory, not L3 */
#define BN_COL_ROWS 32           /* column mode: rows a two-pass chunk (an item's first: col_item_moments) */
#define BN_COL_MAX_W 4096        /* column mode: most positions in one item (bounds per-thread scratch) */
#define BN_COL_GROUP_ELEMS 262144 /* column mode: elements per item when rows are split into groups */
#define BN_ROW_GROUP_ELEMS 1024  /* row mode: least values of a channel in one work item */
#define BN_CACHE_ITEM_BYTES (768 * 1024)  /* an item this small stays in L2 between two passes */
#define BN_MAX_GROUPS 256        /* most row groups: bounds the partials' memory to O(C) */

typedef struct {
    ptrdiff_t N, C, S, W;        /* W = C * S, the length of one n-row */
    int colmode;
    ptrdiff_t rows_per_group, ngroups;
    ptrdiff_t ch_per_block, nblocks;  /* row mode: 1 channel per block */
    ptrdiff_t nitems;                 /* nblocks * ngroups; item i = (group i / nblocks, block i % nblocks) */
    int fused;                        /* ngroups == 1 and an item fits in cache */
    int nthreads;
} bn_plan;

/* The plan's tensor, of elements of elsize bytes, is at least BN_STREAM_BYTES: its passes read memory. */
static inline int bn_streamed(const bn_plan *p, size_t elsize)
{
    return (double)p->N * (double)p->W * (double)elsize >= BN_STREAM_BYTES;
}

/* Whether a row-mode pass writes `out` with non-temporal stores (bn_stream.h): a streamed tensor whose
 * output sits at the same offset in its 4 KiB pages as each input (b may be NULL), as out= arrays from
 * np.empty_like(x) do. There, at (64, 256, 28, 28) NCHW float32, T=1, inference took 0.67-0.69 of the
 * plain stores' time, the training forward 0.81-0.84, the backward 0.89-0.90 (benchmarks/phase_ab.py
 * --base, several runs). The plain calls' pooled outputs sit elsewhere in their pages (48 bytes after
 * NumPy's x): with non-temporal stores there small_ab.py --base measured the backward and the fused
 * forward at 1.09-1.16x and the rest at 0.99-1.02, while a loop of plain calls that dropped each result
 * measured 0.71-0.98; unsettled, so they keep plain stores. */
static inline int bn_nt_wanted(const bn_plan *p, size_t elsize, const void *out, const void *a, const void *b)
{
    const uintptr_t o = (uintptr_t)out & 4095;
    return bn_streamed(p, elsize) && ((uintptr_t)a & 4095) == o && (!b || ((uintptr_t)b & 4095) == o);
}

/* What a work item does after its non-temporal stores (nt): nothing where the build has none; bn_stream.h,
 * which the AVX2 and AVX-512 files include, redefines it as a store fence. */
#define BN_NT_DONE(nt) ((void)(nt))

/* Column mode's float32 y and dx in sweeps of four consecutive rows, each load of a position's coefficients
 * serving four values: where a row is at most 256 bytes (four rows are one stream of at most 1 KiB), or
 * the whole tensor is L2-sized. Four rows of 1 KiB read from L3 or memory took 1.7-2.8x the time of one
 * row a sweep (inference at (8192, 256), (32768, 256) and (64, 28, 28, 256) float32), as several streams
 * in one page do elsewhere here. Chosen by shape; the values are the same either way. Rows of 512 or
 * more positions keep y's own loop (an L2-sized (64, 512), (32, 1024) or (16, 4096) gained nothing from
 * four rows), and dx's pairs of rows from 683 positions on come first. */
static inline int bn_cols_sweep4(const bn_plan *p, ptrdiff_t wb, size_t elsize)
{
    return (double)wb * (double)elsize <= 256 || (double)p->N * (double)p->W * (double)elsize <= BN_CACHE_ITEM_BYTES;
}

/* min_elems: below N * C * S elements the plan runs on one thread (BN_PARALLEL_MIN_ELEMS*). */
void bn_make_plan(bn_plan *p, bn_dims d, size_t elsize, int nthreads, ptrdiff_t min_elems);

/* A kernel is about to run on several threads: from now on a fork()ed child runs single-threaded
 * (bn_plan.c says why). */
void bn_note_parallel(void);

/* Work item `it` of a plan: channels [c0, c1) x rows [n0, n1). Items run group-major (memory order). */
typedef struct {
    ptrdiff_t c0, c1, n0, n1;
} bn_item;

static inline bn_item bn_item_at(const bn_plan *p, ptrdiff_t it)
{
    ptrdiff_t g = it / p->nblocks, b = it % p->nblocks;
    bn_item r;
    r.c0 = b * p->ch_per_block;
    r.c1 = r.c0 + p->ch_per_block < p->C ? r.c0 + p->ch_per_block : p->C;
    r.n0 = g * p->rows_per_group;
    r.n1 = r.n0 + p->rows_per_group < p->N ? r.n0 + p->rows_per_group : p->N;
    return r;
}

/* (count, mean, sum of squared deviations) of a set of values. */
typedef struct {
    double n, mean, m2;
} bn_moments;

/* The mean of two parts, a's with weight wa = n_a / n and b's with wb = n_b / n: a + delta * wb, delta =
 * b - a, while delta is finite. An infinite part mean makes delta infinite or NaN (inf - inf), and
 * a + delta * wb then NaN where np.mean gives +-inf: there the weighted sum a * wa + b * wb, which is
 * +-inf for one sign of infinity, NaN for both (as np.mean), NaN for NaN, and for finite means whose
 * difference overflows the mean without overflow. The channel's m2 is NaN then anyway (the part with the
 * inf has x - inf = NaN in it), as np.var's. */
static inline double bn_merged_mean(double ma, double mb, double delta, double wa, double wb)
{
    return fabs(delta) <= DBL_MAX ? ma + delta * wb : ma * wa + mb * wb;
}

/* Chan, Golub & LeVeque's pairwise update: merge b into a. Exact algebra, no E[x^2] - E[x]^2. A part
 * with no values is skipped, and merging into an empty a copies b, so a single part keeps its bits. */
static inline void bn_moments_merge(bn_moments *a, bn_moments b)
{
    if (b.n == 0) return;
    if (a->n == 0) { *a = b; return; }
    double n = a->n + b.n;
    double delta = b.mean - a->mean;
    double wb = b.n / n;
    a->mean = bn_merged_mean(a->mean, b.mean, delta, a->n / n, wb);
    a->m2 += b.m2 + delta * delta * a->n * wb;
    a->n = n;
}

/* 1 for an infinite or NaN v, else 0: the exponent field all ones. Integer arithmetic, so a loop can OR
 * it over doubles and still vectorize; GCC 12 vectorizes no int reduction of double comparisons. */
static inline uint64_t bn_nonfinite_bit(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (((bits >> 52) & 0x7ff) + 1) >> 11;
}

/*
 * The statistics of a channel are accumulated relative to a shift, a value of the channel itself: its
 * first value x[0, c, 0] (0 when that is not finite), chosen by the data alone, the same in every code
 * path. Every chunk sums x - shift, computed in double (exact when x is within a factor of 2 of the
 * shift, and for float32 data whenever the exponents are within 29 of each other), so the partial means
 * the merges subtract from one another are of the size of the spread, not of the mean: a partial mean
 * rounded at 2^-53 of 1e8 would be off by 1e-8 std, and each merge's delta * delta * n_a * n_b / n
 * would carry that into m2 (5e-9 relative at mean 1e8 std 1, merged hundreds of times in column mode).
 * The variance is shift-invariant; the mean gets the shift added back once, at the end.
 */
static inline double bn_stats_shift(double x0)
{
    return fabs(x0) <= DBL_MAX ? x0 : 0.0; /* isfinite(x0), in a form that vectorizes */
}

/*
 * float32 data is normalized with the mean folded into the offset (BN_FOLD in the templates): in double,
 *   y = x * alpha + (beta - mean * alpha)          instead of   y = (x - mean) * alpha + beta,
 *   dx = k1 * dy + (x * kx + (k1 * (mean * k3 - k2)))  instead of  dx = k1 * dy + ((x - mean) * kx - k1 * k2),
 * kx = -k1 * k3, which saves a subtraction per value and, in column mode, a per-position array. The fold
 * cancels: with u = 2^-53 and rho = |mean| * invstd, the products x * alpha and mean * alpha are about
 * rho * |gamma| and each rounds at u of that; adding the roundings of the two sums, the folded y is off
 * by at most ~3 u rho |gamma| more than the centred one. |gamma| is the scale of the normalized values
 * (gamma * xhat, xhat of order 1), and float32's half ulp there is 2^-25 |gamma|, so rho <= 2^16 keeps
 * the extra error under 3 * 2^-37 < 2^-35 |gamma|, 1/1000 of that half ulp: y rounds to the float32 the
 * centred form gives, save ties closer than that. In the backward, |k3| <= invstd^2 rms(dy) std, so the
 * folded term's extra error 3 u |k1 k3 mean| <= 3 u rho (std * invstd) |k1| rms(dy) <= 3 u rho times
 * dx's own scale, |k1| rms(dy): the same bound. Past rho = 2^16 (a constant channel at 1e12 has rho =
 * 3e14: beta - mean * alpha lost beta entirely) the channel is normalized centred, which costs a
 * subtraction and nothing in accuracy. The choice is made per channel from its statistics (NaN: centred).
 */
/* A folded channel is centred on +0.0, which x - centre returns unchanged (bit for bit, -0.0 and NaN
 * included), so the folded loops are an exact shortcut of the centred ones. */
static inline int bn_is_plus_zero(double v)
{
    return v == 0.0 && !signbit(v);
}

#define BN_FOLD_MAX_RHO 65536.0
static inline int bn_fold_exact(double mean, double invstd)
{
    return fabs(mean * invstd) <= BN_FOLD_MAX_RHO;
}

/* How channel c is normalized, by the forward kernels and by the backward's recomputed ReLU mask alike:
 * y = (x - centre) * alpha + offset in double, alpha = invstd * gamma; with fold (float32 data whose
 * channel passes bn_fold_exact) centre = +0.0 and offset = beta - mean * alpha, else centre = mean and
 * offset = beta. gamma/beta NULL: 1 and 0. */
static inline void bn_forward_coefs(int fold_type, const double *gamma, const double *beta, ptrdiff_t c,
                                    double mean, double invstd, double *alpha, double *centre, double *offset)
{
    const double a = gamma ? invstd * gamma[c] : invstd;
    const int fold = fold_type && bn_fold_exact(mean, invstd);
    *alpha = a;
    *centre = fold ? 0.0 : mean;
    *offset = (beta ? beta[c] : 0.0) - (fold ? mean * a : 0.0);
}

/*
 * float32 element arithmetic. A folded float32 channel (centre +0.0) whose alpha and offset are in range
 * (bn_f32_arith) is normalized in float32, y = fmaf(x, ah, bh) + fmaf(x, al, bl), with alpha = ah + al
 * and offset = bh + bl split into float32 pairs (bn_f32_split): in cache that is 0.45-0.6 of the float64
 * loop's time (two float32 FMAs and an add against widening, a float64 FMA at half the lanes, and
 * narrowing). Accuracy: the pairs hold alpha and offset to 2^-47 of themselves, which with rho <= 2^16 is
 * within 2^-30 |gamma| (1/64 of a float32 ulp at gamma's scale) of x * alpha + offset; the first FMA
 * rounds once (half an ulp of about y), the second's rounding is 2^-24 smaller, and the add rounds once
 * more: y is within about one float32 ulp of the float64 result (tests/test_accuracy.py holds it to 1.5;
 * benchmarks/arith_probe.c measures it, 1.00 at most), against half an ulp for the float64 form.
 * ah is alpha truncated toward zero, so al is zero or of alpha's sign: both FMAs rise (or fall) with x,
 * and so does y. That keeps the backward's recomputed ReLU mask a range of x (mask_bounds). An infinite
 * first FMA is y itself: with al = 0 (alpha a float32, as gamma 1 and invstd 1 are) the second FMA of an
 * infinite x is inf * 0 = NaN, where the float64 form gives inf. With al = 0 and offset a float32, y is
 * rounded once: exact values (normalize(x, 0, 1), x at the mean) come out exact. The ranges keep both
 * parts normal, and exclude channels whose products could overflow where float64 would not; other
 * channels keep the float64 form. Every FMA is fmaf (exact by
 * definition, whatever the build: an instruction where the target has FMA, a libm call in the baseline
 * build), so all builds agree bit for bit. The choice is the channel's statistics' and parameters', made
 * the same way by the forward and by the backward's recomputed mask.
 */
#define BN_F32_ALPHA_MIN 0x1p-60
#define BN_F32_COEF_MAX 0x1p100
static inline int bn_f32_arith(double centre, double alpha, double offset)
{
    /* & and |, not && and ||: loops of it (f32_pairs) vectorize; centre +0.0 as in bn_is_plus_zero */
    const double aa = fabs(alpha);
    return (centre == 0.0) & (copysign(1.0, centre) > 0.0) &
           ((alpha == 0.0) | ((aa >= BN_F32_ALPHA_MIN) & (aa <= BN_F32_COEF_MAX))) & (fabs(offset) <= BN_F32_COEF_MAX);
}

/* The float32 pairs of a channel that passes bn_f32_arith. Every step is exact but the two roundings to
 * float: alpha - ah is alpha's low bits, offset - bh likewise. */
static inline void bn_f32_split(double alpha, double offset, float *ah, float *al, float *bh, float *bl)
{
    const float h = (float)alpha;
    /* one float toward zero where rounding went away from it: h * (1 - 2^-24) is the next float below |h|
     * (h is normal here), rounded once; a select, not a branch, so that loops of it vectorize */
    *ah = fabs((double)h) > fabs(alpha) ? h * 0x1.fffffep-1f : h;
    const float k = (float)(alpha - (double)*ah);
    *al = k == 0.0f ? copysignf(0.0f, *ah) : k; /* signed zeros as the float64 form's x * alpha + offset */
    *bh = (float)offset;
    const float l = (float)(offset - (double)*bh);
    *bl = l == 0.0f ? copysignf(0.0f, *bh) : l; /* offset -0.0: -0.0 - -0.0 is +0.0; y(-0.0) is -0.0 */
}

/* A channel's pairs in q where its forward coefficients (centre, alpha, offset) take the float32 form, else
 * NULL: what the backward's recomputed masks are given, split once a channel (or run), not once a value. */
static inline const float *bn_f32_pairs_or_null(double centre, double alpha, double offset, float *q)
{
    if (!bn_f32_arith(centre, alpha, offset)) return NULL;
    bn_f32_split(alpha, offset, &q[0], &q[1], &q[2], &q[3]);
    return q;
}

static inline float bn_f32_norm(float x, float ah, float al, float bh, float bl)
{
    const float t = fmaf(x, ah, bh), v = t + fmaf(x, al, bl);
    return fabsf(t) == INFINITY ? t : v;
}

/* The fused epilogues as flags (see bn_epilogue in batchnorm.h): the loops that apply them take the
 * flags as a constant, so each combination is its own loop with nothing tested per value. */
enum { BN_EPI_RELU = 1, BN_EPI_ADD = 2 };
/* F(args..., flags) with the flags epi as a constant: a switch over the four combinations. */
#define BN_WITH_EPI(epi, F, ...)                                                                          \
    switch (epi) {                                                                                        \
    case BN_EPI_RELU: F(__VA_ARGS__, BN_EPI_RELU); break;                                                 \
    case BN_EPI_ADD: F(__VA_ARGS__, BN_EPI_ADD); break;                                                   \
    case BN_EPI_ADD | BN_EPI_RELU: F(__VA_ARGS__, BN_EPI_ADD | BN_EPI_RELU); break;                       \
    default: F(__VA_ARGS__, 0);                                                                           \
    }
/* The ReLU masks of the backward (bn_grad_epilogue), as the constants its loops are specialized on: none,
 * read from y, or recomputed from x (and the residual, GM_XR) with the forward's coefficients and the
 * forward's very expression, so that it is the forward's y > 0 bit for bit. */
enum { BN_GM_NONE = 0, BN_GM_Y = 1, BN_GM_X = 2, BN_GM_XR = 3, BN_GM_XT = 4, BN_GM_XF = 5, BN_GM_XRF = 6 };
/* BN_GM_XF, BN_GM_XRF: BN_GM_X, BN_GM_XR of a row-mode run whose channel the forward normalized in float32
 * (the pairs pq of bn_f32_pairs_or_null): chosen per run (bn_gm_run), so that each form is its own loop
 * with no test per value (a test there cost row mode's backward(relu, beta=, residual=) 7x its time). */
static inline int bn_gm_run(int gm, const float *pq)
{
    return !pq ? gm : gm == BN_GM_X ? BN_GM_XF : BN_GM_XRF;
}
/* BN_GM_XT is BN_GM_X as a range of x (mask_bounds in bn_backward.tmpl.h): the same mask, two comparisons a
 * value. Ranges are found by walking the values in order: these keys number the floats and doubles in
 * value order, -0.0 and +0.0 alike (key 0), +-inf at the ends. */
#define BN_MASK_RANGE_MIN_COUNT 64.0 /* values per channel from which the backward uses BN_GM_XT */
/* Whether a mask is made from x with per-channel forward coefficients (fcen, falpha, foff: the forward's
 * own, or for BN_GM_XT the range's ends in the first two), which the backward then carries and expands. */
static inline int bn_gm_from_x(int gm)
{
    return gm == BN_GM_X || gm == BN_GM_XR || gm == BN_GM_XT;
}
static inline int64_t bn_order_key_f32(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    const int64_t m = (int64_t)(u & 0x7fffffffu);
    return u >> 31 ? -m : m;
}

static inline int64_t bn_order_key_f64(double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    const int64_t m = (int64_t)(u & 0x7fffffffffffffffull);
    return u >> 63 ? -m : m;
}

static inline float bn_from_order_key_f32(int64_t k)
{
    const uint32_t u = k < 0 ? (uint32_t)(-k) | 0x80000000u : (uint32_t)k;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static inline double bn_from_order_key_f64(int64_t k)
{
    const uint64_t u = k < 0 ? (uint64_t)(-k) | 0x8000000000000000ull : (uint64_t)k;
    double v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* restrict for the per-position coefficient arrays and scratch that a loop reads beside the data it writes:
 * without it GCC gives up on the runtime alias checks of loops with many pointers and runs them scalar. */
#if defined(_MSC_VER)
#define BN_RESTRICT __restrict
#else
#define BN_RESTRICT restrict
#endif

#if defined(__GNUC__)
#define BN_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define BN_ALWAYS_INLINE __forceinline
#else
#define BN_ALWAYS_INLINE inline
#endif


/* Whether every one of centre[c0 .. c1-1] is +0.0 (a branch-free loop, which vectorizes). */
static inline int bn_all_plus_zero(const double *centre, ptrdiff_t c0, ptrdiff_t c1)
{
    uint64_t any = 0;
    for (ptrdiff_t c = c0; c < c1; c++) {
        uint64_t bits;
        memcpy(&bits, &centre[c], sizeof bits);
        any |= bits;
    }
    return any == 0;
}

/* The backward reduction of a set of values: sum(dy) and sum(dy * (x - mean)). */
typedef struct {
    double dy, dyxm;
} bn_sums;

/* Index of the calling thread in its OpenMP team (0 without OpenMP), and the team's size. */
static inline int bn_thread_num(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int bn_team_size(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/*
 * The driver skeleton every kernel runs on (bn_drive.c): reduce -> finish -> apply over a plan.
 *   reduce(w):    the partial results of work item w, one per channel c0..c1-1, written to `out`, the
 *                 slots of w's row group (part_bytes each, channel order).
 *   finish(c0, c1): the per-channel step of channels [c0, c1): merge each one's ngroups parts (slot
 *                 (g * C + c) of `parts`, g = 0, 1, ... in that order) when there is a reduction, then
 *                 whatever per-channel results and coefficients the kernel needs. A range, not a
 *                 call per channel: at (64, 512) the calls were a measurable part of an 8 us normalize.
 *   apply(w):     the elementwise pass over item w.
 *   apply_rows:   optional, for row mode: the elementwise pass over the (n, c) rows [r0, r1) in memory
 *                 order, used instead of apply whenever the items are not fused (an item walks a
 *                 channel's runs C * S apart, which the prefetchers follow worse: with rows, the training
 *                 forward and backward at (32, 64, 8, 8) and (8, 16, 16, 16) float32 ran 5-12% faster,
 *                 benchmarks/small_ab.py).
 * Any step may be NULL. When a reduction and an apply share a plan whose items are whole channels small
 * enough for cache (plan.fused), each item is reduced, finished and applied in a row, reading x from
 * cache the second time. The reduction order depends only on the plan, never on the thread count.
 * A variant (synchronized statistics, renormalization, fused epilogues, masks) is a new set of steps
 * over the same skeleton.
 */
typedef struct bn_job bn_job;
struct bn_job {
    const bn_plan *plan;
    void (*reduce)(const bn_job *job, bn_item w, double *scratch, void *out);
    void (*finish)(const bn_job *job, ptrdiff_t c0, ptrdiff_t c1, const void *parts);
    void (*apply)(const bn_job *job, bn_item w, double *scratch);
    void (*apply_rows)(const bn_job *job, ptrdiff_t r0, ptrdiff_t r1);
    size_t part_bytes;           /* size of one channel's partial result */
    ptrdiff_t scratch_doubles;   /* per thread, for reduce and apply */
    void *args;                  /* the kernel's own arguments */
};

int bn_drive(const bn_job *job);

/* Scratch for one kernel call (bn_drive.c): malloc and free, except that up to BN_SCRATCH_SLOTS freed
 * blocks of at most BN_SCRATCH_KEEP_BYTES each (64 MiB in all) are kept for the next calls. A wide
 * layer's call allocates C-sized blocks of a few hundred KiB; glibc gave each call fresh pages for them
 * (its heap top trimmed at every free), and the page faults took most of the call: forward_train at
 * (2, 16384) float32 ran 709 us with 304 faults a call, 125 us without. Kept blocks are process-wide,
 * taken and given back with C11 atomics from any thread; where the compiler has no <stdatomic.h> (MSVC)
 * plain malloc and free. */
#define BN_SCRATCH_SLOTS 8
#define BN_SCRATCH_KEEP_BYTES ((size_t)8 << 20)
#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L && !defined(__STDC_NO_ATOMICS__) && !defined(_MSC_VER)
#define BN_SCRATCH_KEEPS 1
#else
#define BN_SCRATCH_KEEPS 0
#endif
void *bn_scratch_take(size_t bytes);
void bn_scratch_give(void *p);

/* Keeps a hot loop out of its caller: inlined into a big function, the 16 accumulator lanes of
 * runs_moments competed for registers with the caller's and GCC spilled one to the stack, adding a
 * store-to-load forwarding to every iteration's dependency chain (row-mode statistics ran 1.7x slower). */
#if defined(__GNUC__)
#define BN_NOINLINE __attribute__((noinline))
#else
#define BN_NOINLINE
#endif

/* The per-channel coefficient arrays of a kernel lie one after another in one allocation, each padded by
 * a cache line: arrays of 512 doubles would otherwise lie exactly 4 KiB apart, and a load whose address
 * has the same low 12 bits as an earlier store's waits for that store (4K aliasing: the backward at
 * (64, 512) ran 10% slower with four unpadded coefficient arrays, stored channel by channel and read
 * back by the column-mode apply). Not for per-position scratch swept by vector loops: padded by a line,
 * a load of element q + 8 of one array aliases the store of element q of the next.
 * bn_padded_size(len, n) doubles hold n arrays of len; array j starts at bn_padded_array(base, len, j). */
#define BN_ARRAY_PAD 8
static inline size_t bn_padded_size(ptrdiff_t len, int n)
{
    return (size_t)n * (size_t)(len + BN_ARRAY_PAD);
}

static inline double *bn_padded_array(double *base, ptrdiff_t len, int j)
{
    return base + (ptrdiff_t)j * (len + BN_ARRAY_PAD);
}

/* Column mode's per-position coefficients: out[j][k * S + s] = src[j][c0 + k] for k < c1 - c0, written
 * to room[j]; with S = 1 that is src[j] + c0 itself, read in place (a copy per channel, in a loop of one
 * position, was most of a (2, 4096) call). NULL src[j]: out[j] = room[j], left as it is. */
static inline void bn_expand(int n, double *const *room, const double **out, const double *const *src,
                             ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t S)
{
    for (int j = 0; j < n; j++) {
        out[j] = room[j];
        if (!src[j]) continue;
        if (S == 1) {
            out[j] = src[j] + c0;
            continue;
        }
        for (ptrdiff_t k = 0; k < c1 - c0; k++)
            for (ptrdiff_t s = 0; s < S; s++) room[j][k * S + s] = src[j][c0 + k];
    }
}

/* Accumulator lanes of the contiguous reductions, and their fixed summation tree. */
#define BN_LANES 16

/* GCC's and clang's vector extensions, for loops GCC does not vectorize as written in plain C (the
 * backward's two sums in one loop, runs_sums): BN_LANES lanes as two 8-double vectors, each lane adding
 * in the same order as the plain loops, so every build gives the same bits (an AVX2 or SSE2 build splits
 * the vectors into its own widths; elementwise, that changes nothing). Elsewhere (MSVC) the plain loops.
 * No local vector has its address taken (loads through may_alias pointer types of element alignment,
 * sums by macro), so none lives in memory (see BN_HAVE_AVX512 below for what AddressSanitizer did to
 * 64-byte-aligned locals). */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)
#define BN_HAVE_VEXT (BN_LANES == 16)
typedef double bn_v8d __attribute__((vector_size(64)));
typedef double bn_v8d_mem __attribute__((vector_size(64), aligned(8), may_alias));
typedef float bn_v8f_mem __attribute__((vector_size(32), aligned(4), may_alias));
/* 8 values from p (float or double, any alignment) as doubles. The float conversion is BN_V8F_CVT, which
 * bn_avx512.c redefines: GCC 12 lowers this __builtin_convertvector to two 4-wide conversions, an extract
 * and an insert, even for AVX-512. */
#define BN_V8F_CVT(p) __builtin_convertvector(*(const bn_v8f_mem *)(const void *)(p), bn_v8d)
#define BN_V8D_LOAD(p)                                                                                  \
    (sizeof(*(p)) == sizeof(float) ? BN_V8F_CVT(p) : (bn_v8d)(*(const bn_v8d_mem *)(const void *)(p)))
/* 8 floats in a register, their int lanes (comparisons: -1 true, 0 false), and the floats as doubles
 * (BN_V8F_WIDEN, redefined by bn_avx512.c as BN_V8F_CVT is). */
typedef float bn_v8f __attribute__((vector_size(32)));
typedef int bn_v8i __attribute__((vector_size(32)));
#define BN_V8F_WIDEN(v) __builtin_convertvector((v), bn_v8d)
#define BN_V8F_LOAD(p) (*(const bn_v8f_mem *)(const void *)(p)) /* 8 floats from p, any alignment */
#define BN_V8D_STORE(p, v) (*(bn_v8d_mem *)(void *)(p) = (v)) /* 8 doubles to p (double *), any alignment */
/* The fused ReLU of 8 doubles as the scalar v < 0 ? 0 : v: +0.0 where v < 0, v elsewhere (NaN and -0.0
 * stay), by a mask (C has no vector ?:). */
typedef long long bn_v8l __attribute__((vector_size(64)));
#define BN_V8D_RELU(v) ((bn_v8d)((bn_v8l)(v) & ~(bn_v8l)((v) < (bn_v8d){0, 0, 0, 0, 0, 0, 0, 0})))
/* bn_lanes_sum of the 16 lanes lo[0..7], hi[0..7] (lanes 0-7 and 8-15), in the same order. */
#define BN_V8D_LANES_SUM(lo, hi)                                                                        \
    ((((lo)[0] + (hi)[0]) + ((lo)[4] + (hi)[4])) + (((lo)[1] + (hi)[1]) + ((lo)[5] + (hi)[5])) +        \
     ((((lo)[2] + (hi)[2]) + ((lo)[6] + (hi)[6])) + (((lo)[3] + (hi)[3]) + ((lo)[7] + (hi)[7]))))
#else
#define BN_HAVE_VEXT 0
#endif
static inline double bn_lanes_sum(const double *a)
{
    double h[8];
    for (int j = 0; j < 8; j++) h[j] = a[j] + a[j + 8];
    return ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
}

/* AVX2 and AVX-512 variants are built by GCC and clang on x86-64 (their per-function target pragmas,
 * bn_avx2.c); elsewhere (MSVC, clang-cl, aarch64, ...) only the baseline. clang-cl defines __clang__ and
 * __x86_64__, but its __builtin_cpu_supports needs compiler-rt, which an MSVC-style link may lack.
 * AVX-512 needs GCC 9 (prefer-vector-width in a target pragma) or clang 8 (the pragma clang attribute's
 * target list with avx512vl). */
#if defined(_MSC_VER)
#define BN_HAVE_AVX2 0
#define BN_HAVE_AVX512 0
#elif defined(__x86_64__) && defined(__clang__)
#define BN_HAVE_AVX2 1
#define BN_HAVE_AVX512 (__clang_major__ >= 8)
#elif defined(__x86_64__) && defined(__GNUC__) && defined(__SANITIZE_ADDRESS__)
/* GCC's AddressSanitizer builds (.ci/asan.sh) stop at AVX2. With use-after-return detection GCC moves a
 * function's addressable locals to a fake frame from the runtime, 4096-aligned, but lays them out for the
 * real stack's base, which it keeps only 32-aligned: a local array the vectorizer aligned to 64 bytes for
 * 512-bit vectors sits 32 bytes off there, and its aligned stores crash (GCC 12, the backward's accumulator
 * arrays in runs_sums_gm). 32-byte alignment holds in both frames. The AVX2 kernels are the same source. */
#define BN_HAVE_AVX2 1
#define BN_HAVE_AVX512 0
#elif defined(__x86_64__) && defined(__GNUC__)
#define BN_HAVE_AVX2 1
#define BN_HAVE_AVX512 (__GNUC__ >= 9)
#else
#define BN_HAVE_AVX2 0
#define BN_HAVE_AVX512 0
#endif

/* The instantiations bn_dispatch.c chooses between: SUFFIX is f32_base, f64_base, f32_avx2, f64_avx2,
 * f32_avx512, f64_avx512. */
#define BN_DECLARE_KERNELS(T, SUFFIX)                                                                  \
    int bn_batch_stats_##SUFFIX(const T *x, bn_dims d, double *mean, double *m2, int nthreads);          \
    int bn_normalize_##SUFFIX(const T *x, T *y, bn_dims d, const double *mean, const double *invstd,    \
                              const double *gamma, const double *beta, const bn_epilogue *ep,          \
                              int nthreads);                                                            \
    void bn_coefs_range_##SUFFIX(ptrdiff_t n, const double *mean, const double *invstd,                \
                                 const double *gamma, const double *beta, double *alpha, double *centre, \
                                 double *offset);                                                       \
    void bn_widen_##SUFFIX(const T *src, double *dst, ptrdiff_t n);                                     \
    void bn_narrow_##SUFFIX(const double *src, T *dst, ptrdiff_t n);                                    \
    void bn_update_running_##SUFFIX(T *r, const double *batch, double divisor, double momentum,        \
                                    ptrdiff_t n);                                                       \
    int bn_forward_infer_##SUFFIX(const T *x, T *y, bn_dims d, const double *running_mean,             \
                                  const double *running_var, double eps, const double *gamma,           \
                                  const double *beta, const bn_epilogue *ep, int nthreads);             \
    int bn_forward_train_##SUFFIX(const T *x, T *y, bn_dims d, const double *gamma, const double *beta, \
                                  double eps, double *mean, double *m2, double *invstd,                 \
                                  const bn_epilogue *ep, int nthreads);                                 \
    int bn_backward_reduce_##SUFFIX(const T *dy, const T *x, bn_dims d, const double *mean,            \
                                    double *sum_dy, double *sum_dy_xmu, int nthreads);                  \
    int bn_backward_apply_##SUFFIX(const T *dy, const T *x, T *dx, bn_dims d, const double *mean,       \
                                   const double *invstd, const double *gamma, const double *sum_dy,     \
                                   const double *sum_dy_xmu, double count, int nthreads);               \
    int bn_backward_##SUFFIX(const T *dy, const T *x, T *dx, bn_dims d, const double *mean,             \
                             const double *invstd, const double *gamma, int training, double *dgamma,  \
                             double *dbeta, const bn_grad_epilogue *ep, int nthreads);
BN_DECLARE_KERNELS(float, f32_base)
BN_DECLARE_KERNELS(double, f64_base)
#if BN_HAVE_AVX2
BN_DECLARE_KERNELS(float, f32_avx2)
BN_DECLARE_KERNELS(double, f64_avx2)
#endif
#if BN_HAVE_AVX512
BN_DECLARE_KERNELS(float, f32_avx512)
BN_DECLARE_KERNELS(double, f64_avx512)
#endif

#endif
