/*
 * bn_masked.c - masked Batch Normalization: statistics and gradients over the positions a mask marks as
 * real data (padded sequences, ragged batches), without compacting x.
 *
 * The mask has no channel axis: mask[n * S + s] != 0 says that position (n, s) of the (N, C, S) view is
 * real, for every channel alike. Every channel has the same count M of real positions, the number of
 * nonzero mask entries. Outputs are 0 at the other positions (y and dx), which are otherwise never read
 * for arithmetic: a NaN in padding does not leak into the statistics.
 *
 * Work is cut independently of the thread count: rows are cut into groups of a fixed number of rows
 * (a function of (N, C, S) only), channels into blocks; one work item is (group, block). Within an item a
 * channel is reduced in chunks of rows: each chunk two-pass (the mean of x - shift over the chunk's real
 * positions, then the sum of squared deviations from it, on data still in cache), the chunks merged in
 * row order with Chan's formula (bn_moments_merge); the groups' parts are then merged in group order. So
 * the bits are the same for any number of threads.
 *
 * Layout: with S >= BN_ROW_MIN_S a channel's rows are long and a block is one channel (inner loops along
 * a row); otherwise (channels-last, (N, C), short rows) a block is up to MASKED_COL_BLOCK channels and the
 * inner loop runs across the channels of one position, in memory order.
 *
 * This file instantiates itself twice (float and double): the part below #else is the template.
 */
#ifndef BN_MASKED_T

#include "bn_internal.h"

#define MASKED_COL_BLOCK 256     /* column mode: channels per block (bounds the per-item accumulators) */
#define MASKED_ROW_CHUNK 4096    /* row mode: positions per two-pass chunk */
#define MASKED_COL_CHUNK 128     /* column mode: positions per two-pass chunk (x block channels in cache) */
#define MASKED_GROUP_CHUNKS 16   /* chunks per row group (work item) */

typedef struct {
    ptrdiff_t N, C, S;
    int col;
    ptrdiff_t cb, nblocks;       /* channels per block, blocks */
    ptrdiff_t chunk_rows, group_rows, ngroups;
    ptrdiff_t nitems;
    int nthreads;
} masked_plan;

static void masked_make_plan(masked_plan *p, bn_dims d, int nthreads)
{
    p->N = d.N; p->C = d.C; p->S = d.S;
    p->col = d.S < BN_ROW_MIN_S;
    p->cb = p->col ? (d.C < MASKED_COL_BLOCK ? d.C : MASKED_COL_BLOCK) : 1;
    p->nblocks = (d.C + p->cb - 1) / p->cb;
    const ptrdiff_t chunk = p->col ? MASKED_COL_CHUNK : MASKED_ROW_CHUNK;
    p->chunk_rows = d.S >= chunk ? 1 : chunk / d.S;
    p->group_rows = p->chunk_rows * MASKED_GROUP_CHUNKS;
    p->ngroups = (d.N + p->group_rows - 1) / p->group_rows;
    p->nitems = p->ngroups * p->nblocks;
    const double elems = (double)d.N * (double)d.C * (double)d.S;
    p->nthreads = elems < (double)BN_PARALLEL_MIN_ELEMS || nthreads < 1 ? 1 : nthreads;
    if (p->nthreads > p->nitems) p->nthreads = p->nitems > 0 ? (int)p->nitems : 1;
    if (p->nthreads > 1) bn_note_parallel();
}

int64_t bn_mask_count(const uint8_t *mask, ptrdiff_t len)
{
    int64_t n = 0;
    for (ptrdiff_t i = 0; i < len; i++) n += mask[i] != 0;
    return n;
}

/* The first real position, or -1 when there is none: its value is each channel's shift. */
static ptrdiff_t first_real(const uint8_t *mask, ptrdiff_t len)
{
    for (ptrdiff_t i = 0; i < len; i++)
        if (mask[i]) return i;
    return -1;
}

#define BN_CAT2(a, b) a##b
#define BN_CAT(a, b) BN_CAT2(a, b)

#define BN_MASKED_T float
#define BN_MASKED_SUF _f32
#include "bn_masked.c"
#undef BN_MASKED_T
#undef BN_MASKED_SUF

#define BN_MASKED_T double
#define BN_MASKED_SUF _f64
#include "bn_masked.c"
#undef BN_MASKED_T
#undef BN_MASKED_SUF

#else /* the template: T, and MF(name) = name_f32 / name_f64 */

#define T BN_MASKED_T
#define MF(name) BN_CAT(name, BN_MASKED_SUF)

/* The per-channel shift (the first real value of the channel, 0 when it is not finite). */
static void MF(masked_shifts)(const T *x, const uint8_t *mask, bn_dims d, double *shift)
{
    const ptrdiff_t p0 = first_real(mask, d.N * d.S);
    for (ptrdiff_t c = 0; c < d.C; c++)
        shift[c] = p0 < 0 ? 0.0 : bn_stats_shift((double)x[((p0 / d.S) * d.C + c) * d.S + p0 % d.S]);
}

/* The moments (relative to shift) of item w's channels over its rows, one bn_moments per channel in parts. */
static void MF(masked_stats_item)(const masked_plan *p, const T *x, const uint8_t *mask, const double *shift,
                                  ptrdiff_t it, bn_moments *parts)
{
    const ptrdiff_t g = it / p->nblocks, b = it % p->nblocks, C = p->C, S = p->S;
    const ptrdiff_t c0 = b * p->cb, c1 = c0 + p->cb < C ? c0 + p->cb : C;
    const ptrdiff_t n0 = g * p->group_rows, n1 = n0 + p->group_rows < p->N ? n0 + p->group_rows : p->N;
    bn_moments acc[MASKED_COL_BLOCK];
    double sum[MASKED_COL_BLOCK];
    for (ptrdiff_t c = c0; c < c1; c++) acc[c - c0] = (bn_moments){0, 0, 0};
    for (ptrdiff_t r0 = n0; r0 < n1; r0 += p->chunk_rows) {
        const ptrdiff_t r1 = r0 + p->chunk_rows < n1 ? r0 + p->chunk_rows : n1;
        const double cnt = (double)bn_mask_count(mask + r0 * S, (r1 - r0) * S);
        if (cnt == 0) continue;
        if (p->col) {
            for (ptrdiff_t c = c0; c < c1; c++) sum[c - c0] = 0;
            for (ptrdiff_t n = r0; n < r1; n++)
                for (ptrdiff_t s = 0; s < S; s++) {
                    if (!mask[n * S + s]) continue;
                    const T *xr = x + n * C * S + s;
                    for (ptrdiff_t c = c0; c < c1; c++) sum[c - c0] += (double)xr[c * S] - shift[c];
                }
            for (ptrdiff_t c = c0; c < c1; c++) sum[c - c0] /= cnt; /* the chunk's mean, relative to shift */
            double m2[MASKED_COL_BLOCK];
            for (ptrdiff_t c = c0; c < c1; c++) m2[c - c0] = 0;
            for (ptrdiff_t n = r0; n < r1; n++)
                for (ptrdiff_t s = 0; s < S; s++) {
                    if (!mask[n * S + s]) continue;
                    const T *xr = x + n * C * S + s;
                    for (ptrdiff_t c = c0; c < c1; c++) {
                        const double v = (double)xr[c * S] - shift[c] - sum[c - c0];
                        m2[c - c0] += v * v;
                    }
                }
            for (ptrdiff_t c = c0; c < c1; c++) bn_moments_merge(&acc[c - c0], (bn_moments){cnt, sum[c - c0], m2[c - c0]});
        } else {
            const ptrdiff_t c = c0;
            double s1 = 0, m2 = 0;
            for (ptrdiff_t n = r0; n < r1; n++) {
                const T *xr = x + (n * C + c) * S;
                const uint8_t *mr = mask + n * S;
                for (ptrdiff_t s = 0; s < S; s++)
                    if (mr[s]) s1 += (double)xr[s] - shift[c];
            }
            const double m = s1 / cnt;
            for (ptrdiff_t n = r0; n < r1; n++) {
                const T *xr = x + (n * C + c) * S;
                const uint8_t *mr = mask + n * S;
                for (ptrdiff_t s = 0; s < S; s++)
                    if (mr[s]) {
                        const double v = (double)xr[s] - shift[c] - m;
                        m2 += v * v;
                    }
            }
            bn_moments_merge(&acc[0], (bn_moments){cnt, m, m2});
        }
    }
    for (ptrdiff_t c = c0; c < c1; c++) parts[g * C + c] = acc[c - c0];
}

/* mean, m2 (and, when invstd is not NULL, invstd = 1 / sqrt(m2 / M + eps)) over the real positions. */
static int MF(masked_stats)(const masked_plan *p, const T *x, const uint8_t *mask, bn_dims d, double eps,
                            double *mean, double *m2, double *invstd)
{
    bn_moments *parts = bn_scratch_take((size_t)(p->ngroups * d.C > 0 ? p->ngroups * d.C : 1) * sizeof *parts);
    double *shift = bn_scratch_take((size_t)(d.C > 0 ? d.C : 1) * sizeof *shift);
    if (parts == NULL || shift == NULL) { bn_scratch_give(parts); bn_scratch_give(shift); return BN_ENOMEM; }
    MF(masked_shifts)(x, mask, d, shift);
    const ptrdiff_t nitems = p->nitems;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(p->nthreads) if (p->nthreads > 1)
#endif
    for (ptrdiff_t it = 0; it < nitems; it++) MF(masked_stats_item)(p, x, mask, shift, it, parts);
    for (ptrdiff_t c = 0; c < d.C; c++) {
        bn_moments acc = {0, 0, 0};
        for (ptrdiff_t g = 0; g < p->ngroups; g++) bn_moments_merge(&acc, parts[g * d.C + c]);
        mean[c] = acc.n > 0 ? shift[c] + acc.mean : 0.0;
        m2[c] = acc.m2;
        if (invstd) invstd[c] = 1.0 / sqrt((acc.n > 0 ? acc.m2 / acc.n : 0.0) + eps);
    }
    bn_scratch_give(parts);
    bn_scratch_give(shift);
    return BN_OK;
}

int MF(bn_masked_batch_stats)(const T *x, const uint8_t *mask, bn_dims d, double *mean, double *m2,
                              int nthreads)
{
    masked_plan p;
    masked_make_plan(&p, d, nthreads);
    return MF(masked_stats)(&p, x, mask, d, 0.0, mean, m2, NULL);
}

/* The elementwise pass at the real positions, 0 elsewhere: out = ka * dy + ((x - mean) * kb + ko), per
 * channel, in double, rounded once; without dy (the forward) out = (x - mean) * kb + ko. */
static void MF(masked_apply)(const masked_plan *p, const T *dy, const T *x, const uint8_t *mask, T *out, bn_dims d,
                             const double *mean, const double *ka, const double *kb, const double *ko)
{
    const ptrdiff_t N = d.N, C = d.C, S = d.S;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(p->nthreads) if (p->nthreads > 1)
#endif
    for (ptrdiff_t n = 0; n < N; n++) {
        const uint8_t *mr = mask + n * S;
        for (ptrdiff_t c = 0; c < C; c++) {
            const ptrdiff_t off = (n * C + c) * S;
            const T *xr = x + off;
            T *o = out + off;
            const double mu = mean[c], b = kb[c], k = ko[c];
            if (dy) {
                const T *dr = dy + off;
                const double a = ka[c];
                for (ptrdiff_t s = 0; s < S; s++)
                    o[s] = mr[s] ? (T)(a * (double)dr[s] + (((double)xr[s] - mu) * b + k)) : (T)0;
            } else {
                for (ptrdiff_t s = 0; s < S; s++) o[s] = mr[s] ? (T)(((double)xr[s] - mu) * b + k) : (T)0;
            }
        }
    }
}

/* Statistics over the real positions, then y = (x - mean) * invstd * gamma + beta there and 0 elsewhere
 * (centred, in double, rounded once). */
int MF(bn_masked_forward_train)(const T *x, const uint8_t *mask, T *y, bn_dims d, const double *gamma,
                                const double *beta, double eps, double *mean, double *m2, double *invstd,
                                int nthreads)
{
    masked_plan p;
    masked_make_plan(&p, d, nthreads);
    double *coef = bn_scratch_take(bn_padded_size(d.C, 2) * sizeof *coef);
    if (coef == NULL) return BN_ENOMEM;
    int status = MF(masked_stats)(&p, x, mask, d, eps, mean, m2, invstd);
    if (status != BN_OK) { bn_scratch_give(coef); return status; }
    double *alpha = bn_padded_array(coef, d.C, 0), *offset = bn_padded_array(coef, d.C, 1);
    for (ptrdiff_t c = 0; c < d.C; c++) {
        alpha[c] = gamma ? invstd[c] * gamma[c] : invstd[c];
        offset[c] = beta ? beta[c] : 0.0;
    }
    MF(masked_apply)(&p, NULL, x, mask, y, d, mean, NULL, alpha, offset);
    bn_scratch_give(coef);
    return BN_OK;
}

/* sum(dy) and sum(dy * (x - mean)) of item w's channels over its real positions, serially in row order. */
static void MF(masked_reduce_item)(const masked_plan *p, const T *dy, const T *x, const uint8_t *mask,
                                   const double *mean, ptrdiff_t it, bn_sums *parts)
{
    const ptrdiff_t g = it / p->nblocks, b = it % p->nblocks, C = p->C, S = p->S;
    const ptrdiff_t c0 = b * p->cb, c1 = c0 + p->cb < C ? c0 + p->cb : C;
    const ptrdiff_t n0 = g * p->group_rows, n1 = n0 + p->group_rows < p->N ? n0 + p->group_rows : p->N;
    double s1[MASKED_COL_BLOCK], s2[MASKED_COL_BLOCK];
    for (ptrdiff_t c = c0; c < c1; c++) s1[c - c0] = s2[c - c0] = 0;
    if (p->col) {
        for (ptrdiff_t n = n0; n < n1; n++)
            for (ptrdiff_t s = 0; s < S; s++) {
                if (!mask[n * S + s]) continue;
                const T *xr = x + n * C * S + s, *dr = dy + n * C * S + s;
                for (ptrdiff_t c = c0; c < c1; c++) {
                    const double g_ = (double)dr[c * S];
                    s1[c - c0] += g_;
                    s2[c - c0] += g_ * ((double)xr[c * S] - mean[c]);
                }
            }
    } else {
        const ptrdiff_t c = c0;
        for (ptrdiff_t n = n0; n < n1; n++) {
            const T *xr = x + (n * C + c) * S, *dr = dy + (n * C + c) * S;
            const uint8_t *mr = mask + n * S;
            for (ptrdiff_t s = 0; s < S; s++)
                if (mr[s]) {
                    s1[0] += (double)dr[s];
                    s2[0] += (double)dr[s] * ((double)xr[s] - mean[c]);
                }
        }
    }
    for (ptrdiff_t c = c0; c < c1; c++) parts[g * C + c] = (bn_sums){s1[c - c0], s2[c - c0]};
}

int MF(bn_masked_backward)(const T *dy, const T *x, const uint8_t *mask, T *dx, bn_dims d, const double *mean,
                           const double *invstd, const double *gamma, int training, double *dgamma,
                           double *dbeta, int nthreads)
{
    masked_plan p;
    masked_make_plan(&p, d, nthreads);
    bn_sums *parts = bn_scratch_take((size_t)(p.ngroups * d.C > 0 ? p.ngroups * d.C : 1) * sizeof *parts);
    double *coef = bn_scratch_take(bn_padded_size(d.C, 3) * sizeof *coef);
    if (parts == NULL || coef == NULL) { bn_scratch_give(parts); bn_scratch_give(coef); return BN_ENOMEM; }
    const ptrdiff_t nitems = p.nitems;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(p.nthreads) if (p.nthreads > 1)
#endif
    for (ptrdiff_t it = 0; it < nitems; it++) MF(masked_reduce_item)(&p, dy, x, mask, mean, it, parts);
    const double M = (double)bn_mask_count(mask, d.N * d.S);
    /* dx = k1 * (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) = k1 * dy + kx * (x - mean) + k0 */
    double *k1 = bn_padded_array(coef, d.C, 0), *kx = bn_padded_array(coef, d.C, 1),
           *k0 = bn_padded_array(coef, d.C, 2);
    for (ptrdiff_t c = 0; c < d.C; c++) {
        bn_sums acc = {0, 0};
        for (ptrdiff_t g = 0; g < p.ngroups; g++) {
            acc.dy += parts[g * d.C + c].dy;
            acc.dyxm += parts[g * d.C + c].dyxm;
        }
        dbeta[c] = acc.dy;
        dgamma[c] = acc.dyxm * invstd[c];
        k1[c] = gamma ? gamma[c] * invstd[c] : invstd[c];
        const int full = training && M > 0;
        kx[c] = full ? -k1[c] * invstd[c] * invstd[c] * (acc.dyxm / M) : 0.0;
        k0[c] = full ? -k1[c] * (acc.dy / M) : 0.0;
    }
    bn_scratch_give(parts);
    MF(masked_apply)(&p, dy, x, mask, dx, d, mean, k1, kx, k0);
    bn_scratch_give(coef);
    return BN_OK;
}

#undef T
#undef MF
#endif
