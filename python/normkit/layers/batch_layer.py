"""BatchLayerNorm2d: a mix of per-(c, h, w) batch and per-(n, h, w) feature standardization (BLN)."""
import math

import numpy as np

from .. import _checks, _core, _engine
from ._variant import VariantLayer, checked_attribute, unbiased

_RUNNING = ("running_mean", "running_var")


class _BatchLayerSaved:
    """BLN's backward: two sums passes (the feature cells', with the weight inside, and the batch
    columns') and one apply pass with the batch part as the apply's per-element term."""

    __slots__ = ("feature", "batch", "x", "mean_f", "rstd_f", "mean_b", "rstd_b", "with_batch_stats",
                 "mix", "weight", "shape", "grads")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def backward(self, dy):
        N, C, S = self.shape[0], self.shape[1], self.x.size // (self.shape[0] * self.shape[1])
        a, b, k = self.mix
        w = self.weight.astype(np.float64)
        # Feature cells (n, hw), over the C channels: B = sum w dy, A = sum w dy (x - mu_F); the
        # weight's feature part, k a sum dy x_F, and the bias's gradient per channel.
        Bf, Af, dw, db = _core.backward_sums_positions(self.feature, self.x, dy, self.mean_f, a * k * self.rstd_f,
                                                       0.0, self.weight)
        # Batch columns (c, hw), over the N samples: sum dy and sum dy (x - mu_B).
        Bb, Ab = _core.backward_sums(self.batch, self.x, dy, self.mean_b)
        r_b = self.rstd_b
        w_cs = np.repeat(w, S)  # the weight of each (c, hw)
        dw = dw + b * k * (r_b * Ab).reshape(C, S).sum(axis=1)
        # dx = a * standardize_backward over C of g + b * (standardize_backward over N of g, or
        # g r_B with running statistics), g = k w dy (tests/reference.py: batch_layer_norm_backward):
        # the feature cells' coefficients, and the batch part as a term per (c, hw).
        c1, c2, c3 = a * k * self.rstd_f, -a * k * self.rstd_f ** 3 * Af / C, -a * k * self.rstd_f * Bf / C
        e1 = b * k * r_b
        if self.with_batch_stats:
            e2, e3 = -b * k * r_b ** 3 * w_cs * Ab / N, -b * k * r_b * w_cs * Bb / N
        else:
            e2 = e3 = np.zeros_like(r_b)
        dx = _core.empty_like(self.x)
        _core.backward_apply_positions(self.feature, self.x, dy, self.mean_f, c1, c2, c3, self.weight, dx,
                                       sample_term=(self.mean_b, e1, e2, e3))
        return dx.reshape(self.shape), self.grads(dw, db)


class BatchLayerNorm2d(VariantLayer):
    """Batch Layer Normalization (Ziaee and Cano, "Batch Layer Normalization, A new normalization
    layer for CNNs and RNNs", arXiv 2209.08898), on the axes of its reference implementation:

        x_B = (x - mu_B)/sqrt(var_B + eps)   mu_B, var_B per (c, h, w) over the N samples
        x_F = (x - mu_F)/sqrt(var_F + eps)   mu_F, var_F per (n, h, w) over the C channels
        y = weight_c ((1/B - 1e-4) x_F + (1 - 1/B - 1e-4) x_B) / sqrt(C) + bias_c,

    both variances biased, B the configured `batch_size` (not the input's N). In training the
    batch statistics update running_mean and running_var, of shape (C, H, W) and starting at 0
    and 1, with torch's rule (var_B unbiased with the batch's actual N); in inference they replace
    the batch statistics, and the feature statistics are always the sample's own. The running
    statistics take the (C, H, W) of the first input and keep it: a later input of another shape
    raises ValueError. With `use_batch_stats` after eval() the batch's own statistics are used and
    the running ones left alone.

    Without a transpose: the feature statistics read NCHW memory as rows of channels (LayerNorm2d's
    plan), the batch statistics read it as one sample of N rows of C*H*W columns, and the batch
    part joins the feature part's apply pass as a term per (c, h, w).
    """

    batch_size = checked_attribute("batch_size", _checks.positive_int)

    def __init__(self, num_features, batch_size, eps=1e-3, momentum=0.1, dtype=np.float32):
        super().__init__()
        self._setup(num_features, eps, True, dtype, "NCHW")
        self.batch_size = batch_size
        self.momentum = _checks.momentum_value(momentum, allow_none=False)
        # (C, H, W): made at the first forward, of its input's shape, or by load_state_dict.
        self._buffer("running_mean", None)
        self._buffer("running_var", None)
        # After eval(): normalize with the batch's own statistics, leaving the running ones alone.
        self.use_batch_stats = False

    def _mix(self, C):
        B = float(self.batch_size)
        return 1.0 / B - 1e-4, 1.0 - 1.0 / B - 1e-4, 1.0 / math.sqrt(C)

    def _check_running_shape(self, x):
        if self.running_mean is not None and self.running_mean.shape != x.shape[1:]:
            raise ValueError(f"input: expected (C, H, W) = {self.running_mean.shape} (the running statistics' "
                             f"shape), got input of shape {x.shape}")

    def _forward(self, x):
        x, (N, C, S) = self._input(x)
        self._check_running_shape(x)
        F = C * S
        # The feature cells (n, hw): N samples of C rows of HW columns (LayerNorm2d's reading);
        # the batch columns (c, hw): one sample of N rows of C*HW columns.
        feature = _core.plan_per_sample_group(N, S, C, S)
        feature.channels_last = True
        batch = _core.plan_per_sample_group(1, F, N, F)
        batch.channels_last = True
        if x.size == 0:  # nothing to normalize: no statistics, and none made
            return _core.empty_like(x), _EmptySaved(x)
        if self.training:
            _checks.more_than_one_value(N, "(c, h, w) over the batch", x.shape)
        if self.running_mean is None:
            self.running_mean = np.zeros(x.shape[1:], self.dtype)
            self.running_var = np.ones(x.shape[1:], self.dtype)
        with_batch_stats = self._batch_stats()
        if with_batch_stats:
            mean_b, var_b = _core.group_moments(batch, x)
        else:
            mean_b = self.running_mean.reshape(-1).astype(np.float64)
            var_b = self.running_var.reshape(-1).astype(np.float64)
        rstd_b = 1.0 / np.sqrt(var_b + self.eps)
        a, b, k = self._mix(C)
        y = _core.empty_like(x)
        # y = ((x - mu_F) r_F a k + (x - mu_B) r_B b k) weight_c + bias_c, sample by sample.
        mean_f, _, rstd_f = _core.normalize_batch_stats_positions(
            feature, x, self.eps, self.weight, self.bias, y,
            sample_term=(mean_b, b * k * rstd_b, np.zeros(F), a * k))
        if self.training:
            _engine.running_update(self.running_mean, mean_b.reshape(x.shape[1:]), self.momentum)
            _engine.running_update(self.running_var, unbiased(var_b, N).reshape(x.shape[1:]), self.momentum)
        return y, _BatchLayerSaved(feature=feature, batch=batch, x=x, mean_f=mean_f, rstd_f=rstd_f, mean_b=mean_b,
                                   rstd_b=rstd_b, with_batch_stats=with_batch_stats, mix=(a, b, k),
                                   weight=self.weight, shape=x.shape, grads=self._param_grads)

    def load_state_dict(self, state_dict, strict=True):
        """As every layer's, except that running_mean and running_var may be of any (C, H, W):
        the loaded ones set the shape later inputs must have."""
        shapes = {n: np.shape(state_dict[n]) for n in _RUNNING if hasattr(state_dict, "keys") and n in state_dict}
        for n, shape in shapes.items():
            if len(shape) != 3 or shape[0] != self.num_features:
                raise ValueError(f"state_dict: expected {n} of shape (C, H, W) with C = {self.num_features}, "
                                 f"got {shape}")
        old = {n: getattr(self, n) for n in _RUNNING}
        both = {n: shapes.get(n, None if old[n] is None else old[n].shape) for n in _RUNNING}
        if shapes and both["running_mean"] != both["running_var"]:
            raise ValueError(f"state_dict: expected running_mean and running_var of one shape, got "
                             f"{both['running_mean']} and {both['running_var']} (the layer's own where not given)")
        for n, shape in shapes.items():  # the arrays to load into, of the loaded shape
            if old[n] is None or old[n].shape != shape:
                setattr(self, n, np.zeros(shape, self.dtype))
        try:
            return super().load_state_dict(state_dict, strict)
        except BaseException:
            for n, v in old.items():
                setattr(self, n, v)
            raise

    def extra_repr(self):
        return f"{self.num_features}, batch_size={self.batch_size}, eps={self.eps}, momentum={self.momentum}"


class _EmptySaved:
    """An empty batch's backward: the VariantLayer base answers it (no sums over no elements)."""

    __slots__ = ("x", "shape")

    def __init__(self, x):
        self.x, self.shape = x, x.shape
