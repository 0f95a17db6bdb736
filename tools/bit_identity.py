"""Bit-identity of two builds of batchnorm (e.g. GCC's and clang's): a fixed set of calls, outputs compared
bit for bit.

    python tools/bit_identity.py write OUT.npz      # under one build: run the calls, save every output
    python tools/bit_identity.py compare REF.npz    # under another: run them again, compare bit for bit

The calls: forward_train (with running statistics), forward_infer, backward (training and eval), the fused
ReLU + residual epilogue of each, and the phases batch_stats, merge_stats, normalize, backward_reduce,
backward_apply, update_running_stats; float32
and float64; row-mode layouts (NCHW with H*W >= 32), column-mode ones ((N, C), NHWC through axis=-1, and
NCHW with a small H*W); 1, 2 and 3 threads. Every SIMD path the CPU has is run (BATCHNORM_SIMD=baseline,
avx2 and the default, each in a fresh process because the choice is made once per process), so a build
is compared path for path with the other, and within one build the paths and thread counts are compared
with each other too (they must agree as well: the kernels promise bit-identical results for any thread
count and any instruction set). The inputs are drawn from a seeded generator, shifted and scaled per
channel so that the statistics' rounding matters; nothing here is an expected number.

Exit status 0 when everything agrees, 1 with a list of the differing outputs otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

# name: (shape, axis). Row mode needs S = prod(shape after axis) >= 32; column mode is S < 32.
LAYOUTS = {
    "nc": ((257, 40), 1),               # (N, C): column mode
    "nchw_row": ((6, 5, 9, 11), 1),     # S = 99: row mode
    "nchw_col": ((33, 7, 3, 2), 1),     # S = 6: column mode
    "nhwc": ((5, 6, 7, 24), -1),        # channels last: column mode over C = 24
    "ncl_long": ((3, 4, 5000), 1),      # S = 5000 > one 4096-value chunk: row mode, two chunks
}
DTYPES = ("float32", "float64")
THREADS = (1, 2, 3)
SIMD_LEVELS = ("baseline", "avx2", "")  # "" = the default choice (the best the CPU has)


def _data(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    cshape = [1] * len(shape)
    cshape[axis] = C
    shift = rng.normal(0, 50, C).reshape(cshape)
    scale = rng.uniform(0.1, 10, C).reshape(cshape)
    x = (rng.normal(0, 1, shape) * scale + shift).astype(dtype)
    dy = rng.normal(0, 1, shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, C).astype(dtype)
    beta = rng.normal(0, 1, C).astype(dtype)
    return x, dy, gamma, beta


def run_calls():
    """{key: array} for every call, layout, dtype and thread count under the current SIMD choice."""
    import batchnorm as bn

    out = {}
    for (lname, (shape, axis)), dtype in ((lay, dt) for lay in LAYOUTS.items() for dt in DTYPES):
        x, dy, gamma, beta = _data(shape, axis, dtype, seed=sum(map(ord, lname + dtype)))
        for t in THREADS:
            bn.set_num_threads(t)
            k = f"{lname}/{dtype}/t{t}/"
            rm = np.linspace(-1, 1, gamma.size)
            rv = np.linspace(0.5, 2, gamma.size)
            y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
            out[k + "forward_train.y"], out[k + "forward_train.mean"] = y, mean
            out[k + "forward_train.invstd"] = invstd
            out[k + "forward_train.running_mean"], out[k + "forward_train.running_var"] = rm, rv
            out[k + "forward_infer.y"] = bn.forward_infer(x, rm, rv, gamma, beta, axis=axis)
            for training in (True, False):
                dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
                tk = k + f"backward.training={training}."
                out[tk + "dx"], out[tk + "dgamma"], out[tk + "dbeta"] = dx, dgamma, dbeta
            # the fused epilogue y = relu(bn(x) + residual), forward and backward (mask from y and from beta)
            res = np.flip(dy, axis=0).copy()
            yf, fmean, finvstd = bn.forward_train(x, gamma, beta, axis=axis, activation="relu", residual=res,
                                                  stats_dtype=np.float64)
            out[k + "fused.forward_train.y"] = yf
            out[k + "fused.forward_infer.y"] = bn.forward_infer(x, rm, rv, gamma, beta, axis=axis,
                                                                activation="relu", residual=res)
            out[k + "fused.normalize.y"] = bn.normalize(x, fmean, finvstd, gamma, beta, axis=axis,
                                                        activation="relu", residual=res)
            for how, kw in (("y", dict(y=yf, residual=True)), ("beta", dict(beta=beta, residual=res))):
                for name, v in zip(("dx", "dgamma", "dbeta", "d_residual"),
                                   bn.backward(dy, x, fmean, finvstd, gamma, axis=axis, activation="relu", **kw)):
                    out[k + f"fused.backward.mask_from_{how}.{name}"] = v
            # the phases, as a synchronized BN composes them: two parts of the batch, merged
            n0 = x.shape[0] // 2 if axis != 0 else 1
            parts = [x[:n0], x[n0:]]
            stats = [bn.batch_stats(p, axis=axis) for p in parts]
            for i, (c, m, m2) in enumerate(stats):
                out[k + f"batch_stats.{i}.mean"], out[k + f"batch_stats.{i}.m2"] = m, m2
            count, gmean, gm2 = bn.merge_stats([s[0] for s in stats], [s[1] for s in stats],
                                               [s[2] for s in stats])
            out[k + "merge_stats.mean"], out[k + "merge_stats.m2"] = gmean, gm2
            ginvstd = 1.0 / np.sqrt(gm2 / count + 1e-5)
            out[k + "normalize.y"] = bn.normalize(x, gmean, ginvstd, gamma, beta, axis=axis)
            sdy, sdyxmu = bn.backward_reduce(dy, x, gmean, axis=axis)
            out[k + "backward_reduce.sum_dy"], out[k + "backward_reduce.sum_dy_xmu"] = sdy, sdyxmu
            out[k + "backward_apply.dx"] = bn.backward_apply(dy, x, gmean, ginvstd, gamma, sdy, sdyxmu, count,
                                                             axis=axis)
            rm2, rv2 = rm.copy(), rv.copy()
            bn.update_running_stats(rm2, rv2, gmean, gm2, count, momentum=0.25)
            out[k + "update_running_stats.mean"], out[k + "update_running_stats.var"] = rm2, rv2
    return out


def _child(path, simd):
    env = dict(os.environ)
    env.pop("BATCHNORM_SIMD", None)
    if simd:
        env["BATCHNORM_SIMD"] = simd
    subprocess.run([sys.executable, os.path.abspath(__file__), "_run", path], env=env, check=True, timeout=600)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def collect(tmpdir):
    """{simd/key: array} over every SIMD level; each level in its own process."""
    import batchnorm as bn

    info = bn._core._build_info()
    print(f"bit_identity: batchnorm {bn.__version__} from {bn.__file__}, compiler {info['compiler']}, "
          f"OpenMP {info['openmp']}, SIMD {info['simd']}")
    res = {}
    for simd in SIMD_LEVELS:
        level = simd or "default"
        for k, v in _child(os.path.join(tmpdir, f"level_{level}.npz"), simd).items():
            res[f"{level}/{k}"] = v
    return res


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check_internal(res):
    """Within one build: every thread count and SIMD level gives the bits of baseline, one thread."""
    bad = []
    for key, v in res.items():
        level, lname, dtype, t, name = key.split("/", 4)
        ref = res[f"baseline/{lname}/{dtype}/t1/{name}"]
        if not _same_bits(v, ref):
            bad.append(f"{key} differs from baseline/{lname}/{dtype}/t1/{name} in this build")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["write", "compare", "_run"])
    ap.add_argument("path")
    args = ap.parse_args(argv)
    if args.mode == "_run":
        np.savez(args.path, **run_calls())
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bn_bitid_") as tmp:
        res = collect(tmp)
    bad = check_internal(res)
    if args.mode == "write":
        np.savez_compressed(args.path, **res)
        print(f"bit_identity: wrote {len(res)} arrays to {args.path}")
    else:
        with np.load(args.path) as f:
            ref = {k: f[k] for k in f.files}
        if set(ref) != set(res):
            bad.append(f"different sets of outputs: {sorted(set(ref) ^ set(res))[:5]} ...")
        for k in sorted(set(ref) & set(res)):
            if not _same_bits(ref[k], res[k]):
                a, b = ref[k].astype(np.float64), res[k].astype(np.float64)
                bad.append(f"{k}: differs from {args.path} (max |diff| {np.max(np.abs(a - b)):.3g})")
        print(f"bit_identity: compared {len(res)} arrays with {args.path}")
    for line in bad[:50]:
        print("bit_identity: DIFFERENT:", line)
    if bad:
        print(f"bit_identity: FAILED: {len(bad)} outputs differ")
        return 1
    print("bit_identity: every output bit-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
