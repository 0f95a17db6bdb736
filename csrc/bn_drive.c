/* bn_drive.c - the one OpenMP driver every kernel runs on: reduce -> finish -> apply over a plan (the
 * steps are described beside bn_job in bn_internal.h). Type-independent: the steps are the kernels'. */
#include "bn_internal.h"

int bn_drive(const bn_job *job)
{
    const bn_plan *p = job->plan;
    const ptrdiff_t C = p->C, per = job->scratch_doubles;
    const size_t pb = job->part_bytes;
    double *scratch = NULL;
    char *parts = NULL;
    if (per > 0 && !(scratch = malloc(sizeof(double) * (size_t)per * (size_t)p->nthreads))) return BN_ENOMEM;
    if (job->reduce && !(parts = malloc(pb * (size_t)C * (size_t)p->ngroups))) {
        free(scratch);
        return BN_ENOMEM;
    }
    if (p->nthreads > 1) bn_note_parallel();
    /* Reusing x from cache needs a whole channel block in one item (one row group). */
    const int fused = job->reduce && job->apply && p->fused;

    BN_PRAGMA(omp parallel num_threads(p->nthreads))
    {
        double *scr = scratch ? scratch + per * bn_thread_num() : NULL;
        if (fused) {
            BN_PRAGMA(omp for schedule(static))
            for (ptrdiff_t it = 0; it < p->nitems; it++) {
                const bn_item w = bn_item_at(p, it);
                job->reduce(job, w, scr, parts + pb * (size_t)w.c0);
                job->finish(job, w.c0, w.c1, parts);
                job->apply(job, w, scr);
            }
        } else {
            if (job->reduce) {
                BN_PRAGMA(omp for schedule(static))
                for (ptrdiff_t it = 0; it < p->nitems; it++) {
                    const bn_item w = bn_item_at(p, it);
                    const ptrdiff_t g = w.n0 / p->rows_per_group;
                    job->reduce(job, w, scr, parts + pb * (size_t)(g * C + w.c0));
                }
            }
            if (job->finish) {
                /* schedule(static) by hand: one call per thread over a contiguous range of channels */
                const ptrdiff_t nt = bn_team_size(), t = bn_thread_num(), chunk = (C + nt - 1) / nt;
                const ptrdiff_t c0 = t * chunk, c1 = c0 + chunk < C ? c0 + chunk : C;
                if (c0 < c1) job->finish(job, c0, c1, parts);
                BN_PRAGMA(omp barrier)
            }
            if (job->apply_rows && !p->colmode) {
                /* schedule(static) by hand: one call per thread over a contiguous range of rows */
                const ptrdiff_t rows = p->N * C, nt = bn_team_size(), t = bn_thread_num();
                const ptrdiff_t chunk = (rows + nt - 1) / nt, r0 = t * chunk;
                const ptrdiff_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
                if (r0 < r1) job->apply_rows(job, r0, r1);
            } else if (job->apply) {
                BN_PRAGMA(omp for schedule(static))
                for (ptrdiff_t it = 0; it < p->nitems; it++) job->apply(job, bn_item_at(p, it), scr);
            }
        }
    }
    free(scratch);
    free(parts);
    return BN_OK;
}
