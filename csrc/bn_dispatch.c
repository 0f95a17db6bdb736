/* bn_dispatch.c - the public kernels: pick the instruction set once, at the first call.
 * BATCHNORM_SIMD=baseline forces the baseline build, =avx2 caps it at AVX2 (for tests and for comparing). */
#include <string.h>
#include "bn_internal.h"

/* 0: baseline, 1: AVX2, 2: AVX-512; BATCHNORM_SIMD=baseline / avx2 caps it. */
static int simd_level(void)
{
    static int cached = -1; /* a benign race: every thread computes the same value */
    if (cached < 0) {
        int level = 0;
#if BN_HAVE_AVX2
        const char *env = getenv("BATCHNORM_SIMD");
        __builtin_cpu_init();
        /* FMA with AVX2: the float32 form's fmaf is one instruction there (bn_avx2.c) */
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
#if BN_HAVE_AVX512
        if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) level = 2;
#endif
        if (env && strcmp(env, "baseline") == 0) level = 0;
        if (env && strcmp(env, "avx2") == 0 && level > 1) level = 1;
#endif
        cached = level;
    }
    return cached;
}

const char *bn_simd_name(void)
{
    if (simd_level() == 2) return "avx512";
    if (simd_level() == 1) return "avx2";
#if defined(__x86_64__) || defined(_M_X64)
    return "baseline (sse2)";
#elif defined(__aarch64__)
    return "baseline (neon)";
#else
    return "baseline";
#endif
}

#if BN_HAVE_AVX512
#define BN_PICK(name, T, ...)                                                                          \
    (simd_level() == 2 ? name##_##T##_avx512(__VA_ARGS__)                                               \
     : simd_level() == 1 ? name##_##T##_avx2(__VA_ARGS__) : name##_##T##_base(__VA_ARGS__))
#elif BN_HAVE_AVX2
#define BN_PICK(name, T, ...) (simd_level() == 1 ? name##_##T##_avx2(__VA_ARGS__) : name##_##T##_base(__VA_ARGS__))
#else
#define BN_PICK(name, T, ...) name##_##T##_base(__VA_ARGS__)
#endif

#define BN_DEFINE_PUBLIC(T, TS)                                                                         \
    int bn_batch_stats_##TS(const T *x, bn_dims d, double *mean, double *m2, int nthreads)              \
    {                                                                                                   \
        return BN_PICK(bn_batch_stats, TS, x, d, mean, m2, nthreads);                                   \
    }                                                                                                   \
    int bn_normalize_##TS(const T *x, T *y, bn_dims d, const double *mean, const double *invstd,        \
                          const double *gamma, const double *beta, const bn_epilogue *ep, int nthreads) \
    {                                                                                                   \
        return BN_PICK(bn_normalize, TS, x, y, d, mean, invstd, gamma, beta, ep, nthreads);            \
    }                                                                                                   \
    int bn_forward_infer_##TS(const T *x, T *y, bn_dims d, const double *running_mean,                 \
                              const double *running_var, double eps, const double *gamma,               \
                              const double *beta, const bn_epilogue *ep, int nthreads)                  \
    {                                                                                                   \
        return BN_PICK(bn_forward_infer, TS, x, y, d, running_mean, running_var, eps, gamma, beta, ep,   \
                       nthreads);                                                                       \
    }                                                                                                   \
    int bn_forward_train_##TS(const T *x, T *y, bn_dims d, const double *gamma, const double *beta,     \
                              double eps, double *mean, double *m2, double *invstd,                     \
                              const bn_epilogue *ep, int nthreads)                                      \
    {                                                                                                   \
        return BN_PICK(bn_forward_train, TS, x, y, d, gamma, beta, eps, mean, m2, invstd, ep, nthreads); \
    }                                                                                                   \
    int bn_backward_reduce_##TS(const T *dy, const T *x, bn_dims d, const double *mean, double *sum_dy, \
                                double *sum_dy_xmu, int nthreads)                                       \
    {                                                                                                   \
        return BN_PICK(bn_backward_reduce, TS, dy, x, d, mean, sum_dy, sum_dy_xmu, nthreads);          \
    }                                                                                                   \
    int bn_backward_apply_##TS(const T *dy, const T *x, T *dx, bn_dims d, const double *mean,           \
                               const double *invstd, const double *gamma, const double *sum_dy,         \
                               const double *sum_dy_xmu, double count, int nthreads)                    \
    {                                                                                                   \
        return BN_PICK(bn_backward_apply, TS, dy, x, dx, d, mean, invstd, gamma, sum_dy, sum_dy_xmu,   \
                       count, nthreads);                                                                \
    }                                                                                                   \
    int bn_backward_##TS(const T *dy, const T *x, T *dx, bn_dims d, const double *mean,                 \
                         const double *invstd, const double *gamma, int training, double *dgamma,      \
                         double *dbeta, const bn_grad_epilogue *ep, int nthreads)                       \
    {                                                                                                   \
        return BN_PICK(bn_backward, TS, dy, x, dx, d, mean, invstd, gamma, training, dgamma, dbeta,    \
                       ep, nthreads);                                                                   \
    }

BN_DEFINE_PUBLIC(float, f32)
BN_DEFINE_PUBLIC(double, f64)

void bn_widen_f32(const float *src, double *dst, ptrdiff_t n)
{
    BN_PICK(bn_widen, f32, src, dst, n);
}

void bn_narrow_f32(const double *src, float *dst, ptrdiff_t n)
{
    BN_PICK(bn_narrow, f32, src, dst, n);
}

void bn_update_running_f32(float *r, const double *batch, double divisor, double momentum, ptrdiff_t n)
{
    BN_PICK(bn_update_running, f32, r, batch, divisor, momentum, n);
}

void bn_update_running_f64(double *r, const double *batch, double divisor, double momentum, ptrdiff_t n)
{
    BN_PICK(bn_update_running, f64, r, batch, divisor, momentum, n);
}
