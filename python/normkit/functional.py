"""Stateless forward functions with torch.nn.functional's names, arguments and defaults.

Running statistics passed in are updated in place, as torch.nn.functional does.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _checks, _core, _engine

_Array = npt.NDArray[Any]
_F64 = npt.NDArray[np.float64]

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm",
           "weight_standardization", "weight_standardization_backward", "weight_centralization",
           "weight_centralization_backward"]


def _fast(kind: int, input: _Array, channels_last: bool, weight: _Array | None,
          bias: _Array | None, running_mean: _Array | None, running_var: _Array | None,
          batch_stats: bool, momentum: float, eps: float | None, groups: int = 0,
          normalized_shape: int | Iterable[int] | None = None, plain: bool = True) -> _Array | None:
    """The whole forward in one call for the common case (see _core.forward_fast); None when
    the call is anything else (strided input, out=, an invalid argument): the Python path."""
    if not plain:
        return None
    fast = _core.forward_fast(kind, input, -1, groups, normalized_shape, _engine.RANK_2_UP
                              if normalized_shape is None else _engine.ANY_RANK, channels_last,
                              weight, bias, running_mean, running_var, batch_stats, momentum, eps, 0)
    return None if fast is None else fast[0]


def _plain(layout: str, out: _Array | None, residual: _Array | None,
           activation: str | None) -> bool:
    """No epilogue and a valid layout: forward_fast's territory."""
    return (out is None and residual is None and activation is None
            and (layout == "NCHW" or layout == "NHWC"))


def _unbiased(var: _F64, count: int) -> _F64:
    return var * (count / (count - 1)) if count > 1 else var * np.nan


def _channel_args(input: _Array, running_mean: _Array | None, running_var: _Array | None,
                  weight: _Array | None, bias: _Array | None, batch_stats: bool, momentum: float,
                  eps: float, layout: str, flag: str
                  ) -> tuple[_Array, str, tuple[int, int, int], _Array | None, _Array | None,
                             _Array | None, _Array | None, float, float]:
    """The checks batch_norm and instance_norm share: per-channel weight, bias and running
    statistics of the input's parameter dtype; with batch statistics the running ones are updated
    in place (writable, separate), without them (`flag`=False) they are required."""
    x = _checks.input_array(input, "input", min_ndim=2)
    layout = _checks.layout_arg(layout)
    N, C, S = _engine.planes(x, layout)
    pdt = _checks.param_dtype(x.dtype)
    weight = _checks.param_array(weight, "weight", (C,), pdt)
    bias = _checks.param_array(bias, "bias", (C,), pdt)
    running_mean = _checks.stats_array(running_mean, "running_mean", C, batch_stats, pdt)
    running_var = _checks.stats_array(running_var, "running_var", C, batch_stats, pdt)
    if batch_stats:  # both are updated in place
        _checks.separate(running_mean, "running_mean", running_var, "running_var")
    momentum = _checks.momentum_value(momentum, allow_none=False)
    eps = _checks.nonneg_float(eps, "eps")
    if not batch_stats:
        _checks.required(running_mean, "running_mean", f"{flag}=False")
        _checks.required(running_var, "running_var", f"{flag}=False")
    return x, layout, (N, C, S), weight, bias, running_mean, running_var, momentum, eps


def batch_norm_impl(input: _Array, running_mean: _Array | None, running_var: _Array | None,
                    weight: _Array | None, bias: _Array | None, training: bool, momentum: float,
                    eps: float, layout: str = "NCHW", out: _Array | None = None,
                    residual: _Array | None = None, activation: str | None = None
                    ) -> tuple[_Array, _core.Saved]:
    """batch_norm's body; returns (y, Saved) so that the layers can run backward.

    Everything is checked first; the running statistics are updated last, after y exists, so a
    rejected call writes nothing. An empty batch (a zero-size dimension) gives an empty output and
    leaves the running statistics alone, as torch.
    """
    training = bool(training)
    x, layout, (N, C, S), weight, bias, running_mean, running_var, momentum, eps = _channel_args(
        input, running_mean, running_var, weight, bias, training, momentum, eps, layout, "training")
    if training:
        _checks.more_than_one_value(N * S, "channel", x.shape)
    if C == 0:
        _checks.no_affine_on_empty(weight, bias, x, "0 channels")
    ep = _checks.epilogue(input, x, out, residual, activation, (
        ("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)))
    plan = _engine.in_layout(_core.plan_per_channel(N, C, S), layout)
    if x.size == 0:
        return _engine.apply(plan, x, None, None, eps, weight, bias, training, x.shape, ep)
    if not training:  # one pass: the fold of the running statistics, then the fused apply
        return _engine.apply(plan, x, running_mean, running_var, eps, weight, bias, False, x.shape, ep)
    y, saved, var = _engine.apply_batch_stats(plan, x, eps, weight, bias, x.shape, ep)
    assert saved.mean is not None  # the batch's, just computed
    if running_mean is not None:
        _engine.running_update(running_mean, saved.mean, momentum)
    if running_var is not None:
        _engine.running_update(running_var, _unbiased(var, N * S), momentum)
    return y, saved


EXTRAS_DOC = """
    Keyword-only extras (not in torch): layout="NHWC" reads channels-last input (N, *spatial, C);
    out= writes the result into a given C-contiguous array (the input itself for in-place);
    residual= adds an array of the input's shape to the result, and activation="relu" applies
    ReLU after it, both fused into the output pass (inference blocks: norm + add + ReLU)."""


def batch_norm(input: _Array, running_mean: _Array | None, running_var: _Array | None,
               weight: _Array | None = None, bias: _Array | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, layout: str = "NCHW",
               out: _Array | None = None, residual: _Array | None = None,
               activation: str | None = None) -> _Array:
    """Batch normalization over (N, *spatial) per channel of an (N, C, *spatial) input."""
    y = _fast(_core.FAST_BATCH, input, layout == "NHWC", weight, bias, running_mean, running_var,
              bool(training), momentum, eps, plain=_plain(layout, out, residual, activation))
    if y is not None:
        return y
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps,
                           layout, out, residual, activation)[0]


if batch_norm.__doc__ is not None:  # None under python -OO
    batch_norm.__doc__ += EXTRAS_DOC


def instance_norm_impl(input: _Array, running_mean: _Array | None, running_var: _Array | None,
                       weight: _Array | None, bias: _Array | None, use_input_stats: bool,
                       momentum: float, eps: float, layout: str = "NCHW",
                       out: _Array | None = None, residual: _Array | None = None,
                       activation: str | None = None) -> tuple[_Array, _core.Saved]:
    """instance_norm's body; returns (y, Saved). Zero-size inputs follow torch (which runs
    batch_norm on the (1, N*C, *) view): an empty output; weight or bias with no (sample, channel)
    planes raises; running statistics are untouched when the planes are empty, and become NaN
    (the mean over no samples) when the batch is, as torch's do."""
    use_input_stats = bool(use_input_stats)
    x, layout, (N, C, S), weight, bias, running_mean, running_var, momentum, eps = _channel_args(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout,
        "use_input_stats")
    if use_input_stats:
        _checks.more_than_one_value(S, "(sample, channel) plane", x.shape)
    if N * C == 0:
        _checks.no_affine_on_empty(weight, bias, x, "no (sample, channel) planes")
    ep = _checks.epilogue(input, x, out, residual, activation, (
        ("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)))
    if not use_input_stats:
        plan = _engine.in_layout(_core.plan_per_channel(N, C, S), layout)
        return _engine.apply(plan, x, running_mean, running_var, eps, weight, bias, False, x.shape, ep)
    plan = _engine.in_layout(_core.plan_per_sample_group(N, C, S, C), layout)
    if x.size == 0:
        result = _engine.apply(plan, x, None, None, eps, weight, bias, True, x.shape, ep)
        if N == 0:  # torch: the running statistics become the mean over no samples
            for s in (running_mean, running_var):
                if s is not None:
                    s[...] = np.nan
        return result
    y, saved, var = _engine.apply_batch_stats(plan, x, eps, weight, bias, x.shape, ep)
    assert saved.mean is not None  # the batch's, just computed
    # torch: running stats move toward the batch average of the per-instance statistics.
    if running_mean is not None:
        _engine.running_update(running_mean, saved.mean.reshape(N, C).mean(axis=0), momentum)
    if running_var is not None:
        _engine.running_update(running_var, _unbiased(var, S).reshape(N, C).mean(axis=0), momentum)
    return y, saved


def instance_norm(input: _Array, running_mean: _Array | None = None,
                  running_var: _Array | None = None, weight: _Array | None = None,
                  bias: _Array | None = None, use_input_stats: bool = True, momentum: float = 0.1,
                  eps: float = 1e-5, *, layout: str = "NCHW", out: _Array | None = None,
                  residual: _Array | None = None, activation: str | None = None) -> _Array:
    """Instance normalization: each (sample, channel) plane on its own statistics."""
    y = _fast(_core.FAST_INSTANCE, input, layout == "NHWC", weight, bias, running_mean, running_var,
              bool(use_input_stats), momentum, eps, plain=_plain(layout, out, residual, activation))
    if y is not None:
        return y
    return instance_norm_impl(input, running_mean, running_var, weight, bias, use_input_stats,
                              momentum, eps, layout, out, residual, activation)[0]


if instance_norm.__doc__ is not None:  # None under python -OO
    instance_norm.__doc__ += EXTRAS_DOC


def group_norm_impl(input: _Array, num_groups: int, weight: _Array | None, bias: _Array | None,
                    eps: float, layout: str = "NCHW", out: _Array | None = None,
                    residual: _Array | None = None, activation: str | None = None
                    ) -> tuple[_Array, _core.Saved]:
    x = _checks.input_array(input, "input", min_ndim=2)
    layout = _checks.layout_arg(layout)
    N, C, S = _engine.planes(x, layout)
    num_groups = _checks.positive_int(num_groups, "num_groups")
    _checks.divisor(num_groups, C)
    pdt = _checks.param_dtype(x.dtype)
    weight = _checks.param_array(weight, "weight", (C,), pdt)
    bias = _checks.param_array(bias, "bias", (C,), pdt)
    eps = _checks.nonneg_float(eps, "eps")
    ep = _checks.epilogue(input, x, out, residual, activation, (("weight", weight), ("bias", bias)))
    plan = _engine.in_layout(_core.plan_per_sample_group(N, C, S, num_groups), layout)
    if x.size == 0:  # torch: an empty output (0 channels included)
        return _engine.apply(plan, x, None, None, eps, weight, bias, True, x.shape, ep)
    return _engine.apply_batch_stats(plan, x, eps, weight, bias, x.shape, ep)[:2]


def group_norm(input: _Array, num_groups: int, weight: _Array | None = None,
               bias: _Array | None = None, eps: float = 1e-5, *, layout: str = "NCHW",
               out: _Array | None = None, residual: _Array | None = None,
               activation: str | None = None) -> _Array:
    """Group normalization: each sample's channels in num_groups groups."""
    y = _fast(_core.FAST_GROUP, input, layout == "NHWC", weight, bias, None, None, True, 0.0, eps,
              groups=num_groups, plain=_plain(layout, out, residual, activation))
    if y is not None:
        return y
    return group_norm_impl(input, num_groups, weight, bias, eps, layout, out, residual, activation)[0]


if group_norm.__doc__ is not None:  # None under python -OO
    group_norm.__doc__ += EXTRAS_DOC


def _row_norm(input: _Array, normalized_shape: int | Iterable[int], weight: _Array | None,
              bias: _Array | None, eps: float | None, skip_mean: bool, out: _Array | None = None,
              residual: _Array | None = None, activation: str | None = None
              ) -> tuple[_Array, _core.Saved]:
    shape = _checks.normalized_shape_tuple(normalized_shape)
    x = _checks.input_array(input, "input", min_ndim=len(shape))
    _checks.check_trailing_shape(x, shape)
    pdt = _checks.param_dtype(x.dtype)
    weight = _checks.param_array(weight, "weight", shape, pdt)
    bias = _checks.param_array(bias, "bias", shape, pdt)
    if eps is None and skip_mean:  # rms_norm's default: the dtype's machine epsilon, as torch
        eps = _checks.machine_eps(x.dtype)
    eps = _checks.nonneg_float(eps, "eps")
    ep = _checks.epilogue(input, x, out, residual, activation, (("weight", weight), ("bias", bias)))
    M = int(np.prod(shape, dtype=np.int64))
    rows = x.size // M if M else int(np.prod(x.shape[:x.ndim - len(shape)], dtype=np.int64))
    plan = _core.plan_per_row(rows, M, skip_mean)
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    if x.size == 0:  # torch: an empty output
        return _engine.apply(plan, x, None, None, eps, w, b, True, x.shape, ep)
    return _engine.apply_batch_stats(plan, x, eps, w, b, x.shape, ep)[:2]


def layer_norm_impl(input: _Array, normalized_shape: int | Iterable[int], weight: _Array | None,
                    bias: _Array | None, eps: float, out: _Array | None = None,
                    residual: _Array | None = None, activation: str | None = None
                    ) -> tuple[_Array, _core.Saved]:
    return _row_norm(input, normalized_shape, weight, bias, eps, False, out, residual, activation)


def layer_norm(input: _Array, normalized_shape: int | Iterable[int], weight: _Array | None = None,
               bias: _Array | None = None, eps: float = 1e-5, *, out: _Array | None = None,
               residual: _Array | None = None, activation: str | None = None) -> _Array:
    """Layer normalization over the trailing `normalized_shape` dimensions.

    Keyword-only extras (not in torch): out=, residual=, activation="relu" as in batch_norm."""
    y = _fast(_core.FAST_LAYER, input, False, weight, bias, None, None, True, 0.0, eps,
              normalized_shape=normalized_shape, plain=_plain("NCHW", out, residual, activation))
    if y is not None:
        return y
    return layer_norm_impl(input, normalized_shape, weight, bias, eps, out, residual, activation)[0]


def rms_norm_impl(input: _Array, normalized_shape: int | Iterable[int], weight: _Array | None,
                  eps: float | None, out: _Array | None = None, residual: _Array | None = None,
                  activation: str | None = None) -> tuple[_Array, _core.Saved]:
    return _row_norm(input, normalized_shape, weight, None, eps, True, out, residual, activation)


def rms_norm(input: _Array, normalized_shape: int | Iterable[int], weight: _Array | None = None,
             eps: float | None = None, *, out: _Array | None = None,
             residual: _Array | None = None, activation: str | None = None) -> _Array:
    """RMS normalization: x / sqrt(mean(x^2) + eps) * weight over `normalized_shape`.

    Keyword-only extras (not in torch): out=, residual=, activation="relu" as in batch_norm."""
    y = _fast(_core.FAST_RMS, input, False, weight, None, None, None, True, 0.0,
              _checks.machine_eps_of(input) if eps is None else eps,
              normalized_shape=normalized_shape, plain=_plain("NCHW", out, residual, activation))
    if y is not None:
        return y
    return rms_norm_impl(input, normalized_shape, weight, eps, out, residual, activation)[0]


# -- Weight Standardization and Centralization (arXiv 1903.10520; MABN's centring) ----------------
# Per output filter (dim 0) over its fan-in: the weight viewed as (C_out, fan_in) rows, each row a
# statistics group of a per-row plan (LayerNorm's, without affine).

def _filters(weight: _Array, name: str = "weight") -> _Array:
    """weight checked (an array of rank >= 2, an input dtype) as a contiguous (C_out, fan_in) view."""
    w = _checks.input_array(weight, name, min_ndim=2)
    return w.reshape(w.shape[0], -1)


def _filter_gradient(grad_output: _Array, weight: _Array) -> tuple[_Array, _Array]:
    """(grad_output, weight) checked, both as (C_out, fan_in) views: the gradient has the weight's
    shape and dtype."""
    w = _filters(weight)
    g = _checks.ndarray(grad_output, "grad_output")
    if g.dtype != w.dtype:
        raise TypeError(f"grad_output: expected dtype {w.dtype} (the weight's), got {g.dtype}")
    if g.shape != weight.shape:
        raise ValueError(f"grad_output: expected shape {weight.shape} (the weight's), got {g.shape}")
    return _checks.contiguous(g).reshape(w.shape), w


def weight_standardization(weight: _Array, eps: float = 1e-5) -> _Array:
    """W_hat = (W - mean) / sqrt(var + eps) per output filter over its fan-in (biased variance):
    Weight Standardization (Qiao et al., arXiv 1903.10520), for a conv or linear weight of shape
    (C_out, ...), any rank >= 2."""
    w = _filters(weight)
    eps = _checks.nonneg_float(eps, "eps")
    return layer_norm_impl(w, (w.shape[1],), None, None, eps)[0].reshape(np.shape(weight))


def weight_standardization_backward(grad_output: _Array, weight: _Array,
                                    eps: float = 1e-5) -> _Array:
    """dL/dW of weight_standardization, through each filter's mean and variance."""
    g, w = _filter_gradient(grad_output, weight)
    eps = _checks.nonneg_float(eps, "eps")
    _, saved = layer_norm_impl(w, (w.shape[1],), None, None, eps)
    return _engine.backward(saved, g, False, False)[0].reshape(np.shape(weight))


def _centre_rows(w: _Array) -> _Array:
    """w - mean per row: the per-row plan's statistics, then its apply with rstd 1."""
    plan = _core.plan_per_row(w.shape[0], w.shape[1], False)
    y = _core.empty_like(w)
    if w.size:
        mean, _ = _core.group_moments(plan, w)
        _core.normalize(plan, w, mean, np.ones(w.shape[0]), None, None, y)
    return y


def weight_centralization(weight: _Array) -> _Array:
    """W - mean per output filter over its fan-in (the centred weights MABN assumes), any rank >= 2."""
    return _centre_rows(_filters(weight)).reshape(np.shape(weight))


def weight_centralization_backward(grad_output: _Array, weight: _Array) -> _Array:
    """dL/dW of weight_centralization: grad_output minus its mean per filter."""
    g, _ = _filter_gradient(grad_output, weight)
    return _centre_rows(g).reshape(np.shape(weight))
