/*
 * colstats_probe.c - what column mode's statistics ((N, C) and channels-last float32, read from memory at
 * one thread) can cost at best with float64 sums, outside the library: bare loops of the one pass that
 * batch_stats makes over most rows (per position, d = (double)x - m, Sum d and Sum d^2, no FMA, as the
 * kernels are built), in the memory patterns it could use, against a copy of the same tensor.
 *
 *   make -C csrc colstats && ./csrc/colstats_probe     # 64 MiB float32 tensors, (N, W) for W = 256 .. 4096
 *   ./csrc/colstats_probe 128                          # tensors of 128 MiB (keep them well above L3)
 *
 * Patterns (each position's rows are added in row order, so every one gives the kernels' sums):
 *   copy          memcpy of the tensor: 1 read + 1 write, what "x copies" counts in;
 *   read          a float32 sum of the tensor (16 lanes): the bare read, no float64 arithmetic;
 *   contiguous    the one pass's arithmetic over the tensor as one stream, four vectors of sums held in
 *                 registers: the arithmetic at the memory's pace, which no column layout reaches (each
 *                 position needs its own sums);
 *   sweep R       the kernels' form: R rows at a time, each position's sums loaded and stored once per R
 *                 rows (batch_stats uses R = 8 at (8192, 1024));
 *   sweep R + pf  the same with a software prefetch of the next sweep's rows.
 * The training forward's limit counts 1.5 copies (x read twice, y written); the normalize pass takes
 * about one copy, so the training forward reaches 0.85 of that limit only where the statistics take
 * 0.76 of a copy or less. Best of REPS (default 15) runs; buffers 2 MiB aligned with MADV_HUGEPAGE.
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include "probe_common.h"

typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

static inline v8d widen(const float *p)
{
    v8f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, v8d);
}

__attribute__((noinline)) static float read_sum(const float *x, ptrdiff_t n)
{
    v16f a = {0}, b = {0}, c = {0}, d = {0}, u;
    for (ptrdiff_t i = 0; i + 64 <= n; i += 64) {
        memcpy(&u, x + i, 64); a += u;
        memcpy(&u, x + i + 16, 64); b += u;
        memcpy(&u, x + i + 32, 64); c += u;
        memcpy(&u, x + i + 48, 64); d += u;
    }
    a += b + c + d;
    return a[0] + a[15];
}

__attribute__((noinline)) static double contiguous(const float *x, ptrdiff_t n, double m)
{
    const v8d mv = {m, m, m, m, m, m, m, m};
    v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
    for (ptrdiff_t i = 0; i + 16 <= n; i += 16) {
        const v8d d0 = widen(x + i) - mv, d1 = widen(x + i + 8) - mv;
        s0 += d0;
        s1 += d1;
        q0 += d0 * d0;
        q1 += d1 * d1;
    }
    return s0[0] + s1[1] + q0[2] + q1[3];
}

/* R rows a sweep over N rows of W floats (W a multiple of 16, N of R); pf: prefetch the next sweep's rows */
__attribute__((always_inline)) static inline void sweeps(const float *x, ptrdiff_t N, ptrdiff_t W, double *s1,
                                                         double *s2, const double *m, const int R, const int pf)
{
    for (ptrdiff_t r = 0; r < N; r += R) {
        const float *ra = x + r * W;
        for (ptrdiff_t q = 0; q < W; q += 8) {
            if (pf && q % 16 == 0 && r + 2 * R <= N)
                for (int j = 0; j < R; j++) __builtin_prefetch(ra + (R + j) * W + q);
            v8d a, b, c;
            memcpy(&a, s1 + q, 64);
            memcpy(&b, s2 + q, 64);
            memcpy(&c, m + q, 64);
            for (int j = 0; j < R; j++) {
                const v8d d = widen(ra + j * W + q) - c;
                a += d;
                b += d * d;
            }
            memcpy(s1 + q, &a, 64);
            memcpy(s2 + q, &b, 64);
        }
    }
}

#define SWEEP(R, PF)                                                                                     \
    __attribute__((noinline)) static void sweep_##R##_##PF(const float *x, ptrdiff_t N, ptrdiff_t W,      \
                                                           double *s1, double *s2, const double *m)       \
    {                                                                                                     \
        sweeps(x, N, W, s1, s2, m, R, PF);                                                                \
    }
SWEEP(1, 0)
SWEEP(2, 0)
SWEEP(4, 0)
SWEEP(8, 0)
SWEEP(16, 0)
SWEEP(4, 1)
SWEEP(8, 1)

typedef void (*sweep_fn)(const float *, ptrdiff_t, ptrdiff_t, double *, double *, const double *);

int main(int argc, char **argv)
{
    const ptrdiff_t mib = argc > 1 ? atol(argv[1]) : 64, n = mib << 18, Wmax = 4096;
    const int reps = getenv("REPS") ? atoi(getenv("REPS")) : 15;
    if (mib < 1 || mib > 4096) {
        fprintf(stderr, "tensor size in MiB: 1 to 4096\n");
        return 2;
    }
    float *x = probe_alloc(sizeof(float) * (size_t)n), *y = probe_alloc(sizeof(float) * (size_t)n);
    double *s = probe_alloc(sizeof(double) * 3 * Wmax);
    if (!x || !y || !s) return 1;
    for (ptrdiff_t i = 0; i < n; i++) x[i] = (float)(i % 7) * 0.25f;
    const sweep_fn fn[] = {sweep_1_0, sweep_2_0, sweep_4_0, sweep_8_0, sweep_16_0, sweep_4_1, sweep_8_1};
    const char *names[] = {"sweep 1", "sweep 2", "sweep 4", "sweep 8", "sweep 16", "sweep 4 + pf", "sweep 8 + pf"};
    const int nf = (int)(sizeof fn / sizeof fn[0]);
    volatile double sink = 0;
    printf("(N, W) float32 tensors of %td MiB, one thread, best of %d; times in copies of the tensor\n", mib, reps);
    printf("%6s %9s %6s %10s", "W", "copy ms", "read", "contiguous");
    for (int k = 0; k < nf; k++) printf(" %12s", names[k]);
    printf("\n");
    for (ptrdiff_t W = 256; W <= Wmax; W *= 2) {
        const ptrdiff_t N = n / W;
        double best[3 + sizeof fn / sizeof fn[0]];
        for (int k = 0; k < 3 + nf; k++) best[k] = 1e9;
        for (int r = 0; r < reps; r++) {
            for (int k = 0; k < 3 + nf; k++) {
                const double t0 = probe_now();
                if (k == 0) memcpy(y, x, sizeof(float) * (size_t)n);
                else if (k == 1) sink += read_sum(x, n);
                else if (k == 2) sink += contiguous(x, n, 0.5);
                else fn[k - 3](x, N, W, s, s + Wmax, s + 2 * Wmax);
                const double t = probe_now() - t0;
                if (t < best[k]) best[k] = t;
            }
        }
        printf("%6td %9.3f %6.2f %10.2f", W, best[0] * 1e3, best[1] / best[0], best[2] / best[0]);
        for (int k = 0; k < nf; k++) printf(" %12.2f", best[3 + k] / best[0]);
        printf("\n");
        sink += s[W / 2];
    }
    (void)sink;
    free(x);
    free(y);
    free(s);
    return 0;
}
