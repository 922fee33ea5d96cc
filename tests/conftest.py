"""Shared fixtures: seeded random data, the tolerance policy, the finite-difference layer check.

Tolerance policy (one place, used by every comparison in the correctness suite)
-------------------------------------------------------------------------------
An entry is compared with |got - want| <= tol * max(1, max|want|): the error is measured against
the scale of the whole array, because every entry is computed from terms of that scale (a dx entry
that cancels to nearly zero still carries the rounding of the terms that cancelled).

- float64, tol = 1e-10. The kernels accumulate in double; one output entry carries a handful of
  roundings (2.2e-16 each) amplified by the normalization's conditioning (|x - mean|*rstd, a few
  units for the data used here). 1e-10 leaves four orders of margin over that, while any formula
  error (a wrong count, a biased/unbiased mixup, a missing term) shows up at 1e-4 or above.
- float32, tol = 1e-5. Inputs, outputs and the folded per-plane coefficients are float32
  (6e-8 per rounding); one entry is a few such roundings of values at the array's scale, about
  5e-7 -- 1e-5 is a 20x margin. Reductions longer than 4096 terms that may be partly summed in
  float32 (vector lanes, a column block) grow like sqrt(count), so for those the float32
  tolerance is widened by sqrt(count/4096) (x1.4 for the largest planes here).
- Finite differences, tol = 1e-6: central differences at h = 1e-5 are exact to ~1e-10 for these
  O(1) functions (see reference.numerical_gradient), so 1e-6 is a generous margin that still
  fails on any real derivation error.
"""
import math
import zlib

import numpy as np
import pytest

import reference

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
FD_TOL = 1e-6


def tolerance(dtype, count=1):
    """The tolerance for `dtype` results computed from reductions of `count` terms."""
    dtype = np.dtype(dtype)
    tol = TOL[dtype]
    if dtype == np.float32 and count > 4096:
        tol *= math.sqrt(count / 4096)
    return tol


def _assert_close(got, want, dtype=np.float64, count=1, tol=None, what="result", scale=None):
    """scale: the magnitude of the terms the result is computed from, where it exceeds the
    result's own (a difference that cancels by design); defaults to max|want|, at least 1."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    tol = tolerance(dtype, count) if tol is None else tol
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)), scale or 0.0)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tol * scale,
                               err_msg=f"{what} (tol {tol:g} x scale {scale:g})")


@pytest.fixture
def assert_close():
    """assert_close(got, want, dtype, count=1, tol=None, what='...', scale=None): the policy above."""
    return _assert_close


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: every test has its own, reproducible data."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def randomize_affine(rng):
    """Give every learnable array of a layer random values (weight around 1, bias around 0), in
    place, so that the affine is not the identity; returns the layer's parameters()."""
    def randomize(layer):
        params = layer.parameters()
        for name, p in params.items():
            if name == "weight":
                p[...] = rng.uniform(0.5, 1.5, p.shape)
            else:
                p[...] = rng.normal(0.0, 0.5, p.shape)
        return params
    return randomize


@pytest.fixture
def check_gradients_by_finite_differences():
    """check(layer, x, dy): the layer's own float64 backward (dx and every parameter gradient)
    equals central finite differences of sum(layer(x) * dy)."""
    def check(layer, x, dy):
        x = np.array(x, dtype=np.float64, order="C")
        dy = np.asarray(dy, dtype=np.float64)
        params = layer.parameters()

        def loss():
            return float(np.sum(layer(x) * dy))

        numerical = {"input": reference.numerical_gradient(loss, x)}
        for name, p in params.items():
            numerical[name] = reference.numerical_gradient(loss, p)
        layer(x)
        analytic = {"input": layer.backward(dy)}
        analytic.update(layer.grads)
        assert set(analytic) == set(numerical), f"gradients for {sorted(analytic)}, params {sorted(params)}"
        for name in numerical:
            _assert_close(analytic[name], numerical[name], tol=FD_TOL, what=f"d{name}")
    return check
