"""BatchLayerNorm2d: a mix of per-(c, h, w) batch and per-(n, h, w) feature standardization (BLN)."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import VariantLayer, checked_attribute, unbiased

if TYPE_CHECKING:
    from typing_extensions import Self

_RUNNING = ("running_mean", "running_var")


class _BatchLayerSaved:
    """BLN's backward: one core call, one pass (batch_layer_backward: per block of hw columns,
    the feature cells' and the batch columns' sums, the fold per cell and per (c, hw), and dx)."""

    __slots__ = ("feature", "x", "mean_f", "rstd_f", "mean_b", "rstd_b", "with_batch_stats",
                 "mix", "weight", "shape", "grads")

    # Set by __init__'s keywords, one per slot:
    feature: _core.Plan
    x: npt.NDArray[Any]
    mean_f: npt.NDArray[np.float64]
    rstd_f: npt.NDArray[np.float64]
    mean_b: npt.NDArray[np.float64]
    rstd_b: npt.NDArray[np.float64]
    with_batch_stats: bool
    mix: tuple[float, float]
    weight: npt.NDArray[Any]
    shape: tuple[int, ...]
    grads: Callable[[npt.NDArray[np.float64], npt.NDArray[np.float64]],
                    dict[str, npt.NDArray[Any]]]

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)

    def backward(self, dy: npt.NDArray[Any]
                 ) -> tuple[npt.NDArray[Any], dict[str, npt.NDArray[Any]]]:
        # dx = a*standardize_backward over C of g + b*(standardize_backward over N of g, or g r_B
        # with running statistics), g = k w dy (tests/reference.py: batch_layer_norm_backward).
        feature_scale, batch_scale = self.mix
        dx = _core.empty_like(self.x)
        dw, db = _core.batch_layer_backward(self.feature, self.x, dy, self.mean_f, self.rstd_f,
                                            self.mean_b, self.rstd_b, feature_scale, batch_scale,
                                            self.with_batch_stats, self.weight, dx)
        return dx.reshape(self.shape), self.grads(dw, db)


class BatchLayerNorm2d(VariantLayer):
    """Batch Layer Normalization (Ziaee and Cano, "Batch Layer Normalization, A new normalization
    layer for CNNs and RNNs", arXiv 2209.08898), on the axes of its reference implementation:

        x_B = (x - mu_B)/sqrt(var_B + eps)   mu_B, var_B per (c, h, w) over the N samples
        x_F = (x - mu_F)/sqrt(var_F + eps)   mu_F, var_F per (n, h, w) over the C channels
        y = weight_c ((1/B - 1e-4) x_F + (1 - 1/B - 1e-4) x_B) / sqrt(C) + bias_c,

    both variances biased, B the configured `batch_size` (not the input's N). In training the
    batch statistics update running_mean and running_var, of shape (C, H, W) and starting at 0
    and 1, with torch's rule (var_B unbiased with the batch's actual N); in inference they replace
    the batch statistics, and the feature statistics are always the sample's own. The running
    statistics take the (C, H, W) of the first input and keep it: a later input of another shape
    raises ValueError. With `use_batch_stats` after eval() the batch's own statistics are used and
    the running ones left alone.

    Without a transpose, one pass over the tensor each way: the core takes blocks of (h, w)
    columns of every sample and channel, reads NCHW memory as rows of channels for the feature
    statistics (LayerNorm2d's plan) and as rows of samples for the batch statistics, and applies
    the batch part as a term per (c, h, w) while the block is in cache.
    """

    batch_size = checked_attribute("batch_size", _checks.positive_int)

    weight: npt.NDArray[Any]  # always affine
    bias: npt.NDArray[Any]
    momentum: float  # never None here
    # (C, H, W), None until the first forward or a load_state_dict gives them their shape.
    running_mean: npt.NDArray[Any] | None
    running_var: npt.NDArray[Any] | None

    def __init__(self, num_features: int, batch_size: int, eps: float = 1e-3,
                 momentum: float = 0.1, dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self._setup(num_features, eps, True, dtype, "NCHW")
        self.batch_size = batch_size
        self.momentum = _checks.momentum_value(momentum, allow_none=False)
        # (C, H, W): made at the first forward, of its input's shape, or by load_state_dict.
        self._buffer("running_mean", None)
        self._buffer("running_var", None)
        # After eval(): normalize with the batch's own statistics, leaving the running ones alone.
        self.use_batch_stats = False

    def _mix(self, C: int) -> tuple[float, float, float]:
        B = float(self.batch_size)
        return 1.0 / B - 1e-4, 1.0 - 1.0 / B - 1e-4, 1.0 / math.sqrt(C)

    def _check_running_shape(self, x: npt.NDArray[Any]) -> None:
        if self.running_mean is not None and self.running_mean.shape != x.shape[1:]:
            raise ValueError(f"input: expected (C, H, W) = {self.running_mean.shape} (the running statistics' "
                             f"shape), got input of shape {x.shape}")

    def _forward(self, x: npt.NDArray[Any]
                 ) -> tuple[npt.NDArray[Any], _BatchLayerSaved | _EmptySaved]:
        x, (N, C, S) = self._input(x)
        self._check_running_shape(x)
        # The feature cells (n, hw): N samples of C rows of HW columns (LayerNorm2d's reading);
        # the batch columns (c, hw): one sample of N rows of C*HW columns.
        feature = self._shape_plans(
            (N, C, S), lambda: _engine.in_layout(_core.plan_per_sample_group(N, S, C, S), "NHWC"))
        if x.size == 0:  # nothing to normalize: no statistics, and none made
            return _core.empty_like(x), _EmptySaved(x)
        if self.training:
            _checks.more_than_one_value(N, "(c, h, w) over the batch", x.shape)
        if self.running_mean is None:
            self.running_mean = np.zeros(x.shape[1:], self.dtype)
            self.running_var = np.ones(x.shape[1:], self.dtype)
        assert self.running_var is not None  # made (or loaded) with running_mean
        with_batch_stats = self._batch_stats()
        # Running statistics go in as they are: the core reads them as float64 copies.
        running = None if with_batch_stats else (self.running_mean, self.running_var)
        a, b, k = self._mix(C)
        y = _core.empty_like(x)
        # y = ((x - mu_F) r_F a k + (x - mu_B) r_B b k) weight_c + bias_c, per block of (h, w)
        # columns of every sample: both statistics, then y.
        mean_f, rstd_f, mean_b, var_b, rstd_b = _core.batch_layer_forward(
            feature, x, self.eps, a * k, b * k, self.weight, self.bias, y, running)
        if self.training:
            _core.running_update(self.running_mean, mean_b, self.momentum)
            _core.running_update(self.running_var, var_b, self.momentum, unbiased(1.0, N))
        return y, _BatchLayerSaved(feature=feature, x=x, mean_f=mean_f, rstd_f=rstd_f, mean_b=mean_b,
                                   rstd_b=rstd_b, with_batch_stats=with_batch_stats,
                                   mix=(a * k, b * k), weight=self.weight, shape=x.shape, grads=self._param_grads)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Self:
        """As every layer's, except that running_mean and running_var may be of any (C, H, W):
        the loaded ones set the shape later inputs must have."""
        shapes = {n: np.shape(state_dict[n]) for n in _RUNNING if hasattr(state_dict, "keys") and n in state_dict}
        for n, shape in shapes.items():
            if len(shape) != 3 or shape[0] != self.num_features:
                raise ValueError(f"state_dict: expected {n} of shape (C, H, W) with C = {self.num_features}, "
                                 f"got {shape}")
        old = {n: getattr(self, n) for n in _RUNNING}
        both = {n: shapes.get(n, None if old[n] is None else old[n].shape) for n in _RUNNING}
        if shapes and both["running_mean"] != both["running_var"]:
            raise ValueError(f"state_dict: expected running_mean and running_var of one shape, got "
                             f"{both['running_mean']} and {both['running_var']} (the layer's own where not given)")
        for n, shape in shapes.items():  # the arrays to load into, of the loaded shape
            if old[n] is None or old[n].shape != shape:
                setattr(self, n, np.zeros(shape, self.dtype))
        try:
            return super().load_state_dict(state_dict, strict)
        except BaseException:
            for n, v in old.items():
                setattr(self, n, v)
            raise

    def extra_repr(self) -> str:
        return f"{self.num_features}, batch_size={self.batch_size}, eps={self.eps}, momentum={self.momentum}"


class _EmptySaved:
    """An empty batch's backward: the VariantLayer base answers it (no sums over no elements)."""

    __slots__ = ("x", "shape")

    def __init__(self, x: npt.NDArray[Any]) -> None:
        self.x, self.shape = x, x.shape
