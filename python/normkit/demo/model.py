"""The study's CNN pieces in vectorized NumPy: conv (im2col + matmul), max pool, ReLU, linear,
softmax cross-entropy. Each forward returns what its backward needs; no loop over pixels.

Shapes are NCHW. The convolution is 3x3, stride 1, zero padding 1 (output H x W = input's), its
patches laid out as cols (N, C*9, H*W), so that y[n] = W (C_out, C*9) @ cols[n] is NCHW as it
comes out of the batched matmul; im2col and its adjoint are each one matmul with a 0/1 gather
matrix (a few hundred microseconds of slicing per step at batch size 2 became a few). tests/test_demo.py checks every backward by central finite
differences in float64.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

K = 3  # kernel size; padding 1 keeps H x W


_GATHER: dict[tuple[int, int, np.dtype[Any]], npt.NDArray[Any]] = {}


def gather_matrix(H: int, W: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """G (H*W, 9*H*W) of 0s and 1s with x_plane @ G = the plane's nine shifted copies (kernel
    offset (i, j) at column block 3i + j, zero where the shift leaves the plane): im2col as one
    matmul, and col2im as one with G^T. Cached per (H, W, dtype)."""
    key = (H, W, np.dtype(dtype))
    G = _GATHER.get(key)
    if G is None:
        G = np.zeros((H * W, K * K, H * W), dtype)
        for i in range(K):  # a loop over the kernel and the plane's rows, once per shape
            for j in range(K):
                for h in range(H):
                    src_h = h + i - 1
                    if 0 <= src_h < H:
                        for w in range(W):
                            src_w = w + j - 1
                            if 0 <= src_w < W:
                                G[src_h * W + src_w, i * K + j, h * W + w] = 1
        G = _GATHER[key] = G.reshape(H * W, K * K * H * W)
    return G


def im2col(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """cols (N, C*9, H*W) of x (N, C, H, W) for a 3x3 convolution with zero padding 1."""
    N, C, H, W = x.shape
    cols: npt.NDArray[Any] = x.reshape(N * C, H * W) @ gather_matrix(H, W, x.dtype)
    return cols.reshape(N, C * K * K, H * W)


def col2im(dcols: npt.NDArray[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """The adjoint of im2col: dx (N, C, H, W) from dcols (N, C*9, H*W)."""
    N, C, H, W = shape
    dx: npt.NDArray[Any] = dcols.reshape(N * C, K * K * H * W) @ gather_matrix(H, W, dcols.dtype).T
    return dx.reshape(shape)


def conv_forward(cols: npt.NDArray[Any], w: npt.NDArray[Any], b: npt.NDArray[Any] | None,
                 hw: tuple[int, int]) -> npt.NDArray[Any]:
    """y (N, C_out, H, W) = conv2d(x, w) + b from x's cols; w (C_out, C, 3, 3), b (C_out,) or None."""
    N = cols.shape[0]
    y: npt.NDArray[Any] = np.matmul(w.reshape(w.shape[0], -1), cols)  # (N, C_out, H*W)
    if b is not None:
        y += b[:, None]
    return y.reshape(N, w.shape[0], *hw)


def conv_backward(dy: npt.NDArray[Any], cols: npt.NDArray[Any], w: npt.NDArray[Any], need_dx: bool,
                  x_shape: tuple[int, ...] | None = None
                  ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any] | None]:
    """(dw, db, dx) of conv_forward: dw = sum_n dy[n] cols[n]^T, db = sum dy over (n, h, w),
    dx = col2im(w^T dy) (None unless need_dx)."""
    N, C_out = dy.shape[:2]
    d = dy.reshape(N, C_out, -1)
    dw = np.matmul(d, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    db = d.sum(axis=(0, 2))
    dx = None
    if need_dx:
        assert x_shape is not None  # the callers pass x's shape with need_dx
        dx = col2im(np.matmul(w.reshape(C_out, -1).T, d), x_shape)
    return dw, db, dx


def _corners(x: npt.NDArray[Any]
             ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """The four strided views of x (N, C, H, W): each 2x2 window's (0,0), (0,1), (1,0), (1,1)."""
    return x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]


def pool_forward(x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], list[npt.NDArray[np.bool_]]]:
    """2x2 max pooling, stride 2: (y, the four corners' masks: each window's first maximum)."""
    a, b, c, d = _corners(x)
    y = np.maximum(np.maximum(a, b), np.maximum(c, d))
    masks: list[npt.NDArray[np.bool_]] = []
    taken: npt.NDArray[np.bool_] | None = None
    for corner in (a, b, c):  # ties go to the first corner, as argmax: one gradient per window
        m = corner == y
        if taken is not None:
            m &= ~taken
            taken |= m
        else:
            taken = m.copy()
        masks.append(m)
    assert taken is not None  # set by the first corner
    masks.append(~taken)
    return y, masks


def pool_backward(dy: npt.NDArray[Any], masks: Sequence[npt.NDArray[np.bool_]]) -> npt.NDArray[Any]:
    """dx of pool_forward: each window's gradient goes to its (first) maximum."""
    N, C, h, w = dy.shape
    dx = np.empty((N, C, 2 * h, 2 * w), dy.dtype)
    for view, m in zip(_corners(dx), masks):
        np.multiply(dy, m, out=view)
    return dx


def relu_forward(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    y: npt.NDArray[Any] = np.maximum(x, 0)
    return y


def relu_backward(dy: npt.NDArray[Any], x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return dy * (x > 0)


def linear_forward(x: npt.NDArray[Any], w: npt.NDArray[Any], b: npt.NDArray[Any]
                   ) -> npt.NDArray[Any]:
    """y = x w^T + b; x (N, F), w (classes, F)."""
    y: npt.NDArray[Any] = x @ w.T + b
    return y


def linear_backward(dy: npt.NDArray[Any], x: npt.NDArray[Any], w: npt.NDArray[Any]
                    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """(dw, db, dx) of linear_forward."""
    return dy.T @ x, dy.sum(axis=0), dy @ w


def cross_entropy(logits: npt.NDArray[Any], labels: npt.NDArray[np.integer[Any]]
                  ) -> tuple[float, npt.NDArray[Any]]:
    """(mean softmax cross-entropy, its gradient with respect to logits)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(s[:, 0]) - z[rows, labels]))
    d = e / s
    d[rows, labels] -= 1
    return loss, d / len(labels)
