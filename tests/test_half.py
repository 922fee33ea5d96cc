"""float16 and bfloat16 inputs: stored as such, computed in float32 (parameters, running
statistics and parameter gradients are float32), for every layer family, forward and backward.

Outputs and input gradients are rounded once to the half type, so each is checked against the
float64 reference (evaluated on the exact half-precision inputs) to within one unit in the last
place of the half type at the array's scale; float32 parameter gradients to float32 tolerance.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import normkit
import reference

ml_dtypes = pytest.importorskip("ml_dtypes")

HALVES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
EPS = {np.dtype(np.float16): 2.0 ** -10, np.dtype(ml_dtypes.bfloat16): 2.0 ** -7}


def close_at_scale(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x scale {scale:.3g}"


def sample(dtype, shape, seed, offset=0.0):
    rng = np.random.default_rng(seed)
    return (offset + rng.standard_normal(shape)).astype(dtype)


def with_affine(layer, seed=3):
    rng = np.random.default_rng(seed)
    for p in layer.parameters().values():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    return layer


# name -> (make layer, reference forward, reference backward returning (dx, dweight[, dbias]))
FAMILIES = {
    "BatchNorm2d": (lambda: normkit.BatchNorm2d(6),
                    lambda x, l: reference.batch_norm(x, l.weight, l.bias),
                    lambda x, dy, l: reference.batch_norm_backward(x, dy, l.weight, l.bias)),
    "InstanceNorm2d": (lambda: normkit.InstanceNorm2d(6, affine=True),
                       lambda x, l: reference.instance_norm(x, l.weight, l.bias),
                       lambda x, dy, l: reference.instance_norm_backward(x, dy, l.weight, l.bias)),
    "GroupNorm": (lambda: normkit.GroupNorm(3, 6),
                  lambda x, l: reference.group_norm(x, 3, l.weight, l.bias),
                  lambda x, dy, l: reference.group_norm_backward(x, dy, 3, l.weight, l.bias)),
    "LayerNorm": (lambda: normkit.LayerNorm((7, 9)),
                  lambda x, l: reference.layer_norm(x, (7, 9), l.weight, l.bias),
                  lambda x, dy, l: reference.layer_norm_backward(x, dy, (7, 9), l.weight, l.bias)),
    "RMSNorm": (lambda: normkit.RMSNorm((7, 9), eps=1e-6),
                lambda x, l: reference.rms_norm(x, (7, 9), l.weight, 1e-6),
                lambda x, dy, l: reference.rms_norm_backward(x, dy, (7, 9), l.weight, 1e-6)),
}


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("offset", [0.0, 30.0], ids=["centered", "offset30"])
def test_forward_and_backward_match_the_reference(name, dtype, offset):
    make, forward, backward = FAMILIES[name]
    layer = with_affine(make())
    x = sample(dtype, (5, 6, 7, 9), 1, offset)
    dy = sample(dtype, x.shape, 2)
    y = layer(x)
    dx = layer.backward(dy)
    assert y.dtype == dtype and dx.dtype == dtype
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    close_at_scale(y, forward(x, layer), EPS[dtype], "y")
    want = backward(x, dy, layer)
    close_at_scale(dx, want[0], EPS[dtype], "dx")
    for got, ref, what in zip((layer.grads.get("weight"), layer.grads.get("bias")), want[1:], ("dweight", "dbias")):
        if got is not None:
            close_at_scale(got, ref, 1e-5, what)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_batch_norm_running_statistics_and_eval(dtype):
    layer = with_affine(normkit.BatchNorm2d(6))
    x = sample(dtype, (4, 6, 5, 5), 4, 2.0)
    layer(x)
    mean, var = reference.batch_stats(x)
    assert layer.running_mean.dtype == np.float32
    close_at_scale(layer.running_mean, 0.1 * mean, 1e-6, "running_mean")
    close_at_scale(layer.running_var, 0.9 + 0.1 * var, 1e-6, "running_var")
    layer.eval()
    want = reference.batch_norm(x, layer.weight, layer.bias, running_mean=layer.running_mean,
                                running_var=layer.running_var, training=False)
    close_at_scale(layer(x), want, EPS[dtype], "eval y")
    dy = sample(dtype, x.shape, 5)
    want_dx = reference.batch_norm_backward(x, dy, layer.weight, layer.bias, running_mean=layer.running_mean,
                                            running_var=layer.running_var, training=False)[0]
    close_at_scale(layer.backward(dy), want_dx, EPS[dtype], "eval dx")


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_functional_takes_float32_parameters_only(dtype):
    x = sample(dtype, (2, 3, 4), 6)
    w = np.ones(3, np.float32)
    y = normkit.functional.group_norm(x, 3, w, np.zeros(3, np.float32))
    assert y.dtype == dtype
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        normkit.functional.group_norm(x, 3, w.astype(dtype))
    with pytest.raises(TypeError, match="running_mean: expected dtype float32"):
        normkit.functional.batch_norm(x, np.zeros(3, dtype), np.ones(3, np.float32), training=True)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_float64_layers_refuse_half_inputs(dtype):
    with pytest.raises(TypeError, match="input: expected dtype float64"):
        normkit.LayerNorm(4, dtype=np.float64)(sample(dtype, (2, 4), 7))


def test_rms_norm_default_eps_is_the_half_types_epsilon():
    x = sample(np.float16, (3, 8), 8)
    want = reference.rms_norm(x, (8,), None, float(np.finfo(np.float16).eps))
    close_at_scale(normkit.functional.rms_norm(x, (8,)), want, EPS[np.dtype(np.float16)], "rms f16")
    xb = sample(ml_dtypes.bfloat16, (3, 8), 8)
    want = reference.rms_norm(xb, (8,), None, float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps))
    close_at_scale(normkit.functional.rms_norm(xb, (8,)), want, EPS[np.dtype(ml_dtypes.bfloat16)], "rms bf16")


# -- ml_dtypes is never imported by normkit: its import takes about a second -------------------------

def run_child(code):
    """stdout of `code` in a fresh interpreter that imports this normkit."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(normkit.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_importing_normkit_leaves_ml_dtypes_unimported():
    code = ("import sys, numpy as np, normkit\n"
            "normkit.GroupNorm(2, 4)(np.ones((2, 4, 3), np.float16))\n"
            "print('ml_dtypes' in sys.modules)")
    assert run_child(code) == "False"


def test_bfloat16_inputs_work_when_ml_dtypes_comes_after_normkit():
    code = ("import numpy as np, normkit, ml_dtypes\n"
            "x = np.arange(24, dtype=np.float32).reshape(2, 4, 3).astype(ml_dtypes.bfloat16)\n"
            "layer = normkit.GroupNorm(2, 4)\n"
            "y = layer(x)\n"
            "print(y.dtype, layer.backward(np.ones_like(x)).dtype, normkit.functional.rms_norm(x, (3,)).dtype)")
    assert run_child(code) == "bfloat16 bfloat16 bfloat16"


def test_the_dtype_error_names_bfloat16_without_ml_dtypes():
    code = ("import numpy as np, normkit\n"
            "try:\n"
            "    normkit.GroupNorm(2, 4)(np.ones((2, 4, 3), np.int16))\n"
            "except TypeError as e:\n"
            "    print(e)")
    assert run_child(code) == "input: expected dtype float32, float64, float16 or bfloat16, got int16"
