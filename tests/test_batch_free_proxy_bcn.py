"""ProxyNorm2d and BatchChannelNorm2d against the float64 references (reference.py), issue 11.

Spec (the issue's equations are the contract):
- Proxy Norm (arXiv 2106.03743): z = phi(weight x + bias); z_hat = (z - mu_p)/sqrt(v_p + eps),
  mu_p and v_p (biased) the mean and variance over k < K = num_points of
  phi(weight Y_k + bias), Y_k = proxy_bias + (1 + proxy_weight) U_k,
  U_k = sqrt(2) erfinv(2 (k + 1/2)/K - 1). Per-channel parameters weight, bias, proxy_weight,
  proxy_bias (init 1, 0, 0, 0); phi in relu, silu, gelu (erf form), identity, any other name a
  ValueError listing them; the backward goes through mu_p and v_p into all four parameters.
  Training and inference are the same.
- BCN (arXiv 1911.09738): a per-channel BN with its own affine (bn_weight, bn_bias: C), then a
  per-sample group normalization over (C/G, H, W) with one affine pair per group (gn_weight,
  gn_bias: G = num_groups); one eps for both. estimate=False: ordinary BN in the batch part
  (batch statistics and torch's running rule in training, running statistics in eval;
  `use_batch_stats = True` after eval(): batch statistics, running ones untouched).
  estimate=True: in training first update the estimates (from 0 and 1) with r = estimate_rate,
  mu += r (mu_B - mu), var += r (mean over (N, H, W) of (x - mu_old)^2 - var), then normalize
  with the UPDATED estimates, constants in the backward; eval uses them too. num_groups must
  divide C (ValueError naming it).

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import normkit
from normkit import _core
import reference as ref
from variant_checks import (FLOAT_DTYPES, HALF_EPS, VIEWS, assert_bitwise_same_threads_any_state,
                            assert_state_dict_round_trip, check_all_gradients,
                            check_half_input_all, check_view_matches_copy_any_state, half_dtype,
                            make_input, shape_id, shapes, state_buffers)

ACTIVATIONS = ["relu", "silu", "gelu", "identity"]


def randomized(layer, rng):
    """Weights around 1 and biases around 0 (every learnable array of the layer); ProxyNorm's
    proxy_weight (gamma_p, init 0) around 0."""
    for name, p in layer.parameters().items():
        if name.endswith("weight") and name != "proxy_weight":
            p[...] = rng.uniform(0.5, 1.5, p.shape)
        else:
            p[...] = rng.normal(0.0, 0.5, p.shape)
    return layer


def channel_count(shape):
    return shape[0] * shape[2] * shape[3]


# == ProxyNorm2d ==================================================================================

def proxy(C, dtype=np.float64, **kw):
    return normkit.ProxyNorm2d(C, dtype=dtype, **kw)


PROXY_NAMES = ("weight", "bias", "proxy_weight", "proxy_bias")


def proxy_reference(layer, x, dy=None):
    args = (layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias, layer.activation,
            layer.eps, layer.num_points)
    if dy is None:
        return ref.proxy_norm(x, *args)
    dx, *grads = ref.proxy_norm_backward(x, dy, *args)
    return dx, dict(zip(PROXY_NAMES, grads))


PROXY_SHAPES = shapes((2, 3, 7, 5), (3, 23, 4, 5), (1, 1, 7, 5), (4, 8, 1, 1), (2, 3, 45, 47))


@pytest.mark.parametrize("shape", PROXY_SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_proxy_norm_forward_and_backward_match_the_reference(shape, activation, dtype, rng,
                                                             assert_close):
    layer = randomized(proxy(shape[1], dtype, activation=activation), rng)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    count = channel_count(shape)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, proxy_reference(layer, x), dtype, count=count, what="y")
    want_dx, want_grads = proxy_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close,
                        count)


@pytest.mark.parametrize("num_points, eps", [(1, 0.03), (7, 0.03), (200, 1e-3), (1000, 0.5)],
                         ids=["K1", "K7", "K200-eps1e-3", "K1000-eps0.5"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_proxy_norm_hyperparameters_match_the_reference(num_points, eps, activation, dtype, rng,
                                                        assert_close):
    # K = 1: the one proxy point is U_0 = 0, so v_p = 0 and the scale is 1/sqrt(eps).
    layer = randomized(proxy(4, dtype, activation=activation, num_points=num_points, eps=eps), rng)
    assert layer.num_points == num_points and layer.eps == eps
    x = make_input(rng, (3, 4, 5, 6), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert_close(layer(x), proxy_reference(layer, x), dtype, what="y")
    want_dx, want_grads = proxy_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close)


@pytest.mark.parametrize("name", PROXY_NAMES)
def test_proxy_norm_follows_a_parameter_changed_in_place_and_eps(name, rng, assert_close):
    # The proxy moments are kept between calls while the parameters stay: an in-place update
    # (an optimizer step) or a new eps must be seen by the next forward and backward.
    layer = randomized(proxy(5, np.float64, activation="gelu"), rng)
    x = rng.standard_normal((2, 5, 3, 4))
    dy = rng.standard_normal(x.shape)
    layer(x)
    getattr(layer, name)[2] += 0.25
    assert_close(layer(x), proxy_reference(layer, x), np.float64, what="y after the update")
    want_dx, want_grads = proxy_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, np.float64, assert_close)
    layer.eps = 0.5
    assert_close(layer(x), proxy_reference(layer, x), np.float64, what="y after eps changed")


def test_proxy_norm_defaults_and_initial_parameters():
    layer = normkit.ProxyNorm2d(5)
    assert layer.activation == "relu" and layer.eps == 0.03 and layer.num_points == 200
    assert layer.dtype == np.float32 and layer.training
    assert list(layer.parameters()) == list(PROXY_NAMES)
    for name, init in zip(PROXY_NAMES, (1.0, 0.0, 0.0, 0.0)):
        np.testing.assert_array_equal(layer.parameters()[name], np.full(5, init), err_msg=name)


def test_proxy_norm_identity_at_init_divides_by_the_proxy_spread(assert_close):
    # At init with phi = identity the proxy points are the K standard-normal quantiles U_k:
    # mu_p = mean U_k = 0 and v_p = mean U_k^2 (a little under 1), so y = x / sqrt(v_p + eps).
    layer = proxy(2, activation="identity")
    u = ref.proxy_points(200)
    assert abs(u.mean()) < 1e-12 and 0.97 < (u ** 2).mean() < 1.0
    x = make_input(np.random.default_rng(0), (2, 2, 3, 4), np.float64)
    assert_close(layer(x), x / np.sqrt((u ** 2).mean() + 0.03), np.float64, what="y")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_proxy_norm_training_and_eval_are_the_same(activation, rng):
    layer = randomized(proxy(3, activation=activation), rng)
    x = make_input(rng, (2, 3, 4, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    y, dx, grads = layer(x), layer.backward(dy), dict(layer.grads)
    layer.eval()
    np.testing.assert_array_equal(layer(x), y)
    np.testing.assert_array_equal(layer.backward(dy), dx)
    for key, g in grads.items():
        np.testing.assert_array_equal(layer.grads[key], g, err_msg=key)
    assert state_buffers(layer) == ()


def proxy_kink_margin(layer, x):
    """The smallest |pre-activation| over the inputs and the proxy points: relu's kink."""
    C, b4 = layer.num_features, (1, -1, 1, 1)
    w, b = ref.f64(layer.weight), ref.f64(layer.bias)
    pre = w.reshape(b4) * ref.f64(x) + b.reshape(b4)
    y_k = ref.f64(layer.proxy_bias)[:, None] + (1 + ref.f64(layer.proxy_weight)[:, None]) * \
        ref.proxy_points(layer.num_points)[None, :]
    q = w.reshape(C, 1) * y_k + b.reshape(C, 1)
    return min(float(np.min(np.abs(pre))), float(np.min(np.abs(q))))


@pytest.mark.parametrize("shape, num_points", [
    pytest.param((2, 3, 2, 3), 200, id="N2-C3-2x3-K200"),
    pytest.param((1, 1, 3, 4), 50, id="N1-C1-3x4-K50"),
    pytest.param((3, 2, 1, 1), 9, id="N3-C2-1x1-K9"),
])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_proxy_norm_float64_backward_equals_finite_differences(
        shape, num_points, activation, rng, check_gradients_by_finite_differences):
    layer = proxy(shape[1], activation=activation, num_points=num_points)
    for _ in range(50):  # relu: no pre-activation (input or proxy point) within 1e-4 of its kink
        randomized(layer, rng)
        x = make_input(rng, shape, np.float64)
        if activation != "relu" or proxy_kink_margin(layer, x) > 1e-4:
            break
    else:
        pytest.fail("no data away from relu's kink")
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(shape))


@pytest.mark.parametrize("activation", ["tanh", "ReLU", "gelu_tanh", ""])
def test_proxy_norm_unknown_activation_raises_listing_the_four(activation):
    with pytest.raises(ValueError, match="activation") as info:
        normkit.ProxyNorm2d(4, activation=activation)
    for name in ACTIVATIONS:
        assert name in str(info.value), f"{name!r} not listed in: {info.value}"


# == BatchChannelNorm2d ===========================================================================

def bcn(C, num_groups, dtype=np.float64, **kw):
    return normkit.BatchChannelNorm2d(C, num_groups=num_groups, dtype=dtype, **kw)


BCN_NAMES = ("bn_weight", "bn_bias", "gn_weight", "gn_bias")


def bcn_reference(layer, x, dy=None, running=None):
    """running: (mean, var) constants for the batch part, or None for batch statistics."""
    mean, var = (None, None) if running is None else running
    args = (layer.bn_weight, layer.bn_bias, layer.gn_weight, layer.gn_bias, layer.num_groups,
            layer.eps, mean, var)
    if dy is None:
        return ref.batch_channel_norm(x, *args)
    dx, *grads = ref.batch_channel_norm_backward(x, dy, *args)
    return dx, dict(zip(BCN_NAMES, grads))


def set_running_stats(layer, rng):
    layer.running_mean[...] = rng.uniform(-1, 1, layer.num_features)
    layer.running_var[...] = rng.uniform(0.5, 2.0, layer.num_features)


def running_of(layer):
    return ref.f64(layer.running_mean).copy(), ref.f64(layer.running_var).copy()


# Modes: (training, estimate). In training with estimate=True the running estimates are updated
# first and the batch part normalizes with the updated ones.
BCN_MODES = [pytest.param(True, False, id="train"), pytest.param(False, False, id="eval"),
             pytest.param(True, True, id="train-estimate"),
             pytest.param(False, True, id="eval-estimate")]


def expected_running(layer, x, training, estimate, before):
    """The batch part's running statistics after a forward of x, given those before."""
    if not training:
        return before
    if estimate:
        return ref.bcn_estimate_update(x, *before, layer.estimate_rate)
    mean, var = ref.batch_stats(x)
    return (ref.running_update(before[0], mean, layer.momentum),
            ref.running_update(before[1], var, layer.momentum))


def bcn_case(shape, num_groups, note=""):
    return pytest.param(shape, num_groups, id=f"{shape_id(shape)}-G{num_groups}{note}")


BCN_CASES = [
    bcn_case((4, 6, 5, 4), 3),
    bcn_case((3, 23, 4, 5), 23, "-one-channel-groups"),
    bcn_case((3, 23, 4, 5), 1, "-one-group"),
    bcn_case((2, 8, 3, 3), 8, "-one-channel-groups"),
    bcn_case((3, 1, 5, 4), 1, "-C1"),
    bcn_case((1, 4, 3, 5), 2, "-N1"),
    # spatial size 1: a sample's group is its C/G values alone; four of them, not two, so that
    # no group of this random data is nearly constant (a two-value group a hair apart would
    # amplify float32's rounding of the batch part's output past the policy's tolerance).
    bcn_case((6, 8, 1, 1), 2, "-spatial1"),
    bcn_case((4, 64, 3, 3), 32, "-default-groups"),
    bcn_case((2, 4, 45, 47), 2, "-chunk-tail"),
]


@pytest.mark.parametrize("shape, num_groups", BCN_CASES)
@pytest.mark.parametrize("training, estimate", BCN_MODES)
def test_bcn_forward_and_backward_match_the_reference(shape, num_groups, training, estimate, dtype,
                                                      rng, assert_close):
    layer = randomized(bcn(shape[1], num_groups, dtype, estimate=estimate, estimate_rate=0.3), rng)
    set_running_stats(layer, rng)
    layer.train(training)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    before = running_of(layer)
    after = expected_running(layer, x, training, estimate, before)
    running = None if training and not estimate else after  # estimate: the UPDATED estimates
    count = max(channel_count(shape), shape[1] // num_groups * shape[2] * shape[3])
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(layer.running_mean, after[0], dtype, what="running_mean")
    assert_close(layer.running_var, after[1], dtype, what="running_var")
    assert_close(y, bcn_reference(layer, x, running=running), dtype, count=count, what="y")
    want_dx, want_grads = bcn_reference(layer, x, dy, running=running)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close,
                        count)


@pytest.mark.parametrize("momentum", [0.1, 0.3], ids=["momentum0.1", "momentum0.3"])
def test_bcn_running_statistics_follow_torchs_rule_without_estimate(momentum, dtype, rng,
                                                                    assert_close):
    layer = bcn(6, 3, dtype, momentum=momentum)
    want_mean, want_var = np.zeros(6), np.ones(6)
    for step in range(1, 5):
        x = make_input(rng, (3, 6, 4, 5), dtype) + step
        layer(x)
        batch_mean, batch_var = ref.f64(x).mean(axis=(0, 2, 3)), ref.f64(x).var(axis=(0, 2, 3),
                                                                                ddof=1)
        want_mean = (1 - momentum) * want_mean + momentum * batch_mean
        want_var = (1 - momentum) * want_var + momentum * batch_var
        assert layer.running_mean.dtype == dtype
        assert_close(layer.running_mean, want_mean, dtype, what=f"running_mean, step {step}")
        assert_close(layer.running_var, want_var, dtype, what=f"running_var, step {step}")


@pytest.mark.parametrize("rate", [0.1, 0.5], ids=["rate0.1", "rate0.5"])
def test_bcn_estimates_update_first_and_then_normalize(rate, dtype, rng, assert_close):
    # NumPy spelled out: mu_new = mu + r (mean_B - mu); var_new = var + r (mean (x - mu)^2 - var)
    # with the OLD mu; then the batch part is (x - mu_new)/sqrt(var_new + eps), constants.
    layer = randomized(bcn(6, 2, dtype, estimate=True, estimate_rate=rate), rng)
    np.testing.assert_array_equal(layer.running_mean, np.zeros(6))
    np.testing.assert_array_equal(layer.running_var, np.ones(6))
    mu, var = np.zeros(6), np.ones(6)
    for step in range(1, 5):
        x = make_input(rng, (2, 6, 4, 5), dtype) * step + step
        x64 = ref.f64(x)
        spread = ((x64 - mu.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3))
        mu, var = mu + rate * (x64.mean(axis=(0, 2, 3)) - mu), var + rate * (spread - var)
        y = layer(x)
        assert_close(layer.running_mean, mu, dtype, what=f"running_mean, step {step}")
        assert_close(layer.running_var, var, dtype, what=f"running_var, step {step}")
        assert_close(y, bcn_reference(layer, x, running=(mu, var)), dtype, what=f"y, step {step}")
        dy = rng.standard_normal(x.shape).astype(dtype)
        want_dx, want_grads = bcn_reference(layer, x, dy, running=(mu, var))
        check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close)
    layer.eval()  # inference uses the estimates and leaves them alone
    x = make_input(rng, (2, 6, 4, 5), dtype)
    assert_close(layer(x), bcn_reference(layer, x, running=(mu, var)), dtype, what="eval y")
    assert_close(layer.running_mean, mu, dtype, what="running_mean after eval")


def test_bcn_use_batch_stats_in_eval_uses_the_batch_and_leaves_running_stats(dtype, rng,
                                                                             assert_close):
    layer = randomized(bcn(6, 3, dtype), rng)
    set_running_stats(layer, rng)
    layer.eval()
    layer.use_batch_stats = True
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    x = make_input(rng, (3, 6, 4, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y = layer(x)
    assert_close(y, bcn_reference(layer, x), dtype, what="y")
    want_dx, want_grads = bcn_reference(layer, x, dy)
    check_all_gradients(layer, layer.backward(dy), want_dx, want_grads, dtype, assert_close)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} changed")
    layer.use_batch_stats = False
    y_running = layer(x)
    assert_close(y_running, bcn_reference(layer, x, running=running_of(layer)), dtype,
                 what="y (running)")
    assert not np.allclose(y, y_running, atol=1e-3)


@pytest.mark.parametrize("shape, num_groups, training, estimate", [
    pytest.param((3, 4, 2, 3), 2, True, False, id="N3-C4-2x3-G2-train"),
    pytest.param((2, 3, 2, 2), 3, True, False, id="N2-C3-2x2-G3-one-channel-groups-train"),
    pytest.param((1, 2, 3, 2), 1, True, False, id="N1-C2-3x2-G1-train"),
    pytest.param((4, 4, 1, 1), 2, True, False, id="N4-C4-1x1-G2-train"),
    pytest.param((2, 4, 2, 3), 2, False, False, id="N2-C4-2x3-G2-eval"),
    pytest.param((1, 4, 1, 1), 2, False, True, id="N1-C4-1x1-G2-eval-estimate"),
])
def test_bcn_float64_backward_equals_finite_differences(
        shape, num_groups, training, estimate, rng, check_gradients_by_finite_differences):
    # (Training with estimate=True is left out by design: its estimates move with x but are
    # constants in the backward, so it is not the derivative of its own forward.)
    layer = randomized(bcn(shape[1], num_groups, estimate=estimate), rng)
    set_running_stats(layer, rng)
    layer.train(training)
    check_gradients_by_finite_differences(layer, make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))


def test_bcn_training_with_estimates_treats_them_as_constants_in_backward(rng, assert_close):
    # dx of a training step with estimate=True is the eval backward with the updated estimates:
    # linear in dy through the fixed per-channel scale, no term through the estimates.
    layer = randomized(bcn(4, 2, estimate=True, estimate_rate=0.5), rng)
    x = make_input(rng, (2, 4, 3, 3), np.float64)
    dy = rng.standard_normal(x.shape)
    layer(x)
    dx = layer.backward(dy)
    frozen = bcn(4, 2)
    frozen.load_state_dict(layer.state_dict())
    frozen.eval()
    frozen(x)
    assert_close(dx, frozen.backward(dy), np.float64, what="dx")


@pytest.mark.parametrize("C, num_groups", [(6, 4), (23, 2), (6, 32)],
                         ids=["G4-of-C6", "G2-of-C23", "default32-of-C6"])
def test_bcn_num_groups_not_dividing_c_raise_naming_num_groups(C, num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        normkit.BatchChannelNorm2d(C, num_groups=num_groups)


def test_bcn_defaults():
    layer = normkit.BatchChannelNorm2d(64)
    assert layer.num_groups == 32 and layer.eps == 1e-5 and layer.momentum == 0.1
    assert layer.estimate is False and layer.estimate_rate == 0.1 and layer.use_batch_stats is False
    assert layer.dtype == np.float32 and layer.training
    for name, init, size in [("bn_weight", 1, 64), ("bn_bias", 0, 64), ("gn_weight", 1, 32),
                             ("gn_bias", 0, 32), ("running_mean", 0, 64), ("running_var", 1, 64)]:
        np.testing.assert_array_equal(getattr(layer, name), np.full(size, init), err_msg=name)


# == shared: state, half input, strides, threads ==================================================

KINDS = {
    "ProxyNorm-relu": lambda dt: proxy(6, dt, activation="relu"),
    "ProxyNorm-silu": lambda dt: proxy(6, dt, activation="silu"),
    "ProxyNorm-gelu": lambda dt: proxy(6, dt, activation="gelu"),
    "ProxyNorm-identity": lambda dt: proxy(6, dt, activation="identity"),
    "BCN": lambda dt: bcn(6, 3, dt),
    "BCN-estimate": lambda dt: bcn(6, 2, dt, estimate=True, estimate_rate=0.3),
}


def prepared(name, dtype, seed=0):
    rng = np.random.default_rng(seed)
    layer = randomized(KINDS[name](dtype), rng)
    if isinstance(layer, normkit.BatchChannelNorm2d):
        set_running_stats(layer, rng)
    return layer


def reference_of(layer, x, dy):
    """(y, dx, {name: gradient}) for the layer's kind and mode, from its state BEFORE the
    forward (a BCN training step updates its running statistics)."""
    if isinstance(layer, normkit.ProxyNorm2d):
        dx, grads = proxy_reference(layer, x, dy)
        return proxy_reference(layer, x), dx, grads
    after = expected_running(layer, x, layer.training, layer.estimate, running_of(layer))
    running = None if layer.training and not layer.estimate else after
    dx, grads = bcn_reference(layer, x, dy, running=running)
    return bcn_reference(layer, x, running=running), dx, grads


# (name, training): ProxyNorm has no mode of its own; BCN's differ.
MODES = ([pytest.param(n, True, id=n) for n in KINDS if n.startswith("ProxyNorm")]
         + [pytest.param(n, t, id=f"{n}-{'train' if t else 'eval'}")
            for n in ("BCN", "BCN-estimate") for t in (True, False)])

STATE_KEYS = {
    "ProxyNorm": [("weight", (6,)), ("bias", (6,)), ("proxy_weight", (6,)),
                  ("proxy_bias", (6,))],
    "BCN": [("bn_weight", (6,)), ("bn_bias", (6,)), ("gn_weight", (3,)), ("gn_bias", (3,)),
            ("running_mean", (6,)), ("running_var", (6,))],
}


@pytest.mark.parametrize("name", list(STATE_KEYS))
def test_state_dict_keys_and_shapes_follow_the_api_table(name):
    layer = prepared("ProxyNorm-relu" if name == "ProxyNorm" else name, np.float32)
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == STATE_KEYS[name]
    assert all(v.dtype == np.float32 for v in layer.state_dict().values())
    assert set(layer.parameters()) == {k for k, _ in STATE_KEYS[name]} - {"running_mean",
                                                                          "running_var"}


@pytest.mark.parametrize("name", list(KINDS))
@FLOAT_DTYPES
def test_state_dict_round_trip_reproduces_the_layer(name, dtype, rng):
    assert_state_dict_round_trip(prepared(name, dtype), KINDS[name](dtype), rng, (4, 6, 5, 3),
                                 dtype)


@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("name, training", MODES)
def test_half_input_is_computed_in_float32(half, name, training):
    # y and dx are computed in float32 from the exact half inputs and rounded once: within half
    # an ulp of the half type (HALF_EPS is a whole ulp, 2^-10 and 2^-7) at the array's scale of
    # the float64 reference on the same inputs, float32's own error (~1e-6) far below it;
    # parameter gradients stay float32, within 1e-5. (Relu's kink is hit by no half input
    # here: weight*x + bias is never exactly 0 for these random parameters.)
    hdt = half_dtype(half)
    layer = prepared(name, np.float32).train(training)
    rng = np.random.default_rng(1)
    x = (0.5 + rng.standard_normal((4, 6, 7, 9))).astype(hdt)
    dy = rng.standard_normal(x.shape).astype(hdt)
    want_y, want_dx, want_grads = reference_of(layer, x, dy)
    check_half_input_all(layer, x, dy, want_y, want_dx, want_grads, half)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("name, training", MODES)
def test_non_contiguous_input_gives_the_result_of_its_copy(view, name, training, dtype, rng,
                                                           assert_close):
    check_view_matches_copy_any_state(VIEWS[view](rng, dtype),
                                      lambda: prepared(name, dtype).train(training), rng, dtype,
                                      assert_close)


THREAD_SHAPE = (5, 6, 55, 57)  # planes of 3135 = 2048 + 1087 entries


@pytest.mark.parametrize("name, training", MODES)
def test_bitwise_identical_for_one_and_two_threads(name, training, dtype):
    assert_bitwise_same_threads_any_state(lambda: prepared(name, dtype).train(training),
                                          THREAD_SHAPE, dtype)


@pytest.mark.parametrize("shape, G", [((8, 64, 14, 14), 32), ((2, 4, 45, 47), 2), ((3, 6, 1, 1), 3)],
                         ids=["one-chunk-planes", "planes-of-two-chunks", "spatial1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_bcn_one_pass_inference_gives_the_bits_of_its_steps(shape, G, dtype, rng):
    # batch_channel_infer: the cells' moments, the fold and the output group by group in cache;
    # the same numbers as the steps one after another over the whole tensor.
    N, C = shape[:2]
    S = int(np.prod(shape[2:]))
    x = make_input(rng, shape, dtype)
    mu, var = rng.standard_normal(C), 0.5 + rng.random(C)
    bw, bb, gw, gb = (rng.standard_normal(n) for n in (C, C, G, G))
    y = np.empty_like(x)
    got = _core.batch_channel_infer(x, G, 1e-5, mu, var, bw, bb, gw, gb, y)
    plan = _core.plan_per_channel_in_sets(N, C, S, list(range(N)))
    m, v = _core.group_moments(plan, x)
    _, _, *want = _core.batch_channel_fold(N, C, G, S, 1e-5, m, v, bw, bb, gw, gb, mu, var)
    y_steps = np.empty_like(x)
    _core.apply_coefficients(plan, x, m, want[1], want[2], y_steps)
    for name, a, b in zip(("mean", "var", "r", "scale", "offset", "mu_g", "r_g"), got, [m, v, *want]):
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(y, y_steps)


@pytest.mark.parametrize("N, C, G, S", [(0, 8, 2, 4), (2, 8, 3, 4), (2, 8, 0, 4), (2, 8, 2, 0)],
                         ids=["no-samples", "groups-not-dividing", "no-groups", "no-positions"])
def test_bcn_core_folds_reject_bad_sizes_with_value_error(N, C, G, S):
    cells, chan, grp = np.zeros(max(N, 1) * C), np.ones(C), np.ones(max(G, 1))
    with pytest.raises(ValueError, match="G dividing C"):
        _core.batch_channel_fold(N, C, G, S, 1e-5, cells, cells, chan, chan, grp, grp)
    with pytest.raises(ValueError, match="G dividing C"):
        _core.batch_channel_fold_backward(N, C, G, S, True, cells, cells, cells, cells, chan, chan, grp, grp,
                                          chan, chan, grp, grp)
    x = np.zeros((N, C, S), np.float32)
    y = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="G dividing C"):
        _core.batch_channel_infer(x, G, 1e-5, chan, chan, chan, chan, grp, grp, y)
    assert (y == 7.0).all()  # nothing written before the check
