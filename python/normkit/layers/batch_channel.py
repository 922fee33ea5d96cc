"""BatchChannelNorm2d: a batch part, then a per-sample channel (group) part (BCN)."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import StepSaved, VariantLayer, pool, unbiased


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
        G, cpg = self.num_groups, C // self.num_groups
        # cells: the (n, c) planes
        plan = self._shape_plans((N, C, S), lambda: _core.plan_per_channel_in_sets(N, C, S, list(range(N))))
        if x.size == 0:
            return _core.empty_like(x), StepSaved(plan, x, np.zeros(N * C), None, x.shape)
        batch = self._batch_stats() and not self.estimate
        if self.training:
            _checks.more_than_one_value(N * S, "channel", x.shape)
        m, v = (a.reshape(N, C) for a in _core.group_moments(plan, x))  # every cell's moments
        bw, bb = self.bn_weight.astype(np.float64), self.bn_bias.astype(np.float64)
        # The group part's affine per group, (G, 1): broadcast over a group's cpg channels.
        gw, gb = (p.astype(np.float64).reshape(G, 1) for p in (self.gn_weight, self.gn_bias))
        # The batch part's statistics, pooled from the cells (or the running estimates).
        if batch:
            mu, var = pool(S, m, v, 0)
            if self.training:
                _update(self.running_mean, mu, self.momentum)
                _update(self.running_var, unbiased(var, N * S), self.momentum)
        else:
            if self.estimate and self.training:
                mu_b, var_b = pool(S, m, v, 0)
                # mean over (N, H, W) of (x - mu_old)^2 = var_B + (mu_B - mu_old)^2
                spread = var_b + (mu_b - self.running_mean.astype(np.float64)) ** 2
                _update(self.running_mean, mu_b, self.estimate_rate)
                _update(self.running_var, spread, self.estimate_rate)
            mu, var = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
        r = 1.0 / np.sqrt(var + self.eps)
        a, b = bw * r, bb - mu * bw * r  # x1 = a x + b per channel
        # The group part's statistics of x1, from the cells' moments: x1's cell mean a m + b,
        # variance a^2 v, pooled over each sample's groups of cpg channels. Per-group values
        # stay (N, G, 1) and broadcast over the (N, G, cpg) view of a per-cell array.
        ag = a.reshape(G, cpg)
        m1 = (a * m + b).reshape(N, G, cpg)
        mu_g = m1.sum(axis=2, keepdims=True) / cpg  # pool(1, ...) over each group's cells
        var_g = ((a * a * v).reshape(N, G, cpg) + (m1 - mu_g) ** 2).sum(axis=2, keepdims=True) / cpg
        r_g = 1.0 / np.sqrt(var_g + self.eps)  # (N, G, 1)
        e1 = gw * r_g  # gw r_g, (N, G, 1)
        d1 = m1 - mu_g  # m1 - mu_g per cell
        # y = gw r_g (a x + b - mu_g) + gb = gw r_g a (x - m) + gw r_g (m1 - mu_g) + gb per cell
        y = self._apply(plan, x, m, e1 * ag, e1 * d1 + gb)

        # Backward (tests/reference.py: batch_channel_norm_backward), per cell B = sum dy,
        # A = sum dy (x - m). The group part gives dL/dx1 = e1 dy + f (x - m) + h per cell,
        # e1 = gw r_g, f = -gw r_g^3 Q/M1 a, h = -gw r_g^3 Q/M1 (m1 - mu_g) - gw r_g P/M1, with
        # P = sum B and Q = sum (a A + (m1 - mu_g) B) over the group's cells, M1 = cpg*S. The
        # batch part then sums z = dL/dx1 over each channel's cells: Z = sum (e1 B + h S),
        # ZX = sum (e1 (A + (m - mu) B) + f S v + h S (m - mu)), and with batch statistics
        # dx = bw r z - bw r Z/M - bw r^3 (x - mu) ZX/M, M = N*S; else dx = bw r z.
        # Per-group terms are (N, G, 1), per-cell ones (N, G, cpg), per-channel ones (G, cpg).
        def fold(B: npt.NDArray[np.float64], A: npt.NDArray[np.float64]
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                            npt.NDArray[np.float64], dict[str, npt.NDArray[Any]]]:
            B, A = B.reshape(N, G, cpg), A.reshape(N, G, cpg)
            P = B.sum(axis=2, keepdims=True)
            Q = (ag * A + d1 * B).sum(axis=2, keepdims=True)
            M1 = cpg * S
            e2 = -gw * r_g ** 2 * r_g * Q / M1
            f, h = e2 * ag, e2 * d1 - e1 * P / M1
            dm = (m - mu).reshape(N, G, cpg)
            hS = h * S
            Z = (e1 * B + hS).reshape(N, C).sum(axis=0)
            ZX = (e1 * (A + dm * B) + f * S * v.reshape(N, G, cpg) + hS * dm).reshape(N, C).sum(axis=0)
            c1, c2, c3 = ag * e1, ag * f, ag * h
            if batch:
                M = N * S
                t = (bw * r ** 2 * r * ZX / M).reshape(G, cpg)
                c2 = c2 - t
                c3 = c3 - (a * Z / M).reshape(G, cpg) - t * dm
            grads = {"bn_weight": r * ZX, "bn_bias": Z, "gn_weight": (r_g * Q).reshape(N, G).sum(axis=0),
                     "gn_bias": P.reshape(N, G).sum(axis=0)}
            return c1, c2, c3, {k: g.astype(self.dtype) for k, g in grads.items()}

        return y, StepSaved(plan, x, m.reshape(-1), fold, x.shape)

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        dx = super().backward(dy)
        if self._saved.x.size == 0:  # sums over no elements: zero gradients for the four parameters
            self.grads = {n: np.zeros_like(p) for n, p in self.parameters().items()}
        return dx

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
                f"estimate={self.estimate}, estimate_rate={self.estimate_rate}")

