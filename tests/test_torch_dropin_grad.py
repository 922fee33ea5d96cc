"""normkit.torch: torch.autograd.gradcheck in float64 for every layer, train and eval, into the
input, every parameter and the differentiable extra inputs (BKN's prior, through its posterior)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import normkit.torch as nkt  # noqa: E402


def _randomize(mod, gen):
    """Parameters and running statistics away from their defaults (so that every term shows)."""
    with torch.no_grad():
        for n, p in mod.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for n, b in mod.named_buffers():
            if n == "running_mean":
                b.copy_(0.2 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif n in ("running_var", "running_std"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=b.dtype))


# id -> (module factory, input shape, modes, extra inputs: list of callables gen -> argument)
MOD = torch.tensor([0, 1, 1, 0])
CASES = {
    "BatchNorm1d-NC": (lambda: nkt.BatchNorm1d(3), (5, 3), ("train", "eval")),
    "BatchNorm1d-NCL": (lambda: nkt.BatchNorm1d(3, momentum=None), (4, 3, 5), ("train", "eval")),
    "BatchNorm2d": (lambda: nkt.BatchNorm2d(3), (3, 3, 4, 5), ("train", "eval")),
    "BatchNorm2d-noaffine": (lambda: nkt.BatchNorm2d(3, affine=False), (3, 3, 4, 5), ("train", "eval")),
    "BatchNorm2d-nostats": (lambda: nkt.BatchNorm2d(3, track_running_stats=False), (3, 3, 2, 3), ("eval",)),
    "BatchNorm3d": (lambda: nkt.BatchNorm3d(2), (2, 2, 3, 2, 2), ("train", "eval")),
    "InstanceNorm1d": (lambda: nkt.InstanceNorm1d(3, affine=True), (2, 3, 6), ("train",)),
    "InstanceNorm2d-stats": (lambda: nkt.InstanceNorm2d(3, affine=True, track_running_stats=True),
                             (2, 3, 4, 3), ("train", "eval")),
    "InstanceNorm3d": (lambda: nkt.InstanceNorm3d(2, affine=True), (2, 2, 2, 3, 2), ("train",)),
    "GroupNorm": (lambda: nkt.GroupNorm(2, 4), (2, 4, 3, 3), ("train",)),
    "GroupNorm-3d": (lambda: nkt.GroupNorm(3, 6), (2, 6, 5), ("train",)),
    "LayerNorm": (lambda: nkt.LayerNorm((4, 5)), (3, 4, 5), ("train",)),
    "LayerNorm-nobias": (lambda: nkt.LayerNorm(6, bias=False), (2, 3, 6), ("train",)),
    "RMSNorm": (lambda: nkt.RMSNorm(6, eps=1e-6), (4, 6), ("train",)),
    "RMSNorm-eps-none": (lambda: nkt.RMSNorm((2, 3)), (4, 2, 3), ("train",)),
    "LocalResponseNorm": (lambda: nkt.LocalResponseNorm(3, alpha=0.1, k=2.0), (2, 5, 3, 3), ("train",)),
    "FrozenBatchNorm2d": (lambda: nkt.FrozenBatchNorm2d(3), (2, 3, 3, 3), ("train",)),
    "ExtendedBatchNorm2d": (lambda: nkt.ExtendedBatchNorm2d(3), (3, 3, 3, 3), ("train", "eval")),
    "ModalityBatchNorm2d": (lambda: nkt.ModalityBatchNorm2d(3), (4, 3, 3, 3), ("train", "eval"), [MOD]),
    "ModalityBatchNorm2d-separate": (lambda: nkt.ModalityBatchNorm2d(3, separate_affine=True), (4, 3, 2, 3),
                                     ("train",), [MOD]),
    "GhostBatchNorm2d": (lambda: nkt.GhostBatchNorm2d(4, ghost_batch_size=2, channels_per_group=2),
                         (4, 4, 2, 3), ("train", "eval")),
    # r_max = 1, d_max = 0: r and d are constants (Batch Renorm's stop-gradient is then exact)
    "BatchRenorm2d": (lambda: nkt.BatchRenorm2d(3, r_max=1.0, d_max=0.0), (3, 3, 3, 3), ("train", "eval")),
    "FilterResponseNorm2d": (lambda: nkt.FilterResponseNorm2d(3, learnable_eps=True), (2, 3, 3, 3), ("train",)),
    "FilterResponseNorm2d-notlu": (lambda: nkt.FilterResponseNorm2d(3, tlu=False), (2, 3, 3, 3), ("train",)),
    "BatchChannelNorm2d": (lambda: nkt.BatchChannelNorm2d(4, num_groups=2), (3, 4, 3, 3), ("train", "eval")),
    "BatchLayerNorm2d": (lambda: nkt.BatchLayerNorm2d(3, batch_size=4), (4, 3, 2, 3), ("train", "eval")),
    "ProxyNorm2d": (lambda: nkt.ProxyNorm2d(3), (2, 3, 3, 3), ("train",)),
    "MovingAverageBatchNorm2d": (lambda: nkt.MovingAverageBatchNorm2d(3), (3, 3, 3, 3), ("eval", "batch-stats")),
    "CrossIterationBatchNorm2d": (lambda: nkt.CrossIterationBatchNorm2d(3, window=1), (3, 3, 3, 3),
                                  ("train", "eval"), [torch.ones(3, 2), torch.zeros(3, 2), torch.zeros(3, 2)]),
    "BatchKalmanNorm2d": (lambda: nkt.BatchKalmanNorm2d(3), (3, 3, 3, 3), ("train", "eval")),
    "LayerNorm2d": (lambda: nkt.LayerNorm2d(3), (2, 3, 3, 4), ("train",)),
    "EvoNormB0_2d": (lambda: nkt.EvoNormB0_2d(3), (3, 3, 3, 3), ("train", "eval")),
    "EvoNormS0_2d": (lambda: nkt.EvoNormS0_2d(4, groups=2), (2, 4, 3, 3), ("train",)),
}
PARAMS = [pytest.param(name, mode, id=f"{name}-{mode}") for name, case in CASES.items() for mode in case[2]]


def _mode(mod, mode):
    mod.train(mode == "train")
    if mode == "batch-stats":
        mod.use_batch_stats = True
    return mod


@pytest.mark.parametrize("name,mode", PARAMS)
def test_gradcheck(name, mode):
    make, shape, _ = CASES[name][:3]
    extras = [e.double() if e.is_floating_point() else e for e in (CASES[name][3] if len(CASES[name]) > 3 else [])]
    gen = torch.Generator().manual_seed(0)
    mod = _mode(make().double(), mode)
    _randomize(mod, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    params = [p for p in mod.parameters()]
    assert params or not list(make().parameters())
    fn = lambda x, *ps: mod(x, *extras)  # noqa: E731  (ps are the module's own parameters)
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_kalman_prior_and_posterior(mode):
    """Gradients flow into the prior, and from the posterior (the next layer's prior) back."""
    gen = torch.Generator().manual_seed(1)
    first = _mode(nkt.BatchKalmanNorm2d(3).double(), mode)
    second = _mode(nkt.BatchKalmanNorm2d(2, prior_features=3, gain=0.7).double(), mode)
    _randomize(first, gen)
    _randomize(second, gen)
    x = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    prior = (0.1 * torch.randn(3, generator=gen, dtype=torch.float64),
             0.5 + torch.rand(3, generator=gen, dtype=torch.float64))
    prior = tuple(p.requires_grad_() for p in prior)

    def fn(x, x2, pm, pv, *ps):
        y = first(x, (pm, pv))
        y2 = second(x2, first.posterior)
        return y, y2, *second.posterior

    params = list(first.parameters()) + list(second.parameters())
    assert torch.autograd.gradcheck(fn, (x, x2, *prior, *params), eps=1e-6, atol=1e-6, rtol=1e-4)
    first(x, prior)[0].sum().backward()
    if mode == "train":
        assert prior[0].grad is not None and prior[0].grad.abs().sum() > 0


def test_double_backward_raises():
    bn = nkt.BatchNorm2d(3).double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        g.sum().backward()


def test_two_forwards_then_backwards():
    """Each call keeps its own saved state: two forwards, then both backwards, match torch."""
    gen = torch.Generator().manual_seed(2)
    ours, ref = nkt.GroupNorm(2, 4).double(), torch.nn.GroupNorm(2, 4).double()
    xs = [torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    grads = []
    for mod in (ours, ref):
        a, b = (x.clone().requires_grad_() for x in xs)
        ya, yb = mod(a), mod(b)
        (yb * yb).sum().backward()
        (ya * ya * ya).sum().backward()
        grads.append((a.grad, b.grad, mod.weight.grad.clone()))
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r)


def test_mabn_one_backward_per_training_forward():
    """MABN's paper backward writes its step into the psi ring: a second backward of one
    training forward raises normkit's StateError (a RuntimeError)."""
    m = nkt.MovingAverageBatchNorm2d(3)
    x = torch.randn(2, 3, 3, 3, requires_grad=True)
    y = m(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per training forward"):
        y.backward()
    assert np.isfinite(x.grad.numpy()).all()
