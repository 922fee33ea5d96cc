"""BatchKalmanNorm2d: batch statistics combined with the previous layer's estimate (BKN)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import StepSaved, VariantLayer, checked_attribute, running_factor
from .batchnorm import running_stats_affine

_F64 = npt.NDArray[np.float64]
_Grads = dict[str, npt.NDArray[Any]]  # parameter gradients by name


class BatchKalmanNorm2d(VariantLayer):
    """Batch Kalman Normalization (Wang et al., "Batch Kalman Normalization: Towards Training Deep
    Neural Networks with Micro-Batches", arXiv 1802.03133). A layer's statistics combine the
    batch's with a prediction from the previous layer's posterior (prior_mean, prior_var):

        mu_pred = A prior_mean,  var_pred = (A * A) prior_var        (A: C x prior_features)
        mu  = p mu_pred + (1 - p) mu_B
        var = p var_pred + (1 - p) var_B + p (1 - p) (mu_B - mu_pred)^2,   p = gain
        y = weight (x - mu) / sqrt(var + eps) + bias

    mu_B, var_B the batch mean and biased variance per channel; when mean_c(var_pred / var_B)
    >= 100 the prediction is discarded (mu, var = mu_B, var_B). `layer.posterior` is (mu, var)
    for the next layer; without a prior the layer is BatchNorm and its posterior (mu_B, var_B).
    The backward is exact, into x, weight, bias, A and the prior (grads["prior_mean"],
    grads["prior_var"]); `backward(dy, posterior_grad=(dmean, dvar))` adds the next layer's
    gradients with respect to this posterior, so a chain of layers is differentiated exactly.
    Running statistics: running = (1 - momentum) running + momentum posterior (no unbiased
    factor); inference is BatchNorm with them (its posterior).
    """

    gain = checked_attribute("gain", lambda v, name: _checks.number_in(v, name, 0.0, 1.0))

    A: npt.NDArray[Any]  # (C, prior_features)
    running_mean: npt.NDArray[Any]
    running_var: npt.NDArray[Any]
    num_batches_tracked: npt.NDArray[np.int64]
    posterior: tuple[_F64, _F64] | None  # (mu, var) of the last forward
    _post: tuple[float | _F64, ...]  # the backward's posterior_grad, (dmean, dvar)

    def __init__(self, num_features: int, prior_features: int | None = None, gain: float = 0.9,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__()
        self._setup(num_features, eps, affine, dtype, layout)
        C = self.num_features
        self.prior_features = C if prior_features is None else _checks.positive_int(prior_features, "prior_features")
        self.gain = gain
        self._param("A", np.eye(C, self.prior_features, dtype=self.dtype))
        self._running_stats(momentum, True, C, C)
        self.posterior = None
        self._post = (0.0, 0.0)
        self._scratch: tuple[_F64, _F64] | None = None  # _dA_scratch's

    def reset_running_stats(self) -> None:
        self.running_mean.fill(0)
        self.running_var.fill(1)
        self.num_batches_tracked[...] = 0

    def _prior(self, prior: Sequence[npt.ArrayLike] | None) -> tuple[_F64, ...] | None:
        if prior is None:
            return None
        if not isinstance(prior, (tuple, list)) or len(prior) != 2:
            raise TypeError(f"prior: expected None or a pair (mean, var), got {type(prior).__name__}")
        out: list[_F64] = []
        for part, what in zip(prior, ("mean", "var")):
            a = np.asarray(part)
            if a.dtype.kind not in "fiu":
                raise TypeError(f"prior: expected a real {what} array, got dtype {a.dtype}")
            if a.shape != (self.prior_features,):
                raise ValueError(f"prior: expected its {what} of shape ({self.prior_features},) "
                                 f"(prior_features), got {a.shape}")
            out.append(a.astype(np.float64))
        return tuple(out)

    def forward(self, x: npt.NDArray[Any], prior: Sequence[npt.ArrayLike] | None = None
                ) -> npt.NDArray[Any]:
        y, self._saved = self._forward(x, prior)
        return y

    def _forward(self, x: npt.NDArray[Any], prior: Sequence[npt.ArrayLike] | None = None
                 ) -> tuple[npt.NDArray[Any], StepSaved]:
        x, (N, C, S) = self._input(x)
        prior = self._prior(prior)
        plan = self._plan(_core.plan_per_channel(N, C, S))
        w, b = self._channel_params()
        def no_prior() -> _Grads:
            return {"A": np.zeros_like(self.A)}  # A's gradient without a prediction

        if not self._batch_stats():
            mean, var = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
            r = 1.0 / np.sqrt(var + self.eps)
            running_fold = lambda B, A_: (r * w, 0.0, 0.0, {**self._param_grads(r * A_, B),
                                                            **no_prior(),
                                                            **self._prior_grads(prior, None)})
            self.posterior = (mean, var)
            return (self._apply(plan, x, mean, r * w, b),
                    StepSaved(plan, x, mean, running_fold, x.shape))
        if self.training:
            _checks.more_than_one_value(N * S, "channel", x.shape)
        if x.size == 0:  # no statistics, so no posterior for the next layer
            self.posterior = None
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(C), None, x.shape)
        mu_b, var_b = _core.group_moments(plan, x)
        p = self.gain
        use_prior = prior is not None and self.training
        if use_prior:
            assert prior is not None  # use_prior
            A = self.A.astype(np.float64)
            AA = A * A
            mu_pred, var_pred = A @ prior[0], AA @ prior[1]
            with np.errstate(divide="ignore", invalid="ignore"):  # a constant channel: Inf or NaN, discarded
                use_prior = bool(np.mean(var_pred / var_b) < 100)  # the guard
        if use_prior:
            mu = p * mu_pred + (1 - p) * mu_b
            var = p * var_pred + (1 - p) * var_b + p * (1 - p) * (mu_b - mu_pred) ** 2
        else:
            mu, var = mu_b, var_b
        r = 1.0 / np.sqrt(var + self.eps)
        M = N * S

        # Exact backward (tests/reference.py: batch_kalman_norm_backward). With B = sum dy and
        # A_ = sum dy (x - mu): dL/dmu = -r w B, dL/dvar = -r^3 w A_/2 (plus the posterior's
        # gradient); into the batch statistics dL/dmu_B = (1-p) dL/dmu + 2p(1-p)(mu_B - mu_pred)
        # dL/dvar, dL/dvar_B = (1-p) dL/dvar, and x: dx = r w dy + dL/dmu_B/M + 2 dL/dvar_B
        # (x - mu_B)/M; into the prediction dL/dmu_pred = p dL/dmu - 2p(1-p)(mu_B - mu_pred)
        # dL/dvar, dL/dvar_pred = p dL/dvar, then A and the prior.
        def fold(B: _F64, A_: _F64) -> tuple[_F64, _F64, _F64, _Grads]:
            post = self._post  # the next layer's gradient with respect to the posterior
            dmu = -r * w * B + post[0]
            dvar = -0.5 * r ** 2 * r * w * A_ + post[1]
            grads = self._param_grads(r * A_, B)
            if use_prior:
                assert prior is not None  # use_prior
                dmu_b = (1 - p) * dmu + 2 * p * (1 - p) * (mu_b - mu_pred) * dvar
                dvar_b = (1 - p) * dvar
                dmu_pred = p * dmu - 2 * p * (1 - p) * (mu_b - mu_pred) * dvar
                dvar_pred = p * dvar
                # outer(dmu_pred, prior_mean) + 2 A outer(dvar_pred, prior_var), in scratch
                # that this backward alone uses (grads["A"] is a copy)
                dA, tmp = self._dA_scratch(A.shape)
                np.multiply(dvar_pred[:, None], prior[1][None, :], out=dA)
                np.multiply(A, 2, out=tmp)
                dA *= tmp
                np.multiply(dmu_pred[:, None], prior[0][None, :], out=tmp)
                dA += tmp
                grads["A"] = dA.astype(self.dtype)
                grads.update(self._prior_grads(prior, (A.T @ dmu_pred, AA.T @ dvar_pred)))
            else:
                dmu_b, dvar_b = dmu, dvar
                grads.update(no_prior())
                grads.update(self._prior_grads(prior, None))
            c2 = 2 * dvar_b / M
            return r * w, c2, dmu_b / M + c2 * (mu - mu_b), grads

        y = self._apply(plan, x, mu, r * w, b)
        self.posterior = (mu.copy(), var.copy())
        if self.training:
            factor = running_factor(self)
            _engine.running_update(self.running_mean, mu, factor)
            _engine.running_update(self.running_var, var, factor)
            self.num_batches_tracked += 1
        return y, StepSaved(plan, x, mu, fold, x.shape)

    def _dA_scratch(self, shape: tuple[int, ...]) -> tuple[_F64, _F64]:
        """Two float64 arrays of A's shape for the backward's gradient of A, kept between
        backwards (fresh ones of C x prior_features cost page faults every step)."""
        scratch = self._scratch
        if scratch is None or scratch[0].shape != shape:
            scratch = self._scratch = (np.empty(shape), np.empty(shape))
        return scratch

    def _inference_affine(self, modality: object) -> tuple[_F64, _F64]:
        return running_stats_affine(self)  # inference is BatchNorm's with the running statistics

    def _prior_grads(self, prior: tuple[_F64, ...] | None,
                     grads: tuple[_F64, _F64] | None) -> dict[str, _F64]:
        """grads["prior_mean"], grads["prior_var"] (float64): zeros where the prior is unused."""
        if prior is None:
            return {}
        if grads is None:
            return {"prior_mean": np.zeros(self.prior_features), "prior_var": np.zeros(self.prior_features)}
        return {"prior_mean": grads[0], "prior_var": grads[1]}

    def backward(self, dy: npt.NDArray[Any], posterior_grad: Sequence[npt.ArrayLike] | None = None
                 ) -> npt.NDArray[Any]:
        """dx of the last forward; grads gets weight, bias, A and, with a prior, prior_mean and
        prior_var. posterior_grad: (dmean, dvar) of the loss with respect to `posterior` (the
        next layer's grads["prior_mean"], grads["prior_var"]), each (C,); in inference the
        posterior is the running statistics, constants."""
        self._post = (0.0, 0.0) if posterior_grad is None else self._posterior_grad(posterior_grad)
        try:
            dx = super().backward(dy)
        finally:
            self._post = (0.0, 0.0)
        if self._saved.x.size == 0:
            self.grads["A"] = np.zeros_like(self.A)
        return dx

    def _posterior_grad(self, g: Sequence[npt.ArrayLike]) -> tuple[_F64, ...]:
        if not isinstance(g, (tuple, list)) or len(g) != 2:
            raise TypeError(f"posterior_grad: expected None or a pair (dmean, dvar), got {type(g).__name__}")
        out: list[_F64] = []
        for part, what in zip(g, ("dmean", "dvar")):
            a = np.asarray(part, np.float64)
            if a.shape != (self.num_features,):
                raise ValueError(f"posterior_grad: expected its {what} of shape ({self.num_features},), got {a.shape}")
            out.append(a)
        return tuple(out)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, prior_features={self.prior_features}, gain={self.gain}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}")

