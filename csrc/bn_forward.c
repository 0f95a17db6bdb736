/* bn_forward.c - the forward phases (statistics, normalize) and the fused training forward, for float32 and
 * float64 (one template, two types), baseline instruction set. bn_avx2.c and bn_avx512.c instantiate the
 * same template for wider vectors; bn_dispatch.c picks one at run time. */
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
