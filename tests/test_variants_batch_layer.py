"""BatchLayerNorm2d against the float64 reference (reference.py: batch_layer_norm and its
backward, themselves checked by finite differences in test_reference_batch_free.py).

Spec (Ziaee and Cano, arXiv 2209.08898, on the axes of its reference implementation):
- x_B standardized per (c, h, w) over the N samples, x_F per (n, h, w) over the C channels, both
  variances biased, eps inside the square root;
  y = weight_c ((1/B - 1e-4) x_F + (1 - 1/B - 1e-4) x_B)/sqrt(C) + bias_c, B = batch_size (the
  configured number, not the input's N).
- running_mean, running_var of shape (C, H, W) are made at the first non-empty forward, of its
  input's (C, H, W), as zeros and ones; a training step updates them as torch's BatchNorm does
  (EMA with momentum, the variance unbiased with the batch's N/(N - 1)); eval normalizes the batch
  part with them (constants in the backward); `use_batch_stats = True` after eval() uses the
  batch's statistics and leaves the running ones alone. The feature part is always the sample's.
- A later input of another (C, H, W) raises ValueError, training with N = 1 raises ValueError;
  load_state_dict takes running statistics of any (C, H, W) with the layer's C (both of one shape)
  and sets the shape later inputs must have.
- 4-D NCHW input only; float16/bfloat16 input to a float32 layer is computed in float32.

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import normkit
import reference as ref
from normkit._checks import StateError
from variant_checks import (HALF_EPS, VIEWS, assert_bitwise_same_threads_any_state,
                            assert_state_dict_round_trip, assert_state_unchanged,
                            check_all_gradients, check_half_input_all,
                            check_view_matches_copy_any_state, half_dtype, make_input, shape_id,
                            snapshot)

RUNNING = ("running_mean", "running_var")


def bln(C, batch_size, dtype=np.float64, **kw):
    return normkit.BatchLayerNorm2d(C, batch_size, dtype=dtype, **kw)


def randomized(layer, rng):
    """Weight around 1 and bias around 0, so that the affine is not the identity."""
    layer.weight[...] = rng.uniform(0.5, 1.5, layer.num_features)
    layer.bias[...] = rng.normal(0.0, 0.5, layer.num_features)
    return layer


def random_running(rng, chw):
    return rng.normal(0.0, 0.5, chw), rng.uniform(0.5, 2.0, chw)


def load_running(layer, rng, chw):
    """Random running statistics of shape chw through load_state_dict (which makes the buffers of
    a fresh layer); returns them in float64, as the layer holds them."""
    mean, var = random_running(rng, chw)
    state = {"weight": layer.weight, "bias": layer.bias, "running_mean": mean, "running_var": var}
    layer.load_state_dict(state)
    assert layer.running_mean.shape == layer.running_var.shape == tuple(chw)
    return running_of(layer)


def running_of(layer):
    return ref.f64(layer.running_mean).copy(), ref.f64(layer.running_var).copy()


def bln_reference(layer, x, dy=None, running=None):
    """running: (mean, var) of shape (C, H, W) for the batch part, or None for batch statistics."""
    mean, var = (None, None) if running is None else running
    args = (layer.weight, layer.bias, layer.batch_size, layer.eps, mean, var)
    if dy is None:
        return ref.batch_layer_norm(x, *args)
    dx, dw, db = ref.batch_layer_norm_backward(x, dy, *args)
    return dx, {"weight": dw, "bias": db}


def torch_running(x, before, momentum):
    """torch's rule per (c, h, w): mean over N, variance over N unbiased, EMA with momentum."""
    x = ref.f64(x)
    mean, var = x.mean(axis=0), x.var(axis=0, ddof=1)
    return ((1 - momentum) * before[0] + momentum * mean,
            (1 - momentum) * before[1] + momentum * var)


def dx_scale(layer, x, dy, batch_stats):
    """The size of the terms a dx entry is a difference of: a k r_F |w dy| (the feature part,
    which cancels to ~0 for C = 1) plus b k r_B |w dy| (the batch part, ~0 for N = 2)."""
    N, C = x.shape[:2]
    B = float(layer.batch_size)
    a, b, k = 1 / B - 1e-4, 1 - 1 / B - 1e-4, 1 / np.sqrt(C)
    g = np.abs(ref.f64(dy) * ref.f64(layer.weight).reshape(1, -1, 1, 1)) * k
    r_f = ref.rstd(x, (1,), layer.eps)
    r_b = ref.rstd(x, (0,), layer.eps) if batch_stats else 1 / np.sqrt(ref.f64(layer.running_var) + layer.eps)
    return float(np.max(g * (abs(a) * r_f + abs(b) * r_b)))


def reduction_count(shape):
    """The longest reduction: a channel's parameter gradient over (N, H, W)."""
    return max(shape[0] * shape[2] * shape[3], shape[1])


# -- forward and backward against the reference ----------------------------------------------------

SHAPES = [
    pytest.param((3, 5, 4, 3), id="N3-C5-4x3"),
    pytest.param((4, 6, 1, 1), id="N4-C6-1x1-spatial1"),
    pytest.param((3, 1, 5, 4), id="N3-C1-5x4-C1"),
    pytest.param((3, 17, 5, 7), id="N3-C17-5x7-odd"),
    pytest.param((2, 6, 3, 5), id="N2-C6-3x5-N2"),
    pytest.param((4, 40, 9, 11), id="N4-C40-9x11-big"),
    # The core sums 256 rows per call and merges the calls: rows of channels past 256 (the
    # feature statistics), rows of samples past 256 (the batch statistics).
    pytest.param((2, 300, 3, 2), id="N2-C300-3x2-channel-chunks"),
    pytest.param((260, 3, 2, 3), id="N260-C3-2x3-sample-chunks"),
    # Blocks narrowed to keep a sample's rows and the block's term in L2 (three of 48 columns),
    # and batch columns in several spans of 2048.
    pytest.param((2, 200, 12, 12), id="N2-C200-12x12-budget-blocks"),
]

# (training, use_batch_stats): training, eval with the running statistics, eval with the batch's.
MODES = [pytest.param(True, False, id="train"), pytest.param(False, False, id="eval"),
         pytest.param(False, True, id="eval-batch-stats")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch_size", [1, 4, 32], ids=["B1", "B4", "B32"])
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_forward_and_backward_match_the_reference(shape, batch_size, training, use_batch_stats,
                                                  dtype, rng, assert_close):
    layer = randomized(bln(shape[1], batch_size, dtype), rng)
    before = load_running(layer, rng, shape[1:])
    layer.train(training)
    layer.use_batch_stats = use_batch_stats
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    batch_stats = training or use_batch_stats
    running = None if batch_stats else before
    count = reduction_count(shape)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, bln_reference(layer, x, running=running), dtype, count=count, what="y")
    want_dx, want_grads = bln_reference(layer, x, dy, running=running)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close, count,
                        dx_scale(layer, x, dy, batch_stats))
    after = torch_running(x, before, layer.momentum) if training else before
    assert layer.running_mean.dtype == layer.running_var.dtype == dtype
    assert_close(layer.running_mean, after[0], dtype, what="running_mean")
    assert_close(layer.running_var, after[1], dtype, what="running_var")


def test_batch_size_is_the_configured_one_not_the_inputs_n(rng, assert_close):
    # The mix depends on batch_size alone: the same x through layers of B = 2 and B = 32 differs
    # by the mix's change; and batch_size is an attribute read at every call.
    x = make_input(rng, (4, 5, 3, 3), np.float64)
    layer = randomized(bln(5, 2), rng)
    y2 = layer(x)
    layer.batch_size = 32
    y32 = layer(x)
    assert_close(y2, ref.batch_layer_norm(x, layer.weight, layer.bias, 2, layer.eps), np.float64,
                 what="B=2")
    assert_close(y32, bln_reference(layer, x), np.float64, what="B=32")
    assert not np.allclose(y2, y32, atol=1e-3)


@pytest.mark.parametrize("shape, training", [
    pytest.param((3, 4, 2, 3), True, id="N3-C4-2x3-train"),
    pytest.param((2, 3, 1, 2), True, id="N2-C3-1x2-train"),
    pytest.param((3, 1, 2, 2), True, id="N3-C1-2x2-train"),
    pytest.param((2, 4, 2, 3), False, id="N2-C4-2x3-eval"),
    pytest.param((1, 3, 2, 2), False, id="N1-C3-2x2-eval"),
])
def test_float64_backward_equals_finite_differences(shape, training, rng,
                                                    check_gradients_by_finite_differences):
    layer = randomized(bln(shape[1], 4), rng)
    load_running(layer, rng, shape[1:])
    layer.train(training)
    check_gradients_by_finite_differences(layer, make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))


# -- running statistics ------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0], ids=["momentum0.1", "momentum0.3", "momentum1"])
@pytest.mark.parametrize("shape", [pytest.param((3, 6, 4, 5), id="N3-C6-4x5"),
                                   pytest.param((2, 17, 3, 1), id="N2-C17-3x1")])
def test_running_statistics_follow_torchs_rule(momentum, shape, dtype, rng, assert_close):
    layer = bln(shape[1], 8, dtype, momentum=momentum)
    assert layer.running_mean is None and layer.running_var is None
    want = (np.zeros(shape[1:]), np.ones(shape[1:]))  # made at the first forward
    for step in range(1, 5):
        x = make_input(rng, shape, dtype) * step + step
        layer(x)
        layer.backward(rng.standard_normal(shape).astype(dtype))  # the backward leaves them alone
        # NumPy spelled out per (c, h, w): mean over the N samples, sum of squares over N - 1
        x64 = ref.f64(x)
        mean = x64.sum(axis=0) / shape[0]
        var = ((x64 - mean) ** 2).sum(axis=0) / (shape[0] - 1)
        want = ((1 - momentum) * want[0] + momentum * mean, (1 - momentum) * want[1] + momentum * var)
        assert layer.running_mean.shape == layer.running_var.shape == shape[1:]
        assert layer.running_mean.dtype == layer.running_var.dtype == dtype
        assert_close(layer.running_mean, want[0], dtype, what=f"running_mean, step {step}")
        assert_close(layer.running_var, want[1], dtype, what=f"running_var, step {step}")
    layer.eval()  # inference normalizes with them and leaves them alone
    x = make_input(rng, shape, dtype)
    assert_close(layer(x), bln_reference(layer, x, running=want), dtype, what="eval y")
    assert_close(layer.running_mean, want[0], dtype, what="running_mean after eval")
    assert_close(layer.running_var, want[1], dtype, what="running_var after eval")


def test_first_forward_makes_zero_and_one_buffers_of_the_inputs_chw(rng):
    layer = bln(3, 4).eval()  # eval: the fresh buffers are what the batch part uses
    x = make_input(rng, (2, 3, 5, 2), np.float64)
    assert list(layer.state_dict()) == ["weight", "bias"]
    y = layer(x)
    np.testing.assert_array_equal(layer.running_mean, np.zeros((3, 5, 2)))
    np.testing.assert_array_equal(layer.running_var, np.ones((3, 5, 2)))
    np.testing.assert_allclose(y, bln_reference(layer, x, running=(np.zeros((3, 5, 2)), np.ones((3, 5, 2)))),
                               rtol=0, atol=1e-12)


def test_use_batch_stats_after_eval_uses_the_batch_and_leaves_running_stats(dtype, rng,
                                                                            assert_close):
    shape = (3, 6, 4, 5)
    layer = randomized(bln(6, 4, dtype), rng)
    for _ in range(2):  # running statistics that are neither 0/1 nor the eval batch's
        layer(make_input(rng, shape, dtype))
    layer.eval()
    layer.use_batch_stats = True
    before = snapshot(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = layer(x)
    assert_close(y, bln_reference(layer, x), dtype, what="y")
    want_dx, want_grads = bln_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close, 1,
                        dx_scale(layer, x, dy, True))
    assert_state_unchanged(layer, before)
    layer.use_batch_stats = False
    y_running = layer(x)
    assert_close(y_running, bln_reference(layer, x, running=running_of(layer)), dtype, what="y (running)")
    assert not np.allclose(y, y_running, atol=1e-3)
    assert_state_unchanged(layer, before)


def test_eval_with_one_sample_is_allowed(rng, assert_close):
    layer = randomized(bln(5, 4), rng)
    running = load_running(layer, rng, (5, 3, 2))
    layer.eval()
    x = make_input(rng, (1, 5, 3, 2), np.float64)
    dy = rng.standard_normal(x.shape)
    assert_close(layer(x), bln_reference(layer, x, running=running), np.float64, what="y")
    want_dx, want_grads = bln_reference(layer, x, dy, running=running)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, np.float64, assert_close)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_empty_batch_makes_no_buffers_and_leaves_existing_ones_alone(training, rng):
    # (test_variants_empty.py runs BLN on a fresh layer, whose state has no buffers to compare.)
    layer = randomized(bln(4, 4), rng).train(training)
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:
        y = layer(np.zeros(shape))
        assert y.shape == layer.backward(np.zeros(shape)).shape == shape
        assert layer.running_mean is None and list(layer.state_dict()) == ["weight", "bias"]
    layer(make_input(rng, (3, 4, 3, 3), np.float64))
    before = snapshot(layer)
    assert layer(np.zeros((0, 4, 3, 3))).shape == (0, 4, 3, 3)
    dx = layer.backward(np.zeros((0, 4, 3, 3)))
    assert dx.shape == (0, 4, 3, 3)
    assert set(layer.grads) == {"weight", "bias"} and not any(np.any(g) for g in layer.grads.values())
    assert_state_unchanged(layer, before)



@pytest.mark.parametrize("N, C, HW", [(2, 3, 0), (2, 0, 4)], ids=["no-positions", "no-channels"])
def test_the_core_steps_take_a_plan_without_elements(N, C, HW):
    # The layer returns before the core for an empty x; the core's steps (the C++ API's too) must
    # still take such a plan: no cells, or cells whose moments are over no channels (NaN), and
    # zero parameter gradients. (Both once divided by zero sizing their column blocks.)
    from normkit import _core, _engine
    plan = _engine.in_layout(_core.plan_per_sample_group(N, HW, C, HW), "NHWC")
    x = np.zeros((N, C, HW), np.float32)
    weight, bias = np.ones(C, np.float32), np.zeros(C, np.float32)
    mean_f, rstd_f, mean_b, var_b, rstd_b = _core.batch_layer_forward(plan, x, 1e-3, 0.1, 0.9, weight, bias,
                                                                      np.empty_like(x))
    assert mean_f.shape == rstd_f.shape == (N * HW,) and mean_b.shape == rstd_b.shape == (C * HW,)
    assert np.isnan(mean_f).all() and np.isnan(rstd_f).all()
    dweight, dbias = _core.batch_layer_backward(plan, x, x, mean_f, rstd_f, mean_b, rstd_b, 0.1, 0.9, True,
                                                weight, np.empty_like(x))
    assert dweight.shape == dbias.shape == (C,) and not dweight.any() and not dbias.any()


# -- state_dict -----------------------------------------------------------------------------------

def test_state_dict_keys_before_and_after_the_first_forward(rng):
    layer = bln(6, 4, np.float32)
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == [("weight", (6,)), ("bias", (6,))]
    assert set(layer.parameters()) == {"weight", "bias"}
    layer(make_input(rng, (3, 6, 5, 7), np.float32))
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == [
        ("weight", (6,)), ("bias", (6,)), ("running_mean", (6, 5, 7)), ("running_var", (6, 5, 7))]
    assert all(v.dtype == np.float32 for v in layer.state_dict().values())
    assert set(layer.parameters()) == {"weight", "bias"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_state_dict_round_trip_into_a_fresh_layer(dtype, rng):
    shape = (4, 6, 5, 3)
    trained = randomized(bln(6, 4, dtype, momentum=0.3), rng)
    fresh = bln(6, 4, dtype, momentum=0.3)
    assert fresh.running_mean is None
    assert_state_dict_round_trip(trained, fresh, rng, shape, dtype)
    assert list(fresh.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert fresh.running_mean.shape == fresh.running_var.shape == shape[1:]
    assert fresh.running_mean.dtype == dtype
    # and an eval output from the loaded buffers alone, without a forward in between
    other = bln(6, 4, dtype, momentum=0.3)
    other.load_state_dict(trained.state_dict())
    x = make_input(rng, shape, dtype)
    np.testing.assert_array_equal(other.eval()(x), trained.eval()(x))


def test_load_state_dict_of_another_chw_sets_the_shape_inputs_must_have(rng, assert_close):
    layer = randomized(bln(4, 4), rng)
    layer(make_input(rng, (3, 4, 5, 5), np.float64))
    running = load_running(layer, rng, (4, 2, 3))
    layer.eval()
    x = make_input(rng, (3, 4, 2, 3), np.float64)
    assert_close(layer(x), bln_reference(layer, x, running=running), np.float64, what="y")
    with pytest.raises(ValueError, match=r"\(4, 2, 3\)"):
        layer(make_input(rng, (3, 4, 5, 5), np.float64))


# -- half input, strides, threads -------------------------------------------------------------------

def prepared(dtype, shape, seed=0, **kw):
    rng = np.random.default_rng(seed)
    layer = randomized(bln(shape[1], 4, dtype, **kw), rng)
    load_running(layer, rng, shape[1:])
    return layer


@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_half_input_is_computed_in_float32(half, training, use_batch_stats):
    hdt = half_dtype(half)
    shape = (4, 6, 7, 9)
    layer = prepared(np.float32, shape).train(training)
    layer.use_batch_stats = use_batch_stats
    rng = np.random.default_rng(1)
    x = (0.5 + rng.standard_normal(shape)).astype(hdt)
    dy = rng.standard_normal(shape).astype(hdt)
    running = None if training or use_batch_stats else running_of(layer)
    want_y = bln_reference(layer, x, running=running)
    want_dx, want_grads = bln_reference(layer, x, dy, running=running)
    check_half_input_all(layer, x, dy, want_y, want_dx, want_grads, half)
    assert layer.running_mean.dtype == np.float32


VIEWS = {**VIEWS, "sample-sliced": lambda rng, dt: make_input(rng, (10, 6, 7, 5), dt)[::2]}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_non_contiguous_input_gives_the_result_of_its_copy(view, training, use_batch_stats, dtype,
                                                           rng, assert_close):
    def make_layer():
        layer = prepared(dtype, (5, 6, 7, 5)).train(training)
        layer.use_batch_stats = use_batch_stats
        return layer

    check_view_matches_copy_any_state(VIEWS[view](rng, dtype), make_layer, rng, dtype, assert_close)


# The core works in blocks of (h, w) columns, half the plane's and at most 512: (5, 6, 55, 57)
# has 3135 columns, seven blocks; (3, 70, 23, 25) 575 columns, two blocks of 288 and 287.
THREAD_SHAPES = [pytest.param((5, 6, 55, 57), id="N5-C6-55x57"),
                 pytest.param((3, 70, 23, 25), id="N3-C70-23x25")]


@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("training, use_batch_stats", MODES)
def test_bitwise_identical_for_one_and_two_threads(shape, training, use_batch_stats, dtype):
    def make_layer():
        layer = prepared(dtype, shape).train(training)
        layer.use_batch_stats = use_batch_stats
        return layer

    assert_bitwise_same_threads_any_state(make_layer, shape, dtype)


# -- what is rejected ---------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("other", [(3, 4, 5, 6), (3, 4, 6, 5), (3, 4, 1, 1), (3, 4, 30, 1)],
                         ids=shape_id)
def test_another_chw_after_the_first_forward_raises_and_changes_nothing(other, training, rng):
    layer = randomized(bln(4, 4), rng).train(training)
    x = make_input(rng, (3, 4, 5, 5), np.float64)
    y = layer(x)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"expected \(C, H, W\) = \(4, 5, 5\).*got input of shape"):
        layer(make_input(rng, other, np.float64))
    assert_state_unchanged(layer, before)
    # the last good forward is still the one a backward answers
    assert layer.backward(np.ones_like(y)).shape == x.shape


def test_training_with_one_sample_raises_and_makes_no_buffers(rng):
    layer = bln(4, 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(make_input(rng, (1, 4, 3, 3), np.float64))
    assert layer.running_mean is None and layer.running_var is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    with pytest.raises(StateError):
        layer.backward(np.ones((1, 4, 3, 3)))


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                        (True, TypeError), ("4", TypeError), (None, TypeError)],
                         ids=["0", "-3", "2.5", "True", "str", "None"])
def test_bad_batch_size_raises_naming_it(bad, error):
    with pytest.raises(error, match="batch_size"):
        normkit.BatchLayerNorm2d(4, bad)
    layer = normkit.BatchLayerNorm2d(4, 8)
    with pytest.raises(error, match="batch_size"):
        layer.batch_size = bad
    assert layer.batch_size == 8


def test_batch_size_of_numpy_integer_is_accepted():
    layer = normkit.BatchLayerNorm2d(4, np.int64(16))
    assert layer.batch_size == 16 and type(layer.batch_size) is int


def bad_state(C, mean_shape, var_shape):
    return {"weight": np.ones(C), "bias": np.zeros(C), "running_mean": np.zeros(mean_shape),
            "running_var": np.ones(var_shape)}


BAD_STATES = [
    pytest.param(bad_state(4, (4,), (4,)), "running_mean", id="rank1"),
    pytest.param(bad_state(4, (4, 3, 3, 1), (4, 3, 3, 1)), "running_mean", id="rank4"),
    pytest.param(bad_state(4, (5, 3, 3), (5, 3, 3)), "running_mean", id="wrong-C"),
    pytest.param(bad_state(4, (4, 3, 3), (4, 3, 2)), "one shape", id="mean-var-mismatch"),
    pytest.param(bad_state(4, (4, 3, 3), (3, 3, 3)), "running_var", id="var-wrong-C"),
    pytest.param({**bad_state(4, (4, 2, 2), (4, 2, 2)), "weight": np.ones(5)}, "weight",
                 id="good-running-bad-weight"),
]


@pytest.mark.parametrize("state, match", BAD_STATES)
@pytest.mark.parametrize("after_forward", [False, True], ids=["fresh", "after-forward"])
def test_load_state_dict_with_bad_running_stats_raises_and_writes_nothing(state, match, after_forward,
                                                                         rng):
    layer = randomized(bln(4, 4), rng)
    if after_forward:
        layer(make_input(rng, (3, 4, 5, 5), np.float64))
    before = snapshot(layer)
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    assert_state_unchanged(layer, before)
    if not after_forward:
        assert layer.running_mean is None and layer.running_var is None


def test_load_state_dict_of_one_buffer_must_match_the_layers_other(rng):
    layer = bln(4, 4)
    layer(make_input(rng, (3, 4, 5, 5), np.float64))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="one shape"):
        layer.load_state_dict({"running_mean": np.zeros((4, 2, 2))}, strict=False)
    assert_state_unchanged(layer, before)
    layer.load_state_dict({"running_mean": np.full((4, 5, 5), 0.5)}, strict=False)  # its own shape: fine
    np.testing.assert_array_equal(layer.running_mean, np.full((4, 5, 5), 0.5))


def test_backward_before_forward_raises_state_error():
    with pytest.raises(StateError, match="forward"):
        bln(4, 4).backward(np.ones((2, 4, 3, 3)))


def test_dy_of_another_shape_or_dtype_raises(rng):
    layer = bln(4, 4)
    layer(make_input(rng, (3, 4, 5, 5), np.float64))
    with pytest.raises(ValueError, match="dy: expected shape"):
        layer.backward(np.ones((3, 4, 5, 4)))
    with pytest.raises(TypeError, match="dy: expected dtype"):
        layer.backward(np.ones((3, 4, 5, 5), np.float32))


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5), (3, 4, 5, 5, 2)], ids=["2D", "3D", "5D"])
def test_input_other_than_4d_raises(shape, rng):
    layer = bln(4, 4)
    with pytest.raises(ValueError, match="4D"):
        layer(rng.standard_normal(shape))
    assert layer.running_mean is None


def test_defaults_and_repr():
    layer = normkit.BatchLayerNorm2d(6, 16)
    assert layer.batch_size == 16 and layer.eps == 1e-3 and layer.momentum == 0.1
    assert layer.use_batch_stats is False and layer.training and layer.dtype == np.float32
    np.testing.assert_array_equal(layer.weight, np.ones(6))
    np.testing.assert_array_equal(layer.bias, np.zeros(6))
    assert repr(layer) == "BatchLayerNorm2d(6, batch_size=16, eps=0.001, momentum=0.1)"
