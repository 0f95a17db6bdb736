/*
 * bn_backward.tmpl.h - the backward direction, written once for every element type and instruction set:
 * the reduce step (two sums per channel), the apply step (dx), and the kernels made of them
 * (backward_reduce, backward_apply, backward). Included as bn_forward.tmpl.h is.
 *
 * Derivation (per channel, M = N * S values, xhat = (x - mean) * invstd, y = gamma * xhat + beta):
 *   dbeta  = sum(dy)
 *   dgamma = sum(dy * xhat) = invstd * sum(dy * (x - mean))
 *   With mean and invstd functions of x (training):
 *     dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)
 *        = k1 * (dy - k2 - (x - mean) * k3),   k1 = gamma * invstd, k2 = dbeta / M, k3 = invstd * dgamma / M
 *   With mean and invstd constants (eval / frozen BN): dx = k1 * dy.
 * The two sums are the only reductions; they are cut and combined in a thread-independent order.
 */

/* sum(dy) and sum(dy * (x - m)) over `runs` runs of `len` values, `stride` apart. In plain C the two
 * sums are separate loops: GCC vectorizes each (BN_LANES independent lanes, no reassociation) but not the
 * fused form, which ran 1.5x slower. With vector extensions (BN_HAVE_VEXT) they are one loop, which
 * converts dy once and reads it once: the same additions lane by lane and tail by tail, so the same bits,
 * and the backward 6-8% faster at (32, 64, 8, 8) and (8, 16, 16, 16) float32 (small_ab.py --base). */
static bn_sums BN_NAME(runs_sums)(const BN_T *dy, const BN_T *x, ptrdiff_t len, ptrdiff_t runs,
                                  ptrdiff_t stride, double m)
{
    double ta = 0, tb = 0;
    const ptrdiff_t body = len - len % BN_LANES;
    bn_sums res;
#if BN_HAVE_VEXT
    bn_v8d a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
    const bn_v8d mv = {m, m, m, m, m, m, m, m};
    for (ptrdiff_t r = 0; r < runs; r++) {
        const BN_T *g = dy + r * stride, *v = x + r * stride;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES) {
            const bn_v8d g0 = BN_V8D_LOAD(g + i), g1 = BN_V8D_LOAD(g + i + 8), x0 = BN_V8D_LOAD(v + i),
                         x1 = BN_V8D_LOAD(v + i + 8);
            a0 += g0;
            a1 += g1;
            b0 += g0 * (x0 - mv);
            b1 += g1 * (x1 - mv);
        }
        for (ptrdiff_t i = body; i < len; i++) {
            ta += (double)g[i];
            tb += (double)g[i] * ((double)v[i] - m);
        }
    }
    res.dy = BN_V8D_LANES_SUM(a0, a1) + ta;
    res.dyxm = BN_V8D_LANES_SUM(b0, b1) + tb;
#else
    double a[BN_LANES] = {0}, b[BN_LANES] = {0};
    for (ptrdiff_t r = 0; r < runs; r++) {
        const BN_T *g = dy + r * stride;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) a[j] += (double)g[i + j];
    }
    for (ptrdiff_t r = 0; r < runs; r++) {
        const BN_T *g = dy + r * stride, *v = x + r * stride;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) b[j] += (double)g[i + j] * ((double)v[i + j] - m);
        for (ptrdiff_t i = body; i < len; i++) {
            ta += (double)g[i];
            tb += (double)g[i] * ((double)v[i] - m);
        }
    }
    res.dy = bn_lanes_sum(a) + ta;
    res.dyxm = bn_lanes_sum(b) + tb;
#endif
    return res;
}

/* g, the gradient at BN's output: dy, or dy where the forward's output was > 0 and 0 elsewhere (a select,
 * not a product: an inf or NaN in dy where the ReLU was off does not leak, as in PyTorch). aux is y
 * (GM_Y) or the residual (GM_XR, GM_XRF). A mask from x is the forward's expression: from fc, fa, fo in
 * double, or (GM_XF, GM_XRF) from the channel's float32 pairs pq where its forward took the float32 form
 * (row mode: bn_f32_pairs_or_null, split by the caller once a channel or run). */
static BN_ALWAYS_INLINE double BN_NAME(grad_in)(const BN_T *dy, const BN_T *x, const BN_T *aux, ptrdiff_t i,
                                                double fc, double fa, double fo, const float *pq, const int gm)
{
    const double g = (double)dy[i];
    if (gm == BN_GM_Y) return aux[i] > 0 ? g : 0.0;
    if (gm == BN_GM_XT) /* fc, fa: the range mask_bounds found, BN_T values (row mode: constants of the loop) */
        return ((x[i] >= (BN_T)fc) & (x[i] <= (BN_T)fa)) ? g : 0.0;
    if (gm == BN_GM_XF || gm == BN_GM_XRF) {
        float v = bn_f32_norm((float)x[i], pq[0], pq[1], pq[2], pq[3]);
        if (gm == BN_GM_XRF) v += (float)aux[i];
        return v > 0.0f ? g : 0.0;
    }
    if (gm == BN_GM_X || gm == BN_GM_XR) {
        double v = ((double)x[i] - fc) * fa + fo; /* x - (+0.0) is x: the folded forward's value too */
        if (gm == BN_GM_XR) v += (double)aux[i];
        return (BN_T)v > 0 ? g : 0.0;
    }
    return g;
}

/* The ReLU mask of BN_GM_X as a range of x. With the forward's coefficients finite and fa != 0,
 * x -> (BN_T)(((double)x - fc) * fa + fo) is monotone in x (each step, exact or rounded, is), rising for
 * fa > 0 and falling for fa < 0, from x = -inf to +inf. So the x where the forward's y > 0 are the x of
 * one range: [t, +inf] or [-inf, t] or none. fa = 0 gives every finite x or none (inf * 0 is NaN). The
 * end t is found by asking grad_in's own expression, from the real root outwards (a few values, in the
 * order of the keys, bn_order_key_*), then by bisection, so the range holds exactly the x of the forward's
 * mask, NaN in none. Written to *lo, *hi (BN_T values, as doubles; an empty range is lo > hi). Row mode's
 * channels of the float32 form (bn_f32_norm, monotone the same way: see bn_internal.h) are asked with
 * their pairs pq, split once. */
static int BN_NAME(relu_on)(BN_T v, double fc, double fa, double fo, const float *pq)
{
    const BN_T one = 1;
    return pq ? BN_NAME(grad_in)(&one, &v, NULL, 0, fc, fa, fo, pq, BN_GM_XF) != 0.0
              : BN_NAME(grad_in)(&one, &v, NULL, 0, fc, fa, fo, NULL, BN_GM_X) != 0.0;
}

/* A row-mode channel's float32 pairs (in `pairs`) for a mask recomputed from x (gm X or XR) where its
 * forward took the float32 form, else NULL: split once a channel or run, for grad_in's GM_XF, GM_XRF. */
static inline const float *BN_NAME(mask_pairs)(int gm, double fc, double fa, double fo, float *pairs)
{
    return sizeof(BN_T) == sizeof(float) && (gm == BN_GM_X || gm == BN_GM_XR) ? bn_f32_pairs_or_null(fc, fa, fo, pairs)
                                                                                 : NULL;
}

static int64_t BN_NAME(order_key)(BN_T v)
{
    return sizeof(BN_T) == sizeof(float) ? bn_order_key_f32((float)v) : bn_order_key_f64((double)v);
}

static BN_T BN_NAME(from_order_key)(int64_t k)
{
    return sizeof(BN_T) == sizeof(float) ? (BN_T)bn_from_order_key_f32(k) : (BN_T)bn_from_order_key_f64(k);
}

static void BN_NAME(mask_bounds)(double fc, double fa, double fo, int colmode, double *lo, double *hi)
{
    const double maxv = sizeof(BN_T) == sizeof(float) ? (double)FLT_MAX : DBL_MAX;
    float pairs[4];
    const float *pq = colmode ? NULL : BN_NAME(mask_pairs)(BN_GM_X, fc, fa, fo, pairs);
#define BN_ON_AT(v) BN_NAME(relu_on)((v), fc, fa, fo, pq)
    if (fa == 0) {
        const int on = BN_ON_AT((BN_T)0);
        *lo = on ? -maxv : INFINITY;
        *hi = on ? maxv : -INFINITY;
        return;
    }
    /* u = dir * key: on(u) rises with u */
    const int64_t dir = fa > 0 ? 1 : -1, top = BN_NAME(order_key)((BN_T)INFINITY);
#define BN_ON(u) BN_ON_AT(BN_NAME(from_order_key)(dir * (u)))
    const double root = fc - fo / fa, clamped = root > maxv ? maxv : root < -maxv ? -maxv : root;
    const int64_t u0 = dir * BN_NAME(order_key)((BN_T)clamped);
    /* below: off (or -top - 1, below every value); above: on. Distances as unsigned: keys span 2 * top. */
    int64_t below, above;
    uint64_t step = 1;
    if (BN_ON(u0)) {
        above = u0;
        for (;;) {
            if ((uint64_t)above + (uint64_t)top < step) { below = -top - 1; break; }
            below = above - (int64_t)step;
            if (!BN_ON(below)) break;
            above = below;
            step *= 2;
        }
    } else {
        below = u0;
        for (;;) {
            if ((uint64_t)top - (uint64_t)below <= step) {
                if (!BN_ON(top)) { /* off everywhere */
                    *lo = INFINITY;
                    *hi = -INFINITY;
                    return;
                }
                above = top;
                break;
            }
            above = below + (int64_t)step;
            if (BN_ON(above)) break;
            below = above;
            step *= 2;
        }
    }
    while ((uint64_t)above - (uint64_t)below > 1) {
        const int64_t mid = below + (int64_t)(((uint64_t)above - (uint64_t)below) / 2);
        if (BN_ON(mid)) above = mid;
        else below = mid;
    }
#undef BN_ON
#undef BN_ON_AT
    const double t = (double)BN_NAME(from_order_key)(dir * above);
    *lo = dir > 0 ? t : -INFINITY;
    *hi = dir > 0 ? INFINITY : t;
}

/* runs_sums of the masked g instead of dy, writing g to dres on the way when `write` (a constant, as gm:
 * a store under a runtime test does not vectorize). The same two loops and lanes; the second reads g back
 * from dres, still in L1, or recomputes it. */
static BN_ALWAYS_INLINE bn_sums BN_NAME(runs_sums_gm)(const BN_T *dy, const BN_T *x, const BN_T *aux, BN_T *dres,
                                                      ptrdiff_t len, ptrdiff_t runs, ptrdiff_t stride, double m,
                                                      double fc, double fa, double fo, const float *pq,
                                                      const int gm, const int write)
{
    double a[BN_LANES] = {0}, b[BN_LANES] = {0}, ta = 0, tb = 0;
    const ptrdiff_t body = len - len % BN_LANES;
#if BN_HAVE_VEXT
    /* float32, a mask from y or from x's range, g kept (write): one loop, as runs_sums (the same additions
     * lane by lane, so the same bits), which selects g among the floats (dy, or +0.0 as grad_in gives
     * it), stores it and sums it widened. GCC's two plain loops converted dy twice and read g back in a
     * second pass: backward(relu, y=) at (32, 64, 8, 8) spent over half its time in them. */
    if (sizeof(BN_T) == sizeof(float) && write && (gm == BN_GM_Y || gm == BN_GM_XT)) {
        bn_v8d a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
        const bn_v8d mv = {m, m, m, m, m, m, m, m};
        const float lo = (float)fc, hi = (float)fa; /* XT: the range's ends, float values */
        const bn_v8f zero = {0}, vlo = {lo, lo, lo, lo, lo, lo, lo, lo}, vhi = {hi, hi, hi, hi, hi, hi, hi, hi};
        for (ptrdiff_t r = 0; r < runs; r++) {
            const ptrdiff_t o = r * stride;
            const BN_T *g = dy + o, *v = x + o, *w = gm == BN_GM_Y ? aux + o : NULL;
            BN_T *dr = dres + o;
            for (ptrdiff_t i = 0; i < body; i += BN_LANES) {
                const bn_v8f x0 = BN_V8F_LOAD(v + i), x1 = BN_V8F_LOAD(v + i + 8);
                const bn_v8i k0 = gm == BN_GM_Y ? BN_V8F_LOAD(w + i) > zero : (x0 >= vlo) & (x0 <= vhi),
                             k1 = gm == BN_GM_Y ? BN_V8F_LOAD(w + i + 8) > zero : (x1 >= vlo) & (x1 <= vhi);
                const bn_v8f s0 = (bn_v8f)((bn_v8i)BN_V8F_LOAD(g + i) & k0), s1 = (bn_v8f)((bn_v8i)BN_V8F_LOAD(g + i + 8) & k1);
                *(bn_v8f_mem *)(void *)(dr + i) = s0;
                *(bn_v8f_mem *)(void *)(dr + i + 8) = s1;
                const bn_v8d g0 = BN_V8F_WIDEN(s0), g1 = BN_V8F_WIDEN(s1);
                a0 += g0;
                a1 += g1;
                b0 += g0 * (BN_V8F_WIDEN(x0) - mv);
                b1 += g1 * (BN_V8F_WIDEN(x1) - mv);
            }
            for (ptrdiff_t i = body; i < len; i++) {
                const double gv = BN_NAME(grad_in)(g, v, w, i, fc, fa, fo, pq, gm);
                dr[i] = (BN_T)gv;
                ta += gv;
                tb += gv * ((double)v[i] - m);
            }
        }
        bn_sums res;
        res.dy = BN_V8D_LANES_SUM(a0, a1) + ta;
        res.dyxm = BN_V8D_LANES_SUM(b0, b1) + tb;
        return res;
    }
#endif
    /* float32, a mask recomputed from x (and the residual), g kept: g written first, in a loop of its own,
     * then summed from there by runs_sums, whose additions are those of the two loops below (which read g
     * back too): the same bits. Those loops kept their 16 sums on the stack: backward(relu, residual,
     * beta=) at (32, 64, 8, 8) and (8, 16, 16, 16) now takes 0.85-0.87 of their time (small_ab.py). For
     * float64 (masks from y) this order was 6-7% slower than the two loops. */
    if (sizeof(BN_T) == sizeof(float) && write && gm != BN_GM_Y && gm != BN_GM_XT) {
        for (ptrdiff_t r = 0; r < runs; r++) {
            const ptrdiff_t o = r * stride;
            const BN_T *g = dy + o, *v = x + o, *w = gm == BN_GM_XR || gm == BN_GM_XRF ? aux + o : NULL;
            BN_T *dr = dres + o;
            for (ptrdiff_t i = 0; i < len; i++) dr[i] = (BN_T)BN_NAME(grad_in)(g, v, w, i, fc, fa, fo, pq, gm);
        }
        return BN_NAME(runs_sums)(dres, x, len, runs, stride, m);
    }
    for (ptrdiff_t r = 0; r < runs; r++) {
        const ptrdiff_t o = r * stride;
        const BN_T *g = dy + o, *v = x + o, *w = gm == BN_GM_Y || gm == BN_GM_XR || gm == BN_GM_XRF ? aux + o : NULL;
        BN_T *dr = write ? dres + o : NULL;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) {
                const double gv = BN_NAME(grad_in)(g, v, w, i + j, fc, fa, fo, pq, gm);
                if (write) dr[i + j] = (BN_T)gv;
                a[j] += gv;
            }
        for (ptrdiff_t i = body; i < len; i++) {
            const double gv = BN_NAME(grad_in)(g, v, w, i, fc, fa, fo, pq, gm);
            if (write) dr[i] = (BN_T)gv;
            ta += gv;
        }
    }
    for (ptrdiff_t r = 0; r < runs; r++) {
        const ptrdiff_t o = r * stride;
        const BN_T *g = write ? dres + o : dy + o, *v = x + o, *w = gm == BN_GM_Y || gm == BN_GM_XR || gm == BN_GM_XRF ? aux + o : NULL;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) {
                const double gv = write ? (double)g[i + j] : BN_NAME(grad_in)(g, v, w, i + j, fc, fa, fo, pq, gm);
                b[j] += gv * ((double)v[i + j] - m);
            }
        for (ptrdiff_t i = body; i < len; i++) {
            const double gv = write ? (double)g[i] : BN_NAME(grad_in)(g, v, w, i, fc, fa, fo, pq, gm);
            tb += gv * ((double)v[i] - m);
        }
    }
    bn_sums r;
    r.dy = bn_lanes_sum(a) + ta;
    r.dyxm = bn_lanes_sum(b) + tb;
    return r;
}

/* runs_sums_gm with gm and write as constants (each its own loop). */
static bn_sums BN_NAME(runs_sums_any)(const BN_T *dy, const BN_T *x, const BN_T *aux, BN_T *dres, ptrdiff_t len,
                                      ptrdiff_t runs, ptrdiff_t stride, double m, double fc, double fa,
                                      double fo, const float *pq, int gm)
{
#define BN_CASE(GM)                                                                                       \
    return dres ? BN_NAME(runs_sums_gm)(dy, x, aux, dres, len, runs, stride, m, fc, fa, fo, pq, GM, 1)   \
                : BN_NAME(runs_sums_gm)(dy, x, aux, NULL, len, runs, stride, m, fc, fa, fo, pq, GM, 0)
    switch (gm) {
    case BN_GM_Y: BN_CASE(BN_GM_Y);
    case BN_GM_X: BN_CASE(BN_GM_X);
    case BN_GM_XR: BN_CASE(BN_GM_XR);
    case BN_GM_XT: BN_CASE(BN_GM_XT);
    case BN_GM_XF: BN_CASE(BN_GM_XF);
    case BN_GM_XRF: BN_CASE(BN_GM_XRF);
    default: return BN_NAME(runs_sums)(dy, x, len, runs, stride, m);
    }
#undef BN_CASE
}

/* Column mode's g at element o of a row, position q: grad_in with the per-position coefficients, or for
 * BN_GM_XT the range's ends tlo[q], thi[q] (BN_T values, item_sums puts them in fc's and fa's room). */
static BN_ALWAYS_INLINE double BN_NAME(col_g)(const BN_T *dr, const BN_T *xr, const BN_T *ar, ptrdiff_t o,
                                              ptrdiff_t q, const BN_T *tlo, const BN_T *thi, const double *fc,
                                              const double *fa, const double *fo, const int gm)
{
    if (gm == BN_GM_XT) return ((xr[o] >= tlo[q]) & (xr[o] <= thi[q])) ? (double)dr[o] : 0.0;
    const int rc = bn_gm_from_x(gm);
    return BN_NAME(grad_in)(dr, xr, ar, o, rc ? fc[q] : 0.0, rc ? fa[q] : 0.0, rc ? fo[q] : 0.0, NULL, gm);
}

#if BN_HAVE_VEXT
/* Column mode: the sums of rows [n, n + R), 8 positions a step, each position adding its rows in order as
 * the one-row loop does (the same bits), its running sums loaded and stored once per R rows. g is dy, or
 * with g kept (write) the masked dy selected among the element values as runs_sums_gm does (mask from y,
 * or from x's range: tlo, thi; dy's bits or +0.0), stored to gr and summed widened. */
static BN_ALWAYS_INLINE void BN_NAME(cols_sums_sweep)(const BN_T *dr, const BN_T *xr, const BN_T *ar, BN_T *gr,
                                                      ptrdiff_t W, ptrdiff_t wb, const double *BN_RESTRICT em,
                                                      const BN_T *tlo, const BN_T *thi, double *BN_RESTRICT sa,
                                                      double *BN_RESTRICT sb, const int R, const int gm)
{
    const ptrdiff_t body = wb - wb % 8;
    const bn_v8f zero = {0};
    const bn_v8d zd = {0};
    for (ptrdiff_t q = 0; q < body; q += 8) {
        bn_v8d va = BN_V8D_LOAD(sa + q), vb = BN_V8D_LOAD(sb + q);
        const bn_v8d vm = BN_V8D_LOAD(em + q);
        for (int j = 0; j < R; j++) {
            const ptrdiff_t o = j * W + q;
            bn_v8d g, xv;
            if (gm == BN_GM_NONE) {
                g = BN_V8D_LOAD(dr + o);
                xv = BN_V8D_LOAD(xr + o);
            } else if (sizeof(BN_T) == sizeof(double)) {
                const bn_v8d xd = BN_V8D_LOAD(xr + o);
                const bn_v8l k = gm == BN_GM_Y ? BN_V8D_LOAD(ar + o) > zd
                                               : (xd >= BN_V8D_LOAD(tlo + q)) & (xd <= BN_V8D_LOAD(thi + q));
                g = (bn_v8d)((bn_v8l)BN_V8D_LOAD(dr + o) & k);
                BN_V8D_STORE(gr + o, g);
                xv = xd;
            } else {
                const bn_v8f xf = BN_V8F_LOAD(xr + o);
                const bn_v8i k = gm == BN_GM_Y ? BN_V8F_LOAD(ar + o) > zero : (xf >= BN_V8F_LOAD(tlo + q)) & (xf <= BN_V8F_LOAD(thi + q));
                const bn_v8f sf = (bn_v8f)((bn_v8i)BN_V8F_LOAD(dr + o) & k);
                *(bn_v8f_mem *)(void *)(gr + o) = sf;
                g = BN_V8F_WIDEN(sf);
                xv = BN_V8F_WIDEN(xf);
            }
            va += g;
            vb += g * (xv - vm);
        }
        BN_V8D_STORE(sa + q, va);
        BN_V8D_STORE(sb + q, vb);
    }
    for (ptrdiff_t q = body; q < wb; q++)
        for (int j = 0; j < R; j++) {
            const ptrdiff_t o = j * W + q;
            const double g = BN_NAME(col_g)(dr, xr, ar, o, q, tlo, thi, NULL, NULL, NULL, gm);
            if (gm != BN_GM_NONE) gr[o] = (BN_T)g;
            sa[q] += g;
            sb[q] += g * ((double)xr[o] - em[q]);
        }
}
#endif

#ifndef BN_F32_ROWWISE_SUMS
#define BN_F32_ROWWISE_SUMS 1 /* bn_avx2.c says 0 */
#endif
#ifndef BN_F64_MASKED_SWEEP
#define BN_F64_MASKED_SWEEP 1 /* bn_avx2.c says 0 */
#endif
/* Column mode: rows [n0, n1) of an item (wb positions from offset `first`) summed per position into sa, sb,
 * with g masked (fc, fa, fo: the forward's coefficients per position) and written to dres when `write`. */
static BN_ALWAYS_INLINE void BN_NAME(cols_sums_gm)(const BN_T *dy, const BN_T *x, const BN_T *aux,
                                                   BN_T *BN_RESTRICT dres, const bn_plan *p, ptrdiff_t first,
                                                   ptrdiff_t wb, ptrdiff_t n0, ptrdiff_t n1,
                                                   const double *BN_RESTRICT em, const double *BN_RESTRICT fc,
                                                   const double *BN_RESTRICT fa, const double *BN_RESTRICT fo,
                                                   double *BN_RESTRICT sa, double *BN_RESTRICT sb, const int gm,
                                                   const int write)
{
    const BN_T *BN_RESTRICT tlo = gm == BN_GM_XT ? (const BN_T *)(const void *)fc : NULL,
               *BN_RESTRICT thi = gm == BN_GM_XT ? (const BN_T *)(const void *)fa : NULL;
    ptrdiff_t n = n0;
#if BN_HAVE_VEXT
    /* g = dy: four rows a sweep where a row is 2 KiB or more, two below: at (32768, 256) float32 four rows
     * of 1 KiB ran 12% slower than one, two 10% faster; at (8192, 1024) four were 20% faster, two 3%.
     * A masked g kept: one row a sweep, rows of at most 2 KiB (backward(relu, beta=) 0.61-0.83 of the plain
     * loop's time at (32768, 256), (16384, 512), (65536, 128) and channels-last (64, 28, 28, 256); at
     * (4096, 768) 0.99, at (8192, 1024) and (2048, 4096) 5-16% slower, in sweeps of one row or four).
     * float64 likewise (0.52-0.62 at (32768, 256), (16384, 128) and (32, 28, 28, 256) with AVX-512), except
     * in the AVX2 build (BN_F64_MASKED_SWEEP).
     * g = dy on tensors of 16 MiB and more (read from memory) with rows of at most 3 KiB: one row a sweep,
     * as the statistics' first pass does (the prefetcher and several streams per page): backward_reduce
     * 0.49-0.53 (float32) and 0.49-0.57 (float64) at 128-256 positions, (64, 28, 28, 256) included,
     * 0.87-0.88 (float32) and 0.65-0.69 (float64) at 2.5-3 KiB rows; at 3.5 KiB float32 was 4% slower
     * (float64 0.69), at 4 KiB float32 54% slower and float64 0.95, at 6-7 KiB float64 17-32% slower.
     * Not float32 in the AVX2 build (BN_F32_ROWWISE_SUMS). */
    if ((gm == BN_GM_NONE && !write) ||
        (write && (gm == BN_GM_Y || gm == BN_GM_XT) && (sizeof(BN_T) == sizeof(float) || BN_F64_MASKED_SWEEP))) {
        const ptrdiff_t W = p->W;
#define BN_SWEEP_ARGS(n)                                                                                  \
    dy + (n) * W + first, x + (n) * W + first, gm == BN_GM_Y ? aux + (n) * W + first : NULL,              \
        write ? dres + (n) * W + first : NULL, W, wb, em, tlo, thi, sa, sb
        if (gm != BN_GM_NONE) {
            if (wb * (ptrdiff_t)sizeof(BN_T) <= 2048)
                for (; n < n1; n++) BN_NAME(cols_sums_sweep)(BN_SWEEP_ARGS(n), 1, gm);
        }
        else if ((sizeof(BN_T) == sizeof(double) || BN_F32_ROWWISE_SUMS) && bn_streamed(p, sizeof(BN_T)) &&
                 wb * (ptrdiff_t)sizeof(BN_T) <= 3072)
            for (; n < n1; n++) BN_NAME(cols_sums_sweep)(BN_SWEEP_ARGS(n), 1, gm);
        else if (wb * (ptrdiff_t)sizeof(BN_T) >= 2048)
            for (; n + 4 <= n1; n += 4) BN_NAME(cols_sums_sweep)(BN_SWEEP_ARGS(n), 4, gm);
        else
            for (; n + 2 <= n1; n += 2) BN_NAME(cols_sums_sweep)(BN_SWEEP_ARGS(n), 2, gm);
#undef BN_SWEEP_ARGS
    }
#endif
    for (; n < n1; n++) {
        ptrdiff_t off = n * p->W + first;
        const BN_T *dr = dy + off, *xr = x + off, *ar = gm == BN_GM_Y || gm == BN_GM_XR ? aux + off : NULL;
        BN_T *BN_RESTRICT gr = write ? dres + off : NULL;
        for (ptrdiff_t q = 0; q < wb; q++) {
            const double xq = (double)xr[q];
            const double g = BN_NAME(col_g)(dr, xr, ar, q, q, tlo, thi, fc, fa, fo, gm);
            if (write) gr[q] = (BN_T)g;
            sa[q] += g;
            sb[q] += g * (xq - em[q]);
        }
    }
}

/* Sums of one item into out[0 .. c1-c0), of dy or of the masked g (a->gm, bwd_args below). Column mode
 * needs 3 * (c1 - c0) * S doubles of scratch, 6 with a recomputed mask. */
typedef struct BN_NAME(bwd_args) BN_NAME(bwd_args);
static void BN_NAME(item_sums)(const BN_NAME(bwd_args) *a, const bn_plan *p, ptrdiff_t c0, ptrdiff_t c1,
                               ptrdiff_t n0, ptrdiff_t n1, double *scratch, bn_sums *out);

#define BN_FOLD (sizeof(BN_T) < sizeof(double))

/* dx over one contiguous run of a channel, from its k1 (a), k2 (b), k3 (e) and centre (m), g as grad_in
 * gives it (see grad_item for the forms). */
static BN_ALWAYS_INLINE void BN_NAME(grad_run)(const BN_T *dr, const BN_T *xr, const BN_T *ar, BN_T *out,
                                               ptrdiff_t S, int training, int fold, double m, double a, double b,
                                               double e, double fc, double fa, double fo, const float *pq,
                                               int nt, const int gm)
{
#ifdef BN_V8F_STORE
    /* float32, training, folded, g given: 8 values a step with one conversion each way (GCC's own loop
     * loaded 16 floats and extracted halves, and inserted two halves before its store); the same
     * expression lane by lane, so the same bits. With `nt` (a streamed tensor, bn_stream.h) the stores
     * from a 32-byte boundary on are non-temporal. */
    if (sizeof(BN_T) == sizeof(float) && training && fold && gm == BN_GM_NONE) {
        const bn_v8d av = {a, a, a, a, a, a, a, a}, ev = {e, e, e, e, e, e, e, e}, bv = {b, b, b, b, b, b, b, b};
        ptrdiff_t body = S - S % 8;
#ifdef BN_V8F_STREAM
        if (nt && S >= 32) {
            const ptrdiff_t h = bn_nt_head(out, S, sizeof(BN_T));
            for (ptrdiff_t s = 0; s < h; s++) out[s] = (BN_T)(a * (double)dr[s] + ((double)xr[s] * e + b));
            body = h + (S - h) / 8 * 8;
            for (ptrdiff_t s = h; s < body; s += 8)
                BN_V8F_STREAM(out + s, av * BN_V8D_LOAD(dr + s) + (BN_V8D_LOAD(xr + s) * ev + bv));
        } else
#endif
        for (ptrdiff_t s = 0; s < body; s += 8)
            BN_V8F_STORE(out + s, av * BN_V8D_LOAD(dr + s) + (BN_V8D_LOAD(xr + s) * ev + bv));
        dr += body; /* the tail by the loop below (aux is not read without a mask) */
        xr += body;
        out += body;
        S -= body;
    }
#endif
#ifdef BN_HAVE_NT
    /* float64, training, g given, a streamed tensor: the stores from a 32-byte boundary on non-temporal
     * (bn_stream.h), the same expression */
    if (sizeof(BN_T) == sizeof(double) && training && gm == BN_GM_NONE && nt && S >= 16) {
        const __m256d mv = _mm256_set1_pd(m), av = _mm256_set1_pd(a), bv = _mm256_set1_pd(b), ev = _mm256_set1_pd(e);
        const ptrdiff_t h = bn_nt_head(out, S, sizeof(BN_T)), body = h + (S - h) / 4 * 4;
        for (ptrdiff_t s = 0; s < h; s++) out[s] = (BN_T)(a * (((double)dr[s] - b) - ((double)xr[s] - m) * e));
        for (ptrdiff_t s = h; s < body; s += 4)
            bn_nt_f64_grad4((double *)(void *)(out + s), (const double *)(const void *)(dr + s),
                            (const double *)(const void *)(xr + s), mv, av, bv, ev);
        dr += body;
        xr += body;
        out += body;
        S -= body;
    }
#endif
    (void)nt;
    if (!training)
        for (ptrdiff_t s = 0; s < S; s++) out[s] = (BN_T)(a * BN_NAME(grad_in)(dr, xr, ar, s, fc, fa, fo, pq, gm));
    else if (BN_FOLD && fold)
        for (ptrdiff_t s = 0; s < S; s++)
            out[s] = (BN_T)(a * BN_NAME(grad_in)(dr, xr, ar, s, fc, fa, fo, pq, gm) + ((double)xr[s] * e + b));
    else if (BN_FOLD)
        for (ptrdiff_t s = 0; s < S; s++)
            out[s] = (BN_T)(a * BN_NAME(grad_in)(dr, xr, ar, s, fc, fa, fo, pq, gm) + (((double)xr[s] - m) * e + b));
    else
        for (ptrdiff_t s = 0; s < S; s++)
            out[s] = (BN_T)(a * ((BN_NAME(grad_in)(dr, xr, ar, s, fc, fa, fo, pq, gm) - b) - ((double)xr[s] - m) * e));
}

#ifdef BN_V8F_STORE
/* grad_cols' float32 folded training dx of the row at `off`, and with `two` (1 or 3) also of the one or
 * three rows W2 apart after it, each coefficient loaded once for all. */
static BN_ALWAYS_INLINE void BN_NAME(dx_cols_v8)(const BN_T *dy, const BN_T *x, BN_T *dx, ptrdiff_t off, ptrdiff_t W2,
                                                 ptrdiff_t wb, const double *BN_RESTRICT ea,
                                                 const double *BN_RESTRICT eb, const double *BN_RESTRICT ee,
                                                 const int two)
{
    const BN_T *dr = dy + off, *xr = x + off;
    BN_T *out = dx + off;
    const ptrdiff_t body = wb - wb % 8;
    for (ptrdiff_t q = 0; q < body; q += 8) {
        const bn_v8d av = BN_V8D_LOAD(ea + q), ev = BN_V8D_LOAD(ee + q), bv = BN_V8D_LOAD(eb + q);
        for (int j = 0; j <= two; j++) {
            const ptrdiff_t o = j * W2 + q;
            BN_V8F_STORE(out + o, av * BN_V8D_LOAD(dr + o) + (BN_V8D_LOAD(xr + o) * ev + bv));
        }
    }
    for (int j = 0; j <= two; j++)
        for (ptrdiff_t q = body; q < wb; q++) {
            const ptrdiff_t o = j * W2 + q;
            out[o] = (BN_T)(ea[q] * (double)dr[o] + ((double)xr[o] * ee[q] + eb[q]));
        }
}
#endif

#if BN_HAVE_VEXT
/* grad_cols' float64 training dx, k1 * ((g - k2) - (x - centre) * k3) with g = dy, of the row at `off` and
 * the row W2 further, each of the four coefficients loaded once for both; the scalar loop's expression
 * lane by lane. */
static BN_ALWAYS_INLINE void BN_NAME(dx_cols_pair_f64)(const BN_T *dy, const BN_T *x, BN_T *dx, ptrdiff_t off,
                                                       ptrdiff_t W2, ptrdiff_t wb, const double *BN_RESTRICT em,
                                                       const double *BN_RESTRICT ea, const double *BN_RESTRICT eb,
                                                       const double *BN_RESTRICT ee)
{
    const BN_T *dr = dy + off, *xr = x + off;
    BN_T *out = dx + off;
    const ptrdiff_t body = wb - wb % 8;
    for (ptrdiff_t q = 0; q < body; q += 8) {
        const bn_v8d mv = BN_V8D_LOAD(em + q), av = BN_V8D_LOAD(ea + q), bv = BN_V8D_LOAD(eb + q),
                     ev = BN_V8D_LOAD(ee + q);
        for (int j = 0; j < 2; j++) {
            const ptrdiff_t o = j * W2 + q;
            BN_V8D_STORE(out + o, av * ((BN_V8D_LOAD(dr + o) - bv) - (BN_V8D_LOAD(xr + o) - mv) * ev));
        }
    }
    for (int j = 0; j < 2; j++)
        for (ptrdiff_t q = body; q < wb; q++) {
            const ptrdiff_t o = j * W2 + q;
            out[o] = (BN_T)(ea[q] * (((double)dr[o] - eb[q]) - ((double)xr[o] - em[q]) * ee[q]));
        }
}
#endif

/* Column mode: dx over rows [n0, n1) of an item, per-position coefficients (em unused when folded; fc, fa,
 * fo only for a recomputed mask). */
static BN_ALWAYS_INLINE void BN_NAME(grad_cols)(const BN_T *dy, const BN_T *x, const BN_T *aux, BN_T *dx,
                                                const bn_plan *p, ptrdiff_t first, ptrdiff_t wb, ptrdiff_t n0,
                                                ptrdiff_t n1, int training, int folded,
                                                const double *BN_RESTRICT em, const double *BN_RESTRICT ea,
                                                const double *BN_RESTRICT eb, const double *BN_RESTRICT ee,
                                                const double *BN_RESTRICT fc, const double *BN_RESTRICT fa,
                                                const double *BN_RESTRICT fo, const int gm)
{
    const int rc = bn_gm_from_x(gm);
#define BN_G(q) BN_NAME(grad_in)(dr, xr, ar, q, rc ? fc[q] : 0.0, rc ? fa[q] : 0.0, rc ? fo[q] : 0.0, NULL, gm)
    ptrdiff_t n = n0;
#ifdef BN_V8F_STORE
    /* float32, training, folded, g given: grad_run's vector loop with per-position coefficients. Where the
     * three coefficient arrays take more than half of a 32 KiB L1 (wb > 682), the streams evict them every
     * row; then each load of coefficients serves two rows, the item's row i and row h + i (rows a
     * half-item apart: adjacent rows in one 4 KiB page ran 2.2x slower at (32768, 256), as if the page's
     * prefetcher lost the two streams). Each dx is the same expression: the same bits. */
    if (sizeof(BN_T) == sizeof(float) && training && folded && gm == BN_GM_NONE) {
        const ptrdiff_t h = wb > 682 ? (n1 - n0) / 2 : 0;
        for (; n < n0 + h; n++) BN_NAME(dx_cols_v8)(dy, x, dx, n * p->W + first, h * p->W, wb, ea, eb, ee, 1);
        n += h;
        /* narrow rows: backward 0.94-0.98 of one row a sweep's time at (256, 64) and (512, 32) (small_ab.py),
         * backward_apply 0.92-0.96 at (16384, 64), (131072, 32) and (262144, 16) (phase_ab.py) */
        if (bn_cols_sweep4(p, wb, sizeof(BN_T)))
            for (; n + 4 <= n1; n += 4) BN_NAME(dx_cols_v8)(dy, x, dx, n * p->W + first, p->W, wb, ea, eb, ee, 3);
        for (; n < n1; n++) BN_NAME(dx_cols_v8)(dy, x, dx, n * p->W + first, 0, wb, ea, eb, ee, 0);
    }
#endif
#if BN_HAVE_VEXT
    /* float64, training, g given: the four coefficient arrays fill L1 from 1024 positions on; pairs of
     * rows half an item apart share each load (as above and as apply_cols_epi's float64 pairs). An odd
     * last row goes to the loop below. */
    if (sizeof(BN_T) == sizeof(double) && training && gm == BN_GM_NONE && wb >= 1024) {
        const ptrdiff_t h = (n1 - n0) / 2;
        for (; n < n0 + h; n++)
            BN_NAME(dx_cols_pair_f64)(dy, x, dx, n * p->W + first, h * p->W, wb, em, ea, eb, ee);
        n += h;
    }
#endif
    for (; n < n1; n++) {
        ptrdiff_t off = n * p->W + first;
        const BN_T *dr = dy + off, *xr = x + off, *ar = aux ? aux + off : NULL;
        BN_T *out = dx + off;
        if (!training)
            for (ptrdiff_t q = 0; q < wb; q++) out[q] = (BN_T)(ea[q] * BN_G(q));
        else if (folded)
            for (ptrdiff_t q = 0; q < wb; q++) out[q] = (BN_T)(ea[q] * BN_G(q) + ((double)xr[q] * ee[q] + eb[q]));
        else if (BN_FOLD)
            for (ptrdiff_t q = 0; q < wb; q++)
                out[q] = (BN_T)(ea[q] * BN_G(q) + (((double)xr[q] - em[q]) * ee[q] + eb[q]));
        else
            for (ptrdiff_t q = 0; q < wb; q++)
                out[q] = (BN_T)(ea[q] * ((BN_G(q) - eb[q]) - ((double)xr[q] - em[q]) * ee[q]));
    }
#undef BN_G
}

/* Row mode: dx over the (n, c) runs r0 .. r1-1 (run r is channel r % C, at r * S), in memory order;
 * `folded`: every channel is folded (see grad_item). */
static void BN_NAME(grad_runs)(const BN_T *dy, const BN_T *x, const BN_T *aux, BN_T *dx, const bn_plan *p,
                               ptrdiff_t r0, ptrdiff_t r1, int training, int folded, const double *centre,
                               const double *k1, const double *k2, const double *k3, const double *fcen,
                               const double *falpha, const double *foff, int gm)
{
    const ptrdiff_t S = p->S, C = p->C;
    const int recompute = bn_gm_from_x(gm), nt = bn_nt_wanted(p, sizeof(BN_T), dx, x, dy);
    for (ptrdiff_t r = r0, c = r0 % C; r < r1; r++, c = c + 1 == C ? 0 : c + 1) {
        const double m = centre[c], a = k1[c], b = k2[c], e = k3[c];
        const double fc = recompute ? fcen[c] : 0.0, fa = recompute ? falpha[c] : 0.0, fo = recompute ? foff[c] : 0.0;
        float pairs[4];
        const float *pq = BN_NAME(mask_pairs)(gm, fc, fa, fo, pairs);
        const int fold = folded || bn_is_plus_zero(m);
        const ptrdiff_t off = r * S;
        const BN_T *dr = dy + off, *xr = x + off, *ar = aux ? aux + off : NULL;
        BN_T *out = dx + off;
        switch (bn_gm_run(gm, pq)) {
        case BN_GM_Y: BN_NAME(grad_run)(dr, xr, ar, out, S, training, fold, m, a, b, e, fc, fa, fo, pq, nt, BN_GM_Y); break;
        case BN_GM_X: BN_NAME(grad_run)(dr, xr, ar, out, S, training, fold, m, a, b, e, fc, fa, fo, pq, nt, BN_GM_X); break;
        case BN_GM_XR: BN_NAME(grad_run)(dr, xr, ar, out, S, training, fold, m, a, b, e, fc, fa, fo, pq, nt, BN_GM_XR); break;
        case BN_GM_XT: BN_NAME(grad_run)(dr, xr, ar, out, S, training, fold, m, a, b, e, fc, fa, fo, pq, nt, BN_GM_XT); break;
        case BN_GM_XF: BN_NAME(grad_run)(dr, xr, ar, out, S, training, fold, m, a, b, e, fc, fa, fo, pq, nt, BN_GM_XF); break;
        case BN_GM_XRF: BN_NAME(grad_run)(dr, xr, ar, out, S, training, fold, m, a, b, e, fc, fa, fo, pq, nt, BN_GM_XRF); break;
        default: BN_NAME(grad_run)(dr, xr, ar, out, S, training, fold, m, a, b, e, fc, fa, fo, pq, nt, BN_GM_NONE);
        }
    }
    BN_NT_DONE(nt);
}

/* dx over one item, from per-channel k1, k2, k3 and centre (training) or k1 alone (frozen), and g as
 * grad_in gives it (gm; aux and the forward's coefficients fc, fa, fo for the masks).
 *  - float64: dx = k1 * ((g - k2) - (x - mean) * k3), centre = mean.
 *  - float32 (BN_FOLD): dx = k1 * g + ((x - centre) * k3 + k2), with grad_coefs' kx = -k1 * k3 in k3
 *    and: a channel with |mean| * invstd <= 2^16 (bn_fold_exact, bn_internal.h) folded, centre = +0.0
 *    and k2 = k1 * (mean * k3 - k2), so that dx = k1 * g + (x * kx + k2), a subtraction fewer; any
 *    other channel centred, centre = mean and k2 = -k1 * k2. The folded loops are the exact shortcut of
 *    the centred ones (x - (+0.0) is x), so a column-mode item with any centred channel runs the centred
 *    loop for all of them. Column mode needs 4 * (c1 - c0) * S doubles of scratch, 7 with a recomputed
 *    mask. */
static void BN_NAME(grad_item)(const BN_T *dy, const BN_T *x, const BN_T *aux, BN_T *dx, const bn_plan *p,
                               ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t n0, ptrdiff_t n1, int training,
                               const double *centre, const double *k1, const double *k2, const double *k3,
                               const double *fcen, const double *falpha, const double *foff, int gm,
                               double *scratch)
{
    const ptrdiff_t S = p->S;
    const int folded = BN_FOLD && (!training || bn_all_plus_zero(centre, c0, c1));
    const int recompute = bn_gm_from_x(gm);
    if (!p->colmode) {
        for (ptrdiff_t n = n0; n < n1; n++)
            BN_NAME(grad_runs)(dy, x, aux, dx, p, n * p->C + c0, n * p->C + c1, training, folded, centre, k1, k2,
                               k3, fcen, falpha, foff, gm);
        return;
    }
    const ptrdiff_t wb = (c1 - c0) * S, first = c0 * S;
    double *room[7];
    for (int j = 0; j < 7; j++) room[j] = j < 4 || recompute ? scratch + j * wb : NULL;
    const double *src[7] = {k1, k2, k3, folded ? NULL : centre, recompute ? fcen : NULL,
                            recompute ? falpha : NULL, recompute ? foff : NULL};
    const double *e[7];
    bn_expand(7, room, e, src, c0, c1, S);
    const double *ea = e[0], *eb = e[1], *ee = e[2], *em = e[3], *fc = e[4], *fa = e[5], *fo = e[6];
    switch (gm) {
    case BN_GM_Y:
        BN_NAME(grad_cols)(dy, x, aux, dx, p, first, wb, n0, n1, training, folded, em, ea, eb, ee, fc, fa, fo, BN_GM_Y);
        break;
    case BN_GM_X:
        BN_NAME(grad_cols)(dy, x, aux, dx, p, first, wb, n0, n1, training, folded, em, ea, eb, ee, fc, fa, fo, BN_GM_X);
        break;
    case BN_GM_XR:
        BN_NAME(grad_cols)(dy, x, aux, dx, p, first, wb, n0, n1, training, folded, em, ea, eb, ee, fc, fa, fo, BN_GM_XR);
        break;
    case BN_GM_XT:
        BN_NAME(grad_cols)(dy, x, aux, dx, p, first, wb, n0, n1, training, folded, em, ea, eb, ee, fc, fa, fo, BN_GM_XT);
        break;
    default:
        BN_NAME(grad_cols)(dy, x, aux, dx, p, first, wb, n0, n1, training, folded, em, ea, eb, ee, fc, fa, fo,
                           BN_GM_NONE);
    }
}

/* ---- the kernels as steps of the driver (bn_drive.c) --------------------------------------------- */

struct BN_NAME(bwd_args) {
    const BN_T *dy, *x;
    BN_T *dx;
    const double *mean, *invstd, *gamma;  /* gamma may be NULL */
    int training;
    double count;                         /* M, the values per channel the statistics came from */
    const double *sum_dy_in, *sum_dyxm_in; /* backward_apply: the (global) sums */
    double *sum_dy, *sum_dyxm;            /* backward_reduce: outputs */
    double *dgamma, *dbeta;               /* backward: outputs */
    double *k1, *k2, *k3, *centre;        /* per-channel coefficients of apply */
    /* the epilogue (bn_grad_epilogue): */
    int gm;                               /* BN_GM_*: how g is made from dy */
    const BN_T *aux;                      /* y (BN_GM_Y) or the residual (BN_GM_XR) */
    BN_T *dres;                           /* g, written by the reduce step; NULL: not wanted */
    double *fcen, *falpha, *foff;         /* the forward's coefficients, for a recomputed mask */
};

static void BN_NAME(item_sums)(const BN_NAME(bwd_args) *a, const bn_plan *p, ptrdiff_t c0, ptrdiff_t c1,
                               ptrdiff_t n0, ptrdiff_t n1, double *scratch, bn_sums *out)
{
    const ptrdiff_t S = p->S;
    const BN_T *dy = a->dy, *x = a->x;
    const double *mean = a->mean;
    const int gm = a->gm, recompute = bn_gm_from_x(gm);
    if (!p->colmode) {
        const ptrdiff_t stride = p->C * S, rows_per_chunk = S <= BN_SEG ? BN_SEG / S : 1;
        for (ptrdiff_t c = c0; c < c1; c++) {
            const double fc = recompute ? a->fcen[c] : 0.0, fa = recompute ? a->falpha[c] : 0.0,
                         fo = recompute ? a->foff[c] : 0.0;
            float pairs[4];
            const float *pq = BN_NAME(mask_pairs)(gm, fc, fa, fo, pairs);
            bn_sums acc = {0, 0}, r;
            for (ptrdiff_t r0 = n0; r0 < n1; r0 += rows_per_chunk) {
                ptrdiff_t runs = n1 - r0 < rows_per_chunk ? n1 - r0 : rows_per_chunk;
                for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_SEG) {
                    ptrdiff_t len = S - s0 < BN_SEG ? S - s0 : BN_SEG, off = (r0 * p->C + c) * S + s0;
                    const BN_T *aux = a->aux ? a->aux + off : NULL;
                    BN_T *dres = a->dres ? a->dres + off : NULL;
                    r = BN_NAME(runs_sums_any)(dy + off, x + off, aux, dres, len, runs, stride, mean[c], fc, fa,
                                               fo, pq, bn_gm_run(gm, pq));
                    acc.dy += r.dy;
                    acc.dyxm += r.dyxm;
                }
            }
            out[c - c0] = acc;
        }
        return;
    }
    const ptrdiff_t wb = (c1 - c0) * S, first = c0 * S;
    double *sa = scratch + wb, *sb = scratch + 2 * wb;
    double *room[4] = {scratch, recompute ? scratch + 3 * wb : NULL, recompute ? scratch + 4 * wb : NULL,
                       recompute ? scratch + 5 * wb : NULL};
    const int xt = gm == BN_GM_XT;
    const double *src[4] = {mean, recompute && !xt ? a->fcen : NULL, recompute && !xt ? a->falpha : NULL,
                            recompute && !xt ? a->foff : NULL};
    const double *e[4];
    bn_expand(4, room, e, src, c0, c1, S);
    const double *em = e[0], *fc = e[1], *fa = e[2], *fo = e[3];
    if (xt) {
        /* the range's ends per position as BN_T values in fc's and fa's room: compared with x as they are */
        BN_T *lo = (BN_T *)(void *)room[1], *hi = (BN_T *)(void *)room[2];
        for (ptrdiff_t k = 0; k < c1 - c0; k++)
            for (ptrdiff_t s = 0; s < S; s++) {
                lo[k * S + s] = (BN_T)a->fcen[c0 + k];
                hi[k * S + s] = (BN_T)a->falpha[c0 + k];
            }
    }
    for (ptrdiff_t q = 0; q < wb; q++) sa[q] = sb[q] = 0;
#define BN_CASE(GM)                                                                                       \
    if (a->dres)                                                                                          \
        BN_NAME(cols_sums_gm)(dy, x, a->aux, a->dres, p, first, wb, n0, n1, em, fc, fa, fo, sa, sb, GM, 1); \
    else                                                                                                  \
        BN_NAME(cols_sums_gm)(dy, x, a->aux, NULL, p, first, wb, n0, n1, em, fc, fa, fo, sa, sb, GM, 0);    \
    break;
    switch (gm) {
    case BN_GM_Y: BN_CASE(BN_GM_Y)
    case BN_GM_X: BN_CASE(BN_GM_X)
    case BN_GM_XR: BN_CASE(BN_GM_XR)
    case BN_GM_XT: BN_CASE(BN_GM_XT)
    default:
        BN_NAME(cols_sums_gm)(dy, x, NULL, NULL, p, first, wb, n0, n1, em, NULL, NULL, NULL, sa, sb, BN_GM_NONE, 0);
    }
#undef BN_CASE
    if (S == 1) /* the loop below with one position: its first additions, 0 + v (+0.0 for -0.0), as they are */
        for (ptrdiff_t k = 0; k < c1 - c0; k++) {
            out[k].dy = 0.0 + sa[k];
            out[k].dyxm = 0.0 + sb[k];
        }
    else
        for (ptrdiff_t k = 0; k < c1 - c0; k++) {
            bn_sums r = {0, 0};
            for (ptrdiff_t s = 0; s < S; s++) {
                r.dy += sa[k * S + s];
                r.dyxm += sb[k * S + s];
            }
            out[k] = r;
        }
}

/* Column mode needs per-position scratch: 3 arrays for the sums, 4 for apply, one after another
 * (unpadded, as fwd_scratch's); a recomputed mask needs the forward's 3 coefficients beside them. */
static ptrdiff_t BN_NAME(bwd_scratch)(const bn_plan *p, int gm)
{
    const int arrays = bn_gm_from_x(gm) ? 7 : 4;
    return p->colmode ? arrays * p->ch_per_block * p->S : 0;
}

static void BN_NAME(sums_reduce)(const bn_job *job, bn_item w, double *scratch, void *out)
{
    const BN_NAME(bwd_args) *a = job->args;
    BN_NAME(item_sums)(a, job->plan, w.c0, w.c1, w.n0, w.n1, scratch, (bn_sums *)out);
}

/* Channel c's sums: its row groups' parts added in group order. */
static inline bn_sums BN_NAME(merged_sums)(const bn_job *job, ptrdiff_t c, const void *parts)
{
    const bn_sums *ps = parts;
    const ptrdiff_t C = job->plan->C;
    bn_sums s = ps[c];
    for (ptrdiff_t g = 1; g < job->plan->ngroups; g++) {
        s.dy += ps[g * C + c].dy;
        s.dyxm += ps[g * C + c].dyxm;
    }
    return s;
}

/* k1, k2, k3 and centre of channels [c0, c1) from their sums s[c - c0] (see the derivation at the top, and
 * grad_item for float32's two forms), and with `outputs` dbeta and dgamma too. One loop over channels with
 * restrict parameters and selects, which GCC vectorizes: wide layers spend most of a small call here (two
 * divisions a channel; (2, 4096) float32). Every array of a vector of channels is read before the first
 * store: the per-channel arrays are often 4 KiB apart (C = 512), and a load after a store to an address
 * with the same low 12 bits waits for it (this step ran 2.5x slower at (64, 512)). */
BN_NOINLINE static void BN_NAME(coefs_loop)(ptrdiff_t n, const double *BN_RESTRICT mean,
                                             const double *BN_RESTRICT invstd, const double *BN_RESTRICT gamma,
                                             const bn_sums *BN_RESTRICT s, double count, int training,
                                             double *BN_RESTRICT k1o, double *BN_RESTRICT k2o,
                                             double *BN_RESTRICT k3o, double *BN_RESTRICT centreo,
                                             double *BN_RESTRICT dbeta, double *BN_RESTRICT dgammao)
{
    /* restrict parameters, not locals: GCC honours only these, and the loop needs 12 alias checks else */
#define BN_COEFS_LOOP(HAS_GAMMA, OUTPUTS)                                                                     \
    for (ptrdiff_t c = 0; c < n; c++) {                                                                   \
        const double m = mean[c], is = invstd[c], sdy = s[c].dy, sdyxm = s[c].dyxm;                       \
        const double dgamma = is * sdyxm;                                                                 \
        const double k1 = HAS_GAMMA ? gamma[c] * is : is;                                                 \
        double k2 = training ? sdy / count : 0.0;                                                         \
        double k3 = training ? is * dgamma / count : 0.0;                                                 \
        double centre = m;                                                                                \
        if (BN_FOLD && training) {                                                                        \
            const int fold = bn_fold_exact(m, is);                                                        \
            const double kx = -k1 * k3, k2_folded = k1 * (m * k3 - k2), k2_centred = -k1 * k2;            \
            k2 = fold ? k2_folded : k2_centred;                                                           \
            centre = fold ? 0.0 : m;                                                                      \
            k3 = kx;                                                                                      \
        }                                                                                                 \
        if (OUTPUTS) {                                                                                    \
            dbeta[c] = sdy;                                                                               \
            dgammao[c] = dgamma;                                                                          \
        }                                                                                                 \
        k1o[c] = k1;                                                                                      \
        k2o[c] = k2;                                                                                      \
        k3o[c] = k3;                                                                                      \
        centreo[c] = centre;                                                                              \
    }
    if (gamma && dbeta) BN_COEFS_LOOP(1, 1)
    else if (gamma) BN_COEFS_LOOP(1, 0)
    else if (dbeta) BN_COEFS_LOOP(0, 1)
    else BN_COEFS_LOOP(0, 0)
#undef BN_COEFS_LOOP
}

static void BN_NAME(grad_coefs)(const BN_NAME(bwd_args) *a, const bn_sums *s, ptrdiff_t c0, ptrdiff_t c1,
                                int outputs)
{
    BN_NAME(coefs_loop)(c1 - c0, a->mean + c0, a->invstd + c0, a->gamma ? a->gamma + c0 : NULL, s, a->count,
                        a->training, a->k1 + c0, a->k2 + c0, a->k3 + c0, a->centre + c0,
                        outputs ? a->dbeta + c0 : NULL, outputs ? a->dgamma + c0 : NULL);
}

static void BN_NAME(reduce_finish)(const bn_job *job, ptrdiff_t c0, ptrdiff_t c1, const void *parts)
{
    const BN_NAME(bwd_args) *a = job->args;
    for (ptrdiff_t c = c0; c < c1; c++) {
        const bn_sums s = BN_NAME(merged_sums)(job, c, parts);
        a->sum_dy[c] = s.dy;
        a->sum_dyxm[c] = s.dyxm;
    }
}

/* The sums of channels [c0, c1), merged, a block at a time for grad_coefs (with one row group, the parts
 * themselves). */
#define BN_COEF_BLOCK 256
static void BN_NAME(backward_finish)(const bn_job *job, ptrdiff_t c0, ptrdiff_t c1, const void *parts)
{
    if (job->plan->ngroups == 1) {
        BN_NAME(grad_coefs)(job->args, (const bn_sums *)parts + c0, c0, c1, 1);
        return;
    }
    bn_sums s[BN_COEF_BLOCK];
    for (ptrdiff_t b0 = c0; b0 < c1; b0 += BN_COEF_BLOCK) {
        const ptrdiff_t b1 = c1 - b0 < BN_COEF_BLOCK ? c1 : b0 + BN_COEF_BLOCK;
        for (ptrdiff_t c = b0; c < b1; c++) s[c - b0] = BN_NAME(merged_sums)(job, c, parts);
        BN_NAME(grad_coefs)(job->args, s, b0, b1, 1);
    }
}

static void BN_NAME(apply_finish)(const bn_job *job, ptrdiff_t c0, ptrdiff_t c1, const void *parts)
{
    const BN_NAME(bwd_args) *a = job->args;
    bn_sums s[BN_COEF_BLOCK];
    (void)parts;
    for (ptrdiff_t b0 = c0; b0 < c1; b0 += BN_COEF_BLOCK) {
        const ptrdiff_t b1 = c1 - b0 < BN_COEF_BLOCK ? c1 : b0 + BN_COEF_BLOCK;
        for (ptrdiff_t c = b0; c < b1; c++) {
            s[c - b0].dy = a->sum_dy_in[c];
            s[c - b0].dyxm = a->sum_dyxm_in[c];
        }
        BN_NAME(grad_coefs)(a, s, b0, b1, 0);
    }
}

/* With the masked g written to dres by the reduce step, apply reads it as its dy (one stream fewer than
 * recomputing the mask from y and dy again); otherwise it makes g as the reduce step did. */
static void BN_NAME(grad_apply)(const bn_job *job, bn_item w, double *scratch)
{
    const BN_NAME(bwd_args) *a = job->args;
    if (a->dres)
        BN_NAME(grad_item)(a->dres, a->x, NULL, a->dx, job->plan, w.c0, w.c1, w.n0, w.n1, a->training, a->centre,
                           a->k1, a->k2, a->k3, NULL, NULL, NULL, BN_GM_NONE, scratch);
    else
        BN_NAME(grad_item)(a->dy, a->x, a->aux, a->dx, job->plan, w.c0, w.c1, w.n0, w.n1, a->training, a->centre,
                           a->k1, a->k2, a->k3, a->fcen, a->falpha, a->foff, a->gm, scratch);
}

/* Row mode, after the reduction: the runs r0 .. r1-1 in memory order (bn_job's apply_rows). */
static void BN_NAME(grad_apply_rows)(const bn_job *job, ptrdiff_t r0, ptrdiff_t r1)
{
    const BN_NAME(bwd_args) *a = job->args;
    const int folded = BN_FOLD && (!a->training || bn_all_plus_zero(a->centre, 0, job->plan->C));
    if (a->dres)
        BN_NAME(grad_runs)(a->dres, a->x, NULL, a->dx, job->plan, r0, r1, a->training, folded, a->centre, a->k1,
                           a->k2, a->k3, NULL, NULL, NULL, BN_GM_NONE);
    else
        BN_NAME(grad_runs)(a->dy, a->x, a->aux, a->dx, job->plan, r0, r1, a->training, folded, a->centre, a->k1,
                           a->k2, a->k3, a->fcen, a->falpha, a->foff, a->gm);
}

/* Two inputs stream through every backward kernel: their plan sizes items for both, and
 * backward_reduce must cut exactly as backward does to give its bits. */
static void BN_NAME(bwd_plan)(bn_plan *p, bn_dims d, int nthreads, ptrdiff_t min_elems)
{
    bn_make_plan(p, d, 2 * sizeof(BN_T), nthreads, min_elems);
}

int BN_NAME(bn_backward_reduce)(const BN_T *dy, const BN_T *x, bn_dims d, const double *mean,
                                double *sum_dy, double *sum_dy_xmu, int nthreads)
{
    bn_plan p;
    BN_NAME(bwd_plan)(&p, d, nthreads, BN_PARALLEL_MIN_ELEMS);
    BN_NAME(bwd_args) a = {dy, x, NULL, mean, NULL, NULL, 1, 0.0, NULL, NULL, sum_dy, sum_dy_xmu,
                           NULL, NULL, NULL, NULL, NULL, NULL, BN_GM_NONE, NULL, NULL, NULL, NULL, NULL};
    bn_job job = {&p, BN_NAME(sums_reduce), BN_NAME(reduce_finish), NULL, NULL, sizeof(bn_sums),
                  BN_NAME(bwd_scratch)(&p, BN_GM_NONE), &a};
    return bn_drive(&job);
}

int BN_NAME(bn_backward_apply)(const BN_T *dy, const BN_T *x, BN_T *dx, bn_dims d, const double *mean,
                               const double *invstd, const double *gamma, const double *sum_dy,
                               const double *sum_dy_xmu, double count, int nthreads)
{
    bn_plan p;
    BN_NAME(bwd_plan)(&p, d, nthreads, BN_PARALLEL_MIN_ELEMS);
    double *k = bn_scratch_take(sizeof(double) * bn_padded_size(d.C, 4));
    if (!k) return BN_ENOMEM;
    BN_NAME(bwd_args) a = {dy, x, dx, mean, invstd, gamma, 1, count, sum_dy, sum_dy_xmu, NULL, NULL, NULL, NULL,
                           k, bn_padded_array(k, d.C, 1), bn_padded_array(k, d.C, 2), bn_padded_array(k, d.C, 3),
                           BN_GM_NONE, NULL, NULL, NULL, NULL, NULL};
    bn_job job = {&p, NULL, BN_NAME(apply_finish), BN_NAME(grad_apply), BN_NAME(grad_apply_rows), 0,
                  BN_NAME(bwd_scratch)(&p, BN_GM_NONE), &a};
    int status = bn_drive(&job);
    bn_scratch_give(k);
    return status;
}

int BN_NAME(bn_backward)(const BN_T *dy, const BN_T *x, BN_T *dx, bn_dims d, const double *mean,
                         const double *invstd, const double *gamma, int training, double *dgamma,
                         double *dbeta, const bn_grad_epilogue *ep, int nthreads)
{
    bn_plan p;
    /* the training backward (two passes over two inputs) pays for a second thread sooner */
    BN_NAME(bwd_plan)(&p, d, nthreads, training ? BN_PARALLEL_MIN_ELEMS_BACKWARD : BN_PARALLEL_MIN_ELEMS);
    const int gm = !ep || ep->mask == BN_MASK_NONE ? BN_GM_NONE
                   : ep->mask == BN_MASK_Y       ? BN_GM_Y
                   : ep->residual                ? BN_GM_XR
                                                 : BN_GM_X;
    const int recompute = bn_gm_from_x(gm);
    double *k = bn_scratch_take(sizeof(double) * bn_padded_size(d.C, recompute ? 7 : 4));
    if (!k) return BN_ENOMEM;
    BN_NAME(bwd_args) a = {dy, x, dx, mean, invstd, gamma, training, (double)d.N * (double)d.S, NULL, NULL,
                           NULL, NULL, dgamma, dbeta, k, bn_padded_array(k, d.C, 1), bn_padded_array(k, d.C, 2),
                           bn_padded_array(k, d.C, 3), gm, NULL, NULL, NULL, NULL, NULL};
    if (ep) {
        a.aux = gm == BN_GM_Y ? ep->y : gm == BN_GM_XR ? ep->residual : NULL;
        a.dres = ep->d_residual;
    }
    /* The masked g is cheaper kept than made again: the reduce step writes it into dx (unless dx is x, which
     * apply still reads) and apply reads it there. Measured at (32, 64, 8, 8), (256, 2048) and
     * (32, 64, 56, 56) float32: 20-25% less time than recomputing the mask from x in apply, even where the
     * store is a stream more to memory. The same g either way: the same bits. */
    if (gm != BN_GM_NONE && !a.dres && (const void *)dx != (const void *)x) a.dres = dx;
    if (recompute) {
        /* the coefficients the forward normalized with, from the same values by the same function */
        a.fcen = bn_padded_array(k, d.C, 4);
        a.falpha = bn_padded_array(k, d.C, 5);
        a.foff = bn_padded_array(k, d.C, 6);
        BN_NAME(bn_coefs_range)(d.C, mean, invstd, gamma, ep->beta, a.falpha, a.fcen, a.foff);
        /* the mask as a range of x (mask_bounds), where the coefficients are finite (a NaN or inf statistic
         * keeps the forward's arithmetic): at (32, 64, 8, 8) float32 the recomputed mask cost the backward
         * more than reading y for it. Finding a range costs ~10 ns a channel, which channels of a few values
         * (64 or fewer; (8, 512): 1.1x) do not win back. */
        int range = gm == BN_GM_X && (double)d.N * (double)d.S >= BN_MASK_RANGE_MIN_COUNT;
        for (ptrdiff_t c = 0; range && c < d.C; c++)
            range = isfinite(a.falpha[c]) && isfinite(a.fcen[c]) && isfinite(a.foff[c]);
        if (range) {
            for (ptrdiff_t c = 0; c < d.C; c++)
                BN_NAME(mask_bounds)(a.fcen[c], a.falpha[c], a.foff[c], p.colmode, &a.fcen[c], &a.falpha[c]);
            a.gm = BN_GM_XT;
        }
    }
    bn_job job = {&p, BN_NAME(sums_reduce), BN_NAME(backward_finish), BN_NAME(grad_apply), BN_NAME(grad_apply_rows),
                  sizeof(bn_sums), BN_NAME(bwd_scratch)(&p, gm), &a};
    int status = bn_drive(&job);
    bn_scratch_give(k);
    return status;
}
#undef BN_FOLD
