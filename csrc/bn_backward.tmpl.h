/*
 * bn_backward.tmpl.h - the backward pass, written once for every element type.
 * Included by bn_backward.c with BN_T and BN_NAME(f), as bn_forward.tmpl.h is.
 *
 * Derivation (per channel, M = N * S values, xhat = (x - mean) * invstd, y = gamma * xhat + beta):
 *   dbeta  = sum(dy)
 *   dgamma = sum(dy * xhat) = invstd * sum(dy * (x - mean))
 *   With mean and invstd functions of x (training):
 *     dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)
 *        = k1 * (dy - k2 - (x - mean) * k3),   k1 = gamma * invstd, k2 = dbeta / M, k3 = invstd * dgamma / M
 *   With mean and invstd constants (eval / frozen BN): dx = k1 * dy.
 * The two sums are the only reductions; they are cut and combined in a thread-independent order.
 */

typedef struct {
    double dy, dyxm;  /* sum(dy), sum(dy * (x - mean)) */
} BN_NAME(bn_sums);

/* sum(dy) and sum(dy * (x - m)) over `runs` runs of `len` values, `stride` apart. The two sums are
 * separate loops: GCC vectorizes each (BN_LANES independent lanes, no reassociation) but not the fused
 * form, which ran 1.5x slower. */
static BN_NAME(bn_sums) BN_NAME(runs_sums)(const BN_T *dy, const BN_T *x, ptrdiff_t len, ptrdiff_t runs,
                                          ptrdiff_t stride, double m)
{
    double a[BN_LANES] = {0}, b[BN_LANES] = {0}, ta = 0, tb = 0;
    const ptrdiff_t body = len - len % BN_LANES;
    for (ptrdiff_t r = 0; r < runs; r++) {
        const BN_T *g = dy + r * stride;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) a[j] += (double)g[i + j];
    }
    for (ptrdiff_t r = 0; r < runs; r++) {
        const BN_T *g = dy + r * stride, *v = x + r * stride;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) b[j] += (double)g[i + j] * ((double)v[i + j] - m);
        for (ptrdiff_t i = body; i < len; i++) {
            ta += (double)g[i];
            tb += (double)g[i] * ((double)v[i] - m);
        }
    }
    BN_NAME(bn_sums) r;
    r.dy = bn_lanes_sum(a) + ta;
    r.dyxm = bn_lanes_sum(b) + tb;
    return r;
}

/* Sums of one item into out[0 .. c1-c0). Column mode needs 3 * (c1 - c0) * S doubles of scratch. */
static void BN_NAME(item_sums)(const BN_T *dy, const BN_T *x, const bn_plan *p, ptrdiff_t c0, ptrdiff_t c1,
                               ptrdiff_t n0, ptrdiff_t n1, const double *mean, double *scratch,
                               BN_NAME(bn_sums) *out)
{
    const ptrdiff_t S = p->S;
    if (!p->colmode) {
        const ptrdiff_t stride = p->C * S, rows_per_chunk = S <= BN_SEG ? BN_SEG / S : 1;
        for (ptrdiff_t c = c0; c < c1; c++) {
            BN_NAME(bn_sums) acc = {0, 0}, r;
            for (ptrdiff_t r0 = n0; r0 < n1; r0 += rows_per_chunk) {
                ptrdiff_t runs = n1 - r0 < rows_per_chunk ? n1 - r0 : rows_per_chunk;
                for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_SEG) {
                    ptrdiff_t len = S - s0 < BN_SEG ? S - s0 : BN_SEG, off = (r0 * p->C + c) * S + s0;
                    r = BN_NAME(runs_sums)(dy + off, x + off, len, runs, stride, mean[c]);
                    acc.dy += r.dy;
                    acc.dyxm += r.dyxm;
                }
            }
            out[c - c0] = acc;
        }
        return;
    }
    const ptrdiff_t wb = (c1 - c0) * S;
    double *em = scratch, *sa = scratch + wb, *sb = scratch + 2 * wb;
    for (ptrdiff_t k = 0; k < c1 - c0; k++)
        for (ptrdiff_t s = 0; s < S; s++) em[k * S + s] = mean[c0 + k];
    for (ptrdiff_t q = 0; q < wb; q++) sa[q] = sb[q] = 0;
    for (ptrdiff_t n = n0; n < n1; n++) {
        ptrdiff_t off = n * p->W + c0 * S;
        const BN_T *dr = dy + off, *xr = x + off;
        for (ptrdiff_t q = 0; q < wb; q++) {
            double g = (double)dr[q];
            sa[q] += g;
            sb[q] += g * ((double)xr[q] - em[q]);
        }
    }
    for (ptrdiff_t k = 0; k < c1 - c0; k++) {
        BN_NAME(bn_sums) r = {0, 0};
        for (ptrdiff_t s = 0; s < S; s++) {
            r.dy += sa[k * S + s];
            r.dyxm += sb[k * S + s];
        }
        out[k] = r;
    }
}

#define BN_FOLD (sizeof(BN_T) < sizeof(double))

/* dx over one item, from per-channel k1, k2, k3 (training) or k1 alone. Under BN_FOLD (float32, see
 * bn_forward.tmpl.h for why that is exact enough) training uses dx = k1 * dy + (k3 * x + k2), the mean
 * folded into k2 and k3 by the caller. Column mode needs 4 * (c1 - c0) * S doubles of scratch. */
static void BN_NAME(grad_item)(const BN_T *dy, const BN_T *x, BN_T *dx, const bn_plan *p, ptrdiff_t c0,
                               ptrdiff_t c1, ptrdiff_t n0, ptrdiff_t n1, int training, const double *mean,
                               const double *k1, const double *k2, const double *k3, double *scratch)
{
    const ptrdiff_t S = p->S;
    if (!p->colmode) {
        for (ptrdiff_t n = n0; n < n1; n++)
            for (ptrdiff_t c = c0; c < c1; c++) {
                const double m = mean[c], a = k1[c], b = k2[c], e = k3[c];
                ptrdiff_t off = (n * p->C + c) * S;
                const BN_T *dr = dy + off, *xr = x + off;
                BN_T *out = dx + off;
                if (!training)
                    for (ptrdiff_t s = 0; s < S; s++) out[s] = (BN_T)(a * (double)dr[s]);
                else if (BN_FOLD)
                    for (ptrdiff_t s = 0; s < S; s++)
                        out[s] = (BN_T)(a * (double)dr[s] + ((double)xr[s] * e + b));
                else
                    for (ptrdiff_t s = 0; s < S; s++)
                        out[s] = (BN_T)(a * (((double)dr[s] - b) - ((double)xr[s] - m) * e));
            }
        return;
    }
    const ptrdiff_t wb = (c1 - c0) * S;
    double *em = scratch, *ea = scratch + wb, *eb = scratch + 2 * wb, *ee = scratch + 3 * wb;
    for (ptrdiff_t k = 0; k < c1 - c0; k++)
        for (ptrdiff_t s = 0; s < S; s++) {
            if (!BN_FOLD) em[k * S + s] = mean[c0 + k];
            ea[k * S + s] = k1[c0 + k];
            eb[k * S + s] = k2[c0 + k];
            ee[k * S + s] = k3[c0 + k];
        }
    for (ptrdiff_t n = n0; n < n1; n++) {
        ptrdiff_t off = n * p->W + c0 * S;
        const BN_T *dr = dy + off, *xr = x + off;
        BN_T *out = dx + off;
        if (!training)
            for (ptrdiff_t q = 0; q < wb; q++) out[q] = (BN_T)(ea[q] * (double)dr[q]);
        else if (BN_FOLD)
            for (ptrdiff_t q = 0; q < wb; q++)
                out[q] = (BN_T)(ea[q] * (double)dr[q] + ((double)xr[q] * ee[q] + eb[q]));
        else
            for (ptrdiff_t q = 0; q < wb; q++)
                out[q] = (BN_T)(ea[q] * (((double)dr[q] - eb[q]) - ((double)xr[q] - em[q]) * ee[q]));
    }
}

int BN_NAME(bn_backward)(const BN_T *dy, const BN_T *x, BN_T *dx, bn_dims d, const double *mean,
                         const double *invstd, const double *gamma, int training, double *dgamma,
                         double *dbeta, int nthreads)
{
    bn_plan p;
    /* Two inputs stream through: size items for both. */
    bn_make_plan(&p, d, 2 * sizeof(BN_T), nthreads);
    const ptrdiff_t C = d.C, scratch_per = 4 * p.ch_per_block * d.S;
    const double M = (double)d.N * (double)d.S;
    double *k1 = malloc(sizeof(double) * 3 * (size_t)C);
    double *scratch = malloc(sizeof(double) * (size_t)(scratch_per * p.nthreads));
    BN_NAME(bn_sums) *parts = malloc(sizeof(BN_NAME(bn_sums)) * (size_t)(C * p.ngroups));
    if (!k1 || !scratch || !parts) {
        free(k1); free(scratch); free(parts);
        return BN_ENOMEM;
    }
    double *k2 = k1 + C, *k3 = k1 + 2 * C;
#define BN_FINISH_CHANNEL(c)                                                      \
    do {                                                                          \
        BN_NAME(bn_sums) s_ = parts[(c)];                                         \
        for (ptrdiff_t g_ = 1; g_ < p.ngroups; g_++) {                            \
            s_.dy += parts[g_ * C + (c)].dy;                                      \
            s_.dyxm += parts[g_ * C + (c)].dyxm;                                  \
        }                                                                         \
        dbeta[(c)] = s_.dy;                                                       \
        dgamma[(c)] = invstd[(c)] * s_.dyxm;                                      \
        k1[(c)] = gamma ? gamma[(c)] * invstd[(c)] : invstd[(c)];                 \
        k2[(c)] = training ? s_.dy / M : 0.0;                                     \
        k3[(c)] = training ? invstd[(c)] * dgamma[(c)] / M : 0.0;                 \
        if (BN_FOLD && training) {                                                \
            const double kx_ = -k1[(c)] * k3[(c)];                                \
            k2[(c)] = k1[(c)] * (mean[(c)] * k3[(c)] - k2[(c)]);                  \
            k3[(c)] = kx_;                                                        \
        }                                                                         \
    } while (0)

    BN_PRAGMA(omp parallel num_threads(p.nthreads))
    {
#ifdef _OPENMP
        double *scr = scratch + scratch_per * omp_get_thread_num();
#else
        double *scr = scratch;
#endif
        if (p.fused) {
            BN_PRAGMA(omp for schedule(static))
            for (ptrdiff_t it = 0; it < p.nitems; it++) {
                const bn_item w = bn_item_at(&p, it);
                BN_NAME(item_sums)(dy, x, &p, w.c0, w.c1, w.n0, w.n1, mean, scr, parts + w.c0);
                for (ptrdiff_t c = w.c0; c < w.c1; c++) BN_FINISH_CHANNEL(c);
                BN_NAME(grad_item)(dy, x, dx, &p, w.c0, w.c1, w.n0, w.n1, training, mean, k1, k2, k3, scr);
            }
        } else {
            BN_PRAGMA(omp for schedule(static))
            for (ptrdiff_t it = 0; it < p.nitems; it++) {
                const bn_item w = bn_item_at(&p, it);
                BN_NAME(item_sums)(dy, x, &p, w.c0, w.c1, w.n0, w.n1, mean, scr, parts + w.n0 / p.rows_per_group * C + w.c0);
            }
            BN_PRAGMA(omp for schedule(static))
            for (ptrdiff_t c = 0; c < C; c++) BN_FINISH_CHANNEL(c);
            BN_PRAGMA(omp for schedule(static))
            for (ptrdiff_t it = 0; it < p.nitems; it++) {
                const bn_item w = bn_item_at(&p, it);
                BN_NAME(grad_item)(dy, x, dx, &p, w.c0, w.c1, w.n0, w.n1, training, mean, k1, k2, k3, scr);
            }
        }
    }
#undef BN_FINISH_CHANNEL
    free(k1); free(scratch); free(parts);
    return BN_OK;
}
#undef BN_FOLD
