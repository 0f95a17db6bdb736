/*
 * colstats_probe.c - what column mode ((N, C) and channels-last float32, read from memory at one thread)
 * can cost at best with float64 sums and coefficients per position, outside the library: bare loops of the
 * kernels' arithmetic in the memory patterns they could use, against a copy of the same tensor.
 *
 *   make -C csrc colstats && ./csrc/colstats_probe     # statistics: 64 MiB float32 tensors, W = 256 .. 4096
 *   ./csrc/colstats_probe 128                          # tensors of 128 MiB (keep them well above L3)
 *   ./csrc/colstats_probe 64 bwd                       # the backward's two passes over x and dy
 *
 * Statistics: the one pass that batch_stats makes over most rows (per position, d = (double)x - m, Sum d
 * and Sum d^2, no FMA, as the kernels are built). Each position's rows are added in row order, so every
 * pattern gives the kernels' sums:
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
 * 0.76 of a copy or less.
 *
 * Backward (bwd): backward_reduce's sums (per position, g = (double)dy, Sum g and Sum g * ((double)x - m))
 * and backward_apply's float32 training dx ((float)(a * g + ((double)x * e + b)), three coefficients per
 * position), times in copies of one tensor:
 *   read x+dy     a float32 sum of both tensors: the bare reads of the first pass;
 *   sums contig   the sums' arithmetic over the two streams, sums in registers;
 *   sums R        R rows a sweep, sums loaded and stored once per sweep (the kernels: 1, 2 or 4);
 *   sums il R     the same with each 8 positions' two sums and mean side by side in one array;
 *   dx contig     dx with the coefficients in registers;
 *   dx 1 row, dx 4 rows, dx pairs   one row, four consecutive rows, or two rows half the tensor apart
 *                 (grad_cols' pairs) per load of the coefficients;
 *   dx il 1       one row, each 8 positions' three coefficients side by side;
 *   dx blk 512    column blocks of 512 positions, each through every row before the next;
 *   dx pairs nt, dx 1 nt, dx contig nt   the same with non-temporal stores of dx (no read for ownership);
 *   copy loop     a copy in 64-byte loads and stores, against memcpy's;
 *   sums tT, dx tT   tiles of T rows by 512 positions: the tile's rows for 512 positions, then the next
 *                 512 positions of the same rows (from L2 by then), so that the per-position values of
 *                 a tile stay in L1; dx t16 pf also prefetches the rest of each row in the first pass;
 *   best sum+dx   the best sums pattern plus the best dx pattern with plain stores: what the kernels'
 *                 backward could take;
 *   check         whether every sums pattern and every dx pattern gave the bits of the one-row loop.
 * The backward's limit counts 2.5 copies (x and dy read twice, dx written): 0.85 of it is 2.94 copies.
 * Best of REPS (default 15) runs; buffers 2 MiB aligned with MADV_HUGEPAGE.
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include "probe_common.h"
#ifdef __AVX__
#include <immintrin.h>
#endif

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

/* The backward's passes (bwd): cols_sums_sweep's sums and dx_cols_v8's dx, as the header says. */
__attribute__((noinline)) static float read2_sum(const float *x, const float *g, ptrdiff_t n)
{
    v16f a = {0}, b = {0}, c = {0}, d = {0}, u;
    for (ptrdiff_t i = 0; i + 32 <= n; i += 32) {
        memcpy(&u, x + i, 64); a += u;
        memcpy(&u, x + i + 16, 64); b += u;
        memcpy(&u, g + i, 64); c += u;
        memcpy(&u, g + i + 16, 64); d += u;
    }
    a += b + c + d;
    return a[0] + a[15];
}

__attribute__((noinline)) static double bsums_contiguous(const float *x, const float *g, ptrdiff_t n, double m)
{
    const v8d mv = {m, m, m, m, m, m, m, m};
    v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
    for (ptrdiff_t i = 0; i + 16 <= n; i += 16) {
        const v8d g0 = widen(g + i), g1 = widen(g + i + 8);
        s0 += g0;
        s1 += g1;
        q0 += g0 * (widen(x + i) - mv);
        q1 += g1 * (widen(x + i + 8) - mv);
    }
    return s0[0] + s1[1] + q0[2] + q1[3];
}

/* Where position q's k-th per-position value is (k = 0, 1, 2): three arrays of Wmax doubles, or (il) each
 * 8 positions' three vectors side by side. */
static inline const double *at(const double *c, ptrdiff_t q, int k, const int il)
{
    return il ? c + 3 * (q - q % 8) + 8 * k + q % 8 : c + 4096 * k + q;
}

/* position q's three per-position vectors (8 positions each) */
static inline void load3(const double *c, ptrdiff_t q, const int il, v8d *u, v8d *v, v8d *w)
{
    memcpy(u, at(c, q, 0, il), 64);
    memcpy(v, at(c, q, 1, il), 64);
    memcpy(w, at(c, q, 2, il), 64);
}

/* R rows a sweep: Sum g and Sum g * (x - m) in the first two values, m the third */
__attribute__((always_inline)) static inline void bsweeps(const float *x, const float *g, ptrdiff_t N,
                                                          ptrdiff_t W, double *s, const int R, const int il)
{
    for (ptrdiff_t r = 0; r < N; r += R) {
        const float *ra = x + r * W, *ga = g + r * W;
        for (ptrdiff_t q = 0; q < W; q += 8) {
            v8d a, b, c;
            load3(s, q, il, &a, &b, &c);
            for (int j = 0; j < R; j++) {
                const v8d gv = widen(ga + j * W + q);
                a += gv;
                b += gv * (widen(ra + j * W + q) - c);
            }
            memcpy((double *)at(s, q, 0, il), &a, 64);
            memcpy((double *)at(s, q, 1, il), &b, 64);
        }
    }
}

static inline void store8(float *p, v8d v, const int nt)
{
    const v8f f = __builtin_convertvector(v, v8f);
#ifdef __AVX__
    if (nt) _mm256_stream_ps(p, (__m256)f);
    else
#endif
        memcpy(p, &f, sizeof f);
    (void)nt;
}

__attribute__((always_inline)) static inline void dx_contiguous(const float *x, const float *g, float *out,
                                                                ptrdiff_t n, const int nt)
{
    const v8d av = {0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}, ev = av * 0.25, bv = av * 0.125;
    for (ptrdiff_t i = 0; i + 16 <= n; i += 16) {
        store8(out + i, av * widen(g + i) + (widen(x + i) * ev + bv), nt);
        store8(out + i + 8, av * widen(g + i + 8) + (widen(x + i + 8) * ev + bv), nt);
    }
}

/* R rows a sweep, `gap` rows apart (1: consecutive; N / R: spread over the tensor, as grad_cols' pairs half
 * an item apart), each position's three coefficients loaded once per sweep */
__attribute__((always_inline)) static inline void dx_rows(const float *x, const float *g, float *out, ptrdiff_t N,
                                                          ptrdiff_t W, const double *c, const int R,
                                                          const ptrdiff_t gap, const int il, const int nt)
{
    for (ptrdiff_t r0 = 0; r0 < (gap == 1 ? N : gap); r0 += gap == 1 ? R : 1)
        for (ptrdiff_t q = 0; q < W; q += 8) {
            v8d av, ev, bv;
            load3(c, q, il, &av, &ev, &bv);
            for (int j = 0; j < R; j++) {
                const ptrdiff_t o = (r0 + j * gap) * W + q;
                store8(out + o, av * widen(g + o) + (widen(x + o) * ev + bv), nt);
            }
        }
}

/* column blocks of 512 positions, each through all rows before the next */
__attribute__((noinline)) static void dx_blocks(const float *x, const float *g, float *out, ptrdiff_t N, ptrdiff_t W,
                                                const double *c)
{
    const ptrdiff_t B = W < 512 ? W : 512;
    for (ptrdiff_t q0 = 0; q0 < W; q0 += B)
        for (ptrdiff_t r = 0; r < N; r++)
            for (ptrdiff_t q = q0; q < q0 + B; q += 8) {
                v8d av, ev, bv;
                load3(c, q, 0, &av, &ev, &bv);
                store8(out + r * W + q, av * widen(g + r * W + q) + (widen(x + r * W + q) * ev + bv), 0);
            }
}

/* tiles of T rows by 512 positions: the tile's rows for positions [q0, q0 + 512), then the next 512
 * positions of the same rows (from L2 by then), each position's values loaded once a row */
__attribute__((always_inline)) static inline void dx_tiles(const float *x, const float *g, float *out, ptrdiff_t N,
                                                           ptrdiff_t W, const double *c, const ptrdiff_t T,
                                                           const int PF)
{
    const ptrdiff_t B = W < 512 ? W : 512;
    for (ptrdiff_t r0 = 0; r0 < N; r0 += T)
        for (ptrdiff_t q0 = 0; q0 < W; q0 += B)
            for (ptrdiff_t r = r0; r < r0 + T && r < N; r++)
                for (ptrdiff_t q = q0; q < q0 + B; q += 8) {
                    if (PF && q0 == 0 && q % 16 == 0)
                        for (ptrdiff_t k = q + B; k < W; k += B) {
                            __builtin_prefetch(x + r * W + k, 0, 2);
                            __builtin_prefetch(g + r * W + k, 0, 2);
                            __builtin_prefetch(out + r * W + k, 1, 2);
                        }
                    v8d av, ev, bv;
                    load3(c, q, 0, &av, &ev, &bv);
                    store8(out + r * W + q, av * widen(g + r * W + q) + (widen(x + r * W + q) * ev + bv), 0);
                }
}
__attribute__((always_inline)) static inline void bsums_tiles(const float *x, const float *g, ptrdiff_t N,
                                                              ptrdiff_t W, double *s, const ptrdiff_t T)
{
    const ptrdiff_t B = W < 512 ? W : 512;
    for (ptrdiff_t r0 = 0; r0 < N; r0 += T)
        for (ptrdiff_t q0 = 0; q0 < W; q0 += B)
            for (ptrdiff_t r = r0; r < r0 + T && r < N; r++)
                for (ptrdiff_t q = q0; q < q0 + B; q += 8) {
                    v8d a, b, c;
                    load3(s, q, 0, &a, &b, &c);
                    const v8d gv = widen(g + r * W + q);
                    a += gv;
                    b += gv * (widen(x + r * W + q) - c);
                    memcpy((double *)at(s, q, 0, 0), &a, 64);
                    memcpy((double *)at(s, q, 1, 0), &b, 64);
                }
}

__attribute__((noinline)) static void copy_loop(const float *x, float *out, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i + 16 <= n; i += 16) {
        v16f u;
        memcpy(&u, x + i, 64);
        memcpy(out + i, &u, 64);
    }
}

/* the backward's patterns, k as in names_bwd (each a noinline function, so each loop is compiled for its
 * constants) */
#define BWD_PATTERNS(X)                                                                                   \
    X(3, bsweeps(x, g, N, W, s, 1, 0)) X(4, bsweeps(x, g, N, W, s, 2, 0)) X(5, bsweeps(x, g, N, W, s, 4, 0)) \
    X(6, bsweeps(x, g, N, W, s, 8, 0)) X(7, bsweeps(x, g, N, W, s, 1, 1)) X(8, bsweeps(x, g, N, W, s, 4, 1)) \
    X(9, dx_contiguous(x, g, y, n, 0)) X(10, dx_rows(x, g, y, N, W, s, 1, 1, 0, 0))                        \
    X(11, dx_rows(x, g, y, N, W, s, 4, 1, 0, 0)) X(12, dx_rows(x, g, y, N, W, s, 2, N / 2, 0, 0))         \
    X(13, dx_rows(x, g, y, N, W, s, 1, 1, 1, 0)) X(14, dx_blocks(x, g, y, N, W, s))                         \
    X(15, dx_rows(x, g, y, N, W, s, 2, N / 2, 0, 1)) X(16, dx_rows(x, g, y, N, W, s, 1, 1, 0, 1))          \
    X(17, dx_contiguous(x, g, y, n, 1)) X(18, copy_loop(x, y, n)) X(19, bsums_tiles(x, g, N, W, s, 16))      \
    X(20, bsums_tiles(x, g, N, W, s, 64)) X(21, dx_tiles(x, g, y, N, W, s, 16, 0)) X(22, dx_tiles(x, g, y, N, W, s, 16, 1))
#define BWD_FN(k, call)                                                                                   \
    __attribute__((noinline)) static void bwd_##k(const float *x, const float *g, float *y, ptrdiff_t n,    \
                                                  ptrdiff_t N, ptrdiff_t W, double *s)                    \
    {                                                                                                     \
        (void)g, (void)y, (void)n, (void)N, (void)W, (void)s;                                            \
        call;                                                                                             \
    }
BWD_PATTERNS(BWD_FN)
#define BWD_ENTRY(k, call) [k] = bwd_##k,

typedef void (*sweep_fn)(const float *, ptrdiff_t, ptrdiff_t, double *, double *, const double *);
typedef void (*bwd_fn)(const float *, const float *, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, double *);

#define NPAT 24
static const char *names_stats[] = {"copy", "read", "contiguous", "sweep 1", "sweep 2", "sweep 4", "sweep 8",
                                    "sweep 16", "sweep 4 + pf", "sweep 8 + pf", NULL};
static const char *names_bwd[] = {"copy",        "read x+dy", "sums contig", "sums 1",      "sums 2",
                                  "sums 4",      "sums 8",    "sums il 1",   "sums il 4",   "dx contig",
                                  "dx 1 row",    "dx 4 rows", "dx pairs",    "dx il 1",     "dx blk 512",
                                  "dx pairs nt", "dx 1 nt",   "dx contig nt", "copy loop",  "sums t16", "sums t64", "dx t16", "dx t16 pf", NULL};

static const bwd_fn bfn[NPAT] = {BWD_PATTERNS(BWD_ENTRY)};

/* The backward's patterns do the work they are named for: from the same start every sums pattern gives
 * the same sums and every dx pattern the same dx, bit for bit (in either layout of the per-position
 * values). 1 when they all agree. */
static int bwd_agree(const float *x, const float *g, float *y, float *y0, ptrdiff_t n, ptrdiff_t W, double *s,
                     double *s0)
{
    const ptrdiff_t N = n / W;
    int same = 1;
    /* every pattern with per-position values, the references (one row a sweep) first */
    static const int ks[] = {3, 4, 5, 6, 7, 8, 19, 20, 10, 11, 12, 13, 14, 15, 16, 21, 22};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) {
        const int k = ks[i];
        const int il = k == 7 || k == 8 || k == 13, dx = (k >= 10 && k <= 16) || k >= 21;
        for (ptrdiff_t q = 0; q < W; q++) {
            const double v[3] = {dx ? 0.75 + 1e-3 * (double)q : 0.0, dx ? -0.3 - 1e-4 * (double)q : 0.0,
                                 0.1 + 1e-3 * (double)q};
            for (int j = 0; j < 3; j++) *(double *)at(s, q, j, il) = v[j];
        }
        memset(y, 0, sizeof(float) * (size_t)n);
        bfn[k](x, g, y, n, N, W, s);
        if (k == 3 || k == 10) { /* the references: one row a sweep */
            memcpy(s0, s, sizeof(double) * 3 * 4096);
            if (dx) memcpy(y0, y, sizeof(float) * (size_t)n);
            continue;
        }
        if (dx) same &= !memcmp(y, y0, sizeof(float) * (size_t)n);
        else
            for (ptrdiff_t q = 0; q < W; q++)
                for (int j = 0; j < 2; j++) same &= !memcmp(at(s, q, j, il), at(s0, q, j, 0), sizeof(double));
    }
    return same;
}

/* pattern k of the table: the stats table's sweeps, or the backward's sums then dx */
static double run(int bwd, int k, float *x, float *g, float *y, ptrdiff_t n, ptrdiff_t W, double *s)
{
    static const sweep_fn fn[] = {sweep_1_0, sweep_2_0, sweep_4_0, sweep_8_0, sweep_16_0, sweep_4_1, sweep_8_1};
    const ptrdiff_t N = n / W, Wmax = 4096;
    if (k == 0) memcpy(y, x, sizeof(float) * (size_t)n);
    else if (!bwd) {
        if (k == 1) return read_sum(x, n);
        if (k == 2) return contiguous(x, n, 0.5);
        fn[k - 3](x, N, W, s, s + Wmax, s + 2 * Wmax);
    } else {
        if (k == 1) return read2_sum(x, g, n);
        if (k == 2) return bsums_contiguous(x, g, n, 0.5);
        bfn[k](x, g, y, n, N, W, s);
    }
    return s[W / 2];
}

int main(int argc, char **argv)
{
    const ptrdiff_t mib = argc > 1 ? atol(argv[1]) : 64, n = mib << 18, Wmax = 4096;
    const int reps = getenv("REPS") ? atoi(getenv("REPS")) : 15, bwd = argc > 2 && !strcmp(argv[2], "bwd");
    if (mib < 1 || mib > 4096 || (argc > 2 && !bwd)) {
        fprintf(stderr, "usage: colstats_probe [MiB: 1 to 4096] [bwd]\n");
        return 2;
    }
    float *x = probe_alloc(sizeof(float) * (size_t)n), *y = probe_alloc(sizeof(float) * (size_t)n),
          *g = bwd ? probe_alloc(sizeof(float) * (size_t)n) : NULL, *y0 = bwd ? probe_alloc(sizeof(float) * (size_t)n) : NULL;
    double *s = probe_alloc(sizeof(double) * 3 * Wmax), *s0 = probe_alloc(sizeof(double) * 3 * Wmax);
    if (!x || !y || !s || !s0 || (bwd && (!g || !y0))) return 1;
    /* values whose float64 sums round, so that an order of additions other than the rows' shows */
    for (ptrdiff_t i = 0; i < n; i++) x[i] = (float)((i * 7919) % 1021) / 1021.0f;
    if (g)
        for (ptrdiff_t i = 0; i < n; i++) g[i] = (float)((i * 104729) % 997) / 499.0f - 1.0f;
    const char **names = bwd ? names_bwd : names_stats;
    int np = 0;
    while (names[np]) np++;
    volatile double sink = 0;
    printf("(N, W) float32 tensors of %td MiB%s, one thread, best of %d; times in copies of the tensor\n", mib,
           bwd ? " (x and dy)" : "", reps);
    printf("%6s %9s", "W", "copy ms");
    for (int k = 1; k < np; k++) printf(" %12s", names[k]);
    if (bwd) printf(" %12s %s", "best sum+dx", "check");
    printf("\n");
    for (ptrdiff_t W = 256; W <= Wmax; W *= 2) {
        double best[NPAT];
        for (int k = 0; k < np; k++) best[k] = 1e9;
        for (int r = 0; r < reps; r++)
            for (int k = 0; k < np; k++) {
                const double t0 = probe_now();
                sink += run(bwd, k, x, g, y, n, W, s);
                const double t = probe_now() - t0;
                if (t < best[k]) best[k] = t;
            }
        printf("%6td %9.3f", W, best[0] * 1e3);
        for (int k = 1; k < np; k++) printf(" %12.2f", best[k] / best[0]);
        if (bwd) {
            /* the best column pattern of each pass: what backward_reduce + backward_apply could take */
            static const int sums[] = {3, 4, 5, 6, 7, 8, 19, 20}, dxs[] = {10, 11, 12, 13, 14, 21, 22};
            double bs = 1e9, bd = 1e9;
            for (size_t i = 0; i < sizeof sums / sizeof sums[0]; i++) bs = best[sums[i]] < bs ? best[sums[i]] : bs;
            for (size_t i = 0; i < sizeof dxs / sizeof dxs[0]; i++) bd = best[dxs[i]] < bd ? best[dxs[i]] : bd;
            printf(" %12.2f %s", (bs + bd) / best[0], bwd_agree(x, g, y, y0, n, W, s, s0) ? "bits same" : "BITS DIFFER");
        }
        printf("\n");
    }
    (void)sink;
    free(x);
    free(y);
    free(g);
    free(y0);
    free(s);
    free(s0);
    return 0;
}
