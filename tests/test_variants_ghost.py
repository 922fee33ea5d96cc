"""GhostBatchNorm2d against the float64 references (reference.py), issue 10.

Spec ("Four Things Everyone Should Know to Improve Batch Normalization", arXiv 1906.03548):
- Training: the batch is cut into consecutive ghost batches of `ghost_batch_size` examples (the
  last may be smaller); mean and biased variance per (ghost batch, channel group) over the ghost
  batch's examples, the group's `channels_per_group` channels and (H, W). channels_per_group=1 is
  ghost BN, >1 the paper's BN+GN mixture (it must divide C). The affine is per channel.
- Running statistics per channel from the whole batch (mean, unbiased variance), as torch BN.
- Eval with example weighing, alpha = example_weight (a plain attribute): with P1, P2 the group's
  population moments from the running statistics and E1_i, E2_i the sample's own,
  mu_i = (1-alpha) P1 + alpha E1_i, var_i = max(0, (1-alpha) P2 + alpha E2_i - mu_i^2),
  y = w (x - mu_i)/sqrt(var_i + eps) + b; the backward is exact through E1_i, E2_i.
- ghost_batch_size < 1, example_weight outside [0, 1] and a channels_per_group that does not divide
  num_features raise ValueError naming the argument.

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import normkit
import reference as ref
from variant_checks import (AFFINE, FLOAT_DTYPES, HALF_EPS, MODE, VIEWS,
                            assert_bitwise_same_for_1_and_2_threads, assert_state_dict_round_trip,
                            check_backward, check_channels_last, check_half_input,
                            check_view_matches_copy, half_dtype, make_input,
                            randomize_affine_or_none, shape_id)


def ghost(C, ghost_batch_size, dtype=np.float64, **kw):
    return normkit.GhostBatchNorm2d(C, ghost_batch_size, dtype=dtype, **kw)


def set_running_stats(layer, rng):
    layer.running_mean[...] = rng.uniform(-1, 1, layer.num_features)
    layer.running_var[...] = rng.uniform(0.5, 2.0, layer.num_features)


def training_dx_scale(layer, x, dy):
    """r*|dy*w| over the (ghost batch, group) statistics: the size of what a training dx cancels."""
    gbs, cpg = layer.ghost_batch_size, layer.channels_per_group
    w = 1.0 if layer.weight is None else np.abs(ref.f64(layer.weight)).reshape(1, -1, 1, 1)
    scale = 0.0
    for s in range(0, x.shape[0], gbs):
        xs = ref.f64(x[s:s + gbs])
        xg = xs.reshape((xs.shape[0], xs.shape[1] // cpg, cpg) + xs.shape[2:])
        r = np.broadcast_to(ref.rstd(xg, (0, 2, 3, 4), layer.eps), xg.shape).reshape(xs.shape)
        scale = max(scale, float(np.max(r * np.abs(ref.f64(dy[s:s + gbs])) * w)))
    return scale


def train_reference(layer, x, dy=None, ghost_batch_size=None, channels_per_group=None):
    """The training reference for the layer's affine; the hyperparameters are the test's own
    where it gives them (else the layer's attributes, checked against the constructor's)."""
    args = (ghost_batch_size or layer.ghost_batch_size,
            channels_per_group or layer.channels_per_group, layer.weight, layer.bias, layer.eps)
    if dy is None:
        return ref.ghost_batch_norm(x, *args)
    return ref.ghost_batch_norm_backward(x, dy, *args)


def eval_reference(layer, x, dy=None, example_weight=None, channels_per_group=None):
    alpha = layer.example_weight if example_weight is None else example_weight
    args = (layer.running_mean, layer.running_var, channels_per_group or layer.channels_per_group,
            alpha, layer.weight, layer.bias, layer.eps)
    if dy is None:
        return ref.ghost_batch_norm_eval(x, *args)
    return ref.ghost_batch_norm_eval_backward(x, dy, *args)


def reduction_count(layer, shape):
    """The longest reduction: a channel's gradient sum over the batch."""
    return max(shape[0] * shape[2] * shape[3], layer.channels_per_group * shape[2] * shape[3])


# -- training: ghost batches ----------------------------------------------------------------------

def train_case(shape, gbs, cpg, note=""):
    return pytest.param(shape, gbs, cpg, id=f"{shape_id(shape)}-ghost{gbs}-cpg{cpg}{note}")


TRAIN_CASES = [
    train_case((5, 3, 7, 5), 2, 1, "-ragged"),          # ghost batches of 2, 2, 1
    train_case((6, 4, 3, 5), 4, 1, "-ragged"),          # 4, 2
    train_case((4, 3, 7, 5), 2, 1),                     # 2, 2: divides N
    train_case((1, 3, 7, 5), 4, 1, "-N1"),              # one ghost batch smaller than asked
    train_case((3, 1, 7, 5), 2, 1, "-C1"),
    train_case((4, 3, 7, 5), 1, 1, "-one-sample-each"),
    train_case((4, 6, 3, 5), 2, 3, "-BN+GN"),
    train_case((5, 6, 3, 5), 3, 6, "-all-channels-ragged"),
    train_case((6, 4, 1, 1), 3, 2, "-1x1"),
    train_case((2, 3, 45, 47), 1, 1, "-chunk-tail"),
]


@pytest.mark.parametrize("shape, ghost_batch_size, channels_per_group", TRAIN_CASES)
@AFFINE
def test_training_forward_and_backward_match_the_reference(shape, ghost_batch_size,
                                                           channels_per_group, affine, dtype, rng,
                                                           randomize_affine, assert_close):
    layer = ghost(shape[1], ghost_batch_size, dtype, channels_per_group=channels_per_group,
                  affine=affine)
    randomize_affine_or_none(layer, affine, randomize_affine)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    count = reduction_count(layer, shape)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    hyper = dict(ghost_batch_size=ghost_batch_size, channels_per_group=channels_per_group)
    assert_close(y, train_reference(layer, x, **hyper), dtype, count=count, what="y")
    dx = layer.backward(dy)
    check_backward(layer, dx, train_reference(layer, x, dy, **hyper), dtype, count, assert_close,
                   training_dx_scale(layer, x, dy))


def test_a_ghost_batch_as_large_as_the_batch_is_batch_norm(rng, assert_close):
    x = make_input(rng, (4, 3, 7, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    for gbs in (4, 9):
        layer = ghost(3, gbs)
        layer.weight[...], layer.bias[...] = [0.6, 1.1, 1.4], [0.2, -0.1, 0.5]
        assert_close(layer(x), ref.batch_norm(x, layer.weight, layer.bias), np.float64, what="y")
        want = ref.batch_norm_backward(x, dy, layer.weight, layer.bias)
        check_backward(layer, layer.backward(dy), want, np.float64, 1, assert_close)


def test_one_sample_ghost_batches_of_channel_groups_are_group_norm(rng, assert_close):
    # ghost_batch_size=1: each sample alone, statistics per group of channels_per_group channels.
    x = make_input(rng, (3, 6, 7, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    layer = ghost(6, 1, channels_per_group=2)
    layer.weight[...] = np.linspace(0.5, 1.5, 6)
    layer.bias[...] = np.linspace(-0.5, 0.5, 6)
    assert_close(layer(x), ref.group_norm(x, 3, layer.weight, layer.bias), np.float64, what="y")
    want = ref.group_norm_backward(x, dy, 3, layer.weight, layer.bias)
    check_backward(layer, layer.backward(dy), want, np.float64, 1, assert_close)


def test_each_ghost_batch_is_normalized_on_its_own(rng, assert_close):
    # Shifting the last ghost batch by a constant leaves every output unchanged (its own mean
    # absorbs the shift); in a layer that pooled the whole batch the first ghost's outputs move.
    x = make_input(rng, (5, 3, 4, 5), np.float64)
    shifted = x.copy()
    shifted[4:] += 10.0
    layer = ghost(3, 2, affine=False)
    assert_close(layer(shifted), layer(x), np.float64, what="y")


# -- running statistics: the whole batch ----------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("ghost_batch_size, channels_per_group", [(2, 1), (3, 3)],
                         ids=["ghost2-cpg1", "ghost3-cpg3"])
def test_running_statistics_come_from_the_whole_batch(ghost_batch_size, channels_per_group,
                                                      momentum, dtype, rng, assert_close):
    layer = ghost(6, ghost_batch_size, dtype, channels_per_group=channels_per_group,
                  momentum=momentum)
    want_mean, want_var = np.zeros(6), np.ones(6)
    for step in range(1, 5):
        x = make_input(rng, (5, 6, 7, 5), dtype) + step
        layer(x)
        factor = 1.0 / step if momentum is None else momentum
        batch_mean, batch_var = ref.batch_stats(x)  # per channel, unbiased, over all 5 samples
        want_mean = ref.running_update(want_mean, batch_mean, factor)
        want_var = ref.running_update(want_var, batch_var, factor)
        assert int(layer.num_batches_tracked) == step
        assert layer.running_mean.dtype == dtype
        assert_close(layer.running_mean, want_mean, dtype, what=f"running_mean, step {step}")
        assert_close(layer.running_var, want_var, dtype, what=f"running_var, step {step}")


@MODE
def test_without_running_statistics_ghost_batch_statistics_are_always_used(training, dtype, rng,
                                                                          randomize_affine,
                                                                          assert_close):
    # As torch's BatchNorm with track_running_stats=False: the batch's (here: the ghost batches')
    # statistics in eval too.
    layer = ghost(6, 2, dtype, channels_per_group=3, example_weight=0.5, track_running_stats=False)
    randomize_affine(layer)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer.train(training)
    x = make_input(rng, (5, 6, 7, 5), dtype)
    assert_close(layer(x), train_reference(layer, x, ghost_batch_size=2, channels_per_group=3),
                 dtype, what="y")


def test_eval_leaves_running_statistics_alone(rng):
    layer = ghost(3, 2, example_weight=0.5)
    layer(make_input(rng, (5, 3, 4, 5), np.float64))
    before = layer.state_dict()
    layer.eval()
    layer(make_input(rng, (5, 3, 4, 5), np.float64))
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


# -- eval: example weighing -----------------------------------------------------------------------

def eval_case(shape, cpg, alpha):
    return pytest.param(shape, cpg, alpha, id=f"{shape_id(shape)}-cpg{cpg}-alpha{alpha}")


EVAL_CASES = [
    eval_case((5, 6, 7, 5), 1, 0.0),
    eval_case((5, 6, 7, 5), 1, 0.25),
    eval_case((5, 6, 7, 5), 1, 1.0),
    eval_case((5, 6, 7, 5), 3, 0.0),
    eval_case((5, 6, 7, 5), 3, 0.25),
    eval_case((2, 6, 7, 5), 2, 1.0),
    eval_case((1, 6, 1, 1), 3, 0.25),    # N=1 and 1x1 planes: eval needs no batch
    eval_case((1, 1, 7, 5), 1, 0.5),
    eval_case((3, 1, 1, 1), 1, 0.0),
]


@pytest.mark.parametrize("shape, channels_per_group, example_weight", EVAL_CASES)
@AFFINE
def test_eval_with_example_weighing_matches_the_reference(shape, channels_per_group,
                                                          example_weight, affine, dtype, rng,
                                                          randomize_affine, assert_close):
    layer = ghost(shape[1], 2, dtype, channels_per_group=channels_per_group,
                  example_weight=example_weight, affine=affine)
    if affine:
        randomize_affine(layer)
    set_running_stats(layer, rng)
    layer.eval()
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    count = reduction_count(layer, shape)
    hyper = dict(example_weight=example_weight, channels_per_group=channels_per_group)
    assert_close(layer(x), eval_reference(layer, x, **hyper), dtype, count=count, what="y")
    dx = layer.backward(dy)
    check_backward(layer, dx, eval_reference(layer, x, dy, **hyper), dtype, count, assert_close)


def test_eval_without_example_weighing_is_batch_norm_eval(rng, assert_close):
    layer = ghost(3, 2)
    layer.weight[...], layer.bias[...] = [0.6, 1.1, 1.4], [0.2, -0.1, 0.5]
    set_running_stats(layer, rng)
    layer.eval()
    x = make_input(rng, (3, 3, 7, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    kw = dict(weight=layer.weight, bias=layer.bias, running_mean=layer.running_mean,
              running_var=layer.running_var, training=False)
    assert_close(layer(x), ref.batch_norm(x, **kw), np.float64, what="y")
    check_backward(layer, layer.backward(dy), ref.batch_norm_backward(x, dy, **kw), np.float64, 1,
                   assert_close)


def test_example_weight_is_an_attribute_tuned_after_training(rng, assert_close):
    layer = ghost(6, 2, channels_per_group=2)
    for _ in range(3):
        layer(make_input(rng, (5, 6, 4, 5), np.float64))
    layer.eval()
    x = make_input(rng, (4, 6, 4, 5), np.float64)
    assert layer.example_weight == 0.0
    outputs = []
    for alpha in (0.0, 0.6, 1.0):
        layer.example_weight = alpha
        outputs.append(layer(x))
        assert layer.example_weight == alpha
        assert_close(outputs[-1], eval_reference(layer, x, example_weight=alpha), np.float64,
                     what=f"alpha {alpha}")
    assert not np.allclose(outputs[0], outputs[1])  # the attribute is read at every call


def test_eval_with_full_example_weight_is_per_sample_group_statistics(rng, assert_close):
    # alpha=1: mu_i, var_i are the sample's own over its group: GroupNorm, running stats unused.
    layer = ghost(6, 2, channels_per_group=3, example_weight=1.0, affine=False)
    set_running_stats(layer, rng)
    layer.eval()
    x = make_input(rng, (3, 6, 7, 5), np.float64)
    assert_close(layer(x), ref.group_norm(x, 2), np.float64, what="y")


@pytest.mark.parametrize("shape, ghost_batch_size, channels_per_group", [
    train_case((4, 4, 2, 3), 3, 2), train_case((3, 2, 2, 3), 2, 1), train_case((2, 1, 3, 2), 1, 1)])
def test_float64_training_backward_equals_finite_differences(
        shape, ghost_batch_size, channels_per_group, rng, randomize_affine,
        check_gradients_by_finite_differences):
    layer = ghost(shape[1], ghost_batch_size, channels_per_group=channels_per_group)
    randomize_affine(layer)
    x = make_input(rng, shape, np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


@pytest.mark.parametrize("shape, channels_per_group, example_weight", [
    eval_case((3, 4, 2, 3), 1, 0.0), eval_case((3, 4, 2, 3), 2, 0.5),
    eval_case((2, 4, 2, 3), 4, 1.0), eval_case((1, 2, 3, 1), 1, 0.3)])
def test_float64_eval_backward_equals_finite_differences(
        shape, channels_per_group, example_weight, rng, randomize_affine,
        check_gradients_by_finite_differences):
    layer = ghost(shape[1], 2, channels_per_group=channels_per_group,
                  example_weight=example_weight)
    randomize_affine(layer)
    set_running_stats(layer, rng)
    layer.eval()
    x = make_input(rng, shape, np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


# -- what is rejected, and the defaults -----------------------------------------------------------

@pytest.mark.parametrize("argument, kwargs", [
    pytest.param("ghost_batch_size", dict(ghost_batch_size=0), id="ghost_batch_size=0"),
    pytest.param("ghost_batch_size", dict(ghost_batch_size=-2), id="ghost_batch_size=-2"),
    pytest.param("example_weight", dict(example_weight=-0.1), id="example_weight=-0.1"),
    pytest.param("example_weight", dict(example_weight=1.5), id="example_weight=1.5"),
    pytest.param("channels_per_group", dict(channels_per_group=4), id="channels_per_group=4-of-6"),
    pytest.param("channels_per_group", dict(channels_per_group=0), id="channels_per_group=0"),
])
def test_hyperparameters_outside_their_domain_raise_naming_them(argument, kwargs):
    kwargs = {"ghost_batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=argument):
        normkit.GhostBatchNorm2d(6, **kwargs)


@pytest.mark.parametrize("bad", [-0.5, 1.01])
def test_setting_example_weight_outside_0_1_raises_naming_it_and_keeps_the_old_value(bad):
    layer = normkit.GhostBatchNorm2d(6, 2, example_weight=0.3)
    with pytest.raises(ValueError, match="example_weight"):
        layer.example_weight = bad
    assert layer.example_weight == 0.3


def test_defaults():
    layer = normkit.GhostBatchNorm2d(6, 4)
    assert layer.ghost_batch_size == 4 and layer.channels_per_group == 1
    assert layer.example_weight == 0.0 and layer.eps == 1e-5 and layer.momentum == 0.1
    assert layer.training and layer.dtype == np.float32


# -- state, dtypes, layouts, strides, threads -----------------------------------------------------

STATE_KEYS = [("weight", (6,)), ("bias", (6,)), ("running_mean", (6,)), ("running_var", (6,)),
              ("num_batches_tracked", ())]


def prepared(dtype, seed=0, channels_per_group=2, **kw):
    rng = np.random.default_rng(seed)
    layer = ghost(6, 2, dtype, channels_per_group=channels_per_group, example_weight=0.4, **kw)
    for p in layer.parameters().values():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    set_running_stats(layer, rng)
    return layer


def reference_of(layer, x, dy, training):
    if training:
        return train_reference(layer, x), train_reference(layer, x, dy)
    # prepared() layers: ghost batches of 2, example_weight 0.4
    return (eval_reference(layer, x, example_weight=0.4),
            eval_reference(layer, x, dy, example_weight=0.4))


def test_state_dict_keys_and_shapes_follow_the_api_table():
    layer = ghost(6, 2, channels_per_group=3)
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == STATE_KEYS
    assert set(layer.parameters()) == {"weight", "bias"}


@FLOAT_DTYPES
def test_state_dict_round_trip_reproduces_the_layer(dtype, rng):
    fresh = ghost(6, 2, dtype, channels_per_group=2, example_weight=0.4)
    assert_state_dict_round_trip(prepared(dtype), fresh, rng, (5, 6, 4, 5), dtype)


@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("channels_per_group", [1, 2], ids=["cpg1", "cpg2"])
@MODE
def test_half_input_is_computed_in_float32(half, channels_per_group, training):
    hdt = half_dtype(half)
    layer = prepared(np.float32, channels_per_group=channels_per_group).train(training)
    rng = np.random.default_rng(1)
    x = (3.0 + rng.standard_normal((5, 6, 7, 9))).astype(hdt)
    dy = rng.standard_normal(x.shape).astype(hdt)
    want_y, want = reference_of(layer, x, dy, training)
    check_half_input(layer, x, dy, want_y, want, half)


@pytest.mark.parametrize("channels_per_group", [1, 3], ids=["cpg1", "cpg3"])
@MODE
def test_channels_last_matches_channels_first_and_the_reference(channels_per_group, training,
                                                                dtype, assert_close):
    first = prepared(dtype, channels_per_group=channels_per_group).train(training)
    last = prepared(dtype, channels_per_group=channels_per_group, layout="NHWC").train(training)
    rng = np.random.default_rng(2)
    x = make_input(rng, (5, 6, 7, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    want_y, want = reference_of(first, x, dy, training)
    check_channels_last(first, last, x, dy, want_y, want, dtype, assert_close)


VIEWS = {**VIEWS, "sample-sliced": lambda rng, dt: make_input(rng, (10, 6, 7, 5), dt)[::2]}


@pytest.mark.parametrize("view", list(VIEWS))
@MODE
def test_non_contiguous_input_gives_the_result_of_its_copy(view, training, dtype, rng,
                                                           assert_close):
    check_view_matches_copy(VIEWS[view](rng, dtype), lambda: prepared(dtype).train(training),
                            rng, dtype, assert_close)


THREAD_SHAPE = (5, 6, 55, 57)  # planes of 3135 = 2048 + 1087 entries; ghost batches 2, 2, 1


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("channels_per_group", [1, 2], ids=["cpg1", "cpg2"])
@MODE
def test_bitwise_identical_for_one_and_two_threads(layout, channels_per_group, training, dtype):
    assert_bitwise_same_for_1_and_2_threads(
        lambda: prepared(dtype, channels_per_group=channels_per_group, layout=layout)
        .train(training), THREAD_SHAPE, dtype, layout)
