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
import inspect
from collections import OrderedDict

import numpy as np
import torch

from .. import _checks
from . import _bridge
from ._function import NormFunction

_NOT_FORWARDED = frozenset({"training", "grads", "dtype", "layout", "posterior"})


class NormModule(torch.nn.Module):
    """Base of every normkit.torch module: `self._nk` is the normkit layer it runs."""

    _channels_last = False  # the layer reads (N, *spatial, C) memory (normkit's layout="NHWC")

    def __init__(self, layer, device=None):
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
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            fwd = self.__dict__.get("_nk_forwarded", ())
            if name in fwd:
                return getattr(self.__dict__["_nk"], name)
            raise

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_nk_forwarded", ()):
            setattr(self._nk, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self):
        return self._nk.extra_repr()

    # -- keeping the layer on the module's current tensors ---------------------------------
    def _nk_tensor(self, name):
        return self._parameters[name] if name in self._parameters else self._buffers.get(name)

    def _nk_sync(self, input_dtype=None):
        """The layer, with its arrays the module's current tensors and its mode the module's."""
        layer = self._nk
        layer.training = self.training
        views = self._nk_views
        dtype = None
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

    def _nk_view(self, name, t):
        if t.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor (normkit.torch runs on the CPU), got one on {t.device}")
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float32 or float64 (normkit keeps parameters and statistics "
                            f"in float32 or float64, and computes float16 and bfloat16 inputs in float32; "
                            f"convert the input, not the module), got {t.dtype}")
        return _bridge.numpy_view(t)

    def _nk_grad_tensors(self):
        """(name, parameter) of the layer's parameters that exist, in the layer's order."""
        return [(n, self._parameters[n]) for n in self._nk._param_names if self._parameters.get(n) is not None]

    # -- a call -----------------------------------------------------------------------------
    def _nk_prepare(self, x):
        """(layer, x's NumPy view, whether it is the channels-last view), the layer synced."""
        xv, nhwc = _bridge.input_view(x, self._channels_last)
        layer = self._nk_sync(xv.dtype)
        if self._channels_last:
            layer.layout = "NHWC" if nhwc else "NCHW"
        return layer, xv, nhwc

    def _nk_call(self, layer, xv, extras, diff):
        """The layer's forward on NumPy arguments (variants with extra inputs override it)."""
        return layer(xv, *extras)

    def _nk_extra_outputs(self, layer):
        """Tensors the Function returns after y (BKN's posterior), or None."""
        return None

    def _nk_backward(self, layer, dy, douts):
        return layer.backward(dy)

    def _nk_extra_grads(self, layer, n_diff):
        """Gradients of the differentiable extra inputs, as tensors (BKN's prior)."""
        return []

    def _nk_forward(self, x, extras=(), diff=()):
        """Runs the layer on x (and `extras`, NumPy arguments; `diff`, differentiable extra
        tensors): through NormFunction when autograd needs it, else directly."""
        x = _bridge.cpu_tensor(x, "input")
        params = self._nk_grad_tensors()
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for _, p in params)
                                        or any(t.requires_grad for t in diff)):
            names = [n for n, _ in params]
            return NormFunction.apply(self, extras, names, x, *[p for _, p in params], *diff)
        layer, xv, nhwc = self._nk_prepare(x)
        y = self._nk_call(layer, xv, extras, [_bridge.numpy_view(t) for t in diff])
        layer._saved = None  # no backward will come: let x go
        out = _bridge.output_tensor(y, nhwc)
        extra = self._nk_extra_outputs(layer)
        return out if extra is None else (out,) + extra

    def forward(self, input):
        return self._nk_forward(input)

    # -- state -----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._nk_after_load()

    def _nk_after_load(self):
        """Layers whose load_state_dict does more than copy (CBN empties its window, MBN resets
        its per-modality counts) get it run on their own (just loaded) state."""
        from ..layers.base import NormLayer
        layer = self._nk
        if type(layer).load_state_dict is not NormLayer.load_state_dict:
            self._nk_sync()
            layer.load_state_dict(OrderedDict((k, np.array(v)) for k, v in layer._state().items()))

    def reset_running_stats(self):
        self._nk_sync()
        self._nk.reset_running_stats()


def signature_of(layer_cls, drop=("layout",), add_device=True):
    """The normkit constructor's signature, without `drop`, with torch's device and dtype."""
    sig = inspect.signature(layer_cls.__init__)
    params = [p for n, p in sig.parameters.items() if n not in drop and n != "dtype"]
    params.append(inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None))
    params.append(inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, default=None))
    return sig.replace(parameters=params)
