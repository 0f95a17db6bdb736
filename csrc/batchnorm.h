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
 * The phases. Training BN is statistics -> (merge) -> normalize forward, and backward_reduce ->
 * backward_apply backward; forward_train and backward below are the same steps run back to back in
 * one parallel region (and, where a block of channels fits in cache, over each block while it is
 * cached), with the same bits as calling the phases one after another on a single part.
 */

/* Per channel, the mean and m2 = sum((x - mean)^2) of its N * S values (count = N * S), computed
 * exactly as bn_forward_train computes them. mean, m2: double[C] outputs. */
int bn_batch_stats_f32(const float *x, bn_dims d, double *mean, double *m2, int nthreads);
int bn_batch_stats_f64(const double *x, bn_dims d, double *mean, double *m2, int nthreads);

/* Merge K parts (counts[k]; means[k * C + c], m2s[k * C + c]) into one, in order k = 0 .. K-1, with
 * Chan's pairwise formula; parts with count 0 are skipped (all of them: mean = m2 = 0, count = 0).
 * counts[k] >= 0. Serial and deterministic: the same inputs give the same bits. */
int bn_merge_stats(ptrdiff_t K, ptrdiff_t C, const int64_t *counts, const double *means, const double *m2s,
                   int64_t *count, double *mean, double *m2);

/*
 * Fused epilogues of the forward kernels (NULL: none): y = relu(bn(x) + residual), evaluated in double
 * with the normalized value and rounded once; where a float32 channel is normalized in float32 (row mode,
 * bn_f32_arith in bn_internal.h) the residual is added to that float32 value, one more rounding, as
 * NumPy's y + r after the unfused call. residual: NULL or an array of x's type and (N, C, S) layout;
 * y may alias it exactly. The ReLU is v < 0 ? 0 : v (NaN stays NaN, as np.maximum and torch.relu).
 */
typedef struct {
    int relu;
    const void *residual;
} bn_epilogue;

/* y = (x - mean) * (invstd * gamma) + beta with given per-channel mean and invstd (float32 channels with
 * |mean| * invstd <= 2^16 are normalized as y = x * alpha + (beta - mean * alpha), in double, which is
 * as exact there; see bn_forward.tmpl.h and bn_internal.h), then the epilogue. */
int bn_normalize_f32(const float *x, float *y, bn_dims d, const double *mean, const double *invstd,
                     const double *gamma, const double *beta, const bn_epilogue *ep, int nthreads);
int bn_normalize_f64(const double *x, double *y, bn_dims d, const double *mean, const double *invstd,
                     const double *gamma, const double *beta, const bn_epilogue *ep, int nthreads);

/* Per-channel vector steps of the binding, vectorized: dst[i] = (double)src[i] and dst[i] = (float)src[i]
 * for i < n; the running statistics' update r[c] = (1 - momentum) * r[c] + momentum * (batch[c] / divisor),
 * evaluated in double and rounded to r's type. */
void bn_widen_f32(const float *src, double *dst, ptrdiff_t n);
void bn_narrow_f32(const double *src, float *dst, ptrdiff_t n);
void bn_update_running_f32(float *r, const double *batch, double divisor, double momentum, ptrdiff_t n);
void bn_update_running_f64(double *r, const double *batch, double divisor, double momentum, ptrdiff_t n);

/* Inference: normalize with invstd = 1 / sqrt(running_var + eps), computed here (vectorized, the GIL
 * released), the same bits as bn_normalize given that invstd. */
int bn_forward_infer_f32(const float *x, float *y, bn_dims d, const double *running_mean,
                         const double *running_var, double eps, const double *gamma, const double *beta,
                         const bn_epilogue *ep, int nthreads);
int bn_forward_infer_f64(const double *x, double *y, bn_dims d, const double *running_mean,
                         const double *running_var, double eps, const double *gamma, const double *beta,
                         const bn_epilogue *ep, int nthreads);

/* Training forward: batch statistics, invstd = 1 / sqrt(m2 / (N * S) + eps), then normalize (and the
 * epilogue). mean, m2, invstd: double[C] outputs (the biased variance is m2 / (N * S)). */
int bn_forward_train_f32(const float *x, float *y, bn_dims d, const double *gamma, const double *beta,
                         double eps, double *mean, double *m2, double *invstd, const bn_epilogue *ep,
                         int nthreads);
int bn_forward_train_f64(const double *x, double *y, bn_dims d, const double *gamma, const double *beta,
                         double eps, double *mean, double *m2, double *invstd, const bn_epilogue *ep,
                         int nthreads);

/* Per channel, sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (x - mean)), cut and added as bn_backward
 * does. sum_dy, sum_dy_xmu: double[C] outputs. */
int bn_backward_reduce_f32(const float *dy, const float *x, bn_dims d, const double *mean, double *sum_dy,
                           double *sum_dy_xmu, int nthreads);
int bn_backward_reduce_f64(const double *dy, const double *x, bn_dims d, const double *mean, double *sum_dy,
                           double *sum_dy_xmu, int nthreads);

/* The training gradient from given (global) sums over `count` values per channel (count >= 1):
 *   dx = k1 * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count),  k1 = gamma * invstd */
int bn_backward_apply_f32(const float *dy, const float *x, float *dx, bn_dims d, const double *mean,
                          const double *invstd, const double *gamma, const double *sum_dy,
                          const double *sum_dy_xmu, double count, int nthreads);
int bn_backward_apply_f64(const double *dy, const double *x, double *dx, bn_dims d, const double *mean,
                          const double *invstd, const double *gamma, const double *sum_dy,
                          const double *sum_dy_xmu, double count, int nthreads);

/*
 * The backward of a fused epilogue (NULL: none). With a ReLU, the gradient that reaches BN is
 * g = dy where the forward's output was > 0, else 0 (ReLU's derivative at 0 is 0, as PyTorch's). Where
 * the output was > 0 comes from one of:
 *   mask = BN_MASK_Y:         y, the forward's output (x's type and layout);
 *   mask = BN_MASK_RECOMPUTE: the forward's own arithmetic on x (and residual, when the forward added
 *                             one) with beta (NULL: 0) and the mean, invstd and gamma given to backward:
 *                             bit-identical to the forward's y > 0 when those are the values the forward
 *                             normalized with. Nothing beyond x is read.
 * d_residual (NULL: not wanted) receives g, the gradient of the sum bn(x) + residual, x's type and layout.
 */
enum { BN_MASK_NONE = 0, BN_MASK_Y = 1, BN_MASK_RECOMPUTE = 2 };
typedef struct {
    int mask;
    const void *y;
    const double *beta;
    const void *residual;
    void *d_residual;
} bn_grad_epilogue;

/*
 * Backward of y = gamma * (x - mean) * invstd + beta (backward_reduce then backward_apply, fused), with g
 * (dy, or the epilogue's masked dy) as the gradient at y:
 *   dbeta  = sum(g),  dgamma = invstd * sum(g * (x - mean))          (double[C] outputs)
 *   training != 0:  dx = gamma * invstd * (g - dbeta / M - (x - mean) * invstd * dgamma / M),  M = N * S
 *   training == 0:  dx = gamma * invstd * g          (mean and invstd are constants: frozen BN)
 */
int bn_backward_f32(const float *dy, const float *x, float *dx, bn_dims d, const double *mean,
                    const double *invstd, const double *gamma, int training, double *dgamma,
                    double *dbeta, const bn_grad_epilogue *ep, int nthreads);
int bn_backward_f64(const double *dy, const double *x, double *dx, bn_dims d, const double *mean,
                    const double *invstd, const double *gamma, int training, double *dgamma,
                    double *dbeta, const bn_grad_epilogue *ep, int nthreads);

/* Threads: a thin layer over the OpenMP runtime, so OMP_NUM_THREADS and threadpoolctl act on us. */
int bn_get_num_threads(void);      /* omp_get_max_threads(); 1 without OpenMP, and in a child forked after
                                      a parallel call until bn_set_num_threads is called there */
void bn_set_num_threads(int n);    /* n >= 1; a no-op without OpenMP */
int bn_openmp_version(void);       /* the _OPENMP date (e.g. 201511), 0 when built without OpenMP */
const char *bn_simd_name(void);    /* the instruction set the vectorized loops were compiled for */

/* Elements below which a call runs on one thread: starting a team costs more than it saves (~3 us for
 * two threads). Per op, measured at 2 threads on a 2-core AMD EPYC (Zen 4, AVX-512), float32 row mode,
 * best of 400 calls of benchmarks/kernel_bench.c built with all three set to 1 (-D...=1):
 *  - training backward: pays from 16 Ki elements ((4, 16, 256): 9.5 -> 8.3 us, (4, 64, 64): 13.2 -> 11.3,
 *    (16, 32, 32): 12.9 -> 11.1), loses at 8 Ki ((2, 16, 256): 5.1 -> 5.7, (2, 64, 64): 7.8 -> 8.1);
 *  - forward_train (and the statistics, the frozen backward and the backward phases, one or two passes of
 *    the same weight): break-even at 16 Ki (7.3 -> 7.1, 11.5 -> 11.3, 10.8 -> 12.5 us), pays at 32 Ki
 *    ((8, 16, 256): 14.7 -> 11.8, (8, 64, 64): 18.4 -> 14.9; frozen backward 15.3 -> 12.6, 18.8 -> 14.9);
 *  - normalize / forward_infer (one light pass): loses at 32 Ki (5.5 -> 5.9, 5.8 -> 7.8 us), even at
 *    64 Ki ((16, 16, 256): 10.9 -> 8.6, (16, 64, 64): 11.5 -> 11.8), pays at 128 Ki ((32, 64, 64):
 *    23.4 -> 15.5).
 * Column-mode tensors this small are one work item and run on one thread anyway (bn_make_plan). The
 * thread count never changes a result, so these are a matter of speed alone, per machine class. */
#ifndef BN_PARALLEL_MIN_ELEMS
#define BN_PARALLEL_MIN_ELEMS ((ptrdiff_t)1 << 15)
#endif
#ifndef BN_PARALLEL_MIN_ELEMS_NORMALIZE
#define BN_PARALLEL_MIN_ELEMS_NORMALIZE ((ptrdiff_t)1 << 16)
#endif
#ifndef BN_PARALLEL_MIN_ELEMS_BACKWARD
#define BN_PARALLEL_MIN_ELEMS_BACKWARD ((ptrdiff_t)1 << 14)
#endif


/*
 * Masked BN (bn_masked.c): statistics and gradients over the real positions of a mask, for padded
 * sequences and ragged batches. mask: uint8[N * S], C-contiguous; mask[n * S + s] != 0 marks position
 * (n, s) of the (N, C, S) view as real, for every channel alike, so every channel has the same count
 * M = bn_mask_count(mask, N * S). Outputs are 0 at the other positions, whose values are never used.
 * Reductions run in a fixed order (bit-identical for any nthreads); there is no SIMD dispatch.
 */
int64_t bn_mask_count(const uint8_t *mask, ptrdiff_t len);

/* Per channel, mean and m2 = sum((x - mean)^2) over the real positions (M = 0: both 0). */
int bn_masked_batch_stats_f32(const float *x, const uint8_t *mask, bn_dims d, double *mean, double *m2,
                              int nthreads);
int bn_masked_batch_stats_f64(const double *x, const uint8_t *mask, bn_dims d, double *mean, double *m2,
                              int nthreads);

/* Training forward over the real positions: the statistics above, invstd = 1 / sqrt(m2 / M + eps),
 * y = (x - mean) * invstd * gamma + beta at real positions, 0 elsewhere. M >= 1 (the caller checks). */
int bn_masked_forward_train_f32(const float *x, const uint8_t *mask, float *y, bn_dims d, const double *gamma,
                                const double *beta, double eps, double *mean, double *m2, double *invstd,
                                int nthreads);
int bn_masked_forward_train_f64(const double *x, const uint8_t *mask, double *y, bn_dims d,
                                const double *gamma, const double *beta, double eps, double *mean, double *m2,
                                double *invstd, int nthreads);

/* Backward over the real positions: dbeta = sum(dy), dgamma = invstd * sum(dy * (x - mean)), and at real
 * positions dx = gamma * invstd * (dy - dbeta / M - (x - mean) * invstd * dgamma / M) (training != 0) or
 * gamma * invstd * dy (training == 0); dx = 0 elsewhere (also everywhere dy's sums are over M = 0). */
int bn_masked_backward_f32(const float *dy, const float *x, const uint8_t *mask, float *dx, bn_dims d,
                           const double *mean, const double *invstd, const double *gamma, int training,
                           double *dgamma, double *dbeta, int nthreads);
int bn_masked_backward_f64(const double *dy, const double *x, const uint8_t *mask, double *dx, bn_dims d,
                           const double *mean, const double *invstd, const double *gamma, int training,
                           double *dgamma, double *dbeta, int nthreads);

/*
 * Memory for the binding's mid-sized NumPy arrays (bn_drive.c): per-channel vectors of wide layers and
 * outputs of small tensors, BN_BLOCK_MIN_BYTES to BN_BLOCK_MAX_BYTES. glibc serves such sizes from the
 * top of its heap (or mmap) and hands them back to the system at every free, so a training loop that
 * allocates them at every call faulted its pages in again each time: a fused BN+ReLU step at
 * (2, 16384) took about 250 minor faults. Up to BN_BLOCK_SLOTS freed blocks (16 MiB in all) are kept
 * for the next arrays, each serving requests of more than half its size (an array may outlive the call
 * and should not hold much more than it uses); C11 atomics, any thread; plain malloc where the
 * compiler has no <stdatomic.h>. bn_block_resize keeps the contents, as realloc.
 */
#define BN_BLOCK_SLOTS 16
#define BN_BLOCK_MIN_BYTES ((size_t)32 << 10)
#define BN_BLOCK_MAX_BYTES ((size_t)1 << 20)
void *bn_block_take(size_t bytes);
void bn_block_give(void *p);
void *bn_block_resize(void *p, size_t bytes);

/*
 * Larger blocks (the binding's outputs of large tensors, over BN_BLOCK_MAX_BYTES) are kept too, up to
 * BN_LARGE_SLOTS of them and a limit on their bytes in all (bn_cache_set_limit; 0 keeps none; over it,
 * kept blocks are freed in turn for the newest). A fresh 32 MiB array costs 2-4 ms of page faults and
 * zeroing where it gets recycled 2 MiB pages (NumPy asks for them), 17 ms with 4 KiB pages, against a
 * copy's 2 ms, so a training loop, which frees and allocates the same sizes at every step, spent a third
 * of a plain fused step at (8192, 1024) float32 on them. Fresh blocks do not ask for huge pages: on this
 * machine, with none free, MADV_HUGEPAGE's compaction made a fresh 64 MiB block take 60-150 ms against
 * 35-45 ms with 4 KiB pages. bn_block_take and bn_block_give pick the pool by size.
 * bn_cache_release hands every kept block (scratch, mid-sized and large) back to the C library and
 * returns their bytes; bn_cache_set_limit returns the previous limit, and a lower limit than the bytes
 * kept releases the large blocks.
 */
#define BN_LARGE_SLOTS 8
#define BN_LARGE_LIMIT_DEFAULT ((size_t)256 << 20)
size_t bn_cache_release(void);
size_t bn_cache_set_limit(size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
