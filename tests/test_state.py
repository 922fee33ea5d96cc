"""The state every layer shares, with torch.nn.Module's conventions.

- parameters() gives the layer's own arrays (views): updating them in place trains the layer.
- train()/eval() return the layer and set `training`.
- state_dict() copies parameters and buffers under torch's keys; load_state_dict() copies values
  back into the layer's existing arrays (so earlier parameters() views stay live), strictly.
- momentum=None is a cumulative moving average, exactly as torch computes it.
"""
import numpy as np
import pytest

import normkit
import reference as ref


def layer_case(name, shape, *args, **kwargs):
    return pytest.param(name, args, kwargs, shape, id=name + "".join(f"-{k}" for k in kwargs))


# (class name, constructor args, input shape): every family, with learnable parameters and, where
# the family has them, running statistics.
LAYERS = [
    layer_case("BatchNorm1d", (4, 3, 5), 3),
    layer_case("BatchNorm2d", (2, 3, 4, 5), 3),
    layer_case("BatchNorm3d", (2, 3, 2, 3, 4), 3),
    layer_case("InstanceNorm1d", (2, 3, 5), 3, affine=True, track_running_stats=True),
    layer_case("InstanceNorm2d", (2, 3, 4, 5), 3, affine=True, track_running_stats=True),
    layer_case("InstanceNorm3d", (2, 3, 2, 3, 4), 3, affine=True, track_running_stats=True),
    layer_case("GroupNorm", (2, 6, 4, 5), 3, 6),
    layer_case("LayerNorm", (2, 4, 5), (4, 5)),
    layer_case("RMSNorm", (2, 4, 5), (4, 5)),
]

EXPECTED_KEYS = {
    "BatchNorm1d": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
    "InstanceNorm1d": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
    "GroupNorm": ["weight", "bias"],
    "LayerNorm": ["weight", "bias"],
    "RMSNorm": ["weight"],
}


def build(name, args, kwargs, dtype=np.float64):
    return getattr(normkit, name)(*args, dtype=dtype, **kwargs)


def make_input(rng, shape, dtype=np.float64):
    return (0.3 + 1.5 * rng.standard_normal(shape)).astype(dtype)


def train_a_little(layer, rng, shape, steps=3):
    """Forward/backward steps plus an SGD update, so that every array of the state moves."""
    layer.train()
    for _ in range(steps):
        layer(make_input(rng, shape, layer.dtype))
        layer.backward(rng.standard_normal(shape).astype(layer.dtype))
        for pname, p in layer.parameters().items():
            p -= 0.1 * layer.grads[pname]
    return layer


# -- parameters() ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, args, kwargs, shape", LAYERS)
def test_parameters_are_the_layers_own_arrays(name, args, kwargs, shape, rng, assert_close):
    layer = build(name, args, kwargs)
    params = layer.parameters()
    assert set(params) == ({"weight"} if name == "RMSNorm" else {"weight", "bias"})
    for pname, p in params.items():
        assert np.shares_memory(p, getattr(layer, pname)), pname
    assert not set(params) & {"running_mean", "running_var", "num_batches_tracked"}
    x = make_input(rng, shape)
    layer.eval()
    y_before = layer(x)  # weight 1, bias 0 at construction: y = xhat
    params["weight"] *= 2.0  # in-place updates, as an optimizer step makes them
    if "bias" in params:
        params["bias"] += 1.0
    assert_close(layer(x), 2.0 * y_before + (1.0 if "bias" in params else 0.0), np.float64)


@pytest.mark.parametrize("name, args, kwargs", [
    pytest.param("BatchNorm2d", (3,), {"affine": False}, id="BatchNorm2d-affine_False"),
    pytest.param("InstanceNorm2d", (3,), {}, id="InstanceNorm2d-default"),
    pytest.param("GroupNorm", (3, 6), {"affine": False}, id="GroupNorm-affine_False"),
    pytest.param("LayerNorm", (5,), {"elementwise_affine": False}, id="LayerNorm-no_affine"),
    pytest.param("LayerNorm", (5,), {"bias": False}, id="LayerNorm-bias_False"),
    pytest.param("RMSNorm", (5,), {"elementwise_affine": False}, id="RMSNorm-no_affine"),
])
def test_parameters_lists_only_what_exists(name, args, kwargs):
    layer = build(name, args, kwargs)
    expected = {"weight"} if kwargs == {"bias": False} else set()
    assert set(layer.parameters()) == expected


@pytest.mark.parametrize("name, args, kwargs, shape", LAYERS)
def test_parameters_start_as_torch_initializes_them(name, args, kwargs, shape):
    layer = build(name, args, kwargs, dtype=np.float32)
    params = layer.parameters()
    assert params["weight"].dtype == np.float32
    np.testing.assert_array_equal(params["weight"], np.ones_like(params["weight"]))
    if "bias" in params:
        np.testing.assert_array_equal(params["bias"], np.zeros_like(params["bias"]))
    if getattr(layer, "running_mean", None) is not None:
        np.testing.assert_array_equal(layer.running_mean, 0)
        np.testing.assert_array_equal(layer.running_var, 1)
        assert layer.num_batches_tracked.dtype == np.int64 and layer.num_batches_tracked.shape == ()
        assert int(layer.num_batches_tracked) == 0


# -- train() / eval() -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, args, kwargs, shape", LAYERS)
def test_train_and_eval_return_the_layer_and_set_training(name, args, kwargs, shape):
    layer = build(name, args, kwargs)
    assert layer.training is True  # layers start in training mode
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False
    assert layer.train(mode=True) is layer and layer.training is True


# -- state_dict() / load_state_dict() -------------------------------------------------------------

@pytest.mark.parametrize("name, args, kwargs, shape", LAYERS)
def test_state_dict_keys_follow_torch(name, args, kwargs, shape):
    keys = list(build(name, args, kwargs).state_dict())
    family = {"BatchNorm2d": "BatchNorm1d", "BatchNorm3d": "BatchNorm1d",
              "InstanceNorm2d": "InstanceNorm1d", "InstanceNorm3d": "InstanceNorm1d"}.get(name, name)
    assert keys == EXPECTED_KEYS[family]


@pytest.mark.parametrize("name, args, kwargs, shape", LAYERS)
def test_state_dict_is_a_copy(name, args, kwargs, shape):
    layer = build(name, args, kwargs)
    state = layer.state_dict()
    for key, value in state.items():
        value[...] = 7
    for key, value in layer.state_dict().items():
        assert not np.all(value == 7), key


@pytest.mark.parametrize("name, args, kwargs, shape", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_state_dict_round_trip_reproduces_the_layer(name, args, kwargs, shape, dtype, rng):
    trained = train_a_little(build(name, args, kwargs, dtype), rng, shape)
    fresh = build(name, args, kwargs, dtype)
    views = fresh.parameters()
    assert fresh.load_state_dict(trained.state_dict()) is fresh
    for key, value in trained.state_dict().items():
        mine = fresh.state_dict()[key]
        assert mine.dtype == value.dtype and mine.shape == value.shape, key
        np.testing.assert_array_equal(mine, value, err_msg=key)
    # Loading copies into the existing arrays: views taken before the load see the new values.
    for pname, view in views.items():
        np.testing.assert_array_equal(view, trained.parameters()[pname], err_msg=pname)
    # Same state, same behaviour, in eval and in further training (num_batches_tracked included).
    x = make_input(rng, shape, dtype)
    for mode in (False, True, True):
        trained.train(mode)
        fresh.train(mode)
        np.testing.assert_array_equal(fresh(x), trained(x))
    for key, value in trained.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("name, args, kwargs, shape", LAYERS)
def test_load_state_dict_is_strict_and_all_or_nothing(name, args, kwargs, shape, rng):
    layer = train_a_little(build(name, args, kwargs), rng, shape)
    before = layer.state_dict()
    good = {k: v + 1 for k, v in before.items()}

    missing = dict(good)
    missing.pop("weight")
    with pytest.raises(KeyError):
        layer.load_state_dict(missing)
    with pytest.raises(KeyError):
        layer.load_state_dict({**good, "unexpected": np.zeros(1)})
    wrong_shape = dict(good)
    last = list(good)[-1]  # written last: everything before it would already be loaded
    wrong_shape[last] = np.zeros((2,) + np.shape(good[last]))
    with pytest.raises(ValueError):
        layer.load_state_dict(wrong_shape)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_a_float64_state_dict_loads_into_a_float32_layer(rng):
    # As torch's load_state_dict does: values are copied into the layer's arrays, in its dtype.
    source = train_a_little(normkit.BatchNorm2d(3, dtype=np.float64), rng, (2, 3, 4, 5))
    target = normkit.BatchNorm2d(3, dtype=np.float32).load_state_dict(source.state_dict())
    for key, value in target.state_dict().items():
        assert value.dtype == (np.int64 if key == "num_batches_tracked" else np.float32), key
        np.testing.assert_array_equal(value, source.state_dict()[key].astype(value.dtype), err_msg=key)


# -- momentum=None: the cumulative moving average --------------------------------------------------

@pytest.mark.parametrize("layer_name, shape", [
    pytest.param("BatchNorm1d", (4, 3), id="BatchNorm1d-4x3"),
    pytest.param("BatchNorm2d", (2, 3, 7, 5), id="BatchNorm2d-2x3x7x5"),
    pytest.param("BatchNorm3d", (1, 3, 2, 3, 4), id="BatchNorm3d-1x3x2x3x4"),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_cumulative_average_matches_torch(layer_name, shape, dtype, rng, assert_close):
    torch = pytest.importorskip("torch")
    theirs = getattr(torch.nn, layer_name)(3, momentum=None).to(
        torch.float32 if dtype == np.float32 else torch.float64)
    ours = getattr(normkit, layer_name)(3, momentum=None, dtype=dtype)
    means = []
    for step in range(1, 7):
        x = make_input(rng, shape, dtype) + step  # drifting statistics: the average is visible
        theirs(torch.from_numpy(x))
        ours(x)
        means.append(ref.batch_stats(x)[0])
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step
        assert_close(ours.running_mean, theirs.running_mean.numpy(), dtype, what=f"mean, step {step}")
        assert_close(ours.running_var, theirs.running_var.numpy(), dtype, what=f"var, step {step}")
    # ... and it is the plain average of the batch means.
    assert_close(ours.running_mean, np.mean(means, axis=0), dtype, what="plain average")


def test_cumulative_average_continues_from_a_loaded_counter(rng, assert_close):
    # The factor is 1/num_batches_tracked, so a loaded counter sets the weight of the next batch.
    layer = normkit.BatchNorm1d(2, momentum=None, dtype=np.float64)
    state = layer.state_dict()
    state["running_mean"] = np.array([1.0, -1.0])
    state["num_batches_tracked"] = np.array(3)
    layer.load_state_dict(state)
    x = make_input(rng, (5, 2))
    layer(x)
    assert int(layer.num_batches_tracked) == 4
    assert_close(layer.running_mean, ref.running_update([1.0, -1.0], ref.batch_stats(x)[0], 1 / 4),
                 np.float64)
