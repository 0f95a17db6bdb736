/* memory_probe.c - why the training forward reads x twice: the memory patterns a fused kernel would use,
 * timed with trivial float arithmetic so that only the memory traffic differs, on one thread.
 *
 *   make -C csrc probe && ./csrc/memory_probe            # (64, 256, 28, 28) float32, 51 MB
 *   ./csrc/memory_probe 64 256 784 4096                  # N C S and the superblock size in KiB
 *
 * Patterns, each reading x (N, C, S) and writing y once or twice:
 *   copy          memcpy(y, x): the bound a bandwidth-limited forward could reach;
 *   two passes    a reduction over all of x, then y = a * x + b over all of x, both in memory order (what
 *                 the kernels do);
 *   per channel   for each channel: reduce its N rows (S values each, C * S apart), then write y for the
 *                 same rows while they are in L2 (reads x from memory once);
 *   superblock    for each block of K channels (K * N * S * 4 bytes, default 4 MiB): reduce the block in
 *                 memory order, then write y for it (reads x once if the block stays in L3).
 * Buffers are 2 MiB aligned and madvise(MADV_HUGEPAGE)d, as NumPy does for large arrays. Best of REPS
 * (default 15). */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include "probe_common.h"

/* 16 float lanes: enough independent chains that the reduction is not latency-bound. */
static float reduce(const float *v, ptrdiff_t n)
{
    float a[16] = {0};
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) a[j] += v[i + j];
    for (; i < n; i++) a[0] += v[i];
    float s = 0;
    for (int j = 0; j < 16; j++) s += a[j];
    return s;
}

static void axpb(const float *x, float *y, ptrdiff_t n, float a, float b)
{
    for (ptrdiff_t i = 0; i < n; i++) y[i] = x[i] * a + b;
}

int main(int argc, char **argv)
{
    ptrdiff_t N = 64, C = 256, S = 784, sb_kib = 4096;
    if (argc >= 4) { N = atol(argv[1]); C = atol(argv[2]); S = atol(argv[3]); }
    if (argc >= 5) sb_kib = atol(argv[4]);
    int reps = getenv("REPS") ? atoi(getenv("REPS")) : 15;
    const ptrdiff_t total = N * C * S, W = C * S;
    float *x = probe_alloc(sizeof(float) * (size_t)total), *y = probe_alloc(sizeof(float) * (size_t)total);
    if (!x || !y) return 1;
    for (ptrdiff_t i = 0; i < total; i++) x[i] = (float)(i % 7);
    ptrdiff_t K = (ptrdiff_t)((double)sb_kib * 1024.0 / ((double)N * (double)S * sizeof(float)));
    if (K < 1) K = 1;
    if (K > C) K = C;
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    volatile float sink = 0;
    for (int r = 0; r < reps; r++) {
        double t[5];
        t[0] = probe_now();
        memcpy(y, x, sizeof(float) * (size_t)total);
        t[1] = probe_now();
        float m = reduce(x, total) * 1e-30f;
        axpb(x, y, total, 0.5f, m);
        t[2] = probe_now();
        for (ptrdiff_t c = 0; c < C; c++) {
            float s = 0;
            for (ptrdiff_t n = 0; n < N; n++) s += reduce(x + n * W + c * S, S);
            for (ptrdiff_t n = 0; n < N; n++) axpb(x + n * W + c * S, y + n * W + c * S, S, 0.5f, s * 1e-30f);
        }
        t[3] = probe_now();
        for (ptrdiff_t c0 = 0; c0 < C; c0 += K) {
            ptrdiff_t len = (c0 + K < C ? K : C - c0) * S;
            float s = 0;
            for (ptrdiff_t n = 0; n < N; n++) s += reduce(x + n * W + c0 * S, len);
            for (ptrdiff_t n = 0; n < N; n++) axpb(x + n * W + c0 * S, y + n * W + c0 * S, len, 0.5f, s * 1e-30f);
        }
        t[4] = probe_now();
        sink += y[total / 3] + m;
        for (int k = 0; k < 4; k++)
            if (t[k + 1] - t[k] < best[k]) best[k] = t[k + 1] - t[k];
    }
    double mb = (double)total * sizeof(float) / 1e6;
    printf("(%td, %td, %td) float32, %.1f MB, one thread, best of %d:\n", N, C, S, mb, reps);
    printf("  copy                   %7.2f ms  (%.1f GB/s read + write)\n", best[0] * 1e3, 2 * mb / best[0] / 1e3);
    printf("  two passes             %7.2f ms  (%.2fx copy)\n", best[1] * 1e3, best[1] / best[0]);
    printf("  per channel, fused     %7.2f ms  (%.2fx copy)\n", best[2] * 1e3, best[2] / best[0]);
    printf("  superblock %4td ch     %7.2f ms  (%.2fx copy; %.1f MiB blocks)\n", K, best[3] * 1e3,
           best[3] / best[0], (double)K * (double)(N * S) * sizeof(float) / 1048576.0);
    (void)sink;
    free(x);
    free(y);
    return 0;
}
