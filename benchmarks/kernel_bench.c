/* kernel_bench.c - the C kernels timed alone, without Python: best of REPS calls (default 200) of each
 * operation on an (N, C, S) float32 tensor, single-threaded unless THREADS is set.
 *
 *   make -C csrc bench && ./csrc/kernel_bench 64 256 784      # NCHW (64, 256, 28, 28)
 *   THREADS=2 ./csrc/kernel_bench 8192 1024 1                 # (8192, 1024), two threads
 *
 * Used to compare kernel variants quickly; the side-by-side comparison with PyTorch, NumPy and the
 * bandwidth limit is benchmarks/bench.py. */
#define _POSIX_C_SOURCE 200112L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "batchnorm.h"
#include "probe_common.h"

int main(int argc, char **argv)
{
    bn_dims d = {64, 256, 784};
    if (argc == 4) { d.N = atol(argv[1]); d.C = atol(argv[2]); d.S = atol(argv[3]); }
    int reps = getenv("REPS") ? atoi(getenv("REPS")) : 200;
    int threads = getenv("THREADS") ? atoi(getenv("THREADS")) : 1;
    ptrdiff_t total = d.N * d.C * d.S;
    float *x = malloc(sizeof(float) * (size_t)total), *dy = malloc(sizeof(float) * (size_t)total),
          *y = malloc(sizeof(float) * (size_t)total);
    double *v = malloc(sizeof(double) * 6 * (size_t)d.C);
    if (!x || !dy || !y || !v) return 1;
    double *mean = v, *m2 = v + d.C, *invstd = v + 2 * d.C, *gamma = v + 3 * d.C, *dg = v + 4 * d.C,
           *db = v + 5 * d.C;
    for (ptrdiff_t i = 0; i < total; i++) { x[i] = (float)(i * 7 % 13) * 0.1f; dy[i] = (float)(i % 5) * 0.2f; }
    for (ptrdiff_t c = 0; c < d.C; c++) gamma[c] = 1;
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    for (int r = 0; r < reps; r++) {
        double t[5];
        t[0] = probe_now();
        bn_forward_train_f32(x, y, d, gamma, NULL, 1e-5, mean, m2, invstd, NULL, threads);
        t[1] = probe_now();
        bn_normalize_f32(x, y, d, mean, invstd, gamma, NULL, NULL, threads);
        t[2] = probe_now();
        bn_backward_f32(dy, x, y, d, mean, invstd, gamma, 1, dg, db, NULL, threads);
        t[3] = probe_now();
        bn_backward_f32(dy, x, y, d, mean, invstd, gamma, 0, dg, db, NULL, threads);
        t[4] = probe_now();
        for (int k = 0; k < 4; k++)
            if (t[k + 1] - t[k] < best[k]) best[k] = t[k + 1] - t[k];
    }
    printf("(%td, %td, %td) f32, %d thread(s), %s: train %.1f us, infer %.1f us, backward %.1f us, "
           "frozen backward %.1f us\n", d.N, d.C, d.S, threads, bn_simd_name(), best[0] * 1e6, best[1] * 1e6,
           best[2] * 1e6, best[3] * 1e6);
    free(x); free(dy); free(y); free(v);
    return 0;
}
