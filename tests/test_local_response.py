"""LocalResponseNorm: torch.nn.LocalResponseNorm's semantics on 3-D, 4-D and 5-D input,
forward and backward, against the float64 reference (tests/reference.py) and torch."""
import numpy as np
import pytest

import normkit
from normkit import _core
import reference as ref

SHAPES = [(2, 7, 5), (3, 6, 4, 5), (2, 5, 3, 2, 4), (1, 1, 3, 3), (2, 9, 17, 1), (2, 3, 300)]
SIZES = [1, 2, 3, 5, 12]  # even sizes have an asymmetric window; 12 exceeds every C here
HYPER = dict(alpha=0.3, beta=0.75, k=1.5)


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"size{s}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_and_backward_match_the_reference(shape, size, dtype, rng, assert_close):
    x = rng.normal(size=shape)
    dy = rng.normal(size=shape)
    layer = normkit.LocalResponseNorm(size, dtype=dtype, **HYPER)
    y = layer(x.astype(dtype))
    dx = layer.backward(dy.astype(dtype))
    assert y.dtype == dx.dtype == dtype and layer.grads == {}
    assert_close(y, ref.local_response_norm(x, size, **HYPER), dtype, what="y")
    assert_close(dx, ref.local_response_norm_backward(x, dy, size, **HYPER), dtype, what="dx")


@pytest.mark.parametrize("isa", list(_core.supported_isas()))
@pytest.mark.parametrize("size", [2, 5, 40])
def test_every_isa_level_matches_the_reference(isa, size, dtype, rng, assert_close):
    # Many channels (the backward's ring of `size` rows of u and p wraps around several times, or
    # is all of them at size 40) and 21 positions: whole vectors and a tail at every level.
    x, dy = rng.normal(size=(2, 37, 3, 7)), rng.normal(size=(2, 37, 3, 7))
    before = _core.isa_name()
    try:
        _core.set_isa(isa)
        layer = normkit.LocalResponseNorm(size, dtype=dtype, **HYPER)
        y, dx = layer(x.astype(dtype)), layer.backward(dy.astype(dtype))
    finally:
        _core.set_isa(before)
    assert_close(y, ref.local_response_norm(x, size, **HYPER), dtype, what="y")
    assert_close(dx, ref.local_response_norm_backward(x, dy, size, **HYPER), dtype, what="dx")


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.3], ids=lambda b: f"beta{b}")
def test_every_beta_takes_its_own_power(beta, rng, assert_close):
    x, dy = rng.normal(size=(2, 6, 4, 5)), rng.normal(size=(2, 6, 4, 5))
    layer = normkit.LocalResponseNorm(3, alpha=0.2, beta=beta, k=2.0, dtype=np.float64)
    assert_close(layer(x), ref.local_response_norm(x, 3, 0.2, beta, 2.0), np.float64, what="y")
    assert_close(layer.backward(dy), ref.local_response_norm_backward(x, dy, 3, 0.2, beta, 2.0), np.float64, what="dx")


@pytest.mark.parametrize("shape", [(2, 6, 9), (2, 5, 3, 4), (1, 4, 2, 3, 3)], ids=shape_id)
def test_matches_torch_forward_and_autograd(shape, rng):
    torch = pytest.importorskip("torch")
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    layer = normkit.LocalResponseNorm(4, dtype=np.float64, **HYPER)
    mod = torch.nn.LocalResponseNorm(4, **HYPER)
    tx = torch.tensor(x, requires_grad=True)
    ty = mod(tx)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer(x), ty.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=0, atol=1e-12)


def test_gradient_equals_finite_differences(rng, check_gradients_by_finite_differences):
    layer = normkit.LocalResponseNorm(3, dtype=np.float64, **HYPER)
    check_gradients_by_finite_differences(layer, rng.normal(size=(2, 5, 3, 2)), rng.normal(size=(2, 5, 3, 2)))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_input_is_computed_in_float32(half, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    hdt = np.dtype(np.float16) if half == "float16" else np.dtype(ml_dtypes.bfloat16)
    x = rng.normal(size=(2, 6, 5, 7)).astype(hdt)
    layer = normkit.LocalResponseNorm(5, **HYPER)
    y = layer(x)
    assert y.dtype == hdt
    # One rounding of the output to the half type: |y| < |x| <= 5 here, so 2 half ulps of 5 bound it.
    ulp = 2.0 ** -10 if half == "float16" else 2.0 ** -7
    np.testing.assert_allclose(y.astype(np.float64), ref.local_response_norm(x.astype(np.float64), 5, **HYPER),
                               rtol=0, atol=2 * ulp * 5)


def test_strided_input_equals_its_copy(rng):
    base = rng.normal(size=(3, 8, 6, 10)).astype(np.float32)
    view = base[:, ::2, :, 1::2]
    layer = normkit.LocalResponseNorm(3)
    np.testing.assert_array_equal(layer(view), layer(np.ascontiguousarray(view)))


def test_bitwise_the_same_for_one_and_two_threads(rng):
    x = rng.normal(size=(4, 16, 33, 35)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    before = normkit.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            normkit.set_num_threads(threads)
            layer = normkit.LocalResponseNorm(5)
            results.append((layer(x).tobytes(), layer.backward(dy).tobytes()))
    finally:
        normkit.set_num_threads(before)
    assert results[0] == results[1]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(size=0), ValueError, "size"), (dict(size=2.5), TypeError, "size"),
    (dict(size=3, alpha="a"), TypeError, "alpha"), (dict(size=3, beta=None), TypeError, "beta"),
], ids=["size0", "size-float", "alpha-str", "beta-none"])
def test_bad_hyperparameters_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        normkit.LocalResponseNorm(**kwargs)


@pytest.mark.parametrize("shape", [(4, 6), (1, 2, 3, 4, 5, 6)], ids=["2d", "6d"])
def test_input_of_the_wrong_rank_is_refused(shape):
    with pytest.raises(ValueError, match="input"):
        normkit.LocalResponseNorm(3)(np.zeros(shape, np.float32))


def test_backward_before_forward_raises():
    with pytest.raises(normkit._checks.StateError):
        normkit.LocalResponseNorm(3).backward(np.zeros((1, 2, 3), np.float32))
