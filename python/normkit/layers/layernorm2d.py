"""LayerNorm2d: LayerNorm over the channels of each (n, h, w) of an NCHW tensor (ConvNeXt's)."""
import numpy as np

from .. import _core
from ._variant import PositionsSaved, StepSaved, VariantLayer


class LayerNorm2d(VariantLayer):
    """LayerNorm over C for each (n, h, w) of (N, C, H, W) input, as ConvNeXt's and timm's
    LayerNorm2d (Liu et al., "A ConvNet for the 2020s", arXiv 2201.03545):

        mu = mean_c x,  var = mean_c (x - mu)^2 (biased),  y = weight_c (x - mu)/sqrt(var + eps) + bias_c.

    Without a transpose: NCHW memory is read as a channels-last plan whose rows are the channels
    and whose columns are the H*W positions, so each (n, h, w) is a column's statistics group and
    the per-channel affine is per row (the core's per-position steps). The forward goes sample by
    sample (its statistics, then its output while it is in cache); the backward is one sums pass
    and one apply pass.
    """

    def __init__(self, num_channels, eps=1e-6, affine=True, dtype=np.float32):
        super().__init__()
        self._setup(num_channels, eps, affine, dtype, "NCHW")
        self.num_channels = self.num_features

    def _forward(self, x):
        x, (N, C, S) = self._input(x)
        # N samples of C rows (positions) of S columns (cells): the channels-last reading.
        plan = _core.plan_per_sample_group(N, S, C, S)
        plan.channels_last = True
        if x.size == 0:
            return _core.empty_like(x), StepSaved(plan, x, np.zeros(N * S), None, x.shape)
        y = _core.empty_like(x)
        if self.weight is None:
            mean, _, r = _core.normalize_batch_stats(plan, x, self.eps, None, None, y)
        else:  # sample by sample: its columns' statistics, then its output while in cache
            mean, _, r = _core.normalize_batch_stats_positions(plan, x, self.eps, self.weight, self.bias, y)

        # LayerNorm's backward per cell (tests/reference.py: layer_norm_2d_backward), with the
        # weight inside the sums: B = sum w dy, A = sum w dy (x - mu) over the C channels,
        # dx = r w dy - r B/C - r^3 (x - mu) A/C.
        def fold(B, A):
            return r, -r ** 3 * A / C, -r * B / C

        if self.weight is None:
            return y, StepSaved(plan, x, mean, lambda B, A: fold(B, A) + ({},), x.shape)
        return y, PositionsSaved(plan, x, mean, r, self.weight, fold, x.shape, self._param_grads)

    def extra_repr(self):
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
