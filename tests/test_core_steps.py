"""The steps a research variant calls one by one (normkit._core; cpp/include/normkit/normkit.h):

  apply_coefficients           y  = (x - mean[k])*scale[k] + offset[k]
  backward_sums                B[k] = sum dy,  A[k] = sum dy*(x - mean[k])
  backward_apply_coefficients  dx = c1[k]*dy + c2[k]*(x - mean[k]) + c3[k]

with k = set(n)*C + c the cell of plane (n, c). Each coefficient is K = sets*C values, or C (the
same for every set), or 1, or a number. Checked here against plain float64 NumPy, in both
layouts, with interleaved sets, and for the refusals that keep a direct caller from a crash.
"""
import numpy as np
import pytest

import normkit
from normkit import _core

TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-12}
SETS = {"one-set": [0, 0, 0, 0, 0], "interleaved": [1, 0, 1, 2, 0], "per-sample": [0, 1, 2, 3, 4]}


def make(rng, dtype, sets, C, S, layout, cpg=1):
    """(plan, x, dy as NCHW float64 (N, C, S), the same in the plan's memory layout, cell index)."""
    N = len(sets)
    plan = _core.plan_per_channel_in_sets(N, C, S, sets, cpg)
    plan.channels_last = layout == "NHWC"
    x = rng.normal(3.0, 2.0, (N, C, S)).astype(dtype)
    dy = rng.normal(0.0, 1.0, (N, C, S)).astype(dtype)
    stored = (lambda a: a) if layout == "NCHW" else (lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)))
    cell = np.asarray(sets)[:, None] * C + np.arange(C)  # (N, C)
    return plan, x.astype(np.float64), dy.astype(np.float64), stored(x), stored(dy), cell, stored


def nchw(a, layout):
    return a if layout == "NCHW" else a.transpose(0, 2, 1)


def close(got, want, dtype):
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=TOL[np.dtype(dtype)] * scale)


CASES = [pytest.param(dt, sets, C, S, layout, id=f"{np.dtype(dt).name}-{name}-C{C}-S{S}-{layout}")
         for dt in (np.float32, np.float64) for name, sets in SETS.items()
         for C, S in ((3, 35), (1, 7), (4, 2049)) for layout in ("NCHW", "NHWC")]


@pytest.mark.parametrize("dtype, sets, C, S, layout", CASES)
def test_the_three_steps_equal_their_formulas(dtype, sets, C, S, layout, rng):
    plan, x, dy, xs, dys, cell, stored = make(rng, dtype, sets, C, S, layout)
    K = plan.num_sample_sets * C
    mean, scale, offset, c1, c2, c3 = rng.normal(size=(6, K))
    mean += 3.0
    cm = mean[cell][..., None]

    y = np.empty_like(xs)
    _core.apply_coefficients(plan, xs, mean, scale, offset, y)
    close(nchw(y, layout), (x - cm) * scale[cell][..., None] + offset[cell][..., None], dtype)

    B, A = _core.backward_sums(plan, xs, dys, mean)
    close(B, np.bincount(cell.ravel(), dy.sum(axis=2).ravel(), K), dtype)
    close(A, np.bincount(cell.ravel(), (dy * (x - cm)).sum(axis=2).ravel(), K), dtype)

    dx = np.empty_like(xs)
    _core.backward_apply_coefficients(plan, xs, dys, mean, c1, c2, c3, dx)
    close(nchw(dx, layout), c1[cell][..., None] * dy + c2[cell][..., None] * (x - cm) + c3[cell][..., None], dtype)


def test_without_x_the_backward_apply_has_no_x_term(rng):
    plan, x, dy, xs, dys, cell, _ = make(rng, np.float64, SETS["interleaved"], 3, 10, "NCHW")
    K = plan.num_sample_sets * 3
    c1, c3 = rng.normal(size=(2, K))
    dx = np.empty_like(xs)
    _core.backward_apply_coefficients(plan, None, dys, np.zeros(K), c1, 0.0, c3, dx)
    close(dx, c1[cell][..., None] * dy + c3[cell][..., None], np.float64)


@pytest.mark.parametrize("form", ["cells", "channels", "one", "number"])
def test_coefficients_broadcast_from_channels_one_value_or_a_number(form, rng):
    plan, x, dy, xs, dys, cell, _ = make(rng, np.float64, SETS["interleaved"], 3, 10, "NCHW")
    K, C = plan.num_sample_sets * 3, 3
    full = {"cells": rng.normal(size=K), "channels": np.tile(rng.normal(size=C), K // C),
            "one": np.full(K, 0.7), "number": np.full(K, 0.7)}[form]
    given = {"cells": full, "channels": full[:C].copy(), "one": full[:1].copy(), "number": 0.7}[form]
    y_given, y_full = np.empty_like(xs), np.empty_like(xs)
    _core.apply_coefficients(plan, xs, 1.0, given, 0.0, y_given)
    _core.apply_coefficients(plan, xs, 1.0, full, 0.0, y_full)
    np.testing.assert_array_equal(y_given, y_full)


def test_channels_per_group_does_not_change_the_cells(rng):
    """The steps' coefficients are per (set, channel) whatever the plan's channel groups."""
    grouped, x, dy, xs, dys, cell, _ = make(rng, np.float64, SETS["interleaved"], 4, 9, "NCHW", cpg=2)
    flat = _core.plan_per_channel_in_sets(5, 4, 9, SETS["interleaved"])
    K = flat.num_sample_sets * 4
    mean = rng.normal(size=K)
    np.testing.assert_array_equal(_core.backward_sums(grouped, xs, dys, mean)[1],
                                  _core.backward_sums(flat, xs, dys, mean)[1])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bitwise_the_same_for_one_and_two_threads(layout, rng):
    plan, x, dy, xs, dys, cell, _ = make(rng, np.float32, SETS["interleaved"], 8, 4099, layout)
    K = plan.num_sample_sets * 8
    mean, scale, c2 = rng.normal(size=(3, K))
    before = normkit.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            normkit.set_num_threads(threads)
            y, dx = np.empty_like(xs), np.empty_like(xs)
            _core.apply_coefficients(plan, xs, mean, scale, 0.5, y)
            B, A = _core.backward_sums(plan, xs, dys, mean)
            _core.backward_apply_coefficients(plan, xs, dys, mean, scale, c2, 0.1, dx)
            results.append((y, B, A, dx))
    finally:
        normkit.set_num_threads(before)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_wrong_sizes_and_plans_are_refused_before_anything_is_written():
    plan = _core.plan_per_channel_in_sets(3, 2, 4, [0, 1, 0])  # K = 4
    x = np.ones(24, np.float32)
    y = np.full(24, 7.0, np.float32)
    with pytest.raises(ValueError, match="scale: expected 4 elements"):
        _core.apply_coefficients(plan, x, 0.0, np.ones(3), 0.0, y)
    with pytest.raises(TypeError, match="offset: expected a C-contiguous float64"):
        _core.apply_coefficients(plan, x, 0.0, 1.0, np.zeros(4, np.float32), y)
    with pytest.raises(ValueError, match="out: expected 24 elements"):
        _core.apply_coefficients(plan, x, 0.0, 1.0, 0.0, np.empty(23, np.float32))
    assert np.all(y == 7.0)
    rows = _core.plan_per_row(2, 12, False)  # a per-column affine is not a per-(set, channel) one
    for call in (lambda: _core.apply_coefficients(rows, x, 0.0, 1.0, 0.0, y),
                 lambda: _core.backward_sums(rows, x, x, 0.0),
                 lambda: _core.backward_apply_coefficients(rows, x, x, 0.0, 1.0, 0.0, 0.0, y)):
        with pytest.raises(ValueError, match="per-column affine"):
            call()
    assert np.all(y == 7.0)
