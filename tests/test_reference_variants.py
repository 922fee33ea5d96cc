"""The variant references prove themselves (issue 10: the batch-statistics family).

Two kinds of test, both in float64 and needing nothing but NumPy and reference.py:
- every backward equals central finite differences of its own forward, for the input and for
  every parameter, over small awkward shapes (C=1, N=1, 7x5 planes, ghost batches that do not
  divide N, interleaved and absent modalities, channel groups, separate and shared affine);
- identities that need no implementation: each variant collapses to a standard layer (or to a
  rearrangement of its own output) where its equations say it must.
The layer tests trust these references, so this file is what ties the variants to the math.
"""
import numpy as np
import pytest

import reference as ref
from conftest import FD_TOL

EPS = 1e-5


def _params(rng, affine, shape):
    """Random (weight, bias) of `shape`, weight around 1 and bias around 0; (None, None) without
    an affine."""
    if not affine:
        return None, None
    return rng.uniform(0.5, 1.5, shape), rng.normal(0.0, 0.5, shape)


def _check_backward(forward, backward, x, dy, weight, bias, assert_close):
    """backward(x, dy, weight, bias) -> (dx, dweight, dbias) equals central finite differences of
    sum(forward(x, weight, bias) * dy) for x and for each parameter that is not None; a gradient
    of an absent parameter is None."""
    def loss():
        return float(np.sum(forward(x, weight, bias) * dy))

    dx, dweight, dbias = backward(x, dy, weight, bias)
    assert_close(dx, ref.numerical_gradient(loss, x), tol=FD_TOL, what="dx")
    for name, p, got in (("dweight", weight, dweight), ("dbias", bias, dbias)):
        if p is None:
            assert got is None, f"{name} should be None without the parameter"
        else:
            assert_close(got, ref.numerical_gradient(loss, p), tol=FD_TOL, what=name)


AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])


# == ExtendedBatchNorm ============================================================================

EBN_SHAPES = [
    pytest.param((3, 2, 7, 5), id="3x2x7x5"),
    pytest.param((2, 1, 3, 4), id="C1-2x1x3x4"),
    pytest.param((1, 3, 5), id="N1-1x3x5"),
    pytest.param((4, 3), id="no_spatial-4x3"),
]


@pytest.mark.parametrize("shape", EBN_SHAPES)
@AFFINE
def test_extended_batch_norm_backward_equals_finite_differences(shape, affine, rng, assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _params(rng, affine, shape[1])
    _check_backward(lambda x, w, b: ref.extended_batch_norm(x, w, b, EPS),
                    lambda x, dy, w, b: ref.extended_batch_norm_backward(x, dy, w, b, EPS),
                    x, dy, w, b, assert_close)


def test_extended_batch_norm_backward_with_large_eps(rng, assert_close):
    # eps comparable to the variance, and channels of very different spread: a derivation that
    # drops eps or takes the variance per channel would pass the cases above only by luck.
    x = rng.normal(0.0, 0.3, (3, 3, 4)) * np.array([0.2, 1.0, 3.0]).reshape(1, 3, 1)
    dy = rng.normal(size=x.shape)
    w, b = _params(rng, True, 3)
    _check_backward(lambda x, w, b: ref.extended_batch_norm(x, w, b, eps=0.1),
                    lambda x, dy, w, b: ref.extended_batch_norm_backward(x, dy, w, b, eps=0.1),
                    x, dy, w, b, assert_close)


def test_extended_batch_stats_variance_is_the_mean_of_per_channel_biased_variances(rng):
    x = rng.normal(0.0, 1.0, (3, 4, 2, 5)) * np.array([0.5, 1.0, 2.0, 4.0]).reshape(1, 4, 1, 1)
    mean, var = ref.extended_batch_stats(x)
    per_channel_var = []
    for c in range(4):
        values = x[:, c].ravel()
        m = sum(values) / len(values)
        assert mean[c] == pytest.approx(m, rel=1e-13)
        per_channel_var.append(sum((v - m) ** 2 for v in values) / len(values))
    assert mean.shape == (4,)
    assert isinstance(var, float)
    assert var == pytest.approx(sum(per_channel_var) / 4, rel=1e-13)


def test_extended_batch_norm_with_eps_0_has_channel_means_0_and_one_overall_variance_1(rng):
    x = rng.normal(0.3, 1.0, (3, 3, 4, 2)) * np.array([0.5, 1.0, 3.0]).reshape(1, 3, 1, 1)
    y = ref.extended_batch_norm(x, eps=0.0)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-13)
    assert np.mean(y ** 2) == pytest.approx(1.0, rel=1e-13)
    # ... while the channels keep their relative spread: not every channel has variance 1.
    assert np.ptp(y.var(axis=(0, 2, 3))) > 1.0


def test_extended_batch_norm_with_one_channel_equals_batch_norm(rng, assert_close):
    x = rng.normal(0.3, 1.2, (3, 1, 7, 5))
    dy = rng.normal(size=x.shape)
    w, b = _params(rng, True, 1)
    assert_close(ref.extended_batch_norm(x, w, b, EPS), ref.batch_norm(x, w, b, EPS), what="y")
    for got, want, what in zip(ref.extended_batch_norm_backward(x, dy, w, b, EPS),
                               ref.batch_norm_backward(x, dy, w, b, EPS),
                               ("dx", "dweight", "dbias")):
        assert_close(got, want, what=what)


# == ModalityBatchNorm ============================================================================

MBN_CASES = [
    pytest.param((5, 3, 2, 3), [0, 1, 0, 1, 1], 2, id="interleaved-2_modalities-5x3x2x3"),
    pytest.param((6, 2, 7, 5), [2, 0, 2, 0, 2, 0], 3, id="modality_1_absent-6x2x7x5"),
    pytest.param((4, 1, 3, 5), [1, 0, 0, 1], 2, id="C1-4x1x3x5"),
    pytest.param((3, 2, 4), [0, 0, 0], 2, id="one_modality_present-3x2x4"),
]

MBN_AFFINE = pytest.mark.parametrize("affine", ["shared", "separate", "none"],
                                     ids=["shared_affine", "separate_affine", "no_affine"])


def _mbn_params(rng, affine, num_modalities, C):
    if affine == "none":
        return None, None
    return _params(rng, True, C if affine == "shared" else (num_modalities, C))


@pytest.mark.parametrize("shape, modality, num_modalities", MBN_CASES)
@MBN_AFFINE
def test_modality_batch_norm_backward_equals_finite_differences(shape, modality, num_modalities,
                                                                affine, rng, assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    modality = np.array(modality)
    w, b = _mbn_params(rng, affine, num_modalities, shape[1])
    _check_backward(
        lambda x, w, b: ref.modality_batch_norm(x, modality, num_modalities, w, b, EPS),
        lambda x, dy, w, b: ref.modality_batch_norm_backward(x, dy, modality, num_modalities,
                                                             w, b, EPS),
        x, dy, w, b, assert_close)


@pytest.mark.parametrize("affine", ["shared", "separate"], ids=["shared_affine", "separate_affine"])
def test_modality_batch_norm_with_one_modality_equals_batch_norm(affine, rng, assert_close):
    # Every sample in modality 2 of 3: the layer is BatchNorm with modality 2's affine, and the
    # rows of the absent modalities get no gradient.
    x = rng.normal(0.3, 1.2, (3, 2, 7, 5))
    dy = rng.normal(size=x.shape)
    modality = np.full(3, 2)
    w, b = _mbn_params(rng, affine, 3, 2)
    w2, b2 = (w, b) if affine == "shared" else (w[2], b[2])
    assert_close(ref.modality_batch_norm(x, modality, 3, w, b, EPS),
                 ref.batch_norm(x, w2, b2, EPS), what="y")
    dx, dw, db = ref.modality_batch_norm_backward(x, dy, modality, 3, w, b, EPS)
    bn_dx, bn_dw, bn_db = ref.batch_norm_backward(x, dy, w2, b2, EPS)
    assert_close(dx, bn_dx, what="dx")
    if affine == "separate":
        assert_close(dw, np.stack([np.zeros(2), np.zeros(2), bn_dw]), what="dweight")
        assert_close(db, np.stack([np.zeros(2), np.zeros(2), bn_db]), what="dbias")
    else:
        assert_close(dw, bn_dw, what="dweight")
        assert_close(db, bn_db, what="dbias")


def test_modality_batch_norm_with_num_modalities_1_equals_batch_norm(rng, assert_close):
    x = rng.normal(0.3, 1.2, (4, 3, 2, 3))
    w, b = _params(rng, True, 3)
    assert_close(ref.modality_batch_norm(x, np.zeros(4, dtype=np.int64), 1, w, b, EPS),
                 ref.batch_norm(x, w, b, EPS), what="y")


@pytest.mark.parametrize("affine", ["shared", "separate"], ids=["shared_affine", "separate_affine"])
def test_modality_batch_norm_of_permuted_samples_is_the_permuted_output(affine, rng, assert_close):
    x = rng.normal(0.3, 1.2, (7, 2, 3, 2))
    dy = rng.normal(size=x.shape)
    modality = np.array([0, 1, 2, 0, 1, 2, 1])
    perm = np.array([6, 3, 0, 5, 1, 4, 2])
    w, b = _mbn_params(rng, affine, 3, 2)
    y = ref.modality_batch_norm(x, modality, 3, w, b, EPS)
    assert_close(ref.modality_batch_norm(x[perm], modality[perm], 3, w, b, EPS), y[perm], what="y")
    dx, dw, db = ref.modality_batch_norm_backward(x, dy, modality, 3, w, b, EPS)
    pdx, pdw, pdb = ref.modality_batch_norm_backward(x[perm], dy[perm], modality[perm], 3, w, b,
                                                     EPS)
    assert_close(pdx, dx[perm], what="dx")
    assert_close(pdw, dw, what="dweight")
    assert_close(pdb, db, what="dbias")
    # ... and the modalities really are normalized apart: pooling them all would differ.
    assert np.max(np.abs(ref.modality_batch_norm(x, np.zeros(7, dtype=np.int64), 1) -
                         ref.modality_batch_norm(x, modality, 3))) > 1e-3


def test_modality_batch_stats_are_each_modalitys_batch_stats_with_nan_for_an_absent_one(rng):
    x = rng.normal(0.3, 1.2, (6, 2, 3, 2))
    modality = np.array([0, 2, 0, 2, 2, 0])
    mean, var = ref.modality_batch_stats(x, modality, 4)
    assert mean.shape == (4, 2) and var.shape == (4, 2)
    for m, rows in ((0, [0, 2, 5]), (2, [1, 3, 4])):
        bn_mean, bn_var = ref.batch_stats(x[rows])
        np.testing.assert_allclose(mean[m], bn_mean, rtol=1e-13)
        np.testing.assert_allclose(var[m], bn_var, rtol=1e-13)
    for absent in (1, 3):
        assert np.isnan(mean[absent]).all() and np.isnan(var[absent]).all()


# == GhostBatchNorm, training =====================================================================

GHOST_CASES = [
    pytest.param((5, 2, 2, 3), 2, 1, id="ghost2_of_N5-last_ghost_1_sample"),
    pytest.param((3, 2, 7, 5), 2, 1, id="ghost2_of_N3-7x5"),
    pytest.param((5, 4, 2, 3), 3, 2, id="ghost3_of_N5-channels_per_group2"),
    pytest.param((3, 6, 2, 2), 2, 3, id="ghost2_of_N3-channels_per_group3"),
    pytest.param((2, 4, 3), 1, 4, id="ghost1-channels_per_group4-is_layer_norm"),
    pytest.param((4, 1, 3, 3), 3, 1, id="C1-ghost3_of_N4"),
    pytest.param((3, 2, 2, 2), 8, 1, id="ghost_larger_than_N"),
]


@pytest.mark.parametrize("shape, ghost_batch_size, channels_per_group", GHOST_CASES)
@AFFINE
def test_ghost_batch_norm_backward_equals_finite_differences(shape, ghost_batch_size,
                                                             channels_per_group, affine, rng,
                                                             assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _params(rng, affine, shape[1])
    _check_backward(
        lambda x, w, b: ref.ghost_batch_norm(x, ghost_batch_size, channels_per_group, w, b, EPS),
        lambda x, dy, w, b: ref.ghost_batch_norm_backward(x, dy, ghost_batch_size,
                                                          channels_per_group, w, b, EPS),
        x, dy, w, b, assert_close)


@pytest.mark.parametrize("ghost_batch_size", [4, 6], ids=["ghost_equals_N", "ghost_above_N"])
def test_ghost_batch_norm_with_one_ghost_batch_equals_batch_norm(ghost_batch_size, rng,
                                                                 assert_close):
    x = rng.normal(0.3, 1.2, (4, 3, 7, 5))
    dy = rng.normal(size=x.shape)
    w, b = _params(rng, True, 3)
    assert_close(ref.ghost_batch_norm(x, ghost_batch_size, 1, w, b, EPS),
                 ref.batch_norm(x, w, b, EPS), what="y")
    for got, want, what in zip(ref.ghost_batch_norm_backward(x, dy, ghost_batch_size, 1, w, b, EPS),
                               ref.batch_norm_backward(x, dy, w, b, EPS),
                               ("dx", "dweight", "dbias")):
        assert_close(got, want, what=what)


def test_ghost_batch_norm_is_batch_norm_on_each_consecutive_ghost_batch_the_last_smaller(
        rng, assert_close):
    x = rng.normal(0.3, 1.2, (7, 2, 3, 2))
    w, b = _params(rng, True, 2)
    want = np.concatenate([ref.batch_norm(x[0:3], w, b, EPS),
                           ref.batch_norm(x[3:6], w, b, EPS),
                           ref.batch_norm(x[6:7], w, b, EPS)])
    assert_close(ref.ghost_batch_norm(x, 3, 1, w, b, EPS), want, what="y")


def test_ghost_batch_norm_pools_a_ghost_batch_and_a_channel_group_spelled_out(rng, assert_close):
    # N=5 in ghost batches {0,1,2}, {3,4}; C=4 in channel groups {0,1}, {2,3}: each of the four
    # (ghost batch, group) cells is standardized with its own mean and biased variance.
    x = rng.normal(0.3, 1.2, (5, 4, 2, 3))
    want = np.empty_like(x)
    for samples in (slice(0, 3), slice(3, 5)):
        for channels in (slice(0, 2), slice(2, 4)):
            cell = x[samples, channels]
            values = cell.ravel()
            m = sum(values) / len(values)
            v = sum((t - m) ** 2 for t in values) / len(values)
            want[samples, channels] = (cell - m) / np.sqrt(v + EPS)
    assert_close(ref.ghost_batch_norm(x, 3, 2, eps=EPS), want, what="y")


@pytest.mark.parametrize("channels_per_group, num_groups", [(6, 1), (3, 2), (1, 6)],
                         ids=["channels_per_group_C-is_group_norm_1",
                              "channels_per_group3-is_group_norm_2",
                              "channels_per_group1-is_group_norm_C"])
def test_ghost_batch_norm_with_ghost_batch_1_equals_group_norm(channels_per_group, num_groups,
                                                               rng, assert_close):
    x = rng.normal(0.3, 1.2, (3, 6, 7, 5))
    dy = rng.normal(size=x.shape)
    w, b = _params(rng, True, 6)
    assert_close(ref.ghost_batch_norm(x, 1, channels_per_group, w, b, EPS),
                 ref.group_norm(x, num_groups, w, b, EPS), what="y")
    for got, want, what in zip(
            ref.ghost_batch_norm_backward(x, dy, 1, channels_per_group, w, b, EPS),
            ref.group_norm_backward(x, dy, num_groups, w, b, EPS), ("dx", "dweight", "dbias")):
        assert_close(got, want, what=what)


# == GhostBatchNorm, inference with example weighing ==============================================

GHOST_EVAL_CASES = [
    pytest.param((3, 2, 7, 5), 1, id="3x2x7x5"),
    pytest.param((2, 4, 3, 2), 2, id="channels_per_group2-2x4x3x2"),
    pytest.param((2, 6, 5), 3, id="channels_per_group3-2x6x5"),
    pytest.param((1, 1, 7, 5), 1, id="N1_C1-1x1x7x5"),
]

EXAMPLE_WEIGHT = pytest.mark.parametrize("example_weight", [0.0, 0.3, 1.0],
                                         ids=["example_weight0", "example_weight0.3",
                                              "example_weight1"])


def _running(C):
    # Fixed running statistics (variance well away from zero), different in every channel.
    return np.linspace(-0.5, 0.5, C), np.linspace(0.5, 2.0, C)


@pytest.mark.parametrize("shape, channels_per_group", GHOST_EVAL_CASES)
@EXAMPLE_WEIGHT
@AFFINE
def test_ghost_batch_norm_eval_backward_equals_finite_differences(shape, channels_per_group,
                                                                  example_weight, affine, rng,
                                                                  assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    rm, rv = _running(shape[1])
    w, b = _params(rng, affine, shape[1])
    _check_backward(
        lambda x, w, b: ref.ghost_batch_norm_eval(x, rm, rv, channels_per_group, example_weight,
                                                  w, b, EPS),
        lambda x, dy, w, b: ref.ghost_batch_norm_eval_backward(x, dy, rm, rv, channels_per_group,
                                                               example_weight, w, b, EPS),
        x, dy, w, b, assert_close)


def test_ghost_batch_norm_eval_backward_where_the_variance_is_clamped(rng, assert_close):
    # A (made-up) negative running variance in channel 0 drives v = (1-a) P2 + a E2 - mu^2 below
    # 0 there, so var is the constant 0 and only mu carries x; channel 1 stays unclamped.
    x = rng.normal(0.3, 1.2, (3, 2, 4, 3))
    dy = rng.normal(size=x.shape)
    rm, rv = np.array([0.2, -0.3]), np.array([-4.0, 1.5])
    alpha = 0.3
    w, b = _params(rng, True, 2)
    e1 = x.mean(axis=(2, 3))
    e2 = (x ** 2).mean(axis=(2, 3))
    mu = (1 - alpha) * rm + alpha * e1
    v = (1 - alpha) * (rv + rm ** 2) + alpha * e2 - mu ** 2
    assert (v[:, 0] < -0.5).all() and (v[:, 1] > 0.5).all()
    _check_backward(
        lambda x, w, b: ref.ghost_batch_norm_eval(x, rm, rv, 1, alpha, w, b, EPS),
        lambda x, dy, w, b: ref.ghost_batch_norm_eval_backward(x, dy, rm, rv, 1, alpha, w, b, EPS),
        x, dy, w, b, assert_close)


def test_ghost_batch_norm_eval_with_example_weight_0_equals_batch_norm_eval(rng, assert_close):
    x = rng.normal(0.3, 1.2, (3, 4, 7, 5))
    dy = rng.normal(size=x.shape)
    rm, rv = _running(4)
    w, b = _params(rng, True, 4)
    bn = dict(eps=EPS, running_mean=rm, running_var=rv, training=False)
    assert_close(ref.ghost_batch_norm_eval(x, rm, rv, 1, 0.0, w, b, EPS),
                 ref.batch_norm(x, w, b, **bn), what="y")
    for got, want, what in zip(ref.ghost_batch_norm_eval_backward(x, dy, rm, rv, 1, 0.0, w, b, EPS),
                               ref.batch_norm_backward(x, dy, w, b, **bn),
                               ("dx", "dweight", "dbias")):
        assert_close(got, want, what=what)


@pytest.mark.parametrize("channels_per_group", [1, 2, 4],
                         ids=["channels_per_group1-is_instance_norm",
                              "channels_per_group2-is_group_norm_2",
                              "channels_per_group4-is_group_norm_1"])
def test_ghost_batch_norm_eval_with_example_weight_1_uses_each_samples_own_statistics(
        channels_per_group, rng, assert_close):
    # alpha = 1: mu = E1_i, var = E2_i - E1_i^2, the sample's own group statistics, whatever the
    # running statistics say: GroupNorm with C/channels_per_group groups.
    x = rng.normal(0.3, 1.2, (3, 4, 7, 5))
    dy = rng.normal(size=x.shape)
    rm, rv = _running(4)
    w, b = _params(rng, True, 4)
    groups = 4 // channels_per_group
    assert_close(ref.ghost_batch_norm_eval(x, rm, rv, channels_per_group, 1.0, w, b, EPS),
                 ref.group_norm(x, groups, w, b, EPS), what="y")
    for got, want, what in zip(
            ref.ghost_batch_norm_eval_backward(x, dy, rm, rv, channels_per_group, 1.0, w, b, EPS),
            ref.group_norm_backward(x, dy, groups, w, b, EPS), ("dx", "dweight", "dbias")):
        assert_close(got, want, what=what)


def test_ghost_batch_norm_eval_mixes_population_and_example_moments_spelled_out(rng, assert_close):
    # alpha = 0.3, channel groups {0,1}, {2,3}: the formulas, one (sample, group) at a time.
    x = rng.normal(0.3, 1.2, (2, 4, 3, 2))
    rm, rv = np.array([-0.4, 0.2, 0.6, 1.0]), np.array([0.5, 1.0, 1.5, 2.0])
    alpha = 0.3
    want = np.empty_like(x)
    for i in range(2):
        for channels in ([0, 1], [2, 3]):
            c0, c1 = channels
            p1 = (rm[c0] + rm[c1]) / 2
            p2 = ((rv[c0] + rm[c0] ** 2) + (rv[c1] + rm[c1] ** 2)) / 2
            values = x[i, channels].ravel()
            e1 = sum(values) / len(values)
            e2 = sum(t * t for t in values) / len(values)
            mu = (1 - alpha) * p1 + alpha * e1
            var = max(0.0, (1 - alpha) * p2 + alpha * e2 - mu ** 2)
            want[i, channels] = (x[i, channels] - mu) / np.sqrt(var + EPS)
    assert_close(ref.ghost_batch_norm_eval(x, rm, rv, 2, alpha, eps=EPS), want, what="y")


def test_ghost_batch_norm_eval_pools_the_running_moments_of_a_channel_group(rng, assert_close):
    # alpha = 0, two channels per group: mu = mean of the group's running means, var = mean of
    # the group's running second moments minus mu^2, the same for both channels of the group.
    x = rng.normal(0.3, 1.2, (2, 2, 3, 3))
    rm, rv = np.array([-1.0, 1.0]), np.array([0.5, 1.5])
    mu = 0.0
    var = ((0.5 + 1.0) + (1.5 + 1.0)) / 2 - mu ** 2
    assert_close(ref.ghost_batch_norm_eval(x, rm, rv, 2, 0.0, eps=EPS),
                 (x - mu) / np.sqrt(var + EPS), what="y")


# == Batch Renormalization ========================================================================

RENORM_SHAPES = [
    pytest.param((3, 2, 7, 5), id="3x2x7x5"),
    pytest.param((2, 1, 3, 4), id="C1-2x1x3x4"),
    pytest.param((4, 3), id="no_spatial-4x3"),
]


@pytest.mark.parametrize("shape", RENORM_SHAPES)
@AFFINE
def test_batch_renorm_backward_equals_finite_differences(shape, affine, rng, assert_close):
    # r and d are constants of the step (the paper's stop_gradient): the finite differences see
    # them fixed, exactly as the backward treats them.
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    r = rng.uniform(1 / 3, 3.0, shape[1])
    d = rng.normal(0.0, 1.0, shape[1])
    w, b = _params(rng, affine, shape[1])
    _check_backward(lambda x, w, b: ref.batch_renorm(x, r, d, w, b, EPS),
                    lambda x, dy, w, b: ref.batch_renorm_backward(x, dy, r, d, w, b, EPS),
                    x, dy, w, b, assert_close)


def test_batch_renorm_with_r_1_and_d_0_equals_batch_norm(rng, assert_close):
    x = rng.normal(0.3, 1.2, (3, 2, 7, 5))
    dy = rng.normal(size=x.shape)
    w, b = _params(rng, True, 2)
    one, zero = np.ones(2), np.zeros(2)
    assert_close(ref.batch_renorm(x, one, zero, w, b, EPS), ref.batch_norm(x, w, b, EPS), what="y")
    for got, want, what in zip(ref.batch_renorm_backward(x, dy, one, zero, w, b, EPS),
                               ref.batch_norm_backward(x, dy, w, b, EPS),
                               ("dx", "dweight", "dbias")):
        assert_close(got, want, what=what)


def test_batch_renorm_rd_with_r_max_1_and_d_max_0_is_r_1_and_d_0(rng):
    x = rng.normal(0.3, 1.2, (3, 2, 4))
    r, d = ref.batch_renorm_rd(x, np.array([5.0, -5.0]), np.array([0.1, 10.0]), 1.0, 0.0, EPS)
    np.testing.assert_array_equal(r, [1.0, 1.0])
    np.testing.assert_array_equal(d, [0.0, 0.0])


def test_batch_renorm_rd_spelled_out_and_clipped(rng):
    x = rng.normal(0.3, 1.2, (4, 3, 5))
    mu_b = x.mean(axis=(0, 2))
    sigma_b = np.sqrt(x.var(axis=(0, 2)) + EPS)
    # channel 0: inside both clips; channel 1: r and d above; channel 2: r and d below.
    running_mean = np.array([mu_b[0] - 0.1, mu_b[1] - 100.0, mu_b[2] + 1000.0])
    running_std = np.array([sigma_b[0] * 1.5, sigma_b[1] / 100.0, sigma_b[2] * 10.0])
    r, d = ref.batch_renorm_rd(x, running_mean, running_std, 3.0, 5.0, EPS)
    np.testing.assert_allclose(r, [1 / 1.5, 3.0, 1 / 3.0], rtol=1e-13)
    np.testing.assert_allclose(d, [0.1 / running_std[0], 5.0, -5.0], rtol=1e-12)


def test_batch_renorm_with_unclipped_r_d_is_the_running_statistics_normalization(rng,
                                                                                 assert_close):
    # Algorithm 1's point: (x - mu_B)/sigma_B * sigma_B/sigma + (mu_B - mu)/sigma = (x - mu)/sigma,
    # so in training with r, d inside their clips the output equals inference's.
    x = rng.normal(0.3, 1.2, (3, 2, 7, 5))
    w, b = _params(rng, True, 2)
    running_mean, running_std = np.array([0.1, 0.5]), np.array([0.9, 1.4])
    r, d = ref.batch_renorm_rd(x, running_mean, running_std, 100.0, 100.0, EPS)
    assert_close(ref.batch_renorm(x, r, d, w, b, EPS),
                 ref.batch_renorm_eval(x, running_mean, running_std, w, b), what="y")


def test_batch_renorm_eval_is_the_running_affine_without_eps(rng, assert_close):
    x = rng.normal(0.3, 1.2, (2, 2, 3))
    w, b = np.array([2.0, 0.5]), np.array([1.0, -1.0])
    mu, sigma = np.array([0.5, -0.5]), np.array([2.0, 0.25])
    shape = (1, 2, 1)
    want = (x - mu.reshape(shape)) / sigma.reshape(shape) * w.reshape(shape) + b.reshape(shape)
    assert_close(ref.batch_renorm_eval(x, mu, sigma, w, b), want, what="y")


RENORM_SCHEDULE = [
    pytest.param(0, 1.0, 0.0, id="step0-fixed"),
    pytest.param(4999, 1.0, 0.0, id="step4999-fixed"),
    pytest.param(5000, 1.0, 0.0, id="step5000-ramps_start"),
    pytest.param(15000, 1.0 + 2.0 * 10000 / 35000, 2.5, id="step15000-d_max_half_way"),
    pytest.param(22500, 2.0, 5.0 * 17500 / 20000, id="step22500-r_max_half_way"),
    pytest.param(25000, 1.0 + 2.0 * 20000 / 35000, 5.0, id="step25000-d_max_reached"),
    pytest.param(40000, 3.0, 5.0, id="step40000-r_max_reached"),
    pytest.param(10 ** 6, 3.0, 5.0, id="step1000000-constant"),
]


@pytest.mark.parametrize("step, r_max, d_max", RENORM_SCHEDULE)
def test_renorm_schedule_is_the_papers(step, r_max, d_max):
    assert ref.renorm_schedule(step) == pytest.approx((r_max, d_max), rel=1e-15)
