"""The pointwise epilogue steps (normkit._core; cpp/include/normkit/pointwise.h), per cell k:

  apply_pointwise      y = f(u)*scale + offset,  u = (x - shift)*a + b
  pointwise_sums       dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr   (g = dy*f'(u);
                       exactly 0 for a derivative the function does not have)
  pointwise_backward   dx = c1*g + c2*(x - center) + c3

checked against float64 NumPy of each function, its derivative taken by central differences,
so the kernels' hand-written derivatives are checked too.
"""
import math

import numpy as np
import pytest

import normkit
from normkit import _core

ERF = np.frompyfunc(math.erf, 1, 1)
P, Q, R = 3, 4, 5  # rows of the coefficient array
FUNCTIONS = {  # name -> f(u, p, q, r)
    "identity": lambda u, p, q, r: u,
    "relu": lambda u, p, q, r: np.maximum(u, 0.0),
    "silu": lambda u, p, q, r: u / (1.0 + np.exp(-u)),
    "gelu": lambda u, p, q, r: u * 0.5 * (1.0 + ERF(u / math.sqrt(2.0)).astype(np.float64)),
    "tlu": lambda u, p, q, r: np.maximum(u, p),
    "swish_gate": lambda u, p, q, r: u / (1.0 + np.exp(-p * u)),
    "evo_b0": lambda u, p, q, r: u / np.maximum(p, q * u + r),
}


def case(rng, N=3, C=4, S=37):
    x = rng.normal(size=(N, C, S))
    dy = rng.normal(size=x.shape)
    plan = _core.plan_per_channel_in_sets(N, C, S, list(range(N)))  # cells: the planes
    K = N * C
    coef = np.stack([rng.normal(size=K), rng.uniform(0.5, 2.0, K), rng.normal(size=K),
                     rng.uniform(0.3, 1.0, K), rng.uniform(0.5, 1.5, K), rng.uniform(0.5, 1.5, K),
                     rng.uniform(0.5, 1.5, K), rng.normal(size=K), rng.normal(size=K)])
    return plan, x, dy, coef


def central(f, v, h=1e-6):
    return (f(v + h) - f(v - h)) / (2 * h)


@pytest.fixture(params=list(_core.supported_isas()))
def isa(request):
    """Each ISA level this CPU runs: every level compiles the kernels on its own."""
    before = _core.isa_name()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(before)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_forward_sums_and_backward_equal_their_formulas(name, isa, rng):
    plan, x, dy, coef = case(rng)
    N, C, _ = x.shape
    op = int(getattr(_core.Pointwise, name))
    k = lambda i: coef[i].reshape(N, C, 1)
    u = (x - k(0)) * k(1) + k(2)
    f = lambda u_, p=k(P), q=k(Q), r=k(R): FUNCTIONS[name](u_, p, q, r)

    y = np.empty_like(x)
    _core.apply_pointwise(plan, op, x, coef, y)
    np.testing.assert_allclose(y, f(u) * k(6) + k(7), rtol=0, atol=1e-13)

    g = dy * central(f, u)
    want = [dy, dy * f(u), g, g * (x - k(8)), dy * central(lambda p: f(u, p=p), k(P)),
            dy * central(lambda q: f(u, q=q), k(Q)), dy * central(lambda r: f(u, r=r), k(R))]
    sums = _core.pointwise_sums(plan, op, x, dy, coef)
    assert sums.shape == (7, N * C)
    for i, w in enumerate(want):
        np.testing.assert_allclose(sums[i], w.sum(axis=2).ravel(), rtol=0, atol=1e-7, err_msg=f"sum {i}")

    c1, c2, c3 = rng.normal(size=(3, N * C))
    dx = np.empty_like(x)
    _core.pointwise_backward(plan, op, x, dy, coef, c1, c2, c3, dx)
    c = lambda v: v.reshape(N, C, 1)
    np.testing.assert_allclose(dx, c(c1) * g + c(c2) * (x - k(8)) + c(c3), rtol=0, atol=1e-7)


# The derivatives in p, q, r each function has (pointwise.h); the others are 0 for every u.
HAS_DERIVATIVE = {"tlu": (P,), "swish_gate": (P,), "evo_b0": (P, Q, R)}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_sums_of_derivatives_a_function_lacks_are_exactly_zero(name, isa, rng):
    # not summed at all: an Inf in dy (dy*0 = NaN) does not reach them, and the others still do
    plan, x, dy, coef = case(rng)
    dy[0, 0, 5] = np.inf
    sums = _core.pointwise_sums(plan, int(getattr(_core.Pointwise, name)), x, dy, coef)
    for row, i in ((P, 4), (Q, 5), (R, 6)):
        if row in HAS_DERIVATIVE.get(name, ()):
            assert not np.isfinite(sums[i, 0]) and np.isfinite(sums[i, 1:]).all(), f"sum {i}"
        else:
            np.testing.assert_array_equal(sums[i], 0.0, err_msg=f"sum {i}")


def sigmoid(u):
    e = np.exp(-np.abs(u))  # no overflow at u = -1e6
    return np.where(u >= 0, 1 / (1 + e), e / (1 + e))


FLOAT32_REFERENCES = {  # name -> (f, f') in float64, for the float32 accuracy check
    "silu": (lambda u: u * sigmoid(u), lambda u: sigmoid(u) * (1 + u * (1 - sigmoid(u)))),
    "gelu": (lambda u: FUNCTIONS["gelu"](u, 0, 0, 0),
             lambda u: 0.5 * (1.0 + ERF(u / math.sqrt(2.0)).astype(np.float64))
             + u * np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)),
}


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_float32_transcendental_epilogues_are_accurate_everywhere(name, isa):
    # The float vector forms (pointwise.cpp: exp2_of, normal_cdf), not libm: f and f' over a dense
    # grid through both tails and far past the clamps, within 1e-6 of max(1, |value|) (a few
    # float ulp; the layers' float32 tolerance is 1e-5). A GELU left at its rational's value past
    # the clamp was off by 1.8e-6 per unit of |u| there.
    u = np.concatenate([np.linspace(-30.0, 30.0, 60001), [-1e3, 1e3, -1e6, 1e6]]).astype(np.float32)
    u64 = u.astype(np.float64)
    plan = _core.plan_per_channel_in_sets(1, 1, u.size, [0])
    coef = np.zeros((9, 1))
    coef[1], coef[6] = 1.0, 1.0  # f(x) itself
    op = int(getattr(_core.Pointwise, name))
    y, df = np.empty_like(u), np.empty_like(u)
    _core.apply_pointwise(plan, op, u, coef, y)
    _core.pointwise_backward(plan, op, u, np.ones_like(u), coef, 1.0, 0.0, 0.0, df)  # dx = f'(u)
    f, df_du = FLOAT32_REFERENCES[name]
    for got, want, what in ((y, f(u64), "f"), (df, df_du(u64), "f'")):
        err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
        assert err.max() < 1e-6, f"{what} off by {err.max():.2g} at u = {u[err.argmax()]}"


def test_at_a_tlu_tie_the_gradient_goes_to_the_threshold():
    plan = _core.plan_per_channel_in_sets(1, 1, 4, [0])
    x = np.array([0.5, 1.0, 1.5, 2.0])
    coef = np.zeros((9, 1))
    coef[1], coef[P], coef[6] = 1.0, 1.0, 1.0  # u = x, tau = 1: a tie at x = 1
    sums = _core.pointwise_sums(plan, int(_core.Pointwise.tlu), x, np.ones(4), coef)
    assert sums[2, 0] == 2.0  # g = dy*f'(u): only x = 1.5 and 2 pass through
    assert sums[4, 0] == 2.0  # dtau: x = 0.5 and the tie


def test_at_an_evonorm_b0_tie_the_gradient_splits_evenly():
    plan = _core.plan_per_channel_in_sets(1, 1, 1, [0])
    x = np.array([2.0])
    coef = np.zeros((9, 1))
    coef[1], coef[6] = 1.0, 1.0
    coef[P], coef[Q], coef[R] = 3.0, 1.0, 1.0  # max(3, 1*2 + 1): a tie
    sums = _core.pointwise_sums(plan, int(_core.Pointwise.evo_b0), x, np.ones(1), coef)
    np.testing.assert_allclose(sums[2, 0], 0.5 * (1 / 3) + 0.5 * (1 / 9))  # f' of each side, halved
    np.testing.assert_allclose(sums[4:, 0], [0.5 * -2 / 9, 0.5 * -4 / 9, 0.5 * -2 / 9])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_bitwise_the_same_for_one_and_two_threads(dtype, rng):
    plan, x, dy, coef = case(rng, N=4, C=8, S=4099)
    x, dy = x.astype(dtype), dy.astype(dtype)
    op = int(_core.Pointwise.gelu)
    before = normkit.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            normkit.set_num_threads(threads)
            y, dx = np.empty_like(x), np.empty_like(x)
            _core.apply_pointwise(plan, op, x, coef, y)
            sums = _core.pointwise_sums(plan, op, x, dy, coef)
            _core.pointwise_backward(plan, op, x, dy, coef, 1.0, 0.5, 0.1, dx)
            results.append((y, sums, dx))
    finally:
        normkit.set_num_threads(before)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_wrong_arguments_are_refused():
    plan = _core.plan_per_channel(2, 3, 4)
    x, y = np.ones(24), np.full(24, 7.0)
    with pytest.raises(ValueError, match="coef: expected 27 elements"):
        _core.apply_pointwise(plan, 0, x, np.zeros((9, 2)), y)
    with pytest.raises(ValueError, match="op: expected a pointwise epilogue"):
        _core.apply_pointwise(plan, 7, x, np.zeros((9, 3)), y)
    plan.channels_last = True
    with pytest.raises(ValueError, match="channels-first"):
        _core.apply_pointwise(plan, 0, x, np.zeros((9, 3)), y)
    assert np.all(y == 7.0)


def test_evonorm_b0_where_the_right_side_is_zero_and_loses_the_gradients_are_finite():
    plan = _core.plan_per_channel_in_sets(1, 1, 1, [0])
    coef = np.zeros((9, 1))
    coef[1], coef[6] = 1.0, 1.0
    coef[P], coef[Q], coef[R] = 0.75, 1.0, 0.5  # u = -0.5: q u + r = 0 < p
    sums = _core.pointwise_sums(plan, int(_core.Pointwise.evo_b0), np.array([-0.5]), np.ones(1), coef)
    np.testing.assert_allclose(sums[2:, 0], [1 / 0.75, -0.5 / 0.75, 0.5 / 0.75 ** 2, 0.0, 0.0])


# -- pointwise_backward_fused: the sums and dx in one pass ----------------------------------------
# dx = c1*g + (c2 + q2)*(x - center) + c3 + q3, with q2 = sum over a cluster of planes of
# k2 . sums (k3 likewise): the same as pointwise_sums, the fold in NumPy, then pointwise_backward.

def fused_against_steps(plan, op, x, dy, coef, c1, c2, c3, cluster=1, k2=None, k3=None):
    """(sums, dx) of the fused call and of the two steps with the fold done here."""
    dx = np.empty_like(x)
    sums = _core.pointwise_backward_fused(plan, op, x, dy, coef, c1, c2, c3, dx, cluster, k2, k3)
    want_sums = _core.pointwise_sums(plan, op, x, dy, coef)
    K = want_sums.shape[1]
    q2, q3 = (np.zeros(K) if k is None else
              np.repeat((k * want_sums).sum(axis=0).reshape(-1, cluster).sum(axis=1), cluster) for k in (k2, k3))
    want_dx = np.empty_like(x)
    _core.pointwise_backward(plan, op, x, dy, coef, c1, c2 + q2, c3 + q3, want_dx)
    return sums, want_sums, dx, want_dx


FUSED_CASES = [pytest.param(S, cluster, dt, id=f"S{S}-cluster{cluster}-{np.dtype(dt).name}")
               for S in (37, 1, 40000) for cluster in (1, 2, 4) for dt in (np.float32, np.float64)]
FUSED_CASES += [pytest.param(37, 2, np.float16, id="S37-cluster2-float16-g-not-kept"),
                pytest.param(70000, 4, np.float32, id="S70000-cluster4-float32-g-not-kept")]


@pytest.mark.parametrize("S, cluster, dtype", FUSED_CASES)
@pytest.mark.parametrize("name", ["tlu", "swish_gate", "gelu"])
def test_fused_backward_with_a_local_fold_equals_the_two_steps(name, cluster, S, dtype, isa, rng, assert_close):
    # float32/64 keep g = dy*f'(u) of a cluster up to 2^18 elements for dx; float16 and larger
    # clusters evaluate the activation again
    plan, x, dy, coef = case(rng, N=2, C=4, S=S)
    x, dy = x.astype(dtype), dy.astype(dtype)
    op = int(getattr(_core.Pointwise, name))
    K = 8
    c1, c2, c3 = rng.normal(size=K), rng.normal(size=K), rng.normal(size=K)
    k2, k3 = rng.normal(size=(7, K)) / S, rng.normal(size=(7, K)) / S
    sums, want_sums, dx, want_dx = fused_against_steps(plan, op, x, dy, coef, c1, c2, c3, cluster, k2, k3)
    assert_close(sums, want_sums, np.float64 if dtype == np.float64 else np.float32)
    if dtype == np.float16:  # both float32 math, rounded once to float16: at most one step apart
        want = want_dx.astype(np.float64)
        assert np.all(np.abs(dx.astype(np.float64) - want) <= 2.0 ** -10 * np.maximum(np.abs(want), 2.0 ** -14))
    else:
        assert_close(dx, want_dx, dtype)
    assert not np.allclose(dx, fused_against_steps(plan, op, x, dy, coef, c1, c2, c3)[2])  # q2, q3 count


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_fused_backward_without_a_fold_on_a_plan_of_channels(dtype, rng, assert_close):
    # Proxy Norm's: cells pool every sample's plane of a channel; dx needs no sums
    N, C, S = 3, 5, 4100
    x, dy = (rng.normal(size=(N, C, S)).astype(dtype) for _ in range(2))
    plan = _core.plan_per_channel(N, C, S)
    coef = np.stack([np.zeros(C), rng.uniform(0.5, 2, C), rng.normal(size=C), *np.zeros((3, C)),
                     rng.uniform(0.5, 1.5, C), rng.normal(size=C), np.zeros(C)])
    c1 = rng.uniform(0.5, 1.5, C)
    sums, want_sums, dx, want_dx = fused_against_steps(plan, int(_core.Pointwise.gelu), x, dy, coef, c1, 0.0, 0.0)
    assert_close(sums, want_sums, dtype)
    assert_close(dx, want_dx, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_fused_backward_bitwise_the_same_for_one_and_two_threads(dtype, rng):
    plan, x, dy, coef = case(rng, N=4, C=6, S=3000)
    x, dy = x.astype(dtype), dy.astype(dtype)
    k2 = rng.normal(size=(7, 24))
    before, results = normkit.get_num_threads(), []
    try:
        for threads in (1, 2):
            normkit.set_num_threads(threads)
            dx = np.empty_like(x)
            sums = _core.pointwise_backward_fused(plan, int(_core.Pointwise.swish_gate), x, dy, coef, 1.0, 0.5, 0.0,
                                                  dx, 3, k2, None)
            results.append((sums, dx))
    finally:
        normkit.set_num_threads(before)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_fused_backward_refuses_a_local_fold_it_cannot_do():
    x, dy, dx = np.ones(24), np.ones(24), np.full(24, 7.0)
    coef, k2 = np.zeros((9, 3)), np.zeros((7, 3))
    with pytest.raises(ValueError, match="cells are the planes"):  # cells pool samples
        _core.pointwise_backward_fused(_core.plan_per_channel(2, 3, 4), 0, x, dy, coef, 1.0, 0.0, 0.0, dx, 1, k2)
    plan = _core.plan_per_channel_in_sets(2, 3, 4, [0, 1])
    with pytest.raises(ValueError, match="cluster must divide"):
        _core.pointwise_backward_fused(plan, 0, x, dy, np.zeros((9, 6)), 1.0, 0.0, 0.0, dx, 2, np.zeros((7, 6)))
    with pytest.raises(ValueError, match="k2: expected 42 elements"):
        _core.pointwise_backward_fused(plan, 0, x, dy, np.zeros((9, 6)), 1.0, 0.0, 0.0, dx, 1, k2)
    assert np.all(dx == 7.0)


# -- normalize_pointwise: statistics per group, the fold, then apply_pointwise in one call --------
# The cell coefficients of plane (n, c) in group g are channel c's rows with shift = mean_g
# (center) or the channel's, a*r or scale*r (r = 1/sqrt(var_g + eps)), center = mean_g; or, with
# std_into_r, the cells' r = sqrt(var_g + eps) and a, scale the channel's (EvoNorm-B0).

def stats_then_apply(op, x, G, eps, skip_mean, center, into_scale, channel, std_into_r=False):
    """normalize_pointwise's (y, mean, var, cell) from float64 NumPy and the apply step."""
    N, C, S = x.shape
    cpg = C // G
    xg = x.astype(np.float64).reshape(N, G, cpg * S)
    mean = np.zeros((N, G)) if skip_mean else xg.mean(axis=2)
    var = (xg ** 2).mean(axis=2) if skip_mean else xg.var(axis=2)
    r = np.repeat(1.0 / np.sqrt(var + eps), cpg, axis=1).reshape(-1)
    m = np.repeat(mean, cpg, axis=1).reshape(-1)
    cell = np.tile(channel, (1, N))
    if center:
        cell[0] = m
    if std_into_r:
        cell[5] = 1.0 / r
    else:
        cell[6 if into_scale else 1] *= r
    cell[8] = m
    y = np.empty_like(x)
    _core.apply_pointwise(_core.plan_per_channel_in_sets(N, C, S, list(range(N))), op, x, cell, y)
    return y, mean.reshape(-1), var.reshape(-1), cell


NORMALIZE_CASES = [  # (N, C, S, G): a group one chunk (fused per batch of groups) or longer
    pytest.param(3, 8, 196, 8, id="planes-one-chunk"), pytest.param(2, 8, 196, 2, id="groups-one-chunk"),
    pytest.param(2, 6, 3001, 6, id="planes-longer"), pytest.param(2, 6, 1500, 3, id="groups-longer"),
    pytest.param(2, 5, 1, 5, id="spatial-1")]


@pytest.mark.parametrize("N, C, S, G", NORMALIZE_CASES)
@pytest.mark.parametrize("name, skip_mean, center, into_scale, std_into_r",
                         [("tlu", True, False, False, False), ("swish_gate", False, False, True, False),
                          ("gelu", False, True, False, False), ("evo_b0", False, False, False, True),
                          ("evo_b0", False, False, True, True)],
                         ids=["frn", "evonorm-s0", "centred", "evonorm-b0", "std-into-r-over-into-scale"])
def test_normalize_pointwise_equals_statistics_then_apply(name, skip_mean, center, into_scale, std_into_r, N, C, S,
                                                         G, dtype, isa, rng, assert_close):
    x = (rng.normal(size=(N, C, S)) + 0.5).astype(dtype)
    channel = np.stack([rng.normal(size=C), rng.uniform(0.5, 2, C), rng.normal(size=C), rng.uniform(0.3, 1, C),
                        *np.zeros((2, C)), rng.uniform(0.5, 1.5, C), rng.normal(size=C), np.zeros(C)])
    op, eps = int(getattr(_core.Pointwise, name)), 1e-3
    y, cell = np.empty_like(x), np.full((9, N * C), np.nan)
    mean, var = _core.normalize_pointwise(_core.plan_per_sample_group(N, C, S, G), op, x, eps, skip_mean,
                                          center, into_scale, channel, y, cell, std_into_r=std_into_r)
    want_y, want_mean, want_var, want_cell = stats_then_apply(op, x, G, eps, skip_mean, center, into_scale, channel,
                                                              std_into_r)
    assert_close(mean, want_mean, dtype, what="mean")
    assert_close(var, want_var, dtype, what="var")
    assert_close(cell, want_cell, dtype, what="cell coefficients")
    assert_close(y, want_y, dtype, count=C // G * S, what="y")


def test_normalize_pointwise_bitwise_the_same_for_one_and_two_threads(rng):
    for N, C, S, G in [(4, 16, 196, 16), (3, 8, 3001, 4)]:
        x = rng.normal(size=(N, C, S)).astype(np.float32)
        channel = np.stack([np.zeros(C), np.ones(C), rng.normal(size=C), *np.zeros((3, C)), np.ones(C),
                            rng.normal(size=C), np.zeros(C)])
        before, results = normkit.get_num_threads(), []
        try:
            for threads in (1, 2):
                normkit.set_num_threads(threads)
                y, cell = np.empty_like(x), np.empty((9, N * C))
                stats = _core.normalize_pointwise(_core.plan_per_sample_group(N, C, S, G),
                                                  int(_core.Pointwise.swish_gate), x, 1e-5, False, False, True,
                                                  channel, y, cell)
                results.append((y, cell, *stats))
        finally:
            normkit.set_num_threads(before)
        for one, two in zip(*results):
            np.testing.assert_array_equal(one, two)


def test_normalize_pointwise_refuses_what_it_cannot_do_before_writing():
    x, y = np.ones((2, 3, 4)), np.full((2, 3, 4), 7.0)
    channel, cell = np.zeros((9, 3)), np.zeros((9, 6))
    with pytest.raises(ValueError, match="each sample's own groups"):
        _core.normalize_pointwise(_core.plan_per_channel(2, 3, 4), 0, x, 1e-5, False, False, False, channel, y, cell)
    plan = _core.plan_per_sample_group(2, 3, 4, 3)
    with pytest.raises(ValueError, match="channel: expected 27 elements"):
        _core.normalize_pointwise(plan, 0, x, 1e-5, False, False, False, np.zeros((9, 2)), y, cell)
    with pytest.raises(ValueError, match="cell: expected 54 elements"):
        _core.normalize_pointwise(plan, 0, x, 1e-5, False, False, False, channel, y, np.zeros((9, 3)))
    with pytest.raises(ValueError, match="op: expected a pointwise epilogue"):
        _core.normalize_pointwise(plan, 9, x, 1e-5, False, False, False, channel, y, cell)
    assert np.all(y == 7.0)
