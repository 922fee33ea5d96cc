"""Stateless forward functions with torch.nn.functional's names, arguments and defaults.

Running statistics passed in are updated in place, as torch.nn.functional does.
"""
import numpy as np

from . import _checks, _core, _engine

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"]


def _unbiased(var, count):
    return var * (count / (count - 1)) if count > 1 else var * np.nan


def batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """batch_norm's body; returns (y, Saved) so that the layers can run backward."""
    x = _checks.input_array(input, "input", min_ndim=2)
    N, C, S = _engine.planes(x)
    weight = _checks.param_array(weight, "weight", (C,), x.dtype)
    bias = _checks.param_array(bias, "bias", (C,), x.dtype)
    running_mean = _checks.stats_array(running_mean, "running_mean", C, writable=training)
    running_var = _checks.stats_array(running_var, "running_var", C, writable=training)
    eps = _checks.positive_float(eps, "eps")
    plan = _core.plan_per_channel(N, C, S)
    if training:
        _checks.more_than_one_value(N * S)
        momentum = _checks.positive_float(momentum, "momentum")
        mean, var = _engine.moments(plan, x)
        if running_mean is not None:
            _engine.running_update(running_mean, mean, momentum)
        if running_var is not None:
            _engine.running_update(running_var, _unbiased(var, N * S), momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        mean, var = running_mean, running_var
    return _engine.apply(plan, x, mean, var, eps, weight, bias, training, x.shape)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalization over (N, *spatial) per channel of an (N, C, *spatial) input."""
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps)[0]


def instance_norm_impl(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    x = _checks.input_array(input, "input", min_ndim=2)
    N, C, S = _engine.planes(x)
    weight = _checks.param_array(weight, "weight", (C,), x.dtype)
    bias = _checks.param_array(bias, "bias", (C,), x.dtype)
    running_mean = _checks.stats_array(running_mean, "running_mean", C, writable=use_input_stats)
    running_var = _checks.stats_array(running_var, "running_var", C, writable=use_input_stats)
    eps = _checks.positive_float(eps, "eps")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when use_input_stats=False")
        plan = _core.plan_per_channel(N, C, S)
        return _engine.apply(plan, x, running_mean, running_var, eps, weight, bias, False, x.shape)
    _checks.more_than_one_value(S, "spatial element (instance)")
    momentum = _checks.positive_float(momentum, "momentum")
    plan = _core.plan_per_sample_group(N, C, S, C)
    mean, var = _engine.moments(plan, x)
    # torch: running stats move toward the batch average of the per-instance statistics.
    if running_mean is not None:
        _engine.running_update(running_mean, mean.reshape(N, C).mean(axis=0), momentum)
    if running_var is not None:
        _engine.running_update(running_var, _unbiased(var, S).reshape(N, C).mean(axis=0), momentum)
    return _engine.apply(plan, x, mean, var, eps, weight, bias, True, x.shape)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance normalization: each (sample, channel) plane on its own statistics."""
    return instance_norm_impl(input, running_mean, running_var, weight, bias, use_input_stats,
                              momentum, eps)[0]


def group_norm_impl(input, num_groups, weight, bias, eps):
    x = _checks.input_array(input, "input", min_ndim=2)
    N, C, S = _engine.planes(x)
    num_groups = _checks.positive_int(num_groups, "num_groups")
    if C % num_groups != 0:
        raise ValueError(f"num_groups: expected a divisor of the {C} input channels, got {num_groups}")
    weight = _checks.param_array(weight, "weight", (C,), x.dtype)
    bias = _checks.param_array(bias, "bias", (C,), x.dtype)
    eps = _checks.positive_float(eps, "eps")
    plan = _core.plan_per_sample_group(N, C, S, num_groups)
    mean, var = _engine.moments(plan, x)
    return _engine.apply(plan, x, mean, var, eps, weight, bias, True, x.shape)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalization: each sample's channels in num_groups groups."""
    return group_norm_impl(input, num_groups, weight, bias, eps)[0]


def _row_norm(input, normalized_shape, weight, bias, eps, skip_mean):
    shape = _checks.normalized_shape_tuple(normalized_shape)
    x = _checks.input_array(input, "input", min_ndim=max(1, len(shape)))
    _checks.check_trailing_shape(x, shape)
    weight = _checks.param_array(weight, "weight", shape, x.dtype)
    bias = _checks.param_array(bias, "bias", shape, x.dtype)
    if eps is None:  # rms_norm's default: the dtype's machine epsilon, as torch
        eps = float(np.finfo(x.dtype).eps)
    eps = _checks.positive_float(eps, "eps")
    M = int(np.prod(shape, dtype=np.int64))
    rows = x.size // M if M else 0
    plan = _core.plan_per_row(rows, M, skip_mean)
    mean, var = _engine.moments(plan, x)
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    return _engine.apply(plan, x, mean, var, eps, w, b, True, x.shape)


def layer_norm_impl(input, normalized_shape, weight, bias, eps):
    return _row_norm(input, normalized_shape, weight, bias, eps, skip_mean=False)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization over the trailing `normalized_shape` dimensions."""
    return layer_norm_impl(input, normalized_shape, weight, bias, eps)[0]


def rms_norm_impl(input, normalized_shape, weight, eps):
    return _row_norm(input, normalized_shape, weight, None, eps, skip_mean=True)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """RMS normalization: x / sqrt(mean(x^2) + eps) * weight over `normalized_shape`."""
    return rms_norm_impl(input, normalized_shape, weight, eps)[0]
