/* test_kernels.c - the kernels without Python: against a naive double computation, and bit-identical
 * results for 1, 2 and 3 threads. Built with sanitizers by `make -C csrc test`. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "batchnorm.h"

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

static double rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xffff) / 65536.0 - 0.5; }

static void naive(const double *x, bn_dims d, double *mean, double *var)
{
    for (ptrdiff_t c = 0; c < d.C; c++) {
        double s = 0, q = 0, M = (double)(d.N * d.S);
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t k = 0; k < d.S; k++) s += x[(n * d.C + c) * d.S + k];
        mean[c] = s / M;
        for (ptrdiff_t n = 0; n < d.N; n++) for (ptrdiff_t k = 0; k < d.S; k++) {
            double v = x[(n * d.C + c) * d.S + k] - mean[c];
            q += v * v;
        }
        var[c] = q / M;
    }
}

static void run_case(bn_dims d, double offset)
{
    ptrdiff_t total = d.N * d.C * d.S;
    double *x = malloc(sizeof(double) * total), *y[3], *dx[3], *dy = malloc(sizeof(double) * total);
    double *mean = malloc(sizeof(double) * d.C * 8);
    double *var = mean + d.C, *inv = mean + 2 * d.C, *rm = mean + 3 * d.C, *rv = mean + 4 * d.C,
           *gamma = mean + 5 * d.C, *dg = mean + 6 * d.C, *db = mean + 7 * d.C;
    unsigned seed = 42;
    for (ptrdiff_t i = 0; i < total; i++) { x[i] = offset + rnd(&seed); dy[i] = rnd(&seed); }
    for (ptrdiff_t c = 0; c < d.C; c++) gamma[c] = 1 + rnd(&seed);
    naive(x, d, rm, rv);
    for (int t = 0; t < 3; t++) {
        y[t] = malloc(sizeof(double) * total);
        dx[t] = malloc(sizeof(double) * total);
        CHECK(bn_forward_train_f64(x, y[t], d, gamma, NULL, 1e-5, mean, var, inv, t + 1) == BN_OK, "train failed");
        CHECK(bn_backward_f64(dy, x, dx[t], d, mean, inv, gamma, 1, dg, db, t + 1) == BN_OK, "backward failed");
    }
    for (ptrdiff_t c = 0; c < d.C; c++) {
        CHECK(fabs(mean[c] - rm[c]) <= 1e-12 * (1 + fabs(offset)), "mean c=%td: %g vs %g", c, mean[c], rm[c]);
        CHECK(fabs(var[c] - rv[c]) <= 1e-9 * rv[c], "var c=%td: %.17g vs %.17g", c, var[c], rv[c]);
    }
    for (int t = 1; t < 3; t++) {
        CHECK(memcmp(y[0], y[t], sizeof(double) * total) == 0, "y differs with %d threads (N=%td C=%td S=%td)",
              t + 1, d.N, d.C, d.S);
        CHECK(memcmp(dx[0], dx[t], sizeof(double) * total) == 0, "dx differs with %d threads", t + 1);
    }
    /* y normalized: per channel mean ~0, var ~gamma^2 */
    double *ym = malloc(sizeof(double) * d.C * 2);
    naive(y[0], d, ym, ym + d.C);
    for (ptrdiff_t c = 0; c < d.C; c++)
        CHECK(fabs(ym[c]) < 1e-6 && fabs(ym[d.C + c] - gamma[c] * gamma[c] * rv[c] / (rv[c] + 1e-5)) < 1e-6,
              "normalized channel %td: mean %g var %g", c, ym[c], ym[d.C + c]);
    free(ym);
    for (int t = 0; t < 3; t++) { free(y[t]); free(dx[t]); }
    free(x); free(dy); free(mean);
}

int main(void)
{
    bn_dims cases[] = {{2, 3, 1}, {7, 5, 3}, {64, 8, 40}, {300, 4, 1}, {5000, 3, 1}, {3, 2, 70000},
                       {129, 700, 1}, {2, 20, 5000}, {40, 1, 33}};
    size_t ncases = sizeof cases / sizeof cases[0], failed_cases = 0;
    for (size_t i = 0; i < 2 * ncases; i++) {
        int before = failures;
        run_case(cases[i / 2], i % 2 ? 1e6 : 0.0);
        failed_cases += failures != before;
    }
    printf("test_kernels: %zu passed, %zu failed\n", 2 * ncases - failed_cases, failed_cases);
    if (failures) return 1;
    return 0;
}
