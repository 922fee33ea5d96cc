"""copy.deepcopy and pickle of every layer, as torch users copy modules (EMA teachers, checkpoints):
after training steps, the copy holds the same parameters, buffers, mode and settings, computes the
same bits, and is independent of the original. What a forward saved for its backward is not
copied (as torch's deepcopy carries no autograd graph): the copy's backward needs its own forward.
"""
import copy
import inspect
import pickle

import numpy as np
import pytest

import normkit

X4 = (4, 6, 5, 5)  # N, C, H, W
LAYERS = {  # name -> (constructor, input shape)
    "BatchNorm1d": (lambda: normkit.BatchNorm1d(6), (4, 6, 7)),
    "BatchNorm2d": (lambda: normkit.BatchNorm2d(6), X4),
    "BatchNorm2d-NHWC": (lambda: normkit.BatchNorm2d(6, layout="NHWC"), (4, 5, 5, 6)),
    "BatchNorm3d": (lambda: normkit.BatchNorm3d(6), (2, 6, 2, 3, 4)),
    "InstanceNorm1d": (lambda: normkit.InstanceNorm1d(6, affine=True, track_running_stats=True), (4, 6, 7)),
    "InstanceNorm2d": (lambda: normkit.InstanceNorm2d(6, affine=True), X4),
    "InstanceNorm3d": (lambda: normkit.InstanceNorm3d(6), (2, 6, 2, 3, 4)),
    "GroupNorm": (lambda: normkit.GroupNorm(3, 6), X4),
    "LayerNorm": (lambda: normkit.LayerNorm((5, 5)), X4),
    "RMSNorm": (lambda: normkit.RMSNorm(5), X4),
    "ExtendedBatchNorm2d": (lambda: normkit.ExtendedBatchNorm2d(6), X4),
    "ModalityBatchNorm2d": (lambda: normkit.ModalityBatchNorm2d(6), X4),
    "GhostBatchNorm2d": (lambda: normkit.GhostBatchNorm2d(6, 2), X4),
    "GhostBatchNorm2d-BN+GN": (lambda: normkit.GhostBatchNorm2d(6, 2, channels_per_group=2), X4),
    "BatchRenorm2d": (lambda: normkit.BatchRenorm2d(6), X4),
    "FrozenBatchNorm2d": (lambda: normkit.FrozenBatchNorm2d(6), X4),
    "FilterResponseNorm2d": (lambda: normkit.FilterResponseNorm2d(6, learnable_eps=True), X4),
    "EvoNormB0_2d": (lambda: normkit.EvoNormB0_2d(6), X4),
    "EvoNormS0_2d": (lambda: normkit.EvoNormS0_2d(6, groups=3), X4),
    "ProxyNorm2d": (lambda: normkit.ProxyNorm2d(6, activation="gelu"), X4),
    "BatchChannelNorm2d": (lambda: normkit.BatchChannelNorm2d(6, num_groups=3), X4),
    "BatchLayerNorm2d": (lambda: normkit.BatchLayerNorm2d(6, 4), X4),
    "LayerNorm2d": (lambda: normkit.LayerNorm2d(6), X4),
    "LocalResponseNorm": (lambda: normkit.LocalResponseNorm(3), X4),
    "MovingAverageBatchNorm2d": (lambda: normkit.MovingAverageBatchNorm2d(6, buffer_size=2, warmup_iters=0), X4),
    "CrossIterationBatchNorm2d": (lambda: normkit.CrossIterationBatchNorm2d(6), X4),
    "BatchKalmanNorm2d": (lambda: normkit.BatchKalmanNorm2d(6), X4),
}
COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda layer: pickle.loads(pickle.dumps(layer))}


def test_every_public_layer_is_listed():
    public = {n for n in normkit.__all__ if inspect.isclass(getattr(normkit, n))
              and issubclass(getattr(normkit, n), normkit.NormLayer) and n not in ("NormLayer", "SyncBatchNorm")}
    assert public <= {name.split("-")[0] for name in LAYERS}


_CONV = np.random.default_rng(7).standard_normal((3, 6, 2, 3, 3)).astype(np.float32)  # weight, Jacobians


def extra_args(name, shape):
    """The modality of each sample, or CBN's preceding convolution weight and its two Jacobians."""
    if name == "ModalityBatchNorm2d":
        return (np.arange(shape[0]) % 2,)
    return tuple(_CONV) if name == "CrossIterationBatchNorm2d" else ()


def trained(name, rng, steps=3):
    make, shape = LAYERS[name]
    layer = make()
    for _ in range(steps):  # forwards and backwards, with parameter updates and running statistics
        x = rng.standard_normal(shape).astype(np.float32)
        layer(x, *extra_args(name, shape))
        layer.backward(rng.standard_normal(shape).astype(np.float32))
        for pname, p in layer.parameters().items():
            p -= 0.05 * layer.grads[pname]
    return layer


def outputs(layer, name, x, dy):
    """The eval output, then a training forward's output and its backward (dx and the grads)."""
    args = extra_args(name, x.shape)
    y_eval = layer.eval()(x, *args)
    y_train = layer.train()(x, *args)
    dx = layer.backward(dy)
    return [y_eval, y_train, dx, *(layer.grads[k] for k in sorted(layer.grads))]


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_copy_computes_the_same_bits_and_is_independent(name, how, rng):
    layer = trained(name, rng)
    twin = COPIES[how](layer)
    assert type(twin) is type(layer) and twin.training == layer.training and repr(twin) == repr(layer)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(twin.state_dict()[k], v, err_msg=k)
        assert not np.shares_memory(getattr(twin, k), getattr(layer, k)), k
    with pytest.raises(normkit.StateError, match="expected a forward call first"):
        twin.backward(np.zeros(LAYERS[name][1], np.float32))  # the forward's saved state stays behind
    shape = LAYERS[name][1]
    x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    for got, want in zip(outputs(twin, name, x, dy), outputs(copy.deepcopy(layer), name, x, dy)):
        np.testing.assert_array_equal(got, want)
    for k, v in layer.state_dict().items():  # the copies' steps left the original alone
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_the_original_keeps_its_saved_forward():
    layer = normkit.GroupNorm(3, 6)
    x = np.random.default_rng(0).standard_normal(X4).astype(np.float32)
    layer(x)
    copy.deepcopy(layer)
    pickle.dumps(layer)
    assert layer.backward(np.ones(X4, np.float32)).shape == X4


def test_a_deepcopy_of_a_trained_torch_module_matches_it():
    torch = pytest.importorskip("torch")
    import normkit.torch as nkt
    module = nkt.FilterResponseNorm2d(6)
    x = torch.randn(X4, requires_grad=True)
    module(x).square().sum().backward()
    with torch.no_grad():
        for p in module.parameters():
            p -= 0.1 * p.grad
    twin = copy.deepcopy(module)
    assert torch.equal(twin(x), module(x))
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)  # the copy's parameters are its own
    assert not torch.equal(twin(x), module(x))
