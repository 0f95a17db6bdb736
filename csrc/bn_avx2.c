/* bn_avx2.c - the kernels of bn_forward.tmpl.h and bn_backward.tmpl.h again, compiled for AVX2.
 *
 * Only the vector width changes: the code has no reassociation for the compiler to exploit and no
 * fused multiply-adds (ISO C mode keeps -ffp-contract=off), so every build gives the same bits. */
#include "bn_internal.h"

#if BN_HAVE_AVX2
#pragma GCC target("avx2")

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
#else
typedef int bn_avx2_unused; /* ISO C forbids an empty translation unit */
#endif
