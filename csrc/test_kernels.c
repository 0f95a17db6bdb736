/* test_kernels.c - the kernels without Python, built with sanitizers by `make -C csrc test`:
 *   - a tiny case against numbers worked out by hand;
 *   - every kernel (float32 and float64, row and column mode) against a naive double computation;
 *   - the phases composed (stats -> merge -> normalize, reduce -> apply) give the fused kernels' bits,
 *     and over a split of the batch agree with the whole batch;
 *   - bit-identical results for 1, 2 and 3 threads;
 *   - statistics at a mean 1e8 (float64) / 1e5 (float32) times the spread against exact values;
 *   - a constant float32 channel at 1e12 normalizes to beta exactly;
 *   - +-inf in a channel gives it mean +-inf (NaN for both) and m2 NaN, wherever it sits;
 *   - masked BN against naive sums over the real positions, NaN padding unread, threads bit-identical. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "batchnorm.h"
#include "bn_internal.h" /* bn_scratch_take / bn_scratch_give */

static int failures = 0;
#define CHECK(cond, ...)                                                             \
    do {                                                                             \
        if (!(cond)) { failures++; fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } \
    } while (0)

static double rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 65536.0 - 0.5; }

static double *dalloc(ptrdiff_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(double)); }

/* Relative closeness with a floor on the scale. */
static int close_to(double a, double b, double rel, double floor_)
{
    double scale = fabs(b) > floor_ ? fabs(b) : floor_;
    return fabs(a - b) <= rel * scale;
}

/* ---- numbers worked out by hand ------------------------------------------------------------- */

static void hand_case(void)
{
    /* x = [[1, 10], [3, 30]] (N = 2, C = 2): mean (2, 20), m2 (2, 200), var (1, 100); eps = 0:
     * y = [[-1, -1], [1, 1]]; with dy = [[1, 0], [0, 2]] and gamma = 1:
     * sum_dy (1, 2), sum_dy_xmu (-1, 20); dx = invstd * (dy - sum_dy/2 - xhat * sum_dy_xmu*invstd/2) */
    const double x[4] = {1, 10, 3, 30}, dy[4] = {1, 0, 0, 2};
    const bn_dims d = {2, 2, 1};
    double y[4], mean[2], m2[2], invstd[2], sdy[2], sdyxm[2], dx[4], dg[2], db[2];
    CHECK(bn_forward_train_f64(x, y, d, NULL, NULL, 0.0, mean, m2, invstd, NULL, 1) == BN_OK, "hand: train");
    CHECK(mean[0] == 2 && mean[1] == 20 && m2[0] == 2 && m2[1] == 200, "hand: mean %g %g m2 %g %g", mean[0],
          mean[1], m2[0], m2[1]);
    CHECK(invstd[0] == 1 && invstd[1] == 0.1, "hand: invstd %g %g", invstd[0], invstd[1]);
    CHECK(y[0] == -1 && y[1] == -1 && y[2] == 1 && y[3] == 1, "hand: y %g %g %g %g", y[0], y[1], y[2], y[3]);
    CHECK(bn_backward_reduce_f64(dy, x, d, mean, sdy, sdyxm, 1) == BN_OK, "hand: reduce");
    CHECK(sdy[0] == 1 && sdy[1] == 2 && sdyxm[0] == -1 && sdyxm[1] == 20, "hand: sums %g %g %g %g", sdy[0],
          sdy[1], sdyxm[0], sdyxm[1]);
    CHECK(bn_backward_f64(dy, x, dx, d, mean, invstd, NULL, 1, dg, db, NULL, 1) == BN_OK, "hand: backward");
    /* channel 0: xhat = (-1, 1), dy - 1/2 = (0.5, -0.5), xhat * (-1)/2 = (0.5, -0.5) -> dx = (0, 0);
     * channel 1: invstd 0.1, xhat = (-1, 1), dy - 1 = (-1, 1), xhat * 2/2 = (-1, 1) -> dx = (0, 0) */
    CHECK(dx[0] == 0 && dx[1] == 0 && dx[2] == 0 && dx[3] == 0, "hand: dx %g %g %g %g", dx[0], dx[1], dx[2], dx[3]);
    CHECK(dg[0] == -1 && db[1] == 2 && fabs(dg[1] - 2) < 1e-15, "hand: dgamma %g %g dbeta %g", dg[0], dg[1], db[1]);
    /* merge of (n = 2, mean 2, m2 2) and (n = 1, mean 5, m2 0): mean 3, m2 2 + 0 + 9 * 2 * 1 / 3 = 8 */
    const int64_t counts[3] = {2, 0, 1};
    const double means[3] = {2, NAN, 5}, m2s[3] = {2, NAN, 0};
    int64_t n;
    double mm, mq;
    CHECK(bn_merge_stats(3, 1, counts, means, m2s, &n, &mm, &mq) == BN_OK, "hand: merge");
    CHECK(n == 3 && mm == 3 && mq == 8, "hand: merged n %lld mean %g m2 %g", (long long)n, mm, mq);
}

/* ---- naive double computations ------------------------------------------------------------- */

static double at(const void *p, int f32, ptrdiff_t i) { return f32 ? ((const float *)p)[i] : ((const double *)p)[i]; }
#define IDX(d, n, c, s) (((n) * (d).C + (c)) * (d).S + (s))

static void naive_stats(const void *x, int f32, bn_dims d, double *mean, double *m2)
{
    const double M = (double)d.N * (double)d.S;
    for (ptrdiff_t c = 0; c < d.C; c++) {
        double s = 0, q = 0;
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t k = 0; k < d.S; k++) s += at(x, f32, IDX(d, n, c, k));
        mean[c] = s / M;
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t k = 0; k < d.S; k++) {
            double v = at(x, f32, IDX(d, n, c, k)) - mean[c];
            q += v * v;
        }
        m2[c] = q;
    }
}

/* ---- one shape, one type: every kernel and phase -------------------------------------------- */

typedef struct {
    int f32;
    size_t es;
} tinfo;

static int train(tinfo t, const void *x, void *y, bn_dims d, const double *g, const double *b, double *mean,
                 double *m2, double *inv, int nt)
{
    return t.f32 ? bn_forward_train_f32(x, y, d, g, b, 1e-5, mean, m2, inv, NULL, nt)
                 : bn_forward_train_f64(x, y, d, g, b, 1e-5, mean, m2, inv, NULL, nt);
}
static int stats(tinfo t, const void *x, bn_dims d, double *mean, double *m2, int nt)
{
    return t.f32 ? bn_batch_stats_f32(x, d, mean, m2, nt) : bn_batch_stats_f64(x, d, mean, m2, nt);
}
static int norm(tinfo t, const void *x, void *y, bn_dims d, const double *mean, const double *inv,
                const double *g, const double *b, int nt)
{
    return t.f32 ? bn_normalize_f32(x, y, d, mean, inv, g, b, NULL, nt) : bn_normalize_f64(x, y, d, mean, inv, g, b, NULL, nt);
}
static int bwd(tinfo t, const void *dy, const void *x, void *dx, bn_dims d, const double *mean, const double *inv,
               const double *g, int training, double *dg, double *db, int nt)
{
    return t.f32 ? bn_backward_f32(dy, x, dx, d, mean, inv, g, training, dg, db, NULL, nt)
                 : bn_backward_f64(dy, x, dx, d, mean, inv, g, training, dg, db, NULL, nt);
}
static int reduce(tinfo t, const void *dy, const void *x, bn_dims d, const double *mean, double *s1, double *s2,
                  int nt)
{
    return t.f32 ? bn_backward_reduce_f32(dy, x, d, mean, s1, s2, nt) : bn_backward_reduce_f64(dy, x, d, mean, s1, s2, nt);
}
static int bapply(tinfo t, const void *dy, const void *x, void *dx, bn_dims d, const double *mean,
                  const double *inv, const double *g, const double *s1, const double *s2, double count, int nt)
{
    return t.f32 ? bn_backward_apply_f32(dy, x, dx, d, mean, inv, g, s1, s2, count, nt)
                 : bn_backward_apply_f64(dy, x, dx, d, mean, inv, g, s1, s2, count, nt);
}

static void run_case(tinfo t, bn_dims d, double offset)
{
    const ptrdiff_t total = d.N * d.C * d.S, C = d.C;
    const double M = (double)d.N * (double)d.S;
    /* y and dx against the naive double computation, whose own mean is off by ~offset * 2^-53 */
    const double cond = 1 + offset * 1e-3, tol = t.f32 ? 2e-6 : 1e-12 * cond;
    char *x = malloc(t.es * (size_t)total), *dy = malloc(t.es * (size_t)total), *y[3], *dx[3];
    char *tmp = malloc(t.es * (size_t)total);
    double *v = dalloc(16 * C);
    double *mean = v, *m2 = v + C, *inv = v + 2 * C, *nm = v + 3 * C, *nq = v + 4 * C, *gamma = v + 5 * C,
           *beta = v + 6 * C, *dg = v + 7 * C, *db = v + 8 * C, *pm = v + 9 * C, *pq = v + 10 * C,
           *s1 = v + 11 * C, *s2 = v + 12 * C, *pinv = v + 13 * C;
    unsigned seed = 42;
    for (ptrdiff_t i = 0; i < total; i++) {
        double a = offset + rnd(&seed) * (1 + (double)(i % 7)), b = rnd(&seed);
        if (t.f32) { ((float *)x)[i] = (float)a; ((float *)dy)[i] = (float)b; }
        else { ((double *)x)[i] = a; ((double *)dy)[i] = b; }
    }
    for (ptrdiff_t c = 0; c < C; c++) { gamma[c] = 1 + rnd(&seed); beta[c] = rnd(&seed); }
    naive_stats(x, t.f32, d, nm, nq);
    for (int k = 0; k < 3; k++) {
        y[k] = malloc(t.es * (size_t)total);
        dx[k] = malloc(t.es * (size_t)total);
        CHECK(train(t, x, y[k], d, gamma, beta, mean, m2, inv, k + 1) == BN_OK, "train failed");
        CHECK(bwd(t, dy, x, dx[k], d, mean, inv, gamma, 1, dg, db, k + 1) == BN_OK, "backward failed");
    }
    for (ptrdiff_t c = 0; c < C; c++) {
        CHECK(close_to(mean[c], nm[c], 1e-13, 1 + fabs(offset)), "mean c=%td: %.17g vs %.17g", c, mean[c], nm[c]);
        CHECK(close_to(m2[c], nq[c], 1e-10, 1e-300), "m2 c=%td: %.17g vs %.17g", c, m2[c], nq[c]);
    }
    for (int k = 1; k < 3; k++) {
        CHECK(memcmp(y[0], y[k], t.es * (size_t)total) == 0, "y differs with %d threads", k + 1);
        CHECK(memcmp(dx[0], dx[k], t.es * (size_t)total) == 0, "dx differs with %d threads", k + 1);
    }
    /* y and dx against the naive formulas, from the naive statistics */
    double worst_y = 0, worst_dx = 0;
    for (ptrdiff_t c = 0; c < C; c++) {
        const double is = 1 / sqrt(nq[c] / M + 1e-5);
        double sd = 0, sdx = 0;
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t s = 0; s < d.S; s++) {
            ptrdiff_t i = IDX(d, n, c, s);
            sd += at(dy, t.f32, i);
            sdx += at(dy, t.f32, i) * (at(x, t.f32, i) - nm[c]);
        }
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t s = 0; s < d.S; s++) {
            ptrdiff_t i = IDX(d, n, c, s);
            double xh = (at(x, t.f32, i) - nm[c]) * is;
            double ey = gamma[c] * xh + beta[c];
            double edx = gamma[c] * is * (at(dy, t.f32, i) - sd / M - xh * is * sdx / M);
            double ey_err = fabs(at(y[0], t.f32, i) - ey) / (1 + fabs(ey));
            double edx_err = fabs(at(dx[0], t.f32, i) - edx) / (1 + fabs(edx));
            if (ey_err > worst_y) worst_y = ey_err;
            if (edx_err > worst_dx) worst_dx = edx_err;
        }
    }
    CHECK(worst_y <= tol, "y off the naive result by %g", worst_y);
    CHECK(worst_dx <= tol * 10, "dx off the naive result by %g", worst_dx);

    /* phases on the whole batch: the fused kernels' bits */
    CHECK(stats(t, x, d, pm, pq, 2) == BN_OK, "stats failed");
    CHECK(memcmp(pm, mean, sizeof(double) * C) == 0 && memcmp(pq, m2, sizeof(double) * C) == 0,
          "batch_stats differs from forward_train's statistics");
    const int64_t one = (int64_t)M;
    int64_t n_out;
    double *mm = dalloc(C), *mq = dalloc(C);
    bn_merge_stats(1, C, &one, pm, pq, &n_out, mm, mq);
    CHECK(n_out == one && memcmp(mm, pm, sizeof(double) * C) == 0 && memcmp(mq, pq, sizeof(double) * C) == 0,
          "merge of one part changed it");
    for (ptrdiff_t c = 0; c < C; c++) pinv[c] = 1.0 / sqrt(mq[c] / (double)n_out + 1e-5);
    CHECK(memcmp(pinv, inv, sizeof(double) * C) == 0, "1/sqrt(m2/count + eps) differs from train's invstd");
    CHECK(norm(t, x, tmp, d, mm, pinv, gamma, beta, 2) == BN_OK, "normalize failed");
    CHECK(memcmp(tmp, y[0], t.es * (size_t)total) == 0, "stats -> merge -> normalize differs from forward_train");
    CHECK(reduce(t, dy, x, d, mean, s1, s2, 2) == BN_OK, "backward_reduce failed");
    for (ptrdiff_t c = 0; c < C; c++)
        CHECK(s1[c] == db[c] && inv[c] * s2[c] == dg[c], "backward_reduce c=%td differs from backward", c);
    CHECK(bapply(t, dy, x, tmp, d, mean, inv, gamma, s1, s2, M, 2) == BN_OK, "backward_apply failed");
    CHECK(memcmp(tmp, dx[0], t.es * (size_t)total) == 0, "reduce -> apply differs from backward");

    /* the batch split along N into 3 uneven parts (the middle one may be empty): merged statistics and
     * summed gradients agree with the whole batch; each part's dx is the whole batch's rows */
    if (d.N >= 2) {
        ptrdiff_t cut[4] = {0, d.N / 3, d.N / 3 + (d.N % 2), d.N};
        int64_t counts[3];
        double *means = dalloc(3 * C), *m2s = dalloc(3 * C), *gs1 = dalloc(C), *gs2 = dalloc(C);
        for (int k = 0; k < 3; k++) {
            bn_dims pd = {cut[k + 1] - cut[k], C, d.S};
            counts[k] = (int64_t)(pd.N * d.S);
            if (pd.N == 0) continue;
            const char *px = x + t.es * (size_t)(cut[k] * C * d.S);
            CHECK(stats(t, px, pd, means + k * C, m2s + k * C, 2) == BN_OK, "part stats failed");
        }
        bn_merge_stats(3, C, counts, means, m2s, &n_out, mm, mq);
        CHECK(n_out == one, "merged count %lld != %lld", (long long)n_out, (long long)one);
        for (ptrdiff_t c = 0; c < C; c++) {
            CHECK(close_to(mm[c], mean[c], 1e-15, 1 + fabs(offset)), "merged mean c=%td: %.17g vs %.17g", c, mm[c], mean[c]);
            CHECK(close_to(mq[c], m2[c], 5e-13 * cond, 1e-300), "merged m2 c=%td: %.17g vs %.17g", c, mq[c], m2[c]);
        }
        for (int k = 0; k < 3; k++) {
            bn_dims pd = {cut[k + 1] - cut[k], C, d.S};
            if (pd.N == 0) continue;
            size_t off = t.es * (size_t)(cut[k] * C * d.S);
            CHECK(reduce(t, dy + off, x + off, pd, mean, s1, s2, 1) == BN_OK, "part reduce failed");
            for (ptrdiff_t c = 0; c < C; c++) { gs1[c] += s1[c]; gs2[c] += s2[c]; }
        }
        for (ptrdiff_t c = 0; c < C; c++)
            CHECK(close_to(gs1[c], db[c], 1e-11, 1) && close_to(inv[c] * gs2[c], dg[c], 1e-11, 1),
                  "summed part sums c=%td differ", c);
        double worst = 0;
        for (int k = 0; k < 3; k++) {
            bn_dims pd = {cut[k + 1] - cut[k], C, d.S};
            if (pd.N == 0) continue;
            size_t off = t.es * (size_t)(cut[k] * C * d.S);
            CHECK(bapply(t, dy + off, x + off, tmp + off, pd, mean, inv, gamma, gs1, gs2, M, 1) == BN_OK, "part apply");
        }
        for (ptrdiff_t i = 0; i < total; i++) {
            double e = fabs(at(tmp, t.f32, i) - at(dx[0], t.f32, i)) / (1 + fabs(at(dx[0], t.f32, i)));
            if (e > worst) worst = e;
        }
        CHECK(worst <= (t.f32 ? 1e-6 : 1e-12), "split dx off the whole batch's by %g", worst);
        free(means); free(m2s); free(gs1); free(gs2);
    }

    /* frozen backward and normalize with running statistics: dx = gamma * invstd * dy exactly as formed */
    CHECK(bwd(t, dy, x, tmp, d, nm, inv, gamma, 0, dg, db, 1) == BN_OK, "frozen backward failed");
    for (ptrdiff_t i = 0; i < total; i += 1 + total / 97) {
        ptrdiff_t c = (i / d.S) % C;
        double e = gamma[c] * inv[c] * at(dy, t.f32, i);
        CHECK(close_to(at(tmp, t.f32, i), e, t.f32 ? 1e-7 : 1e-16, 1e-30), "frozen dx[%td]", i);
    }
    free(mm); free(mq);
    for (int k = 0; k < 3; k++) { free(y[k]); free(dx[k]); }
    free(x); free(dy); free(tmp); free(v);
}

/* ---- statistics at a mean far above the spread --------------------------------------------- */

/* x = offset + d, |d| <= 4 a multiple of a quantum that offset + d holds exactly (float64 at 1e8: 2^-20,
 * its ulp there being 2^-26; float32 at 1e5: 2^-7, its ulp there): the exact mean and m2 are offset +
 * mean(d) and those of d, which a plain two-pass over d (values near 1) gets to ~1e-16. Merging partial
 * means rounded at 2^-53 of the offset gave m2 to only ~1e-9 (float64, column mode). */
static void large_mean_case(int f32, bn_dims d)
{
    const ptrdiff_t total = d.N * d.C * d.S, C = d.C;
    const double offset = f32 ? 1e5 : 1e8, quantum = f32 ? 1.0 / 128 : 1.0 / (1 << 20);
    void *x = malloc((f32 ? sizeof(float) : sizeof(double)) * (size_t)total);
    double *dv = dalloc(total), *v = dalloc(6 * C);
    double *mean = v, *m2 = v + C, *dm = v + 2 * C, *dq = v + 3 * C, *tm = v + 4 * C, *inv = v + 5 * C;
    unsigned seed = 7;
    for (ptrdiff_t i = 0; i < total; i++) {
        dv[i] = floor(rnd(&seed) * 8 / quantum) * quantum; /* |d| <= 4 */
        if (f32) ((float *)x)[i] = (float)(offset + dv[i]);
        else ((double *)x)[i] = offset + dv[i];
        CHECK(at(x, f32, i) == offset + dv[i], "large mean: x[%td] not exact", i);
    }
    naive_stats(dv, 0, d, dm, dq);
    CHECK((f32 ? bn_batch_stats_f32(x, d, mean, m2, 2) : bn_batch_stats_f64(x, d, mean, m2, 2)) == BN_OK,
          "large mean: stats failed");
    for (ptrdiff_t c = 0; c < C; c++) {
        CHECK(close_to(mean[c], offset + dm[c], 1e-16, 1), "large mean c=%td: mean %.17g vs %.17g", c, mean[c],
              offset + dm[c]);
        CHECK(close_to(m2[c], dq[c], 1e-13, 1e-300), "large mean c=%td: m2 %.17g vs %.17g", c, m2[c], dq[c]);
    }
    /* forward_train's statistics are batch_stats' */
    void *y = malloc((f32 ? sizeof(float) : sizeof(double)) * (size_t)total);
    CHECK((f32 ? bn_forward_train_f32(x, y, d, NULL, NULL, 1e-5, tm, dq, inv, NULL, 1)
               : bn_forward_train_f64(x, y, d, NULL, NULL, 1e-5, tm, dq, inv, NULL, 1)) == BN_OK, "large mean: train");
    CHECK(memcmp(tm, mean, sizeof(double) * C) == 0 && memcmp(dq, m2, sizeof(double) * C) == 0,
          "large mean: forward_train's statistics differ from batch_stats'");
    free(x); free(y); free(dv); free(v);
}

/* ---- float32 channels whose mean dwarfs their spread: centred, not folded ------------------- */

/* A constant float32 channel at 1e12 has invstd = 1/sqrt(eps) and |mean| * invstd = 3e14: folded,
 * y = x * alpha + (beta - mean * alpha) gave 0.125 for beta = 0.123456. Centred, y is beta exactly,
 * in forward_train and normalize, row mode and column mode, beside a channel that keeps the fold. */
static void huge_mean_f32_case(bn_dims d)
{
    const ptrdiff_t total = d.N * d.C * d.S;
    float *x = malloc(sizeof(float) * (size_t)total), *y = malloc(sizeof(float) * (size_t)total);
    double beta[2] = {0.123456, -0.3}, mean[2], m2[2], inv[2];
    unsigned seed = 3;
    for (ptrdiff_t n = 0; n < d.N; n++)
        for (ptrdiff_t s = 0; s < d.S; s++) {
            x[IDX(d, n, 0, s)] = 1e12f;
            x[IDX(d, n, 1, s)] = (float)rnd(&seed);
        }
    for (int phase = 0; phase < 2; phase++) {
        if (phase == 0) CHECK(bn_forward_train_f32(x, y, d, NULL, beta, 1e-5, mean, m2, inv, NULL, 2) == BN_OK, "train");
        else CHECK(bn_normalize_f32(x, y, d, mean, inv, NULL, beta, NULL, 2) == BN_OK, "normalize");
        int exact = 1;
        for (ptrdiff_t n = 0; n < d.N; n++)
            for (ptrdiff_t s = 0; s < d.S; s++) exact &= y[IDX(d, n, 0, s)] == (float)beta[0];
        CHECK(exact, "huge mean: %s y of a constant channel at 1e12 is not beta", phase ? "normalize" : "train");
    }
    CHECK(mean[0] == (double)1e12f && m2[0] == 0, "huge mean: constant channel mean %.17g m2 %g", mean[0], m2[0]);
    /* the folded channel beside it has the bits it has alone (column mode runs the centred loop for an
     * item with any centred channel, centring folded channels on +0.0) */
    const bn_dims d1 = {d.N, 1, d.S};
    float *x1 = malloc(sizeof(float) * (size_t)(d.N * d.S)), *y1 = malloc(sizeof(float) * (size_t)(d.N * d.S));
    for (ptrdiff_t n = 0; n < d.N; n++)
        for (ptrdiff_t s = 0; s < d.S; s++) x1[IDX(d1, n, 0, s)] = x[IDX(d, n, 1, s)];
    CHECK(bn_forward_train_f32(x, y, d, NULL, beta, 1e-5, mean, m2, inv, NULL, 2) == BN_OK, "train");
    CHECK(bn_forward_train_f32(x1, y1, d1, NULL, beta + 1, 1e-5, mean, m2, inv, NULL, 2) == BN_OK, "train");
    int same = 1;
    for (ptrdiff_t n = 0; n < d.N; n++)
        for (ptrdiff_t s = 0; s < d.S; s++) same &= memcmp(&y1[IDX(d1, n, 0, s)], &y[IDX(d, n, 1, s)], sizeof(float)) == 0;
    CHECK(same, "huge mean: a folded channel's y differs beside a centred one");
    free(x); free(y); free(x1); free(y1);
}

/* ---- +-inf: mean +-inf (NaN for both signs) wherever the inf sits, m2 NaN, other channels finite ---- */

static void inf_case(int f32, bn_dims d, ptrdiff_t at_n, ptrdiff_t at_s, int both)
{
    const ptrdiff_t total = d.N * d.C * d.S;
    const size_t es = f32 ? sizeof(float) : sizeof(double);
    char *x = malloc(es * (size_t)total);
    double *v = dalloc(3 * d.C), *mean = v, *m2 = v + d.C, *inv = v + 2 * d.C;
    unsigned seed = 11;
    for (ptrdiff_t i = 0; i < total; i++) {
        double a = rnd(&seed);
        if (f32) ((float *)x)[i] = (float)a;
        else ((double *)x)[i] = a;
    }
    const ptrdiff_t i1 = IDX(d, at_n, 1, at_s), i2 = IDX(d, d.N - 1 - at_n, 1, d.S - 1 - at_s);
    if (f32) { ((float *)x)[i1] = INFINITY; if (both) ((float *)x)[i2] = -INFINITY; }
    else { ((double *)x)[i1] = INFINITY; if (both) ((double *)x)[i2] = -INFINITY; }
    void *y = malloc(es * (size_t)total);
    for (int nt = 1; nt <= 2; nt++) {
        CHECK((f32 ? bn_forward_train_f32((float *)x, y, d, NULL, NULL, 1e-5, mean, m2, inv, NULL, nt)
                   : bn_forward_train_f64((double *)x, y, d, NULL, NULL, 1e-5, mean, m2, inv, NULL, nt)) == BN_OK, "inf: train");
        CHECK(both ? isnan(mean[1]) : mean[1] == INFINITY, "inf: mean %g (n=%td s=%td both=%d)", mean[1], at_n, at_s, both);
        CHECK(isnan(m2[1]) && isnan(inv[1]), "inf: m2 %g invstd %g", m2[1], inv[1]);
        CHECK(isfinite(mean[0]) && isfinite(m2[0]) && isfinite(mean[2]) && isfinite(m2[2]), "inf leaked");
    }
    free(x); free(y); free(v);
}

/* ---- masked BN (bn_masked.c) ---------------------------------------------------------------- */

/* Against naive double sums over the real positions; zeros at padding (NaN there is never read); the same
 * bits for 1, 2 and 3 threads. */
static void masked_case(tinfo t, bn_dims d)
{
    unsigned seed = 11u + (unsigned)(d.N * 7 + d.C * 3 + d.S);
    const ptrdiff_t total = d.N * d.C * d.S, P = d.N * d.S;
    void *x = malloc((size_t)total * t.es), *dy = malloc((size_t)total * t.es), *y = malloc((size_t)total * t.es),
         *dx = malloc((size_t)total * t.es), *y2 = malloc((size_t)total * t.es), *dx2 = malloc((size_t)total * t.es);
    uint8_t *mask = malloc((size_t)P);
    double *mean = dalloc(d.C), *m2 = dalloc(d.C), *inv = dalloc(d.C), *g = dalloc(d.C), *b = dalloc(d.C),
           *dg = dalloc(d.C), *db = dalloc(d.C), *mean2 = dalloc(d.C), *m22 = dalloc(d.C), *inv2 = dalloc(d.C),
           *dg2 = dalloc(d.C), *db2 = dalloc(d.C), *sm = dalloc(d.C), *sq = dalloc(d.C);
    for (ptrdiff_t p = 0; p < P; p++) mask[p] = rnd(&seed) < 0.2 || p < 2;
    for (ptrdiff_t i = 0; i < total; i++) {
        const int real = mask[(i / (d.C * d.S)) * d.S + i % d.S];
        const double v = real ? 3.0 + rnd(&seed) : NAN, w = real ? rnd(&seed) : NAN;
        if (t.f32) { ((float *)x)[i] = (float)v; ((float *)dy)[i] = (float)w; }
        else { ((double *)x)[i] = v; ((double *)dy)[i] = w; }
    }
    for (ptrdiff_t c = 0; c < d.C; c++) { g[c] = 1.0 + 0.1 * (double)c; b[c] = 0.5 - 0.2 * (double)c; }
    const double M = (double)bn_mask_count(mask, P);
    for (int nt = 1; nt <= 3; nt++) {
        double *mo = nt == 1 ? mean : mean2, *qo = nt == 1 ? m2 : m22, *io = nt == 1 ? inv : inv2;
        double *go = nt == 1 ? dg : dg2, *bo = nt == 1 ? db : db2;
        void *yo = nt == 1 ? y : y2, *dxo = nt == 1 ? dx : dx2;
        int st = t.f32 ? bn_masked_forward_train_f32(x, mask, yo, d, g, b, 1e-5, mo, qo, io, nt)
                       : bn_masked_forward_train_f64(x, mask, yo, d, g, b, 1e-5, mo, qo, io, nt);
        CHECK(st == BN_OK, "masked: forward status");
        st = t.f32 ? bn_masked_backward_f32(dy, x, mask, dxo, d, mo, io, g, 1, go, bo, nt)
                   : bn_masked_backward_f64(dy, x, mask, dxo, d, mo, io, g, 1, go, bo, nt);
        CHECK(st == BN_OK, "masked: backward status");
        st = t.f32 ? bn_masked_batch_stats_f32(x, mask, d, sm, sq, nt) : bn_masked_batch_stats_f64(x, mask, d, sm, sq, nt);
        CHECK(st == BN_OK && !memcmp(sm, mo, (size_t)d.C * sizeof *sm) && !memcmp(sq, qo, (size_t)d.C * sizeof *sq),
              "masked: batch_stats differs from forward_train's statistics (threads %d)", nt);
        if (nt > 1) {
            CHECK(!memcmp(y, y2, (size_t)total * t.es) && !memcmp(dx, dx2, (size_t)total * t.es) &&
                  !memcmp(mean, mean2, (size_t)d.C * sizeof *mean) && !memcmp(m2, m22, (size_t)d.C * sizeof *m2) &&
                  !memcmp(dg, dg2, (size_t)d.C * sizeof *dg) && !memcmp(db, db2, (size_t)d.C * sizeof *db),
                  "masked: %d threads change the bits", nt);
        }
    }
    const double tol = t.f32 ? 1e-5 : 1e-12;
    for (ptrdiff_t c = 0; c < d.C; c++) {
        double s = 0, q = 0, sdy = 0, sdyx = 0;
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t k = 0; k < d.S; k++)
            if (mask[n * d.S + k]) s += at(x, t.f32, IDX(d, n, c, k));
        const double mu = s / M;
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t k = 0; k < d.S; k++)
            if (mask[n * d.S + k]) {
                const double v = at(x, t.f32, IDX(d, n, c, k)) - mu, w = at(dy, t.f32, IDX(d, n, c, k));
                q += v * v; sdy += w; sdyx += w * v;
            }
        CHECK(close_to(mean[c], mu, 1e-13, 1.0) && close_to(m2[c], q, 1e-12, 1.0), "masked: stats c=%td", c);
        const double is = 1.0 / sqrt(q / M + 1e-5);
        CHECK(close_to(db[c], sdy, 1e-12, 1.0) && close_to(dg[c], sdyx * is, 1e-12, 1.0), "masked: dgamma/dbeta c=%td", c);
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t k = 0; k < d.S; k++) {
            const ptrdiff_t i = IDX(d, n, c, k);
            if (!mask[n * d.S + k]) {
                CHECK(at(y, t.f32, i) == 0 && at(dx, t.f32, i) == 0, "masked: padding not zero at %td", i);
                continue;
            }
            const double xh = (at(x, t.f32, i) - mu) * is, w = at(dy, t.f32, i);
            CHECK(close_to(at(y, t.f32, i), g[c] * xh + b[c], tol, 1.0), "masked: y at %td", i);
            CHECK(close_to(at(dx, t.f32, i), g[c] * is * (w - sdy / M - xh * sdyx * is / M), tol, 1.0),
                  "masked: dx at %td", i);
        }
    }
    free(x); free(dy); free(y); free(dx); free(y2); free(dx2); free(mask);
    free(mean); free(m2); free(inv); free(g); free(b); free(dg); free(db); free(mean2); free(m22); free(inv2);
    free(dg2); free(db2); free(sm); free(sq);
}

/* The kernels' per-call scratch: a block given back serves the next request of its size (where blocks
 * are kept), blocks held at once are distinct, and more blocks than slots given back leak nothing (the
 * leak checker of this sanitized build runs at exit). */
static void scratch_case(void)
{
    unsigned char *p = bn_scratch_take(1000);
    CHECK(p != NULL, "scratch: take failed");
    if (p == NULL) return;
    memset(p, 7, 1000);
    bn_scratch_give(p);
    unsigned char *q = bn_scratch_take(1000), *r = bn_scratch_take(1000);
    CHECK(q != NULL && r != NULL && q != r, "scratch: two blocks held at once must differ");
    if (BN_SCRATCH_KEEPS) CHECK(q == p || r == p, "scratch: the block given back was not reused");
    if (q && r) {
        memset(q, 1, 1000);
        memset(r, 2, 1000);
        CHECK(q[999] == 1 && r[0] == 2, "scratch: blocks overlap");
    }
    bn_scratch_give(q);
    bn_scratch_give(r);
    void *many[BN_SCRATCH_SLOTS + 3];
    for (int i = 0; i < BN_SCRATCH_SLOTS + 3; i++) many[i] = bn_scratch_take((size_t)(100 + 10 * i));
    for (int i = 0; i < BN_SCRATCH_SLOTS + 3; i++) bn_scratch_give(many[i]);
    unsigned char *big = bn_scratch_take(BN_SCRATCH_KEEP_BYTES + 1); /* freed, not kept, when given back */
    CHECK(big != NULL, "scratch: a large block");
    if (big) big[BN_SCRATCH_KEEP_BYTES] = 1;
    bn_scratch_give(big);
}

static void large_case(void);

/* The binding's array blocks: 64-byte aligned; a block serves requests of more than half its size only;
 * bn_block_resize keeps the contents; a full pool lets the newest block displace a kept one, so a size
 * used now is kept whatever sizes filled the pool before. */
static void block_case(void)
{
    unsigned char *p = bn_block_take(100000);
    CHECK(p != NULL && (uintptr_t)p % 64 == 0, "block: take failed or not 64-byte aligned");
    if (p == NULL) return;
    bn_block_give(p);
    unsigned char *small = bn_block_take(40000);
    CHECK(small != NULL && small != p, "block: a block served a request of less than half its size");
    unsigned char *q = bn_block_take(100000);
    if (BN_SCRATCH_KEEPS) CHECK(q == p, "block: the block given back was not reused");
    bn_block_give(small);
    if (q == NULL) return;
    for (int i = 0; i < 100000; i++) q[i] = (unsigned char)i;
    unsigned char *g = bn_block_resize(q, 200000); /* grows: a new block, the old contents */
    CHECK(g != NULL && (uintptr_t)g % 64 == 0, "block: resize failed or not aligned");
    if (g == NULL) return;
    CHECK(g[0] == 0 && g[99999] == (unsigned char)99999, "block: resize lost the contents");
    g[199999] = 1;
    unsigned char *h = bn_block_resize(g, 150000); /* shrinks to more than half: the same block */
    CHECK(h == g && h[99999] == (unsigned char)99999, "block: resize within the block moved it");
    bn_block_give(h);
    void *many[BN_BLOCK_SLOTS];
    for (int i = 0; i < BN_BLOCK_SLOTS; i++) many[i] = bn_block_take(3000);
    for (int i = 0; i < BN_BLOCK_SLOTS; i++) bn_block_give(many[i]); /* the pool is full of 3000-byte blocks */
    unsigned char *fresh = bn_block_take(70000);
    CHECK(fresh != NULL, "block: take failed");
    bn_block_give(fresh);
    unsigned char *again = bn_block_take(70000);
    if (BN_SCRATCH_KEEPS) CHECK(again == fresh, "block: a full pool did not keep the newest block");
    bn_block_give(again);
    large_case();
}

/* Blocks over BN_BLOCK_MAX_BYTES: kept up to the limit (bn_cache_set_limit) and reused, all handed back
 * by bn_cache_release, which counts their bytes. */
static void large_case(void)
{
    const size_t n = (size_t)3 << 20;
    bn_cache_release();
    unsigned char *big = bn_block_take(n);
    CHECK(big != NULL && (uintptr_t)big % 64 == 0, "large: take failed or not 64-byte aligned");
    if (big == NULL) return;
    big[n - 1] = 1;
    bn_block_give(big);
    unsigned char *again = bn_block_take(n);
    if (BN_SCRATCH_KEEPS) CHECK(again == big, "large: the block given back was not reused");
    unsigned char *other = bn_block_take(n);
    CHECK(other != NULL && other != again, "large: two live blocks are one");
    const size_t old = bn_cache_set_limit(n + n / 2); /* room for one of the two */
    CHECK(old == BN_LARGE_LIMIT_DEFAULT, "large: the default limit");
    bn_block_give(again);
    bn_block_give(other);
    size_t got = bn_cache_release();
    if (BN_SCRATCH_KEEPS) CHECK(got >= n && got < 2 * n, "large: the limit did not hold (one block kept)");
    CHECK(bn_cache_release() == 0, "large: a second release found blocks");
    bn_cache_set_limit(0); /* none kept */
    bn_block_give(bn_block_take(n));
    CHECK(bn_cache_release() == 0, "large: a block was kept under a limit of 0");
    bn_cache_set_limit(old);
}

int main(void)
{
    bn_dims cases[] = {{2, 3, 1}, {7, 5, 3}, {64, 8, 40}, {300, 4, 1}, {5000, 3, 1}, {3, 2, 70000},
                       {129, 700, 1}, {2, 20, 5000}, {40, 1, 33}, {1, 3, 50}};
    const size_t ncases = sizeof cases / sizeof cases[0];
    size_t run = 0, failed = 0;
    int before = failures;
    hand_case();
    run++; failed += failures != before;
    before = failures;
    scratch_case();
    block_case();
    run++; failed += failures != before;
    for (int f32 = 0; f32 < 2; f32++)
        for (size_t i = 0; i < 2 * ncases; i++) {
            tinfo t = {f32, f32 ? sizeof(float) : sizeof(double)};
            before = failures;
            run_case(t, cases[i / 2], i % 2 ? 1e5 : 0.0);
            if (failures != before) {
                fprintf(stderr, "  in case N=%td C=%td S=%td %s offset %g\n", cases[i / 2].N, cases[i / 2].C,
                        cases[i / 2].S, f32 ? "f32" : "f64", i % 2 ? 1e5 : 0.0);
                failed++;
            }
            run++;
        }
    bn_dims infd[] = {{5000, 3, 1}, {300, 3, 7}, {40, 3, 1024}, {3, 3, 5000}};
    for (int f32 = 0; f32 < 2; f32++)
        for (size_t i = 0; i < sizeof infd / sizeof infd[0]; i++)
            for (int k = 0; k < 4; k++) {
                before = failures;
                const ptrdiff_t at_n = k == 0 ? 0 : k == 1 ? infd[i].N / 2 : infd[i].N - 1;
                inf_case(f32, infd[i], at_n, k == 0 ? 0 : infd[i].S / 2, k == 3);
                if (failures != before) {
                    fprintf(stderr, "  in inf case N=%td C=%td S=%td %s k=%d\n", infd[i].N, infd[i].C, infd[i].S,
                            f32 ? "f32" : "f64", k);
                    failed++;
                }
                run++;
            }
    bn_dims huge[] = {{8, 2, 1}, {300, 2, 1}, {8, 2, 40}, {3, 2, 5000}};
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        before = failures;
        huge_mean_f32_case(huge[i]);
        if (failures != before) {
            fprintf(stderr, "  in huge-mean case N=%td C=%td S=%td\n", huge[i].N, huge[i].C, huge[i].S);
            failed++;
        }
        run++;
    }
    bn_dims large[] = {{5000, 3, 1}, {3000, 40, 1}, {300, 4, 7}, {300, 3, 40}, {2, 3, 5000}, {64, 3, 64}};
    for (int f32 = 0; f32 < 2; f32++)
        for (size_t i = 0; i < sizeof large / sizeof large[0]; i++) {
            before = failures;
            large_mean_case(f32, large[i]);
            if (failures != before) {
                fprintf(stderr, "  in large-mean case N=%td C=%td S=%td %s\n", large[i].N, large[i].C, large[i].S,
                        f32 ? "f32" : "f64");
                failed++;
            }
            run++;
        }
    bn_dims masked[] = {{2, 3, 1}, {7, 5, 3}, {300, 4, 1}, {129, 300, 1}, {3, 2, 5000}, {40, 3, 33}, {2000, 40, 1}};
    for (int f32 = 0; f32 < 2; f32++)
        for (size_t i = 0; i < sizeof masked / sizeof masked[0]; i++) {
            tinfo t = {f32, f32 ? sizeof(float) : sizeof(double)};
            before = failures;
            masked_case(t, masked[i]);
            if (failures != before) {
                fprintf(stderr, "  in masked case N=%td C=%td S=%td %s\n", masked[i].N, masked[i].C, masked[i].S,
                        f32 ? "f32" : "f64");
                failed++;
            }
            run++;
        }
    printf("test_kernels: %zu passed, %zu failed\n", run - failed, failed);
    return failures ? 1 : 0;
}
