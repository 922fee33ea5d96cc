"""MovingAverageBatchNorm2d: batch normalization by moving averages of the statistics (MABN)."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _checks, _core
from ._variant import StepSaved, VariantLayer, checked_attribute


class _TrainingStep:
    """A training forward's backward, once: the paper's backward with psi from its ring."""

    __slots__ = ("layer", "plan", "x", "shape", "t", "slot", "s", "r", "w", "done")

    def __init__(self, layer: MovingAverageBatchNorm2d, plan: _core.Plan, x: npt.NDArray[Any],
                 t: int, slot: int, s: npt.NDArray[np.float64], r: npt.NDArray[np.float64],
                 w: npt.NDArray[np.float64]) -> None:
        self.layer, self.plan, self.x, self.shape = layer, plan, x, x.shape
        self.t, self.slot, self.s, self.r, self.w, self.done = t, slot, s, r, w, False

    def backward(self, dy: npt.NDArray[Any]
                 ) -> tuple[npt.NDArray[Any], dict[str, npt.NDArray[Any]]]:
        layer, s, r, w = self.layer, self.s, self.r, self.w
        M = self.x.size // layer.num_features  # elements per channel
        B, A = _core.backward_sums(self.plan, self.x, dy, 0.0)  # sum dy, sum dy x per channel
        # g = dy w r, z = x/s: psi_B = mean g z = w r A/(M s)
        psi_b = w * r * A / (M * s)
        ring = layer.buffer_gz.astype(np.float64)
        ring[self.slot] = psi_b
        psi_s = psi_b if layer._warming_up(self.t) else ring.mean(axis=0)
        # dx = (g - z psi_S)/s = (w r/s) dy - (psi_S/s^2) x; dweight = sum dy r z, dbias = sum dy
        dx = _core.empty_like(self.x)
        _core.backward_apply_coefficients(self.plan, self.x, dy, 0.0, w * r / s, -psi_s / s ** 2, 0.0, dx)
        layer.buffer_gz[self.slot] = psi_b
        self.done = True
        return dx.reshape(self.shape), layer._param_grads(r * A / s, B)


class MovingAverageBatchNorm2d(VariantLayer):
    """Moving Average Batch Normalization (Yan et al., "Towards Stabilizing Batch Statistics in
    Backward Propagation of Batch Normalization", arXiv 2001.06838), as its reference MABN.py.

    No mean subtraction: the preceding convolution's weights are assumed centred
    (normkit.functional.weight_centralization). Training step t (counted from 1, `iters`):

        chi2_B = mean_{n,h,w} x^2,  kept in the ring buffer_x2 (slot (t-1) % buffer_size)
        chi2_S = mean of the ring (chi2_B while t <= buffer_size or t < warmup_iters)
        z = x / sqrt(chi2_S + eps),  r = sqrt(chi2_S + eps) / sqrt(running_var + eps)
        r clipped to [1, 1] while t <= max(1000, warmup_iters), to [1/r_max, r_max] after
        y = weight (r z) + bias;  running_var = momentum running_var + (1 - momentum) chi2_S

    Backward (the paper's, not the exact derivative): g = dy weight r, psi_B = mean_{n,h,w} g z
    kept in the ring buffer_gz, psi_S its mean (same warm-up rule), dx = (g - z psi_S)/sqrt(chi2_S
    + eps), dweight = sum dy r z, dbias = sum dy. Exactly one backward per training forward.
    Inference: y = weight x / sqrt(running_var + eps) + bias; with `use_batch_stats` after eval(),
    chi2_B in its place (and the exact backward), the state untouched.
    """

    @property
    def buffer_size(self) -> int:
        return self.buffer_x2.shape[0]

    warmup_iters = checked_attribute("warmup_iters", _checks.nonneg_int)
    r_max = checked_attribute("r_max", lambda v, name: _checks.number_at_least(v, name, 1.0))

    momentum: float  # never None here
    running_var: npt.NDArray[Any]
    buffer_x2: np.ndarray[tuple[int, int], np.dtype[Any]]  # (buffer_size, C) rings
    buffer_gz: np.ndarray[tuple[int, int], np.dtype[Any]]
    iters: npt.NDArray[np.int64]

    def __init__(self, num_features: int, buffer_size: int = 16, eps: float = 1e-5,
                 momentum: float = 0.98, warmup_iters: int = 100, r_max: float = 5.0,
                 affine: bool = True, dtype: npt.DTypeLike = np.float32,
                 layout: str = "NCHW") -> None:
        super().__init__()
        self._setup(num_features, eps, affine, dtype, layout)
        size = _checks.positive_int(buffer_size, "buffer_size")
        self.momentum = _checks.momentum_value(momentum, allow_none=False)
        self.warmup_iters, self.r_max = warmup_iters, r_max
        C = self.num_features
        self._buffer("running_var", np.ones(C, self.dtype))
        self._buffer("buffer_x2", np.zeros((size, C), self.dtype))
        self._buffer("buffer_gz", np.zeros((size, C), self.dtype))
        self._buffer("iters", np.array(0, dtype=np.int64))
        # After eval(): normalize with the batch's own statistics, leaving the state alone.
        self.use_batch_stats = False

    def _warming_up(self, t: int) -> bool:
        """While the rings are not full, or before warmup_iters: the batch's own statistic."""
        return t <= self.buffer_size or t < self.warmup_iters

    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], StepSaved | _TrainingStep]:
        x, (N, C, S) = self._input(x)
        plan = self._plan(_core.plan_per_channel(N, C, S))
        w, b = self._channel_params()
        if not self._batch_stats():
            sd = np.sqrt(self.running_var.astype(np.float64) + self.eps)
            fold = lambda B, A: (w / sd, 0.0, 0.0, self._param_grads(A / sd, B))
            return self._apply(plan, x, 0.0, w / sd, b), StepSaved(plan, x, np.zeros(C), fold, x.shape)
        if x.size == 0:  # as torch's BatchNorm: an empty output, and no state changes
            return self._apply(plan, x, 0.0, 1.0, 0.0), StepSaved(plan, x, np.zeros(C), None, x.shape)
        mean, var = _core.group_moments(plan, x)
        chi2_b = var + mean * mean  # the mean of x^2 per channel
        if not self.training:  # use_batch_stats: the RMS normalization by the batch's chi2_B
            s = np.sqrt(chi2_b + self.eps)
            M = N * S
            # dx = w dy/s - w A x/(M s^3), A = sum dy x; dweight = A/s, dbias = sum dy
            fold = lambda B, A: (w / s, -w * A / (M * s ** 2 * s), 0.0, self._param_grads(A / s, B))
            return self._apply(plan, x, 0.0, w / s, b), StepSaved(plan, x, np.zeros(C), fold, x.shape)
        t = int(self.iters) + 1
        slot = (t - 1) % self.buffer_size
        ring = self.buffer_x2.astype(np.float64)
        ring[slot] = chi2_b.astype(self.dtype)
        chi2_s = chi2_b if self._warming_up(t) else ring.mean(axis=0)
        s = np.sqrt(chi2_s + self.eps)
        r = s / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        r = np.ones(C) if t <= max(1000, self.warmup_iters) else np.clip(r, 1.0 / self.r_max, self.r_max)
        y = self._apply(plan, x, 0.0, w * r / s, b)
        self.buffer_x2[slot] = chi2_b
        self.iters[...] = t
        self.running_var[...] = self.momentum * self.running_var.astype(np.float64) + (1 - self.momentum) * chi2_s
        return y, _TrainingStep(self, plan, x, t, slot, s, r, w)

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """normkit.inference_affine's (scale, shift): no mean subtraction,
        y = weight x / sqrt(running_var + eps) + bias."""
        w, b = self._channel_params()
        return w / np.sqrt(self.running_var.astype(np.float64) + self.eps), b

    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        saved = self._saved
        if isinstance(saved, _TrainingStep) and saved.done:
            raise _checks.StateError(
                "backward: expected one backward per training forward, got a second one on this "
                "MovingAverageBatchNorm2d (its psi ring already holds this step)")
        return super().backward(dy)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, buffer_size={self.buffer_size}, eps={self.eps}, momentum={self.momentum}, "
                f"warmup_iters={self.warmup_iters}, r_max={self.r_max}, affine={self.affine}")
