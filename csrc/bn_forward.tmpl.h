/*
 * bn_forward.tmpl.h - the forward direction, written once for every element type and instruction set:
 * the statistics step (per-item moments), the normalize step, and the kernels made of them
 * (batch_stats, normalize, forward_train). Included by bn_forward.c, bn_avx2.c and bn_avx512.c with BN_T
 * (the element type) and BN_NAME(f) (f with the type's and instruction set's suffix).
 *
 * Algebra: with alpha = invstd * gamma, y = (x - centre) * alpha + offset, evaluated in double, where
 *  - centre = mean, offset = beta: the subtraction happens first, so a mean that is 1e5 times the spread
 *    costs no digits of y. float64 always; float32 where the fold below would not be exact.
 *  - centre = +0.0, offset = beta - mean * alpha (BN_FOLD: float32 channels with |mean| * invstd <= 2^16,
 *    bn_fold_exact in bn_internal.h derives the bound): y = x * alpha + offset, still in double, within
 *    1/1000 of a float32 half ulp of the centred y. It saves a subtraction per value and, in column mode,
 *    one of three per-position coefficient arrays, whose L1 footprint is what slowed (8192, 1024). */

/*
 * The statistics step works relative to each channel's shift K (bn_stats_shift): a chunk's moments are
 * (count, mean - K, m2), so the partial means that the merges subtract from one another are of the size
 * of the spread. A chunk is reduced in two passes over data still in cache:
 *  1. sum = Sum (x - K). For float32 data (BN_RAW_SUMS) the values are summed as they are and count * K
 *     taken off once: float32 values of a chunk are multiples of a common quantum q (the ulp of its
 *     smallest magnitude), and while |sum| < 2^53 q no addition rounds, so the sum is exact whenever
 *     the chunk's magnitudes are within a factor 2^17 of each other (2^17 = 2^53 / 2^24 significand /
 *     2^12 values, for chunks of at most BN_SEG); count * K is exact (24 + 12 bits). Otherwise the sum
 *     rounds as any double sum would. This keeps the pass at one conversion and one add per value,
 *     as before the shift: the add pipes are what bound it (one more add cost 10-20%). float64 values
 *     subtract K first: x - K is exact within a factor 2 of K (Sterbenz) and otherwise rounds at 2^-53
 *     of |x - K|, so a partial mean is good to 2^-53 of |mean - K| (before the shift: of |mean|).
 *  2. centre = K + mean rounded; m2 = Sum (x - centre)^2 - count * off^2, off = mean - (centre - K),
 *     the rounding error of centre: Sum (x - centre)^2 = m2 + count * (true mean - centre)^2 exactly,
 *     x - centre is exact near the mean (Sterbenz), and centre - K is exact (Sterbenz; or else the
 *     spread dwarfs off). One subtraction per value, as centring on an absolute mean would need.
 * Column mode reduces only the first chunk of a row group so (col_chunk_two_pass); its later chunks are
 * read once, centred on the running mean (col_chunk_one_pass).
 */
#define BN_RAW_SUMS (sizeof(BN_T) < sizeof(double))

/* Pass 1's term: x, or x - K for float64 (see above). */
static inline double BN_NAME(pass1_term)(BN_T v, double shift)
{
    return BN_RAW_SUMS ? (double)v : (double)v - shift;
}

/* The mean - K of `count` values from pass 1's sum. */
static inline double BN_NAME(pass1_mean)(double sum, double count, double shift)
{
    return (BN_RAW_SUMS ? sum - count * shift : sum) / count;
}

/* Moments of `runs` runs of `len` contiguous values, `stride` apart, relative to `shift`, in the two
 * passes described above, while they sit in L1 (callers keep runs * len <= BN_SEG). BN_LANES fixed
 * accumulator lanes per run, then each run's tail, fix the order of additions in the code itself, so
 * the loops vectorize without reassociation; 16 lanes are four AVX2 chains, enough to hide the add
 * latency. Not inlined (BN_NOINLINE): inlined into its caller, GCC spilled an accumulator. */
BN_NOINLINE static bn_moments BN_NAME(runs_moments)(const BN_T *x, ptrdiff_t len, ptrdiff_t runs,
                                                    ptrdiff_t stride, double shift)
{
    double acc[BN_LANES] = {0}, tail = 0;
    const ptrdiff_t body = len - len % BN_LANES;
    for (ptrdiff_t r = 0; r < runs; r++) {
        const BN_T *v = x + r * stride;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) acc[j] += BN_NAME(pass1_term)(v[i + j], shift);
        for (ptrdiff_t i = body; i < len; i++) tail += BN_NAME(pass1_term)(v[i], shift);
    }
    const double count = (double)len * (double)runs;
    const double mean = BN_NAME(pass1_mean)(bn_lanes_sum(acc) + tail, count, shift);
    const double centre = shift + mean, off = mean - (centre - shift);
    for (int j = 0; j < BN_LANES; j++) acc[j] = 0;
    tail = 0;
    for (ptrdiff_t r = 0; r < runs; r++) {
        const BN_T *v = x + r * stride;
        for (ptrdiff_t i = 0; i < body; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) {
                double dev = (double)v[i + j] - centre;
                acc[j] += dev * dev;
            }
        for (ptrdiff_t i = body; i < len; i++) {
            double dev = (double)v[i] - centre;
            tail += dev * dev;
        }
    }
    double m2 = (bn_lanes_sum(acc) + tail) - count * off * off;
    bn_moments m = {count, mean, m2};
    return m;
}

/* The shift of channel c: its first value x[0, c, 0], or 0 when that is not finite (bn_stats_shift). */
static inline double BN_NAME(channel_shift)(const BN_T *x, const bn_plan *p, ptrdiff_t c)
{
    return bn_stats_shift((double)x[c * p->S]);
}

/* Row mode: moments of channels [c0, c1) over rows [n0, n1) into out[0 .. c1-c0), relative to each
 * channel's shift. Per channel, chunks of up to BN_SEG values (several short rows, or a piece of a long
 * one) are reduced in two passes and merged in row order. */
static void BN_NAME(row_item_moments)(const BN_T *x, const bn_plan *p, ptrdiff_t c0, ptrdiff_t c1,
                                      ptrdiff_t n0, ptrdiff_t n1, bn_moments *out)
{
    const ptrdiff_t S = p->S, stride = p->C * S, rows_per_chunk = S <= BN_SEG ? BN_SEG / S : 1;
    for (ptrdiff_t c = c0; c < c1; c++) {
        const double shift = BN_NAME(channel_shift)(x, p, c);
        bn_moments acc = {0, 0, 0};
        for (ptrdiff_t r0 = n0; r0 < n1; r0 += rows_per_chunk) {
            ptrdiff_t runs = n1 - r0 < rows_per_chunk ? n1 - r0 : rows_per_chunk;
            for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_SEG) {
                ptrdiff_t len = S - s0 < BN_SEG ? S - s0 : BN_SEG, off = (r0 * p->C + c) * S + s0;
                bn_moments_merge(&acc, BN_NAME(runs_moments)(x + off, len, runs, stride, shift));
            }
        }
        out[c - c0] = acc;
    }
}

/* One sweep of R rows (ra, ra + W, ...; R = 1 or 4) over positions [0, wb) of column mode's two passes:
 * pass 1 adds pass1_term(x, ref[q]) to acc[q], pass 2 adds (x - ref[q])^2, each position its rows in
 * order, as the plain loop does (the same bits); with the vector extensions 8 positions a step, each
 * loaded and converted with one instruction where GCC's own loop converted halves of 16. Returns the
 * first position it left to the caller's plain loop. */
static BN_ALWAYS_INLINE ptrdiff_t BN_NAME(col_sweep)(const BN_T *ra, ptrdiff_t W, ptrdiff_t wb, double *BN_RESTRICT acc,
                                                     const double *BN_RESTRICT ref, const int pass, const int R)
{
    ptrdiff_t q = 0;
#if BN_HAVE_VEXT
    /* Four rows: float32 only; float64 has no conversion to save, and its statistics ran 0-7% slower */
    for (; (sizeof(BN_T) == sizeof(float) || R == 1) && q + 8 <= wb; q += 8) {
        const bn_v8d r = BN_V8D_LOAD(ref + q);
        bn_v8d a = BN_V8D_LOAD(acc + q);
        for (int j = 0; j < R; j++) {
            const bn_v8d v = BN_V8D_LOAD(ra + j * W + q);
            if (pass == 2) {
                const bn_v8d d = v - r;
                a += d * d;
            } else {
                a += BN_RAW_SUMS ? v : v - r;
            }
        }
        BN_V8D_STORE(acc + q, a);
    }
#endif
    return q;
}

/* Column mode's first chunk of an item, rows [r0, r1), in the two passes described above: per position q
 * its mean - K into mean[q] and its m2 into m2[q]; centre is scratch. */
static void BN_NAME(col_chunk_two_pass)(const BN_T *base, ptrdiff_t W, ptrdiff_t wb, ptrdiff_t r0, ptrdiff_t r1,
                                        int rowwise, const double *BN_RESTRICT shift, double *BN_RESTRICT mean,
                                        double *BN_RESTRICT m2, double *BN_RESTRICT centre)
{
    const double cnt = (double)(r1 - r0);
    for (ptrdiff_t q = 0; q < wb; q++) mean[q] = 0;
    /* Four rows per sweep: each position adds its values in row order, as one row per sweep would, but
     * loads and stores its running sum (and, for float64, its shift) once per four values (the float64
     * statistics at (64, 512) and (256, 512) ran 20-30% faster). */
    ptrdiff_t r = r0;
    for (; !rowwise && r + 4 <= r1; r += 4) {
        const BN_T *ra = base + r * W, *rb = ra + W, *rc = rb + W, *rd = rc + W;
        for (ptrdiff_t q = BN_NAME(col_sweep)(ra, W, wb, mean, shift, 1, 4); q < wb; q++) {
            const double sq = shift[q];
            double acc = mean[q];
            acc += BN_NAME(pass1_term)(ra[q], sq);
            acc += BN_NAME(pass1_term)(rb[q], sq);
            acc += BN_NAME(pass1_term)(rc[q], sq);
            acc += BN_NAME(pass1_term)(rd[q], sq);
            mean[q] = acc;
        }
    }
    for (; r < r1; r++) { /* the rows left, or every row (rowwise) */
        const BN_T *row = base + r * W;
        for (ptrdiff_t q = BN_NAME(col_sweep)(row, W, wb, mean, shift, 1, 1); q < wb; q++)
            mean[q] += BN_NAME(pass1_term)(row[q], shift[q]);
    }
    for (ptrdiff_t q = 0; q < wb; q++) {
        mean[q] = BN_NAME(pass1_mean)(mean[q], cnt, shift[q]);
        centre[q] = shift[q] + mean[q];
        m2[q] = 0;
    }
    for (r = r0; r + 4 <= r1; r += 4) {
        const BN_T *ra = base + r * W, *rb = ra + W, *rc = rb + W, *rd = rc + W;
        for (ptrdiff_t q = BN_NAME(col_sweep)(ra, W, wb, m2, centre, 2, 4); q < wb; q++) {
            const double cq = centre[q];
            double acc = m2[q], da = (double)ra[q] - cq, db = (double)rb[q] - cq, dc = (double)rc[q] - cq,
                   dd = (double)rd[q] - cq;
            acc += da * da;
            acc += db * db;
            acc += dc * dc;
            acc += dd * dd;
            m2[q] = acc;
        }
    }
    for (; r < r1; r++) {
        const BN_T *row = base + r * W;
        for (ptrdiff_t q = 0; q < wb; q++) {
            double dev = (double)row[q] - centre[q];
            m2[q] += dev * dev;
        }
    }
    for (ptrdiff_t q = 0; q < wb; q++) { /* m2 less count * off^2 (see above) */
        const double off = mean[q] - (centre[q] - shift[q]);
        m2[q] = m2[q] - cnt * off * off;
    }
}

/* One sweep of R rows (ra, ra + W, ...) over positions [0, wb) of column mode's one pass: d = x - ref[q],
 * s1[q] += d, s2[q] += d * d (from 0 with init), each position its rows in order (the plain loop's bits),
 * 8 positions a step with the vector extensions, the rest one at a time. */
static BN_ALWAYS_INLINE void BN_NAME(col_sweep_dev)(const BN_T *ra, ptrdiff_t W, ptrdiff_t wb,
                                                         double *BN_RESTRICT s1, double *BN_RESTRICT s2,
                                                         const double *BN_RESTRICT ref, const int R, const int init)
{
    ptrdiff_t q = 0;
#if BN_HAVE_VEXT
    for (; q + 8 <= wb; q += 8) {
        const bn_v8d c = BN_V8D_LOAD(ref + q), zero = {0, 0, 0, 0, 0, 0, 0, 0};
        bn_v8d a = init ? zero : BN_V8D_LOAD(s1 + q), b = init ? zero : BN_V8D_LOAD(s2 + q);
        for (int j = 0; j < R; j++) {
            const bn_v8d d = BN_V8D_LOAD(ra + j * W + q) - c;
            a += d;
            b += d * d;
        }
        BN_V8D_STORE(s1 + q, a);
        BN_V8D_STORE(s2 + q, b);
    }
#endif
    for (; q < wb; q++) {
        const double c = ref[q];
        double a = init ? 0 : s1[q], b = init ? 0 : s2[q];
        for (int j = 0; j < R; j++) {
            const double d = (double)ra[j * W + q] - c;
            a += d;
            b += d * d;
        }
        s1[q] = a;
        s2[q] = b;
    }
}

/* The end of a one-pass chunk (col_chunk_one_pass): s1 in mean[q] and s2 in m2[q] become the chunk's
 * mean - K and m2. */
static void BN_NAME(col_chunk_finish)(const BN_T *base, ptrdiff_t W, ptrdiff_t wb, ptrdiff_t r0, ptrdiff_t r1,
                                      const double *BN_RESTRICT shift, double *BN_RESTRICT mean,
                                      double *BN_RESTRICT m2, const double *BN_RESTRICT centre)
{
    const double cnt = (double)(r1 - r0);
    /* Positions whose s2 was not finite get a non-finite m2 here (and nowhere else but within an ulp
     * of overflow); they are redone in two passes. */
    uint64_t nonfinite = 0;
    for (ptrdiff_t q = 0; q < wb; q++) {
        const double s = mean[q], d2 = m2[q] - s * (s / cnt), v = d2 < 0 ? 0 : d2;
        mean[q] = (centre[q] - shift[q]) + s / cnt;
        m2[q] = v;
        nonfinite |= bn_nonfinite_bit(v);
    }
    if (nonfinite)
        for (ptrdiff_t q = 0; q < wb; q++)
            if (!(m2[q] <= DBL_MAX)) {
                double centre_q; /* the two passes' scratch for this one position */
                BN_NAME(col_chunk_two_pass)(base + q, W, 1, r0, r1, 0, shift + q, &mean[q], &m2[q], &centre_q);
            }
}

/* Column mode's later chunks of an item, rows [r0, r1), in one pass about centre[q] (the running mean so
 * far, rounded): s1 = Sum d, s2 = Sum d^2 with d = x - centre, then mean - K = (centre - K) + s1 / count
 * into mean[q] and m2 = s2 - s1^2 / count into m2[q] (0 where rounding takes it below).
 *  - Accuracy: s2 - s1^2 / count loses about 2^-53 of count * (chunk mean - centre)^2. Summed over the
 *    chunks, those squared distances from the running mean are at most a few times the item's m2 (a
 *    discrete Hardy inequality): m2 keeps a relative error of a few float64 ulps. Measured against
 *    exactly rounded sums on drifting rows (sorted, trending, a chunk 1e6 away; test_accuracy): at most
 *    7.6e-15, the two passes 8.2e-15 (centred on the first chunk's mean throughout instead: 1.6e-13).
 *  - Speed: the chunk is read once, from memory, where the two passes read it again from cache:
 *    batch_stats of (8192, 1024) at one thread took 0.76 of the time (float32; float64 0.80).
 *  - Where s2 is not finite (an infinite or NaN value, or d^2 overflowing), that position's chunk takes
 *    col_chunk_two_pass, whose infinities and NaNs the callers were written for. */
static void BN_NAME(col_chunk_one_pass)(const BN_T *base, ptrdiff_t W, ptrdiff_t wb, ptrdiff_t r0, ptrdiff_t r1,
                                        const double *BN_RESTRICT shift, double *BN_RESTRICT mean,
                                        double *BN_RESTRICT m2, const double *BN_RESTRICT centre)
{
    ptrdiff_t r = r0;
    if (r1 - r0 >= 8) {
        BN_NAME(col_sweep_dev)(base + r * W, W, wb, mean, m2, centre, 8, 1);
        r += 8;
    } else {
        for (ptrdiff_t q = 0; q < wb; q++) mean[q] = m2[q] = 0;
    }
    for (; r + 8 <= r1; r += 8) BN_NAME(col_sweep_dev)(base + r * W, W, wb, mean, m2, centre, 8, 0);
    for (; r < r1; r++) BN_NAME(col_sweep_dev)(base + r * W, W, wb, mean, m2, centre, 1, 0);
    BN_NAME(col_chunk_finish)(base, W, wb, r0, r1, shift, mean, m2, centre);
}

/* col_chunk_one_pass for narrow rows streamed from memory (col_later_chunks: W < 1024, one block, so
 * rows are contiguous): k rows at a time are read as one virtual row of V = k * W >= 1024 positions,
 * each with its own sums (vs1, vs2; vc the centres, each position's k times), then a position's k sums
 * are added in order and the rows left over (fewer than k) added one at a time. Eight rows of 1 KiB a
 * sweep ran at 1.4x the time of the two passes over (64, 28, 28, 256) float32, as if the prefetcher lost
 * streams that end after 16 lines; eight virtual rows of 4 KiB are what (8192, 1024) reads. */
static void BN_NAME(col_chunk_one_pass_virtual)(const BN_T *base, ptrdiff_t W, ptrdiff_t k, ptrdiff_t r0,
                                                ptrdiff_t r1, const double *BN_RESTRICT shift,
                                                double *BN_RESTRICT mean, double *BN_RESTRICT m2,
                                                const double *BN_RESTRICT centre, double *BN_RESTRICT vs1,
                                                double *BN_RESTRICT vs2, double *BN_RESTRICT vc)
{
    const ptrdiff_t V = k * W, nv = (r1 - r0) / k;
    const BN_T *b0 = base + r0 * W;
    for (ptrdiff_t j = 0; j < k; j++) memcpy(vc + j * W, centre, (size_t)W * sizeof(double));
    ptrdiff_t v = 0;
    if (nv >= 8) {
        BN_NAME(col_sweep_dev)(b0, V, V, vs1, vs2, vc, 8, 1);
        v = 8;
    } else {
        for (ptrdiff_t q = 0; q < V; q++) vs1[q] = vs2[q] = 0;
    }
    for (; v + 8 <= nv; v += 8) BN_NAME(col_sweep_dev)(b0 + v * V, V, V, vs1, vs2, vc, 8, 0);
    for (; v < nv; v++) BN_NAME(col_sweep_dev)(b0 + v * V, V, V, vs1, vs2, vc, 1, 0);
    for (ptrdiff_t q = 0; q < W; q++) {
        mean[q] = vs1[q];
        m2[q] = vs2[q];
    }
    for (ptrdiff_t j = 1; j < k; j++)
        for (ptrdiff_t q = 0; q < W; q++) {
            mean[q] += vs1[j * W + q];
            m2[q] += vs2[j * W + q];
        }
    for (ptrdiff_t r = r0 + nv * k; r < r1; r++) BN_NAME(col_sweep_dev)(base + r * W, W, W, mean, m2, centre, 1, 0);
    BN_NAME(col_chunk_finish)(base, W, W, r0, r1, shift, mean, m2, centre);
}

/* How column mode reduces a row group's chunks after its first: rows per virtual row k >= 2 (with
 * k * W >= 1024; col_chunk_one_pass_virtual), 1 for col_chunk_one_pass, or 0 for the two passes
 * throughout. Rows of 1024 positions or more, or a tensor that L3 may hold, take the plain one pass.
 * Narrower rows streamed from memory take virtual rows, except rows of 256 to 512 bytes, where the two
 * passes (the first one row at a time: a single sequential stream of short rows) were faster: batch_stats
 * at one thread, virtual rows over the two passes' time, 64 MiB tensors: 1.16 (float64, 32 positions),
 * 1.11 (float64, 64), 1.07 (float32, 64); against 0.81 (float64, 16), 0.75 (float64, 128), 0.88
 * (float64, 256), 0.86 (float64, 512), 0.67 (float32, 16), 0.84 (float32, 512); 49 MiB: 0.80 (float32,
 * 256). By shape and element size alone (the bits depend on it), never by instruction set. */
static inline ptrdiff_t BN_NAME(col_later_chunks)(const bn_plan *p)
{
    const double row_bytes = (double)p->W * (double)sizeof(BN_T);
    if (!p->colmode || p->nblocks != 1 || p->W >= 1024 || !bn_streamed(p, sizeof(BN_T))) return 1;
    if (row_bytes >= 256 && row_bytes <= 512) return 0;
    return (1023 + p->W) / p->W;
}

/* Column mode: a chunk's moments (cnt values a position; mean - K and m2) merged into the running ones
 * (an values), as bn_moments_merge does, one lane per position, with the mean as the weighted sum of the
 * two (bn_merged_mean's fallback) throughout: these means are relative to the shift, of the spread's
 * size, so it is as exact as mean + delta * w, it gives +-inf for an infinite mean as the fallback does,
 * and it spares a select in a loop that runs every chunk. The next chunk is centred on the new running
 * mean. Its own function: inlined in col_item_moments' loop, GCC left it scalar ("no vectype"), 13% of
 * the statistics' time at (8192, 1024). */
static void BN_NAME(col_merge)(ptrdiff_t wb, double an, double cnt, const double *BN_RESTRICT shift,
                               const double *BN_RESTRICT mean, const double *BN_RESTRICT m2,
                               double *BN_RESTRICT amean, double *BN_RESTRICT am2, double *BN_RESTRICT centre)
{
    const double n = an + cnt, wnew = cnt / n, wold = an / n, wcross = an * wnew;
    for (ptrdiff_t q = 0; q < wb; q++) {
        const double delta = mean[q] - amean[q];
        amean[q] = amean[q] * wold + mean[q] * wnew;
        am2[q] += m2[q] + delta * delta * wcross;
        centre[q] = shift[q] + amean[q];
    }
}

/* Column mode: moments of channels [c0, c1) over rows [n0, n1), relative to each channel's shift,
 * written to out[0 .. c1-c0). Per position, chunks of rows are reduced and merged into running moments:
 * the first BN_COL_ROWS rows in the two passes described above (the rows are still in cache for the
 * second), the later ones as col_later_chunks says: in one pass about the running mean, in chunks of
 * rows (col_chunk_one_pass) or of virtual rows (col_chunk_one_pass_virtual), or in two passes again;
 * then a channel's S positions are merged in order. scratch: stats_scratch's count of doubles. */
static void BN_NAME(col_item_moments)(const BN_T *x, const bn_plan *p, ptrdiff_t c0, ptrdiff_t c1,
                                      ptrdiff_t n0, ptrdiff_t n1, double *scratch, bn_moments *out)
{
    const ptrdiff_t wb = (c1 - c0) * p->S, W = p->W;
    double *mean = scratch, *m2 = scratch + wb, *amean = scratch + 2 * wb,
           *am2 = scratch + 3 * wb, *shift = scratch + 4 * wb,
           *centre = scratch + 5 * wb;
    const BN_T *base = x + c0 * p->S;
    /* Pass 1 streams x from memory. In sweeps of four rows of under 4 KiB (four streams within a page or
     * two) the hardware prefetcher kept up badly: one row a sweep took 0.53-0.82 of the time of the
     * statistics of float32 at 128-512 positions, (64, 28, 28, 256) included, and 0.57-0.72 for float64,
     * still 0.88 at 768 positions (a vector loop of one row, where four rows of float64 are GCC's). From
     * cache it cost 4-8% (float32) and 10-24% (float64), so tensors that L3 may hold keep four rows. No
     * effect on bits: each position adds its rows in the same order. */
    const int rowwise = BN_HAVE_VEXT && wb < 1024 && bn_streamed(p, sizeof(BN_T));
    double an = 0;
    if (p->S == 1)
        for (ptrdiff_t q = 0; q < wb; q++) shift[q] = bn_stats_shift((double)base[q]);
    else
        for (ptrdiff_t k = 0; k < c1 - c0; k++) {
            const double sk = BN_NAME(channel_shift)(x, p, c0 + k);
            for (ptrdiff_t s = 0; s < p->S; s++) shift[k * p->S + s] = sk;
        }
    /* Rows a chunk after the first. The one pass: 4 * BN_COL_ROWS (the ends of chunks, a division and a
     * merge per position, took 3-9% of batch_stats at (8192, 1024) and (2048, 64) at 32 rows; 256 rows
     * gained nothing more). Virtual rows: a multiple of eight of them, at least BN_COL_ROWS rows (at 16
     * rows of 516 positions the ends of chunks cost 10%). The two passes: BN_COL_ROWS, for the cache. */
    const ptrdiff_t vk = BN_NAME(col_later_chunks)(p);
    const ptrdiff_t later = vk > 1 ? (BN_COL_ROWS + 8 * vk - 1) / (8 * vk) * (8 * vk)
                                   : vk == 1 ? 4 * BN_COL_ROWS : BN_COL_ROWS;
    double *vs1 = vk > 1 ? scratch + 6 * wb : NULL, *vs2 = vk > 1 ? vs1 + vk * wb : NULL,
           *vc = vk > 1 ? vs2 + vk * wb : NULL;
    for (ptrdiff_t r0 = n0, r1; r0 < n1; r0 = r1) {
        const ptrdiff_t step = an == 0 ? BN_COL_ROWS : later;
        r1 = n1 - r0 < step ? n1 : r0 + step;
        double cnt = (double)(r1 - r0);
        if (an == 0) {
            BN_NAME(col_chunk_two_pass)(base, W, wb, r0, r1, rowwise, shift, mean, m2, centre);
            for (ptrdiff_t q = 0; q < wb; q++) {
                amean[q] = mean[q];
                am2[q] = m2[q];
                centre[q] = shift[q] + amean[q];
            }
            an = cnt;
            continue;
        }
        if (vk > 1)
            BN_NAME(col_chunk_one_pass_virtual)(base, W, vk, r0, r1, shift, mean, m2, centre, vs1, vs2, vc);
        else if (vk == 1)
            BN_NAME(col_chunk_one_pass)(base, W, wb, r0, r1, shift, mean, m2, centre);
        else
            BN_NAME(col_chunk_two_pass)(base, W, wb, r0, r1, rowwise, shift, mean, m2, centre);
        BN_NAME(col_merge)(wb, an, cnt, shift, mean, m2, amean, am2, centre);
        an += cnt;
    }
    for (ptrdiff_t k = 0; k < c1 - c0; k++) {
        bn_moments m = {an, amean[k * p->S], am2[k * p->S]};
        for (ptrdiff_t s = 1; s < p->S; s++) {
            bn_moments ms = {an, amean[k * p->S + s], am2[k * p->S + s]};
            bn_moments_merge(&m, ms);
        }
        out[k] = m;
    }
}

#undef BN_RAW_SUMS

#define BN_FOLD (sizeof(BN_T) < sizeof(double))

/* The fused epilogue of one normalized value v, then its rounding to the element type: + residual,
 * ReLU as v < 0 ? 0 : v (NaN stays NaN, as np.maximum). epi is a constant where this is inlined. */
static BN_ALWAYS_INLINE BN_T BN_NAME(epilogue)(double v, const BN_T *r, ptrdiff_t i, const int epi)
{
    if (epi & BN_EPI_ADD) v += (double)r[i];
    if (epi & BN_EPI_RELU) v = v < 0.0 ? 0.0 : v;
    return (BN_T)v;
}

/* y over a run in float64; with `nt` (a streamed float64 tensor, bn_stream.h) its aligned body stored
 * non-temporally, the same values. */
static BN_ALWAYS_INLINE void BN_NAME(apply_run_epi)(const BN_T *xr, const BN_T *rr, BN_T *yr, ptrdiff_t len,
                                                     int fold, double centre, double a, double b, int nt,
                                                     const int epi)
{
    ptrdiff_t s = 0;
    if (fold)
        for (; s < len; s++) yr[s] = BN_NAME(epilogue)((double)xr[s] * a + b, rr, s, epi);
#ifdef BN_HAVE_NT
    else if (sizeof(BN_T) == sizeof(double) && nt && len >= 16) {
        const __m256d vc = _mm256_set1_pd(centre), va = _mm256_set1_pd(a), vb = _mm256_set1_pd(b);
        const double *xd = (const double *)(const void *)xr, *rd = (const double *)(const void *)rr;
        double *yd = (double *)(void *)yr;
        const ptrdiff_t h = bn_nt_head(yr, len, sizeof(BN_T));
        for (; s < h; s++) yr[s] = BN_NAME(epilogue)(((double)xr[s] - centre) * a + b, rr, s, epi);
        for (; s + 4 <= len; s += 4) bn_nt_f64_norm4(yd + s, xd + s, rd ? rd + s : NULL, vc, va, vb, epi);
    }
#else
    (void)nt;
#endif
    for (; s < len; s++) yr[s] = BN_NAME(epilogue)(((double)xr[s] - centre) * a + b, rr, s, epi);
}

/* The float32 form's epilogue (bn_f32_arith): the residual added in float32 (the rounding NumPy's
 * y + r does after the unfused forward), ReLU as the float64 form's. */
static BN_ALWAYS_INLINE float BN_NAME(epilogue_f32)(float v, const BN_T *r, ptrdiff_t i, const int epi)
{
    if (epi & BN_EPI_ADD) v += (float)r[i];
    if (epi & BN_EPI_RELU) v = v < 0.0f ? 0.0f : v;
    return v;
}

/* bn_f32_norm over a run, in two loops that give its bits with less work: with al != 0 (of ah's sign)
 * an infinite first FMA comes with a second one of the same sign or finite, so the plain sum is it;
 * with al = +-0 (of ah's sign) the second FMA of a finite x is bl but for the sign of a zero, which
 * matters only where the first is -0.0 and cannot differ then, and an infinite t + bl is t. */
static BN_ALWAYS_INLINE void BN_NAME(apply_span_f32)(const BN_T *xr, const BN_T *rr, BN_T *yr, ptrdiff_t s,
                                                      ptrdiff_t len, float ah, float al, float bh, float bl,
                                                      const int epi)
{
    if (al != 0.0f)
        for (; s < len; s++) {
            const float v = (float)xr[s];
            yr[s] = (BN_T)BN_NAME(epilogue_f32)(fmaf(v, ah, bh) + fmaf(v, al, bl), rr, s, epi);
        }
    else
        for (; s < len; s++) yr[s] = (BN_T)BN_NAME(epilogue_f32)(fmaf((float)xr[s], ah, bh) + bl, rr, s, epi);
}

/* The same over a whole run; with `nt` (a streamed tensor, bn_stream.h) its aligned body stored
 * non-temporally, the same values. */
static BN_ALWAYS_INLINE void BN_NAME(apply_run_f32)(const BN_T *xr, const BN_T *rr, BN_T *yr, ptrdiff_t len,
                                                     float ah, float al, float bh, float bl, int nt, const int epi)
{
    ptrdiff_t s = 0;
#ifdef BN_HAVE_NT
    if (sizeof(BN_T) == sizeof(float) && nt && len >= 32) {
        const __m256 vah = _mm256_set1_ps(ah), val = _mm256_set1_ps(al), vbh = _mm256_set1_ps(bh),
                     vbl = _mm256_set1_ps(bl);
        const float *xf = (const float *)(const void *)xr, *rf = (const float *)(const void *)rr;
        float *yf = (float *)(void *)yr;
        s = bn_nt_head(yf, len, sizeof(float));
        BN_NAME(apply_span_f32)(xr, rr, yr, 0, s, ah, al, bh, bl, epi);
        if (al != 0.0f)
            for (; s + 8 <= len; s += 8)
                bn_nt_f32_form8(yf + s, xf + s, rf ? rf + s : NULL, vah, val, vbh, vbl, 1, epi);
        else
            for (; s + 8 <= len; s += 8)
                bn_nt_f32_form8(yf + s, xf + s, rf ? rf + s : NULL, vah, val, vbh, vbl, 0, epi);
    }
#else
    (void)nt;
#endif
    BN_NAME(apply_span_f32)(xr, rr, yr, s, len, ah, al, bh, bl, epi);
}

/* y over one contiguous run of a channel: (x - centre) * a + b, or x * a + b when the channel is folded
 * (centre +0.0, a float32 channel: the same bits, one subtraction fewer), or in row mode the float32
 * form from the channel's pairs q (ah, al, bh, bl; NULL or ah NaN: not this channel, see f32_pairs);
 * then the epilogue (rr: the residual's run, when epi has BN_EPI_ADD). Callers that know every channel
 * they cover is folded say so (`folded`), which spares a test per run. */
static inline void BN_NAME(apply_run)(const BN_T *xr, const BN_T *rr, BN_T *yr, ptrdiff_t len, int folded,
                                      double centre, double a, double b, const float *q, int epi, int nt)
{
    const int fold = BN_FOLD && (folded || bn_is_plus_zero(centre));
    if (BN_FOLD && q && q[0] == q[0]) {
        const float ah = q[0], al = q[1], bh = q[2], bl = q[3];
        BN_WITH_EPI(epi, BN_NAME(apply_run_f32), xr, rr, yr, len, ah, al, bh, bl, nt)
        return;
    }
    BN_WITH_EPI(epi, BN_NAME(apply_run_epi), xr, rr, yr, len, fold, centre, a, b, nt)
}

#ifdef BN_V8F_STORE
/* apply_cols_epi's float32 folded y of the row at `off`, and with `two` (1 or 3) also of the one or three
 * rows W2 apart after it, each coefficient loaded once for all; then the epilogue (residual added widened,
 * ReLU by BN_V8D_RELU). */
static BN_ALWAYS_INLINE void BN_NAME(y_cols_v8)(const BN_T *x, const BN_T *res, BN_T *y, ptrdiff_t off, ptrdiff_t W2,
                                                ptrdiff_t wb, const double *BN_RESTRICT ea,
                                                const double *BN_RESTRICT eb, const int epi, const int two)
{
    const BN_T *xr = x + off, *rr = (epi & BN_EPI_ADD) ? res + off : NULL;
    BN_T *yr = y + off;
    const ptrdiff_t body = wb - wb % 8;
    for (ptrdiff_t q = 0; q < body; q += 8) {
        const bn_v8d a = BN_V8D_LOAD(ea + q), b = BN_V8D_LOAD(eb + q);
        for (int j = 0; j <= two; j++) {
            const ptrdiff_t o = j * W2 + q;
            bn_v8d v = BN_V8D_LOAD(xr + o) * a + b;
            if (epi & BN_EPI_ADD) v += BN_V8D_LOAD(rr + o);
            if (epi & BN_EPI_RELU) v = BN_V8D_RELU(v);
            BN_V8F_STORE(yr + o, v);
        }
    }
    for (int j = 0; j <= two; j++)
        for (ptrdiff_t q = body; q < wb; q++)
            yr[j * W2 + q] = BN_NAME(epilogue)((double)xr[j * W2 + q] * ea[q] + eb[q], rr ? rr + j * W2 : NULL, q, epi);
}
#endif

#if BN_HAVE_VEXT
/* apply_cols_epi's float64 y, (x - centre) * alpha + offset, of the row at `off` and the row W2 further,
 * each of the three coefficients loaded once for both; the scalar loop's expression lane by lane. */
static BN_ALWAYS_INLINE void BN_NAME(y_cols_pair_f64)(const BN_T *x, const BN_T *res, BN_T *y, ptrdiff_t off,
                                                      ptrdiff_t W2, ptrdiff_t wb, const double *BN_RESTRICT em,
                                                      const double *BN_RESTRICT ea, const double *BN_RESTRICT eb,
                                                      const int epi)
{
    const BN_T *xr = x + off, *rr = (epi & BN_EPI_ADD) ? res + off : NULL;
    BN_T *yr = y + off;
    const ptrdiff_t body = wb - wb % 8;
    for (ptrdiff_t q = 0; q < body; q += 8) {
        const bn_v8d m = BN_V8D_LOAD(em + q), a = BN_V8D_LOAD(ea + q), b = BN_V8D_LOAD(eb + q);
        for (int j = 0; j < 2; j++) {
            const ptrdiff_t o = j * W2 + q;
            bn_v8d v = (BN_V8D_LOAD(xr + o) - m) * a + b;
            if (epi & BN_EPI_ADD) v += BN_V8D_LOAD(rr + o);
            if (epi & BN_EPI_RELU) v = BN_V8D_RELU(v);
            BN_V8D_STORE(yr + o, v);
        }
    }
    for (int j = 0; j < 2; j++)
        for (ptrdiff_t q = body; q < wb; q++)
            yr[j * W2 + q] = BN_NAME(epilogue)(((double)xr[j * W2 + q] - em[q]) * ea[q] + eb[q],
                                               rr ? rr + j * W2 : NULL, q, epi);
}
#endif

/* Column mode: rows [n0, n1) of an item, wb positions from offset `first` of each row, with per-position
 * coefficients (em unused when folded). */
static BN_ALWAYS_INLINE void BN_NAME(apply_cols_epi)(const BN_T *x, const BN_T *res, BN_T *y, const bn_plan *p,
                                                      ptrdiff_t first, ptrdiff_t wb, ptrdiff_t n0, ptrdiff_t n1,
                                                      int folded, const double *BN_RESTRICT em,
                                                      const double *BN_RESTRICT ea, const double *BN_RESTRICT eb,
                                                      const int epi)
{
    ptrdiff_t n = n0;
#ifdef BN_V8F_STORE
    /* float32, folded: 8 positions a step with one conversion each way, where rows are 512
     * positions or more (at 256, channels-last (64, 28, 28, 256) and (32768, 256), inference ran 4-10%
     * slower than GCC's loop below; at 512 9% faster); where the two coefficient arrays exceed half of L1
     * (wb > 1024) each load of them serves two rows half an item apart, as in the backward's grad_cols. */
    if (sizeof(BN_T) == sizeof(float) && folded && wb >= 512) {
        const ptrdiff_t h = wb > 1024 ? (n1 - n0) / 2 : 0;
        for (; n < n0 + h; n++) BN_NAME(y_cols_v8)(x, res, y, n * p->W + first, h * p->W, wb, ea, eb, epi, 1);
        for (n += h; n < n1; n++) BN_NAME(y_cols_v8)(x, res, y, n * p->W + first, 0, wb, ea, eb, epi, 0);
    } else if (sizeof(BN_T) == sizeof(float) && folded && bn_cols_sweep4(p, wb, sizeof(BN_T))) {
        /* narrow rows (GCC's loop below ran its few steps a row between a row's loads and stores of 16
         * floats split in halves): small_ab.py --base, inference 0.86-0.92 and training forward 0.91-0.94
         * of the previous time at (256, 64), (512, 32), (256, 61) and (64, 8); phase_ab.py, inference
         * 0.73-0.77 and training forward 0.84-0.87 at (16384, 64) and (2048, 96), from memory at
         * (131072, 32) and (262144, 16) 0.92-0.94 and 0.97-1.00 */
        for (; n + 4 <= n1; n += 4) BN_NAME(y_cols_v8)(x, res, y, n * p->W + first, p->W, wb, ea, eb, epi, 3);
        for (; n < n1; n++) BN_NAME(y_cols_v8)(x, res, y, n * p->W + first, 0, wb, ea, eb, epi, 0);
    }
#endif
#if BN_HAVE_VEXT
    /* float64 (never folded): where the three coefficient arrays fill three quarters of L1 (wb >= 1024),
     * GCC's loop below reloads them for every row: (8192, 1024) inference took 1.35 copies' time at T=1.
     * Pairs of rows half an item apart share each load, as float32's y_cols_v8 does (inference 0.78-0.84
     * of GCC's loop's time at 1024-4096 positions; at 700 it was 1.04 with AVX-512 and 1.17 with AVX2). An
     * odd last row goes to the loop below. */
    if (sizeof(BN_T) == sizeof(double) && wb >= 1024) {
        const ptrdiff_t h = (n1 - n0) / 2;
        for (; n < n0 + h; n++)
            BN_NAME(y_cols_pair_f64)(x, res, y, n * p->W + first, h * p->W, wb, em, ea, eb, epi);
        n += h;
    }
#endif
    for (; n < n1; n++) {
        ptrdiff_t off = n * p->W + first;
        const BN_T *xr = x + off, *rr = (epi & BN_EPI_ADD) ? res + off : NULL;
        BN_T *yr = y + off;
        if (folded)
            for (ptrdiff_t q = 0; q < wb; q++) yr[q] = BN_NAME(epilogue)((double)xr[q] * ea[q] + eb[q], rr, q, epi);
        else
            for (ptrdiff_t q = 0; q < wb; q++)
                yr[q] = BN_NAME(epilogue)(((double)xr[q] - em[q]) * ea[q] + eb[q], rr, q, epi);
    }
}

/* y over one item, from the per-channel centre, alpha and offset, then the epilogue. In column mode an item
 * whose channels are all folded runs the two-array loop; otherwise the folded channels' centre is +0.0 in
 * the three-array loop, which gives them the same bits. Column mode needs 3 * (c1 - c0) * S doubles of
 * scratch. */
static void BN_NAME(apply_item)(const BN_T *x, const BN_T *res, BN_T *y, const bn_plan *p, ptrdiff_t c0,
                                ptrdiff_t c1, ptrdiff_t n0, ptrdiff_t n1, const double *centre,
                                const double *alpha, const double *offset, const float *f32, int epi,
                                double *scratch)
{
    const ptrdiff_t S = p->S;
    const int folded = BN_FOLD && bn_all_plus_zero(centre, c0, c1);
    if (!p->colmode) {
        const int nt = bn_nt_wanted(p, sizeof(BN_T), y, x, res);
        for (ptrdiff_t n = n0; n < n1; n++)
            for (ptrdiff_t c = c0; c < c1; c++) {
                ptrdiff_t off = (n * p->C + c) * S;
                BN_NAME(apply_run)(x + off, res ? res + off : NULL, y + off, S, folded, centre[c], alpha[c],
                                   offset[c], f32 ? f32 + 4 * c : NULL, epi, nt);
            }
        BN_NT_DONE(nt);
        return;
    }
    const ptrdiff_t wb = (c1 - c0) * S, first = c0 * S;
    double *room[3] = {scratch, scratch + wb, scratch + 2 * wb};
    const double *src[3] = {folded ? NULL : centre, alpha, offset}, *e[3];
    bn_expand(3, room, e, src, c0, c1, S);
    const double *em = e[0], *ea = e[1], *eb = e[2];
    BN_WITH_EPI(epi, BN_NAME(apply_cols_epi), x, res, y, p, first, wb, n0, n1, folded, em, ea, eb)
}

/* Moments of one work item, per channel of its block (relative to its shift), into out[0 .. c1-c0). */
static void BN_NAME(item_moments)(const BN_T *x, const bn_plan *p, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t n0,
                                  ptrdiff_t n1, double *scratch, bn_moments *out)
{
    if (p->colmode)
        BN_NAME(col_item_moments)(x, p, c0, c1, n0, n1, scratch, out);
    else
        BN_NAME(row_item_moments)(x, p, c0, c1, n0, n1, out);
}

/* ---- the kernels as steps of the driver (bn_drive.c) --------------------------------------------- */

typedef struct {
    const BN_T *x;
    BN_T *y;
    const double *gamma, *beta;   /* may be NULL */
    double eps;
    double *mean, *m2, *invstd;   /* statistics: written by batch_stats and forward_train */
    const double *norm_mean;      /* the mean normalize is given */
    double *alpha, *offset, *centre; /* per-channel coefficients of apply */
    const BN_T *res;              /* the epilogue's residual, or NULL */
    int epi;                      /* its BN_EPI_* flags */
    float *f32;                   /* float32 data in row mode: ah, al, bh, bl of bn_f32_split, 4 a channel
                                     (ah NaN: the channel keeps the float64 form); else NULL */
} BN_NAME(fwd_args);

/* Column mode needs per-position scratch: 6 arrays for the statistics, 3 for apply, one after another
 * (unpadded: a streaming loop that loads from one and stores to another never loads an element a cache
 * line ahead of one it stored, which 4K aliasing would stall; see bn_padded_array). */
static ptrdiff_t BN_NAME(fwd_scratch)(const bn_plan *p, int arrays)
{
    return p->colmode ? arrays * p->ch_per_block * p->S : 0;
}

/* The statistics' scratch: 6 arrays, and 3 of k times their length for virtual rows */
static ptrdiff_t BN_NAME(stats_scratch)(const bn_plan *p)
{
    const ptrdiff_t k = BN_NAME(col_later_chunks)(p);
    return BN_NAME(fwd_scratch)(p, 6 + (k > 1 ? 3 * (int)k : 0));
}

static void BN_NAME(stats_reduce)(const bn_job *job, bn_item w, double *scratch, void *out)
{
    const BN_NAME(fwd_args) *a = job->args;
    BN_NAME(item_moments)(a->x, job->plan, w.c0, w.c1, w.n0, w.n1, scratch, (bn_moments *)out);
}

/* Channel c's moments: its row groups' parts merged in group order, whoever computed them, and the
 * channel's shift added back to the mean (one rounding, at the mean's own scale). */
static inline bn_moments BN_NAME(merged_moments)(const bn_job *job, ptrdiff_t c, const void *parts)
{
    const BN_NAME(fwd_args) *a = job->args;
    const bn_moments *pm = parts;
    const ptrdiff_t C = job->plan->C;
    bn_moments m = pm[c];
    for (ptrdiff_t g = 1; g < job->plan->ngroups; g++) bn_moments_merge(&m, pm[g * C + c]);
    m.mean = BN_NAME(channel_shift)(a->x, job->plan, c) + m.mean;
    return m;
}

/* alpha, centre and offset of n channels from their mean and invstd (see the algebra at the top), from
 * restrict parameters so that the loop vectorizes without alias checks: wide layers ((2, 4096)) spend a
 * good part of a small call on these. gamma, beta as bn_forward_coefs takes them, from channel 0. The
 * backward's recomputed ReLU mask calls it too (bn_internal.h declares it), for the forward's very
 * coefficients. */
BN_NOINLINE void BN_NAME(bn_coefs_range)(ptrdiff_t n, const double *BN_RESTRICT mean,
                                             const double *BN_RESTRICT invstd, const double *BN_RESTRICT gamma,
                                             const double *BN_RESTRICT beta, double *BN_RESTRICT alpha,
                                             double *BN_RESTRICT centre, double *BN_RESTRICT offset)
{
    for (ptrdiff_t c = 0; c < n; c++)
        bn_forward_coefs(BN_FOLD, gamma, beta, c, mean[c], invstd[c], &alpha[c], &centre[c], &offset[c]);
}

/* invstd from m2 and the count, in place of the count: the same expression a caller of the phases
 * evaluates, 1 / sqrt(m2 / count + eps), in a loop that vectorizes (three divisions a channel, scalar, were
 * a third of a (2, 4096) training forward). */
BN_NOINLINE static void BN_NAME(invstd_range)(ptrdiff_t n, const double *BN_RESTRICT m2,
                                              double *BN_RESTRICT count_invstd, double eps)
{
    for (ptrdiff_t c = 0; c < n; c++) count_invstd[c] = 1.0 / sqrt(m2[c] / count_invstd[c] + eps);
}

/* The float32 form's pairs of n channels (bn_f32_split), 4 floats a channel, ah NaN where bn_f32_arith
 * says no. Only row mode takes the float32 form: in column mode ((N, C), channels-last) the loop is bound
 * by its per-position coefficient loads, 16 bytes a value either way, and it ran at 0.86-0.99 of the
 * float64 loop's time on 64 to 512 rows and 1.5-1.7x on 2 to 16 (normalize at (2, 4096), (16, 2048),
 * where the pairs cost more than the values gain). In row mode a run of a channel reads its 4 floats
 * once. A loop that vectorizes (& and selects, no branches). */
BN_NOINLINE static void BN_NAME(f32_pairs)(ptrdiff_t n, const double *BN_RESTRICT centre,
                                           const double *BN_RESTRICT alpha, const double *BN_RESTRICT offset,
                                           float *BN_RESTRICT q)
{
    for (ptrdiff_t c = 0; c < n; c++) {
        float h, l, g, m;
        bn_f32_split(alpha[c], offset[c], &h, &l, &g, &m);
        q[4 * c] = bn_f32_arith(centre[c], alpha[c], offset[c]) ? h : NAN;
        q[4 * c + 1] = l;
        q[4 * c + 2] = g;
        q[4 * c + 3] = m;
    }
}

static void BN_NAME(normalize_coefs)(const BN_NAME(fwd_args) *a, ptrdiff_t c0, ptrdiff_t c1, const double *mean,
                                     const double *invstd)
{
    BN_NAME(bn_coefs_range)(c1 - c0, mean + c0, invstd + c0, a->gamma ? a->gamma + c0 : NULL,
                         a->beta ? a->beta + c0 : NULL, a->alpha + c0, a->centre + c0, a->offset + c0);
    if (BN_FOLD && a->f32) BN_NAME(f32_pairs)(c1 - c0, a->centre + c0, a->alpha + c0, a->offset + c0, a->f32 + 4 * c0);
}

/* Room for the coefficients: alpha, offset and centre, then (float32, row mode) f32's 4 C floats. */
static double *BN_NAME(coefs_take)(BN_NAME(fwd_args) *a, const bn_plan *p)
{
    const ptrdiff_t C = p->C;
    const int f32 = BN_FOLD && !p->colmode;
    double *coefs = bn_scratch_take(sizeof(double) * (bn_padded_size(C, 3) + (f32 ? 2 * (size_t)C : 0)));
    if (!coefs) return NULL;
    a->alpha = coefs;
    a->offset = bn_padded_array(coefs, C, 1);
    a->centre = bn_padded_array(coefs, C, 2);
    a->f32 = f32 ? (float *)(void *)bn_padded_array(coefs, C, 3) : NULL;
    return coefs;
}

static void BN_NAME(stats_finish)(const bn_job *job, ptrdiff_t c0, ptrdiff_t c1, const void *parts)
{
    const BN_NAME(fwd_args) *a = job->args;
    for (ptrdiff_t c = c0; c < c1; c++) {
        const bn_moments m = BN_NAME(merged_moments)(job, c, parts);
        a->mean[c] = m.mean;
        a->m2[c] = m.m2;
    }
}

static void BN_NAME(train_finish)(const bn_job *job, ptrdiff_t c0, ptrdiff_t c1, const void *parts)
{
    const BN_NAME(fwd_args) *a = job->args;
    for (ptrdiff_t c = c0; c < c1; c++) {
        const bn_moments m = BN_NAME(merged_moments)(job, c, parts);
        a->mean[c] = m.mean;
        a->m2[c] = m.m2;
        a->invstd[c] = m.n; /* the count, until invstd_range */
    }
    BN_NAME(invstd_range)(c1 - c0, a->m2 + c0, a->invstd + c0, a->eps);
    BN_NAME(normalize_coefs)(a, c0, c1, a->mean, a->invstd);
}

static void BN_NAME(normalize_finish)(const bn_job *job, ptrdiff_t c0, ptrdiff_t c1, const void *parts)
{
    const BN_NAME(fwd_args) *a = job->args;
    (void)parts;
    BN_NAME(normalize_coefs)(a, c0, c1, a->norm_mean, a->invstd);
}

static void BN_NAME(normalize_apply)(const bn_job *job, bn_item w, double *scratch)
{
    const BN_NAME(fwd_args) *a = job->args;
    BN_NAME(apply_item)(a->x, a->res, a->y, job->plan, w.c0, w.c1, w.n0, w.n1, a->centre, a->alpha,
                        a->offset, a->f32, a->epi, scratch);
}

static void BN_NAME(normalize_rows)(const bn_job *job, ptrdiff_t r0, ptrdiff_t r1)
{
    const BN_NAME(fwd_args) *a = job->args;
    const ptrdiff_t C = job->plan->C, S = job->plan->S;
    const int folded = BN_FOLD && bn_all_plus_zero(a->centre, 0, C),
              nt = bn_nt_wanted(job->plan, sizeof(BN_T), a->y, a->x, a->res);
    for (ptrdiff_t r = r0; r < r1; r++) {
        const ptrdiff_t c = r % C;
        BN_NAME(apply_run)(a->x + r * S, a->res ? a->res + r * S : NULL, a->y + r * S, S, folded, a->centre[c],
                           a->alpha[c], a->offset[c], a->f32 ? a->f32 + 4 * c : NULL, a->epi, nt);
    }
    BN_NT_DONE(nt);
}

static void BN_NAME(set_epilogue)(BN_NAME(fwd_args) *a, const bn_epilogue *ep)
{
    if (!ep) return;
    a->res = ep->residual;
    a->epi = (ep->relu ? BN_EPI_RELU : 0) | (ep->residual ? BN_EPI_ADD : 0);
}

int BN_NAME(bn_batch_stats)(const BN_T *x, bn_dims d, double *mean, double *m2, int nthreads)
{
    bn_plan p;
    bn_make_plan(&p, d, sizeof(BN_T), nthreads, BN_PARALLEL_MIN_ELEMS);
    BN_NAME(fwd_args) a = {x, NULL, NULL, NULL, 0.0, mean, m2, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL};
    bn_job job = {&p, BN_NAME(stats_reduce), BN_NAME(stats_finish), NULL, NULL, sizeof(bn_moments),
                  BN_NAME(stats_scratch)(&p), &a};
    return bn_drive(&job);
}

int BN_NAME(bn_normalize)(const BN_T *x, BN_T *y, bn_dims d, const double *mean, const double *invstd,
                          const double *gamma, const double *beta, const bn_epilogue *ep, int nthreads)
{
    bn_plan p;
    bn_make_plan(&p, d, sizeof(BN_T), nthreads, BN_PARALLEL_MIN_ELEMS_NORMALIZE);
    BN_NAME(fwd_args) a = {x, y, gamma, beta, 0.0, NULL, NULL, (double *)invstd, mean, NULL, NULL, NULL, NULL, 0,
                           NULL};
    double *coefs = BN_NAME(coefs_take)(&a, &p);
    if (!coefs) return BN_ENOMEM;
    BN_NAME(set_epilogue)(&a, ep);
    bn_job job = {&p, NULL, BN_NAME(normalize_finish), BN_NAME(normalize_apply), BN_NAME(normalize_rows), 0,
                  BN_NAME(fwd_scratch)(&p, 3), &a};
    int status = bn_drive(&job);
    bn_scratch_give(coefs);
    return status;
}

/* invstd = 1 / sqrt(var + eps), in a loop that vectorizes (in the binding, at its baseline SSE2, this was
 * the larger part of an inference call on a wide layer: 16384 channels, 2 rows). */
BN_NOINLINE static void BN_NAME(invstd_of_var)(ptrdiff_t n, const double *BN_RESTRICT var, double eps,
                                               double *BN_RESTRICT invstd)
{
    for (ptrdiff_t c = 0; c < n; c++) invstd[c] = 1.0 / sqrt(var[c] + eps);
}

/* dst[i] = src[i] as double: the binding's conversion of float32 per-channel vectors (compiled at the
 * baseline there, it was a fifth of an inference call at (2, 16384)). */
void BN_NAME(bn_widen)(const BN_T *BN_RESTRICT src, double *BN_RESTRICT dst, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = (double)src[i];
}

/* r = (1 - momentum) * r + momentum * (batch / divisor), rounded to r's type: the running statistics'
 * update of a contiguous native vector (the binding's general loop, per value through memcpy and a
 * division at its baseline SSE2, was a quarter of a training forward at (2, 16384)). */
void BN_NAME(bn_update_running)(BN_T *BN_RESTRICT r, const double *BN_RESTRICT batch, double divisor,
                                double momentum, ptrdiff_t n)
{
    for (ptrdiff_t c = 0; c < n; c++) r[c] = (BN_T)((1.0 - momentum) * (double)r[c] + momentum * (batch[c] / divisor));
}

/* dst[i] = src[i] rounded to BN_T (float64 statistics and gradients returned as float32). */
void BN_NAME(bn_narrow)(const double *BN_RESTRICT src, BN_T *BN_RESTRICT dst, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = (BN_T)src[i];
}

int BN_NAME(bn_forward_infer)(const BN_T *x, BN_T *y, bn_dims d, const double *running_mean,
                              const double *running_var, double eps, const double *gamma, const double *beta,
                              const bn_epilogue *ep, int nthreads)
{
    double *invstd = bn_scratch_take(sizeof(double) * (size_t)(d.C > 0 ? d.C : 1));
    if (!invstd) return BN_ENOMEM;
    BN_NAME(invstd_of_var)(d.C, running_var, eps, invstd);
    int status = BN_NAME(bn_normalize)(x, y, d, running_mean, invstd, gamma, beta, ep, nthreads);
    bn_scratch_give(invstd);
    return status;
}

int BN_NAME(bn_forward_train)(const BN_T *x, BN_T *y, bn_dims d, const double *gamma, const double *beta,
                              double eps, double *mean, double *m2, double *invstd, const bn_epilogue *ep,
                              int nthreads)
{
    bn_plan p;
    bn_make_plan(&p, d, sizeof(BN_T), nthreads, BN_PARALLEL_MIN_ELEMS);
    BN_NAME(fwd_args) a = {x, y, gamma, beta, eps, mean, m2, invstd, NULL, NULL, NULL, NULL, NULL, 0,
                           NULL};
    double *coefs = BN_NAME(coefs_take)(&a, &p);
    if (!coefs) return BN_ENOMEM;
    BN_NAME(set_epilogue)(&a, ep);
    bn_job job = {&p, BN_NAME(stats_reduce), BN_NAME(train_finish), BN_NAME(normalize_apply), BN_NAME(normalize_rows),
                  sizeof(bn_moments), BN_NAME(stats_scratch)(&p), &a};
    int status = bn_drive(&job);
    bn_scratch_give(coefs);
    return status;
}
#undef BN_FOLD
