"""FilterResponseNorm2d: filter response normalization with the thresholded linear unit (FRN+TLU)."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import _F64, Deferred, FusedPointwiseSaved, VariantLayer


class FilterResponseNorm2d(VariantLayer):
    """Filter response normalization with a thresholded linear unit (Singh and Krishnan, "Filter
    Response Normalization Layer", arXiv 1911.09737). Batch-independent: per (n, c), with no mean
    subtraction,

        nu2 = mean_{h,w} x^2,  x_hat = x / sqrt(nu2 + eps_total),  y = weight x_hat + bias,
        z = max(y, tau)   (tlu=True; at y == tau the gradient goes to tau),

    eps_total = eps, or eps + |eps_l| with a learnable eps_l of shape (1,) (init 1e-4) when
    learnable_eps (the paper's choice for (N, C) input, whose spatial size is 1). tau, weight and
    bias are per channel (init 0, 1, 0). No running statistics: training and inference are the
    same. Input (N, C) or (N, C, *spatial), NCHW.
    """

    weight: npt.NDArray[Any]  # always affine
    bias: npt.NDArray[Any]
    tau: npt.NDArray[Any] | None  # with tlu
    eps_l: npt.NDArray[Any] | None  # with learnable_eps

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False,
                 tlu: bool = True, dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self._setup(num_features, eps, True, dtype, "NCHW")
        self.learnable_eps, self.tlu = bool(learnable_eps), bool(tlu)
        self._param("tau", np.zeros(self.num_features, self.dtype) if self.tlu else None)
        self._param("eps_l", np.full(1, 1e-4, self.dtype) if self.learnable_eps else None)

    def _input(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], tuple[int, int, int]]:
        _checks.layer_input(x, self.dtype, min_ndim=2, channels=self.num_features,
                            ranks=" (N, C) or (N, C, *spatial)")
        xc = _checks.contiguous(x)
        return xc, _engine.planes(xc)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], FusedPointwiseSaved]:
        x, (N, C, S) = self._input(x)
        eps_l = 0.0 if self.eps_l is None else float(self.eps_l[0])
        eps_total = self.eps + abs(eps_l)
        # the statistics plan (each plane a group) and the cells' (the planes)
        stats, plan = self._shape_plans((N, C, S), lambda: (_core.plan_per_sample_group(N, C, S, C),
                                                            _core.plan_per_channel_in_sets(N, C, S, list(range(N)))))
        w, b = self._channel_params()
        op = int(_core.Pointwise.tlu if self.tlu else _core.Pointwise.identity)
        # nu2 per (n, c) (a skip_mean statistic of each plane, a group of one channel), then the
        # TLU with per-cell coefficients a = weight r, b = bias, p = tau, r = 1/sqrt(nu2 + eps):
        # one core call, each 14x14 plane's output right after its statistics.
        channel = np.zeros((9, C))
        channel[1], channel[2], channel[6] = w, b, 1.0
        if self.tau is not None:
            channel[3] = self.tau
        coef = np.empty((9, N * C))
        y = _core.empty_like(x)
        nu2 = _core.normalize_pointwise(stats, op, x, eps_total, True, False, False, channel, y, coef)[1]

        # With g = dy*f'(y) per element and A = sum g*x per plane (center 0):
        # dx = weight r g - weight r^3 A x / S  (r depends on x through nu2), a fold local to
        # each plane: c2 = k2 . sums with k2 = -weight r^3 / S on A, the core's one-pass backward.
        # dweight = sum r A, dbias = sum g, dtau = sum dy [y <= tau], deps_l = sum weight A (-r^3/2) sign(eps_l)
        # r at the backward only, once: an inference forward never needs it
        rstd: Deferred[_F64] = Deferred(lambda: (1.0 / np.sqrt(nu2 + eps_total)).reshape(N, C))

        def fold() -> tuple[_F64, float, float, int, _F64, None]:
            rr = rstd()
            k2 = self._sum_weights(N * C, 3, -w * rr ** 2 * rr / S)
            return coef[1], 0.0, 0.0, 1, k2, None

        def grads_of(sums: npt.NDArray[np.float64]) -> dict[str, npt.NDArray[Any]]:
            rr = rstd()
            G, A, T = (sums[i].reshape(N, C) for i in (2, 3, 4))
            grads = self._param_grads((rr * A).sum(axis=0), G.sum(axis=0))
            if self.tau is not None:
                grads["tau"] = T.sum(axis=0).astype(self.dtype)
            if self.eps_l is not None:
                grads["eps_l"] = np.array([np.sum(w * A * -0.5 * rr ** 2 * rr) * np.sign(eps_l)], self.dtype)
            return grads

        return y, FusedPointwiseSaved(plan, op, x, coef, fold, grads_of, x.shape)

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        dx = super().backward(dy)
        if self._saved.x.size == 0:  # no elements: zero gradients for tau and eps_l too
            self.grads.update({n: np.zeros_like(p) for n, p in self.parameters().items() if n not in self.grads})
        return dx

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}, tlu={self.tlu}"
