"""BatchRenorm2d, normkit.renorm_schedule and FrozenBatchNorm2d, issue 10.

Spec, Batch Renormalization (arXiv 1702.03275, Algorithm 1): running mean mu and running
standard deviation sigma (`running_mean`, `running_std`, starting at 0 and 1). Training: mu_B and
sigma_B = sqrt(var_B + eps) (biased var_B); r = clip(sigma_B/sigma, 1/r_max, r_max),
d = clip((mu_B - mu)/sigma, -d_max, d_max) from the running values before this step's update;
y = w ((x - mu_B)/sigma_B * r + d) + b; then mu += momentum (mu_B - mu), sigma += momentum
(sigma_B - sigma). r and d are constants in the backward. Eval: y = w (x - mu)/sigma + b. r_max
and d_max are plain attributes; with r_max=1, d_max=0 the layer is BatchNorm2d. r_max < 1 and
d_max < 0 raise ValueError naming them. renorm_schedule(step): (1, 0) for the first 5000 steps,
then linear ramps reaching r_max=3 at step 40000 and d_max=5 at step 25000, constant after.

Spec, FrozenBatchNorm2d (torchvision's): weight, bias, running_mean, running_var are fixed buffers
(no parameters); y = (x - rm)/sqrt(rv + eps) * w + b in training and eval; the backward gives dx
only; it loads a torch BatchNorm2d state_dict (num_batches_tracked ignored).

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import normkit
import reference as ref
from variant_checks import (AFFINE, FLOAT_DTYPES, HALF_EPS, MODE, VIEWS,
                            assert_bitwise_same_for_1_and_2_threads, assert_state_dict_round_trip,
                            check_backward, check_channels_last, check_half_input,
                            check_view_matches_copy, half_dtype, make_input, planes, shapes)

AXES = (0, 2, 3)


# =================================================================================================
# BatchRenorm2d
# =================================================================================================

def renorm(C, dtype=np.float64, **kw):
    return normkit.BatchRenorm2d(C, dtype=dtype, **kw)


def renorm_eval_reference(layer, x, dy=None):
    """Eval is an affine map of x with constants: y = w (x - mu)/sigma + b, dx = dy w/sigma."""
    rm, rs = layer.running_mean, layer.running_std
    if dy is None:
        return ref.batch_renorm_eval(x, rm, rs, layer.weight, layer.bias)
    xhat = ref.batch_renorm_eval(x, rm, rs)
    w = np.ones(x.shape[1]) if layer.weight is None else ref.f64(layer.weight)
    dx = ref.f64(dy) * (w / ref.f64(rs)).reshape(1, -1, 1, 1)
    if layer.weight is None:
        return dx, None, None
    return dx, (ref.f64(dy) * xhat).sum(axis=AXES), ref.f64(dy).sum(axis=AXES)


def renorm_dx_scale(layer, x, dy, r):
    w = 1.0 if layer.weight is None else np.abs(ref.f64(layer.weight)).reshape(1, -1, 1, 1)
    return float(np.max(ref.rstd(x, AXES, layer.eps) * np.abs(ref.f64(dy)) * w
                        * ref.f64(r).reshape(1, -1, 1, 1)))


RENORM_SHAPES = shapes((2, 3, 7, 5), (1, 3, 7, 5), (3, 1, 7, 5), (4, 23, 1, 1), (2, 6, 45, 47))


@pytest.mark.parametrize("shape", RENORM_SHAPES)
@AFFINE
def test_training_steps_follow_algorithm_1(shape, affine, dtype, rng, randomize_affine,
                                           assert_close):
    # Running statistics away from the batch's, so that r and d clip in some steps and channels
    # and not in others; each step's r, d come from the running values before its update.
    C = shape[1]
    layer = renorm(C, dtype, momentum=0.3, r_max=1.5, d_max=0.5, affine=affine)
    if affine:
        randomize_affine(layer)
    layer.running_mean[...] = rng.uniform(-2, 2, C)
    layer.running_std[...] = rng.uniform(0.4, 3.0, C)
    mu, sigma = ref.f64(layer.running_mean).copy(), ref.f64(layer.running_std).copy()
    for step in range(1, 4):
        x = make_input(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        r, d = ref.batch_renorm_rd(x, mu, sigma, layer.r_max, layer.d_max, layer.eps)
        y = layer(x)
        assert y.dtype == dtype and y.shape == shape
        assert_close(y, ref.batch_renorm(x, r, d, layer.weight, layer.bias, layer.eps), dtype,
                     count=planes(shape), what=f"y, step {step}")
        dx = layer.backward(dy)
        want = ref.batch_renorm_backward(x, dy, r, d, layer.weight, layer.bias, layer.eps)
        check_backward(layer, dx, want, dtype, planes(shape), assert_close,
                       renorm_dx_scale(layer, x, dy, r))
        xf = ref.f64(x)
        mu = mu + 0.3 * (xf.mean(axis=AXES) - mu)
        sigma = sigma + 0.3 * (np.sqrt(xf.var(axis=AXES) + layer.eps) - sigma)
        assert int(layer.num_batches_tracked) == step
        assert_close(layer.running_mean, mu, dtype, what=f"running_mean, step {step}")
        assert_close(layer.running_std, sigma, dtype, what=f"running_std, step {step}")


def test_r_and_d_clip_at_their_bounds(rng, assert_close):
    # Channel 0: sigma far below sigma_B (r = r_max); 1: far above (r = 1/r_max); 2: mu far below
    # mu_B (d = d_max); 3: far above (d = -d_max); 4: near the batch's (no clipping).
    x = make_input(rng, (4, 5, 7, 5), np.float64)
    mean_b, std_b = x.mean(axis=AXES), np.sqrt(x.var(axis=AXES) + 1e-5)
    layer = renorm(5, r_max=2.0, d_max=1.5)
    layer.running_mean[...] = mean_b + np.array([0.0, 0.0, -50.0, 50.0, 0.1]) * std_b
    layer.running_std[...] = std_b * np.array([1e-2, 1e2, 1.0, 1.0, 1.2])
    r, d = ref.batch_renorm_rd(x, layer.running_mean, layer.running_std, 2.0, 1.5)
    np.testing.assert_allclose(r[:2], [2.0, 0.5])
    np.testing.assert_allclose(d[2:4], [1.5, -1.5])
    assert 0.5 < r[4] < 2.0 and -1.5 < d[4] < 1.5
    assert_close(layer(x), ref.batch_renorm(x, r, d), np.float64, what="y")
    dy = rng.standard_normal(x.shape)
    want = ref.batch_renorm_backward(x, dy, r, d, layer.weight, layer.bias)
    check_backward(layer, layer.backward(dy), want, np.float64, 1, assert_close,
                   renorm_dx_scale(layer, x, dy, r))


@pytest.mark.parametrize("shape", shapes((2, 3, 7, 5), (1, 3, 7, 5), (3, 1, 1, 1), (1, 2, 1, 1)))
@AFFINE
def test_eval_normalizes_with_the_running_mean_and_std(shape, affine, dtype, rng,
                                                       randomize_affine, assert_close):
    layer = renorm(shape[1], dtype, affine=affine)
    if affine:
        randomize_affine(layer)
    layer.running_mean[...] = rng.uniform(-1, 1, shape[1])
    layer.running_std[...] = rng.uniform(0.5, 2.0, shape[1])
    layer.eval()
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), renorm_eval_reference(layer, x), dtype, what="y")
    check_backward(layer, layer.backward(dy), renorm_eval_reference(layer, x, dy), dtype,
                   planes(shape), assert_close)


@pytest.mark.parametrize("shape", shapes((4, 3, 7, 5), (1, 3, 7, 5), (3, 1, 7, 5)))
def test_with_r_max_1_and_d_max_0_it_is_batch_norm_over_steps(shape, dtype, rng, assert_close):
    C = shape[1]
    ours = renorm(C, dtype, momentum=0.1, r_max=1.0, d_max=0.0)
    bn = normkit.BatchNorm2d(C, momentum=0.1, dtype=dtype)
    for layer in (ours, bn):
        layer.weight[...] = np.linspace(0.5, 1.5, C)
        layer.bias[...] = np.linspace(-0.5, 0.5, C)
    count = planes(shape)
    for step in range(1, 5):
        x = make_input(rng, shape, dtype) + step
        dy = rng.standard_normal(shape).astype(dtype)
        assert_close(ours(x), bn(x), dtype, count=count, what=f"y, step {step}")
        scale = float(np.max(ref.rstd(x, AXES, 1e-5) * np.abs(ref.f64(dy)) * 1.5))
        assert_close(ours.backward(dy), bn.backward(dy), dtype, count=count, scale=scale,
                     what=f"dx, step {step}")
        for key in ("weight", "bias"):
            assert_close(ours.grads[key], bn.grads[key], dtype, count=count,
                         what=f"d{key}, step {step}")
            ours.parameters()[key][...] -= 0.1 * ours.grads[key]  # the same SGD step on both
            bn.parameters()[key][...] -= 0.1 * bn.grads[key]
        assert_close(ours.running_mean, bn.running_mean, dtype, what=f"running_mean, step {step}")


def test_r_max_and_d_max_are_attributes_read_at_every_step(rng, assert_close):
    layer = renorm(3, momentum=0.0)
    layer.running_mean[...] = [0.5, -0.5, 1.0]
    layer.running_std[...] = [0.7, 1.6, 1.1]
    x = make_input(rng, (4, 3, 7, 5), np.float64)
    layer.r_max, layer.d_max = 1.0, 0.0
    assert_close(layer(x), ref.batch_norm(x), np.float64, what="y with r_max=1, d_max=0")
    layer.r_max, layer.d_max = 1.2, 0.3
    r, d = ref.batch_renorm_rd(x, layer.running_mean, layer.running_std, 1.2, 0.3)
    assert not np.allclose(r, 1.0)
    assert_close(layer(x), ref.batch_renorm(x, r, d), np.float64,
                 what="y with r_max=1.2, d_max=0.3")


@pytest.mark.parametrize("case", ["all-clipped", "r_max1-d_max0"])
def test_float64_training_backward_equals_finite_differences(case, rng, randomize_affine,
                                                             check_gradients_by_finite_differences):
    # r and d are constants of the backward; where they sit at their clip bounds (or are 1 and 0)
    # they are constants of the forward too, so finite differences of the layer check the
    # backward. momentum=0 keeps the running values fixed over the repeated forwards.
    x = make_input(rng, (3, 4, 2, 3), np.float64)
    if case == "all-clipped":  # sigma_B/sigma ~ 0.05 < 1/r_max, (mu_B - mu)/sigma ~ -3 < -d_max
        layer = renorm(4, momentum=0.0, r_max=2.0, d_max=1.0)
        layer.running_mean[...] = 60.0
        layer.running_std[...] = 20.0
    else:
        layer = renorm(4, momentum=0.0, r_max=1.0, d_max=0.0)
    randomize_affine(layer)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(x.shape))


def test_float64_eval_backward_equals_finite_differences(rng, randomize_affine,
                                                         check_gradients_by_finite_differences):
    layer = renorm(3)
    randomize_affine(layer)
    layer.running_mean[...] = [0.3, -0.2, 1.0]
    layer.running_std[...] = [0.8, 1.5, 1.1]
    layer.eval()
    x = make_input(rng, (2, 3, 2, 3), np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(x.shape))


def test_renorm_defaults_and_state():
    layer = normkit.BatchRenorm2d(4)
    assert (layer.momentum, layer.r_max, layer.d_max, layer.eps) == (0.01, 3.0, 5.0, 1e-5)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_std, 1)
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == [
        ("weight", (4,)), ("bias", (4,)), ("running_mean", (4,)), ("running_std", (4,)),
        ("num_batches_tracked", ())]
    assert set(layer.parameters()) == {"weight", "bias"}
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("argument, kwargs", [
    pytest.param("r_max", dict(r_max=0.5), id="r_max=0.5"),
    pytest.param("r_max", dict(r_max=0.0), id="r_max=0"),
    pytest.param("d_max", dict(d_max=-0.1), id="d_max=-0.1"),
])
def test_r_max_below_1_and_d_max_below_0_raise_naming_them(argument, kwargs):
    with pytest.raises(ValueError, match=argument):
        normkit.BatchRenorm2d(3, **kwargs)


@pytest.mark.parametrize("argument, bad", [("r_max", 0.9), ("d_max", -1.0)])
def test_setting_r_max_or_d_max_outside_its_domain_raises_and_keeps_the_old_value(argument, bad):
    layer = normkit.BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    with pytest.raises(ValueError, match=argument):
        setattr(layer, argument, bad)
    assert (layer.r_max, layer.d_max) == (2.0, 1.0)


def test_r_max_1_and_d_max_0_are_legal():
    layer = normkit.BatchRenorm2d(3, r_max=1.0, d_max=0.0)
    assert (layer.r_max, layer.d_max) == (1.0, 0.0)


# -- renorm_schedule ------------------------------------------------------------------------------

SCHEDULE = [(0, (1.0, 0.0)), (4999, (1.0, 0.0)), (5000, (1.0, 0.0)),
            (15000, (1.0 + 2.0 * 10000 / 35000, 2.5)),
            (25000, (1.0 + 2.0 * 20000 / 35000, 5.0)),
            (40000, (3.0, 5.0)), (10 ** 6, (3.0, 5.0))]


@pytest.mark.parametrize("step, want", [pytest.param(*s, id=f"step{s[0]}") for s in SCHEDULE])
def test_renorm_schedule_is_the_papers(step, want):
    got = normkit.renorm_schedule(step)
    assert len(got) == 2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_renorm_schedule_agrees_with_the_reference_everywhere():
    for step in [0, 1, 2500, 4999, 5000, 5001, 12345, 24999, 25000, 25001, 33333, 39999, 40000,
                 40001, 50000]:
        np.testing.assert_allclose(normkit.renorm_schedule(step), ref.renorm_schedule(step),
                                   rtol=0, atol=1e-12, err_msg=f"step {step}")


# =================================================================================================
# FrozenBatchNorm2d
# =================================================================================================

def frozen(C, dtype=np.float64, rng=None, **kw):
    layer = normkit.FrozenBatchNorm2d(C, dtype=dtype, **kw)
    if rng is not None:
        layer.weight[...] = rng.uniform(0.5, 1.5, C)
        layer.bias[...] = rng.normal(0, 0.5, C)
        layer.running_mean[...] = rng.uniform(-1, 1, C)
        layer.running_var[...] = rng.uniform(0.5, 2.0, C)
    return layer


def frozen_reference(layer, x, dy=None):
    kw = dict(weight=layer.weight, bias=layer.bias, eps=layer.eps, training=False,
              running_mean=layer.running_mean, running_var=layer.running_var)
    if dy is None:
        return ref.batch_norm(x, **kw)
    return ref.batch_norm_backward(x, dy, **kw)[0]


def test_frozen_buffers_start_as_torchvision_and_nothing_is_learnable():
    layer = normkit.FrozenBatchNorm2d(4)
    assert layer.parameters() == {}
    assert layer.eps == 1e-5
    assert [(k, v.shape) for k, v in layer.state_dict().items()] == [
        ("weight", (4,)), ("bias", (4,)), ("running_mean", (4,)), ("running_var", (4,))]
    for key, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
        np.testing.assert_array_equal(getattr(layer, key), value, err_msg=key)


@pytest.mark.parametrize("shape", shapes((2, 3, 7, 5), (1, 1, 7, 5), (1, 3, 1, 1), (3, 23, 2, 3),
                                         (2, 3, 45, 47)))
@MODE
def test_frozen_is_one_fixed_affine_in_training_and_eval(shape, training, dtype, rng,
                                                         assert_close):
    layer = frozen(shape[1], dtype, rng).train(training)
    before = layer.state_dict()
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert_close(y, frozen_reference(layer, x), dtype, what="y")
    dx = layer.backward(dy)
    assert dx.dtype == dtype and layer.grads == {}
    assert_close(dx, frozen_reference(layer, x, dy), dtype, what="dx")
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} moved")


def test_frozen_gives_the_same_bits_in_training_and_eval(rng):
    layer = frozen(3, np.float32, rng)
    x = make_input(rng, (2, 3, 7, 5), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y_train, dx_train = layer.train()(x), layer.backward(dy)
    y_eval, dx_eval = layer.eval()(x), layer.backward(dy)
    assert y_train.tobytes() == y_eval.tobytes() and dx_train.tobytes() == dx_eval.tobytes()


def test_frozen_float64_backward_equals_finite_differences(rng,
                                                           check_gradients_by_finite_differences):
    layer = frozen(3, np.float64, rng)
    x = make_input(rng, (2, 3, 2, 3), np.float64)
    check_gradients_by_finite_differences(layer, x, rng.standard_normal(x.shape))


def torchvision_frozen_bn(torch, x, weight, bias, running_mean, running_var, eps):
    """torchvision.ops.FrozenBatchNorm2d.forward, verbatim in its arithmetic."""
    w, b = weight.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)
    rv, rm = running_var.reshape(1, -1, 1, 1), running_mean.reshape(1, -1, 1, 1)
    scale = w * (rv + eps).rsqrt()
    return x * scale + (b - rm * scale)


@pytest.mark.parametrize("shape", shapes((2, 3, 7, 5), (1, 1, 7, 5)))
def test_frozen_loads_a_torch_batch_norm_state_dict_and_matches_torch(shape, dtype, rng,
                                                                      assert_close):
    torch = pytest.importorskip("torch")
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    C = shape[1]
    bn = torch.nn.BatchNorm2d(C).to(tdt)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C)))
        bn.bias.copy_(torch.from_numpy(rng.normal(0, 0.5, C)))
    for _ in range(3):  # trained running statistics and a non-zero num_batches_tracked
        bn(torch.from_numpy(make_input(rng, (4,) + shape[1:], dtype)))
    state = bn.state_dict()
    assert int(state["num_batches_tracked"]) == 3
    layer = normkit.FrozenBatchNorm2d(C, dtype=dtype)
    assert layer.load_state_dict(state) is layer
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(layer, key), state[key].numpy(), err_msg=key)
    x = make_input(rng, shape, dtype)
    xt = torch.from_numpy(x).requires_grad_(True)
    bn.eval()
    yt = bn(xt)
    dy = rng.standard_normal(shape).astype(dtype)
    yt.backward(torch.from_numpy(dy))
    y = layer(x)
    assert_close(y, yt.detach().numpy(), dtype, what="y vs torch BatchNorm2d eval")
    tv = torchvision_frozen_bn(torch, torch.from_numpy(x), *(state[k] for k in (
        "weight", "bias", "running_mean", "running_var")), layer.eps)
    assert_close(y, tv.numpy(), dtype, what="y vs torchvision's FrozenBatchNorm2d formula")
    assert_close(layer.backward(dy), xt.grad.numpy(), dtype, what="dx vs torch")


# =================================================================================================
# Both layers: state, half input, layouts, strides, threads
# =================================================================================================

def prepared(name, dtype, seed=0, **kw):
    rng = np.random.default_rng(seed)
    if name == "FrozenBN":
        layer = normkit.FrozenBatchNorm2d(6, dtype=dtype, **kw)
        layer.weight[...] = rng.uniform(0.5, 1.5, 6)
        layer.bias[...] = rng.normal(0, 0.5, 6)
        layer.running_mean[...] = rng.uniform(-1, 1, 6)
        layer.running_var[...] = rng.uniform(0.5, 2.0, 6)
        return layer
    layer = normkit.BatchRenorm2d(6, momentum=0.2, r_max=1.5, d_max=0.5, dtype=dtype, **kw)
    for p in layer.parameters().values():
        p[...] = rng.uniform(0.5, 1.5, p.shape)
    layer.running_mean[...] = rng.uniform(-1, 1, 6)
    layer.running_std[...] = rng.uniform(0.5, 2.0, 6)
    return layer


def reference_of(name, layer, x, dy, training):
    """(y, (dx, dweight, dbias)) of the reference for the layer's state before the forward."""
    if name == "FrozenBN":
        return frozen_reference(layer, x), (frozen_reference(layer, x, dy), None, None)
    if not training:
        return renorm_eval_reference(layer, x), renorm_eval_reference(layer, x, dy)
    r, d = ref.batch_renorm_rd(x, layer.running_mean, layer.running_std, layer.r_max, layer.d_max,
                               layer.eps)
    return (ref.batch_renorm(x, r, d, layer.weight, layer.bias, layer.eps),
            ref.batch_renorm_backward(x, dy, r, d, layer.weight, layer.bias, layer.eps))


NAMES = pytest.mark.parametrize("name", ["BatchRenorm", "FrozenBN"])


@FLOAT_DTYPES
@NAMES
def test_state_dict_round_trip_reproduces_the_layer(name, dtype, rng):
    assert_state_dict_round_trip(prepared(name, dtype), prepared(name, dtype, seed=9), rng,
                                 (4, 6, 4, 5), dtype)


@NAMES
@pytest.mark.parametrize("half", list(HALF_EPS))
@MODE
def test_half_input_is_computed_in_float32(name, half, training):
    hdt = half_dtype(half)
    layer = prepared(name, np.float32).train(training)
    rng = np.random.default_rng(1)
    x = (1.0 + rng.standard_normal((5, 6, 7, 9))).astype(hdt)
    dy = rng.standard_normal(x.shape).astype(hdt)
    want_y, want = reference_of(name, layer, x, dy, training)
    check_half_input(layer, x, dy, want_y, want, half)


@NAMES
@MODE
def test_channels_last_matches_channels_first_and_the_reference(name, training, dtype,
                                                                assert_close):
    first = prepared(name, dtype).train(training)
    last = prepared(name, dtype, layout="NHWC").train(training)
    rng = np.random.default_rng(2)
    x = make_input(rng, (5, 6, 7, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    want_y, want = reference_of(name, first, x, dy, training)
    check_channels_last(first, last, x, dy, want_y, want, dtype, assert_close)


@NAMES
@pytest.mark.parametrize("view", list(VIEWS))
@MODE
def test_non_contiguous_input_gives_the_result_of_its_copy(name, view, training, dtype, rng,
                                                           assert_close):
    check_view_matches_copy(VIEWS[view](rng, dtype),
                            lambda: prepared(name, dtype).train(training), rng, dtype,
                            assert_close)


THREAD_SHAPE = (4, 6, 55, 57)  # planes of 3135 = 2048 + 1087 entries


@NAMES
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@MODE
def test_bitwise_identical_for_one_and_two_threads(name, layout, training, dtype):
    assert_bitwise_same_for_1_and_2_threads(
        lambda: prepared(name, dtype, layout=layout).train(training), THREAD_SHAPE, dtype,
        layout)
