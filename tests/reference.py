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


# == Research variants I: the batch-statistics family (issue 10) ===================================
#
# Each variant below is written from the equations on its own, without the plan/fold
# decomposition the kernels use, so that agreement between the two means something. Every backward
# is checked by central finite differences in test_reference_variants.py.


# -- ExtendedBatchNorm (EBN): per-channel mean, one variance for the whole layer ------------------
#
# mu_c over (N, *spatial); sigma2 = mean over all M = N*C*S entries of (x - mu_c)^2;
# r = 1/sqrt(sigma2 + eps); xhat = (x - mu_c)*r.
#
# Backward, with g = dL/dxhat and M_c = N*S entries per channel: d mu_c/dx_i = 1/M_c for x_i in
# channel c; d sigma2/dx_i = 2(x_i - mu_c)/M (the mean's own term drops: sum over c of (x - mu_c)
# is 0); d r/dx_i = -r^3 (x_i - mu_c)/M. Hence
#   dx_i = r*g_i - r*mean_c(g) - r*xhat_i*mean_all(g*xhat),
# the last mean over all channels: the variance couples them.

def extended_batch_norm(x, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    mean = x.mean(axis=_all_but_channel(x), keepdims=True)
    var = ((x - mean) ** 2).mean()
    xhat = (x - mean) / np.sqrt(var + eps)
    return _affine(xhat, weight, bias, _channel_shape(x))


def extended_batch_norm_backward(x, dy, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean()
    r = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * r
    g, dweight, dbias = _affine_backward(xhat, dy, weight, bias, shape, axes)
    g_mean = g.mean(axis=axes, keepdims=True)   # per channel: through mu_c
    gx_mean = (g * xhat).mean()                 # over every channel: through the one sigma2
    dx = r * g - r * g_mean - r * xhat * gx_mean
    return dx, dweight, dbias


def extended_batch_stats(x):
    """EBN's batch statistics: the per-channel mean (C,) and the one biased variance (a float)
    over (N, C, *spatial) around the per-channel means. (A running_var update uses it times
    M/(M - 1), M = x.size.)"""
    x = f64(x)
    mean = x.mean(axis=_all_but_channel(x), keepdims=True)
    var = float(((x - mean) ** 2).mean())
    return mean.reshape(-1), var


# -- ModalityBatchNorm (MBN): BatchNorm over each modality's samples on their own -----------------
#
# modality: integer array (N,). Statistics per (modality, channel) over that modality's samples
# and (*spatial). weight/bias (C,) are shared by the modalities; (num_modalities, C) gives each
# modality its own affine. Each modality is an independent BatchNorm on x[modality == m], so the
# backward is batch_norm_backward on each subset; a shared parameter's gradient is the sum over
# the modalities, a separate one's row m is modality m's own (zero for a modality absent here).

def _modality_affine(p, m):
    """The affine row modality m uses: p itself when shared (C,), row m when separate."""
    if p is None:
        return None
    p = f64(p)
    return p if p.ndim == 1 else p[m]


def modality_batch_norm(x, modality, num_modalities, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    modality = np.asarray(modality)
    y = np.empty_like(x)
    for m in range(num_modalities):
        rows = modality == m
        if not rows.any():
            continue
        y[rows] = batch_norm(x[rows], _modality_affine(weight, m), _modality_affine(bias, m), eps)
    return y


def modality_batch_norm_backward(x, dy, modality, num_modalities, weight=None, bias=None,
                                 eps=1e-5):
    x, dy = f64(x), f64(dy)
    modality = np.asarray(modality)
    dx = np.empty_like(x)
    dweight = None if weight is None else np.zeros(np.shape(weight))
    dbias = None if bias is None else np.zeros(np.shape(bias))
    for m in range(num_modalities):
        rows = modality == m
        if not rows.any():
            continue
        dx_m, dw_m, db_m = batch_norm_backward(x[rows], dy[rows], _modality_affine(weight, m),
                                               _modality_affine(bias, m), eps)
        dx[rows] = dx_m
        if weight is not None and dweight.ndim == 1:
            dweight += dw_m
        elif weight is not None:
            dweight[m] = dw_m
        if bias is not None and dbias.ndim == 1:
            dbias += db_m
        elif bias is not None:
            dbias[m] = db_m
    return dx, dweight, dbias


def modality_batch_stats(x, modality, num_modalities):
    """What a training MBN step feeds its running statistics, like batch_stats: per (modality,
    channel) the mean and the unbiased (count - 1 denominator) variance over that modality's
    samples and (*spatial), each of shape (num_modalities, C). A modality absent from the batch
    has a NaN row (its running statistics stay as they were); one with a single value per
    channel has a NaN variance (the layer raises there)."""
    x = f64(x)
    modality = np.asarray(modality)
    C = x.shape[1]
    mean = np.full((num_modalities, C), np.nan)
    var = np.full((num_modalities, C), np.nan)
    for m in range(num_modalities):
        xm = x[modality == m]
        count = _group_size(xm, _all_but_channel(xm))
        if count == 0:
            continue
        mean[m] = xm.mean(axis=_all_but_channel(xm))
        if count > 1:
            var[m] = xm.var(axis=_all_but_channel(xm), ddof=1)
    return mean, var


# -- GhostBatchNorm, training: statistics per (ghost batch, channel group) ------------------------
#
# The batch is cut into consecutive ghost batches x[s : s + ghost_batch_size] (the last may be
# smaller); in each, the channels form consecutive groups of channels_per_group, and every
# (ghost batch, group) is one statistics group over (its samples, its channels, *spatial) -- the
# shared standardize / standardize_backward over those axes. The affine stays per channel.
# channels_per_group=1 is ghost BN; channels_per_group>1 is the paper's BN+GN mixture.

def _channel_groups(x, channels_per_group):
    """(N, C, *spatial) viewed as (N, C/channels_per_group, channels_per_group, *spatial)."""
    x = f64(x)
    groups = x.shape[1] // channels_per_group
    return x.reshape((x.shape[0], groups, channels_per_group) + x.shape[2:])


def _ghost_axes(x):
    """Axes of _channel_groups(x) that one (ghost batch, group) statistic reduces over: the
    samples, the group's channels and (*spatial)."""
    return (0, 2) + tuple(range(3, x.ndim + 1))


def _ghost_xhat(x, ghost_batch_size, channels_per_group, eps):
    x = f64(x)
    xhat = np.empty_like(x)
    for s in range(0, x.shape[0], ghost_batch_size):
        ghost = x[s:s + ghost_batch_size]
        ghost_hat = standardize(_channel_groups(ghost, channels_per_group), _ghost_axes(x), eps)
        xhat[s:s + ghost_batch_size] = ghost_hat.reshape(ghost.shape)
    return xhat


def ghost_batch_norm(x, ghost_batch_size, channels_per_group=1, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    xhat = _ghost_xhat(x, ghost_batch_size, channels_per_group, eps)
    return _affine(xhat, weight, bias, _channel_shape(x))


def ghost_batch_norm_backward(x, dy, ghost_batch_size, channels_per_group=1, weight=None,
                              bias=None, eps=1e-5):
    x = f64(x)
    xhat = _ghost_xhat(x, ghost_batch_size, channels_per_group, eps)
    g, dweight, dbias = _affine_backward(xhat, dy, weight, bias, _channel_shape(x),
                                         _all_but_channel(x))
    dx = np.empty_like(x)
    for s in range(0, x.shape[0], ghost_batch_size):
        ghost = x[s:s + ghost_batch_size]
        g_ghost = g[s:s + ghost_batch_size]
        dx_ghost = standardize_backward(_channel_groups(ghost, channels_per_group),
                                        _channel_groups(g_ghost, channels_per_group),
                                        _ghost_axes(x), eps)
        dx[s:s + ghost_batch_size] = dx_ghost.reshape(ghost.shape)
    return dx, dweight, dbias


# -- GhostBatchNorm, inference with example weighing ----------------------------------------------
#
# alpha = example_weight. For sample i and channel group g of K = channels_per_group*S entries:
# P1 = mean over the group's channels of running_mean, P2 = the same of
# running_var + running_mean^2,
# E1_i, E2_i = mean of x and of x^2 over the group's channels and (*spatial);
# mu = (1-alpha) P1 + alpha E1_i,  v = (1-alpha) P2 + alpha E2_i - mu^2,  var = max(v, 0),
# r = 1/sqrt(var + eps),  xhat = (x - mu)*r.
#
# Backward, with g = dL/dxhat, per (i, group): d mu/dx_j = alpha/K;
# d v/dx_j = alpha*2 x_j/K - 2 mu*alpha/K = 2 alpha (x_j - mu)/K, and d var/dx_j = 0 where the
# clamp holds (v < 0: var is the constant 0); d r/dx_j = -r^3 alpha (x_j - mu)/K. Hence
#   dx_j = r*g_j - alpha*r*mean(g) - [v >= 0] * alpha*r*xhat_j*mean(g*xhat),
# means over the K entries of (i, group). alpha = 0 leaves r*g: the statistics are constants.

def _example_weighed_stats(x, running_mean, running_var, channels_per_group, example_weight):
    """(mu, v) per (sample, group), broadcastable against _channel_groups(x); v before the clamp."""
    xg = _channel_groups(x, channels_per_group)
    within = tuple(range(2, xg.ndim))
    groups = xg.shape[1]
    stat_shape = (1, groups) + (1,) * (xg.ndim - 2)
    rm = f64(running_mean).reshape(groups, channels_per_group)
    rv = f64(running_var).reshape(groups, channels_per_group)
    p1 = rm.mean(axis=1).reshape(stat_shape)
    p2 = (rv + rm ** 2).mean(axis=1).reshape(stat_shape)
    e1 = xg.mean(axis=within, keepdims=True)
    e2 = (xg ** 2).mean(axis=within, keepdims=True)
    alpha = float(example_weight)
    mu = (1.0 - alpha) * p1 + alpha * e1
    v = (1.0 - alpha) * p2 + alpha * e2 - mu ** 2
    return mu, v


def ghost_batch_norm_eval(x, running_mean, running_var, channels_per_group=1, example_weight=0.0,
                          weight=None, bias=None, eps=1e-5):
    x = f64(x)
    xg = _channel_groups(x, channels_per_group)
    mu, v = _example_weighed_stats(x, running_mean, running_var, channels_per_group,
                                   example_weight)
    var = np.maximum(v, 0.0)
    xhat = ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape)
    return _affine(xhat, weight, bias, _channel_shape(x))


def ghost_batch_norm_eval_backward(x, dy, running_mean, running_var, channels_per_group=1,
                                   example_weight=0.0, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    xg = _channel_groups(x, channels_per_group)
    within = tuple(range(2, xg.ndim))
    mu, v = _example_weighed_stats(x, running_mean, running_var, channels_per_group,
                                   example_weight)
    var = np.maximum(v, 0.0)
    r = 1.0 / np.sqrt(var + eps)
    xhat_g = (xg - mu) * r
    g, dweight, dbias = _affine_backward(xhat_g.reshape(x.shape), dy, weight, bias,
                                         _channel_shape(x), _all_but_channel(x))
    gg = _channel_groups(g, channels_per_group)
    alpha = float(example_weight)
    g_mean = gg.mean(axis=within, keepdims=True)
    gx_mean = (gg * xhat_g).mean(axis=within, keepdims=True)
    unclamped = (v >= 0.0).astype(np.float64)
    dx = r * gg - alpha * r * g_mean - unclamped * alpha * r * xhat_g * gx_mean
    return dx.reshape(x.shape), dweight, dbias


# -- Batch Renormalization (the paper's Algorithm 1) ----------------------------------------------
#
# mu_B, var_B per channel (biased), sigma_B = sqrt(var_B + eps);
# r = clip(sigma_B/sigma, 1/r_max, r_max), d = clip((mu_B - mu)/sigma, -d_max, d_max) from the
# running mu, sigma before this step's update; xhat = (x - mu_B)/sigma_B * r + d; y = w*xhat + b.
# r and d are constants in the backward (the paper's stop_gradient), so with g = dL/dxhat,
#   dx = standardize_backward(x, g*r),  dweight = sum dy*xhat (xhat including r and d),
# and BatchNorm is the case r = 1, d = 0. Inference: y = w (x - mu)/sigma + b (no eps: sigma is a
# running standard deviation that already carries it).

def batch_renorm_rd(x, running_mean, running_std, r_max, d_max, eps=1e-5):
    x = f64(x)
    axes = _all_but_channel(x)
    mean_b = x.mean(axis=axes)
    std_b = np.sqrt(x.var(axis=axes) + eps)
    r = np.clip(std_b / f64(running_std), 1.0 / r_max, r_max)
    d = np.clip((mean_b - f64(running_mean)) / f64(running_std), -d_max, d_max)
    return r, d


def _renorm_xhat(x, r, d, eps):
    shape = _channel_shape(x)
    return standardize(x, _all_but_channel(x), eps) * f64(r).reshape(shape) + f64(d).reshape(shape)


def batch_renorm(x, r, d, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    return _affine(_renorm_xhat(x, r, d, eps), weight, bias, _channel_shape(x))


def batch_renorm_backward(x, dy, r, d, weight=None, bias=None, eps=1e-5):
    x = f64(x)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    xhat = _renorm_xhat(x, r, d, eps)
    g, dweight, dbias = _affine_backward(xhat, dy, weight, bias, shape, axes)
    dx = standardize_backward(x, g * f64(r).reshape(shape), axes, eps)
    return dx, dweight, dbias


def batch_renorm_eval(x, running_mean, running_std, weight=None, bias=None):
    x = f64(x)
    shape = _channel_shape(x)
    xhat = (x - f64(running_mean).reshape(shape)) / f64(running_std).reshape(shape)
    return _affine(xhat, weight, bias, shape)


def renorm_schedule(step):
    """The paper's (r_max, d_max) at a training step: (1, 0) for steps 0..4999; from step 5000
    r_max ramps linearly from 1 to 3 at step 40000 and d_max from 0 to 5 at step 25000; constant
    after."""
    t = float(step) - 5000.0
    r_max = min(3.0, max(1.0, 1.0 + 2.0 * t / 35000.0))
    d_max = min(5.0, max(0.0, 5.0 * t / 20000.0))
    return r_max, d_max
