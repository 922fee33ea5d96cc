"""The one bridge between the Python layer and the C++ core.

The Python path of every layer and functional call goes through here with a plan (how the tensor
groups into statistics sets): `apply_batch_stats` (statistics from x), `apply` (given statistics,
e.g. running ones) and `backward`. The common case skips it: `_core.forward_fast` does a whole
forward in one call and returns the same (y, Saved). Everything tensor-sized happens in `_core`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _checks, _core


# What a backward needs from its forward: Saved(plan, x, mean, rstd, weight, batch_stats, shape).
Saved = _core.Saved


# forward_fast's rank masks: bit d set accepts d-dimensional input.
ANY_RANK = (1 << 64) - 1
RANK_2_UP = ANY_RANK & ~0b11


def ranks_mask(ndims: Iterable[int]) -> int:
    return sum(1 << d for d in ndims)


def rstd_of(var: npt.ArrayLike, eps: float) -> npt.NDArray[np.float64]:
    # NaN, Inf and negative variances (a caller's running_var) propagate silently, as in torch.
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)


def apply(plan: _core.Plan, x: npt.NDArray[Any], mean: npt.NDArray[Any] | None,
          var: npt.ArrayLike | None, eps: float, weight: npt.NDArray[Any] | None,
          bias: npt.NDArray[Any] | None, batch_stats: bool, shape: tuple[int, ...],
          epilogue: _checks.Epilogue = _checks.PLAIN) -> tuple[npt.NDArray[Any], Saved]:
    """y = (x - mean)/sqrt(var + eps)*weight + bias; returns y (in `shape`) and a Saved.

    An empty x (a zero-size dimension) gets an empty y without a call into the core, so that
    plans which only exist for empty tensors (a GroupNorm of 0 channels) never reach a kernel;
    mean and var may then be None.
    """
    y = _core.empty_like(x) if epilogue.out is None else epilogue.out
    if x.size == 0:
        return (y.reshape(shape) if epilogue.out is None else y), Saved(plan, x, None, None, weight, batch_stats, shape)
    assert mean is not None and var is not None  # only an empty x comes without statistics
    mean = _checks.contiguous(mean, np.float64)  # a caller's running_mean may be strided
    rstd = rstd_of(var, eps)
    _core.normalize(plan, x, mean, rstd, weight, bias, y, epilogue.residual, epilogue.relu)
    y = y.reshape(shape) if epilogue.out is None else epilogue.out
    return y, Saved(plan, x, mean, rstd, weight, batch_stats, shape)


def apply_batch_stats(plan: _core.Plan, x: npt.NDArray[Any], eps: float,
                      weight: npt.NDArray[Any] | None, bias: npt.NDArray[Any] | None,
                      shape: tuple[int, ...], epilogue: _checks.Epilogue = _checks.PLAIN
                      ) -> tuple[npt.NDArray[Any], Saved, npt.NDArray[np.float64]]:
    """Statistics from x, then y, in one core call (group by group where the tensor allows, so
    x is read from memory once); returns (y in `shape`, Saved, var). x must not be empty."""
    y = _core.empty_like(x) if epilogue.out is None else epilogue.out
    mean, var, rstd = _core.normalize_batch_stats(plan, x, eps, weight, bias, y, epilogue.residual,
                                                  epilogue.relu)
    y = y.reshape(shape) if epilogue.out is None else epilogue.out
    return y, Saved(plan, x, mean, rstd, weight, True, shape), var


def backward(saved: Saved, dy: npt.NDArray[Any], want_weight: bool, want_bias: bool
             ) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None, npt.NDArray[Any] | None]:
    """(dx, dweight, dbias) for the forward that made `saved`."""
    x = saved.x
    dx = _core.empty_like(x)  # outputs come from the core's reusable buffers
    n_aff = saved.plan.S if saved.plan.column_affine else saved.plan.C
    pdt = _checks.param_dtype(x.dtype)  # float32 for half inputs
    if x.size == 0:  # sums over no elements: zero parameter gradients, as torch
        dw = np.zeros(n_aff, pdt) if want_weight else None
        db = np.zeros(n_aff, pdt) if want_bias else None
        return dx.reshape(saved.shape), dw, db
    dw = np.empty(n_aff, pdt) if want_weight else None
    db = np.empty(n_aff, pdt) if want_bias else None
    _core.backward(saved, dy, dx, dw, db)
    return dx.reshape(saved.shape), dw, db


def planes(x: npt.NDArray[Any], layout: str = "NCHW") -> tuple[int, int, int]:
    """(N, C, S) of an (N, C, *spatial) array, or of an (N, *spatial, C) one for "NHWC"."""
    spatial = x.shape[2:] if layout == "NCHW" else x.shape[1:-1]
    S = math.prod(spatial)  # a Python int: the core checks N*C*S for overflow
    return x.shape[0], x.shape[1] if layout == "NCHW" else x.shape[-1], S


def in_layout(plan: _core.Plan, layout: str) -> _core.Plan:
    """The plan reading memory in `layout` (statistics groups are layout-free)."""
    plan.channels_last = layout == "NHWC"
    return plan


def running_update(running: npt.NDArray[Any], batch_value: npt.ArrayLike, factor: float) -> None:
    """running = (1 - factor)*running + factor*batch_value, in place, as torch does."""
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf propagate silently, as in torch
        running[...] = (1.0 - factor) * running.astype(np.float64) + factor * np.asarray(batch_value)
