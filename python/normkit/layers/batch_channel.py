"""BatchChannelNorm2d: a batch part, then a per-sample channel (group) part (BCN)."""
import numpy as np

from .. import _checks, _core, _engine
from ._variant import VariantLayer, unbiased


class BatchChannelNorm2d(VariantLayer):
    """Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel
    Normalization and Weight Standardization", arXiv 1911.09738): a per-channel batch
    normalization with its own affine (bn_weight, bn_bias: C values), then a per-sample group
    normalization over (C/G channels, H, W) with one affine pair per group (gn_weight, gn_bias:
    G = num_groups values); the one eps in both parts:

        x1 = bn_weight (x - mu) / sqrt(var + eps) + bn_bias,
        y  = gn_weight_g (x1 - mu_ng) / sqrt(var_ng + eps) + gn_bias_g.

    estimate=False: the batch part is BatchNorm (batch statistics and torch's running-statistics
    rule, `momentum`, in training; running statistics in inference). estimate=True (the paper's
    micro-batch mode): in training the running estimates (starting at 0 and 1) are first updated
    with rate r = estimate_rate, mu += r (mu_B - mu), var += r (mean_{N,H,W} (x - mu_old)^2 - var),
    then the batch part normalizes with the updated estimates, constants in the backward;
    inference uses them too. Use with Weight Standardization (normkit.functional.
    weight_standardization) on the preceding convolution, as the paper does.
    """

    def __init__(self, num_features, num_groups=32, eps=1e-5, momentum=0.1, estimate=False,
                 estimate_rate=0.1, dtype=np.float32):
        super().__init__()
        C = _checks.positive_int(num_features, "num_features")
        self.num_groups = _checks.positive_int(num_groups, "num_groups")
        _checks.divisor(self.num_groups, C, "num_groups", "num_features")
        self.num_features, self.eps = C, _checks.nonneg_float(eps, "eps")
        self.layout, self.affine = "NCHW", True
        self._set_dtype(dtype)
        self.momentum = _checks.momentum_value(momentum, allow_none=False)
        self.estimate = bool(estimate)
        self.estimate_rate = _checks.number_in(estimate_rate, "estimate_rate", 0.0, 1.0)
        G = self.num_groups
        self._param("bn_weight", np.ones(C, self.dtype))
        self._param("bn_bias", np.zeros(C, self.dtype))
        self._param("gn_weight", np.ones(G, self.dtype))
        self._param("gn_bias", np.zeros(G, self.dtype))
        self._buffer("running_mean", np.zeros(C, self.dtype))
        self._buffer("running_var", np.ones(C, self.dtype))
        self.weight = self.bias = None  # the affines are the two parts' own
        # After eval(): the batch part normalizes with the batch's own statistics.
        self.use_batch_stats = False

    def _forward(self, x):
        x, (N, C, S) = self._input(x)
        G, cpg = self.num_groups, C // self.num_groups
        bn_plan = _core.plan_per_channel(N, C, S)
        if x.size == 0:
            y = _core.empty_like(x)
            return y, (None, None, x.shape, x)
        batch = self._batch_stats() and not self.estimate
        if self.training and (batch or self.estimate):
            _checks.more_than_one_value(N * S, "channel", x.shape)
        x1 = _core.empty_like(x)
        if batch:
            mean, var, rstd = _core.normalize_batch_stats(bn_plan, x, self.eps, self.bn_weight, self.bn_bias, x1)
            if self.training:
                _engine.running_update(self.running_mean, mean, self.momentum)
                _engine.running_update(self.running_var, unbiased(var, N * S), self.momentum)
        else:
            if self.estimate and self.training:
                mu_b, var_b = _core.group_moments(bn_plan, x)
                old = self.running_mean.astype(np.float64)
                r = self.estimate_rate
                # mean over (N, H, W) of (x - mu_old)^2 = var_B + (mu_B - mu_old)^2
                spread = var_b + (mu_b - old) ** 2
                _engine.running_update(self.running_mean, mu_b, r)
                _engine.running_update(self.running_var, spread, r)
            mean = np.ascontiguousarray(self.running_mean, np.float64)
            rstd = _engine.rstd_of(self.running_var, self.eps)
            _core.normalize(bn_plan, x, mean, rstd, self.bn_weight, self.bn_bias, x1)
        bn_saved = _engine.Saved(bn_plan, x, mean, rstd, self.bn_weight, batch, None)
        gn_plan = _core.plan_per_sample_group(N, C, S, G)
        y = _core.empty_like(x)
        gw, gb = np.repeat(self.gn_weight, cpg), np.repeat(self.gn_bias, cpg)  # per channel
        gmean, _, grstd = _core.normalize_batch_stats(gn_plan, x1, self.eps, gw, gb, y)
        gn_saved = _engine.Saved(gn_plan, x1, gmean, grstd, gw, True, None)
        return y, (bn_saved, gn_saved, x.shape, x)

    def backward(self, dy):
        """dx of the last forward; grads for bn_weight, bn_bias, gn_weight, gn_bias."""
        if self._saved is None:
            raise _checks.StateError(
                f"backward: expected a forward call first, got none on this {type(self).__name__}")
        bn_saved, gn_saved, shape, x = self._saved
        dy = _checks.grad_output(dy, shape, x.dtype)
        if x.size == 0:
            self.grads = {n: np.zeros_like(p) for n, p in self.parameters().items()}
            return _core.empty_like(x)
        # The group part's backward (its input x1 is the batch part's output), then the batch part's.
        dx1, dgw, dgb = _engine_backward(gn_saved, dy)
        dx, dbw, dbb = _engine_backward(bn_saved, dx1)
        G = self.num_groups
        self.grads = {"bn_weight": dbw, "bn_bias": dbb,
                      "gn_weight": dgw.reshape(G, -1).sum(axis=1).astype(self.dtype),
                      "gn_bias": dgb.reshape(G, -1).sum(axis=1).astype(self.dtype)}
        return dx.reshape(shape)

    def extra_repr(self):
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
                f"estimate={self.estimate}, estimate_rate={self.estimate_rate}")


def _engine_backward(saved, dy):
    """(dx, dweight, dbias) of a fused forward's Saved, in one call where it can."""
    fast = _core.backward_fast(saved, dy, True, True)
    return fast if fast is not None else _engine.backward(saved, dy, True, True)
