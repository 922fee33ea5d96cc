"""BatchChannelNorm2d: a batch part, then a per-sample channel (group) part (BCN)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import _F64, StepSaved, VariantLayer, pool, unbiased


def _update(running: npt.NDArray[Any], value: npt.NDArray[np.float64], factor: float) -> None:
    """_engine.running_update, bitwise, in one core call where the buffer is the layer's own kind
    (a C-contiguous float32 or float64 array; the core's update skips NumPy's errstate)."""
    if running.dtype in (np.float32, np.float64) and running.flags.c_contiguous:
        _core.running_update(running, value, factor)
    else:
        _engine.running_update(running, value, factor)


class BatchChannelNorm2d(VariantLayer):
    """Batch-Channel Normalization (Qiao et al., "Rethinking Normalization and Elimination
    Singularity in Neural Networks", arXiv 1911.09738): a per-channel batch
    normalization with its own affine (bn_weight, bn_bias: C values), then a per-sample group
    normalization over (C/G channels, H, W) with one affine pair per group (gn_weight, gn_bias:
    G = num_groups values); the one eps in both parts:

        x1 = bn_weight (x - mu) / sqrt(var + eps) + bn_bias,
        y  = gn_weight_g (x1 - mu_ng) / sqrt(var_ng + eps) + gn_bias_g.

    estimate=False: the batch part is BatchNorm (batch statistics and torch's running-statistics
    rule, `momentum`, in training; running statistics in inference). estimate=True (the paper's
    micro-batch mode): in training the running estimates (starting at 0 and 1) are first updated
    with rate r = estimate_rate, mu += r (mu_B - mu), var += r (mean_{N,H,W} (x - mu_old)^2 - var),
    then the batch part normalizes with the updated estimates, constants in the backward;
    inference uses them too. Use with Weight Standardization (normkit.functional.
    weight_standardization) on the preceding convolution, as the paper does.

    One statistics pass (every (n, c) cell's moments: the batch part's statistics pool them, the
    group part's follow from them analytically, x1 being an affine of x per channel) and one
    output pass; the backward is one sums pass and one apply pass: no intermediate tensor.
    """

    # Registered by name (_param, _buffer): the two parts' affines and the batch part's statistics.
    bn_weight: npt.NDArray[Any]
    bn_bias: npt.NDArray[Any]
    gn_weight: npt.NDArray[Any]
    gn_bias: npt.NDArray[Any]
    running_mean: npt.NDArray[Any]
    running_var: npt.NDArray[Any]
    momentum: float  # never None here

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5,
                 momentum: float = 0.1, estimate: bool = False, estimate_rate: float = 0.1,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        C = _checks.positive_int(num_features, "num_features")
        self.num_groups = _checks.positive_int(num_groups, "num_groups")
        _checks.divisor(self.num_groups, C, "num_groups", "num_features")
        self.num_features, self.eps = C, _checks.nonneg_float(eps, "eps")
        self.layout, self.affine = "NCHW", True
        self._set_dtype(dtype)
        self.momentum = _checks.momentum_value(momentum, allow_none=False)
        self.estimate = bool(estimate)
        self.estimate_rate = _checks.number_in(estimate_rate, "estimate_rate", 0.0, 1.0)
        G = self.num_groups
        self._param("bn_weight", np.ones(C, self.dtype))
        self._param("bn_bias", np.zeros(C, self.dtype))
        self._param("gn_weight", np.ones(G, self.dtype))
        self._param("gn_bias", np.zeros(G, self.dtype))
        self._buffer("running_mean", np.zeros(C, self.dtype))
        self._buffer("running_var", np.ones(C, self.dtype))
        self.weight = self.bias = None  # the affines are the two parts' own
        # After eval(): the batch part normalizes with the batch's own statistics.
        self.use_batch_stats = False

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], StepSaved]:
        x, (N, C, S) = self._input(x)
        G = self.num_groups
        # cells: the (n, c) planes
        plan = self._shape_plans((N, C, S), lambda: _core.plan_per_channel_in_sets(N, C, S, list(range(N))))
        if x.size == 0:
            return _core.empty_like(x), StepSaved(plan, x, np.zeros(N * C), None, x.shape)
        batch = self._batch_stats() and not self.estimate
        if self.training:
            _checks.more_than_one_value(N * S, "channel", x.shape)
        bw, bb, gw, gb = (p.astype(np.float64) for p in (self.bn_weight, self.bn_bias, self.gn_weight, self.gn_bias))
        if not batch and not (self.estimate and self.training):
            # The running statistics: the cells' moments, the fold and the output in one core
            # pass, group by group while each is in cache.
            mu, var = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
            y = _core.empty_like(x)
            m, v, r, scale, offset, mu_g, r_g = _core.batch_channel_infer(x, G, self.eps, mu, var, bw, bb, gw, gb, y)
            return y, StepSaved(plan, x, m, self._backward_fold(N, C, G, S, False, m, v, mu, r, mu_g, r_g,
                                                                (bw, bb, gw, gb)), x.shape)
        m, v = _core.group_moments(plan, x)  # every cell's moments, N*C each
        # The batch part's statistics, pooled from the cells by the fold (or the running
        # estimates); then the fold: r per channel, the cells' output coefficients, and the group
        # part's mu_g and r_g per (n, g) (x1 = a x + b per channel, an affine of x, so the group
        # part's statistics follow from the cells' moments).
        if batch:
            mu, var, r, scale, offset, mu_g, r_g = _core.batch_channel_fold(N, C, G, S, self.eps, m, v, bw, bb, gw, gb)
            if self.training:
                _update(self.running_mean, mu, self.momentum)
                _update(self.running_var, unbiased(var, N * S), self.momentum)
        else:
            if self.estimate and self.training:
                mu_b, var_b = pool(S, m.reshape(N, C), v.reshape(N, C), 0)
                # mean over (N, H, W) of (x - mu_old)^2 = var_B + (mu_B - mu_old)^2
                spread = var_b + (mu_b - self.running_mean.astype(np.float64)) ** 2
                _update(self.running_mean, mu_b, self.estimate_rate)
                _update(self.running_var, spread, self.estimate_rate)
            mu, var = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
            mu, var, r, scale, offset, mu_g, r_g = _core.batch_channel_fold(N, C, G, S, self.eps, m, v, bw, bb, gw, gb,
                                                                            mu, var)
        y = self._apply(plan, x, m, scale, offset)  # y = scale (x - m) + offset per cell
        return y, StepSaved(plan, x, m, self._backward_fold(N, C, G, S, batch, m, v, mu, r, mu_g, r_g,
                                                            (bw, bb, gw, gb)), x.shape)

    def _backward_fold(self, N: int, C: int, G: int, S: int, batch: bool, m: _F64, v: _F64, mu: _F64, r: _F64,
                       mu_g: _F64, r_g: _F64, params: tuple[_F64, _F64, _F64, _F64]
                       ) -> Callable[[_F64, _F64], tuple[_F64, _F64, _F64, dict[str, npt.NDArray[Any]]]]:
        """The backward (tests/reference.py: batch_channel_norm_backward), from the cells' sums
        B = sum dy, A = sum dy (x - m): the group part's dL/dx1 per cell, summed per channel for
        the batch part, which with batch statistics adds its own terms (the core's
        batch_channel_fold_backward, normkit.h)."""
        def fold(B: _F64, A: _F64) -> tuple[_F64, _F64, _F64, dict[str, npt.NDArray[Any]]]:
            c1, c2, c3, *grads = _core.batch_channel_fold_backward(N, C, G, S, batch, B, A, m, v, mu, r, mu_g, r_g,
                                                                   *params)
            names = ("bn_weight", "bn_bias", "gn_weight", "gn_bias")
            return c1, c2, c3, {k: g.astype(self.dtype) for k, g in zip(names, grads)}
        return fold

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        dx = super().backward(dy)
        if self._saved.x.size == 0:  # sums over no elements: zero gradients for the four parameters
            self.grads = {n: np.zeros_like(p) for n, p in self.parameters().items()}
        return dx

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
                f"estimate={self.estimate}, estimate_rate={self.estimate_rate}")

