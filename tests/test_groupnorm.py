"""GroupNorm and functional.group_norm against the float64 reference.

Spec (torch.nn.GroupNorm): each sample's C channels form num_groups consecutive groups of C/G
channels; each group is normalized over its channels and spatial positions with the biased
variance; the affine is per channel. No running statistics: train and eval are the same.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
import reference as ref


def config_id(shape, groups):
    n, c, *spatial = shape
    return f"N{n}-C{c}" + (f"-{'x'.join(map(str, spatial))}" if spatial else "") + f"-G{groups}"


def configs(*items):
    return [pytest.param(shape, groups, id=config_id(shape, groups)) for shape, groups in items]


# C in {1, 3, 23, 33} with G in {1, C, divisors}, spatial 1, 7, 17, N = 1, 2-D to 5-D inputs.
CONFIGS = configs(((2, 1, 7), 1), ((1, 3, 17), 1), ((1, 3, 17), 3), ((2, 23, 7), 1),
                  ((2, 23, 7), 23), ((2, 33, 5), 3), ((2, 33, 5), 11), ((3, 33), 11),
                  ((2, 6, 7, 5), 2), ((1, 4, 1, 1), 2), ((2, 33, 1, 1), 3), ((2, 3, 2, 3, 4), 3),
                  ((1, 6, 1, 1, 17), 2))
# Groups around the 2048-element chunk (one plane, or several planes of one group).
CHUNK_CONFIGS = configs(((1, 3, 2047), 3), ((2, 2, 2048), 1), ((1, 4, 2049), 2),
                        ((1, 1, 4097), 1), ((2, 2, 64, 64), 2), ((1, 6, 2049), 3))
SMALL_CONFIGS = configs(((2, 4, 5), 2), ((1, 6, 2, 2), 3), ((2, 3, 4), 1), ((2, 3, 4), 3),
                        ((3, 4), 2))

AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])


def group_size(shape, groups):
    return shape[1] // groups * int(np.prod(shape[2:], dtype=np.int64))


def make_input(rng, shape, dtype):
    bshape = shape[:2] + (1,) * (len(shape) - 2)
    loc = rng.uniform(-2, 2, bshape)
    scale = rng.uniform(0.5, 2, bshape)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def dx_scale(layer, x, dy, groups):
    """The size of the terms dx is a difference of (see reference.rstd)."""
    w = 1.0 if layer.weight is None else np.abs(ref.f64(layer.weight)).reshape(
        (1, -1) + (1,) * (x.ndim - 2))
    r = ref.rstd(x.reshape(x.shape[0], groups, -1), (2,), layer.eps)
    r = np.repeat(r.reshape(x.shape[0], groups), x.shape[1] // groups, axis=1)
    r = r.reshape(x.shape[:2] + (1,) * (x.ndim - 2))
    return float(np.max(r * np.abs(ref.f64(dy)) * w))


# -- forward and backward against the reference ---------------------------------------------------

@pytest.mark.parametrize("shape, groups", CONFIGS + CHUNK_CONFIGS)
@AFFINE
def test_forward_matches_reference(shape, groups, affine, dtype, rng, randomize_affine,
                                   assert_close):
    layer = normkit.GroupNorm(groups, shape[1], affine=affine, dtype=dtype)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref.group_norm(x, groups, layer.weight, layer.bias, layer.eps), dtype,
                 count=group_size(shape, groups), what="y")


@pytest.mark.parametrize("shape, groups", CONFIGS + CHUNK_CONFIGS)
@AFFINE
def test_backward_matches_reference(shape, groups, affine, dtype, rng, randomize_affine,
                                    assert_close):
    layer = normkit.GroupNorm(groups, shape[1], affine=affine, dtype=dtype)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer(x)
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = ref.group_norm_backward(x, dy, groups, layer.weight, layer.bias,
                                                        layer.eps)
    assert_close(dx, want_dx, dtype, count=group_size(shape, groups), what="dx",
                 scale=dx_scale(layer, x, dy, groups))
    if affine:
        count = shape[0] * int(np.prod(shape[2:], dtype=np.int64))
        assert_close(layer.grads["weight"], want_dw, dtype, count=count, what="dweight")
        assert_close(layer.grads["bias"], want_db, dtype, count=count, what="dbias")
    else:
        assert layer.grads == {}


@pytest.mark.parametrize("shape, groups", SMALL_CONFIGS)
@AFFINE
def test_float64_backward_equals_finite_differences(shape, groups, affine, rng, randomize_affine,
                                                    check_gradients_by_finite_differences):
    layer = normkit.GroupNorm(groups, shape[1], affine=affine, dtype=np.float64)
    randomize_affine(layer)
    x = make_input(rng, shape, np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


def test_train_and_eval_are_the_same(rng):
    layer = normkit.GroupNorm(2, 4, dtype=np.float64)
    x = make_input(rng, (2, 4, 5), np.float64)
    y_train = layer(x)
    assert layer.eval() is layer
    np.testing.assert_array_equal(layer(x), y_train)
    assert list(layer.state_dict()) == ["weight", "bias"]


# -- identities -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, groups", configs(((2, 6, 7), 3), ((1, 23, 17), 1),
                                                  ((2, 33, 3, 5), 11), ((2, 6, 2, 3, 4), 2),
                                                  ((1, 2, 2049), 1)))
def test_without_affine_and_eps_each_group_has_mean_0_and_variance_1(shape, groups, dtype, rng,
                                                                     assert_close):
    layer = normkit.GroupNorm(groups, shape[1], eps=0.0, affine=False, dtype=dtype)
    y = layer(make_input(rng, shape, dtype)).astype(np.float64).reshape(shape[0], groups, -1)
    count = group_size(shape, groups)
    assert_close(y.mean(axis=2), np.zeros((shape[0], groups)), dtype, count=count, what="mean")
    assert_close(y.var(axis=2), np.ones((shape[0], groups)), dtype, count=count, what="variance")


@pytest.mark.parametrize("shape, groups", configs(((2, 6, 7), 3), ((1, 23, 17), 1),
                                                  ((2, 33, 3, 5), 11), ((1, 2, 2049), 1)))
def test_dx_sums_to_zero_over_each_group(shape, groups, dtype, rng, randomize_affine,
                                         assert_close):
    layer = normkit.GroupNorm(groups, shape[1], dtype=dtype)
    randomize_affine(layer)
    layer(make_input(rng, shape, dtype))
    dx = layer.backward(rng.standard_normal(shape).astype(dtype)).astype(np.float64)
    count = group_size(shape, groups)
    sums = dx.reshape(shape[0], groups, -1).sum(axis=2) / np.sqrt(count)
    assert_close(sums, np.zeros((shape[0], groups)), dtype, count=count, what="sum of dx")


@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s)))
                                   for s in [(2, 3, 7, 5), (1, 23, 17), (2, 1, 7), (2, 4, 2, 3, 4)]])
def test_one_group_is_layer_norm_over_channels_and_space(shape, dtype, rng, assert_close):
    gn = normkit.GroupNorm(1, shape[1], affine=False, dtype=dtype)
    ln = normkit.LayerNorm(shape[1:], elementwise_affine=False, dtype=dtype)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(gn(x), ln(x), dtype, what="y")
    assert_close(gn.backward(dy), ln.backward(dy), dtype, what="dx")


@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s)))
                                   for s in [(2, 3, 7, 5), (1, 23, 17), (2, 1, 7), (2, 4, 2, 3, 4)]])
def test_one_channel_per_group_is_instance_norm(shape, dtype, rng, randomize_affine, assert_close):
    C = shape[1]
    gn = normkit.GroupNorm(C, C, dtype=dtype)
    inorm = {3: normkit.InstanceNorm1d, 4: normkit.InstanceNorm2d,
             5: normkit.InstanceNorm3d}[len(shape)](C, affine=True, dtype=dtype)
    randomize_affine(gn)
    inorm.weight[...] = gn.weight
    inorm.bias[...] = gn.bias
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(gn(x), inorm(x), dtype, what="y")
    assert_close(gn.backward(dy), inorm.backward(dy), dtype, what="dx")
    for name in ("weight", "bias"):
        assert_close(gn.grads[name], inorm.grads[name], dtype, what=f"d{name}")


# -- layouts of the input -------------------------------------------------------------------------

VIEWS = {
    "transposed-HW": lambda base: base.transpose(0, 1, 3, 2),
    "transposed-NC": lambda base: base.transpose(1, 0, 2, 3)[:, :6],
    "step-sliced": lambda base: base[:, :, ::2, 1::3],
    "negative-stride": lambda base: base[::-1, ::-1, :, ::-1],
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_non_contiguous_input_gives_the_same_result_as_its_copy(view, dtype, rng, assert_close):
    x = VIEWS[view](make_input(rng, (6, 6, 9, 7), dtype))
    assert not x.flags.c_contiguous
    C = x.shape[1]
    strided, contiguous = (normkit.GroupNorm(3, C, dtype=dtype) for _ in range(2))
    for layer in (strided, contiguous):
        layer.weight[...] = np.linspace(0.5, 1.5, C)
        layer.bias[...] = np.linspace(-1, 1, C)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy_view = np.flip(np.flip(dy, axis=1).copy(), axis=1)  # equal values, negative strides
    assert_close(strided(x), contiguous(np.ascontiguousarray(x)), dtype, what="y")
    assert_close(strided.backward(dy_view), contiguous.backward(dy), dtype, what="dx")
    for name in ("weight", "bias"):
        assert_close(strided.grads[name], contiguous.grads[name], dtype, what=f"d{name}")


# -- the functional form --------------------------------------------------------------------------

@pytest.mark.parametrize("shape, groups", configs(((2, 6, 7), 3), ((1, 23, 17), 23), ((3, 33), 11),
                                                  ((2, 6, 7, 5), 1), ((1, 4, 2049), 2)))
def test_functional_matches_reference(shape, groups, dtype, rng, assert_close):
    C = shape[1]
    x = make_input(rng, shape, dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.normal(size=C).astype(dtype)
    count = group_size(shape, groups)
    assert_close(F.group_norm(x, groups, w, b, eps=1e-3), ref.group_norm(x, groups, w, b, 1e-3),
                 dtype, count=count, what="y (affine)")
    assert_close(F.group_norm(x, groups), ref.group_norm(x, groups), dtype, count=count,
                 what="y (defaults)")


def test_num_groups_must_divide_channels():
    with pytest.raises(ValueError):
        normkit.GroupNorm(4, 6)
    with pytest.raises(ValueError):
        F.group_norm(np.ones((2, 6, 3), np.float32), 4)
