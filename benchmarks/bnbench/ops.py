"""The table of operations, the cases, and the implementations of every operation.

An operation is a forward (training or inference), a backward, or both (a training "step"), with an
optional epilogue: ReLU, or an added residual then ReLU (``y = relu(bn(x) + residual)``). The table,
``OPS``, lists them as data; each implementation family (ours, our unfused composition, PyTorch, the
NumPy reference) builds any row's callable from three pieces, its forward, its backward and the
epilogue, so a new fused variant is a new row, not new code.

The families:

ours          batchnorm's own call as a user writes it (output allocation included): the fused API
              (``activation="relu"``, ``residual=``) for the fused rows;
ours out=     the same call writing into a preallocated ``out=`` array (single-call rows only);
ours unfused  the fused rows composed by hand: our BN, then NumPy's add and ``np.maximum(., 0)``; its
              backward ``dz = dy * (y > 0)``, then our backward of dz (d_residual = dz);
torch         ``torch.native_batch_norm`` (+ ``add_`` + ``relu_``) and ``native_batch_norm_backward``
              (after ``threshold_backward``), channels_last tensors for the NHWC cases;
numpy         ``batchnorm.reference`` (plain NumPy, float64 inside, one thread), composed like ours
              unfused.

Every callable returns a tuple (forward: ``(y, mean, invstd)`` or ``(y,)``; backward: ``(dx, dgamma,
dbeta)`` plus ``d_residual``; a step: the forward's tuple then the backward's) so that ``check`` can
compare what each family computes with a float64 reference, name by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .env import bn, get_torch

MOMENTUM, EPS = 0.1, 1e-5


# ----------------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple  # the shape of OUR array (NHWC cases: (N, H, W, C))
    dtype: str
    layout: str   # "NCHW", "NHWC" or "NC"
    small_target: bool = False  # one of the small float32 tensors (the 0.5x-PyTorch target)

    @property
    def axis(self):
        return -1 if self.layout == "NHWC" else 1

    @property
    def C(self):
        return self.shape[self.axis]

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


CASES = [
    Case("64x256x28x28 f32 NCHW", (64, 256, 28, 28), "float32", "NCHW"),
    Case("64x256x28x28 f32 NHWC", (64, 28, 28, 256), "float32", "NHWC"),
    Case("8192x1024 f32", (8192, 1024), "float32", "NC"),
    Case("32x256x28x28 f64 NCHW", (32, 256, 28, 28), "float64", "NCHW"),
    Case("32x256x28x28 f64 NHWC", (32, 28, 28, 256), "float64", "NHWC"),
    Case("8192x1024 f64", (8192, 1024), "float64", "NC"),
    Case("32x64x8x8 f32 NCHW (in cache)", (32, 64, 8, 8), "float32", "NCHW", True),
    Case("64x512 f32 (in cache)", (64, 512), "float32", "NC", True),
    Case("256x64 f32 (in cache)", (256, 64), "float32", "NC", True),
    Case("8x16x16x16 f32 NCHW (in cache)", (8, 16, 16, 16), "float32", "NCHW", True),
]


# ----------------------------------------------------------------------------------------------------
# operations


@dataclass(frozen=True)
class Op:
    """One row of the table.

    forward   "train", "infer" or None; backward: whether the op ends with the training backward.
    relu      ReLU after BN; residual: ``relu(bn(x) + residual)`` (always with relu here).
    mask      where the fused backward gets ReLU's mask: "beta" (recomputed from x with the forward's
              arithmetic, and from the residual when there is one) or "y" (the forward's output).
    """

    name: str
    forward: str | None
    backward: bool
    relu: bool = False
    residual: bool = False
    mask: str | None = None
    doc: str = ""

    @property
    def fused(self):
        return self.relu or self.residual

    @property
    def step(self):
        return self.forward is not None and self.backward

    @property
    def has_out(self):
        """Whether ``out=`` applies: one call writing one full-size result (not a step)."""
        return not self.step

    def traffic(self):
        """(two_pass, one_read): the least memory traffic, in units of x.nbytes.

        two_pass is what the op must move when its tensors do not fit in the last-level cache. A
        training forward reads x once for the statistics and again to normalize. A training backward
        reads x, dy and the ReLU mask's source (y; or, with the mask recomputed from beta, nothing
        beyond x, or the residual when there is one) for its two per-channel sums, then x again and the
        masked gradient g: dy and the mask's source once more, or, with a residual, g itself, which the
        first pass wrote as d_residual (an output anyway) and the second reads back. one_read is the
        ideal for tensors that fit in cache: each input read once, each output written once. A step is
        its forward plus its backward (the backward reads what the forward wrote)."""
        two = one = 0
        if self.forward == "train":
            two, one = two + 2, one + 1           # x
        elif self.forward == "infer":
            two, one = two + 1, one + 1           # x
        if self.forward is not None:
            if self.residual:
                two, one = two + 1, one + 1       # residual
            two, one = two + 1, one + 1           # y written
        if self.backward:
            mask_src = self.relu and (self.mask == "y" or self.residual)
            two, one = two + 2, one + 1           # x, at both passes
            two, one = two + 1, one + 1           # dy, first pass
            if mask_src:
                two, one = two + 1, one + 1       # the mask's source, first pass
            if self.residual:
                two, one = two + 2, one + 1       # d_residual: written by the first pass, read by the second
            else:
                two += 1 + (1 if mask_src else 0)  # dy (and the mask's source) again, second pass
            two, one = two + 1, one + 1           # dx written
        return two, one

    def output_names(self):
        names = ()
        if self.forward == "train":
            names += ("y", "mean", "invstd")
        elif self.forward == "infer":
            names += ("y",)
        if self.backward:
            names += ("dx", "dgamma", "dbeta") + (("dresidual",) if self.residual else ())
        return names


OPS = [
    Op("train", "train", False, doc="training forward"),
    Op("infer", "infer", False, doc="inference forward"),
    Op("backward", None, True, doc="training backward"),
    Op("train+relu", "train", False, relu=True, doc="training forward, y = relu(bn(x))"),
    Op("backward+relu", None, True, relu=True, mask="beta", doc="its backward, mask from beta"),
    Op("step+relu", "train", True, relu=True, mask="beta", doc="forward + backward of BN+ReLU"),
    Op("train+add+relu", "train", False, relu=True, residual=True,
       doc="training forward, y = relu(bn(x) + residual)"),
    Op("infer+add+relu", "infer", False, relu=True, residual=True,
       doc="inference forward, y = relu(bn(x) + residual)"),
    Op("backward+add+relu", None, True, relu=True, residual=True, mask="y",
       doc="its backward, mask from y, returns d_residual"),
    Op("step+add+relu", "train", True, relu=True, residual=True, mask="y",
       doc="forward + backward of BN+add+ReLU"),
]
OPS_BY_NAME = {op.name: op for op in OPS}


# ----------------------------------------------------------------------------------------------------
# the fused API: present in this build?


def fused_api():
    """Whether this batchnorm has the fused API; returns ``(available, reason)``.

    A tiny call of each fused form (forward with activation and residual; backward with the mask from
    beta, and from y with residual=True): a TypeError (unknown keyword) or ValueError means absent."""
    x = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]], np.float32)
    g, b = np.ones(2, np.float32), np.zeros(2, np.float32)
    r = np.full_like(x, 0.5)
    try:
        y, mean, invstd = bn.forward_train(x, g, b, activation="relu", residual=r)
        bn.forward_infer(x, mean, np.ones(2, np.float32), g, b, activation="relu", residual=r)
        bn.backward(x, x, mean, invstd, g, activation="relu", beta=b)
        res = bn.backward(x, x, mean, invstd, g, activation="relu", y=y, residual=True)
        if len(res) != 4:
            return False, f"backward(..., residual=True) returned {len(res)} values, expected 4"
    except (TypeError, ValueError) as e:
        return False, f"{type(e).__name__}: {e}"
    return True, "forward_train/forward_infer/backward take activation= and residual="


# ----------------------------------------------------------------------------------------------------
# data


def make_data(case, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(case.dtype)
    C = case.C
    # standard_normal(dtype=) fills the array directly (no float64 temporary), plus a per-channel offset
    x = rng.standard_normal(case.shape, dtype=dt)
    dy = rng.standard_normal(case.shape, dtype=dt)
    residual = rng.standard_normal(case.shape, dtype=dt)
    bshape = [1] * len(case.shape)
    bshape[case.axis] = C
    x += rng.uniform(-1.0, 1.0, C).astype(dt).reshape(bshape)
    # parameters and running stats in the data's dtype: torch refuses mixed dtypes on CPU
    return dict(
        x=x, dy=dy, residual=residual,
        gamma=rng.uniform(0.5, 1.5, C).astype(dt),
        beta=rng.uniform(-0.5, 0.5, C).astype(dt),
        rmean=rng.uniform(-1.0, 1.0, C).astype(dt),
        rvar=rng.uniform(0.5, 2.0, C).astype(dt),
    )


def to_torch(case, a):
    """A torch view of one of our arrays: NHWC arrays become NCHW tensors in channels_last format."""
    torch = get_torch()
    t = torch.from_numpy(a)
    if case.layout == "NHWC" and a.ndim == 4:
        t = t.permute(0, 3, 1, 2)
        # already channels_last-contiguous: this returns t itself, no copy
        t = t.contiguous(memory_format=torch.channels_last)
        assert t.data_ptr() == torch.from_numpy(a).data_ptr()
    return t


def from_torch(case, t):
    """Back to our layout, as a NumPy array (for comparisons)."""
    if case.layout == "NHWC" and t.ndim == 4:
        t = t.permute(0, 2, 3, 1)
    return t.detach().numpy()


class Shared:
    """What the backward-only rows take as input, the same for every family: ours's forward of the
    row's kind (fused where this build has it), so that the ReLU mask is one mask for all."""

    def __init__(self, case, d, fused):
        self.case, self.d, self.fused = case, d, fused
        self._cache = {}

    def inputs(self, op):
        """(y, mean, invstd) for op's backward; y is None without ReLU."""
        key = (op.relu, op.residual)
        if key not in self._cache:
            d, ax = self.d, self.case.axis
            kw = {}
            if self.fused and op.relu:
                kw = dict(activation="relu", residual=d["residual"] if op.residual else None,
                          stats_dtype=np.float64)  # as Ours.forward, for the same reason
            y, mean, invstd = bn.forward_train(d["x"], d["gamma"], d["beta"], eps=EPS, axis=ax, **kw)
            if op.relu and not self.fused:
                if op.residual:
                    np.add(y, d["residual"], out=y)
                np.maximum(y, 0, out=y)
            self._cache[key] = (y if op.relu else None, mean, invstd)
        return self._cache[key]


# ----------------------------------------------------------------------------------------------------
# the families


class Family:
    """Builds callables for the rows of the table. Subclasses supply ``forward(op)`` (a callable
    returning a tuple) and ``backward(op)`` (a callable of ``(y, mean, invstd)`` returning a tuple),
    ``shared(y, mean, invstd)`` (shared inputs in this family's types) and ``to_numpy(result)``."""

    name = "?"

    def __init__(self, case, d, shared):
        self.case, self.d, self.shared_inputs = case, d, shared
        # fresh running statistics per family, so that families do not update each other's
        self.rm, self.rv = d["rmean"].copy(), d["rvar"].copy()

    def call(self, op):
        """The callable for op: its forward, its backward, or the forward then the backward."""
        if op.step:
            fwd, bwd = self.forward(op), self.backward(op)

            def step():
                f = fwd()
                return f + bwd(*f)
            return step
        if op.forward is not None:
            return self.forward(op)
        bwd = self.backward(op)
        y, mean, invstd = self.shared(*self.shared_inputs.inputs(op))
        return lambda: bwd(y, mean, invstd)

    def shared(self, y, mean, invstd):
        return y, mean, invstd

    def to_numpy(self, result):
        return [np.asarray(a) for a in result]

    def running_stats(self):
        return {"running_mean": np.asarray(self.rm), "running_var": np.asarray(self.rv)}


class Ours(Family):
    """batchnorm's calls; the fused API for the fused rows; ``out=`` into a preallocated array."""

    name = "ours"

    def __init__(self, case, d, shared, out=False):
        super().__init__(case, d, shared)
        self.out = np.empty_like(d["x"]) if out else None
        if out:
            self.name = "ours out="

    def _epilogue_kw(self, op):
        kw = {}
        if op.relu:
            kw["activation"] = "relu"
        if op.residual:
            kw["residual"] = self.d["residual"]
        return kw

    def forward(self, op):
        d, ax, o = self.d, self.case.axis, self.out
        x, g, b = d["x"], d["gamma"], d["beta"]
        kw = self._epilogue_kw(op)
        if op.forward == "train" and op.fused:
            # float64 statistics, as the layers keep them: the backward's mask recomputed from beta is
            # then the forward's y > 0 bit for bit (float32 ones may differ within a rounding of 0)
            kw["stats_dtype"] = np.float64
        if op.forward == "train":
            rm, rv = self.rm, self.rv
            return lambda: bn.forward_train(x, g, b, running_mean=rm, running_var=rv, momentum=MOMENTUM,
                                            eps=EPS, axis=ax, out=o, **kw)
        rmi, rvi = d["rmean"], d["rvar"]
        return lambda: (bn.forward_infer(x, rmi, rvi, g, b, eps=EPS, axis=ax, out=o, **kw),)

    def backward(self, op):
        d, ax, o = self.d, self.case.axis, self.out
        x, dy, g = d["x"], d["dy"], d["gamma"]
        if not op.relu:
            return lambda y, mean, invstd: bn.backward(dy, x, mean, invstd, g, training=True, axis=ax,
                                                       out=o)
        if op.mask == "beta":
            kw = dict(activation="relu", beta=d["beta"])
            if op.residual:
                kw["residual"] = d["residual"]
            return lambda y, mean, invstd: bn.backward(dy, x, mean, invstd, g, training=True, axis=ax,
                                                       out=o, **kw)
        res = True if op.residual else None
        return lambda y, mean, invstd: bn.backward(dy, x, mean, invstd, g, training=True, axis=ax,
                                                   out=o, activation="relu", y=y, residual=res)


class Composition(Family):
    """A BN module (batchnorm itself, or batchnorm.reference), then NumPy's add and maximum; backward:
    ReLU's mask applied to dy in NumPy, then the module's backward."""

    def __init__(self, case, d, shared, module, name):
        super().__init__(case, d, shared)
        self.mod, self.name = module, name

    def forward(self, op):
        d, ax, m = self.d, self.case.axis, self.mod
        x, g, b, r = d["x"], d["gamma"], d["beta"], d["residual"]
        relu, res = op.relu, op.residual
        if op.forward == "train":
            rm, rv = self.rm, self.rv
            if not op.fused:
                return lambda: m.forward_train(x, g, b, running_mean=rm, running_var=rv,
                                               momentum=MOMENTUM, eps=EPS, axis=ax)

            def fwd():
                y, mean, invstd = m.forward_train(x, g, b, running_mean=rm, running_var=rv,
                                                  momentum=MOMENTUM, eps=EPS, axis=ax)
                if res:
                    np.add(y, r, out=y)
                if relu:
                    np.maximum(y, 0, out=y)
                return y, mean, invstd
            return fwd
        rmi, rvi = d["rmean"], d["rvar"]

        def fwd_infer():
            y = m.forward_infer(x, rmi, rvi, g, b, eps=EPS, axis=ax)
            if res:
                np.add(y, r, out=y)
            if relu:
                np.maximum(y, 0, out=y)
            return (y,)
        return fwd_infer

    def backward(self, op):
        d, ax, m = self.d, self.case.axis, self.mod
        x, dy, g = d["x"], d["dy"], d["gamma"]
        if not op.fused:
            return lambda y, mean, invstd: m.backward(dy, x, mean, invstd, g, training=True, axis=ax)
        relu, res = op.relu, op.residual

        def bwd(y, mean, invstd):
            dz = dy * (y > 0) if relu else dy
            dx, dgamma, dbeta = m.backward(dz, x, mean, invstd, g, training=True, axis=ax)
            return (dx, dgamma, dbeta, dz) if res else (dx, dgamma, dbeta)
        return bwd


class Torch(Family):
    """PyTorch's ATen calls on the same memory (no autograd): native_batch_norm, add_, relu_;
    threshold_backward, native_batch_norm_backward."""

    name = "torch"

    def __init__(self, case, d, shared):
        super().__init__(case, d, shared)
        torch = self.torch = get_torch()
        self.xt, self.dyt, self.rt = (to_torch(case, d[k]) for k in ("x", "dy", "residual"))
        self.gt, self.bt = torch.from_numpy(d["gamma"]), torch.from_numpy(d["beta"])
        self.rmt, self.rvt = torch.from_numpy(self.rm), torch.from_numpy(self.rv)
        self.rm_inf, self.rv_inf = torch.from_numpy(d["rmean"]), torch.from_numpy(d["rvar"])

    def forward(self, op):
        nbn = self.torch.native_batch_norm
        xt, gt, bt, rt = self.xt, self.gt, self.bt, self.rt
        relu, res = op.relu, op.residual
        if op.forward == "train":
            rmt, rvt = self.rmt, self.rvt
            if not op.fused:
                return lambda: nbn(xt, gt, bt, rmt, rvt, True, MOMENTUM, EPS)

            def fwd():
                y, mean, invstd = nbn(xt, gt, bt, rmt, rvt, True, MOMENTUM, EPS)
                if res:
                    y.add_(rt)
                if relu:
                    y.relu_()
                return y, mean, invstd
            return fwd
        rmi, rvi = self.rm_inf, self.rv_inf

        def fwd_infer():
            y = nbn(xt, gt, bt, rmi, rvi, False, MOMENTUM, EPS)[0]
            if res:
                y.add_(rt)
            if relu:
                y.relu_()
            return (y,)
        return fwd_infer

    def backward(self, op):
        aten = self.torch.ops.aten
        nbb, thr = aten.native_batch_norm_backward, aten.threshold_backward
        xt, dyt, gt, rmt, rvt = self.xt, self.dyt, self.gt, self.rmt, self.rvt
        mask = [True, True, True]
        relu, res = op.relu, op.residual

        def bwd(y, mean, invstd):
            dz = thr(dyt, y, 0) if relu else dyt
            dx, dgamma, dbeta = nbb(dz, xt, gt, rmt, rvt, mean, invstd, True, EPS, mask)
            return (dx, dgamma, dbeta, dz) if res else (dx, dgamma, dbeta)
        return bwd

    def shared(self, y, mean, invstd):
        torch, dt = self.torch, np.dtype(self.case.dtype)
        # in the data's dtype: torch's backward wants its own forward's statistics' type
        return ((None if y is None else to_torch(self.case, y)), torch.from_numpy(mean.astype(dt)),
                torch.from_numpy(invstd.astype(dt)))

    def to_numpy(self, result):
        return [from_torch(self.case, t) for t in result]

    def running_stats(self):
        return {"running_mean": self.rmt.numpy(), "running_var": self.rvt.numpy()}


def families(case, d, op, *, fused, torch=True, numpy=True, shared=None):
    """{family name: Family} that implement op on this case (ours only where this build can)."""
    shared = shared or Shared(case, d, fused)
    fams = {}
    if fused or not op.fused:
        fams["ours"] = Ours(case, d, shared)
        if op.has_out:
            fams["ours out="] = Ours(case, d, shared, out=True)
    if op.fused:
        fams["ours unfused"] = Composition(case, d, shared, bn, "ours unfused")
    if torch and get_torch() is not None:
        fams["torch"] = Torch(case, d, shared)
    if numpy:
        fams["numpy"] = Composition(case, d, shared, bn.reference, "numpy")
    return fams


# ----------------------------------------------------------------------------------------------------
# what each family computes, against a float64 reference


def _reference_forward(case, d, kind, cache):
    """batchnorm.reference's forward of the case's data in float64: {"y", ...}; kept in cache (one per
    case: every op with this forward shares it, and nobody writes to it)."""
    key = ("forward", kind)
    if key in cache:
        return cache[key]
    ref, ax = bn.reference, case.axis
    x = d["x"].astype(np.float64)
    g, b = d["gamma"].astype(np.float64), d["beta"].astype(np.float64)
    if kind == "train":
        rm, rv = d["rmean"].astype(np.float64), d["rvar"].astype(np.float64)
        y, mean, invstd = ref.forward_train(x, g, b, running_mean=rm, running_var=rv, momentum=MOMENTUM,
                                            eps=EPS, axis=ax)
        res = dict(y=y, mean=mean, invstd=invstd, running_mean=rm, running_var=rv)
    else:
        res = dict(y=ref.forward_infer(x, d["rmean"], d["rvar"], g, b, eps=EPS, axis=ax))
    cache[key] = res
    return res


def expected(case, d, op, shared, y_mask=None, cache=None):
    """The outputs op must give, by name, in float64, from batchnorm.reference and NumPy. The backward's
    ReLU mask is ``y_mask > 0`` when given (a step: the family's own forward output, so that an element
    that rounds to the other side of 0 in one family does not count as a mismatch), else the shared
    input's. ``cache``: a dict kept across the ops of one case, for the reference forward."""
    ref, ax = bn.reference, case.axis
    cache = {} if cache is None else cache
    out = {}
    if op.forward is not None:
        out.update(_reference_forward(case, d, op.forward, cache))
        y = out["y"]
        if op.residual:
            y = y + d["residual"].astype(np.float64)
        if op.relu:
            y = np.maximum(y, 0.0)
        out["y"] = y
    if op.backward:
        if op.step:
            mean, invstd = out["mean"], out["invstd"]
            mask_src = y if y_mask is None else y_mask
        else:
            mask_src, mean, invstd = shared.inputs(op)
        dy = d["dy"].astype(np.float64)
        dz = dy * (np.asarray(mask_src) > 0) if op.relu else dy
        dx, dgamma, dbeta = ref.backward(dz, d["x"].astype(np.float64), np.asarray(mean, np.float64),
                                         np.asarray(invstd, np.float64), d["gamma"].astype(np.float64),
                                         training=True, axis=ax)
        out.update(dx=dx, dgamma=dgamma, dbeta=dbeta)
        if op.residual:
            out["dresidual"] = dz
    return out


def outputs_of(fam, op, result):
    """A family's result as {name: NumPy array}, with the running statistics after a training forward."""
    names = op.output_names()
    arrays = fam.to_numpy(result)
    if len(arrays) != len(names):
        raise ValueError(f"{fam.name} {op.name}: {len(arrays)} results, expected {len(names)} {names}")
    got = dict(zip(names, arrays))
    if op.forward == "train":
        got.update(fam.running_stats())
    return got


def compare(got, want):
    """(max abs difference, max of it scaled by each array's largest magnitude), over common names."""
    worst_abs = worst_scaled = 0.0
    for k, w in want.items():
        if k not in got:
            continue
        a, w = np.asarray(got[k], np.float64), np.asarray(w, np.float64)
        if a.shape != w.shape:
            return float("inf"), float("inf")
        if a.size == 0:
            continue
        diff = float(np.max(np.abs(a - w)))
        worst_abs = max(worst_abs, diff)
        worst_scaled = max(worst_scaled, diff / max(float(np.max(np.abs(w))), 1e-300))
    return worst_abs, worst_scaled


def check(case, d, op, *, fused, torch=True, cache=None):
    """Run each family's callable for op once, on fresh running statistics; compare with ``expected``
    (``cache``: a dict to share the reference's forward between the ops of one case).

    Returns {family: {"maxabs", "scaled", "ok"} or {"error"}}, and "tolerance_scaled"."""
    shared = Shared(case, d, fused)
    tol = 1e-3 if case.dtype == "float32" else 1e-9
    res = {"tolerance_scaled": tol}
    want_shared = None
    for name, fam in families(case, d, op, fused=fused, torch=torch, shared=shared).items():
        try:
            got = outputs_of(fam, op, fam.call(op)())
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            res[name] = {"error": f"{type(e).__name__}: {e}", "ok": False}
            continue
        if op.step and op.relu:
            want = expected(case, d, op, shared, y_mask=got["y"], cache=cache)
        else:
            want = want_shared = want_shared or expected(case, d, op, shared, cache=cache)
        mx, sc = compare(got, want)
        res[name] = {"maxabs": mx, "scaled": sc, "ok": bool(sc <= tol)}
    return res
