"""The autograd Function every normkit.torch module runs through.

forward calls the normkit layer on NumPy views of the tensors and keeps the layer's saved state
(layer._saved) in ctx, so each call has its own and two forwards before one backward work;
backward puts that state back on the layer for the one layer.backward call, and hands out the
parameter gradients (and those of differentiable extra inputs, BKN's prior) from layer.grads.
The module supplies the layer-specific parts (_nk_call, _nk_backward, ...; see _module.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from . import _bridge

if TYPE_CHECKING:
    from ._module import NormModule


class NormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, mod: NormModule, extras: tuple[Any, ...], names: list[str],
                x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """tensors: the parameters named in `names`, then the differentiable extra inputs."""
        layer, xv, nhwc = mod._nk_prepare(x)
        diff = tensors[len(names):]
        y = mod._nk_call(layer, xv, extras, [_bridge.numpy_view(t) for t in diff])
        ctx.state, layer._saved = layer._saved, None  # this call's saved forward, not the layer's
        ctx.mod, ctx.nhwc = mod, nhwc
        ctx.meta = [(n, p.dtype, p.shape) for n, p in zip(names, tensors)]
        ctx.diff_meta = [(t.dtype, t.shape) for t in diff]
        ctx.save_for_backward(x)  # only for autograd's check that x is not changed in place
        outs = mod._nk_extra_outputs(layer)
        if outs is None:
            return _bridge.output_tensor(y, nhwc)
        return (_bridge.output_tensor(y, nhwc),) + outs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor, *douts: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        ctx.saved_tensors  # raises if x was modified in place since the forward
        mod = ctx.mod
        layer = mod._nk
        prev, layer._saved = layer._saved, ctx.state
        try:
            dx = mod._nk_backward(layer, _bridge.grad_view(dy, ctx.nhwc), douts)
        finally:
            layer._saved = prev
        grads = layer.grads
        out: list[torch.Tensor | None] = [None, None, None, _bridge.output_tensor(dx, ctx.nhwc)]
        for name, dtype, shape in ctx.meta:
            g = grads.get(name)
            out.append(None if g is None else _bridge.tensor_view(g).reshape(shape).to(dtype))
        out.extend(g if g is None else g.reshape(shape).to(dtype)
                   for g, (dtype, shape) in zip(mod._nk_extra_grads(layer, len(ctx.diff_meta)), ctx.diff_meta))
        return tuple(out)
