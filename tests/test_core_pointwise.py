"""The pointwise epilogue steps (normkit._core; cpp/include/normkit/pointwise.h), per cell k:

  apply_pointwise      y = f(u)*scale + offset,  u = (x - shift)*a + b
  pointwise_sums       dy, dy*f(u), g, g*(x - center), dy*df/dp, dy*df/dq, dy*df/dr   (g = dy*f'(u))
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
