"""InstanceNorm1d/2d/3d: torch.nn.InstanceNorm semantics (unbatched input accepted)."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, functional as F
from .batchnorm import _BatchNorm


class _InstanceNorm(_BatchNorm):
    _spatial_dims = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype, layout)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], _core.Saved]:
        d = self._spatial_dims
        use_input_stats = self.training or not self.track_running_stats or self.use_batch_stats
        momentum = self.momentum if self.momentum is not None else 0.0  # as torch
        # use_batch_stats in eval: the running statistics are neither used nor updated.
        running_mean, running_var = ((None, None) if not self.training and self.use_batch_stats
                                     else (self.running_mean, self.running_var))
        # The common case in one call: batched input with num_features channels.
        fast = _core.forward_fast(_core.FAST_INSTANCE, x, self.num_features, 0, None, 1 << (d + 2),
                                  self.layout == "NHWC", self.weight, self.bias, running_mean,
                                  running_var, use_input_stats, momentum, self.eps,
                                  self._param_bits)
        if fast is not None:
            return fast  # (y, Saved)
        _checks.layer_input(x, self.dtype, ndims=(d + 1, d + 2), ranks=self._ranks)
        shape = x.shape
        xb = x[None] if x.ndim == d + 1 else x
        channel_dim = 1 if self.layout == "NCHW" else -1
        if xb.shape[channel_dim] != self.num_features:
            if self.affine or self.track_running_stats:
                # torch: the affine and the running statistics are per channel.
                _checks.layer_input(x, self.dtype, channels=self.num_features,
                                    channel_dim=x.ndim - d - 1 if self.layout == "NCHW" else -1)
            warnings.warn(f"input has {xb.shape[channel_dim]} channels but num_features is {self.num_features}; "
                          "num_features is not used because affine=False", UserWarning)
        y, saved = F.instance_norm_impl(xb, running_mean, running_var, self.weight,
                                        self.bias, use_input_stats, momentum, self.eps, self.layout)
        saved.shape = shape
        return y.reshape(shape), saved

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization of (N, C, L) or unbatched (C, L) input."""
    _spatial_dims = 1
    _ranks = " (C, L) or (N, C, L)"


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization of (N, C, H, W) or unbatched (C, H, W) input."""
    _spatial_dims = 2
    _ranks = " (C, H, W) or (N, C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization of (N, C, D, H, W) or unbatched (C, D, H, W) input."""
    _spatial_dims = 3
    _ranks = " (C, D, H, W) or (N, C, D, H, W)"
