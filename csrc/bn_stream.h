/*
 * bn_stream.h - non-temporal stores for row mode's elementwise passes (y, and the training dx; float32
 * and float64) over tensors that are read from memory (bn_streamed: 16 MiB and more). A plain store
 * first reads each line of the output for ownership, a third stream of memory traffic beside the input
 * and the output; a non-temporal store writes the line without reading it and leaves the caches to the
 * input. On (64, 256, 28, 28) float32 NCHW at one thread the inference took 0.67-0.69 of its time with
 * plain stores, the training forward 0.81-0.84 and the backward's dx pass 0.81 (benchmarks/phase_ab.py
 * --axis 1 --base), while on a 6 MB tensor, which the caches hold, the inference took 1.4x: hence only
 * streamed tensors, and only where bn_nt_wanted (bn_internal.h) says. The values are those of the plain
 * loops, lane by lane.
 *
 * Included by bn_avx2.c and bn_avx512.c inside their target regions (AVX2 and FMA, which AVX-512F
 * implies); the baseline build keeps plain stores (BN_HAVE_NT undefined).
 */
#ifndef BN_STREAM_H
#define BN_STREAM_H
#include <immintrin.h>
#include <stdint.h>

#define BN_HAVE_NT 1

/* Elements of elsize bytes before p reaches a 32-byte boundary (a non-temporal 256-bit store needs one),
 * at most n. p is aligned to its element. */
static inline ptrdiff_t bn_nt_head(const void *p, ptrdiff_t n, size_t elsize)
{
    const ptrdiff_t k = (ptrdiff_t)((32 - ((uintptr_t)p & 31)) & 31) / (ptrdiff_t)elsize;
    return k < n ? k : n;
}

/* Row mode's float32 form (bn_forward.tmpl.h, apply_run_f32) over y[s .. s + 8), y + s 32-byte aligned:
 * fma(x, ah, bh) + fma(x, al, bl), or + bl where al is +-0 (`two` = 0), then the epilogue (the residual
 * added in float32, ReLU as v < 0 ? +0.0 : v, NaN and -0.0 kept), stored non-temporally. */
static BN_ALWAYS_INLINE void bn_nt_f32_form8(float *y, const float *x, const float *r, __m256 ah, __m256 al,
                                             __m256 bh, __m256 bl, const int two, const int epi)
{
    const __m256 v = _mm256_loadu_ps(x);
    __m256 t = _mm256_add_ps(_mm256_fmadd_ps(v, ah, bh), two ? _mm256_fmadd_ps(v, al, bl) : bl);
    if (epi & BN_EPI_ADD) t = _mm256_add_ps(t, _mm256_loadu_ps(r));
    if (epi & BN_EPI_RELU) {
        const __m256 z = _mm256_setzero_ps();
        t = _mm256_blendv_ps(t, z, _mm256_cmp_ps(t, z, _CMP_LT_OQ));
    }
    _mm256_stream_ps(y, t);
}

/* Row mode's float64 y (apply_run_epi) over y[0 .. 4), y 32-byte aligned: (x - c) * a + b, then the
 * epilogue (the residual added, ReLU as above), stored non-temporally. No FMA: the plain loop's roundings. */
static BN_ALWAYS_INLINE void bn_nt_f64_norm4(double *y, const double *x, const double *r, __m256d c, __m256d a,
                                             __m256d b, const int epi)
{
    __m256d t = _mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(_mm256_loadu_pd(x), c), a), b);
    if (epi & BN_EPI_ADD) t = _mm256_add_pd(t, _mm256_loadu_pd(r));
    if (epi & BN_EPI_RELU) {
        const __m256d z = _mm256_setzero_pd();
        t = _mm256_blendv_pd(t, z, _mm256_cmp_pd(t, z, _CMP_LT_OQ));
    }
    _mm256_stream_pd(y, t);
}

/* The float64 training dx (grad_run, g = dy) over dx[0 .. 4), dx 32-byte aligned: a * ((g - b) - (x - m) * e),
 * stored non-temporally. */
static BN_ALWAYS_INLINE void bn_nt_f64_grad4(double *dx, const double *g, const double *x, __m256d m, __m256d a,
                                             __m256d b, __m256d e)
{
    const __m256d u = _mm256_mul_pd(_mm256_sub_pd(_mm256_loadu_pd(x), m), e);
    _mm256_stream_pd(dx, _mm256_mul_pd(a, _mm256_sub_pd(_mm256_sub_pd(_mm256_loadu_pd(g), b), u)));
}

/* After a work item's non-temporal stores (nt): ordered before whatever the thread does next (the
 * driver's barrier, the caller's reads). */
#undef BN_NT_DONE
#define BN_NT_DONE(nt)                                                                                    \
    do {                                                                                                  \
        if (nt) _mm_sfence();                                                                             \
    } while (0)

#endif
