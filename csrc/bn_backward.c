/* bn_forward.c - the backward pass for float32 and float64 (one template, two types). */
#include "bn_internal.h"

#define BN_T float
#define BN_NAME(f) f##_f32
#include "bn_backward.tmpl.h"
#undef BN_T
#undef BN_NAME

#define BN_T double
#define BN_NAME(f) f##_f64
#include "bn_backward.tmpl.h"
#undef BN_T
#undef BN_NAME
