"""normkit.torch against torch.nn: forward, backward and state for the layers torch has, the
wrapping of every variant, zero-copy views, half types, state_dict interchange and errors."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import normkit  # noqa: E402
import normkit.torch as nkt  # noqa: E402
from normkit.torch import _bridge  # noqa: E402

nn = torch.nn


def _pair(name, *args, **kwargs):
    return getattr(nkt, name)(*args, **kwargs), getattr(nn, name)(*args, **kwargs)


# name, constructor args, input shape
TORCH_LAYERS = [
    ("BatchNorm1d", (3,), {}, (6, 3)),
    ("BatchNorm1d", (3,), {"momentum": None}, (4, 3, 5)),
    ("BatchNorm2d", (4,), {}, (3, 4, 5, 6)),
    ("BatchNorm2d", (4,), {"affine": False, "track_running_stats": False}, (3, 4, 5, 6)),
    ("BatchNorm3d", (2,), {}, (2, 2, 3, 4, 2)),
    ("InstanceNorm1d", (3,), {"affine": True}, (2, 3, 7)),
    ("InstanceNorm2d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 4, 5)),
    ("InstanceNorm3d", (2,), {}, (2, 2, 3, 3, 2)),
    ("GroupNorm", (2, 6), {}, (3, 6, 4, 4)),
    ("LayerNorm", ((5, 6),), {}, (3, 4, 5, 6)),
    ("LayerNorm", (6,), {"bias": False}, (3, 6)),
    ("RMSNorm", (6,), {}, (4, 3, 6)),
    ("LocalResponseNorm", (3,), {"alpha": 0.01}, (2, 5, 4, 4)),
]
TL_IDS = [f"{n}-{i}" for i, (n, *_) in enumerate(TORCH_LAYERS)]


def _randomize(*mods, seed=0):
    """The same random parameters and running statistics in each module."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in mods[0].state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point():
            v.copy_(torch.rand(v.shape, generator=gen) + 0.5 if "var" in k else torch.randn(v.shape, generator=gen))
    for m in mods:
        m.load_state_dict(state)


@pytest.mark.parametrize("name,args,kwargs,shape", TORCH_LAYERS, ids=TL_IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_torch(name, args, kwargs, shape, mode):
    ours, ref = _pair(name, *args, **kwargs)
    _randomize(ours, ref)
    ours.train(mode == "train"), ref.train(mode == "train")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        out.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}, m.state_dict()))
    (y, dx, g, s), (ry, rdx, rg, rs) = out
    torch.testing.assert_close(y, ry, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dx, rdx, atol=2e-5, rtol=1e-4)
    assert g.keys() == rg.keys()
    for k in g:
        torch.testing.assert_close(g[k], rg[k], atol=1e-4, rtol=1e-4)
    assert list(s) == list(rs)
    for k in s:
        torch.testing.assert_close(s[k], rs[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,args,kwargs,shape", TORCH_LAYERS, ids=TL_IDS)
def test_state_dict_interchange(name, args, kwargs, shape):
    """Same keys (and shapes, dtypes) as torch's; torch's state loads into ours and back."""
    ours, ref = _pair(name, *args, **kwargs)
    assert isinstance(ours, getattr(nn, name))
    s, rs = ours.state_dict(), ref.state_dict()
    assert list(s) == list(rs)
    assert all(s[k].shape == rs[k].shape and s[k].dtype == rs[k].dtype for k in s)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    _randomize(ref, seed=3)
    ours.load_state_dict(ref.state_dict())  # copy_ into the shared tensors: the layer sees it
    for k, v in ours._nk._state().items():
        np.testing.assert_array_equal(v, ref.state_dict()[k].numpy())
    ref2 = getattr(nn, name)(*args, **kwargs)
    ref2.load_state_dict(ours.state_dict())


def test_frozen_batch_norm_like_torchvision():
    f = nkt.FrozenBatchNorm2d(3)
    assert list(f.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert not list(f.parameters())
    bn = nn.BatchNorm2d(3)
    _randomize(bn)
    f.load_state_dict(bn.state_dict())  # num_batches_tracked dropped, as torchvision
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    torch.testing.assert_close(f(x), bn.eval()(x))


def _training_losses(norm, steps=50, dtype=torch.float32):
    """Losses of a small CNN trained with SGD (momentum, weight decay) on a fixed batch stream.
    The activation is smooth: with ReLU, an output within rounding of 0 takes the other side of
    the kink in one library and not the other (it happened at step 33 on an AVX2 machine), and
    the trajectories then part by far more than either layer's error."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.SiLU(),
                        nn.Conv2d(8, 8, 3, padding=1, stride=2), norm(8), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, 12, 12, generator=gen, dtype=dtype)
        t = torch.randint(0, 4, (8,), generator=gen)
        loss = nn.functional.cross_entropy(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    x = torch.randn(8, 3, 12, 12, generator=gen, dtype=dtype)
    return np.array(losses), net(x).detach()


NORMS = {
    "BatchNorm2d": (lambda c: nkt.BatchNorm2d(c), lambda c: nn.BatchNorm2d(c)),
    "GroupNorm": (lambda c: nkt.GroupNorm(4, c), lambda c: nn.GroupNorm(4, c)),
    # LayerNorm over (C, H, W) needs the spatial size: normalize over W, as a "row" op
    "LayerNorm": (lambda c: _LastDims(nkt.LayerNorm), lambda c: _LastDims(nn.LayerNorm)),
}


class _LastDims(nn.Module):
    """LayerNorm over the last dim of whatever comes (12 or 6 wide here)."""

    def __init__(self, cls):
        super().__init__()
        self.a, self.b = cls(12), cls(6)

    def forward(self, x):
        return self.a(x) if x.shape[-1] == 12 else self.b(x)


@pytest.mark.parametrize("norm", list(NORMS))
def test_training_50_steps_matches_torch_float32(norm):
    """50 SGD steps in float32: every step's loss within 1e-5 of torch.nn's, and the eval output after."""
    ours, ref = (_training_losses(f) for f in NORMS[norm])
    np.testing.assert_allclose(ours[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-4, rtol=1e-4)


# -- convert ------------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's state and forward (torchvision is optional)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        for n, v in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                     ("running_var", torch.ones)):
            self.register_buffer(n, v(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class Block(nn.Module):
    def __init__(self, c, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(Block(8), Block(8, lambda c: nn.GroupNorm(2, c)))
        self.lrn = nn.LocalResponseNorm(3)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.head_norm = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.bn1d = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.inorm(self.lrn(self.layer1(self.stem(x))))
        x = x.mean((2, 3))
        return self.fc(self.bn1d(self.rms(self.head_norm(x))))


def _model():
    torch.manual_seed(0)
    m = ResNetish()
    for mod in m.modules():  # non-default state, so that copying it matters
        for n, b in mod.named_buffers(recurse=False):
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5 if "var" in n else 0.1 * torch.randn_like(b))
        for p in mod.parameters(recurse=False):
            if p.dim() == 1:
                p.data.add_(0.1 * torch.randn_like(p))
        if getattr(mod, "num_batches_tracked", None) is not None:
            mod.num_batches_tracked.fill_(7)
    return m


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.InstanceNorm2d,
              nn.LocalResponseNorm, FrozenBatchNorm2d)


def test_convert_replaces_every_norm_layer():
    ref, m = _model(), _model()
    out = nkt.convert(m)
    assert out is m
    kinds = [type(mod).__name__ for mod in m.modules() if isinstance(mod, nkt.NormModule)]
    assert sorted(kinds) == sorted(["FrozenBatchNorm2d", "BatchNorm2d", "BatchNorm2d", "GroupNorm", "GroupNorm",
                                    "LocalResponseNorm", "InstanceNorm2d", "LayerNorm", "RMSNorm", "BatchNorm1d"])
    assert not [mod for mod in m.modules() if isinstance(mod, NORM_TYPES) and not isinstance(mod, nkt.NormModule)]
    assert list(m.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("mode,dtype", [("eval", torch.float64), ("train", torch.float64), ("eval", torch.float32)])
def test_convert_same_outputs_and_grads(mode, dtype):
    """Outputs, input and parameter gradients and the updated state of the converted model are
    torch's. float64: the head's BatchNorm1d over 4 LayerNorm'd samples amplifies float32
    rounding about 100-fold in training, which float64 keeps under 1e-10."""
    ref, m = _model().to(dtype), nkt.convert(_model().to(dtype))
    ref.train(mode == "train"), m.train(mode == "train")
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)
    outs = []
    for net in (ref, m):
        xi = x.clone().requires_grad_()
        y = net(xi)
        y.pow(2).sum().backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in net.named_parameters()}, net.state_dict()))
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1][0], outs[0][0], **tol)
    torch.testing.assert_close(outs[1][1], outs[0][1], **tol)
    assert outs[1][2].keys() == outs[0][2].keys()
    for k, g in outs[0][2].items():
        torch.testing.assert_close(outs[1][2][k], g, **tol)
    for k, v in outs[0][3].items():
        torch.testing.assert_close(outs[1][3][k], v, **tol)


def test_convert_keeps_tensors_dtype_and_mode():
    m = nn.Sequential(nn.BatchNorm2d(3).double().eval(), nn.GroupNorm(1, 3).double())
    w = m[0].weight
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    nkt.convert(m)
    assert m[0].weight is w and m[0].weight.dtype == torch.float64 and not m[0].training and m[1].training
    m(torch.randn(2, 3, 2, 2, dtype=torch.float64)).sum().backward()
    opt.step()  # the optimizer made before convert trains the converted layer


def test_convert_leaves_what_it_cannot_run():
    class MyBN(nn.BatchNorm2d):
        pass

    hooked = nn.LayerNorm(4)
    hooked.register_forward_hook(lambda *a: None)
    m = nn.Sequential(nn.BatchNorm2d(3).half(), MyBN(3), hooked, nn.BatchNorm2d(3))
    with pytest.warns(nkt.ConversionWarning) as record:
        m, skipped = nkt.convert(m, return_skipped=True)
    assert [name for name, _, _ in skipped] == ["0", "1", "2"]
    assert "float16" in skipped[0][2] and "subclass" in skipped[1][2] and "hooks" in skipped[2][2]
    assert len(record) == 3
    assert type(m[0]) is nn.BatchNorm2d and type(m[1]) is MyBN and isinstance(m[3], nkt.BatchNorm2d)
    assert isinstance(nkt.convert(nn.LayerNorm(3)), nkt.LayerNorm)  # the module itself


def test_convert_shared_module_stays_shared():
    bn = nn.BatchNorm2d(3)
    m = nkt.convert(nn.Sequential(bn, nn.ReLU(), bn))
    assert m[0] is m[2] and isinstance(m[0], nkt.BatchNorm2d)


# -- zero copy -----------------------------------------------------------------------------------
def _ptr(a):
    return a.__array_interface__["data"][0]


def test_parameters_share_memory_with_the_layer():
    bn = nkt.BatchNorm2d(4)
    bn(torch.randn(2, 4, 3, 3))
    for n, t in list(bn.named_parameters()) + list(bn.named_buffers()):
        assert _ptr(getattr(bn._nk, n)) == t.data_ptr()
    opt = torch.optim.SGD(bn.parameters(), lr=1.0)
    bn(torch.randn(2, 4, 3, 3, requires_grad=True)).pow(2).sum().backward()
    opt.step()
    np.testing.assert_array_equal(bn._nk.weight, bn.weight.detach().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_input_not_copied(dtype, layout):
    """The core reads the tensor's own memory: the saved forward's x is at x.data_ptr()."""
    bn = nkt.BatchNorm2d(4)
    x = torch.randn(2, 4, 3, 5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = bn(x)
    assert _ptr(y.grad_fn.state.x) == x.data_ptr()
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y.grad_fn.nhwc
    ref = nn.BatchNorm2d(4)(x.detach().float())
    torch.testing.assert_close(y.float(), ref, atol=0.02 if dtype != torch.float32 else 1e-5, rtol=0.02)


@pytest.mark.parametrize("name,args", [("GroupNorm", (2, 4)), ("InstanceNorm2d", (4,)), ("BatchNorm3d", (4,))])
def test_channels_last_paths(name, args):
    ours, ref = _pair(name, *args)
    shape = (2, 4, 3, 5, 2) if name.endswith("3d") else (2, 4, 3, 5)
    fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = ours(x), ref(xr)
    assert y.grad_fn.nhwc and _ptr(y.grad_fn.state.x) == x.data_ptr()
    dy = torch.randn(shape)  # a contiguous dy for a channels-last y
    y.backward(dy), yr.backward(dy)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)


def test_layer_without_nhwc_copies_channels_last():
    ln = nkt.LayerNorm2d(4)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = ln(x)
    ref = normkit.LayerNorm2d(4)(x.detach().contiguous().numpy())
    np.testing.assert_allclose(y.detach().numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,args,shape", [("BatchNorm2d", (4,), (3, 4, 5, 5)), ("GroupNorm", (2, 4), (3, 4, 5, 5)),
                                             ("LayerNorm", (8,), (6, 8)), ("RMSNorm", (8,), (6, 8))])
def test_half_types_in_and_out(dtype, name, args, shape):
    """Half inputs compute in float32 with float32 parameters; y and dx come back in the input's
    dtype, the parameter gradients in float32; close to torch's float32 of the same input."""
    ours, ref = _pair(name, *args)
    x = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    y = ours(x)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32
    xr = x.detach().float().requires_grad_()
    yr = ref(xr)
    yr.backward(dy.float())
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(y.float(), yr, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=0.1, rtol=tol)


def test_bfloat16_view_is_the_tensor_memory():
    t = torch.randn(5).to(torch.bfloat16)
    a = _bridge.numpy_view(t)
    assert _ptr(a) == t.data_ptr() and a.dtype.name == "bfloat16"
    back = _bridge.tensor_view(a)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == t.data_ptr()


def test_without_ml_dtypes_float64_stays_float64_and_bfloat16_is_refused(monkeypatch):
    monkeypatch.setattr(_bridge, "_BF16", None)  # as if ml_dtypes were not installed
    a = np.arange(3.0)
    back = _bridge.tensor_view(a)  # np.dtype("float64") == None: it must not read as bfloat16
    assert back.dtype == torch.float64 and back.tolist() == [0.0, 1.0, 2.0]
    bits = _bridge.numpy_view(torch.ones(2, dtype=torch.bfloat16))
    assert bits.dtype == np.int16  # the raw bits, which normkit's dtype checks refuse
    with pytest.raises(TypeError):
        normkit.functional.layer_norm(bits, (2,))


# -- the module's tensors stay the layer's -------------------------------------------------------
def test_double_and_replaced_tensors_reach_the_layer():
    ours, ref = nkt.BatchNorm2d(3).double(), nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)  # updated in the new float64 tensors
    with torch.no_grad():
        ours.weight.data = torch.full((3,), 2.0, dtype=torch.float64)  # a replaced tensor
        ref.weight.data = torch.full((3,), 2.0, dtype=torch.float64)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    ours.float()
    assert ours(x.float()).dtype == torch.float32


def test_hyperparameters_are_the_layers():
    bn = nkt.BatchNorm2d(3)
    bn.momentum = 0.5
    assert bn._nk.momentum == 0.5 and bn.momentum == 0.5 and bn.eps == 1e-5 and bn.num_features == 3
    ren = nkt.BatchRenorm2d(3)
    ren.r_max = 2.0
    assert ren._nk.r_max == 2.0
    with pytest.raises(ValueError, match="r_max"):  # checked by the layer
        ren.r_max = 0.5
    bn.eval()
    bn.use_batch_stats = True
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))


def test_no_grad_and_inference_mode():
    bn = nkt.BatchNorm2d(3)
    with torch.no_grad():
        y = bn(torch.randn(2, 3, 2, 2))
    assert y.grad_fn is None and bn._nk._saved is None
    with torch.inference_mode():
        assert bn.eval()(torch.randn(2, 3, 2, 2)).shape == (2, 3, 2, 2)


# -- the variants: the module runs the normkit layer exactly ------------------------------------
VARIANTS = [
    ("ExtendedBatchNorm2d", (4,), {}, ()),
    ("ModalityBatchNorm2d", (4,), {"num_modalities": 3}, (np.array([0, 2, 1, 2, 0, 1]),)),
    ("GhostBatchNorm2d", (4,), {"ghost_batch_size": 3, "channels_per_group": 2}, ()),
    ("BatchRenorm2d", (4,), {}, ()),
    ("FilterResponseNorm2d", (4,), {"learnable_eps": True}, ()),
    ("BatchChannelNorm2d", (4,), {"num_groups": 2}, ()),
    ("BatchLayerNorm2d", (4,), {"batch_size": 6}, ()),
    ("ProxyNorm2d", (4,), {}, ()),
    ("MovingAverageBatchNorm2d", (4,), {}, ()),
    ("CrossIterationBatchNorm2d", (4,), {"window": 3}, "cbn"),
    ("BatchKalmanNorm2d", (4,), {"prior_features": 2}, "bkn"),
    ("LayerNorm2d", (4,), {}, ()),
    ("EvoNormB0_2d", (4,), {}, ()),
    ("EvoNormS0_2d", (4,), {"groups": 2}, ()),
]


def _extras(kind, step, rng):
    if kind == "cbn":
        w = rng.standard_normal((4, 3)).astype(np.float32) + 0.1 * step
        return tuple(rng.standard_normal((4, 3)).astype(np.float32) if i else w for i in range(3))
    if kind == "bkn":
        return ((rng.standard_normal(2), rng.random(2) + 0.5),)
    return kind


@pytest.mark.parametrize("name,args,kwargs,extra", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_variant_module_runs_the_layer(name, args, kwargs, extra, layout):
    """Three training steps and one eval step: the module's y, dx, parameter gradients and state
    are the NumPy layer's (fed the same arrays); state_dict keys are the layer's."""
    mod, layer = getattr(nkt, name)(*args, **kwargs), getattr(normkit, name)(*args, **kwargs)
    assert isinstance(mod, nkt.NormModule)
    rng = np.random.default_rng(0)
    for step in range(4):
        if step == 3:
            mod.eval(), layer.eval()
        x = rng.standard_normal((6, 4, 3, 5)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        ex = _extras(extra, step, rng)
        tx = torch.from_numpy(x.copy())
        if layout == "channels_last":
            tx = tx.contiguous(memory_format=torch.channels_last)
        tx.requires_grad_()
        if extra == "bkn":
            tex = (tuple(torch.from_numpy(p) for p in ex[0]),)
        else:
            tex = tuple(torch.from_numpy(e) if isinstance(e, np.ndarray) and e.dtype.kind == "f" else e for e in ex)
        y = mod(tx, *tex)
        y.backward(torch.from_numpy(dy))
        ry = layer(x, *ex)
        rdx = layer.backward(dy)
        np.testing.assert_allclose(y.detach().numpy(), ry, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(tx.grad.numpy(), rdx, atol=1e-6, rtol=1e-5)
        for n, p in mod.named_parameters():
            np.testing.assert_allclose(p.grad.numpy(), layer.grads[n], atol=1e-5, rtol=1e-5)
            p.grad = None
    assert list(mod.state_dict()) == list(layer.state_dict())
    for k, v in layer.state_dict().items():
        np.testing.assert_allclose(mod.state_dict()[k].numpy(), v, atol=1e-6, rtol=1e-5)
    fresh = getattr(nkt, name)(*args, **kwargs)
    fresh.load_state_dict(mod.state_dict())
    for k, v in mod.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_variant_constructor_signature():
    import inspect
    sig = inspect.signature(nkt.GhostBatchNorm2d)
    assert list(sig.parameters)[:2] == ["num_features", "ghost_batch_size"] and "layout" not in sig.parameters
    assert "device" in sig.parameters and "dtype" in sig.parameters
    with pytest.raises(TypeError, match="layout"):
        nkt.GhostBatchNorm2d(4, 2, layout="NHWC")
    assert nkt.GhostBatchNorm2d(4, 2, dtype=torch.float64).weight.dtype == torch.float64


def test_modality_tensor_and_cbn_history_cleared_on_load():
    m = nkt.ModalityBatchNorm2d(3)
    y = m(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]))
    assert y.shape == (4, 3, 2, 2)
    c = nkt.CrossIterationBatchNorm2d(3, window=2)
    w, j = torch.randn(3, 2), torch.randn(3, 2)
    c(torch.randn(4, 3, 2, 2), w, j, j)
    assert len(c._nk._history) == 1
    c.load_state_dict(c.state_dict())
    assert len(c._nk._history) == 0


# -- errors -------------------------------------------------------------------------------------
def test_errors():
    bn = nkt.BatchNorm2d(3)
    with pytest.raises(ValueError, match="CPU"):
        bn(torch.empty(2, 3, 2, 2, device="meta"))
    with pytest.raises(ValueError, match="device"):
        nkt.BatchNorm2d(3, device="meta")
    with pytest.raises(TypeError, match="dtype"):
        nkt.BatchNorm2d(3, dtype=torch.float16)
    with pytest.raises(TypeError, match="input"):
        bn([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype"):
        bn(torch.ones(2, 3, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(2, 4, 2, 2))
    with pytest.raises(TypeError, match="float32 or float64"):
        nkt.BatchNorm2d(3).half()(torch.randn(2, 3, 2, 2).half())
    with pytest.raises(TypeError, match="float64"):  # a float32 layer and a float64 input, as torch
        bn(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    c = nkt.CrossIterationBatchNorm2d(3)
    w = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="detach"):
        c(torch.randn(4, 3, 2, 2), w, w.detach(), w.detach())
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    y = bn(x)
    x.data.add_(1) if False else x.mul_(1) if False else None
    y.sum().backward()
    x2 = torch.randn(2, 3, 2, 2, requires_grad=True)
    a = x2 * 1
    y = bn(a)
    a.add_(1)  # the input changed in place before the backward: autograd's error
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_import_normkit_does_not_import_torch():
    code = "import sys, normkit; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_torch_smoke(capsys, tmp_path):
    from normkit.__main__ import main
    assert main(["bench", "--torch", "--quick", "--shapes", "tiny", "--ops", "bn,ln",
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "== BatchNorm2d  NCHW  float32" in out and "== LayerNorm" in out and "nk.torch ms" in out


def test_convert_sync_batch_norm():
    m = nkt.convert(nn.Sequential(nn.SyncBatchNorm(3)))
    assert isinstance(m[0], nkt.SyncBatchNorm)
    ref = nn.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(m.eval()(x), ref(x))
