/*
 * batchnorm.h - the C kernels' public interface.
 *
 * Pure C11: no Python, no NumPy. Every kernel works on a C-contiguous tensor seen as (N, C, S):
 * N = product of the dimensions before the channel axis, C = channels, S = product of those after it,
 * so that element (n, c, s) lies at index (n * C + c) * S + s. NCHW input has S = H * W; channels-last
 * (NHWC) and 2-D (N, C) input have S = 1. The binding reduces every other layout to this one.
 *
 * Conventions shared by all kernels (not checked by them; the caller guarantees them):
 *   - N, C, S >= 1 and N * C * S fits in ptrdiff_t; pointers are valid for that many elements;
 *   - per-channel arrays (gamma, beta, mean, invstd, ...) are contiguous double[C]; gamma/beta may be
 *     NULL for "no scale" / "no shift";
 *   - the output may alias an input exactly (in place), never partially;
 *   - nthreads >= 1 is an upper bound; results are bit-identical for every value of it, because the
 *     way the work is cut into pieces and the order their partial results are combined in depend only
 *     on (N, C, S).
 * Statistics and gradients are accumulated in double for both float32 and float64 data.
 * Each kernel returns BN_OK, or BN_ENOMEM when a scratch allocation failed (outputs then undefined).
 */
#ifndef BATCHNORM_H
#define BATCHNORM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { BN_OK = 0, BN_ENOMEM = 1 };

typedef struct {
    ptrdiff_t N, C, S;
} bn_dims;

/*
 * Training forward. Computes per channel mean and biased variance var over the N * S values,
 * invstd = 1 / sqrt(var + eps), and y = (x - mean) * (invstd * gamma) + beta, the centring done in double.
 * mean, var, invstd: double[C] outputs.
 */
int bn_forward_train_f32(const float *x, float *y, bn_dims d, const double *gamma, const double *beta,
                         double eps, double *mean, double *var, double *invstd, int nthreads);
int bn_forward_train_f64(const double *x, double *y, bn_dims d, const double *gamma, const double *beta,
                         double eps, double *mean, double *var, double *invstd, int nthreads);

/* Inference forward: y = (x - mean) * (invstd * gamma) + beta with given per-channel mean and invstd. */
int bn_forward_infer_f32(const float *x, float *y, bn_dims d, const double *mean, const double *invstd,
                         const double *gamma, const double *beta, int nthreads);
int bn_forward_infer_f64(const double *x, double *y, bn_dims d, const double *mean, const double *invstd,
                         const double *gamma, const double *beta, int nthreads);

/*
 * Backward of y = gamma * (x - mean) * invstd + beta.
 *   dbeta  = sum(dy),  dgamma = invstd * sum(dy * (x - mean))          (double[C] outputs)
 *   training != 0:  dx = gamma * invstd * (dy - dbeta / M - (x - mean) * invstd * dgamma / M),  M = N * S
 *   training == 0:  dx = gamma * invstd * dy          (mean and invstd are constants: frozen BN)
 */
int bn_backward_f32(const float *dy, const float *x, float *dx, bn_dims d, const double *mean,
                    const double *invstd, const double *gamma, int training, double *dgamma,
                    double *dbeta, int nthreads);
int bn_backward_f64(const double *dy, const double *x, double *dx, bn_dims d, const double *mean,
                    const double *invstd, const double *gamma, int training, double *dgamma,
                    double *dbeta, int nthreads);

/* Threads: a thin layer over the OpenMP runtime, so OMP_NUM_THREADS and threadpoolctl act on us. */
int bn_get_num_threads(void);      /* omp_get_max_threads(), or 1 without OpenMP */
void bn_set_num_threads(int n);    /* n >= 1; a no-op without OpenMP */
int bn_openmp_version(void);       /* the _OPENMP date (e.g. 201511), 0 when built without OpenMP */
const char *bn_simd_name(void);    /* the instruction set the vectorized loops were compiled for */

/* Elements below which a call runs on one thread: start-up would cost more than it saves. */
#define BN_PARALLEL_MIN_ELEMS ((ptrdiff_t)1 << 15)

#ifdef __cplusplus
}
#endif
#endif
