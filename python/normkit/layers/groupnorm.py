"""GroupNorm: torch.nn.GroupNorm semantics."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine, functional as F
from .base import NormLayer


class GroupNorm(NormLayer):
    """Group normalization of (N, C, *) input: each sample's C channels in num_groups groups."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 dtype: npt.DTypeLike = np.float32, layout: str = "NCHW") -> None:
        super().__init__()
        self.layout = _checks.layout_arg(layout)  # "NHWC": input is (N, *spatial, C)
        self.num_groups = _checks.positive_int(num_groups, "num_groups")
        self.num_channels = _checks.positive_int(num_channels, "num_channels")
        _checks.divisor(self.num_groups, self.num_channels, of="num_channels")
        self.eps = _checks.nonneg_float(eps, "eps")
        self.affine = bool(affine)
        self._set_dtype(dtype)
        self._param("weight", np.ones(num_channels, self.dtype) if affine else None)
        self._param("bias", np.zeros(num_channels, self.dtype) if affine else None)

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], _core.Saved]:
        nhwc = self.layout == "NHWC"
        fast = _core.forward_fast(_core.FAST_GROUP, x, self.num_channels, self.num_groups, None,
                                  _engine.RANK_2_UP, nhwc, self.weight, self.bias, None, None, True,
                                  0.0, self.eps, self._param_bits)
        if fast is not None:
            return fast  # (y, Saved)
        _checks.layer_input(x, self.dtype, min_ndim=2, channels=self.num_channels,
                            ranks=f" (N, *, {self.num_channels})" if nhwc else f" (N, {self.num_channels}, *)",
                            channels_arg="num_channels", channel_dim=-1 if nhwc else 1)
        return F.group_norm_impl(x, self.num_groups, self.weight, self.bias, self.eps, self.layout)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
