"""normkit.functional.weight_standardization / weight_centralization and their backwards against
the float64 references (reference.py), issue 11.

Spec (Weight Standardization, arXiv 1903.10520): per output filter (dim 0) over its fan-in (every
other dim), W_hat = (W - mean) / sqrt(var + eps), biased variance, eps=1e-5 by default;
weight_standardization_backward(grad_output, weight, eps=1e-5) differentiates through the mean
and the variance. weight_centralization(weight) = W - mean per filter (MABN's), and
weight_centralization_backward(grad_output, weight) = grad_output minus its mean per filter.
Any rank >= 2 (linear and conv weights). A rank-1 weight raises ValueError naming `weight`; a
grad_output of another shape raises ValueError, of another dtype TypeError, naming `grad_output`.

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import reference as ref
from conftest import FD_TOL
from normkit import functional as F
from variant_checks import HALF_EPS, close_at_scale, half_dtype


def weight_case(shape, note=""):
    return pytest.param(shape, id="x".join(map(str, shape)) + note)


WEIGHT_SHAPES = [
    weight_case((5, 7), "-linear"),
    weight_case((23, 3), "-linear"),
    weight_case((4, 3, 5), "-conv1d"),
    weight_case((8, 3, 3, 3), "-conv2d"),
    weight_case((3, 1, 1, 1), "-conv2d-1x1-fan_in1"),
    weight_case((1, 6, 3, 3), "-one-filter"),
    weight_case((2, 3, 2, 3, 2), "-conv3d"),
    weight_case((16, 64, 9, 9), "-fan_in5184"),
]


def make_weight(rng, shape, dtype):
    """Per-filter offsets and spreads, so that every filter has statistics of its own."""
    bshape = (shape[0],) + (1,) * (len(shape) - 1)
    return (rng.uniform(-1, 1, bshape) + rng.uniform(0.05, 0.5, bshape)
            * rng.standard_normal(shape)).astype(dtype)


def fan_in(shape):
    return int(np.prod(shape[1:]))


def backward_scale(w, dy, eps):
    """rstd |dy| per filter: the size of the terms that dW cancels (with a fan-in of 1, dW is
    rstd (dy - mean dy) = 0 from terms of size rstd |dy| = |dy|/sqrt(eps))."""
    w = ref.f64(w)
    axes = tuple(range(1, w.ndim))
    rstd = 1.0 / np.sqrt(w.var(axis=axes, keepdims=True) + eps)
    return float(np.max(rstd * np.abs(ref.f64(dy))))


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.1], ids=["eps1e-5", "eps0.1"])
def test_weight_standardization_matches_the_reference(shape, eps, dtype, rng, assert_close):
    w = make_weight(rng, shape, dtype)
    w_before = w.copy()
    got = F.weight_standardization(w, eps=eps)
    assert got.dtype == dtype and got.shape == shape
    assert_close(got, ref.weight_standardization(w, eps), dtype, count=fan_in(shape), what="W_hat")
    dy = rng.standard_normal(shape).astype(dtype)
    dw = F.weight_standardization_backward(dy, w, eps=eps)
    assert dw.dtype == dtype and dw.shape == shape
    assert_close(dw, ref.weight_standardization_backward(dy, w, eps), dtype, count=fan_in(shape),
                 what="dW", scale=backward_scale(w, dy, eps))
    np.testing.assert_array_equal(w, w_before)  # never written


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_weight_centralization_matches_the_reference(shape, dtype, rng, assert_close):
    w = make_weight(rng, shape, dtype)
    got = F.weight_centralization(w)
    assert got.dtype == dtype and got.shape == shape
    assert_close(got, ref.weight_centralization(w), dtype, count=fan_in(shape), what="W - mean")
    dy = rng.standard_normal(shape).astype(dtype)
    dw = F.weight_centralization_backward(dy, w)
    assert dw.dtype == dtype and dw.shape == shape
    assert_close(dw, ref.weight_centralization_backward(dy, w), dtype, count=fan_in(shape),
                 what="dW")


def test_weight_standardization_default_eps_is_1e_5(rng, assert_close):
    w = make_weight(rng, (3, 2, 2, 2), np.float64)
    w[0] = w[0, 0, 0, 0] + 1e-3 * np.arange(8).reshape(2, 2, 2)  # var ~ 5e-6: eps shows
    dy = rng.standard_normal(w.shape)
    assert_close(F.weight_standardization(w), ref.weight_standardization(w, 1e-5), np.float64,
                 what="W_hat")
    assert_close(F.weight_standardization_backward(dy, w),
                 ref.weight_standardization_backward(dy, w, 1e-5), np.float64, what="dW")
    assert not np.allclose(F.weight_standardization(w), ref.weight_standardization(w, 1e-6))


def test_standardized_filters_have_mean_0_and_variance_1_over_their_fan_in(rng, assert_close):
    w = make_weight(rng, (6, 4, 3, 3), np.float64)
    got = F.weight_standardization(w, eps=0.0)
    assert_close(got.mean(axis=(1, 2, 3)), np.zeros(6), np.float64, what="mean")
    assert_close(got.var(axis=(1, 2, 3)), np.ones(6), np.float64, what="variance")


def test_standardization_is_stable_for_a_large_mean(rng, assert_close):
    # 1e4 + a spread of 1e-2 per filter: a one-pass E[w^2] - E[w]^2 would lose the variance.
    w = (1e4 + 1e-2 * rng.standard_normal((4, 3, 3, 3)))
    assert_close(F.weight_standardization(w), ref.weight_standardization(w), np.float64,
                 tol=1e-8, what="W_hat")


@pytest.mark.parametrize("shape", [weight_case((3, 4)), weight_case((2, 3, 2)),
                                   weight_case((3, 2, 2, 2)), weight_case((2, 2, 2, 1, 2))])
@pytest.mark.parametrize("function", ["standardization", "centralization"])
def test_float64_backward_equals_finite_differences(shape, function, rng, assert_close):
    w = make_weight(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    if function == "standardization":
        forward = lambda: float(np.sum(F.weight_standardization(w, eps=1e-3) * dy))
        analytic = F.weight_standardization_backward(dy, w, eps=1e-3)
    else:
        forward = lambda: float(np.sum(F.weight_centralization(w) * dy))
        analytic = F.weight_centralization_backward(dy, w)
    assert_close(analytic, ref.numerical_gradient(forward, w), tol=FD_TOL, what="dW")


@pytest.mark.parametrize("view", ["transposed", "step-sliced", "negative-stride"])
def test_non_contiguous_weight_and_gradient_give_the_result_of_their_copies(view, dtype, rng,
                                                                           assert_close):
    make = {"transposed": lambda s: make_weight(rng, (3, 3, 6, 5), dtype).transpose(2, 1, 0, 3),
            "step-sliced": lambda s: make_weight(rng, (12, 3, 6, 5), dtype)[::2, :, ::2],
            "negative-stride": lambda s: make_weight(rng, (6, 3, 3, 5), dtype)[::-1, :, :, ::-1]}
    w, dy = make[view](0), make[view](1)
    assert not w.flags.c_contiguous and not dy.flags.c_contiguous
    wc, dyc = np.ascontiguousarray(w), np.ascontiguousarray(dy)
    assert_close(F.weight_standardization(w), F.weight_standardization(wc), dtype, what="W_hat")
    assert_close(F.weight_standardization_backward(dy, w), F.weight_standardization_backward(dyc, wc),
                 dtype, what="dW")
    assert_close(F.weight_centralization(w), F.weight_centralization(wc), dtype, what="W - mean")
    assert_close(F.weight_centralization_backward(dy, w),
                 F.weight_centralization_backward(dyc, wc), dtype, what="dW (centralization)")


@pytest.mark.parametrize("half", list(HALF_EPS))
def test_half_weights_are_computed_in_float32(half):
    # The result is computed in float32 from the exact half weights and rounded once to the half
    # type: within half an ulp (HALF_EPS is a whole ulp, 2^-10 and 2^-7) at the array's scale of
    # the float64 reference on the same half weights.
    hdt = half_dtype(half)
    rng = np.random.default_rng(1)
    w = make_weight(rng, (8, 3, 3, 3), hdt)
    dy = rng.standard_normal(w.shape).astype(hdt)
    for got, want, what in [
            (F.weight_standardization(w), ref.weight_standardization(w), "W_hat"),
            (F.weight_standardization_backward(dy, w), ref.weight_standardization_backward(dy, w), "dW"),
            (F.weight_centralization(w), ref.weight_centralization(w), "W - mean")]:
        assert got.dtype == hdt, what
        close_at_scale(got, want, HALF_EPS[half], what)


# -- what is rejected ------------------------------------------------------------------------------

FORWARDS = {"weight_standardization": F.weight_standardization,
            "weight_centralization": F.weight_centralization}
BACKWARDS = {"weight_standardization_backward": F.weight_standardization_backward,
             "weight_centralization_backward": F.weight_centralization_backward}


@pytest.mark.parametrize("weight", [pytest.param(np.ones(5), id="rank1"),
                                    pytest.param(np.array(2.0), id="rank0")])
@pytest.mark.parametrize("name", list(FORWARDS))
def test_a_weight_of_rank_below_2_raises_naming_weight(name, weight):
    with pytest.raises(ValueError, match="weight"):
        FORWARDS[name](weight)


@pytest.mark.parametrize("name", list(BACKWARDS))
def test_backward_of_a_rank_1_weight_raises_naming_weight(name):
    with pytest.raises(ValueError, match="weight"):
        BACKWARDS[name](np.ones(5), np.ones(5))


@pytest.mark.parametrize("bad_shape", [(4, 3, 3, 2), (4, 27), (3, 3, 3, 3)],
                         ids=["permuted", "flattened", "fewer-filters"])
@pytest.mark.parametrize("name", list(BACKWARDS))
def test_grad_output_of_another_shape_raises_naming_grad_output(name, bad_shape):
    w = np.ones((4, 3, 2, 3))
    w[:, 0] = 2.0
    with pytest.raises(ValueError, match="grad_output"):
        BACKWARDS[name](np.ones(bad_shape), w)


@pytest.mark.parametrize("grad_dtype", [np.float32, np.int64], ids=["float32", "int64"])
@pytest.mark.parametrize("name", list(BACKWARDS))
def test_grad_output_of_another_dtype_raises_naming_grad_output(name, grad_dtype):
    w = np.ones((4, 3, 2, 3))
    w[:, 0] = 2.0
    with pytest.raises(TypeError, match="grad_output"):
        BACKWARDS[name](np.ones(w.shape, grad_dtype), w)


@pytest.mark.parametrize("name", list(FORWARDS))
def test_an_unsupported_weight_dtype_raises_type_error(name):
    with pytest.raises(TypeError):
        FORWARDS[name](np.ones((3, 4), np.int32))
