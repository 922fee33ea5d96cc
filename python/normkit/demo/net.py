"""The study's CNN: two blocks of conv 3x3, norm slot, ReLU, 2x2 max pool, then a linear layer.

    (N, 1, 8, 8) -> conv 8 -> norm -> ReLU -> pool -> (N, 8, 4, 4)
                 -> conv 16 -> norm -> ReLU -> pool -> (N, 16, 2, 2) -> linear 10 -> logits

(pool then ReLU: max pooling commutes with ReLU, and the ReLU then touches a quarter of the
values). The norm slot is a variant's (norms.py); normkit's layers do its forward and backward,
and normkit.functional the conv's weight transform where the variant has one. Plain SGD with
momentum updates every parameter in place, the norm layers' through their live parameters().
"""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from . import model
from .norms import TRANSFORMS, FrozenNorm, Moments, Variant, make_norm

WIDTHS = (8, 16)
IMAGE = (1, 8, 8)
CLASSES = 10


class Block:
    def __init__(self, c_in: int, c_out: int, hw: tuple[int, int], variant: Variant,
                 batch_size: int, prev_channels: int | None, rng: np.random.Generator) -> None:
        self.hw = hw
        self.w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        self.b = np.zeros(c_out, np.float32) if variant.conv_bias else None
        self.norm = make_norm(variant, c_out, hw[0], hw[1], batch_size, prev_channels)
        self.transform, self.transform_backward = TRANSFORMS[variant.transform]
        self.activation = variant.activation
        self.grads: dict[str, npt.NDArray[Any]] = {}

    def forward(self, x: npt.NDArray[Any], cols: npt.NDArray[Any], prior: Moments | None,
                calibrate: bool = False) -> npt.NDArray[Any]:
        """The block on x (its im2col cols given); prior: the previous block's posterior."""
        self.x, self.cols = x, cols
        self.w_eff = w = self.transform(self.w)
        y = model.conv_forward(cols, w, self.b, self.hw)
        if self.activation == "before":
            self.y = y
            y = model.relu_forward(y)
        if calibrate:
            assert isinstance(self.norm, FrozenNorm)  # only the frozen kind calibrates
            self.norm.calibrate(y)
        z = self.norm.forward(y, x, w, prior)
        p, self.idx = model.pool_forward(z)
        if self.activation == "after":
            self.p = p
            p = model.relu_forward(p)
        return p

    def backward(self, dout: npt.NDArray[Any], posterior_grad: Moments | None,
                 need_dx: bool) -> npt.NDArray[Any] | None:
        if self.activation == "after":
            dout = model.relu_backward(dout, self.p)
        dz = model.pool_backward(dout, self.idx)
        dy = self.norm.backward(dz, posterior_grad)
        if self.activation == "before":
            dy = model.relu_backward(dy, self.y)
        dw, db, dx = model.conv_backward(dy, self.cols, self.w_eff, need_dx, self.x.shape)
        self.grads = {"w": self.transform_backward(dw, self.w)}
        if self.b is not None:
            self.grads["b"] = db
        return dx

    def parameters(self) -> dict[str, npt.NDArray[Any]]:
        own = {"w": self.w} if self.b is None else {"w": self.w, "b": self.b}
        return {**own, **{f"norm.{k}": v for k, v in self.norm.parameters().items()}}

    def gradients(self) -> dict[str, npt.NDArray[Any]]:
        return {**self.grads, **{f"norm.{k}": v for k, v in self.norm.grads().items()}}


class Net:
    def __init__(self, variant: Variant, batch_size: int, rng: np.random.Generator) -> None:
        self.blocks: list[Block] = []
        prev: int | None
        c, h, prev = IMAGE[0], IMAGE[1], None
        for width in WIDTHS:
            self.blocks.append(Block(c, width, (h, h), variant, batch_size, prev, rng))
            c, h, prev = width, h // 2, width
        features = c * h * h
        self.fc_w = (rng.standard_normal((CLASSES, features)) / np.sqrt(features)).astype(np.float32)
        self.fc_b = np.zeros(CLASSES, np.float32)

    def forward(self, x: npt.NDArray[Any], cols: npt.NDArray[Any],
                calibrate: bool = False) -> npt.NDArray[Any]:
        """Logits of images x (N, 1, 8, 8); cols: x's im2col (precomputed for the data set)."""
        prior: Moments | None = None
        for i, block in enumerate(self.blocks):
            if i:
                cols = model.im2col(x)
            x = block.forward(x, cols, prior, calibrate)
            prior = block.norm.posterior
        self.flat_shape = x.shape
        self.flat = x.reshape(len(x), -1)
        return model.linear_forward(self.flat, self.fc_w, self.fc_b)

    def backward(self, dlogits: npt.NDArray[Any]) -> None:
        dw, db, dflat = model.linear_backward(dlogits, self.flat, self.fc_w)
        self.fc_grads = {"fc.w": dw, "fc.b": db}
        d: npt.NDArray[Any] | None
        post: Moments | None
        d, post = dflat.reshape(self.flat_shape), None
        for i in range(len(self.blocks) - 1, -1, -1):
            block = self.blocks[i]
            assert d is not None  # the later block's dx (need_dx for every block but the first)
            d = block.backward(d, post, need_dx=i > 0)
            post = block.norm.prior_grad

    def parameters(self) -> dict[str, npt.NDArray[Any]]:
        out = {f"{i}.{k}": v for i, b in enumerate(self.blocks) for k, v in b.parameters().items()}
        out.update({"fc.w": self.fc_w, "fc.b": self.fc_b})
        return out

    def gradients(self) -> dict[str, npt.NDArray[Any]]:
        out = {f"{i}.{k}": v for i, b in enumerate(self.blocks) for k, v in b.gradients().items()}
        out.update(self.fc_grads)
        return out

    def train(self, mode: bool = True) -> Net:
        for block in self.blocks:
            block.norm.train(mode)
        return self

    def eval(self) -> Net:
        return self.train(False)


class SGD:
    """SGD with (heavy-ball) momentum on a dict of live arrays: v = m v + g; p -= lr v."""

    def __init__(self, params: dict[str, npt.NDArray[Any]], momentum: float = 0.9) -> None:
        self.params, self.momentum = params, momentum
        self.velocity = {k: np.zeros_like(p) for k, p in params.items()}

    def step(self, grads: dict[str, npt.NDArray[Any]], lr: float) -> None:
        m = self.momentum
        for k, p in self.params.items():
            v = self.velocity[k]
            v *= m
            v += grads[k]
            p -= lr * v
