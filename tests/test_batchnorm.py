"""BatchNorm1d/2d/3d and functional.batch_norm against the float64 reference (reference.py).

Spec: statistics per channel over (N, *spatial); training normalizes with the batch's biased
variance and moves the running statistics toward the batch mean and *unbiased* variance
(factor = momentum, or 1/num_batches_tracked when momentum is None); eval normalizes with the
running statistics; track_running_stats=False always uses batch statistics.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
import reference as ref

LAYER_OF_NDIM = {2: normkit.BatchNorm1d, 3: normkit.BatchNorm1d, 4: normkit.BatchNorm2d,
                 5: normkit.BatchNorm3d}


def shape_id(shape):
    n, c, *spatial = shape
    return f"N{n}-C{c}" + (f"-{'x'.join(map(str, spatial))}" if spatial else "")


def shapes(*items):
    return [pytest.param(s, id=shape_id(s)) for s in items]


# Shapes legal in training (more than one value per channel): C in {1, 3, 23, 33}, spatial
# sizes 1, 7, 17, N = 1, 2-D/3-D/4-D/5-D inputs.
TRAIN_SHAPES = shapes((4, 3), (2, 1), (2, 1, 7), (1, 3, 17), (2, 23, 7), (3, 33, 1), (2, 3, 7, 5),
                      (1, 1, 1, 17), (2, 33, 1, 1), (2, 3, 2, 3, 4), (1, 23, 1, 1, 17))
# Planes around the kernels' 2048-element chunk, and a channel pooled over several long planes.
CHUNK_SHAPES = shapes((2, 3, 2047), (2, 3, 2048), (1, 3, 2049), (2, 2, 4097), (1, 2, 64, 64),
                      (2, 1, 17, 241), (1, 33, 2049))
# Eval needs no batch statistics, so one value per channel is legal there.
EVAL_SHAPES = TRAIN_SHAPES + shapes((1, 3), (1, 33, 1, 1), (1, 23, 1, 1, 1))
SMALL_SHAPES = shapes((4, 3), (2, 3, 5), (1, 2, 7), (2, 2, 2, 3), (2, 2, 1, 2, 3))

AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
MODE = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def planes(shape):
    return shape[0] * int(np.prod(shape[2:], dtype=np.int64))


def make_input(rng, shape, dtype):
    # Per-channel offsets and spreads, so that every channel has statistics of its own.
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-2, 2, C).reshape(bshape)
    scale = rng.uniform(0.5, 2, C).reshape(bshape)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def make_layer(shape, dtype, **kwargs):
    return LAYER_OF_NDIM[len(shape)](shape[1], dtype=dtype, **kwargs)


def set_running_stats(layer, rng):
    C = layer.num_features
    layer.running_mean[...] = rng.uniform(-1, 1, C)
    layer.running_var[...] = rng.uniform(0.5, 2, C)


def expected(layer, x, dy=None, training=True):
    """Reference forward (and backward when dy is given) for the layer's current state."""
    kw = dict(weight=layer.weight, bias=layer.bias, eps=layer.eps, training=training,
              running_mean=None if training else layer.running_mean,
              running_var=None if training else layer.running_var)
    if dy is None:
        return ref.batch_norm(x, **kw)
    return ref.batch_norm_backward(x, dy, **kw)


def dx_scale(layer, x, dy):
    """The size of the terms a training dx is a difference of (see reference.rstd)."""
    axes = (0,) + tuple(range(2, x.ndim))
    w = 1.0 if layer.weight is None else np.abs(ref.f64(layer.weight)).reshape(
        (1, -1) + (1,) * (x.ndim - 2))
    return float(np.max(ref.rstd(x, axes, layer.eps) * np.abs(ref.f64(dy)) * w))


# -- forward and backward against the reference ---------------------------------------------------

@pytest.mark.parametrize("shape", TRAIN_SHAPES + CHUNK_SHAPES)
@AFFINE
def test_training_forward_matches_reference(shape, affine, dtype, rng, randomize_affine,
                                            assert_close):
    layer = make_layer(shape, dtype, affine=affine)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, expected(layer, x), dtype, count=planes(shape), what="y")


@pytest.mark.parametrize("shape", TRAIN_SHAPES + CHUNK_SHAPES)
@AFFINE
def test_training_backward_matches_reference(shape, affine, dtype, rng, randomize_affine,
                                             assert_close):
    layer = make_layer(shape, dtype, affine=affine)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer(x)
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = expected(layer, x, dy)
    count = planes(shape)
    assert dx.dtype == dtype
    assert_close(dx, want_dx, dtype, count=count, what="dx", scale=dx_scale(layer, x, dy))
    if affine:
        assert set(layer.grads) == {"weight", "bias"}
        assert_close(layer.grads["weight"], want_dw, dtype, count=count, what="dweight")
        assert_close(layer.grads["bias"], want_db, dtype, count=count, what="dbias")
    else:
        assert layer.grads == {}


@pytest.mark.parametrize("shape", EVAL_SHAPES + CHUNK_SHAPES[:3])
@AFFINE
def test_eval_forward_and_backward_use_running_statistics(shape, affine, dtype, rng,
                                                          randomize_affine, assert_close):
    layer = make_layer(shape, dtype, affine=affine)
    randomize_affine(layer)
    set_running_stats(layer, rng)
    assert layer.eval() is layer and layer.training is False
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    count = planes(shape)
    assert_close(layer(x), expected(layer, x, training=False), dtype, count=count, what="y")
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = expected(layer, x, dy, training=False)
    assert_close(dx, want_dx, dtype, count=count, what="dx")
    if affine:
        assert_close(layer.grads["weight"], want_dw, dtype, count=count, what="dweight")
        assert_close(layer.grads["bias"], want_db, dtype, count=count, what="dbias")


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@MODE
@AFFINE
def test_float64_backward_equals_finite_differences(shape, training, affine, rng, randomize_affine,
                                                    check_gradients_by_finite_differences):
    layer = make_layer(shape, np.float64, affine=affine)
    randomize_affine(layer)
    set_running_stats(layer, rng)
    layer.train(training)
    x = make_input(rng, shape, np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


# -- running statistics ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, 0.75, None], ids=["momentum0.1", "momentum0.75",
                                                             "cumulative"])
@pytest.mark.parametrize("shape", shapes((4, 3), (2, 3, 7), (2, 23, 3, 5), (1, 3, 2, 2, 17)))
def test_running_statistics_over_steps(shape, momentum, dtype, rng, assert_close):
    layer = make_layer(shape, dtype, momentum=momentum)
    want_mean, want_var = np.zeros(shape[1]), np.ones(shape[1])
    for step in range(1, 5):
        x = make_input(rng, shape, dtype)
        layer(x)
        factor = 1.0 / step if momentum is None else momentum
        batch_mean, batch_var = ref.batch_stats(x)
        want_mean = ref.running_update(want_mean, batch_mean, factor)
        want_var = ref.running_update(want_var, batch_var, factor)
        assert int(layer.num_batches_tracked) == step
        assert layer.running_mean.dtype == dtype and layer.running_var.dtype == dtype
        assert_close(layer.running_mean, want_mean, dtype, what=f"running_mean after step {step}")
        assert_close(layer.running_var, want_var, dtype, what=f"running_var after step {step}")


def test_cumulative_average_is_the_plain_mean_of_batch_statistics(rng, assert_close):
    # momentum=None: after k steps the running statistics are the unweighted average of the k
    # batch statistics (the initial 0/1 are forgotten at step 1).
    layer = normkit.BatchNorm2d(3, momentum=None, dtype=np.float64)
    stats = []
    for _ in range(5):
        x = make_input(rng, (2, 3, 4, 5), np.float64)
        layer(x)
        stats.append(ref.batch_stats(x))
    assert_close(layer.running_mean, np.mean([m for m, _ in stats], axis=0), np.float64)
    assert_close(layer.running_var, np.mean([v for _, v in stats], axis=0), np.float64)
    assert int(layer.num_batches_tracked) == 5


def test_eval_leaves_running_statistics_alone(rng):
    layer = normkit.BatchNorm1d(3, dtype=np.float64)
    layer(make_input(rng, (4, 3, 5), np.float64))
    before = layer.state_dict()
    layer.eval()
    for _ in range(3):
        layer(make_input(rng, (4, 3, 5), np.float64))
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_training_after_eval_resumes_counting(rng):
    layer = normkit.BatchNorm1d(3)
    layer(make_input(rng, (4, 3), np.float32))
    layer.eval()(make_input(rng, (4, 3), np.float32))
    layer.train()(make_input(rng, (4, 3), np.float32))
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("shape", shapes((4, 3), (2, 3, 7), (1, 23, 3, 5)))
@MODE
def test_without_running_statistics_batch_statistics_are_always_used(shape, training, dtype, rng,
                                                                     randomize_affine, assert_close):
    layer = make_layer(shape, dtype, track_running_stats=False)
    randomize_affine(layer)
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer.train(training)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), expected(layer, x, training=True), dtype, what="y")
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = expected(layer, x, dy, training=True)
    assert_close(dx, want_dx, dtype, what="dx", scale=dx_scale(layer, x, dy))
    assert_close(layer.grads["weight"], want_dw, dtype, what="dweight")
    assert_close(layer.grads["bias"], want_db, dtype, what="dbias")


# -- identities that need no reference ------------------------------------------------------------

@pytest.mark.parametrize("shape", shapes((4, 3), (2, 23, 7), (1, 3, 17), (2, 33, 3, 5),
                                         (2, 3, 2, 3, 4), (2, 3, 2049)))
def test_without_affine_and_eps_the_output_has_mean_0_and_variance_1(shape, dtype, rng,
                                                                     assert_close):
    layer = make_layer(shape, dtype, affine=False, eps=0.0)
    y = layer(make_input(rng, shape, dtype)).astype(np.float64)
    axes = (0,) + tuple(range(2, len(shape)))
    assert_close(y.mean(axis=axes), np.zeros(shape[1]), dtype, count=planes(shape), what="mean")
    assert_close(y.var(axis=axes), np.ones(shape[1]), dtype, count=planes(shape), what="variance")


@pytest.mark.parametrize("shape", shapes((4, 3), (2, 23, 7), (1, 3, 17), (2, 33, 3, 5),
                                         (2, 3, 2, 3, 4), (2, 3, 2049)))
def test_training_dx_sums_to_zero_over_each_channel(shape, dtype, rng, randomize_affine,
                                                    assert_close):
    layer = make_layer(shape, dtype)
    randomize_affine(layer)
    layer(make_input(rng, shape, dtype))
    dy = rng.standard_normal(shape).astype(dtype)
    dx = layer.backward(dy).astype(np.float64)
    axes = (0,) + tuple(range(2, len(shape)))
    # Each entry of dx is O(1); a sum of `count` of them is compared at that sum's scale.
    count = planes(shape)
    assert_close(dx.sum(axis=axes) / np.sqrt(count), np.zeros(shape[1]), dtype, count=count,
                 what="sum of dx")


# -- layouts of the input -------------------------------------------------------------------------

# Non-contiguous (N, 3, H, W) views, each cut from a fresh input of the shape it needs.
VIEWS = {
    "transposed-HW": lambda rng, dtype: make_input(rng, (2, 3, 9, 6), dtype).transpose(0, 1, 3, 2),
    "transposed-NC": lambda rng, dtype: make_input(rng, (6, 2, 5, 7), dtype)[:3].transpose(1, 0, 2, 3),
    "step-sliced": lambda rng, dtype: make_input(rng, (2, 3, 9, 6), dtype)[:, :, ::2, 1::3],
    "negative-stride": lambda rng, dtype: make_input(rng, (2, 3, 9, 6), dtype)[::-1, :, :, ::-1],
    "channel-sliced": lambda rng, dtype: make_input(rng, (2, 7, 4, 5), dtype)[:, 1::3],
}


@pytest.mark.parametrize("view", list(VIEWS))
@MODE
def test_non_contiguous_input_gives_the_same_result_as_its_copy(view, training, dtype, rng,
                                                                assert_close):
    x = VIEWS[view](rng, dtype)
    assert not x.flags.c_contiguous
    C = x.shape[1]
    layers = []
    for _ in range(2):
        layer = normkit.BatchNorm2d(C, dtype=dtype)
        layer.weight[...] = np.linspace(0.5, 1.5, C)
        layer.bias[...] = np.linspace(-1, 1, C)
        layer.running_mean[...] = np.linspace(-0.3, 0.3, C)
        layer.running_var[...] = np.linspace(0.5, 2.0, C)
        layers.append(layer.train(training))
    strided, contiguous = layers
    x_copy = np.ascontiguousarray(x)
    x_before = x.copy()
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy_view = np.flip(np.flip(dy, axis=3).copy(), axis=3)  # equal values, negative strides
    assert_close(strided(x), contiguous(x_copy), dtype, what="y")
    assert_close(strided.backward(dy_view), contiguous.backward(dy), dtype, what="dx")
    for name in ("weight", "bias"):
        assert_close(strided.grads[name], contiguous.grads[name], dtype, what=f"d{name}")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(strided, name), getattr(contiguous, name), dtype, what=name)
    np.testing.assert_array_equal(x, x_before)  # the input is never written


# -- what is rejected -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", shapes((1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)))
def test_training_with_one_value_per_channel_raises_and_changes_nothing(shape, rng):
    layer = make_layer(shape, np.float32)
    layer(make_input(rng, (2,) + shape[1:], np.float32))
    before = layer.state_dict()
    with pytest.raises(ValueError):
        layer(make_input(rng, shape, np.float32))
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    # The same batch is fine in eval: running statistics need no batch statistics.
    assert layer.eval()(make_input(rng, shape, np.float32)).shape == shape


def test_functional_training_with_one_value_per_channel_raises_before_writing():
    running_mean, running_var = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    with pytest.raises(ValueError):
        F.batch_norm(np.ones((1, 4), np.float32), running_mean, running_var, training=True)
    np.testing.assert_array_equal(running_mean, 0.5)
    np.testing.assert_array_equal(running_var, 2.0)


# -- the functional form --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", shapes((4, 3), (2, 23, 7), (1, 3, 17), (2, 3, 7, 5),
                                         (2, 3, 2, 3, 4), (2, 3, 2049)))
def test_functional_training_normalizes_and_updates_running_stats_in_place(shape, dtype, rng,
                                                                           assert_close):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype)
    running_mean, running_var = rng.normal(size=C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm_id, rv_id = id(running_mean), id(running_var)
    want_mean, want_var = ref.batch_stats(x)
    want_mean = ref.running_update(running_mean, want_mean, 0.3)
    want_var = ref.running_update(running_var, want_var, 0.3)
    y = F.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=0.3, eps=1e-3)
    count = planes(shape)
    assert_close(y, ref.batch_norm(x, w, b, 1e-3), dtype, count=count, what="y")
    assert id(running_mean) == rm_id and id(running_var) == rv_id
    assert_close(running_mean, want_mean, dtype, count=count, what="running_mean")
    assert_close(running_var, want_var, dtype, count=count, what="running_var")


@pytest.mark.parametrize("shape", shapes((4, 3), (1, 3), (2, 23, 7), (2, 3, 7, 5), (1, 3, 1, 1, 1)))
def test_functional_eval_uses_the_given_statistics(shape, dtype, rng, assert_close):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    running_mean, running_var = rng.normal(size=C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    saved = running_mean.copy(), running_var.copy()
    y = F.batch_norm(x, running_mean, running_var)  # defaults: no affine, training=False
    assert_close(y, ref.batch_norm(x, eps=1e-5, running_mean=running_mean, running_var=running_var,
                                   training=False), dtype, what="y")
    np.testing.assert_array_equal(running_mean, saved[0])
    np.testing.assert_array_equal(running_var, saved[1])


def test_functional_training_without_running_stats_and_with_only_a_bias(rng, assert_close):
    x = make_input(rng, (3, 5, 4), np.float64)
    b = rng.normal(size=5)
    y = F.batch_norm(x, None, None, None, b, True)
    assert_close(y, ref.batch_norm(x, None, b), np.float64)
