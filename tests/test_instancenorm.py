"""InstanceNorm1d/2d/3d and functional.instance_norm against the float64 reference.

Spec (torch.nn.InstanceNorm): statistics per (sample, channel) plane; defaults affine=False and
track_running_stats=False. With track_running_stats=True, training moves the running statistics
toward the batch average of the planes' means and unbiased variances (momentum=None means a factor
of 0: they never move, and num_batches_tracked is not counted), and eval normalizes with them.
Unbatched (C, *spatial) input is accepted.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
import reference as ref

LAYER_OF_NDIM = {3: normkit.InstanceNorm1d, 4: normkit.InstanceNorm2d, 5: normkit.InstanceNorm3d}


def shape_id(shape):
    n, c, *spatial = shape
    return f"N{n}-C{c}-{'x'.join(map(str, spatial))}"


def shapes(*items):
    return [pytest.param(s, id=shape_id(s)) for s in items]


# Every plane needs more than one element in training; C in {1, 3, 23, 33}, spatial 7 and 17.
SHAPES = shapes((2, 1, 7), (1, 3, 17), (2, 23, 7), (3, 33, 2), (2, 3, 7, 5), (1, 1, 1, 17),
                (2, 33, 7, 1), (2, 3, 2, 3, 4), (1, 23, 1, 1, 17))
# Planes around the 2048-element chunk.
CHUNK_SHAPES = shapes((2, 3, 2047), (1, 3, 2048), (2, 2, 2049), (1, 2, 4097), (1, 2, 64, 64),
                      (1, 1, 17, 241))
SMALL_SHAPES = shapes((2, 3, 5), (1, 2, 7), (2, 2, 2, 3), (1, 2, 1, 2, 3))

AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])


def plane_size(shape):
    return int(np.prod(shape[2:], dtype=np.int64))


def make_input(rng, shape, dtype):
    # Offsets and spreads per plane, so that each plane has statistics of its own.
    bshape = shape[:2] + (1,) * (len(shape) - 2)
    loc = rng.uniform(-2, 2, bshape)
    scale = rng.uniform(0.5, 2, bshape)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def make_layer(shape, dtype, **kwargs):
    return LAYER_OF_NDIM[len(shape)](shape[1], dtype=dtype, **kwargs)


def set_running_stats(layer, rng):
    C = layer.num_features
    layer.running_mean[...] = rng.uniform(-1, 1, C)
    layer.running_var[...] = rng.uniform(0.5, 2, C)


def expected(layer, x, dy=None, use_input_stats=True):
    kw = dict(weight=layer.weight, bias=layer.bias, eps=layer.eps, use_input_stats=use_input_stats,
              running_mean=None if use_input_stats else layer.running_mean,
              running_var=None if use_input_stats else layer.running_var)
    if dy is None:
        return ref.instance_norm(x, **kw)
    return ref.instance_norm_backward(x, dy, **kw)


def dx_scale(layer, x, dy):
    """The size of the terms a dx with input statistics is a difference of (see reference.rstd)."""
    w = 1.0 if layer.weight is None else np.abs(ref.f64(layer.weight)).reshape(
        (1, -1) + (1,) * (x.ndim - 2))
    return float(np.max(ref.rstd(x, tuple(range(2, x.ndim)), layer.eps) * np.abs(ref.f64(dy)) * w))


def test_defaults_follow_torch():
    layer = normkit.InstanceNorm2d(4)
    assert layer.affine is False and layer.track_running_stats is False
    assert layer.parameters() == {} and list(layer.state_dict()) == []
    assert layer.training is True


# -- forward and backward against the reference ---------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES + CHUNK_SHAPES)
@AFFINE
def test_forward_matches_reference(shape, affine, dtype, rng, randomize_affine, assert_close):
    layer = make_layer(shape, dtype, affine=affine)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, expected(layer, x), dtype, count=plane_size(shape), what="y")


@pytest.mark.parametrize("shape", SHAPES + CHUNK_SHAPES)
@AFFINE
def test_backward_matches_reference(shape, affine, dtype, rng, randomize_affine, assert_close):
    layer = make_layer(shape, dtype, affine=affine)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer(x)
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = expected(layer, x, dy)
    count = plane_size(shape)
    assert_close(dx, want_dx, dtype, count=count, what="dx", scale=dx_scale(layer, x, dy))
    if affine:
        # The parameter gradients sum over every plane of a channel: N*S terms.
        assert_close(layer.grads["weight"], want_dw, dtype, count=count * shape[0], what="dweight")
        assert_close(layer.grads["bias"], want_db, dtype, count=count * shape[0], what="dbias")
    else:
        assert layer.grads == {}


@pytest.mark.parametrize("shape", SHAPES + CHUNK_SHAPES[:2])
@AFFINE
def test_eval_with_running_statistics_matches_reference(shape, affine, dtype, rng,
                                                        randomize_affine, assert_close):
    layer = make_layer(shape, dtype, affine=affine, track_running_stats=True)
    randomize_affine(layer)
    set_running_stats(layer, rng)
    layer.eval()
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), expected(layer, x, use_input_stats=False), dtype, what="y")
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = expected(layer, x, dy, use_input_stats=False)
    assert_close(dx, want_dx, dtype, what="dx")
    if affine:
        count = plane_size(shape) * shape[0]
        assert_close(layer.grads["weight"], want_dw, dtype, count=count, what="dweight")
        assert_close(layer.grads["bias"], want_db, dtype, count=count, what="dbias")


@pytest.mark.parametrize("shape", shapes((2, 3, 7), (1, 23, 3, 5)))
def test_eval_without_running_statistics_uses_input_statistics(shape, dtype, rng, assert_close):
    layer = make_layer(shape, dtype).eval()
    x = make_input(rng, shape, dtype)
    assert_close(layer(x), expected(layer, x), dtype, what="y")


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("mode", ["train", "eval-running-stats"])
@AFFINE
def test_float64_backward_equals_finite_differences(shape, mode, affine, rng, randomize_affine,
                                                    check_gradients_by_finite_differences):
    layer = make_layer(shape, np.float64, affine=affine, track_running_stats=True)
    randomize_affine(layer)
    set_running_stats(layer, rng)
    layer.train(mode == "train")
    x = make_input(rng, shape, np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


# -- unbatched input ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", shapes((1, 3, 17), (1, 3, 7, 5), (1, 3, 2, 3, 4)))
def test_unbatched_input_is_one_sample(shape, dtype, rng, randomize_affine, assert_close):
    layer = make_layer(shape, dtype, affine=True)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = layer(x[0])
    assert y.shape == shape[1:]
    dx = layer.backward(dy[0])
    assert dx.shape == shape[1:]
    want_dx, want_dw, want_db = expected(layer, x, dy)
    assert_close(y, expected(layer, x)[0], dtype, what="y")
    assert_close(dx, want_dx[0], dtype, what="dx")
    assert_close(layer.grads["weight"], want_dw, dtype, what="dweight")
    assert_close(layer.grads["bias"], want_db, dtype, what="dbias")


# -- running statistics ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, 0.75], ids=["momentum0.1", "momentum0.75"])
@pytest.mark.parametrize("shape", shapes((2, 3, 7), (4, 23, 3, 5), (1, 3, 2, 2, 17)))
def test_running_statistics_over_steps(shape, momentum, dtype, rng, assert_close):
    layer = make_layer(shape, dtype, track_running_stats=True, momentum=momentum)
    want_mean, want_var = np.zeros(shape[1]), np.ones(shape[1])
    for step in range(1, 5):
        x = make_input(rng, shape, dtype)
        layer(x)
        batch_mean, batch_var = ref.instance_stats(x)
        want_mean = ref.running_update(want_mean, batch_mean, momentum)
        want_var = ref.running_update(want_var, batch_var, momentum)
        assert_close(layer.running_mean, want_mean, dtype, what=f"running_mean after step {step}")
        assert_close(layer.running_var, want_var, dtype, what=f"running_var after step {step}")
    # torch's InstanceNorm never counts batches.
    assert int(layer.num_batches_tracked) == 0


def test_momentum_none_leaves_running_statistics_at_their_start(rng):
    # torch passes momentum 0.0 to instance_norm when momentum is None.
    layer = normkit.InstanceNorm1d(3, momentum=None, track_running_stats=True, dtype=np.float64)
    for _ in range(3):
        layer(make_input(rng, (2, 3, 7), np.float64))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))


# -- identities -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", shapes((2, 3, 17), (1, 23, 7), (2, 33, 7, 5), (2, 3, 2, 3, 4),
                                         (1, 2, 2049)))
def test_without_affine_and_eps_each_plane_has_mean_0_and_variance_1(shape, dtype, rng,
                                                                     assert_close):
    layer = make_layer(shape, dtype, eps=0.0)
    y = layer(make_input(rng, shape, dtype)).astype(np.float64)
    axes = tuple(range(2, len(shape)))
    assert_close(y.mean(axis=axes), np.zeros(shape[:2]), dtype, count=plane_size(shape), what="mean")
    assert_close(y.var(axis=axes), np.ones(shape[:2]), dtype, count=plane_size(shape), what="variance")


@pytest.mark.parametrize("shape", shapes((2, 3, 17), (1, 23, 7), (2, 33, 7, 5), (2, 3, 2, 3, 4),
                                         (1, 2, 2049)))
def test_dx_sums_to_zero_over_each_plane(shape, dtype, rng, randomize_affine, assert_close):
    layer = make_layer(shape, dtype, affine=True)
    randomize_affine(layer)
    layer(make_input(rng, shape, dtype))
    dx = layer.backward(rng.standard_normal(shape).astype(dtype)).astype(np.float64)
    count = plane_size(shape)
    axes = tuple(range(2, len(shape)))
    assert_close(dx.sum(axis=axes) / np.sqrt(count), np.zeros(shape[:2]), dtype, count=count,
                 what="sum of dx")


# -- layouts of the input -------------------------------------------------------------------------

VIEWS = {
    "transposed-HW": lambda base: base.transpose(0, 1, 3, 2),
    "transposed-NC": lambda base: base.transpose(1, 0, 2, 3),
    "step-sliced": lambda base: base[:, :, ::2, 1::3],
    "negative-stride": lambda base: base[::-1, ::-1, :, ::-1],
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_non_contiguous_input_gives_the_same_result_as_its_copy(view, dtype, rng, assert_close):
    x = VIEWS[view](make_input(rng, (3, 3, 9, 7), dtype))
    assert not x.flags.c_contiguous
    C = x.shape[1]
    strided, contiguous = (normkit.InstanceNorm2d(C, affine=True, dtype=dtype) for _ in range(2))
    for layer in (strided, contiguous):
        layer.weight[...] = np.linspace(0.5, 1.5, C)
        layer.bias[...] = np.linspace(-1, 1, C)
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert_close(strided(x), contiguous(np.ascontiguousarray(x)), dtype, what="y")
    dy_view = np.flip(np.flip(dy, axis=2).copy(), axis=2)  # equal values, negative strides
    assert not dy_view.flags.c_contiguous
    assert_close(strided.backward(dy_view), contiguous.backward(dy), dtype, what="dx")
    for name in ("weight", "bias"):
        assert_close(strided.grads[name], contiguous.grads[name], dtype, what=f"d{name}")


# -- what is rejected or warned about -------------------------------------------------------------

@pytest.mark.parametrize("shape", shapes((2, 3, 1), (2, 3, 1, 1), (1, 3, 1, 1, 1)))
def test_training_with_one_element_per_plane_raises(shape):
    with pytest.raises(ValueError):
        make_layer(shape, np.float32)(np.ones(shape, np.float32))


def test_channel_mismatch_without_affine_warns_and_still_normalizes(rng, assert_close):
    layer = normkit.InstanceNorm1d(3, dtype=np.float64)
    x = make_input(rng, (2, 5, 7), np.float64)
    with pytest.warns(UserWarning):
        y = layer(x)
    assert_close(y, ref.instance_norm(x), np.float64)


# -- the functional form --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", shapes((2, 3, 7), (1, 23, 17), (2, 3, 7, 5), (2, 3, 2, 3, 4)))
def test_functional_input_stats_update_running_stats_in_place(shape, dtype, rng, assert_close):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype)
    running_mean, running_var = rng.normal(size=C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    batch_mean, batch_var = ref.instance_stats(x)
    want_mean = ref.running_update(running_mean, batch_mean, 0.3)
    want_var = ref.running_update(running_var, batch_var, 0.3)
    y = F.instance_norm(x, running_mean, running_var, w, b, use_input_stats=True, momentum=0.3,
                        eps=1e-3)
    assert_close(y, ref.instance_norm(x, w, b, 1e-3), dtype, what="y")
    assert_close(running_mean, want_mean, dtype, what="running_mean")
    assert_close(running_var, want_var, dtype, what="running_var")


@pytest.mark.parametrize("shape", shapes((2, 3, 7), (1, 3, 1), (2, 3, 7, 5)))
def test_functional_given_stats(shape, dtype, rng, assert_close):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    running_mean, running_var = rng.normal(size=C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    y = F.instance_norm(x, running_mean, running_var, use_input_stats=False)
    assert_close(y, ref.instance_norm(x, running_mean=running_mean, running_var=running_var,
                                      use_input_stats=False), dtype, what="y")


def test_functional_defaults_normalize_each_plane(rng, assert_close):
    x = make_input(rng, (2, 4, 6), np.float64)
    assert_close(F.instance_norm(x), ref.instance_norm(x), np.float64)
