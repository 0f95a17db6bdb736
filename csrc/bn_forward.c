/* bn_forward.c - training and inference forward for float32 and float64 (one template, two types). */
#include "bn_internal.h"

#define BN_T float
#define BN_NAME(f) f##_f32
#include "bn_forward.tmpl.h"
#undef BN_T
#undef BN_NAME

#define BN_T double
#define BN_NAME(f) f##_f64
#include "bn_forward.tmpl.h"
#undef BN_T
#undef BN_NAME
