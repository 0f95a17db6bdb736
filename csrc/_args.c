/* _args.c - the binding's argument steps: numbers, axis, counts, dtypes, per-channel vectors and running
 * statistics. Each raises TypeError/ValueError naming the argument and returns -1, or returns 0. */
#include "_binding.h" /* Python.h first, as Python requires */
#include <math.h>
#include <string.h>

/* Appends the decimal digits of v to buf[*used ..], as far as cap allows. */
static void append_long(char *buf, size_t cap, size_t *used, long long v)
{
    char digits[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do { digits[n++] = (char)('0' + (int)(u % 10)); u /= 10; } while (u);
    if (v < 0) digits[n++] = '-';
    while (n > 0 && *used + 1 < cap) buf[(*used)++] = digits[--n];
}

static void append_str(char *buf, size_t cap, size_t *used, const char *s)
{
    while (*s && *used + 1 < cap) buf[(*used)++] = *s++;
}

/* "(2, 3)", "(4,)", "()". By hand rather than by snprintf: every call formats x's shape for the messages
 * it might raise (bn_input.of), and snprintf's cost was visible in a call on a small tensor. */
void bn_shape_str(char *buf, size_t cap, int ndim, const npy_intp *shape)
{
    size_t used = 0;
    if (cap == 0) return;
    append_str(buf, cap, &used, "(");
    for (int i = 0; i < ndim; i++) {
        if (i) append_str(buf, cap, &used, ", ");
        append_long(buf, cap, &used, (long long)shape[i]);
    }
    append_str(buf, cap, &used, ndim == 1 ? ",)" : ")");
    buf[used] = '\0';
}

void bn_channel_text(char *buf, size_t cap, int ndim, const npy_intp *shape, int axis)
{
    size_t used = 0;
    char b1[200];
    if (cap == 0) return;
    bn_shape_str(b1, sizeof b1, ndim, shape);
    append_str(buf, cap, &used, "one value per channel of x (shape ");
    append_str(buf, cap, &used, b1);
    append_str(buf, cap, &used, ", channel axis ");
    append_long(buf, cap, &used, axis);
    append_str(buf, cap, &used, ")");
    buf[used] = '\0';
}

int bn_parse_real(PyObject *obj, const char *name, double *out)
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
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        if (overflow)
            PyErr_Format(PyExc_ValueError, "%s is out of range for a float: %.100R", name, obj);
        else
            PyErr_Format(PyExc_TypeError, "%s must be a real number, got %.200s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = v;
    return 0;
}

int bn_parse_eps(PyObject *obj, double *eps)
{
    if (bn_parse_real(obj, "eps", eps) < 0) return -1;
    if (!(*eps >= 0)) { /* also rejects NaN */
        PyObject *v = PyFloat_FromDouble(*eps);
        if (v) PyErr_Format(PyExc_ValueError, "eps must be a non-negative number, got %R", v);
        Py_XDECREF(v);
        return -1;
    }
    return 0;
}

int bn_parse_momentum(PyObject *obj, double *momentum)
{
    if (bn_parse_real(obj, "momentum", momentum) < 0) return -1;
    if (!(*momentum >= 0 && *momentum <= 1)) {
        PyErr_Format(PyExc_ValueError, "momentum must be in [0, 1], got %R", obj);
        return -1;
    }
    return 0;
}

int bn_parse_axis(PyObject *obj, int ndim, int *axis)
{
    if (obj == NULL) { *axis = 1; return 0; }
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "axis must be an integer, got %.200s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t a = PyNumber_AsSsize_t(obj, NULL); /* clips huge values, which are out of bounds anyway */
    if (a == -1 && PyErr_Occurred()) {
        /* e.g. a 1-element array, or an __index__ that misbehaves: say which argument it was */
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "axis must be an integer, got %.200s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (a < -ndim || a >= ndim) {
        PyErr_Format(PyExc_ValueError, "axis %.100S is out of bounds for an array of dimension %d", obj, ndim);
        return -1;
    }
    *axis = (int)(a < 0 ? a + ndim : a);
    return 0;
}

static int parse_count_scalar(PyObject *obj, const char *name, int64_t least, int64_t *out)
{
    if (obj == Py_None || PyBool_Check(obj) || PyArray_IsScalar(obj, Bool)) goto type_error;
    if (PyIndex_Check(obj)) {
        PyObject *as_int = PyNumber_Index(obj);
        long long v = as_int ? PyLong_AsLongLong(as_int) : -1;
        Py_XDECREF(as_int);
        if (v == -1 && PyErr_Occurred()) {
            int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
            PyErr_Clear();
            if (!overflow) goto type_error;
            PyErr_Format(PyExc_ValueError, "%s is out of range: %.100R", name, obj);
            return -1;
        }
        *out = (int64_t)v;
    } else {
        double v;
        if (PyComplex_Check(obj) || PyArray_IsScalar(obj, ComplexFloating) || !PyNumber_Check(obj)) goto type_error;
        v = PyFloat_AsDouble(obj);
        if (v == -1.0 && PyErr_Occurred()) { PyErr_Clear(); goto type_error; }
        if (!(v == floor(v))) {
            PyErr_Format(PyExc_ValueError, "%s must be a whole number of values, got %R", name, obj);
            return -1;
        }
        if (fabs(v) > 9.0e15) {
            PyErr_Format(PyExc_ValueError, "%s is out of range (at most 2**53 values): %R", name, obj);
            return -1;
        }
        *out = (int64_t)v;
    }
    if (*out < least) {
        PyErr_Format(PyExc_ValueError, "%s must be at least %lld, got %R", name, (long long)least, obj);
        return -1;
    }
    return 0;
type_error:
    PyErr_Format(PyExc_TypeError, "%s must be an integer, got %.200s", name, Py_TYPE(obj)->tp_name);
    return -1;
}

int bn_parse_count(PyObject *obj, const char *name, int64_t least, int64_t *out)
{
    if (!PyArray_Check(obj)) return parse_count_scalar(obj, name, least, out);
    /* a 0-d array counts as its scalar; anything bigger is not a count */
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_NDIM(a) != 0) {
        char b1[200];
        SHAPE_OF(b1, a);
        PyErr_Format(PyExc_TypeError, "%s must be a single integer, got an array of shape %s", name, b1);
        return -1;
    }
    Py_INCREF(obj);
    PyObject *scalar = PyArray_Return(a); /* steals the reference */
    if (scalar == NULL) return -1;
    int r = parse_count_scalar(scalar, name, least, out);
    Py_DECREF(scalar);
    return r;
}

int bn_classify_dtype(PyArray_Descr *descr, const char *name, int *work, int *result)
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

PyArrayObject *bn_as_array(PyObject *obj, const char *name)
{
    if (obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s must be an array, got None", name);
        return NULL;
    }
    /* an array is taken as it is, as PyArray_FromAny would (subclasses included), without its dtype and
     * shape discovery, a tenth of a small call's overhead */
    if (PyArray_Check(obj)) {
        Py_INCREF(obj);
        return (PyArrayObject *)obj;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (a == NULL && (PyList_Check(obj) || PyTuple_Check(obj)) && PyErr_ExceptionMatches(PyExc_ValueError)) {
        /* a ragged nested sequence: name the argument, keep NumPy's reason as the cause. Anything else
         * (an __array__ that raised, say) propagates as it was raised. */
        PyObject *type, *cause, *tb;
        PyErr_Fetch(&type, &cause, &tb);
        PyErr_NormalizeException(&type, &cause, &tb);
        if (tb && cause) PyException_SetTraceback(cause, tb);
        PyErr_Format(PyExc_TypeError, "%s could not be converted to an array (%.200s)", name, Py_TYPE(obj)->tp_name);
        if (cause) {
            PyObject *t2, *v2, *tb2;
            PyErr_Fetch(&t2, &v2, &tb2);
            PyErr_NormalizeException(&t2, &v2, &tb2);
            if (v2) {
                Py_INCREF(cause);
                PyException_SetContext(v2, cause); /* steals */
                PyException_SetCause(v2, cause);   /* steals */
                cause = NULL;
            }
            PyErr_Restore(t2, v2, tb2);
        }
        Py_XDECREF(type); Py_XDECREF(cause); Py_XDECREF(tb);
    }
    return a;
}

PyArrayObject *bn_to_work(PyArrayObject *a, int work)
{
    return (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(work),
                                              NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED | NPY_ARRAY_FORCECAST);
}

int bn_check_length(PyArrayObject *a, const char *name, npy_intp C, const char *of)
{
    char b1[200];
    if (PyArray_NDIM(a) == 1 && PyArray_DIM(a, 0) == C) return 0;
    SHAPE_OF(b1, a);
    PyErr_Format(PyExc_ValueError, "%s has shape %s, expected (%ld,): %s", name, b1, (long)C, of);
    return -1;
}

int bn_channel_vector(PyObject *obj, const char *name, npy_intp C, const char *of, PyArrayObject **out)
{
    int w, r;
    *out = NULL;
    if (obj == NULL || obj == Py_None) return 0;
    if (PyArray_Check(obj)) {
        /* The common case, a 1-D float32 or float64 array of length C in native byte order, converted
         * here: NumPy's cast (PyArray_FromArray with FORCECAST below) took over half of a small call's
         * time in the binding, four vectors a call. The values are the same (float to double is exact). */
        PyArrayObject *v = (PyArrayObject *)obj;
        const int t = PyArray_TYPE(v);
        if ((t == NPY_FLOAT || t == NPY_DOUBLE) && PyArray_NDIM(v) == 1 && PyArray_DIM(v, 0) == C &&
            PyArray_ISNOTSWAPPED(v) && PyArray_ISALIGNED(v)) {
            if (t == NPY_DOUBLE && PyArray_IS_C_CONTIGUOUS(v)) {
                Py_INCREF(v);
                *out = v;
                return 0;
            }
            PyArrayObject *r = bn_new_array(1, &C, NPY_DOUBLE, 0);
            if (r == NULL) return -1;
            double *d = (double *)PyArray_DATA(r);
            const char *src = PyArray_BYTES(v);
            const npy_intp step = PyArray_STRIDE(v, 0);
            if (t == NPY_FLOAT && step == (npy_intp)sizeof(float))
                bn_widen_f32((const float *)src, d, C);
            else if (t == NPY_FLOAT)
                for (npy_intp i = 0; i < C; i++) d[i] = (double)*(const float *)(src + i * step);
            else
                for (npy_intp i = 0; i < C; i++) d[i] = *(const double *)(src + i * step);
            *out = r;
            return 0;
        }
    }
    PyArrayObject *a = bn_as_array(obj, name);
    if (a == NULL) return -1;
    if (bn_classify_dtype(PyArray_DESCR(a), name, &w, &r) < 0 || bn_check_length(a, name, C, of) < 0) {
        Py_DECREF(a);
        return -1;
    }
    *out = (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(NPY_DOUBLE),
                                              NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    Py_DECREF(a);
    return *out ? 0 : -1;
}

int bn_running_stat(PyObject *obj, const char *name, npy_intp C, const char *of, PyArrayObject **out)
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
    if (bn_check_length(a, name, C, of) < 0) return -1;
    if (!PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s is read-only, but it is updated in place", name);
        return -1;
    }
    Py_INCREF(a);
    *out = a;
    return 0;
}

/* Portable byte reversal (no compiler builtins), for running statistics in non-native byte order. */
static void reverse_bytes(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n / 2; i++) {
        unsigned char t = p[i];
        p[i] = p[n - 1 - i];
        p[n - 1 - i] = t;
    }
}

void bn_update_running(PyArrayObject *r, const double *batch, double divisor, double momentum)
{
    npy_intp C = PyArray_DIM(r, 0), stride = PyArray_STRIDE(r, 0);
    char *p = PyArray_BYTES(r);
    const int swap = !PyArray_ISNOTSWAPPED(r), single = PyArray_TYPE(r) == NPY_FLOAT;
    if (!swap && PyArray_ISALIGNED(r) && stride == (single ? (npy_intp)sizeof(float) : (npy_intp)sizeof(double))) {
        if (single)
            bn_update_running_f32((float *)p, batch, divisor, momentum, C);
        else
            bn_update_running_f64((double *)p, batch, divisor, momentum, C);
        return;
    }
    for (npy_intp c = 0; c < C; c++, p += stride) {
        const double b = batch[c] / divisor;
        if (single) {
            float v;
            memcpy(&v, p, sizeof v);
            if (swap) reverse_bytes((unsigned char *)&v, sizeof v);
            v = (float)((1.0 - momentum) * (double)v + momentum * b);
            if (swap) reverse_bytes((unsigned char *)&v, sizeof v);
            memcpy(p, &v, sizeof v);
        } else {
            double v;
            memcpy(&v, p, sizeof v);
            if (swap) reverse_bytes((unsigned char *)&v, sizeof v);
            v = (1.0 - momentum) * v + momentum * b;
            if (swap) reverse_bytes((unsigned char *)&v, sizeof v);
            memcpy(p, &v, sizeof v);
        }
    }
}

int bn_parse_stats_dtype(PyObject *obj, int deflt, int *typenum)
{
    PyArray_Descr *d = NULL;
    *typenum = deflt;
    if (obj == NULL || obj == Py_None) return 0;
    if (!PyArray_DescrConverter2(obj, &d) || d == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "stats_dtype must be None or a floating-point dtype, got %.200R", obj);
        return -1;
    }
    int t = d->type_num;
    Py_DECREF(d);
    if (t != NPY_HALF && t != NPY_FLOAT && t != NPY_DOUBLE) {
        PyErr_Format(PyExc_TypeError, "stats_dtype must be None, float16, float32 or float64, got %.200R", obj);
        return -1;
    }
    *typenum = t;
    return 0;
}

PyObject *bn_quiet_begin(void)
{
    PyObject *np = PyImport_ImportModule("numpy"), *errstate = NULL, *kw = NULL, *noargs = NULL, *ctx = NULL;
    if (np == NULL) return NULL;
    if ((errstate = PyObject_GetAttrString(np, "errstate")) && (kw = Py_BuildValue("{s:s}", "all", "ignore")) &&
        (noargs = PyTuple_New(0)))
        ctx = PyObject_Call(errstate, noargs, kw);
    Py_DECREF(np); Py_XDECREF(errstate); Py_XDECREF(kw); Py_XDECREF(noargs);
    if (ctx == NULL) return NULL;
    PyObject *entered = PyObject_CallMethod(ctx, "__enter__", NULL);
    if (entered == NULL) { Py_DECREF(ctx); return NULL; }
    Py_DECREF(entered);
    return ctx;
}

int bn_quiet_end(PyObject *ctx)
{
    if (ctx == NULL) return 0;
    /* keep an error already set by the guarded work */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethod(ctx, "__exit__", "OOO", Py_None, Py_None, Py_None);
    Py_DECREF(ctx);
    if (type) { Py_XDECREF(r); PyErr_Restore(type, value, tb); return -1; }
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

PyObject *bn_cast_vector(PyArrayObject *v, int typenum)
{
    if (PyArray_TYPE(v) == typenum) {
        Py_INCREF(v);
        return (PyObject *)v;
    }
    /* float64 statistics or gradients narrowed: values out of range become +-inf, as in any IEEE cast,
     * without NumPy's overflow warning (which `-W error` would turn into an exception after `out` was
     * already written). To float32, the common case, a plain C conversion does that (C11 Annex F) and
     * costs nothing; entering numpy.errstate costs microseconds a call, which small tensors notice. */
    if (typenum == NPY_FLOAT && PyArray_TYPE(v) == NPY_DOUBLE && PyArray_NDIM(v) == 1 &&
        PyArray_IS_C_CONTIGUOUS(v)) {
        npy_intp n = PyArray_DIM(v, 0);
        PyArrayObject *r = bn_new_array(1, &n, NPY_FLOAT, 0);
        if (r == NULL) return NULL;
        bn_narrow_f32((const double *)PyArray_DATA(v), (float *)PyArray_DATA(r), n);
        return (PyObject *)r;
    }
    PyObject *quiet = bn_quiet_begin();
    if (quiet == NULL) return NULL;
    PyObject *r = PyArray_CastToType(v, PyArray_DescrFromType(typenum), 0);
    if (bn_quiet_end(quiet) < 0) Py_CLEAR(r);
    return r;
}

/* NumPy's allocator for the arrays bn_new_array takes from the kernels' block pool (batchnorm.h). The
 * arrays own their data as any array does (base None, resizable); NumPy frees it through the handler
 * they were made with, which gives the block back. */
static void *pool_malloc(void *ctx, size_t size)
{
    (void)ctx;
    return bn_block_take(size ? size : 1);
}

static void *pool_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    if (elsize && nelem > (size_t)-1 / elsize) return NULL;
    const size_t size = nelem * elsize > 0 ? nelem * elsize : 1;
    void *p = bn_block_take(size);
    if (p) memset(p, 0, size);
    return p;
}

static void *pool_realloc(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    return bn_block_resize(ptr, size ? size : 1);
}

static void pool_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx; (void)size;
    bn_block_give(ptr);
}

static PyDataMem_Handler pool_handler = {
    "batchnorm_block_pool", 1, {NULL, pool_malloc, pool_calloc, pool_realloc, pool_free}};

PyArrayObject *bn_new_array(int nd, const npy_intp *shape, int typenum, int zeros)
{
    static PyObject *handler = NULL; /* a capsule of pool_handler, made once (the GIL is held) */
    double bytes = typenum == NPY_DOUBLE ? 8 : typenum == NPY_FLOAT ? 4 : typenum == NPY_HALF ? 2 : 0;
    for (int i = 0; i < nd; i++) bytes *= (double)shape[i];
#ifdef Py_GIL_DISABLED
    const int pooled = 0; /* the handler capsule is made lazily under the GIL */
#else
    /* large zeroed arrays keep calloc's fresh zero pages: a kept block would be zeroed by hand */
    const int pooled = bytes >= (double)BN_BLOCK_MIN_BYTES && (!zeros || bytes <= (double)BN_BLOCK_MAX_BYTES);
#endif
    PyObject *old = NULL;
    if (pooled) {
        if (handler == NULL && !(handler = PyCapsule_New(&pool_handler, "mem_handler", NULL))) return NULL;
        if (!(old = PyDataMem_SetHandler(handler))) return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)(zeros ? PyArray_ZEROS(nd, (npy_intp *)shape, typenum, 0)
                                               : PyArray_SimpleNew(nd, (npy_intp *)shape, typenum));
    if (pooled) {
        PyObject *back = PyDataMem_SetHandler(old);
        Py_DECREF(old);
        if (back == NULL) { Py_XDECREF(a); return NULL; }
        Py_DECREF(back);
    }
    return a;
}

PyArrayObject *bn_new_vector(npy_intp C)
{
    return bn_new_array(1, &C, NPY_DOUBLE, 1);
}

PyObject *bn_kernel_failed(int status)
{
    (void)status; /* BN_ENOMEM is the only failure */
    return PyErr_NoMemory();
}

int bn_parse_activation(PyObject *obj, int *relu)
{
    *relu = 0;
    if (obj == NULL || obj == Py_None) return 0;
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "activation must be None or 'relu', got %.200R", obj);
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(obj, "relu") != 0) {
        PyErr_Format(PyExc_ValueError, "activation must be None or 'relu', got %.200R", obj);
        return -1;
    }
    *relu = 1;
    return 0;
}
