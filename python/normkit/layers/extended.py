"""ExtendedBatchNorm2d: one variance for the whole layer (EBN)."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import StepSaved, VariantLayer, running_factor, unbiased


class ExtendedBatchNorm2d(VariantLayer):
    """Extended batch normalization (Luo et al., "Extended Batch Normalization", arXiv 2003.05569).

    The mean is BatchNorm's, per channel over (N, H, W); the variance is one value for the whole
    layer, the mean over (N, C, H, W) of the squared deviations from each channel's mean (= the
    mean over channels of BatchNorm's biased per-channel variances), so that a small batch
    estimates it from C times more values:

        mu_c = mean_{n,h,w} x,   sigma2 = mean_{n,c,h,w} (x - mu_c)^2,
        y = weight_c (x - mu_c) / sqrt(sigma2 + eps) + bias_c.

    running_mean has shape (C,), running_var (1,), updated as torch's BatchNorm (momentum, or a
    cumulative average for momentum=None) with the unbiased sigma2 * M/(M - 1), M = N*C*H*W.
    Inference uses them; track_running_stats=False uses batch statistics in eval too. The
    backward couples the channels through sigma2 (docs/extended_batch_norm.md).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__()
        self._setup(num_features, eps, affine, dtype, layout)
        self._running_stats(momentum, track_running_stats, self.num_features, 1)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], StepSaved]:
        x, (N, C, S) = self._input(x)
        plan = self._plan(_core.plan_per_channel(N, C, S))
        w, b = self._channel_params()
        if not (self._batch_stats() or self.running_mean is None):
            assert self.running_var is not None  # registered with running_mean
            mean = self.running_mean.astype(np.float64)
            r = 1.0 / np.sqrt(float(self.running_var[0]) + self.eps)
            running_fold = lambda B, A: (r * w, 0.0, 0.0, self._param_grads(r * A, B))
            return (self._apply(plan, x, mean, r * w, b),
                    StepSaved(plan, x, mean, running_fold, x.shape))
        if self.training:
            _checks.more_than_one_value(N * S, "channel", x.shape)
        if x.size == 0:
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(C), None, x.shape)
        mean, var = _core.group_moments(plan, x)  # per channel, biased
        M, Mc = N * C * S, N * S
        sigma2 = float(np.mean(var))  # every channel holds Mc values: the pooled biased variance
        r = 1.0 / np.sqrt(sigma2 + self.eps)

        # dx = r w dy - r w B_c/Mc - r^3 (x - mu_c) sum_c' w A_c' / M: the one variance's term
        # sums over every channel (tests/reference.py: extended_batch_norm_backward).
        def fold(B: npt.NDArray[np.float64], A: npt.NDArray[np.float64]
                 ) -> tuple[npt.NDArray[np.float64], float, npt.NDArray[np.float64],
                            dict[str, npt.NDArray[Any]]]:
            return r * w, -r ** 2 * r * np.dot(w, A) / M, -r * w * B / Mc, self._param_grads(r * A, B)

        y = self._apply(plan, x, mean, r * w, b)
        if self.training and self.track_running_stats:
            assert (self.running_mean is not None and self.running_var is not None
                    and self.num_batches_tracked is not None)  # registered with tracking
            factor = running_factor(self)
            _engine.running_update(self.running_mean, mean, factor)
            _engine.running_update(self.running_var, unbiased(np.array([sigma2]), M), factor)
            self.num_batches_tracked += 1
        return y, StepSaved(plan, x, mean, fold, x.shape)

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """normkit.inference_affine's (scale, shift): the one running variance for every channel,
        y = weight_c (x - running_mean_c) / sqrt(running_var[0] + eps) + bias_c."""
        # inference_affine calls this only on a layer with running statistics.
        assert self.running_mean is not None and self.running_var is not None
        w, b = self._channel_params()
        scale = w / np.sqrt(float(self.running_var[0]) + self.eps)
        return scale, b - self.running_mean.astype(np.float64) * scale

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")

