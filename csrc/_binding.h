/*
 * _binding.h - what the binding's files share. The binding is the only part of the package that knows
 * Python, split by concern:
 *   _args.c     arguments: numbers, axis, dtypes, per-channel vectors, running statistics
 *   _layout.c   arrays: the (N, C, S) layout the kernels read, outputs, overlap between them
 *   _module.c   the entry points (each a short sequence of the steps above around one kernel call)
 * Data flows one way: Python object -> checks and arrays -> kernel, GIL released -> results.
 */
#ifndef BN_BINDING_H
#define BN_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL batchnorm_ARRAY_API
#ifndef BN_BINDING_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#include "batchnorm.h"

/* ---- _args.c --------------------------------------------------------------------------------- */

void bn_shape_str(char *buf, size_t cap, int ndim, const npy_intp *shape);
/* "one value per channel of x (shape (2, 3), channel axis 1)": bn_input.of */
void bn_channel_text(char *buf, size_t cap, int ndim, const npy_intp *shape, int axis);
#define SHAPE_OF(buf, arr) bn_shape_str(buf, sizeof(buf), PyArray_NDIM(arr), PyArray_DIMS(arr))

int bn_parse_real(PyObject *obj, const char *name, double *out);        /* NULL obj: leaves *out */
int bn_parse_eps(PyObject *obj, double *eps);                           /* >= 0 */
int bn_parse_momentum(PyObject *obj, double *momentum);                 /* in [0, 1] */
int bn_parse_axis(PyObject *obj, int ndim, int *axis);                  /* NULL: 1 */
/* A count of values: a non-negative integer (an integral float is accepted), at least `least`. */
int bn_parse_count(PyObject *obj, const char *name, int64_t least, int64_t *out);
/* float16/32/64 compute in float32/float64 and give results of their own type; integers and bool compute
 * and give float64; anything else raises TypeError naming `name`. */
int bn_classify_dtype(PyArray_Descr *descr, const char *name, int *work, int *result);
PyArrayObject *bn_as_array(PyObject *obj, const char *name);
PyArrayObject *bn_to_work(PyArrayObject *a, int work);
/* a must be 1-D with C values; `of` says where C comes from, e.g. "one value per channel of x (shape
 * (4, 3), channel axis 1)". */
int bn_check_length(PyArrayObject *a, const char *name, npy_intp C, const char *of);
/* A per-channel vector as contiguous float64 (C,); None/NULL gives *out = NULL. */
int bn_channel_vector(PyObject *obj, const char *name, npy_intp C, const char *of, PyArrayObject **out);
/* A running statistic: a writable float32/float64 ndarray (C,), updated in place later. */
int bn_running_stat(PyObject *obj, const char *name, npy_intp C, const char *of, PyArrayObject **out);
/* r = (1 - momentum) * r + momentum * batch[c] / divisor, whatever r's stride, alignment, byte order. */
void bn_update_running(PyArrayObject *r, const double *batch, double divisor, double momentum);
/* Optional stats dtype: None (NULL) keeps `deflt`; else a float dtype. */
int bn_parse_stats_dtype(PyObject *obj, int deflt, int *typenum);
PyObject *bn_cast_vector(PyArrayObject *v, int typenum);  /* narrowing without NumPy's warnings */
/* numpy.errstate(all="ignore") entered (a new reference to exit with bn_quiet_end), or NULL with an error;
 * bn_quiet_end keeps an error set in between and returns -1 then. */
PyObject *bn_quiet_begin(void);
int bn_quiet_end(PyObject *ctx);
/* A new C-order array (of zeros if `zeros`); mid-sized ones take their memory from the kernels' block
 * pool (batchnorm.h), which a training loop's next call gets back without fresh pages. */
PyArrayObject *bn_new_array(int nd, const npy_intp *shape, int typenum, int zeros);
PyArrayObject *bn_new_vector(npy_intp C);  /* float64 (C,) of zeros */
PyObject *bn_kernel_failed(int status);
/* activation=: None (NULL) or "relu" (*relu = 1). */
int bn_parse_activation(PyObject *obj, int *relu);

/* ---- _layout.c ------------------------------------------------------------------------------- */

/* How the kernels see an array: (N, C, S) in its memory order. */
typedef struct {
    int ndim;
    npy_intp shape[NPY_MAXDIMS];
    int perm[NPY_MAXDIMS]; /* memory order: perm[0] is the slowest-varying axis */
    bn_dims dims;
} bn_layout;

/* The input x of an entry point, ready for a kernel. */
typedef struct {
    PyArrayObject *arr;   /* aligned, native order, of the work type; owned */
    bn_layout L;
    int work, result, axis;
    char of[288];         /* "one value per channel of x (shape ..., channel axis ...)" for messages */
} bn_input;

enum { BN_NONEMPTY = 0, BN_ALLOW_EMPTY = 1 };
/* x: ndim >= 2, a valid axis, non-empty unless allowed; its work array and the layout to use. */
int bn_prepare_input(PyObject *x_obj, PyObject *axis_obj, int allow_empty, bn_input *in);
/* dy (or another array with x's shape), as the kernels must read it beside x: same type, same layout. */
int bn_prepare_like(PyObject *obj, const char *name, const bn_input *in, PyArrayObject **out);
void bn_input_clear(bn_input *in);
/* The result (what the caller gets: out, or a new array in x's layout) and the target the kernel writes
 * (the result itself when the kernel can write it directly, else a scratch array copied over by
 * bn_finish_output). in1..in3: arrays the kernel reads while it writes (NULL for none). */
int bn_prepare_output(PyObject *out_obj, const bn_input *in, PyArrayObject *in1, PyArrayObject *in2,
                      PyArrayObject *in3, PyArrayObject **result, PyArrayObject **target);
int bn_finish_output(PyArrayObject *result, PyArrayObject *target);
/* Replace a per-channel vector that shares memory with target by a copy. */
int bn_detach_from(PyArrayObject **v, PyArrayObject *target);

#endif
