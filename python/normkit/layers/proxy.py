"""ProxyNorm2d: proxy normalization of an activation (Labatie et al.)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core
from ._variant import FusedPointwiseSaved, VariantLayer, pointwise_coefficients

ACTIVATIONS = ("relu", "silu", "gelu", "identity")
_ERF = np.frompyfunc(math.erf, 1, 1)
_F64 = npt.NDArray[np.float64]


def _phi_at_proxy_points(op: int, g: _F64, b: _F64, Y: _F64) -> tuple[_F64, _F64]:
    """(phi(g Y + b), phi'(g Y + b)) over the (C, K) proxy points, float64, by the core's pointwise
    kernels (the erf of GELU, vectorized, where math.erf per point cost milliseconds)."""
    C, K = Y.shape
    plan = _core.plan_per_channel(1, C, K)
    coef = pointwise_coefficients(C, a=g, b=b)
    Z, dZ = np.empty_like(Y), np.empty_like(Y)
    _core.apply_pointwise(plan, op, Y, coef, Z)
    _core.pointwise_backward(plan, op, Y, np.ones_like(Y), coef, 1.0, 0.0, 0.0, dZ)  # f'(u)
    return Z, dZ


def _erfinv(y: npt.ArrayLike) -> _F64:
    """erfinv to double precision: Newton's method on math.erf (a few hundred values, once)."""
    y = np.asarray(y, np.float64)
    x: _F64 = np.sign(y) * np.sqrt(-np.log1p(-y * y))  # a start within the basin of convergence
    for _ in range(60):
        e = np.asarray(_ERF(x), np.float64) - y  # (frompyfunc gives an object array)
        x = x - e / (2.0 / math.sqrt(math.pi) * np.exp(-x * x))
    return x


def proxy_points(num_points: int) -> _F64:
    """U_k = sqrt(2) erfinv(2 (k + 1/2)/K - 1): K quantiles of the standard normal."""
    k = np.arange(num_points)
    return math.sqrt(2.0) * _erfinv(2.0 * (k + 0.5) / num_points - 1.0)


class ProxyNorm2d(VariantLayer):
    """Proxy normalization (Labatie et al., "Proxy-Normalizing Activations to Match Batch
    Normalization while Removing Batch Dependence", arXiv 2106.03743), placed after a
    normalization without affine (GroupNorm or LayerNorm with affine=False). Per channel:

        z = phi(weight x + bias),  z_hat = (z - mu_p) / sqrt(v_p + eps),

    mu_p, v_p (biased) the mean and variance of phi(weight Y_k + bias) over the proxy points
    Y_k = proxy_bias + (1 + proxy_weight) U_k, U_k = sqrt(2) erfinv(2 (k + 1/2)/K - 1),
    k < K = num_points: a Gaussian proxy of the pre-activation, so that z_hat is normalized
    without any batch statistics. phi: "relu", "silu", "gelu" (erf form) or "identity". The
    backward differentiates through mu_p and v_p into all four parameters (weight, bias init 1,
    0; proxy_weight, proxy_bias init 0). Training and inference are the same.
    """

    weight: npt.NDArray[Any]  # always affine
    bias: npt.NDArray[Any]
    proxy_weight: npt.NDArray[Any]
    proxy_bias: npt.NDArray[Any]
    # The last _proxy_moments: its key (op, eps and the parameters' bytes) and (Y, dZ, mu, dev, r).
    _proxy_key: tuple[int, float, bytes, bytes, bytes, bytes]
    _proxy: tuple[_F64, _F64, _F64, _F64, _F64]
    # The last _step: its key (op, eps, num_points, the parameters' dtypes and bytes) and values.
    _step_key: tuple[object, ...] | None
    _step_cache: tuple[_F64, _F64, _F64, _F64, _F64, _F64]

    def __init__(self, num_features: int, activation: str = "relu", eps: float = 0.03,
                 num_points: int = 200, dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        self.activation = activation
        self.num_points = _checks.positive_int(num_points, "num_points")
        self._setup(num_features, eps, True, dtype, "NCHW")
        C = self.num_features
        self._param("proxy_weight", np.zeros(C, self.dtype))
        self._param("proxy_bias", np.zeros(C, self.dtype))
        self._U = proxy_points(self.num_points)
        self._step_key = None

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], FusedPointwiseSaved]:
        x, (N, C, S) = self._input(x)
        op = int(getattr(_core.Pointwise, self.activation))
        g, mu, r, P, coef, c1 = self._step(op)
        plan = self._shape_plans((N, C, S), lambda: _core.plan_per_channel(N, C, S))  # cells: the channels
        dtype = self.dtype

        # y = (phi(u) - mu) r with u = g x + b. Per channel D = sum dy, F = sum dy*phi(u),
        # Gs = sum dy*phi'(u), A = sum dy*phi'(u)*x. dx = r g dy phi'(u). Directly: dg = r A,
        # db = r Gs; through mu and v = 1/r^2 - eps: dL/dmu = -r D, dL/dv = -(F - mu D) r^3/2,
        # with dmu/dt = mean_k dZ_k/dt and dv/dt = mean_k 2 (Z_k - mu) dZ_k/dt for each
        # parameter t, dZ_k/dg = phi'_k Y_k, dZ_k/db = phi'_k, dZ_k/dgp = phi'_k g U_k, dZ_k/dbp = phi'_k g.
        # Through the proxy, per parameter t with dZ_k/dt = phi'_k h_k: dmu mean_k dZ_k/dt
        # + dv mean_k 2 dev_k dZ_k/dt = sum_k W_k h_k, W_k = phi'_k (dmu + 2 dv dev_k)/K,
        # = dmu P0[h] + 2 dv P1[h] with the proxy sums P (_step) for h = 1, Y_k, U_k: O(C) here.
        def grads_of(sums: _F64) -> dict[str, npt.NDArray[Any]]:
            D, F, Gs, A = sums[0], sums[1], sums[2], sums[3]
            dmu, dv = -r * D, -(F - mu * D) * r ** 2 * r / 2
            Wsum, WY, WU = dmu * P[0] + (2 * dv) * P[1]
            return {"weight": (r * A + WY).astype(dtype), "bias": (r * Gs + Wsum).astype(dtype),
                    "proxy_weight": (g * WU).astype(dtype), "proxy_bias": (g * Wsum).astype(dtype)}

        # dx = r g phi'(u) dy needs no sums: the core's one-pass backward (sums for the parameters)
        y = _core.empty_like(x)
        if x.size:
            _core.apply_pointwise(plan, op, x, coef, y)
        return y, FusedPointwiseSaved(plan, op, x, coef, (c1, 0.0, 0.0, 1, None, None), grads_of, x.shape)

    def _step(self, op: int) -> tuple[_F64, _F64, _F64, _F64, _F64, _F64]:
        """(g, mu, r, P, coef, c1 = r g) of a forward: the float64 weight, the proxy moments
        (_proxy_moments), the proxy sums P (2, 3, C), P[0] = sum_k dZ_k h_k/K and P[1] = sum_k
        dZ_k dev_k h_k/K for h = 1, Y, U, and the (9, C) pointwise coefficients; kept while the
        parameters' bytes, eps, the activation and num_points stay as they were."""
        w, bi, pw, pb = self.weight, self.bias, self.proxy_weight, self.proxy_bias
        key = (op, self.eps, self.num_points, w.dtype.str, bi.dtype.str, pw.dtype.str, pb.dtype.str,
               w.tobytes(), bi.tobytes(), pw.tobytes(), pb.tobytes())
        if self._step_key != key:
            g, b = self._channel_params()
            gp, bp = pw.astype(np.float64), pb.astype(np.float64)
            Y, dZ, mu, dev, r = self._proxy_moments(op, g, b, gp, bp)
            K = self.num_points
            P = np.empty((2, 3, self.num_features))
            for i, q in enumerate((dZ, dZ * dev)):
                P[i, 0] = q.sum(axis=1) / K
                P[i, 1] = (q * Y).sum(axis=1) / K
                P[i, 2] = (q @ self._U) / K
            coef = pointwise_coefficients(self.num_features, a=g, b=b, scale=r, offset=-mu * r)
            self._step_key, self._step_cache = key, (g, mu, r, P, coef, r * g)
        return self._step_cache

    def _inference_affine(self, modality: object) -> tuple[_F64, _F64]:
        """normkit.inference_affine's (scale, shift): with the identity activation z = weight x +
        bias, and y = (z - mu_p) r, r = 1/sqrt(v_p + eps): scale = r weight, shift = r (bias - mu_p)."""
        if self.activation != "identity":
            raise TypeError(f"layer: ProxyNorm2d has no per-channel affine inference: activation="
                            f"{self.activation!r} is not affine (only 'identity' is)")
        g, b = self._channel_params()
        gp, bp = self.proxy_weight.astype(np.float64), self.proxy_bias.astype(np.float64)
        _, _, mu, _, r = self._proxy_moments(int(_core.Pointwise.identity), g, b, gp, bp)
        return r * g, r * (b - mu)

    def _proxy_moments(self, op: int, g: _F64, b: _F64, gp: _F64, bp: _F64
                       ) -> tuple[_F64, _F64, _F64, _F64, _F64]:
        """The proxy points Y (C, K), phi' there, their mean mu, deviations and r = 1/sqrt(v_p +
        eps); kept while the four parameters, eps and the activation stay as they were (inference
        calls then skip the O(C*K) work)."""
        key = (op, self.eps, g.tobytes(), b.tobytes(), gp.tobytes(), bp.tobytes())
        if getattr(self, "_proxy_key", None) != key:
            Y = bp[:, None] + (1.0 + gp[:, None]) * self._U  # (C, K) proxy pre-activations
            Z, dZ = _phi_at_proxy_points(op, g, b, Y)
            mu = Z.mean(axis=1)
            dev = Z - mu[:, None]
            r = 1.0 / np.sqrt((dev ** 2).mean(axis=1) + self.eps)
            self._proxy_key, self._proxy = key, (Y, dZ, mu, dev, r)
        return self._proxy

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        saved: FusedPointwiseSaved | None = self._saved
        if saved is not None and saved.x.size == 0:  # the proxy terms stay: no elements, no dy
            _checks.grad_output(dy, saved.shape, saved.x.dtype)
            self.grads = {n: np.zeros_like(p) for n, p in self.parameters().items()}
            return _core.empty_like(saved.x).reshape(saved.shape)
        return super().backward(dy)

    def extra_repr(self) -> str:
        return f"{self.num_features}, activation={self.activation!r}, eps={self.eps}, num_points={self.num_points}"
