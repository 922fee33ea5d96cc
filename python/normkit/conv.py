"""The statistics Jacobians of a convolution, for CrossIterationBatchNorm2d."""
from __future__ import annotations

import numbers
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from . import _checks, _core


def _pair(v: int | tuple[int, int] | list[int], name: str, low: int, what: str) -> tuple[int, int]:
    """An int or a pair of ints, each >= low, as an (h, w) tuple (torch's conv2d arguments)."""
    def is_int(e: object) -> TypeGuard[numbers.Integral]:
        return isinstance(e, numbers.Integral) and not isinstance(e, bool)

    pair = (v, v) if is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(is_int(e) for e in pair):
        raise TypeError(f"{name}: expected an int or a pair of ints (h, w), got {v!r}")
    if min(pair) < low:
        raise ValueError(f"{name}: expected {what} integers, got {v!r}")
    return int(pair[0]), int(pair[1])


def _array4(a: npt.NDArray[Any], name: str, dtype: np.dtype[Any] | None = None) -> npt.NDArray[Any]:
    _checks.ndarray(a, name)
    _checks.float_dtype(a, name, dtype, "conv_input's")
    if a.ndim != 4:
        expected = "(N, C_in, H, W)" if dtype is None else "(C_out, C_in/groups, kh, kw)"
        raise ValueError(f"{name}: expected a 4-D array {expected}, got shape {a.shape}")
    return _checks.contiguous(a)


def conv2d_stat_jacobians(conv_input: npt.NDArray[Any], weight: npt.NDArray[Any],
                          stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                          dilation: int | tuple[int, int] = 1, groups: int = 1
                          ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(dmean_dweight, dsqmean_dweight) of y = conv2d(conv_input, weight) (torch's semantics: NCHW,
    zero padding, no bias), each of the weight's shape and dtype.

    With M = N*H_out*W_out positions, mean_c = (1/M) sum y[:, c] and sqmean_c = (1/M) sum y[:, c]^2.
    Row c of dmean_dweight is d mean_c / d weight[c], the mean of the input patches filter c sees
    (the same for every filter of a group); row c of dsqmean_dweight is d sqmean_c / d weight[c]
    = (2/M) sum y[n, c, i, j] * patch(n, i, j), 2/M times the weight gradient for dy = y. Channel c
    depends on filter c only, so these rows are the whole Jacobians.

    float32 and float64 (the two arrays' dtype must agree). float32 runs float32 GEMMs over blocks
    of at most 4096 output positions (a few hundred for a typical layer) and sums the blocks'
    results in float64; float64 is float64 throughout. Bitwise the same for any number of threads.
    """
    x = _array4(conv_input, "conv_input")
    w = _array4(weight, "weight", x.dtype)
    groups = _checks.positive_int(groups, "groups")
    N, C_in, H, W = x.shape
    C_out, per_group, kh, kw = w.shape
    _checks.divisor(groups, C_in, "groups", "conv_input's channels")
    _checks.divisor(groups, C_out, "groups", "weight's output channels")
    if per_group != C_in // groups:
        raise ValueError(f"weight: expected shape ({C_out}, {C_in // groups}, kh, kw) (C_in/groups = "
                         f"{C_in}/{groups} input channels per filter), got {w.shape}")
    if kh < 1 or kw < 1:
        raise ValueError(f"weight: expected a kernel of at least 1 x 1, got shape {w.shape}")
    stride = _pair(stride, "stride", 1, "positive")
    padding = _pair(padding, "padding", 0, "non-negative")
    dilation = _pair(dilation, "dilation", 1, "positive")
    if N < 1:
        raise ValueError(f"conv_input: expected at least one sample (the means are over N*H_out*W_out "
                         f"positions), got shape {x.shape}")
    reach = tuple(d * (k - 1) + 1 for k, d in zip((kh, kw), dilation))  # the dilated kernel
    if H + 2 * padding[0] < reach[0] or W + 2 * padding[1] < reach[1]:
        raise ValueError(f"conv_input: expected a padded spatial size (H + 2*padding, W + 2*padding) of "
                         f"at least the dilated kernel's {reach} (padding {padding}), got {(H, W)}")
    return _core.conv2d_stat_jacobians(x, w, *stride, *padding, *dilation, groups)
