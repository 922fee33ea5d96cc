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


# -- every layer whose inference is a per-channel affine -----------------------------------------
#
# Each case builds a float64 layer with random parameters and non-trivial running statistics (a
# few training steps, or its state set directly), in eval. Its input rank decides the reference
# "conv": linear for (N, C), a kernel-3 conv1d for (N, C, L), conv2d for (N, C, H, W), a
# pointwise conv3d for (N, C, D, H, W).

F64 = np.float64


class OneProcess:
    """A process group of one process (mpi4py's Allgather and Get_size)."""

    def Get_size(self):
        return 1

    def Allgather(self, sendbuf, recvbuf):
        np.copyto(recvbuf.reshape(np.shape(sendbuf)), sendbuf)


def randomize(layer, rng):
    """Random affine parameters (every parameter but BKN's A, which only weighs a prior)."""
    for name, p in layer.parameters().items():
        if name in ("weight", "proxy_weight"):
            p[...] = rng.uniform(0.5, 2, p.shape) * rng.choice([-1, 1], p.shape)
        elif name in ("bias", "proxy_bias"):
            p[...] = rng.standard_normal(p.shape)
    return layer


def trained(layer, rng, shape, steps=3):
    randomize(layer, rng)
    for _ in range(steps):
        bc = (1, shape[1]) + (1,) * (len(shape) - 2)
        x = rng.standard_normal(shape) * rng.uniform(0.5, 3, bc) + rng.standard_normal(bc)
        layer(x.astype(layer.dtype))
    return layer.eval()


def with_state(layer, rng, **buffers):
    """The named buffers set to random values: a 'mean' is normal, anything else positive."""
    randomize(layer, rng)
    for name in buffers:
        buf = getattr(layer, name)
        buf[...] = rng.standard_normal(buf.shape) if "mean" in name else rng.uniform(0.3, 3, buf.shape)
    return layer.eval()


C = 6
S2 = (4, C, 5, 5)


def _cases():
    r = lambda seed: np.random.default_rng(seed)
    return {
        "BatchNorm1d": lambda: trained(normkit.BatchNorm1d(C, dtype=F64), r(10), (8, C)),
        "BatchNorm1d-NCL": lambda: trained(normkit.BatchNorm1d(C, dtype=F64), r(11), (4, C, 7)),
        "BatchNorm2d": lambda: trained(normkit.BatchNorm2d(C, dtype=F64), r(12), S2),
        "BatchNorm2d-no-affine": lambda: trained(normkit.BatchNorm2d(C, affine=False, dtype=F64), r(13), S2),
        "BatchNorm2d-cumulative": lambda: trained(normkit.BatchNorm2d(C, momentum=None, dtype=F64), r(14), S2),
        "BatchNorm3d": lambda: trained(normkit.BatchNorm3d(C, dtype=F64), r(15), (2, C, 3, 4, 4)),
        "SyncBatchNorm": lambda: trained(normkit.SyncBatchNorm(C, process_group=OneProcess(), dtype=F64), r(16), S2),
        "FrozenBatchNorm2d": lambda: with_state(normkit.FrozenBatchNorm2d(C, dtype=F64), r(17), weight=1,
                                                running_mean=1, running_var=1),
        "ExtendedBatchNorm2d": lambda: trained(normkit.ExtendedBatchNorm2d(C, dtype=F64), r(18), S2),
        "GhostBatchNorm2d": lambda: trained(normkit.GhostBatchNorm2d(C, 2, dtype=F64), r(19), S2),
        "GhostBatchNorm2d-groups": lambda: trained(normkit.GhostBatchNorm2d(C, 2, channels_per_group=3, dtype=F64),
                                                   r(20), S2),
        "BatchRenorm2d": lambda: trained(normkit.BatchRenorm2d(C, momentum=0.3, dtype=F64), r(21), S2),
        "MovingAverageBatchNorm2d": lambda: with_state(normkit.MovingAverageBatchNorm2d(C, dtype=F64), r(22),
                                                       running_var=1),
        "CrossIterationBatchNorm2d": lambda: with_state(normkit.CrossIterationBatchNorm2d(C, dtype=F64), r(23),
                                                        running_mean=1, running_var=1),
        "BatchKalmanNorm2d": lambda: trained(normkit.BatchKalmanNorm2d(C, dtype=F64), r(24), S2),
        "InstanceNorm1d-tracked": lambda: trained(normkit.InstanceNorm1d(C, affine=True, track_running_stats=True,
                                                                         dtype=F64), r(25), (4, C, 9)),
        "InstanceNorm2d-tracked": lambda: trained(normkit.InstanceNorm2d(C, affine=True, track_running_stats=True,
                                                                         dtype=F64), r(26), S2),
        "ProxyNorm2d-identity": lambda: randomize(normkit.ProxyNorm2d(C, activation="identity", dtype=F64),
                                                  r(27)).eval(),
    }


CASES = _cases()


def reference_conv(x, w, b):
    """The float64 layer before the normalization, by the input's rank (w: (C_out, C_in, *k))."""
    if x.ndim == 2:
        return x @ w.T + b
    if x.ndim == 3:
        windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2], axis=2)  # N, Ci, L', k
        return np.einsum("ncli,oci->nol", windows, w) + b[None, :, None]
    if x.ndim == 4:
        return conv2d(x, w, b)
    return np.einsum("ncdhw,oc->nodhw", x, w.reshape(w.shape[:2])) + b[None, :, None, None, None]


def conv_shapes(layer_input_ndim, Ci):
    """(x shape, weight shape) of a reference conv producing a (N, C, ...) input of that rank."""
    return {2: ((5, Ci), (C, Ci)), 3: ((3, Ci, 11), (C, Ci, 3)), 4: ((3, Ci, 8, 7), (C, Ci, 3, 3)),
            5: ((2, Ci, 3, 4, 5), (C, Ci, 1, 1, 1))}[layer_input_ndim]


def layer_ndim(layer):
    return {"BatchNorm1d": None, "BatchNorm3d": 5, "InstanceNorm1d": 3}.get(type(layer).__name__, 4)


@pytest.mark.parametrize("name", list(CASES))
def test_inference_affine_is_the_eval_forward(name):
    layer = CASES[name]()
    rng = np.random.default_rng(100)
    ndim = layer_ndim(layer) or (3 if name.endswith("NCL") else 2)
    shape = (3, C) + (6, 5, 4)[:ndim - 2]
    x = rng.standard_normal(shape) * 2.5 + 0.7
    scale, shift = normkit.inference_affine(layer)
    assert scale.dtype == shift.dtype == np.float64 and scale.shape == shift.shape == (C,)
    assert not np.allclose(scale, 1) and not np.allclose(shift, 0)  # a real map, not the identity
    bc = (1, C) + (1,) * (ndim - 2)
    np.testing.assert_allclose(scale.reshape(bc) * x + shift.reshape(bc), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_then_layer_equals_folded_conv(name, with_bias):
    layer = CASES[name]()
    rng = np.random.default_rng(101)
    ndim = layer_ndim(layer) or (3 if name.endswith("NCL") else 2)
    xs, ws = conv_shapes(ndim, 4)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    b = rng.standard_normal(C) if with_bias else None
    want = layer(reference_conv(x, w, np.zeros(C) if b is None else b))
    fw, fb = normkit.fold_batchnorm(w, b, layer)
    assert fw.dtype == fb.dtype == np.float64 and fw.shape == w.shape and fb.shape == (C,)
    np.testing.assert_allclose(reference_conv(x, fw, fb), want, rtol=1e-11, atol=1e-11)


def test_float32_weight_and_layer():
    rng = np.random.default_rng(102)
    layer = trained(normkit.ExtendedBatchNorm2d(C), rng, S2)
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    w = rng.standard_normal((C, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    fw, fb = normkit.fold_batchnorm(w, b, layer)
    assert fw.dtype == fb.dtype == np.float32
    want = layer(conv2d(x, w, b).astype(np.float32))
    np.testing.assert_allclose(conv2d(x, fw, fb), want, rtol=2e-5, atol=2e-5)


# -- ModalityBatchNorm2d: one modality at a time ---------------------------------------------------

def trained_mbn(separate_affine, seed=30):
    rng = np.random.default_rng(seed)
    mbn = randomize(normkit.ModalityBatchNorm2d(C, num_modalities=3, separate_affine=separate_affine,
                                                dtype=F64), rng)
    for _ in range(3):
        mod = np.array([0, 1, 2, 0, 1, 2])
        x = rng.standard_normal((6, C, 4, 4)) * (1 + mod)[:, None, None, None] + mod[:, None, None, None]
        mbn(x, mod)
    return mbn.eval()


@pytest.mark.parametrize("separate_affine", [False, True], ids=["shared-affine", "separate-affine"])
def test_modality_batchnorm_folds_the_requested_modality(separate_affine):
    mbn = trained_mbn(separate_affine)
    rng = np.random.default_rng(31)
    x, w, b = rng.standard_normal((3, 4, 7, 6)), rng.standard_normal((C, 4, 3, 3)), rng.standard_normal(C)
    h = conv2d(x, w, b)
    maps = []
    for m in range(3):
        scale, shift = normkit.inference_affine(mbn, modality=m)
        maps.append(scale)
        np.testing.assert_allclose(scale[None, :, None, None] * h + shift[None, :, None, None],
                                   mbn(h, np.full(3, m)), rtol=1e-12, atol=1e-12)
        fw, fb = normkit.fold_batchnorm(w, b, mbn, modality=np.int64(m))
        np.testing.assert_allclose(conv2d(x, fw, fb), mbn(h, np.full(3, m)), rtol=1e-11, atol=1e-11)
    assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[1], maps[2])  # really per modality


@pytest.mark.parametrize("separate_affine", [False, True], ids=["shared-affine", "separate-affine"])
def test_modality_batchnorm_needs_a_valid_modality(separate_affine):
    mbn = trained_mbn(separate_affine)
    w = np.ones((C, 2))
    with pytest.raises(TypeError, match="modality: expected the int modality"):
        normkit.inference_affine(mbn)
    with pytest.raises(TypeError, match="modality"):
        normkit.fold_batchnorm(w, None, mbn)
    for bad in (1.0, True, "0", [0]):
        with pytest.raises(TypeError, match="modality"):
            normkit.inference_affine(mbn, modality=bad)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"modality: expected an int in \[0, 3\)"):
            normkit.fold_batchnorm(w, None, mbn, modality=bad)


def test_modality_only_for_modality_batchnorm():
    with pytest.raises(TypeError, match="modality: expected None for BatchNorm2d"):
        normkit.inference_affine(CASES["BatchNorm2d"](), modality=0)


# -- layers and configurations whose inference depends on the sample -------------------------------

def _eval(layer):
    return layer.eval()


def _batch_stats(layer):
    layer.eval()
    layer.use_batch_stats = True
    return layer


REFUSED = {
    "GroupNorm": (lambda: _eval(normkit.GroupNorm(2, C)), "own channel groups"),
    "LayerNorm": (lambda: _eval(normkit.LayerNorm((C, 5, 5))), "own statistics"),
    "RMSNorm": (lambda: _eval(normkit.RMSNorm((C, 5, 5))), "root mean square"),
    "FilterResponseNorm2d": (lambda: _eval(normkit.FilterResponseNorm2d(C)), "mean square"),
    "LayerNorm2d": (lambda: _eval(normkit.LayerNorm2d(C)), "own channels"),
    "BatchLayerNorm2d": (lambda: trained(normkit.BatchLayerNorm2d(C, 4, dtype=F64), np.random.default_rng(40), S2),
                         "feature statistics"),
    "BatchChannelNorm2d": (lambda: _eval(normkit.BatchChannelNorm2d(C, num_groups=2)), "group part"),
    "EvoNormB0_2d": (lambda: _eval(normkit.EvoNormB0_2d(C)), "instance std"),
    "EvoNormS0_2d": (lambda: _eval(normkit.EvoNormS0_2d(C, groups=2)), "own groups"),
    "LocalResponseNorm": (lambda: _eval(normkit.LocalResponseNorm(3)), "neighbouring channels"),
    "GhostBatchNorm2d-example-weight": (lambda: _eval(normkit.GhostBatchNorm2d(C, 2, example_weight=0.3)),
                                        r"example_weight=0.3 > 0"),
    "BatchNorm2d-untracked": (lambda: _eval(normkit.BatchNorm2d(C, track_running_stats=False)),
                              r"no running statistics \(track_running_stats=False\)"),
    "SyncBatchNorm-untracked": (lambda: _eval(normkit.SyncBatchNorm(C, track_running_stats=False)),
                                "no running statistics"),
    "ExtendedBatchNorm2d-untracked": (lambda: _eval(normkit.ExtendedBatchNorm2d(C, track_running_stats=False)),
                                      "no running statistics"),
    "ModalityBatchNorm2d-untracked": (lambda: _eval(normkit.ModalityBatchNorm2d(C, track_running_stats=False)),
                                      "no running statistics"),
    "InstanceNorm2d-untracked": (lambda: _eval(normkit.InstanceNorm2d(C, affine=True)), "no running statistics"),
    "BatchNorm2d-training": (lambda: normkit.BatchNorm2d(C), "training mode"),
    "FrozenBatchNorm2d-training": (lambda: normkit.FrozenBatchNorm2d(C), "training mode"),
    "BatchRenorm2d-training": (lambda: normkit.BatchRenorm2d(C), "training mode"),
    "ProxyNorm2d-identity-training": (lambda: normkit.ProxyNorm2d(C, activation="identity"), "training mode"),
    "BatchNorm2d-use-batch-stats": (lambda: _batch_stats(normkit.BatchNorm2d(C)), "use_batch_stats=True"),
    "FrozenBatchNorm2d-use-batch-stats": (lambda: _batch_stats(normkit.FrozenBatchNorm2d(C)), "use_batch_stats"),
    "MovingAverageBatchNorm2d-use-batch-stats": (lambda: _batch_stats(normkit.MovingAverageBatchNorm2d(C)),
                                                 "use_batch_stats"),
    "BatchKalmanNorm2d-use-batch-stats": (lambda: _batch_stats(normkit.BatchKalmanNorm2d(C)), "use_batch_stats"),
    "InstanceNorm2d-tracked-use-batch-stats": (
        lambda: _batch_stats(normkit.InstanceNorm2d(C, track_running_stats=True)), "use_batch_stats"),
    "ProxyNorm2d-relu": (lambda: _eval(normkit.ProxyNorm2d(C)), "activation='relu' is not affine"),
    "ProxyNorm2d-gelu": (lambda: _eval(normkit.ProxyNorm2d(C, activation="gelu")), "activation='gelu'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_sample_dependent_inference_is_refused(name):
    make, reason = REFUSED[name]
    layer = make()
    cls = type(layer).__name__
    with pytest.raises(TypeError, match=rf"layer: {cls} has no per-channel affine inference: .*{reason}"):
        normkit.inference_affine(layer)
    with pytest.raises(TypeError, match=reason):
        normkit.fold_batchnorm(np.ones((C, 3, 1, 1), np.float32), None, layer)


def test_refusal_is_a_value_error_too():
    # fold_batchnorm raised ValueError for a BatchNorm without running statistics before
    # inference_affine: callers catching that still do.
    with pytest.raises(ValueError, match="running statistics"):
        normkit.fold_batchnorm(np.ones((C, 2)), None, _eval(normkit.BatchNorm1d(C, track_running_stats=False)))


def test_refuses_what_is_not_a_layer():
    with pytest.raises(TypeError, match="layer: object has no per-channel affine inference"):
        normkit.inference_affine(object())


def test_torch_batchnorm_in_training_is_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="BatchNorm2d .*training mode"):
        normkit.fold_batchnorm(np.ones((3, 2, 1, 1)), None, torch.nn.BatchNorm2d(3))
    scale, shift = normkit.inference_affine(torch.nn.BatchNorm2d(3).eval())
    np.testing.assert_allclose(scale, 1 / np.sqrt(1 + 1e-5))
    np.testing.assert_array_equal(shift, 0)
