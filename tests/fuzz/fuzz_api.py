"""Atheris fuzz target over normkit's functional and layer API (and the raw core binding).

Contract checked (API.md): every call either succeeds or raises TypeError / ValueError, and
RuntimeError only for a layer's backward before any successful forward. Anything else is a
finding: another exception type, a crash (run against the ASan/UBSan build to catch memory
errors), or one of these invariants failing, reported as `Finding`:
  - a rejected call leaves every caller array (input, out, residual, weight, bias, running
    statistics, a layer's parameters and buffers) unchanged; a successful one changes only out=
    (which may be the input itself) and running statistics;
  - a successful call returns an array of the input's shape and dtype, equal to out= when given
    (gradients: the parameters' shapes and dtypes); load_state_dict(state_dict()) succeeds;
  - for finite, moderate inputs (float32/float64, |x| <= 1e3, eps >= 1e-6 or RMSNorm's default)
    forward (with residual= and activation="relu"), dx, dweight, dbias and batch_norm's running
    statistics match a plain float64 NumPy reference, in NCHW and NHWC, to a loose tolerance
    (this catches misread strides, views, layouts and shapes, not rounding).

Inputs cover random shapes (zeros and ones included, planes longer than the 2048-element chunk),
float32/float64, float16/bfloat16 and invalid dtypes (ints, complex, bool, object, big-endian),
views (strided, reversed, transposed, Fortran-order, broadcast, misaligned, read-only), NaN/Inf
and huge values, invalid eps / momentum / num_groups / normalized_shape / layout values, and
out= / residual= / activation= (in place, wrong shape or dtype, strided, read-only).

Run:  python tests/fuzz/fuzz_api.py -max_total_time=60 [corpus_dir]   (see .ci/fuzz.sh)
      NORMKIT_FUZZ_TARGETS: a subset of functional,layer,core (default: all three, the raw _core binding included)
Repro a finding:  python tests/fuzz/fuzz_api.py crash-<sha1>
Without atheris:  python tests/fuzz/fuzz_api.py --random SECONDS   (random bytes, no coverage)
"""
import os
import sys
import time
import warnings

import numpy as np

try:
    import atheris
except ImportError:  # --random mode still works
    atheris = None

if atheris is not None and "--random" not in sys.argv:
    with atheris.instrument_imports(include=["normkit"]):
        import normkit
        import normkit.functional as F
        from normkit import _core
else:
    import normkit
    import normkit.functional as F
    from normkit import _core


class Finding(AssertionError):
    """An invariant of the API contract does not hold."""


# ---------------------------------------------------------------------------------------------
# Reading the fuzzer's bytes
# ---------------------------------------------------------------------------------------------

class Source:
    """Decisions drawn from the fuzzer's bytes (zeros once they run out, like libFuzzer's FDP)."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def byte(self):
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, lo, hi):
        """An int in [lo, hi]."""
        span = hi - lo
        if span <= 0:
            return lo
        v = 0
        for _ in range((span.bit_length() + 7) // 8):
            v = (v << 8) | self.byte()
        return lo + v % (span + 1)

    def bool(self):
        return bool(self.byte() & 1)

    def chance(self, k):
        """True with probability about 1/k."""
        return self.int(0, k - 1) == 0

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def rng(self):
        return np.random.default_rng(self.int(0, 2**32 - 1))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

GOOD_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
BAD_DTYPES = [np.dtype(t) for t in (np.float16, np.int32, np.int64, np.uint8, np.bool_,
                                    np.complex64, np.longdouble, object, ">f4", ">f8")]
try:
    import ml_dtypes
    BAD_DTYPES.append(np.dtype(ml_dtypes.bfloat16))
except ImportError:
    pass

MAX_ELEMENTS = 40_000
SMALL_DIMS = (0, 1, 1, 2, 2, 3, 3, 4, 5, 7, 8, 17)


def draw_dtype(src, bad_one_in=8):
    return src.pick(BAD_DTYPES) if src.chance(bad_one_in) else src.pick(GOOD_DTYPES)


def draw_shape(src, min_ndim=0, max_ndim=5):
    ndim = src.int(min_ndim, max_ndim)
    shape = [src.pick(SMALL_DIMS) for _ in range(ndim)]
    if ndim and src.chance(6):  # a plane longer than one 2048-element chunk, with a tail
        shape[-1] = src.pick((2047, 2048, 2049, 2100, 4097))
    while int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
        i = max(range(ndim), key=lambda k: shape[k])
        shape[i] //= 2
    return tuple(shape)


def fill_values(src, rng, shape, dtype):
    """Values of one of several kinds; returns (array, moderate) where moderate says finite and
    |x| <= 1e3 (where the float64 reference comparison is meaningful)."""
    kind = src.int(0, 9)
    size = int(np.prod(shape, dtype=np.int64))
    if kind == 0:
        v = np.full(size, rng.normal())
    elif kind == 1:
        v = 1e3 * rng.uniform(-1, 1) + rng.normal(0, 1e-2, size)  # large mean, small spread
    elif kind == 2:
        v = rng.integers(-3, 4, size).astype(np.float64)
    elif kind == 3:
        v = rng.normal(0, 1, size) * 10.0 ** rng.integers(-40, 40)  # tiny to huge
    elif kind == 4:
        v = np.zeros(size)
    else:
        v = rng.normal(rng.normal(0, 3), rng.uniform(0.1, 5), size)
    if size and src.chance(4):  # specials at a few places
        for _ in range(src.int(1, 3)):
            v[src.int(0, size - 1)] = src.pick((np.nan, np.inf, -np.inf, -0.0, 5e-324, 1e308))
    if dtype.kind == "f" or dtype.kind == "c" or dtype == np.dtype(object):
        with np.errstate(over="ignore", invalid="ignore"):
            arr = v.astype(dtype)
    elif dtype.kind == "V" or dtype.name == "bfloat16":
        arr = v.astype(dtype)
    else:
        with np.errstate(invalid="ignore"):
            arr = np.nan_to_num(v).clip(-100, 100).astype(dtype)
    arr = arr.reshape(shape)
    moderate = dtype in GOOD_DTYPES and bool(np.all(np.isfinite(arr))) and \
        (arr.size == 0 or float(np.max(np.abs(arr))) <= 1e3)
    return arr, moderate


VIEWS = ("contiguous", "contiguous", "contiguous", "strided", "reversed", "transposed", "fortran",
         "broadcast", "misaligned", "readonly")


def as_view(src, arr):
    """The same values as `arr` in a different memory layout (never a different shape)."""
    kind = src.pick(VIEWS)
    shape = arr.shape
    if arr.ndim == 0 or arr.dtype == np.dtype(object):
        return arr, "contiguous"
    if kind == "strided":
        ax = src.int(0, arr.ndim - 1)
        step = src.int(2, 3)
        big = list(shape)
        big[ax] = shape[ax] * step
        base = np.zeros(big, arr.dtype)
        idx = [slice(None)] * arr.ndim
        idx[ax] = slice(None, None, step)
        base[tuple(idx)] = arr
        out = base[tuple(idx)]
    elif kind == "reversed":
        out = np.flip(np.flip(arr).copy())
    elif kind == "transposed":
        perm = list(src.rng().permutation(arr.ndim))
        inv = list(np.argsort(perm))
        out = np.ascontiguousarray(arr.transpose(inv)).transpose(perm)
    elif kind == "fortran":
        out = np.asfortranarray(arr)
    elif kind == "broadcast":
        ax = src.int(0, arr.ndim - 1)
        if shape[ax] == 0:
            return arr, "contiguous"
        first = np.take(arr, [0], axis=ax)
        out = np.broadcast_to(first, shape)  # read-only, stride 0 (the values change: all equal)
    elif kind == "misaligned":
        if arr.dtype.itemsize < 2:
            return arr, "contiguous"
        buf = np.zeros(arr.nbytes + arr.dtype.itemsize + 1, np.uint8)
        out = buf[1:1 + arr.nbytes].view(arr.dtype).reshape(shape)
        out[...] = arr
    elif kind == "readonly":
        out = arr.copy()
        out.flags.writeable = False
    else:
        out = arr
    assert out.shape == shape
    return out, kind


def draw_array(src, shape, dtype, view=True):
    arr, moderate = fill_values(src, src.rng(), shape, dtype)
    if view:
        arr, _ = as_view(src, arr)
        if arr.dtype in GOOD_DTYPES:  # a broadcast view changes values
            moderate = bool(np.all(np.isfinite(arr))) and (arr.size == 0 or float(np.max(np.abs(arr))) <= 1e3)
    return arr, moderate


def draw_param(src, shape, dtype, rng, kind="weight"):
    """A weight/bias (or None): mostly right, sometimes the wrong shape, dtype or type."""
    c = src.int(0, 15)
    if c < 3:
        return None
    if c == 3:
        return [1.0] * (shape[0] if shape else 1)  # a list, not an ndarray
    if c == 4:
        shape = tuple(d + src.int(-1, 1) for d in shape) if shape else (1,)
        shape = tuple(max(d, 0) for d in shape)
    if c == 5:
        dtype = draw_dtype(src, bad_one_in=1)
    p = (rng.uniform(0.5, 1.5, shape) if kind == "weight" else rng.normal(0, 0.5, shape))
    try:
        p = p.astype(dtype)
    except (TypeError, ValueError):
        return None
    if c == 6:
        p, _ = as_view(src, p)
    return p


def draw_eps(src, default=1e-5):
    return src.pick((default, default, default, 1e-3, 1e-6, 0.0, 0, 1, 1e300, -1e-5, np.nan, np.inf,
                     np.float32(1e-5), np.float64(1e-2), "1e-5", None, True, 1e-30, [1e-5]))


def draw_momentum(src):
    return src.pick((0.1, 0.1, 0.0, 1.0, 0.5, None, -0.1, 1.5, np.nan, np.float32(0.1), "0.1", True))


def draw_int_arg(src, good):
    return src.pick((good, good, good, good, 0, -1, good + 1, 2 * good, float(good), np.int64(good),
                     True, None, "2", 10**20))


def draw_normalized_shape(src, x_shape):
    tail_len = src.int(1, min(3, len(x_shape))) if x_shape else 1
    tail = tuple(x_shape[len(x_shape) - tail_len:]) if x_shape else (1,)
    c = src.int(0, 12)
    if c <= 5:
        return tail
    if c == 6:
        return tail[-1] if tail else 1
    if c == 7:
        return list(tail)
    if c == 8:
        return np.array(tail, dtype=np.int64)
    return src.pick(((), (-1,), (0,), (tail[-1] + 1,) if tail else (2,), (2.0,), "3", None,
                     (True,), (1, 1, 1, 1, 1, 1), 10**19))


# ---------------------------------------------------------------------------------------------
# Reference (float64) and comparisons
# ---------------------------------------------------------------------------------------------

TOL = {np.dtype(np.float32): 2e-3, np.dtype(np.float64): 1e-8}


class Grouping:
    """How a layer's statistics see an array of the input's shape: view(a) is (G, M) rows."""

    def __init__(self, x_shape, kind, C=None, G=None, M=None):
        self.shape, self.kind = x_shape, kind
        n = x_shape[0] if len(x_shape) else 1
        self.N, self.C, self.G, self.M = n, C, G, M

    def view(self, a):
        a = np.asarray(a, np.float64).reshape(self.shape)
        if self.kind == "channel":                   # (N, C, S) -> (C, N*S)
            return np.moveaxis(a.reshape(self.N, self.C, -1), 1, 0).reshape(self.C, -1)
        if self.kind == "instance":                  # (N, C, S) -> (N*C, S)
            return a.reshape(self.N * self.C, -1)
        if self.kind == "group":                     # (N, C, S) -> (N*G, C/G*S)
            return a.reshape(self.N * self.G, -1)
        return a.reshape(-1, self.M)                 # rows

    def unview(self, v):
        if self.kind == "channel":
            return np.moveaxis(v.reshape(self.C, self.N, -1), 0, 1).reshape(self.shape)
        return v.reshape(self.shape)


def broadcast_param(p, x_shape, per):
    """weight/bias (or None) spread over x's shape; per='channel' (dim 1) or 'trailing'."""
    if p is None:
        return None
    p = np.asarray(p, np.float64)
    if per == "channel":
        return np.broadcast_to(p.reshape((1, -1) + (1,) * (len(x_shape) - 2)), x_shape)
    return np.broadcast_to(p, x_shape)


def param_sum(a, x_shape, per, p_shape):
    a = np.asarray(a, np.float64).reshape(x_shape)
    if per == "channel":
        return a.sum(axis=tuple(i for i in range(len(x_shape)) if i != 1))
    lead = len(x_shape) - len(p_shape)
    return a.sum(axis=tuple(range(lead))).reshape(p_shape)


class Reference:
    """float64 forward/backward of one call; None-safe weight/bias (1 and 0)."""

    def __init__(self, x, grouping, w_full, b_full, eps, skip_mean=False, stats=None):
        self.x = np.asarray(x, np.float64)
        self.g, self.skip_mean = grouping, skip_mean
        self.w = np.ones(self.x.shape) if w_full is None else w_full
        self.b = np.zeros(self.x.shape) if b_full is None else b_full
        xv = grouping.view(self.x)
        if stats is None:  # batch statistics
            mean = np.zeros((xv.shape[0], 1)) if skip_mean else xv.mean(axis=1, keepdims=True)
            var = ((xv - mean) ** 2).mean(axis=1, keepdims=True) if xv.shape[1] else np.zeros_like(mean)
            self.batch = True
            with np.errstate(divide="ignore", invalid="ignore"):
                rstd = 1.0 / np.sqrt(var + eps)
            self.mean = grouping.unview(np.broadcast_to(mean, xv.shape).copy())
            self.rstd = grouping.unview(np.broadcast_to(rstd, xv.shape).copy())
        else:              # given (running) statistics, per element of x
            self.batch = False
            self.mean, var = stats
            with np.errstate(divide="ignore", invalid="ignore"):
                self.rstd = 1.0 / np.sqrt(var + eps)
        self.xhat = (self.x - self.mean) * self.rstd
        # The size of the terms xhat is computed from: its rounding error scales with this, not
        # with xhat (a constant group has xhat = 0 but x*rstd of any size).
        self.xs = np.abs(self.xhat) + self.rstd * (np.abs(self.x) + np.abs(self.mean))
        self.y = self.xhat * self.w + self.b

    def scale(self):
        return np.abs(self.w) * self.rstd * (np.abs(self.x) + np.abs(self.mean)) + np.abs(self.b)

    def forward_check(self, y, what):
        compare(y, self.y, self.scale(), what)

    def backward(self, dy):
        dy = np.asarray(dy, np.float64).reshape(self.x.shape)
        gfull = dy * self.w
        if not self.batch:
            return self.rstd * gfull, self.rstd * np.abs(gfull), dy
        gv, xh, r = self.g.view(gfull), self.g.view(self.xhat), self.g.view(self.rstd)
        xs = self.g.view(self.xs)
        M = gv.shape[1]
        mg = np.zeros((gv.shape[0], 1)) if self.skip_mean else gv.mean(axis=1, keepdims=True)
        mgx = (gv * xh).mean(axis=1, keepdims=True)
        dx = r * (gv - mg - xh * mgx)
        scale = r * (np.abs(gv) + np.abs(gv).mean(axis=1, keepdims=True) +
                     xs * (np.abs(gv) * xs).mean(axis=1, keepdims=True)) if M else r
        return self.g.unview(dx), self.g.unview(scale), dy


def compare(got, want, scale, what):
    got = np.asarray(got)
    dt = got.dtype
    if dt not in TOL:
        return
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise Finding(f"{what}: shape {got.shape}, reference {want.shape}")
    if not np.all(np.isfinite(want)):
        return  # the reference itself overflowed: nothing to compare
    err = np.abs(got.astype(np.float64) - want)
    bad = ~(err <= TOL[dt] * (1.0 + scale))
    if np.any(bad):
        i = np.unravel_index(int(np.flatnonzero(bad)[0]), got.shape) if got.ndim else ()
        raise Finding(f"{what}: {int(bad.sum())} of {got.size} entries off; first at {i}: "
                      f"got {got[i]!r}, reference {want[i]!r} (tol {TOL[dt]:g} x scale {float(scale[i]) if np.ndim(scale) else scale:g})")


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------

def snapshot(arrays):
    """Raw bytes of every ndarray in `arrays` (a dict name -> obj)."""
    out = {}
    for k, a in arrays.items():
        if isinstance(a, np.ndarray) and a.dtype != np.dtype(object):
            out[k] = (a.shape, np.ascontiguousarray(a).tobytes())
    return out


def check_unchanged(before, arrays, when):
    now = snapshot(arrays)
    for k, v in before.items():
        if now.get(k) != v:
            raise Finding(f"{when}: {k} was modified")


ALLOWED = (TypeError, ValueError)


def expect_ok_or_rejected(call, allow_runtime=False):
    """(result, None) on success, (None, exc) for an allowed rejection; anything else propagates."""
    try:
        return call(), None
    except ALLOWED as e:
        return None, e
    except RuntimeError as e:
        if allow_runtime:
            return None, e
        raise


def check_output(y, x, what):
    if not isinstance(y, np.ndarray):
        raise Finding(f"{what}: returned {type(y).__name__}, expected an ndarray")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise Finding(f"{what}: returned shape {y.shape} dtype {y.dtype}, input had {x.shape} {x.dtype}")


def eps_ok(eps):
    return isinstance(eps, (float, int, np.floating)) and not isinstance(eps, bool) and \
        np.isfinite(eps) and 1e-6 <= float(eps) <= 1e6


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------

HALF = tuple(d for d in BAD_DTYPES if d == np.dtype(np.float16) or d.name == "bfloat16")


def to_nchw(a, layout):
    """An (N, *spatial, C) array as (N, C, *spatial); NCHW arrays unchanged."""
    a = np.asarray(a)
    return np.moveaxis(a, -1, 1) if layout == "NHWC" and a.ndim >= 2 else a


def draw_epilogue(src, x, rng):
    """Keyword-only extras: out= (new, the input itself, or wrong), residual=, activation=."""
    kw = {}
    if not isinstance(x, np.ndarray) or x.dtype == np.dtype(object):
        return kw
    if src.chance(3):
        c = src.int(0, 7)
        if c == 0:
            kw["out"] = x                                   # in place
        elif c <= 3:
            kw["out"] = np.full(x.shape, 7, x.dtype)
        elif c == 4:
            kw["out"] = np.empty(x.shape, np.float64 if x.dtype != np.float64 else np.float32)
        elif c == 5:
            kw["out"] = as_view(src, np.full(x.shape, 7, x.dtype))[0]
        elif c == 6:
            o = np.full(x.shape, 7, x.dtype)
            o.flags.writeable = False
            kw["out"] = o
        else:
            kw["out"] = np.empty(x.shape[:-1] + (x.shape[-1] + 1,) if x.ndim else (2,), x.dtype)
    if src.chance(3):
        c = src.int(0, 5)
        if c <= 2 or x.dtype not in GOOD_DTYPES:
            r = rng.normal(0, 1, x.shape).astype(x.dtype) if x.dtype.kind == "f" or x.dtype in HALF else np.zeros(x.shape, x.dtype)
            kw["residual"] = as_view(src, r)[0] if c == 1 else r
        elif c == 3 and "out" in kw:
            kw["residual"] = kw["out"]                      # residual may be out itself
        elif c == 4:
            kw["residual"] = np.ones(x.shape + (1,), x.dtype)
        else:
            kw["residual"] = [0.0]
    if src.chance(3):
        kw["activation"] = src.pick(("relu", "relu", None, "gelu", "RELU", 1))
    return kw


def apply_epilogue_ref(ref_y, scale, residual, relu):
    if residual is not None:
        ref_y = ref_y + residual
        scale = scale + np.abs(residual)
    if relu:
        ref_y = np.maximum(ref_y, 0.0)
    return ref_y, scale


def fuzz_functional(src):
    fn = src.pick(("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"))
    channel_fn = fn in ("batch_norm", "instance_norm", "group_norm")
    dtype = draw_dtype(src)
    extra = {}
    layout = "NCHW"
    if channel_fn and src.chance(3):
        layout = src.pick(("NHWC", "NHWC", "NCHW", "nhwc", None))
        extra["layout"] = layout
    elif not channel_fn and src.chance(40):
        extra["layout"] = "NHWC"  # not an argument of layer_norm / rms_norm: TypeError
    shape = draw_shape(src, min_ndim=0 if src.chance(8) else (2 if channel_fn else 1))
    x, moderate = draw_array(src, shape, dtype)
    rng = src.rng()
    cdim = -1 if layout == "NHWC" else 1
    C = shape[cdim] if len(shape) >= 2 else 1
    pdt = (np.dtype(np.float32) if x.dtype in HALF else x.dtype) if not src.chance(10) else draw_dtype(src)
    extra.update(draw_epilogue(src, x, rng))
    out, residual = extra.get("out"), extra.get("residual")
    x_before = np.array(x, copy=True)
    res_before = np.array(residual, np.float64) if isinstance(residual, np.ndarray) and residual.dtype in GOOD_DTYPES else None
    arrays = {"input": x, "out": out, "residual": residual}
    ns_tuple = None

    if fn in ("batch_norm", "instance_norm"):
        weight = draw_param(src, (C,), pdt, rng, "weight")
        bias = draw_param(src, (C,), pdt, rng, "bias")
        rm = rv = None
        if src.int(0, 3) or fn == "batch_norm":
            rm = draw_param(src, (C,), pdt, rng, "bias") if src.chance(3) else rng.normal(0, 1, C).astype(pdt)
            rv = draw_param(src, (C,), pdt, rng, "weight") if src.chance(3) else rng.uniform(0.2, 3, C).astype(pdt)
            if isinstance(rm, np.ndarray) and src.chance(8):
                rv = rm  # the same buffer twice
        training = src.pick((True, False, True, False, 1, 0, np.bool_(True)))
        momentum, eps = draw_momentum(src), draw_eps(src)
        arrays.update(weight=weight, bias=bias, running_mean=rm, running_var=rv)
        f = F.batch_norm if fn == "batch_norm" else F.instance_norm
        call = lambda: f(x, rm, rv, weight, bias, training, momentum, eps, **extra)
    elif fn == "group_norm":
        num_groups = draw_int_arg(src, src.pick([g for g in range(1, C + 1) if C % g == 0] or [1]))
        weight = draw_param(src, (C,), pdt, rng, "weight")
        bias = draw_param(src, (C,), pdt, rng, "bias")
        eps = draw_eps(src)
        arrays.update(weight=weight, bias=bias)
        call = lambda: F.group_norm(x, num_groups, weight, bias, eps, **extra)
    else:
        ns = draw_normalized_shape(src, shape)
        try:
            ns_tuple = tuple(int(d) for d in (ns if hasattr(ns, "__iter__") else (ns,))) \
                if not isinstance(ns, (str, type(None))) else None
        except (TypeError, ValueError, OverflowError):
            ns_tuple = None
        pshape = ns_tuple if ns_tuple is not None and all(0 <= d < 10**6 for d in ns_tuple) else (1,)
        weight = draw_param(src, pshape, pdt, rng, "weight") if pshape else None
        bias = draw_param(src, pshape, pdt, rng, "bias") if pshape and fn == "layer_norm" else None
        eps = draw_eps(src, default=1e-5 if fn == "layer_norm" else None)
        arrays.update(weight=weight, bias=bias)
        if fn == "layer_norm":
            call = lambda: F.layer_norm(x, ns, weight, bias, eps, **extra)
        else:
            call = lambda: F.rms_norm(x, ns, weight, eps, **extra)

    stats_before = {k: np.array(arrays[k], np.float64) if isinstance(arrays.get(k), np.ndarray) else None
                    for k in ("running_mean", "running_var")}
    before = snapshot(arrays)
    y, err = expect_ok_or_rejected(call)
    if err is not None:
        check_unchanged(before, arrays, f"{fn} rejected ({type(err).__name__}: {err})")
        return
    # What a successful call may write: out (which may be the input or the residual), and the
    # running statistics in training.
    may_change = {"running_mean", "running_var"}
    if isinstance(out, np.ndarray):
        may_change |= {k for k, a in arrays.items() if isinstance(a, np.ndarray) and np.shares_memory(a, out)}
    check_unchanged({k: v for k, v in before.items() if k not in may_change}, arrays, f"{fn} succeeded")
    check_output(y, x, fn)
    if isinstance(out, np.ndarray) and np.ascontiguousarray(out).tobytes() != np.ascontiguousarray(y).tobytes():
        raise Finding(f"{fn}: out= holds something else than the returned array")

    # The float64 reference, for moderate inputs.
    relu = extra.get("activation") == "relu"
    if not (moderate and x.size and x.dtype in GOOD_DTYPES and x.ndim >= 1):
        return
    if residual is not None and (res_before is None or not np.all(np.isfinite(res_before))):
        return
    xr = to_nchw(x_before, layout)
    yr = to_nchw(y, layout)
    rres = None if res_before is None else to_nchw(res_before, layout)
    if channel_fn:
        if not eps_ok(eps) or x.ndim < 2:
            return
        bw, bb = broadcast_param(weight, xr.shape, "channel"), broadcast_param(bias, xr.shape, "channel")
        if fn == "group_norm":
            if type(num_groups) not in (int, np.int64):
                return
            ref = Reference(xr, Grouping(xr.shape, "group", C=C, G=int(num_groups)), bw, bb, float(eps))
        elif training:
            kind = "channel" if fn == "batch_norm" else "instance"
            ref = Reference(xr, Grouping(xr.shape, kind, C=C), bw, bb, float(eps))
        else:
            r_m, r_v = stats_before["running_mean"], stats_before["running_var"]
            if r_m is None or r_v is None or not (np.all(np.isfinite(r_m)) and np.all(r_v >= 0)):
                return
            stats = (broadcast_param(r_m, xr.shape, "channel"), broadcast_param(r_v, xr.shape, "channel"))
            ref = Reference(xr, Grouping(xr.shape, "channel", C=C), bw, bb, float(eps), stats=stats)
    else:
        eps_eff = machine_eps(x.dtype) if (eps is None and fn == "rms_norm") else eps
        if not ns_tuple or not (eps is None or eps_ok(eps_eff)):
            return
        M = int(np.prod(ns_tuple))
        ref = Reference(xr, Grouping(xr.shape, "rows", M=M), broadcast_param(weight, xr.shape, "trailing"),
                        broadcast_param(bias, xr.shape, "trailing"), float(eps_eff), skip_mean=(fn == "rms_norm"))
    want, scale = apply_epilogue_ref(ref.y, ref.scale(), rres, relu)
    compare(yr, want, scale, f"{fn} {extra if extra else ''}".strip())
    if fn == "batch_norm" and training and arrays["running_mean"] is not None and arrays["running_var"] is not None \
            and arrays["running_mean"] is not arrays["running_var"] and isinstance(momentum, (float, np.floating)) \
            and xr.size // C > 1 and arrays["running_mean"].dtype in GOOD_DTYPES:
        xv = Grouping(xr.shape, "channel", C=C).view(xr)
        m = float(momentum)
        want_rm = (1 - m) * stats_before["running_mean"] + m * xv.mean(axis=1)
        want_rv = (1 - m) * stats_before["running_var"] + m * xv.var(axis=1, ddof=1)
        compare(arrays["running_mean"], want_rm, np.abs(want_rm) + 1, "batch_norm running_mean")
        compare(arrays["running_var"], want_rv, np.abs(want_rv) + 1, "batch_norm running_var")


def machine_eps(dtype):
    return float(np.finfo(dtype).eps)


LAYER_CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
                 "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm")


def make_layer(src, name, shape, dtype):
    """(layer, ctor-kwargs) or (None, exc) when the constructor rejects its arguments."""
    cls = getattr(normkit, name)
    ldtype = dtype if not src.chance(12) else src.pick((np.float16, np.int32, "float64", None, "bogus", object))
    kw = {}
    layout = "NCHW"
    if name.startswith(("BatchNorm", "InstanceNorm", "GroupNorm")) and src.chance(3):
        layout = kw["layout"] = src.pick(("NHWC", "NHWC", "NCHW", "NCWH"))
    cdim = -1 if layout == "NHWC" else 1
    C = shape[cdim] if len(shape) >= 2 else (shape[0] if shape else 1)
    if name.startswith("InstanceNorm") and len(shape) == int(name[-2]) + 1:
        C = shape[-1] if layout == "NHWC" else shape[0]  # unbatched
    if name.startswith(("BatchNorm", "InstanceNorm")):
        kw.update(num_features=draw_int_arg(src, max(C, 1)), eps=draw_eps(src), momentum=draw_momentum(src),
                  affine=src.bool(), track_running_stats=src.bool(), dtype=ldtype)
    elif name == "GroupNorm":
        kw.update(num_groups=draw_int_arg(src, src.pick([g for g in range(1, max(C, 1) + 1) if max(C, 1) % g == 0])),
                  num_channels=draw_int_arg(src, max(C, 1)), eps=draw_eps(src), affine=src.bool(), dtype=ldtype)
    elif name == "LayerNorm":
        kw.update(normalized_shape=draw_normalized_shape(src, shape), eps=draw_eps(src),
                  elementwise_affine=src.bool(), bias=src.bool(), dtype=ldtype)
    else:
        kw.update(normalized_shape=draw_normalized_shape(src, shape), eps=draw_eps(src, default=None),
                  elementwise_affine=src.bool(), dtype=ldtype)
    try:
        return cls(**kw), kw
    except ALLOWED as e:
        return None, e


def layer_reference(layer, name, x):
    """A Reference for layer(x) as the layer is now, in NCHW terms (ref.layout says how to turn
    the layer's arrays into NCHW), or None."""
    if x.dtype not in GOOD_DTYPES or x.size == 0:
        return None
    layout = getattr(layer, "layout", "NCHW")
    eps = layer.eps
    if name == "RMSNorm" and eps is None:
        eps = machine_eps(x.dtype)
    elif not eps_ok(eps):
        return None
    w = getattr(layer, "weight", None)
    b = getattr(layer, "bias", None)
    if name.startswith(("BatchNorm", "InstanceNorm")):
        xb = x
        if name.startswith("InstanceNorm") and x.ndim == int(name[-2]) + 1:
            xb = x[None]
        xb = to_nchw(xb, layout)
        C = xb.shape[1]
        if name.startswith("InstanceNorm") and C != layer.num_features:
            return None
        use_batch = layer.training or layer.running_mean is None
        stats = None
        if not use_batch:
            rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
            if not (np.all(np.isfinite(rm)) and np.all(np.isfinite(rv)) and np.all(rv >= 0)):
                return None
            stats = (broadcast_param(rm, xb.shape, "channel"), broadcast_param(rv, xb.shape, "channel"))
            kind = "channel"
        else:
            kind = "channel" if name.startswith("BatchNorm") else "instance"
        ref = Reference(xb, Grouping(xb.shape, kind, C=C), broadcast_param(w, xb.shape, "channel"),
                        broadcast_param(b, xb.shape, "channel"), eps, stats=stats)
        ref.per, ref.x_shape = "channel", xb.shape
    elif name == "GroupNorm":
        xb = to_nchw(x, layout)
        ref = Reference(xb, Grouping(xb.shape, "group", C=xb.shape[1], G=layer.num_groups),
                        broadcast_param(w, xb.shape, "channel"), broadcast_param(b, xb.shape, "channel"), eps)
        ref.per, ref.x_shape = "channel", xb.shape
    else:
        layout = "NCHW"
        M = int(np.prod(layer.normalized_shape))
        ref = Reference(x, Grouping(x.shape, "rows", M=M), broadcast_param(w, x.shape, "trailing"),
                        broadcast_param(b, x.shape, "trailing"), eps, skip_mean=(name == "RMSNorm"))
        ref.per, ref.x_shape = "trailing", x.shape
    ref.layout = layout
    ref.to_nchw = lambda a: to_nchw(np.asarray(a).reshape(x.shape if x.ndim == len(ref.x_shape) else (1,) + x.shape), layout)
    return ref


def layer_state(layer):
    d = {f"layer.{k}": v for k, v in getattr(layer, "_state", layer.state_dict)().items()}
    d["layer.training"] = np.array(layer.training)
    return d


def fuzz_layer(src):
    name = src.pick(LAYER_CLASSES)
    dtype = draw_dtype(src, bad_one_in=20)
    min_ndim = {"BatchNorm1d": 2, "BatchNorm2d": 4, "BatchNorm3d": 5, "InstanceNorm1d": 2,
                "InstanceNorm2d": 3, "InstanceNorm3d": 4, "GroupNorm": 2}.get(name, 1)
    if src.chance(6):
        min_ndim = 0
    shape = draw_shape(src, min_ndim=min_ndim, max_ndim=max(min_ndim, 5) if min_ndim < 5 else 6)
    layer, kw = make_layer(src, name, shape, dtype)
    if layer is None:
        return
    rng = src.rng()
    for k, p in layer.parameters().items():  # non-trivial affine
        p[...] = rng.uniform(0.5, 1.5, p.shape) if k == "weight" else rng.normal(0, 0.5, p.shape)
    if getattr(layer, "running_mean", None) is not None and src.bool():
        layer.running_mean[...] = rng.normal(0, 1, layer.running_mean.shape)
        layer.running_var[...] = rng.uniform(0.2, 3, layer.running_var.shape)

    has_forward = False
    last = None  # (x, y, ref) of the last successful forward
    for _ in range(src.int(1, 6)):
        op = src.int(0, 9)
        if op <= 3:  # forward
            xs = shape if src.int(0, 5) else draw_shape(src, min_ndim=0)
            xdt = layer.dtype if src.int(0, 9) else draw_dtype(src, bad_one_in=2)
            x, moderate = draw_array(src, xs, np.dtype(xdt))
            state = layer_state(layer)
            before = snapshot({"input": x, **state})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y, err = expect_ok_or_rejected(lambda: layer(x))
            if err is not None:
                check_unchanged(before, {"input": x, **layer_state(layer)},
                                f"{name}.forward rejected ({type(err).__name__}: {err})")
                continue
            check_unchanged({k: v for k, v in before.items() if k in ("input", "layer.weight", "layer.bias")},
                            {"input": x, **layer_state(layer)}, f"{name}.forward succeeded")
            check_output(y, x, f"{name}.forward")
            # Eval-mode statistics are not changed by the forward, so the reference can be taken now.
            ref = layer_reference(layer, name, x) if moderate and not caught else None
            if ref is not None:
                ref.forward_check(ref.to_nchw(y), f"{name}.forward ({kw})")
            has_forward, last = True, (x, y, ref)
        elif op <= 6:  # backward
            if last is not None and src.int(0, 5):
                x = last[0]
                dy, dmod = draw_array(src, x.shape, x.dtype)
            else:
                dy, dmod = draw_array(src, draw_shape(src), draw_dtype(src, bad_one_in=3))
            state = layer_state(layer)
            before = snapshot({"dy": dy, **state})
            dx, err = expect_ok_or_rejected(lambda: layer.backward(dy), allow_runtime=not has_forward)
            check_unchanged(before, {"dy": dy, **layer_state(layer)},
                            f"{name}.backward {'rejected' if err is not None else 'succeeded'}")
            if err is not None:
                continue
            if last is None:
                raise Finding(f"{name}.backward succeeded without a successful forward")
            x, _, ref = last
            check_output(dx, x, f"{name}.backward")
            params = layer.parameters()
            for k, g in layer.grads.items():
                if k not in params or g.shape != params[k].shape or g.dtype != params[k].dtype:
                    raise Finding(f"{name}.backward: grads[{k!r}] has shape {g.shape} dtype {g.dtype}, "
                                  f"parameter {params.get(k, np.empty(0)).shape}")
            if set(layer.grads) != set(params):
                raise Finding(f"{name}.backward: grads for {sorted(layer.grads)}, parameters {sorted(params)}")
            if ref is not None and dmod:
                dx_ref, dx_scale, dy64 = ref.backward(ref.to_nchw(dy))
                compare(ref.to_nchw(dx), dx_ref, dx_scale, f"{name}.backward dx ({kw})")
                for k in layer.grads:
                    p_shape = params[k].shape
                    if k == "weight":
                        want = param_sum(dy64 * ref.xhat, ref.x_shape, ref.per, p_shape)
                        scale = param_sum(np.abs(dy64) * ref.xs, ref.x_shape, ref.per, p_shape)
                    else:
                        want = param_sum(dy64, ref.x_shape, ref.per, p_shape)
                        scale = param_sum(np.abs(dy64), ref.x_shape, ref.per, p_shape)
                    compare(layer.grads[k], want, scale, f"{name}.backward d{k} ({kw})")
        elif op == 7:
            layer.train(src.bool())
        elif op == 8:
            layer.eval()
        else:
            sd = layer.state_dict()
            _, err = expect_ok_or_rejected(lambda: layer.load_state_dict(sd))
            if err is not None:
                raise Finding(f"{name}.load_state_dict(own state_dict) raised {err!r}")


def fuzz_core(src):
    """The binding itself: it promises that no wrong call reads or writes out of bounds."""
    kind = src.int(0, 3)
    N, C, S = src.int(-1, 4), src.int(-1, 4), src.pick((-1, 0, 1, 2, 3, 7, 2049))
    if src.chance(16):  # N*C*S overflows int64: the binding must not wrap it into a small size
        N, C, S = max(N, 1), src.pick((2**62, 2**61 + 1, -(2**62))), max(S, 2)
    try:
        if kind == 0:
            plan = _core.plan_per_channel(N, C, S)
        elif kind == 1:
            plan = _core.plan_per_sample_group(N, C, S, src.int(-1, 5))
        elif kind == 2:
            sets = [src.int(-2, 3) for _ in range(src.int(0, 5))]
            plan = _core.plan_per_channel_in_sets(N, C, S, sets)
        else:
            plan = _core.plan_per_row(N, S, src.bool())
    except (TypeError, ValueError, MemoryError):  # MemoryError: a plan sized from huge dims
        return
    if src.chance(3):
        plan.channels_last = True
    if src.chance(4):  # group_counts has num_groups entries: only for plans of sane size
        expect_ok_or_rejected(lambda: plan.group_counts if abs(C) <= 2**20 else plan.num_groups)
    if abs(C) > 2**20:
        C = 1
    dtype = draw_dtype(src, bad_one_in=6)
    good = max(N, 0) * max(C, 0) * max(S, 0) if kind != 3 else max(N, 0) * max(S, 0)
    n = good if src.int(0, 3) else max(0, good + src.int(-2, 2))

    def arr(size, dt=dtype, fill=1.0):
        a = np.full(size, fill, dt) if size < 100_000 else np.zeros(0, dt)
        if src.chance(6):
            a, _ = as_view(src, a)
        return a

    def stats(size):
        return None if src.chance(8) else arr(max(size + (src.int(-1, 1) if src.chance(4) else 0), 0), np.float64)

    G = src.int(0, 20)
    try:
        G = plan.num_groups
    except ALLOWED:
        pass
    K = src.int(0, 20)
    try:
        K = plan.num_sample_sets * C
    except ALLOWED:
        pass

    def coef():  # a variant step's coefficient: one per cell, per channel, one value, a number
        form = src.int(0, 4)
        return 0.5 if form == 4 else stats((K, C, 1, src.int(0, 9))[form])

    def pw_coef():  # a pointwise epilogue's (9, K) coefficients, sometimes of a wrong size
        return stats(9 * K + (src.int(-2, 2) if src.chance(4) else 0))

    def position_weight():  # a per-position affine array of the parameters' dtype
        pdt = np.float64 if dtype == np.float64 else np.float32
        return None if src.chance(8) else arr(max(S + (src.int(-1, 1) if src.chance(4) else 0), 0), pdt)

    x = arr(n)
    op = src.int(0, 12)
    if op == 4:
        return fuzz_forward_fast(src, dtype)
    calls = {
        0: lambda: _core.group_moments(plan, x),
        1: lambda: _core.normalize(plan, x, stats(G), stats(G), None if src.bool() else arr(max(C, S, 0)),
                                   None, arr(n)),
        2: lambda: _core.normalize_backward(plan, x, arr(n), stats(G), stats(G),
                                            None if src.bool() else arr(max(C, S, 0)), src.bool(),
                                            None if src.chance(4) else arr(n), None, None),
        3: lambda: _core.normalize_batch_stats(plan, x, src.pick((1e-5, 0.0, 1.0)),
                                               None if src.bool() else arr(max(C, S, 0)), None, arr(n)),
        5: lambda: _core.apply_coefficients(plan, x, coef(), coef(), coef(), arr(n)),
        6: lambda: _core.backward_sums(plan, x, arr(n), coef()),
        7: lambda: _core.backward_apply_coefficients(plan, None if src.chance(4) else x, arr(n), coef(),
                                                     coef(), coef(), coef(), arr(n)),
        8: lambda: _core.apply_pointwise(plan, src.int(-1, 7), x, pw_coef(), arr(n)),
        9: lambda: _core.pointwise_sums(plan, src.int(-1, 7), x, arr(n), pw_coef()),
        10: lambda: _core.pointwise_backward(plan, src.int(0, 6), x, arr(n), pw_coef(), coef(), coef(), coef(), arr(n)),
        11: lambda: _core.backward_sums_positions(plan, x, arr(n), coef(), coef(), coef(), position_weight()),
        12: lambda: _core.local_response_norm(N, C, S, x, arr(n), src.int(-1, 6), 1e-4, 0.75, 1.0),
    }
    try:
        expect_ok_or_rejected(calls[op])
    except MemoryError:  # an absurd but consistent request (2**62 groups): not a safety issue
        pass


def fuzz_forward_fast(src, dtype):
    """forward_fast promises to do a whole forward or return None, for any arguments: never an
    out-of-bounds access, never a write before it accepts, and y of x's shape when it accepts.
    Arguments are drawn consistent for their kind, then one of them is spoiled half the time."""
    x = np.full(draw_shape(src, 2, 5), 0.5, dtype)
    if src.chance(6):
        x, _ = as_view(src, x)
    kind = src.int(0, 4)
    last = src.bool() and kind <= 2
    C = x.shape[-1 if last else 1]
    rows = kind >= 3
    pdt = np.float64 if x.dtype == np.float64 else np.float32
    norm = tuple(x.shape[-src.int(1, x.ndim):]) if rows else None
    pshape = norm if rows else (C,)

    def param(shape=pshape):
        return None if src.chance(4) else np.full(shape, 1.5, pdt)

    rm, rv = (param((C,)), param((C,))) if kind <= 1 else (None, None)
    args = [kind, x, C if src.bool() else -1, src.pick([g for g in range(1, 5) if C % g == 0] or [1]),
            norm, 2**64 - 1, last, param(), param(), rm, rv, src.bool(), 0.1, 1e-5, 0]
    if src.bool():  # spoil one argument
        k = src.int(0, len(args) - 1)
        args[k] = src.pick((None, -1, 7, 2.0, True, np.float64(1e-5), float("nan"), [2], (0,),
                            np.ones(3, np.float32), np.ones(C, np.float16), 2**63))
    x, rm, rv = args[1], args[9], args[10]
    before = snapshot({"x": x, "rm": rm, "rv": rv})
    result, _ = expect_ok_or_rejected(lambda: _core.forward_fast(*args))
    if result is None:
        check_unchanged(before, {"x": x, "rm": rm, "rv": rv}, "forward_fast returned None")
        return
    y, saved = result
    if y.shape != x.shape or y.dtype != x.dtype or saved.x is not x:
        raise Finding(f"forward_fast: y {y.shape} {y.dtype} for x {x.shape} {x.dtype}")
    # Its Saved into the backward binding, with a dy and gradient arrays that may be wrong.
    n_aff = saved.plan.S if saved.plan.column_affine else saved.plan.C
    dy = src.pick((y, x, np.ones(3, np.float32), y.astype(np.float64), None))
    grads = [None if src.chance(2) else np.empty(n_aff + src.pick((0, 0, 1)), pdt) for _ in range(2)]
    dx = src.pick((np.empty_like(x), None, np.empty(x.size + 1, x.dtype)))
    expect_ok_or_rejected(lambda: _core.backward(saved, dy, dx, *grads))
    result, _ = expect_ok_or_rejected(lambda: _core.backward_fast(saved, dy, src.bool(), src.bool()))
    if result is not None and (result[0].shape != x.shape or result[0].dtype != x.dtype):
        raise Finding(f"backward_fast: dx {result[0].shape} {result[0].dtype} for x {x.shape} {x.dtype}")


# Which targets run, with weights: NORMKIT_FUZZ_TARGETS, a comma-separated subset of
# functional,layer,core (default: all; core is the raw _core binding, which promises that no wrong
# call reads or writes out of bounds).
TARGETS = {"functional": (fuzz_functional, 5), "layer": (fuzz_layer, 4), "core": (fuzz_core, 1)}
_chosen = [t.strip() for t in os.environ.get("NORMKIT_FUZZ_TARGETS", "functional,layer,core").split(",") if t.strip()]
if not _chosen or any(t not in TARGETS for t in _chosen):
    sys.exit(f"NORMKIT_FUZZ_TARGETS: expected a comma-separated subset of {list(TARGETS)}, got {_chosen}")
SCHEDULE = [TARGETS[t][0] for t in _chosen for _ in range(TARGETS[t][1])]


def TestOneInput(data):
    src = Source(data)
    target = src.pick(SCHEDULE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            target(src)


def random_mode(seconds, seed=None):
    """No atheris: random byte strings for `seconds`. A failing input is saved as ./crash-random-N;
    the input in flight is always in ./fuzz-current-input, so a hard crash can be replayed too."""
    rng = np.random.default_rng(seed)
    t_end, n = time.time() + seconds, 0
    current = "fuzz-current-input"
    while time.time() < t_end:
        data = rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes()
        with open(current, "wb") as f:
            f.write(data)
        try:
            TestOneInput(data)
        except BaseException:
            path = f"crash-random-{n}"
            os.replace(current, path)
            print(f"finding on input {n}; saved to {path}", file=sys.stderr)
            raise
        n += 1
    os.remove(current)
    print(f"random mode: {n} inputs, no finding", file=sys.stderr)


def main():
    if "--random" in sys.argv:
        i = sys.argv.index("--random")
        random_mode(float(sys.argv[i + 1]) if len(sys.argv) > i + 1 else 60)
        return
    if atheris is None:
        sys.exit("atheris is not installed (pip install atheris), or use --random SECONDS")
    normkit.set_num_threads(int(os.environ.get("NORMKIT_FUZZ_THREADS", "2")))
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
