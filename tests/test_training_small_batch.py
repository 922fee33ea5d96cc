"""Small-batch training with the across-iterations layers (the issue's "Done means"): a small
CNN in NumPy, batch size 2, fixed seeds, trains stably with MovingAverageBatchNorm2d,
CrossIterationBatchNorm2d or BatchKalmanNorm2d doing the normalization forward and backward.

The model, with N = 2 samples of (3, 6, 6) from a synthetic two-class task (horizontal vs
vertical stripes, random phase, amplitude and noise):

    conv 3x3, padding 1 (3 -> 8)  ->  norm1  ->  relu  ->  conv 1x1 (8 -> 8)  ->  norm2  ->  relu
    ->  global average pool  ->  linear (8 -> 2)  ->  softmax cross-entropy

The convolutions are im2col matmuls written here, with their backward. Each layer's extras:
- MABN: the convolutions run with their weights centred (normkit.functional.
  weight_centralization, and its backward into the raw weights), as the paper assumes;
- CBN: the preceding convolution's weight and the Jacobians of this step's per-channel mean and
  mean square with respect to it (normkit.conv2d_stat_jacobians where it exists, else the closed
  form: d mean_c/d w_c = mean of the patches, d sqmean_c/d w_c = 2 mean(y_c * patch));
- BKN: norm2 takes norm1's posterior as its prior, and norm1's backward gets norm2's gradient
  with respect to it (posterior_grad).

Plain SGD for 200 steps: the mean loss of the last 20 steps must be well below that of the first
20, and every loss, output and gradient finite. Deterministic (seeded, and normkit is bitwise the
same for any thread count), and well under a second per layer.
"""
import numpy as np
import pytest

import normkit
from normkit.functional import weight_centralization, weight_centralization_backward

N, C_IN, HW, C1, C2, CLASSES = 2, 3, 6, 8, 8, 2
STEPS, LR = 200, 0.2


def batches(seed):
    """(x, labels) batches of the two-class stripes task, forever."""
    rng = np.random.default_rng(seed)
    grid = np.arange(HW)
    gains = np.array([1.0, -0.6, 0.4]).reshape(1, C_IN, 1, 1)
    while True:
        labels = rng.integers(0, CLASSES, N)
        x = np.empty((N, C_IN, HW, HW))
        for n, k in enumerate(labels):
            coord = grid[:, None] if k == 0 else grid[None, :]
            wave = np.sin(2 * np.pi * coord / 4 + rng.uniform(0, 2 * np.pi)) * np.ones((HW, HW))
            x[n] = rng.uniform(0.5, 1.5) * gains[0] * wave + 0.5 * rng.standard_normal((C_IN, HW, HW))
        yield x + 0.3, labels


def patches(x, k):
    """im2col of (N, C, H, W) for a k x k kernel with 'same' zero padding: (N*H*W, C*k*k)."""
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))  # N, C, H, W, k, k
    return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(x.shape[0] * HW * HW, -1)


def to_nchw(flat):
    return np.ascontiguousarray(flat.reshape(N, HW, HW, -1).transpose(0, 3, 1, 2))


def to_flat(a):
    return a.transpose(0, 2, 3, 1).reshape(N * HW * HW, -1)


def stat_jacobians(x, weight, P, y_flat):
    """(dmean_dweight, dsqmean_dweight) of conv(x, weight): normkit's where it exists (checked
    against the closed form), else the closed form."""
    M = P.shape[0]
    dmean = np.broadcast_to(P.mean(axis=0), (weight.shape[0], P.shape[1])).reshape(weight.shape)
    dsqmean = (2.0 / M * (y_flat.T @ P)).reshape(weight.shape)
    if hasattr(normkit, "conv2d_stat_jacobians"):
        got = normkit.conv2d_stat_jacobians(x, weight, padding=weight.shape[-1] // 2)
        np.testing.assert_allclose(got[0], dmean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got[1], dsqmean, rtol=0, atol=1e-10 * max(1.0, np.abs(dsqmean).max()))
        return got
    return np.ascontiguousarray(dmean), dsqmean


def make_norm(kind, C, prior_features=None):
    if kind == "MABN":
        return normkit.MovingAverageBatchNorm2d(C, buffer_size=8, warmup_iters=20, dtype=np.float64)
    if kind == "CBN":
        return normkit.CrossIterationBatchNorm2d(C, window=4, burnin=10, dtype=np.float64)
    return normkit.BatchKalmanNorm2d(C, prior_features, dtype=np.float64)  # gain 0.9


def train(kind, seed=0):
    """The losses of STEPS SGD steps of the model with `kind` normalization."""
    rng = np.random.default_rng(seed + 1)
    params = {"w1": rng.normal(0, np.sqrt(2 / (C_IN * 9)), (C1, C_IN, 3, 3)),
              "w2": rng.normal(0, np.sqrt(2 / C1), (C2, C1, 1, 1)),
              "v": rng.normal(0, 0.1, (CLASSES, C2)), "c": np.zeros(CLASSES)}
    norm1, norm2 = make_norm(kind, C1), make_norm(kind, C2, C1)
    data = batches(seed)
    losses = []
    for _ in range(STEPS):
        x, labels = next(data)
        # convolution weights as used: centred for MABN
        w1 = weight_centralization(params["w1"]) if kind == "MABN" else params["w1"]
        w2 = weight_centralization(params["w2"]) if kind == "MABN" else params["w2"]
        P1 = patches(x, 3)
        a1_flat = P1 @ w1.reshape(C1, -1).T
        a1 = to_nchw(a1_flat)
        if kind == "CBN":
            z1 = norm1(a1, w1, *stat_jacobians(x, w1, P1, a1_flat))
        else:
            z1 = norm1(a1)
        h1 = np.maximum(z1, 0)
        P2 = to_flat(h1)
        a2_flat = P2 @ w2.reshape(C2, -1).T
        a2 = to_nchw(a2_flat)
        if kind == "CBN":
            z2 = norm2(a2, w2, *stat_jacobians(h1, w2, P2, a2_flat))
        elif kind == "BKN":
            z2 = norm2(a2, norm1.posterior)
        else:
            z2 = norm2(a2)
        h2 = np.maximum(z2, 0)
        g = h2.mean(axis=(2, 3))
        logits = g @ params["v"].T + params["c"]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(N), labels]).mean())
        assert np.isfinite(loss)
        losses.append(loss)

        # backward
        dlogits = p.copy()
        dlogits[np.arange(N), labels] -= 1
        dlogits /= N
        grads = {"v": dlogits.T @ g, "c": dlogits.sum(axis=0)}
        dg = dlogits @ params["v"]
        dh2 = np.broadcast_to(dg[:, :, None, None] / (HW * HW), h2.shape)
        dz2 = np.ascontiguousarray(dh2 * (z2 > 0))
        da2 = norm2.backward(dz2)
        da2_flat = to_flat(da2)
        dw2 = (da2_flat.T @ P2).reshape(w2.shape)
        dh1 = to_nchw(da2_flat @ w2.reshape(C2, -1))
        dz1 = np.ascontiguousarray(dh1 * (z1 > 0))
        if kind == "BKN":
            da1 = norm1.backward(dz1, posterior_grad=(norm2.grads["prior_mean"], norm2.grads["prior_var"]))
        else:
            da1 = norm1.backward(dz1)
        dw1 = (to_flat(da1).T @ P1).reshape(w1.shape)
        if kind == "MABN":
            dw1 = weight_centralization_backward(dw1, params["w1"])
            dw2 = weight_centralization_backward(dw2, params["w2"])
        grads.update(w1=dw1, w2=dw2)
        for layer in (norm1, norm2):
            for name, value in layer.parameters().items():
                assert np.all(np.isfinite(layer.grads[name])), name
                value -= LR * layer.grads[name]
        for name, value in params.items():
            assert np.all(np.isfinite(grads[name])), name
            value -= LR * grads[name]
    return losses, (norm1, norm2)


@pytest.mark.parametrize("kind", ["MABN", "CBN", "BKN"])
def test_a_small_cnn_trains_stably_at_batch_size_2(kind):
    losses, (norm1, norm2) = train(kind)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.7 * first, (f"{kind}: mean loss {first:.3f} over the first 20 steps, "
                                f"{last:.3f} over the last 20")
    for layer in (norm1, norm2):
        for name, value in layer.state_dict().items():
            assert np.all(np.isfinite(value)), f"{kind} {name}"
    if kind == "MABN":
        assert int(norm1.iters) == int(norm2.iters) == STEPS  # well past the warm-up: the rings in use
    else:
        assert int(norm1.num_batches_tracked) == int(norm2.num_batches_tracked) == STEPS


def test_training_is_deterministic():
    assert train("CBN")[0] == train("CBN")[0]
