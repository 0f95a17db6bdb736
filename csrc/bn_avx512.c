/* bn_avx512.c - the kernels of bn_forward.tmpl.h and bn_backward.tmpl.h again, compiled for AVX-512 with
 * 512-bit vectors.
 *
 * Same bits as the AVX2 and baseline builds, for the reasons given in bn_avx2.c. Wider vectors pay off
 * where the data sits in cache and the loops are bound by arithmetic (small tensors); out of cache every
 * build waits on memory alike (README, "Performance", has the measurements). */
#include "bn_internal.h"

#if BN_HAVE_AVX512
#if defined(__clang__)
/* clang takes no prefer-vector-width in a target attribute: the width is its own choice (the bits are the
 * same at any width, see bn_avx2.c). */
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,fma"))), apply_to = function)
#else
/* fma for bn_stream.h's 256-bit FMAs: GCC's avx512f does not imply it (clang's does); the dispatch asks
 * the CPU for it before AVX-512 */
#pragma GCC target("avx512f,avx512vl,fma,prefer-vector-width=512")
#endif

#if BN_HAVE_VEXT
/* one vcvtps2pd from memory per 8 floats (see BN_V8D_LOAD); the same values */
#include <immintrin.h>
#undef BN_V8F_CVT
#define BN_V8F_CVT(p) ((bn_v8d)_mm512_cvtps_pd(_mm256_loadu_ps((const float *)(const void *)(p))))
#undef BN_V8F_WIDEN
#define BN_V8F_WIDEN(v) ((bn_v8d)_mm512_cvtps_pd((__m256)(v)))
/* 8 doubles rounded to floats and stored at p (float *, any alignment); here only (GCC 12 crashed on a
 * narrowing of these vectors in the AVX2 build), so the other builds keep their plain loops */
#define BN_V8F_STORE(p, v) _mm256_storeu_ps((float *)(void *)(p), _mm512_cvtpd_ps((__m512d)(v)))
/* the same stored non-temporally (bn_stream.h), p 32-byte aligned */
#define BN_V8F_STREAM(p, v) _mm256_stream_ps((float *)(void *)(p), _mm512_cvtpd_ps((__m512d)(v)))
#endif

#include "bn_stream.h"
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
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
typedef int bn_avx512_unused; /* ISO C forbids an empty translation unit */
#endif
