"""LayerNorm and RMSNorm: torch.nn semantics over the trailing normalized_shape."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine, functional as F
from .base import NormLayer


class _RowNorm(NormLayer):
    def _init(self, normalized_shape: int | Sequence[int], eps: float | None,
              elementwise_affine: bool, bias: bool | None, dtype: npt.DTypeLike) -> None:
        self.normalized_shape = _checks.normalized_shape_tuple(normalized_shape)
        self.eps = None if eps is None else _checks.nonneg_float(eps, "eps")
        self.elementwise_affine = bool(elementwise_affine)
        self._set_dtype(dtype)
        shape = self.normalized_shape
        self._param("weight", np.ones(shape, self.dtype) if elementwise_affine else None)
        if bias is not None:
            self._param("bias", np.zeros(shape, self.dtype) if elementwise_affine and bias else None)

    def _forward_fast(self, kind: int, x: npt.NDArray[Any], bias: npt.NDArray[Any] | None,
                      eps: float | None) -> tuple[npt.NDArray[Any], _core.Saved] | None:
        """The common case in one call: (y, Saved), or None to take the Python path."""
        return _core.forward_fast(kind, x, 0, 0, self.normalized_shape, _engine.ANY_RANK, False,
                                  self.weight, bias, None, None, True, 0.0, eps, self._param_bits)

    def _check_input(self, x: npt.NDArray[Any]) -> None:
        _checks.layer_input(x, self.dtype, min_ndim=0)
        _checks.check_trailing_shape(x, self.normalized_shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class LayerNorm(_RowNorm):
    """Layer normalization over the trailing dimensions given by normalized_shape."""

    eps: float  # never None here (RMSNorm's may be)

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        _checks.nonneg_float(eps, "eps")  # LayerNorm has no default eps of None (RMSNorm has)
        self._init(normalized_shape, eps, elementwise_affine, bool(bias), dtype)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], _core.Saved]:
        fast = self._forward_fast(_core.FAST_LAYER, x, self.bias, self.eps)
        if fast is not None:
            return fast
        self._check_input(x)
        return F.layer_norm_impl(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_RowNorm):
    """RMS normalization: x / sqrt(mean(x^2) + eps) * weight; eps=None is the dtype's epsilon."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self._init(normalized_shape, eps, elementwise_affine, None, dtype)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], _core.Saved]:
        eps = self.eps if self.eps is not None else _checks.machine_eps_of(x)
        fast = self._forward_fast(_core.FAST_RMS, x, None, eps)
        if fast is not None:
            return fast
        self._check_input(x)
        return F.rms_norm_impl(x, self.normalized_shape, self.weight, self.eps)
