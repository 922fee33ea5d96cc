"""fold_batchnorm: a convolution (or linear layer) followed by an eval BatchNorm equals the
folded convolution."""
import numpy as np
import pytest

import normkit


def conv2d(x, w, b):
    """Plain valid cross-correlation, stride 1, float64 (the test's reference convolution)."""
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N,Ci,H',W',kh,kw
    return np.einsum("nchwij,ocij->nohw", windows, w) + b[None, :, None, None]


def trained_bn(C, dtype, seed=0):
    rng = np.random.default_rng(seed)
    bn = normkit.BatchNorm2d(C, dtype=dtype)
    bn.weight[:] = rng.uniform(0.5, 2, C)
    bn.bias[:] = rng.standard_normal(C)
    for _ in range(3):
        bn(rng.standard_normal((4, C, 5, 5)).astype(dtype) * 3 + 1)
    return bn.eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_conv_then_bn_equals_folded_conv(dtype, with_bias):
    rng = np.random.default_rng(1)
    Ci, Co = 3, 7
    x = rng.standard_normal((2, Ci, 9, 8)).astype(dtype)
    w = rng.standard_normal((Co, Ci, 3, 3)).astype(dtype)
    b = rng.standard_normal(Co).astype(dtype) if with_bias else None
    bn = trained_bn(Co, dtype)
    y_ref = bn(conv2d(x, w, np.zeros(Co) if b is None else b).astype(dtype))
    fw, fb = normkit.fold_batchnorm(w, b, bn)
    assert fw.dtype == dtype and fb.dtype == dtype and fw.shape == w.shape and fb.shape == (Co,)
    y = conv2d(x, fw, fb)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)


def test_linear_then_bn1d():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 4))
    w, b = rng.standard_normal((6, 4)), rng.standard_normal(6)
    bn = normkit.BatchNorm1d(6, dtype=np.float64)
    bn(rng.standard_normal((8, 6)))
    bn.eval()
    fw, fb = normkit.fold_batchnorm(w, b, bn)
    np.testing.assert_allclose(x @ fw.T + fb, bn(x @ w.T + b), rtol=1e-12, atol=1e-12)


def test_rejects_mismatched_channels_and_missing_stats():
    bn = normkit.BatchNorm2d(4)
    with pytest.raises(ValueError, match="bias"):
        normkit.fold_batchnorm(np.ones((4, 2, 1, 1), np.float32), np.ones(3, np.float32), bn)
    with pytest.raises(ValueError, match="bn.running_mean"):
        normkit.fold_batchnorm(np.ones((5, 2), np.float32), None, bn)
    with pytest.raises(ValueError, match="running statistics"):
        normkit.fold_batchnorm(np.ones((4, 2), np.float32), None, normkit.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(TypeError, match="weight"):
        normkit.fold_batchnorm(np.ones((4, 2), np.int32), None, bn)


def test_matches_torch_fusion():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(3, 5, 3).double()
    tbn = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 2); tbn.bias.normal_()
        tbn(conv(torch.randn(4, 3, 8, 8, dtype=torch.float64) * 2 + 1))
    tbn.eval()
    fw, fb = normkit.fold_batchnorm(conv.weight.detach().numpy(), conv.bias.detach().numpy(), tbn)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = tbn(conv(x)).numpy()
    np.testing.assert_allclose(conv2d(x.numpy(), fw, fb), want, rtol=1e-10, atol=1e-10)
