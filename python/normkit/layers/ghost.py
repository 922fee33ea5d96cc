"""GhostBatchNorm2d: ghost batches, BN+GN mixing, and inference example weighing."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import (FusedSaved, StepSaved, VariantLayer, checked_attribute, pool,
                       running_factor, unbiased)

# The forward's small reshaping helpers (lambdas over float64 arrays).
_ArrayMap = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]


class GhostBatchNorm2d(VariantLayer):
    """Ghost batch normalization with the BN+GN combination and inference example weighing
    (Summers and Dinneen, "Four Things Everyone Should Know to Improve Batch Normalization",
    arXiv 1906.03548).

    Training: the batch is cut into consecutive ghost batches of `ghost_batch_size` examples (the
    last may be smaller); each ghost batch is normalized with its own statistics (mean, biased
    variance) per group of `channels_per_group` channels over (examples, group channels, H, W),
    then the per-channel affine. channels_per_group=1 is ghost BN; more is the paper's BN+GN
    combination for very small batches. running_mean and running_var (C,) follow torch's
    BatchNorm from the whole batch (mean, unbiased variance), one update per forward.

    Inference with example weighing, alpha = example_weight (a plain attribute, tunable after
    training): per sample i and channel group, with population moments P1 = mean of
    running_mean, P2 = mean of (running_var + running_mean^2) over the group's channels and the
    sample's own E1_i, E2_i = mean of x and of x^2 over the group's channels and (H, W):

        mu_i = (1 - alpha) P1 + alpha E1_i,  var_i = max(0, (1 - alpha) P2 + alpha E2_i - mu_i^2),
        y = weight (x - mu_i) / sqrt(var_i + eps) + bias.

    alpha = 0 with channels_per_group = 1 is BatchNorm's inference. The backward in inference is
    exact (through E1_i and E2_i when alpha > 0).
    """

    def __init__(self, num_features: int, ghost_batch_size: int, channels_per_group: int = 1,
                 example_weight: float = 0.0, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__()
        self.ghost_batch_size = _checks.positive_int(ghost_batch_size, "ghost_batch_size")
        self.channels_per_group = _checks.positive_int(channels_per_group, "channels_per_group")
        C = _checks.positive_int(num_features, "num_features")
        _checks.divisor(self.channels_per_group, C, "channels_per_group", "num_features")
        self.example_weight = example_weight
        self._setup(C, eps, affine, dtype, layout)
        self._running_stats(momentum, track_running_stats, C, C)

    example_weight = checked_attribute("example_weight", lambda v, name: _checks.number_in(v, name, 0.0, 1.0))

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], StepSaved | FusedSaved]:
        x, (N, C, S) = self._input(x)
        if self._batch_stats() or self.running_mean is None:
            return self._ghost_batches(x, N, C, S)
        return self._weighted_inference(x, N, C, S)

    def _ghost_batches(self, x: npt.NDArray[Any], N: int, C: int, S: int
                       ) -> tuple[npt.NDArray[Any], StepSaved | FusedSaved]:
        cpg, gbs = self.channels_per_group, self.ghost_batch_size
        sets = [n // gbs for n in range(N)]
        if N:  # examples per ghost batch, (sets, 1): full ones, and the last
            sizes = np.full((sets[-1] + 1, 1), gbs)
            sizes[-1] = N - gbs * sets[-1]
        else:
            sizes = np.zeros((1, 1), np.intp)
        if self.training and N and sizes.min() * cpg * S == 1:
            raise ValueError(f"input: expected more than 1 value per (ghost batch, channel group) when "
                             f"training, got a ghost batch of {sizes.min()} example(s) in input of shape "
                             f"{x.shape} with channels_per_group={cpg}")
        plan = self._plan(_core.plan_per_channel_in_sets(N, C, S, sets, cpg))
        if x.size == 0:
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(C), None, x.shape)
        if cpg == 1:
            # Cells are the groups: the standard fused forward over the plan.
            y = _core.empty_like(x)
            mean, var, rstd = _core.normalize_batch_stats(plan, x, self.eps, self.weight, self.bias, y)
            cell_mean, cell_var = mean.reshape(-1, C), var.reshape(-1, C)
        else:
            # Per (ghost batch, channel) cells, pooled into the channel groups: the running
            # statistics need the channels' own moments, which the groups' do not give.
            cells = self._plan(_core.plan_per_channel_in_sets(N, C, S, sets))
            cell_mean, cell_var = (a.reshape(-1, C) for a in _core.group_moments(cells, x))
            grouped: _ArrayMap = lambda a: a.reshape(a.shape[0], C // cpg, cpg)
            mean, var = pool(1, grouped(cell_mean), grouped(cell_var), 2)  # (sets, C/cpg)
            rstd = 1.0 / np.sqrt(var + self.eps)
            w, b = self._channel_params()
            expand: _ArrayMap = lambda a: np.repeat(a, cpg, axis=1)  # per cell
            y = self._apply(cells, x, expand(mean), expand(rstd) * w, b)
        saved = self._fused_saved(plan, x, mean, rstd, self.weight, self._param_grads)
        if self.training and self.track_running_stats:
            assert (self.running_mean is not None and self.running_var is not None
                    and self.num_batches_tracked is not None)  # registered with tracking
            # The whole batch's per-channel statistics, pooled from the ghost batches' cells.
            bmean, bvar = pool(sizes * S, cell_mean, cell_var, 0)
            factor = running_factor(self)
            _engine.running_update(self.running_mean, bmean, factor)
            _engine.running_update(self.running_var, unbiased(bvar, N * S), factor)
            self.num_batches_tracked += 1
        return y, saved

    def _weighted_inference(self, x: npt.NDArray[Any], N: int, C: int, S: int
                            ) -> tuple[npt.NDArray[Any], StepSaved]:
        cpg, alpha = self.channels_per_group, self.example_weight
        assert self.running_mean is not None and self.running_var is not None  # see _forward
        rm = self.running_mean.astype(np.float64)
        rv = self.running_var.astype(np.float64)
        w, b = self._channel_params()
        # over a group's channels (a channel's own value, exactly, for groups of one channel)
        group_mean: _ArrayMap = ((lambda a: a) if cpg == 1 else
                                 lambda a: a.reshape(a.shape[:-1] + (C // cpg, cpg)).mean(axis=-1))
        expand: _ArrayMap = (lambda a: a) if cpg == 1 else lambda a: np.repeat(a, cpg, axis=-1)  # per channel
        if alpha == 0.0 and cpg == 1:
            mu, var = rm, rv  # BatchNorm's inference
        else:
            P1, P2 = group_mean(rm), group_mean(rv + rm ** 2)  # the population's moments
        if alpha == 0.0:
            # The population's moments alone: a per-channel affine, one pass.
            plan = self._plan(_core.plan_per_channel(N, C, S))
            if cpg > 1:
                mu, var = expand(P1), expand(np.maximum(P2 - P1 ** 2, 0.0))
            r = 1.0 / np.sqrt(var + self.eps)
            running_fold = lambda B, A: (r * w, 0.0, 0.0, self._param_grads(r * A, B))
            return self._apply(plan, x, mu, r * w, b), StepSaved(plan, x, mu, running_fold, x.shape)
        # Each sample's own moments per (sample, channel) cell, pooled into its channel groups.
        plan = self._plan(_core.plan_per_channel_in_sets(N, C, S, list(range(N))))
        if x.size == 0:
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(N * C), None, x.shape)
        m, v = (a.reshape(N, C) for a in _core.group_moments(plan, x))
        E1, E2 = group_mean(m), group_mean(v + m ** 2)  # (N, C/cpg)
        mu = (1 - alpha) * P1 + alpha * E1
        raw = (1 - alpha) * P2 + alpha * E2 - mu ** 2
        clamped = raw < 0
        rs = 1.0 / np.sqrt(np.where(clamped, 0.0, raw) + self.eps)
        M = cpg * S
        cell_mu, cell_rs = expand(mu), expand(rs)  # (N, C)

        # dx = rs w dy + c2 (x - mu) + c3 with, per (sample, group), Aw = sum w A, Bw = sum w B:
        #   c2 = -alpha rs^3 Aw / M (0 where var_i is clamped), c3 = -alpha rs Bw / M
        # (docs/ghost_batch_norm.md; tests/reference.py: ghost_batch_norm_eval_backward).
        def fold(B: npt.NDArray[np.float64], A: npt.NDArray[np.float64]
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                            npt.NDArray[np.float64], dict[str, npt.NDArray[Any]]]:
            A, B = A.reshape(N, C), B.reshape(N, C)
            Aw, Bw = (group_mean(w * A) * cpg, group_mean(w * B) * cpg) if cpg > 1 else (w * A, w * B)
            c2 = np.where(clamped, 0.0, -alpha * rs ** 2 * rs * Aw / M)
            c3 = -alpha * rs * Bw / M
            return (cell_rs * w, expand(c2), expand(c3),
                    self._param_grads((cell_rs * A).sum(axis=0), B.sum(axis=0)))

        y = self._apply(plan, x, cell_mu, cell_rs * w, b)
        return y, StepSaved(plan, x, cell_mu.reshape(-1), fold, x.shape)

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """normkit.inference_affine's (scale, shift): with example_weight = 0 the population's
        moments alone, per channel group P1 = mean of running_mean, P2 = mean of (running_var +
        running_mean^2), mu = P1, var = max(P2 - P1^2, 0) (running_mean, running_var themselves
        with channels_per_group = 1): y = weight (x - mu) / sqrt(var + eps) + bias."""
        if self.example_weight != 0.0:
            raise TypeError(f"layer: GhostBatchNorm2d has no per-channel affine inference: "
                            f"example_weight={self.example_weight} > 0 mixes in each sample's own moments")
        cpg, C = self.channels_per_group, self.num_features
        # inference_affine calls this only on a layer with running statistics.
        assert self.running_mean is not None and self.running_var is not None
        rm, rv = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
        if cpg > 1:
            P1 = rm.reshape(C // cpg, cpg).mean(axis=1)
            P2 = (rv + rm ** 2).reshape(C // cpg, cpg).mean(axis=1)
            rm, rv = np.repeat(P1, cpg), np.repeat(np.maximum(P2 - P1 ** 2, 0.0), cpg)
        w, b = self._channel_params()
        scale = w / np.sqrt(rv + self.eps)
        return scale, b - rm * scale

    def extra_repr(self) -> str:
        return (f"{self.num_features}, ghost_batch_size={self.ghost_batch_size}, "
                f"channels_per_group={self.channels_per_group}, example_weight={self.example_weight}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
