"""LayerNorm2d: LayerNorm over the channels of each (n, h, w) of an NCHW tensor (ConvNeXt's)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _core, _engine
from ._variant import StepSaved, VariantLayer


class LayerNorm2d(VariantLayer):
    """LayerNorm over C for each (n, h, w) of (N, C, H, W) input, as ConvNeXt's and timm's
    LayerNorm2d (Liu et al., "A ConvNet for the 2020s", arXiv 2201.03545):

        mu = mean_c x,  var = mean_c (x - mu)^2 (biased),  y = weight_c (x - mu)/sqrt(var + eps) + bias_c.

    Without a transpose: NCHW memory is read as a channels-last plan whose rows are the channels
    and whose columns are the H*W positions, so each (n, h, w) is a column's statistics group and
    the per-channel affine is per row (the core's per-position steps). Forward and backward each
    go sample by sample, a block of the sample's columns at a time: its statistics (or sums),
    then its output (or dx) while the block is in cache.
    """

    _channels_arg = "num_channels"

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self._setup(num_channels, eps, affine, dtype, "NCHW")
        self.num_channels = self.num_features
        # Without affine: the core's unit weight and zero bias, by compute type (read-only).
        self._unit: dict[type, tuple[npt.NDArray[Any], npt.NDArray[Any]]] = {}

    def _forward(self, x: npt.NDArray[Any]
                 ) -> tuple[npt.NDArray[Any], StepSaved | LayerNorm2dSaved]:
        x, (N, C, S) = self._input(x)
        # N samples of C rows (positions) of S columns (cells): the channels-last reading.
        plan = self._shape_plans((N, C, S), lambda: _engine.in_layout(_core.plan_per_sample_group(N, S, C, S), "NHWC"))
        if x.size == 0:
            return _core.empty_like(x), StepSaved(plan, x, np.zeros(N * S), None, x.shape)
        y = _core.empty_like(x)
        # Sample by sample, block by block of its columns: their statistics, then their output
        # while in cache. Without affine the per-row weight is 1 (its gradients unused).
        weight: npt.NDArray[Any]
        bias: npt.NDArray[Any]
        if self.weight is None:
            compute = np.float64 if x.dtype == np.float64 else np.float32  # the core's compute type
            ones = self._unit.get(compute)
            if ones is None or ones[0].shape[0] != C:  # made once per compute type, never written
                ones = self._unit[compute] = (np.ones(C, compute), np.zeros(C, compute))
            weight, bias = ones
        else:
            assert self.bias is not None  # made with the weight (affine)
            weight, bias = self.weight, self.bias
        mean, _, rstd = _core.normalize_batch_stats_positions(plan, x, self.eps, weight, bias, y)
        return y, LayerNorm2dSaved(plan, x, mean, rstd, weight, x.shape, self._param_grads)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


class LayerNorm2dSaved:
    """LayerNorm2d's backward in one core call (tests/reference.py: layer_norm_2d_backward):
    per cell, with the weight inside the sums, B = sum w dy, A = sum w dy (x - mu) over the C
    channels, dx = r w dy - r B/C - r^3 (x - mu) A/C; the core folds them column block by
    column block while the block is in cache."""

    __slots__ = ("plan", "x", "mean", "rstd", "weight", "shape", "grads")

    def __init__(self, plan: _core.Plan, x: npt.NDArray[Any], mean: npt.NDArray[np.float64],
                 rstd: npt.NDArray[np.float64], weight: npt.NDArray[Any], shape: tuple[int, ...],
                 grads: Callable[[npt.NDArray[Any], npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]
                 ) -> None:
        self.plan, self.x, self.mean, self.rstd, self.weight = plan, x, mean, rstd, weight
        self.shape, self.grads = shape, grads

    def backward(self, dy: npt.NDArray[Any]
                 ) -> tuple[npt.NDArray[Any], dict[str, npt.NDArray[Any]]]:
        dx = _core.empty_like(self.x)
        dw, db = _core.normalize_backward_positions(self.plan, self.x, dy, self.mean, self.rstd, self.weight, dx)
        return dx.reshape(self.shape), self.grads(dw, db)
