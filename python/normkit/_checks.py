"""Argument checks shared by the functional API and the layers.

Every check runs before any computation, so a rejected call never writes into a caller's array
(running statistics, parameters, num_batches_tracked). Every message reads
"<argument>: expected <what>, got <what>"; TypeError for a wrong type or dtype, ValueError for a
wrong value or shape. The checks are O(1) or O(channels): nothing here touches every element.
"""
from __future__ import annotations

import numbers
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import numpy as np
import numpy.typing as npt

_T = TypeVar("_T")

# Parameters, running statistics and their gradients are float32 or float64; inputs may also be
# float16 or bfloat16, stored as such and computed in float32 (their parameters are float32).
COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_STATIC_INPUT_DTYPES = COMPUTE_DTYPES + (np.dtype(np.float16),)


def bfloat16() -> np.dtype[Any] | None:
    """ml_dtypes.bfloat16 once ml_dtypes is imported, else None. An array of it cannot exist
    before, so normkit never imports ml_dtypes itself: that import takes about 1 s (0.7.0 with
    NumPy 2.4), most of what `import normkit` took."""
    module = sys.modules.get("ml_dtypes")
    return None if module is None else np.dtype(module.bfloat16)


def is_half(dtype: np.dtype[Any]) -> bool:
    """float16, or bfloat16: a storage type computed in float32."""
    return dtype == np.float16 or (dtype not in COMPUTE_DTYPES and dtype == bfloat16())


def is_input_dtype(dtype: np.dtype[Any]) -> bool:
    """float32, float64, float16 or bfloat16 (native byte order)."""
    return dtype in _STATIC_INPUT_DTYPES or dtype == bfloat16()


_FLOAT_NAMES = "float32 or float64"
_INPUT_NAMES = "float32, float64, float16 or bfloat16"


def param_dtype(input_dtype: npt.DTypeLike) -> np.dtype[Any]:
    """The dtype of the parameters, statistics and gradients that go with an input dtype."""
    dtype = np.dtype(input_dtype)
    return COMPUTE_DTYPES[0] if is_half(dtype) else dtype


def machine_eps(dtype: np.dtype[Any]) -> float:
    """finfo(dtype).eps, bfloat16 included (rms_norm's default eps, as torch)."""
    if dtype != np.float16 and is_half(dtype):  # bfloat16: ml_dtypes is imported
        return float(sys.modules["ml_dtypes"].finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


_MACHINE_EPS: dict[np.dtype[Any], float | None] = {}


def machine_eps_of(x: object) -> float | None:
    """machine_eps of an array's dtype, cached per dtype (None for anything else)."""
    if not isinstance(x, np.ndarray):
        return None
    try:
        return _MACHINE_EPS[x.dtype]
    except KeyError:
        eps = _MACHINE_EPS[x.dtype] = machine_eps(x.dtype) if is_input_dtype(x.dtype) else None
        return eps


class StateError(ValueError, RuntimeError):
    """A call the layer's state does not allow (backward before any forward).

    A ValueError like every normkit argument error, and a RuntimeError like torch's autograd error.
    """


class StateDictError(ValueError, KeyError):
    """load_state_dict with missing or unexpected keys (torch raises RuntimeError).

    A ValueError like every normkit argument error, and a KeyError for callers written against
    the first version of normkit.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


# -- arrays -----------------------------------------------------------------------------------
def ndarray(x: object, name: str) -> npt.NDArray[Any]:
    """x itself, if it is a plain numpy.ndarray (subclasses that change indexing or hide data,
    such as masked arrays, are refused)."""
    if not isinstance(x, np.ndarray) or isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    return x


def float_dtype(x: npt.NDArray[Any], name: str, dtype: npt.DTypeLike | None = None,
                whose: str = "the input's") -> None:
    """x's dtype is float32/float64 in native byte order (and exactly `dtype` when given)."""
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{name}: expected dtype {_FLOAT_NAMES}, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)} ({whose}), got {x.dtype}")


def input_dtype(x: npt.NDArray[Any], name: str, param: npt.DTypeLike | None = None) -> None:
    """An input's dtype is float32/64, float16 or bfloat16 in native byte order; with `param`
    (a layer's dtype), one whose parameters are of that dtype (float32 takes the half types)."""
    if not is_input_dtype(x.dtype):
        raise TypeError(f"{name}: expected dtype {_INPUT_NAMES}, got {x.dtype}")
    if param is not None and param_dtype(x.dtype) != param:
        also = ", float16 or bfloat16" if param == COMPUTE_DTYPES[0] else ""
        raise TypeError(f"{name}: expected dtype {np.dtype(param)}{also} (the layer's dtype), got {x.dtype}")


def contiguous(a: npt.NDArray[Any], dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any]:
    """a as an aligned, C-contiguous base-class ndarray: itself when it already is, else a copy
    (strided, negative-stride, Fortran-order, broadcast and misaligned arrays are copied; the core
    reads plain contiguous memory only)."""
    if (type(a) is np.ndarray and a.flags.c_contiguous and a.flags.aligned
            and (dtype is None or a.dtype == dtype)):
        return a  # the common case, without np.require's per-call cost
    return np.require(a, dtype, ("C", "A", "E"))


def input_array(x: npt.NDArray[Any], name: str = "input", min_ndim: int = 1) -> npt.NDArray[Any]:
    """The input as a C-contiguous array of an input dtype (a copy only when it is not already)."""
    ndarray(x, name)
    input_dtype(x, name)
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {x.shape}")
    return contiguous(x)


def layer_input(x: npt.NDArray[Any], dtype: npt.DTypeLike | None,
                ndims: Collection[int] | None = None, min_ndim: int = 1,
                channels: int | None = None, channel_dim: int = 1, ranks: str = "",
                channels_arg: str = "num_features", name: str = "input") -> npt.NDArray[Any]:
    """A layer's input: an ndarray of the layer's dtype whose rank is in `ndims` (or at least
    `min_ndim`) and, when `channels` is given, with that many channels in `channel_dim`.
    Returns x unchanged (the functional call makes it contiguous)."""
    ndarray(x, name)
    input_dtype(x, name)
    if ndims is not None and x.ndim not in ndims:
        want = " or ".join(f"{d}D" for d in ndims)
        raise ValueError(f"{name}: expected {want} input{ranks}, got {x.ndim}D input of shape {x.shape}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions{ranks}, got shape {x.shape}")
    if channels is not None and x.shape[channel_dim] != channels:
        raise ValueError(f"{name}: expected {channels} channels in dim {channel_dim} "
                         f"({channels_arg}), got shape {x.shape}")
    input_dtype(x, name, dtype)
    return x


def param_array(p: npt.NDArray[Any] | None, name: str, shape: Sequence[int],
                dtype: npt.DTypeLike) -> npt.NDArray[Any] | None:
    """An optional parameter (weight, bias) of exactly `shape` and `dtype` (param_dtype of the
    input's), contiguous."""
    if p is None:
        return None
    ndarray(p, name)
    float_dtype(p, name, dtype)
    if p.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {p.shape}")
    return contiguous(p)


def stats_array(s: npt.NDArray[Any] | None, name: str, length: int, writable: bool,
                dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any] | None:
    """A running-statistics buffer of shape (length,) and the input's dtype, updated in place
    (so any strides are fine, but it must be writable when it will be updated)."""
    if s is None:
        return None
    ndarray(s, name)
    float_dtype(s, name, dtype)
    if s.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {s.shape}")
    if writable and not s.flags.writeable:
        raise ValueError(f"{name}: expected a writable array (it is updated in place), got a read-only one")
    return s


def separate(a: npt.NDArray[Any] | None, name_a: str, b: npt.NDArray[Any] | None,
             name_b: str) -> None:
    """Two buffers that are both updated in place must not share memory."""
    if a is not None and b is not None and np.shares_memory(a, b):
        raise ValueError(f"{name_b}: expected an array separate from {name_a}, got one sharing its memory")


def required(v: _T | None, name: str, when: str) -> _T:
    if v is None:
        raise ValueError(f"{name}: expected an array when {when}, got None")
    return v


def no_affine_on_empty(weight: npt.NDArray[Any] | None, bias: npt.NDArray[Any] | None,
                       x: npt.NDArray[Any], what: str) -> None:
    """torch cannot apply weight/bias to an input without (sample, channel) planes (C == 0 for
    batch_norm; N*C == 0 for instance_norm): it raises, so normkit does too. Call it only then."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            raise ValueError(f"{name}: expected None for input of shape {x.shape} ({what}; torch "
                             f"rejects an affine there too), got an array of shape {p.shape}")


def grad_output(dy: npt.NDArray[Any], shape: Sequence[int],
                dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """dy of a backward: exactly the shape and dtype of the last forward's output."""
    ndarray(dy, "dy")
    if dy.dtype != dtype:
        raise TypeError(f"dy: expected dtype {np.dtype(dtype)} (the last forward's output), got {dy.dtype}")
    if dy.shape != tuple(shape):
        raise ValueError(f"dy: expected shape {tuple(shape)} (the last forward's output), got {dy.shape}")
    return contiguous(dy)


def more_than_one_value(count: int, what: str = "channel",
                        shape: Sequence[int] | None = None) -> None:
    """torch's training check: statistics of a single value are not statistics."""
    if count == 1:
        got = f"input of shape {tuple(shape)}" if shape is not None else f"{count}"
        raise ValueError(f"input: expected more than 1 value per {what} when training, got {got}")


# -- layout and fused inference epilogue ----------------------------------------------------
LAYOUTS = ("NCHW", "NHWC")


def layout_arg(layout: str) -> str:
    """"NCHW" (channels in dim 1) or "NHWC" (channels last); never guessed from strides."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'NCHW' or 'NHWC', got {layout!r}")
    return layout


class Epilogue:
    """Where the output goes and what is fused into its pass: y (+ residual) (then ReLU)."""

    __slots__ = ("out", "residual", "relu")

    def __init__(self, out: npt.NDArray[Any] | None = None,
                 residual: npt.NDArray[Any] | None = None, relu: bool = False) -> None:
        self.out, self.residual, self.relu = out, residual, relu


PLAIN = Epilogue()


def epilogue(input: npt.NDArray[Any], x: npt.NDArray[Any], out: npt.NDArray[Any] | None,
             residual: npt.NDArray[Any] | None, activation: str | None,
             others: Iterable[tuple[str, npt.NDArray[Any] | None]] = ()) -> Epilogue:
    """Checks out=, residual= and activation= against the input (shape and dtype): out must be a
    writable C-contiguous array, either the input itself (in place) or sharing no memory with it
    or with the parameters and statistics in `others`; residual may be out itself."""
    if out is None and residual is None and activation is None:
        return PLAIN
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    for name, a in (("residual", residual), ("out", out)):
        if a is None:
            continue
        ndarray(a, name)
        if a.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the input's), got {a.dtype}")
        if a.shape != x.shape:
            raise ValueError(f"{name}: expected shape {x.shape} (the input's), got {a.shape}")
    if residual is not None:
        residual = contiguous(residual)
    if out is not None:
        if not out.flags.c_contiguous or not out.flags.aligned:
            raise ValueError("out: expected a C-contiguous array, got a strided one")
        if not out.flags.writeable:
            raise ValueError("out: expected a writable array, got a read-only one")
        for name, a in (("input", input), ("residual", residual)):
            if a is not None and np.shares_memory(out, a) and not _same_memory(out, a):
                raise ValueError(f"out: expected the {name} itself (in place) or an array sharing "
                                 f"no memory with it, got a partial overlap")
        for name, a in others:
            if a is not None and np.shares_memory(out, a):
                raise ValueError(f"out: expected an array sharing no memory with {name}")
    return Epilogue(out, residual, activation == "relu")


def _same_memory(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


# -- scalars ----------------------------------------------------------------------------------
def _real(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    return float(v)


def nonneg_float(v: object, name: str) -> float:
    """eps and friends: a finite number >= 0."""
    f = _real(v, name)
    if not np.isfinite(f) or f < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    return f


def number_at_least(v: object, name: str, low: float) -> float:
    """A real number >= low (r_max >= 1, d_max >= 0)."""
    f = _real(v, name)
    if not f >= low:
        raise ValueError(f"{name}: expected a number >= {low:g}, got {v!r}")
    return f


def number_in(v: object, name: str, low: float, high: float) -> float:
    """A real number in [low, high] (example_weight)."""
    f = _real(v, name)
    if not low <= f <= high:
        raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {v!r}")
    return f


@overload
def momentum_value(m: object, name: str = ..., *, allow_none: Literal[False]) -> float: ...
@overload
def momentum_value(m: object, name: str = ..., allow_none: bool = ...) -> float | None: ...
def momentum_value(m: object, name: str = "momentum", allow_none: bool = True) -> float | None:
    """A momentum in [0, 1]; None (a cumulative average) where the caller allows it."""
    if m is None:
        if allow_none:
            return None
        raise TypeError(f"{name}: expected a number in [0, 1], got None")
    f = _real(m, name)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"{name}: expected {'None or ' if allow_none else ''}a number in [0, 1], got {m!r}")
    return f


def positive_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer, got {type(v).__name__} {v!r}")
    if v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return int(v)


def nonneg_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 0, got {type(v).__name__} {v!r}")
    if v < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {v!r}")
    return int(v)


def divisor(groups: int, channels: int, name: str = "num_groups",
            of: str = "the input's channels") -> None:
    if channels % groups != 0:
        raise ValueError(f"{name}: expected a divisor of {of} ({channels}), got {groups}")


def float_dtype_arg(dtype: npt.DTypeLike | None, name: str = "dtype") -> np.dtype[Any]:
    """A layer's dtype argument; None is torch's default dtype (float32)."""
    if dtype is None:
        return np.dtype(np.float32)
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {_FLOAT_NAMES}, got {dtype!r}") from None
    if dt not in COMPUTE_DTYPES:
        raise TypeError(f"{name}: expected {_FLOAT_NAMES}, got {dt}")
    return dt


def normalized_shape_tuple(shape: object, name: str = "normalized_shape") -> tuple[int, ...]:
    """An int or a non-empty sequence of ints >= 0, as a tuple."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name}: expected an int or a sequence of ints, got {shape!r}")
    shape = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in shape):
        raise TypeError(f"{name}: expected an int or a sequence of ints, got {shape!r}")
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ValueError(f"{name}: expected at least one dimension, got {shape}")
    if any(d < 0 for d in shape):
        raise ValueError(f"{name}: expected dimensions >= 0, got {shape}")
    return shape


def check_trailing_shape(x: npt.NDArray[Any], shape: Sequence[int], name: str = "input") -> None:
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape):]) != tuple(shape):
        raise ValueError(f"{name}: expected shape (*, {', '.join(map(str, shape))}) ending in "
                         f"normalized_shape {tuple(shape)}, got {x.shape}")


# -- state dicts ------------------------------------------------------------------------------
def state_dict_entries(own: Mapping[str, npt.NDArray[Any]], state_dict: Mapping[str, Any],
                       strict: bool) -> dict[str, npt.NDArray[Any]]:
    """The entries of `state_dict` to copy into a layer whose current state is `own` (name ->
    array), each as a NumPy array of the right shape; raises before anything is copied.

    strict (torch's default): missing or unexpected keys raise StateDictError. Values may be
    NumPy arrays or anything np.asarray takes (torch tensors included); real numeric dtypes are
    cast on copy, as torch's copy_ does."""
    if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
        raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict.keys() if k not in own]
    if strict and (missing or unexpected):
        raise StateDictError(f"state_dict: expected the keys {list(own)}, got missing keys {missing} "
                             f"and unexpected keys {unexpected}")
    staged: dict[str, npt.NDArray[Any]] = {}
    for k, cur in own.items():
        if k not in state_dict:
            continue
        name = f"state_dict[{k!r}]"
        v = state_dict[k]
        try:
            if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor
                v = v.detach().cpu().numpy()
            v = np.asarray(v)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: expected an array, got {type(state_dict[k]).__name__} ({e})") from None
        real = np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)
        if v.dtype == np.bool_ or not real:
            raise TypeError(f"{name}: expected a real numeric array, got dtype {v.dtype}")
        if cur.shape == () and v.shape == (1,):  # torch accepts a 1-element 0-d buffer
            v = v.reshape(())
        if v.shape != cur.shape:
            raise ValueError(f"{name}: expected shape {cur.shape}, got {v.shape}")
        staged[k] = v
    return staged
