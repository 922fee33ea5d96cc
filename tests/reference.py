"""Plain float64 NumPy references: forward and backward of every normalization family.

Written from the math, one step per line, with no fusion and no shortcuts: NumPy's own mean over
the axes that form a statistics group, then the affine. Every backward here is checked against
central finite differences in test_reference.py, so a kernel that agrees with these functions
agrees with the math (a reference that shares a derivation error with the kernel proves nothing).

Conventions
- Channel families (batch, instance, group norm) take x of shape (N, C, *spatial); weight and bias
  are per channel, shape (C,). Layer and RMS norm normalize the trailing `normalized_shape` dims
  and their weight and bias have that shape.
- weight=None / bias=None means no affine; the matching gradient is returned as None.
- Every `*_backward` takes its forward's arguments plus dy and returns (dx, dweight, dbias)
  (rms_norm_backward: (dx, dweight)).
- All arithmetic is float64, whatever the inputs were.
"""
import numpy as np


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


# -- Standardization over a set of axes: the one formula every family shares -------------------
#
# Per statistics group of M elements:  mean = sum(x)/M,  var = sum((x - mean)^2)/M (biased),
# r = 1/sqrt(var + eps),  xhat = (x - mean)*r.
#
# Backward, with g = dL/dxhat:  d mean/dx_i = 1/M,  d var/dx_i = 2(x_i - mean)/M,
# d r/dx_i = -r^3 (x_i - mean)/M, hence
#   dx_i = sum_j g_j dxhat_j/dx_i = r*g_i - r*mean(g) - r*xhat_i*mean(g*xhat).

def _group_size(x, axes):
    return int(np.prod([x.shape[a] for a in axes]))


def standardize(x, axes, eps):
    x = f64(x)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def standardize_backward(x, g, axes, eps):
    x, g = f64(x), f64(g)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * r
    g_mean = g.mean(axis=axes, keepdims=True)
    gx_mean = (g * xhat).mean(axis=axes, keepdims=True)
    return r * g - r * g_mean - r * xhat * gx_mean


def rstd(x, axes, eps):
    """r = 1/sqrt(var + eps) of each statistics group (kept as broadcastable dims).

    The tests use it for the size of the terms dx is a difference of, r*|dy*weight|: where a
    group's values nearly coincide (a group of two, a constant row) r is large while dx cancels
    to nearly zero, and an implementation can only be expected to reach zero to within rounding
    of those terms.
    """
    x = f64(x)
    mean = x.mean(axis=axes, keepdims=True)
    return 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


# -- The affine: y = xhat*weight + bias, broadcast to `shape` ------------------------------------

def _affine(xhat, weight, bias, shape):
    y = xhat
    if weight is not None:
        y = y * f64(weight).reshape(shape)
    if bias is not None:
        y = y + f64(bias).reshape(shape)
    return y


def _affine_backward(xhat, dy, weight, bias, shape, sum_axes):
    """(dL/dxhat, dweight, dbias) of y = xhat*weight + bias; parameter grads sum over sum_axes."""
    dy = f64(dy)
    dxhat = dy * f64(weight).reshape(shape) if weight is not None else dy
    dweight = None if weight is None else (dy * xhat).sum(axis=sum_axes).reshape(np.shape(weight))
    dbias = None if bias is None else dy.sum(axis=sum_axes).reshape(np.shape(bias))
    return dxhat, dweight, dbias


def _channel_shape(x):
    """Broadcast shape of a per-channel vector against an (N, C, *spatial) array."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _spatial_axes(x):
    return tuple(range(2, x.ndim))


def _all_but_channel(x):
    return (0,) + _spatial_axes(x)


def _given_stats(x, mean, var, eps):
    """xhat with fixed statistics (running statistics, eval mode): (x - mean)/sqrt(var + eps)."""
    shape = _channel_shape(x)
    return (f64(x) - f64(mean).reshape(shape)) / np.sqrt(f64(var).reshape(shape) + eps)


# -- BatchNorm: statistics per channel over (N, *spatial) -----------------------------------------

def batch_norm(x, weight=None, bias=None, eps=1e-5, running_mean=None, running_var=None,
               training=True):
    """Training: batch statistics. training=False: the given running statistics."""
    x = f64(x)
    if training:
        xhat = standardize(x, _all_but_channel(x), eps)
    else:
        xhat = _given_stats(x, running_mean, running_var, eps)
    return _affine(xhat, weight, bias, _channel_shape(x))


def batch_norm_backward(x, dy, weight=None, bias=None, eps=1e-5, running_mean=None,
                        running_var=None, training=True):
    x = f64(x)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    if training:
        xhat = standardize(x, axes, eps)
    else:
        xhat = _given_stats(x, running_mean, running_var, eps)
    dxhat, dweight, dbias = _affine_backward(xhat, dy, weight, bias, shape, axes)
    if training:
        dx = standardize_backward(x, dxhat, axes, eps)
    else:  # the statistics are constants: xhat is linear in x
        dx = dxhat / np.sqrt(f64(running_var).reshape(shape) + eps)
    return dx, dweight, dbias


def batch_stats(x):
    """What a training BatchNorm step feeds its running statistics: per-channel mean and
    unbiased (N*S - 1 denominator) variance over (N, *spatial)."""
    x = f64(x)
    axes = _all_but_channel(x)
    return x.mean(axis=axes), x.var(axis=axes, ddof=1)


# -- InstanceNorm: statistics per (sample, channel) plane -----------------------------------------

def instance_norm(x, weight=None, bias=None, eps=1e-5, running_mean=None, running_var=None,
                  use_input_stats=True):
    x = f64(x)
    if use_input_stats:
        xhat = standardize(x, _spatial_axes(x), eps)
    else:
        xhat = _given_stats(x, running_mean, running_var, eps)
    return _affine(xhat, weight, bias, _channel_shape(x))


def instance_norm_backward(x, dy, weight=None, bias=None, eps=1e-5, running_mean=None,
                           running_var=None, use_input_stats=True):
    x = f64(x)
    shape = _channel_shape(x)
    if use_input_stats:
        xhat = standardize(x, _spatial_axes(x), eps)
    else:
        xhat = _given_stats(x, running_mean, running_var, eps)
    dxhat, dweight, dbias = _affine_backward(xhat, dy, weight, bias, shape, _all_but_channel(x))
    if use_input_stats:
        dx = standardize_backward(x, dxhat, _spatial_axes(x), eps)
    else:
        dx = dxhat / np.sqrt(f64(running_var).reshape(shape) + eps)
    return dx, dweight, dbias


def instance_stats(x):
    """What a training InstanceNorm step feeds its running statistics (torch's rule): the batch
    average of each plane's mean and of each plane's unbiased variance."""
    x = f64(x)
    axes = _spatial_axes(x)
    return x.mean(axis=axes).mean(axis=0), x.var(axis=axes, ddof=1).mean(axis=0)


def running_update(running, batch_value, factor):
    """One running-statistics step: (1 - factor)*running + factor*batch_value."""
    return (1.0 - factor) * f64(running) + factor * f64(batch_value)


# -- GroupNorm: each sample's channels split into num_groups consecutive groups -------------------

def _grouped(x, num_groups):
    return f64(x).reshape(x.shape[0], num_groups, -1)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    xhat = standardize(_grouped(x, num_groups), (2,), eps).reshape(x.shape)
    return _affine(xhat, weight, bias, _channel_shape(x))


def group_norm_backward(x, dy, num_groups, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    xhat = standardize(_grouped(x, num_groups), (2,), eps).reshape(x.shape)
    dxhat, dweight, dbias = _affine_backward(xhat, dy, weight, bias, _channel_shape(x),
                                             _all_but_channel(x))
    dx = standardize_backward(_grouped(x, num_groups), _grouped(dxhat, num_groups), (2,), eps)
    return dx.reshape(x.shape), dweight, dbias


# -- LayerNorm: each row over the trailing normalized_shape dims; elementwise affine --------------

def _trailing(x, normalized_shape):
    k = len(tuple(normalized_shape))
    return tuple(range(x.ndim - k, x.ndim)), tuple(range(x.ndim - k))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    axes, _ = _trailing(x, normalized_shape)
    return _affine(standardize(x, axes, eps), weight, bias, tuple(normalized_shape))


def layer_norm_backward(x, dy, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    axes, lead = _trailing(x, normalized_shape)
    xhat = standardize(x, axes, eps)
    dxhat, dweight, dbias = _affine_backward(xhat, dy, weight, bias, tuple(normalized_shape), lead)
    return standardize_backward(x, dxhat, axes, eps), dweight, dbias


# -- RMSNorm: y = x*r*weight with r = 1/sqrt(mean(x^2) + eps); no mean is removed ------------------
#
# Backward, with g = dy*weight and M elements per row: d r/dx_i = -r^3 x_i/M, hence
#   dx_i = r*g_i - r^3 * x_i * mean(g*x),   dweight = sum over rows of dy*x*r.

def rms_norm(x, normalized_shape, weight=None, eps=1e-6):
    x = f64(x)
    axes, _ = _trailing(x, normalized_shape)
    r = 1.0 / np.sqrt((x ** 2).mean(axis=axes, keepdims=True) + eps)
    return _affine(x * r, weight, None, tuple(normalized_shape))


def rms_norm_backward(x, dy, normalized_shape, weight=None, eps=1e-6):
    x = f64(x)
    axes, lead = _trailing(x, normalized_shape)
    r = 1.0 / np.sqrt((x ** 2).mean(axis=axes, keepdims=True) + eps)
    g, dweight, _ = _affine_backward(x * r, dy, weight, None, tuple(normalized_shape), lead)
    dx = r * g - r ** 3 * x * (g * x).mean(axis=axes, keepdims=True)
    return dx, dweight


# -- Finite differences: the check that proves a backward ------------------------------------------

def numerical_gradient(f, a, h=1e-5):
    """Central differences of the scalar f() with respect to every entry of the float64 array a.

    a is perturbed in place (one entry at a time, then restored), so f must read it afresh on
    every call. Truncation error ~h^2*f''' and rounding ~1e-16*|f|/h: about 1e-10 at h = 1e-5
    for the O(1) normalized outputs these tests use.
    """
    assert a.dtype == np.float64 and a.flags.c_contiguous
    flat = a.reshape(-1)
    assert np.shares_memory(flat, a)
    grad = np.empty(a.size)
    for i in range(a.size):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad.reshape(a.shape)
