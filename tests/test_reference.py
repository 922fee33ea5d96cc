"""The references prove themselves: every backward in reference.py equals central finite
differences of its own forward, for the input, the weight and the bias, in float64.

The rest of the suite trusts reference.py, so this file is what ties the kernels to the math.
"""
import numpy as np
import pytest

import reference as ref

EPS = 1e-5


def _case(name, x_shape, param_shape, forward, backward):
    return pytest.param(x_shape, param_shape, forward, backward, id=name)


def _running(C):
    # Fixed statistics for the eval-mode references (var well away from zero).
    return np.linspace(-0.5, 0.5, C), np.linspace(0.5, 2.0, C)


def _bn_eval(train_fn):
    def fn(x, *args, **kw):
        rm, rv = _running(x.shape[1])
        return train_fn(x, *args, eps=EPS, running_mean=rm, running_var=rv, training=False, **kw)
    return fn


def _in_eval(train_fn):
    def fn(x, *args, **kw):
        rm, rv = _running(x.shape[1])
        return train_fn(x, *args, eps=EPS, running_mean=rm, running_var=rv, use_input_stats=False, **kw)
    return fn


CASES = [
    _case("batch_norm-train-2x3x5", (2, 3, 5), (3,),
          lambda x, w, b: ref.batch_norm(x, w, b, EPS),
          lambda x, dy, w, b: ref.batch_norm_backward(x, dy, w, b, EPS)),
    _case("batch_norm-train-4x3", (4, 3), (3,),
          lambda x, w, b: ref.batch_norm(x, w, b, EPS),
          lambda x, dy, w, b: ref.batch_norm_backward(x, dy, w, b, EPS)),
    _case("batch_norm-train-2x2x2x3x2", (2, 2, 2, 3, 2), (2,),
          lambda x, w, b: ref.batch_norm(x, w, b, EPS),
          lambda x, dy, w, b: ref.batch_norm_backward(x, dy, w, b, EPS)),
    _case("batch_norm-eval-2x3x5", (2, 3, 5), (3,),
          _bn_eval(ref.batch_norm),
          lambda x, dy, w, b: _bn_eval(ref.batch_norm_backward)(x, dy, w, b)),
    _case("instance_norm-train-2x3x6", (2, 3, 6), (3,),
          lambda x, w, b: ref.instance_norm(x, w, b, EPS),
          lambda x, dy, w, b: ref.instance_norm_backward(x, dy, w, b, EPS)),
    _case("instance_norm-train-1x2x3x4", (1, 2, 3, 4), (2,),
          lambda x, w, b: ref.instance_norm(x, w, b, EPS),
          lambda x, dy, w, b: ref.instance_norm_backward(x, dy, w, b, EPS)),
    _case("instance_norm-eval-2x3x5", (2, 3, 5), (3,),
          _in_eval(ref.instance_norm),
          lambda x, dy, w, b: _in_eval(ref.instance_norm_backward)(x, dy, w, b)),
    _case("group_norm-G2-2x4x5", (2, 4, 5), (4,),
          lambda x, w, b: ref.group_norm(x, 2, w, b, EPS),
          lambda x, dy, w, b: ref.group_norm_backward(x, dy, 2, w, b, EPS)),
    _case("group_norm-G3-1x6x2x2", (1, 6, 2, 2), (6,),
          lambda x, w, b: ref.group_norm(x, 3, w, b, EPS),
          lambda x, dy, w, b: ref.group_norm_backward(x, dy, 3, w, b, EPS)),
    _case("group_norm-G1-2x3x4", (2, 3, 4), (3,),
          lambda x, w, b: ref.group_norm(x, 1, w, b, EPS),
          lambda x, dy, w, b: ref.group_norm_backward(x, dy, 1, w, b, EPS)),
    _case("layer_norm-(7)-3x7", (3, 7), (7,),
          lambda x, w, b: ref.layer_norm(x, (7,), w, b, EPS),
          lambda x, dy, w, b: ref.layer_norm_backward(x, dy, (7,), w, b, EPS)),
    _case("layer_norm-(3,4)-2x3x4", (2, 3, 4), (3, 4),
          lambda x, w, b: ref.layer_norm(x, (3, 4), w, b, EPS),
          lambda x, dy, w, b: ref.layer_norm_backward(x, dy, (3, 4), w, b, EPS)),
    _case("layer_norm-(5)-2x2x5", (2, 2, 5), (5,),
          lambda x, w, b: ref.layer_norm(x, (5,), w, b, EPS),
          lambda x, dy, w, b: ref.layer_norm_backward(x, dy, (5,), w, b, EPS)),
]

RMS_CASES = [
    pytest.param((3, 7), (7,), id="rms_norm-(7)-3x7"),
    pytest.param((2, 3, 4), (3, 4), id="rms_norm-(3,4)-2x3x4"),
    pytest.param((2, 2, 5), (5,), id="rms_norm-(5)-2x2x5"),
]


@pytest.mark.parametrize("x_shape, param_shape, forward, backward", CASES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_reference_backward_equals_finite_differences(x_shape, param_shape, forward, backward,
                                                      affine, rng, assert_close):
    x = rng.normal(0.3, 1.2, x_shape)
    dy = rng.normal(size=x_shape)
    w = rng.uniform(0.5, 1.5, param_shape) if affine else None
    b = rng.normal(0.0, 0.5, param_shape) if affine else None

    def loss():
        return float(np.sum(forward(x, w, b) * dy))

    dx, dw, db = backward(x, dy, w, b)
    assert_close(dx, ref.numerical_gradient(loss, x), tol=1e-6, what="dx")
    if affine:
        assert_close(dw, ref.numerical_gradient(loss, w), tol=1e-6, what="dweight")
        assert_close(db, ref.numerical_gradient(loss, b), tol=1e-6, what="dbias")
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("x_shape, param_shape", RMS_CASES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_rms_reference_backward_equals_finite_differences(x_shape, param_shape, affine, rng,
                                                          assert_close):
    # eps as large as 1e-2 so that a dropped eps term in the derivation could not hide.
    x = rng.normal(0.3, 1.2, x_shape)
    dy = rng.normal(size=x_shape)
    w = rng.uniform(0.5, 1.5, param_shape) if affine else None

    def loss():
        return float(np.sum(ref.rms_norm(x, param_shape, w, eps=1e-2) * dy))

    dx, dw = ref.rms_norm_backward(x, dy, param_shape, w, eps=1e-2)
    assert_close(dx, ref.numerical_gradient(loss, x), tol=1e-6, what="dx")
    if affine:
        assert_close(dw, ref.numerical_gradient(loss, w), tol=1e-6, what="dweight")
    else:
        assert dw is None


def test_reference_backward_with_large_eps(rng, assert_close):
    # eps comparable to the variance: a derivation that treats r as 1/std instead of
    # 1/sqrt(var + eps) would pass the small-eps cases above but not this one.
    x = rng.normal(0.0, 0.3, (2, 3, 4))
    dy = rng.normal(size=x.shape)
    w, b = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)

    def loss():
        return float(np.sum(ref.batch_norm(x, w, b, eps=0.1) * dy))

    dx, dw, db = ref.batch_norm_backward(x, dy, w, b, eps=0.1)
    assert_close(dx, ref.numerical_gradient(loss, x), tol=1e-6, what="dx")
    assert_close(dw, ref.numerical_gradient(loss, w), tol=1e-6, what="dweight")


def test_reference_statistics_are_textbook(rng):
    # The running-statistics inputs: mean and unbiased variance, spelled out by hand.
    x = rng.normal(size=(3, 2, 4))
    mean, var = ref.batch_stats(x)
    for c in range(2):
        values = x[:, c, :].ravel()
        m = sum(values) / len(values)
        assert mean[c] == pytest.approx(m, rel=1e-14)
        assert var[c] == pytest.approx(sum((v - m) ** 2 for v in values) / (len(values) - 1), rel=1e-13)
    imean, ivar = ref.instance_stats(x)
    for c in range(2):
        planes = [x[n, c] for n in range(3)]
        assert imean[c] == pytest.approx(np.mean([p.mean() for p in planes]), rel=1e-14)
        assert ivar[c] == pytest.approx(np.mean([p.var(ddof=1) for p in planes]), rel=1e-13)


def test_reference_matches_torch_where_available(rng):
    # A second, independent witness for the forwards (torch.nn.functional in float64).
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.normal(size=(2, 6, 5))
    w, b = rng.uniform(0.5, 1.5, 6), rng.normal(size=6)
    t = torch.from_numpy
    np.testing.assert_allclose(ref.batch_norm(x, w, b, EPS),
                               F.batch_norm(t(x), None, None, t(w), t(b), True, 0.1, EPS).numpy(),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.instance_norm(x, w, b, EPS),
                               F.instance_norm(t(x), weight=t(w), bias=t(b), eps=EPS).numpy(),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.group_norm(x, 3, w, b, EPS),
                               F.group_norm(t(x), 3, t(w), t(b), EPS).numpy(), rtol=1e-12, atol=1e-12)
    lw, lb = rng.uniform(0.5, 1.5, (6, 5)), rng.normal(size=(6, 5))
    np.testing.assert_allclose(ref.layer_norm(x, (6, 5), lw, lb, EPS),
                               F.layer_norm(t(x), (6, 5), t(lw), t(lb), EPS).numpy(),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.rms_norm(x, (5,), lw[0], 1e-3),
                               F.rms_norm(t(x), (5,), t(lw[0]), 1e-3).numpy(), rtol=1e-12, atol=1e-12)
