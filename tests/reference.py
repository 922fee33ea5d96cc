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


# == Research variants II: the batch-independent family and parity layers (issue 11) ==============
#
# Written from the equations, each on its own (no plan/fold decomposition, no shared
# epilogue kernels), so that agreement with the kernels means something. Every backward below is
# checked by central finite differences in test_reference_batch_free.py; at the exact ties of a
# max (TLU, EvoNorm-B0) and the kink of relu, where finite differences are not defined, that file
# checks the documented rule directly.

import math

try:  # the proxy points' erfinv: SciPy's when present, else Newton on math.erf (below)
    from scipy.special import erfinv as _scipy_erfinv
except ImportError:  # pragma: no cover - depends on the environment
    _scipy_erfinv = None


def _spatial_planes(x):
    """x as (N, C, S): an (N, C) input is (N, C, 1), spatial size 1."""
    x = f64(x)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _affine_grads(dy, xhat, weight, bias, axes):
    """dweight = sum dy*xhat, dbias = sum dy over axes (None for an absent parameter)."""
    dweight = None if weight is None else (dy * xhat).sum(axis=axes)
    dbias = None if bias is None else dy.sum(axis=axes)
    return dweight, dbias


# -- FilterResponseNorm with TLU ------------------------------------------------------------------
#
# Per (n, c) plane of S entries: nu2 = mean(x^2) (no mean is removed), e = eps (+ |eps_l|),
# r = 1/sqrt(nu2 + e), xhat = x*r, y = gamma*xhat + beta, z = max(y, tau) (tau None: z = y).
#
# Backward. TLU: dz/dy = [y > tau], dz/dtau = [y <= tau] (at y == tau everything goes to tau).
# With dyy = dL/dy and g = dyy*gamma: d nu2/dx_i = 2 x_i/S, d r/dx_i = -r^3 x_i/S, so
#   dx_i = r*g_i - r^3 x_i mean(g*x)        (RMSNorm's backward over the plane);
# d r/de = -r^3/2 and de/deps_l = sign(eps_l), so deps_l = sum over everything of
# g*x*(-r^3/2)*sign(eps_l).

def _frn_eps(eps, eps_l):
    return eps if eps_l is None else eps + np.abs(f64(eps_l)).reshape(())


def filter_response_norm(x, weight, bias, tau=None, eps=1e-6, eps_l=None):
    x = f64(x)
    xp = _spatial_planes(x)
    nu2 = (xp ** 2).mean(axis=2, keepdims=True)
    r = 1.0 / np.sqrt(nu2 + _frn_eps(eps, eps_l))
    xhat = (xp * r).reshape(x.shape)
    y = _affine(xhat, weight, bias, _channel_shape(x))
    if tau is not None:
        y = np.maximum(y, f64(tau).reshape(_channel_shape(x)))
    return y


def filter_response_norm_backward(x, dy, weight, bias, tau=None, eps=1e-6, eps_l=None):
    x, dy = f64(x), f64(dy)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    xp = _spatial_planes(x)
    nu2 = (xp ** 2).mean(axis=2, keepdims=True)
    r = 1.0 / np.sqrt(nu2 + _frn_eps(eps, eps_l))
    xhat = (xp * r).reshape(x.shape)
    dtau = None
    if tau is not None:
        y = _affine(xhat, weight, bias, shape)
        passes = y > f64(tau).reshape(shape)        # ties (y == tau) go to tau
        dtau = np.where(passes, 0.0, dy).sum(axis=axes)
        dy = np.where(passes, dy, 0.0)
    dweight, dbias = _affine_grads(dy, xhat, weight, bias, axes)
    g = dy * f64(weight).reshape(shape) if weight is not None else dy
    gp = _spatial_planes(g)
    dx = r * gp - r ** 3 * xp * (gp * xp).mean(axis=2, keepdims=True)
    deps_l = None
    if eps_l is not None:
        deps_l = (np.sum(gp * xp * (-0.5) * r ** 3) * np.sign(f64(eps_l))).reshape(np.shape(eps_l))
    return dx.reshape(x.shape), dweight, dbias, dtau, deps_l


# -- Weight Standardization and Weight Centralization ---------------------------------------------
#
# Per output filter (dim 0) over its fan-in (every other dim): WS is the shared standardize
# (biased variance), so its backward is standardize_backward over those axes; WC is w - mean,
# whose backward is dy - mean(dy).

def _fan_in_axes(w):
    assert w.ndim >= 2, "a weight has rank >= 2"
    return tuple(range(1, w.ndim))


def weight_standardization(w, eps=1e-5):
    w = f64(w)
    return standardize(w, _fan_in_axes(w), eps)


def weight_standardization_backward(dy, w, eps=1e-5):
    w = f64(w)
    return standardize_backward(w, f64(dy), _fan_in_axes(w), eps)


def weight_centralization(w):
    w = f64(w)
    return w - w.mean(axis=_fan_in_axes(w), keepdims=True)


def weight_centralization_backward(dy, w):
    dy = f64(dy)
    return dy - dy.mean(axis=_fan_in_axes(f64(w)), keepdims=True)


# -- BatchChannelNorm: per-channel BN with its own affine, then per-sample group norm -------------
#
# u = bn_weight_c*xb + bn_bias_c, xb = BN's xhat (batch statistics, biased; or the given running
# statistics as constants); uhat = u standardized per (n, group) over (C/G channels, *spatial);
# y = gn_weight_g*uhat + gn_bias_g, one value per GROUP. Backward: the chain of the two, group
# part first: dgn_* sum over (N, the group's channels, *spatial); g_u = standardize_backward of
# dy*gn_weight over each (n, group); then BN's backward of g_u.

def _per_group_to_channel(p, C):
    """A (G,) vector repeated over each group's C/G channels: (C,)."""
    p = f64(p)
    return np.repeat(p, C // p.size)


def _bcn_batch_part(x, bn_weight, bn_bias, eps, running_mean, running_var):
    if running_mean is not None:
        xb = _given_stats(x, running_mean, running_var, eps)
    else:
        xb = standardize(x, _all_but_channel(x), eps)
    return xb, _affine(xb, bn_weight, bn_bias, _channel_shape(x))


def batch_channel_norm(x, bn_weight, bn_bias, gn_weight, gn_bias, num_groups, eps=1e-5,
                       running_mean=None, running_var=None):
    x = f64(x)
    C = x.shape[1]
    _, u = _bcn_batch_part(x, bn_weight, bn_bias, eps, running_mean, running_var)
    uhat = standardize(_grouped(u, num_groups), (2,), eps).reshape(x.shape)
    gw = None if gn_weight is None else _per_group_to_channel(gn_weight, C)
    gb = None if gn_bias is None else _per_group_to_channel(gn_bias, C)
    return _affine(uhat, gw, gb, _channel_shape(x))


def batch_channel_norm_backward(x, dy, bn_weight, bn_bias, gn_weight, gn_bias, num_groups,
                                eps=1e-5, running_mean=None, running_var=None):
    x, dy = f64(x), f64(dy)
    N, C = x.shape[:2]
    shape, axes = _channel_shape(x), _all_but_channel(x)
    xb, u = _bcn_batch_part(x, bn_weight, bn_bias, eps, running_mean, running_var)
    uhat = standardize(_grouped(u, num_groups), (2,), eps).reshape(x.shape)
    # group part: per-group affine sums over (N, the group's channels, *spatial)
    dgn_weight = None if gn_weight is None else (dy * uhat).reshape(N, num_groups, -1).sum(axis=(0, 2))
    dgn_bias = None if gn_bias is None else dy.reshape(N, num_groups, -1).sum(axis=(0, 2))
    g_uhat = dy * _per_group_to_channel(gn_weight, C).reshape(shape) if gn_weight is not None else dy
    g_u = standardize_backward(_grouped(u, num_groups), _grouped(g_uhat, num_groups), (2,), eps)
    g_u = g_u.reshape(x.shape)
    # batch part
    dbn_weight, dbn_bias = _affine_grads(g_u, xb, bn_weight, bn_bias, axes)
    g_xb = g_u * f64(bn_weight).reshape(shape) if bn_weight is not None else g_u
    if running_mean is not None:  # constants: xb is linear in x
        dx = g_xb / np.sqrt(f64(running_var).reshape(shape) + eps)
    else:
        dx = standardize_backward(x, g_xb, axes, eps)
    return dx, dbn_weight, dbn_bias, dgn_weight, dgn_bias


def bcn_estimate_update(x, running_mean, running_var, rate):
    """estimate=True's training step: mu_hat += r (mu_B - mu_hat);
    var_hat += r (mean over (N, *spatial) of (x - mu_hat_old)^2 - var_hat), mu_hat_old being the
    mean before this step's update. Returns the new (mean, var), each (C,)."""
    x = f64(x)
    axes = _all_but_channel(x)
    old_mean, old_var = f64(running_mean), f64(running_var)
    mean_b = x.mean(axis=axes)
    spread = ((x - old_mean.reshape(_channel_shape(x))) ** 2).mean(axis=axes)
    new_mean = old_mean + rate * (mean_b - old_mean)
    new_var = old_var + rate * (spread - old_var)
    return new_mean, new_var


# -- BatchLayerNorm -------------------------------------------------------------------------------
#
# x_B: standardized per (c, *spatial) over N (or with given running statistics of shape
# (C, *spatial), constants); x_F: standardized per (n, *spatial) over C; both biased, eps inside.
# y = gamma_c (a x_F + b x_B)/sqrt(C) + beta_c, a = 1/B - 1e-4, b = 1 - 1/B - 1e-4.
# Backward, g = dy*gamma_c/sqrt(C): dx = a*standardize_backward over C of g
# + b*(standardize_backward over N of g, or g/sqrt(running_var + eps)).

def _bln_coefficients(batch_size):
    B = float(batch_size)
    return 1.0 / B - 1e-4, 1.0 - 1.0 / B - 1e-4


def _bln_batch_part(x, eps, running_mean, running_var):
    if running_mean is not None:
        rm = f64(running_mean).reshape((1,) + x.shape[1:])
        rv = f64(running_var).reshape((1,) + x.shape[1:])
        return (x - rm) / np.sqrt(rv + eps)
    return standardize(x, (0,), eps)


def batch_layer_norm(x, weight, bias, batch_size, eps=1e-3, running_mean=None, running_var=None):
    x = f64(x)
    a, b = _bln_coefficients(batch_size)
    x_b = _bln_batch_part(x, eps, running_mean, running_var)
    x_f = standardize(x, (1,), eps)
    mixed = (a * x_f + b * x_b) / math.sqrt(x.shape[1])
    return _affine(mixed, weight, bias, _channel_shape(x))


def batch_layer_norm_backward(x, dy, weight, bias, batch_size, eps=1e-3, running_mean=None,
                              running_var=None):
    x, dy = f64(x), f64(dy)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    a, b = _bln_coefficients(batch_size)
    x_b = _bln_batch_part(x, eps, running_mean, running_var)
    x_f = standardize(x, (1,), eps)
    mixed = (a * x_f + b * x_b) / math.sqrt(x.shape[1])
    dweight, dbias = _affine_grads(dy, mixed, weight, bias, axes)
    g = dy * f64(weight).reshape(shape) if weight is not None else dy
    g = g / math.sqrt(x.shape[1])
    dx_f = standardize_backward(x, g, (1,), eps)
    if running_mean is not None:
        dx_b = g / np.sqrt(f64(running_var).reshape((1,) + x.shape[1:]) + eps)
    else:
        dx_b = standardize_backward(x, g, (0,), eps)
    return a * dx_f + b * dx_b, dweight, dbias


# -- ProxyNorm ------------------------------------------------------------------------------------
#
# z = phi(gamma x + beta); proxy points per channel Y_k = beta_p + (1 + gamma_p) U_k,
# U_k = sqrt(2) erfinv(2 (k + 1/2)/K - 1); P_k = phi(gamma Y_k + beta); mu_p = mean_k P_k,
# v_p = mean_k (P_k - mu_p)^2 (biased); y = (z - mu_p)*s, s = 1/sqrt(v_p + eps).
#
# Backward, per channel c, sums over (N, *spatial) written S[.]:
#   input path: dz = dy*s;  dx = dz*phi'(gamma x + beta)*gamma;  dgamma += S[dz phi' x],
#   dbeta += S[dz phi'];
#   proxy path: dL/dmu = -s S[dy];  dL/dv = -s^3/2 S[dy (z - mu_p)];
#   dL/dP_k = dL/dmu/K + dL/dv * 2 (P_k - mu_p)/K  (mu_p's own term in v_p drops: sum(P - mu) = 0);
#   dL/dq_k = dL/dP_k phi'(q_k), q_k = gamma Y_k + beta;  dgamma += sum_k dL/dq_k Y_k,
#   dbeta += sum_k dL/dq_k;  dL/dY_k = gamma dL/dq_k;  dbeta_p = sum_k dL/dY_k,
#   dgamma_p = sum_k dL/dY_k U_k.
# relu'(0) = 0 (torch's).

PROXY_ACTIVATIONS = ("relu", "silu", "gelu", "identity")

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _erfinv_newton(t):
    """erfinv of one float in (-1, 1): Winitzki's approximation, then Newton steps
    (erf'(y) = 2/sqrt(pi) exp(-y^2)) until the step no longer shrinks. For |t| >= 1/2 the
    residual is taken as erfc(y) - (1 - |t|) (1 - |t| is exact there): erf(y) - t would lose
    erfinv's precision near +-1 to the cancellation, ~1e-13 at t = 0.9999."""
    if t == 0.0:
        return 0.0
    a = 0.147
    ln = math.log1p(-t * t)
    first = 2.0 / (math.pi * a) + ln / 2.0
    y = math.sqrt(math.sqrt(first * first - ln / a) - first)   # of |t|
    s = abs(t)
    tail = s >= 0.5
    last_step = math.inf
    for _ in range(100):
        slope = 2.0 / math.sqrt(math.pi) * math.exp(-y * y)
        residual = (1.0 - s) - math.erfc(y) if tail else math.erf(y) - s
        step = residual / slope
        y -= step
        if abs(step) >= last_step or step == 0.0:
            break
        last_step = abs(step)
    return math.copysign(y, t)


def erfinv(t):
    """Inverse error function, elementwise, to double precision (SciPy's when importable)."""
    t = f64(t)
    if _scipy_erfinv is not None:
        return _scipy_erfinv(t)
    return np.vectorize(_erfinv_newton, otypes=[np.float64])(t)


def proxy_points(num_points):
    """U_k = sqrt(2) erfinv(2 (k + 1/2)/K - 1), k = 0..K-1: K quantiles of the standard normal.

    The argument is computed as (2k + 1 - K)/K, the same number with one rounding (an exact
    integer over K), so the points are exactly antisymmetric; near t = -1 erfinv' is ~50, and
    2 (k + 1/2)/K - 1 as written would carry its extra rounding into U_k at ~1e-14."""
    K = int(num_points)
    k = np.arange(K, dtype=np.float64)
    return math.sqrt(2.0) * erfinv((2.0 * k + 1.0 - K) / K)


def _check_activation(activation):
    if activation not in PROXY_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(PROXY_ACTIVATIONS)}; "
                         f"got {activation!r}")


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def proxy_activation(a, activation):
    """phi: relu, silu (a*sigmoid(a)), gelu (erf form: a/2 (1 + erf(a/sqrt 2))), identity."""
    _check_activation(activation)
    a = f64(a)
    if activation == "relu":
        return np.maximum(a, 0.0)
    if activation == "silu":
        return a * _sigmoid(a)
    if activation == "gelu":
        return 0.5 * a * (1.0 + _erf(a / math.sqrt(2.0)))
    return a


def proxy_activation_derivative(a, activation):
    """phi'(a); relu'(0) = 0."""
    _check_activation(activation)
    a = f64(a)
    if activation == "relu":
        return (a > 0.0).astype(np.float64)
    if activation == "silu":
        sig = _sigmoid(a)
        return sig * (1.0 + a * (1.0 - sig))
    if activation == "gelu":
        return 0.5 * (1.0 + _erf(a / math.sqrt(2.0))) + a * np.exp(-a * a / 2.0) / math.sqrt(2.0 * math.pi)
    return np.ones_like(a)


def _proxy_params(C, weight, bias, proxy_weight, proxy_bias):
    """gamma, beta, gamma_p, beta_p as (C,) arrays; an absent one takes its init (1, 0, 0, 0)."""
    def value(p, init):
        return np.full(C, init) if p is None else f64(p).reshape(C)
    return value(weight, 1.0), value(bias, 0.0), value(proxy_weight, 0.0), value(proxy_bias, 0.0)


def _proxy_moments(C, weight, bias, proxy_weight, proxy_bias, activation, num_points):
    """(U (K,), Y (C, K), q (C, K), P (C, K), mu_p (C,), v_p (C,))."""
    gamma, beta, gamma_p, beta_p = _proxy_params(C, weight, bias, proxy_weight, proxy_bias)
    u = proxy_points(num_points)
    y_k = beta_p[:, None] + (1.0 + gamma_p[:, None]) * u[None, :]
    q = gamma[:, None] * y_k + beta[:, None]
    p = proxy_activation(q, activation)
    mu_p = p.mean(axis=1)
    v_p = ((p - mu_p[:, None]) ** 2).mean(axis=1)
    return u, y_k, q, p, mu_p, v_p


def proxy_norm(x, weight, bias, proxy_weight, proxy_bias, activation="relu", eps=0.03,
               num_points=200):
    x = f64(x)
    C, shape = x.shape[1], _channel_shape(x)
    gamma, beta, _, _ = _proxy_params(C, weight, bias, proxy_weight, proxy_bias)
    z = proxy_activation(gamma.reshape(shape) * x + beta.reshape(shape), activation)
    _, _, _, _, mu_p, v_p = _proxy_moments(C, weight, bias, proxy_weight, proxy_bias, activation,
                                           num_points)
    return (z - mu_p.reshape(shape)) / np.sqrt(v_p.reshape(shape) + eps)


def proxy_norm_backward(x, dy, weight, bias, proxy_weight, proxy_bias, activation="relu",
                        eps=0.03, num_points=200):
    x, dy = f64(x), f64(dy)
    C, shape, axes = x.shape[1], _channel_shape(x), _all_but_channel(x)
    K = int(num_points)
    gamma, beta, _, _ = _proxy_params(C, weight, bias, proxy_weight, proxy_bias)
    a = gamma.reshape(shape) * x + beta.reshape(shape)
    z = proxy_activation(a, activation)
    u, y_k, q, p, mu_p, v_p = _proxy_moments(C, weight, bias, proxy_weight, proxy_bias,
                                             activation, num_points)
    s = 1.0 / np.sqrt(v_p + eps)
    # input path
    dz = dy * s.reshape(shape)
    da = dz * proxy_activation_derivative(a, activation)
    dx = da * gamma.reshape(shape)
    dgamma = (da * x).sum(axis=axes)
    dbeta = da.sum(axis=axes)
    # proxy path: through mu_p and v_p
    dmu = -s * dy.sum(axis=axes)
    dv = -0.5 * s ** 3 * (dy * (z - mu_p.reshape(shape))).sum(axis=axes)
    dp = dmu[:, None] / K + dv[:, None] * 2.0 * (p - mu_p[:, None]) / K
    dq = dp * proxy_activation_derivative(q, activation)
    dgamma = dgamma + (dq * y_k).sum(axis=1)
    dbeta = dbeta + dq.sum(axis=1)
    dy_k = gamma[:, None] * dq
    dproxy_bias = dy_k.sum(axis=1)
    dproxy_weight = (dy_k * u[None, :]).sum(axis=1)

    def given(p_in, grad):
        return None if p_in is None else grad.reshape(np.shape(p_in))
    return (dx, given(weight, dgamma), given(bias, dbeta), given(proxy_weight, dproxy_weight),
            given(proxy_bias, dproxy_bias))


# -- LayerNorm2d: LayerNorm over C for each (n, *spatial), per-channel affine ---------------------

def layer_norm_2d(x, weight, bias, eps=1e-6):
    x = f64(x)
    return _affine(standardize(x, (1,), eps), weight, bias, _channel_shape(x))


def layer_norm_2d_backward(x, dy, weight, bias, eps=1e-6):
    x, dy = f64(x), f64(dy)
    xhat = standardize(x, (1,), eps)
    g, dweight, dbias = _affine_backward(xhat, dy, weight, bias, _channel_shape(x),
                                         _all_but_channel(x))
    return standardize_backward(x, g, (1,), eps), dweight, dbias


# -- LocalResponseNorm (torch.nn.functional.local_response_norm) ----------------------------------
#
# W(c) = channels c - size//2 .. c + (size-1)//2 that exist (torch pads with zeros: size//2
# before, (size-1)//2 after, and averages over `size`): s_c = k + alpha/size * sum_{j in W(c)} x_j^2,
# y_c = x_c s_c^(-beta).
# Backward: dy_c/dx_m = [c == m] s_c^(-beta) - 2 alpha beta/size x_c s_c^(-beta-1) x_m [m in W(c)],
# and m in W(c) <=> c in m - (size-1)//2 .. m + size//2 (the window with its sides swapped):
#   dx_m = dy_m s_m^(-beta) - 2 alpha beta/size x_m sum_{c: m in W(c)} dy_c x_c s_c^(-beta-1).

def _channel_window_sum(a, before, after):
    """out[:, c] = sum of a[:, j] for j in c - before .. c + after within 0..C-1."""
    C = a.shape[1]
    out = np.zeros_like(a)
    for c in range(C):
        lo, hi = max(0, c - before), min(C, c + after + 1)
        out[:, c] = a[:, lo:hi].sum(axis=1)
    return out


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0):
    x = f64(x)
    s = k + alpha / size * _channel_window_sum(x ** 2, size // 2, (size - 1) // 2)
    return x * s ** (-beta)


def local_response_norm_backward(x, dy, size, alpha=1e-4, beta=0.75, k=1.0):
    x, dy = f64(x), f64(dy)
    s = k + alpha / size * _channel_window_sum(x ** 2, size // 2, (size - 1) // 2)
    back = _channel_window_sum(dy * x * s ** (-beta - 1.0), (size - 1) // 2, size // 2)
    return dy * s ** (-beta) - 2.0 * alpha * beta / size * x * back


# -- EvoNorm-B0 -----------------------------------------------------------------------------------
#
# a_c = sqrt(var_B + eps) (var_B biased over (N, *spatial) in training; running_var, a constant,
# in eval); b = v_c x + sqrt(var_I + eps) (var_I biased over (*spatial) of each plane);
# m = max(a, b); y = x/m * gamma + beta.
# Backward, g = dy*gamma: dx = g/m + ...; dL/dm = -g x/m^2, split by w_a = [a > b] + [a == b]/2,
# w_b = 1 - w_a (torch.maximum's rule). Through b: dv = S[dL/db x], dx += dL/db v,
# dL/dvar_I = (sum over the plane of dL/db)/(2 sqrt(var_I + eps)), dx += dL/dvar_I 2 (x - mean_I)/S_I.
# Through a (training only): dL/dvar_B = (sum over (N, *spatial) of dL/dm w_a)/(2 a),
# dx += dL/dvar_B 2 (x - mean_B)/M_B.

def _evonorm_b0_terms(x, v, eps, running_var):
    shape, spatial = _channel_shape(x), _spatial_axes(x)
    if running_var is None:
        var_b = x.var(axis=_all_but_channel(x), keepdims=True)
    else:
        var_b = f64(running_var).reshape(shape)
    a = np.sqrt(var_b + eps)
    s_i = np.sqrt(x.var(axis=spatial, keepdims=True) + eps)
    b = f64(v).reshape(shape) * x + s_i
    return a, s_i, b


def evonorm_b0(x, weight, bias, v, eps=1e-3, running_var=None):
    x = f64(x)
    a, _, b = _evonorm_b0_terms(x, v, eps, running_var)
    return _affine(x / np.maximum(a, b), weight, bias, _channel_shape(x))


def evonorm_b0_backward(x, dy, weight, bias, v, eps=1e-3, running_var=None):
    x, dy = f64(x), f64(dy)
    shape, axes, spatial = _channel_shape(x), _all_but_channel(x), _spatial_axes(x)
    a, s_i, b = _evonorm_b0_terms(x, v, eps, running_var)
    m = np.maximum(a, b)
    dweight, dbias = _affine_grads(dy, x / m, weight, bias, axes)
    g = dy * f64(weight).reshape(shape) if weight is not None else dy
    dx = g / m
    dm = -g * x / m ** 2
    w_a = (a > b) + 0.5 * (a == b)
    d_a = dm * w_a
    d_b = dm * (1.0 - w_a)
    dv = (d_b * x).sum(axis=axes)
    dx = dx + d_b * f64(v).reshape(shape)
    s_count = _group_size(x, spatial)
    d_var_i = d_b.sum(axis=spatial, keepdims=True) / (2.0 * s_i)
    dx = dx + d_var_i * 2.0 * (x - x.mean(axis=spatial, keepdims=True)) / s_count
    if running_var is None:
        m_count = _group_size(x, axes)
        d_var_b = d_a.sum(axis=axes, keepdims=True) / (2.0 * a)
        dx = dx + d_var_b * 2.0 * (x - x.mean(axis=axes, keepdims=True)) / m_count
    return dx, dweight, dbias, dv.reshape(np.shape(v))


# -- EvoNorm-S0 -----------------------------------------------------------------------------------
#
# h = x sigmoid(v_c x); sd = sqrt(var_G + eps), var_G biased per (n, group) over
# (C/G channels, *spatial); y = h/sd * gamma + beta.
# Backward, g = dy*gamma, sig = sigmoid(v x): dL/dh = g/sd; dh/dx = sig + v x sig (1 - sig),
# dh/dv = x^2 sig (1 - sig); dL/dsd = -sum over the group of g h/sd^2,
# dL/dvar_G = dL/dsd/(2 sd), dx += dL/dvar_G 2 (x - mean_G)/M_G.

def evonorm_s0(x, weight, bias, v, groups=32, eps=1e-5):
    x = f64(x)
    sig = _sigmoid(f64(v).reshape(_channel_shape(x)) * x)
    xg = _grouped(x, groups)
    sd = np.sqrt(xg.var(axis=2, keepdims=True) + eps)
    h = x * sig
    return _affine((_grouped(h, groups) / sd).reshape(x.shape), weight, bias, _channel_shape(x))


def evonorm_s0_backward(x, dy, weight, bias, v, groups=32, eps=1e-5):
    x, dy = f64(x), f64(dy)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    vv = f64(v).reshape(shape)
    sig = _sigmoid(vv * x)
    h = x * sig
    xg = _grouped(x, groups)
    sd = np.sqrt(xg.var(axis=2, keepdims=True) + eps)
    out = (_grouped(h, groups) / sd).reshape(x.shape)
    dweight, dbias = _affine_grads(dy, out, weight, bias, axes)
    g = dy * f64(weight).reshape(shape) if weight is not None else dy
    dh = (_grouped(g, groups) / sd).reshape(x.shape)
    dv = (dh * x * x * sig * (1.0 - sig)).sum(axis=axes)
    dx = dh * (sig + vv * x * sig * (1.0 - sig))
    d_sd = -(_grouped(g * h, groups)).sum(axis=2, keepdims=True) / sd ** 2
    d_var = d_sd / (2.0 * sd)
    m_count = xg.shape[2]
    dx_g = d_var * 2.0 * (xg - xg.mean(axis=2, keepdims=True)) / m_count
    dx = dx + dx_g.reshape(x.shape)
    return dx, dweight, dbias, dv.reshape(np.shape(v))


# == Research variants III: normalization across iterations (MABN, CBN, BKN) =======================
#
# Three layers whose statistics reach past the current batch: MABN averages over the last steps'
# batches (a stateful reference, a class), CBN over earlier steps' statistics compensated to the
# current weights, BKN mixes a prediction from the previous layer's statistics into this one's.
# Every backward is checked by central finite differences in test_reference_iterations.py (MABN's
# where the paper's backward is the derivative: see below).


# -- MABN (Moving Average Batch Norm, arXiv 2001.06838; the formulation of its MABN.py) ------------
#
# Training step t = iters + 1 (the forward increments iters), sums over (N, *spatial) of M entries:
#   chi2_B = mean(x^2) per channel;  buffer_x2[(t-1) % buffer_size] = chi2_B;
#   chi2_S = mean of the buffer_size slots of buffer_x2 (current included), except while
#            t <= buffer_size or t < warmup_iters: chi2_S = chi2_B;
#   s = sqrt(chi2_S + eps);  z = x/s;
#   r = s/sqrt(running_var + eps) (running_var before this step's update), clipped to [1, 1]
#       (r = 1) while t <= max(1000, warmup_iters), to [1/r_max, r_max] after;
#   y = weight*(r z) + bias;  then running_var = momentum*running_var + (1 - momentum)*chi2_S.
# Backward of that step -- the paper's, deliberately NOT the exact derivative (r and the buffered
# statistics are constants, psi is averaged like chi2):
#   g = dy*weight*r;  psi_B = mean(g z) per channel;  buffer_gz[(t-1) % buffer_size] = psi_B;
#   psi_S = mean of the buffer_gz slots, with chi2_S's warm-up rule (psi_S = psi_B);
#   dx = (g - z psi_S)/s;  dweight = sum(dy r z);  dbias = sum(dy).
# Where psi_S = psi_B, chi2_S = chi2_B and r = 1 (warm-up; or buffer_size = 1 before step 1000)
# that is the exact derivative of y = weight x/sqrt(mean(x^2) + eps) + bias.
# Inference: y = weight x/sqrt(running_var + eps) + bias, no state change; its backward is that
# affine map's exact one.

class MABNReference:
    """The MABN layer's state and its two passes; backward(dy) is the backward of the latest
    forward. The latest training step's intermediates are kept in `last` (a dict) for tests."""

    def __init__(self, C, buffer_size=16, eps=1e-5, momentum=0.98, warmup_iters=100, r_max=5.0):
        self.C = int(C)
        self.buffer_size = int(buffer_size)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.warmup_iters = int(warmup_iters)
        self.r_max = float(r_max)
        self.iters = 0
        self.buffer_x2 = np.zeros((self.buffer_size, self.C))
        self.buffer_gz = np.zeros((self.buffer_size, self.C))
        self.running_var = np.ones(self.C)
        self.last = None
        self._saved = None

    def _warming_up(self, t):
        return t <= self.buffer_size or t < self.warmup_iters

    def _windowed(self, buffer, t, current):
        """Write `current` into step t's slot; the window mean, or `current` in warm-up."""
        buffer[(t - 1) % self.buffer_size] = current
        return current.copy() if self._warming_up(t) else buffer.mean(axis=0)

    def _clip_bounds(self, t):
        if t <= max(1000, self.warmup_iters):
            return 1.0, 1.0
        return 1.0 / self.r_max, self.r_max

    def forward(self, x, weight, bias, training=True):
        # copies: backward reads them later, whatever the caller does to its arrays meanwhile
        x, weight, bias = (np.array(a, dtype=np.float64) for a in (x, weight, bias))
        shape, axes = _channel_shape(x), _all_but_channel(x)
        if not training:
            scale = 1.0 / np.sqrt(self.running_var + self.eps)
            self._saved = dict(training=False, x=x, weight=weight, scale=scale)
            return weight.reshape(shape) * x * scale.reshape(shape) + bias.reshape(shape)
        self.iters += 1
        t = self.iters
        chi2_b = (x ** 2).mean(axis=axes)
        chi2_s = self._windowed(self.buffer_x2, t, chi2_b)
        s = np.sqrt(chi2_s + self.eps)
        z = x / s.reshape(shape)
        r_raw = s / np.sqrt(self.running_var + self.eps)
        lo, hi = self._clip_bounds(t)
        r = np.clip(r_raw, lo, hi)
        y = weight.reshape(shape) * (r.reshape(shape) * z) + bias.reshape(shape)
        self.running_var = self.momentum * self.running_var + (1.0 - self.momentum) * chi2_s
        self.last = dict(t=t, chi2_B=chi2_b, chi2_S=chi2_s, s=s, r_unclipped=r_raw, r=r)
        self._saved = dict(training=True, t=t, x=x, weight=weight, s=s, z=z, r=r)
        return y

    def backward(self, dy):
        if self._saved is None:
            raise RuntimeError("backward before forward")
        sv = self._saved
        x, dy = sv["x"], f64(dy)
        shape, axes = _channel_shape(x), _all_but_channel(x)
        w = sv["weight"].reshape(shape)
        if not sv["training"]:
            scale = sv["scale"].reshape(shape)
            return w * scale * dy, (dy * x * scale).sum(axis=axes), dy.sum(axis=axes)
        s, z, r = sv["s"].reshape(shape), sv["z"], sv["r"]
        g = dy * w * r.reshape(shape)
        psi_b = (g * z).mean(axis=axes)
        psi_s = self._windowed(self.buffer_gz, sv["t"], psi_b)
        self.last.update(psi_B=psi_b, psi_S=psi_s)
        dx = (g - z * psi_s.reshape(shape)) / s
        return dx, (dy * r.reshape(shape) * z).sum(axis=axes), dy.sum(axis=axes)


# -- CBN (Cross-Iteration Batch Normalization, arXiv 2002.05712) -----------------------------------
#
# An earlier step tau keeps (mean_tau, sqmean_tau, weight_tau, dmean_dweight_tau,
# dsqmean_dweight_tau): the per-channel mean and mean square of this layer's input at tau, the
# preceding layer's weight then (shape (C, ...), filter c makes channel c) and the Jacobians of the
# two statistics w.r.t. that weight (row c: channel c's derivative w.r.t. filter c). Compensated to
# the current weight theta_t, summing over filter c's entries:
#   mu_tau(theta_t) = mean_tau + sum(dmean_dweight_tau[c] * (theta_t[c] - weight_tau[c]))
#   nu_tau(theta_t) = sqmean_tau + sum(dsqmean_dweight_tau[c] * (theta_t[c] - weight_tau[c])).
# Window: the current step (uncompensated: mu_t, nu_t) and the K - 1 earlier ones;
#   mu_bar = mean over the window of mu;  nu_bar = mean over the window of max(nu, mu^2) (per
#   term);  var_bar = nu_bar - mu_bar^2 (>= 0 by Jensen);  y = weight (x - mu_bar)/sqrt(var_bar
#   + eps) + bias, with mu_t = mean(x), nu_t = mean(x^2) over (N, *spatial) (biased).
# Backward: the earlier terms are constants; with g = dy*weight, r = 1/sqrt(var_bar + eps), M
# entries per channel, S[.] sums over them:
#   dL/dmu_bar = -r S[g];  dL/dvar_bar = -r^3/2 S[g (x - mu_bar)];
#   dL/dmu_t = (dL/dmu_bar - 2 mu_bar dL/dvar_bar)/K;  dL/dnu_t = dL/dvar_bar/K (through nu_t:
#   nu_t >= mu_t^2 always, the max never takes mu_t^2's side but at rounding ties);
#   dx = g r + dL/dmu_t/M + dL/dnu_t 2x/M.
# With no earlier term (K = 1) this is batch norm with the biased batch variance.

def cbn_compensate(entry, weight_t):
    """(mu_tau(theta_t), nu_tau(theta_t)) of one history entry (mean, sqmean, weight,
    dmean_dweight, dsqmean_dweight)."""
    mean, sqmean, weight, dmean_dw, dsqmean_dw = (f64(a) for a in entry)
    delta = f64(weight_t) - weight
    filter_axes = tuple(range(1, delta.ndim))
    return (mean + (dmean_dw * delta).sum(axis=filter_axes),
            sqmean + (dsqmean_dw * delta).sum(axis=filter_axes))


def cbn_compensated_history(weight_t, history):
    """([mu_tau], [nu_tau]) of every history entry, oldest first."""
    pairs = [cbn_compensate(entry, weight_t) for entry in history]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _cbn_window(mu_t, nu_t, mus, nus):
    mu = np.stack([f64(mu_t)] + [f64(m) for m in mus])
    nu = np.stack([f64(nu_t)] + [f64(n) for n in nus])
    mu_bar = mu.mean(axis=0)
    nu_bar = np.maximum(nu, mu ** 2).mean(axis=0)
    return mu_bar, nu_bar - mu_bar ** 2, mu.shape[0]


def cbn_window_statistics(mean_t, sqmean_t, weight_t, history, eps=1e-5):
    """(mu_bar, var_bar, number_of_terms) of the current step's (mean_t, sqmean_t) and the
    compensated history. eps is accepted for the signature's sake: the window statistics do not
    use it (it enters only the normalization, sqrt(var_bar + eps))."""
    mus, nus = cbn_compensated_history(weight_t, history)
    return _cbn_window(mean_t, sqmean_t, mus, nus)


def _cbn_terms(x, mus, nus, eps):
    axes = _all_but_channel(x)
    mu_t, nu_t = x.mean(axis=axes), (x ** 2).mean(axis=axes)
    mu_bar, var_bar, K = _cbn_window(mu_t, nu_t, mus, nus)
    return mu_bar, var_bar, K, 1.0 / np.sqrt(var_bar + eps)


def cross_iteration_batch_norm(x, weight, bias, history_compensated_mu_list,
                               history_compensated_nu_list, eps=1e-5):
    x = f64(x)
    shape = _channel_shape(x)
    mu_bar, _, _, r = _cbn_terms(x, history_compensated_mu_list, history_compensated_nu_list, eps)
    xhat = (x - mu_bar.reshape(shape)) * r.reshape(shape)
    return _affine(xhat, weight, bias, shape)


def cross_iteration_batch_norm_backward(x, dy, weight, bias, mus, nus, eps=1e-5):
    x, dy = f64(x), f64(dy)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    M = _group_size(x, axes)
    mu_bar, _, K, r = _cbn_terms(x, mus, nus, eps)
    centered = x - mu_bar.reshape(shape)
    dweight, dbias = _affine_grads(dy, centered * r.reshape(shape), weight, bias, axes)
    g = dy * f64(weight).reshape(shape) if weight is not None else dy
    d_mu_bar = -r * g.sum(axis=axes)
    d_var_bar = -0.5 * r ** 3 * (g * centered).sum(axis=axes)
    d_mu_t = (d_mu_bar - 2.0 * mu_bar * d_var_bar) / K
    d_nu_t = d_var_bar / K
    dx = (g * r.reshape(shape) + d_mu_t.reshape(shape) / M
          + d_nu_t.reshape(shape) * 2.0 * x / M)
    return dx, dweight, dbias


# -- BKN (Batch Kalman Normalization, arXiv 1802.03133) --------------------------------------------
#
# mu_B, var_B: batch mean and biased variance per channel over (N, *spatial). The previous layer's
# posterior (prior_mean, prior_var), shape (C_prev,), is carried through the transition A
# (C, C_prev): mu_pred = A prior_mean, var_pred = (A*A) prior_var. With gain p:
#   mu = p mu_pred + (1-p) mu_B;  var = p var_pred + (1-p) var_B + p(1-p)(mu_B - mu_pred)^2;
# unless mean over channels of var_pred/var_B >= 100, when the prediction is discarded:
# mu = mu_B, var = var_B (no prior at all, prior_mean None: the same). y = weight (x - mu)/
# sqrt(var + eps) + bias; the posterior handed on is (mu, var).
# Backward, g = dy*weight, r = 1/sqrt(var + eps), d = mu_B - mu_pred, S[.] over a channel's M:
#   dL/dmu = -r S[g];  dL/dvar = -r^3/2 S[g (x - mu)];
#   dL/dmu_B = (1-p) dL/dmu + 2p(1-p) d dL/dvar;  dL/dvar_B = (1-p) dL/dvar;
#   dL/dmu_pred = p dL/dmu - 2p(1-p) d dL/dvar;  dL/dvar_pred = p dL/dvar;
#   dx = g r + dL/dmu_B/M + dL/dvar_B 2(x - mu_B)/M;
#   dA = dL/dmu_pred prior_mean^T + 2A * (dL/dvar_pred prior_var^T);
#   dprior_mean = A^T dL/dmu_pred;  dprior_var = (A*A)^T dL/dvar_pred.
# The guard's branch is piecewise: where it discards, the A and prior gradients are zero.

def _bkn_terms(x, A, prior_mean, prior_var, gain):
    """(mu_B, var_B, mu_pred, var_pred, used_prior, mu, var); the predictions None without a
    prior."""
    axes = _all_but_channel(x)
    mu_b = x.mean(axis=axes)
    var_b = ((x - mu_b.reshape(_channel_shape(x))) ** 2).mean(axis=axes)
    if prior_mean is None:
        return mu_b, var_b, None, None, False, mu_b, var_b
    A = f64(A)
    mu_pred = A @ f64(prior_mean)
    var_pred = (A * A) @ f64(prior_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.mean(var_pred / var_b))
    if not ratio < 100.0:   # >= 100 (a NaN ratio, 0/0, discards too)
        return mu_b, var_b, mu_pred, var_pred, False, mu_b, var_b
    p = float(gain)
    mu = p * mu_pred + (1.0 - p) * mu_b
    var = p * var_pred + (1.0 - p) * var_b + p * (1.0 - p) * (mu_b - mu_pred) ** 2
    return mu_b, var_b, mu_pred, var_pred, True, mu, var


def batch_kalman_norm(x, weight, bias, A, prior_mean, prior_var, gain=0.9, eps=1e-5):
    """(y, post_mean, post_var, used_prior)."""
    x = f64(x)
    shape = _channel_shape(x)
    _, _, _, _, used, mu, var = _bkn_terms(x, A, prior_mean, prior_var, gain)
    xhat = (x - mu.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return _affine(xhat, weight, bias, shape), mu, var, used


def batch_kalman_norm_backward(x, dy, weight, bias, A, prior_mean, prior_var, gain=0.9, eps=1e-5):
    """{"x", "weight", "bias", "A", "prior_mean", "prior_var"}: the gradients; those of absent
    arguments are None, those of a discarded prediction zero."""
    x, dy = f64(x), f64(dy)
    shape, axes = _channel_shape(x), _all_but_channel(x)
    M = _group_size(x, axes)
    mu_b, var_b, mu_pred, var_pred, used, mu, var = _bkn_terms(x, A, prior_mean, prior_var, gain)
    r = 1.0 / np.sqrt(var + eps)
    centered = x - mu.reshape(shape)
    dweight, dbias = _affine_grads(dy, centered * r.reshape(shape), weight, bias, axes)
    g = dy * f64(weight).reshape(shape) if weight is not None else dy
    d_mu = -r * g.sum(axis=axes)
    d_var = -0.5 * r ** 3 * (g * centered).sum(axis=axes)
    p = float(gain) if used else 0.0
    d = mu_b - mu_pred if used else np.zeros_like(mu_b)
    d_mu_b = (1.0 - p) * d_mu + 2.0 * p * (1.0 - p) * d * d_var
    d_var_b = (1.0 - p) * d_var
    dx = (g * r.reshape(shape) + d_mu_b.reshape(shape) / M
          + d_var_b.reshape(shape) * 2.0 * (x - mu_b.reshape(shape)) / M)
    grads = {"x": dx, "weight": dweight, "bias": dbias, "A": None, "prior_mean": None,
             "prior_var": None}
    if prior_mean is not None:
        A = f64(A)
        d_mu_pred = p * d_mu - 2.0 * p * (1.0 - p) * d * d_var
        d_var_pred = p * d_var
        grads["A"] = (np.outer(d_mu_pred, f64(prior_mean))
                      + 2.0 * A * np.outer(d_var_pred, f64(prior_var)))
        grads["prior_mean"] = A.T @ d_mu_pred
        grads["prior_var"] = (A * A).T @ d_var_pred
    return grads
