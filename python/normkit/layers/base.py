"""The state every layer shares: parameters, buffers, mode, saved forward, state_dict."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine

if TYPE_CHECKING:
    from typing_extensions import Self


class NormLayer:
    """Base of every normkit layer: torch.nn.Module's conventions on NumPy arrays.

    Subclasses register parameters (learnable, e.g. weight and bias) and buffers (running
    statistics) by name, implement `_forward(x)` returning (y, Saved), and say which
    parameters the backward produces gradients for.
    """

    dtype: np.dtype[Any]  # set by _set_dtype
    _param_bits: int
    # Registered by name (_param) by the layers with an affine, None when it is off (layers with
    # other parameters, or none, never register them).
    weight: npt.NDArray[Any] | None
    bias: npt.NDArray[Any] | None
    # What the last forward saved for the backward: each layer's own kind (an _engine.Saved, a
    # variant's saved fold, ...), None before a forward.
    _saved: Any

    if TYPE_CHECKING:
        def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], Any]:
            """(y, what the backward needs): every layer's own."""

    def __init__(self) -> None:
        self.training = True
        self.grads: dict[str, npt.NDArray[Any]] = {}
        self._param_names: list[str] = []
        self._buffer_names: list[str] = []
        self._saved = None

    def _set_dtype(self, dtype: npt.DTypeLike) -> None:
        """The layer's parameter dtype, and its width in bits for forward_fast's check."""
        self.dtype = _checks.float_dtype_arg(dtype)
        self._param_bits = self.dtype.itemsize * 8

    # -- registration -------------------------------------------------------------------
    def _param(self, name: str, value: npt.NDArray[Any] | None) -> None:
        setattr(self, name, value)
        self._param_names.append(name)

    def _buffer(self, name: str, value: npt.NDArray[Any] | None) -> None:
        setattr(self, name, value)
        self._buffer_names.append(name)

    # -- torch.nn.Module conventions ----------------------------------------------------
    def __call__(self, x: npt.NDArray[Any], *args: Any, **kwargs: Any) -> npt.NDArray[Any]:
        if args or kwargs:  # a variant's extra inputs (forward(x, modality), ...)
            return self.forward(x, *args, **kwargs)
        return self.forward(x)  # no argument packing: 0.15 us of a 2.5 us small-layer call

    def train(self, mode: bool = True) -> Self:
        self.training = bool(mode)
        return self

    def eval(self) -> Self:
        return self.train(False)

    def parameters(self) -> dict[str, npt.NDArray[Any]]:
        """Learnable arrays by name (the arrays themselves, so in-place updates train the layer)."""
        return {n: getattr(self, n) for n in self._param_names if getattr(self, n) is not None}

    def _state(self) -> OrderedDict[str, npt.NDArray[Any]]:
        """Parameters and buffers under torch's keys, the arrays themselves."""
        out: OrderedDict[str, npt.NDArray[Any]] = OrderedDict()
        for n in self._param_names + self._buffer_names:
            v = getattr(self, n)
            if v is not None:
                out[n] = v
        return out

    def state_dict(self) -> OrderedDict[str, npt.NDArray[Any]]:
        """Parameters and buffers under torch's keys, as copies."""
        return OrderedDict((n, np.array(v, copy=True)) for n, v in self._state().items())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Self:
        """Copy arrays (NumPy, or anything np.asarray takes, e.g. torch tensors) into the layer.

        Strict by default, like torch: missing or unexpected keys raise normkit's StateDictError
        (a ValueError, and a KeyError); a wrong shape raises ValueError, a non-numeric dtype
        TypeError. Nothing is written unless every entry is valid.
        """
        staged = _checks.state_dict_entries(self._state(), state_dict, strict)
        for k, v in staged.items():
            np.copyto(getattr(self, k), v, casting="unsafe")
        return self

    # -- copy.deepcopy and pickle --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """The layer's attributes without what the last forward saved for its backward (views of
        its input, the core's state, closures over this layer): a copy, like a deepcopy of a
        torch module, carries no autograd state and needs its own forward before a backward."""
        state = self.__dict__.copy()
        state["_saved"] = None
        return state

    # -- forward / backward -------------------------------------------------------------
    def forward(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        y, self._saved = self._forward(x)
        return y

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Gradient w.r.t. the input of the last forward; parameter gradients go to `grads`."""
        saved: _core.Saved | None = self._saved  # the core's, from every layer that runs this
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
            assert self.weight is not None  # dw only when want has it
            self.grads["weight"] = dw.reshape(self.weight.shape)
        if db is not None:
            assert self.bias is not None
            self.grads["bias"] = db.reshape(self.bias.shape)
        return dx

    def _grad_names(self) -> list[str]:
        return [n for n in ("weight", "bias") if getattr(self, n, None) is not None]

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
