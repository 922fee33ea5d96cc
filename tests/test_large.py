"""int64 indexing: a tensor of more than 2**31 elements, with one plane crossing the 2**31 boundary.

Uses the core directly and works in place (normalize's y may alias x), so the test needs one
float32 array of ~8.6 GB and nothing else tensor-sized. The input is a pattern whose statistics are
known exactly: plane p holds base[p] + d at even positions and base[p] - d at odd ones (all exact in
float32), so a 32-bit index that wraps (reading or writing the wrong plane) changes the statistics
or leaves elements unwritten.
"""
from fractions import Fraction

import numpy as np
import pytest

from normkit import _core

N, C = 2, 2
S = 536_872_961                 # odd plane length: one more "+d" than "-d" per plane
TOTAL = N * C * S               # 2**31 + 8196 elements
BASE = (1.0, -2.0, 3.0, 5.0)    # per plane p = n*C + c; all values below are exact in float32
D = 0.5
NEED_BYTES = 12 * 2**30


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def value(i):
    """The input element at flat index i, in float64."""
    p, j = divmod(int(i), S)
    return BASE[p] + (D if j % 2 == 0 else -D)


def exact_group_stats(c):
    """Exact mean and biased variance of channel c's group (planes c and C + c)."""
    n_plus, n_minus = (S + 1) // 2, (S - 1) // 2
    s1 = s2 = Fraction(0)
    for p in (c, C + c):
        hi, lo = Fraction(BASE[p]) + Fraction(D), Fraction(BASE[p]) - Fraction(D)
        s1 += n_plus * hi + n_minus * lo
        s2 += n_plus * hi * hi + n_minus * lo * lo
    m = N * S
    mean = s1 / m
    return float(mean), float(s2 / m - mean * mean)


@pytest.mark.slow
def test_more_than_2_31_elements_in_place():
    assert TOTAL > 2**31 and 3 * S < 2**31 < 4 * S  # plane 3 crosses the boundary
    avail = mem_available()
    if avail is None or avail < NEED_BYTES:
        pytest.skip(f"needs {NEED_BYTES / 2**30:.0f} GiB of available memory, "
                    f"have {'unknown' if avail is None else f'{avail / 2**30:.1f} GiB'}")

    x = np.empty(TOTAL, np.float32)
    planes = x.reshape(N * C, S)
    for p in range(N * C):
        planes[p, 0::2] = BASE[p] + D
        planes[p, 1::2] = BASE[p] - D
    plan = _core.plan_per_channel(N, C, S)

    # Statistics: exact pattern, so only merge rounding separates them from the exact values.
    mean, var = _core.group_moments(plan, x)
    for c in range(C):
        em, ev = exact_group_stats(c)
        assert mean[c] == pytest.approx(em, rel=1e-12, abs=1e-12), f"mean[{c}]"
        assert var[c] == pytest.approx(ev, rel=1e-12), f"var[{c}]"

    # Normalize in place (y aliases x), no affine.
    rstd = 1.0 / np.sqrt(var)
    _core.normalize(plan, x, mean, rstd, None, None, x)
    probes = sorted({*range(0, 8), *range(2**31 - 8, 2**31 + 8), *range(3 * S - 3, 3 * S + 3),
                     *range(TOTAL - 8, TOTAL)})
    for i in probes:
        c = (i // S) % C
        want = (value(i) - mean[c]) * rstd[c]
        assert float(x[i]) == pytest.approx(want, rel=1e-6, abs=1e-6), f"y[{i}]"

    # Every output element: within a plane, each parity holds one value (the kernel is elementwise).
    y_even, y_odd = np.empty(N * C), np.empty(N * C)
    for p in range(N * C):
        y_even[p], y_odd[p] = planes[p, 0], planes[p, 1]
        assert not np.any(planes[p, 0::2] != planes[p, 0]), f"plane {p}: even positions differ"
        assert not np.any(planes[p, 1::2] != planes[p, 1]), f"plane {p}: odd positions differ"

    # Statistics of the output over the whole array: mean 0, variance 1 per group.
    mean_y, var_y = _core.group_moments(plan, x)
    np.testing.assert_allclose(mean_y, 0.0, atol=1e-6)
    np.testing.assert_allclose(var_y, 1.0, rtol=1e-6)

    # Backward's parameter sums over the whole array (dx=None: only dweight and dbias).
    # With mean 0, rstd 1 and dy = y: dweight[c] = sum y^2, dbias[c] = sum y over channel c.
    dweight, dbias = np.empty(C, np.float32), np.empty(C, np.float32)
    _core.normalize_backward(plan, x, x, np.zeros(C), np.ones(C), None, False, None, dweight, dbias)
    n_plus, n_minus = (S + 1) // 2, (S - 1) // 2
    for c in range(C):
        ps = (c, C + c)
        want_b = sum(n_plus * y_even[p] + n_minus * y_odd[p] for p in ps)
        want_w = sum(n_plus * y_even[p] ** 2 + n_minus * y_odd[p] ** 2 for p in ps)
        scale = sum(n_plus * abs(y_even[p]) + n_minus * abs(y_odd[p]) for p in ps)
        assert abs(dbias[c] - want_b) <= 1e-5 * scale, f"dbias[{c}] = {dbias[c]}, want {want_b}"
        assert dweight[c] == pytest.approx(want_w, rel=1e-5), f"dweight[{c}]"
