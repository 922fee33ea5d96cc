"""CrossIterationBatchNorm2d: statistics over recent iterations, compensated to the current weights (CBN)."""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import StepSaved, VariantLayer, checked_attribute, running_factor, unbiased
from .batchnorm import running_stats_affine

if TYPE_CHECKING:
    from typing_extensions import Self

_F64 = npt.NDArray[np.float64]
_Grads = dict[str, npt.NDArray[Any]]  # parameter gradients by name
# An earlier training step: (mean, sqmean, weight, dmean_dweight, dsqmean_dweight), float64.
_Step = tuple[_F64, _F64, _F64, _F64, _F64]


def _filters(a: npt.NDArray[Any], C: int, name: str, shape: tuple[int, ...] | None = None) -> _F64:
    """A float array with C rows (one filter per output channel), of `shape` when given, as
    float64 rows of the filter's fan-in (a view of `a` where it is already float64: the caller's
    array, to be read now and copied if kept)."""
    _checks.ndarray(a, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
    if a.ndim < 1 or a.shape[0] != C:
        raise ValueError(f"{name}: expected C = {C} filters along the first axis, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name}: expected the preceding layer's weight shape {shape}, got {a.shape}")
    return np.asarray(a, np.float64).reshape(C, -1)


class CrossIterationBatchNorm2d(VariantLayer):
    """Cross-Iteration Batch Normalization (Yao et al., "Cross-Iteration Batch Normalization",
    arXiv 2002.05712), the paper's formulation. A training step t takes the statistics of the
    last window - 1 steps, compensated to the current weights theta_t of the preceding layer by a
    first-order Taylor expansion (a dot product over each channel's filter):

        mu_tau(theta_t) = mu_tau + dmu_tau/dtheta . (theta_t - theta_tau),  likewise nu = E[x^2]
        mu_bar = mean over the window of mu_tau(theta_t)
        nu_bar = mean over the window of max(nu_tau(theta_t), mu_tau(theta_t)^2)
        y = weight (x - mu_bar) / sqrt(nu_bar - mu_bar^2 + eps) + bias

    The window is the current step and up to window - 1 earlier ones (fewer while fewer exist),
    or the current batch alone until `burnin` training steps have passed; window=1 is
    BatchNorm. The backward flows through the current step's statistics only. Running
    statistics are the current batch's mean and unbiased variance, torch's rule; inference is
    BatchNorm with them.

    `layer(x, weight, dmean_dweight, dsqmean_dweight)`: the preceding layer's current weight and
    the Jacobians of this step's per-channel mean and mean square with respect to it, each of the
    weight's shape (row c: channel c's derivative w.r.t. filter c;
    normkit.conv2d_stat_jacobians gives them for a convolution). They may be left out in eval.
    """

    window = checked_attribute("window", _checks.positive_int)
    burnin = checked_attribute("burnin", _checks.nonneg_int)

    running_mean: npt.NDArray[Any]
    running_var: npt.NDArray[Any]
    num_batches_tracked: npt.NDArray[np.int64]
    _weight_shape: tuple[int, ...]  # the earlier steps' weight shape, set by a training step

    def __init__(self, num_features: int, window: int = 4, burnin: int = 0, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__()
        self._setup(num_features, eps, affine, dtype, layout)
        self.window, self.burnin = window, burnin
        self._running_stats(momentum, True, self.num_features, self.num_features)
        # Earlier training steps: (mean, sqmean, weight, dmean_dweight, dsqmean_dweight), float64
        # rows per channel, newest last. Not state_dict's (API.md): a loaded (or reset) layer
        # refills its window; num_batches_tracked counts the steps the burn-in waits for.
        self._history: deque[_Step] = deque()
        # Scratch for theta - theta_tau, kept between steps (a fresh C x fan-in array each
        # step costs more in page faults than the dot products that read it).
        self._delta: _F64 | None = None

    def reset_running_stats(self) -> None:
        self.running_mean.fill(0)
        self.running_var.fill(1)
        self.num_batches_tracked[...] = 0
        self._history.clear()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Self:
        """As NormLayer's; the window of earlier steps is emptied too (their statistics and
        weights belong to the run before the load), and refills over the next steps."""
        super().load_state_dict(state_dict, strict)
        self._history.clear()
        return self

    def forward(self, x: npt.NDArray[Any], weight: npt.NDArray[Any] | None = None,
                dmean_dweight: npt.NDArray[Any] | None = None,
                dsqmean_dweight: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        y, self._saved = self._forward(x, weight, dmean_dweight, dsqmean_dweight)
        return y

    def _window_terms(self, theta: _F64 | None) -> tuple[list[_F64], list[_F64]]:
        """The earlier steps' (mu, nu) compensated to theta, oldest first."""
        if int(self.num_batches_tracked) < self.burnin or self.window == 1:
            return [], []
        assert theta is not None  # a training step's weight, checked by _forward
        mus: list[_F64] = []
        nus: list[_F64] = []
        if self._delta is None or self._delta.shape != theta.shape:
            self._delta = np.empty_like(theta)
        delta = self._delta
        for mean, sqmean, theta_tau, dmean, dsqmean in list(self._history)[-(self.window - 1):]:
            np.subtract(theta, theta_tau, out=delta)
            mus.append(mean + np.einsum("cf,cf->c", dmean, delta))
            nus.append(sqmean + np.einsum("cf,cf->c", dsqmean, delta))
        return mus, nus

    def _forward(self, x: npt.NDArray[Any], weight: npt.NDArray[Any] | None = None,
                 dmean_dweight: npt.NDArray[Any] | None = None,
                 dsqmean_dweight: npt.NDArray[Any] | None = None
                 ) -> tuple[npt.NDArray[Any], StepSaved]:
        x, (N, C, S) = self._input(x)
        plan = self._plan(_core.plan_per_channel(N, C, S))
        w, b = self._channel_params()
        if not self._batch_stats():
            mean = self.running_mean.astype(np.float64)
            r = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            running_fold = lambda B, A: (r * w, 0.0, 0.0, self._param_grads(r * A, B))
            return (self._apply(plan, x, mean, r * w, b),
                    StepSaved(plan, x, mean, running_fold, x.shape))
        if self.training:
            theta = _filters(weight, C, "weight") if weight is not None else None
            if weight is None or theta is None or dmean_dweight is None or dsqmean_dweight is None:
                missing = [n for n, v in (("weight", weight), ("dmean_dweight", dmean_dweight),
                                          ("dsqmean_dweight", dsqmean_dweight)) if v is None]
                raise TypeError(f"{', '.join(missing)}: expected the preceding layer's weight and the two "
                                f"Jacobians in training, got None")
            dmean = _filters(dmean_dweight, C, "dmean_dweight", weight.shape)
            dsqmean = _filters(dsqmean_dweight, C, "dsqmean_dweight", weight.shape)
            if self._history and self._weight_shape != weight.shape:
                raise ValueError(f"weight: expected the shape of the earlier steps' weights "
                                 f"{self._weight_shape}, got {weight.shape}")
            _checks.more_than_one_value(N * S, "channel", x.shape)
        if x.size == 0:
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(C), None, x.shape)
        mean, var = _core.group_moments(plan, x)  # the current batch, biased
        sqmean = var + mean * mean
        mus, nus = self._window_terms(theta) if self.training else ([], [])
        n = 1 + len(mus)
        mu_bar = (mean + sum(mus)) / n
        nu_bar = (sqmean + sum(np.maximum(nu, mu * mu) for mu, nu in zip(mus, nus))) / n
        r = 1.0 / np.sqrt(nu_bar - mu_bar * mu_bar + self.eps)
        M = N * S

        # Through the current step's mean and mean square only (tests/reference.py:
        # cross_iteration_batch_norm_backward): with B = sum dy, A = sum dy (x - mu_bar),
        # dL/dvar = -r^3 w A/2, and mu_bar, nu_bar each 1/n of the current term,
        # dx = r w dy + 2 dL/dvar/(n M) (x - mu_bar) - r w B/(n M); dweight = r A, dbias = B.
        def fold(B: _F64, A: _F64) -> tuple[_F64, _F64, _F64, _Grads]:
            dvar = -0.5 * r ** 2 * r * w * A
            return r * w, 2 * dvar / (n * M), -r * w * B / (n * M), self._param_grads(r * A, B)

        y = self._apply(plan, x, mu_bar, r * w, b)
        if self.training:
            factor = running_factor(self)
            _engine.running_update(self.running_mean, mean, factor)
            _engine.running_update(self.running_var, unbiased(var, M), factor)
            self.num_batches_tracked += 1
            assert weight is not None and theta is not None  # checked above, in training
            self._store(mean, sqmean, theta, dmean, dsqmean)
            self._weight_shape = weight.shape
        return y, StepSaved(plan, x, mu_bar, fold, x.shape)

    def _store(self, mean: _F64, sqmean: _F64, theta: _F64, dmean: _F64, dsqmean: _F64) -> None:
        """This step into the window of earlier steps, with copies of its weight and Jacobians
        (the caller's arrays may change), written into the arrays of the step it pushes out of
        a full window (fresh ones of their size cost page faults every step)."""
        keep = self.window - 1
        while len(self._history) > keep:
            self._history.popleft()
        if keep == 0:
            return
        if len(self._history) == keep:
            spare = self._history.popleft()[2:]
            for dst, src in zip(spare, (theta, dmean, dsqmean)):
                np.copyto(dst, src)
            theta, dmean, dsqmean = spare
        else:
            theta, dmean, dsqmean = (np.array(a) for a in (theta, dmean, dsqmean))
        self._history.append((mean, sqmean, theta, dmean, dsqmean))

    def _inference_affine(self, modality: object) -> tuple[_F64, _F64]:
        return running_stats_affine(self)  # inference is BatchNorm's with the running statistics

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window={self.window}, burnin={self.burnin}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}")
