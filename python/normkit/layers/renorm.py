"""BatchRenorm2d: batch renormalization (Ioffe 2017), and its r_max/d_max schedule."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import FusedSaved, StepSaved, VariantLayer, checked_attribute


def renorm_schedule(step: int) -> tuple[float, float]:
    """The paper's (r_max, d_max) at training step `step` (arXiv 1702.03275, section 4):
    (1, 0) for the first 5000 steps (plain BatchNorm), then linear ramps reaching r_max = 3 at
    step 40000 and d_max = 5 at step 25000, constant after."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step: expected an integer, got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    ramp: Callable[[int], float] = lambda end: min(max((int(step) - 5000) / (end - 5000), 0.0), 1.0)
    return 1.0 + 2.0 * ramp(40000), 5.0 * ramp(25000)


class BatchRenorm2d(VariantLayer):
    """Batch renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", arXiv 1702.03275), as the paper's Algorithm 1.

    Training, with the batch's mu_B and sigma_B = sqrt(var_B + eps) (biased) and the running mean
    mu and standard deviation sigma before this step's update:

        r = clip(sigma_B / sigma, 1/r_max, r_max),  d = clip((mu_B - mu) / sigma, -d_max, d_max),
        y = weight ((x - mu_B) / sigma_B * r + d) + bias,

    r and d constants in the backward; then mu += momentum (mu_B - mu) and
    sigma += momentum (sigma_B - sigma): the paper averages sigma, not sigma^2, so the buffers are
    running_mean and running_std (starting at 0 and 1). Inference: weight (x - mu)/sigma + bias.
    r_max and d_max are plain attributes (normkit.renorm_schedule(step) gives the paper's); with
    r_max = 1 and d_max = 0 the layer is BatchNorm2d.
    """

    momentum: float  # never None (no cumulative average)
    # Buffers registered by name (always: the layer has no track_running_stats).
    running_mean: npt.NDArray[Any]
    running_std: npt.NDArray[Any]
    num_batches_tracked: npt.NDArray[np.int64]

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01,
                 r_max: float = 3.0, d_max: float = 5.0, affine: bool = True,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__()
        self._setup(num_features, eps, affine, dtype, layout)
        self.momentum = _checks.momentum_value(momentum, allow_none=False)
        self.r_max, self.d_max = r_max, d_max
        C = self.num_features
        self._buffer("running_mean", np.zeros(C, self.dtype))
        self._buffer("running_std", np.ones(C, self.dtype))
        self._buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        # After eval(): normalize with the batch's own statistics, leaving the running ones alone.
        self.use_batch_stats = False

    r_max = checked_attribute("r_max", lambda v, name: _checks.number_at_least(v, name, 1.0))
    d_max = checked_attribute("d_max", lambda v, name: _checks.number_at_least(v, name, 0.0))

    def reset_running_stats(self) -> None:
        self.running_mean.fill(0)
        self.running_std.fill(1)
        self.num_batches_tracked[...] = 0

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], StepSaved | FusedSaved]:
        x, (N, C, S) = self._input(x)
        plan = self._plan(_core.plan_per_channel(N, C, S))
        w, b = self._channel_params()
        mu, sigma = self.running_mean.astype(np.float64), self.running_std.astype(np.float64)
        if not self._batch_stats():
            fold = lambda B, A: (w / sigma, 0.0, 0.0, self._param_grads(A / sigma, B))
            return self._apply(plan, x, mu, w / sigma, b), StepSaved(plan, x, mu, fold, x.shape)
        if self.training:
            _checks.more_than_one_value(N * S, "channel", x.shape)
        if x.size == 0:
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(C), None, x.shape)
        mean, var = _core.group_moments(plan, x)
        sigma_b = np.sqrt(var + self.eps)
        if self.training:
            r = np.clip(sigma_b / sigma, 1.0 / self.r_max, self.r_max)
            d = np.clip((mean - mu) / sigma, -self.d_max, self.d_max)
        else:  # use_batch_stats in eval: the batch's own statistics, no correction
            r, d = np.ones(C), np.zeros(C)
        y = self._apply(plan, x, mean, w * r / sigma_b, w * d + b)
        # With r and d constant, y = (weight r) xhat_B + (weight d + bias): BatchNorm's backward
        # with the weight (weight r), fused; dweight = sum dy (r xhat_B + d) = r dw' + d db.
        w_eff = (w * r).astype(self.dtype)
        saved = self._fused_saved(plan, x, mean, 1.0 / sigma_b, w_eff,
                                  lambda dw, db: {} if dw is None or db is None  # both or neither
                                  else self._param_grads(r * dw + d * db, db))
        if self.training:
            _engine.running_update(self.running_mean, mean, self.momentum)
            _engine.running_update(self.running_std, sigma_b, self.momentum)
            self.num_batches_tracked += 1
        return y, saved

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """normkit.inference_affine's (scale, shift): y = weight (x - running_mean) / running_std
        + bias (no eps: sigma_B carried it into running_std)."""
        w, b = self._channel_params()
        scale = w / self.running_std.astype(np.float64)
        return scale, b - self.running_mean.astype(np.float64) * scale

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}, affine={self.affine}")
