"""Tensors as NumPy views and back, without copies: the one place that knows both libraries.

float32, float64 and float16 tensors view as the NumPy dtype of the same name; bfloat16 tensors
view their bits (int16) as ml_dtypes.bfloat16, since torch.from_numpy and Tensor.numpy take no
bfloat16. A tensor whose memory is (N, *spatial, C) (channels_last, channels_last_3d) views as
that NumPy array for the layers that read channels-last memory (normkit's layout="NHWC").
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import numpy.typing as npt
import torch
from torch.types import Device

_BF16: np.dtype[Any] | None
try:
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with normkit's half support
    _BF16 = None

NP_DTYPES: dict[torch.dtype, np.dtype[Any]] = {
    torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16)}
if _BF16 is not None:
    NP_DTYPES[torch.bfloat16] = _BF16
TORCH_DTYPES = {v: k for k, v in NP_DTYPES.items()}

# A constructor's dtype: torch's, NumPy's, or None.
DTypeArg = Union[torch.dtype, npt.DTypeLike, None]


def np_dtype(dtype: DTypeArg, name: str = "dtype") -> np.dtype[Any]:
    """A constructor's dtype (a torch dtype, a NumPy one, or None: torch's default dtype) as
    the NumPy dtype of normkit's layer."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: expected torch.float32 or torch.float64 (normkit keeps parameters in "
                            f"float32 or float64; float16 and bfloat16 inputs compute in float32), got {dtype}")
        return NP_DTYPES[dtype]
    return np.dtype(dtype)


def check_device(device: Device, name: str = "device") -> None:
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"{name}: expected a CPU device (normkit.torch runs on the CPU), got {device}")


def cpu_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor (normkit.torch runs on the CPU; move it with "
                         f".cpu() or keep torch.nn's layer for {t.device.type}), got a tensor on {t.device}")
    return t


def numpy_view(t: torch.Tensor) -> npt.NDArray[Any]:
    """t's memory as a NumPy array (no copy; t is a CPU tensor; the strides are kept)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy()
        return bits if _BF16 is None else bits.view(_BF16)  # without ml_dtypes: the int16 bits
    if t.dtype in NP_DTYPES or not t.is_floating_point():
        return t.numpy()
    raise TypeError(f"expected a float32, float64, float16 or bfloat16 tensor, got {t.dtype}")


def tensor_view(a: npt.NDArray[Any]) -> torch.Tensor:
    """A NumPy array's memory as a tensor (no copy)."""
    if _BF16 is not None and a.dtype == _BF16:  # np.dtype("float64") == None is True
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays; such arrays are O(C)
        a = a.copy()
    return torch.from_numpy(a)


def _to_last(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim), 1)


def _to_first(ndim: int) -> tuple[int, ...]:
    return (0, ndim - 1, *range(1, ndim - 1))


def input_view(x: torch.Tensor, channels_last_ok: bool) -> tuple[npt.NDArray[Any], bool]:
    """(NumPy view of x, True when it is the (N, *spatial, C) view of channels-last memory).

    Contiguous tensors view as they are; channels-last ones as (N, *spatial, C) where the layer
    reads that layout (channels_last_ok), else through one torch copy to contiguous memory."""
    if x.is_contiguous():
        return numpy_view(x), False
    if channels_last_ok and x.dim() >= 3:
        xl = x.permute(_to_last(x.dim()))
        if xl.is_contiguous():
            return numpy_view(xl), True
    return numpy_view(x.contiguous()), False


def grad_view(dy: torch.Tensor, nhwc: bool) -> npt.NDArray[Any]:
    """dy (any strides) as the NumPy array the layer's backward takes: in the forward's layout."""
    if nhwc:
        return numpy_view(dy.permute(_to_last(dy.dim())).contiguous())
    return numpy_view(dy.contiguous())


def output_tensor(a: npt.NDArray[Any], nhwc: bool) -> torch.Tensor:
    """A layer's output (or input gradient) array as a tensor of the logical (N, C, *) shape;
    from the NHWC path a channels-last tensor."""
    t = tensor_view(a)
    return t.permute(_to_first(t.dim())) if nhwc else t
