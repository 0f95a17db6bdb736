/*
 * _module.c - the entry points of batchnorm._core and the module definition.
 *
 * Each entry point parses its arguments, validates all of them (nothing is mutated before every check
 * has passed) with the steps of _args.c and _layout.c, releases the GIL around one kernel call, and only
 * then writes results the caller can see (out, running statistics).
 */
#define BN_BINDING_MAIN
#include "_binding.h" /* Python.h first, as Python requires */
#include <math.h>
#include <string.h>

/* One kernel call on x's work type; the data pointers are void * from PyArray_DATA. */
#define BN_KERNEL(work, fn, ...) ((work) == NPY_FLOAT ? fn##_f32(__VA_ARGS__) : fn##_f64(__VA_ARGS__))
#define DATA(a) PyArray_DATA(a)
#define DDATA(a) ((a) ? (const double *)PyArray_DATA(a) : NULL)

/* The per-channel vectors of x, in order, each as contiguous float64 (C,) (None: NULL). */
static int channel_vectors(const bn_input *in, int n, const char *const *names, PyObject *const *objs,
                           PyArrayObject **out)
{
    for (int i = 0; i < n; i++) out[i] = NULL;
    for (int i = 0; i < n; i++)
        if (bn_channel_vector(objs[i], names[i], in->L.dims.C, in->of, &out[i]) < 0) return -1;
    return 0;
}

static int detach_all(int n, PyArrayObject **v, PyArrayObject *target)
{
    for (int i = 0; i < n; i++)
        if (bn_detach_from(&v[i], target) < 0) return -1;
    return 0;
}

static void clear_all(int n, PyArrayObject **v)
{
    for (int i = 0; i < n; i++) Py_CLEAR(v[i]);
}

static int required(PyObject *const *objs, const char *const *names, int n, const char *why)
{
    for (int i = 0; i < n; i++)
        if (objs[i] == Py_None) {
            PyErr_Format(PyExc_TypeError, "%s is required%s, got None", names[i], why);
            return -1;
        }
    return 0;
}

/* One value per channel has no variance to normalize by (an empty batch is fine: nothing to normalize). */
static int check_training_count(const bn_input *in)
{
    char b1[200];
    if ((double)in->L.dims.N * (double)in->L.dims.S != 1 || in->L.dims.C == 0) return 0;
    SHAPE_OF(b1, in->arr);
    PyErr_Format(PyExc_ValueError, "Expected more than 1 value per channel when training, got input of "
                 "shape %s with channel axis %d", b1, in->axis);
    return -1;
}

static int nonempty(const bn_input *in)
{
    return PyArray_SIZE(in->arr) != 0;
}

/* The fused epilogue of a forward entry point: activation= (None or "relu") and residual= (None or an
 * array of x's shape, read in x's layout and work type: a copy only when its layout differs). */
static int forward_epilogue(PyObject *act_obj, PyObject *res_obj, const bn_input *in, int *relu,
                            PyArrayObject **res)
{
    *res = NULL;
    if (bn_parse_activation(act_obj, relu) < 0) return -1;
    if (res_obj != NULL && res_obj != Py_None && bn_prepare_like(res_obj, "residual", in, res) < 0) return -1;
    return 0;
}

/* The fused epilogue of backward (activation=, residual=, y=, beta=), its arrays in x's layout, and the
 * d_residual output. */
typedef struct {
    int relu, want_dres;
    PyArrayObject *res, *ya, *beta;   /* the residual, y, beta (float64 (C,)): each NULL when not given */
    PyArrayObject *dres_r, *dres_t;   /* d_residual: the result and the array the kernel writes */
} bwd_epilogue;

static void bwd_epilogue_clear(bwd_epilogue *e)
{
    Py_CLEAR(e->res); Py_CLEAR(e->ya); Py_CLEAR(e->beta); Py_CLEAR(e->dres_r); Py_CLEAR(e->dres_t);
}

/* The checks that need no array, made before x is read. */
static int bwd_epilogue_flags(PyObject *act_obj, PyObject *y_obj, PyObject *beta_obj, int *relu)
{
    if (bn_parse_activation(act_obj, relu) < 0) return -1;
    const int has_y = y_obj != NULL && y_obj != Py_None, has_beta = beta_obj != NULL && beta_obj != Py_None;
    if (!*relu && (has_y || has_beta)) {
        PyErr_SetString(PyExc_ValueError, "y and beta locate the ReLU of a fused forward: they need "
                        "activation='relu'");
        return -1;
    }
    if (*relu && has_y == has_beta) {
        PyErr_SetString(PyExc_ValueError, has_y ? "activation='relu' takes one of y and beta, not both"
                        : "activation='relu' needs the forward's output y=, or its beta= to recompute where "
                          "the ReLU was active");
        return -1;
    }
    return 0;
}

/* residual: None/False (no d_residual), True, or the residual array; then y or beta. */
static int bwd_epilogue_arrays(PyObject *act_obj, PyObject *res_obj, PyObject *y_obj, PyObject *beta_obj,
                               const bn_input *in, bwd_epilogue *e)
{
    memset(e, 0, sizeof *e);
    if (bwd_epilogue_flags(act_obj, y_obj, beta_obj, &e->relu) < 0) return -1;
    if (res_obj != NULL && res_obj != Py_None) {
        if (PyBool_Check(res_obj) || PyArray_IsScalar(res_obj, Bool)) {
            e->want_dres = PyObject_IsTrue(res_obj);
        } else {
            e->want_dres = 1;
            if (bn_prepare_like(res_obj, "residual", in, &e->res) < 0) return -1;
        }
    }
    if (y_obj != NULL && y_obj != Py_None && bn_prepare_like(y_obj, "y", in, &e->ya) < 0) return -1;
    if (beta_obj != NULL && beta_obj != Py_None &&
        bn_channel_vector(beta_obj, "beta", in->L.dims.C, in->of, &e->beta) < 0)
        return -1;
    if (e->beta && e->want_dres && e->res == NULL) {
        PyErr_SetString(PyExc_ValueError, "recomputing the ReLU mask from beta needs the residual array itself: "
                        "pass residual=<the array the forward added>, or y=");
        return -1;
    }
    return 0;
}

/* After dx's output: d_residual's, and beta kept apart from dx's target. */
static int bwd_epilogue_outputs(const bn_input *in, bwd_epilogue *e, PyArrayObject *target)
{
    if (bn_detach_from(&e->beta, target) < 0) return -1;
    return e->want_dres ? bn_prepare_output(NULL, in, NULL, NULL, NULL, &e->dres_r, &e->dres_t) : 0;
}

/* The array dx's output must not overlap but exactly: the one the kernel reads beside x and dy. */
static PyArrayObject *bwd_epilogue_input(const bwd_epilogue *e)
{
    return e->ya ? e->ya : e->res;
}

#define CHUNK(arr, off) ((void *)((char *)PyArray_DATA(arr) + (off) * PyArray_ITEMSIZE(arr)))

/* The kernel's view of the epilogue, for the values from flat offset `off` of x's layout on. */
static bn_grad_epilogue bwd_epilogue_kernel(const bwd_epilogue *e, npy_intp off)
{
    bn_grad_epilogue ep = {!e->relu ? BN_MASK_NONE : e->ya ? BN_MASK_Y : BN_MASK_RECOMPUTE,
                           e->ya ? CHUNK(e->ya, off) : NULL, DDATA(e->beta), e->res ? CHUNK(e->res, off) : NULL,
                           e->relu && e->dres_t ? CHUNK(e->dres_t, off) : NULL};
    return ep;
}

/* After the kernel: d_residual is dy itself without a ReLU (a copy: the caller's dy stays theirs). */
static int bwd_epilogue_finish(bwd_epilogue *e, PyArrayObject *dy)
{
    if (!e->dres_t) return 0;
    if (!e->relu && PyArray_CopyInto(e->dres_t, dy) < 0) return -1;
    return bn_finish_output(e->dres_r, e->dres_t);
}

/* The backward's return value (a new reference, or NULL with an error set): (dx, dgamma, dbeta), and
 * d_residual after them when the epilogue makes one (e may be NULL). Sums over a whole batch overflow
 * float16 easily: those of float16 input come back in float32. */
static PyObject *backward_results(const bn_input *in, PyArrayObject *result, PyArrayObject *target,
                                  PyArrayObject *dgamma, PyArrayObject *dbeta, bwd_epilogue *e, PyArrayObject *dy)
{
    const int grad_type = in->result == NPY_HALF ? NPY_FLOAT : in->result;
    PyObject *dgamma_r = NULL, *dbeta_r = NULL, *ret = NULL;
    if ((dgamma_r = bn_cast_vector(dgamma, grad_type)) && (dbeta_r = bn_cast_vector(dbeta, grad_type)) &&
        bn_finish_output(result, target) == 0 && (!e || bwd_epilogue_finish(e, dy) == 0))
        ret = e && e->want_dres ? Py_BuildValue("(OOOO)", result, dgamma_r, dbeta_r, e->dres_r)
                                : Py_BuildValue("(OOO)", result, dgamma_r, dbeta_r);
    Py_XDECREF(dgamma_r);
    Py_XDECREF(dbeta_r);
    return ret;
}

/* ------------------------------------------------------------------------------------------------ */
/* Ghost Batch Normalization (Hoffer et al., 2017): forward_train and backward per chunk of          */
/* ghost_batch_size consecutive samples along axis 0, each chunk a contiguous sub-block of the       */
/* (N, C, S) view, run by the ordinary kernels one chunk after another.                              */

/* ghost_batch_size: None (or absent) gives 0, "off"; else an integer >= 1. */
static int parse_ghost(PyObject *obj, npy_intp *g)
{
    *g = 0;
    if (obj == NULL || obj == Py_None) return 0;
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "ghost_batch_size must be None or a positive integer, got %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t v = PyNumber_AsSsize_t(obj, NULL); /* saturates: huge means one chunk */
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 1) {
        PyErr_Format(PyExc_ValueError, "ghost_batch_size must be None or a positive integer, got %R", obj);
        return -1;
    }
    *g = (npy_intp)v;
    return 0;
}

/* The chunks of g samples are sub-blocks of the kernels' (N, C, S) view when axis 0 is outermost in memory
 * (unit axes take no memory); otherwise (x.T, Fortran order) x is copied to C order once, as any layout
 * the kernels cannot index is. Axis 0 as the channel axis has no samples to split: refused. *rows: the
 * kernels' rows (of C * S values) per sample. */
static int ghost_layout(bn_input *in, npy_intp g, npy_intp *rows)
{
    const npy_intp *shape = PyArray_DIMS(in->arr);
    const int nd = PyArray_NDIM(in->arr);
    if (in->axis == 0) {
        PyErr_Format(PyExc_ValueError, "ghost_batch_size=%ld splits axis 0 into ghost batches, but axis 0 is "
                     "the channel axis here", (long)g);
        return -1;
    }
    int outermost = 1;
    for (int j = 0; j < nd; j++) {
        const int ax = in->L.perm[j];
        if (shape[ax] == 1) continue;
        outermost = ax == 0;
        break;
    }
    if (!outermost && PyArray_SIZE(in->arr) != 0) {
        PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(in->arr, NPY_CORDER);
        if (c == NULL) return -1;
        Py_SETREF(in->arr, c);
        ptrdiff_t N = 1, S = 1;
        for (int i = 0; i < nd; i++) {
            in->L.perm[i] = i;
            if (i < in->axis) N *= shape[i];
            if (i > in->axis) S *= shape[i];
        }
        in->L.dims.N = N; in->L.dims.S = S;
    }
    *rows = shape[0] ? in->L.dims.N / shape[0] : 0;
    return 0;
}

/* Chunks of x's samples: K of them, all of g samples but the last (n0 - (K - 1) g). */
typedef struct {
    npy_intp n0, g, K, rows;
} ghost_chunks;

static npy_intp ghost_samples(const ghost_chunks *gc, npy_intp k)
{
    return k + 1 < gc->K ? gc->g : gc->n0 - (gc->K - 1) * gc->g;
}

static int ghost_setup(bn_input *in, npy_intp g, ghost_chunks *gc)
{
    gc->g = g;
    gc->n0 = PyArray_DIM(in->arr, 0);
    gc->K = (gc->n0 + g - 1) / g;
    return ghost_layout(in, g, &gc->rows);
}

/* A chunk with a single value per channel has no variance: forward_train's error, saying which chunk. */
static int ghost_check_counts(const bn_input *in, const ghost_chunks *gc)
{
    char b1[200];
    if (in->L.dims.C == 0) return 0;
    for (npy_intp k = 0; k < gc->K; k++)
        if ((double)ghost_samples(gc, k) * (double)gc->rows * (double)in->L.dims.S == 1) {
            SHAPE_OF(b1, in->arr);
            PyErr_Format(PyExc_ValueError, "Expected more than 1 value per channel when training, got a ghost "
                         "batch of 1 value per channel (ghost batch %ld of input of shape %s with channel axis "
                         "%d, ghost_batch_size=%ld)", (long)k, b1, in->axis, (long)gc->g);
            return -1;
        }
    return 0;
}

/* Per-chunk statistics given to backward: (K, C), as float64 C-contiguous. */
static int ghost_stats_arg(PyObject *obj, const char *name, const bn_input *in, const ghost_chunks *gc,
                           PyArrayObject **out)
{
    char b1[200];
    int w, r;
    *out = NULL;
    PyArrayObject *a = bn_as_array(obj, name);
    if (a == NULL) return -1;
    if (bn_classify_dtype(PyArray_DESCR(a), name, &w, &r) < 0) goto fail;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) != gc->K || PyArray_DIM(a, 1) != in->L.dims.C) {
        SHAPE_OF(b1, a);
        PyErr_Format(PyExc_ValueError, "%s has shape %s, expected (%ld, %ld): one row per ghost batch (x has %ld "
                     "samples, ghost_batch_size=%ld) and one column per channel, as forward_train returns it",
                     name, b1, (long)gc->K, (long)in->L.dims.C, (long)gc->n0, (long)gc->g);
        goto fail;
    }
    *out = (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(NPY_DOUBLE),
                                              NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
fail:
    Py_DECREF(a);
    return *out ? 0 : -1;
}

static PyArrayObject *ghost_matrix(npy_intp K, npy_intp C)
{
    npy_intp dims[2] = {K, C};
    return (PyArrayObject *)PyArray_ZEROS(2, dims, NPY_DOUBLE, 0);
}

static PyObject *ghost_forward_train(PyObject *x_obj, PyObject *const *vobj, PyObject *rm_obj, PyObject *rv_obj,
                                     double momentum, double eps, PyObject *axis_obj, PyObject *out_obj,
                                     PyObject *sd_obj, PyObject *act_obj, PyObject *res_obj, npy_intp g)
{
    static const char *const vnames[] = {"gamma", "beta"};
    bn_input in = {0};
    ghost_chunks gc;
    PyArrayObject *vec[2] = {NULL, NULL}, *rm = NULL, *rv = NULL, *result = NULL, *target = NULL, *mean = NULL,
                  *m2 = NULL, *invstd = NULL, *avg_mean = NULL, *avg_var = NULL, *res = NULL;
    PyObject *mean_r = NULL, *invstd_r = NULL, *ret = NULL;
    int status = BN_OK, stats_type, relu = 0;

    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const npy_intp C = in.L.dims.C;
    if (ghost_setup(&in, g, &gc) < 0 || ghost_check_counts(&in, &gc) < 0 ||
        bn_parse_stats_dtype(sd_obj, in.result, &stats_type) < 0 || channel_vectors(&in, 2, vnames, vobj, vec) < 0 ||
        bn_running_stat(rm_obj, "running_mean", C, in.of, &rm) < 0 ||
        bn_running_stat(rv_obj, "running_var", C, in.of, &rv) < 0 ||
        forward_epilogue(act_obj, res_obj, &in, &relu, &res) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, res, NULL, &result, &target) < 0 || detach_all(2, vec, target) < 0)
        goto fail;
    if (!(mean = ghost_matrix(gc.K, C)) || !(m2 = ghost_matrix(gc.K, C)) || !(invstd = ghost_matrix(gc.K, C)) ||
        !(avg_mean = bn_new_vector(C)) || !(avg_var = bn_new_vector(C)))
        goto fail;
    if (nonempty(&in)) {
        const npy_intp block = gc.rows * C * in.L.dims.S; /* values per sample */
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp k = 0; k < gc.K && status == BN_OK; k++) {
            const bn_dims d = {ghost_samples(&gc, k) * gc.rows, C, in.L.dims.S};
            const npy_intp off = k * gc.g * block;
            double *pm = (double *)DATA(mean) + k * C, *pm2 = (double *)DATA(m2) + k * C;
            const bn_epilogue ep = {relu, res ? CHUNK(res, off) : NULL};
            status = BN_KERNEL(in.work, bn_forward_train, CHUNK(in.arr, off), CHUNK(target, off), d,
                               DDATA(vec[0]), DDATA(vec[1]), eps, pm, pm2, (double *)DATA(invstd) + k * C, &ep,
                               bn_get_num_threads());
        }
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    if (!(mean_r = bn_cast_vector(mean, stats_type)) || !(invstd_r = bn_cast_vector(invstd, stats_type))) goto fail;
    if (bn_finish_output(result, target) < 0) goto fail;
    /* Nothing below can fail. The running statistics move once per call, towards the average over the
     * chunks of their means and of their unbiased variances (Keras's virtual_batch_size rule), summed in
     * chunk order. */
    if ((rm || rv) && gc.K > 0 && C > 0 && nonempty(&in)) {
        double *am = (double *)DATA(avg_mean), *av = (double *)DATA(avg_var);
        const double *pm = DDATA(mean), *pm2 = DDATA(m2);
        for (npy_intp k = 0; k < gc.K; k++) {
            const double unbias = (double)ghost_samples(&gc, k) * (double)gc.rows * (double)in.L.dims.S - 1;
            for (npy_intp c = 0; c < C; c++) {
                am[c] += pm[k * C + c];
                av[c] += pm2[k * C + c] / unbias;
            }
        }
        if (rm) bn_update_running(rm, am, (double)gc.K, momentum);
        if (rv) bn_update_running(rv, av, (double)gc.K, momentum);
    }
    ret = Py_BuildValue("(OOO)", result, mean_r, invstd_r);
fail:
    bn_input_clear(&in);
    clear_all(2, vec);
    Py_XDECREF(rm); Py_XDECREF(rv); Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(mean); Py_XDECREF(m2);
    Py_XDECREF(invstd); Py_XDECREF(avg_mean); Py_XDECREF(avg_var); Py_XDECREF(mean_r); Py_XDECREF(invstd_r);
    Py_XDECREF(res);
    return ret;
}

static PyObject *ghost_backward(PyObject *dy_obj, PyObject *x_obj, PyObject *const *v, int training,
                                PyObject *axis_obj, PyObject *out_obj, PyObject *act_obj, PyObject *res_obj,
                                PyObject *y_obj, PyObject *beta_obj, npy_intp g)
{
    static const char *const gnames[] = {"gamma"};
    bn_input in = {0};
    bwd_epilogue e = {0};
    ghost_chunks gc;
    PyArrayObject *dy = NULL, *mean = NULL, *invstd = NULL, *gamma[1] = {NULL}, *result = NULL, *target = NULL,
                  *dg_parts = NULL, *db_parts = NULL, *dgamma = NULL, *dbeta = NULL;
    PyObject *ret = NULL;
    int status = BN_OK;

    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const npy_intp C = in.L.dims.C;
    if (ghost_setup(&in, g, &gc) < 0 || bn_prepare_like(dy_obj, "dy", &in, &dy) < 0 ||
        bwd_epilogue_arrays(act_obj, res_obj, y_obj, beta_obj, &in, &e) < 0 ||
        ghost_stats_arg(v[0], "mean", &in, &gc, &mean) < 0 || ghost_stats_arg(v[1], "invstd", &in, &gc, &invstd) < 0 ||
        channel_vectors(&in, 1, gnames, &v[2], gamma) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, dy, bwd_epilogue_input(&e), &result, &target) < 0 ||
        bn_detach_from(&mean, target) < 0 || bn_detach_from(&invstd, target) < 0 || detach_all(1, gamma, target) < 0 ||
        bwd_epilogue_outputs(&in, &e, target) < 0)
        goto fail;
    if (!(dg_parts = ghost_matrix(gc.K, C)) || !(db_parts = ghost_matrix(gc.K, C)) || !(dgamma = bn_new_vector(C)) ||
        !(dbeta = bn_new_vector(C)))
        goto fail;
    if (nonempty(&in)) {
        const npy_intp block = gc.rows * C * in.L.dims.S;
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp k = 0; k < gc.K && status == BN_OK; k++) {
            const bn_dims d = {ghost_samples(&gc, k) * gc.rows, C, in.L.dims.S};
            const npy_intp off = k * gc.g * block;
            const bn_grad_epilogue ep = bwd_epilogue_kernel(&e, off);
            status = BN_KERNEL(in.work, bn_backward, CHUNK(dy, off), CHUNK(in.arr, off), CHUNK(target, off), d,
                               DDATA(mean) + k * C, DDATA(invstd) + k * C, DDATA(gamma[0]), training,
                               (double *)DATA(dg_parts) + k * C, (double *)DATA(db_parts) + k * C, &ep,
                               bn_get_num_threads());
        }
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    /* the parameter gradients are the chunks' sums, added in chunk order (the same bits every time) */
    double *pg = (double *)DATA(dgamma), *pb = (double *)DATA(dbeta);
    for (npy_intp k = 0; k < gc.K; k++)
        for (npy_intp c = 0; c < C; c++) {
            pg[c] += DDATA(dg_parts)[k * C + c];
            pb[c] += DDATA(db_parts)[k * C + c];
        }
    ret = backward_results(&in, result, target, dgamma, dbeta, &e, dy);
fail:
    bn_input_clear(&in);
    bwd_epilogue_clear(&e);
    clear_all(1, gamma);
    Py_XDECREF(dy); Py_XDECREF(mean); Py_XDECREF(invstd); Py_XDECREF(result); Py_XDECREF(target);
    Py_XDECREF(dg_parts); Py_XDECREF(db_parts); Py_XDECREF(dgamma); Py_XDECREF(dbeta);
    return ret;
}

/* ------------------------------------------------------------------------------------------------ */
/* Masked BN: forward_train, batch_stats and backward over the positions a boolean mask marks as     */
/* real data. x is read in place, in whatever layout bn_prepare_input found; the mask (no channel    */
/* axis) is broadcast into a new C-contiguous bool array laid out in x's memory order without the    */
/* channel axis, so that the kernels find position (n, s) of the (N, C, S) view at mask[n * S + s]. */

/* The mask as the kernels read it (*out, a new bool array of x.size / C entries) and its count of True
 * entries. Only dtype bool is accepted: integer 0/1 masks are refused rather than guessed at (sequence
 * lengths passed by mistake would otherwise pass as a mask). */
static int masked_prepare(PyObject *obj, const bn_input *in, PyArrayObject **out, int64_t *count)
{
    char b1[200], b2[200];
    PyArrayObject *m = NULL, *flat = NULL, *view = NULL;
    const int nd = PyArray_NDIM(in->arr), axis = in->axis;
    npy_intp want[NPY_MAXDIMS], pshape[NPY_MAXDIMS], permute[NPY_MAXDIMS];
    *out = NULL;
    for (int i = 0, k = 0; i < nd; i++)
        if (i != axis) want[k++] = PyArray_DIM(in->arr, i);
    bn_shape_str(b2, sizeof b2, nd - 1, want);
    if (!(m = bn_as_array(obj, "mask"))) return -1;
    if (PyArray_TYPE(m) != NPY_BOOL) {
        PyErr_Format(PyExc_TypeError, "mask must be a boolean array (True where a position is real data), got "
                     "dtype %S; use e.g. mask.astype(bool)", (PyObject *)PyArray_DESCR(m));
        goto fail;
    }
    int fits = PyArray_NDIM(m) <= nd - 1;
    for (int j = 1; fits && j <= PyArray_NDIM(m); j++) {
        const npy_intp have = PyArray_DIM(m, PyArray_NDIM(m) - j), need = want[nd - 1 - j];
        fits = have == need || have == 1;
    }
    if (!fits) {
        SHAPE_OF(b1, m);
        PyErr_Format(PyExc_ValueError, "mask has shape %s, expected a shape broadcastable to %s (the shape of x "
                     "without its channel axis %d)", b1, b2, axis);
        goto fail;
    }
    /* pshape: x's dimensions in memory order without the channel axis; permute takes the logical axes
     * (x's without the channel axis) to their place in that order */
    for (int j = 0, k = 0; j < nd; j++) {
        const int ax = in->L.perm[j];
        if (ax == axis) continue;
        pshape[k] = PyArray_DIM(in->arr, ax);
        permute[ax < axis ? ax : ax - 1] = k;
        k++;
    }
    if (!(flat = (PyArrayObject *)PyArray_SimpleNew(nd - 1, pshape, NPY_BOOL))) goto fail;
    PyArray_Dims pd = {permute, nd - 1};
    if (!(view = (PyArrayObject *)PyArray_Transpose(flat, &pd)) || PyArray_CopyInto(view, m) < 0) goto fail;
    Py_DECREF(view);
    Py_DECREF(m);
    *count = bn_mask_count((const uint8_t *)PyArray_DATA(flat), PyArray_SIZE(flat));
    *out = flat;
    return 0;
fail:
    Py_XDECREF(m); Py_XDECREF(flat); Py_XDECREF(view);
    return -1;
}

static int has_arg(PyObject *obj)
{
    return obj != NULL && obj != Py_None;
}

/* The combinations not supported (yet) with a mask. */
static int masked_refuse(const char *what, int given)
{
    if (!given) return 0;
    PyErr_Format(PyExc_ValueError, "mask cannot be combined with %s (not supported)", what);
    return -1;
}

static PyObject *masked_forward_train(PyObject *x_obj, PyObject *const *vobj, PyObject *rm_obj, PyObject *rv_obj,
                                      double momentum, double eps, PyObject *axis_obj, PyObject *out_obj,
                                      PyObject *sd_obj, PyObject *mask_obj)
{
    static const char *const vnames[] = {"gamma", "beta"};
    char b1[200], b2[200];
    bn_input in = {0};
    PyArrayObject *mask = NULL, *vec[2] = {NULL, NULL}, *rm = NULL, *rv = NULL, *result = NULL, *target = NULL,
                  *mean = NULL, *m2 = NULL, *invstd = NULL;
    PyObject *mean_r = NULL, *invstd_r = NULL, *ret = NULL;
    int64_t count = 0;
    int status = BN_OK, stats_type;

    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const npy_intp C = in.L.dims.C;
    if (masked_prepare(mask_obj, &in, &mask, &count) < 0) goto fail;
    if (nonempty(&in) && count < 2) {
        SHAPE_OF(b1, mask); SHAPE_OF(b2, in.arr);
        PyErr_Format(PyExc_ValueError, "Expected more than 1 value per channel when training, got a mask with %lld "
                     "True position%s (mask broadcast to %s, x of shape %s with channel axis %d)", (long long)count,
                     count == 1 ? "" : "s", b1, b2, in.axis);
        goto fail;
    }
    if (bn_parse_stats_dtype(sd_obj, in.result, &stats_type) < 0 || channel_vectors(&in, 2, vnames, vobj, vec) < 0 ||
        bn_running_stat(rm_obj, "running_mean", C, in.of, &rm) < 0 ||
        bn_running_stat(rv_obj, "running_var", C, in.of, &rv) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, NULL, NULL, &result, &target) < 0 || detach_all(2, vec, target) < 0)
        goto fail;
    if (!(mean = bn_new_vector(C)) || !(m2 = bn_new_vector(C)) || !(invstd = bn_new_vector(C))) goto fail;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_masked_forward_train, DATA(in.arr), DATA(mask), DATA(target), in.L.dims,
                           DDATA(vec[0]), DDATA(vec[1]), eps, DATA(mean), DATA(m2), DATA(invstd),
                           bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    if (!(mean_r = bn_cast_vector(mean, stats_type)) || !(invstd_r = bn_cast_vector(invstd, stats_type))) goto fail;
    if (bn_finish_output(result, target) < 0) goto fail;
    /* Nothing below can fail. The running statistics see only the real positions: count = the mask's. */
    if (rm && nonempty(&in)) bn_update_running(rm, DDATA(mean), 1.0, momentum);
    if (rv && nonempty(&in)) bn_update_running(rv, DDATA(m2), (double)count - 1, momentum);
    ret = Py_BuildValue("(OOO)", result, mean_r, invstd_r);
fail:
    bn_input_clear(&in);
    clear_all(2, vec);
    Py_XDECREF(mask); Py_XDECREF(rm); Py_XDECREF(rv); Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(mean);
    Py_XDECREF(m2); Py_XDECREF(invstd); Py_XDECREF(mean_r); Py_XDECREF(invstd_r);
    return ret;
}

static PyObject *masked_batch_stats(PyObject *x_obj, PyObject *axis_obj, PyObject *mask_obj)
{
    bn_input in = {0};
    PyArrayObject *mask = NULL, *mean = NULL, *m2 = NULL;
    PyObject *ret = NULL;
    int64_t count = 0;
    int status = BN_OK;

    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const npy_intp C = in.L.dims.C;
    if (masked_prepare(mask_obj, &in, &mask, &count) < 0) goto fail;
    if (!(mean = bn_new_vector(C)) || !(m2 = bn_new_vector(C))) goto fail;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_masked_batch_stats, DATA(in.arr), DATA(mask), in.L.dims, DATA(mean),
                           DATA(m2), bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    /* an x without channels (C = 0) has no values at all, whatever the mask says */
    ret = Py_BuildValue("(LOO)", C ? (long long)count : 0LL, mean, m2);
fail:
    bn_input_clear(&in);
    Py_XDECREF(mask); Py_XDECREF(mean); Py_XDECREF(m2);
    return ret;
}

static PyObject *masked_backward(PyObject *dy_obj, PyObject *x_obj, PyObject *const *v, int training,
                                 PyObject *axis_obj, PyObject *out_obj, PyObject *mask_obj)
{
    static const char *const vnames[] = {"mean", "invstd", "gamma"};
    bn_input in = {0};
    PyArrayObject *mask = NULL, *dy = NULL, *vec[3] = {NULL, NULL, NULL}, *result = NULL, *target = NULL,
                  *dgamma = NULL, *dbeta = NULL;
    PyObject *ret = NULL;
    int64_t count = 0;
    int status = BN_OK;

    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const npy_intp C = in.L.dims.C;
    if (bn_prepare_like(dy_obj, "dy", &in, &dy) < 0 || masked_prepare(mask_obj, &in, &mask, &count) < 0 ||
        channel_vectors(&in, 3, vnames, v, vec) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, dy, NULL, &result, &target) < 0 || detach_all(3, vec, target) < 0)
        goto fail;
    if (!(dgamma = bn_new_vector(C)) || !(dbeta = bn_new_vector(C))) goto fail;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_masked_backward, DATA(dy), DATA(in.arr), DATA(mask), DATA(target),
                           in.L.dims, DDATA(vec[0]), DDATA(vec[1]), DDATA(vec[2]), training, DATA(dgamma),
                           DATA(dbeta), bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    ret = backward_results(&in, result, target, dgamma, dbeta, NULL, dy);
fail:
    bn_input_clear(&in);
    clear_all(3, vec);
    Py_XDECREF(mask); Py_XDECREF(dy); Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(dgamma);
    Py_XDECREF(dbeta);
    return ret;
}

/* ------------------------------------------------------------------------------------------------ */
/* forward_train                                                                                     */

PyDoc_STRVAR(forward_train_doc,
"forward_train(x, gamma=None, beta=None, *, running_mean=None, running_var=None, momentum=0.1, eps=1e-05, axis=1, out=None, stats_dtype=None, activation=None, residual=None, ghost_batch_size=None, mask=None)\n"
"--\n\n"
"Batch Normalization forward pass in training mode.\n\n"
"Normalizes x with the statistics of the batch itself, per channel:\n"
"``y = gamma * (x - mean) / sqrt(var + eps) + beta``, with the mean and the biased variance taken over\n"
"every axis except ``axis``. It is :func:`batch_stats` followed by :func:`normalize` (and\n"
":func:`update_running_stats`), run as one kernel, with the same bits.\n\n"
"Parameters\n"
"----------\n"
"x : array_like, at least 2-D\n"
"    Input, e.g. (N, C), (N, C, L), (N, C, H, W) or channels-last (N, H, W, C) with ``axis=-1``.\n"
"    float32 and float64 are computed natively; float16 in float32; integers and bool in float64.\n"
"gamma, beta : array_like of shape (C,), optional\n"
"    Scale and shift. None means no scale (1) / no shift (0).\n"
"running_mean, running_var : ndarray of shape (C,), float32 or float64, optional\n"
"    Running estimates, updated in place: ``r = (1 - momentum) * r + momentum * batch``, with the\n"
"    unbiased batch variance ``m2 / (count - 1)`` for ``running_var`` (PyTorch's convention).\n"
"momentum : float, default 0.1\n"
"    Weight of the batch statistic in the running estimates, in [0, 1].\n"
"eps : float, default 1e-5\n"
"    Added to the variance before the square root; must be >= 0.\n"
"axis : int, default 1\n"
"    The channel axis. Use -1 for channels-last data.\n"
"out : ndarray, optional\n"
"    Where to write y: x's shape, the result's dtype, writable. ``out=x`` normalizes in place.\n"
"stats_dtype : dtype, optional\n"
"    dtype of the returned mean and invstd: None (default) gives the result's dtype, as PyTorch does;\n"
"    ``numpy.float64`` gives the statistics exactly as computed (the layers keep those for backward:\n"
"    float32 statistics of float32 data with a large mean cost dx digits).\n"
"activation : None or 'relu', default None\n"
"    A ReLU fused into the pass that writes y: ``y = max(bn(x) + residual, 0)``, evaluated in float64\n"
"    and rounded once (float32 data in row mode: bn(x) in float32 arithmetic, then ``+ residual``\n"
"    rounded again, as NumPy's ``y + r``). NaN stays NaN (as ``np.maximum``).\n"
"residual : array_like, optional\n"
"    Added to the normalized values before the activation (a residual connection); x's shape, any\n"
"    layout (read in place when its memory order is x's, else copied once). ``out`` may be residual.\n"
"ghost_batch_size : int, optional\n"
"    Ghost Batch Normalization: split the batch along axis 0 into consecutive ghost batches of this many\n"
"    samples (the last may be smaller) and normalize each with its own statistics. mean and invstd are\n"
"    then (K, C), one row per ghost batch; pass them to :func:`backward` with the same\n"
"    ghost_batch_size. The running statistics move once per call, towards the average over the ghost\n"
"    batches of their means and of their unbiased variances (the rule of Keras's virtual_batch_size).\n"
"    None (default) normalizes the batch as a whole.\n"
"mask : array_like of bool, optional\n"
"    Masked BN, for padded sequences and ragged batches: a boolean array broadcastable to x's shape\n"
"    without the channel axis (e.g. (N, L) for (N, C, L) input, or for (N, L, C) with ``axis=-1``), True\n"
"    where a position is real data. The statistics are those of the True positions only, y is 0 at the\n"
"    False ones (whose values are never read: NaN padding is fine), and the running variance is\n"
"    unbiased with the count M of True positions, ``m2 / (M - 1)``. Integer 0/1 masks are refused\n"
"    (TypeError): pass ``mask.astype(bool)``. Not combined with ghost_batch_size, activation or\n"
"    residual. x is not copied; pass mask to :func:`backward` too.\n\n"
"Returns\n"
"-------\n"
"y : ndarray\n"
"    The normalized batch, x's shape, x's dtype (float64 for integer or bool input).\n"
"mean : ndarray of shape (C,)\n"
"    Batch mean per channel ((K, C) with ghost_batch_size).\n"
"invstd : ndarray of shape (C,)\n"
"    ``1 / sqrt(var + eps)`` per channel, with the biased batch variance ((K, C) with\n"
"    ghost_batch_size). Pass mean and invstd to :func:`backward`.\n\n"
"Raises\n"
"------\n"
"TypeError\n"
"    For an unsupported dtype or a non-array argument.\n"
"ValueError\n"
"    For wrong shapes, a bad axis, a single value per channel (in any ghost batch, or fewer than 2 True\n"
"    positions in a mask), eps < 0, momentum outside [0, 1], a read-only ``out`` or running statistic,\n"
"    ghost_batch_size < 1 or with channel axis 0. Nothing is modified when it raises.\n\n"
"Notes\n"
"-----\n"
"Statistics are accumulated in float64, in cached chunks (two passes, or one centred on the running\n"
"mean), merged pairwise, and the work is cut independently of the thread count, so results are\n"
"bit-identical for any number of threads. y is rounded once from float64, except for float32 data\n"
"in row mode (32 or more positions per channel), normalized in float32 arithmetic within about one\n"
"float32 ulp (see the README). An empty batch (N = 0) is accepted, as PyTorch does: y is empty,\n"
"mean and invstd are zeros, and the running statistics are left as they are.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> x = np.array([[1.0, 10.0], [3.0, 30.0]])\n"
">>> y, mean, invstd = bn.forward_train(x, eps=0.0)\n"
">>> y\n"
"array([[-1., -1.],\n"
"       [ 1.,  1.]])\n"
">>> mean\n"
"array([ 2., 20.])\n");

static PyObject *py_forward_train(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "gamma", "beta", "running_mean", "running_var", "momentum", "eps", "axis",
                             "out", "stats_dtype", "activation", "residual", "ghost_batch_size", "mask", NULL};
    static const char *const vnames[] = {"gamma", "beta"};
    PyObject *x_obj, *vobj[2] = {NULL, NULL}, *rm_obj = NULL, *rv_obj = NULL, *mom_obj = NULL, *eps_obj = NULL,
             *axis_obj = NULL, *out_obj = NULL, *sd_obj = NULL, *act_obj = NULL, *res_obj = NULL, *ghost_obj = NULL,
             *mask_obj = NULL;
    bn_input in = {0};
    PyArrayObject *vec[2] = {NULL, NULL}, *rm = NULL, *rv = NULL, *result = NULL, *target = NULL, *mean = NULL,
                  *m2 = NULL, *invstd = NULL, *res = NULL;
    PyObject *mean_r = NULL, *invstd_r = NULL, *ret = NULL;
    double momentum = 0.1, eps = 1e-5;
    int status, stats_type, relu = 0;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO$OOOOOOOOOOO:forward_train", kwlist, &x_obj, &vobj[0],
                                     &vobj[1], &rm_obj, &rv_obj, &mom_obj, &eps_obj, &axis_obj, &out_obj,
                                     &sd_obj, &act_obj, &res_obj, &ghost_obj, &mask_obj))
        return NULL;
    if (bn_parse_momentum(mom_obj, &momentum) < 0 || bn_parse_eps(eps_obj, &eps) < 0) return NULL;
    npy_intp ghost;
    if (parse_ghost(ghost_obj, &ghost) < 0) return NULL;
    if (has_arg(mask_obj))
        return masked_refuse("ghost_batch_size", ghost != 0) < 0 || masked_refuse("activation", has_arg(act_obj)) < 0 ||
               masked_refuse("residual", has_arg(res_obj)) < 0 ? NULL
               : masked_forward_train(x_obj, vobj, rm_obj, rv_obj, momentum, eps, axis_obj, out_obj, sd_obj, mask_obj);
    if (ghost)
        return ghost_forward_train(x_obj, vobj, rm_obj, rv_obj, momentum, eps, axis_obj, out_obj, sd_obj, act_obj,
                                   res_obj, ghost);
    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const npy_intp C = in.L.dims.C;
    const double count = (double)in.L.dims.N * (double)in.L.dims.S;
    if (check_training_count(&in) < 0 || bn_parse_stats_dtype(sd_obj, in.result, &stats_type) < 0 ||
        channel_vectors(&in, 2, vnames, vobj, vec) < 0 ||
        bn_running_stat(rm_obj, "running_mean", C, in.of, &rm) < 0 ||
        bn_running_stat(rv_obj, "running_var", C, in.of, &rv) < 0 ||
        forward_epilogue(act_obj, res_obj, &in, &relu, &res) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, res, NULL, &result, &target) < 0 || detach_all(2, vec, target) < 0)
        goto fail;
    const bn_epilogue ep = {relu, res ? DATA(res) : NULL};
    if (!(mean = bn_new_vector(C)) || !(m2 = bn_new_vector(C)) || !(invstd = bn_new_vector(C))) goto fail;
    status = BN_OK;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_forward_train, DATA(in.arr), DATA(target), in.L.dims, DDATA(vec[0]),
                           DDATA(vec[1]), eps, DATA(mean), DATA(m2), DATA(invstd), &ep, bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    if (!(mean_r = bn_cast_vector(mean, stats_type)) || !(invstd_r = bn_cast_vector(invstd, stats_type))) goto fail;
    if (bn_finish_output(result, target) < 0) goto fail;
    /* Nothing below can fail: the running statistics change only when the call succeeds. */
    if (rm && count > 0) bn_update_running(rm, DDATA(mean), 1.0, momentum);
    if (rv && count > 0) bn_update_running(rv, DDATA(m2), count - 1, momentum);
    ret = Py_BuildValue("(OOO)", result, mean_r, invstd_r);
fail:
    bn_input_clear(&in);
    clear_all(2, vec);
    Py_XDECREF(rm); Py_XDECREF(rv); Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(mean); Py_XDECREF(m2);
    Py_XDECREF(invstd); Py_XDECREF(mean_r); Py_XDECREF(invstd_r); Py_XDECREF(res);
    return ret;
}

/* ------------------------------------------------------------------------------------------------ */
/* batch_stats, merge_stats, update_running_stats                                                    */

PyDoc_STRVAR(batch_stats_doc,
"batch_stats(x, *, axis=1, mask=None)\n"
"--\n\n"
"The statistics phase: per channel, the count, mean and m2 of x's values.\n\n"
"m2 is the sum of squared deviations from the mean, ``sum((x - mean)**2)``, so the biased variance is\n"
"``m2 / count`` and the unbiased one ``m2 / (count - 1)``. They are computed exactly as\n"
":func:`forward_train` computes them (float64, in cached chunks: two passes, or one centred on the\n"
"running mean; merged pairwise), with the same bits. Parts of a batch (one per process, say) are\n"
"combined with :func:`merge_stats`.\n\n"
"Parameters\n"
"----------\n"
"x : array_like, at least 2-D\n"
"    A batch or a part of one; dtypes as in :func:`forward_train`. May be empty (N = 0): then count\n"
"    is 0 and mean and m2 are zeros, a part :func:`merge_stats` skips.\n"
"axis : int, default 1\n"
"    The channel axis.\n"
"mask : array_like of bool, optional\n"
"    Only the True positions count (masked BN; see :func:`forward_train`). Any number of them is\n"
"    accepted, 0 included (a part of pure padding, which :func:`merge_stats` skips).\n\n"
"Returns\n"
"-------\n"
"count : int\n"
"    Values per channel: x.size // C, or the number of True positions of the (broadcast) mask, the\n"
"    same for every channel.\n"
"mean, m2 : ndarray of shape (C,), float64\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`forward_train`.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> count, mean, m2 = bn.batch_stats(np.array([[1.0, 10.0], [3.0, 30.0]]))\n"
">>> count, mean, m2\n"
"(2, array([ 2., 20.]), array([  2., 200.]))\n");

static PyObject *py_batch_stats(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "axis", "mask", NULL};
    PyObject *x_obj, *axis_obj = NULL, *mask_obj = NULL, *ret = NULL;
    bn_input in = {0};
    PyArrayObject *mean = NULL, *m2 = NULL;
    int status = BN_OK;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$OO:batch_stats", kwlist, &x_obj, &axis_obj, &mask_obj))
        return NULL;
    if (has_arg(mask_obj)) return masked_batch_stats(x_obj, axis_obj, mask_obj);
    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const npy_intp C = in.L.dims.C;
    if (!(mean = bn_new_vector(C)) || !(m2 = bn_new_vector(C))) goto fail;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_batch_stats, DATA(in.arr), in.L.dims, DATA(mean), DATA(m2),
                           bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    ret = Py_BuildValue("(LOO)", (long long)in.L.dims.N * (long long)in.L.dims.S, mean, m2);
fail:
    bn_input_clear(&in);
    Py_XDECREF(mean); Py_XDECREF(m2);
    return ret;
}

PyDoc_STRVAR(merge_stats_doc,
"merge_stats(counts, means, m2s)\n"
"--\n\n"
"The merge phase: combine the statistics of K parts of a batch into those of the whole batch.\n\n"
"Parts are merged in order k = 0, 1, ..., K-1 with Chan, Golub and LeVeque's pairwise formula (no\n"
"``E[x^2] - E[x]^2`` cancellation); parts with count 0 are skipped. A part whose mean is +-inf makes the\n"
"merged mean +-inf (NaN for both signs), as ``np.mean``. The same inputs give the same bits,\n"
"always, so processes that merge the same gathered parts hold identical statistics.\n\n"
"Parameters\n"
"----------\n"
"counts : array_like of shape (K,)\n"
"    Values per channel in each part: non-negative integers (integral floats are accepted).\n"
"means, m2s : array_like of shape (K, C)\n"
"    Each part's mean and m2, as :func:`batch_stats` returns them.\n\n"
"Returns\n"
"-------\n"
"count : int\n"
"    The total count.\n"
"mean, m2 : ndarray of shape (C,), float64\n"
"    The merged statistics (zeros when count is 0).\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    For non-numeric or non-integral counts, negative counts, or shapes that do not fit together.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> x = np.arange(10.0).reshape(5, 2)\n"
">>> parts = [bn.batch_stats(x[:2]), bn.batch_stats(x[2:])]\n"
">>> count, mean, m2 = bn.merge_stats([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])\n"
">>> count, mean, m2\n"
"(5, array([4., 5.]), array([40., 40.]))\n");

/* counts as int64 (K,): integers, or floats with integral values; non-negative. */
static PyArrayObject *parse_counts(PyObject *obj)
{
    char b1[200];
    PyArrayObject *a = bn_as_array(obj, "counts"), *r = NULL;
    if (a == NULL) return NULL;
    if (PyArray_NDIM(a) != 1) {
        SHAPE_OF(b1, a);
        PyErr_Format(PyExc_ValueError, "counts must be 1-D (one count per part), got shape %s", b1);
        goto done;
    }
    char kind = PyArray_DESCR(a)->kind;
    if (kind != 'i' && kind != 'u' && kind != 'f') {
        PyErr_Format(PyExc_TypeError, "counts must be integers, got dtype %S", (PyObject *)PyArray_DESCR(a));
        goto done;
    }
    PyArrayObject *f = (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(NPY_DOUBLE),
                                                          NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    if (f == NULL) goto done;
    const double *v = (const double *)PyArray_DATA(f);
    for (npy_intp k = 0; k < PyArray_DIM(f, 0); k++)
        if (!(v[k] >= 0) || v[k] != floor(v[k]) || v[k] > 9.0e15) {
            PyObject *bad = PyFloat_FromDouble(v[k]);
            if (bad) PyErr_Format(PyExc_ValueError, "counts must be non-negative whole numbers below 2**53, "
                                  "got %R at index %ld", bad, (long)k);
            Py_XDECREF(bad);
            Py_DECREF(f);
            goto done;
        }
    double total = 0;
    for (npy_intp k = 0; k < PyArray_DIM(f, 0); k++) total += v[k];
    Py_DECREF(f);
    if (total > 9.0e15) {
        char num[32]; /* PyErr_Format has no %g (Python 3.12 raises SystemError on it) */
        snprintf(num, sizeof num, "%.17g", total);
        PyErr_Format(PyExc_ValueError, "counts add up to more than 2**53 values (%s): the merged count would "
                     "not be exact", num);
        goto done;
    }
    r = (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(NPY_INT64),
                                           NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
done:
    Py_DECREF(a);
    return r;
}

/* A (K, C) float64 C-contiguous matrix of per-part statistics. */
static PyArrayObject *parse_parts(PyObject *obj, const char *name, npy_intp K)
{
    char b1[200];
    int w, r;
    PyArrayObject *a = bn_as_array(obj, name), *res = NULL;
    if (a == NULL) return NULL;
    if (bn_classify_dtype(PyArray_DESCR(a), name, &w, &r) < 0) goto done;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) != K) {
        SHAPE_OF(b1, a);
        PyErr_Format(PyExc_ValueError, "%s has shape %s, expected (%ld, C): one row per part (counts has %ld)",
                     name, b1, (long)K, (long)K);
        goto done;
    }
    res = (PyArrayObject *)PyArray_FromArray(a, PyArray_DescrFromType(NPY_DOUBLE),
                                             NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
done:
    Py_DECREF(a);
    return res;
}

static PyObject *py_merge_stats(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"counts", "means", "m2s", NULL};
    PyObject *counts_obj, *means_obj, *m2s_obj, *ret = NULL;
    PyArrayObject *counts = NULL, *means = NULL, *m2s = NULL, *mean = NULL, *m2 = NULL;
    char b1[200], b2[200];
    int64_t count;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:merge_stats", kwlist, &counts_obj, &means_obj, &m2s_obj))
        return NULL;
    if (!(counts = parse_counts(counts_obj))) return NULL;
    const npy_intp K = PyArray_DIM(counts, 0);
    if (!(means = parse_parts(means_obj, "means", K)) || !(m2s = parse_parts(m2s_obj, "m2s", K))) goto fail;
    if (!PyArray_SAMESHAPE(means, m2s)) {
        SHAPE_OF(b1, m2s); SHAPE_OF(b2, means);
        PyErr_Format(PyExc_ValueError, "m2s has shape %s, expected %s (the shape of means)", b1, b2);
        goto fail;
    }
    const npy_intp C = PyArray_DIM(means, 1);
    if (!(mean = bn_new_vector(C)) || !(m2 = bn_new_vector(C))) goto fail;
    bn_merge_stats(K, C, (const int64_t *)DATA(counts), DDATA(means), DDATA(m2s), &count, DATA(mean), DATA(m2));
    ret = Py_BuildValue("(LOO)", (long long)count, mean, m2);
fail:
    Py_XDECREF(counts); Py_XDECREF(means); Py_XDECREF(m2s); Py_XDECREF(mean); Py_XDECREF(m2);
    return ret;
}

PyDoc_STRVAR(update_running_stats_doc,
"update_running_stats(running_mean, running_var, mean, m2, count, *, momentum=0.1)\n"
"--\n\n"
"Update running estimates in place from a batch's statistics (PyTorch's rule).\n\n"
"``running_mean = (1 - momentum) * running_mean + momentum * mean`` and\n"
"``running_var = (1 - momentum) * running_var + momentum * m2 / (count - 1)`` (the unbiased variance),\n"
"exactly as :func:`forward_train` updates them.\n\n"
"Parameters\n"
"----------\n"
"running_mean, running_var : ndarray of shape (C,), float32 or float64, or None\n"
"    Updated in place (any stride or byte order); None skips that one.\n"
"mean, m2 : array_like of shape (C,)\n"
"    The batch statistics, as :func:`batch_stats` or :func:`merge_stats` return them.\n"
"count : int\n"
"    Values per channel behind them; more than 1.\n"
"momentum : float, default 0.1\n"
"    In [0, 1].\n\n"
"Returns\n"
"-------\n"
"None\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    For wrong types or shapes, a read-only running statistic, count <= 1, or momentum outside\n"
"    [0, 1]. Nothing is modified when it raises.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> running_mean, running_var = np.zeros(2), np.ones(2)\n"
">>> count, mean, m2 = bn.batch_stats(np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]]))\n"
">>> bn.update_running_stats(running_mean, running_var, mean, m2, count, momentum=0.5)\n"
">>> running_mean, running_var     # 0.5 * (0, 1) + 0.5 * (mean, m2 / (count - 1))\n"
"(array([ 1.5, 10. ]), array([ 2.5, 50.5]))\n");

static PyObject *py_update_running_stats(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"running_mean", "running_var", "mean", "m2", "count", "momentum", NULL};
    PyObject *rm_obj, *rv_obj, *mean_obj, *m2_obj, *count_obj, *mom_obj = NULL, *ret = NULL;
    PyArrayObject *rm = NULL, *rv = NULL, *mean = NULL, *m2 = NULL, *ma = NULL;
    double momentum = 0.1;
    int64_t count;
    char of[120];
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|$O:update_running_stats", kwlist, &rm_obj, &rv_obj,
                                     &mean_obj, &m2_obj, &count_obj, &mom_obj))
        return NULL;
    static const char *const rnames[] = {"mean", "m2"};
    PyObject *robjs[] = {mean_obj, m2_obj};
    if (required(robjs, rnames, 2, "") < 0) return NULL;
    if (bn_parse_momentum(mom_obj, &momentum) < 0) return NULL;
    if (bn_parse_count(count_obj, "count", INT64_MIN, &count) < 0) return NULL;
    if (count <= 1) {
        PyErr_Format(PyExc_ValueError, "Expected more than 1 value per channel when training, got count %lld "
                     "(the unbiased variance divides by count - 1)", (long long)count);
        return NULL;
    }
    if (!(ma = bn_as_array(mean_obj, "mean"))) return NULL;
    if (PyArray_NDIM(ma) != 1) {
        char b1[200];
        SHAPE_OF(b1, ma);
        PyErr_Format(PyExc_ValueError, "mean has shape %s, expected (C,)", b1);
        goto fail;
    }
    const npy_intp C = PyArray_DIM(ma, 0);
    snprintf(of, sizeof of, "one value per channel (mean has %ld)", (long)C);
    /* mean as converted once above: an __array__ is not asked twice */
    if (bn_channel_vector((PyObject *)ma, "mean", C, of, &mean) < 0 || bn_channel_vector(m2_obj, "m2", C, of, &m2) < 0 ||
        bn_running_stat(rm_obj, "running_mean", C, of, &rm) < 0 ||
        bn_running_stat(rv_obj, "running_var", C, of, &rv) < 0)
        goto fail;
    /* the batch statistics must be read as given even when they share memory with what is updated */
    if (rm && (bn_detach_from(&mean, rm) < 0 || bn_detach_from(&m2, rm) < 0)) goto fail;
    if (rv && (bn_detach_from(&mean, rv) < 0 || bn_detach_from(&m2, rv) < 0)) goto fail;
    if (rm) bn_update_running(rm, DDATA(mean), 1.0, momentum);
    if (rv) bn_update_running(rv, DDATA(m2), (double)(count - 1), momentum);
    Py_INCREF(Py_None);
    ret = Py_None;
fail:
    Py_XDECREF(ma); Py_XDECREF(rm); Py_XDECREF(rv); Py_XDECREF(mean); Py_XDECREF(m2);
    return ret;
}

/* ------------------------------------------------------------------------------------------------ */
/* normalize, forward_infer                                                                          */

PyDoc_STRVAR(normalize_doc,
"normalize(x, mean, invstd, gamma=None, beta=None, *, axis=1, out=None, activation=None, residual=None)\n"
"--\n\n"
"The normalize phase: ``y = gamma * (x - mean) * invstd + beta`` with given per-channel statistics.\n\n"
"With the statistics of :func:`batch_stats` (or of :func:`merge_stats` over the parts of a batch) and\n"
"``invstd = 1 / np.sqrt(m2 / count + eps)``, y has the bits :func:`forward_train` gives.\n\n"
"Parameters\n"
"----------\n"
"x : array_like, at least 2-D\n"
"    Input; dtypes as in :func:`forward_train`. May be empty.\n"
"mean, invstd : array_like of shape (C,)\n"
"    The statistics to normalize with.\n"
"gamma, beta : array_like of shape (C,), optional\n"
"    Scale and shift; None means 1 and 0.\n"
"axis : int, default 1\n"
"    The channel axis (-1 for channels-last).\n"
"out : ndarray, optional\n"
"    Where to write y (x's shape, the result's dtype); ``out=x`` works in place.\n"
"activation : None or 'relu', default None\n"
"    Fused ReLU, as in :func:`forward_train`: ``y = max(bn(x) + residual, 0)``.\n"
"residual : array_like, optional\n"
"    Added before the activation, as in :func:`forward_train`.\n\n"
"Returns\n"
"-------\n"
"y : ndarray\n"
"    x's shape and dtype (float64 for integer or bool input).\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`forward_train`.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> bn.normalize(np.array([[1.0, 4.0], [3.0, 8.0]]), mean=[2.0, 6.0], invstd=[1.0, 0.5])\n"
"array([[-1., -1.],\n"
"       [ 1.,  1.]])\n");

PyDoc_STRVAR(forward_infer_doc,
"forward_infer(x, running_mean, running_var, gamma=None, beta=None, *, eps=1e-05, axis=1, out=None, activation=None, residual=None)\n"
"--\n\n"
"Batch Normalization forward pass in inference mode.\n\n"
"Normalizes x with given (running) statistics:\n"
"``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``, i.e. :func:`normalize` with\n"
"``invstd = 1 / sqrt(running_var + eps)``.\n\n"
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
"    Where to write y (x's shape, the result's dtype); ``out=x`` works in place.\n"
"activation : None or 'relu', default None\n"
"    Fused ReLU, as in :func:`forward_train`: ``y = max(bn(x) + residual, 0)``.\n"
"residual : array_like, optional\n"
"    Added before the activation, as in :func:`forward_train`.\n\n"
"Returns\n"
"-------\n"
"y : ndarray\n"
"    x's shape and dtype (float64 for integer or bool input).\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`forward_train`.\n");

/* normalize (eps < 0: stat is invstd) and forward_infer (stat is running_var, invstd from eps). */
static PyObject *normalize_impl(PyObject *x_obj, PyObject *const *vobj, const char *const *vnames, double eps,
                                PyObject *axis_obj, PyObject *out_obj, PyObject *act_obj, PyObject *res_obj,
                                int allow_empty)
{
    bn_input in = {0};
    PyArrayObject *vec[4] = {NULL, NULL, NULL, NULL}, *result = NULL, *target = NULL, *res = NULL;
    PyObject *ret = NULL;
    int status = BN_OK, relu = 0;

    if (required(vobj, vnames, 2, "") < 0) return NULL;
    if (bn_prepare_input(x_obj, axis_obj, allow_empty, &in) < 0) return NULL;
    /* vec: mean, invstd (or running_var), gamma, beta */
    if (channel_vectors(&in, 4, vnames, vobj, vec) < 0 || forward_epilogue(act_obj, res_obj, &in, &relu, &res) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, res, NULL, &result, &target) < 0 || detach_all(4, vec, target) < 0)
        goto fail;
    const bn_epilogue ep = {relu, res ? DATA(res) : NULL};
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        if (eps >= 0) /* inference: the kernel makes invstd of running_var */
            status = BN_KERNEL(in.work, bn_forward_infer, DATA(in.arr), DATA(target), in.L.dims, DDATA(vec[0]),
                               DDATA(vec[1]), eps, DDATA(vec[2]), DDATA(vec[3]), &ep, bn_get_num_threads());
        else
            status = BN_KERNEL(in.work, bn_normalize, DATA(in.arr), DATA(target), in.L.dims, DDATA(vec[0]),
                               DDATA(vec[1]), DDATA(vec[2]), DDATA(vec[3]), &ep, bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    if (bn_finish_output(result, target) < 0) goto fail;
    Py_INCREF(result);
    ret = (PyObject *)result;
fail:
    bn_input_clear(&in);
    clear_all(4, vec);
    Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(res);
    return ret;
}

static PyObject *py_normalize(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "mean", "invstd", "gamma", "beta", "axis", "out", "activation", "residual", NULL};
    static const char *const vnames[] = {"mean", "invstd", "gamma", "beta"};
    PyObject *x_obj, *v[4] = {NULL, NULL, NULL, NULL}, *axis_obj = NULL, *out_obj = NULL, *act_obj = NULL,
             *res_obj = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OO$OOOO:normalize", kwlist, &x_obj, &v[0], &v[1], &v[2],
                                     &v[3], &axis_obj, &out_obj, &act_obj, &res_obj))
        return NULL;
    return normalize_impl(x_obj, v, vnames, -1.0, axis_obj, out_obj, act_obj, res_obj, BN_ALLOW_EMPTY);
}

static PyObject *py_forward_infer(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"x", "running_mean", "running_var", "gamma", "beta", "eps", "axis", "out",
                             "activation", "residual", NULL};
    static const char *const vnames[] = {"running_mean", "running_var", "gamma", "beta"};
    PyObject *x_obj, *v[4] = {NULL, NULL, NULL, NULL}, *eps_obj = NULL, *axis_obj = NULL, *out_obj = NULL,
             *act_obj = NULL, *res_obj = NULL;
    double eps = 1e-5;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OO$OOOOO:forward_infer", kwlist, &x_obj, &v[0], &v[1],
                                     &v[2], &v[3], &eps_obj, &axis_obj, &out_obj, &act_obj, &res_obj))
        return NULL;
    if (bn_parse_eps(eps_obj, &eps) < 0) return NULL;
    if (v[0] == Py_None || v[1] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "running_mean and running_var are required for inference, got None");
        return NULL;
    }
    return normalize_impl(x_obj, v, vnames, eps, axis_obj, out_obj, act_obj, res_obj, BN_ALLOW_EMPTY);
}

/* ------------------------------------------------------------------------------------------------ */
/* backward_reduce, backward_apply, backward                                                         */

PyDoc_STRVAR(backward_reduce_doc,
"backward_reduce(dy, x, mean, *, axis=1)\n"
"--\n\n"
"The backward reduce phase: per channel, ``sum_dy = sum(dy)`` and ``sum_dy_xmu = sum(dy * (x - mean))``.\n\n"
"Summed in the order :func:`backward` sums them (float64), so with :func:`backward_apply` on a whole\n"
"batch it gives backward's bits. Over the parts of a batch, add each part's sums and pass the totals\n"
"to :func:`backward_apply`. The parameter gradients are ``dbeta = sum_dy`` and\n"
"``dgamma = invstd * sum_dy_xmu``.\n\n"
"Parameters\n"
"----------\n"
"dy : array_like\n"
"    Gradient of the loss with respect to y; x's shape.\n"
"x : array_like, at least 2-D\n"
"    The forward pass's input (may be empty).\n"
"mean : array_like of shape (C,)\n"
"    The mean the forward pass normalized with.\n"
"axis : int, default 1\n"
"    The channel axis.\n\n"
"Returns\n"
"-------\n"
"sum_dy, sum_dy_xmu : ndarray of shape (C,), float64\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`backward`.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])\n"
">>> dy = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])\n"
">>> count, mean, m2 = bn.batch_stats(x)\n"
">>> bn.backward_reduce(dy, x, mean)\n"
"(array([2., 2.]), array([ 0., 10.]))\n");

static PyObject *py_backward_reduce(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dy", "x", "mean", "axis", NULL};
    static const char *const vnames[] = {"mean"};
    PyObject *dy_obj, *x_obj, *v[1], *axis_obj = NULL, *ret = NULL;
    bn_input in = {0};
    PyArrayObject *dy = NULL, *vec[1] = {NULL}, *sdy = NULL, *sdyxm = NULL;
    int status = BN_OK;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$O:backward_reduce", kwlist, &dy_obj, &x_obj, &v[0],
                                     &axis_obj))
        return NULL;
    if (required(v, vnames, 1, "") < 0) return NULL;
    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    if (bn_prepare_like(dy_obj, "dy", &in, &dy) < 0 || channel_vectors(&in, 1, vnames, v, vec) < 0) goto fail;
    const npy_intp C = in.L.dims.C;
    if (!(sdy = bn_new_vector(C)) || !(sdyxm = bn_new_vector(C))) goto fail;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_backward_reduce, DATA(dy), DATA(in.arr), in.L.dims, DDATA(vec[0]),
                           DATA(sdy), DATA(sdyxm), bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    ret = Py_BuildValue("(OO)", sdy, sdyxm);
fail:
    bn_input_clear(&in);
    clear_all(1, vec);
    Py_XDECREF(dy); Py_XDECREF(sdy); Py_XDECREF(sdyxm);
    return ret;
}

PyDoc_STRVAR(backward_apply_doc,
"backward_apply(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, *, axis=1, out=None)\n"
"--\n\n"
"The backward apply phase: the training-mode gradient dx from (global) sums and count.\n\n"
"``dx = gamma * invstd * (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count)``: with\n"
"the sums of :func:`backward_reduce` over the whole batch, x's rows of the whole batch's gradient.\n\n"
"Parameters\n"
"----------\n"
"dy : array_like\n"
"    Gradient of the loss with respect to y; x's shape.\n"
"x : array_like, at least 2-D\n"
"    The forward pass's input (this part of the batch; may be empty).\n"
"mean, invstd : array_like of shape (C,)\n"
"    The (global) statistics the forward pass normalized with.\n"
"gamma : array_like of shape (C,) or None\n"
"    The scale; None means 1.\n"
"sum_dy, sum_dy_xmu : array_like of shape (C,)\n"
"    Sums over the whole batch (every part's :func:`backward_reduce` added).\n"
"count : int\n"
"    Values per channel in the whole batch; at least 1 and at least x's own count.\n"
"axis : int, default 1\n"
"    The channel axis.\n"
"out : ndarray, optional\n"
"    Where to write dx (x's shape, the result's dtype); may be dy or x itself.\n\n"
"Returns\n"
"-------\n"
"dx : ndarray\n"
"    x's shape and dtype (float64 for integer or bool input).\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`backward`, and for a count that is not a whole number at least x's count (and 1).\n\n"
"Examples\n"
"--------\n"
"A batch split into two parts (two processes, say): each part gets its rows of the whole batch's dx.\n"
"\n"
">>> import numpy as np, batchnorm as bn\n"
">>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])\n"
">>> dy = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])\n"
">>> parts = [(x[:1], dy[:1]), (x[1:], dy[1:])]\n"
">>> stats = [bn.batch_stats(xp) for xp, _ in parts]\n"
">>> count, mean, m2 = bn.merge_stats(*zip(*stats))\n"
">>> invstd = 1 / np.sqrt(m2 / count + 1e-5)\n"
">>> sums = [bn.backward_reduce(dyp, xp, mean) for xp, dyp in parts]\n"
">>> sum_dy, sum_dy_xmu = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]\n"
">>> dx = [bn.backward_apply(dyp, xp, mean, invstd, None, sum_dy, sum_dy_xmu, count) for xp, dyp in parts]\n"
">>> whole, _, _ = bn.backward(dy, x, mean, invstd)\n"
">>> bool(np.allclose(np.concatenate(dx), whole))\n"
"True\n");

static PyObject *py_backward_apply(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dy", "x", "mean", "invstd", "gamma", "sum_dy", "sum_dy_xmu", "count", "axis",
                             "out", NULL};
    static const char *const vnames[] = {"mean", "invstd", "gamma", "sum_dy", "sum_dy_xmu"};
    PyObject *dy_obj, *x_obj, *v[5], *count_obj, *axis_obj = NULL, *out_obj = NULL, *ret = NULL;
    bn_input in = {0};
    PyArrayObject *dy = NULL, *vec[5] = {NULL, NULL, NULL, NULL, NULL}, *result = NULL, *target = NULL;
    int64_t count;
    int status = BN_OK;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOO|$OO:backward_apply", kwlist, &dy_obj, &x_obj, &v[0],
                                     &v[1], &v[2], &v[3], &v[4], &count_obj, &axis_obj, &out_obj))
        return NULL;
    PyObject *req[] = {v[0], v[1], v[3], v[4]};
    static const char *const req_names[] = {"mean", "invstd", "sum_dy", "sum_dy_xmu"};
    if (required(req, req_names, 4, "") < 0) return NULL;
    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    const int64_t local = (int64_t)in.L.dims.N * (int64_t)in.L.dims.S;
    if (bn_parse_count(count_obj, "count", local > 1 ? local : 1, &count) < 0 ||
        bn_prepare_like(dy_obj, "dy", &in, &dy) < 0 || channel_vectors(&in, 5, vnames, v, vec) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, dy, NULL, &result, &target) < 0 || detach_all(5, vec, target) < 0)
        goto fail;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_backward_apply, DATA(dy), DATA(in.arr), DATA(target), in.L.dims,
                           DDATA(vec[0]), DDATA(vec[1]), DDATA(vec[2]), DDATA(vec[3]), DDATA(vec[4]),
                           (double)count, bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    if (bn_finish_output(result, target) < 0) goto fail;
    Py_INCREF(result);
    ret = (PyObject *)result;
fail:
    bn_input_clear(&in);
    clear_all(5, vec);
    Py_XDECREF(dy); Py_XDECREF(result); Py_XDECREF(target);
    return ret;
}

PyDoc_STRVAR(backward_doc,
"backward(dy, x, mean, invstd, gamma=None, *, training=True, axis=1, out=None, activation=None, residual=None, y=None, beta=None, ghost_batch_size=None, mask=None)\n"
"--\n\n"
"Batch Normalization backward pass.\n\n"
"Gradients of ``y = gamma * (x - mean) * invstd + beta`` given the upstream gradient dy. In training\n"
"mode it is :func:`backward_reduce` followed by :func:`backward_apply` with x's own count, run as one\n"
"kernel, with the same bits. With ``activation`` and ``residual`` it is the backward of the fused\n"
"forward ``y = max(bn(x) + residual, 0)``, with no pass over memory beyond BN's own.\n\n"
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
"    Where to write dx (x's shape, the result's dtype); may be dy or x itself.\n"
"activation : None or 'relu', default None\n"
"    The forward ended with a ReLU: dy reaches BN only where the forward's output was > 0 (the\n"
"    derivative at 0 is 0, as PyTorch's). Where that was comes from ``y`` or ``beta``, exactly one.\n"
"residual : None, True or array_like, optional\n"
"    The forward added a residual before the activation: also return d_residual, the gradient with\n"
"    respect to the residual (dy masked by the ReLU). Pass the residual array itself with ``beta``\n"
"    (the mask needs it); True is enough with ``y``.\n"
"y : array_like, optional\n"
"    The forward's output; the mask is ``y > 0``.\n"
"beta : array_like of shape (C,), optional\n"
"    The forward's shift: the mask is recomputed from x (and residual) with the forward's own\n"
"    arithmetic, nothing else is read. It is the forward's ``y > 0`` bit for bit when mean and invstd\n"
"    are the float64 values the forward normalized with (``stats_dtype=np.float64``, or the running\n"
"    statistics as above); with float32 statistics values within a rounding of 0 may differ. Use\n"
"    ``np.zeros(C)`` when the forward had no shift.\n"
"ghost_batch_size : int, optional\n"
"    Ghost Batch Normalization: the forward's ghost_batch_size; mean and invstd are then (K, C), one row\n"
"    per ghost batch, and each ghost batch's gradient is exact for its own statistics. dgamma and dbeta\n"
"    are the sums over the ghost batches.\n"
"mask : array_like of bool, optional\n"
"    Masked BN: the forward's mask (mean and invstd its masked statistics). The sums run over the\n"
"    True positions only, with M their count: ``dbeta = sum(dy)``, ``dgamma = sum(dy * xhat)`` there,\n"
"    and dx is ``gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)`` (``training=True``) or\n"
"    ``gamma * invstd * dy`` (``training=False``) at True positions, 0 at False ones. Not combined\n"
"    with ghost_batch_size, activation or residual.\n\n"
"Returns\n"
"-------\n"
"dx : ndarray\n"
"    Gradient with respect to x.\n"
"dgamma : ndarray of shape (C,)\n"
"    ``sum(g * xhat)`` per channel, with ``xhat = (x - mean) * invstd`` and g the gradient at BN's\n"
"    output (dy, masked by the ReLU if any); in the result's dtype, but float32 for float16 input (a\n"
"    sum over the batch overflows float16 easily).\n"
"dbeta : ndarray of shape (C,)\n"
"    ``sum(g)`` per channel, the same dtype.\n"
"d_residual : ndarray\n"
"    Only with ``residual``: g, x's shape and dtype.\n\n"
"Raises\n"
"------\n"
"TypeError, ValueError\n"
"    As :func:`forward_train`, when dy's (y's, residual's) shape differs from x's, and for a ReLU\n"
"    without exactly one of y and beta.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> x = np.array([[1.0, 10.0], [3.0, 30.0]])\n"
">>> y, mean, invstd = bn.forward_train(x, eps=0.0, activation='relu')\n"
">>> y\n"
"array([[0., 0.],\n"
"       [1., 1.]])\n"
">>> dx, dgamma, dbeta = bn.backward(np.ones_like(x), x, mean, invstd, activation='relu', y=y)\n"
">>> dbeta\n"
"array([1., 1.])\n");

static PyObject *py_backward(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"dy", "x", "mean", "invstd", "gamma", "training", "axis", "out", "activation",
                             "residual", "y", "beta", "ghost_batch_size", "mask", NULL};
    static const char *const vnames[] = {"mean", "invstd", "gamma"};
    PyObject *dy_obj, *x_obj, *v[3] = {NULL, NULL, NULL}, *training_obj = NULL, *axis_obj = NULL,
             *out_obj = NULL, *act_obj = NULL, *res_obj = NULL, *y_obj = NULL, *beta_obj = NULL, *ghost_obj = NULL,
             *mask_obj = NULL;
    bn_input in = {0};
    bwd_epilogue e = {0};
    PyArrayObject *dy = NULL, *vec[3] = {NULL, NULL, NULL}, *result = NULL, *target = NULL, *dgamma = NULL,
                  *dbeta = NULL;
    PyObject *ret = NULL;
    int status, training = 1, relu;
    npy_intp ghost;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|O$OOOOOOOOO:backward", kwlist, &dy_obj, &x_obj, &v[0], &v[1],
                                     &v[2], &training_obj, &axis_obj, &out_obj, &act_obj, &res_obj, &y_obj,
                                     &beta_obj, &ghost_obj, &mask_obj))
        return NULL;
    if (training_obj != NULL) {
        if (!PyBool_Check(training_obj) && !PyArray_IsScalar(training_obj, Bool)) {
            PyErr_Format(PyExc_TypeError, "training must be True or False, got %.200R", training_obj);
            return NULL;
        }
        training = PyObject_IsTrue(training_obj);
    }
    if (v[0] == Py_None || v[1] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "mean and invstd are required, got None");
        return NULL;
    }
    if (bwd_epilogue_flags(act_obj, y_obj, beta_obj, &relu) < 0 || parse_ghost(ghost_obj, &ghost) < 0) return NULL;
    if (has_arg(mask_obj))
        return masked_refuse("ghost_batch_size", ghost != 0) < 0 || masked_refuse("activation", relu) < 0 ||
               masked_refuse("residual", has_arg(res_obj)) < 0 ? NULL
               : masked_backward(dy_obj, x_obj, v, training, axis_obj, out_obj, mask_obj);
    if (ghost)
        return ghost_backward(dy_obj, x_obj, v, training, axis_obj, out_obj, act_obj, res_obj, y_obj, beta_obj,
                              ghost);
    if (bn_prepare_input(x_obj, axis_obj, BN_ALLOW_EMPTY, &in) < 0) return NULL;
    if (bn_prepare_like(dy_obj, "dy", &in, &dy) < 0 || bwd_epilogue_arrays(act_obj, res_obj, y_obj, beta_obj, &in, &e) < 0 ||
        channel_vectors(&in, 3, vnames, v, vec) < 0 ||
        bn_prepare_output(out_obj, &in, in.arr, dy, bwd_epilogue_input(&e), &result, &target) < 0 ||
        detach_all(3, vec, target) < 0 || bwd_epilogue_outputs(&in, &e, target) < 0)
        goto fail;
    const npy_intp C = in.L.dims.C;
    if (!(dgamma = bn_new_vector(C)) || !(dbeta = bn_new_vector(C))) goto fail;
    const bn_grad_epilogue ep = bwd_epilogue_kernel(&e, 0);
    status = BN_OK;
    if (nonempty(&in)) {
        Py_BEGIN_ALLOW_THREADS
        status = BN_KERNEL(in.work, bn_backward, DATA(dy), DATA(in.arr), DATA(target), in.L.dims,
                           DDATA(vec[0]), DDATA(vec[1]), DDATA(vec[2]), training, DATA(dgamma), DATA(dbeta),
                           &ep, bn_get_num_threads());
        Py_END_ALLOW_THREADS
    }
    if (status != BN_OK) { bn_kernel_failed(status); goto fail; }
    ret = backward_results(&in, result, target, dgamma, dbeta, &e, dy);
fail:
    bn_input_clear(&in);
    bwd_epilogue_clear(&e);
    clear_all(3, vec);
    Py_XDECREF(dy); Py_XDECREF(result); Py_XDECREF(target); Py_XDECREF(dgamma); Py_XDECREF(dbeta);
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
"Results do not depend on the thread count. Small inputs run on one thread regardless, and a call\n"
"never starts more than twice as many threads as the processors OpenMP may use. In a child process\n"
"forked after a parallel call the kernels run on one thread (GNU libgomp's threads do not survive\n"
"fork) until this function is called there. Without OpenMP (a serial build) this is accepted and has\n"
"no effect.\n\n"
"Examples\n"
"--------\n"
">>> import batchnorm as bn\n"
">>> before = bn.get_num_threads()\n"
">>> bn.set_num_threads(1)\n"
">>> bn.get_num_threads()\n"
"1\n"
">>> bn.set_num_threads(before)\n");

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
"    By default the number of cores, or ``OMP_NUM_THREADS`` when set; 1 in a build without OpenMP,\n"
"    and in a child forked after a parallel call (until :func:`set_num_threads` is called there).\n\n"
"Examples\n"
"--------\n"
">>> import batchnorm as bn\n"
">>> bn.get_num_threads() >= 1\n"
"True\n");

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    return PyLong_FromLong(bn_get_num_threads());
}

PyDoc_STRVAR(empty_cache_doc,
"empty_cache()\n"
"--\n\n"
"Hand back to the C library all the memory batchnorm keeps between calls.\n\n"
"batchnorm keeps freed memory for the next calls of the same sizes, process-wide: the kernels'\n"
"scratch, and the memory of the arrays it returns (NumPy frees them through batchnorm's allocator,\n"
"which keeps the block): up to 16 MiB of arrays of 32 KiB to 1 MiB, and up to the limit of\n"
":func:`set_cache_limit` (256 MiB by default) of larger ones. A training loop then reuses its\n"
"outputs' pages instead of faulting in fresh ones at every step. Like ``torch.cuda.empty_cache``,\n"
"this releases only memory no array uses.\n\n"
"Returns\n"
"-------\n"
"int\n"
"    The bytes handed back.\n\n"
"Examples\n"
"--------\n"
">>> import numpy as np, batchnorm as bn\n"
">>> x = np.ones((1024, 1024), np.float32)\n"
">>> y, mean, invstd = bn.forward_train(x)\n"
">>> del y\n"
">>> bn.empty_cache() >= x.nbytes\n"
"True\n"
">>> bn.empty_cache()\n"
"0\n");

static PyObject *py_empty_cache(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    return PyLong_FromSize_t(bn_cache_release());
}

PyDoc_STRVAR(set_cache_limit_doc,
"set_cache_limit(max_bytes)\n"
"--\n\n"
"Set how many bytes of freed large arrays (over 1 MiB) batchnorm keeps for reuse.\n\n"
"Parameters\n"
"----------\n"
"max_bytes : int\n"
"    At most this many bytes in all, in at most 8 blocks; 0 keeps none (each large array's memory\n"
"    goes back to the C library when the array is freed, as NumPy's own arrays do). Below what is kept\n"
"    now, the kept large blocks are handed back at once. The default is 256 MiB.\n\n"
"Returns\n"
"-------\n"
"int\n"
"    The previous limit.\n\n"
"See Also\n"
"--------\n"
"empty_cache\n\n"
"Examples\n"
"--------\n"
">>> import batchnorm as bn\n"
">>> old = bn.set_cache_limit(0)\n"
">>> bn.set_cache_limit(old)\n"
"0\n");

static PyObject *py_set_cache_limit(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_bytes", NULL};
    PyObject *arg;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:set_cache_limit", kwlist, &arg)) return NULL;
    if (PyBool_Check(arg) || !PyIndex_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "max_bytes must be an integer, got %.200s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    PyObject *n = PyNumber_Index(arg);
    if (n == NULL) return NULL;
    int overflow;
    const long long v = PyLong_AsLongLongAndOverflow(n, &overflow);
    Py_DECREF(n);
    if (v == -1 && PyErr_Occurred()) return NULL;
    if (overflow < 0 || (overflow == 0 && v < 0)) {
        PyErr_Format(PyExc_ValueError, "max_bytes must be >= 0, got %R", arg);
        return NULL;
    }
    /* more than the address space (or than long long): no limit */
    const size_t bytes = overflow > 0 || (unsigned long long)v > (size_t)-1 ? (size_t)-1 : (size_t)v;
    return PyLong_FromSize_t(bn_cache_set_limit(bytes));
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

#define METHOD(name, doc) {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, doc}
static PyMethodDef methods[] = {
    METHOD(forward_train, forward_train_doc),
    METHOD(forward_infer, forward_infer_doc),
    METHOD(backward, backward_doc),
    METHOD(batch_stats, batch_stats_doc),
    METHOD(merge_stats, merge_stats_doc),
    METHOD(normalize, normalize_doc),
    METHOD(backward_reduce, backward_reduce_doc),
    METHOD(backward_apply, backward_apply_doc),
    METHOD(update_running_stats, update_running_stats_doc),
    METHOD(set_num_threads, set_num_threads_doc),
    {"get_num_threads", py_get_num_threads, METH_NOARGS, get_num_threads_doc},
    {"empty_cache", py_empty_cache, METH_NOARGS, empty_cache_doc},
    METHOD(set_cache_limit, set_cache_limit_doc),
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
