"""The state every layer shares: parameters, buffers, mode, saved forward, state_dict."""
from collections import OrderedDict

import numpy as np

from .. import _checks, _core, _engine


class NormLayer:
    """Base of every normkit layer: torch.nn.Module's conventions on NumPy arrays.

    Subclasses register parameters (learnable, e.g. weight and bias) and buffers (running
    statistics) by name, implement `_forward(x)` returning (y, Saved), and say which
    parameters the backward produces gradients for.
    """

    def __init__(self):
        self.training = True
        self.grads = {}
        self._param_names = []
        self._buffer_names = []
        self._saved = None

    def _set_dtype(self, dtype):
        """The layer's parameter dtype, and its width in bits for forward_fast's check."""
        self.dtype = _checks.float_dtype_arg(dtype)
        self._param_bits = self.dtype.itemsize * 8

    # -- registration -------------------------------------------------------------------
    def _param(self, name, value):
        setattr(self, name, value)
        self._param_names.append(name)

    def _buffer(self, name, value):
        setattr(self, name, value)
        self._buffer_names.append(name)

    # -- torch.nn.Module conventions ----------------------------------------------------
    def __call__(self, x, *args, **kwargs):
        if args or kwargs:  # a variant's extra inputs (forward(x, modality), ...)
            return self.forward(x, *args, **kwargs)
        return self.forward(x)  # no argument packing: 0.15 us of a 2.5 us small-layer call

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        """Learnable arrays by name (the arrays themselves, so in-place updates train the layer)."""
        return {n: getattr(self, n) for n in self._param_names if getattr(self, n) is not None}

    def _state(self):
        """Parameters and buffers under torch's keys, the arrays themselves."""
        out = OrderedDict()
        for n in self._param_names + self._buffer_names:
            v = getattr(self, n)
            if v is not None:
                out[n] = v
        return out

    def state_dict(self):
        """Parameters and buffers under torch's keys, as copies."""
        return OrderedDict((n, np.array(v, copy=True)) for n, v in self._state().items())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays (NumPy, or anything np.asarray takes, e.g. torch tensors) into the layer.

        Strict by default, like torch: missing or unexpected keys raise normkit's StateDictError
        (a ValueError, and a KeyError); a wrong shape raises ValueError, a non-numeric dtype
        TypeError. Nothing is written unless every entry is valid.
        """
        staged = _checks.state_dict_entries(self._state(), state_dict, strict)
        for k, v in staged.items():
            np.copyto(getattr(self, k), v, casting="unsafe")
        return self

    # -- forward / backward -------------------------------------------------------------
    def forward(self, x):
        y, self._saved = self._forward(x)
        return y

    def backward(self, dy):
        """Gradient w.r.t. the input of the last forward; parameter gradients go to `grads`."""
        saved = self._saved
        if saved is None:
            raise _checks.StateError(
                f"backward: expected a forward call first, got none on this {type(self).__name__}")
        want = self._grad_names()
        # The common case in one call (a plain dy of the forward's dtype and shape); else None,
        # and the Python path checks dy and says what is wrong.
        fast = _core.backward_fast(saved, dy, "weight" in want, "bias" in want)
        if fast is not None:
            dx, dw, db = fast
        else:
            dy = _checks.grad_output(dy, saved.shape, saved.x.dtype).reshape(saved.x.shape)
            dx, dw, db = _engine.backward(saved, dy, "weight" in want, "bias" in want)
        self.grads = {}
        if dw is not None:
            self.grads["weight"] = dw.reshape(self.weight.shape)
        if db is not None:
            self.grads["bias"] = db.reshape(self.bias.shape)
        return dx

    def _grad_names(self):
        return [n for n in ("weight", "bias") if getattr(self, n, None) is not None]

    def extra_repr(self):
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"
