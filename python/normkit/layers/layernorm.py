"""LayerNorm and RMSNorm: torch.nn semantics over the trailing normalized_shape."""
import numpy as np

from .. import _checks, functional as F
from .base import NormLayer


class _RowNorm(NormLayer):
    def _init(self, normalized_shape, eps, elementwise_affine, bias, dtype):
        self.normalized_shape = _checks.normalized_shape_tuple(normalized_shape)
        self.eps = None if eps is None else _checks.positive_float(eps, "eps")
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _checks.COMPUTE_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        shape = self.normalized_shape
        self._param("weight", np.ones(shape, self.dtype) if elementwise_affine else None)
        if bias is not None:
            self._param("bias", np.zeros(shape, self.dtype) if elementwise_affine and bias else None)

    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"input: expected a numpy.ndarray, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"input: expected dtype {self.dtype} (the layer's), got {x.dtype}")

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class LayerNorm(_RowNorm):
    """Layer normalization over the trailing dimensions given by normalized_shape."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        super().__init__()
        self._init(normalized_shape, eps, elementwise_affine, bool(bias), dtype)

    def _forward(self, x):
        self._check_input(x)
        return F.layer_norm_impl(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_RowNorm):
    """RMS normalization: x / sqrt(mean(x^2) + eps) * weight; eps=None is the dtype's epsilon."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, dtype=np.float32):
        super().__init__()
        self._init(normalized_shape, eps, elementwise_affine, None, dtype)

    def _forward(self, x):
        self._check_input(x)
        return F.rms_norm_impl(x, self.normalized_shape, self.weight, self.eps)
