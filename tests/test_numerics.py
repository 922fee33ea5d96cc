"""Accuracy of float32 statistics when the mean dwarfs the spread: x = c + N(0, 1).

The bound normkit documents (README): normalized outputs within 2e-6 of a float64 reference for
c in {1e2, 1e4, 1e6}, forward and backward, every grouping. (The core issue asks for 1e-4 at
c = 1e4; PyTorch's float32 CPU kernels are off by about 8e-4 there.)
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F

BOUND = 2e-6
OFFSETS = [1e2, 1e4, 1e6]


def normalized64(x64, axes):
    m = x64.mean(axis=axes, keepdims=True)
    v = x64.var(axis=axes, keepdims=True)
    return (x64 - m) / np.sqrt(v + 1e-5)


def backward64(x64, dy64, axes):
    """dx of (x - mean)/sqrt(var + eps) over `axes`, in float64."""
    xhat = normalized64(x64, axes)
    rstd = 1 / np.sqrt(x64.var(axis=axes, keepdims=True) + 1e-5)
    return rstd * (dy64 - dy64.mean(axis=axes, keepdims=True)
                   - xhat * (dy64 * xhat).mean(axis=axes, keepdims=True))


def shifted_input(c, shape=(8, 16, 33, 31), seed=0):
    rng = np.random.default_rng(seed)
    return (c + rng.standard_normal(shape)).astype(np.float32)


GROUPINGS = {
    "batch_norm": (lambda x: F.batch_norm(x, None, None, training=True), (0, 2, 3)),
    "instance_norm": (lambda x: F.instance_norm(x), (2, 3)),
    "layer_norm": (lambda x: F.layer_norm(x, x.shape[1:]), (1, 2, 3)),
}


@pytest.mark.parametrize("c", OFFSETS, ids=lambda c: f"c={c:g}")
@pytest.mark.parametrize("name", sorted(GROUPINGS))
def test_forward_large_mean(name, c):
    fn, axes = GROUPINGS[name]
    x = shifted_input(c)
    err = np.abs(fn(x) - normalized64(x.astype(np.float64), axes)).max()
    assert err < BOUND, f"{name} at c={c:g}: max error {err:.3g}"


@pytest.mark.parametrize("c", OFFSETS, ids=lambda c: f"c={c:g}")
def test_group_norm_large_mean(c):
    x = shifted_input(c)
    x64 = x.astype(np.float64).reshape(8, 4, -1)
    want = normalized64(x64, (2,)).reshape(x.shape)
    err = np.abs(F.group_norm(x, 4) - want).max()
    assert err < BOUND, f"group_norm at c={c:g}: max error {err:.3g}"


@pytest.mark.parametrize("c", OFFSETS, ids=lambda c: f"c={c:g}")
@pytest.mark.parametrize("layer, axes", [
    (lambda: normkit.BatchNorm2d(16, affine=False), (0, 2, 3)),
    (lambda: normkit.LayerNorm((16, 33, 31), elementwise_affine=False), (1, 2, 3)),
    (lambda: normkit.InstanceNorm2d(16), (2, 3)),
], ids=["BatchNorm2d", "LayerNorm", "InstanceNorm2d"])
def test_backward_large_mean(layer, axes, c):
    x = shifted_input(c)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    m = layer()
    m(x)
    dx = m.backward(dy)
    want = backward64(x.astype(np.float64), dy.astype(np.float64), axes)
    err = np.abs(dx - want).max() / np.abs(want).max()
    assert err < BOUND, f"relative dx error {err:.3g} at c={c:g}"


def test_rms_norm_large_values():
    x = shifted_input(1e4)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(axis=(1, 2, 3), keepdims=True) + 1e-6)
    err = np.abs(F.rms_norm(x, x.shape[1:], eps=1e-6) - want).max()
    assert err < BOUND
