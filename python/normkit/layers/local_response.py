"""LocalResponseNorm: torch.nn.LocalResponseNorm, forward and backward."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine
from .base import NormLayer


class LocalResponseNorm(NormLayer):
    """Local response normalization across channels (Krizhevsky et al., "ImageNet Classification
    with Deep Convolutional Neural Networks", 2012), with torch.nn.LocalResponseNorm's semantics
    on (N, C, *) input of 3 to 5 dimensions:

        d_c = k + alpha/size * sum_{j = c - size//2}^{c + (size-1)//2} x_j^2   (missing channels: 0),
        y_c = x_c / d_c^beta.

    No parameters; training and inference are the same. One shared kernel slides the window over
    the channels of every rank's (N, C, positions) view; the backward is exact:
    dx_j = dy_j d_j^-beta - 2 alpha beta/size x_j sum_{c: j in window(c)} dy_c x_c d_c^(-beta-1).
    """

    # The last forward's contiguous x and its (N, C, S) planes (None before a forward).
    _saved: tuple[npt.NDArray[Any], tuple[int, int, int]] | None

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self.size = _checks.positive_int(size, "size")
        self.alpha = _checks._real(alpha, "alpha")
        self.beta = _checks._real(beta, "beta")
        self.k = _checks._real(k, "k")
        self._set_dtype(dtype)

    def _forward(self, x: npt.NDArray[Any]
                 ) -> tuple[npt.NDArray[Any], tuple[npt.NDArray[Any], tuple[int, int, int]]]:
        _checks.layer_input(x, self.dtype, ndims=(3, 4, 5), ranks=" (N, C, *) with 1 to 3 spatial dimensions")
        x = _checks.contiguous(x)
        N, C, S = _engine.planes(x)
        y = _core.empty_like(x)
        if x.size:
            _core.local_response_norm(N, C, S, x, y, self.size, self.alpha, self.beta, self.k)
        return y, (x, (N, C, S))

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """dx of the last forward (no parameters, so grads stays empty)."""
        if self._saved is None:
            raise _checks.StateError(
                f"backward: expected a forward call first, got none on this {type(self).__name__}")
        x, (N, C, S) = self._saved
        dy = _checks.grad_output(dy, x.shape, x.dtype)
        dx = _core.empty_like(x)
        if x.size:
            _core.local_response_norm_backward(N, C, S, x, dy, dx, self.size, self.alpha, self.beta, self.k)
        self.grads = {}
        return dx

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
