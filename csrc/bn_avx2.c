/* bn_avx2.c - the kernels of bn_forward.tmpl.h and bn_backward.tmpl.h again, compiled for AVX2.
 *
 * Only the vector width changes: the code has no reassociation for the compiler to exploit and no
 * fused multiply-adds but the explicit fmaf of the float32 form (bn_f32_norm; -ffp-contract=off, which
 * setup.py and the Makefile give every compiler: GCC's ISO C mode implies it, clang's default would
 * fuse), so every build gives the same bits, GCC's and clang's alike (tools/bit_identity.py compares
 * them). The target has FMA (every AVX2 CPU but a few VIA ones; bn_dispatch.c checks) so that fmaf is
 * one instruction, not a libm call. */
#include "bn_internal.h"

#if BN_HAVE_AVX2
#if defined(__clang__)
/* clang ignores #pragma GCC target; its attribute pragma gives every function below the target. */
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif

/* float64 column mode's masked sums keep GCC's loop here: the vector sweep that is 0.52-0.62 of its time
 * with AVX-512 and 0.39-0.85 in the baseline build ran 1.2-1.26x slower with AVX2 at 256 positions
 * (phase_ab.py --dtype float64, backward(relu), BATCHNORM_SIMD=avx2) */
#define BN_F64_MASKED_SWEEP 0
/* float32 column mode's backward sums keep two rows a sweep here on streamed tensors too: one row, 0.49-0.53
 * of the time with AVX-512, ran at 8.7-9.4 ms at every width with AVX2 (as the baseline build's), 0.77-0.93
 * of two rows' time at 256-512 positions but 1.37-1.63x at 64, 128 and 768 (phase_ab.py, backward_reduce,
 * BATCHNORM_SIMD=avx2) */
#define BN_F32_ROWWISE_SUMS 0
#include "bn_stream.h"
#define BN_T float
#define BN_NAME(f) f##_f32_avx2
#include "bn_forward.tmpl.h"
#include "bn_backward.tmpl.h"
#undef BN_T
#undef BN_NAME

#define BN_T double
#define BN_NAME(f) f##_f64_avx2
#include "bn_forward.tmpl.h"
#include "bn_backward.tmpl.h"
#undef BN_T
#undef BN_NAME
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
typedef int bn_avx2_unused; /* ISO C forbids an empty translation unit */
#endif
