/*
 * arith_probe.c - what the element arithmetic costs on small, in-cache float32 tensors, outside the
 * library: bare loops of the normalize step y = x * a + b (per channel a, b) three ways, and of the
 * backward's two sums two ways, on the small shapes. It answers "would float32 arithmetic make
 * the small-tensor calls 2x faster than PyTorch's?" with numbers, and says what each way gives up.
 *
 *   make -C csrc arith && ./csrc/arith_probe
 *
 * Normalize (row mode for NCHW, column mode for (N, C), as the kernels walk them):
 *   f64        what the kernels do for a float32 channel: (float)((double)x * a + b), within half a float32
 *              ulp of the exact y (plus 2^-53 relative);
 *   f32 comp   float32 with a compensated split, a = ah + al, b = bh + bl (float32 each):
 *              fmaf(x, ah, bh) + fmaf(x, al, bl), within about one float32 ulp: the kernels' own split
 *              and expression (bn_f32_split, bn_f32_norm in csrc/bn_internal.h), which row mode uses;
 *   f32 fma    fmaf(x, (float)a, (float)b), one rounding of a and b each: several ulps where x * a and
 *              b cancel (y near 0 against |b| of order 1), the float32 arithmetic PyTorch's CPU kernels use.
 * Each line gives the minimum time of many repetitions and the largest error of each way against the
 * exact y in float32 ulps of max(|y|, 1/4) (tests/test_accuracy.py's measure; its bound is 1.5).
 *
 * Backward sums, sum(dy) and sum(dy * (x - m)) in double over a channel's runs (row mode):
 *   two loops  plain C, as GCC vectorizes it (dy read and converted twice);
 *   one loop   GCC/clang vector extensions, the same additions lane by lane, so the same bits (checked
 *              here); the kernels' runs_sums uses the one loop where the compiler has vector extensions.
 */
#define _POSIX_C_SOURCE 200112L
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "../csrc/bn_internal.h" /* bn_f32_split, bn_f32_norm: the kernels' float32 form */
#include "probe_common.h"

#define LANES 16
typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));

typedef struct {
    const float *x;
    float *y;
    long N, C, S;
    const double *a, *b;                   /* per channel */
    const float *ah, *al, *bh, *bl, *af, *bf; /* per position (column mode) or channel (row mode) */
} norm_args;

/* way 0: f64, 1: f32 comp, 2: f32 fma */
__attribute__((noinline)) static void norm_rows(const norm_args *p, int way)
{
    for (long n = 0; n < p->N; n++)
        for (long c = 0; c < p->C; c++) {
            const float *xr = p->x + (n * p->C + c) * p->S;
            float *yr = p->y + (n * p->C + c) * p->S;
            if (way == 0) {
                const double a = p->a[c], b = p->b[c];
                for (long s = 0; s < p->S; s++) yr[s] = (float)((double)xr[s] * a + b);
            } else if (way == 1) {
                const float ah = p->ah[c], al = p->al[c], bh = p->bh[c], bl = p->bl[c];
                for (long s = 0; s < p->S; s++) yr[s] = bn_f32_norm(xr[s], ah, al, bh, bl);
            } else {
                const float a = p->af[c], b = p->bf[c];
                for (long s = 0; s < p->S; s++) yr[s] = fmaf(xr[s], a, b);
            }
        }
}

__attribute__((noinline)) static void norm_cols(const norm_args *p, int way)
{
    const long W = p->C; /* S == 1 */
    for (long n = 0; n < p->N; n++) {
        const float *xr = p->x + n * W;
        float *yr = p->y + n * W;
        if (way == 0)
            for (long q = 0; q < W; q++) yr[q] = (float)((double)xr[q] * p->a[q] + p->b[q]);
        else if (way == 1)
            for (long q = 0; q < W; q++) yr[q] = bn_f32_norm(xr[q], p->ah[q], p->al[q], p->bh[q], p->bl[q]);
        else
            for (long q = 0; q < W; q++) yr[q] = fmaf(xr[q], p->af[q], p->bf[q]);
    }
}

static double lanes_sum(const double *a)
{
    double h[8];
    for (int j = 0; j < 8; j++) h[j] = a[j] + a[j + 8];
    return ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
}

/* Row mode, one channel at a time (S a multiple of LANES here). */
__attribute__((noinline)) static void sums_two(const float *dy, const float *x, long N, long C, long S,
                                               const double *m, double *sa, double *sb)
{
    for (long c = 0; c < C; c++) {
        double a[LANES] = {0}, b[LANES] = {0};
        for (long n = 0; n < N; n++) {
            const float *g = dy + (n * C + c) * S;
            for (long i = 0; i < S; i += LANES)
                for (int j = 0; j < LANES; j++) a[j] += (double)g[i + j];
        }
        for (long n = 0; n < N; n++) {
            const float *g = dy + (n * C + c) * S, *v = x + (n * C + c) * S;
            for (long i = 0; i < S; i += LANES)
                for (int j = 0; j < LANES; j++) b[j] += (double)g[i + j] * ((double)v[i + j] - m[c]);
        }
        sa[c] = lanes_sum(a);
        sb[c] = lanes_sum(b);
    }
}

static inline void load8(v8d *out, const float *p)
{
    v8f f;
    memcpy(&f, p, sizeof f);
    *out = __builtin_convertvector(f, v8d);
}

__attribute__((noinline)) static void sums_one(const float *dy, const float *x, long N, long C, long S,
                                               const double *m, double *sa, double *sb)
{
    for (long c = 0; c < C; c++) {
        const double mc = m[c];
        const v8d mv = {mc, mc, mc, mc, mc, mc, mc, mc};
        v8d a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}, g0, g1, x0, x1;
        for (long n = 0; n < N; n++) {
            const float *g = dy + (n * C + c) * S, *v = x + (n * C + c) * S;
            for (long i = 0; i < S; i += LANES) {
                load8(&g0, g + i);
                load8(&g1, g + i + 8);
                load8(&x0, v + i);
                load8(&x1, v + i + 8);
                a0 += g0;
                a1 += g1;
                b0 += g0 * (x0 - mv);
                b1 += g1 * (x1 - mv);
            }
        }
        double a[LANES], b[LANES];
        memcpy(a, &a0, sizeof a0);
        memcpy(a + 8, &a1, sizeof a1);
        memcpy(b, &b0, sizeof b0);
        memcpy(b + 8, &b1, sizeof b1);
        sa[c] = lanes_sum(a);
        sb[c] = lanes_sum(b);
    }
}

static double unif(void) { return (double)rand() / RAND_MAX; }
static double gauss(void) { return sqrt(-2 * log(unif() + 1e-300)) * cos(6.283185307179586 * unif()); }

/* Largest |got - exact| in float32 ulps of max(|exact|, 1/4), exact = x * a + b in long double. */
static double max_ulps(const norm_args *p)
{
    double worst = 0;
    for (long n = 0; n < p->N; n++)
        for (long c = 0; c < p->C; c++)
            for (long s = 0; s < p->S; s++) {
                const long i = (n * p->C + c) * p->S + s;
                const long double exact = (long double)p->x[i] * p->a[c] + p->b[c];
                const float scale = (float)fmaxl(fabsl(exact), 0.25L);
                const double unit = (double)(nextafterf(scale, INFINITY) - scale);
                const double err = (double)fabsl((long double)p->y[i] - exact) / unit;
                if (err > worst) worst = err;
            }
    return worst;
}

static void probe(long N, long C, long S, int reps)
{
    const long total = N * C * S;
    float *x = malloc(sizeof(float) * total), *y = malloc(sizeof(float) * total),
          *dy = malloc(sizeof(float) * total);
    double *a = malloc(sizeof(double) * C), *b = malloc(sizeof(double) * C), *m = malloc(sizeof(double) * C);
    float *f = malloc(sizeof(float) * 6 * C);
    double *sa = malloc(sizeof(double) * 4 * C);
    for (long i = 0; i < total; i++) {
        x[i] = (float)(gauss() * 1.5 + 0.3);
        dy[i] = (float)gauss();
    }
    /* a BN's coefficients: alpha = gamma * invstd, offset = beta - mean * alpha, gamma and beta of order 1 */
    for (long c = 0; c < C; c++) {
        const double gamma = 0.5 + unif(), beta = gauss(), invstd = 1 / 1.5;
        a[c] = gamma * invstd;
        b[c] = beta - 0.3 * a[c];
        m[c] = 0.3;
        bn_f32_split(a[c], b[c], &f[c], &f[C + c], &f[2 * C + c], &f[3 * C + c]); /* ah, al, bh, bl */
        f[4 * C + c] = (float)a[c];
        f[5 * C + c] = (float)b[c];
    }
    norm_args p = {x, y, N, C, S, a, b, f, f + C, f + 2 * C, f + 3 * C, f + 4 * C, f + 5 * C};
    const int colmode = S == 1;
    double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9}, ulps[3];
    for (int way = 0; way < 3; way++) {
        if (colmode) norm_cols(&p, way); else norm_rows(&p, way);
        ulps[way] = max_ulps(&p);
    }
    for (int r = 0; r < reps; r++)
        for (int k = 0; k < 5; k++) {
            const double t0 = probe_now();
            if (k < 3 && colmode) norm_cols(&p, k);
            else if (k < 3) norm_rows(&p, k);
            else if (k == 3 && !colmode) sums_two(dy, x, N, C, S, m, sa, sa + C);
            else if (!colmode) sums_one(dy, x, N, C, S, m, sa + 2 * C, sa + 3 * C);
            const double t = probe_now() - t0;
            if (t < best[k]) best[k] = t;
        }
    printf("(%ld, %ld%s) %s  normalize: f64 %6.1f us (%.2f ulp)  f32 comp %6.1f us (%.2f ulp)  f32 fma %6.1f us "
           "(%.2f ulp)",
           N, C, S > 1 ? (S == 64 ? ", 8, 8" : ", 16, 16") : "", colmode ? "col" : "row", best[0] * 1e6, ulps[0],
           best[1] * 1e6, ulps[1], best[2] * 1e6, ulps[2]);
    if (!colmode)
        printf("  |  sums: two loops %6.1f us, one loop %6.1f us (bits %s)", best[3] * 1e6, best[4] * 1e6,
               memcmp(sa, sa + 2 * C, sizeof(double) * 2 * C) == 0 ? "same" : "DIFFER");
    printf("\n");
    free(x); free(y); free(dy); free(a); free(b); free(m); free(f); free(sa);
}

int main(int argc, char **argv)
{
    const int reps = argc > 1 ? atoi(argv[1]) : 2000;
    srand(1);
    probe(32, 64, 64, reps);
    probe(8, 16, 256, reps);
    probe(64, 512, 1, reps);
    probe(256, 64, 1, reps);
    return 0;
}
