/* bn_plan.c - cutting a tensor into work items, and the thread controls. */
#include "bn_internal.h"

void bn_make_plan(bn_plan *p, bn_dims d, size_t elsize, int nthreads)
{
    p->N = d.N; p->C = d.C; p->S = d.S; p->W = d.C * d.S;
    p->colmode = d.S < BN_ROW_MIN_S;
    if (p->colmode) {
        /* Channel blocks span whole cache lines, and are narrow enough that a block of all N rows
         * stays in cache (so the normalize pass can reuse it), but no wider than the scratch allows. */
        ptrdiff_t line = (ptrdiff_t)((64 + d.S * elsize - 1) / (d.S * elsize));
        ptrdiff_t cpb = (ptrdiff_t)(BN_CACHE_ITEM_BYTES / ((double)d.N * (double)d.S * (double)elsize));
        if (cpb < line) cpb = line;
        if (cpb * d.S > BN_COL_MAX_W) cpb = BN_COL_MAX_W / d.S > 0 ? BN_COL_MAX_W / d.S : 1;
        if (cpb > d.C) cpb = d.C;
        p->ch_per_block = cpb;
        p->nblocks = (d.C + cpb - 1) / cpb;
        if (p->nblocks >= BN_MIN_BLOCKS) {
            p->rows_per_group = d.N;
        } else {
            ptrdiff_t r = BN_GROUP_ELEMS / (cpb * d.S);
            r = (r + BN_COL_ROWS - 1) / BN_COL_ROWS * BN_COL_ROWS;
            p->rows_per_group = r < d.N ? r : d.N;
        }
    } else {
        p->ch_per_block = 1;
        p->nblocks = d.C;
        if (d.C >= BN_MIN_BLOCKS) {
            p->rows_per_group = d.N;
        } else {
            ptrdiff_t r = BN_GROUP_ELEMS / d.S;
            if (r < 1) r = 1;
            p->rows_per_group = r < d.N ? r : d.N;
        }
    }
    p->ngroups = (d.N + p->rows_per_group - 1) / p->rows_per_group;
    p->nitems = p->nblocks * p->ngroups;
    double item_bytes = (double)p->rows_per_group * (double)(p->ch_per_block * d.S) * (double)elsize;
    p->fused = p->ngroups == 1 && item_bytes <= BN_CACHE_ITEM_BYTES;
    if ((double)d.N * (double)p->W < (double)BN_PARALLEL_MIN_ELEMS) nthreads = 1;
    if (nthreads > p->nitems) nthreads = (int)p->nitems;
    p->nthreads = nthreads < 1 ? 1 : nthreads;
}

int bn_get_num_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void bn_set_num_threads(int n)
{
#ifdef _OPENMP
    if (n >= 1) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

int bn_openmp_version(void)
{
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

const char *bn_simd_name(void)
{
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__AVX__)
    return "avx";
#elif defined(__SSE2__) || defined(_M_X64)
    return "sse2";
#elif defined(__ARM_NEON) || defined(__aarch64__)
    return "neon";
#else
    return "generic";
#endif
}
