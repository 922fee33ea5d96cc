"""What every research variant shares: a variant is a plan plus two folds over the core's steps.

The tensor is read as (N, C, S) planes. A variant's plan says which samples pool (its sets: ghost
batches, modalities, or every sample on its own), and the core gives, per *cell* (set, channel),
k = set*C + c:

  statistics  _core.group_moments(plan, x)          mean_k, var_k over the cell's planes
  apply       _core.apply_coefficients(...)         y = (x - mean_k)*scale_k + offset_k
  sums        _core.backward_sums(...)              B_k = sum dy, A_k = sum dy*(x - mean_k)
  backward    _core.backward_apply_coefficients()   dx = c1_k*dy + c2_k*(x - mean_k) + c3_k

Between them sit the variant's two folds, NumPy on O(cells) arrays: statistics -> (mean, scale,
offset), and sums -> (c1, c2, c3) and the parameter gradients. A cross-cell reduction (EBN's one
variance, a ghost batch's channel group) is a sum over cells, never a pass over the tensor.
Where a variant's backward is the standard one over its plan (ghost batches, modalities, Batch
Renorm with its effective weight) it runs the fused core backward instead, which reads x and dy
from memory once. Likewise the pointwise layers: where the backward's fold is local to a cluster
of planes (FRN's plane, EvoNorm-S0's group) and linear in its sums, or needs no sums (Proxy
Norm's), the fold is handed to the core as coefficients (_core.pointwise_backward_fused:
FusedPointwiseSaved) and the backward is one pass.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from .base import NormLayer

_F64 = npt.NDArray[np.float64]
_POINTWISE_SUMS = 7  # the core's sums per cell (normkit.h: pointwise_sums)
_Plans = TypeVar("_Plans")  # what a layer makes per input shape: a plan, or a tuple of plans
Grads = dict[str, npt.NDArray[Any]]  # a backward's parameter gradients by name
_Coef = float | _F64  # a coefficient as the core's steps take it (a number, or one per cell ...)
_CoefLike = npt.ArrayLike  # ... and as `coefficient` takes it (a fold's c1, c2, c3)
# (dweight, dbias) -> grads; the gradients are None where the backward computed none.
_ParamGrads = Callable[[npt.NDArray[Any] | None, npt.NDArray[Any] | None], Grads]
# A step-path fold: the sums (B, A) -> (c1, c2, c3, grads).
_StepFold = Callable[[_F64, _F64], tuple[_CoefLike, _CoefLike, _CoefLike, Grads]]


# -- standardization of cells and of their pools --------------------------------------------------
#
# Cells k with n_k elements, mean m_k and biased variance v_k pool into groups (a channel over
# the ghost batches, a channel group of one ghost batch). Per group, exactly (Chan):
#   M = sum n_k,  mu = sum n_k m_k / M,  var = sum n_k (v_k + (m_k - mu)^2) / M.

def pool(n: npt.ArrayLike, mean: _F64, var: _F64, axis: int) -> tuple[_F64, _F64]:
    """(mu, var) of the cells along `axis` of mean and var; n: their element counts, a number
    (the same for every cell) or an array of mean's rank with size 1 off `axis`."""
    n = np.asarray(n, np.float64)
    M = n.sum(axis=axis, keepdims=True) if n.ndim else n * mean.shape[axis]
    mu = (n * mean).sum(axis=axis, keepdims=True) / M
    pooled = (n * (var + (mean - mu) ** 2)).sum(axis=axis, keepdims=True) / M
    return mu.squeeze(axis), pooled.squeeze(axis)


def standard_backward_coefficients(B: _F64, A: _F64, w: _F64, r: _F64,
                                   M: int | npt.NDArray[np.integer[Any]]
                                   ) -> tuple[_F64, _F64, _F64]:
    """(c1, c2, c3) per cell standardized with its own batch statistics (M elements, rstd r,
    weight w). With g = dy*w (tests/reference.py: standardize_backward):
    dx = r w dy - r^3 (x - mu) w A/M - r w B/M; dweight = r A, dbias = B."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return r * w, -r ** 2 * r * w * A / M, -r * w * B / M


_V = TypeVar("_V")


class Deferred(Generic[_V]):
    """A value computed at its first call, and only then (a backward's per-cell rstd, which an
    inference forward never needs). A functools.cache wrapper costs some 4 us to make, which on
    a small tensor's forward is a tenth of the whole call."""

    __slots__ = ("_make", "_value")

    def __init__(self, make: Callable[[], _V]) -> None:
        self._make: Callable[[], _V] | None = make
        self._value: _V | None = None

    def __call__(self) -> _V:
        if self._make is not None:
            self._value, self._make = self._make(), None
        return self._value  # type: ignore[return-value]  # made above, on the first call


def coefficient(a: _CoefLike) -> _Coef:
    """A coefficient for the core's steps: a number, or a float64 array of one value per cell,
    per channel, or one value (the core broadcasts)."""
    return float(a) if isinstance(a, (float, int)) else np.ascontiguousarray(a, np.float64).reshape(-1)


# -- what a backward needs -------------------------------------------------------------------------

class StepSaved:
    """A step-path backward: the plan, x, the cells' centring means (the sums are about them)
    and the variant's backward fold, sums -> (c1, c2, c3, grads)."""

    __slots__ = ("plan", "x", "mean", "fold", "shape")

    # fold is None only for an empty x, whose backward never reaches it (VariantLayer.backward).
    def __init__(self, plan: _core.Plan, x: npt.NDArray[Any], mean: _Coef, fold: _StepFold | None,
                 shape: tuple[int, ...]) -> None:
        self.plan, self.x, self.mean, self.fold, self.shape = plan, x, mean, fold, shape

    def backward(self, dy: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], Grads]:
        assert self.fold is not None  # x is not empty
        B, A = _core.backward_sums(self.plan, self.x, dy, self.mean)
        c1, c2, c3, grads = self.fold(B, A)
        c1, c2, c3 = (coefficient(c) for c in (c1, c2, c3))
        dx = _core.empty_like(self.x)
        x = self.x if isinstance(c2, np.ndarray) or c2 != 0 else None  # no x term: skip reading x
        _core.backward_apply_coefficients(self.plan, x, dy, self.mean, c1, c2, c3, dx)
        return dx.reshape(self.shape), grads


class PositionsSaved:
    """A backward with a per-position affine (_core.backward_sums_positions, ...): the plan, x,
    the cells' means and scales (x_hat = (x - mean)*scale), the per-position weight and the
    variant's fold, (B, A) -> (c1, c2, c3); the weight's and bias's gradients come from the sums."""

    __slots__ = ("plan", "x", "mean", "scale", "weight", "fold", "shape", "grads")

    def __init__(self, plan: _core.Plan, x: npt.NDArray[Any], mean: _Coef, scale: _Coef,
                 weight: npt.NDArray[Any],
                 fold: Callable[[_F64, _F64], tuple[_CoefLike, _CoefLike, _CoefLike]],
                 shape: tuple[int, ...], grads: Callable[[_F64, _F64], Grads]) -> None:
        self.plan, self.x, self.mean, self.scale, self.weight = plan, x, mean, scale, weight
        self.fold, self.shape, self.grads = fold, shape, grads

    def backward(self, dy: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], Grads]:
        B, A, dw, db = _core.backward_sums_positions(self.plan, self.x, dy, self.mean, self.scale, 0.0, self.weight)
        c1, c2, c3 = self.fold(B, A)
        dx = _core.empty_like(self.x)
        k1, k2, k3 = (coefficient(c) for c in (c1, c2, c3))
        _core.backward_apply_positions(self.plan, self.x, dy, self.mean, k1, k2, k3, self.weight,
                                       dx)
        return dx.reshape(self.shape), self.grads(dw, db)


class PointwiseSaved:
    """A pointwise-epilogue backward (_core.pointwise_sums, _core.pointwise_backward): the plan,
    the epilogue, x, its (9, K) coefficients and the variant's fold, sums (7, K) -> (c1, c2, c3,
    grads)."""

    __slots__ = ("plan", "op", "x", "coef", "fold", "shape")

    def __init__(self, plan: _core.Plan, op: int, x: npt.NDArray[Any], coef: _F64,
                 fold: Callable[[_F64], tuple[_CoefLike, _CoefLike, _CoefLike, Grads]],
                 shape: tuple[int, ...]) -> None:
        self.plan, self.op, self.x, self.coef, self.fold, self.shape = plan, op, x, coef, fold, shape

    def backward(self, dy: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], Grads]:
        sums = _core.pointwise_sums(self.plan, self.op, self.x, dy, self.coef)
        c1, c2, c3, grads = self.fold(sums)
        dx = _core.empty_like(self.x)
        k1, k2, k3 = (coefficient(c) for c in (c1, c2, c3))
        _core.pointwise_backward(self.plan, self.op, self.x, dy, self.coef, k1, k2, k3, dx)
        return dx.reshape(self.shape), grads


_FusedFold = tuple[_CoefLike, _CoefLike, _CoefLike, int, _F64 | None, _F64 | None]


class FusedPointwiseSaved:
    """A pointwise-epilogue backward in one pass (_core.pointwise_backward_fused), for folds
    known at the forward: c1, c2, c3 per cell, plus c2 and c3 terms linear in the sums of each
    cluster of `cluster` planes, k2 . sums and k3 . sums ((7, K) arrays, or None); the sums then
    give the parameters' gradients, grads(sums). `fold` is that tuple, or a function giving it
    at the backward (so that an inference forward does not build it)."""

    __slots__ = ("plan", "op", "x", "coef", "fold", "grads", "shape")

    def __init__(self, plan: _core.Plan, op: int, x: npt.NDArray[Any], coef: _F64,
                 fold: _FusedFold | Callable[[], _FusedFold],
                 grads: Callable[[_F64], Grads], shape: tuple[int, ...]) -> None:
        self.plan, self.op, self.x, self.coef, self.fold, self.grads, self.shape = plan, op, x, coef, fold, grads, shape

    def backward(self, dy: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], Grads]:
        c1, c2, c3, cluster, k2, k3 = self.fold() if callable(self.fold) else self.fold
        dx = _core.empty_like(self.x)
        sums = _core.pointwise_backward_fused(self.plan, self.op, self.x, dy, self.coef, coefficient(c1),
                                              coefficient(c2), coefficient(c3), dx, cluster, k2, k3)
        return dx.reshape(self.shape), self.grads(sums)


def pointwise_coefficients(K: int, shift: npt.ArrayLike = 0.0, a: npt.ArrayLike = 1.0,
                           b: npt.ArrayLike = 0.0, p: npt.ArrayLike = 0.0, q: npt.ArrayLike = 0.0,
                           r: npt.ArrayLike = 0.0, scale: npt.ArrayLike = 1.0,
                           offset: npt.ArrayLike = 0.0, center: npt.ArrayLike = 0.0) -> _F64:
    """The (9, K) coefficient array of _core.apply_pointwise, each row broadcast from its value
    (a number, one per channel of a plan's sets, or one per cell)."""
    coef = np.empty((9, K))
    for row, v in zip(coef, (shift, a, b, p, q, r, scale, offset, center)):
        if np.ndim(v) == 0:
            row[...] = v
        else:
            v = np.asarray(v, np.float64).reshape(-1)
            row.reshape(-1, v.size)[...] = v  # per cell, or tiled over the sets
    return coef


class FusedSaved:
    """A backward that is the core's standard one over the variant's plan (_engine.Saved), with
    the parameter gradients then mapped by `grads(dweight, dbias)`."""

    __slots__ = ("saved", "want_weight", "want_bias", "grads")

    def __init__(self, saved: _core.Saved, want_weight: bool, want_bias: bool,
                 grads: _ParamGrads) -> None:
        self.saved, self.want_weight, self.want_bias, self.grads = saved, want_weight, want_bias, grads

    x = property(lambda self: self.saved.x)
    shape = property(lambda self: self.saved.shape)

    def backward(self, dy: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], Grads]:
        fast = _core.backward_fast(self.saved, dy, self.want_weight, self.want_bias)
        dx, dw, db = fast if fast is not None else _engine.backward(self.saved, dy, self.want_weight, self.want_bias)
        return dx.reshape(self.saved.shape), self.grads(dw, db)


def checked_attribute(name: str, check: Callable[[Any, str], object]) -> property:
    """A plain attribute (a hyperparameter the caller may change between steps) whose every
    assignment is checked by check(value, name) first."""
    private = "_" + name
    return property(lambda self: getattr(self, private),
                    lambda self, v: setattr(self, private, check(v, name)))


# -- the layer base -----------------------------------------------------------------------------------

class _Saved(Protocol):
    """What VariantLayer.backward needs of a saved forward (the classes above, or a layer's own)."""

    @property
    def x(self) -> npt.NDArray[Any]: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def backward(self, dy: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], Grads]: ...


class VariantLayer(NormLayer):
    """Base of the research variants over (N, C, H, W) input (or (N, H, W, C) with layout="NHWC").

    Holds what the batch-statistics variants share: eps, the per-channel affine, the layout, the
    input checks, `use_batch_stats`, and a backward that hands the saved forward its dy.
    """

    _ranks = " (N, C, H, W)"

    _channels_arg = "num_features"  # the constructor's name for the channel count, for messages

    # Set by _setup:
    layout: str
    num_features: int
    eps: float
    affine: bool
    # Set by _running_stats (the buffers None without track_running_stats), or by the layer:
    momentum: float | None
    track_running_stats: bool
    use_batch_stats: bool
    running_mean: npt.NDArray[Any] | None
    running_var: npt.NDArray[Any] | None
    num_batches_tracked: npt.NDArray[np.int64] | None

    def _setup(self, num_features: int, eps: float, affine: bool, dtype: npt.DTypeLike, layout: str,
               affine_shape: tuple[int, ...] | None = None) -> None:
        self.layout = _checks.layout_arg(layout)
        self.num_features = _checks.positive_int(num_features, self._channels_arg)
        self.eps = _checks.nonneg_float(eps, "eps")
        self.affine = bool(affine)
        self._set_dtype(dtype)
        shape = (self.num_features,) if affine_shape is None else affine_shape
        self._param("weight", np.ones(shape, self.dtype) if self.affine else None)
        self._param("bias", np.zeros(shape, self.dtype) if self.affine else None)

    def _running_stats(self, momentum: float | None, track_running_stats: bool,
                       mean_shape: int | tuple[int, ...], var_shape: int | tuple[int, ...]) -> None:
        """momentum, and running_mean (zeros), running_var (ones) and num_batches_tracked as
        torch's BatchNorm keeps them (None without track_running_stats)."""
        self.momentum = _checks.momentum_value(momentum)
        self.track_running_stats = bool(track_running_stats)
        # After eval(): normalize with the batch's own statistics, leaving the running ones alone.
        self.use_batch_stats = False
        if self.track_running_stats:
            self._buffer("running_mean", np.zeros(mean_shape, self.dtype))
            self._buffer("running_var", np.ones(var_shape, self.dtype))
            self._buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def _input(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], tuple[int, int, int]]:
        """x checked (a 4-D array of the layer's dtype family with num_features channels), as a
        contiguous array, and its (N, C, S) planes."""
        nhwc = self.layout == "NHWC"
        _checks.layer_input(x, self.dtype, ndims=(4,), channels=self.num_features,
                            ranks=" (N, H, W, C)" if nhwc else self._ranks,
                            channel_dim=-1 if nhwc else 1, channels_arg=self._channels_arg)
        xc = _checks.contiguous(x)
        return xc, _engine.planes(xc, self.layout)

    def _plan(self, plan: _core.Plan) -> _core.Plan:
        return _engine.in_layout(plan, self.layout)

    def _batch_stats(self) -> bool:
        """Statistics from the batch: in training, and in eval with use_batch_stats."""
        return self.training or self.use_batch_stats

    def _shape_plans(self, shape: tuple[int, int, int], make: Callable[[], _Plans]) -> _Plans:
        """The plans of inputs of `shape` (N, C, S), made by make() the first time and kept (for
        the last 8 shapes): a plan is never changed once made."""
        cache: dict[tuple[int, int, int], Any] | None = self.__dict__.get("_shape_plan_cache")
        if cache is None:
            cache = self.__dict__["_shape_plan_cache"] = {}
        plans = cache.get(shape)
        if plans is None:
            if len(cache) >= 8:
                cache.clear()
            plans = cache[shape] = make()
        return plans  # make()'s, stored under its shape

    def _sum_weights(self, K: int, row: int, values: npt.NDArray[Any]) -> _F64:
        """A fused backward's (7, K) k2 or k3, zero but for `row` = values: kept per (K, row) and
        only that row written, since the core reads it during its call alone (a fresh zeroed one
        per backward was a tenth of a small FRN's backward)."""
        cache: dict[tuple[int, int], _F64] | None = self.__dict__.get("_sum_weights_cache")
        if cache is None:
            cache = self.__dict__["_sum_weights_cache"] = {}
        k = cache.get((K, row))
        if k is None:
            if len(cache) >= 8:
                cache.clear()
            k = cache[(K, row)] = np.zeros((_POINTWISE_SUMS, K))
        k[row] = values.reshape(-1)
        return k

    def _channel_params(self) -> tuple[_F64, _F64]:
        """weight and bias as float64 arrays (ones and zeros without an affine)."""
        shape = (self.num_features,) if self.weight is None else self.weight.shape
        w = np.ones(shape) if self.weight is None else self.weight.astype(np.float64)
        b = np.zeros(shape) if self.bias is None else self.bias.astype(np.float64)
        return w, b

    def _param_grads(self, dw: npt.ArrayLike | None, db: npt.ArrayLike | None) -> Grads:
        """The grads dict of the affine parameters from float64 gradients of their shape."""
        if self.weight is None:
            return {}
        assert self.bias is not None  # made with the weight (affine)
        return {"weight": np.asarray(dw).reshape(self.weight.shape).astype(self.weight.dtype),
                "bias": np.asarray(db).reshape(self.bias.shape).astype(self.bias.dtype)}

    def _apply(self, plan: _core.Plan, x: npt.NDArray[Any], mean: _CoefLike, scale: _CoefLike,
               offset: _CoefLike) -> npt.NDArray[Any]:
        """y = (x - mean_k)*scale_k + offset_k, in x's shape (empty x: no core call)."""
        y = _core.empty_like(x)
        if x.size:
            _core.apply_coefficients(plan, x, coefficient(mean), coefficient(scale), coefficient(offset), y)
        return y

    def _fused_saved(self, plan: _core.Plan, x: npt.NDArray[Any], mean: _CoefLike, rstd: _CoefLike,
                     weight: npt.NDArray[Any] | None, grads: _ParamGrads) -> FusedSaved:
        """The core's standard backward over `plan` with per-channel `weight` (of the layer's
        parameter dtype, or None); `grads(dw, db)` maps its gradients to the layer's."""
        saved = _engine.Saved(plan, x, coefficient(mean), coefficient(rstd), weight, True, None)
        want = self.weight is not None
        return FusedSaved(saved, want, want, grads)

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Gradient w.r.t. the input of the last forward; parameter gradients go to `grads`."""
        saved: _Saved | None = self._saved
        if saved is None:
            raise _checks.StateError(
                f"backward: expected a forward call first, got none on this {type(self).__name__}")
        dy = _checks.grad_output(dy, saved.shape, saved.x.dtype)
        if saved.x.size == 0:  # sums over no elements: zero parameter gradients, as torch
            zeros = None if self.weight is None else np.zeros(self.weight.shape)
            self.grads = self._param_grads(zeros, zeros)
            return _core.empty_like(saved.x).reshape(saved.shape)
        dx, self.grads = saved.backward(dy)
        return dx


class _Tracked(Protocol):
    """What running_factor reads of a layer (a variant's, SyncBatchNorm)."""

    @property
    def momentum(self) -> float | None: ...

    @property
    def num_batches_tracked(self) -> npt.NDArray[np.integer[Any]] | None: ...


def running_factor(layer: _Tracked) -> float:
    """The running-statistics factor of a training step: momentum, or 1/count for momentum=None
    (a cumulative average), num_batches_tracked counting this step; as torch's _BatchNorm."""
    assert layer.num_batches_tracked is not None  # called with track_running_stats only
    count = int(layer.num_batches_tracked) + 1
    return 1.0 / count if layer.momentum is None else layer.momentum


_Var = TypeVar("_Var", float, _F64)


def unbiased(var: _Var, count: float) -> _Var:
    """var * count/(count - 1) (count: one number), NaN for a single value, as torch's running_var."""
    return var * (count / (count - 1)) if count > 1 else var * np.nan
