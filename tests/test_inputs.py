"""Accepted inputs: any memory layout reads as its values, and NaN/Inf propagate like PyTorch.

Contract (API.md, "Conventions"): non-contiguous input is accepted, never silently misread. Here
that is checked bitwise: a Fortran-order, negative-stride, strided, transposed, broadcast,
misaligned or read-only array (input, weight, bias, running statistics, dy) gives exactly the
bytes its C-contiguous copy gives, forward and backward, and running statistics held in a strided
buffer are updated to exactly the values a contiguous buffer gets.

NaN and Inf are data, not errors: outputs carry them where torch's do (compared as the pattern of
NaN, +Inf and -Inf entries), and no such input hangs or crashes.
"""
import warnings

import numpy as np
import pytest

import normkit
import normkit.functional as F

FLOATS = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


# --------------------------------------------------------------------------------------------
# Memory layouts
# --------------------------------------------------------------------------------------------
def _misaligned(a):
    buf = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned or a.size == 0
    return out


def _strided(a):
    big = np.full(tuple(2 * s + 1 for s in a.shape), -7.0, a.dtype)  # junk between the values
    view = big[tuple(slice(1, None, 2) for _ in a.shape)]
    view[...] = a
    return view


def _swapped(a):  # the first two axes stored the other way round
    return np.swapaxes(np.ascontiguousarray(np.swapaxes(a, 0, 1)), 0, 1) if a.ndim > 1 else a[::-1][::-1]


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


LAYOUTS = {
    "fortran": np.asfortranarray,
    "negative_strides": lambda a: np.flip(np.ascontiguousarray(np.flip(a))),
    "strided": _strided,
    "swapped_axes": _swapped,
    "read_only": _read_only,
    "misaligned": _misaligned,
    # Zero strides: every sample (or every last-axis entry) the same value.
    "broadcast_batch": lambda a: np.broadcast_to(a[:1], a.shape) if a.ndim > 1 and len(a) else a,
    "broadcast_last": lambda a: np.broadcast_to(a[..., :1], a.shape) if a.ndim > 1 and a.shape[-1] else a,
}
LAYOUT = pytest.mark.parametrize("layout", list(LAYOUTS))


def view_and_copy(a, layout):
    """(the array in `layout`, a C-contiguous copy of the same values)."""
    v = LAYOUTS[layout](a)
    return v, np.array(v, order="C", copy=True)


def assert_same_bytes(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert got.tobytes() == want.tobytes(), f"{what}: differs from the contiguous copy's"


def test_layouts_are_what_they_claim(rng):
    a = rng.standard_normal((3, 4, 5))
    for name in LAYOUTS:
        v, c = view_and_copy(a, name)
        assert c.flags.c_contiguous and c.flags.aligned
        if name != "read_only":
            assert not (v.flags.c_contiguous and v.flags.aligned), name
        if not name.startswith("broadcast"):
            np.testing.assert_array_equal(v, a)


# Shapes per function: small ones, and one with planes longer than the kernels' chunk.
FUNCTION_SHAPES = [(4, 3, 5), (2, 3, 4, 5), (2, 2, 2100)]


def function_args(fn, shape, dtype, rng):
    """Valid (args, kwargs) of one functional call, every array a fresh contiguous one."""
    C = shape[1]
    x = (rng.uniform(-2, 2, (1, C) + (1,) * (len(shape) - 2))
         + rng.standard_normal(shape)).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype)
    if fn == "batch_norm":
        return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True)
    if fn == "batch_norm_eval":
        return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=False)
    if fn == "instance_norm":
        return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b)
    if fn == "instance_norm_eval":
        return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b,
                    use_input_stats=False)
    if fn == "group_norm":
        return dict(input=x, num_groups=C if C % 2 else 2, weight=w, bias=b)
    ns = shape[-2:] if len(shape) > 3 else shape[-1:]
    w = rng.uniform(0.5, 1.5, ns).astype(dtype)
    if fn == "layer_norm":
        return dict(input=x, normalized_shape=ns, weight=w, bias=rng.standard_normal(ns).astype(dtype))
    return dict(input=x, normalized_shape=ns, weight=w)


FUNCTIONS = ["batch_norm", "batch_norm_eval", "instance_norm", "instance_norm_eval", "group_norm",
             "layer_norm", "rms_norm"]


def call(fn, kw):
    return getattr(F, fn.replace("_eval", ""))(**kw)


def _layout_cases():
    for fn in FUNCTIONS:
        for argument in function_args(fn, (2, 3, 4), np.float64, np.random.default_rng(0)):
            if argument not in ("input", "weight", "bias", "running_mean", "running_var"):
                continue
            for layout in LAYOUTS:
                updated = argument.startswith("running") and fn in ("batch_norm", "instance_norm")
                if updated and (layout == "read_only" or layout.startswith("broadcast")):
                    continue  # updated in place, so rejected (tests/test_errors.py)
                yield pytest.param(fn, argument, layout, id=f"{fn}-{argument}-{layout}")


@pytest.mark.parametrize("fn,argument,layout", list(_layout_cases()))
@pytest.mark.parametrize("shape", FUNCTION_SHAPES, ids=str)
@FLOATS
def test_functional_reads_any_layout_as_its_contiguous_copy(fn, argument, layout, shape, dtype, rng):
    kw = function_args(fn, shape, dtype, rng)
    view, copy = view_and_copy(kw[argument], layout)
    kw_view = {k: (view if k == argument else (v.copy() if isinstance(v, np.ndarray) else v))
               for k, v in kw.items()}
    kw_copy = {k: (copy if k == argument else (v.copy() if isinstance(v, np.ndarray) else v))
               for k, v in kw.items()}
    assert_same_bytes(call(fn, kw_view), call(fn, kw_copy), f"{fn} output")
    for name in ("running_mean", "running_var"):  # updated in place to the same values
        if name in kw:
            assert_same_bytes(kw_view[name], kw_copy[name], name)


# Layers: forward, backward, parameter gradients and running statistics.
LAYERS = {
    "BatchNorm1d": (lambda dt: normkit.BatchNorm1d(3, dtype=dt), [(6, 3), (4, 3, 7)]),
    "BatchNorm2d": (lambda dt: normkit.BatchNorm2d(3, dtype=dt), [(2, 3, 5, 6), (2, 3, 3, 700)]),
    "BatchNorm3d": (lambda dt: normkit.BatchNorm3d(3, dtype=dt), [(2, 3, 2, 3, 4)]),
    "InstanceNorm1d": (lambda dt: normkit.InstanceNorm1d(3, affine=True, track_running_stats=True,
                                                         dtype=dt), [(2, 3, 7), (3, 9)]),
    "InstanceNorm2d": (lambda dt: normkit.InstanceNorm2d(3, affine=True, dtype=dt),
                       [(2, 3, 4, 5), (3, 46, 47)]),
    "InstanceNorm3d": (lambda dt: normkit.InstanceNorm3d(3, dtype=dt), [(2, 3, 2, 3, 4)]),
    "GroupNorm": (lambda dt: normkit.GroupNorm(2, 4, dtype=dt), [(3, 4, 5), (2, 4, 3, 3)]),
    "LayerNorm": (lambda dt: normkit.LayerNorm((4, 5), dtype=dt), [(3, 4, 5), (2, 3, 4, 5)]),
    "RMSNorm": (lambda dt: normkit.RMSNorm(5, dtype=dt), [(3, 4, 5), (5,)]),
}
LAYER_SHAPES = [(n, s) for n, (_, shapes) in LAYERS.items() for s in shapes]


def twin_layers(name, dtype, rng, training):
    """Two identical layers with random parameters and (after a training step) running stats."""
    make, shapes = LAYERS[name]
    a, b = make(dtype), make(dtype)
    for k, p in a.parameters().items():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
        b.parameters()[k][...] = p
    warm = rng.standard_normal(shapes[0]).astype(dtype)
    a(warm), b(warm.copy())
    a.train(training), b.train(training)
    return a, b


@pytest.mark.parametrize("name,shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["x", "dy"])
@LAYOUT
@FLOATS
def test_layer_forward_and_backward_read_any_layout_as_the_contiguous_copy(
        name, shape, training, which, layout, dtype, rng):
    a, b = twin_layers(name, dtype, rng, training)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xa, xb = view_and_copy(x, layout) if which == "x" else (x, x.copy())
    dya, dyb = view_and_copy(dy, layout) if which == "dy" else (dy, dy.copy())
    assert_same_bytes(a(xa), b(xb), "y")
    assert_same_bytes(a.backward(dya), b.backward(dyb), "dx")
    assert a.grads.keys() == b.grads.keys()
    for k in a.grads:
        assert_same_bytes(a.grads[k], b.grads[k], f"d{k}")
    for k, v in a.state_dict().items():
        assert_same_bytes(v, b.state_dict()[k], k)


@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm1d", "GroupNorm", "LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("layout", ["fortran", "negative_strides", "strided", "misaligned"])
def test_layer_parameters_in_any_layout(name, layout, rng):
    # A layer whose weight/bias were replaced by non-contiguous arrays (e.g. views into an
    # optimizer's flat buffer) computes with their values.
    a, b = twin_layers(name, np.float64, rng, True)
    for k, p in a.parameters().items():
        view, copy = view_and_copy(p, layout)
        setattr(a, k, view)
        setattr(b, k, copy)
    x = rng.standard_normal(LAYERS[name][1][0])
    assert_same_bytes(a(x), b(x), "y")
    assert_same_bytes(a.backward(x), b.backward(x), "dx")
    for k in a.grads:
        assert_same_bytes(a.grads[k], b.grads[k], f"d{k}")


def test_running_statistics_in_a_strided_buffer_are_updated_in_place(rng):
    layer = normkit.BatchNorm1d(3, dtype=np.float64)
    ref = normkit.BatchNorm1d(3, dtype=np.float64)
    buf = np.zeros((2, 6))
    layer.running_mean, layer.running_var = buf[0, ::2], buf[1, ::-2]
    layer.running_var[...] = 1
    for _ in range(3):
        x = rng.standard_normal((5, 3))
        layer(x), ref(x)
    assert_same_bytes(np.ascontiguousarray(buf[0, ::2]), ref.running_mean, "running_mean")
    assert_same_bytes(np.ascontiguousarray(buf[1, ::-2]), ref.running_var, "running_var")
    assert not buf[0, 1::2].any()  # nothing written between the strided entries


def test_the_input_and_dy_are_never_written(rng):
    for name, (make, shapes) in LAYERS.items():
        layer = make(np.float32)
        x = rng.standard_normal(shapes[0]).astype(np.float32)
        dy = rng.standard_normal(shapes[0]).astype(np.float32)
        x0, dy0 = x.copy(), dy.copy()
        layer(x)
        layer.backward(dy)
        assert_same_bytes(x, x0, f"{name} input")
        assert_same_bytes(dy, dy0, f"{name} dy")


class _Subclass(np.ndarray):
    pass


def test_ndarray_subclasses_read_as_plain_arrays(rng):
    x = rng.standard_normal((4, 3))
    m = x[::-1].view(_Subclass)[::-1]
    layer, ref = normkit.BatchNorm1d(3, dtype=np.float64), normkit.BatchNorm1d(3, dtype=np.float64)
    y = layer(m)
    assert type(y) is np.ndarray
    assert_same_bytes(y, ref(x), "y")


# --------------------------------------------------------------------------------------------
# NaN and Inf: the pattern of non-finite outputs is torch's.
# --------------------------------------------------------------------------------------------
def pattern(a):
    a = np.asarray(a)
    return np.stack([np.isnan(a), np.isposinf(a), np.isneginf(a)])


def assert_same_pattern(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    g, w = pattern(got), pattern(want)
    assert np.array_equal(g, w), (f"{what}: NaN/+Inf/-Inf at {[int(c.sum()) for c in g]}, "
                                  f"torch at {[int(c.sum()) for c in w]}")


SPECIALS = pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


def torch_functional(torch, fn, kw):
    T = (lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
    return getattr(torch.nn.functional, fn.replace("_eval", ""))(**{k: T(v) for k, v in kw.items()})


@pytest.mark.parametrize("fn", FUNCTIONS)
@SPECIALS
@FLOATS
def test_non_finite_input_propagates_like_torch(fn, special, dtype, rng):
    torch = pytest.importorskip("torch")
    kw = function_args(fn, (4, 3, 5), dtype, rng)
    x = kw["input"]
    x[1, 0, 2] = special
    x[3, 2, :] = special  # a whole row / plane
    ours = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    theirs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    assert_same_pattern(call(fn, ours), torch_functional(torch, fn, theirs).numpy(), f"{fn} output")


@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
@SPECIALS
@FLOATS
def test_non_finite_input_reaches_the_running_statistics_like_torch(fn, special, dtype, rng):
    torch = pytest.importorskip("torch")
    for shape in [(4, 3, 5), (2, 3, 3000)]:  # one chunk per plane, and several
        kw = function_args(fn, shape, dtype, rng)
        kw["input"][1, 0, 2] = special
        ours = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        theirs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        call(fn, ours)
        torch_functional(torch, fn, theirs)
        for k in ("running_mean", "running_var"):
            assert_same_pattern(ours[k], theirs[k], f"{fn} {k} {shape}")


def _special_parameter_cases():
    for fn in ["batch_norm", "batch_norm_eval", "instance_norm", "group_norm", "layer_norm",
               "rms_norm"]:
        for argument in function_args(fn, (2, 3, 4), np.float64, np.random.default_rng(0)):
            if argument in ("weight", "bias", "running_mean", "running_var"):
                yield pytest.param(fn, argument, np.nan, id=f"{fn}-{argument}-nan")
                if argument == "running_var":
                    yield pytest.param(fn, argument, -4.0, id=f"{fn}-{argument}-negative")


@pytest.mark.parametrize("fn,argument,value", list(_special_parameter_cases()))
def test_non_finite_parameters_and_statistics_propagate_like_torch(fn, argument, value, rng):
    torch = pytest.importorskip("torch")
    kw = function_args(fn, (4, 3, 5), np.float64, rng)
    kw[argument].reshape(-1)[1] = value
    ours = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    theirs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN is data: no RuntimeWarning either
        y = call(fn, ours)
    assert_same_pattern(y, torch_functional(torch, fn, theirs).numpy(), f"{fn} output")


TORCH_LAYERS = {
    "BatchNorm1d": (lambda: normkit.BatchNorm1d(3, dtype=np.float64),
                    lambda t: t.nn.BatchNorm1d(3, dtype=t.float64)),
    "InstanceNorm1d": (lambda: normkit.InstanceNorm1d(3, affine=True, dtype=np.float64),
                       lambda t: t.nn.InstanceNorm1d(3, affine=True, dtype=t.float64)),
    "GroupNorm": (lambda: normkit.GroupNorm(3, 3, dtype=np.float64),
                  lambda t: t.nn.GroupNorm(3, 3, dtype=t.float64)),
    "LayerNorm": (lambda: normkit.LayerNorm(5, dtype=np.float64),
                  lambda t: t.nn.LayerNorm(5, dtype=t.float64)),
    "RMSNorm": (lambda: normkit.RMSNorm(5, dtype=np.float64),
                lambda t: t.nn.RMSNorm(5, dtype=t.float64)),
}


@pytest.mark.parametrize("name", list(TORCH_LAYERS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_input_propagates_through_backward_like_torch(name, training, rng):
    torch = pytest.importorskip("torch")
    make, make_torch = TORCH_LAYERS[name]
    layer, t = make().train(training), make_torch(torch).train(training)
    x = rng.standard_normal((4, 3, 5))
    x[1, 0, 2] = np.nan
    dy = rng.standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = t(xt)
    yt.backward(torch.from_numpy(dy))
    assert_same_pattern(layer(x), yt.detach().numpy(), "y")
    assert_same_pattern(layer.backward(dy), xt.grad.numpy(), "dx")
    for k, g in layer.grads.items():
        assert_same_pattern(g, getattr(t, k).grad.numpy(), f"d{k}")


@pytest.mark.parametrize("name,shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf, 3e38, 1e-45, 0.0],
                         ids=["nan", "inf", "-inf", "huge", "denormal", "zero"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_all_special_input_never_hangs_or_crashes(name, shape, fill, training):
    make, _ = LAYERS[name]
    layer = make(np.float32).train(training)
    x = np.full(shape, fill, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
        dx = layer.backward(np.full(shape, fill, np.float32))
    assert y.shape == dx.shape == shape
    if np.isfinite(fill) and fill == 0.0:  # a constant input normalizes to the bias (0)
        assert np.isfinite(y).all() and not y.any()
