"""Bad calls raise a Python exception that names the argument, before anything is written.

Contract (API.md, "Conventions"): every rejected call raises TypeError (wrong type or dtype) or
ValueError (wrong value or shape) with the message "<argument>: expected <what>, got <what>", and
leaves every caller array as it was: the input, weight and bias, running_mean/running_var and
num_batches_tracked, the layer's gradients. Zero-size inputs follow PyTorch, function by function,
train and eval: an empty output (and untouched running statistics) where torch gives one, a
ValueError where torch raises.
"""
import contextlib
import re

import numpy as np
import pytest

import normkit
import normkit.functional as F
from normkit import _checks

FLOATS = [np.float32, np.float64]
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object]
BAD_DTYPE_IDS = ["int32", "int64", "uint8", "bool", "complex64", "complex128", "object"]


@contextlib.contextmanager
def rejects(exc, argument):
    """The block raises `exc` with a message "<argument>: expected ..., got ..."."""
    with pytest.raises(exc) as info:
        yield info
    msg = str(info.value)
    assert msg.startswith(f"{argument}: expected "), msg
    assert ", got " in msg, msg


def snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, *arrays):
    for b, a in zip(before, arrays):
        if b is None:
            assert a is None
        else:
            assert a.shape == b.shape and a.dtype == b.dtype
            assert a.tobytes() == b.tobytes(), "a rejected call wrote into a caller array"


# --------------------------------------------------------------------------------------------
# Layers: one factory and one legal input per class.
# --------------------------------------------------------------------------------------------
LAYERS = {
    "BatchNorm1d": (lambda dt, **kw: normkit.BatchNorm1d(3, dtype=dt, **kw), (4, 3, 5)),
    "BatchNorm1d-2D": (lambda dt, **kw: normkit.BatchNorm1d(3, dtype=dt, **kw), (4, 3)),
    "BatchNorm2d": (lambda dt, **kw: normkit.BatchNorm2d(3, dtype=dt, **kw), (2, 3, 4, 5)),
    "BatchNorm3d": (lambda dt, **kw: normkit.BatchNorm3d(3, dtype=dt, **kw), (2, 3, 2, 3, 4)),
    "InstanceNorm1d": (lambda dt, **kw: normkit.InstanceNorm1d(
        3, affine=True, track_running_stats=True, dtype=dt, **kw), (2, 3, 5)),
    "InstanceNorm2d": (lambda dt, **kw: normkit.InstanceNorm2d(
        3, affine=True, track_running_stats=True, dtype=dt, **kw), (2, 3, 4, 5)),
    "InstanceNorm3d": (lambda dt, **kw: normkit.InstanceNorm3d(
        3, affine=True, track_running_stats=True, dtype=dt, **kw), (2, 3, 2, 3, 4)),
    "GroupNorm": (lambda dt, **kw: normkit.GroupNorm(2, 4, dtype=dt, **kw), (2, 4, 5)),
    "LayerNorm": (lambda dt, **kw: normkit.LayerNorm((4, 5), dtype=dt, **kw), (2, 3, 4, 5)),
    "RMSNorm": (lambda dt, **kw: normkit.RMSNorm(5, dtype=dt, **kw), (2, 3, 5)),
}

# Inputs of a wrong rank, or with the wrong channel count / trailing shape, per layer.
WRONG_RANK = {
    "BatchNorm1d": [(3,), (2, 3, 4, 5)], "BatchNorm1d-2D": [(3,), (2, 3, 4, 5)],
    "BatchNorm2d": [(2, 3, 4), (2, 3, 4, 5, 6)], "BatchNorm3d": [(2, 3, 4, 5), (2, 3, 1, 1, 1, 1)],
    "InstanceNorm1d": [(3,), (2, 3, 4, 5)], "InstanceNorm2d": [(3, 4), (2, 3, 4, 5, 6)],
    "InstanceNorm3d": [(3, 4, 5), (2, 3, 4, 5, 6, 7)], "GroupNorm": [(4,)],
    "LayerNorm": [(5,)], "RMSNorm": [()],
}
WRONG_CHANNELS = {
    "BatchNorm1d": (4, 2, 5), "BatchNorm1d-2D": (4, 5), "BatchNorm2d": (2, 4, 4, 5),
    "BatchNorm3d": (2, 1, 2, 3, 4), "InstanceNorm1d": (2, 4, 5), "InstanceNorm2d": (2, 2, 4, 5),
    "InstanceNorm3d": (2, 5, 2, 3, 4), "GroupNorm": (2, 6, 5), "LayerNorm": (2, 3, 5, 4),
    "RMSNorm": (2, 3, 4),
}


def layer_state(layer):
    """Every array a rejected call must leave alone, by name."""
    names = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    state = {n: getattr(layer, n, None) for n in names}
    state.update({f"grad_{k}": v for k, v in layer.grads.items()})
    return state


@contextlib.contextmanager
def layer_unchanged(layer):
    state = layer_state(layer)
    before = {k: None if v is None else np.array(v) for k, v in state.items()}
    saved, training = layer._saved, layer.training
    yield
    after = layer_state(layer)
    assert after.keys() == before.keys()
    for k in before:
        assert (after[k] is None) == (before[k] is None), k
        if before[k] is not None:
            assert np.asarray(after[k]).tobytes() == before[k].tobytes(), f"{k} changed in a rejected call"
    assert layer._saved is saved and layer.training == training


def trained_layer(name, dtype, rng, **kw):
    """A layer after one forward/backward in training mode: its running statistics, counter,
    parameters and gradients all differ from their initial values."""
    make, shape = LAYERS[name]
    layer = make(dtype, **kw)
    for p in layer.parameters().values():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    x = rng.standard_normal(shape).astype(dtype)
    layer(x)
    layer.backward(rng.standard_normal(shape).astype(dtype))
    return layer, x


LAYER_NAMES = pytest.mark.parametrize("name", list(LAYERS))
MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


@LAYER_NAMES
@MODES
def test_layer_rejects_a_non_array_input(name, training, rng):
    layer, x = trained_layer(name, np.float32, rng)
    layer.train(training)
    for bad in (x.tolist(), 1.5, None, np.ma.masked_array(x)):
        with layer_unchanged(layer), rejects(TypeError, "input"):
            layer(bad)


@LAYER_NAMES
@MODES
@pytest.mark.parametrize("bad_dtype", BAD_DTYPES, ids=BAD_DTYPE_IDS)
def test_layer_rejects_non_float_input(name, training, bad_dtype, rng):
    layer, x = trained_layer(name, np.float32, rng)
    layer.train(training)
    with layer_unchanged(layer), rejects(TypeError, "input"):
        layer(x.astype(bad_dtype))


@LAYER_NAMES
@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
def test_layer_rejects_the_other_float_dtype(name, dtype, rng):
    layer, x = trained_layer(name, dtype, rng)
    other = np.float64 if dtype == np.float32 else np.float32
    with layer_unchanged(layer), rejects(TypeError, "input") as info:
        layer(x.astype(other))
    assert str(np.dtype(dtype)) in str(info.value)


def test_layer_rejects_a_byte_swapped_input(rng):
    layer, x = trained_layer("BatchNorm2d", np.float32, rng)
    with layer_unchanged(layer), rejects(TypeError, "input"):
        layer(x.astype(">f4"))


@LAYER_NAMES
@MODES
def test_layer_rejects_a_wrong_rank(name, training, rng):
    layer, _ = trained_layer(name, np.float32, rng)
    layer.train(training)
    for shape in WRONG_RANK[name]:
        with layer_unchanged(layer), rejects(ValueError, "input") as info:
            layer(np.ones(shape, np.float32))
        assert str(tuple(shape)) in str(info.value)


@LAYER_NAMES
@MODES
def test_layer_rejects_a_channel_or_normalized_shape_mismatch(name, training, rng):
    layer, _ = trained_layer(name, np.float32, rng)
    layer.train(training)
    with layer_unchanged(layer), rejects(ValueError, "input"):
        layer(np.ones(WRONG_CHANNELS[name], np.float32))


@pytest.mark.parametrize("cls", [normkit.InstanceNorm1d, normkit.InstanceNorm2d])
def test_instance_norm_channel_mismatch_warns_only_without_affine_and_running_stats(cls, rng):
    # torch: num_features is unused when affine=False and track_running_stats=False.
    shape = (2, 5) + (4,) * (cls is normkit.InstanceNorm2d) + (6,)
    x = rng.standard_normal(shape).astype(np.float32)
    with pytest.warns(UserWarning):
        assert cls(3)(x).shape == shape
    for kw in (dict(affine=True), dict(track_running_stats=True)):
        layer = cls(3, **kw)
        with layer_unchanged(layer), rejects(ValueError, "input"):
            layer(x)


LAYER_ARRAYS = [(n, a) for n in ["BatchNorm1d", "BatchNorm2d", "InstanceNorm2d", "GroupNorm",
                                  "LayerNorm", "RMSNorm"]
                for a in ["weight", "bias", "running_mean", "running_var"]
                if getattr(LAYERS[n][0](np.float32), a, None) is not None]


@pytest.mark.parametrize("name,what", LAYER_ARRAYS, ids=str)
@MODES
@pytest.mark.parametrize("bad", ["length", "float64", "int", "rank", "list"])
def test_layer_rejects_replaced_parameters_and_buffers(name, what, training, bad, rng):
    layer, x = trained_layer(name, np.float32, rng)
    layer.train(training)
    cur = getattr(layer, what)
    replacement, exc = {
        "length": (np.ones(cur.size + 1, np.float32), ValueError),
        "float64": (cur.astype(np.float64), TypeError),
        "int": (cur.astype(np.int32), TypeError),
        "rank": (cur.reshape((1,) + cur.shape), ValueError),
        "list": (cur.tolist(), TypeError),
    }[bad]
    setattr(layer, what, replacement)
    with layer_unchanged(layer), rejects(exc, what):
        layer(x)


@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (1, 3)), ("BatchNorm1d", (1, 3, 1)),
                                        ("BatchNorm2d", (1, 3, 1, 1)),
                                        ("BatchNorm3d", (1, 3, 1, 1, 1))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_batch_norm_with_one_value_per_channel(name, shape, momentum, rng):
    layer, _ = trained_layer(name, np.float64, rng, momentum=momentum)
    x = np.ones(shape)
    with layer_unchanged(layer), rejects(ValueError, "input"):
        layer(x)
    # Eval normalizes with the running statistics: one value is fine (as torch).
    assert layer.eval()(x).shape == shape
    # Without running statistics even eval needs batch statistics (as torch).
    untracked = LAYERS[name][0](np.float64, track_running_stats=False).eval()
    with rejects(ValueError, "input"):
        untracked(x)


@pytest.mark.parametrize("name,shape", [("InstanceNorm1d", (2, 3, 1)), ("InstanceNorm1d", (3, 1)),
                                        ("InstanceNorm2d", (2, 3, 1, 1)),
                                        ("InstanceNorm3d", (1, 3, 1, 1, 1))])
def test_training_instance_norm_with_one_value_per_plane(name, shape, rng):
    layer, _ = trained_layer(name, np.float64, rng)
    with layer_unchanged(layer), rejects(ValueError, "input"):
        layer(np.ones(shape))
    assert layer.eval()(np.ones(shape)).shape == shape


# -- backward ---------------------------------------------------------------------------------
@LAYER_NAMES
def test_backward_before_forward(name):
    make, shape = LAYERS[name]
    layer = make(np.float32)
    with layer_unchanged(layer), rejects(ValueError, "backward"):
        layer.backward(np.ones(shape, np.float32))
    # Also a RuntimeError, like torch's autograd.
    with pytest.raises(RuntimeError):
        layer.backward(np.ones(shape, np.float32))
    # A rejected forward is no forward.
    with pytest.raises(TypeError):
        layer(np.ones(shape, np.int64))
    with rejects(ValueError, "backward"):
        layer.backward(np.ones(shape, np.float32))


@LAYER_NAMES
@pytest.mark.parametrize("dtype", FLOATS, ids=["float32", "float64"])
def test_backward_rejects_a_dy_of_another_shape_or_dtype(name, dtype, rng):
    layer, x = trained_layer(name, dtype, rng)
    dy = np.ones(x.shape, dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    bad = [(np.ones(x.shape + (1,), dtype), ValueError), (np.ones(x.size, dtype), ValueError),
           (dy[..., :-1], ValueError), (np.ones((), dtype), ValueError),
           (dy.astype(other), TypeError), (dy.astype(np.int64), TypeError),
           (dy.astype(np.complex128), TypeError), (dy.astype(bool), TypeError),
           (dy.tolist(), TypeError), (None, TypeError)]
    for value, exc in bad:
        with layer_unchanged(layer), rejects(exc, "dy"):
            layer.backward(value)
    layer.backward(dy)  # still usable


def test_backward_of_unbatched_instance_norm_wants_the_unbatched_shape(rng):
    layer = normkit.InstanceNorm1d(3)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    layer(x)
    with rejects(ValueError, "dy"):
        layer.backward(np.ones((1, 3, 7), np.float32))
    assert layer.backward(np.ones((3, 7), np.float32)).shape == (3, 7)


# -- load_state_dict --------------------------------------------------------------------------
STATE_LAYERS = pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm1d", "GroupNorm",
                                                "LayerNorm", "RMSNorm"])


def good_state(layer, rng):
    sd = layer.state_dict()
    for k, v in sd.items():
        sd[k] = np.asarray(rng.uniform(1, 2, v.shape) if k != "num_batches_tracked" else 7,
                           dtype=v.dtype)
    return sd


@STATE_LAYERS
def test_load_state_dict_round_trips(name, rng):
    layer, _ = trained_layer(name, np.float32, rng)
    sd = good_state(layer, rng)
    layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


@STATE_LAYERS
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_load_state_dict_writes_nothing_when_an_entry_is_bad(name, strict, rng):
    layer, _ = trained_layer(name, np.float32, rng)
    keys = list(layer.state_dict())
    for key in keys:
        bad_values = [
            (np.ones((2,) + layer.state_dict()[key].shape), ValueError),   # wrong shape
            (np.ones(layer.state_dict()[key].size + 1), ValueError),        # wrong length
            (np.ones(layer.state_dict()[key].shape, np.complex64), TypeError),
            (np.ones(layer.state_dict()[key].shape, bool), TypeError),
            (np.full(layer.state_dict()[key].shape, "a"), TypeError),
            (np.empty(layer.state_dict()[key].shape, object), TypeError),
            ([[1.0], [1.0, 2.0]], TypeError),                                # ragged
        ]
        for value, exc in bad_values:
            sd = good_state(layer, rng)
            sd[key] = value  # every other entry is valid and would be written first
            with layer_unchanged(layer), rejects(exc, f"state_dict[{key!r}]"):
                layer.load_state_dict(sd, strict=strict)


@STATE_LAYERS
def test_load_state_dict_is_strict_by_default(name, rng):
    layer, _ = trained_layer(name, np.float32, rng)
    keys = list(layer.state_dict())
    for k in keys:  # a missing key
        sd = good_state(layer, rng)
        del sd[k]
        for kw in ({}, {"strict": True}):
            with layer_unchanged(layer), rejects(ValueError, "state_dict") as info:
                layer.load_state_dict(sd, **kw)
            assert k in str(info.value)
            assert isinstance(info.value, KeyError)  # what earlier versions raised
    for extra in ("running_mean", "weight", "extra.weight", "num_batches_tracked"):
        if extra in keys:
            continue
        sd = good_state(layer, rng)
        sd[extra] = np.ones(3, np.float32)
        with layer_unchanged(layer), rejects(ValueError, "state_dict") as info:
            layer.load_state_dict(sd)
        assert extra in str(info.value)


@STATE_LAYERS
def test_load_state_dict_non_strict_loads_the_present_keys(name, rng):
    layer, _ = trained_layer(name, np.float32, rng)
    sd = good_state(layer, rng)
    first = next(iter(sd))
    partial = {first: sd[first], "unexpected": np.ones(2)}
    before = layer.state_dict()
    layer.load_state_dict(partial, strict=False)
    after = layer.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], sd[k] if k == first else before[k])


def test_load_state_dict_rejects_a_non_mapping(rng):
    layer, _ = trained_layer("BatchNorm2d", np.float32, rng)
    for bad in (None, [("weight", np.ones(3))], np.ones(3)):
        with layer_unchanged(layer), rejects(TypeError, "state_dict"):
            layer.load_state_dict(bad)


def test_load_state_dict_casts_numeric_dtypes_like_torch(rng):
    layer = normkit.BatchNorm2d(3, dtype=np.float32)
    sd = {"weight": np.arange(3, dtype=np.int64), "bias": np.ones(3, np.float64),
          "running_mean": np.zeros(3, np.float16), "running_var": np.full(3, 2.0),
          "num_batches_tracked": np.array([5])}  # torch accepts a 1-element counter too
    layer.load_state_dict(sd)
    assert layer.weight.dtype == np.float32 and layer.num_batches_tracked.dtype == np.int64
    np.testing.assert_array_equal(layer.weight, [0, 1, 2])
    assert int(layer.num_batches_tracked) == 5


def test_load_state_dict_from_torch(rng):
    torch = pytest.importorskip("torch")
    t = torch.nn.BatchNorm2d(3)
    t(torch.randn(4, 3, 2, 2))
    layer = normkit.BatchNorm2d(3)
    layer.load_state_dict(t.state_dict())
    np.testing.assert_array_equal(layer.running_mean, t.running_mean.numpy())
    assert int(layer.num_batches_tracked) == 1
    bad = normkit.BatchNorm2d(4)
    with layer_unchanged(bad), rejects(ValueError, "state_dict['weight']"):
        bad.load_state_dict(t.state_dict())


# -- constructors -----------------------------------------------------------------------------
BN_CLASSES = [normkit.BatchNorm1d, normkit.BatchNorm2d, normkit.BatchNorm3d,
              normkit.InstanceNorm1d, normkit.InstanceNorm2d, normkit.InstanceNorm3d]
BAD_COUNTS = [(0, ValueError), (-1, ValueError), (2.0, TypeError), ("3", TypeError),
              (True, TypeError), (None, TypeError)]
BAD_EPS = [(-1e-5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
           ("1e-5", TypeError), (None, TypeError), (True, TypeError)]
BAD_MOMENTUM = [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                ("0.1", TypeError), (True, TypeError)]
BAD_DTYPE_ARGS = [np.int32, np.int64, np.bool_, np.complex64, object, "not-a-dtype", str]


@pytest.mark.parametrize("cls", BN_CLASSES, ids=lambda c: c.__name__)
def test_batch_and_instance_norm_constructor_arguments(cls):
    for bad, exc in BAD_COUNTS:
        with rejects(exc, "num_features"):
            cls(bad)
    for bad, exc in BAD_EPS:
        with rejects(exc, "eps"):
            cls(3, eps=bad)
    for bad, exc in BAD_MOMENTUM:
        with rejects(exc, "momentum"):
            cls(3, momentum=bad)
    for bad in BAD_DTYPE_ARGS:
        with rejects(TypeError, "dtype"):
            cls(3, dtype=bad)
    # Accepted edges: torch's eps=0, momentum 0, 1 and None, numpy integers, dtype=None.
    for kw in (dict(eps=0.0), dict(momentum=0), dict(momentum=1.0), dict(momentum=None),
               dict(eps=np.float32(1e-3)), dict(dtype=None)):
        cls(np.int64(3), **kw)
    assert cls(3, dtype=None).dtype == np.float32


def test_group_norm_constructor_arguments():
    with rejects(ValueError, "num_groups") as info:
        normkit.GroupNorm(4, 6)
    assert "6" in str(info.value)
    for bad, exc in BAD_COUNTS:
        with rejects(exc, "num_groups"):
            normkit.GroupNorm(bad, 6)
        with rejects(exc, "num_channels"):
            normkit.GroupNorm(2, bad)
    for bad, exc in BAD_EPS:
        with rejects(exc, "eps"):
            normkit.GroupNorm(2, 6, eps=bad)
    for bad in BAD_DTYPE_ARGS:
        with rejects(TypeError, "dtype"):
            normkit.GroupNorm(2, 6, dtype=bad)


@pytest.mark.parametrize("cls", [normkit.LayerNorm, normkit.RMSNorm])
def test_layer_and_rms_norm_constructor_arguments(cls):
    for bad, exc in [((), ValueError), (-1, ValueError), ((3, -1), ValueError), (2.0, TypeError),
                     ((2.5,), TypeError), ("4", TypeError), (None, TypeError), (True, TypeError),
                     ((True, 3), TypeError)]:
        with rejects(exc, "normalized_shape"):
            cls(bad)
    for bad, exc in BAD_EPS:
        if bad is None and cls is normkit.RMSNorm:
            continue  # RMSNorm's default: the dtype's machine epsilon
        with rejects(exc, "eps"):
            cls(4, eps=bad)
    for bad in BAD_DTYPE_ARGS:
        with rejects(TypeError, "dtype"):
            cls(4, dtype=bad)
    assert cls([np.int64(2), 3]).normalized_shape == (2, 3)
    assert cls(0).normalized_shape == (0,)  # torch allows an empty normalized_shape entry


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
class Call:
    """One functional call with valid arguments (caller arrays kept for the unchanged check)."""

    def __init__(self, fn, shape=(4, 3, 5), dtype=np.float32, rng=None, **overrides):
        rng = rng or np.random.default_rng(0)
        C = shape[1]
        self.fn = fn
        x = rng.standard_normal(shape).astype(dtype)
        w = rng.uniform(0.5, 1.5, C).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        rm = rng.standard_normal(C).astype(dtype)
        rv = rng.uniform(0.5, 2, C).astype(dtype)
        if fn == "batch_norm":
            self.kw = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b,
                           training=True, momentum=0.1, eps=1e-5)
        elif fn == "instance_norm":
            self.kw = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b,
                           use_input_stats=True, momentum=0.1, eps=1e-5)
        elif fn == "group_norm":
            x = rng.standard_normal((4, 6, 5)).astype(dtype)
            w = rng.uniform(0.5, 1.5, 6).astype(dtype)
            b = rng.standard_normal(6).astype(dtype)
            self.kw = dict(input=x, num_groups=3, weight=w, bias=b, eps=1e-5)
        elif fn == "layer_norm":
            w = rng.uniform(0.5, 1.5, shape[1:]).astype(dtype)
            b = rng.standard_normal(shape[1:]).astype(dtype)
            self.kw = dict(input=x, normalized_shape=shape[1:], weight=w, bias=b, eps=1e-5)
        elif fn == "rms_norm":
            w = rng.uniform(0.5, 1.5, shape[1:]).astype(dtype)
            self.kw = dict(input=x, normalized_shape=shape[1:], weight=w, eps=None)
        self.kw.update(overrides)

    def arrays(self):
        return [v for v in self.kw.values() if isinstance(v, np.ndarray)]

    def __call__(self, **overrides):
        kw = dict(self.kw, **overrides)
        return getattr(F, self.fn)(**kw)

    @contextlib.contextmanager
    def unchanged(self, **overrides):
        arrays = [v for v in dict(self.kw, **overrides).values() if isinstance(v, np.ndarray)]
        before = snapshot(*arrays)
        yield
        assert_unchanged(before, *arrays)


FUNCTIONS = ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]
FUNCS = pytest.mark.parametrize("fn", FUNCTIONS)
STATS_FUNCS = pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
TRAIN_FLAG = {"batch_norm": "training", "instance_norm": "use_input_stats"}


def reject(call, exc, argument, **overrides):
    with call.unchanged(**overrides), rejects(exc, argument):
        call(**overrides)


@FUNCS
def test_functional_accepts_the_valid_call(fn):
    call = Call(fn)
    y = call()
    assert y.shape == call.kw["input"].shape and y.dtype == call.kw["input"].dtype


@FUNCS
def test_functional_rejects_a_non_array_or_non_float_input(fn):
    call = Call(fn)
    x = call.kw["input"]
    for bad in (x.tolist(), 3.0, None, np.ma.masked_array(x)):
        reject(call, TypeError, "input", input=bad)
    for dt in BAD_DTYPES + [">f4"]:
        reject(call, TypeError, "input", input=x.astype(dt))


@FUNCS
def test_functional_rejects_a_wrong_rank(fn):
    call = Call(fn)
    x = call.kw["input"]
    reject(call, ValueError, "input", input=x[0, 0])  # 1-D
    reject(call, ValueError, "input", input=np.ones((), x.dtype))


FUNC_ARRAYS = [(fn, p) for fn in FUNCTIONS for p in ["weight", "bias", "running_mean", "running_var"]
               if p in Call(fn).kw]


@pytest.mark.parametrize("fn,param", FUNC_ARRAYS, ids=str)
def test_functional_rejects_bad_parameters_and_running_statistics(fn, param):
    call = Call(fn)
    p = call.kw[param]
    other = np.float64 if p.dtype == np.float32 else np.float32
    bad = [(np.ones(p.size + 1, p.dtype), ValueError),     # wrong length (channel mismatch)
           (np.ones(p.shape + (1,), p.dtype), ValueError),  # wrong rank
           (p[:-1], ValueError),
           (p.astype(other), TypeError),                    # mixed dtypes
           (p.tolist(), TypeError)]
    bad += [(p.astype(dt), TypeError) for dt in BAD_DTYPES]
    for value, exc in bad:
        reject(call, exc, param, **{param: value})
    # The input's dtype decides: a float64 call with float32 parameters is mixed as well.
    call64 = Call(fn, dtype=np.float64)
    reject(call64, TypeError, param, **{param: call64.kw[param].astype(np.float32)})


@STATS_FUNCS
def test_functional_running_statistics_rules(fn):
    call = Call(fn)
    flag = TRAIN_FLAG[fn]
    for name in ("running_mean", "running_var"):
        ro = call.kw[name].copy()
        ro.flags.writeable = False
        reject(call, ValueError, name, **{name: ro})  # updated in place when training
        call(**{name: ro, flag: False})                # read-only is fine for eval
        reject(call, ValueError, name, **{name: None, flag: False})
    rm = call.kw["running_mean"]
    reject(call, ValueError, "running_var", running_var=rm)  # the same buffer updated twice
    buf = np.ones(6, rm.dtype)
    reject(call, ValueError, "running_var", running_mean=buf[:3], running_var=buf[2:5])
    call(running_var=rm.copy(), running_mean=rm.copy())
    buf = np.ones(6, rm.dtype)
    call(running_mean=buf[::2], running_var=buf[1::2])  # interleaved, not overlapping
    assert call(running_var=rm, **{flag: False}).shape == call.kw["input"].shape  # eval only reads


@FUNCS
def test_functional_rejects_bad_eps(fn):
    call = Call(fn)
    for bad, exc in BAD_EPS:
        if bad is None and fn == "rms_norm":
            continue
        reject(call, exc, "eps", eps=bad)
    call(eps=0.0)


@STATS_FUNCS
def test_functional_rejects_bad_momentum(fn):
    call = Call(fn)
    for bad, exc in BAD_MOMENTUM + [(None, TypeError)]:
        reject(call, exc, "momentum", momentum=bad)
    call(momentum=0.0)
    call(momentum=1.0)


def test_functional_training_batch_norm_with_one_value_per_channel():
    for shape in [(1, 3), (1, 3, 1), (1, 3, 1, 1)]:
        call = Call("batch_norm", shape=shape)
        reject(call, ValueError, "input")
        assert call(training=False).shape == shape


def test_functional_instance_norm_with_one_value_per_plane():
    for shape in [(4, 3), (4, 3, 1), (1, 3, 1, 1)]:
        call = Call("instance_norm", shape=shape)
        reject(call, ValueError, "input")
        assert call(use_input_stats=False).shape == shape


def test_functional_group_norm_num_groups():
    call = Call("group_norm")
    for bad in (4, 5, 7, 12):
        reject(call, ValueError, "num_groups", num_groups=bad)
    for bad, exc in BAD_COUNTS:
        reject(call, exc, "num_groups", num_groups=bad)
    for good in (1, 2, 3, 6, np.int32(2)):
        call(num_groups=good)
    reject(call, ValueError, "input", input=np.ones(6, np.float32))


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_functional_normalized_shape(fn):
    call = Call(fn, shape=(4, 3, 5))
    x = call.kw["input"]
    for ns in [(3, 4), (4,), (4, 3, 5, 1), (2, 4, 3, 5)]:
        w = np.ones(ns, np.float32)
        kw = dict(normalized_shape=ns, weight=w) | ({"bias": w.copy()} if fn == "layer_norm" else {})
        reject(call, ValueError, "input", **kw)
    for bad, exc in [((), ValueError), ((-5,), ValueError), ((5.0,), TypeError), ("5", TypeError),
                     (None, TypeError)]:
        reject(call, exc, "normalized_shape", normalized_shape=bad)
    # weight must have exactly normalized_shape
    reject(call, ValueError, "weight", weight=np.ones(15, np.float32))
    assert call(normalized_shape=5, weight=np.ones(5, np.float32),
                **({"bias": np.zeros(5, np.float32)} if fn == "layer_norm" else {})).shape == x.shape


def test_layer_norm_eps_none_is_rejected_but_rms_norm_takes_it():
    with rejects(TypeError, "eps"):
        F.layer_norm(np.ones((2, 3), np.float32), (3,), eps=None)
    F.rms_norm(np.ones((2, 3), np.float32), (3,), eps=None)


# --------------------------------------------------------------------------------------------
# Zero-size dimensions: as torch, function by function, train and eval.
# --------------------------------------------------------------------------------------------
def nan_equal(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


BN_EMPTY = [(0, 3), (0, 3, 4), (2, 3, 0), (0, 3, 0), (0, 3, 2, 2), (2, 3, 0, 2), (2, 0), (0, 0),
            (2, 0, 3)]


STATS_MODES = pytest.mark.parametrize("training,stats", [(True, True), (True, False), (False, True)],
                                      ids=["train", "train-no_stats", "eval"])


@pytest.mark.parametrize("shape", BN_EMPTY, ids=str)
@STATS_MODES
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_batch_norm_on_empty_input_follows_torch(shape, training, stats, affine):
    C = shape[1]
    x = np.ones(shape, np.float32)
    rm = np.arange(C, dtype=np.float32) if stats else None
    rv = np.arange(1, C + 1, dtype=np.float32) if stats else None
    w = np.full(C, 2, np.float32) if affine else None
    b = np.full(C, 3, np.float32) if affine else None
    before = snapshot(rm, rv)
    if C == 0 and affine:  # torch raises (an affine over no channels)
        with rejects(ValueError, "weight"):
            F.batch_norm(x, rm, rv, w, b, training=training)
    else:
        y = F.batch_norm(x, rm, rv, w, b, training=training)
        assert y.shape == shape and y.dtype == np.float32
    assert_unchanged(before, rm, rv)  # an empty batch moves no statistics, as torch

    torch = pytest.importorskip("torch")
    T = (lambda a: None if a is None else torch.from_numpy(a))
    trm, trv = T(snapshot(rm)[0]), T(snapshot(rv)[0])
    try:
        torch.nn.functional.batch_norm(T(x), trm, trv, T(w), T(b), training=training)
        raised = False
    except (IndexError, RuntimeError, ValueError):
        raised = True
    assert raised == (C == 0 and affine)
    if stats:
        assert nan_equal(trm.numpy(), rm) and nan_equal(trv.numpy(), rv)


IN_EMPTY = [(0, 3, 4), (2, 3, 0), (0, 3, 0), (2, 0, 4), (0, 0, 4), (0, 3, 2, 2), (2, 3, 0, 2)]


@pytest.mark.parametrize("shape", IN_EMPTY, ids=str)
@STATS_MODES
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_instance_norm_on_empty_input_follows_torch(shape, training, stats, affine):
    use_input_stats = training
    N, C = shape[:2]
    x = np.ones(shape, np.float64)
    rm = np.arange(C, dtype=np.float64) if stats else None
    rv = np.arange(1, C + 1, dtype=np.float64) if stats else None
    w = np.full(C, 2.0) if affine else None
    b = np.full(C, 3.0) if affine else None
    before = snapshot(rm, rv)
    raises = affine and N * C == 0  # torch: an affine over no (sample, channel) planes
    if raises:
        with rejects(ValueError, "weight"):
            F.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats)
        assert_unchanged(before, rm, rv)
    else:
        y = F.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats)
        assert y.shape == shape
        if stats and use_input_stats and N == 0 and C > 0:
            # torch: the running statistics become the mean over no samples.
            assert np.isnan(rm).all() and np.isnan(rv).all()
        else:
            assert_unchanged(before, rm, rv)

    torch = pytest.importorskip("torch")
    T = (lambda a: None if a is None else torch.from_numpy(a))
    trm, trv = T(before[0]), T(before[1])
    try:
        torch.nn.functional.instance_norm(T(x), trm, trv, T(w), T(b),
                                          use_input_stats=use_input_stats)
        raised = False
    except (IndexError, RuntimeError, ValueError):
        raised = True
    assert raised == raises
    if stats:
        assert nan_equal(trm.numpy(), rm) and nan_equal(trv.numpy(), rv)


@pytest.mark.parametrize("shape,groups", [((0, 4, 3), 2), ((2, 4, 0), 2), ((0, 4), 4),
                                          ((2, 0, 3), 2), ((0, 0), 1), ((2, 0), 3)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_group_norm_on_empty_input_follows_torch(shape, groups, affine):
    C = shape[1]
    x = np.ones(shape, np.float32)
    w = np.ones(C, np.float32) if affine else None
    b = np.zeros(C, np.float32) if affine else None
    assert F.group_norm(x, groups, w, b).shape == shape
    torch = pytest.importorskip("torch")
    T = (lambda a: None if a is None else torch.from_numpy(a))
    assert tuple(torch.nn.functional.group_norm(T(x), groups, T(w), T(b)).shape) == shape


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape,ns", [((0, 4), (4,)), ((2, 0), (0,)), ((2, 3, 0), (3, 0)),
                                      ((0, 3, 4), (3, 4)), ((0,), (0,)), ((0, 0), (0,))], ids=str)
def test_row_norms_on_empty_input_follow_torch(fn, shape, ns):
    x = np.ones(shape, np.float32)
    w = np.ones(ns, np.float32)
    args = (w, np.zeros(ns, np.float32)) if fn == "layer_norm" else (w,)
    assert getattr(F, fn)(x, ns, *args).shape == shape
    assert getattr(F, fn)(x, ns).shape == shape
    torch = pytest.importorskip("torch")
    targs = [torch.from_numpy(a) for a in args]
    assert tuple(getattr(torch.nn.functional, fn)(torch.from_numpy(x), ns, *targs).shape) == shape


EMPTY_LAYER_INPUTS = {
    "BatchNorm1d": [(0, 3), (0, 3, 5), (2, 3, 0)], "BatchNorm2d": [(0, 3, 4, 5), (2, 3, 0, 5)],
    "BatchNorm3d": [(0, 3, 2, 3, 4), (2, 3, 2, 0, 4)],
    "InstanceNorm1d": [(2, 3, 0), (3, 0)], "InstanceNorm2d": [(2, 3, 0, 5), (3, 4, 0)],
    "GroupNorm": [(0, 4, 5), (2, 4, 0), (0, 4)], "LayerNorm": [(0, 3, 4, 5), (0, 4, 5)],
    "RMSNorm": [(0, 5), (2, 0, 5)],
}
TORCH_LAYERS = {
    "BatchNorm1d": lambda t: t.nn.BatchNorm1d(3), "BatchNorm2d": lambda t: t.nn.BatchNorm2d(3),
    "BatchNorm3d": lambda t: t.nn.BatchNorm3d(3),
    "InstanceNorm1d": lambda t: t.nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
    "InstanceNorm2d": lambda t: t.nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
    "GroupNorm": lambda t: t.nn.GroupNorm(2, 4), "LayerNorm": lambda t: t.nn.LayerNorm((4, 5)),
    "RMSNorm": lambda t: t.nn.RMSNorm(5),
}


@pytest.mark.parametrize("name,shape", [(n, s) for n, ss in EMPTY_LAYER_INPUTS.items() for s in ss],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layers_on_empty_input_follow_torch(name, shape, training, rng):
    layer, _ = trained_layer(name, np.float32, rng)
    layer.train(training)
    state = {k: np.array(v) for k, v in layer_state(layer).items()
             if not k.startswith("grad_") and v is not None}
    y = layer(np.ones(shape, np.float32))
    assert y.shape == shape and y.dtype == np.float32
    dx = layer.backward(np.ones(shape, np.float32))
    assert dx.shape == shape and dx.dtype == np.float32
    for k, g in layer.grads.items():  # sums over no elements
        assert g.shape == getattr(layer, k).shape and not g.any()
    counts = training and "Batch" in name  # torch's BatchNorm counts the empty batch
    for k, v in state.items():
        if k == "num_batches_tracked":
            assert int(layer.num_batches_tracked) == int(v) + counts
        else:
            assert getattr(layer, k).tobytes() == v.tobytes(), f"{k} changed"

    torch = pytest.importorskip("torch")
    t = TORCH_LAYERS[name](torch).train(training)
    ours = LAYERS[name][0](np.float32).train(training)
    xt = torch.ones(shape, requires_grad=True)
    yt = t(xt)
    yt.backward(torch.ones_like(yt))
    assert tuple(yt.shape) == shape and tuple(xt.grad.shape) == shape
    ours(np.ones(shape, np.float32))
    for k, v in t.state_dict().items():
        assert nan_equal(v.numpy(), ours.state_dict()[k]), k


@pytest.mark.parametrize("empty", [(0, 3), (2, 3, 0)], ids=str)
def test_an_empty_batch_counts_for_the_cumulative_average_as_in_torch(empty, rng):
    torch = pytest.importorskip("torch")
    layer = normkit.BatchNorm1d(3, momentum=None, dtype=np.float64)
    t = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    x = rng.standard_normal((5, 3))
    for batch in (x, np.ones(empty), 2 * x + 1):
        layer(batch)
        t(torch.from_numpy(batch))
    assert int(layer.num_batches_tracked) == int(t.num_batches_tracked) == 3
    np.testing.assert_allclose(layer.running_mean, t.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, t.running_var.numpy(), rtol=1e-12)


def test_instance_norm_layer_on_an_empty_batch_follows_torch(rng):
    # affine: torch raises; without affine, running statistics become NaN in training as torch's.
    layer, _ = trained_layer("InstanceNorm1d", np.float32, rng)
    with layer_unchanged(layer), rejects(ValueError, "weight"):
        layer(np.ones((0, 3, 5), np.float32))
    plain = normkit.InstanceNorm1d(3, track_running_stats=True)
    assert plain(np.ones((0, 3, 5), np.float32)).shape == (0, 3, 5)
    assert np.isnan(plain.running_mean).all() and np.isnan(plain.running_var).all()
    plain = normkit.InstanceNorm1d(3, track_running_stats=True).eval()
    assert plain(np.ones((0, 3, 5), np.float32)).shape == (0, 3, 5)
    assert not np.isnan(plain.running_mean).any()

    torch = pytest.importorskip("torch")
    with pytest.raises(IndexError):
        torch.nn.InstanceNorm1d(3, affine=True)(torch.ones(0, 3, 5))
    t = torch.nn.InstanceNorm1d(3, track_running_stats=True)
    t(torch.ones(0, 3, 5))
    assert torch.isnan(t.running_mean).all() and torch.isnan(t.running_var).all()


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
def test_every_check_names_its_argument_in_the_common_form():
    cases = [
        lambda: _checks.input_array([1.0]),
        lambda: _checks.input_array(np.ones(3, np.int8)),
        lambda: _checks.param_array(np.ones(2), "weight", (3,), np.float64),
        lambda: _checks.stats_array(np.ones(3), "running_mean", 3, True, np.float32),
        lambda: _checks.nonneg_float(-1, "eps"),
        lambda: _checks.momentum_value(2),
        lambda: _checks.positive_int(0, "num_features"),
        lambda: _checks.float_dtype_arg("int8"),
        lambda: _checks.normalized_shape_tuple(()),
        lambda: _checks.grad_output(np.ones(2), (3,), np.float64),
        lambda: _checks.more_than_one_value(1, shape=(1, 3)),
    ]
    for case in cases:
        with pytest.raises((TypeError, ValueError)) as info:
            case()
        assert re.match(r"^[\w\[\]'.]+: expected .+, got .+", str(info.value)), str(info.value)
