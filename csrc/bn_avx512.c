/* bn_avx512.c - the same kernels again, compiled for AVX-512 (512-bit vectors).
 *
 * Same bits as the AVX2 and baseline builds, for the reasons given in bn_avx2.c. Measured with
 * kernel_bench on a Zen 4 core: in-cache (128, 1024) and (64, 512) float32 15-25% faster than AVX2,
 * NCHW in cache up to 5%; out-of-cache tensors are bound by memory either way. */
#include "bn_internal.h"

#if BN_HAVE_AVX512
#pragma GCC target("avx512f,avx512vl,prefer-vector-width=512")

#define BN_T float
#define BN_NAME(f) f##_f32_avx512
#include "bn_forward.tmpl.h"
#include "bn_backward.tmpl.h"
#undef BN_T
#undef BN_NAME

#define BN_T double
#define BN_NAME(f) f##_f64_avx512
#include "bn_forward.tmpl.h"
#include "bn_backward.tmpl.h"
#undef BN_T
#undef BN_NAME
#else
typedef int bn_avx512_unused; /* ISO C forbids an empty translation unit */
#endif
