"""The issue-11 references prove themselves: FRN+TLU, Weight Standardization / Centralization,
Batch-Channel Norm, Batch Layer Norm, Proxy Norm, LayerNorm2d, LocalResponseNorm, EvoNorm B0/S0.

Three kinds of test, all float64:
- every backward equals central finite differences of its own forward, for the input and every
  parameter (conftest's FD_TOL), over awkward shapes: spatial size 1 (and (N, C) input), C = 1,
  C not a multiple of 8, groups of one channel, N = 1;
- at the points where finite differences are not defined -- an exact tie in TLU's max or in
  EvoNorm-B0's max, relu's kink -- the documented rule, checked directly on inputs built to hit
  the tie exactly (TLU: all of it to tau; B0: an even split, torch.maximum's rule; relu'(0) = 0);
- identities and second witnesses: each layer against a standard one where its equations
  collapse to it, the equations spelled out one entry at a time, and torch (float64, autograd)
  where it has the layer or the pieces.
"""
import math

import numpy as np
import pytest

import reference as ref
from conftest import FD_TOL


def _check_backward(forward, backward, x, dy, params, names, assert_close):
    """backward(x, dy, *params) -> dx or (dx, d<param>...) equals central finite differences of
    sum(forward(x, *params) * dy) for x and for every parameter that is not None; the gradient of
    an absent parameter is None."""
    def loss():
        return float(np.sum(forward(x, *params) * dy))

    grads = backward(x, dy, *params)
    if isinstance(grads, np.ndarray):
        grads = (grads,)
    assert len(grads) == 1 + len(params), f"{len(grads)} gradients for {len(params)} parameters"
    assert_close(grads[0], ref.numerical_gradient(loss, x), tol=FD_TOL, what="dx")
    for name, p, got in zip(names, params, grads[1:]):
        if p is None:
            assert got is None, f"d{name} should be None without the parameter"
        else:
            assert got.shape == p.shape, f"d{name}: shape {got.shape}, expected {p.shape}"
            assert_close(got, ref.numerical_gradient(loss, p), tol=FD_TOL, what=f"d{name}")


def _weight(rng, affine, n):
    return rng.uniform(0.5, 1.5, n) if affine else None


def _bias(rng, affine, n):
    return rng.normal(0.0, 0.5, n) if affine else None


def _away_from_zero(rng, shape):
    """|x| in [0.5, 2] with random signs: where a plane has one entry, x/sqrt(x^2 + eps) is
    smooth enough there for central differences at h = 1e-5."""
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])


# == FilterResponseNorm + TLU ======================================================================

FRN_SHAPES = [
    pytest.param((2, 3, 4, 5), id="2x3x4x5"),
    pytest.param((3, 1, 3, 3), id="C1-3x1x3x3"),
    pytest.param((2, 9, 2, 3), id="C9-2x9x2x3"),
    pytest.param((1, 2, 7, 1), id="N1-1x2x7x1"),
    pytest.param((4, 3, 1, 1), id="spatial1-4x3x1x1"),
    pytest.param((5, 3), id="NC_input-5x3"),
]

FRN_NAMES = ("weight", "bias", "tau", "eps_l")


def _frn_input(rng, shape):
    spatial = int(np.prod(shape[2:], dtype=np.int64))
    return _away_from_zero(rng, shape) if spatial == 1 else rng.normal(0.3, 1.2, shape)


def _frn(x, w, b, tau, eps_l):
    return ref.filter_response_norm(x, w, b, tau, eps=1e-6, eps_l=eps_l)


def _frn_backward(x, dy, w, b, tau, eps_l):
    return ref.filter_response_norm_backward(x, dy, w, b, tau, eps=1e-6, eps_l=eps_l)


@pytest.mark.parametrize("shape", FRN_SHAPES)
@pytest.mark.parametrize("tlu", [True, False], ids=["tlu", "no_tlu"])
@pytest.mark.parametrize("learnable_eps", [True, False], ids=["learnable_eps", "fixed_eps"])
@AFFINE
def test_frn_backward_equals_finite_differences(shape, tlu, learnable_eps, affine, rng,
                                                assert_close):
    x = _frn_input(rng, shape)
    dy = rng.normal(size=shape)
    C = shape[1]
    w, b = _weight(rng, affine, C), _bias(rng, affine, C)
    tau = rng.normal(0.0, 0.5, C) if tlu else None
    eps_l = np.array([1e-4]) if learnable_eps else None
    _check_backward(_frn, _frn_backward, x, dy, [w, b, tau, eps_l], FRN_NAMES, assert_close)


@pytest.mark.parametrize("eps_l", [0.3, -0.2], ids=["eps_l_positive", "eps_l_negative"])
def test_frn_backward_with_a_large_learnable_eps(eps_l, rng, assert_close):
    # eps_l comparable to nu2, either sign: a derivation that drops |.|'s sign or the eps term
    # would pass the 1e-4 cases above only by luck.
    x = rng.normal(0.0, 0.5, (2, 3, 2, 3))
    dy = rng.normal(size=x.shape)
    params = [_weight(rng, True, 3), _bias(rng, True, 3), rng.normal(0.0, 0.5, 3),
              np.array([eps_l])]
    _check_backward(_frn, _frn_backward, x, dy, params, FRN_NAMES, assert_close)


def test_frn_without_tlu_is_rms_norm_over_each_plane_then_the_affine(rng, assert_close):
    x = rng.normal(0.3, 1.2, (2, 3, 4, 5))
    w, b = _weight(rng, True, 3), _bias(rng, True, 3)
    shape = (1, 3, 1, 1)
    want = ref.rms_norm(x, (4, 5), eps=1e-6) * w.reshape(shape) + b.reshape(shape)
    assert_close(ref.filter_response_norm(x, w, b, eps=1e-6), want, what="y")


def test_frn_learnable_eps_adds_its_absolute_value_to_eps(rng, assert_close):
    x = rng.normal(0.3, 1.2, (2, 3, 2, 2))
    w, b, tau = _weight(rng, True, 3), _bias(rng, True, 3), rng.normal(0.0, 0.5, 3)
    assert_close(ref.filter_response_norm(x, w, b, tau, eps=1e-6, eps_l=np.array([-0.25])),
                 ref.filter_response_norm(x, w, b, tau, eps=1e-6 + 0.25), what="y")


def test_frn_spelled_out_on_an_nc_input_and_on_planes(rng, assert_close):
    # (N, C): each entry is its own plane, nu2 = x^2. (N, C, H, W): nu2 = mean of the plane's x^2,
    # no mean subtracted; then the affine and max(., tau).
    eps = 1e-6
    x2 = rng.normal(0.3, 1.2, (3, 2))
    w, b, tau = np.array([1.5, 0.5]), np.array([0.1, -0.2]), np.array([-0.3, 0.0])
    want2 = np.maximum(x2 / np.sqrt(x2 ** 2 + eps) * w + b, tau)
    assert_close(ref.filter_response_norm(x2, w, b, tau, eps), want2, what="y (N, C)")
    x4 = rng.normal(0.3, 1.2, (2, 2, 3, 2))
    want4 = np.empty_like(x4)
    for n in range(2):
        for c in range(2):
            values = x4[n, c].ravel()
            nu2 = sum(t * t for t in values) / len(values)
            want4[n, c] = np.maximum(x4[n, c] / math.sqrt(nu2 + eps) * w[c] + b[c], tau[c])
    assert_close(ref.filter_response_norm(x4, w, b, tau, eps), want4, what="y (N, C, H, W)")


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (4, 3)], ids=["2x3x2x3", "NC_input-4x3"])
def test_frn_tlu_tie_sends_the_whole_gradient_to_tau(shape, rng, assert_close):
    # tau_c is set to the pre-TLU output y at one entry of each channel, so y == tau there
    # exactly (the same float operations compute both). Finite differences are not defined at
    # the tie; the rule is: that entry's dy goes to tau_c, none of it to x, weight or bias --
    # exactly the gradient with tau raised by a hair (the entry strictly below tau), and none
    # of the gradient with tau lowered by a hair (strictly above).
    x = _frn_input(rng, shape)
    dy = rng.normal(size=shape)
    C = shape[1]
    w, b, eps_l = _weight(rng, True, C), _bias(rng, True, C), np.array([1e-4])
    y = ref.filter_response_norm(x, w, b, None, eps=1e-6, eps_l=eps_l)
    tied = (1, slice(None)) + (0,) * (len(shape) - 2)   # sample 1, first entry of each plane
    tau = y[tied].copy()
    shape_c = (1, C) + (1,) * (len(shape) - 2)
    z = ref.filter_response_norm(x, w, b, tau, eps=1e-6, eps_l=eps_l)
    assert np.array_equal(z, np.maximum(y, tau.reshape(shape_c)))
    assert np.array_equal(z[tied], tau), "the tie must be exact"

    dx, dw, db, dtau, deps_l = ref.filter_response_norm_backward(x, dy, w, b, tau, 1e-6, eps_l)
    # the rule, spelled out: dtau_c sums dy where y <= tau_c (the tie included)
    below_or_tied = y <= tau.reshape(shape_c)
    assert below_or_tied[tied].all()
    axes = (0,) + tuple(range(2, len(shape)))
    assert_close(dtau, np.where(below_or_tied, dy, 0.0).sum(axis=axes), what="dtau")
    # ... and it is the one-sided gradient with tau on the tie's upper side
    hair = 1e-9
    up = ref.filter_response_norm_backward(x, dy, w, b, tau + hair, 1e-6, eps_l)
    for got, want, what in zip((dx, dw, db, dtau, deps_l), up,
                               ("dx", "dweight", "dbias", "dtau", "deps_l")):
        assert_close(got, want, tol=1e-7, what=what)
    down = ref.filter_response_norm_backward(x, dy, w, b, tau - hair, 1e-6, eps_l)
    np.testing.assert_allclose(dtau - down[3], dy[tied], rtol=0, atol=1e-7,
                               err_msg="dtau - dtau(tau lowered) is the tied entries' dy")


# == Weight Standardization and Weight Centralization =============================================

WEIGHT_SHAPES = [
    pytest.param((4, 3), id="linear-4x3"),
    pytest.param((1, 7), id="one_filter-1x7"),
    pytest.param((5, 3, 2), id="conv1d-5x3x2"),
    pytest.param((3, 2, 3, 3), id="conv2d-3x2x3x3"),
    pytest.param((9, 1, 1, 1), id="fan_in1-9x1x1x1"),
    pytest.param((2, 2, 2, 3, 2), id="conv3d-2x2x2x3x2"),
]


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.1], ids=["eps1e-5", "eps0.1"])
def test_weight_standardization_backward_equals_finite_differences(shape, eps, rng, assert_close):
    w = rng.normal(0.1, 0.5, shape)
    dy = rng.normal(size=shape)
    _check_backward(lambda w: ref.weight_standardization(w, eps),
                    lambda w, dy: ref.weight_standardization_backward(dy, w, eps),
                    w, dy, [], (), assert_close)


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_weight_centralization_backward_equals_finite_differences(shape, rng, assert_close):
    w = rng.normal(0.1, 0.5, shape)
    dy = rng.normal(size=shape)
    _check_backward(ref.weight_centralization,
                    lambda w, dy: ref.weight_centralization_backward(dy, w),
                    w, dy, [], (), assert_close)


def test_weight_standardization_spelled_out_per_output_filter(rng, assert_close):
    w = rng.normal(0.1, 0.5, (3, 2, 2, 2))
    eps = 1e-5
    want = np.empty_like(w)
    for o in range(3):
        values = w[o].ravel()
        m = sum(values) / len(values)
        v = sum((t - m) ** 2 for t in values) / len(values)
        want[o] = (w[o] - m) / math.sqrt(v + eps)
    assert_close(ref.weight_standardization(w, eps), want, what="W_hat")
    assert_close(ref.weight_centralization(w), w - w.mean(axis=(1, 2, 3), keepdims=True),
                 what="W - mean")


def test_weight_standardization_identities(rng, assert_close):
    # eps = 0: every filter has mean 0 and (biased) variance 1; WS ignores a per-filter shift,
    # so WS(WC(w)) == WS(w); WC's output has mean 0 and its backward is the same projection.
    w = rng.normal(0.1, 0.5, (4, 3, 3))
    ws = ref.weight_standardization(w, eps=0.0)
    np.testing.assert_allclose(ws.mean(axis=(1, 2)), 0.0, atol=1e-14)
    np.testing.assert_allclose(ws.var(axis=(1, 2)), 1.0, rtol=1e-13)
    assert_close(ref.weight_standardization(ref.weight_centralization(w)),
                 ref.weight_standardization(w), what="WS(WC(w))")
    dy = rng.normal(size=w.shape)
    assert_close(ref.weight_centralization_backward(dy, w), ref.weight_centralization(dy),
                 what="WC backward")
    np.testing.assert_allclose(ref.weight_standardization_backward(dy, w).sum(axis=(1, 2)), 0.0,
                               atol=1e-12)


# == BatchChannelNorm =============================================================================

BCN_CASES = [
    pytest.param((3, 6, 2, 3), 2, id="G2-3x6x2x3"),
    pytest.param((2, 4, 3, 3), 4, id="groups_of_one_channel-G4-2x4x3x3"),
    pytest.param((2, 9, 2, 2), 3, id="C9-G3-2x9x2x2"),
    pytest.param((3, 1, 2, 2), 1, id="C1-G1-3x1x2x2"),
    pytest.param((4, 6, 1, 1), 2, id="spatial1-G2-4x6x1x1"),
    pytest.param((1, 4, 3, 2), 2, id="N1-G2-1x4x3x2"),
]

BCN_NAMES = ("bn_weight", "bn_bias", "gn_weight", "gn_bias")


def _running(C):
    # Fixed running statistics (variance well away from zero), different in every channel.
    return np.linspace(-0.5, 0.5, C), np.linspace(0.5, 2.0, C)


def _bcn_call(num_groups, eps, running):
    rm, rv = running if running is not None else (None, None)

    def forward(x, *params):
        return ref.batch_channel_norm(x, *params, num_groups, eps, rm, rv)

    def backward(x, dy, *params):
        return ref.batch_channel_norm_backward(x, dy, *params, num_groups, eps, rm, rv)
    return forward, backward


@pytest.mark.parametrize("shape, num_groups", BCN_CASES)
@pytest.mark.parametrize("mode", ["batch_stats", "running_stats"])
@AFFINE
def test_batch_channel_norm_backward_equals_finite_differences(shape, num_groups, mode, affine,
                                                               rng, assert_close):
    # running_stats: eval, and estimate=True's training step (its updated estimates are
    # constants in backward).
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    C = shape[1]
    params = [_weight(rng, affine, C), _bias(rng, affine, C),
              _weight(rng, affine, num_groups), _bias(rng, affine, num_groups)]
    forward, backward = _bcn_call(num_groups, 1e-5,
                                  _running(C) if mode == "running_stats" else None)
    _check_backward(forward, backward, x, dy, params, BCN_NAMES, assert_close)


def test_batch_channel_norm_backward_with_large_eps(rng, assert_close):
    x = rng.normal(0.0, 0.3, (3, 4, 2, 2))
    dy = rng.normal(size=x.shape)
    params = [_weight(rng, True, 4), _bias(rng, True, 4), _weight(rng, True, 2), _bias(rng, True, 2)]
    forward, backward = _bcn_call(2, 0.1, None)
    _check_backward(forward, backward, x, dy, params, BCN_NAMES, assert_close)


@pytest.mark.parametrize("mode", ["batch_stats", "running_stats"])
def test_batch_channel_norm_is_group_norm_of_batch_norm_with_the_group_affine_per_channel(
        mode, rng, assert_close):
    x = rng.normal(0.3, 1.2, (3, 6, 2, 3))
    dy = rng.normal(size=x.shape)
    bw, bb = _weight(rng, True, 6), _bias(rng, True, 6)
    gw, gb = _weight(rng, True, 3), _bias(rng, True, 3)
    gw_c, gb_c = np.repeat(gw, 2), np.repeat(gb, 2)
    rm, rv = _running(6) if mode == "running_stats" else (None, None)
    bn = dict(eps=1e-5, running_mean=rm, running_var=rv, training=rm is None)
    u = ref.batch_norm(x, bw, bb, **bn)
    assert_close(ref.batch_channel_norm(x, bw, bb, gw, gb, 3, 1e-5, rm, rv),
                 ref.group_norm(u, 3, gw_c, gb_c, 1e-5), what="y")
    dx, dbw, dbb, dgw, dgb = ref.batch_channel_norm_backward(x, dy, bw, bb, gw, gb, 3, 1e-5, rm, rv)
    du, dgw_c, dgb_c = ref.group_norm_backward(u, dy, 3, gw_c, gb_c, 1e-5)
    want_dx, want_dbw, want_dbb = ref.batch_norm_backward(x, du, bw, bb, **bn)
    assert_close(dx, want_dx, what="dx")
    assert_close(dbw, want_dbw, what="dbn_weight")
    assert_close(dbb, want_dbb, what="dbn_bias")
    assert_close(dgw, dgw_c.reshape(3, 2).sum(axis=1), what="dgn_weight (per group)")
    assert_close(dgb, dgb_c.reshape(3, 2).sum(axis=1), what="dgn_bias (per group)")


def test_bcn_estimate_update_spelled_out(rng, assert_close):
    # mu_hat += r (mu_B - mu_hat); var_hat += r (mean of (x - mu_hat_OLD)^2 - var_hat).
    x = rng.normal(0.3, 1.2, (3, 2, 2, 3))
    old_mean, old_var = np.array([0.0, 0.5]), np.array([1.0, 2.0])
    r = 0.1
    new_mean, new_var = ref.bcn_estimate_update(x, old_mean, old_var, r)
    for c in range(2):
        values = x[:, c].ravel()
        mu_b = sum(values) / len(values)
        spread = sum((t - old_mean[c]) ** 2 for t in values) / len(values)
        assert new_mean[c] == pytest.approx(old_mean[c] + r * (mu_b - old_mean[c]), rel=1e-14)
        assert new_var[c] == pytest.approx(old_var[c] + r * (spread - old_var[c]), rel=1e-14)
    # from the starting estimates (0, 1) at rate 1: the batch mean and its mean square about 0
    m1, v1 = ref.bcn_estimate_update(x, np.zeros(2), np.ones(2), 1.0)
    assert_close(m1, x.mean(axis=(0, 2, 3)), what="mean at rate 1")
    assert_close(v1, (x ** 2).mean(axis=(0, 2, 3)), what="var at rate 1")
    # the arguments are not written
    np.testing.assert_array_equal(old_mean, [0.0, 0.5])


def test_bcn_estimate_mode_normalizes_with_the_updated_estimates(rng, assert_close):
    # estimate=True's training step: update first, then normalize the batch part with the new
    # estimates, constants in backward -- the running-statistics reference on the updated ones.
    x = rng.normal(0.3, 1.2, (2, 4, 3, 3))
    dy = rng.normal(size=x.shape)
    m, v = ref.bcn_estimate_update(x, np.zeros(4), np.ones(4), 0.1)
    params = [_weight(rng, True, 4), _bias(rng, True, 4), _weight(rng, True, 2), _bias(rng, True, 2)]
    forward, backward = _bcn_call(2, 1e-5, (m, v))
    _check_backward(forward, backward, x, dy, params, BCN_NAMES, assert_close)
    xb = (x - m.reshape(1, 4, 1, 1)) / np.sqrt(v.reshape(1, 4, 1, 1) + 1e-5)
    u = xb * params[0].reshape(1, 4, 1, 1) + params[1].reshape(1, 4, 1, 1)
    assert_close(forward(x, *params),
                 ref.group_norm(u, 2, np.repeat(params[2], 2), np.repeat(params[3], 2), 1e-5),
                 what="y")


# == BatchLayerNorm ===============================================================================

BLN_SHAPES = [
    pytest.param((3, 4, 2, 3), id="3x4x2x3"),
    pytest.param((2, 1, 3, 2), id="C1-2x1x3x2"),
    pytest.param((1, 3, 2, 2), id="N1-1x3x2x2"),
    pytest.param((4, 9, 1, 1), id="C9-spatial1-4x9x1x1"),
    pytest.param((3, 5), id="no_spatial-3x5"),
]


@pytest.mark.parametrize("shape", BLN_SHAPES)
@pytest.mark.parametrize("batch_size", [4, 1], ids=["B4", "B1"])
@pytest.mark.parametrize("mode", ["batch_stats", "running_stats"])
@AFFINE
def test_batch_layer_norm_backward_equals_finite_differences(shape, batch_size, mode, affine,
                                                             rng, assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    C = shape[1]
    rm = rv = None
    if mode == "running_stats":
        rm = rng.normal(0.0, 0.5, shape[1:])
        rv = rng.uniform(0.5, 2.0, shape[1:])
    _check_backward(
        lambda x, w, b: ref.batch_layer_norm(x, w, b, batch_size, 1e-3, rm, rv),
        lambda x, dy, w, b: ref.batch_layer_norm_backward(x, dy, w, b, batch_size, 1e-3, rm, rv),
        x, dy, [_weight(rng, affine, C), _bias(rng, affine, C)], ("weight", "bias"), assert_close)


@pytest.mark.parametrize("mode", ["batch_stats", "running_stats"])
def test_batch_layer_norm_spelled_out_one_entry_at_a_time(mode, rng, assert_close):
    x = rng.normal(0.3, 1.2, (3, 4, 2, 2))
    N, C, H, W = x.shape
    B, eps = 8, 1e-3
    w, b = _weight(rng, True, C), _bias(rng, True, C)
    rm = rng.normal(0.0, 0.5, (C, H, W)) if mode == "running_stats" else None
    rv = rng.uniform(0.5, 2.0, (C, H, W)) if mode == "running_stats" else None
    want = np.empty_like(x)
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for k in range(W):
                    col = x[:, c, h, k]          # batch statistics: over N at (c, h, w)
                    if rm is None:
                        mu_b = sum(col) / N
                        var_b = sum((t - mu_b) ** 2 for t in col) / N
                    else:
                        mu_b, var_b = rm[c, h, k], rv[c, h, k]
                    row = x[n, :, h, k]          # feature statistics: over C at (n, h, w)
                    mu_f = sum(row) / C
                    var_f = sum((t - mu_f) ** 2 for t in row) / C
                    x_b = (x[n, c, h, k] - mu_b) / math.sqrt(var_b + eps)
                    x_f = (x[n, c, h, k] - mu_f) / math.sqrt(var_f + eps)
                    mixed = (1 / B - 1e-4) * x_f + (1 - 1 / B - 1e-4) * x_b
                    want[n, c, h, k] = w[c] * mixed / math.sqrt(C) + b[c]
    assert_close(ref.batch_layer_norm(x, w, b, B, eps, rm, rv), want, what="y")


def test_batch_layer_norm_mixes_layer_norm_2d_and_per_column_batch_norm(rng, assert_close):
    # x_F is LayerNorm2d without affine; x_B standardizes each (c, h, w) column over N.
    x = rng.normal(0.3, 1.2, (3, 4, 2, 3))
    B, eps = 2, 1e-3
    a, b = 1 / B - 1e-4, 1 - 1 / B - 1e-4
    x_f = ref.layer_norm_2d(x, None, None, eps)
    x_b = ref.batch_norm(x.reshape(3, -1), eps=eps).reshape(x.shape)
    assert_close(ref.batch_layer_norm(x, None, None, B, eps), (a * x_f + b * x_b) / 2.0, what="y")


# == ProxyNorm ====================================================================================

PROXY_SHAPES = [
    pytest.param((2, 3, 2, 3), id="2x3x2x3"),
    pytest.param((3, 1, 2, 2), id="C1-3x1x2x2"),
    pytest.param((2, 9, 1, 1), id="C9-spatial1-2x9x1x1"),
    pytest.param((4, 3), id="no_spatial-4x3"),
]

PROXY_NAMES = ("weight", "bias", "proxy_weight", "proxy_bias")


def _proxy_params(rng, C):
    return [rng.uniform(0.5, 1.5, C), rng.normal(0.0, 0.5, C),
            rng.normal(0.0, 0.3, C), rng.normal(0.0, 0.3, C)]


@pytest.mark.parametrize("shape", PROXY_SHAPES)
@pytest.mark.parametrize("activation", ref.PROXY_ACTIVATIONS)
def test_proxy_norm_backward_equals_finite_differences(shape, activation, rng, assert_close):
    x = rng.normal(0.0, 1.0, shape)
    dy = rng.normal(size=shape)
    _check_backward(
        lambda x, *p: ref.proxy_norm(x, *p, activation=activation),
        lambda x, dy, *p: ref.proxy_norm_backward(x, dy, *p, activation=activation),
        x, dy, _proxy_params(rng, shape[1]), PROXY_NAMES, assert_close)


@pytest.mark.parametrize("num_points", [1, 2, 7], ids=["K1", "K2", "K7"])
def test_proxy_norm_backward_with_few_points_and_large_eps(num_points, rng, assert_close):
    # K = 1: v_p = 0, only eps keeps s finite; K = 2 and 7: the mean-of-v_p term dominates.
    x = rng.normal(0.0, 1.0, (2, 3, 2, 2))
    dy = rng.normal(size=x.shape)
    _check_backward(
        lambda x, *p: ref.proxy_norm(x, *p, "silu", 0.5, num_points),
        lambda x, dy, *p: ref.proxy_norm_backward(x, dy, *p, "silu", 0.5, num_points),
        x, dy, _proxy_params(rng, 3), PROXY_NAMES, assert_close)


def test_proxy_norm_absent_parameters_take_their_init_and_get_no_gradient(rng, assert_close):
    x = rng.normal(0.0, 1.0, (2, 3, 2, 2))
    dy = rng.normal(size=x.shape)
    inits = [np.ones(3), np.zeros(3), np.zeros(3), np.zeros(3)]
    assert_close(ref.proxy_norm(x, None, None, None, None), ref.proxy_norm(x, *inits), what="y")
    got = ref.proxy_norm_backward(x, dy, None, None, None, None)
    want = ref.proxy_norm_backward(x, dy, *inits)
    assert_close(got[0], want[0], what="dx")
    assert got[1:] == (None, None, None, None)


def test_proxy_norm_with_identity_activation_has_a_closed_form(rng, assert_close):
    # phi = id: P_k = gamma (beta_p + (1+gamma_p) U_k) + beta, so mu_p = gamma (beta_p +
    # (1+gamma_p) mean U) + beta and v_p = gamma^2 (1+gamma_p)^2 var U.
    x = rng.normal(0.0, 1.0, (2, 3, 2, 2))
    g, b, gp, bp = _proxy_params(rng, 3)
    u = ref.proxy_points(200)
    shape = (1, 3, 1, 1)
    mu = (g * (bp + (1 + gp) * u.mean()) + b).reshape(shape)
    v = (g ** 2 * (1 + gp) ** 2 * u.var()).reshape(shape)
    want = (g.reshape(shape) * x + b.reshape(shape) - mu) / np.sqrt(v + 0.03)
    assert_close(ref.proxy_norm(x, g, b, gp, bp, "identity"), want, what="y")


def test_proxy_norm_spelled_out_for_gelu(rng, assert_close):
    x = rng.normal(0.0, 1.0, (2, 2, 3))
    g, b, gp, bp = _proxy_params(rng, 2)
    K, eps = 5, 0.03

    def gelu(t):
        return 0.5 * t * (1 + math.erf(t / math.sqrt(2)))
    want = np.empty_like(x)
    for c in range(2):
        points = [bp[c] + (1 + gp[c]) * math.sqrt(2) * ref._erfinv_newton(2 * (k + 0.5) / K - 1)
                  for k in range(K)]
        p = [gelu(g[c] * y + b[c]) for y in points]
        mu = sum(p) / K
        v = sum((t - mu) ** 2 for t in p) / K
        for n in range(2):
            for i in range(3):
                want[n, c, i] = (gelu(g[c] * x[n, c, i] + b[c]) - mu) / math.sqrt(v + eps)
    assert_close(ref.proxy_norm(x, g, b, gp, bp, "gelu", eps, K), want, what="y")


def test_proxy_norm_relu_kink_has_derivative_0(rng, assert_close):
    # beta = beta_p = 0 and K odd: the middle proxy point is U = erfinv(0) = 0 exactly, so
    # q = gamma*0 + 0 sits on relu's kink; half of x is exactly 0, so gamma x + beta does too.
    # relu'(0) = 0 (torch's): the backward equals the one from just left of the kink (those
    # inputs at -1e-300, beta_p at -1e-300), where finite differences would be defined.
    K = 9
    assert ref.proxy_points(K)[K // 2] == 0.0
    x = rng.normal(0.0, 1.0, (2, 3, 2, 2))
    x[:, :, 0] = 0.0
    dy = rng.normal(size=x.shape)
    g, _, gp, _ = _proxy_params(rng, 3)
    b, bp = np.zeros(3), np.zeros(3)
    got = ref.proxy_norm_backward(x, dy, g, b, gp, bp, "relu", 0.03, K)
    assert np.all(got[0][:, :, 0] == 0.0), "dx at the kink"
    left = x.copy()
    left[:, :, 0] = -1e-300
    want = ref.proxy_norm_backward(left, dy, g, b, gp, -1e-300 * np.ones(3), "relu", 0.03, K)
    for name, a, w in zip(("dx",) + PROXY_NAMES, got, want):
        assert_close(a, w, what=name)


def test_proxy_norm_matches_torch_autograd_including_the_relu_kink(rng, assert_close):
    torch = pytest.importorskip("torch")
    K = 9
    x = rng.normal(0.0, 1.0, (2, 3, 2, 2))
    x[:, :, 0] = 0.0
    dy = rng.normal(size=x.shape)
    g, _, gp, _ = _proxy_params(rng, 3)
    params = [g, np.zeros(3), gp, np.zeros(3)]
    for activation, phi in (("relu", torch.relu), ("silu", torch.nn.functional.silu),
                            ("gelu", torch.nn.functional.gelu), ("identity", lambda t: t)):
        tx = torch.tensor(x, requires_grad=True)
        tp = [torch.tensor(p, requires_grad=True) for p in params]
        u = torch.tensor(ref.proxy_points(K))
        tg, tb, tgp, tbp = (p.view(3, 1) for p in tp)
        pts = phi(tg * (tbp + (1 + tgp) * u) + tb)
        mu, var = pts.mean(dim=1), pts.var(dim=1, unbiased=False)
        z = phi(tp[0].view(1, 3, 1, 1) * tx + tp[1].view(1, 3, 1, 1))
        y = (z - mu.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 0.03)
        y.backward(torch.tensor(dy))
        assert_close(ref.proxy_norm(x, *params, activation, 0.03, K), y.detach().numpy(),
                     what=f"{activation} y")
        got = ref.proxy_norm_backward(x, dy, *params, activation, 0.03, K)
        for name, a, t in zip(("dx",) + PROXY_NAMES, got, [tx] + tp):
            assert_close(a, t.grad.numpy(), what=f"{activation} d{name}")


def test_proxy_points_are_normal_quantiles_to_double_precision():
    # U_k = sqrt(2) erfinv(2(k + 1/2)/K - 1): symmetric, increasing, and Phi(U_k) = (k + 1/2)/K.
    u = ref.proxy_points(200)
    assert u.shape == (200,)
    assert np.all(np.diff(u) > 0)
    np.testing.assert_allclose(u, -u[::-1], rtol=0, atol=1e-15)
    phi = np.array([0.5 * (1 + math.erf(t / math.sqrt(2))) for t in u])
    np.testing.assert_allclose(phi, (np.arange(200) + 0.5) / 200, rtol=1e-14, atol=0)
    assert ref.proxy_points(1).tolist() == [0.0]


def test_erfinv_newton_fallback_is_exact_to_double_precision():
    # The fallback used when SciPy is absent (and tested even when it is present), against
    # mpmath at 40 digits: within 2 ulps everywhere, including next to +-1 and at the switch
    # between the erf and erfc residuals (|t| = 1/2).
    mpmath = pytest.importorskip("mpmath")
    t = np.concatenate([np.linspace(-0.999999, 0.999999, 401),
                        [1e-300, 1e-12, -3e-8, 0.4999999, 0.5, -0.5000001, 0.995, -0.9995]])
    got = np.array([ref._erfinv_newton(float(v)) for v in t])
    with mpmath.workdps(40):
        want = np.array([float(mpmath.erfinv(mpmath.mpf(float(v)))) for v in t])
    np.testing.assert_allclose(got, want, rtol=2 * np.finfo(np.float64).eps, atol=0)


def test_erfinv_matches_torch():
    torch = pytest.importorskip("torch")
    t = np.linspace(-0.995, 0.995, 57)
    np.testing.assert_allclose(ref.erfinv(t), torch.special.erfinv(torch.tensor(t)).numpy(),
                               rtol=1e-14, atol=1e-16)


def test_proxy_norm_rejects_an_unknown_activation_naming_the_choices():
    x = np.zeros((1, 2, 2))
    with pytest.raises(ValueError, match="relu, silu, gelu, identity"):
        ref.proxy_norm(x, None, None, None, None, activation="tanh")
    with pytest.raises(ValueError, match="tanh"):
        ref.proxy_norm_backward(x, x, None, None, None, None, activation="tanh")


# == LayerNorm2d ==================================================================================

LN2D_SHAPES = [
    pytest.param((2, 3, 4, 5), id="2x3x4x5"),
    pytest.param((3, 1, 2, 2), id="C1-3x1x2x2"),
    pytest.param((2, 9, 1, 1), id="C9-spatial1-2x9x1x1"),
    pytest.param((4, 5), id="no_spatial-4x5"),
    pytest.param((2, 3, 2, 2, 2), id="5d-2x3x2x2x2"),
]


@pytest.mark.parametrize("shape", LN2D_SHAPES)
@AFFINE
def test_layer_norm_2d_backward_equals_finite_differences(shape, affine, rng, assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    C = shape[1]
    _check_backward(lambda x, w, b: ref.layer_norm_2d(x, w, b, 1e-6),
                    lambda x, dy, w, b: ref.layer_norm_2d_backward(x, dy, w, b, 1e-6),
                    x, dy, [_weight(rng, affine, C), _bias(rng, affine, C)], ("weight", "bias"),
                    assert_close)


def test_layer_norm_2d_is_layer_norm_over_channels_last(rng, assert_close):
    x = rng.normal(0.3, 1.2, (2, 5, 3, 4))
    dy = rng.normal(size=x.shape)
    w, b = _weight(rng, True, 5), _bias(rng, True, 5)
    last = np.moveaxis(x, 1, -1)
    assert_close(ref.layer_norm_2d(x, w, b),
                 np.moveaxis(ref.layer_norm(last, (5,), w, b, 1e-6), -1, 1), what="y")
    dx, dw, db = ref.layer_norm_2d_backward(x, dy, w, b)
    ldx, ldw, ldb = ref.layer_norm_backward(last, np.moveaxis(dy, 1, -1), (5,), w, b, 1e-6)
    assert_close(dx, np.moveaxis(ldx, -1, 1), what="dx")
    assert_close(dw, ldw, what="dweight")
    assert_close(db, ldb, what="dbias")


def test_layer_norm_2d_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(0.3, 1.2, (2, 5, 3, 4))
    w, b = rng.uniform(0.5, 1.5, 5), rng.normal(size=5)
    want = torch.nn.functional.layer_norm(torch.from_numpy(x).permute(0, 2, 3, 1), (5,),
                                          torch.from_numpy(w), torch.from_numpy(b), 1e-6)
    np.testing.assert_allclose(ref.layer_norm_2d(x, w, b), want.permute(0, 3, 1, 2).numpy(),
                               rtol=1e-12, atol=1e-12)


# == LocalResponseNorm ============================================================================

LRN_CASES = [
    pytest.param((2, 5, 4), 3, id="3d-2x5x4-size3"),
    pytest.param((2, 6, 3, 2), 2, id="4d-2x6x3x2-size2_even"),
    pytest.param((2, 6, 3, 2), 5, id="4d-2x6x3x2-size5"),
    pytest.param((1, 4, 2, 2, 3), 4, id="5d-1x4x2x2x3-size4_even"),
    pytest.param((2, 9, 1, 1), 3, id="C9-spatial1-2x9x1x1-size3"),
    pytest.param((2, 1, 3, 3), 3, id="C1-2x1x3x3-size3"),
    pytest.param((2, 3, 2, 2), 1, id="size1-2x3x2x2"),
    pytest.param((2, 3, 2, 2), 8, id="size_above_C-2x3x2x2-size8"),
]


@pytest.mark.parametrize("shape, size", LRN_CASES)
@pytest.mark.parametrize("alpha, beta, k", [(1e-4, 0.75, 1.0), (0.8, 0.6, 2.0)],
                         ids=["defaults", "alpha0.8_beta0.6_k2"])
def test_local_response_norm_backward_equals_finite_differences(shape, size, alpha, beta, k,
                                                                rng, assert_close):
    # alpha = 0.8: the window's cross terms are as large as the diagonal one, so a window
    # transposed the wrong way (even sizes) cannot hide.
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    _check_backward(lambda x: ref.local_response_norm(x, size, alpha, beta, k),
                    lambda x, dy: ref.local_response_norm_backward(x, dy, size, alpha, beta, k),
                    x, dy, [], (), assert_close)


def test_local_response_norm_spelled_out(rng, assert_close):
    # size 4: channel c's window is c-2 .. c+1, cut at the edges, the sum divided by 4 anyway.
    x = rng.normal(0.3, 1.2, (2, 5, 3))
    size, alpha, beta, k = 4, 0.5, 0.75, 1.5
    want = np.empty_like(x)
    for c in range(5):
        window = [j for j in range(c - 2, c + 2) if 0 <= j < 5]
        s = k + alpha / size * sum(x[:, j] ** 2 for j in window)
        want[:, c] = x[:, c] / s ** beta
    assert_close(ref.local_response_norm(x, size, alpha, beta, k), want, what="y")


@pytest.mark.parametrize("shape", [(2, 7, 5), (2, 6, 3, 4), (1, 5, 2, 3, 2)], ids=["3d", "4d", "5d"])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 9], ids=lambda s: f"size{s}")
def test_local_response_norm_matches_torch(shape, size, rng, assert_close):
    torch = pytest.importorskip("torch")
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    alpha, beta, k = 0.7, 0.75, 1.2
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.local_response_norm(tx, size, alpha, beta, k)
    ty.backward(torch.tensor(dy))
    assert_close(ref.local_response_norm(x, size, alpha, beta, k), ty.detach().numpy(), what="y")
    assert_close(ref.local_response_norm_backward(x, dy, size, alpha, beta, k), tx.grad.numpy(),
                 what="dx")


# == EvoNorm-B0 ===================================================================================

B0_SHAPES = [
    pytest.param((3, 4, 2, 3), id="3x4x2x3"),
    pytest.param((2, 1, 3, 3), id="C1-2x1x3x3"),
    pytest.param((2, 9, 2, 2), id="C9-2x9x2x2"),
    pytest.param((4, 3, 1, 1), id="spatial1-4x3x1x1"),
    pytest.param((1, 3, 4, 2), id="N1-1x3x4x2"),
]

B0_NAMES = ("weight", "bias", "v")


@pytest.mark.parametrize("shape", B0_SHAPES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@AFFINE
def test_evonorm_b0_backward_equals_finite_differences(shape, mode, affine, rng, assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    C = shape[1]
    v = rng.normal(1.0, 0.5, C)
    rv = rng.uniform(0.5, 2.0, C) if mode == "eval" else None
    a, _, b = ref._evonorm_b0_terms(x, v, 1e-3, rv)
    assert (a > b).any() and (b > a).any(), "both terms of the max are exercised"
    _check_backward(lambda x, w, b, v: ref.evonorm_b0(x, w, b, v, 1e-3, rv),
                    lambda x, dy, w, b, v: ref.evonorm_b0_backward(x, dy, w, b, v, 1e-3, rv),
                    x, dy, [_weight(rng, affine, C), _bias(rng, affine, C), v], B0_NAMES,
                    assert_close)


def _b0_tied_input(rng):
    """(N=2, C=3, 2, 2) whose channel 1 has, in both samples, the same multiset of small dyadic
    values: its mean and biased variances are exact in any order, var_I == var_B, and with v_1 = 0
    the two terms of B0's max are equal at every entry of channel 1."""
    x = rng.normal(0.3, 1.2, (2, 3, 2, 2))
    plane = np.array([-1.5, 0.25, 0.75, 2.5])
    x[0, 1] = plane.reshape(2, 2)
    x[1, 1] = rng.permutation(plane).reshape(2, 2)
    v = np.array([1.1, 0.0, 0.7])
    return x, v


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evonorm_b0_tie_splits_the_gradient_evenly(mode, rng, assert_close):
    # At an exact tie of max(a, b) the rule is torch.maximum's: half to each term. With v_1 = 0
    # every entry of channel 1 is tied; v_1 = +d and v_1 = -d break each tie one way and the
    # other (b = s_I + v_1 x moves with the sign of x), so the tie's gradient is the mean of the
    # two, to O(d).
    x, v = _b0_tied_input(rng)
    eps = 1e-3
    rv = np.array([0.8, x[0, 1].var(), 1.3]) if mode == "eval" else None
    a, _, b = ref._evonorm_b0_terms(x, v, eps, rv)
    assert np.all(a[:, 1] == b[:, 1]), "channel 1 must tie exactly"
    assert not np.any(a[:, [0, 2]] == b[:, [0, 2]])
    dy = rng.normal(size=x.shape)
    w, bias = _weight(rng, True, 3), _bias(rng, True, 3)
    got = ref.evonorm_b0_backward(x, dy, w, bias, v, eps, rv)
    d = 1e-9
    plus = ref.evonorm_b0_backward(x, dy, w, bias, v + np.array([0, d, 0]), eps, rv)
    minus = ref.evonorm_b0_backward(x, dy, w, bias, v - np.array([0, d, 0]), eps, rv)
    for name, g, p, m in zip(("dx",) + B0_NAMES, got, plus, minus):
        assert_close(g, (p + m) / 2, tol=1e-7, what=name)
    # ... and the split is a real one: giving the whole tie to either side differs.
    assert np.max(np.abs(plus[0] - minus[0])) > 1e-3


def test_evonorm_b0_matches_timms_form_in_torch_autograd_including_a_tie(rng, assert_close):
    # timm's EvoNorm2dB0 (the equations): var = x.var((0, 2, 3), unbiased=False) in
    # training, left = sqrt(var + eps), right = x*v + sqrt(x.var((2, 3), unbiased=False) + eps),
    # y = x / left.max(right) * weight + bias; torch.maximum splits a tie evenly.
    torch = pytest.importorskip("torch")
    x, v = _b0_tied_input(rng)
    dy = rng.normal(size=x.shape)
    w, b = _weight(rng, True, 3), _bias(rng, True, 3)
    tx = torch.tensor(x, requires_grad=True)
    tw, tb, tv = (torch.tensor(p, requires_grad=True) for p in (w, b, v))
    shape = (1, -1, 1, 1)
    left = torch.sqrt(tx.var(dim=(0, 2, 3), unbiased=False) + 1e-3).view(shape).expand_as(tx)
    right = tx * tv.view(shape) + torch.sqrt(tx.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-3)
    assert torch.equal(left[:, 1], right[:, 1]), "torch sees the same exact tie"
    ty = tx / left.max(right) * tw.view(shape) + tb.view(shape)
    ty.backward(torch.tensor(dy))
    assert_close(ref.evonorm_b0(x, w, b, v), ty.detach().numpy(), what="y")
    for name, g, t in zip(("dx",) + B0_NAMES, ref.evonorm_b0_backward(x, dy, w, b, v),
                          (tx, tw, tb, tv)):
        assert_close(g, t.grad.numpy(), what=name)


def test_evonorm_b0_spelled_out(rng, assert_close):
    x = rng.normal(0.3, 1.2, (2, 2, 3))
    w, b, v = np.array([1.5, 0.5]), np.array([0.1, -0.2]), np.array([0.8, 1.2])
    eps = 1e-3
    want = np.empty_like(x)
    for c in range(2):
        values = x[:, c].ravel()
        m_b = sum(values) / len(values)
        a = math.sqrt(sum((t - m_b) ** 2 for t in values) / len(values) + eps)
        for n in range(2):
            m_i = sum(x[n, c]) / 3
            s_i = math.sqrt(sum((t - m_i) ** 2 for t in x[n, c]) / 3 + eps)
            for i in range(3):
                want[n, c, i] = x[n, c, i] / max(a, v[c] * x[n, c, i] + s_i) * w[c] + b[c]
    assert_close(ref.evonorm_b0(x, w, b, v, eps), want, what="y")


# == EvoNorm-S0 ===================================================================================

S0_CASES = [
    pytest.param((2, 4, 3, 3), 2, id="G2-2x4x3x3"),
    pytest.param((2, 4, 3, 3), 4, id="groups_of_one_channel-G4-2x4x3x3"),
    pytest.param((3, 1, 2, 2), 1, id="C1-G1-3x1x2x2"),
    pytest.param((2, 9, 2, 2), 3, id="C9-G3-2x9x2x2"),
    pytest.param((2, 6, 1, 1), 3, id="spatial1-G3-2x6x1x1"),
    pytest.param((2, 6, 1, 1), 6, id="spatial1-groups_of_one_entry-2x6x1x1"),
]


@pytest.mark.parametrize("shape, groups", S0_CASES)
@AFFINE
def test_evonorm_s0_backward_equals_finite_differences(shape, groups, affine, rng, assert_close):
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    C = shape[1]
    v = rng.normal(1.0, 0.5, C)
    _check_backward(lambda x, w, b, v: ref.evonorm_s0(x, w, b, v, groups, 1e-5),
                    lambda x, dy, w, b, v: ref.evonorm_s0_backward(x, dy, w, b, v, groups, 1e-5),
                    x, dy, [_weight(rng, affine, C), _bias(rng, affine, C), v], B0_NAMES,
                    assert_close)


def test_evonorm_s0_with_v_0_is_half_of_group_norm_without_mean_removal(rng, assert_close):
    # sigmoid(0) = 1/2: y = x/(2 std_G) gamma + beta.
    x = rng.normal(0.3, 1.2, (2, 6, 2, 3))
    w, b = _weight(rng, True, 6), _bias(rng, True, 6)
    xg = x.reshape(2, 3, -1)
    std = np.sqrt(xg.var(axis=2, keepdims=True) + 1e-5)
    want = (0.5 * xg / std).reshape(x.shape) * w.reshape(1, 6, 1, 1) + b.reshape(1, 6, 1, 1)
    assert_close(ref.evonorm_s0(x, w, b, np.zeros(6), groups=3), want, what="y")


def test_evonorm_s0_matches_timms_form_in_torch_autograd(rng, assert_close):
    # timm's EvoNorm2dS0: x * (x * v).sigmoid() / group_std(x, groups, eps) * weight + bias, with
    # group_std the sqrt of x.view(B, G, C/G, H, W).var((2, 3, 4), unbiased=False) + eps.
    torch = pytest.importorskip("torch")
    x = rng.normal(0.3, 1.2, (2, 6, 3, 2))
    dy = rng.normal(size=x.shape)
    w, b, v = _weight(rng, True, 6), _bias(rng, True, 6), rng.normal(1.0, 0.5, 6)
    tx = torch.tensor(x, requires_grad=True)
    tw, tb, tv = (torch.tensor(p, requires_grad=True) for p in (w, b, v))
    shape = (1, -1, 1, 1)
    std = torch.sqrt(tx.view(2, 3, 2, 3, 2).var(dim=(2, 3, 4), unbiased=False, keepdim=True)
                     + 1e-5).expand(2, 3, 2, 3, 2).reshape(x.shape)
    ty = tx * (tx * tv.view(shape)).sigmoid() / std * tw.view(shape) + tb.view(shape)
    ty.backward(torch.tensor(dy))
    assert_close(ref.evonorm_s0(x, w, b, v, groups=3), ty.detach().numpy(), what="y")
    for name, g, t in zip(("dx",) + B0_NAMES, ref.evonorm_s0_backward(x, dy, w, b, v, groups=3),
                          (tx, tw, tb, tv)):
        assert_close(g, t.grad.numpy(), what=name)
