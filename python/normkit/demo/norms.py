"""The study's variants: which normkit layer(s) fill a block's norm slot, and how they are called.

A variant is a `Variant`: a builder, from (channels C, plane H x W, batch size, the previous
block's channels or None), of the slot's layers; how the slot is called (`kind`); the conv's weight transform (Weight
Standardization "ws" or weight centralization "wc", normkit.functional's, forward and
backward); where the ReLU goes ("after": conv, norm, pool, ReLU; "before": conv, ReLU, norm,
pool, AlexNet's order for LRN; "built-in": the layer is a normalization-activation layer); and
whether the conv has a bias (only where nothing after it has a shift). The choices for the odd
ones are argued in docs/demo.md.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

import normkit
from normkit import functional as F

# (channels C, plane H, W, batch size, the previous block's channels or None) -> the slot's layers
Builder = Callable[[int, int, int, int, int | None], list[normkit.NormLayer]]
# BatchKalmanNorm2d's (mean, var): a block's posterior, the next one's prior, and their gradients
Moments = tuple[npt.NDArray[Any], npt.NDArray[Any]]

GROUPS = 4  # channel groups wherever a layer has them (C = 8 and 16: 2 and 4 channels per group)


class Variant:
    __slots__ = ("name", "build", "kind", "transform", "activation", "conv_bias")

    def __init__(self, name: str, build: Builder, kind: str = "plain", transform: str | None = None,
                 activation: str = "after", conv_bias: bool = False) -> None:
        self.name, self.build, self.kind, self.transform = name, build, kind, transform
        self.activation, self.conv_bias = activation, conv_bias


def _variants() -> dict[str, Variant]:
    f32 = np.float32
    v = [
        Variant("none", lambda C, H, W, B, prev: [], conv_bias=True),
        # the standard layers
        Variant("BatchNorm2d", lambda C, H, W, B, prev: [normkit.BatchNorm2d(C)]),
        Variant("GroupNorm", lambda C, H, W, B, prev: [normkit.GroupNorm(GROUPS, C)]),
        Variant("InstanceNorm2d", lambda C, H, W, B, prev: [normkit.InstanceNorm2d(C, affine=True)]),
        Variant("LayerNorm", lambda C, H, W, B, prev: [normkit.LayerNorm((C, H, W))]),
        Variant("RMSNorm", lambda C, H, W, B, prev: [normkit.RMSNorm((C, H, W))]),
        # the research variants
        Variant("ExtendedBatchNorm2d", lambda C, H, W, B, prev: [normkit.ExtendedBatchNorm2d(C)]),
        Variant("ModalityBatchNorm2d", lambda C, H, W, B, prev: [normkit.ModalityBatchNorm2d(C, num_modalities=1)],
                kind="modality"),
        Variant("GhostBatchNorm2d", lambda C, H, W, B, prev: [normkit.GhostBatchNorm2d(C, ghost_batch_size=8,
                                                                                  channels_per_group=2)]),
        Variant("BatchRenorm2d", lambda C, H, W, B, prev: [normkit.BatchRenorm2d(C)]),
        Variant("FrozenBatchNorm2d", lambda C, H, W, B, prev: [normkit.FrozenBatchNorm2d(C)], kind="frozen",
                conv_bias=True),
        Variant("FilterResponseNorm2d", lambda C, H, W, B, prev: [normkit.FilterResponseNorm2d(C)],
                activation="built-in"),
        Variant("BatchChannelNorm2d", lambda C, H, W, B, prev: [normkit.BatchChannelNorm2d(C, num_groups=GROUPS,
                                                                                      estimate=True)],
                transform="ws"),
        Variant("BatchLayerNorm2d", lambda C, H, W, B, prev: [normkit.BatchLayerNorm2d(C, batch_size=B)]),
        Variant("ProxyNorm2d", lambda C, H, W, B, prev: [normkit.GroupNorm(GROUPS, C, affine=False),
                                                      normkit.ProxyNorm2d(C, activation="relu")],
                activation="built-in"),
        Variant("MovingAverageBatchNorm2d", lambda C, H, W, B, prev: [normkit.MovingAverageBatchNorm2d(C)],
                transform="wc"),
        Variant("CrossIterationBatchNorm2d", lambda C, H, W, B, prev: [normkit.CrossIterationBatchNorm2d(C)],
                kind="cross-iteration"),
        Variant("BatchKalmanNorm2d", lambda C, H, W, B, prev: [normkit.BatchKalmanNorm2d(
            C, prior_features=prev)], kind="kalman"),
        Variant("LayerNorm2d", lambda C, H, W, B, prev: [normkit.LayerNorm2d(C)]),
        Variant("LocalResponseNorm", lambda C, H, W, B, prev: [normkit.LocalResponseNorm(5, dtype=f32)],
                activation="before", conv_bias=True),
        Variant("EvoNormB0_2d", lambda C, H, W, B, prev: [normkit.EvoNormB0_2d(C)], activation="built-in"),
        Variant("EvoNormS0_2d", lambda C, H, W, B, prev: [normkit.EvoNormS0_2d(C, groups=GROUPS)],
                activation="built-in"),
    ]
    return {x.name: x for x in v}


VARIANTS = _variants()


class Norm:
    """A block's norm slot: its layers in order, forward and backward, their parameters and
    gradients under "<layer index>.<name>" keys, and the hooks the special kinds override."""

    def __init__(self, layers: list[normkit.NormLayer]) -> None:
        self.layers = layers
        self.posterior: Moments | None = None  # BatchKalmanNorm2d's (mean, var) for the next block
        # BatchKalmanNorm2d's gradient with respect to its prior
        self.prior_grad: Moments | None = None

    def forward(self, y: npt.NDArray[Any], conv_input: npt.NDArray[Any],
                conv_weight: npt.NDArray[Any], prior: Moments | None) -> npt.NDArray[Any]:
        for layer in self.layers:
            y = layer(y)
        return y

    def backward(self, dy: npt.NDArray[Any], posterior_grad: Moments | None) -> npt.NDArray[Any]:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def parameters(self) -> dict[str, npt.NDArray[Any]]:
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.parameters().items()}

    def grads(self) -> dict[str, npt.NDArray[Any]]:
        return {f"{i}.{k}": layer.grads[k] for i, layer in enumerate(self.layers) for k in layer.parameters()}

    def train(self, mode: bool) -> None:
        for layer in self.layers:
            layer.train(mode)


class ModalityNorm(Norm):
    """ModalityBatchNorm2d with one modality: every sample is modality 0 (the digits have one)."""

    def forward(self, y: npt.NDArray[Any], conv_input: npt.NDArray[Any],
                conv_weight: npt.NDArray[Any], prior: Moments | None) -> npt.NDArray[Any]:
        return self.layers[0](y, np.zeros(len(y), np.int64))


class CrossIterationNorm(Norm):
    """CrossIterationBatchNorm2d: in training, the conv's current weight and the Jacobians of this
    step's channel means and mean squares with respect to it (normkit.conv2d_stat_jacobians)."""

    def forward(self, y: npt.NDArray[Any], conv_input: npt.NDArray[Any],
                conv_weight: npt.NDArray[Any], prior: Moments | None) -> npt.NDArray[Any]:
        layer = self.layers[0]
        if not layer.training:
            return layer(y)
        dmean, dsqmean = normkit.conv2d_stat_jacobians(conv_input, conv_weight, padding=1)
        return layer(y, conv_weight, dmean, dsqmean)


class KalmanNorm(Norm):
    """BatchKalmanNorm2d: the previous block's posterior is this block's prior (the first block
    has none), and the gradient with respect to the prior flows back to the previous block."""

    def forward(self, y: npt.NDArray[Any], conv_input: npt.NDArray[Any],
                conv_weight: npt.NDArray[Any], prior: Moments | None) -> npt.NDArray[Any]:
        layer = self.layers[0]
        assert isinstance(layer, normkit.BatchKalmanNorm2d)  # the kalman kind's one layer
        out = layer(y, prior)
        self.posterior = layer.posterior
        return out

    def backward(self, dy: npt.NDArray[Any], posterior_grad: Moments | None) -> npt.NDArray[Any]:
        layer = self.layers[0]
        assert isinstance(layer, normkit.BatchKalmanNorm2d)  # the kalman kind's one layer
        dx = layer.backward(dy, posterior_grad)
        g = layer.grads
        self.prior_grad = (g["prior_mean"], g["prior_var"]) if "prior_mean" in g else None
        return dx


class FrozenNorm(Norm):
    """FrozenBatchNorm2d: statistics measured once, before training, on the training set
    (`calibrate`), then fixed; its weight and bias stay 1 and 0 (buffers, not learned)."""

    def calibrate(self, y: npt.NDArray[Any]) -> None:
        layer = self.layers[0]
        assert isinstance(layer, normkit.FrozenBatchNorm2d)  # the frozen kind's one layer
        y64 = y.astype(np.float64)
        layer.running_mean[...] = y64.mean(axis=(0, 2, 3))
        layer.running_var[...] = y64.var(axis=(0, 2, 3))


KINDS = {"plain": Norm, "modality": ModalityNorm, "cross-iteration": CrossIterationNorm,
         "kalman": KalmanNorm, "frozen": FrozenNorm}

Transform = tuple[Callable[[npt.NDArray[Any]], npt.NDArray[Any]],
                  Callable[[npt.NDArray[Any], npt.NDArray[Any]], npt.NDArray[Any]]]
TRANSFORMS: dict[str | None, Transform] = {  # weight -> (effective weight, d effective -> d weight)
    None: (lambda w: w, lambda g, w: g),
    "ws": (F.weight_standardization, F.weight_standardization_backward),
    "wc": (F.weight_centralization, F.weight_centralization_backward),
}


def make_norm(variant: Variant, C: int, H: int, W: int, batch_size: int,
              prev_channels: int | None) -> Norm:
    return KINDS[variant.kind](variant.build(C, H, W, batch_size, prev_channels))
