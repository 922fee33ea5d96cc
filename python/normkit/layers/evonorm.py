"""EvoNormB0_2d and EvoNormS0_2d: the evolved normalization-activation layers (timm's definitions)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import Deferred, FusedPointwiseSaved, PointwiseSaved, VariantLayer, pool, unbiased

_F64 = npt.NDArray[np.float64]
_Grads = dict[str, npt.NDArray[Any]]  # parameter gradients by name


class _EvoNorm(VariantLayer):
    """What both EvoNorms share: weight, bias and v per channel (init 1, 0, 1), NCHW 4-D input."""

    weight: npt.NDArray[Any]  # always affine
    bias: npt.NDArray[Any]
    v: npt.NDArray[Any]

    def _evo_setup(self, num_features: int, eps: float, dtype: npt.DTypeLike) -> None:
        self._setup(num_features, eps, True, dtype, "NCHW")
        self._param("v", np.ones(self.num_features, self.dtype))

    def _params(self) -> tuple[_F64, _F64, _F64]:
        return self.weight.astype(np.float64), self.bias.astype(np.float64), self.v.astype(np.float64)

    def _grads(self, dw: _F64, db: _F64, dv: _F64) -> _Grads:
        return {"weight": dw.astype(self.dtype), "bias": db.astype(self.dtype), "v": dv.astype(self.dtype)}

    def _run(self, plan: _core.Plan, op: int, x: npt.NDArray[Any], coef: _F64,
             fold: Callable[[_F64], tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike, _Grads]]
             ) -> tuple[npt.NDArray[Any], PointwiseSaved]:
        y = _core.empty_like(x)
        if x.size:
            _core.apply_pointwise(plan, op, x, coef, y)
        return y, PointwiseSaved(plan, op, x, coef, fold, x.shape)

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        dx = super().backward(dy)
        if self._saved.x.size == 0:
            self.grads["v"] = np.zeros_like(self.v)
        return dx


class EvoNormB0_2d(_EvoNorm):
    """EvoNorm-B0 (Liu et al., "Evolving Normalization-Activation Layers", arXiv 2004.02967), as
    timm's EvoNorm2dB0:

        y = x / max(sqrt(var_B + eps), v x + sqrt(var_I + eps)) * weight + bias,

    var_B the batch variance per channel over (N, H, W) (biased, with its gradient, in training;
    running_var, torch's unbiased EMA with `momentum`, in inference), var_I the instance variance
    per (n, c) over (H, W), biased. At an exact tie of the max the gradient splits evenly between
    the two terms (torch.maximum's rule, as timm).
    """

    momentum: float  # never None here
    running_var: npt.NDArray[Any]

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.1,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self._evo_setup(num_features, eps, dtype)
        self.momentum = _checks.momentum_value(momentum, allow_none=False)
        self._buffer("running_var", np.ones(self.num_features, self.dtype))
        # After eval(): normalize with the batch's own statistics, leaving the running ones alone.
        self.use_batch_stats = False

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], PointwiseSaved]:
        x, (N, C, S) = self._input(x)
        batch = self._batch_stats()
        if self.training:
            _checks.more_than_one_value(N * S, "channel", x.shape)
        # The cells are the planes; so are the statistics' groups (the instance variance).
        stats, plan = self._shape_plans((N, C, S), lambda: (_core.plan_per_sample_group(N, C, S, C),
                                                            _core.plan_per_channel_in_sets(N, C, S, list(range(N)))))
        w, b, v = self._params()
        op = int(_core.Pointwise.evo_b0)
        # _core.apply_pointwise's (9, K) coefficients: as pointwise_coefficients(N*C, p=d_b, q=v,
        # r=d_I, scale=w, offset=b, center=mu_I) builds them.
        coef = np.empty((9, N * C))
        if not batch and x.size:
            # Inference: p = d_B is known before the planes' statistics, so one core call folds
            # each plane's d_I (std_into_r) and applies while the plane is in cache.
            mu_b, var_b = np.zeros(C), self.running_var.astype(np.float64)
            d_b = np.sqrt(var_b + self.eps)
            channel = np.zeros((9, C))
            channel[1], channel[3], channel[4], channel[6], channel[7] = 1.0, d_b, v, w, b
            y = _core.empty_like(x)
            m, var_i = (a.reshape(N, C) for a in _core.normalize_pointwise(
                stats, op, x, self.eps, False, False, False, channel, y, coef, std_into_r=True))
            d_i = np.sqrt(var_i + self.eps)
        else:
            if x.size:
                m, var_i = (a.reshape(N, C) for a in _core.group_moments(plan, x))  # per plane
            else:
                m = var_i = np.zeros((N, C))
            d_i = np.sqrt(var_i + self.eps)
            if batch:  # the batch's per-channel moments, pooled from the planes'
                mu_b, var_b = pool(S, m, var_i, 0) if N else (np.zeros(C), np.zeros(C))
            else:
                mu_b, var_b = np.zeros(C), self.running_var.astype(np.float64)
            d_b = np.sqrt(var_b + self.eps)
            coef[0] = 0.0
            coef[1] = 1.0
            coef[2] = 0.0
            for row, per_channel in ((3, d_b), (4, v), (6, w), (7, b)):
                coef[row].reshape(N, C)[...] = per_channel
            coef[5] = d_i.reshape(-1)
            coef[8] = m.reshape(-1)

        # f = x / max(p, q x + r) with p = d_B (per channel), q = v, r = d_I (per plane); per
        # plane the sums D = dy, F = dy*f, E_p, E_q, E_r = dy*df/dp, dq, dr. Then
        # dx = w g + k_I (x - mu_I) + k_B (x - mu_B), k_I = w E_r/(S d_I),
        # k_B = w sum_n E_p/(N S d_B) (batch statistics only); dv = sum w E_q, dweight = sum F.
        def fold(sums: _F64) -> tuple[_F64, _F64, _F64, _Grads]:
            D, F, Ep, Eq, Er = (sums[i].reshape(N, C) for i in (0, 1, 4, 5, 6))
            k_i = w * Er / (S * d_i)
            k_b = w * Ep.sum(axis=0) / (N * S * d_b) if batch else np.zeros(C)
            c3 = (k_b * (m - mu_b)).reshape(-1)  # k_B (x - mu_B) = k_B (x - mu_I) + k_B (mu_I - mu_B)
            grads = self._grads(F.sum(axis=0), D.sum(axis=0), (w * Eq).sum(axis=0))
            return w, (k_i + k_b).reshape(-1), c3, grads  # c1 = w per channel (the core broadcasts)

        if not batch and x.size:  # y already written
            saved = PointwiseSaved(plan, op, x, coef, fold, x.shape)
        else:
            y, saved = self._run(plan, op, x, coef, fold)
        if self.training and x.size:
            _engine.running_update(self.running_var, unbiased(var_b, N * S), self.momentum)
        return y, saved

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class EvoNormS0_2d(_EvoNorm):
    """EvoNorm-S0 (Liu et al., "Evolving Normalization-Activation Layers", arXiv 2004.02967), as
    timm's EvoNorm2dS0: batch-independent,

        y = x sigmoid(v x) / sqrt(var_G + eps) * weight + bias,

    var_G the biased variance of each sample's group of C/groups channels over (C/G, H, W)
    (groups of one channel allowed). No running statistics.
    """

    def __init__(self, num_features: int, groups: int = 32, eps: float = 1e-5,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self.groups = _checks.positive_int(groups, "groups")
        _checks.divisor(self.groups, _checks.positive_int(num_features, "num_features"), "groups", "num_features")
        self._evo_setup(num_features, eps, dtype)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], FusedPointwiseSaved]:
        x, (N, C, S) = self._input(x)
        G, cpg = self.groups, C // self.groups
        w, b, v = self._params()
        # the statistics plan (each sample's groups) and the cells' (the planes)
        stats, plan = self._shape_plans((N, C, S), lambda: (_core.plan_per_sample_group(N, C, S, G),
                                                            _core.plan_per_channel_in_sets(N, C, S, list(range(N)))))
        op = int(_core.Pointwise.swish_gate)
        # Per sample group the mean and variance, then per cell u = x, p = v, scale = w r,
        # offset = b, center = the group's mean (the backward's x - mu), r = 1/sqrt(var + eps):
        # one core call, a group's output right after its statistics where a group is one chunk.
        channel = np.zeros((9, C))
        channel[1], channel[3], channel[6], channel[7] = 1.0, v, w, b
        coef = np.empty((9, N * C))
        y = _core.empty_like(x)
        var = _core.normalize_pointwise(stats, op, x, self.eps, False, False, True, channel, y, coef)[1]

        eps = self.eps  # this forward's, should the layer's change before the backward

        # r per (n, c), at the backward only, once: an inference forward never needs it
        rstd: Deferred[_F64] = Deferred(lambda: np.repeat((1.0 / np.sqrt(var + eps)).reshape(N, G), cpg, axis=1))

        # y = h(x) w/std + b with h = x sigmoid(v x); per plane D = dy, F = dy*h, E_p = dy*dh/dv.
        # std depends on x: dL/dstd = -sum_{group} w F / std^2, dstd/dx = (x - mu)/(M std), M = cpg*S:
        # dx = (w/std) g + dL/dstd/(M std) (x - mu), a fold local to each sample's group of cpg
        # planes: c2 = k2 . sums over the group with k2 = -w r^3/M on F (the core's one-pass
        # backward); dweight = sum F r, dv = sum (w r) E_p.
        def fold() -> tuple[_F64, float, float, int, _F64, None]:
            r = rstd()
            k2 = self._sum_weights(N * C, 1, -w * r ** 2 * r / (cpg * S))
            return coef[6], 0.0, 0.0, cpg, k2, None

        def grads_of(sums: _F64) -> _Grads:
            D, F, Ep = (sums[i].reshape(N, C) for i in (0, 1, 4))
            scale = coef[6].reshape(N, C)  # w r
            return self._grads((F * rstd()).sum(axis=0), D.sum(axis=0), (scale * Ep).sum(axis=0))

        return y, FusedPointwiseSaved(plan, op, x, coef, fold, grads_of, x.shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"
