"""Channels-last (layout="NHWC") gives the channels-first results for the same logical tensor,
forward and backward, for every layer that takes (N, C, *spatial), in every dtype; the fused
inference epilogue (out=, in place, residual, ReLU) gives what the unfused ops give."""
import numpy as np
import pytest

import normkit
import normkit.functional as F

ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12, np.dtype(np.float16): 2.0 ** -10,
       np.dtype(ml_dtypes.bfloat16): 2.0 ** -7}


def to_nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= TOL[np.dtype(dtype)] * scale, what


LAYERS = {
    "BatchNorm1d": (lambda layout, dt: normkit.BatchNorm1d(5, layout=layout, dtype=dt), (3, 5, 17)),
    "BatchNorm2d": (lambda layout, dt: normkit.BatchNorm2d(5, layout=layout, dtype=dt), (3, 5, 7, 6)),
    "BatchNorm3d": (lambda layout, dt: normkit.BatchNorm3d(5, layout=layout, dtype=dt), (2, 5, 3, 4, 5)),
    "InstanceNorm2d": (lambda layout, dt: normkit.InstanceNorm2d(5, affine=True, layout=layout, dtype=dt), (3, 5, 7, 6)),
    "GroupNorm": (lambda layout, dt: normkit.GroupNorm(5, 35, layout=layout, dtype=dt), (2, 35, 9, 10)),
    "BatchNorm2d-wide": (lambda layout, dt: normkit.BatchNorm2d(33, layout=layout, dtype=dt), (2, 33, 40, 70)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_matches_channels_first(name, dtype, training):
    make, shape = LAYERS[name]
    pdt = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(0)
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    first, last = make("NCHW", pdt), make("NHWC", pdt)
    for layer in (first, last):
        for p in layer.parameters().values():
            p[...] = rng.uniform(0.5, 1.5, p.shape) if layer is first else first.parameters()[next(
                k for k, v in layer.parameters().items() if v is p)]
        layer.train(True)
        layer(x if layer is first else to_nhwc(x))  # one step of running statistics
        layer.train(training)
    y, y_t = first(x), last(to_nhwc(x))
    close(y_t, to_nhwc(y), dtype, "y")
    dx, dx_t = first.backward(dy), last.backward(to_nhwc(dy))
    close(dx_t, to_nhwc(dx), dtype, "dx")
    for k, g in first.grads.items():
        close(last.grads[k], g, pdt, f"d{k}")
    for k in ("running_mean", "running_var"):
        if getattr(first, k, None) is not None:
            close(getattr(last, k), getattr(first, k), pdt, k)


def test_channels_last_layer_checks_the_last_dim():
    with pytest.raises(ValueError, match="channels in dim -1"):
        normkit.BatchNorm2d(5, layout="NHWC")(np.zeros((2, 5, 3, 3), np.float32))
    with pytest.raises(ValueError, match="layout: expected 'NCHW' or 'NHWC'"):
        normkit.GroupNorm(1, 4, layout="NCWH")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"])
def test_fused_residual_relu_and_out(fn, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 6)).astype(dtype)
    r = rng.standard_normal(x.shape).astype(dtype)
    pdt = np.float64 if dtype == np.float64 else np.float32
    call = {
        "batch_norm": lambda **k: F.batch_norm(x, np.full(4, 0.5, pdt), np.full(4, 2.0, pdt), **k),
        "instance_norm": lambda **k: F.instance_norm(x, **k),
        "group_norm": lambda **k: F.group_norm(x, 2, **k),
        "layer_norm": lambda **k: F.layer_norm(x, (5, 6), **k),
        "rms_norm": lambda **k: F.rms_norm(x, (5, 6), **k),
    }[fn]
    plain = call().astype(np.float64)
    close(call(residual=r, activation="relu"), np.maximum(plain + r.astype(np.float64), 0), dtype, "fused")
    close(call(activation="relu"), np.maximum(plain, 0), dtype, "relu")
    out = np.empty_like(x)
    assert call(out=out, residual=r) is out
    close(out, plain + r.astype(np.float64), dtype, "out=")
    inplace = r.copy()
    call(out=inplace, residual=inplace)  # y = norm(x) + r, written over r
    close(inplace, plain + r.astype(np.float64), dtype, "in place over the residual")


def test_in_place_over_the_input_and_channels_last_inference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)  # NHWC, C = 4
    mean, var = rng.standard_normal(4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    want = np.maximum((x - mean) / np.sqrt(var + 1e-5), 0)
    y = x.copy()
    assert F.batch_norm(y, mean, var, layout="NHWC", out=y, activation="relu") is y
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_epilogue_arguments_are_checked_before_writing():
    x = np.ones((2, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="activation"):
        F.batch_norm(x, rm, rv, activation="gelu")
    with pytest.raises(ValueError, match="out: expected shape"):
        F.batch_norm(x, rm, rv, out=np.empty((2, 3), np.float32))
    with pytest.raises(TypeError, match="out: expected dtype"):
        F.batch_norm(x, rm, rv, out=np.empty_like(x, np.float64))
    with pytest.raises(ValueError, match="out: expected a writable"):
        ro = np.empty_like(x)
        ro.flags.writeable = False
        F.batch_norm(x, rm, rv, out=ro)
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        F.batch_norm(x, rm, rv, out=np.empty((2, 3, 8), np.float32)[..., ::2])
    buf = np.ones(30, np.float32)
    with pytest.raises(ValueError, match="partial overlap"):  # out shifted by one over the input
        F.batch_norm(buf[:24].reshape(2, 3, 4), rm, rv, out=buf[1:25].reshape(2, 3, 4))
    shared = np.zeros(24, np.float32)
    with pytest.raises(ValueError, match="running_mean"):  # out over a statistics buffer
        F.batch_norm(x, shared[:3], rv, training=True, out=shared.reshape(2, 3, 4))
    running = rm.copy()
    with pytest.raises(ValueError):
        F.batch_norm(x, running, rv, training=True, momentum=0.5, out=np.empty((1,), np.float32))
    assert np.array_equal(running, rm)  # nothing written by the rejected call
