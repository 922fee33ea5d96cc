"""ModalityBatchNorm2d: batch statistics per modality sub-batch (MBN, domain-specific BN)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from ._variant import (FusedSaved, StepSaved, VariantLayer, standard_backward_coefficients,
                       unbiased)

if TYPE_CHECKING:
    from typing_extensions import Self


class ModalityBatchNorm2d(VariantLayer):
    """Modality batch normalization (arXiv 2103.04778): `layer(x, modality)`.

    A batch mixes samples of `num_modalities` modalities (RGB and depth, two domains); each
    modality's samples are normalized with their own statistics, per (modality, channel) over the
    modality's samples and (H, W), whatever order the samples come in:

        y_n = weight (x_n - mu_{m(n),c}) / sqrt(var_{m(n),c} + eps) + bias,

    with one shared affine (weight, bias of shape (C,)) or, with separate_affine=True, one per
    modality (shape (num_modalities, C): domain-specific batch normalization). running_mean and
    running_var have shape (num_modalities, C), each row updated from its modality's samples as
    torch's BatchNorm does; a modality absent from a batch keeps its running statistics.
    Inference normalizes each sample with its own modality's running statistics. `modality` is an
    integer array of shape (N,) in [0, num_modalities), in training and in eval.
    """

    def __init__(self, num_features: int, num_modalities: int = 2, separate_affine: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype: npt.DTypeLike = np.float32,
                 layout: str = "NCHW") -> None:
        super().__init__()
        self.num_modalities = _checks.positive_int(num_modalities, "num_modalities")
        self.separate_affine = bool(separate_affine)
        M = self.num_modalities
        C = _checks.positive_int(num_features, "num_features")
        self._setup(C, eps, affine, dtype, layout, (M, C) if self.separate_affine else None)
        self._running_stats(momentum, track_running_stats, (M, C), (M, C))
        # momentum=None: each modality's cumulative average counts the batches it was in. The
        # counts are not in state_dict (its keys are API.md's); load_state_dict sets each to
        # num_batches_tracked, exact when every modality was in every batch.
        self._batches_of_modality = np.zeros(M, np.int64)

    # why: the modality is a required second input (API.md: layer(x, modality)).
    def forward(self, x: npt.NDArray[Any],  # type: ignore[override]
                modality: npt.ArrayLike) -> npt.NDArray[Any]:
        y, self._saved = self._forward(x, modality)
        return y

    def _modality(self, modality: npt.ArrayLike, N: int) -> npt.NDArray[np.int64]:
        """modality as int64 (N,) in [0, num_modalities), checked before anything changes."""
        m = np.asarray(modality) if not isinstance(modality, np.ndarray) else modality
        if m.dtype == np.bool_ or not np.issubdtype(m.dtype, np.integer):
            raise TypeError(f"modality: expected an integer array of shape ({N},), got dtype {m.dtype}")
        if m.shape != (N,):
            raise ValueError(f"modality: expected shape ({N},) (one modality per sample), got {m.shape}")
        if N and (m.min() < 0 or m.max() >= self.num_modalities):
            raise ValueError(f"modality: expected values in [0, {self.num_modalities}), got values in "
                             f"[{m.min()}, {m.max()}]")
        return m.astype(np.int64)

    # why: the modality is a required second input, as forward's.
    def _forward(self, x: npt.NDArray[Any],  # type: ignore[override]
                 modality: npt.ArrayLike) -> tuple[npt.NDArray[Any], StepSaved | FusedSaved]:
        x, (N, C, S) = self._input(x)
        mod = self._modality(modality, N)
        M = self.num_modalities
        samples = np.bincount(mod, minlength=M)  # per modality
        # Cells are (modality, channel); the plan has as many sets as the largest modality + 1.
        plan = self._plan(_core.plan_per_channel_in_sets(N, C, S, mod.tolist()))
        sets = plan.num_sample_sets
        K = sets * C
        def params() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
            """weight and bias as float64, per cell (sets, C) or shared (C,), broadcast over the sets."""
            w, b = self._channel_params()
            return (w[:sets], b[:sets]) if self.separate_affine else (w, b)

        cell_grads: Callable[[npt.NDArray[np.float64], npt.NDArray[np.float64]],
                             dict[str, npt.NDArray[Any]]] = lambda dw, db: self._param_grads(
            *((np.pad(g.reshape(sets, C), ((0, M - sets), (0, 0))) if self.separate_affine
               else g.reshape(sets, C).sum(axis=0)) for g in (dw, db)))
        if not (self._batch_stats() or self.running_mean is None):
            assert self.running_var is not None  # registered with running_mean
            w, b = params()
            mean = self.running_mean[:sets].astype(np.float64)
            r = 1.0 / np.sqrt(self.running_var[:sets].astype(np.float64) + self.eps)
            running_fold = lambda B, A: (r * w, 0.0, 0.0, cell_grads(r.reshape(-1) * A, B))
            return (self._apply(plan, x, mean, r * w, b),
                    StepSaved(plan, x, mean.reshape(-1), running_fold, x.shape))
        if self.training:
            present = samples[samples > 0]
            if present.size and present.min() * S == 1:
                raise ValueError(f"input: expected more than 1 value per (modality, channel) when "
                                 f"training, got modality {int(np.argmax((samples * S) == 1))} with "
                                 f"one value per channel in input of shape {x.shape}")
        if x.size == 0:
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(K), None, x.shape)
        saved: StepSaved | FusedSaved
        if not self.separate_affine:
            # Statistics per (modality, channel) and the shared affine: the standard fused
            # forward and backward over the plan.
            y = _core.empty_like(x)
            mean, var, rstd = _core.normalize_batch_stats(plan, x, self.eps, self.weight, self.bias, y)
            saved = self._fused_saved(plan, x, mean, rstd, self.weight, lambda dw, db: self._param_grads(dw, db))
        else:
            w, b = params()
            mean, var = (a.reshape(sets, C) for a in _core.group_moments(plan, x))
            count = (samples[:sets] * S)[:, None]
            # An absent modality's cells (NaN statistics) have no planes: zeros, not NaN, in
            # its coefficients and gradients.
            cmean = np.where(count > 0, mean, 0.0)
            rstd = np.where(count > 0, 1.0 / np.sqrt(np.where(count > 0, var, 1.0) + self.eps), 0.0)

            def fold(B: npt.NDArray[np.float64], A: npt.NDArray[np.float64]
                     ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                                npt.NDArray[np.float64], dict[str, npt.NDArray[Any]]]:
                B, A = B.reshape(sets, C), A.reshape(sets, C)
                c1, c2, c3 = standard_backward_coefficients(B, A, w, rstd, count)
                return c1, c2, c3, cell_grads(rstd * A, B)

            y = self._apply(plan, x, cmean, rstd * w, b)
            saved = StepSaved(plan, x, cmean.reshape(-1), fold, x.shape)
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None  # registered with tracking
            self._update_running(mean.reshape(-1, C), var.reshape(-1, C), samples, S)
            self.num_batches_tracked += 1
        return y, saved

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """normkit.inference_affine's (scale, shift) for one modality m (an int): inference
        normalizes m's samples with m's running statistics and affine (row m with
        separate_affine), y = weight (x - running_mean[m]) / sqrt(running_var[m] + eps) + bias."""
        M = self.num_modalities
        if modality is None or isinstance(modality, bool) or not isinstance(modality, (int, np.integer)):
            raise TypeError(f"modality: expected the int modality to fold, in [0, {M}) (each modality has "
                            f"its own running statistics), got {modality!r}")
        if not 0 <= modality < M:
            raise ValueError(f"modality: expected an int in [0, {M}) (num_modalities), got {modality}")
        m = int(modality)
        # inference_affine calls this only on a layer with running statistics.
        assert self.running_mean is not None and self.running_var is not None
        w, b = self._channel_params()
        if self.separate_affine:
            w, b = w[m], b[m]
        scale = w / np.sqrt(self.running_var[m].astype(np.float64) + self.eps)
        return scale, b - self.running_mean[m].astype(np.float64) * scale

    def _update_running(self, mean: npt.NDArray[np.float64], var: npt.NDArray[np.float64],
                        samples: npt.NDArray[np.intp], S: int) -> None:
        """Each present modality's row moves toward its batch statistics (unbiased variance)."""
        assert self.running_mean is not None and self.running_var is not None  # with tracking
        sets = mean.shape[0]
        if self.momentum is not None and samples[:sets].all():
            # Every modality below `sets` present: their rows in one update each (the update is
            # elementwise, so the same values as row by row).
            self._batches_of_modality[:sets] += 1
            scale = np.array([c / (c - 1) if c > 1 else np.nan for c in (samples[:sets] * S).tolist()])
            _engine.running_update(self.running_mean[:sets], mean, self.momentum)
            _engine.running_update(self.running_var[:sets], var * scale[:, None], self.momentum)
            return
        for m in np.flatnonzero(samples[:sets]):
            self._batches_of_modality[m] += 1
            factor = 1.0 / self._batches_of_modality[m] if self.momentum is None else self.momentum
            _engine.running_update(self.running_mean[m], mean[m], factor)
            _engine.running_update(self.running_var[m], unbiased(var[m], int(samples[m]) * S), factor)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert (self.running_mean is not None and self.running_var is not None
                    and self.num_batches_tracked is not None)  # registered with tracking
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked[...] = 0
            self._batches_of_modality[...] = 0

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Self:
        super().load_state_dict(state_dict, strict)
        if self.track_running_stats:
            assert self.num_batches_tracked is not None  # registered with tracking
            self._batches_of_modality[...] = int(self.num_batches_tracked)
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_modalities={self.num_modalities}, "
                f"separate_affine={self.separate_affine}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
