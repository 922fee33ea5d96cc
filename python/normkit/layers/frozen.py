"""FrozenBatchNorm2d: torchvision's BatchNorm with fixed statistics and affine."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine, functional as F
from .base import NormLayer
from .batchnorm import running_stats_affine

if TYPE_CHECKING:
    from typing_extensions import Self


class FrozenBatchNorm2d(NormLayer):
    """BatchNorm2d whose weight, bias, running_mean and running_var are fixed buffers
    (torchvision.ops.FrozenBatchNorm2d): y = (x - running_mean)/sqrt(running_var + eps) * weight
    + bias in training and in eval, one fused pass; no learnable parameters, so the backward
    gives the input gradient only. Loads a torch BatchNorm2d state_dict (its num_batches_tracked
    is ignored). A pretrained detector's backbone, fine-tuned at batch sizes too small for
    batch statistics, is the classic use.
    """

    _ranks_mask = _engine.ranks_mask((4,))

    # Buffers registered by name.
    weight: npt.NDArray[Any]
    bias: npt.NDArray[Any]
    running_mean: npt.NDArray[Any]
    running_var: npt.NDArray[Any]

    def __init__(self, num_features: int, eps: float = 1e-5, dtype: npt.DTypeLike = np.float32,
                 layout: str = "NCHW") -> None:
        super().__init__()
        self.layout = _checks.layout_arg(layout)
        self.num_features = _checks.positive_int(num_features, "num_features")
        self.eps = _checks.nonneg_float(eps, "eps")
        self._set_dtype(dtype)
        C = self.num_features
        self._buffer("weight", np.ones(C, self.dtype))
        self._buffer("bias", np.zeros(C, self.dtype))
        self._buffer("running_mean", np.zeros(C, self.dtype))
        self._buffer("running_var", np.ones(C, self.dtype))
        # After eval(): normalize with the batch's own statistics (the buffers stay as they are).
        self.use_batch_stats = False

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], _core.Saved]:
        batch = not self.training and self.use_batch_stats
        rm, rv = (None, None) if batch else (self.running_mean, self.running_var)
        fast = _core.forward_fast(_core.FAST_BATCH, x, self.num_features, 0, None, self._ranks_mask,
                                  self.layout == "NHWC", self.weight, self.bias, rm, rv, batch, 0.0,
                                  self.eps, self._param_bits)
        if fast is not None:
            return fast
        _checks.layer_input(x, self.dtype, ndims=(4,), channels=self.num_features,
                            ranks=" (N, C, H, W)", channel_dim=1 if self.layout == "NCHW" else -1)
        return F.batch_norm_impl(x, rm, rv, self.weight, self.bias, batch, 0.0, self.eps, self.layout)

    def _grad_names(self) -> list[str]:
        return []  # weight and bias are buffers: only the input has a gradient

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Self:
        """A FrozenBatchNorm2d's or a (torch) BatchNorm2d's state: num_batches_tracked is ignored."""
        if hasattr(state_dict, "keys") and "num_batches_tracked" in state_dict:
            state_dict = {k: state_dict[k] for k in state_dict.keys() if k != "num_batches_tracked"}
        return super().load_state_dict(state_dict, strict)

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return running_stats_affine(self)  # inference is BatchNorm's with the running statistics

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
