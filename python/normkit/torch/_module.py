"""NormModule: a normkit layer as a torch.nn.Module whose parameters and buffers are the layer's.

The module registers each of the layer's parameters as an nn.Parameter and each buffer as a
registered buffer, made with torch.from_numpy on the layer's own arrays, so they share memory:
an optimizer's in-place step, load_state_dict's copy_ and the core's in-place running-statistics
updates all act on the same memory. Whatever replaces a tensor (.double(), .to(), `p.data = ...`,
a deepcopy) is caught at the next forward: _nk_sync re-points the layer's attributes at NumPy
views of the module's current tensors (a cached view per tensor, checked by identity and data
pointer: a few attribute reads per call) and sets the layer's dtype from them.

Hyperparameters (eps, momentum, r_max, use_batch_stats, ...) are the layer's: reading or
setting them on the module reads or sets (and checks) the layer's.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch.types import Device

from .. import _checks
from . import _bridge
from ._function import NormFunction

if TYPE_CHECKING:
    from ..layers.base import NormLayer

_NOT_FORWARDED = frozenset({"training", "grads", "dtype", "layout", "posterior"})


class NormModule(torch.nn.Module):
    """Base of every normkit.torch module: `self._nk` is the normkit layer it runs."""

    _channels_last = False  # the layer reads (N, *spatial, C) memory (normkit's layout="NHWC")
    # Set with object.__setattr__ in __init__ (plain attributes, not torch state):
    _nk: NormLayer
    _nk_views: dict[str, tuple[torch.Tensor, int, npt.NDArray[Any]]]  # (tensor, data_ptr, view)
    _nk_forwarded: frozenset[str]

    def __init__(self, layer: NormLayer, device: Device = None) -> None:
        _bridge.check_device(device)
        torch.nn.Module.__init__(self)  # not a torch layer's __init__ (a subclass's): it would make its own tensors
        object.__setattr__(self, "_nk", layer)
        object.__setattr__(self, "_nk_views", {})
        for n in layer._param_names:
            a = getattr(layer, n)
            self.register_parameter(n, None if a is None else torch.nn.Parameter(torch.from_numpy(a)))
        for n in layer._buffer_names:
            a = getattr(layer, n)
            self.register_buffer(n, None if a is None else torch.from_numpy(a))
        cls = type(layer)
        props = {n for n in dir(cls) if isinstance(getattr(cls, n, None), property)}
        public = {n for n in list(vars(layer)) + list(props) if not n.startswith("_")}
        object.__setattr__(self, "_nk_forwarded",
                           frozenset(public - _NOT_FORWARDED - set(layer._param_names) - set(layer._buffer_names)))

    # -- the layer's hyperparameters as the module's attributes ----------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            fwd = self.__dict__.get("_nk_forwarded", ())
            if name in fwd:
                return getattr(self.__dict__["_nk"], name)
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_nk_forwarded", ()):
            setattr(self._nk, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return self._nk.extra_repr()

    # -- keeping the layer on the module's current tensors ---------------------------------
    def _nk_tensor(self, name: str) -> torch.Tensor | None:
        return self._parameters[name] if name in self._parameters else self._buffers.get(name)

    def _nk_sync(self, input_dtype: np.dtype[Any] | None = None) -> NormLayer:
        """The layer, with its arrays the module's current tensors and its mode the module's."""
        layer = self._nk
        layer.training = self.training
        views = self._nk_views
        dtype: np.dtype[Any] | None = None
        for name in layer._param_names + layer._buffer_names:
            t = self._nk_tensor(name)
            if t is None:
                if getattr(layer, name) is not None:
                    setattr(layer, name, None)
                continue
            cached = views.get(name)
            if cached is not None and cached[0] is t and cached[1] == t.data_ptr():
                a = cached[2]
            else:
                a = self._nk_view(name, t)
                views[name] = (t, t.data_ptr(), a)
            setattr(layer, name, a)
            if dtype is None and a.dtype.kind == "f":
                dtype = a.dtype
        if dtype is None and input_dtype is not None:  # no float state: the input's family
            dtype = _checks.param_dtype(input_dtype)
        if dtype is not None and dtype != layer.dtype:
            layer._set_dtype(dtype)
        return layer

    def _nk_view(self, name: str, t: torch.Tensor) -> npt.NDArray[Any]:
        if t.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor (normkit.torch runs on the CPU), got one on {t.device}")
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float32 or float64 (normkit keeps parameters and statistics "
                            f"in float32 or float64, and computes float16 and bfloat16 inputs in float32; "
                            f"convert the input, not the module), got {t.dtype}")
        return _bridge.numpy_view(t)

    def _nk_grad_tensors(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the layer's parameters that exist, in the layer's order."""
        return [(n, p) for n in self._nk._param_names if (p := self._parameters.get(n)) is not None]

    # -- a call -----------------------------------------------------------------------------
    def _nk_prepare(self, x: torch.Tensor) -> tuple[NormLayer, npt.NDArray[Any], bool]:
        """(layer, x's NumPy view, whether it is the channels-last view), the layer synced."""
        xv, nhwc = _bridge.input_view(x, self._channels_last)
        layer = self._nk_sync(xv.dtype)
        if self._channels_last:  # (NormLayer has no layout: these modules' layers all have one)
            layer.layout = "NHWC" if nhwc else "NCHW"  # type: ignore[attr-defined]
        return layer, xv, nhwc

    def _nk_call(self, layer: NormLayer, xv: npt.NDArray[Any], extras: tuple[Any, ...],
                 diff: Sequence[npt.NDArray[Any]]) -> npt.NDArray[Any]:
        """The layer's forward on NumPy arguments (variants with extra inputs override it)."""
        return layer(xv, *extras)

    def _nk_extra_outputs(self, layer: NormLayer) -> tuple[torch.Tensor, ...] | None:
        """Tensors the Function returns after y (BKN's posterior), or None."""
        return None

    def _nk_backward(self, layer: NormLayer, dy: npt.NDArray[Any], douts: tuple[torch.Tensor, ...]
                     ) -> npt.NDArray[Any]:
        return layer.backward(dy)

    def _nk_extra_grads(self, layer: NormLayer, n_diff: int) -> list[torch.Tensor]:
        """Gradients of the differentiable extra inputs, as tensors (BKN's prior)."""
        return []

    def _nk_forward(self, x: object, extras: tuple[Any, ...] = (),
                    diff: tuple[torch.Tensor, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Runs the layer on x (and `extras`, NumPy arguments; `diff`, differentiable extra
        tensors): through NormFunction when autograd needs it, else directly."""
        x = _bridge.cpu_tensor(x, "input")
        params = self._nk_grad_tensors()
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for _, p in params)
                                        or any(t.requires_grad for t in diff)):
            names = [n for n, _ in params]
            # (torch's Function.apply has no annotations; untyped_calls_exclude does not reach
            # it through our subclass)
            result: torch.Tensor | tuple[torch.Tensor, ...] = (
                NormFunction.apply(  # type: ignore[no-untyped-call]
                    self, extras, names, x, *[p for _, p in params], *diff))
            return result
        layer, xv, nhwc = self._nk_prepare(x)
        y = self._nk_call(layer, xv, extras, [_bridge.numpy_view(t) for t in diff])
        layer._saved = None  # no backward will come: let x go
        out = _bridge.output_tensor(y, nhwc)
        extra = self._nk_extra_outputs(layer)
        return out if extra is None else (out,) + extra

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # No extra outputs: the modules with some override forward.
        return cast(torch.Tensor, self._nk_forward(input))

    # -- state -----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._nk_after_load()

    def _nk_after_load(self) -> None:
        """Layers whose load_state_dict does more than copy (CBN empties its window, MBN resets
        its per-modality counts) get it run on their own (just loaded) state."""
        from ..layers.base import NormLayer
        layer = self._nk
        if type(layer).load_state_dict is not NormLayer.load_state_dict:
            self._nk_sync()
            layer.load_state_dict(OrderedDict((k, np.array(v)) for k, v in layer._state().items()))

    def reset_running_stats(self) -> None:
        self._nk_sync()
        # (only the layers with running statistics have it: on others, AttributeError)
        self._nk.reset_running_stats()  # type: ignore[attr-defined]


def signature_of(layer_cls: type[NormLayer], drop: Container[str] = ("layout",),
                 add_device: bool = True) -> inspect.Signature:
    """The normkit constructor's signature, without `drop`, with torch's device and dtype."""
    sig = inspect.signature(layer_cls.__init__)
    params = [p for n, p in sig.parameters.items() if n not in drop and n != "dtype"]
    params.append(inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None))
    params.append(inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, default=None))
    return sig.replace(parameters=params)
