/*
 * _module.c - the binding: the only file that knows Python.
 *
 * Each entry point parses its arguments, validates all of them (nothing is mutated before every check
 * has passed), turns x into a (N, C, S) C-contiguous view without copying where it can, releases the
 * GIL around the kernel, and only then writes results the caller can see (out, running statistics).
 *
 * Layouts: an array whose strides are a permutation of a C-contiguous array's (NCHW, NHWC, x.T, Fortran
 * order, ...) is read in place: in memory order it is (N, C, S) for some N and S. Anything else (slices,
 * negative strides, broadcasts) is copied once into C order. Results are allocated in the layout the
 * kernel worked in, which is x's own layout in the first case.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <string.h>
#include "batchnorm.h"

/* ------------------------------------------------------------------------------------------------ */
/* small helpers                                                                                     */

static void shape_str(char *buf, size_t cap, int ndim, const npy_intp *shape)
{
    size_t used = 0;
    used += (size_t)snprintf(buf + used, cap - used, "(");
    for (int i = 0; i < ndim && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, i ? ", %ld" : "%ld", (long)shape[i]);
    if (used < cap) used += (size_t)snprintf(buf + used, cap - used, ndim == 1 ? ",)" : ")");
}

#define SHAPE_OF(buf, arr) shape_str(buf, sizeof(buf), PyArray_NDIM(arr), PyArray_DIMS(arr))

/* A real number argument, with a message that names it. */
static int parse_real(PyObject *obj, const char *name, double *out)
{
    if (obj == NULL) return 0;
    /* numpy.complex64 scalars and complex arrays are not PyComplex, but would convert with a warning */
    if (PyComplex_Check(obj) || PyArray_IsScalar(obj, ComplexFloating) ||
        (PyArray_Check(obj) && PyArray_ISCOMPLEX((PyArrayObject *)obj)) ||
        !(PyFloat_Check(obj) || PyLong_Check(obj) || PyNumber_Check(obj))) {
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %.200s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %.200s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = v;
    return 0;
}

static int check_eps(double eps)
{
    if (!(eps >= 0)) { /* also rejects NaN */
        PyObject *v = PyFloat_FromDouble(eps);
        if (v) PyErr_Format(PyExc_ValueError, "eps must be a non-negative number, got %R", v);
        Py_XDECREF(v);
        return -1;
    }
    return 0;
}

static int parse_axis(PyObject *obj, int ndim, int *axis)
{
    if (obj == NULL) { *axis = 1; return 0; }
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "axis must be an integer, got %.200s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t a = PyNumber_AsSsize_t(obj, NULL); /* clips huge values, which are out of bounds anyway */
    if (a == -1 && PyErr_Occurred()) return -1;
    if (a < -ndim || a >= ndim) {
        PyErr_Format(PyExc_ValueError, "axis %.100S is out of bounds for an array of dimension %d", obj, ndim);
        return -1;
    }
    *axis = (int)(a < 0 ? a + ndim : a);
    return 0;
}

/*
 * Which type the kernels compute in (work) and which the results have. float32/float64 compute natively,
 * float16 in float32; integers and bool in float64, as np.mean does; everything else is refused.
 */
static int classify_dtype(PyArray_Descr *descr, const char *name, int *work, int *result)
{
    switch (descr->kind) {
    case 'f':
        if (descr->type_num == NPY_HALF) { *work = NPY_FLOAT; *result = NPY_HALF; return 0; }
        if (descr->type_num == NPY_FLOAT) { *work = NPY_FLOAT; *result = NPY_FLOAT; return 0; }
        if (descr->type_num == NPY_DOUBLE) { *work = NPY_DOUBLE; *result = NPY_DOUBLE; return 0; }
        break;
    case 'b': case 'i': case 'u':
        *work = NPY_DOUBLE; *result = NPY_DOUBLE;
        return 0;
    }
    PyObject *r = PyObject_Repr((PyObject *)descr);
    PyErr_Format(PyExc_TypeError,
                 "%s has unsupported dtype %S: batchnorm takes real floating-point arrays (float16, float32, "
                 "float64), integers or bool", name, r ? r : Py_None);
    Py_XDECREF(r);
    return -1;
}

/* x (or dy) as an aligned, native-order array of the work type; its layout is kept (K order). */
static PyArrayObject *as_array(PyObject *obj, const char *name)
{
    if (obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s must be an array, got None", name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (a == NULL && PyErr_ExceptionMatches(PyExc_ValueError)) {
        /* ragged nested sequences and the like */
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s could not be converted to an array (%.200s)", name, Py_TYPE(obj)->tp_name);
    }
    return a;
}

static PyArrayObject *to_work(PyArrayObject *a, int work)
{
    return (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(work),
                                              NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED | NPY_ARRAY_FORCECAST);
}

/* ------------------------------------------------------------------------------------------------ */
/* layouts                                                                                           */

typedef struct {
    int ndim;
    npy_intp shape[NPY_MAXDIMS];
    int perm[NPY_MAXDIMS]; /* memory order: perm[0] is the slowest-varying axis */
    bn_dims dims;
} layout;

/* Fill L for array a (channel axis `axis`) if its strides are a permutation of a C-contiguous array's. */
static int find_layout(PyArrayObject *a, int axis, layout *L)
{
    int nd = PyArray_NDIM(a), k = 0;
    const npy_intp *shape = PyArray_DIMS(a), *strides = PyArray_STRIDES(a);
    L->ndim = nd;
    memcpy(L->shape, shape, sizeof(npy_intp) * (size_t)nd);
    /* Unit axes take no memory: put them first, in order; sort the rest by decreasing stride. */
    for (int i = 0; i < nd; i++)
        if (shape[i] == 1) L->perm[k++] = i;
    int first = k;
    for (int i = 0; i < nd; i++) {
        if (shape[i] == 1) continue;
        int j = k++;
        while (j > first && strides[L->perm[j - 1]] < strides[i]) { L->perm[j] = L->perm[j - 1]; j--; }
        L->perm[j] = i;
    }
    npy_intp expect = PyArray_ITEMSIZE(a);
    for (int j = nd - 1; j >= first; j--) {
        if (strides[L->perm[j]] != expect) return 0;
        expect *= shape[L->perm[j]];
    }
    ptrdiff_t N = 1, S = 1;
    int seen = 0;
    for (int j = 0; j < nd; j++) {
        int ax = L->perm[j];
        if (ax == axis) { seen = 1; continue; }
        if (seen) S *= shape[ax]; else N *= shape[ax];
    }
    L->dims.N = N; L->dims.C = shape[axis]; L->dims.S = S;
    return 1;
}

static void c_order_layout(PyArrayObject *a, int axis, layout *L)
{
    int nd = PyArray_NDIM(a);
    L->ndim = nd;
    ptrdiff_t N = 1, S = 1;
    for (int i = 0; i < nd; i++) {
        L->shape[i] = PyArray_DIM(a, i);
        L->perm[i] = i;
        if (i < axis) N *= L->shape[i];
        if (i > axis) S *= L->shape[i];
    }
    L->dims.N = N; L->dims.C = L->shape[axis]; L->dims.S = S;
}

/* A new array of L's shape laid out in L's memory order. */
static PyArrayObject *new_in_layout(const layout *L, int typenum)
{
    npy_intp pshape[NPY_MAXDIMS];
    npy_intp inv[NPY_MAXDIMS];
    for (int j = 0; j < L->ndim; j++) {
        pshape[j] = L->shape[L->perm[j]];
        inv[L->perm[j]] = j;
    }
    PyArrayObject *flat = (PyArrayObject *)PyArray_SimpleNew(L->ndim, pshape, typenum);
    if (flat == NULL) return NULL;
    PyArray_Dims pd = {inv, L->ndim};
    PyArrayObject *res = (PyArrayObject *)PyArray_Transpose(flat, &pd);
    Py_DECREF(flat);
    return res;
}

/* Can the kernel index b with the flat offsets it uses for ref (same shape, same element strides)? */
static int same_layout(PyArrayObject *b, PyArrayObject *ref)
{
    int nd = PyArray_NDIM(ref);
    if (PyArray_NDIM(b) != nd) return 0;
    npy_intp ib = PyArray_ITEMSIZE(b), ir = PyArray_ITEMSIZE(ref);
    for (int i = 0; i < nd; i++) {
        if (PyArray_DIM(b, i) != PyArray_DIM(ref, i)) return 0;
        if (PyArray_DIM(b, i) == 1) continue;
        if (PyArray_STRIDE(b, i) * ir != PyArray_STRIDE(ref, i) * ib) return 0;
    }
    return 1;
}

static void byte_extent(PyArrayObject *a, char **lo, char **hi)
{
    char *l = PyArray_BYTES(a), *h = PyArray_BYTES(a);
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        npy_intp span = (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
        if (span < 0) l += span; else h += span;
    }
    *lo = l;
    *hi = h + PyArray_ITEMSIZE(a);
}

/* Do the memory extents of a and b (both non-empty) intersect? */
static int extents_overlap(PyArrayObject *a, PyArrayObject *b)
{
    char *lo1, *hi1, *lo2, *hi2;
    byte_extent(a, &lo1, &hi1);
    byte_extent(b, &lo2, &hi2);
    return !(hi1 <= lo2 || hi2 <= lo1);
}

/* Writing out while reading `in` element by element is safe only when they do not overlap, or are the
 * very same elements (in place). */
static int unsafe_overlap(PyArrayObject *out, PyArrayObject *in)
{
    if (in == NULL || PyArray_SIZE(out) == 0) return 0;
    if (!extents_overlap(out, in)) return 0;
    return !(PyArray_BYTES(out) == PyArray_BYTES(in) && PyArray_ITEMSIZE(out) == PyArray_ITEMSIZE(in) &&
             same_layout(out, in));
}

/*
 * Resolve the result array (`*result`, what the caller gets) and the array the kernel writes
 * (`*target`): the same one when out (or a fresh result) is directly writable by the kernel, else a
 * scratch array in the work layout that is copied into the result afterwards.
 */
static int prepare_output(PyObject *out_obj, const char *what, PyArrayObject *ref, const layout *L,
                          int work, int result_type, PyArrayObject *in1, PyArrayObject *in2,
                          PyArrayObject **result, PyArrayObject **target)
{
    char b1[200], b2[200];
    *result = *target = NULL;
    if (out_obj == NULL || out_obj == Py_None) {
        *result = new_in_layout(L, result_type);
        if (*result == NULL) return -1;
    } else {
        if (!PyArray_Check(out_obj)) {
            PyErr_Format(PyExc_TypeError, "out must be a numpy.ndarray, got %.200s", Py_TYPE(out_obj)->tp_name);
            return -1;
        }
        PyArrayObject *out = (PyArrayObject *)out_obj;
        if (!PyArray_SAMESHAPE(out, ref)) {
            SHAPE_OF(b1, out); SHAPE_OF(b2, ref);
            PyErr_Format(PyExc_ValueError, "out has shape %s, expected %s (the shape of %s)", b1, b2, what);
            return -1;
        }
        if (PyArray_TYPE(out) != result_type) {
            PyArray_Descr *want = PyArray_DescrFromType(result_type);
            PyErr_Format(PyExc_TypeError, "out has dtype %S, expected %S (the result's dtype)",
                         (PyObject *)PyArray_DESCR(out), (PyObject *)want);
            Py_DECREF(want);
            return -1;
        }
        if (!PyArray_ISWRITEABLE(out)) {
            PyErr_SetString(PyExc_ValueError, "out is read-only");
            return -1;
        }
        Py_INCREF(out);
        *result = out;
    }
    if (PyArray_TYPE(*result) == work && PyArray_ISALIGNED(*result) && PyArray_ISNOTSWAPPED(*result) &&
        same_layout(*result, ref) && !unsafe_overlap(*result, in1) && !unsafe_overlap(*result, in2)) {
        Py_INCREF(*result);
        *target = *result;
        return 0;
    }
    *target = new_in_layout(L, work);
    if (*target == NULL) { Py_CLEAR(*result); return -1; }
    return 0;
}

/* The kernels read the per-channel vectors (gamma, beta, mean, ...) while they write target: a vector that
 * shares memory with target (channel_vector does not copy a view of out that is already float64) is
 * replaced by a copy, else the kernel would read values it has already overwritten. */
static int detach_from(PyArrayObject **v, PyArrayObject *target)
{
    if (*v == NULL || !extents_overlap(*v, target)) return 0;
    PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(*v, NPY_CORDER);
    Py_SETREF(*v, c);
    return *v ? 0 : -1;
}

static int finish_output(PyArrayObject *result, PyArrayObject *target)
{
    return result == target ? 0 : PyArray_CopyInto(result, target);
}

/* The layout the kernel reads *xw in: its own where possible, else that of a C-order copy. */
static int settle_layout(PyArrayObject **xw, int axis, layout *L)
{
    if (find_layout(*xw, axis, L)) return 0;
    PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(*xw, NPY_CORDER);
    Py_SETREF(*xw, c);
    if (*xw == NULL) return -1;
    c_order_layout(*xw, axis, L);
    return 0;
}

/* x: ndim >= 2, a valid axis, nothing empty; then its work array and the layout the kernel will use. */
static int prepare_input(PyObject *x_obj, PyObject *axis_obj, int *work, int *result, int *axis,
                         PyArrayObject **xw, layout *L)
{
    char b1[200];
    *xw = NULL;
    PyArrayObject *xa = as_array(x_obj, "x");
    if (xa == NULL) return -1;
    if (classify_dtype(PyArray_DESCR(xa), "x", work, result) < 0) goto fail;
    if (PyArray_NDIM(xa) < 2) {
        SHAPE_OF(b1, xa);
        PyErr_Format(PyExc_ValueError,
                     "x must have at least 2 dimensions (N, C, ...), got an array of shape %s", b1);
        goto fail;
    }
    if (parse_axis(axis_obj, PyArray_NDIM(xa), axis) < 0) goto fail;
    if (PyArray_SIZE(xa) == 0) {
        SHAPE_OF(b1, xa);
        PyErr_Format(PyExc_ValueError, "x is empty (shape %s): batch normalization needs at least one value "
                     "per channel", b1);
        goto fail;
    }
    *xw = to_work(xa, *work);
    Py_CLEAR(xa);
    if (*xw == NULL || settle_layout(xw, *axis, L) < 0) goto fail;
    return 0;
fail:
    Py_XDECREF(xa);
    Py_CLEAR(*xw);
    return -1;
}

/* A per-channel array must be 1-D with one value per channel of x. */
static int check_channels(PyArrayObject *a, const char *name, PyArrayObject *x, int axis)
{
    char b1[200], b2[200];
    npy_intp C = PyArray_DIM(x, axis);
    if (PyArray_NDIM(a) == 1 && PyArray_DIM(a, 0) == C) return 0;
    SHAPE_OF(b1, a); SHAPE_OF(b2, x);
    PyErr_Format(PyExc_ValueError,
                 "%s has shape %s, expected (%ld,): one value per channel of x (shape %s, channel axis %d)",
                 name, b1, (long)C, b2, axis);
    return -1;
}

/* A per-channel vector (gamma, mean, ...) as contiguous float64 of length C. NULL/None -> *out = NULL. */
static int channel_vector(PyObject *obj, const char *name, PyArrayObject *x, int axis, PyArrayObject **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_None) return 0;
    PyArrayObject *a = as_array(obj, name);
    if (a == NULL) return -1;
    int w, r;
    if (classify_dtype(PyArray_DESCR(a), name, &w, &r) < 0) { Py_DECREF(a); return -1; }
    if (check_channels(a, name, x, axis) < 0) {
        Py_DECREF(a);
        return -1;
    }
    *out = (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(NPY_DOUBLE),
                                              NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    Py_DECREF(a);
    return *out ? 0 : -1;
}

/* A running statistic: a writable float32/float64 ndarray of length C, updated in place later. */
static int running_stat(PyObject *obj, const char *name, PyArrayObject *x, int axis, PyArrayObject **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_None) return 0;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of float32 or float64 (it is updated in "
                     "place), got %.200s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT && PyArray_TYPE(a) != NPY_DOUBLE) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 or float64, got %S", name,
                     (PyObject *)PyArray_DESCR(a));
        return -1;
    }
    if (check_channels(a, name, x, axis) < 0) return -1;
    if (!PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s is read-only, but it is updated in place", name);
        return -1;
    }
    Py_INCREF(a);
    *out = a;
    return 0;
}

/* r = (1 - momentum) * r + momentum * batch, elementwise, whatever r's stride, alignment and byte order. */
static void update_running(PyArrayObject *r, const double *batch, double momentum, double scale)
{
    npy_intp C = PyArray_DIM(r, 0), stride = PyArray_STRIDE(r, 0);
    char *p = PyArray_BYTES(r);
    int swap = !PyArray_ISNOTSWAPPED(r);
    for (npy_intp c = 0; c < C; c++, p += stride) {
        if (PyArray_TYPE(r) == NPY_FLOAT) {
            float v;
            memcpy(&v, p, sizeof v);
            if (swap) { uint32_t u; memcpy(&u, &v, 4); u = __builtin_bswap32(u); memcpy(&v, &u, 4); }
            v = (float)((1.0 - momentum) * (double)v + momentum * batch[c] * scale);
            if (swap) { uint32_t u; memcpy(&u, &v, 4); u = __builtin_bswap32(u); memcpy(&v, &u, 4); }
            memcpy(p, &v, sizeof v);
        } else {
            double v;
            memcpy(&v, p, sizeof v);
            if (swap) { uint64_t u; memcpy(&u, &v, 8); u = __builtin_bswap64(u); memcpy(&v, &u, 8); }
            v = (1.0 - momentum) * v + momentum * batch[c] * scale;
            if (swap) { uint64_t u; memcpy(&u, &v, 8); u = __builtin_bswap64(u); memcpy(&v, &u, 8); }
            memcpy(p, &v, sizeof v);
        }
    }
}

static PyObject *cast_vector(PyArrayObject *v, int typenum)
{
    if (PyArray_TYPE(v) == typenum) {
        Py_INCREF(v);
        return (PyObject *)v;
    }
    return PyArray_CastToType(v, PyArray_DescrFromType(typenum), 0);
}

static PyObject *kernel_failed(int status)
{
    (void)status; /* BN_ENOMEM is the only failure */
    return PyErr_NoMemory();
}

/* ------------------------------------------------------------------------------------------------ */
/* forward_train                                                                                     */

PyDoc_STRVAR(forward_train_doc,
"forward_train(x, gamma=None, beta=None, *, running_mean=None, running_var=None, momentum=0.1, eps=1e-05, axis=1, out=None)\n"
"--\n\n"
"Batch Normalization forward pass in training mode.\n\n"
"Normalizes x with the statistics of the batch itself, per channel:\n"
"``y = gamma * (x - mean) / sqrt(var + eps) + beta``, with the mean and the biased variance taken over\n"
"every axis except ``axis``.\n\n"
"Parameters\n"
"----------\n"
"x : array_like, at least 2-D\n"
"    Input, e.g. (N, C), (N, C, L), (N, C, H, W) or channels-last (N, H, W, C) with ``axis=-1``.\n"
"    float32 and float64 are computed natively; float16 in float32; integers and bool in float64.\n"
"gamma, beta : array_like of shape (C,), optional\n"
"    Scale and shift. None means no scale (1) / no shift (0).\n"
"running_mean, running_var : ndarray of shape (C,), float32 or float64, optional\n"
"    Running estimates, updated in place: ``r = (1 - momentum) * r + momentum * batch``, with the\n"
"    unbiased batch variance for ``running_var`` (PyTorch's convention).\n"
"momentum : float, default 0.1\n"
"    Weight of the batch statistic in the running estimates, in [0, 1].\n"
"eps : float, default 1e-5\n"
"    Added to the variance before the square root; must be >= 0.\n"
"axis : int, default 1\n"
"    The channel axis. Use -1 for channels-last data.\n"
"out : ndarray, optional\n"
"    Where to write y: x's shape, the result's dtype, writable. ``out=x`` normalizes in place.\n\n"
"Returns\n"
"-------\n"
"y : ndarray\n"
"    The normalized batch, x's shape, x's dtype (float64 for integer or bool input).\n"
"mean : ndarray of shape (C,)\n"
"    Batch mean per channel.\n"
"invstd : ndarray of shape (C,)\n"
"    ``1 / sqrt(var + eps)`` per channel, with the biased batch variance. Pass mean and invstd to\n"
"    :func:`backward`.\n\n"
"Raises\n"
"------\n"
"TypeError\n"
"    For an unsupported dtype or a non-array argument.\n"
"ValueError\n"
"    For wrong shapes, a bad axis, an empty batch, a single value per channel, eps < 0, momentum\n"
"    outside [0, 1], a read-only ``out`` or running statistic. Nothing is modified when it raises.\n\n"
"Notes\n"
"-----\n"
"Statistics are accumulated in float64 with a two-pass (then pairwise-merged) variance, and the\n"
"work is cut independently of the thread count, so results are bit-identical for any number of\n"
"threads.\n");

/* stats64: return mean and invstd in float64 whatever x's type (the layers keep them for backward: for
 * float32 data with a large mean, a float32 mean alone costs dx ~5e-5 of its scale at mean = 1e5 std). */
static PyObject *forward_train_impl(PyObject *self, PyObject *args, PyObject *kwds, int stats64)
{
    static char *kwlist[] = {"x", "gamma", "beta", "running_mean", "running_var", "momentum", "eps", "axis",
                             "out", NULL};
    PyObject *x_obj, *gamma_obj = NULL, *beta_obj = NULL, *rm_obj = NULL, *rv_obj = NULL;
    PyObject *mom_obj = NULL, *eps_obj = NULL, *axis_obj = NULL, *out_obj = NULL;
    PyArrayObject *xw = NULL, *gamma = NULL, *beta = NULL, *rm = NULL, *rv = NULL, *result = NULL,
                  *target = NULL, *mean = NULL, *var = NULL, *invstd = NULL;
    PyObject *mean_r = NULL, *invstd_r = NULL, *ret = NULL;
    double momentum = 0.1, eps = 1e-5;
    int work, rtype, axis, status;
    layout L;
    char b1[200];
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO$OOOOOO:forward_train", kwlist, &x_obj, &gamma_obj,
                                     &beta_obj, &rm_obj, &rv_obj, &mom_obj, &eps_obj, &axis_obj, &out_obj))
        return NULL;
    if (parse_real(mom_obj, "momentum", &momentum) < 0 || parse_real(eps_obj, "eps", &eps) < 0) return NULL;
    if (!(momentum >= 0 && momentum <= 1)) {
        PyErr_Format(PyExc_ValueError, "momentum must be in [0, 1], got %R", mom_obj);
        return NULL;
    }
    if (check_eps(eps) < 0) return NULL;
    if (prepare_input(x_obj, axis_obj, &work, &rtype, &axis, &xw, &L) < 0) return NULL;
    const double count = (double)L.dims.N * (double)L.dims.S;
    if (count <= 1) {
        SHAPE_OF(b1, xw);
        PyErr_Format(PyExc_ValueError, "Expected more than 1 value per channel when training, got input of "
                     "shape %s with channel axis %d", b1, axis);
        goto fail;
    }
    if (channel_vector(gamma_obj, "gamma", xw, axis, &gamma) < 0 ||
        channel_vector(beta_obj, "beta", xw, axis, &beta) < 0 ||
        running_stat(rm_obj, "running_mean", xw, axis, &rm) < 0 ||
        running_stat(rv_obj, "running_var", xw, axis, &rv) < 0)
        goto fail;
    if (prepare_output(out_obj, "x", xw, &L, work, rtype, xw, NULL, &result, &target) < 0) goto fail;
    if (detach_from(&gamma, target) < 0 || detach_from(&beta, target) < 0) goto fail;
    npy_intp C = L.dims.C;
    mean = (PyArrayObject *)PyArray_SimpleNew(1, &C, NPY_DOUBLE);
    var = (PyArrayObject *)PyArray_SimpleNew(1, &C, NPY_DOUBLE);
    invstd = (PyArrayObject *)PyArray_SimpleNew(1, &C, NPY_DOUBLE);
    if (!mean || !var || !invstd) goto fail;

    {
        const double *g = gamma ? (const double *)PyArray_DATA(gamma) : NULL;
        const double *b = beta ? (const double *)PyArray_DATA(beta) : NULL;
        double *pm = (double *)PyArray_DATA(mean), *pv = (double *)PyArray_DATA(var),
               *pi = (double *)PyArray_DATA(invstd);
        int nt = bn_get_num_threads();
        Py_BEGIN_ALLOW_THREADS
        if (work == NPY_FLOAT)
            status = bn_forward_train_f32((const float *)PyArray_DATA(xw), (float *)PyArray_DATA(target), L.dims,
                                          g, b, eps, pm, pv, pi, nt);
        else
            status = bn_forward_train_f64((const double *)PyArray_DATA(xw), (double *)PyArray_DATA(target),
                                          L.dims, g, b, eps, pm, pv, pi, nt);
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { kernel_failed(status); goto fail; }
    mean_r = cast_vector(mean, stats64 ? NPY_DOUBLE : rtype);
    invstd_r = cast_vector(invstd, stats64 ? NPY_DOUBLE : rtype);
    if (!mean_r || !invstd_r) goto fail;
    if (finish_output(result, target) < 0) goto fail;
    /* Nothing below can fail: the running statistics change only when the call succeeds. */
    if (rm) update_running(rm, (const double *)PyArray_DATA(mean), momentum, 1.0);
    if (rv) update_running(rv, (const double *)PyArray_DATA(var), momentum, count / (count - 1));
    ret = Py_BuildValue("(OOO)", result, mean_r, invstd_r);
fail:
    Py_XDECREF(xw); Py_XDECREF(gamma); Py_XDECREF(beta); Py_XDECREF(rm); Py_XDECREF(rv);
    Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(mean); Py_XDECREF(var); Py_XDECREF(invstd);
    Py_XDECREF(mean_r); Py_XDECREF(invstd_r);
    return ret;
}

static PyObject *py_forward_train(PyObject *self, PyObject *args, PyObject *kwds)
{
    return forward_train_impl(self, args, kwds, 0);
}

static PyObject *py_forward_train_stats64(PyObject *self, PyObject *args, PyObject *kwds)
{
    return forward_train_impl(self, args, kwds, 1);
}

/* ------------------------------------------------------------------------------------------------ */
/* forward_infer                                                                                     */

PyDoc_STRVAR(forward_infer_doc,
"forward_infer(x, running_mean, running_var, gamma=None, beta=None, *, eps=1e-05, axis=1, out=None)\n"
"--\n\n"
"Batch Normalization forward pass in inference mode.\n\n"
"Normalizes x with given (running) statistics:\n"
"``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``.\n\n"
"Parameters\n"
"----------\n"
"x : array_like, at least 2-D\n"
"    Input; dtypes as in :func:`forward_train`.\n"
"running_mean, running_var : array_like of shape (C,)\n"
"    The statistics to normalize with (read only).\n"
"gamma, beta : array_like of shape (C,), optional\n"
"    Scale and shift; None means 1 and 0.\n"
"eps : float, default 1e-5\n"
"    Added to running_var before the square root; must be >= 0.\n"
"axis : int, default 1\n"
"    The channel axis (-1 for channels-last).\n"
"out : ndarray, optional\n"
"    Where to write y (x's shape, the result's dtype); ``out=x`` works in place.\n\n"
"Returns\n"
"-------\n"
"y : ndarray\n"
"    x's shape and dtype (float64 for integer or bool input).\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`forward_train`.\n");

static PyObject *py_forward_infer(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "running_mean", "running_var", "gamma", "beta", "eps", "axis", "out", NULL};
    PyObject *x_obj, *rm_obj, *rv_obj, *gamma_obj = NULL, *beta_obj = NULL, *eps_obj = NULL,
             *axis_obj = NULL, *out_obj = NULL;
    PyArrayObject *xw = NULL, *gamma = NULL, *beta = NULL, *rm = NULL, *rv = NULL, *result = NULL,
                  *target = NULL, *invstd = NULL;
    PyObject *ret = NULL;
    double eps = 1e-5;
    int work, rtype, axis, status;
    layout L;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OO$OOO:forward_infer", kwlist, &x_obj, &rm_obj, &rv_obj,
                                     &gamma_obj, &beta_obj, &eps_obj, &axis_obj, &out_obj))
        return NULL;
    if (parse_real(eps_obj, "eps", &eps) < 0 || check_eps(eps) < 0) return NULL;
    if (rm_obj == Py_None || rv_obj == Py_None) {
        PyErr_SetString(PyExc_TypeError, "running_mean and running_var are required for inference, got None");
        return NULL;
    }
    if (prepare_input(x_obj, axis_obj, &work, &rtype, &axis, &xw, &L) < 0) return NULL;
    if (channel_vector(rm_obj, "running_mean", xw, axis, &rm) < 0 ||
        channel_vector(rv_obj, "running_var", xw, axis, &rv) < 0 ||
        channel_vector(gamma_obj, "gamma", xw, axis, &gamma) < 0 ||
        channel_vector(beta_obj, "beta", xw, axis, &beta) < 0)
        goto fail;
    if (prepare_output(out_obj, "x", xw, &L, work, rtype, xw, NULL, &result, &target) < 0) goto fail;
    if (detach_from(&rm, target) < 0 || detach_from(&gamma, target) < 0 || detach_from(&beta, target) < 0)
        goto fail;
    npy_intp C = L.dims.C;
    invstd = (PyArrayObject *)PyArray_SimpleNew(1, &C, NPY_DOUBLE);
    if (!invstd) goto fail;
    {
        double *pi = (double *)PyArray_DATA(invstd);
        const double *pv = (const double *)PyArray_DATA(rv);
        for (npy_intp c = 0; c < C; c++) pi[c] = 1.0 / sqrt(pv[c] + eps);
        const double *pm = (const double *)PyArray_DATA(rm);
        const double *g = gamma ? (const double *)PyArray_DATA(gamma) : NULL;
        const double *b = beta ? (const double *)PyArray_DATA(beta) : NULL;
        int nt = bn_get_num_threads();
        Py_BEGIN_ALLOW_THREADS
        if (work == NPY_FLOAT)
            status = bn_forward_infer_f32((const float *)PyArray_DATA(xw), (float *)PyArray_DATA(target), L.dims,
                                          pm, pi, g, b, nt);
        else
            status = bn_forward_infer_f64((const double *)PyArray_DATA(xw), (double *)PyArray_DATA(target),
                                          L.dims, pm, pi, g, b, nt);
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { kernel_failed(status); goto fail; }
    if (finish_output(result, target) < 0) goto fail;
    Py_INCREF(result);
    ret = (PyObject *)result;
fail:
    Py_XDECREF(xw); Py_XDECREF(gamma); Py_XDECREF(beta); Py_XDECREF(rm); Py_XDECREF(rv);
    Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(invstd);
    return ret;
}

/* ------------------------------------------------------------------------------------------------ */
/* backward                                                                                          */

PyDoc_STRVAR(backward_doc,
"backward(dy, x, mean, invstd, gamma=None, *, training=True, axis=1, out=None)\n"
"--\n\n"
"Batch Normalization backward pass.\n\n"
"Gradients of ``y = gamma * (x - mean) * invstd + beta`` given the upstream gradient dy.\n\n"
"Parameters\n"
"----------\n"
"dy : array_like\n"
"    Gradient of the loss with respect to y; x's shape.\n"
"x : array_like, at least 2-D\n"
"    The forward pass's input.\n"
"mean, invstd : array_like of shape (C,)\n"
"    With ``training=True``, the batch statistics :func:`forward_train` returned. With\n"
"    ``training=False``, constants: the running mean and ``1 / sqrt(running_var + eps)``.\n"
"gamma : array_like of shape (C,), optional\n"
"    The scale used in the forward pass; None means 1.\n"
"training : bool, default True\n"
"    True: the full gradient through the batch statistics,\n"
"    ``dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``.\n"
"    False: mean and invstd are constants (frozen BN), ``dx = gamma * invstd * dy``.\n"
"axis : int, default 1\n"
"    The channel axis (-1 for channels-last).\n"
"out : ndarray, optional\n"
"    Where to write dx (x's shape, the result's dtype); may be dy or x itself.\n\n"
"Returns\n"
"-------\n"
"dx : ndarray\n"
"    Gradient with respect to x.\n"
"dgamma : ndarray of shape (C,)\n"
"    ``sum(dy * xhat)`` per channel, with ``xhat = (x - mean) * invstd``.\n"
"dbeta : ndarray of shape (C,)\n"
"    ``sum(dy)`` per channel.\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`forward_train`, and when dy's shape differs from x's.\n");

static PyObject *py_backward(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dy", "x", "mean", "invstd", "gamma", "training", "axis", "out", NULL};
    PyObject *dy_obj, *x_obj, *mean_obj, *invstd_obj, *gamma_obj = NULL, *training_obj = NULL,
             *axis_obj = NULL, *out_obj = NULL;
    PyArrayObject *xw = NULL, *dya = NULL, *dyw = NULL, *mean = NULL, *invstd = NULL, *gamma = NULL,
                  *result = NULL, *target = NULL, *dgamma = NULL, *dbeta = NULL;
    PyObject *dgamma_r = NULL, *dbeta_r = NULL, *ret = NULL;
    int work, rtype, dwork, drtype, axis, status, training = 1;
    layout L;
    char b1[200], b2[200];
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|O$OOO:backward", kwlist, &dy_obj, &x_obj, &mean_obj,
                                     &invstd_obj, &gamma_obj, &training_obj, &axis_obj, &out_obj))
        return NULL;
    if (training_obj != NULL && (training = PyObject_IsTrue(training_obj)) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "training must be True or False, got %.200R", training_obj);
        return NULL;
    }
    if (mean_obj == Py_None || invstd_obj == Py_None) {
        PyErr_SetString(PyExc_TypeError, "mean and invstd are required, got None");
        return NULL;
    }
    dya = as_array(dy_obj, "dy");
    if (dya == NULL) return NULL;
    /* dy is only checked here: like the parameters, it is cast to x's type (the result's type). */
    if (classify_dtype(PyArray_DESCR(dya), "dy", &dwork, &drtype) < 0) goto fail;
    if (prepare_input(x_obj, axis_obj, &work, &rtype, &axis, &xw, &L) < 0) goto fail;
    if (!PyArray_SAMESHAPE(dya, xw)) {
        SHAPE_OF(b1, dya); SHAPE_OF(b2, xw);
        PyErr_Format(PyExc_ValueError, "dy has shape %s, expected %s (the shape of x)", b1, b2);
        goto fail;
    }
    /* dy must be indexed exactly as x is: same type and same layout, else one copy. */
    dyw = to_work(dya, work);
    if (dyw == NULL) goto fail;
    if (!same_layout(dyw, xw)) {
        PyArrayObject *c = new_in_layout(&L, work);
        if (c == NULL || PyArray_CopyInto(c, dyw) < 0) { Py_XDECREF(c); goto fail; }
        Py_SETREF(dyw, c);
    }
    if (channel_vector(mean_obj, "mean", xw, axis, &mean) < 0 ||
        channel_vector(invstd_obj, "invstd", xw, axis, &invstd) < 0 ||
        channel_vector(gamma_obj, "gamma", xw, axis, &gamma) < 0)
        goto fail;
    if (prepare_output(out_obj, "x", xw, &L, work, rtype, xw, dyw, &result, &target) < 0) goto fail;
    if (detach_from(&mean, target) < 0 || detach_from(&invstd, target) < 0 || detach_from(&gamma, target) < 0)
        goto fail;
    npy_intp C = L.dims.C;
    dgamma = (PyArrayObject *)PyArray_SimpleNew(1, &C, NPY_DOUBLE);
    dbeta = (PyArrayObject *)PyArray_SimpleNew(1, &C, NPY_DOUBLE);
    if (!dgamma || !dbeta) goto fail;
    {
        const double *pm = (const double *)PyArray_DATA(mean), *pi = (const double *)PyArray_DATA(invstd);
        const double *g = gamma ? (const double *)PyArray_DATA(gamma) : NULL;
        double *pg = (double *)PyArray_DATA(dgamma), *pb = (double *)PyArray_DATA(dbeta);
        int nt = bn_get_num_threads();
        Py_BEGIN_ALLOW_THREADS
        if (work == NPY_FLOAT)
            status = bn_backward_f32((const float *)PyArray_DATA(dyw), (const float *)PyArray_DATA(xw),
                                     (float *)PyArray_DATA(target), L.dims, pm, pi, g, training, pg, pb, nt);
        else
            status = bn_backward_f64((const double *)PyArray_DATA(dyw), (const double *)PyArray_DATA(xw),
                                     (double *)PyArray_DATA(target), L.dims, pm, pi, g, training, pg, pb, nt);
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { kernel_failed(status); goto fail; }
    dgamma_r = cast_vector(dgamma, rtype);
    dbeta_r = cast_vector(dbeta, rtype);
    if (!dgamma_r || !dbeta_r) goto fail;
    if (finish_output(result, target) < 0) goto fail;
    ret = Py_BuildValue("(OOO)", result, dgamma_r, dbeta_r);
fail:
    Py_XDECREF(xw); Py_XDECREF(dya); Py_XDECREF(dyw); Py_XDECREF(mean); Py_XDECREF(invstd);
    Py_XDECREF(gamma); Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(dgamma); Py_XDECREF(dbeta);
    Py_XDECREF(dgamma_r); Py_XDECREF(dbeta_r);
    return ret;
}

/* ------------------------------------------------------------------------------------------------ */
/* threads and build information                                                                     */

PyDoc_STRVAR(set_num_threads_doc,
"set_num_threads(n)\n"
"--\n\n"
"Set the number of threads the kernels may use.\n\n"
"Parameters\n"
"----------\n"
"n : int\n"
"    At least 1. This sets the OpenMP runtime's thread count for the calling thread, so it also\n"
"    affects other OpenMP code sharing that runtime (as ``omp_set_num_threads`` does).\n\n"
"Returns\n"
"-------\n"
"None\n\n"
"Notes\n"
"-----\n"
"Results do not depend on the thread count. Small inputs run on one thread regardless.\n"
"Without OpenMP (a serial build) this is accepted and has no effect.\n");

static PyObject *py_set_num_threads(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n", NULL};
    PyObject *arg;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:set_num_threads", kwlist, &arg)) return NULL;
    if (PyBool_Check(arg) || !PyIndex_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "n must be an integer, got %.200s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        n = -1;
    }
    if (n < 1 || n > 1 << 20) {
        PyErr_Format(PyExc_ValueError, "n must be a positive number of threads, got %R", arg);
        return NULL;
    }
    bn_set_num_threads((int)n);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(get_num_threads_doc,
"get_num_threads()\n"
"--\n\n"
"The number of threads the kernels use for large inputs.\n\n"
"Returns\n"
"-------\n"
"int\n"
"    By default the number of cores, or ``OMP_NUM_THREADS`` when set; 1 in a build without OpenMP.\n");

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    return PyLong_FromLong(bn_get_num_threads());
}

PyDoc_STRVAR(build_info_doc,
"_build_info()\n"
"--\n\n"
"How this extension was built: a dict with 'openmp', 'openmp_version', 'simd', 'compiler',\n"
"'max_threads'.\n");

static PyObject *py_build_info(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    int v = bn_openmp_version();
#if defined(__clang__)
    const char *compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
    const char *compiler = "gcc " __VERSION__;
#elif defined(_MSC_VER)
    const char *compiler = "msvc";
#else
    const char *compiler = "unknown";
#endif
    PyObject *ver = v ? PyLong_FromLong(v) : (Py_INCREF(Py_None), Py_None);
    if (ver == NULL) return NULL;
    return Py_BuildValue("{s:O,s:N,s:s,s:s,s:i}", "openmp", v ? Py_True : Py_False, "openmp_version", ver,
                         "simd", bn_simd_name(), "compiler", compiler, "max_threads", bn_get_num_threads());
}

static PyMethodDef methods[] = {
    {"forward_train", (PyCFunction)(void (*)(void))py_forward_train, METH_VARARGS | METH_KEYWORDS,
     forward_train_doc},
    {"_forward_train_stats64", (PyCFunction)(void (*)(void))py_forward_train_stats64,
     METH_VARARGS | METH_KEYWORDS,
     "_forward_train_stats64(x, gamma=None, beta=None, *, running_mean=None, running_var=None, momentum=0.1, "
     "eps=1e-05, axis=1, out=None)\n--\n\n"
     "forward_train, but mean and invstd are returned in float64 whatever x's dtype (for the layers).\n"},
    {"forward_infer", (PyCFunction)(void (*)(void))py_forward_infer, METH_VARARGS | METH_KEYWORDS,
     forward_infer_doc},
    {"backward", (PyCFunction)(void (*)(void))py_backward, METH_VARARGS | METH_KEYWORDS, backward_doc},
    {"set_num_threads", (PyCFunction)(void (*)(void))py_set_num_threads, METH_VARARGS | METH_KEYWORDS,
     set_num_threads_doc},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, get_num_threads_doc},
    {"_build_info", py_build_info, METH_NOARGS, build_info_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_core",
    "C kernels of batchnorm (OpenMP-parallel Batch Normalization). Use the functions re-exported by "
    "the batchnorm package.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    return PyModule_Create(&moduledef);
}
