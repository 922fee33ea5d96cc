"""Argument checks shared by the functional API and the layers.

Every check runs before any computation, so a bad call never writes into a caller's array.
Messages name the argument and what was expected.
"""
import numbers

import numpy as np

COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def input_array(x, name="input", min_ndim=1):
    """The input as a C-contiguous float32/float64 array (a copy only when it is not already)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {x.shape}")
    return np.ascontiguousarray(x)


def param_array(p, name, shape, dtype):
    """An optional parameter (weight, bias) of exactly `shape` and `dtype`, contiguous."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(p).__name__}")
    if p.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)} (the input's), got {p.dtype}")
    if p.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {p.shape}")
    return np.ascontiguousarray(p)


def stats_array(s, name, length, writable):
    """A running-statistics buffer: float array of shape (length,), updated in place."""
    if s is None:
        return None
    if not isinstance(s, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(s).__name__}")
    if s.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {s.dtype}")
    if s.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {s.shape}")
    if writable and not s.flags.writeable:
        raise ValueError(f"{name}: is read-only but must be updated in place")
    return s


def positive_float(v, name, allow_zero=True):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {v}")
    return v


def momentum_value(m, name="momentum", allow_none=True):
    if m is None and allow_none:
        return None
    m = positive_float(m, name)
    return m


def positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return int(v)


def normalized_shape_tuple(shape, name="normalized_shape"):
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"{name}: dimensions must be non-negative, got {shape}")
    return shape


def check_trailing_shape(x, shape, name="input"):
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape):]) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape (*, {', '.join(map(str, shape))}) to end with normalized_shape "
            f"{tuple(shape)}, got {x.shape}")


def more_than_one_value(count, what="channel"):
    if count == 1:
        raise ValueError(f"Expected more than 1 value per {what} when training, got {count}")
