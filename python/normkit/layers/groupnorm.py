"""GroupNorm: torch.nn.GroupNorm semantics."""
import numpy as np

from .. import _checks, functional as F
from .base import NormLayer


class GroupNorm(NormLayer):
    """Group normalization of (N, C, *) input: each sample's C channels in num_groups groups."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32):
        super().__init__()
        self.num_groups = _checks.positive_int(num_groups, "num_groups")
        self.num_channels = _checks.positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.eps = _checks.positive_float(eps, "eps")
        self.affine = bool(affine)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _checks.COMPUTE_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self._param("weight", np.ones(num_channels, self.dtype) if affine else None)
        self._param("bias", np.zeros(num_channels, self.dtype) if affine else None)

    def _forward(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"input: expected a numpy.ndarray, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"input: expected shape (N, {self.num_channels}, *), got {x.shape}")
        if x.dtype != self.dtype:
            raise TypeError(f"input: expected dtype {self.dtype} (the layer's), got {x.dtype}")
        return F.group_norm_impl(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
