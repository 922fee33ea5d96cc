"""MovingAverageBatchNorm2d, CrossIterationBatchNorm2d and BatchKalmanNorm2d against their float64
references (reference.py, "Research variants III", proven in test_reference_iterations.py).

Spec (API.md rows and the layers' docstrings):
- MABN (arXiv 2001.06838): parameters weight, bias (C); buffers running_var (C), buffer_x2,
  buffer_gz (buffer_size, C), iters. A training step keeps chi2_B = mean(x^2) and psi_B in rings
  and normalizes by their means (the batch's own while t <= buffer_size or t < warmup_iters);
  r = 1 until step max(1000, warmup_iters), then clipped to [1/r_max, r_max]. The backward is the
  paper's, exactly once per training forward (a second raises StateError and changes nothing).
  Eval: y = weight x/sqrt(running_var + eps) + bias (BatchNorm with running_mean 0);
  use_batch_stats: the RMS normalization by chi2_B with the exact backward, state untouched.
- CBN (arXiv 2002.05712): parameters weight, bias; buffers running_mean, running_var,
  num_batches_tracked. `layer(x, weight, dmean_dweight, dsqmean_dweight)` in training; the window
  is the current batch (burn-in: alone) and up to window - 1 earlier steps compensated to the
  current weight; window=1 is BatchNorm2d; running statistics follow torch's rule; eval needs no
  extra arguments. The window is not state_dict's: a loaded layer refills it.
- BKN (arXiv 1802.03133): parameters weight, bias (C), A (C, prior_features); buffers
  running_mean, running_var, num_batches_tracked. `layer(x, prior=None)`, prior = (mean, var) of
  the previous layer's `posterior`; grads["prior_mean"], grads["prior_var"]; `backward(dy,
  posterior_grad=(dmean, dvar))` chains layers exactly. Without a prior (or where the guard
  discards the prediction) BatchNorm with a biased posterior; running statistics an EMA of the
  posterior without the unbiased factor.
- All: dtype float32/float64, layout NCHW/NHWC, float16/bfloat16 input on float32 layers,
  use_batch_stats after eval(), empty batches as torch's BatchNorm.

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import normkit
import reference as ref
from conftest import FD_TOL, _assert_close
from normkit._checks import StateError
from variant_checks import (AFFINE, FLOAT_DTYPES, HALF_EPS, VIEWS,
                            assert_bitwise_same_for_1_and_2_threads, assert_state_dict_round_trip,
                            assert_state_unchanged, check_half_input_all,
                            check_view_matches_copy_any_state, close_at_scale, half_dtype,
                            make_input, planes, randomize_affine_or_none, snapshot, state_buffers,
                            to_nhwc)

SHAPES = [
    pytest.param((3, 5, 4, 3), id="N3-C5-4x3"),
    pytest.param((4, 6, 1, 1), id="N4-C6-1x1-spatial1"),
    pytest.param((3, 1, 5, 4), id="N3-C1-5x4-C1"),
    pytest.param((3, 17, 5, 7), id="N3-C17-5x7-odd"),
    pytest.param((2, 6, 3, 5), id="N2-C6-3x5-N2"),
    pytest.param((2, 3, 1, 1), id="N2-C3-1x1-two-values"),
]

# (training, use_batch_stats): training, eval with the running statistics, eval with the batch's.
MODES = [pytest.param(True, False, id="train"), pytest.param(False, False, id="eval"),
         pytest.param(False, True, id="eval-batch-stats")]

VIEWS = {**VIEWS, "sample-sliced": lambda rng, dt: make_input(rng, (10, 6, 7, 5), dt)[::2]}

# (5, 6, 55, 57): planes of 3135 entries; (3, 70, 23, 25): many channels of 575 entries.
THREAD_SHAPES = [pytest.param((5, 6, 55, 57), id="N5-C6-55x57"),
                 pytest.param((3, 70, 23, 25), id="N3-C70-23x25")]

AXES = (0, 2, 3)


def in_mode(layer, training, use_batch_stats):
    """The layer in train(training) with use_batch_stats set: a mode of the MODES table."""
    layer.train(training)
    layer.use_batch_stats = use_batch_stats
    return layer


def pc(v):
    """A per-channel vector, broadcastable against (N, C, H, W)."""
    return np.asarray(v, np.float64).reshape(1, -1, 1, 1)


def affine_arrays(layer):
    """float64 copies of weight and bias (ones and zeros without an affine)."""
    C = layer.num_features
    if layer.weight is None:
        return np.ones(C), np.zeros(C)
    return ref.f64(layer.weight).copy(), ref.f64(layer.bias).copy()


def affine_grads(layer, dweight, dbias):
    """The expected grads of the affine: {} without one."""
    return {} if layer.weight is None else {"weight": dweight, "bias": dbias}


def check_grads(layer, dx, want_dx, want_grads, dtype, assert_close, count=1, dx_scale=None):
    """dx, and layer.grads with exactly want_grads' keys, each of its expected shape and close."""
    assert dx.dtype == dtype
    assert_close(dx, want_dx, dtype, count=count, what="dx", scale=dx_scale)
    assert set(layer.grads) == set(want_grads)
    for name, want in want_grads.items():
        assert np.shape(layer.grads[name]) == np.shape(want), f"d{name} shape"
        assert_close(layer.grads[name], want, dtype, count=count, what=f"d{name}")


def sgd(layer, lr):
    for name, p in layer.parameters().items():
        p -= lr * layer.grads[name]


def grads_bytes(layer):
    return {k: np.ascontiguousarray(v).tobytes() for k, v in layer.grads.items()}


def check_channels_last_steps(make_layer, steps, dtype, assert_close, extra_for=None, after=None):
    """An NHWC layer follows the NCHW one built alike, step by step: y, dx, every gradient and
    every state buffer. steps: (x, dy, training) in NCHW; extra_for(i, layer): the step's extra
    arguments; after(i, first, last): further checks of a step."""
    first, last = make_layer("NCHW"), make_layer("NHWC")
    for i, (x, dy, training) in enumerate(steps):
        count = planes(x.shape)
        first.train(training)
        last.train(training)
        y = first(x, *(extra_for(i, first) if extra_for else ()))
        y_t = last(to_nhwc(x), *(extra_for(i, last) if extra_for else ()))
        assert y_t.shape == (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
        assert_close(y_t, to_nhwc(y), dtype, count=count, what=f"NHWC y, step {i}")
        dx, dx_t = first.backward(dy), last.backward(to_nhwc(dy))
        assert_close(dx_t, to_nhwc(dx), dtype, count=count, what=f"NHWC dx, step {i}")
        assert last.grads.keys() == first.grads.keys()
        for key, g in first.grads.items():
            assert_close(last.grads[key], g, dtype, count=count, what=f"NHWC d{key}, step {i}")
        for key in state_buffers(first):
            assert_close(getattr(last, key), getattr(first, key), dtype, count=count,
                         what=f"NHWC {key}, step {i}")
        if after:
            after(i, first, last)
    return first, last


def check_threads(make_layer, shape, dtype, layout, extra=()):
    assert_bitwise_same_for_1_and_2_threads(make_layer, shape, dtype, layout, extra,
                                            state_buffers, 0.5)


# =================================================================================================
# MovingAverageBatchNorm2d
# =================================================================================================

def mabn(C, dtype=np.float64, **kw):
    return normkit.MovingAverageBatchNorm2d(C, dtype=dtype, **kw)


def mabn_shadow(layer):
    """The reference with the layer's hyperparameters and fresh state."""
    return ref.MABNReference(layer.num_features, layer.buffer_size, layer.eps, layer.momentum,
                             layer.warmup_iters, layer.r_max)


def mabn_dx_scale(shadow, x, dy, w):
    """|w r dy|/s times max(1, |z|): the size of the terms a training dx is a difference of."""
    last = shadow.last
    g = np.abs(ref.f64(dy) * pc(w * last["r"])) / pc(last["s"])
    z = np.abs(ref.f64(x) / pc(last["s"]))
    return float(g.max() * max(1.0, z.max()))


def mabn_train_step(layer, shadow, x, dy, dtype, assert_close, what=""):
    """One training step of layer and reference: y, dx and the gradients compared."""
    w, b = affine_arrays(layer)
    count = planes(x.shape)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, shadow.forward(x, w, b), dtype, count=count, what=f"y{what}")
    dx = layer.backward(dy)
    want_dx, dw, db = shadow.backward(dy)
    check_grads(layer, dx, want_dx, affine_grads(layer, dw, db), dtype, assert_close, count,
                mabn_dx_scale(shadow, x, dy, w))
    return y, dx


def mabn_assert_state(layer, shadow, dtype, assert_close):
    assert int(layer.iters) == shadow.iters and layer.iters.dtype == np.int64
    for key in ("running_var", "buffer_x2", "buffer_gz"):
        assert getattr(layer, key).dtype == dtype
        assert_close(getattr(layer, key), getattr(shadow, key), dtype, what=key)


@pytest.mark.parametrize("shape", SHAPES)
@AFFINE
def test_mabn_training_steps_match_the_reference(shape, affine, dtype, rng, randomize_affine,
                                                 assert_close):
    # buffer_size 3, warmup_iters 5: steps 1-4 normalize by the batch's own chi2 and psi, steps
    # 5-8 by the rings' means (the rings full since step 3).
    layer = mabn(shape[1], dtype, buffer_size=3, warmup_iters=5, momentum=0.9, affine=affine)
    randomize_affine_or_none(layer, affine, randomize_affine)
    shadow = mabn_shadow(layer)
    for step in range(1, 9):
        x = make_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        mabn_train_step(layer, shadow, x, dy, dtype, assert_close, f", step {step}")
        mabn_assert_state(layer, shadow, dtype, assert_close)
        if step >= 5:
            assert not np.allclose(shadow.last["chi2_S"], shadow.last["chi2_B"])


LONG_RUN = dict(buffer_size=4, warmup_iters=10, r_max=1.05)
# Per-channel drift of the input's scale: running_var lags chi2 by ~1/(1 - momentum) steps, so
# r = sqrt(chi2_S/running_var) leaves [1/1.05, 1.05] in the drifting channels once r is free.
GROWTH = np.array([1.0, 1.0012, 0.9988])


def drifting_steps(rng, steps, shape):
    for t in range(1, steps + 1):
        scale = pc(GROWTH ** t)
        yield t, scale * (0.2 + rng.standard_normal(shape)), rng.standard_normal(shape)


def test_mabn_1200_steps_across_every_boundary_match_the_reference(rng, assert_close):
    # Boundaries: the rings fill at step 4, warm-up ends at step 10, r's clip opens after 1000.
    shape = (2, 3, 3, 5)
    layer = mabn(3, **LONG_RUN)
    layer.weight[...], layer.bias[...] = [0.8, 1.2, 1.0], [0.1, -0.2, 0.3]
    shadow = mabn_shadow(layer)
    clipped = free = 0
    for t, x, dy in drifting_steps(rng, 1250, shape):
        w, b = affine_arrays(layer)
        y = layer(x)
        assert_close(y, shadow.forward(x, w, b), what=f"y, step {t}")
        dx = layer.backward(dy)
        want_dx, dw, db = shadow.backward(dy)
        assert_close(dx, want_dx, what=f"dx, step {t}")
        assert_close(layer.grads["weight"], dw, what=f"dweight, step {t}")
        assert_close(layer.grads["bias"], db, what=f"dbias, step {t}")
        last = shadow.last
        assert np.array_equal(last["chi2_S"], last["chi2_B"]) == (t < 10), t
        assert np.array_equal(last["psi_S"], last["psi_B"]) == (t < 10), t
        r_raw = last["r_unclipped"]
        if t <= 1000:
            assert np.all(last["r"] == 1.0)
        else:
            out = (r_raw > 1.05) | (r_raw < 1 / 1.05)
            clipped += int(out.sum())
            free += int(np.sum(~out & (r_raw != 1.0)))
        sgd(layer, 1e-3)
    mabn_assert_state(layer, shadow, np.float64, assert_close)
    assert int(layer.iters) == 1250
    assert clipped > 20 and free > 20, (clipped, free)  # the clip binds, and not everywhere


def test_mabn_state_dict_round_trip_mid_run_resumes_bitwise(rng):
    # Layers loaded from the running one's state_dict at steps 600 and 1100 (rings, iters,
    # running_var and the parameters) give the same bits from then on, through the clip's opening.
    shape = (2, 3, 3, 5)
    layers = [mabn(3, **LONG_RUN)]
    layers[0].weight[...], layers[0].bias[...] = [0.8, 1.2, 1.0], [0.1, -0.2, 0.3]
    for t, x, dy in drifting_steps(rng, 1200, shape):
        outs = []
        for layer in layers:
            y = layer(x)
            dx = layer.backward(dy)
            outs.append([y.tobytes(), dx.tobytes(), grads_bytes(layer)])
            sgd(layer, 1e-3)
        for got in outs[1:]:
            assert got == outs[0], f"step {t}"
        if t in (600, 1100):
            fresh = mabn(3, **LONG_RUN)
            assert int(fresh.iters) == 0
            assert fresh.load_state_dict(layers[0].state_dict()) is fresh
            assert int(fresh.iters) == t
            layers.append(fresh)
    assert len(layers) == 3
    want = layers[0].state_dict()
    for layer in layers[1:]:
        got = layer.state_dict()
        assert list(got) == list(want)
        for key in want:
            assert got[key].tobytes() == want[key].tobytes(), key


def test_mabn_one_backward_per_training_forward(rng):
    layer = mabn(4, buffer_size=3, warmup_iters=0)
    shape = (3, 4, 5, 2)
    with pytest.raises(StateError, match="forward"):
        layer.backward(np.ones(shape))
    assert isinstance(StateError("x"), RuntimeError)
    for step in range(1, 7):  # through the warm-up and past the ring's filling
        layer(make_input(rng, shape, np.float64))
        dy = rng.standard_normal(shape)
        with pytest.raises(ValueError, match="dy"):  # a rejected dy is not the one backward
            layer.backward(dy[:, :, :, :1])
        dx = layer.backward(dy)
        before, grads = snapshot(layer), grads_bytes(layer)
        gz = layer.buffer_gz.tobytes()
        with pytest.raises(StateError, match="one backward per training forward"):
            layer.backward(dy)
        with pytest.raises(StateError):
            layer.backward(np.zeros(shape))
        assert layer.buffer_gz.tobytes() == gz, f"step {step}"
        assert_state_unchanged(layer, before)
        assert grads_bytes(layer) == grads
        assert dx.shape == shape


@pytest.mark.parametrize("use_batch_stats", [False, True], ids=["running", "batch-stats"])
def test_mabn_eval_backward_may_be_repeated(use_batch_stats, rng):
    layer = mabn(4, buffer_size=2, warmup_iters=0)
    shape = (3, 4, 5, 2)
    for _ in range(3):
        layer(make_input(rng, shape, np.float64))
        layer.backward(rng.standard_normal(shape))
    layer.eval()
    layer.use_batch_stats = use_batch_stats
    before = snapshot(layer)
    layer(make_input(rng, shape, np.float64))
    dy = rng.standard_normal(shape)
    results = []
    for _ in range(3):
        dx = layer.backward(dy)
        results.append((dx.tobytes(), grads_bytes(layer)))
    assert results[0] == results[1] == results[2]
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("shape", SHAPES)
@AFFINE
def test_mabn_eval_is_batch_norm_with_zero_mean_and_the_running_variance(
        shape, affine, dtype, rng, randomize_affine, assert_close):
    layer = mabn(shape[1], dtype, buffer_size=2, warmup_iters=0, momentum=0.5, affine=affine)
    randomize_affine_or_none(layer, affine, randomize_affine)
    shadow = mabn_shadow(layer)
    for _ in range(3):
        mabn_train_step(layer, shadow, make_input(rng, shape, dtype),
                        rng.standard_normal(shape).astype(dtype), dtype, assert_close)
    layer.eval()
    before = snapshot(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = affine_arrays(layer)
    kw = dict(running_mean=np.zeros(shape[1]), running_var=layer.running_var, training=False,
              eps=layer.eps)
    y = layer(x)
    assert_close(y, ref.batch_norm(x, w, b, **kw), dtype, what="y")
    assert_close(y, shadow.forward(x, w, b, training=False), dtype, what="y (MABNReference)")
    want_dx, dw, db = ref.batch_norm_backward(x, dy, w, b, **kw)
    check_grads(layer, layer.backward(dy), want_dx, affine_grads(layer, dw, db), dtype,
                assert_close, planes(shape))
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("shape", SHAPES)
def test_mabn_use_batch_stats_after_eval_is_rms_normalization_and_leaves_the_state(
        shape, dtype, rng, randomize_affine, assert_close):
    layer = mabn(shape[1], dtype, buffer_size=2, warmup_iters=0)
    randomize_affine(layer)
    for _ in range(3):
        layer(make_input(rng, shape, dtype))
        layer.backward(rng.standard_normal(shape).astype(dtype))
    layer.eval()
    layer.use_batch_stats = True
    before = snapshot(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = affine_arrays(layer)
    # a fresh reference's first training step: chi2_S = chi2_B, r = 1, psi_S = psi_B (exact)
    first = ref.MABNReference(shape[1], eps=layer.eps)
    y = layer(x)
    assert_close(y, first.forward(x, w, b), dtype, count=planes(shape), what="y")
    assert_close(y, pc(w) * ref.f64(x) / np.sqrt((ref.f64(x) ** 2).mean(axis=AXES, keepdims=True)
                                                 + layer.eps) + pc(b), dtype, what="y spelled out")
    want_dx, dw, db = first.backward(dy)
    check_grads(layer, layer.backward(dy), want_dx, {"weight": dw, "bias": db}, dtype,
                assert_close, planes(shape), mabn_dx_scale(first, x, dy, w))
    assert_state_unchanged(layer, before)
    layer.use_batch_stats = False
    assert not np.allclose(layer(x), y, atol=1e-3)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("shape", [pytest.param((3, 4, 2, 3), id="N3-C4-2x3"),
                                   pytest.param((2, 1, 3, 1), id="N2-C1-3x1")])
@pytest.mark.parametrize("training", [True, False], ids=["warm-up", "eval-batch-stats"])
def test_mabn_exact_backwards_equal_finite_differences(shape, training, rng, randomize_affine,
                                                       check_gradients_by_finite_differences):
    # Warm-up training (never left here) and use_batch_stats: the backward is the derivative.
    layer = mabn(shape[1], buffer_size=3, warmup_iters=10 ** 9)
    randomize_affine(layer)
    layer.train(training)
    layer.use_batch_stats = True
    check_gradients_by_finite_differences(layer, make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))


def mabn_prepared(dtype, shape, seed=0, steps=3, **kw):
    """A layer after `steps` training steps past its warm-up (buffer_size 2, warmup_iters 0)."""
    rng = np.random.default_rng(seed)
    layer = mabn(shape[1], dtype, buffer_size=2, warmup_iters=0, momentum=0.7, **kw)
    layer.weight[...] = rng.uniform(0.5, 1.5, shape[1])
    layer.bias[...] = rng.normal(0, 0.5, shape[1])
    for _ in range(steps):
        x = make_input(rng, shape, dtype)
        x = to_nhwc(x) if kw.get("layout", "NCHW") == "NHWC" else x
        layer(x)
        layer.backward(np.ones_like(x))
    return layer


@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_mabn_half_input_is_computed_in_float32(half, training, use_batch_stats):
    hdt = half_dtype(half)
    shape = (4, 6, 7, 9)
    rng = np.random.default_rng(1)
    layer = mabn(6, np.float32, buffer_size=2, warmup_iters=0, momentum=0.7)
    layer.weight[...] = rng.uniform(0.5, 1.5, 6)
    layer.bias[...] = rng.normal(0, 0.5, 6)
    shadow = mabn_shadow(layer)
    w, b = affine_arrays(layer)
    for _ in range(3):
        x = make_input(rng, shape, np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        layer(x)
        layer.backward(dy)
        shadow.forward(x, w, b)
        shadow.backward(dy)
    layer.train(training)
    layer.use_batch_stats = use_batch_stats
    x = (0.5 + rng.standard_normal(shape)).astype(hdt)
    dy = rng.standard_normal(shape).astype(hdt)
    source = ref.MABNReference(6, eps=layer.eps) if use_batch_stats else shadow
    want_y = source.forward(x, w, b, training=training or use_batch_stats)
    want_dx, dw, db = source.backward(dy)
    check_half_input_all(layer, x, dy, want_y, want_dx, {"weight": dw, "bias": db}, half)
    assert all(getattr(layer, k).dtype == np.float32 for k in ("running_var", "buffer_x2", "buffer_gz"))


@pytest.mark.parametrize("shape", [pytest.param((3, 5, 4, 7), id="N3-C5-4x7"),
                                   pytest.param((4, 6, 1, 1), id="N4-C6-1x1"),
                                   pytest.param((2, 17, 3, 5), id="N2-C17-3x5")])
def test_mabn_channels_last_matches_channels_first(shape, dtype, rng, assert_close):
    # 7 training steps through the warm-up and the rings, then eval and eval with batch stats.
    steps = [(make_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype), True)
             for _ in range(7)]
    steps += [(make_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype), False)
              for _ in range(2)]

    def make_layer(layout):
        layer = mabn(shape[1], dtype, buffer_size=3, warmup_iters=4, layout=layout)
        layer.weight[...] = np.linspace(0.5, 1.5, shape[1])
        layer.bias[...] = np.linspace(-0.3, 0.3, shape[1])
        return layer

    def extra_for(i, layer):
        layer.use_batch_stats = i == 8
        return ()

    first, last = check_channels_last_steps(make_layer, steps, dtype, assert_close, extra_for)
    assert int(last.iters) == 7


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_mabn_non_contiguous_input_gives_the_result_of_its_copy(view, training, use_batch_stats,
                                                                dtype, rng, assert_close):
    def make_layer():
        return in_mode(mabn_prepared(dtype, (5, 6, 7, 5)), training, use_batch_stats)

    check_view_matches_copy_any_state(VIEWS[view](rng, dtype), make_layer, rng, dtype, assert_close)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_mabn_bitwise_identical_for_one_and_two_threads(layout, shape, training, use_batch_stats,
                                                        dtype):
    def make_layer():
        return in_mode(mabn_prepared(dtype, shape, layout=layout), training, use_batch_stats)

    check_threads(make_layer, shape, dtype, layout)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_mabn_state_dict_keys_follow_the_api_table(affine):
    layer = mabn(6, np.float32, buffer_size=5, affine=affine)
    keys = [("weight", (6,), np.float32), ("bias", (6,), np.float32)] if affine else []
    keys += [("running_var", (6,), np.float32), ("buffer_x2", (5, 6), np.float32),
             ("buffer_gz", (5, 6), np.float32), ("iters", (), np.int64)]
    assert [(k, v.shape, v.dtype) for k, v in layer.state_dict().items()] == keys
    assert set(layer.parameters()) == ({"weight", "bias"} if affine else set())
    state = layer.state_dict()
    np.testing.assert_array_equal(state["running_var"], np.ones(6))
    assert not state["buffer_x2"].any() and not state["buffer_gz"].any() and int(state["iters"]) == 0


@FLOAT_DTYPES
def test_mabn_state_dict_round_trip_into_a_fresh_layer(dtype, rng):
    shape = (4, 6, 5, 3)
    fresh = mabn(6, dtype, buffer_size=2, warmup_iters=0, momentum=0.7)
    assert_state_dict_round_trip(mabn_prepared(dtype, shape), fresh, rng, shape, dtype)
    assert int(fresh.iters) == 3 + 3 + 2  # prepared, the round trip's steps, its two after


def test_mabn_load_state_dict_of_another_buffer_size_raises_and_writes_nothing(rng):
    layer = mabn_prepared(np.float64, (3, 4, 2, 2))
    before = snapshot(layer)
    state = mabn(4, buffer_size=3).state_dict()
    with pytest.raises(ValueError, match="buffer_x2"):
        layer.load_state_dict(state)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("argument, kwargs, error", [
    pytest.param("buffer_size", dict(buffer_size=0), ValueError, id="buffer_size=0"),
    pytest.param("buffer_size", dict(buffer_size=2.5), TypeError, id="buffer_size=2.5"),
    pytest.param("warmup_iters", dict(warmup_iters=-1), ValueError, id="warmup_iters=-1"),
    pytest.param("r_max", dict(r_max=0.5), ValueError, id="r_max=0.5"),
    pytest.param("momentum", dict(momentum=1.5), ValueError, id="momentum=1.5"),
    pytest.param("momentum", dict(momentum=None), TypeError, id="momentum=None"),
    pytest.param("eps", dict(eps=-1.0), ValueError, id="eps=-1"),
    pytest.param("num_features", dict(num_features=0), ValueError, id="num_features=0"),
    pytest.param("dtype", dict(dtype=np.int32), TypeError, id="dtype=int32"),
    pytest.param("layout", dict(layout="NCW"), ValueError, id="layout=NCW"),
])
def test_mabn_bad_arguments_raise_naming_them(argument, kwargs, error):
    kwargs = {"num_features": 4, **kwargs}
    with pytest.raises(error, match=argument):
        normkit.MovingAverageBatchNorm2d(**kwargs)


@pytest.mark.parametrize("attribute, bad", [("warmup_iters", -2), ("r_max", 0.9)])
def test_mabn_setting_a_bad_hyperparameter_raises_naming_it_and_keeps_the_old_value(attribute, bad):
    layer = mabn(4, warmup_iters=7, r_max=2.0)
    old = getattr(layer, attribute)
    with pytest.raises(ValueError, match=attribute):
        setattr(layer, attribute, bad)
    assert getattr(layer, attribute) == old


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mabn_bad_input_raises_and_changes_no_state(training, rng):
    layer = mabn_prepared(np.float64, (3, 4, 2, 2)).train(training)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="4"):
        layer(make_input(rng, (3, 5, 2, 2), np.float64))
    with pytest.raises(ValueError, match="4D"):
        layer(rng.standard_normal((3, 4, 2)))
    with pytest.raises(TypeError):
        layer(np.ones((3, 4, 2, 2), np.int64))
    assert_state_unchanged(layer, before)


def test_mabn_defaults_and_repr():
    layer = normkit.MovingAverageBatchNorm2d(6)
    assert (layer.buffer_size, layer.eps, layer.momentum, layer.warmup_iters, layer.r_max) == (
        16, 1e-5, 0.98, 100, 5.0)
    assert layer.training and layer.use_batch_stats is False and layer.dtype == np.float32
    assert repr(layer) == ("MovingAverageBatchNorm2d(6, buffer_size=16, eps=1e-05, momentum=0.98, "
                           "warmup_iters=100, r_max=5.0, affine=True)")


# =================================================================================================
# CrossIterationBatchNorm2d
# =================================================================================================

FILTER = (2, 3)  # the preceding layer's filter: its weight is (C, 2, 3)


def cbn(C, dtype=np.float64, **kw):
    return normkit.CrossIterationBatchNorm2d(C, dtype=dtype, **kw)


def preceding(rng, C, theta=None):
    """(weight, dmean_dweight, dsqmean_dweight) of the preceding layer: its weight a small SGD-like
    step from theta, random Jacobians of this step's statistics."""
    theta = (rng.normal(0, 0.5, (C,) + FILTER) if theta is None
             else theta + rng.normal(0, 0.05, theta.shape))
    return theta, rng.normal(0, 0.3, theta.shape), rng.normal(0, 0.3, theta.shape)


class CbnShadow:
    """The window by hand: every earlier training step's (mean, sqmean, weight, dmean_dweight,
    dsqmean_dweight) in float64, oldest first; a step uses the last window - 1 of them, none
    while fewer than `burnin` steps have passed."""

    def __init__(self, layer):
        self.window, self.burnin, self.eps = layer.window, layer.burnin, layer.eps
        self.entries = []

    def history(self):
        if len(self.entries) < self.burnin or self.window == 1:
            return []
        return self.entries[-(self.window - 1):]

    def want(self, x, dy, w, b, theta, history=None):
        """(y, (dx, dweight, dbias), terms, dx_scale) of a training step with `history`."""
        history = self.history() if history is None else history
        mus, nus = ref.cbn_compensated_history(theta, history)
        y = ref.cross_iteration_batch_norm(x, w, b, mus, nus, self.eps)
        back = ref.cross_iteration_batch_norm_backward(x, dy, w, b, mus, nus, self.eps)
        x64 = ref.f64(x)
        _, var_bar, _ = ref.cbn_window_statistics(x64.mean(axis=AXES), (x64 ** 2).mean(axis=AXES),
                                                  theta, history)
        scale = float(np.max(np.abs(ref.f64(dy) * pc(w)) / pc(np.sqrt(var_bar + self.eps))))
        return y, back, len(history), scale

    def record(self, x, theta, dmean, dsqmean):
        x64 = ref.f64(x)
        self.entries.append((x64.mean(axis=AXES), (x64 ** 2).mean(axis=AXES),
                             *(np.array(a, np.float64) for a in (theta, dmean, dsqmean))))


def cbn_train_step(layer, shadow, x, dy, pre, dtype, assert_close, what=""):
    """One training step of layer and shadow: y, dx, gradients compared; returns (y, terms)."""
    w, b = affine_arrays(layer)
    want_y, (want_dx, dw, db), terms, scale = shadow.want(x, dy, w, b, pre[0])
    count = planes(x.shape)
    y = layer(x, *pre)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, want_y, dtype, count=count, what=f"y{what}")
    check_grads(layer, layer.backward(dy), want_dx, affine_grads(layer, dw, db), dtype,
                assert_close, count, scale)
    shadow.record(x, *pre)
    return y, terms


class RunningShadow:
    """torch's running statistics: mean and unbiased variance of the batch, EMA with momentum
    (a cumulative average for None)."""

    def __init__(self, C, momentum):
        self.momentum, self.count = momentum, 0
        self.mean, self.var = np.zeros(C), np.ones(C)

    def update(self, mean, var):
        self.count += 1
        factor = 1.0 / self.count if self.momentum is None else self.momentum
        self.mean = ref.running_update(self.mean, mean, factor)
        self.var = ref.running_update(self.var, var, factor)

    def check(self, layer, dtype, assert_close, what=""):
        assert int(layer.num_batches_tracked) == self.count
        assert layer.running_mean.dtype == layer.running_var.dtype == dtype
        assert_close(layer.running_mean, self.mean, dtype, what=f"running_mean{what}")
        assert_close(layer.running_var, self.var, dtype, what=f"running_var{what}")


WINDOWS = [pytest.param(3, 2, [0, 0, 2, 2, 2, 2], id="window3-burnin2"),
           pytest.param(3, 0, [0, 1, 2, 2, 2, 2], id="window3-burnin0"),
           pytest.param(4, 1, [0, 1, 2, 3, 3, 3], id="window4-burnin1")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window, burnin, terms", WINDOWS)
@AFFINE
def test_cbn_training_steps_match_the_reference(shape, window, burnin, terms, affine, dtype, rng,
                                                randomize_affine, assert_close):
    # The window: the current batch alone during the burn-in, then it and up to window - 1
    # earlier steps (the burn-in's included), each compensated to this step's weight.
    C = shape[1]
    layer = cbn(C, dtype, window=window, burnin=burnin, affine=affine)
    randomize_affine_or_none(layer, affine, randomize_affine)
    shadow, running = CbnShadow(layer), RunningShadow(C, 0.1)
    theta, got = None, []
    for step in range(1, 7):
        pre = preceding(rng, C, theta)
        theta = pre[0]
        x = make_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y, n = cbn_train_step(layer, shadow, x, dy, pre, dtype, assert_close, f", step {step}")
        got.append(n)
        running.update(*ref.batch_stats(x))
        running.check(layer, dtype, assert_close, f", step {step}")
        bn = ref.batch_norm(x, *affine_arrays(layer), layer.eps)
        assert np.allclose(y, bn, rtol=0, atol=1e-6) == (n == 0), f"step {step}: window of {n + 1}"
        sgd(layer, 0.05)
    assert got == terms


def test_cbn_window_composition_is_told_apart_from_its_neighbours(rng, assert_close):
    # The layer's output at each step equals the reference with exactly the expected earlier
    # steps, and differs from it with one step more or less (or the uncompensated statistics).
    C, shape = 4, (3, 4, 3, 5)
    layer = cbn(C, window=3, burnin=2)
    shadow = CbnShadow(layer)
    theta = None
    for step in range(1, 7):
        pre = preceding(rng, C, theta)
        theta = pre[0]
        x = make_input(rng, shape, np.float64)
        w, b = affine_arrays(layer)
        y = layer(x, *pre)
        history = shadow.history()
        want = shadow.want(x, x, w, b, theta, history)[0]
        assert_close(y, want, what=f"y, step {step}")
        others = [shadow.entries[-k:] for k in range(1, len(shadow.entries) + 1)
                  if shadow.entries[-k:] != history] if shadow.entries else []
        if history:
            stale = [e[:2] + (theta,) + e[3:] for e in history]  # no compensation: delta = 0
            others.append(stale)
        for other in others:
            assert np.abs(y - shadow.want(x, x, w, b, theta, other)[0]).max() > 1e-4, step
        shadow.record(x, *pre)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@FLOAT_DTYPES
def test_cbn_window_one_is_batch_norm(layout, momentum, dtype, rng, assert_close):
    C, shape = 5, (3, 5, 4, 3)
    layer = cbn(C, dtype, window=1, momentum=momentum, layout=layout)
    bn = normkit.BatchNorm2d(C, momentum=momentum, dtype=dtype, layout=layout)
    for a in (layer, bn):
        a.weight[...], a.bias[...] = np.linspace(0.5, 1.5, C), np.linspace(-0.5, 0.5, C)
    theta = None
    for step in range(6):
        training = step != 3  # an eval step in between
        layer.train(training)
        bn.train(training)
        pre = preceding(rng, C, theta)
        theta = pre[0]
        x = make_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        if layout == "NHWC":
            x, dy = to_nhwc(x), to_nhwc(dy)
        y = layer(x, *pre) if training else layer(x)
        assert_close(y, bn(x), dtype, what=f"y, step {step}")
        assert_close(layer.backward(dy), bn.backward(dy), dtype, what=f"dx, step {step}")
        for key in ("weight", "bias"):
            assert_close(layer.grads[key], bn.grads[key], dtype, what=f"d{key}, step {step}")
        for key in ("running_mean", "running_var"):
            assert_close(getattr(layer, key), getattr(bn, key), dtype, what=f"{key}, step {step}")
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked)
        sgd(layer, 0.1)
        sgd(bn, 0.1)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["momentum0.1", "momentum0.5", "cumulative"])
def test_cbn_running_statistics_follow_torchs_rule(momentum, dtype, rng, assert_close):
    # The current batch's mean and unbiased variance, whatever the window; eval steps leave them.
    C, shape = 6, (2, 6, 3, 1)
    layer = cbn(C, dtype, window=3, momentum=momentum)
    running = RunningShadow(C, momentum)
    theta = None
    for step in range(1, 7):
        pre = preceding(rng, C, theta)
        theta = pre[0]
        x = make_input(rng, shape, dtype) * step + step
        layer(x, *pre)
        layer.backward(rng.standard_normal(shape).astype(dtype))
        running.update(*ref.batch_stats(x))
        running.check(layer, dtype, assert_close, f", step {step}")
        layer.eval()
        layer(make_input(rng, shape, dtype))
        running.check(layer, dtype, assert_close, f", eval after step {step}")
        layer.train()


@pytest.mark.parametrize("missing", [("weight",), ("dmean_dweight",), ("dsqmean_dweight",),
                                     ("dmean_dweight", "dsqmean_dweight"),
                                     ("weight", "dmean_dweight", "dsqmean_dweight")],
                         ids=lambda m: "+".join(m))
def test_cbn_training_without_the_weight_or_jacobians_raises_type_error_naming_them(missing, rng,
                                                                                  assert_close):
    C, shape = 4, (3, 4, 2, 3)
    layer = cbn(C, window=3)
    shadow = CbnShadow(layer)
    pre = preceding(rng, C)
    x = make_input(rng, shape, np.float64)
    cbn_train_step(layer, shadow, x, np.ones(shape), pre, np.float64, assert_close)
    before = snapshot(layer)
    kwargs = dict(zip(("weight", "dmean_dweight", "dsqmean_dweight"), preceding(rng, C, pre[0])))
    for name in missing:
        del kwargs[name]
    with pytest.raises(TypeError, match=r"^" + ", ".join(missing) + ":"):
        layer(make_input(rng, shape, np.float64), **kwargs)
    assert_state_unchanged(layer, before)
    # the window is the one before the failed call
    cbn_train_step(layer, shadow, make_input(rng, shape, np.float64), rng.standard_normal(shape),
                   preceding(rng, C, pre[0]), np.float64, assert_close)


def with_shape(shape):
    return lambda rng, theta: rng.normal(size=shape)


@pytest.mark.parametrize("argument, index, make, error, match", [
    pytest.param("dmean_dweight", 1, with_shape((4, 2, 2)), ValueError, "weight shape",
                 id="dmean_dweight-of-another-filter"),
    pytest.param("dsqmean_dweight", 2, with_shape((4, 6)), ValueError, "weight shape",
                 id="dsqmean_dweight-flattened"),
    pytest.param("dsqmean_dweight", 2, with_shape((3, 2, 3)), ValueError, "C = 4",
                 id="dsqmean_dweight-3-filters"),
    pytest.param("dmean_dweight", 1, with_shape(()), ValueError, "C = 4",
                 id="dmean_dweight-scalar"),
    pytest.param("dmean_dweight", 1, lambda rng, t: np.ones((4, 2, 3), np.int64), TypeError,
                 "float", id="dmean_dweight-int"),
    pytest.param("weight", 0, with_shape((5, 2, 3)), ValueError, "C = 4", id="weight-5-filters"),
    pytest.param("weight", 0, lambda rng, t: [[1.0] * 6] * 4, TypeError, "", id="weight-list"),
])
def test_cbn_bad_weight_or_jacobians_raise_naming_the_argument(argument, index, make, error,
                                                               match, rng):
    C, shape = 4, (3, 4, 2, 3)
    layer = cbn(C, window=3)
    pre = preceding(rng, C)
    layer(make_input(rng, shape, np.float64), *pre)
    before = snapshot(layer)
    args = list(preceding(rng, C, pre[0]))
    args[index] = make(rng, pre[0])
    with pytest.raises(error, match=f"{argument}.*{match}"):
        layer(make_input(rng, shape, np.float64), *args)
    assert_state_unchanged(layer, before)


def test_cbn_weight_of_another_fan_in_than_the_windows_raises_naming_weight(rng):
    layer = cbn(4, window=3)
    pre = preceding(rng, 4)
    layer(make_input(rng, (3, 4, 2, 3), np.float64), *pre)
    other = [rng.normal(size=(4, 5)) for _ in range(3)]
    before = snapshot(layer)
    with pytest.raises(ValueError, match="weight"):
        layer(make_input(rng, (3, 4, 2, 3), np.float64), *other)
    assert_state_unchanged(layer, before)


def test_cbn_training_with_one_value_per_channel_raises(rng):
    layer = cbn(4)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(make_input(rng, (1, 4, 1, 1), np.float64), *preceding(rng, 4))
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_cbn_eval_is_batch_norm_with_running_statistics_without_extra_arguments(
        shape, dtype, rng, randomize_affine, assert_close):
    C = shape[1]
    layer = cbn(C, dtype, window=3)
    randomize_affine(layer)
    shadow = CbnShadow(layer)
    theta = None
    for _ in range(3):
        pre = preceding(rng, C, theta)
        theta = pre[0]
        cbn_train_step(layer, shadow, make_input(rng, shape, dtype),
                       rng.standard_normal(shape).astype(dtype), pre, dtype, assert_close)
    layer.eval()
    before = snapshot(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = affine_arrays(layer)
    kw = dict(eps=layer.eps, running_mean=layer.running_mean, running_var=layer.running_var,
              training=False)
    y = layer(x)
    assert_close(y, ref.batch_norm(x, w, b, **kw), dtype, what="y")
    np.testing.assert_array_equal(layer(x, *preceding(rng, C, theta)), y)  # extra args: ignored
    want_dx, dw, db = ref.batch_norm_backward(x, dy, w, b, **kw)
    check_grads(layer, layer.backward(dy), want_dx, {"weight": dw, "bias": db}, dtype,
                assert_close, planes(shape))
    assert_state_unchanged(layer, before)
    # use_batch_stats: BatchNorm on the batch's own (biased) statistics, no window
    layer.use_batch_stats = True
    y = layer(x)
    assert_close(y, ref.batch_norm(x, w, b, layer.eps), dtype, count=planes(shape), what="y (batch)")
    want_dx, dw, db = ref.batch_norm_backward(x, dy, w, b, layer.eps)
    scale = float(np.max(np.abs(ref.f64(dy) * pc(w)) * ref.rstd(x, AXES, layer.eps)))
    check_grads(layer, layer.backward(dy), want_dx, {"weight": dw, "bias": db}, dtype,
                assert_close, planes(shape), scale)
    assert_state_unchanged(layer, before)
    # and the eval calls entered no window: the next training step is the shadow's
    layer.train()
    layer.use_batch_stats = False
    cbn_train_step(layer, shadow, make_input(rng, shape, dtype),
                   rng.standard_normal(shape).astype(dtype), preceding(rng, C, theta), dtype,
                   assert_close, " after eval")


def cbn_prepared(dtype, shape, seed=0, layout="NCHW", **kw):
    """A window-3 layer after one training step (so the next one has an earlier term), and the
    preceding layer's values for the next step."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    layer = cbn(C, dtype, window=3, layout=layout, **kw)
    layer.weight[...] = rng.uniform(0.5, 1.5, C)
    layer.bias[...] = rng.normal(0, 0.5, C)
    pre = preceding(rng, C)
    x = make_input(rng, shape, dtype)
    layer(to_nhwc(x) if layout == "NHWC" else x, *pre)
    return layer, preceding(rng, C, pre[0]), (x, pre)


@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_cbn_half_input_is_computed_in_float32(half, training, use_batch_stats):
    hdt = half_dtype(half)
    shape = (4, 6, 7, 9)
    layer, pre, (x0, pre0) = cbn_prepared(np.float32, shape)
    shadow = CbnShadow(layer)
    shadow.record(x0, *pre0)
    layer.train(training)
    layer.use_batch_stats = use_batch_stats
    rng = np.random.default_rng(1)
    x = (0.5 + rng.standard_normal(shape)).astype(hdt)
    dy = rng.standard_normal(shape).astype(hdt)
    w, b = affine_arrays(layer)
    if training:
        want_y, (want_dx, dw, db), terms, _ = shadow.want(x, dy, w, b, pre[0])
        assert terms == 1
    else:
        kw = dict(eps=layer.eps)
        if not use_batch_stats:
            kw.update(running_mean=layer.running_mean, running_var=layer.running_var, training=False)
        want_y = ref.batch_norm(x, w, b, **kw)
        want_dx, dw, db = ref.batch_norm_backward(x, dy, w, b, **kw)
    check_half_input_all(layer, x, dy, want_y, want_dx, {"weight": dw, "bias": db}, half,
                         pre if training else ())
    assert layer.running_mean.dtype == np.float32


@pytest.mark.parametrize("shape", [pytest.param((3, 5, 4, 7), id="N3-C5-4x7"),
                                   pytest.param((4, 6, 1, 1), id="N4-C6-1x1"),
                                   pytest.param((2, 17, 3, 5), id="N2-C17-3x5")])
def test_cbn_channels_last_matches_channels_first(shape, dtype, rng, assert_close):
    C = shape[1]
    steps = [(make_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype), i < 5)
             for i in range(7)]
    pres, theta = [], None
    for _ in steps:
        pres.append(preceding(rng, C, theta))
        theta = pres[-1][0]

    def make_layer(layout):
        layer = cbn(C, dtype, window=3, burnin=1, layout=layout)
        layer.weight[...] = np.linspace(0.5, 1.5, C)
        layer.bias[...] = np.linspace(-0.3, 0.3, C)
        return layer

    def extra_for(i, layer):
        layer.use_batch_stats = i == 6
        return pres[i] if i < 5 else ()

    check_channels_last_steps(make_layer, steps, dtype, assert_close, extra_for)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_cbn_non_contiguous_input_gives_the_result_of_its_copy(view, training, use_batch_stats,
                                                               dtype, rng, assert_close):
    pre = cbn_prepared(dtype, (5, 6, 7, 5))[1]

    def make_layer():
        return in_mode(cbn_prepared(dtype, (5, 6, 7, 5))[0], training, use_batch_stats)

    check_view_matches_copy_any_state(VIEWS[view](rng, dtype), make_layer, rng, dtype,
                                      assert_close, pre if training else ())


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_cbn_bitwise_identical_for_one_and_two_threads(layout, shape, training, use_batch_stats,
                                                       dtype):
    pre = cbn_prepared(dtype, shape)[1]

    def make_layer():
        return in_mode(cbn_prepared(dtype, shape, layout=layout)[0], training, use_batch_stats)

    check_threads(make_layer, shape, dtype, layout, pre if training else ())


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_cbn_state_dict_keys_follow_the_api_table(affine):
    layer = cbn(6, np.float32, affine=affine)
    keys = [("weight", (6,), np.float32), ("bias", (6,), np.float32)] if affine else []
    keys += [("running_mean", (6,), np.float32), ("running_var", (6,), np.float32),
             ("num_batches_tracked", (), np.int64)]
    assert [(k, v.shape, v.dtype) for k, v in layer.state_dict().items()] == keys
    assert set(layer.parameters()) == ({"weight", "bias"} if affine else set())


@FLOAT_DTYPES
def test_cbn_state_dict_round_trip_into_a_fresh_layer(dtype, rng):
    # window=1: the whole layer is its state_dict
    pre = preceding(rng, 6)
    trained, fresh = cbn(6, dtype, window=1, momentum=0.3), cbn(6, dtype, window=1, momentum=0.3)
    trained.weight[...] = rng.uniform(0.5, 1.5, 6)
    assert_state_dict_round_trip(trained, fresh, rng, (4, 6, 5, 3), dtype, extra=pre)


def test_cbn_a_loaded_layer_refills_its_window(rng, assert_close):
    # The window is not state_dict's: a loaded layer's first steps have fewer earlier terms
    # (its burn-in is over: num_batches_tracked came with the state), and from its window-th
    # step on it gives the bits of the layer it was loaded from.
    C, shape = 4, (3, 4, 3, 5)
    trained = cbn(C, window=3, burnin=2)
    trained.weight[...] = rng.uniform(0.5, 1.5, C)
    theta = None
    for _ in range(4):
        pre = preceding(rng, C, theta)
        theta = pre[0]
        trained(make_input(rng, shape, np.float64), *pre)
        trained.backward(rng.standard_normal(shape))
    fresh = cbn(C, window=3, burnin=2).load_state_dict(trained.state_dict())
    shadow = CbnShadow(fresh)
    shadow.entries = [None] * 4  # the burn-in's count: over
    x = make_input(rng, shape, np.float64)
    np.testing.assert_array_equal(fresh.eval()(x), trained.eval()(x))
    fresh.train()
    trained.train()
    shadow.entries = []
    shadow.burnin = 0
    for step in range(1, 6):
        pre = preceding(rng, C, theta)
        theta = pre[0]
        x, dy = make_input(rng, shape, np.float64), rng.standard_normal(shape)
        y_fresh, terms = cbn_train_step(fresh, shadow, x, dy, pre, np.float64, assert_close)
        assert terms == min(step - 1, 2)
        y = trained(x, *pre)
        trained.backward(dy)
        if step >= 3:
            assert y_fresh.tobytes() == y.tobytes(), step
        else:
            assert not np.allclose(y_fresh, y, atol=1e-4), step
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            np.testing.assert_array_equal(getattr(fresh, key), getattr(trained, key), err_msg=key)


@pytest.mark.parametrize("how", ["load_state_dict", "reset_running_stats"])
def test_cbn_a_loaded_or_reset_layer_forgets_its_old_window(how, rng):
    # The stored steps belong to the run before the load (or reset): compensating the next step
    # with them would mix two runs' weights. The next step is then the current batch alone:
    # BatchNorm's output.
    C, shape = 4, (3, 4, 3, 5)
    layer, other = cbn(C, window=3), cbn(C, window=3)
    theta = None
    for _ in range(3):
        pre = preceding(rng, C, theta)
        theta = pre[0]
        layer(make_input(rng, shape, np.float64), *pre)
        layer.backward(rng.standard_normal(shape))
    if how == "load_state_dict":
        layer.load_state_dict(other.state_dict())
    else:
        layer.reset_running_stats()
    assert int(layer.num_batches_tracked) == 0
    x, pre = make_input(rng, shape, np.float64), preceding(rng, C, theta)
    y = layer(x, *pre)
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + layer.eps), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("argument, kwargs", [
    pytest.param("window", dict(window=0), id="window=0"),
    pytest.param("burnin", dict(burnin=-1), id="burnin=-1"),
    pytest.param("momentum", dict(momentum=2.0), id="momentum=2"),
    pytest.param("eps", dict(eps=-1.0), id="eps=-1"),
])
def test_cbn_bad_hyperparameters_raise_naming_them(argument, kwargs):
    with pytest.raises(ValueError, match=argument):
        normkit.CrossIterationBatchNorm2d(4, **kwargs)


def test_cbn_defaults_and_repr():
    layer = normkit.CrossIterationBatchNorm2d(6)
    assert (layer.window, layer.burnin, layer.eps, layer.momentum) == (4, 0, 1e-5, 0.1)
    assert layer.training and layer.use_batch_stats is False and layer.dtype == np.float32
    assert repr(layer) == ("CrossIterationBatchNorm2d(6, window=4, burnin=0, eps=1e-05, "
                           "momentum=0.1, affine=True)")


# =================================================================================================
# BatchKalmanNorm2d
# =================================================================================================

PRIOR_FEATURES = 4


def bkn(C, prior_features=PRIOR_FEATURES, dtype=np.float64, **kw):
    return normkit.BatchKalmanNorm2d(C, prior_features, dtype=dtype, **kw)


def random_prior(rng, P=PRIOR_FEATURES, var=None):
    return rng.normal(0, 1, P), (rng.uniform(0.5, 1.5, P) if var is None else np.full(P, var))


def bkn_want(layer, x, dy, prior):
    """(y, posterior, dx, grads, used_prior, dx_scale) of the reference, training step."""
    pm, pv = (None, None) if prior is None else prior
    args = (layer.weight, layer.bias, layer.A, pm, pv, layer.gain, layer.eps)
    y, mu, var, used = ref.batch_kalman_norm(x, *args)
    g = ref.batch_kalman_norm_backward(x, dy, *args)
    grads = affine_grads(layer, g["weight"], g["bias"])
    grads["A"] = np.zeros(layer.A.shape) if prior is None else g["A"]
    if prior is not None:
        grads.update(prior_mean=g["prior_mean"], prior_var=g["prior_var"])
    w = affine_arrays(layer)[0]
    scale = float(np.max(np.abs(ref.f64(dy) * pc(w)) / pc(np.sqrt(var + layer.eps))))
    return y, (mu, var), g["x"], grads, used, scale


def check_posterior(layer, want, dtype, assert_close):
    assert isinstance(layer.posterior, tuple) and len(layer.posterior) == 2
    for got, w, what in zip(layer.posterior, want, ("mean", "var")):
        assert np.shape(got) == (layer.num_features,)
        assert_close(got, w, dtype, what=f"posterior {what}")


PRIORS = [pytest.param("none", 0.9, id="no-prior"), pytest.param("used", 0.9, id="prior-gain0.9"),
          pytest.param("used", 0.3, id="prior-gain0.3"),
          pytest.param("discarded", 0.9, id="prior-discarded")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prior_kind, gain", PRIORS)
@AFFINE
def test_bkn_training_matches_the_reference(shape, prior_kind, gain, affine, dtype, rng,
                                            randomize_affine, assert_close):
    C = shape[1]
    layer = bkn(C, dtype=dtype, gain=gain, affine=affine)
    if affine:
        randomize_affine(layer)  # weight, bias and A
    else:
        assert layer.weight is None and layer.bias is None and set(layer.parameters()) == {"A"}
        layer.A[...] = rng.normal(0, 0.5, layer.A.shape)
    running = RunningShadow(C, 0.1)
    for step in range(1, 4):
        prior = None if prior_kind == "none" else random_prior(rng)
        if prior_kind != "none":  # var_pred ~ 0.1 (kept for every shape here), or ~1e4
            prior = (prior[0], prior[1] * (1e4 if prior_kind == "discarded" else 0.1))
        x = make_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        want_y, post, want_dx, want_grads, used, scale = bkn_want(layer, x, dy, prior)
        assert used == (prior_kind == "used")
        count = planes(shape)
        y = layer(x, prior)
        assert y.dtype == dtype and y.shape == shape
        assert_close(y, want_y, dtype, count=count, what=f"y, step {step}")
        check_posterior(layer, post, dtype, assert_close)
        check_grads(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close, count, scale)
        assert layer.grads["A"].dtype == dtype
        if prior is not None:
            assert layer.grads["prior_mean"].shape == layer.grads["prior_var"].shape == (PRIOR_FEATURES,)
        running.update(*post)  # the posterior, no unbiased factor
        running.check(layer, dtype, assert_close, f", step {step}")
        sgd(layer, 0.05)


def test_bkn_chain_gradient_through_the_posterior_equals_finite_differences(rng):
    # x1 -> bkn1 (prior p0 through A1) -> y1 -> x2 = tanh(y1) -> bkn2 (prior bkn1.posterior
    # through A2) -> y2, L = sum(y1 dy1) + sum(y2 dy2). bkn2.backward, then bkn1.backward with
    # dy1 + tanh'(y1) dx2 and posterior_grad = bkn2's prior gradients: every gradient of L.
    C, shape = 3, (2, 3, 2, 3)
    bkn1, bkn2 = bkn(C, 4, gain=0.7), bkn(C, C, gain=0.6)
    for layer in (bkn1, bkn2):
        layer.weight[...] = rng.uniform(0.5, 1.5, C)
        layer.bias[...] = rng.normal(0, 0.5, C)
        layer.A[...] = rng.normal(0, 0.4, layer.A.shape)
    x1 = make_input(rng, shape, np.float64)
    p0 = random_prior(rng, 4)
    dy1, dy2 = rng.standard_normal(shape), rng.standard_normal(shape)

    def loss():
        y1 = bkn1(x1, p0)
        y2 = bkn2(np.tanh(y1), bkn1.posterior)
        return float(np.sum(y1 * dy1) + np.sum(y2 * dy2))

    wrt = {"x1": x1, "prior_mean": p0[0], "prior_var": p0[1]}
    wrt.update({f"{k}1": v for k, v in bkn1.parameters().items()})
    wrt.update({f"{k}2": v for k, v in bkn2.parameters().items()})
    numerical = {k: ref.numerical_gradient(loss, v) for k, v in wrt.items()}

    y1 = bkn1(x1, p0)
    x2 = np.tanh(y1)
    post1 = bkn1.posterior
    bkn2(x2, post1)
    for layer, x, prior in ((bkn1, x1, p0), (bkn2, x2, post1)):  # the guard kept both predictions
        assert ref.batch_kalman_norm(x, layer.weight, layer.bias, layer.A, *prior, layer.gain)[3]
    dx2 = bkn2.backward(dy2)
    g2 = dict(bkn2.grads)
    dx1 = bkn1.backward(dy1 + dx2 * (1 - x2 ** 2), posterior_grad=(g2["prior_mean"], g2["prior_var"]))
    analytic = {"x1": dx1, "prior_mean": bkn1.grads["prior_mean"], "prior_var": bkn1.grads["prior_var"]}
    analytic.update({f"{k}1": bkn1.grads[k] for k in bkn1.parameters()})
    analytic.update({f"{k}2": g2[k] for k in bkn2.parameters()})
    for name in numerical:
        _assert_close(analytic[name], numerical[name], tol=FD_TOL, what=f"d{name}")
    # the posterior's path matters: without posterior_grad dx1 is another
    bkn1(x1, p0)
    without = bkn1.backward(dy1 + dx2 * (1 - x2 ** 2))
    assert np.abs(without - dx1).max() > 1e-3


@pytest.mark.parametrize("shape", [pytest.param((3, 4, 2, 3), id="N3-C4-2x3"),
                                   pytest.param((2, 1, 3, 2), id="N2-C1-3x2")])
@pytest.mark.parametrize("with_prior", [False, True], ids=["no-prior", "prior"])
def test_bkn_backward_equals_finite_differences(shape, with_prior, rng, randomize_affine):
    # One layer: x, weight, bias, A and the prior against central differences of sum(y dy).
    layer = bkn(shape[1], 3, gain=0.8)
    randomize_affine(layer)
    prior = random_prior(rng, 3) if with_prior else None
    x = make_input(rng, shape, np.float64)
    dy = rng.standard_normal(shape)

    def loss():
        return float(np.sum(layer(x, prior) * dy))

    wrt = {"x": x, **layer.parameters()}
    if with_prior:
        wrt.update(prior_mean=prior[0], prior_var=prior[1])
    numerical = {k: ref.numerical_gradient(loss, v) for k, v in wrt.items()}
    layer(x, prior)
    analytic = {"x": layer.backward(dy), **layer.grads}
    assert set(analytic) == set(numerical)
    for name in numerical:
        _assert_close(analytic[name], numerical[name], tol=FD_TOL, what=f"d{name}")
    if not with_prior:
        assert not layer.grads["A"].any()


@pytest.mark.parametrize("prior_var, used", [
    ([100.0, 100.0, 100.0], False), ([50.0, 150.0, 100.0], False),
    ([100.0, 100.0, 99.99], True), ([250.0, 25.0, 24.0], True)],
    ids=["mean-ratio-exactly-100", "mean-100-uneven", "mean-just-below", "one-channel-over-100"])
def test_bkn_guard_discards_the_prediction_at_a_mean_ratio_of_100(prior_var, used, dtype,
                                                                  assert_close):
    # Each channel's entries are +-1: mu_B = 0, var_B = 1 exactly; A = I: var_pred = prior_var.
    x = np.tile(np.array([1.0, -1.0, -1.0, 1.0]).reshape(4, 1, 1, 1), (1, 3, 1, 1)).astype(dtype)
    layer = bkn(3, 3, dtype, gain=0.5)
    pm, pv = np.array([0.5, -0.5, 0.25]), np.array(prior_var)
    dy = np.arange(12.0).reshape(x.shape).astype(dtype)
    y = layer(x, (pm, pv))
    layer.backward(dy)
    if used:
        check_posterior(layer, (0.5 * pm, 0.5 * pv + 0.5 + 0.25 * pm ** 2), dtype, assert_close)
        assert np.any(layer.grads["A"]) and np.any(layer.grads["prior_var"])
    else:
        np.testing.assert_array_equal(layer.posterior[0], np.zeros(3))
        np.testing.assert_array_equal(layer.posterior[1], np.ones(3))
        assert_close(y, ref.batch_norm(x, eps=layer.eps), dtype, what="y")
        for key in ("A", "prior_mean", "prior_var"):
            assert not np.any(layer.grads[key]), f"d{key} should be zero"


@FLOAT_DTYPES
def test_bkn_without_prior_is_batch_norm_with_a_biased_posterior(dtype, rng, assert_close):
    C, shape = 5, (3, 5, 4, 3)
    layer, bn = bkn(C, 3, dtype), normkit.BatchNorm2d(C, dtype=dtype)
    for a in (layer, bn):
        a.weight[...], a.bias[...] = np.linspace(0.5, 1.5, C), np.linspace(-0.5, 0.5, C)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), bn(x), dtype, what="y")
    assert_close(layer.backward(dy), bn.backward(dy), dtype, what="dx")
    assert set(layer.grads) == {"weight", "bias", "A"} and not layer.grads["A"].any()
    for key in ("weight", "bias"):
        assert_close(layer.grads[key], bn.grads[key], dtype, what=f"d{key}")
    x64 = ref.f64(x)
    check_posterior(layer, (x64.mean(axis=AXES), x64.var(axis=AXES)), dtype, assert_close)
    assert_close(layer.running_mean, bn.running_mean, dtype, what="running_mean")
    # running_var: the EMA of the biased posterior variance, not BatchNorm's unbiased one
    assert_close(layer.running_var, 0.9 + 0.1 * x64.var(axis=AXES), dtype, what="running_var")
    assert not np.allclose(layer.running_var, bn.running_var, rtol=0, atol=1e-4)
    # gain 0 with a prior: the same BatchNorm, and zero gradients for A and the prior
    layer.gain = 0.0
    assert_close(layer(x, random_prior(rng, 3)), bn(x), dtype, what="y, gain 0")
    layer.backward(dy)
    for key in ("A", "prior_mean", "prior_var"):
        assert not np.any(layer.grads[key]), key


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["momentum0.1", "momentum0.5", "cumulative"])
def test_bkn_running_statistics_are_an_ema_of_the_posterior(momentum, dtype, rng, assert_close):
    C, shape = 6, (2, 6, 3, 1)
    layer = bkn(C, dtype=dtype, momentum=momentum)
    layer.A[...] = rng.normal(0, 0.5, layer.A.shape)
    running = RunningShadow(C, momentum)
    for step in range(1, 7):
        prior = random_prior(rng) if step % 3 else None
        x = make_input(rng, shape, dtype) * step + step
        layer(x, prior)
        post = bkn_want(layer, x, x, prior)[1]
        running.update(*post)
        running.check(layer, dtype, assert_close, f", step {step}")
        layer.eval()
        layer(make_input(rng, shape, dtype), prior)
        running.check(layer, dtype, assert_close, f", eval after step {step}")
        layer.train()


@pytest.mark.parametrize("shape", SHAPES)
def test_bkn_eval_is_batch_norm_with_running_statistics_and_ignores_the_prior(
        shape, dtype, rng, randomize_affine, assert_close):
    C = shape[1]
    layer = bkn(C, dtype=dtype)
    randomize_affine(layer)
    for _ in range(3):
        layer(make_input(rng, shape, dtype), random_prior(rng))
        layer.backward(rng.standard_normal(shape).astype(dtype))
    layer.eval()
    before = snapshot(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = affine_arrays(layer)
    kw = dict(eps=layer.eps, running_mean=layer.running_mean, running_var=layer.running_var,
              training=False)
    prior = random_prior(rng)
    y = layer(x, prior)
    assert_close(y, ref.batch_norm(x, w, b, **kw), dtype, what="y")
    np.testing.assert_array_equal(layer(x), y)
    check_posterior(layer, (layer.running_mean, layer.running_var), dtype, assert_close)
    want_dx, dw, db = ref.batch_norm_backward(x, dy, w, b, **kw)
    layer(x, prior)
    check_grads(layer, layer.backward(dy), want_dx,
                {"weight": dw, "bias": db, "A": np.zeros(layer.A.shape),
                 "prior_mean": np.zeros(PRIOR_FEATURES), "prior_var": np.zeros(PRIOR_FEATURES)},
                dtype, assert_close, planes(shape))
    assert_state_unchanged(layer, before)
    # use_batch_stats: BatchNorm on the batch's own statistics, the posterior biased batch ones
    layer.use_batch_stats = True
    y = layer(x, prior)
    assert_close(y, ref.batch_norm(x, w, b, layer.eps), dtype, count=planes(shape), what="y (batch)")
    x64 = ref.f64(x)
    check_posterior(layer, (x64.mean(axis=AXES), x64.var(axis=AXES)), dtype, assert_close)
    want_dx, dw, db = ref.batch_norm_backward(x, dy, w, b, layer.eps)
    scale = float(np.max(np.abs(ref.f64(dy) * pc(w)) * ref.rstd(x, AXES, layer.eps)))
    check_grads(layer, layer.backward(dy), want_dx,
                {"weight": dw, "bias": db, "A": np.zeros(layer.A.shape),
                 "prior_mean": np.zeros(PRIOR_FEATURES), "prior_var": np.zeros(PRIOR_FEATURES)},
                dtype, assert_close, planes(shape), scale)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("prior, error, match", [
    pytest.param((np.ones(3), np.ones(4)), ValueError, r"prior: .*mean of shape \(4,\)", id="mean-of-3"),
    pytest.param((np.ones(4), np.ones((4, 1))), ValueError, r"prior: .*var of shape \(4,\)", id="var-4x1"),
    pytest.param((np.ones(4),), TypeError, "prior: ", id="one-array"),
    pytest.param(np.ones((2, 4)), TypeError, "prior: ", id="an-array"),
    pytest.param((np.ones(4), np.array(["a"] * 4)), TypeError, "prior: ", id="strings"),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bkn_bad_prior_raises_naming_prior_and_changes_no_state(prior, error, match, training, rng):
    layer = bkn(3).train(training)
    layer(make_input(rng, (3, 3, 2, 2), np.float64), random_prior(rng))
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer(make_input(rng, (3, 3, 2, 2), np.float64), prior)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("posterior_grad, error", [
    ((np.ones(2), np.ones(3)), ValueError), ((np.ones(3), np.ones(4)), ValueError),
    ((np.ones(3),), TypeError), (np.ones((2, 3)), TypeError)],
    ids=["dmean-of-2", "dvar-of-4", "one-array", "an-array"])
def test_bkn_bad_posterior_grad_raises_naming_it(posterior_grad, error, rng):
    layer = bkn(3)
    layer(make_input(rng, (3, 3, 2, 2), np.float64), random_prior(rng))
    with pytest.raises(error, match="posterior_grad"):
        layer.backward(np.ones((3, 3, 2, 2)), posterior_grad=posterior_grad)
    layer.backward(np.ones((3, 3, 2, 2)))  # a good backward still answers the forward


@pytest.mark.parametrize("argument, kwargs, error", [
    pytest.param("gain", dict(gain=1.5), ValueError, id="gain=1.5"),
    pytest.param("gain", dict(gain=-0.1), ValueError, id="gain=-0.1"),
    pytest.param("prior_features", dict(prior_features=0), ValueError, id="prior_features=0"),
    pytest.param("prior_features", dict(prior_features=2.5), TypeError, id="prior_features=2.5"),
    pytest.param("momentum", dict(momentum=2.0), ValueError, id="momentum=2"),
])
def test_bkn_bad_hyperparameters_raise_naming_them(argument, kwargs, error):
    with pytest.raises(error, match=argument):
        normkit.BatchKalmanNorm2d(4, **kwargs)
    layer = normkit.BatchKalmanNorm2d(4, gain=0.4)
    if argument == "gain":
        with pytest.raises(error, match="gain"):
            layer.gain = kwargs["gain"]
        assert layer.gain == 0.4


def test_bkn_training_with_one_value_per_channel_raises(rng):
    layer = bkn(4)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(make_input(rng, (1, 4, 1, 1), np.float64), random_prior(rng))
    assert int(layer.num_batches_tracked) == 0 and layer.posterior is None
    with pytest.raises(StateError, match="forward"):
        layer.backward(np.ones((1, 4, 1, 1)))


def bkn_prepared(dtype, shape, seed=0, layout="NCHW", **kw):
    """A layer with random parameters after two training steps, and a prior for the next."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    layer = bkn(C, dtype=dtype, layout=layout, **kw)
    layer.weight[...] = rng.uniform(0.5, 1.5, C)
    layer.bias[...] = rng.normal(0, 0.5, C)
    layer.A[...] = rng.normal(0, 0.5, layer.A.shape)
    for _ in range(2):
        x = make_input(rng, shape, dtype)
        layer(to_nhwc(x) if layout == "NHWC" else x, random_prior(rng))
    return layer, random_prior(rng)


@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_bkn_half_input_is_computed_in_float32(half, training, use_batch_stats):
    hdt = half_dtype(half)
    shape = (4, 6, 7, 9)
    layer, prior = bkn_prepared(np.float32, shape)
    layer.train(training)
    layer.use_batch_stats = use_batch_stats
    rng = np.random.default_rng(1)
    x = (0.5 + rng.standard_normal(shape)).astype(hdt)
    dy = rng.standard_normal(shape).astype(hdt)
    if training:
        want_y, _, want_dx, want_grads, used, _ = bkn_want(layer, x, dy, prior)
        assert used
    else:
        w, b = affine_arrays(layer)
        kw = dict(eps=layer.eps)
        if not use_batch_stats:
            kw.update(running_mean=layer.running_mean, running_var=layer.running_var, training=False)
        want_y = ref.batch_norm(x, w, b, **kw)
        want_dx, dw, db = ref.batch_norm_backward(x, dy, w, b, **kw)
        want_grads = {"weight": dw, "bias": db, "A": np.zeros(layer.A.shape),
                      "prior_mean": np.zeros(PRIOR_FEATURES), "prior_var": np.zeros(PRIOR_FEATURES)}
    # check_half_input_all wants float32 gradients: A and the affine are; the prior's are float64
    y = layer(x, prior)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == hdt
    assert set(layer.grads) == set(want_grads)
    assert all(layer.grads[k].dtype == np.float32 for k in ("weight", "bias", "A"))
    close_at_scale(y, want_y, HALF_EPS[half], "y")
    close_at_scale(dx, want_dx, HALF_EPS[half], "dx")
    for name, want in want_grads.items():
        close_at_scale(layer.grads[name], want, 1e-5, f"d{name}")


@pytest.mark.parametrize("shape", [pytest.param((3, 5, 4, 7), id="N3-C5-4x7"),
                                   pytest.param((4, 6, 1, 1), id="N4-C6-1x1"),
                                   pytest.param((2, 17, 3, 5), id="N2-C17-3x5")])
def test_bkn_channels_last_matches_channels_first(shape, dtype, rng, assert_close):
    C = shape[1]
    steps = [(make_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype), i < 4)
             for i in range(6)]
    priors = [random_prior(rng) if i != 1 else None for i in range(6)]
    A = rng.normal(0, 0.5, (C, PRIOR_FEATURES))
    def make_layer(layout):
        layer = bkn(C, dtype=dtype, layout=layout)
        layer.weight[...] = np.linspace(0.5, 1.5, C)
        layer.bias[...] = np.linspace(-0.3, 0.3, C)
        layer.A[...] = A
        return layer

    def extra_for(i, layer):
        layer.use_batch_stats = i == 5
        return (priors[i],)

    def after(i, first, last):
        for got, want in zip(last.posterior, first.posterior):
            assert_close(got, want, dtype, what=f"NHWC posterior, step {i}")

    check_channels_last_steps(make_layer, steps, dtype, assert_close, extra_for, after)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_bkn_non_contiguous_input_gives_the_result_of_its_copy(view, training, use_batch_stats,
                                                               dtype, rng, assert_close):
    prior = bkn_prepared(dtype, (5, 6, 7, 5))[1]

    def make_layer():
        return in_mode(bkn_prepared(dtype, (5, 6, 7, 5))[0], training, use_batch_stats)

    # the view check wants grads keyed by the parameters: no prior in this one
    check_view_matches_copy_any_state(VIEWS[view](rng, dtype), make_layer, rng, dtype,
                                      assert_close)
    strided, contiguous = make_layer(), make_layer()
    x = VIEWS[view](np.random.default_rng(5), dtype)
    dy = np.random.default_rng(6).standard_normal(x.shape).astype(dtype)
    assert_close(strided(x, prior), contiguous(np.ascontiguousarray(x), prior), dtype, what="y")
    assert_close(strided.backward(dy), contiguous.backward(dy), dtype, what="dx")
    for key, g in contiguous.grads.items():
        assert_close(strided.grads[key], g, dtype, what=f"d{key}")
    for got, want in zip(strided.posterior, contiguous.posterior):
        assert_close(got, want, dtype, what="posterior")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_bkn_bitwise_identical_for_one_and_two_threads(layout, shape, training, use_batch_stats,
                                                       dtype):
    prior = bkn_prepared(dtype, shape)[1]

    def make_layer():
        return in_mode(bkn_prepared(dtype, shape, layout=layout)[0], training, use_batch_stats)

    check_threads(make_layer, shape, dtype, layout, (prior,))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_bkn_state_dict_keys_follow_the_api_table(affine):
    layer = bkn(6, 3, np.float32, affine=affine)
    keys = [("weight", (6,), np.float32), ("bias", (6,), np.float32)] if affine else []
    keys += [("A", (6, 3), np.float32), ("running_mean", (6,), np.float32),
             ("running_var", (6,), np.float32), ("num_batches_tracked", (), np.int64)]
    assert [(k, v.shape, v.dtype) for k, v in layer.state_dict().items()] == keys
    assert set(layer.parameters()) == ({"weight", "bias", "A"} if affine else {"A"})
    np.testing.assert_array_equal(layer.A, np.eye(6, 3))
    assert bkn(4, None).A.shape == (4, 4) and bkn(4, None).prior_features == 4


@FLOAT_DTYPES
def test_bkn_state_dict_round_trip_into_a_fresh_layer(dtype, rng):
    layer, prior = bkn_prepared(dtype, (4, 6, 5, 3), momentum=0.3)
    fresh = bkn(6, dtype=dtype, momentum=0.3)
    assert_state_dict_round_trip(layer, fresh, rng, (4, 6, 5, 3), dtype, extra=(prior,))
    np.testing.assert_array_equal(fresh.A, layer.A)


def test_bkn_defaults_and_repr():
    layer = normkit.BatchKalmanNorm2d(6)
    assert (layer.prior_features, layer.gain, layer.eps, layer.momentum) == (6, 0.9, 1e-5, 0.1)
    assert layer.training and layer.use_batch_stats is False and layer.dtype == np.float32
    assert layer.posterior is None
    assert repr(layer) == ("BatchKalmanNorm2d(6, prior_features=6, gain=0.9, eps=1e-05, "
                           "momentum=0.1, affine=True)")


# =================================================================================================
# Empty batches with the extra arguments (test_variants_empty.py runs MABN and BKN without them)
# =================================================================================================

EMPTY_SHAPES = [pytest.param((0, 4, 3, 3), id="no-samples"),
                pytest.param((2, 4, 0, 3), id="no-pixels")]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_cbn_empty_batch_changes_no_state_and_enters_no_window(shape, mode, rng, assert_close):
    C, full = 4, (3, 4, 3, 3)
    layer = cbn(C, window=3)
    shadow = CbnShadow(layer)
    pre = preceding(rng, C)
    cbn_train_step(layer, shadow, make_input(rng, full, np.float64), rng.standard_normal(full),
                   pre, np.float64, assert_close)
    layer.train(mode == "train")
    before = snapshot(layer)
    args = preceding(rng, C, pre[0]) if mode == "train" else ()
    y = layer(np.zeros(shape), *args)
    dx = layer.backward(np.zeros(shape))
    assert y.shape == dx.shape == shape
    assert set(layer.grads) == {"weight", "bias"} and not any(g.any() for g in layer.grads.values())
    assert_state_unchanged(layer, before)
    layer.train()
    cbn_train_step(layer, shadow, make_input(rng, full, np.float64), rng.standard_normal(full),
                   preceding(rng, C, pre[0]), np.float64, assert_close, " after the empty batch")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_bkn_empty_batch_with_a_prior_changes_no_state(shape, mode, rng):
    layer = bkn(4).train(mode == "train")
    before = snapshot(layer)
    y = layer(np.zeros(shape), random_prior(rng))
    dx = layer.backward(np.zeros(shape), posterior_grad=(np.ones(4), np.ones(4)))
    assert y.shape == dx.shape == shape
    assert set(layer.parameters()) <= set(layer.grads)
    assert not any(np.any(g) for g in layer.grads.values())
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_mabn_empty_batch_after_steps_leaves_the_rings_and_iters(shape, mode, rng, assert_close):
    full = (3, 4, 3, 3)
    layer = mabn(4, buffer_size=2, warmup_iters=0)
    shadow = mabn_shadow(layer)
    for _ in range(3):
        mabn_train_step(layer, shadow, make_input(rng, full, np.float64), rng.standard_normal(full),
                        np.float64, assert_close)
    layer.train(mode == "train")
    before = snapshot(layer)
    y = layer(np.zeros(shape))
    dx = layer.backward(np.zeros(shape))
    assert y.shape == dx.shape == shape
    assert set(layer.grads) == {"weight", "bias"} and not any(g.any() for g in layer.grads.values())
    assert_state_unchanged(layer, before)
    layer.train()
    mabn_train_step(layer, shadow, make_input(rng, full, np.float64), rng.standard_normal(full),
                    np.float64, assert_close, " after the empty batch")
    mabn_assert_state(layer, shadow, np.float64, assert_close)
