"""convert(module): every torch.nn normalization layer of a model replaced by normkit.torch's.

The replacement takes over the original's parameter and buffer tensors themselves (no copy: an
optimizer made before convert keeps training them), its hyperparameters, its training flag and
its dtype. A layer normkit cannot run as it is (not on the CPU, half-precision parameters,
uninitialized lazy parameters, a subclass whose forward may differ, hooks that a new module
would lose) is left as it is, with a ConversionWarning naming it and the reason; with
return_skipped=True the (name, module, reason) of each is returned too.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from . import _layers
from ._module import NormModule

if TYPE_CHECKING:
    from ._sync import SyncBatchNorm

# Makes the replacement of a torch module (of the type it is registered under: mypy cannot tie
# the two, so the argument is Any).
_Maker = Callable[[Any], nn.Module]
_Skipped = tuple[str, nn.Module, str]  # (name, module, reason) of a norm layer left as it is


class ConversionWarning(UserWarning):
    """A normalization layer that normkit.torch.convert left as it was, and why."""


def _dtype(m: nn.Module) -> torch.dtype | None:
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        if t.is_floating_point():
            return t.dtype
    return None


def _batch_norm(cls: type[_layers._BatchNorm] | type[_layers._InstanceNorm]
                ) -> Callable[[_NormBase], NormModule]:
    return lambda m: cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, dtype=_dtype(m))


def _sync_batch_norm(m: nn.SyncBatchNorm) -> SyncBatchNorm:
    from ._sync import SyncBatchNorm
    return SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                         process_group=m.process_group, dtype=_dtype(m))


_MAKERS: dict[type[nn.Module], _Maker] = {
    nn.BatchNorm1d: _batch_norm(_layers.BatchNorm1d),
    nn.BatchNorm2d: _batch_norm(_layers.BatchNorm2d),
    nn.BatchNorm3d: _batch_norm(_layers.BatchNorm3d),
    nn.SyncBatchNorm: _sync_batch_norm,
    nn.InstanceNorm1d: _batch_norm(_layers.InstanceNorm1d),
    nn.InstanceNorm2d: _batch_norm(_layers.InstanceNorm2d),
    nn.InstanceNorm3d: _batch_norm(_layers.InstanceNorm3d),
    nn.GroupNorm: lambda m: _layers.GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, dtype=_dtype(m)),
    nn.LayerNorm: lambda m: _layers.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine,
                                              m.bias is not None, dtype=_dtype(m)),
    nn.RMSNorm: lambda m: _layers.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, dtype=_dtype(m)),
    nn.LocalResponseNorm: lambda m: _layers.LocalResponseNorm(m.size, m.alpha, m.beta, m.k),
}
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _is_frozen_batch_norm(m: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d, known by name and state (torchvision is optional)."""
    return (type(m).__name__ == "FrozenBatchNorm2d" and not isinstance(m, NormModule)
            and all(isinstance(m._buffers.get(n), torch.Tensor) for n in _FROZEN_BUFFERS)
            and not m._parameters and hasattr(m, "eps"))


def _maker(m: nn.Module) -> tuple[_Maker | None, str | None]:
    """(a function making the replacement, or None; why not, for a norm layer left as it is)."""
    if isinstance(m, NormModule) or type(m).__module__.startswith("normkit."):
        return None, None
    if _is_frozen_batch_norm(m):
        return (lambda m: _layers.FrozenBatchNorm2d(m.num_features if hasattr(m, "num_features")
                                                    else m.weight.shape[0], m.eps, dtype=_dtype(m))), None
    make = _MAKERS.get(type(m))
    if make is None:
        base = next((c for c in _MAKERS if isinstance(m, c)), None)
        if base is None:
            return None, None
        return None, f"a subclass of torch.nn.{base.__name__} ({type(m).__qualname__}), whose forward may differ"
    tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    if any(nn.parameter.is_lazy(t) for t in tensors):  # isinstance(t, UninitializedTensorMixin)
        return None, "its parameters are not initialized yet (a lazy module)"
    if any(t.device.type != "cpu" for t in tensors):
        return None, f"it is on {next(t.device for t in tensors if t.device.type != 'cpu')} (normkit runs on the CPU)"
    bad = [t.dtype for t in tensors if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)]
    if bad:
        return None, (f"its parameters are {bad[0]} (normkit keeps parameters in float32 or float64; "
                      f"half inputs compute in float32)")
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
        return None, "it has hooks, which a new module would lose"
    return make, None


def _replacement(m: nn.Module, make: _Maker) -> nn.Module:
    new = make(m)
    for n in list(new._parameters):
        if n in m._parameters:
            new._parameters[n] = m._parameters[n]
    for n in list(new._buffers):
        if n in m._buffers:
            new._buffers[n] = m._buffers[n]
    new.train(m.training)
    return new


@overload
def convert(module: nn.Module, *, return_skipped: Literal[False] = False) -> nn.Module: ...
@overload
def convert(module: nn.Module, *, return_skipped: Literal[True]
            ) -> tuple[nn.Module, list[_Skipped]]: ...
@overload
def convert(module: nn.Module, *, return_skipped: bool
            ) -> nn.Module | tuple[nn.Module, list[_Skipped]]: ...


def convert(module: nn.Module, *, return_skipped: bool = False
            ) -> nn.Module | tuple[nn.Module, list[_Skipped]]:
    """`module` with every torch.nn normalization layer in it (BatchNorm1d/2d/3d, SyncBatchNorm,
    InstanceNorm1d/2d/3d, GroupNorm, LayerNorm, RMSNorm, LocalResponseNorm, and torchvision's
    FrozenBatchNorm2d) replaced, in place, by normkit.torch's, which takes over its tensors.
    Returns the module (a new one when `module` itself is a norm layer), and with
    return_skipped=True also the list of (name, module, reason) of the norm layers left as
    they are (each also reported by a ConversionWarning)."""
    skipped: list[_Skipped] = []
    done: dict[int, nn.Module] = {}

    def swap(m: nn.Module, name: str) -> nn.Module:
        if id(m) in done:  # one module under two names stays one module
            return done[id(m)]
        make, reason = _maker(m)
        if make is not None:
            new = done[id(m)] = _replacement(m, make)
            return new
        if reason is not None:
            skipped.append((name or type(m).__name__, m, reason))
            warnings.warn(f"normkit.torch.convert left {name or 'the module'} ({type(m).__name__}) as it is: "
                          f"{reason}", ConversionWarning, stacklevel=3)
        for child_name, child in list(m._modules.items()):
            if child is not None:
                m._modules[child_name] = swap(child, f"{name}.{child_name}" if name else child_name)
        done[id(m)] = m
        return m

    out = swap(module, "")
    return (out, skipped) if return_skipped else out
