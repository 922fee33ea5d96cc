"""The one-call forward and backward (_core.forward_fast, _core.backward_fast) against the Python
paths they stand in for.

Every layer and functional call first offers its arguments to forward_fast, and every layer's
backward to backward_fast; each either does the whole call (the common case: plain contiguous
arrays) or returns None and the Python path runs. The two paths must be indistinguishable:
bitwise the same outputs, running statistics, counters and gradients. An ndarray subclass view of
the same data forces the Python path.
"""
import ml_dtypes
import numpy as np
import pytest

import normkit
import normkit.functional as F
from normkit import _core

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


class Slow(np.ndarray):
    """A do-nothing subclass: forward_fast refuses it, so the call takes the Python path."""


def slow(a):
    return a.view(Slow)


def spy_on(monkeypatch, name):
    """Replaces _core.<name> with a wrapper recording, per call, whether it returned a result."""
    taken = []
    real = getattr(_core, name)

    def spy(*args):
        result = real(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(_core, name, spy)
    return taken


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls that forward_fast took (returned a result for)."""
    return spy_on(monkeypatch, "forward_fast")


@pytest.fixture
def fast_backward_calls(monkeypatch):
    """Counts the backward calls that backward_fast took."""
    return spy_on(monkeypatch, "backward_fast")


def data(shape, dtype, seed, offset=0.5):
    x = np.random.default_rng(seed).standard_normal(shape) * 1.5 + offset
    return x.astype(dtype)


def param_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# (name, factory(dtype), input shape): every layer, in each layout and affine/statistics flavour
LAYERS = [
    ("BatchNorm1d", lambda d: normkit.BatchNorm1d(5, dtype=d), (4, 5)),
    ("BatchNorm1d-L", lambda d: normkit.BatchNorm1d(5, momentum=None, dtype=d), (3, 5, 7)),
    ("BatchNorm2d", lambda d: normkit.BatchNorm2d(6, dtype=d), (3, 6, 5, 4)),
    ("BatchNorm2d-nhwc", lambda d: normkit.BatchNorm2d(6, dtype=d, layout="NHWC"), (3, 5, 4, 6)),
    ("BatchNorm2d-noaffine", lambda d: normkit.BatchNorm2d(6, affine=False, dtype=d), (2, 6, 3, 3)),
    ("BatchNorm2d-notrack", lambda d: normkit.BatchNorm2d(6, track_running_stats=False, dtype=d),
     (2, 6, 3, 3)),
    ("BatchNorm3d", lambda d: normkit.BatchNorm3d(3, dtype=d), (2, 3, 2, 3, 4)),
    ("InstanceNorm1d", lambda d: normkit.InstanceNorm1d(4, affine=True, dtype=d), (3, 4, 9)),
    ("InstanceNorm2d", lambda d: normkit.InstanceNorm2d(4, dtype=d), (2, 4, 5, 3)),
    ("InstanceNorm2d-track", lambda d: normkit.InstanceNorm2d(4, affine=True, track_running_stats=True,
                                                              dtype=d), (2, 4, 5, 3)),
    ("InstanceNorm2d-nhwc", lambda d: normkit.InstanceNorm2d(4, affine=True, dtype=d, layout="NHWC"),
     (2, 5, 3, 4)),
    ("InstanceNorm3d", lambda d: normkit.InstanceNorm3d(2, affine=True, dtype=d), (2, 2, 3, 2, 5)),
    ("GroupNorm", lambda d: normkit.GroupNorm(3, 6, dtype=d), (4, 6, 5, 2)),
    ("GroupNorm-nhwc", lambda d: normkit.GroupNorm(2, 6, dtype=d, layout="NHWC"), (3, 4, 4, 6)),
    ("GroupNorm-noaffine", lambda d: normkit.GroupNorm(2, 4, affine=False, dtype=d), (3, 4, 7)),
    ("LayerNorm", lambda d: normkit.LayerNorm(10, dtype=d), (6, 10)),
    ("LayerNorm-2d", lambda d: normkit.LayerNorm((3, 5), dtype=d), (2, 4, 3, 5)),
    ("LayerNorm-nobias", lambda d: normkit.LayerNorm(8, bias=False, dtype=d), (5, 8)),
    ("RMSNorm", lambda d: normkit.RMSNorm(12, dtype=d), (4, 12)),
    ("RMSNorm-eps", lambda d: normkit.RMSNorm((2, 6), eps=1e-3, elementwise_affine=False, dtype=d),
     (3, 2, 6)),
]


def randomize_parameters(layer, seed):
    rng = np.random.default_rng(seed)
    for name, p in layer.parameters().items():
        p[...] = rng.uniform(0.5, 1.5, p.shape) if name == "weight" else rng.uniform(-0.5, 0.5, p.shape)


def bitwise_equal(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), what


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_layer_fast_and_python_paths_agree_bitwise(name, make, shape, dtype, fast_calls,
                                                   fast_backward_calls):
    pdt = param_dtype(dtype)
    fast, ref = make(pdt), make(pdt)
    randomize_parameters(fast, 1)
    randomize_parameters(ref, 1)
    for step, training in enumerate([True, True, False, True, False]):
        fast.train(training)
        ref.train(training)
        x = data(shape, dtype, seed=10 + step)
        dy = data(shape, dtype, seed=20 + step, offset=0.0)
        fast_calls.clear()
        y_fast = fast(x)
        # InstanceNorm's running statistics (averages of per-instance ones) stay in Python.
        expect_fast = not (training and name == "InstanceNorm2d-track")
        assert fast_calls == [expect_fast], "the plain call should take forward_fast"
        fast_calls.clear()
        y_ref = ref(slow(x))
        assert True not in fast_calls, "a subclass input must take the Python path"
        bitwise_equal(y_fast, np.asarray(y_ref), f"{name} y, step {step}")
        for key, value in ref.state_dict().items():
            bitwise_equal(fast.state_dict()[key], value, f"{name} {key}, step {step}")
        fast_backward_calls.clear()
        dx_fast = fast.backward(dy)
        # (The Python forward path of InstanceNorm2d-track records the output's shape in its
        # Saved, which backward_fast leaves to the Python path.)
        assert fast_backward_calls == [expect_fast], "a plain dy should take backward_fast"
        fast_backward_calls.clear()
        dx_ref = ref.backward(dy)  # its Saved holds the subclass x: the Python path
        assert fast_backward_calls == [False]
        bitwise_equal(dx_fast, dx_ref, f"{name} dx, step {step}")
        assert fast.grads.keys() == ref.grads.keys()
        for key in ref.grads:
            bitwise_equal(fast.grads[key], ref.grads[key], f"{name} d{key}, step {step}")


def functional_cases(dtype):
    """(name, call(x-wrapper) -> y, input shape) for each functional with the common arguments."""
    pdt = param_dtype(dtype)
    rng = np.random.default_rng(5)
    w6, b6 = rng.uniform(0.5, 1.5, 6).astype(pdt), rng.uniform(-1, 1, 6).astype(pdt)
    rm, rv = rng.standard_normal(6).astype(pdt), rng.uniform(0.5, 2, 6).astype(pdt)
    wr, br = rng.uniform(0.5, 1.5, (3, 4)).astype(pdt), rng.uniform(-1, 1, (3, 4)).astype(pdt)
    return [
        ("batch_norm-train", lambda x, s: F.batch_norm(x, s["rm"], s["rv"], w6, b6, True, 0.3, 1e-3),
         (4, 6, 3, 2)),
        ("batch_norm-eval", lambda x, s: F.batch_norm(x, s["rm"], s["rv"], w6, b6), (4, 6, 3, 2)),
        ("batch_norm-nhwc", lambda x, s: F.batch_norm(x, None, None, w6, None, True, layout="NHWC"),
         (3, 2, 2, 6)),
        ("instance_norm", lambda x, s: F.instance_norm(x, None, None, w6, b6), (2, 6, 7)),
        ("instance_norm-eval", lambda x, s: F.instance_norm(x, s["rm"], s["rv"], use_input_stats=False),
         (2, 6, 7)),
        ("group_norm", lambda x, s: F.group_norm(x, 3, w6, b6, eps=1e-4), (2, 6, 5)),
        ("group_norm-nhwc", lambda x, s: F.group_norm(x, 2, None, b6, layout="NHWC"), (2, 5, 6)),
        ("layer_norm", lambda x, s: F.layer_norm(x, (3, 4), wr, br), (5, 3, 4)),
        ("layer_norm-int", lambda x, s: F.layer_norm(x, 4, None, None), (5, 3, 4)),
        ("rms_norm", lambda x, s: F.rms_norm(x, (3, 4), wr), (2, 3, 4)),
        ("rms_norm-eps", lambda x, s: F.rms_norm(x, 4, None, 1e-2), (2, 3, 4)),
    ], {"rm": rm, "rv": rv}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_functional_fast_and_python_paths_agree_bitwise(dtype, fast_calls):
    cases, stats = functional_cases(dtype)
    for name, call, shape in cases:
        x = data(shape, dtype, seed=len(name))
        s_fast = {k: v.copy() for k, v in stats.items()}
        s_ref = {k: v.copy() for k, v in stats.items()}
        fast_calls.clear()
        y_fast = call(x, s_fast)
        assert fast_calls == [True], f"{name}: the plain call should take forward_fast"
        y_ref = call(slow(x), s_ref)
        bitwise_equal(y_fast, np.asarray(y_ref), f"{name} y")
        for key in stats:
            bitwise_equal(s_fast[key], s_ref[key], f"{name} {key}")


X = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)


def raw_args(**over):
    """forward_fast's arguments for a BatchNorm2d call on X (2, 4, 3, 3), with overrides."""
    args = dict(kind=_core.FAST_BATCH, x=X, channels=4, groups=0, normalized_shape=None,
                ndims_mask=1 << 4, channels_last=False, weight=np.ones(4, np.float32),
                bias=np.zeros(4, np.float32), running_mean=np.zeros(4, np.float32),
                running_var=np.ones(4, np.float32), batch_stats=True, momentum=0.1, eps=1e-5,
                param_bits=32)
    args.update(over)
    return args


def readonly(a):
    a.flags.writeable = False
    return a


RM = np.zeros(4, np.float32)
REFUSED = {
    "a subclass": dict(x=X.view(Slow)),
    "a strided input": dict(x=np.repeat(X, 2, axis=3)[..., ::2]),
    "a big-endian input": dict(x=X.astype(">f4")),
    "an int input": dict(x=X.astype(np.int32)),
    "a list": dict(x=X.tolist()),
    "an empty input": dict(x=X[:0]),
    "a wrong rank": dict(ndims_mask=1 << 3),
    "wrong channels": dict(channels=5),
    "a float64 layer": dict(param_bits=64),
    "a float64 weight": dict(weight=np.ones(4)),
    "a (4, 1) weight": dict(weight=np.ones((4, 1), np.float32)),
    "a strided bias": dict(bias=np.zeros(8, np.float32)[::2]),
    "a read-only running_mean in training": dict(running_mean=readonly(np.zeros(4, np.float32))),
    "running_mean sharing running_var's memory": dict(running_mean=RM, running_var=RM),
    "eval without running_var": dict(batch_stats=False, running_var=None),
    "a bool eps": dict(eps=True),
    "a NumPy-scalar eps": dict(eps=np.float64(1e-5)),
    "a negative eps": dict(eps=-1.0),
    "a NaN eps": dict(eps=float("nan")),
    "momentum above 1": dict(momentum=1.5),
    "momentum None": dict(momentum=None),
    "one value per channel in training": dict(x=X[:1, :, :1, :1].copy()),
    "an unknown kind": dict(kind=7),
    "groups not dividing the channels": dict(kind=_core.FAST_GROUP, groups=3, running_mean=None,
                                              running_var=None),
    "a float group count": dict(kind=_core.FAST_GROUP, groups=2.0, running_mean=None, running_var=None),
    "running statistics for GroupNorm": dict(kind=_core.FAST_GROUP, groups=2),
    "a normalized_shape list": dict(kind=_core.FAST_LAYER, normalized_shape=[3, 3], ndims_mask=-1 % 2**64,
                                     weight=None, bias=None, running_mean=None, running_var=None),
    "a normalized_shape not ending x": dict(kind=_core.FAST_LAYER, normalized_shape=(3, 4),
                                            ndims_mask=-1 % 2**64, weight=None, bias=None,
                                            running_mean=None, running_var=None),
    "an instance norm updating running statistics": dict(kind=_core.FAST_INSTANCE),
}


@pytest.mark.parametrize("what", REFUSED)
def test_forward_fast_refuses_anything_but_the_common_case(what):
    args = raw_args(**REFUSED[what])
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    assert _core.forward_fast(**args) is None
    for k, v in before.items():  # and wrote nothing
        bitwise_equal(args[k], v, k)


def test_forward_fast_takes_the_common_case():
    """The refusal cases above differ from this accepted call in one argument each."""
    y, saved = _core.forward_fast(**raw_args())
    assert y.shape == X.shape and y.dtype == X.dtype
    assert saved.x is X and saved.shape == X.shape and saved.batch_stats
    assert saved.mean.shape == saved.rstd.shape == (4,)


def test_saved_statistics_are_a_read_only_snapshot():
    """Saved keeps its statistics itself: views that outlive nothing and cannot be written."""
    layer = normkit.BatchNorm2d(3, dtype=np.float64).eval()
    layer.running_mean[:] = [1.0, 2.0, 3.0]
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    layer(x)
    saved = layer._saved
    layer.running_mean[:] = 0.0  # the caller's buffer moves on; the forward's statistics do not
    np.testing.assert_array_equal(saved.mean, [1.0, 2.0, 3.0])
    mean = saved.mean
    with pytest.raises(ValueError, match="read-only"):
        mean[0] = 5.0
    del saved, layer
    np.testing.assert_array_equal(mean, [1.0, 2.0, 3.0])  # the view keeps its Saved alive


def test_saved_checks_its_statistics_against_the_plan():
    plan = _core.plan_per_channel(2, 3, 4)
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="mean: expected 3 float64 values"):
        _core.Saved(plan, x, np.zeros(2), np.ones(3), None, True, None)
    empty = _core.Saved(plan, x, None, None, None, True, None)
    assert empty.mean is None and empty.rstd is None
    with pytest.raises(ValueError, match="no statistics"):
        _core.backward(empty, x, np.empty_like(x), None, None)


@pytest.mark.parametrize("what", ["strided dy", "dy of another dtype", "dy of another shape",
                                  "dy a subclass", "dy a list", "an unbatched forward"])
def test_backward_fast_refuses_anything_but_the_common_case(what):
    layer = normkit.InstanceNorm2d(3, affine=True) if what == "an unbatched forward" else normkit.GroupNorm(2, 4)
    x = data((3, 5, 4) if what == "an unbatched forward" else (2, 4, 3, 5), np.float32, seed=1)
    layer(x)
    ones = np.ones_like(x)
    dy = {"strided dy": lambda: np.ones(x.shape[:-1] + (2 * x.shape[-1],), np.float32)[..., ::2],
          "dy of another dtype": lambda: ones.astype(np.float64),
          "dy of another shape": lambda: ones.reshape(2, 4, 15),
          "dy a subclass": lambda: slow(ones), "dy a list": ones.tolist}.get(what, lambda: ones)()
    assert _core.backward_fast(layer._saved, dy, True, True) is None


def test_backward_fast_errors_still_come_from_the_python_path():
    layer = normkit.GroupNorm(2, 4)
    layer(data((2, 4, 3, 5), np.float32, seed=1))
    with pytest.raises(TypeError, match="dy: expected dtype float32"):
        layer.backward(np.ones((2, 4, 3, 5)))
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 4, 3, 5\)"):
        layer.backward(np.ones((2, 4, 15), np.float32))
