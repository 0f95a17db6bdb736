/* bn_forward.c - training and inference forward for float32 and float64 (one template, two types),
 * baseline instruction set; bn_avx2.c instantiates the same template for AVX2 and bn_dispatch.c picks. */
#include "bn_internal.h"

#define BN_T float
#define BN_NAME(f) f##_f32_base
#include "bn_forward.tmpl.h"
#undef BN_T
#undef BN_NAME

#define BN_T double
#define BN_NAME(f) f##_f64_base
#include "bn_forward.tmpl.h"
#undef BN_T
#undef BN_NAME
