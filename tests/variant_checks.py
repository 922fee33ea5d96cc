"""Checks shared by the batch-statistics variant tests (issue 10): test_variants_ebn_mbn.py,
test_variants_ghost.py, test_variants_renorm_frozen.py and test_batch_stats_inference.py.

Plain functions and parametrize marks, no fixtures: each test file states its layer's spec and
calls these for what every variant must do alike (state_dict round trips, half input, NHWC,
strided views, 1 vs 2 threads). Comparisons take conftest's `assert_close` fixture as an
argument, so the tolerance policy stays in one place.
"""
import numpy as np
import pytest

import normkit

AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
MODE = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
FLOAT_DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64],
                                       ids=["float32", "float64"])


# -- shapes, inputs, layouts ----------------------------------------------------------------------

def shape_id(shape):
    """The test id of an (N, C, *spatial) shape: N2-C3-7x5."""
    n, c, *spatial = shape
    return f"N{n}-C{c}-{'x'.join(map(str, spatial))}"


def shapes(*items):
    """pytest.param of each shape, with its shape_id."""
    return [pytest.param(s, id=shape_id(s)) for s in items]


def planes(shape):
    """The number of entries per channel of an (N, C, H, W) batch: N*H*W."""
    return shape[0] * shape[2] * shape[3]


def make_input(rng, shape, dtype):
    """Per-channel offsets and spreads, so that every channel has statistics of its own."""
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    return (rng.uniform(-2, 2, C).reshape(bshape)
            + rng.uniform(0.5, 2, C).reshape(bshape) * rng.standard_normal(shape)).astype(dtype)


def to_nhwc(a):
    """A C-contiguous channels-last copy of an (N, C, H, W) array."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


# Non-contiguous (5, 6, 7, 5) views cut from inputs of the shape each needs.
VIEW_SHAPE = (5, 6, 7, 5)
VIEWS = {
    "transposed-HW": lambda rng, dt: make_input(rng, (5, 6, 5, 7), dt).transpose(0, 1, 3, 2),
    "step-sliced": lambda rng, dt: make_input(rng, (5, 6, 14, 15), dt)[:, :, ::2, 1::3],
    "negative-stride": lambda rng, dt: make_input(rng, (5, 6, 7, 5), dt)[::-1, :, :, ::-1],
    "channel-sliced": lambda rng, dt: make_input(rng, (5, 13, 7, 5), dt)[:, 1::2],
}


# -- layer state ----------------------------------------------------------------------------------

def randomize_affine_or_none(layer, affine, randomize_affine):
    """Random weight and bias with an affine; without one, assert that the layer has none."""
    if affine:
        randomize_affine(layer)
    else:
        assert layer.weight is None and layer.bias is None and layer.parameters() == {}
    return layer


def buffers(layer):
    """The names of the layer's running-statistics buffers (BatchRenorm keeps a running std)."""
    return ("running_mean", "running_std") if hasattr(layer, "running_std") else (
        "running_mean", "running_var")


def snapshot(layer):
    """A copy of every array of the layer's state_dict."""
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def assert_state_unchanged(layer, before):
    """The layer's state_dict has the keys of the snapshot `before` and the same bytes."""
    after = layer.state_dict()
    assert list(after) == list(before)
    for key, value in after.items():
        assert value.tobytes() == before[key].tobytes(), f"{key} changed"


def assert_same_state(got, want):
    """Every array of want's state_dict equals got's."""
    for key, value in want.state_dict().items():
        np.testing.assert_array_equal(got.state_dict()[key], value, err_msg=key)


def bind_extra(layer, *extra):
    """A stand-in for the layer whose call is layer(x, *extra) (the finite-difference check calls
    layer(x)); every attribute is the layer's."""
    class Bound:
        def __call__(self, x):
            return layer(x, *extra)

        def __getattr__(self, name):
            return getattr(layer, name)

    return Bound()


# -- comparisons ----------------------------------------------------------------------------------

def check_backward(layer, dx, want, dtype, count, assert_close, dx_scale=None):
    """dx and every parameter gradient of the last backward against the reference's."""
    want_dx, want_dw, want_db = want
    assert dx.dtype == dtype
    assert_close(dx, want_dx, dtype, count=count, what="dx", scale=dx_scale)
    if layer.weight is None:
        assert layer.grads == {}
        return
    assert set(layer.grads) == {"weight", "bias"}
    assert_close(layer.grads["weight"], want_dw, dtype, count=count, what="dweight")
    assert_close(layer.grads["bias"], want_db, dtype, count=count, what="dbias")


# Outputs and input gradients are rounded once to the half type (computed in float32 from the
# exact half inputs), so they are within one unit in the last place of the half type (2^-10,
# 2^-7) at the array's scale of the float64 reference evaluated on those same half inputs;
# float32 parameter gradients are within float32's 1e-5.
HALF_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def close_at_scale(got, want, tol, what):
    """max|got - want| <= tol * max(1, max|want|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x scale {scale:.3g}"


# -- what every variant must do alike -------------------------------------------------------------

def assert_state_dict_round_trip(trained, fresh, rng, shape, dtype, extra=()):
    """After three SGD steps of `trained`, `fresh` loading its state_dict has the same state and
    gives the same bits in eval and in further training steps."""
    for _ in range(3):  # training steps with an SGD update: every array of the state moves
        trained(make_input(rng, shape, dtype), *extra)
        trained.backward(rng.standard_normal(shape).astype(dtype))
        for key, p in trained.parameters().items():
            p -= 0.1 * trained.grads[key]
    assert fresh.load_state_dict(trained.state_dict()) is fresh
    assert_same_state(fresh, trained)
    x = make_input(rng, shape, dtype)
    for mode in (False, True, True):  # eval, then further training steps
        trained.train(mode)
        fresh.train(mode)
        np.testing.assert_array_equal(fresh(x, *extra), trained(x, *extra))
    assert_same_state(fresh, trained)


def half_dtype(half):
    """np.dtype of "float16" or "bfloat16" (skips the test without ml_dtypes)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(np.float16) if half == "float16" else np.dtype(ml_dtypes.bfloat16)


def check_half_input(layer, x, dy, want_y, want, half, extra=()):
    """A float32 layer given half x, dy: y and dx in the half type within HALF_EPS of the
    reference (want_y, (dx, dweight, dbias)), float32 parameter gradients within 1e-5."""
    y = layer(x, *extra)
    dx = layer.backward(dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    want_dx, want_dw, want_db = want
    close_at_scale(y, want_y, HALF_EPS[half], "y")
    close_at_scale(dx, want_dx, HALF_EPS[half], "dx")
    if want_dw is None:
        assert layer.grads == {}
    else:
        close_at_scale(layer.grads["weight"], want_dw, 1e-5, "dweight")
        close_at_scale(layer.grads["bias"], want_db, 1e-5, "dbias")


def check_channels_last(first, last, x, dy, want_y, want, dtype, assert_close, extra=()):
    """An NHWC layer `last` matches the NCHW layer `first` (same state) and the reference
    (want_y, (dx, dweight, dbias)) in y, dx, parameter gradients and running statistics."""
    y, y_t = first(x, *extra), last(to_nhwc(x), *extra)
    assert y_t.shape == (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    assert_close(y_t, to_nhwc(want_y), dtype, count=x.size, what="NHWC y")
    assert_close(y_t, to_nhwc(y), dtype, count=x.size, what="NHWC y vs NCHW y")
    dx, dx_t = first.backward(dy), last.backward(to_nhwc(dy))
    assert_close(dx_t, to_nhwc(want[0]), dtype, count=x.size, what="NHWC dx")
    assert_close(dx_t, to_nhwc(dx), dtype, count=x.size, what="NHWC dx vs NCHW dx")
    assert last.grads.keys() == first.grads.keys() == first.parameters().keys()
    for key, g in last.grads.items():
        assert_close(g, want[1 if key == "weight" else 2], dtype, count=x.size,
                     what=f"NHWC d{key}")
    for key in buffers(first):
        assert_close(getattr(last, key), getattr(first, key), dtype, count=x.size, what=key)


def check_view_matches_copy(x, make_layer, rng, dtype, assert_close, extra=()):
    """A non-contiguous view x gives, in two layers from make_layer(), the results of its
    contiguous copy (y, dx from a negative-stride dy, gradients, running statistics), and is
    never written."""
    assert not x.flags.c_contiguous and x.shape == VIEW_SHAPE
    x_before = x.copy()
    strided, contiguous = make_layer(), make_layer()
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert_close(strided(x, *extra), contiguous(np.ascontiguousarray(x), *extra), dtype,
                 what="y")
    assert_close(strided.backward(np.flip(np.flip(dy, 3).copy(), 3)), contiguous.backward(dy),
                 dtype, what="dx")
    assert strided.grads.keys() == contiguous.grads.keys() == contiguous.parameters().keys()
    for key in contiguous.grads:
        assert_close(strided.grads[key], contiguous.grads[key], dtype, what=f"d{key}")
    for key in buffers(strided):
        assert_close(getattr(strided, key), getattr(contiguous, key), dtype, what=key)
    np.testing.assert_array_equal(x, x_before)  # the input is never written


def assert_bitwise_same_for_1_and_2_threads(make_layer, shape, dtype, layout, extra=(), buffer_names=None,
                                            centre=3.0):
    """y, dx, gradients and running statistics (or the buffers buffer_names(layer) names) of a
    fresh make_layer() have the same bytes with one and with two threads (the thread count is
    restored afterwards); x is centre + 2 N(0, 1)."""
    buffer_names = buffers if buffer_names is None else buffer_names
    rng = np.random.default_rng(3)
    x = (centre + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "NHWC":
        x, dy = to_nhwc(x), to_nhwc(dy)
    threads_before = normkit.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            normkit.set_num_threads(threads)
            layer = make_layer()
            out = {"y": layer(x, *extra), "dx": layer.backward(dy)}
            out.update({f"d{k}": v for k, v in layer.grads.items()})
            out.update({k: getattr(layer, k) for k in buffer_names(layer)})
            results.append({k: np.ascontiguousarray(v).tobytes() for k, v in out.items()})
    finally:
        normkit.set_num_threads(threads_before)
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert results[0][key] == results[1][key], f"{key} differs between 1 and 2 threads"


# -- batch-free layers and layers with parameters beyond weight/bias (issue 11) -------------------

def state_buffers(layer):
    """The names of the layer's non-learnable state: its state_dict keys that are not parameters
    (none for FilterResponseNorm2d, running_var for EvoNormB0_2d, ...)."""
    params = layer.parameters()
    return tuple(k for k in layer.state_dict() if k not in params)


def check_all_gradients(layer, dx, want_dx, want_grads, dtype, assert_close, count=1,
                        dx_scale=None):
    """dx (in the layer's dtype) and layer.grads against the reference's: want_grads maps every
    parameter name to its expected gradient, and layer.grads has exactly those keys."""
    assert dx.dtype == dtype
    assert_close(dx, want_dx, dtype, count=count, what="dx", scale=dx_scale)
    assert set(layer.grads) == set(want_grads) == set(layer.parameters())
    for name, want in want_grads.items():
        assert layer.grads[name].shape == layer.parameters()[name].shape, f"d{name} shape"
        assert_close(layer.grads[name], want, dtype, count=count, what=f"d{name}")


def check_half_input_all(layer, x, dy, want_y, want_dx, want_grads, half, extra=()):
    """check_half_input for any parameter set: y and dx in the half type within HALF_EPS of the
    reference on the same half inputs, every float32 parameter gradient within 1e-5 at scale."""
    y = layer(x, *extra)
    dx = layer.backward(dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert set(layer.grads) == set(want_grads)
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    close_at_scale(y, want_y, HALF_EPS[half], "y")
    close_at_scale(dx, want_dx, HALF_EPS[half], "dx")
    for name, want in want_grads.items():
        close_at_scale(layer.grads[name], want, 1e-5, f"d{name}")


def check_view_matches_copy_any_state(x, make_layer, rng, dtype, assert_close, extra=()):
    """check_view_matches_copy for layers with any (or no) buffers: y, dx from a negative-stride
    dy, every gradient and every buffer of the state_dict equal those of the contiguous copy, and
    the view is never written."""
    assert not x.flags.c_contiguous
    x_before = x.copy()
    strided, contiguous = make_layer(), make_layer()
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert_close(strided(x, *extra), contiguous(np.ascontiguousarray(x), *extra), dtype,
                 what="y")
    flipped = np.flip(np.flip(dy, -1).copy(), -1)
    assert not flipped.flags.c_contiguous
    assert_close(strided.backward(flipped), contiguous.backward(dy), dtype, what="dx")
    assert strided.grads.keys() == contiguous.grads.keys() == contiguous.parameters().keys()
    for key in contiguous.grads:
        assert_close(strided.grads[key], contiguous.grads[key], dtype, what=f"d{key}")
    for key in state_buffers(strided):
        assert_close(getattr(strided, key), getattr(contiguous, key), dtype, what=key)
    np.testing.assert_array_equal(x, x_before)  # the input is never written


def assert_bitwise_same_threads_any_state(make_layer, shape, dtype, extra=()):
    """assert_bitwise_same_for_1_and_2_threads (NCHW) for layers with any (or no) buffers:
    y, dx, every gradient and every buffer have the same bytes with one and two threads."""
    assert_bitwise_same_for_1_and_2_threads(make_layer, shape, dtype, "NCHW", extra, state_buffers, 0.5)
