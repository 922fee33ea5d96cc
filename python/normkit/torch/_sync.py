"""normkit.torch.SyncBatchNorm: torch.nn.SyncBatchNorm on the CPU, over torch.distributed.

The module is a torch.nn.modules.batchnorm._BatchNorm (torch's constructor, parameters, buffers,
state_dict and isinstance checks), whose forward runs normkit's NumPy SyncBatchNorm
(normkit/layers/sync_batchnorm.py) through one autograd Function. The NumPy layer is made per
call around NumPy views of the module's current tensors (no copies: the core's in-place
running-statistics updates land in the module's buffers), and talks to the other processes
through _TorchGroup, an mpi4py-style communicator (Get_size, Allgather) over
torch.distributed's all-gather (gloo on the CPU). Eval uses the running statistics and no
communication, as torch's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.types import Device

from .. import _checks
from ._bridge import numpy_view as _numpy_view, tensor_view as _tensor_view
from ..layers import batchnorm as _np_batchnorm
from ..layers.sync_batchnorm import SyncBatchNorm as _NumpySyncBatchNorm, _SingleProcess

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ._module import NormModule

_INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _TorchGroup:
    """A torch.distributed process group as the communicator normkit's SyncBatchNorm takes:
    Get_size() and a buffer-based Allgather(sendbuf, recvbuf) on NumPy float64 arrays."""

    def __init__(self, group: ProcessGroup | None = None) -> None:
        self.group = group  # None: the default (WORLD) group

    def Get_size(self) -> int:
        return dist.get_world_size(self.group)

    def Allgather(self, sendbuf: npt.NDArray[np.float64], recvbuf: npt.NDArray[np.float64]) -> None:
        send = torch.from_numpy(np.ascontiguousarray(sendbuf)).reshape(-1)
        recv = torch.from_numpy(recvbuf).reshape(-1)  # recvbuf is C-contiguous: a view
        gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
        if gather is not None:
            gather(recv, send, group=self.group)
        else:  # pragma: no cover - torch before 1.13
            dist.all_gather(list(recv.reshape(-1, send.numel()).unbind(0)), send, group=self.group)


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = layer(x) with the NumPy layer; backward through layer.backward_of(ctx's saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                layer: _NumpySyncBatchNorm, xv: npt.NDArray[Any]) -> torch.Tensor:
        y = layer.forward(xv)
        ctx.layer, ctx.state = layer, layer._saved
        layer._saved = None
        ctx.save_for_backward(x)  # only for autograd's check that x is not changed in place
        ctx.param_meta = [None if p is None else (p.dtype, p.shape) for p in (weight, bias)]
        return _tensor_view(y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.saved_tensors  # raises if x was modified in place since the forward
        dx, grads = ctx.layer.backward_of(ctx.state, _numpy_view(dy.contiguous()))
        out: list[torch.Tensor | None] = [_tensor_view(dx)]
        for name, meta in zip(("weight", "bias"), ctx.param_meta):
            g = grads.get(name)
            out.append(None if meta is None or g is None else _tensor_view(g).reshape(meta[1]).to(meta[0]))
        return tuple(out) + (None, None)


class SyncBatchNorm(_BatchNorm):
    """torch.nn.SyncBatchNorm on the CPU: batch normalization of (N, C, *spatial) input with
    training statistics over the processes of `process_group` (a torch.distributed group; None:
    the default group when torch.distributed is initialized, else this process alone).

    Same constructor, buffers and semantics as torch's: the statistics are merged over the
    ranks exactly (uneven batches, empty ones included), each rank's weight and bias gradients
    are its own contribution (their sum is BatchNorm's over the whole batch), eval uses the
    running statistics without communication. Every rank must run forward and backward in
    training the same number of times.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: ProcessGroup | None = None, device: Device = None,
                 dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"device: expected a CPU device (normkit.torch runs on the CPU), got {device}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected torch.float32 or torch.float64 (normkit keeps parameters in "
                            f"float32 or float64), got {dtype}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _communicator(self) -> _SingleProcess | _TorchGroup:
        group = self.process_group
        if group is None and not (dist.is_available() and dist.is_initialized()):
            return _SingleProcess()
        return _TorchGroup(group)

    def _layer(self, input_dtype: np.dtype[Any]) -> _NumpySyncBatchNorm:
        """The NumPy layer for this call, on views of the module's current tensors."""
        state = {n: getattr(self, n) for n in ("weight", "bias", "running_mean", "running_var",
                                                "num_batches_tracked")}
        for n, t in state.items():
            if t is not None and t.device.type != "cpu":
                raise ValueError(f"{n}: expected a CPU tensor (normkit.torch runs on the CPU), got one on {t.device}")
        floats = [t for n, t in state.items() if t is not None and n != "num_batches_tracked"]
        dtype = _checks.param_dtype(input_dtype)
        for t in floats:
            if t.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"expected float32 or float64 parameters and buffers, got {t.dtype}")
            if _numpy_view(t).dtype != dtype:
                raise TypeError(f"input: expected the dtype of the module's parameters and buffers "
                                f"({t.dtype}; float32 modules also take float16 and bfloat16 input), "
                                f"got {input_dtype}")
        momentum = self.momentum
        layer = _NumpySyncBatchNorm(self.num_features, self.eps, momentum, self.affine,
                                    self.track_running_stats,
                                    process_group=self._communicator() if self.training else None,
                                    dtype=dtype)
        for n, t in state.items():
            setattr(layer, n, None if t is None else _numpy_view(t))
        layer.training = self.training
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if input.device.type != "cpu":
            raise ValueError(f"input: expected a CPU tensor (normkit.torch runs on the CPU), got one on {input.device}")
        if input.dtype not in _INPUT_DTYPES:
            raise TypeError(f"input: expected float32, float64, float16 or bfloat16, got {input.dtype}")
        xv = _numpy_view(input.contiguous())
        layer = self._layer(xv.dtype)
        w, b = self.weight, self.bias
        needs_grad = torch.is_grad_enabled() and (
            input.requires_grad or any(p is not None and p.requires_grad for p in (w, b)))
        if needs_grad:
            # (torch's Function.apply has no annotations)
            out: torch.Tensor = _SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
                input, w, b, layer, xv)
            return out
        y = layer.forward(xv)
        layer._saved = None
        return _tensor_view(y)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_group: ProcessGroup | None = None) -> torch.nn.Module:
        """Every torch BatchNorm*D (any torch.nn.modules.batchnorm._BatchNorm) and normkit.torch
        BatchNorm*d in the tree of `module` replaced by this class, sharing their parameters and
        buffers; as torch.nn.SyncBatchNorm.convert_sync_batchnorm. Returns the (new) root."""
        out: torch.nn.Module = module
        if _is_batch_norm(module):
            bias = getattr(module, "bias", None)
            kwargs: dict[str, Any] = ({} if bias is not None or not module.affine
                                      else {"bias": False})
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, **kwargs)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out


def _is_batch_norm(module: object) -> TypeGuard[_BatchNorm | NormModule]:
    """A torch BatchNorm (torch's _BatchNorm, SyncBatchNorm included) or a normkit.torch module
    running normkit's BatchNorm1d/2d/3d."""
    if isinstance(module, _BatchNorm):
        return True
    layer = module.__dict__.get("_nk") if isinstance(module, torch.nn.Module) else None
    return isinstance(layer, _np_batchnorm._BatchNorm)
