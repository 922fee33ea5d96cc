"""FilterResponseNorm2d, EvoNormB0_2d and EvoNormS0_2d against the float64 references
(reference.py), issue 11.

Spec (the issue's equations are the contract):
- FRN+TLU (arXiv 1911.09737): per (n, c), nu2 = mean over the spatial entries of x^2 (no mean
  subtraction), x_hat = x / sqrt(nu2 + eps_total), eps_total = eps or eps + |eps_l| (eps_l
  learnable, shape (1,), init 1e-4, with learnable_eps); y = weight x_hat + bias; with tlu,
  z = max(y, tau) and where y == tau the gradient goes to tau (none through y). No running
  statistics: training and inference are the same. Accepts (N, C) and any (N, C, *spatial).
- EvoNorm-B0 (arXiv 2004.02967, timm's): y = x / max(sqrt(var_B + eps), v x + sqrt(var_I + eps))
  * weight + bias; var_B over (N, H, W), biased and differentiated in training, the running
  (unbiased, torch's EMA with `momentum`) one in inference; var_I per (n, c) over (H, W). At an
  exact tie of the max the gradient splits evenly (torch.maximum's rule).
  `use_batch_stats = True` after eval(): batch variance, running_var untouched.
- EvoNorm-S0: y = x sigmoid(v x) / sqrt(var_G + eps) * weight + bias, var_G biased per (n, group)
  over (C/G, H, W), groups of one channel allowed; groups must divide C (ValueError naming it).

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import normkit
import reference as ref
from variant_checks import (FLOAT_DTYPES, HALF_EPS, MODE, VIEWS,
                            assert_bitwise_same_threads_any_state, assert_state_dict_round_trip,
                            check_all_gradients, check_half_input_all,
                            check_view_matches_copy_any_state, half_dtype, make_input, shape_id)


def shape_name(shape):
    """shape_id for 4-D; (N, C) and other ranks spelled out: N5-C4, N2-C3-11, N2-C3-3x4x2."""
    if len(shape) == 2:
        return f"N{shape[0]}-C{shape[1]}"
    return shape_id(shape)


def spatial_size(shape):
    return int(np.prod(shape[2:], dtype=np.int64))


def randomized(layer, rng, randomize_affine):
    """Random parameters (conftest's randomize_affine), with v around 1 and eps_l away from the
    kink of |eps_l| at 0 (either sign, so that the sign of its gradient is tested)."""
    params = randomize_affine(layer)
    if "v" in params:
        params["v"][...] = rng.uniform(0.3, 1.5, params["v"].shape)
    if "eps_l" in params:
        params["eps_l"][...] = rng.choice([-1.0, 1.0]) * rng.uniform(0.02, 0.1)
    return layer


def grads_dict(names, values):
    """{name: gradient} for the names whose gradient is not None (an absent parameter)."""
    return {n: g for n, g in zip(names, values) if g is not None}


# == FilterResponseNorm2d =========================================================================

def frn(C, dtype=np.float64, **kw):
    return normkit.FilterResponseNorm2d(C, dtype=dtype, **kw)


def frn_reference(layer, x, dy=None):
    args = (layer.weight, layer.bias, layer.tau, layer.eps, layer.eps_l)
    if dy is None:
        return ref.filter_response_norm(x, *args)
    dx, *grads = ref.filter_response_norm_backward(x, dy, *args)
    return dx, grads_dict(("weight", "bias", "tau", "eps_l"), grads)


def frn_dx_scale(layer, x, dy):
    """r |dy weight| per plane: the size of the two terms of dx that cancel where |x| >> sqrt(eps)
    (spatial size 1 makes x_hat nearly sign(x) and dx nearly zero)."""
    xp = ref.f64(x).reshape(x.shape[0], x.shape[1], -1)
    eps = layer.eps + (0.0 if layer.eps_l is None else abs(float(layer.eps_l[0])))
    r = 1.0 / np.sqrt((xp ** 2).mean(axis=2, keepdims=True) + eps)
    g = np.abs(ref.f64(dy)).reshape(xp.shape) * np.abs(ref.f64(layer.weight)).reshape(1, -1, 1)
    return float(np.max(r * g))


FRN_CONFIGS = {
    "tlu": dict(),
    "no_tlu": dict(tlu=False),
    "tlu-learnable_eps": dict(learnable_eps=True),
}


def frn_case(shape, note=""):
    return pytest.param(shape, id=shape_name(shape) + note)


FRN_SHAPES = [
    frn_case((2, 3, 7, 5)),
    frn_case((3, 23, 4, 5), "-C23"),
    frn_case((1, 1, 7, 5), "-N1-C1"),
    frn_case((4, 8, 1, 1), "-spatial1"),
    frn_case((5, 4), "-NC-input"),
    frn_case((1, 7), "-NC-input-N1"),
    frn_case((2, 3, 11), "-3d"),
    frn_case((2, 3, 3, 4, 2), "-5d"),
    frn_case((2, 3, 45, 47), "-chunk-tail"),
]


@pytest.mark.parametrize("shape", FRN_SHAPES)
@pytest.mark.parametrize("config", list(FRN_CONFIGS))
def test_frn_forward_and_backward_match_the_reference(shape, config, dtype, rng, randomize_affine,
                                                      assert_close):
    layer = randomized(frn(shape[1], dtype, **FRN_CONFIGS[config]), rng, randomize_affine)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    count = max(spatial_size(shape), shape[0] * spatial_size(shape))
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, frn_reference(layer, x), dtype, count=count, what="y")
    want_dx, want_grads = frn_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close,
                        count, frn_dx_scale(layer, x, dy))


def test_frn_parameters_and_their_initial_values():
    layer = frn(5, learnable_eps=True)
    assert list(layer.parameters()) == ["weight", "bias", "tau", "eps_l"]
    np.testing.assert_array_equal(layer.weight, np.ones(5))
    np.testing.assert_array_equal(layer.bias, np.zeros(5))
    np.testing.assert_array_equal(layer.tau, np.zeros(5))
    assert layer.eps_l.shape == (1,) and layer.eps_l[0] == 1e-4
    assert layer.eps == 1e-6
    assert list(frn(5, tlu=False).parameters()) == ["weight", "bias"]
    assert frn(5, tlu=False).tau is None


@pytest.mark.parametrize("config", list(FRN_CONFIGS))
def test_frn_training_and_eval_are_the_same(config, rng, randomize_affine):
    layer = randomized(frn(4, **FRN_CONFIGS[config]), rng, randomize_affine)
    x = make_input(rng, (3, 4, 5, 6), np.float64)
    dy = rng.standard_normal(x.shape)
    y_train, dx_train = layer(x), layer.backward(dy)
    grads_train = dict(layer.grads)
    layer.eval()
    np.testing.assert_array_equal(layer(x), y_train)
    np.testing.assert_array_equal(layer.backward(dy), dx_train)
    for key, g in grads_train.items():
        np.testing.assert_array_equal(layer.grads[key], g, err_msg=key)
    assert layer.state_dict().keys() == layer.parameters().keys()  # no running statistics


def test_frn_normalizes_each_plane_by_its_mean_square_without_removing_the_mean(assert_close):
    # A plane of constant value c: nu2 = c^2, x_hat = c/sqrt(c^2 + eps), not 0 as after centring.
    layer = frn(2, tlu=False)
    x = np.empty((1, 2, 3, 3))
    x[0, 0], x[0, 1] = 3.0, -0.5
    want = np.array([3.0 / np.sqrt(9.0 + 1e-6), -0.5 / np.sqrt(0.25 + 1e-6)])
    assert_close(layer(x), np.broadcast_to(want.reshape(1, 2, 1, 1), x.shape), np.float64,
                 what="y")


def tau_away_from_ties(layer, x, margin=1e-3):
    """Set tau per channel to the middle of the widest gap between the layer's pre-TLU outputs y
    of that channel (so that entries lie on both sides of it); asserts that every y is at least
    `margin` from tau, so finite differences never cross the kink."""
    layer.tau[...] = 0.0
    y = ref.filter_response_norm(x, layer.weight, layer.bias, None, layer.eps, layer.eps_l)
    y = np.moveaxis(y, 1, 0).reshape(x.shape[1], -1)
    for c in range(y.shape[0]):
        s = np.sort(y[c])
        k = int(np.argmax(s[1:] - s[:-1]))
        layer.tau[c] = 0.5 * (s[k] + s[k + 1])
    assert np.min(np.abs(y - layer.tau[:, None])) > margin, "the data puts a y next to tau"
    assert np.all((y > layer.tau[:, None]).any(axis=1) & (y < layer.tau[:, None]).any(axis=1))


@pytest.mark.parametrize("shape, config", [
    pytest.param((2, 3, 3, 4), "tlu", id="N2-C3-3x4-tlu"),
    pytest.param((3, 2, 2, 3), "tlu-learnable_eps", id="N3-C2-2x3-tlu-learnable_eps"),
    pytest.param((4, 5), "tlu-learnable_eps", id="N4-C5-NC-input-tlu-learnable_eps"),
    pytest.param((3, 2, 1, 1), "tlu-learnable_eps", id="N3-C2-1x1-tlu-learnable_eps"),
    pytest.param((1, 1, 3, 4), "tlu", id="N1-C1-3x4-tlu"),
    pytest.param((2, 3, 5), "no_tlu", id="N2-C3-5-no_tlu"),
])
def test_frn_float64_backward_equals_finite_differences_away_from_ties(
        shape, config, rng, randomize_affine, check_gradients_by_finite_differences):
    layer = randomized(frn(shape[1], **FRN_CONFIGS[config]), rng, randomize_affine)
    x = make_input(rng, shape, np.float64)
    if len(shape) == 2:  # (N, C): x_hat is nearly sign(x); both signs give y clusters to split
        x[1::2] *= -1.0
    if layer.tau is not None:
        tau_away_from_ties(layer, x)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


# -- FRN: exact ties of the TLU -------------------------------------------------------------------

@pytest.mark.parametrize("shape, zeros", [
    pytest.param((3, 4, 5, 6), (slice(None), slice(None), [0, 2, 4], [1, 1, 3]),
                 id="N3-C4-5x6-three-zeros-per-plane"),
    pytest.param((6, 5), ([0, 3, 4], slice(None)), id="N6-C5-NC-input-zero-rows"),
])
@pytest.mark.parametrize("learnable_eps", [False, True], ids=["eps", "learnable_eps"])
def test_frn_tie_y_equal_tau_sends_the_whole_gradient_to_tau(shape, zeros, learnable_eps, dtype,
                                                             rng, randomize_affine, assert_close):
    # Where x = 0, y = weight*0 + bias = bias exactly; with tau = bias those entries are exact
    # ties y == tau: their dy goes to tau alone, not to bias (nor weight), and their dx is 0
    # (dx_i = r g_i - r^3 x_i mean(g x): g_i = 0 at a tie and x_i = 0).
    layer = randomized(frn(shape[1], dtype, learnable_eps=learnable_eps), rng, randomize_affine)
    layer.tau[...] = layer.bias
    x = make_input(rng, shape, dtype)
    x[zeros] = 0.0
    ties = x == 0
    dy = rng.uniform(0.5, 1.5, shape).astype(dtype)  # one sign: the ties' share cannot cancel
    y = layer(x)
    np.testing.assert_array_equal(y[ties], np.broadcast_to(layer.tau.reshape(
        (1, -1) + (1,) * (len(shape) - 2)), shape)[ties])
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dx[ties], 0.0)
    want_dx, want_grads = frn_reference(layer, x, dy)
    count = shape[0] * spatial_size(shape)
    check_all_gradients(layer, dx, want_dx, want_grads, dtype, assert_close, count,
                        frn_dx_scale(layer, x, dy))
    # The rule is visible: dtau and dbias each differ from the other rule (ties to y) by the
    # ties' sum of dy, which is at least 0.5 per tie.
    y64 = ref.filter_response_norm(x, layer.weight, layer.bias, None, layer.eps, layer.eps_l)
    axes = tuple(i for i in range(len(shape)) if i != 1)
    tau_b = ref.f64(layer.tau).reshape((1, -1) + (1,) * (len(shape) - 2))
    below_or_tie = np.where(y64 <= tau_b, ref.f64(dy), 0.0).sum(axis=axes)
    strictly_below = np.where(y64 < tau_b, ref.f64(dy), 0.0).sum(axis=axes)
    assert np.all(below_or_tie - strictly_below >= 0.5)
    assert_close(layer.grads["tau"], below_or_tie, dtype, count=count, what="dtau")


def test_frn_tie_at_a_nonzero_input_follows_the_layers_own_y(dtype, rng, randomize_affine):
    # tau_c set to the layer's own pre-TLU output at some entries (x != 0) makes those entries
    # exact ties of the layer's y: z there is tau, their dy is in dtau and not in dbias.
    C = 3
    shape = (2, C, 4, 5)
    plain = randomized(frn(C, dtype, tlu=False), rng, randomize_affine)
    x = make_input(rng, shape, dtype)
    y_plain = plain(x)
    layer = frn(C, dtype)
    layer.weight[...], layer.bias[...] = plain.weight, plain.bias
    layer.tau[...] = y_plain[1, :, 2, 3]  # one tie per channel (at least), in sample 1
    z = layer(x)
    tau_b = layer.tau.reshape(1, C, 1, 1)
    np.testing.assert_array_equal(z, np.maximum(y_plain, tau_b))
    dy = rng.uniform(0.5, 1.5, shape).astype(dtype)
    layer.backward(dy)
    passes = y_plain > tau_b
    assert not passes[1, :, 2, 3].any()
    want_dbias = np.where(passes, dy.astype(np.float64), 0.0).sum(axis=(0, 2, 3))
    want_dtau = np.where(passes, 0.0, dy.astype(np.float64)).sum(axis=(0, 2, 3))
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(layer.grads["bias"], want_dbias, rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.grads["tau"], want_dtau, rtol=tol, atol=tol)


# == EvoNormB0_2d =================================================================================

def b0(C, dtype=np.float64, **kw):
    return normkit.EvoNormB0_2d(C, dtype=dtype, **kw)


def b0_reference(layer, x, dy=None, batch=None):
    """Batch variance in training (or with batch=True), the running one otherwise."""
    batch = layer.training if batch is None else batch
    args = (layer.weight, layer.bias, layer.v, layer.eps, None if batch else layer.running_var)
    if dy is None:
        return ref.evonorm_b0(x, *args)
    dx, *grads = ref.evonorm_b0_backward(x, dy, *args)
    return dx, grads_dict(("weight", "bias", "v"), grads)


def set_running_var(layer, rng):
    layer.running_var[...] = rng.uniform(0.5, 2.0, layer.num_features)


def b0_case(shape, note=""):
    return pytest.param(shape, id=shape_id(shape) + note)


B0_TRAIN_SHAPES = [
    b0_case((4, 3, 5, 6)),
    b0_case((2, 23, 4, 3), "-C23"),
    b0_case((3, 1, 5, 4), "-C1"),
    b0_case((1, 3, 5, 4), "-N1"),
    b0_case((6, 8, 1, 1), "-spatial1"),
    b0_case((2, 3, 45, 47), "-chunk-tail"),
]
B0_EVAL_SHAPES = B0_TRAIN_SHAPES + [b0_case((1, 3, 1, 1), "-N1-spatial1"),
                                    b0_case((1, 1, 1, 1), "-one-value")]


def b0_count(shape):
    return shape[0] * shape[2] * shape[3]


@pytest.mark.parametrize("shape", B0_TRAIN_SHAPES)
def test_evonorm_b0_training_matches_the_reference(shape, dtype, rng, randomize_affine,
                                                   assert_close):
    layer = randomized(b0(shape[1], dtype), rng, randomize_affine)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, b0_reference(layer, x), dtype, count=b0_count(shape), what="y")
    want_dx, want_grads = b0_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close,
                        b0_count(shape))


@pytest.mark.parametrize("shape", B0_EVAL_SHAPES)
def test_evonorm_b0_eval_uses_the_running_variance(shape, dtype, rng, randomize_affine,
                                                   assert_close):
    layer = randomized(b0(shape[1], dtype), rng, randomize_affine)
    set_running_var(layer, rng)
    layer.eval()
    before = layer.running_var.copy()
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), b0_reference(layer, x), dtype, count=b0_count(shape), what="y")
    want_dx, want_grads = b0_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close,
                        b0_count(shape))
    np.testing.assert_array_equal(layer.running_var, before)


@pytest.mark.parametrize("momentum", [0.1, 0.3], ids=["momentum0.1", "momentum0.3"])
def test_evonorm_b0_running_variance_is_torchs_unbiased_ema(momentum, dtype, rng, assert_close):
    layer = b0(5, dtype, momentum=momentum)
    np.testing.assert_array_equal(layer.running_var, np.ones(5))
    want = np.ones(5)
    for step in range(1, 5):
        x = make_input(rng, (3, 5, 4, 6), dtype) * step
        layer(x)
        batch_var = ref.f64(x).var(axis=(0, 2, 3), ddof=1)
        want = (1 - momentum) * want + momentum * batch_var
        assert layer.running_var.dtype == dtype
        assert_close(layer.running_var, want, dtype, what=f"running_var, step {step}")
    assert list(layer.state_dict()) == ["weight", "bias", "v", "running_var"]


def test_evonorm_b0_use_batch_stats_in_eval_uses_the_batch_variance(dtype, rng, randomize_affine,
                                                                    assert_close):
    layer = randomized(b0(4, dtype), rng, randomize_affine)
    layer(make_input(rng, (3, 4, 5, 5), dtype))  # moves running_var away from 1
    layer.eval()
    layer.use_batch_stats = True
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    x = make_input(rng, (3, 4, 5, 5), dtype) * 3.0
    dy = rng.standard_normal(x.shape).astype(dtype)
    y = layer(x)
    assert_close(y, b0_reference(layer, x, batch=True), dtype, what="y")
    want_dx, want_grads = b0_reference(layer, x, dy, batch=True)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} changed")
    layer.use_batch_stats = False  # back to the running variance, which differs here
    y_running = layer(x)
    assert_close(y_running, b0_reference(layer, x, batch=False), dtype, what="y (running)")
    assert not np.allclose(y, y_running, atol=1e-3)


def b0_gap(layer, x, batch):
    """(min |a - b| over the entries, whether a > b somewhere, whether b > a somewhere)."""
    x = ref.f64(x)
    var_b = x.var(axis=(0, 2, 3), keepdims=True) if batch else ref.f64(
        layer.running_var).reshape(1, -1, 1, 1)
    a = np.sqrt(var_b + layer.eps)
    b = ref.f64(layer.v).reshape(1, -1, 1, 1) * x + np.sqrt(x.var(axis=(2, 3), keepdims=True)
                                                            + layer.eps)
    return float(np.min(np.abs(a - b))), bool((a > b).any()), bool((b > a).any())


@pytest.mark.parametrize("shape, training", [
    pytest.param((3, 3, 2, 3), True, id="N3-C3-2x3-train"),
    pytest.param((1, 2, 3, 4), True, id="N1-C2-3x4-train"),
    pytest.param((4, 2, 1, 1), True, id="N4-C2-1x1-train"),
    pytest.param((2, 3, 2, 3), False, id="N2-C3-2x3-eval"),
    pytest.param((1, 2, 1, 1), False, id="N1-C2-1x1-eval"),
])
def test_evonorm_b0_float64_backward_equals_finite_differences_away_from_ties(
        shape, training, rng, randomize_affine, check_gradients_by_finite_differences):
    layer = randomized(b0(shape[1]), rng, randomize_affine)
    set_running_var(layer, rng)
    layer.train(training)
    for _ in range(50):  # data whose max has a clear winner at every entry, both terms winning
        x = make_input(rng, shape, np.float64)
        gap, a_wins, b_wins = b0_gap(layer, x, training)
        if gap > 1e-3 and (a_wins and b_wins or shape[0] * shape[2] * shape[3] < 3):
            break
    else:
        pytest.fail("no data away from the ties of the max")
    # finite differences move var_B: the running variance only moves in training, which the
    # training forward does not read
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


# -- EvoNorm-B0: exact ties of the max ------------------------------------------------------------

def b0_tie_input(rng, shape, tie_channels, dtype):
    """Channels in tie_channels: every plane +-1 in equal numbers (mean 0, biased variance exactly
    1, so var_I = var_B = 1); the others random."""
    N, C, H, W = shape
    x = make_input(rng, shape, dtype)
    pattern = np.where((np.arange(H)[:, None] + np.arange(W)[None, :]) % 2 == 0, 1.0, -1.0)
    assert pattern.sum() == 0
    for n in range(N):
        for c in tie_channels:
            x[n, c] = pattern if (n + c) % 2 == 0 else -pattern
    return x


@MODE
def test_evonorm_b0_tie_of_the_max_splits_the_gradient_evenly(training, dtype, rng,
                                                              randomize_affine, assert_close):
    # With v_c = 0 and planes of +-1, b = 0*x + sqrt(var_I + eps) = sqrt(1 + eps) and
    # a = sqrt(var_B + eps) = sqrt(1 + eps) (training: var_B = 1; eval: running_var = 1):
    # an exact tie at every entry of those channels. dm splits 1/2 : 1/2 between a and b.
    shape, ties = (4, 3, 4, 4), [0, 2]
    layer = randomized(b0(3, dtype), rng, randomize_affine)
    layer.v[ties] = 0.0
    layer.running_var[...] = [1.0, 1.7, 1.0]
    layer.train(training)
    x = b0_tie_input(rng, shape, ties, dtype)
    x64 = ref.f64(x)
    assert np.all(x64[:, ties].var(axis=(2, 3)) == 1.0) and np.all(
        x64[:, ties].var(axis=(0, 2, 3)) == 1.0)  # the tie is exact in float64
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), b0_reference(layer, x), dtype, what="y")
    want_dx, want_grads = b0_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close)
    if not training:
        # The reference's rule is the mean of the two one-sided gradients (running_var a hair
        # above and below the tie), which differ: the split is visible in dv and dx.
        sides = []
        for delta in (1e-12, -1e-12):
            moved = ref.f64(layer.running_var).copy()
            moved[ties] += delta
            dx, *grads = ref.evonorm_b0_backward(x, dy, layer.weight, layer.bias, layer.v,
                                                 layer.eps, moved)
            sides.append((dx, grads_dict(("weight", "bias", "v"), grads)))
        np.testing.assert_allclose(want_grads["v"], 0.5 * (sides[0][1]["v"] + sides[1][1]["v"]),
                                   rtol=0, atol=1e-9)
        np.testing.assert_allclose(want_dx, 0.5 * (sides[0][0] + sides[1][0]), rtol=0, atol=1e-9)
        assert np.max(np.abs(sides[0][1]["v"] - sides[1][1]["v"])) > 0.1


# == EvoNormS0_2d =================================================================================

def s0(C, groups, dtype=np.float64, **kw):
    return normkit.EvoNormS0_2d(C, groups=groups, dtype=dtype, **kw)


def s0_reference(layer, x, dy=None):
    args = (layer.weight, layer.bias, layer.v, layer.groups, layer.eps)
    if dy is None:
        return ref.evonorm_s0(x, *args)
    dx, *grads = ref.evonorm_s0_backward(x, dy, *args)
    return dx, grads_dict(("weight", "bias", "v"), grads)


def s0_case(shape, groups, note=""):
    return pytest.param(shape, groups, id=f"{shape_id(shape)}-groups{groups}{note}")


S0_CASES = [
    s0_case((2, 8, 5, 6), 2),
    s0_case((3, 3, 5, 4), 3, "-one-channel-groups"),
    s0_case((2, 23, 4, 3), 23, "-one-channel-groups"),
    s0_case((2, 23, 4, 3), 1, "-one-group"),
    s0_case((3, 1, 5, 4), 1, "-C1"),
    s0_case((1, 6, 5, 4), 3, "-N1"),
    s0_case((4, 6, 1, 1), 3, "-spatial1"),
    s0_case((2, 64, 3, 3), 32, "-default-groups"),
    s0_case((2, 4, 45, 47), 2, "-chunk-tail"),
]


@pytest.mark.parametrize("shape, groups", S0_CASES)
@MODE
def test_evonorm_s0_forward_and_backward_match_the_reference(shape, groups, training, dtype, rng,
                                                             randomize_affine, assert_close):
    layer = randomized(s0(shape[1], groups, dtype), rng, randomize_affine).train(training)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    count = max(shape[0] * shape[2] * shape[3], shape[1] // groups * shape[2] * shape[3])
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, s0_reference(layer, x), dtype, count=count, what="y")
    want_dx, want_grads = s0_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close,
                        count)


def test_evonorm_s0_defaults():
    layer = normkit.EvoNormS0_2d(64)
    assert layer.groups == 32 and layer.eps == 1e-5 and layer.dtype == np.float32
    np.testing.assert_array_equal(layer.v, np.ones(64))
    assert list(layer.state_dict()) == ["weight", "bias", "v"]
    layer = normkit.EvoNormB0_2d(5)
    assert layer.eps == 1e-3 and layer.momentum == 0.1 and layer.use_batch_stats is False
    np.testing.assert_array_equal(layer.v, np.ones(5))
    np.testing.assert_array_equal(layer.running_var, np.ones(5))


@pytest.mark.parametrize("shape, groups", [
    s0_case((2, 6, 2, 3), 3), s0_case((2, 3, 2, 2), 3, "-one-channel-groups"),
    s0_case((1, 4, 1, 1), 2, "-N1-spatial1"), s0_case((3, 1, 2, 3), 1, "-C1")])
def test_evonorm_s0_float64_backward_equals_finite_differences(
        shape, groups, rng, randomize_affine, check_gradients_by_finite_differences):
    layer = randomized(s0(shape[1], groups), rng, randomize_affine)
    check_gradients_by_finite_differences(layer, make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))


@pytest.mark.parametrize("C, groups", [(6, 4), (23, 2), (3, 32)],
                         ids=["groups4-of-C6", "groups2-of-C23", "default32-of-C3"])
def test_evonorm_s0_groups_not_dividing_c_raise_naming_groups(C, groups):
    with pytest.raises(ValueError, match="groups"):
        normkit.EvoNormS0_2d(C, groups=groups)


@pytest.mark.parametrize("groups", [0, -3])
def test_evonorm_s0_non_positive_groups_raise_naming_groups(groups):
    with pytest.raises(ValueError, match="groups"):
        normkit.EvoNormS0_2d(6, groups=groups)


# == shared: state, half input, strides, threads ==================================================

def prepared(name, dtype, seed=0):
    """A layer of each kind with random parameters (C = 6), and a moved running_var for B0."""
    rng = np.random.default_rng(seed)
    layer = {"FRN": lambda: frn(6, dtype),
             "FRN-learnable_eps": lambda: frn(6, dtype, learnable_eps=True),
             "EvoNormB0": lambda: b0(6, dtype),
             "EvoNormS0": lambda: s0(6, 3, dtype)}[name]()
    for key, p in layer.parameters().items():
        if key == "eps_l":
            p[...] = 0.05
        elif key in ("bias", "tau"):
            p[...] = rng.normal(0.0, 0.5, p.shape)
        else:
            p[...] = rng.uniform(0.5, 1.5, p.shape)
    if isinstance(layer, normkit.EvoNormB0_2d):
        set_running_var(layer, rng)
    return layer


def reference_of(layer, x, dy):
    """(y, dx, {name: gradient}) of the layer's kind and mode."""
    reference = {normkit.FilterResponseNorm2d: frn_reference, normkit.EvoNormB0_2d: b0_reference,
                 normkit.EvoNormS0_2d: s0_reference}[type(layer)]
    dx, grads = reference(layer, x, dy)
    return reference(layer, x), dx, grads


# (name, training): FRN and S0 have no mode of their own; B0's two modes differ.
KINDS = [pytest.param("FRN", True, id="FRN"),
         pytest.param("FRN-learnable_eps", True, id="FRN-learnable_eps"),
         pytest.param("EvoNormB0", True, id="EvoNormB0-train"),
         pytest.param("EvoNormB0", False, id="EvoNormB0-eval"),
         pytest.param("EvoNormS0", True, id="EvoNormS0")]

STATE_KEYS = {
    "FRN": [("weight", (6,)), ("bias", (6,)), ("tau", (6,))],
    "FRN-learnable_eps": [("weight", (6,)), ("bias", (6,)), ("tau", (6,)), ("eps_l", (1,))],
    "EvoNormB0": [("weight", (6,)), ("bias", (6,)), ("v", (6,)), ("running_var", (6,))],
    "EvoNormS0": [("weight", (6,)), ("bias", (6,)), ("v", (6,))],
}


@pytest.mark.parametrize("name", list(STATE_KEYS))
def test_state_dict_keys_and_shapes_follow_the_api_table(name):
    layer = prepared(name, np.float32)
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == STATE_KEYS[name]
    assert all(v.dtype == np.float32 for v in layer.state_dict().values())
    assert set(layer.parameters()) == {k for k, _ in STATE_KEYS[name]} - {"running_var"}


@pytest.mark.parametrize("name", list(STATE_KEYS))
@FLOAT_DTYPES
def test_state_dict_round_trip_reproduces_the_layer(name, dtype, rng):
    fresh = {"FRN": lambda: frn(6, dtype), "FRN-learnable_eps": lambda: frn(6, dtype, learnable_eps=True),
             "EvoNormB0": lambda: b0(6, dtype), "EvoNormS0": lambda: s0(6, 3, dtype)}[name]()
    assert_state_dict_round_trip(prepared(name, dtype), fresh, rng, (4, 6, 5, 3), dtype)


@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("name, training", KINDS)
def test_half_input_is_computed_in_float32(half, name, training):
    # y and dx are computed in float32 from the exact half inputs and rounded once, so they lie
    # within half an ulp of the half type (HALF_EPS is a whole ulp: 2^-10, 2^-7) at the array's
    # scale of the float64 reference on those same inputs; float32's own error (~1e-6 here) is
    # far below that. The parameter gradients stay float32, within 1e-5. The data has no entry
    # within float32 rounding of a tie of the TLU or of B0's max (random, fixed seed).
    hdt = half_dtype(half)
    layer = prepared(name, np.float32).train(training)
    rng = np.random.default_rng(1)
    x = (0.5 + rng.standard_normal((4, 6, 7, 9))).astype(hdt)
    dy = rng.standard_normal(x.shape).astype(hdt)
    want_y, want_dx, want_grads = reference_of(layer, x, dy)
    check_half_input_all(layer, x, dy, want_y, want_dx, want_grads, half)


FRN_VIEWS = {**VIEWS,
             "NC-transposed": lambda rng, dt: make_input(rng, (6, 5), dt).T,
             "5d-step-sliced": lambda rng, dt: make_input(rng, (3, 6, 4, 6, 4), dt)[..., ::2, :]}


@pytest.mark.parametrize("view", list(FRN_VIEWS))
@pytest.mark.parametrize("learnable_eps", [False, True], ids=["eps", "learnable_eps"])
def test_frn_non_contiguous_input_gives_the_result_of_its_copy(view, learnable_eps, dtype, rng,
                                                              assert_close):
    name = "FRN-learnable_eps" if learnable_eps else "FRN"
    check_view_matches_copy_any_state(FRN_VIEWS[view](rng, dtype), lambda: prepared(name, dtype),
                                      rng, dtype, assert_close)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("name, training", KINDS[2:])
def test_evonorm_non_contiguous_input_gives_the_result_of_its_copy(view, name, training, dtype,
                                                                   rng, assert_close):
    check_view_matches_copy_any_state(VIEWS[view](rng, dtype),
                                      lambda: prepared(name, dtype).train(training), rng, dtype,
                                      assert_close)


THREAD_SHAPE = (5, 6, 55, 57)  # planes of 3135 = 2048 + 1087 entries


@pytest.mark.parametrize("name, training", KINDS)
def test_bitwise_identical_for_one_and_two_threads(name, training, dtype):
    assert_bitwise_same_threads_any_state(lambda: prepared(name, dtype).train(training),
                                          THREAD_SHAPE, dtype)


def test_frn_bitwise_identical_for_one_and_two_threads_on_nc_input(dtype):
    assert_bitwise_same_threads_any_state(lambda: frn(3000, dtype, learnable_eps=True),
                                          (64, 3000), dtype)


@pytest.mark.parametrize("name, training", KINDS)
def test_backward_is_that_of_its_forward_when_eps_changes_in_between(name, training, rng):
    # The backward's fold belongs to the forward it follows: an eps set between the two (or a
    # parameter changed in place) must not reach it.
    shape = (2, 6, 3, 4)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    want = prepared(name, np.float64).train(training)
    want(x)
    want_dx = want.backward(dy)
    layer = prepared(name, np.float64).train(training)
    layer(x)
    layer.eps = 0.5
    for p in layer.parameters().values():
        p += 1.0
    np.testing.assert_array_equal(layer.backward(dy), want_dx)
    for key, g in want.grads.items():
        np.testing.assert_array_equal(layer.grads[key], g, err_msg=key)
