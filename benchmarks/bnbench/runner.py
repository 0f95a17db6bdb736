"""One case: the correctness check, the timed rounds of every op at every thread count, memory."""

from __future__ import annotations

from .env import set_threads
from .memory import rss_extra, traced_extra
from .ops import Shared, check, families, make_data
from .report import fmt_t
from .timing import (Copier, calibrate, copy_per_round, median_or_none, per_round, present,
                     round_robin, summary)


def regime(nbytes, one_read, llc):
    """Which efficiency column applies: "memory" (x alone fills the last-level cache, so its second
    read comes from memory: the two-pass limit), "cache" (everything the op touches once fits in it: the
    one-read ideal), else "between"."""
    if nbytes >= llc:
        return "memory"
    if one_read * nbytes <= llc:
        return "cache"
    return "between"


def _ratio(a, b):
    return median_or_none(per_round(lambda u, v: u / v, a, b))


def make_rows(case, op, T, samples, numpy_first, x_bytes, copy_bytes, llc):
    """The table rows of one (case, op, T): "plain" (the call that allocates) and "out=" if timed.

    samples: {entry name: [seconds per call or None per round]}; numpy_first: the NumPy samples of
    the first thread count when NumPy was not timed in these rounds."""
    two, one = op.traffic()
    copy = copy_per_round(samples)
    # one stream of x.nbytes takes half a copy of copy_bytes (read + write), scaled to x.nbytes
    stream = [None if c is None else c / 2 * x_bytes / copy_bytes for c in copy]
    copy_s = median_or_none(present(copy))
    stream_s = median_or_none(present(stream))
    rows = []
    for variant, name in (("plain", "ours"), ("out=", "ours out=")):
        if variant == "out=" and name not in samples:
            continue
        ours = samples.get(name)
        st = summary(ours) if ours else None
        row = dict(op=op.name, variant=variant, threads=T, fused=op.fused, streams=two,
                   one_read_streams=one, bytes_moved=two * x_bytes, regime=regime(x_bytes, one, llc),
                   copy_s=copy_s, copy_bw_Bps=2 * copy_bytes / copy_s if copy_s else None,
                   limit_s=two * stream_s if stream_s else None,
                   ideal_s=one * stream_s if stream_s else None,
                   ours_s=st["median"] if st else None, ours_p25=st["p25"] if st else None,
                   ours_p75=st["p75"] if st else None, ours_n=st["n"] if st else 0,
                   efficiency=None, efficiency_one_read=None)
        if ours:
            row["efficiency"] = median_or_none(per_round(lambda s, o: two * s / o, stream, ours))
            row["efficiency_one_read"] = median_or_none(per_round(lambda s, o: one * s / o, stream, ours))
        rounds = {"copy": copy}
        if ours:
            rounds[name] = ours
        row["stats"] = {name: st} if st else {}
        if variant == "plain":
            torch, unf = samples.get("torch"), samples.get("ours unfused")
            np_same = samples.get("numpy")
            npy = np_same or numpy_first
            for key, s in (("torch", torch), ("unfused", unf), ("numpy", npy)):
                sm = summary(s) if s else None
                row[f"{key}_s"] = sm["median"] if sm else None
                if sm:
                    row["stats"][key] = sm
            row["numpy_same_rounds"] = bool(np_same)
            row["ours_over_torch"] = _ratio(ours, torch) if ours and torch else None
            row["ours_over_unfused"] = _ratio(ours, unf) if ours and unf else None
            row["unfused_over_torch"] = _ratio(unf, torch) if unf and torch else None
            if ours and np_same:
                row["ours_over_numpy"] = _ratio(ours, np_same)
            elif row["ours_s"] and row["numpy_s"]:
                # NumPy was timed at the first thread count only: a ratio of medians across loops
                row["ours_over_numpy"] = row["ours_s"] / row["numpy_s"]
            else:
                row["ours_over_numpy"] = None
            row["unfused_efficiency"] = (median_or_none(per_round(lambda s, o: two * s / o, stream, unf))
                                         if unf else None)
            for key, s in (("torch", torch), ("ours unfused", unf), ("numpy", np_same)):
                if s:
                    rounds[key] = s
        row["rounds"] = rounds
        rows.append(row)
    return rows


def bench_case(case, ops, threads, prof, *, fused, want_torch, want_rss, llc, log):
    d = make_data(case)
    x_bytes = d["x"].nbytes
    res = dict(case=case.name, shape=list(case.shape), dtype=case.dtype, layout=case.layout,
               axis=case.axis, x_bytes=x_bytes, small_target=case.small_target, rows=[], check={},
               memory={}, errors={})
    shared = Shared(case, d, fused)
    set_threads(threads[-1])
    ref_cache = {}
    for op in ops:
        res["check"][op.name] = check(case, d, op, fused=fused, torch=want_torch, cache=ref_cache)
    del ref_cache
    copier = Copier(x_bytes)
    numpy_first = {}
    try:
        for ti, T in enumerate(threads):
            set_threads(T)
            for op in ops:
                fams = families(case, d, op, fused=fused, torch=want_torch, numpy=(ti == 0), shared=shared)
                fns = [(name, fam.call(op), name == "numpy") for name, fam in fams.items()]
                fns += [(name, fn, False) for name, fn in copier.entries(T)]
                entries = []
                for name, fn, isnp in fns:
                    try:
                        k, t = calibrate(fn, prof["batch"])
                    except Exception as e:  # noqa: BLE001 - a family that cannot run is reported
                        res["errors"][f"{op.name} {name} T={T}"] = f"{type(e).__name__}: {e}"
                        continue
                    entries.append((name, fn, k, t, isnp))
                del fams, fns
                samples = round_robin(entries, prof, T)
                if ti == 0 and "numpy" in samples:
                    numpy_first[op.name] = samples["numpy"]
                rows = make_rows(case, op, T, samples, numpy_first.get(op.name), x_bytes, copier.nbytes, llc)
                for row in rows:
                    row["calls_per_batch"] = {e[0]: e[2] for e in entries}
                res["rows"].extend(rows)
                r = rows[0]
                log(f"  {case.name:32s} {op.name:17s} T={T}  ours {fmt_t(r['ours_s'])}  unfused "
                    f"{fmt_t(r['unfused_s'])}  torch {fmt_t(r['torch_s'])}  limit {fmt_t(r['limit_s'])}  "
                    f"(R={len(samples[entries[-1][0]]) if entries else 0})")
    finally:
        copier.close()
    # memory, once per op, at the largest thread count
    Tm = threads[-1]
    set_threads(Tm)
    for op in ops:
        fams = families(case, d, op, fused=fused, torch=False, numpy=prof["np_memory"], shared=shared)
        m = dict(threads=Tm)
        for name, key in (("ours", "tracemalloc_extra"), ("ours out=", "tracemalloc_extra_out"),
                          ("ours unfused", "unfused_tracemalloc_extra"),
                          ("numpy", "numpy_ref_tracemalloc_extra")):
            if name in fams:
                try:
                    ext, ret = traced_extra(fams[name].call(op))
                except Exception:  # noqa: BLE001 - reported by the timing's errors already
                    continue
                m[key] = ext
                if name == "ours":
                    m["returned"] = ret
        if want_rss and "ours" in fams:
            m["rss"] = rss_extra(case, op, Tm, fused)
        res["memory"][op.name] = m
    return res

