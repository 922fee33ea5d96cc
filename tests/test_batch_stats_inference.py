"""Batch-statistics inference (issue 10, API.md): every layer with running statistics has the
attribute `use_batch_stats` (default False). After eval(), setting it True normalizes with the
batch's own statistics, as in training, and leaves the running statistics and
num_batches_tracked untouched; the backward then flows through the batch statistics (it is the
training backward). Setting it back to False returns to the running statistics.

Per layer, "the batch's own statistics" are the ones its training forward normalizes with:
BatchNorm's per channel, InstanceNorm's per (sample, channel), EBN's per-channel means and one
variance, MBN's per (modality, channel), GhostBatchNorm's per (ghost batch, channel group).
BatchRenorm2d's training forward corrects its batch statistics towards the running ones with r and
d; with batch statistics in inference there is nothing to correct towards (r = 1, d = 0), so it
normalizes as BatchNorm does. FrozenBatchNorm2d's buffers are constants, not running
statistics, so it has no batch-statistics mode.
"""
import numpy as np
import pytest

import normkit
import reference as ref
from variant_checks import assert_state_unchanged, bind_extra, make_input, snapshot

MODALITY = np.array([1, 0, 1, 1, 0])


def case(name, make, shape, reference, extra=(), buffers=("running_mean", "running_var")):
    return name, (make, shape, reference, extra, buffers)


def _bn_ref(layer, x, dy=None):
    args = (layer.weight, layer.bias, layer.eps)
    return ref.batch_norm(x, *args) if dy is None else ref.batch_norm_backward(x, dy, *args)


def _in_ref(layer, x, dy=None):
    args = (layer.weight, layer.bias, layer.eps)
    return ref.instance_norm(x, *args) if dy is None else ref.instance_norm_backward(x, dy, *args)


def _ebn_ref(layer, x, dy=None):
    args = (layer.weight, layer.bias, layer.eps)
    if dy is None:
        return ref.extended_batch_norm(x, *args)
    return ref.extended_batch_norm_backward(x, dy, *args)


def _mbn_ref(layer, x, dy=None):
    args = (MODALITY, layer.num_modalities, layer.weight, layer.bias, layer.eps)
    if dy is None:
        return ref.modality_batch_norm(x, *args)
    return ref.modality_batch_norm_backward(x, dy, *args)


def _ghost_ref(layer, x, dy=None):
    args = (layer.ghost_batch_size, layer.channels_per_group, layer.weight, layer.bias, layer.eps)
    if dy is None:
        return ref.ghost_batch_norm(x, *args)
    return ref.ghost_batch_norm_backward(x, dy, *args)


LAYERS = dict([
    case("BatchNorm1d-NC", lambda dt: normkit.BatchNorm1d(3, dtype=dt), (8, 3), _bn_ref),
    case("BatchNorm1d-NCL", lambda dt: normkit.BatchNorm1d(3, dtype=dt), (4, 3, 5), _bn_ref),
    case("BatchNorm2d", lambda dt: normkit.BatchNorm2d(3, dtype=dt), (2, 3, 7, 5), _bn_ref),
    case("BatchNorm2d-C1-N1", lambda dt: normkit.BatchNorm2d(1, dtype=dt), (1, 1, 7, 5), _bn_ref),
    case("BatchNorm3d", lambda dt: normkit.BatchNorm3d(3, dtype=dt), (2, 3, 2, 3, 4), _bn_ref),
    case("InstanceNorm2d", lambda dt: normkit.InstanceNorm2d(
        3, affine=True, track_running_stats=True, dtype=dt), (2, 3, 7, 5), _in_ref),
    case("ExtendedBatchNorm2d", lambda dt: normkit.ExtendedBatchNorm2d(3, dtype=dt), (2, 3, 7, 5),
         _ebn_ref),
    case("ModalityBatchNorm2d", lambda dt: normkit.ModalityBatchNorm2d(3, dtype=dt), (5, 3, 7, 5),
         _mbn_ref, (MODALITY,)),
    case("ModalityBatchNorm2d-separate_affine", lambda dt: normkit.ModalityBatchNorm2d(
        3, separate_affine=True, dtype=dt), (5, 3, 7, 5), _mbn_ref, (MODALITY,)),
    case("GhostBatchNorm2d", lambda dt: normkit.GhostBatchNorm2d(
        6, 2, channels_per_group=2, example_weight=0.3, dtype=dt), (5, 6, 7, 5), _ghost_ref),
    case("BatchRenorm2d", lambda dt: normkit.BatchRenorm2d(3, r_max=1.5, d_max=0.5, dtype=dt),
         (2, 3, 7, 5), _bn_ref, buffers=("running_mean", "running_std")),
])
NAMES = pytest.mark.parametrize("name", list(LAYERS))


def trained_in_eval(name, dtype, rng):
    """The layer after two training steps (running statistics that are not the next batch's,
    and, but for InstanceNorm (torch's never counts), num_batches_tracked = 2), put in eval mode
    with non-trivial parameters."""
    make, shape, _, extra, _ = LAYERS[name]
    layer = make(dtype)
    for p in layer.parameters().values():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    for _ in range(2):
        layer(make_input(rng, shape, dtype) + 3.0, *extra)
    return layer.eval()


@NAMES
def test_use_batch_stats_defaults_to_false(name):
    make, *_ = LAYERS[name]
    layer = make(np.float32)
    assert layer.use_batch_stats is False
    assert layer.eval().use_batch_stats is False


@NAMES
def test_eval_with_batch_stats_normalizes_like_training_and_leaves_the_state(name, dtype, rng,
                                                                             assert_close):
    _, shape, reference, extra, buffers = LAYERS[name]
    layer = trained_in_eval(name, dtype, rng)
    layer.use_batch_stats = True
    before = snapshot(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    count = int(np.prod(shape)) // shape[1]
    y = layer(x, *extra)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, reference(layer, x), dtype, count=count, what="y")
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = reference(layer, x, dy)
    assert_close(dx, want_dx, dtype, count=count, what="dx (through the batch statistics)")
    assert_close(layer.grads["weight"], want_dw, dtype, count=count, what="dweight")
    assert_close(layer.grads["bias"], want_db, dtype, count=count, what="dbias")
    assert layer.training is False and layer.use_batch_stats is True
    assert_state_unchanged(layer, before)  # running statistics and num_batches_tracked
    for key in buffers:
        assert getattr(layer, key) is not None


@NAMES
def test_switching_it_off_returns_to_the_running_statistics(name, rng):
    _, shape, _, extra, _ = LAYERS[name]
    layer = trained_in_eval(name, np.float64, rng)
    x = make_input(rng, shape, np.float64)
    with_running = layer(x, *extra)
    layer.use_batch_stats = True
    with_batch = layer(x, *extra)
    # Running statistics from batches offset by +3: the two modes must give different outputs.
    assert np.max(np.abs(with_batch - with_running)) > 0.1
    layer.use_batch_stats = False
    np.testing.assert_array_equal(layer(x, *extra), with_running)


@NAMES
def test_in_training_the_running_statistics_still_move(name, rng):
    # The attribute is about inference: a training step with it set updates the statistics.
    _, shape, _, extra, buffers = LAYERS[name]
    layer = trained_in_eval(name, np.float64, rng)
    layer.use_batch_stats = True
    before = snapshot(layer)
    layer.train()(make_input(rng, shape, np.float64), *extra)
    counted = 0 if name.startswith("InstanceNorm") else 1  # torch's InstanceNorm never counts
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + counted
    assert not np.array_equal(getattr(layer, buffers[0]), before[buffers[0]])


SMALL = {"BatchNorm1d-NC": (6, 3), "BatchNorm1d-NCL": (3, 3, 4), "BatchNorm2d": (2, 3, 2, 3),
         "BatchNorm2d-C1-N1": (1, 1, 3, 4), "BatchNorm3d": (2, 3, 2, 1, 2),
         "InstanceNorm2d": (2, 3, 2, 3), "ExtendedBatchNorm2d": (2, 3, 2, 3),
         "ModalityBatchNorm2d": (5, 3, 1, 2), "ModalityBatchNorm2d-separate_affine": (5, 3, 1, 2),
         "GhostBatchNorm2d": (3, 6, 1, 2), "BatchRenorm2d": (2, 3, 2, 3)}


@NAMES
def test_float64_backward_through_batch_statistics_equals_finite_differences(
        name, rng, check_gradients_by_finite_differences):
    _, _, _, extra, _ = LAYERS[name]
    layer = trained_in_eval(name, np.float64, rng)
    layer.use_batch_stats = True
    shape = SMALL[name]
    before = snapshot(layer)
    check_gradients_by_finite_differences(bind_extra(layer, *extra),
                                          make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))
    assert_state_unchanged(layer, before)  # hundreds of forwards, no statistics moved


@pytest.mark.parametrize("name, torch_name, shape", [
    ("BatchNorm1d", "batch_norm", (4, 3, 5)),
    ("BatchNorm2d", "batch_norm", (2, 3, 7, 5)),
    ("BatchNorm3d", "batch_norm", (2, 3, 2, 3, 4)),
    ("InstanceNorm2d", "instance_norm", (2, 3, 7, 5)),
])
def test_matches_torch_normalizing_with_input_statistics(name, torch_name, shape, dtype, rng,
                                                         assert_close):
    # torch's equivalent: the functional form with the input's statistics and no running ones.
    torch = pytest.importorskip("torch")
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    kw = dict(affine=True, track_running_stats=True) if name == "InstanceNorm2d" else {}
    layer = getattr(normkit, name)(3, dtype=dtype, **kw)
    layer.weight[...] = [0.6, 1.3, 0.9]
    layer.bias[...] = [0.1, -0.4, 0.3]
    layer(make_input(rng, shape, dtype) + 3.0)
    layer.eval().use_batch_stats = True
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(layer.weight.copy()).requires_grad_(True)
    bt = torch.from_numpy(layer.bias.copy()).requires_grad_(True)
    if torch_name == "batch_norm":
        yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=layer.eps)
    else:
        yt = torch.nn.functional.instance_norm(xt, None, None, wt, bt, use_input_stats=True,
                                               eps=layer.eps)
    assert yt.dtype == tdt
    yt.backward(torch.from_numpy(dy))
    count = int(np.prod(shape)) // 3
    assert_close(layer(x), yt.detach().numpy(), dtype, count=count, what="y")
    assert_close(layer.backward(dy), xt.grad.numpy(), dtype, count=count, what="dx")
    assert_close(layer.grads["weight"], wt.grad.numpy(), dtype, count=count, what="dweight")
    assert_close(layer.grads["bias"], bt.grad.numpy(), dtype, count=count, what="dbias")
