"""ExtendedBatchNorm2d (EBN) and ModalityBatchNorm2d (MBN) against the float64 references
(reference.py), issue 10.

Spec, EBN (arXiv 2003.05569): the mean per channel over (N, H, W), as BatchNorm; one variance
for the whole layer, sigma2 = mean over (N, C, H, W) of (x - mu_c)^2; y = w_c (x - mu_c) /
sqrt(sigma2 + eps) + b_c. running_mean (C,), running_var (1,) moved toward the unbiased
sigma2 * M/(M-1), M = N*C*H*W (momentum=None: the cumulative average). Eval normalizes with the
running values; track_running_stats=False uses batch statistics in eval too.

Spec, MBN (arXiv 2103.04778): layer(x, modality), modality an integer (N,) array in
[0, num_modalities), in training and eval. Statistics per (modality, channel) over that modality's
samples and (H, W), whatever order the samples come in; one shared affine, or one per modality
(separate_affine=True, shape (num_modalities, C)). Running statistics (num_modalities, C); eval
normalizes each sample with its own modality's running statistics; a modality absent from a batch
keeps its running statistics. A modality with a single value per channel in training raises; a
wrong `modality` (length, dtype, range) raises naming it before anything changes.

Tolerances are conftest's policy; the float32 count is the length of the longest reduction (EBN's
variance runs over all N*C*H*W entries).
"""
import numpy as np
import pytest

import normkit
import reference as ref
from variant_checks import (AFFINE, FLOAT_DTYPES, HALF_EPS, MODE, VIEWS,
                            assert_bitwise_same_for_1_and_2_threads, assert_same_state,
                            assert_state_dict_round_trip, assert_state_unchanged, bind_extra,
                            check_backward, check_channels_last, check_half_input,
                            check_view_matches_copy, half_dtype, make_input, planes,
                            randomize_affine_or_none, shape_id, shapes, snapshot)


# =================================================================================================
# ExtendedBatchNorm2d
# =================================================================================================

# Training needs more than one value per channel; N=1, C=1, 7x5 planes, 1x1 planes, C=23/33 (vector
# tails) and planes around the 2048-entry chunk (45*47 = 2115).
EBN_TRAIN_SHAPES = shapes((2, 3, 7, 5), (1, 3, 7, 5), (4, 1, 7, 5), (1, 1, 7, 5), (3, 23, 1, 1),
                          (2, 33, 3, 4), (2, 3, 45, 47))
EBN_EVAL_SHAPES = EBN_TRAIN_SHAPES[:5] + shapes((1, 3, 1, 1), (1, 1, 1, 1))


def ebn(C, dtype, **kw):
    return normkit.ExtendedBatchNorm2d(C, dtype=dtype, **kw)


def ebn_dx_scale(layer, x, dy):
    """The size of the terms a training dx is a difference of: r*|dy*w|, r the layer's one rstd."""
    _, var = ref.extended_batch_stats(x)
    w = 1.0 if layer.weight is None else np.abs(ref.f64(layer.weight)).reshape(1, -1, 1, 1)
    return float(np.max(np.abs(ref.f64(dy)) * w)) / np.sqrt(var + layer.eps)


def ebn_eval_reference(layer, x, dy=None):
    """Eval: BatchNorm's eval with the one running variance given to every channel."""
    C = x.shape[1]
    kw = dict(weight=layer.weight, bias=layer.bias, eps=layer.eps, training=False,
              running_mean=layer.running_mean,
              running_var=np.full(C, float(np.asarray(layer.running_var).reshape(-1)[0])))
    return ref.batch_norm(x, **kw) if dy is None else ref.batch_norm_backward(x, dy, **kw)


def set_ebn_running_stats(layer, rng):
    layer.running_mean[...] = rng.uniform(-1, 1, layer.num_features)
    layer.running_var[...] = rng.uniform(0.5, 2.0, 1)


@pytest.mark.parametrize("shape", EBN_TRAIN_SHAPES)
@AFFINE
def test_ebn_training_forward_and_backward_match_the_reference(shape, affine, dtype, rng,
                                                               randomize_affine, assert_close):
    layer = randomize_affine_or_none(ebn(shape[1], dtype, affine=affine), affine, randomize_affine)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref.extended_batch_norm(x, layer.weight, layer.bias, layer.eps), dtype,
                 count=x.size, what="y")
    dx = layer.backward(dy)
    want = ref.extended_batch_norm_backward(x, dy, layer.weight, layer.bias, layer.eps)
    check_backward(layer, dx, want, dtype, x.size, assert_close, ebn_dx_scale(layer, x, dy))


@pytest.mark.parametrize("shape", EBN_EVAL_SHAPES)
@AFFINE
def test_ebn_eval_normalizes_with_the_running_mean_and_the_one_running_variance(
        shape, affine, dtype, rng, randomize_affine, assert_close):
    layer = randomize_affine_or_none(ebn(shape[1], dtype, affine=affine), affine, randomize_affine)
    set_ebn_running_stats(layer, rng)
    layer.eval()
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), ebn_eval_reference(layer, x), dtype, what="y")
    dx = layer.backward(dy)
    check_backward(layer, dx, ebn_eval_reference(layer, x, dy), dtype, x.size, assert_close)


def test_ebn_with_one_channel_is_batch_norm(rng, assert_close):
    # One channel: the layer-wide variance is that channel's own, so EBN == BatchNorm2d.
    x = make_input(rng, (3, 1, 7, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    layer = ebn(1, np.float64)
    layer.weight[...], layer.bias[...] = 1.3, -0.4
    assert_close(layer(x), ref.batch_norm(x, layer.weight, layer.bias), np.float64, what="y")
    want = ref.batch_norm_backward(x, dy, layer.weight, layer.bias)
    check_backward(layer, layer.backward(dy), want, np.float64, x.size, assert_close)


def test_ebn_shares_one_variance_across_channels(rng, assert_close):
    # Channels of spread 1 and 3 around different means: after EBN (no affine, eps=0) the
    # per-channel means are 0, and the spreads keep their ratio (BatchNorm would equalize them);
    # the mean over channels of the per-channel (biased) variances is exactly 1.
    x = np.concatenate([5 + rng.standard_normal((4, 1, 7, 5)),
                        -2 + 3 * rng.standard_normal((4, 1, 7, 5))], axis=1)
    y = ebn(2, np.float64, affine=False, eps=0.0)(x)
    per_channel_var = y.var(axis=(0, 2, 3))
    assert_close(y.mean(axis=(0, 2, 3)), np.zeros(2), np.float64, what="channel means")
    assert_close(per_channel_var.mean(), 1.0, np.float64, what="mean of the channel variances")
    assert_close(per_channel_var[1] / per_channel_var[0], x[:, 1].var() / x[:, 0].var(),
                 np.float64, what="spread ratio")


@pytest.mark.parametrize("shape", shapes((2, 3, 2, 3), (1, 2, 3, 2), (3, 1, 2, 2)))
@MODE
@AFFINE
def test_ebn_float64_backward_equals_finite_differences(shape, training, affine, rng,
                                                        randomize_affine,
                                                        check_gradients_by_finite_differences):
    layer = randomize_affine_or_none(ebn(shape[1], np.float64, affine=affine), affine,
                                     randomize_affine)
    set_ebn_running_stats(layer, rng)
    layer.train(training)
    x = make_input(rng, shape, np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


@pytest.mark.parametrize("momentum", [0.1, 0.75, None], ids=["momentum0.1", "momentum0.75",
                                                             "cumulative"])
@pytest.mark.parametrize("shape", shapes((2, 3, 7, 5), (1, 1, 7, 5), (4, 23, 2, 3)))
def test_ebn_running_statistics_over_steps(shape, momentum, dtype, rng, assert_close):
    # running_mean follows the per-channel batch means; running_var (shape (1,)) follows the one
    # variance made unbiased over all M = N*C*H*W entries: sigma2 * M/(M - 1).
    layer = ebn(shape[1], dtype, momentum=momentum)
    assert layer.running_mean.shape == (shape[1],) and layer.running_var.shape == (1,)
    want_mean, want_var = np.zeros(shape[1]), np.ones(1)
    for step in range(1, 5):
        x = make_input(rng, shape, dtype) + step  # drifting statistics
        layer(x)
        xf = x.astype(np.float64)
        mu = xf.mean(axis=(0, 2, 3))
        M = xf.size
        sigma2 = float(((xf - mu.reshape(1, -1, 1, 1)) ** 2).sum() / M)
        factor = 1.0 / step if momentum is None else momentum
        want_mean = ref.running_update(want_mean, mu, factor)
        want_var = ref.running_update(want_var, [sigma2 * M / (M - 1)], factor)
        assert int(layer.num_batches_tracked) == step
        assert layer.running_mean.dtype == dtype and layer.running_var.dtype == dtype
        assert_close(layer.running_mean, want_mean, dtype, count=M,
                     what=f"running_mean, step {step}")
        assert_close(layer.running_var, want_var, dtype, count=M, what=f"running_var, step {step}")


def test_ebn_eval_leaves_running_statistics_alone(rng):
    layer = ebn(3, np.float64)
    layer(make_input(rng, (2, 3, 4, 5), np.float64))
    before = layer.state_dict()
    layer.eval()
    for _ in range(2):
        layer(make_input(rng, (2, 3, 4, 5), np.float64))
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


@MODE
def test_ebn_without_running_statistics_uses_batch_statistics_in_eval_too(training, dtype, rng,
                                                                          randomize_affine,
                                                                          assert_close):
    layer = ebn(3, dtype, track_running_stats=False)
    randomize_affine(layer)
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer.train(training)
    x = make_input(rng, (2, 3, 7, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert_close(layer(x), ref.extended_batch_norm(x, layer.weight, layer.bias), dtype,
                 count=x.size, what="y")
    want = ref.extended_batch_norm_backward(x, dy, layer.weight, layer.bias)
    check_backward(layer, layer.backward(dy), want, dtype, x.size, assert_close,
                   ebn_dx_scale(layer, x, dy))


# =================================================================================================
# ModalityBatchNorm2d
# =================================================================================================

def mbn_case(shape, num_modalities, modality, label):
    return pytest.param(shape, num_modalities, np.array(modality, np.int64),
                        id=f"{shape_id(shape)}-M{num_modalities}-{label}")


# Modalities interleaved in any order, one absent, one of a single sample (35 values per channel),
# C=1, a single modality, four modalities over seven samples.
MBN_CASES = [
    mbn_case((5, 3, 7, 5), 2, [1, 0, 1, 1, 0], "interleaved"),
    mbn_case((6, 4, 3, 5), 3, [2, 0, 2, 0, 0, 2], "modality1-absent"),
    mbn_case((3, 2, 7, 5), 2, [0, 1, 0], "one-sample-modality"),
    mbn_case((4, 1, 7, 5), 2, [0, 1, 1, 0], "C1"),
    mbn_case((3, 3, 4, 5), 1, [0, 0, 0], "one-modality"),
    mbn_case((7, 23, 2, 3), 4, [3, 1, 0, 3, 2, 1, 0], "four-shuffled"),
]
# Eval needs no batch statistics: N=1 and 1x1 planes are legal there.
MBN_EVAL_CASES = MBN_CASES[:4] + [mbn_case((1, 3, 1, 1), 2, [1], "N1-1x1"),
                                  mbn_case((3, 2, 1, 1), 3, [2, 0, 2], "1x1")]
SEPARATE = pytest.mark.parametrize("separate_affine", [False, True], ids=["shared_affine",
                                                                          "separate_affine"])


def mbn(C, num_modalities, dtype, **kw):
    return normkit.ModalityBatchNorm2d(C, num_modalities=num_modalities, dtype=dtype, **kw)


def set_mbn_running_stats(layer, rng):
    layer.running_mean[...] = rng.uniform(-1, 1, layer.running_mean.shape)
    layer.running_var[...] = rng.uniform(0.5, 2.0, layer.running_var.shape)


def mbn_dx_scale(layer, x, dy, modality):
    """r*|dy*w| with r the rstd of each (modality, channel): the terms a training dx cancels."""
    scale = 0.0
    for m in np.unique(modality):
        rows = modality == m
        w = 1.0 if layer.weight is None else np.abs(ref.f64(
            layer.weight if layer.weight.ndim == 1 else layer.weight[m])).reshape(1, -1, 1, 1)
        scale = max(scale, float(np.max(ref.rstd(x[rows], (0, 2, 3), layer.eps)
                                        * np.abs(ref.f64(dy[rows])) * w)))
    return scale


def mbn_eval_reference(layer, x, modality, dy=None):
    """Eval: each sample is BatchNorm's eval with its own modality's running statistics (and its
    modality's affine row where the affine is separate)."""
    def row(p, m):
        return None if p is None else (p if p.ndim == 1 else p[m])
    outs = []
    for i, m in enumerate(modality):
        kw = dict(weight=row(layer.weight, m), bias=row(layer.bias, m), eps=layer.eps,
                  running_mean=layer.running_mean[m], running_var=layer.running_var[m],
                  training=False)
        if dy is None:
            outs.append(ref.batch_norm(x[i:i + 1], **kw))
        else:
            outs.append(ref.batch_norm_backward(x[i:i + 1], dy[i:i + 1], **kw))
    if dy is None:
        return np.concatenate(outs)
    dx = np.concatenate([o[0] for o in outs])
    if layer.weight is None:
        return dx, None, None
    dw, db = np.zeros(layer.weight.shape), np.zeros(layer.bias.shape)
    for (_, w_i, b_i), m in zip(outs, modality):
        if dw.ndim == 1:
            dw += w_i
            db += b_i
        else:
            dw[m] += w_i
            db[m] += b_i
    return dx, dw, db


@pytest.mark.parametrize("shape, num_modalities, modality", MBN_CASES)
@SEPARATE
def test_mbn_training_forward_and_backward_match_the_reference(shape, num_modalities, modality,
                                                               separate_affine, dtype, rng,
                                                               randomize_affine, assert_close):
    layer = mbn(shape[1], num_modalities, dtype, separate_affine=separate_affine)
    params = randomize_affine(layer)
    want_shape = (num_modalities, shape[1]) if separate_affine else (shape[1],)
    assert params["weight"].shape == want_shape and params["bias"].shape == want_shape
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = layer(x, modality)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref.modality_batch_norm(x, modality, num_modalities, layer.weight, layer.bias,
                                            layer.eps), dtype, count=planes(shape), what="y")
    dx = layer.backward(dy)  # the modality of the last forward
    want = ref.modality_batch_norm_backward(x, dy, modality, num_modalities, layer.weight,
                                            layer.bias, layer.eps)
    check_backward(layer, dx, want, dtype, planes(shape), assert_close,
                   mbn_dx_scale(layer, x, dy, modality))
    assert layer.grads["weight"].shape == want_shape


@pytest.mark.parametrize("shape, num_modalities, modality", MBN_CASES[:1])
def test_mbn_without_affine_has_no_parameters(shape, num_modalities, modality, dtype, rng,
                                              assert_close):
    layer = mbn(shape[1], num_modalities, dtype, affine=False)
    assert layer.weight is None and layer.parameters() == {}
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x, modality), ref.modality_batch_norm(x, modality, num_modalities), dtype,
                 what="y")
    want = ref.modality_batch_norm_backward(x, dy, modality, num_modalities)
    check_backward(layer, layer.backward(dy), want, dtype, planes(shape), assert_close,
                   mbn_dx_scale(layer, x, dy, modality))


@pytest.mark.parametrize("shape, num_modalities, modality", MBN_EVAL_CASES)
@SEPARATE
def test_mbn_eval_normalizes_each_sample_with_its_modality_running_statistics(
        shape, num_modalities, modality, separate_affine, dtype, rng, randomize_affine,
        assert_close):
    layer = mbn(shape[1], num_modalities, dtype, separate_affine=separate_affine)
    randomize_affine(layer)
    set_mbn_running_stats(layer, rng)
    assert layer.eval() is layer
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x, modality), mbn_eval_reference(layer, x, modality), dtype, what="y")
    dx = layer.backward(dy)
    check_backward(layer, dx, mbn_eval_reference(layer, x, modality, dy), dtype, planes(shape),
                   assert_close)


@pytest.mark.parametrize("separate_affine", [False, True], ids=["shared_affine", "separate_affine"])
def test_mbn_the_order_of_the_samples_does_not_matter(separate_affine, rng, randomize_affine,
                                                      assert_close):
    # Statistics per modality "whatever order the samples come in": permuting the batch (with
    # its modality) permutes y and dx, and leaves the parameter gradients and running statistics.
    x = make_input(rng, (6, 3, 4, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    modality = np.array([1, 0, 2, 1, 0, 2])
    perm = np.array([3, 5, 1, 0, 2, 4])
    layers = [mbn(3, 3, np.float64, separate_affine=separate_affine) for _ in range(2)]
    randomize_affine(layers[0])
    layers[1].load_state_dict(layers[0].state_dict())
    y, y_p = layers[0](x, modality), layers[1](x[perm], modality[perm])
    assert_close(y_p, y[perm], np.float64, what="y")
    assert_close(layers[1].backward(dy[perm]), layers[0].backward(dy)[perm], np.float64, what="dx")
    for key in ("weight", "bias"):
        assert_close(layers[1].grads[key], layers[0].grads[key], np.float64, what=f"d{key}")
    for key in ("running_mean", "running_var"):
        assert_close(getattr(layers[1], key), getattr(layers[0], key), np.float64, what=key)


def test_mbn_with_one_modality_is_batch_norm(rng, assert_close):
    x = make_input(rng, (4, 3, 7, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    ours, bn = mbn(3, 1, np.float64), normkit.BatchNorm2d(3, dtype=np.float64)
    for layer in (ours, bn):
        layer.weight[...] = [0.7, 1.2, 1.5]
        layer.bias[...] = [0.1, -0.3, 0.2]
    modality = np.zeros(4, np.int64)
    for _ in range(2):
        assert_close(ours(x, modality), bn(x), np.float64, what="y")
        assert_close(ours.backward(dy), bn.backward(dy), np.float64, what="dx")
        for key in ("weight", "bias"):
            assert_close(ours.grads[key], bn.grads[key], np.float64, what=f"d{key}")
        assert_close(ours.running_mean, bn.running_mean.reshape(1, 3), np.float64, what="mean")
        assert_close(ours.running_var, bn.running_var.reshape(1, 3), np.float64, what="var")
        x = x + 1.0


@pytest.mark.parametrize("momentum", [0.1, 0.5], ids=["momentum0.1", "momentum0.5"])
def test_mbn_running_statistics_per_modality_over_steps(momentum, dtype, rng, assert_close):
    # Per (modality, channel): toward that modality's mean and unbiased variance; a modality
    # absent from a batch (modality 2 at step 1, modality 1 at step 2) keeps its values.
    steps = [np.array([1, 0, 1, 1, 0]), np.array([0, 0, 2, 0, 2]), np.array([2, 1, 0, 1, 2])]
    layer = mbn(3, 3, dtype, momentum=momentum)
    assert layer.running_mean.shape == layer.running_var.shape == (3, 3)
    want_mean, want_var = np.zeros((3, 3)), np.ones((3, 3))
    for step, modality in enumerate(steps, start=1):
        offset = 2.0 * modality.reshape(-1, 1, 1, 1)  # each modality its own statistics
        x = (make_input(rng, (5, 3, 7, 5), dtype) + offset).astype(dtype)
        layer(x, modality)
        mean, var = ref.modality_batch_stats(x, modality, 3)
        for m in np.unique(modality):
            want_mean[m] = ref.running_update(want_mean[m], mean[m], momentum)
            want_var[m] = ref.running_update(want_var[m], var[m], momentum)
        assert int(layer.num_batches_tracked) == step
        assert layer.num_batches_tracked.shape == ()
        assert_close(layer.running_mean, want_mean, dtype, what=f"running_mean, step {step}")
        assert_close(layer.running_var, want_var, dtype, what=f"running_var, step {step}")


def test_mbn_cumulative_average_is_the_plain_mean_of_each_modality_batch_statistics(
        rng, assert_close):
    # momentum=None with every modality in every batch: after k steps each modality's running
    # statistics are the unweighted average of its k batch statistics, as torch's BatchNorm.
    layer = mbn(3, 2, np.float64, momentum=None)
    stats = []
    for step in range(4):
        modality = np.array([1, 0, 1, 1, 0]) if step % 2 else np.array([0, 1, 0, 0, 1])
        x = make_input(rng, (5, 3, 4, 5), np.float64) + step
        layer(x, modality)
        stats.append(ref.modality_batch_stats(x, modality, 2))
    assert_close(layer.running_mean, np.mean([m for m, _ in stats], axis=0), np.float64,
                 what="running_mean")
    assert_close(layer.running_var, np.mean([v for _, v in stats], axis=0), np.float64,
                 what="running_var")
    assert int(layer.num_batches_tracked) == 4


def test_mbn_cumulative_average_continues_after_a_state_dict_round_trip(rng):
    # The state_dict is the whole state: a fresh layer loading it goes on averaging exactly as
    # the original does (momentum=None weighs the next batch by what was counted so far).
    modality = np.array([1, 0, 1, 1, 0])
    trained = mbn(3, 2, np.float64, momentum=None)
    for step in range(3):
        trained(make_input(rng, (5, 3, 4, 5), np.float64) + step, modality)
    fresh = mbn(3, 2, np.float64, momentum=None).load_state_dict(trained.state_dict())
    x = make_input(rng, (5, 3, 4, 5), np.float64) + 3
    trained(x, modality)
    fresh(x, modality)
    assert_same_state(fresh, trained)


@MODE
def test_mbn_without_running_statistics_uses_batch_statistics_in_eval_too(training, dtype, rng,
                                                                          randomize_affine,
                                                                          assert_close):
    layer = mbn(3, 2, dtype, track_running_stats=False)
    randomize_affine(layer)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer.train(training)
    x = make_input(rng, (5, 3, 7, 5), dtype)
    modality = np.array([1, 0, 1, 1, 0])
    assert_close(layer(x, modality), ref.modality_batch_norm(x, modality, 2, layer.weight,
                                                             layer.bias), dtype, what="y")


def test_mbn_an_absent_modality_keeps_its_running_statistics_bit_for_bit(rng):
    layer = mbn(3, 2, np.float32)
    layer(make_input(rng, (4, 3, 2, 3), np.float32), np.array([0, 1, 0, 1]))
    before_mean, before_var = layer.running_mean[1].copy(), layer.running_var[1].copy()
    layer(make_input(rng, (4, 3, 2, 3), np.float32), np.zeros(4, np.int64))
    np.testing.assert_array_equal(layer.running_mean[1], before_mean)
    np.testing.assert_array_equal(layer.running_var[1], before_var)


@pytest.mark.parametrize("shape, num_modalities, modality", [
    mbn_case((2, 4, 2, 3), 2, [0, 1], "one-sample-each"),
    mbn_case((4, 3, 3, 1), 3, [2, 0, 2, 1], "three"),
])
@MODE
@SEPARATE
def test_mbn_float64_backward_equals_finite_differences(shape, num_modalities, modality, training,
                                                        separate_affine, rng, randomize_affine,
                                                        check_gradients_by_finite_differences):
    layer = mbn(shape[1], num_modalities, np.float64, separate_affine=separate_affine)
    randomize_affine(layer)
    set_mbn_running_stats(layer, rng)
    layer.train(training)
    x = make_input(rng, shape, np.float64)
    check_gradients_by_finite_differences(bind_extra(layer, modality), x,
                                          rng.standard_normal(shape))


# -- what MBN rejects -----------------------------------------------------------------------------

BAD_MODALITIES = {
    "too-short": lambda: np.array([0, 1, 0, 1]),
    "too-long": lambda: np.array([0, 1, 0, 1, 0, 1]),
    "2-D": lambda: np.array([[0, 1, 0, 1, 0]]),
    "scalar": lambda: np.array(1),
    "float": lambda: np.array([0.0, 1.0, 0.0, 1.0, 0.0]),
    "negative": lambda: np.array([0, 1, -1, 1, 0]),
    "equal-to-num_modalities": lambda: np.array([0, 1, 2, 1, 0]),
}


@pytest.mark.parametrize("bad", list(BAD_MODALITIES))
@MODE
def test_mbn_rejects_a_wrong_modality_naming_it_and_changes_nothing(bad, training, rng):
    layer = mbn(3, 2, np.float32)
    x = make_input(rng, (5, 3, 4, 5), np.float32)
    layer(x, np.array([1, 0, 1, 1, 0]))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    before = snapshot(layer)
    layer.train(training)
    exc = (TypeError, ValueError) if bad == "float" else ValueError
    with pytest.raises(exc, match="modality"):
        layer(x, BAD_MODALITIES[bad]())
    assert_state_unchanged(layer, before)
    # The saved forward is still the last accepted one.
    np.testing.assert_array_equal(layer.backward(dy), dx)


def test_mbn_training_with_a_single_value_per_channel_in_a_modality_raises(rng):
    # Modality 1 has one sample of 1x1 planes: one value per channel, no variance to take.
    layer = mbn(2, 2, np.float32)
    layer(make_input(rng, (4, 2, 1, 1), np.float32), np.array([0, 1, 1, 0]))
    before = snapshot(layer)
    x = make_input(rng, (3, 2, 1, 1), np.float32)
    with pytest.raises(ValueError):
        layer(x, np.array([0, 1, 0]))
    assert_state_unchanged(layer, before)
    # Eval needs no batch statistics: the same batch is fine there.
    assert layer.eval()(x, np.array([0, 1, 0])).shape == x.shape


@pytest.mark.parametrize("num_modalities", [0, -1])
def test_mbn_rejects_num_modalities_below_one(num_modalities):
    with pytest.raises(ValueError, match="num_modalities"):
        normkit.ModalityBatchNorm2d(3, num_modalities=num_modalities)


def test_mbn_defaults():
    layer = normkit.ModalityBatchNorm2d(4)
    assert layer.num_modalities == 2 and layer.eps == 1e-5 and layer.momentum == 0.1
    assert layer.weight.shape == (4,) and layer.running_mean.shape == (2, 4)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert layer.num_batches_tracked.dtype == np.int64 and int(layer.num_batches_tracked) == 0


# =================================================================================================
# Both layers: state, dtypes, layouts, strides, threads
# =================================================================================================

MODALITY5 = np.array([1, 0, 1, 1, 0])

# name -> (make(dtype, **kw), extra forward arguments, input shape, state_dict keys with shapes)
LAYERS = {
    "EBN": (lambda dt, **kw: ebn(6, dt, **kw), (), (5, 6, 7, 5),
            [("weight", (6,)), ("bias", (6,)), ("running_mean", (6,)), ("running_var", (1,)),
             ("num_batches_tracked", ())]),
    "MBN": (lambda dt, **kw: mbn(6, 2, dt, **kw), (MODALITY5,), (5, 6, 7, 5),
            [("weight", (6,)), ("bias", (6,)), ("running_mean", (2, 6)), ("running_var", (2, 6)),
             ("num_batches_tracked", ())]),
    "MBN-separate_affine": (lambda dt, **kw: mbn(6, 2, dt, separate_affine=True, **kw),
                            (MODALITY5,), (5, 6, 7, 5),
                            [("weight", (2, 6)), ("bias", (2, 6)), ("running_mean", (2, 6)),
                             ("running_var", (2, 6)), ("num_batches_tracked", ())]),
}
LAYER_NAMES = pytest.mark.parametrize("name", list(LAYERS))


def prepared(name, dtype, seed=0, **kw):
    """A layer with non-trivial parameters and running statistics."""
    rng = np.random.default_rng(seed)
    layer = LAYERS[name][0](dtype, **kw)
    for p in layer.parameters().values():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    layer.running_mean[...] = rng.uniform(-1, 1, layer.running_mean.shape)
    layer.running_var[...] = rng.uniform(0.5, 2, layer.running_var.shape)
    return layer


def reference_of(name, layer, x, dy, training):
    """(y, (dx, dweight, dbias)) of the reference for the layer's current state."""
    w, b, eps = layer.weight, layer.bias, layer.eps
    if name == "EBN":
        if not training:
            return ebn_eval_reference(layer, x), ebn_eval_reference(layer, x, dy)
        return (ref.extended_batch_norm(x, w, b, eps),
                ref.extended_batch_norm_backward(x, dy, w, b, eps))
    modality = LAYERS[name][1][0]
    if not training:
        return mbn_eval_reference(layer, x, modality), mbn_eval_reference(layer, x, modality, dy)
    return (ref.modality_batch_norm(x, modality, 2, w, b, eps),
            ref.modality_batch_norm_backward(x, dy, modality, 2, w, b, eps))


@LAYER_NAMES
def test_state_dict_keys_and_shapes_follow_the_api_table(name):
    state = LAYERS[name][0](np.float32).state_dict()
    assert [(k, v.shape) for k, v in state.items()] == LAYERS[name][3]
    assert set(LAYERS[name][0](np.float32).parameters()) == {"weight", "bias"}


@LAYER_NAMES
@FLOAT_DTYPES
def test_state_dict_round_trip_reproduces_the_layer(name, dtype, rng):
    make, extra, shape, _ = LAYERS[name]
    assert_state_dict_round_trip(make(dtype), make(dtype), rng, shape, dtype, extra)


@LAYER_NAMES
@pytest.mark.parametrize("half", list(HALF_EPS))
@MODE
def test_half_input_is_computed_in_float32(name, half, training):
    hdt = half_dtype(half)
    _, extra, shape, _ = LAYERS[name]
    layer = prepared(name, np.float32).train(training)
    rng = np.random.default_rng(1)
    x = (3.0 + rng.standard_normal(shape)).astype(hdt)
    dy = rng.standard_normal(shape).astype(hdt)
    want_y, want = reference_of(name, layer, x, dy, training)
    check_half_input(layer, x, dy, want_y, want, half, extra)
    assert layer.running_mean.dtype == np.float32


@LAYER_NAMES
@MODE
def test_channels_last_matches_channels_first_and_the_reference(name, training, dtype,
                                                                assert_close):
    _, extra, shape, _ = LAYERS[name]
    first = prepared(name, dtype).train(training)
    last = prepared(name, dtype, layout="NHWC").train(training)
    rng = np.random.default_rng(2)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    want_y, want = reference_of(name, first, x, dy, training)
    check_channels_last(first, last, x, dy, want_y, want, dtype, assert_close, extra)


@LAYER_NAMES
@pytest.mark.parametrize("view", list(VIEWS))
@MODE
def test_non_contiguous_input_gives_the_result_of_its_copy(name, view, training, dtype, rng,
                                                           assert_close):
    _, extra, _, _ = LAYERS[name]
    check_view_matches_copy(VIEWS[view](rng, dtype),
                            lambda: prepared(name, dtype).train(training), rng, dtype,
                            assert_close, extra)


# Large enough to go parallel: planes of 55*57 = 3135 entries (a chunk and a ragged tail).
THREAD_SHAPE = (5, 6, 55, 57)


@LAYER_NAMES
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@MODE
def test_bitwise_identical_for_one_and_two_threads(name, layout, training, dtype):
    _, extra, _, _ = LAYERS[name]
    assert_bitwise_same_for_1_and_2_threads(
        lambda: prepared(name, dtype, layout=layout).train(training), THREAD_SHAPE, dtype,
        layout, extra)
