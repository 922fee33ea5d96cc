"""BatchNorm1d/2d/3d: torch.nn.BatchNorm semantics over the shared kernels."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine, functional as F
from .base import NormLayer


def setup_batchnorm_state(layer: BatchNormState, num_features: int, eps: float,
                          momentum: float | None, affine: bool, track_running_stats: bool,
                          dtype: npt.DTypeLike) -> None:
    """torch's BatchNorm arguments, checked, and its parameters and buffers on `layer` (also
    SyncBatchNorm's)."""
    layer.num_features = _checks.positive_int(num_features, "num_features")
    layer.eps = _checks.nonneg_float(eps, "eps")
    layer.momentum = _checks.momentum_value(momentum)
    layer.affine = bool(affine)
    layer.track_running_stats = bool(track_running_stats)
    layer._set_dtype(dtype)
    C = layer.num_features
    layer._param("weight", np.ones(C, layer.dtype) if affine else None)
    layer._param("bias", np.zeros(C, layer.dtype) if affine else None)
    if layer.track_running_stats:
        layer._buffer("running_mean", np.zeros(C, layer.dtype))
        layer._buffer("running_var", np.ones(C, layer.dtype))
        layer._buffer("num_batches_tracked", np.array(0, dtype=np.int64))
    else:
        layer.running_mean = layer.running_var = layer.num_batches_tracked = None


class _RunningStatsLayer(Protocol):
    """What running_stats_affine reads: BatchNorm's eval state (BN, SyncBN, FrozenBN, CBN, BKN)."""

    @property
    def num_features(self) -> int: ...
    @property
    def eps(self) -> float: ...
    @property
    def weight(self) -> npt.NDArray[Any] | None: ...
    @property
    def bias(self) -> npt.NDArray[Any] | None: ...
    @property
    def running_mean(self) -> npt.NDArray[Any] | None: ...
    @property
    def running_var(self) -> npt.NDArray[Any] | None: ...


def running_stats_affine(layer: _RunningStatsLayer
                         ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """normkit.inference_affine's (scale, shift) of a BatchNorm-like layer: eval with running
    statistics is y = weight (x - running_mean) / sqrt(running_var + eps) + bias."""
    # inference_affine calls this only on a layer with running statistics.
    assert layer.running_mean is not None and layer.running_var is not None
    C = layer.num_features
    w = np.ones(C) if layer.weight is None else layer.weight.astype(np.float64)
    b = np.zeros(C) if layer.bias is None else layer.bias.astype(np.float64)
    scale = w / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
    return scale, b - layer.running_mean.astype(np.float64) * scale


class BatchNormState(NormLayer):
    """The attributes setup_batchnorm_state gives a layer: BatchNorm's and SyncBatchNorm's."""

    # Set by setup_batchnorm_state (parameters and buffers registered by name).
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    running_mean: npt.NDArray[Any] | None  # None without track_running_stats
    running_var: npt.NDArray[Any] | None
    num_batches_tracked: npt.NDArray[np.int64] | None


class _BatchNorm(BatchNormState):
    _expected_ndims: tuple[int, ...] = ()  # input ranks this class accepts
    _ranks_mask = 0  # the same, as forward_fast's bit mask
    _ranks = ""  # their layouts, for messages

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__()
        self.layout = _checks.layout_arg(layout)  # "NHWC": input is (N, *spatial, C)
        setup_batchnorm_state(self, num_features, eps, momentum, affine, track_running_stats, dtype)
        # After eval(): normalize with the batch's own statistics, leaving the running ones alone
        # (arXiv 1802.07590; it couples the samples of a test batch).
        self.use_batch_stats = False

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert (self.running_mean is not None and self.running_var is not None
                    and self.num_batches_tracked is not None)  # registered with tracking
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked[...] = 0

    def _check_input(self, x: npt.NDArray[Any]) -> None:
        """The Python path's checks (forward_fast takes only inputs that pass them)."""
        _checks.layer_input(x, self.dtype, ndims=self._expected_ndims, channels=self.num_features,
                            ranks=self._ranks, channel_dim=1 if self.layout == "NCHW" else -1)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], _core.Saved]:
        # torch's _BatchNorm.forward: the factor, the counter, and when batch stats are used.
        factor = 0.0 if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None or self.use_batch_stats
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None  # registered with track_running_stats
            count = int(self.num_batches_tracked) + 1
            factor = 1.0 / count if self.momentum is None else self.momentum
        # The running statistics go in when they normalize (eval) or are updated (training).
        track = self.track_running_stats if self.training else not use_batch_stats
        running_mean, running_var = (self.running_mean, self.running_var) if track else (None, None)
        fast = _core.forward_fast(_core.FAST_BATCH, x, self.num_features, 0, None, self._ranks_mask,
                                  self.layout == "NHWC", self.weight, self.bias, running_mean,
                                  running_var, use_batch_stats, factor, self.eps,
                                  self._param_bits)
        result = fast  # (y, Saved), or None: the Python path
        if result is None:
            self._check_input(x)
            result = F.batch_norm_impl(x, running_mean, running_var, self.weight, self.bias,
                                       use_batch_stats, factor, self.eps, self.layout)
        if self.training and self.track_running_stats:  # counted only once the batch is accepted
            assert self.num_batches_tracked is not None
            self.num_batches_tracked += 1
        return result

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return running_stats_affine(self)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}"
                + ("" if self.layout == "NCHW" else f", layout={self.layout!r}"))


class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) input."""
    _expected_ndims = (2, 3)
    _ranks_mask = _engine.ranks_mask(_expected_ndims)
    _ranks = " (N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalization of (N, C, H, W) input."""
    _expected_ndims = (4,)
    _ranks_mask = _engine.ranks_mask(_expected_ndims)
    _ranks = " (N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch normalization of (N, C, D, H, W) input."""
    _expected_ndims = (5,)
    _ranks_mask = _engine.ranks_mask(_expected_ndims)
    _ranks = " (N, C, D, H, W)"
