"""InstanceNorm1d/2d/3d: torch.nn.InstanceNorm semantics (unbatched input accepted)."""
import warnings

import numpy as np

from .. import _checks, functional as F
from .batchnorm import _BatchNorm


class _InstanceNorm(_BatchNorm):
    _spatial_dims = 0

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)

    def _forward(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"input: expected a numpy.ndarray, got {type(x).__name__}")
        d = self._spatial_dims
        if x.ndim not in (d + 1, d + 2):
            raise ValueError(f"input: expected {d + 1}D (unbatched) or {d + 2}D (batched) input "
                             f"(got {x.ndim}D input with shape {x.shape})")
        if x.dtype != self.dtype:
            raise TypeError(f"input: expected dtype {self.dtype} (the layer's), got {x.dtype}")
        shape = x.shape
        xb = x[None] if x.ndim == d + 1 else x
        if xb.shape[1] != self.num_features:
            if self.affine:
                raise ValueError(f"input: expected {self.num_features} channels (affine=True), got shape {shape}")
            warnings.warn(f"input has {xb.shape[1]} channels but num_features is {self.num_features}; "
                          "the running statistics and affine parameters are not used", UserWarning)
        use_input_stats = self.training or not self.track_running_stats
        momentum = self.momentum if self.momentum is not None else 0.0  # as torch
        y, saved = F.instance_norm_impl(xb, self.running_mean, self.running_var, self.weight,
                                        self.bias, use_input_stats, momentum, self.eps)
        saved.shape = shape
        return y.reshape(shape), saved

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization of (N, C, L) or unbatched (C, L) input."""
    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization of (N, C, H, W) or unbatched (C, H, W) input."""
    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization of (N, C, D, H, W) or unbatched (C, D, H, W) input."""
    _spatial_dims = 3
