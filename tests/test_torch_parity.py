"""Parity with torch.nn: a model trained in PyTorch gives the same numbers in normkit.

For every layer family over awkward shapes (N=1 where legal, C=1, 7x5 planes, 3-D inputs, several
normalized dims), in float32 and float64: several training steps compare the output, dx, the
parameter gradients and the running statistics (with num_batches_tracked) after every step; then
eval compares output and gradients again. state_dict keys, shapes and values move both ways.

Tolerances are the suite's (conftest.py): both libraries round at their dtype, so the difference
is bounded by the sum of two roundings of the same size.
"""
import numpy as np
import pytest

import normkit

torch = pytest.importorskip("torch")

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def spec(name, shape, *args, **kwargs):
    """A layer as (torch class name == normkit class name, constructor arguments, input shape)."""
    label = f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"
    return pytest.param(name, args, kwargs, shape, id=f"{label}-{'x'.join(map(str, shape))}")


SPECS = [
    spec("BatchNorm1d", (4, 3), 3),
    spec("BatchNorm1d", (2, 1, 7), 1),
    spec("BatchNorm1d", (1, 23, 17), 23, momentum=0.3),
    spec("BatchNorm2d", (2, 3, 7, 5), 3),
    spec("BatchNorm2d", (1, 1, 7, 5), 1),
    spec("BatchNorm2d", (2, 3, 7, 5), 3, momentum=None),
    spec("BatchNorm2d", (2, 3, 7, 5), 3, affine=False, eps=1e-3),
    spec("BatchNorm1d", (3, 4, 5), 4, track_running_stats=False),
    spec("BatchNorm3d", (2, 3, 2, 3, 4), 3),
    spec("InstanceNorm1d", (2, 3, 7), 3),
    spec("InstanceNorm1d", (3, 17), 3, affine=True),
    spec("InstanceNorm2d", (2, 3, 7, 5), 3, affine=True, track_running_stats=True),
    spec("InstanceNorm2d", (1, 1, 7, 5), 1, affine=True, track_running_stats=True, momentum=0.5),
    spec("InstanceNorm3d", (2, 3, 2, 3, 4), 3, track_running_stats=True),
    spec("InstanceNorm1d", (2, 3, 7), 3, track_running_stats=True, momentum=None),
    spec("GroupNorm", (2, 6, 7, 5), 3, 6),
    spec("GroupNorm", (1, 3, 7), 1, 3),
    spec("GroupNorm", (2, 1, 7, 5), 1, 1),
    spec("GroupNorm", (2, 3, 2, 3, 4), 3, 3),
    # Groups of 4 or more elements here: in a group of two values that nearly coincide, dx is
    # a cancellation of terms as large as 1/sqrt(var + eps), where torch's own float32 backward
    # loses up to 4e-4 (normkit is checked on such groups against the float64 reference).
    spec("GroupNorm", (3, 8), 2, 8, affine=False),
    spec("LayerNorm", (2, 5, 7), 7),
    spec("LayerNorm", (2, 5, 7), (5, 7)),
    spec("LayerNorm", (2, 3, 7, 5), (3, 7, 5)),
    spec("LayerNorm", (1, 7), 7, bias=False),
    spec("LayerNorm", (1, 7, 5), (7, 5), elementwise_affine=False, eps=1e-3),
    spec("RMSNorm", (2, 5, 7), 7),
    spec("RMSNorm", (2, 5, 7), (5, 7), eps=1e-3),
    spec("RMSNorm", (2, 3, 7, 5), (3, 7, 5), elementwise_affine=False),
]

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def make_pair(name, args, kwargs, dtype, rng):
    """The torch module and the normkit layer, with equal random parameters."""
    theirs = getattr(torch.nn, name)(*args, **kwargs).to(TORCH_DTYPE[dtype])
    ours = getattr(normkit, name)(*args, dtype=dtype, **kwargs)
    for pname, p in ours.parameters().items():
        value = rng.uniform(0.5, 1.5, p.shape) if pname == "weight" else rng.normal(0, 0.5, p.shape)
        p[...] = value
        with torch.no_grad():
            getattr(theirs, pname).copy_(torch.from_numpy(p.copy()))
    return theirs, ours


def make_input(rng, shape, dtype):
    return (rng.uniform(-1, 1) + rng.uniform(0.5, 2) * rng.standard_normal(shape)).astype(dtype)


def torch_step(module, x, dy):
    """(y, dx, {param: grad}) of one torch forward and backward."""
    module.zero_grad(set_to_none=True)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y = module(xt)
    y.backward(torch.from_numpy(dy.copy()))
    grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    return y.detach().numpy(), xt.grad.numpy(), grads


def compare_step(theirs, ours, x, dy, dtype, assert_close, when):
    want_y, want_dx, want_grads = torch_step(theirs, x, dy)
    assert_close(ours(x), want_y, dtype, what=f"y ({when})")
    assert_close(ours.backward(dy), want_dx, dtype, what=f"dx ({when})")
    assert set(ours.grads) == set(want_grads), when
    for pname, grad in want_grads.items():
        assert_close(ours.grads[pname], grad, dtype, what=f"d{pname} ({when})")


def compare_buffers(theirs, ours, dtype, assert_close, when):
    torch_buffers = dict(theirs.named_buffers())
    for bname in BUFFERS:
        mine = getattr(ours, bname, None)
        if bname not in torch_buffers or torch_buffers[bname] is None:
            assert mine is None, f"{bname} ({when}): torch has none"
            continue
        want = torch_buffers[bname].numpy()
        if bname == "num_batches_tracked":
            assert int(mine) == int(want), f"num_batches_tracked ({when})"
        else:
            assert_close(mine, want, dtype, what=f"{bname} ({when})")


@pytest.mark.parametrize("name, args, kwargs, shape", SPECS)
def test_training_steps_then_eval_match_torch(name, args, kwargs, shape, dtype, rng, assert_close):
    theirs, ours = make_pair(name, args, kwargs, dtype, rng)
    for step in range(1, 4):
        x, dy = make_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype)
        compare_step(theirs, ours, x, dy, dtype, assert_close, f"training step {step}")
        compare_buffers(theirs, ours, dtype, assert_close, f"after training step {step}")
    theirs.eval()
    ours.eval()
    for step in range(1, 3):
        x, dy = make_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype)
        compare_step(theirs, ours, x, dy, dtype, assert_close, f"eval step {step}")
    compare_buffers(theirs, ours, dtype, assert_close, "after eval")


@pytest.mark.parametrize("name, args, kwargs, shape", SPECS)
def test_state_dict_keys_shapes_and_dtypes_match_torch(name, args, kwargs, shape, dtype, rng):
    theirs, ours = make_pair(name, args, kwargs, dtype, rng)
    want = theirs.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(want)
    for key, value in want.items():
        assert mine[key].shape == tuple(value.shape), key
        assert mine[key].dtype == value.numpy().dtype, key


@pytest.mark.parametrize("name, args, kwargs, shape", SPECS)
def test_loading_a_trained_torch_state_dict_gives_torch_eval_output(name, args, kwargs, shape,
                                                                    dtype, rng, assert_close):
    theirs, _ = make_pair(name, args, kwargs, dtype, rng)
    theirs.train()
    # A few training steps and an optimizer step, so that parameters and buffers are non-trivial.
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1) if list(theirs.parameters()) else None
    for _ in range(3):
        x = torch.from_numpy(make_input(rng, shape, dtype))
        loss = (theirs(x) * torch.from_numpy(rng.standard_normal(shape).astype(dtype))).sum()
        if optimizer:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    theirs.eval()
    ours = getattr(normkit, name)(*args, dtype=dtype, **kwargs)
    assert ours.load_state_dict(theirs.state_dict()) is ours  # torch tensors, as torch gives them
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy(), err_msg=key)
    ours.eval()
    x = make_input(rng, shape, dtype)
    with torch.no_grad():
        want = theirs(torch.from_numpy(x)).numpy()
    assert_close(ours(x), want, dtype, what="eval output")


@pytest.mark.parametrize("name, args, kwargs, shape", SPECS)
def test_a_normkit_state_dict_loads_into_torch(name, args, kwargs, shape, dtype, rng, assert_close):
    theirs, ours = make_pair(name, args, kwargs, dtype, rng)
    for _ in range(3):
        ours(make_input(rng, shape, dtype))
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})
    theirs.eval()
    ours.eval()
    x = make_input(rng, shape, dtype)
    with torch.no_grad():
        want = theirs(torch.from_numpy(x)).numpy()
    assert_close(ours(x), want, dtype, what="eval output")


# -- the functional forms against torch.nn.functional ----------------------------------------------

def test_functional_forms_match_torch_functional(dtype, rng, assert_close):
    import normkit.functional as F
    TF = torch.nn.functional
    t = torch.from_numpy
    x = make_input(rng, (2, 6, 7, 5), dtype)
    w, b = rng.uniform(0.5, 1.5, 6).astype(dtype), rng.normal(size=6).astype(dtype)
    rm, rv = rng.normal(size=6).astype(dtype), rng.uniform(0.5, 2, 6).astype(dtype)
    trm, trv = t(rm.copy()), t(rv.copy())
    assert_close(F.batch_norm(x, rm, rv, w, b, True, 0.2, 1e-4),
                 TF.batch_norm(t(x), trm, trv, t(w), t(b), True, 0.2, 1e-4).numpy(), dtype, what="bn")
    assert_close(rm, trm.numpy(), dtype, what="batch_norm running_mean")
    assert_close(rv, trv.numpy(), dtype, what="batch_norm running_var")
    assert_close(F.batch_norm(x, rm, rv, w, b), TF.batch_norm(t(x), trm, trv, t(w), t(b)).numpy(),
                 dtype, what="batch_norm eval")
    assert_close(F.instance_norm(x, rm, rv, w, b, True, 0.2),
                 TF.instance_norm(t(x), trm, trv, t(w), t(b), True, 0.2).numpy(), dtype, what="in")
    assert_close(rm, trm.numpy(), dtype, what="instance_norm running_mean")
    assert_close(rv, trv.numpy(), dtype, what="instance_norm running_var")
    assert_close(F.group_norm(x, 2, w, b), TF.group_norm(t(x), 2, t(w), t(b)).numpy(), dtype,
                 what="group_norm")
    lw, lb = rng.uniform(0.5, 1.5, (7, 5)).astype(dtype), rng.normal(size=(7, 5)).astype(dtype)
    assert_close(F.layer_norm(x, (7, 5), lw, lb), TF.layer_norm(t(x), (7, 5), t(lw), t(lb)).numpy(),
                 dtype, what="layer_norm")
    assert_close(F.rms_norm(x, (7, 5), lw), TF.rms_norm(t(x), (7, 5), t(lw)).numpy(), dtype,
                 what="rms_norm")
