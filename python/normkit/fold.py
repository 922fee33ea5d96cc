"""Folding an inference-mode normalization layer into the convolution or linear layer before it.

A layer folds when its inference is a per-channel affine map, y = scale[c] * x + shift[c]
(`inference_affine`); each layer derives its (scale, shift) from its own eval equations in a
`_inference_affine(modality)` method next to its forward. Layers that normalize a sample with
statistics of that sample (GroupNorm, LayerNorm, ...) have no such method and are refused here.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from . import _checks
from .layers.base import NormLayer


class NotAffineError(TypeError, ValueError):
    """The layer's inference is not a per-channel affine (its kind, mode or configuration). A
    TypeError; also a ValueError, which fold_batchnorm raised for a BatchNorm without running
    statistics before inference_affine existed."""


# Why the layers without an `_inference_affine` depend on the sample (class name -> reason).
_SAMPLE_DEPENDENT = {
    "GroupNorm": "it normalizes each sample over its own channel groups",
    "LayerNorm": "it normalizes each sample with that sample's own statistics",
    "RMSNorm": "it divides each sample by that sample's own root mean square",
    "LayerNorm2d": "it normalizes each sample over its own channels",
    "FilterResponseNorm2d": "it divides each sample by its own mean square per channel (and the TLU is not affine)",
    "BatchLayerNorm2d": "it mixes in each sample's own feature statistics",
    "BatchChannelNorm2d": "its batch part is affine but its group part normalizes each sample over its own groups",
    "EvoNormB0_2d": "it divides by max(batch std, v*x + the sample's instance std), not affine in x",
    "EvoNormS0_2d": "it normalizes each sample over its own groups, through a swish gate",
    "LocalResponseNorm": "it divides each value by the energy of neighbouring channels of the same sample",
}


def not_affine(layer: object, reason: str) -> NotAffineError:
    """NotAffineError naming the layer and why its inference is not a per-channel affine."""
    return NotAffineError(f"layer: {type(layer).__name__} has no per-channel affine inference: {reason}")


def _channel_vector(v: Any, default: float, C: int | None) -> npt.NDArray[np.float64]:
    """A layer attribute (NumPy, torch tensor or None) as a float64 vector."""
    if v is None:
        assert C is not None  # only running_mean's (never None here) comes without C
        return np.full(C, default, np.float64)
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v, np.float64).reshape(-1)


def _duck_batchnorm(layer: Any) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(scale, shift) of anything with running_mean, running_var, eps, weight and bias (a torch
    BatchNorm module): BatchNorm's eval map."""
    mean = _channel_vector(layer.running_mean, 0.0, None)
    C = mean.size
    var = _channel_vector(layer.running_var, 1.0, C)
    gamma = _channel_vector(getattr(layer, "weight", None), 1.0, C)
    beta = _channel_vector(getattr(layer, "bias", None), 0.0, C)
    for name, v in (("running_var", var), ("weight", gamma), ("bias", beta)):
        if v.shape != (C,):
            raise ValueError(f"bn.{name}: expected shape ({C},) as bn.running_mean's, got {v.shape}")
    scale = gamma / np.sqrt(var + float(layer.eps))
    return scale, beta - mean * scale


def inference_affine(layer: object, modality: int | None = None
                     ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The per-channel affine map of `layer`'s inference: (scale, shift) with

        y = scale[c] * x + shift[c]   for every value x of channel c,

    two float64 arrays of shape (C,), derived from the layer's own eval equations (BatchNorm:
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale). It exists
    for the layers whose inference does not depend on the sample: BatchNorm1d/2d/3d,
    SyncBatchNorm, FrozenBatchNorm2d, ExtendedBatchNorm2d, ModalityBatchNorm2d (`modality`: the
    int modality whose map is wanted), GhostBatchNorm2d with example_weight=0, BatchRenorm2d,
    MovingAverageBatchNorm2d, CrossIterationBatchNorm2d, BatchKalmanNorm2d, InstanceNorm with
    track_running_stats=True, ProxyNorm2d with activation="identity", and anything with
    running_mean, running_var, eps, weight and bias (a torch BatchNorm module in eval).

    Raises TypeError naming the layer and the reason when the map depends on the sample: a layer
    in training mode or with use_batch_stats=True, without running statistics
    (track_running_stats=False), a per-sample normalization (GroupNorm, LayerNorm, RMSNorm,
    FRN, LayerNorm2d, BatchLayerNorm2d, BatchChannelNorm2d, EvoNorm, LocalResponseNorm),
    GhostBatchNorm2d with example_weight > 0, ProxyNorm2d with a nonlinear activation. The error
    is also a ValueError. `modality` is for ModalityBatchNorm2d only (TypeError elsewhere).
    """
    method = getattr(layer, "_inference_affine", None)
    name = type(layer).__name__
    duck = not isinstance(layer, NormLayer) and all(hasattr(layer, a) for a in ("running_mean", "running_var", "eps"))
    if method is None and not duck:  # every normkit layer that folds has the method
        reason = _SAMPLE_DEPENDENT.get(name, "it is not a layer with running statistics "
                                             "(running_mean, running_var, eps)")
        raise not_affine(layer, reason)
    if modality is not None and getattr(layer, "num_modalities", None) is None:
        raise TypeError(f"modality: expected None for {name} (it has no modalities), got {modality!r}")
    if getattr(layer, "track_running_stats", True) is False or (
            hasattr(layer, "running_mean") and getattr(layer, "running_mean") is None):
        raise not_affine(layer, "it has no running statistics (track_running_stats=False), so it "
                                "normalizes with the batch's own statistics")
    if getattr(layer, "training", False):
        raise not_affine(layer, "it is in training mode; folding is for inference, call eval() first")
    if getattr(layer, "use_batch_stats", False):
        raise not_affine(layer, "use_batch_stats=True normalizes with the batch's own statistics")
    scale, shift = method(modality) if method is not None else _duck_batchnorm(layer)
    return np.asarray(scale, np.float64), np.asarray(shift, np.float64)


def fold_batchnorm(weight: npt.ArrayLike, bias: npt.ArrayLike | None, bn: object, *,
                   modality: int | None = None) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Weight and bias of conv/linear -> a per-channel affine layer (eval) as one conv/linear.

    With the layer's inference y = scale[c] * x + shift[c] (`inference_affine(bn, modality)`;
    BatchNorm: scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale),
    layer(W x + b) = scale * (W x + b) + shift, so

        W' = scale[c] * W[c, ...],  b' = b * scale + shift.

    `weight` has the output channels first, (C_out, ...); `bias` is (C_out,) or None (zero).
    `bn` is any layer inference_affine accepts (a normkit BatchNorm in eval, the variants listed
    there, or anything with running_mean, running_var, eps, weight, bias, e.g. a torch module);
    `modality` picks ModalityBatchNorm2d's modality. A layer whose inference depends on the
    sample raises TypeError (also a ValueError) saying why. The math is float64; results have
    weight's dtype (float32 for other dtypes).
    """
    w = np.asarray(weight)
    if w.ndim < 1 or not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"weight: expected a floating array of shape (C_out, ...), got {w.dtype} {w.shape}")
    C = w.shape[0]
    out_dtype = w.dtype if w.dtype in _checks.COMPUTE_DTYPES else np.dtype(np.float32)
    if bias is None:
        b = np.zeros(C)
    else:
        b = _channel_vector(bias, 0.0, C) if hasattr(bias, "detach") else np.asarray(bias)
        if b.shape != (C,):
            raise ValueError(f"bias: expected shape ({C},) to match weight's output channels, got {b.shape}")
        b = b.astype(np.float64)
    channels = getattr(bn, "num_features", None)
    if isinstance(channels, int) and channels != C:  # before the layer's mode: the shapes first
        raise ValueError(f"bn.running_mean: expected shape ({C},) to match weight's output channels, "
                         f"got a {type(bn).__name__} of {channels} channels")
    scale, shift = inference_affine(bn, modality=modality)
    if scale.shape != (C,):
        raise ValueError(f"bn: expected {C} channels to match weight's output channels, got "
                         f"{type(bn).__name__} with {scale.size} (bn.running_mean: expected shape ({C},), "
                         f"got ({scale.size},))")
    folded_w = w.astype(np.float64) * scale.reshape((C,) + (1,) * (w.ndim - 1))
    folded_b = b * scale + shift
    return folded_w.astype(out_dtype), folded_b.astype(out_dtype)
