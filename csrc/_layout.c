/* _layout.c - the binding's array steps: the (N, C, S) layout the kernels read an array in, inputs and
 * outputs in that layout, and the overlap rules between them.
 *
 * An array whose strides are a permutation of a C-contiguous array's (NCHW, NHWC, x.T, Fortran order,
 * ...) is read in place: in memory order it is (N, C, S) for some N and S. Anything else (slices, negative
 * strides, broadcasts) is copied once into C order. Results are allocated in the layout the kernel worked
 * in, which is x's own layout in the first case. */
#include "_binding.h" /* Python.h first, as Python requires */
#include <string.h>

/* Fill L for array a (channel axis `axis`) if its strides are a permutation of a C-contiguous array's. */
static int find_layout(PyArrayObject *a, int axis, bn_layout *L)
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

static void c_order_layout(PyArrayObject *a, int axis, bn_layout *L)
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
static PyArrayObject *new_in_layout(const bn_layout *L, int typenum)
{
    npy_intp pshape[NPY_MAXDIMS];
    npy_intp inv[NPY_MAXDIMS];
    for (int j = 0; j < L->ndim; j++) {
        pshape[j] = L->shape[L->perm[j]];
        inv[L->perm[j]] = j;
    }
    PyArrayObject *flat = bn_new_array(L->ndim, pshape, typenum, 0);
    if (flat == NULL) return NULL;
    int identity = 1;
    for (int j = 0; j < L->ndim; j++) identity &= L->perm[j] == j;
    if (identity) return flat; /* C order already: a transposed view would be a second array object */
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
    if (PyArray_SIZE(a) == 0 || PyArray_SIZE(b) == 0) return 0;
    char *lo1, *hi1, *lo2, *hi2;
    byte_extent(a, &lo1, &hi1);
    byte_extent(b, &lo2, &hi2);
    return !(hi1 <= lo2 || hi2 <= lo1);
}

/* Writing out while reading `in` element by element is safe only when they do not overlap, or are the
 * very same elements (in place). */
static int unsafe_overlap(PyArrayObject *out, PyArrayObject *in)
{
    if (in == NULL || !extents_overlap(out, in)) return 0;
    return !(PyArray_BYTES(out) == PyArray_BYTES(in) && PyArray_ITEMSIZE(out) == PyArray_ITEMSIZE(in) &&
             same_layout(out, in));
}

void bn_input_clear(bn_input *in)
{
    Py_CLEAR(in->arr);
}

int bn_prepare_input(PyObject *x_obj, PyObject *axis_obj, int allow_empty, bn_input *in)
{
    char b1[200];
    in->arr = NULL;
    PyArrayObject *xa = bn_as_array(x_obj, "x");
    if (xa == NULL) return -1;
    if (bn_classify_dtype(PyArray_DESCR(xa), "x", &in->work, &in->result) < 0) goto fail;
    if (PyArray_NDIM(xa) < 2) {
        SHAPE_OF(b1, xa);
        PyErr_Format(PyExc_ValueError,
                     "x must have at least 2 dimensions (N, C, ...), got an array of shape %s", b1);
        goto fail;
    }
    if (bn_parse_axis(axis_obj, PyArray_NDIM(xa), &in->axis) < 0) goto fail;
    if (PyArray_SIZE(xa) == 0 && !allow_empty) {
        SHAPE_OF(b1, xa);
        PyErr_Format(PyExc_ValueError, "x is empty (shape %s): batch normalization needs at least one value "
                     "per channel", b1);
        goto fail;
    }
    bn_channel_text(in->of, sizeof in->of, PyArray_NDIM(xa), PyArray_DIMS(xa), in->axis);
    in->arr = bn_to_work(xa, in->work);
    Py_CLEAR(xa);
    if (in->arr == NULL) goto fail;
    if (PyArray_SIZE(in->arr) == 0 || !find_layout(in->arr, in->axis, &in->L)) {
        /* an empty array is never read; anything else the kernels cannot index is copied to C order */
        if (PyArray_SIZE(in->arr) != 0) {
            PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(in->arr, NPY_CORDER);
            Py_SETREF(in->arr, c);
            if (in->arr == NULL) goto fail;
        }
        c_order_layout(in->arr, in->axis, &in->L);
    }
    return 0;
fail:
    Py_XDECREF(xa);
    Py_CLEAR(in->arr);
    return -1;
}

int bn_prepare_like(PyObject *obj, const char *name, const bn_input *in, PyArrayObject **out)
{
    char b1[200], b2[200];
    int work, result;
    *out = NULL;
    PyArrayObject *a = bn_as_array(obj, name);
    if (a == NULL) return -1;
    /* checked for a clear message; then cast to x's work type like the per-channel vectors */
    if (bn_classify_dtype(PyArray_DESCR(a), name, &work, &result) < 0) goto fail;
    if (!PyArray_SAMESHAPE(a, in->arr)) {
        SHAPE_OF(b1, a); SHAPE_OF(b2, in->arr);
        PyErr_Format(PyExc_ValueError, "%s has shape %s, expected %s (the shape of x)", name, b1, b2);
        goto fail;
    }
    *out = bn_to_work(a, in->work);
    Py_CLEAR(a);
    if (*out == NULL) return -1;
    if (PyArray_SIZE(*out) != 0 && !same_layout(*out, in->arr)) {
        /* the kernels index it with x's offsets: one copy in x's layout */
        PyArrayObject *c = new_in_layout(&in->L, in->work);
        if (c == NULL || PyArray_CopyInto(c, *out) < 0) { Py_XDECREF(c); Py_CLEAR(*out); return -1; }
        Py_SETREF(*out, c);
    }
    return 0;
fail:
    Py_XDECREF(a);
    return -1;
}

int bn_prepare_output(PyObject *out_obj, const bn_input *in, PyArrayObject *in1, PyArrayObject *in2,
                      PyArrayObject *in3, PyArrayObject **result, PyArrayObject **target)
{
    char b1[200], b2[200];
    PyArrayObject *ref = in->arr;
    *result = *target = NULL;
    if (out_obj == NULL || out_obj == Py_None) {
        *result = new_in_layout(&in->L, in->result);
        if (*result == NULL) return -1;
    } else {
        if (!PyArray_Check(out_obj)) {
            PyErr_Format(PyExc_TypeError, "out must be a numpy.ndarray, got %.200s", Py_TYPE(out_obj)->tp_name);
            return -1;
        }
        PyArrayObject *out = (PyArrayObject *)out_obj;
        if (!PyArray_SAMESHAPE(out, ref)) {
            SHAPE_OF(b1, out); SHAPE_OF(b2, ref);
            PyErr_Format(PyExc_ValueError, "out has shape %s, expected %s (the shape of x)", b1, b2);
            return -1;
        }
        if (PyArray_TYPE(out) != in->result) {
            PyArray_Descr *want = PyArray_DescrFromType(in->result);
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
    if (PyArray_TYPE(*result) == in->work && PyArray_ISALIGNED(*result) && PyArray_ISNOTSWAPPED(*result) &&
        same_layout(*result, ref) && !unsafe_overlap(*result, in1) && !unsafe_overlap(*result, in2) &&
        !unsafe_overlap(*result, in3)) {
        Py_INCREF(*result);
        *target = *result;
        return 0;
    }
    *target = new_in_layout(&in->L, in->work);
    if (*target == NULL) { Py_CLEAR(*result); return -1; }
    return 0;
}

int bn_finish_output(PyArrayObject *result, PyArrayObject *target)
{
    if (result == target) return 0;
    if (PyArray_TYPE(result) == PyArray_TYPE(target)) return PyArray_CopyInto(result, target);
    /* a narrowing cast (float32 work, float16 result): out-of-range values become +-inf without NumPy's
     * overflow warning, which `-W error` would raise half-way through writing out */
    PyObject *quiet = bn_quiet_begin();
    if (quiet == NULL) return -1;
    int r = PyArray_CopyInto(result, target);
    return bn_quiet_end(quiet) < 0 ? -1 : r;
}

/* The kernels read the per-channel vectors (gamma, beta, mean, ...) while they write target: a vector that
 * shares memory with target (bn_channel_vector does not copy a view of out that is already float64) is
 * replaced by a copy, else the kernel would read values it has already overwritten. */
int bn_detach_from(PyArrayObject **v, PyArrayObject *target)
{
    if (*v == NULL || !extents_overlap(*v, target)) return 0;
    PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(*v, NPY_CORDER);
    Py_SETREF(*v, c);
    return *v ? 0 : -1;
}
