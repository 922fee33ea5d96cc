"""Threads and ISA levels: results never depend on how the work is spread or vectorized.

Spec (STYLE.md, "Numerics are part of the design"): chunk moments merged in a fixed order, no
buffer indexed by thread id, so outputs and gradients are *bitwise* identical for any
`normkit.set_num_threads` value, across repeated runs, and when many Python threads call normkit
at once (the binding releases the GIL). Every ISA level the CPU supports matches a float64
reference; `NORMKIT_ISA` forces a lower level and `OMP_NUM_THREADS` sets the default thread count.

Shapes are chosen to go parallel for real: >= 64K elements, and planes longer than one 2048-element
chunk with a ragged tail (S = 55*57 = 3135 = 2048 + 1087), so every pass has several chunks per
plane, vector tails and more work items than threads.
"""
import hashlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import normkit
from normkit import _core

THREAD_COUNTS = (1, 2, 3, 8)
SHAPE = (4, 6, 55, 57)  # 75,240 elements; planes of 3,135 elements (one full chunk + a tail)
FAMILIES = ("BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm_CHW", "LayerNorm_HW", "RMSNorm",
            # channels-last input (N, H, W, C): column reductions over row blocks
            "BatchNorm2d_NHWC", "InstanceNorm2d_NHWC", "GroupNorm_NHWC")
MODES = ("train", "eval")
DTYPES = (np.float32, np.float64)


@pytest.fixture(autouse=True)
def restore_threads_and_isa():
    threads, isa = normkit.get_num_threads(), _core.isa_name()
    yield
    normkit.set_num_threads(threads)
    _core.set_isa(isa)


def make_layer(family, mode, dtype, C=SHAPE[1], spatial=SHAPE[2:], seed=0):
    """A layer with non-trivial parameters and running statistics, in the given mode."""
    rng = np.random.default_rng(seed)
    family, nhwc, _ = family.partition("_NHWC")
    kw = {"layout": "NHWC"} if nhwc else {}
    if family == "BatchNorm2d":
        layer = normkit.BatchNorm2d(C, dtype=dtype, **kw)
    elif family == "InstanceNorm2d":
        layer = normkit.InstanceNorm2d(C, affine=True, track_running_stats=True, dtype=dtype, **kw)
    elif family == "GroupNorm":
        layer = normkit.GroupNorm(3, C, dtype=dtype, **kw)
    elif family == "LayerNorm_CHW":
        layer = normkit.LayerNorm((C,) + tuple(spatial), dtype=dtype)
    elif family == "LayerNorm_HW":  # column affine: many rows per parameter column
        layer = normkit.LayerNorm(tuple(spatial), dtype=dtype)
    elif family == "RMSNorm":
        layer = normkit.RMSNorm(tuple(spatial), dtype=dtype)
    else:
        raise AssertionError(family)
    for arr in layer.parameters().values():
        arr[...] = rng.uniform(0.5, 1.5, arr.shape) if arr is layer.weight else rng.normal(0, 0.3, arr.shape)
    if getattr(layer, "running_mean", None) is not None:
        layer.running_mean[...] = rng.normal(0, 1, layer.running_mean.shape)
        layer.running_var[...] = rng.uniform(0.5, 2.0, layer.running_var.shape)
    return layer.train(mode == "train")


def input_shape(family, shape=SHAPE):
    """The input shape of a family: (N, C, H, W), or (N, H, W, C) for the channels-last ones."""
    return (shape[0],) + tuple(shape[2:]) + (shape[1],) if family.endswith("_NHWC") else shape


def make_inputs(dtype, shape=SHAPE, seed=1):
    rng = np.random.default_rng(seed)
    # An offset mean and a spread, so that shift/rounding paths matter.
    x = (rng.normal(3.0, 2.0, shape)).astype(dtype)
    dy = rng.normal(0, 1, shape).astype(dtype)
    return x, dy


def run_once(layer, x, dy):
    """Every number one forward+backward produces, as raw bytes (bitwise comparison)."""
    y = layer(x)
    dx = layer.backward(dy)
    out = {"y": y, "dx": dx}
    out.update({"d" + k: v for k, v in layer.grads.items()})
    for buf in ("running_mean", "running_var"):
        if getattr(layer, buf, None) is not None:
            out[buf] = getattr(layer, buf)
    return {k: np.ascontiguousarray(v).tobytes() for k, v in out.items()}


def digest(result):
    h = hashlib.sha256()
    for k in sorted(result):
        h.update(k.encode())
        h.update(result[k])
    return h.hexdigest()


def first_difference(a, b, dtype):
    for k in sorted(a):
        if a[k] != b[k]:
            va, vb = np.frombuffer(a[k], dtype), np.frombuffer(b[k], dtype)
            i = int(np.flatnonzero(va.view(f"u{va.itemsize}") != vb.view(f"u{vb.itemsize}"))[0])
            return f"{k}[{i}]: {va[i]!r} vs {vb[i]!r}"
    return None


# ---------------------------------------------------------------------------------------------
# Thread count: bitwise identical results
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bitwise_identical_for_any_thread_count(family, mode, dtype):
    x, dy = make_inputs(dtype, input_shape(family))
    results = {}
    for nt in THREAD_COUNTS:
        normkit.set_num_threads(nt)
        assert normkit.get_num_threads() == nt
        for rep in range(2):  # repeated runs, fresh layer each time (running stats start equal)
            results[nt, rep] = run_once(make_layer(family, mode, dtype), x, dy)
    ref = results[1, 0]
    assert set(ref) >= {"y", "dx"}
    if family != "RMSNorm":
        assert {"dweight", "dbias"} <= set(ref)
    for key, res in results.items():
        assert res.keys() == ref.keys()
        diff = first_difference(ref, res, dtype)
        assert diff is None, f"threads={key[0]} run={key[1]} differs from threads=1: {diff}"


@pytest.mark.parametrize("family", ["BatchNorm2d", "InstanceNorm2d", "LayerNorm_CHW", "BatchNorm2d_NHWC"])
def test_running_statistics_bitwise_over_many_steps(family):
    """Running statistics accumulated over several training steps do not depend on threads."""
    xs = [make_inputs(np.float32, input_shape(family), seed=s) for s in range(4)]
    finals = []
    for nt in THREAD_COUNTS:
        normkit.set_num_threads(nt)
        layer = make_layer(family, "train", np.float32)
        out = [run_once(layer, x, dy) for x, dy in xs]
        finals.append([digest(o) for o in out])
    assert all(f == finals[0] for f in finals)


def test_functional_bitwise_for_any_thread_count():
    """The functional API (which the layers share) with running statistics updated in place."""
    import normkit.functional as F
    x, _ = make_inputs(np.float64)
    C = x.shape[1]
    outs = []
    for nt in THREAD_COUNTS:
        normkit.set_num_threads(nt)
        rm, rv = np.zeros(C), np.ones(C)
        parts = [F.batch_norm(x, rm, rv, training=True), rm, rv,
                 F.instance_norm(x), F.group_norm(x, 2), F.layer_norm(x, x.shape[1:]),
                 F.rms_norm(x, x.shape[2:])]
        outs.append(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))
    assert all(o == outs[0] for o in outs)


# ---------------------------------------------------------------------------------------------
# Many Python threads at once
# ---------------------------------------------------------------------------------------------

N_PY_THREADS = 8
ITERATIONS = 25
THREAD_CONFIGS = [(fam, mode, dt) for fam in FAMILIES for mode in MODES for dt in DTYPES]


def _thread_job(k):
    """Job k: its own layer, and a few inputs it cycles through, all deterministic in k."""
    fam, mode, dt = THREAD_CONFIGS[(5 * k) % len(THREAD_CONFIGS)]
    inputs = [make_inputs(dt, input_shape(fam), seed=100 * k + j) for j in range(3)]
    return fam, mode, dt, inputs


def _run_job(k, barrier=None):
    fam, mode, dt, inputs = _thread_job(k)
    layer = make_layer(fam, mode, dt, seed=k)
    if barrier is not None:
        barrier.wait()
    return [digest(run_once(layer, *inputs[i % len(inputs)])) for i in range(ITERATIONS)]


@pytest.mark.parametrize("num_threads", [1, 3])
def test_concurrent_python_threads_match_sequential(num_threads):
    normkit.set_num_threads(num_threads)
    expected = [_run_job(k) for k in range(N_PY_THREADS)]
    assert len({fam for fam, *_ in map(_thread_job, range(N_PY_THREADS))}) >= 5  # mixed layers

    barrier = threading.Barrier(N_PY_THREADS)
    got, errors = [None] * N_PY_THREADS, []

    def worker(k):
        try:
            got[k] = _run_job(k, barrier)
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append((k, repr(e)))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_PY_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    for k in range(N_PY_THREADS):
        bad = [i for i in range(ITERATIONS) if got[k][i] != expected[k][i]]
        assert not bad, f"python thread {k} ({_thread_job(k)[:3]}): iterations {bad} differ from a sequential run"


# ---------------------------------------------------------------------------------------------
# set_num_threads / get_num_threads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 8, 17])
def test_set_then_get(n):
    normkit.set_num_threads(n)
    assert normkit.get_num_threads() == n
    assert normkit.cpu_info()["num_threads"] == n


@pytest.mark.parametrize("bad", [0, -1, -8, 1.5, 2.0, "2", None, True])
def test_set_num_threads_rejects_invalid(bad):
    before = normkit.get_num_threads()
    with pytest.raises(ValueError):
        normkit.set_num_threads(bad)
    assert normkit.get_num_threads() == before


def _subprocess_env(**extra):
    env = dict(os.environ)
    env.pop("NORMKIT_ISA", None)
    env.pop("OMP_NUM_THREADS", None)
    # The child must import the same normkit as this process.
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(normkit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def _child(code, **env):
    proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(**env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_omp_num_threads_sets_the_default():
    out = _child("import normkit; print(normkit.get_num_threads(), normkit.cpu_info()['num_threads'])",
                 OMP_NUM_THREADS="3")
    assert out == "3 3"


# ---------------------------------------------------------------------------------------------
# ISA levels
# ---------------------------------------------------------------------------------------------

def _ref_norm(xg, dyg, wg, bg, eps, skip_mean):
    """float64 reference on (groups, M) rows, weight/bias given per element: y, dx, dy*xhat."""
    xg, dyg, wg, bg = (np.asarray(a, np.float64) for a in (xg, dyg, wg, bg))
    M = xg.shape[1]
    mu = np.zeros((xg.shape[0], 1)) if skip_mean else xg.mean(axis=1, keepdims=True)
    var = ((xg - mu) ** 2).mean(axis=1, keepdims=True)
    r = 1.0 / np.sqrt(var + eps)
    xhat = (xg - mu) * r
    y = xhat * wg + bg
    g = dyg * wg
    gm = np.zeros_like(mu) if skip_mean else g.sum(axis=1, keepdims=True) / M
    dx = r * (g - gm - xhat * (g * xhat).sum(axis=1, keepdims=True) / M)
    return y, dx, dyg * xhat


def reference(layer, x, dy):
    """float64 forward and backward of a layer in training mode (or BatchNorm2d in eval)."""
    N, C = x.shape[:2]
    w = layer.weight.astype(np.float64)
    b = layer.bias.astype(np.float64) if getattr(layer, "bias", None) is not None else np.zeros_like(w)
    if isinstance(layer, normkit.BatchNorm2d):
        wf, bf = (np.broadcast_to(v.reshape(1, C, 1, 1), x.shape) for v in (w, b))
        if layer.training:
            t = lambda a: np.moveaxis(np.asarray(a), 1, 0).reshape(C, -1)
            back = lambda a: np.moveaxis(a.reshape((C, N) + x.shape[2:]), 0, 1)
            y, dx, gx = (back(v) for v in _ref_norm(t(x), t(dy), t(wf), t(bf), layer.eps, False))
        else:
            mu = layer.running_mean.astype(np.float64).reshape(1, C, 1, 1)
            r = 1 / np.sqrt(layer.running_var.astype(np.float64).reshape(1, C, 1, 1) + layer.eps)
            xhat = (x - mu) * r
            y, dx, gx = xhat * wf + bf, dy * wf * r, dy * xhat
        return y, dx, gx.sum(axis=(0, 2, 3)), np.asarray(dy, np.float64).sum(axis=(0, 2, 3))
    if isinstance(layer, normkit.GroupNorm):
        G = layer.num_groups
        wf, bf = (np.broadcast_to(v.reshape(1, C, 1, 1), x.shape).reshape(N * G, -1) for v in (w, b))
        y, dx, gx = (v.reshape(x.shape) for v in _ref_norm(
            x.reshape(N * G, -1), dy.reshape(N * G, -1), wf, bf, layer.eps, False))
        return y, dx, gx.sum(axis=(0, 2, 3)), np.asarray(dy, np.float64).sum(axis=(0, 2, 3))
    # LayerNorm / RMSNorm over the trailing normalized_shape
    M = int(np.prod(layer.normalized_shape))
    rows = x.size // M
    skip = isinstance(layer, normkit.RMSNorm)
    eps = layer.eps if layer.eps is not None else float(np.finfo(x.dtype).eps)
    wf, bf = (np.broadcast_to(v.reshape(1, M), (rows, M)) for v in (w, b))
    y, dx, gx = (v.reshape(x.shape) for v in _ref_norm(
        x.reshape(rows, M), dy.reshape(rows, M), wf, bf, eps, skip))
    lead = tuple(range(x.ndim - len(layer.normalized_shape)))
    return y, dx, gx.sum(axis=lead), np.asarray(dy, np.float64).sum(axis=lead)


ISA_SHAPES = [(3, 6, 7, 11), (2, 6, 45, 47)]  # S = 77 (vector tail), 2115 (chunk + tail 67)
ISA_LAYERS = ["BatchNorm2d-train", "BatchNorm2d-eval", "GroupNorm", "LayerNorm", "RMSNorm",
              "BatchNorm2d_NHWC-train", "GroupNorm_NHWC"]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _isa_layer(name, shape, dtype):
    fam, _, mode = name.partition("-")
    if fam in ("LayerNorm", "RMSNorm"):
        fam = {"LayerNorm": "LayerNorm_HW", "RMSNorm": "RMSNorm"}[fam]
    return make_layer(fam, mode or "train", dtype, C=shape[1], spatial=shape[2:], seed=7)


def test_supported_isas_lists_levels():
    levels = list(_core.supported_isas())
    assert levels and levels[0] == "baseline"
    assert normkit.cpu_info()["isa"] in levels
    assert normkit.cpu_info()["supported"] == levels
    with pytest.raises(ValueError):
        _core.set_isa("not-an-isa")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ISA_LAYERS)
@pytest.mark.parametrize("isa", list(_core.supported_isas()))
def test_every_isa_matches_reference(isa, name, shape, dtype):
    _core.set_isa(isa)
    assert _core.isa_name() == isa and normkit.cpu_info()["isa"] == isa
    x, dy = make_inputs(dtype, input_shape(name.partition("-")[0], shape), seed=3)
    layer = _isa_layer(name, shape, dtype)
    if "_NHWC" in name:  # the reference works in NCHW
        ry, rdx, rdw, rdb = reference(layer, np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1))
        ry, rdx = np.moveaxis(ry, 1, -1), np.moveaxis(rdx, 1, -1)
    else:
        ry, rdx, rdw, rdb = reference(layer, x, dy)
    y = layer(x)
    dx = layer.backward(dy)
    for got, want, what in [(y, ry, "y"), (dx, rdx, "dx"), (layer.grads["weight"], rdw, "dweight")]:
        assert got.dtype == dtype
        # parameter gradients are sums over many elements: scale the tolerance with the count
        scale = 1.0 if what in ("y", "dx") else np.sqrt(x.size / rdw.size)
        np.testing.assert_allclose(got, want, rtol=TOL[dtype]["rtol"] * scale,
                                   atol=TOL[dtype]["atol"] * scale, err_msg=f"{isa} {what}")
    if "bias" in layer.grads:
        scale = np.sqrt(x.size / rdb.size)
        np.testing.assert_allclose(layer.grads["bias"], rdb, rtol=TOL[dtype]["rtol"] * scale,
                                   atol=TOL[dtype]["atol"] * scale, err_msg=f"{isa} dbias")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_large_tensor_paths_give_the_same_bits(family, mode):
    """With the assumed cache shrunk to 64 KiB, this small tensor takes the paths of a large one
    (block by block of groups, sample by sample, streaming stores): the same bits as before."""
    x, dy = make_inputs(np.float32, input_shape(family))
    normkit.set_num_threads(2)
    small = run_once(make_layer(family, mode, np.float32), x, dy)
    try:
        _core.set_cache_bytes(64 << 10)
        for threads in (1, 2):
            normkit.set_num_threads(threads)
            large = run_once(make_layer(family, mode, np.float32), x, dy)
            assert first_difference(small, large, np.float32) is None, f"threads={threads}"
    finally:
        _core.set_cache_bytes(0)
        normkit.set_num_threads(2)


@pytest.mark.parametrize("isa", list(_core.supported_isas()))
def test_every_isa_bitwise_across_threads(isa):
    _core.set_isa(isa)
    x, dy = make_inputs(np.float32)
    res = []
    for nt in (1, 3):
        normkit.set_num_threads(nt)
        res.append(run_once(make_layer("GroupNorm", "train", np.float32), x, dy))
    assert res[0] == res[1]


def test_set_isa_switches_and_restores():
    levels = list(_core.supported_isas())
    original = _core.isa_name()
    for lvl in levels + levels[::-1]:
        _core.set_isa(lvl)
        assert _core.isa_name() == lvl
    _core.set_isa(original)
    assert _core.isa_name() == original


def test_normkit_isa_env_forces_baseline():
    out = _child("import normkit; print(normkit.cpu_info()['isa'])", NORMKIT_ISA="baseline")
    assert out == "baseline"
