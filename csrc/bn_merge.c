/* bn_merge.c - merging per-part statistics (merge_stats): the step between the statistics of each part of
 * a batch (each process's, in SyncBatchNorm) and the statistics of the whole batch. */
#include "bn_internal.h"

int bn_merge_stats(ptrdiff_t K, ptrdiff_t C, const int64_t *counts, const double *means, const double *m2s,
                   int64_t *count, double *mean, double *m2)
{
    int64_t total = 0;
    for (ptrdiff_t k = 0; k < K; k++) total += counts[k];
    *count = total;
    for (ptrdiff_t c = 0; c < C; c++) {
        bn_moments acc = {0, 0, 0};
        for (ptrdiff_t k = 0; k < K; k++) {
            bn_moments part = {(double)counts[k], means[k * C + c], m2s[k * C + c]};
            bn_moments_merge(&acc, part);
        }
        mean[c] = acc.mean;
        m2[c] = acc.m2;
    }
    return BN_OK;
}
