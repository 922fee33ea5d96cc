"""LayerNorm2d (ConvNeXt's and timm's) against the float64 reference (reference.py: layer_norm_2d
and layer_norm_2d_backward, themselves checked by finite differences in
test_reference_batch_free.py) and against torch.

Spec (docs/layer_norm_2d.md; Liu et al., "A ConvNet for the 2020s", arXiv 2201.03545):
- For each sample n and position (h, w) of (N, C, H, W) input, over its C channels:
  mu = mean_c x, var = mean_c (x - mu)^2 (biased), y = weight_c (x - mu)/sqrt(var + eps) + bias_c.
  It equals timm's LayerNorm2d: F.layer_norm(x.permute(0, 2, 3, 1), (C,), w, b, eps).permute(0, 3, 1, 2).
- Backward: dx per position; dweight = sum dy x_hat and dbias = sum dy over (N, H, W), in the
  layer's dtype; `grads` is {} without affine.
- No running statistics: training and eval are the same, and a sample's output does not depend
  on the other samples.
- Defaults: eps=1e-6, affine=True (weight ones, bias zeros), dtype float32. float16/bfloat16
  input to a float32 layer is computed in float32 (the float32 result rounded once). 4-D NCHW
  input only; results are bitwise the same for any thread count and any strides of the input.
- Bad calls raise "<argument>: expected ..., got ..." (test_errors.py's contract): the input
  is the argument "input".

How it runs (cpp/src/moments.h), which the shapes below are chosen around: a sample is C rows
(channels) of S = H*W columns (positions). Rows wider than 512 columns go in 512-column blocks and
64-row chunks; narrower rows go 8192 // S rows to a chunk.

Tolerances are conftest's policy.
"""
import numpy as np
import pytest

import normkit
import reference as ref
from variant_checks import (AFFINE, HALF_EPS, VIEWS, assert_bitwise_same_threads_any_state,
                            assert_state_dict_round_trip, check_backward, check_half_input_all,
                            half_dtype, make_input, randomize_affine_or_none, shape_id)


def ln2d(C, dtype=np.float64, **kw):
    return normkit.LayerNorm2d(C, dtype=dtype, **kw)


def prepared(C, dtype, affine=True, seed=0):
    """A layer with random weight (around 1) and bias (around 0), the same for a given seed."""
    layer = ln2d(C, dtype, affine=affine)
    if affine:
        rng = np.random.default_rng(seed)
        layer.weight[...] = rng.uniform(0.5, 1.5, C)
        layer.bias[...] = rng.normal(0.0, 0.5, C)
    return layer


def reference_y(layer, x):
    return ref.layer_norm_2d(x, layer.weight, layer.bias, layer.eps)


def reference_backward(layer, x, dy):
    """(dx, dweight, dbias) of the float64 reference on the float64 cast of x and dy."""
    return ref.layer_norm_2d_backward(x, dy, layer.weight, layer.bias, layer.eps)


def count(shape):
    """The longest reduction: a position's statistics over C, a parameter gradient over N*H*W."""
    return max(shape[1], shape[0] * shape[2] * shape[3])


def dx_scale(layer, x, dy):
    """max r |weight dy|: the size of the terms a dx entry is a difference of (r = 1/sqrt(eps) =
    1000 for C = 1, where dx cancels to ~0)."""
    r = ref.rstd(x, (1,), layer.eps)
    w = 1.0 if layer.weight is None else ref.f64(layer.weight).reshape(1, -1, 1, 1)
    return float(np.max(r * np.abs(ref.f64(dy) * w)))


def same_bits(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{what} differs"


def one_rounding_of(got, want32, half, what):
    """got (of the half type) is want32 rounded to it, or a neighbour of that half value."""
    rounded = want32.astype(got.dtype)
    assert got.dtype == rounded.dtype and got.shape == rounded.shape, what
    step = HALF_EPS[half] * np.maximum(np.abs(rounded.astype(np.float64)), 2.0 ** -14)  # an ulp, or more
    off = np.abs(got.astype(np.float64) - rounded.astype(np.float64))
    assert np.all(off <= step), f"{what}: {np.count_nonzero(off > step)} values beyond one rounding"
    assert np.count_nonzero(off) <= max(2, got.size // 100), f"{what}: not the float32 result's rounding"


def case(shape, note):
    return pytest.param(shape, id=f"{shape_id(shape)}-{note}")


# -- forward and backward against the reference -----------------------------------------------------

SHAPES = [
    case((3, 5, 1, 1), "spatial1"),
    case((2, 1, 4, 5), "C1"),
    case((2, 7, 3, 5), "C7-S15"),
    case((2, 13, 4, 4), "C13"),
    case((3, 16, 5, 7), "S35"),
    case((1, 9, 6, 6), "N1"),
    case((2, 5, 23, 29), "S667-two-column-blocks"),
    case((2, 3, 40, 40), "S1600-four-column-blocks"),
    case((1, 4, 27, 19), "S513-one-column-tail-block"),
    case((2, 130, 3, 5), "C130"),
    case((2, 300, 8, 8), "C300-S64-three-row-chunks"),
    case((1, 70, 25, 25), "C70-S625-row-chunks-64+6-column-blocks"),
    case((2, 65, 32, 32), "C65-S1024-row-chunks-64+1-two-full-blocks"),
]


@pytest.mark.parametrize("shape", SHAPES)
@AFFINE
def test_forward_and_backward_match_the_reference(shape, affine, dtype, rng, randomize_affine,
                                                  assert_close):
    layer = randomize_affine_or_none(ln2d(shape[1], dtype, affine=affine), affine,
                                     randomize_affine)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, reference_y(layer, x), dtype, count=count(shape), what="y")
    dx = layer.backward(dy)
    assert dx.shape == shape
    check_backward(layer, dx, reference_backward(layer, x, dy), dtype, count(shape), assert_close,
                   dx_scale(layer, x, dy))


@pytest.mark.parametrize("shape", [case((2, 13, 4, 4), "C13"), case((2, 7, 23, 29), "S667"),
                                   case((1, 70, 25, 25), "C70-S625")])
def test_a_large_offset_keeps_the_statistics_exact(shape, dtype, rng, assert_close):
    # x = 1e4 + N(0, 1): E[x^2] - E[x]^2 would lose 8 of the 16 (or all 7) digits; the centred
    # statistics keep the result at the tolerance of centred data. (C >= 7: a position whose few
    # channels happen to be nearly equal is ill-conditioned in the reference itself.)
    layer = prepared(shape[1], dtype, seed=int(rng.integers(1 << 30)))
    x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_close(layer(x), reference_y(layer, x), dtype, count=count(shape), what="y")
    check_backward(layer, layer.backward(dy), reference_backward(layer, x, dy), dtype,
                   count(shape), assert_close)


def test_the_biased_variance_and_eps_inside_the_square_root_spelled_out(assert_close):
    # Two channels a, b at every position: mu = (a + b)/2, var = d^2 with d = (a - b)/2 (the
    # unbiased variance would be 2 d^2), so y = +-d/sqrt(d^2 + eps) * weight + bias.
    layer = ln2d(2, eps=0.25)
    layer.weight[...] = [2.0, 3.0]
    layer.bias[...] = [0.5, -1.0]
    x = np.empty((1, 2, 1, 3))
    x[0, 0, 0], x[0, 1, 0] = [1.0, 4.0, -2.0], [0.0, 1.0, 2.0]
    d = (x[0, 0, 0] - x[0, 1, 0]) / 2
    xhat = d / np.sqrt(d ** 2 + 0.25)
    want = np.stack([2.0 * xhat + 0.5, -3.0 * xhat - 1.0]).reshape(1, 2, 1, 3)
    assert_close(layer(x), want, np.float64, what="y")


@pytest.mark.parametrize("shape", [case((2, 3, 2, 3), "C3"), case((1, 5, 1, 1), "N1-spatial1"),
                                   case((2, 4, 3, 2), "C4")])
@AFFINE
def test_float64_backward_equals_finite_differences(shape, affine, rng, randomize_affine,
                                                    check_gradients_by_finite_differences):
    layer = randomize_affine_or_none(ln2d(shape[1], affine=affine), affine, randomize_affine)
    check_gradients_by_finite_differences(layer, make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))


# -- torch / timm parity --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [case((2, 7, 5, 6), "C7"),
                                   case((1, 70, 25, 25), "C70-S625-blocks-and-chunks")])
@AFFINE
def test_matches_timm_layer_norm_2d_and_torch_autograd(shape, affine, rng, assert_close):
    torch = pytest.importorskip("torch")
    C = shape[1]
    layer = prepared(C, np.float64, affine, seed=int(rng.integers(1 << 30)))
    x = make_input(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(layer.weight, requires_grad=True) if affine else None
    bt = torch.tensor(layer.bias, requires_grad=True) if affine else None
    # timm's LayerNorm2d.forward, with timm's (and ConvNeXt's) eps
    yt = torch.nn.functional.layer_norm(xt.permute(0, 2, 3, 1), (C,), wt, bt, 1e-6).permute(0, 3, 1, 2)
    yt.backward(torch.from_numpy(dy))
    assert_close(layer(x), yt.detach().numpy(), np.float64, what="y")
    assert_close(layer.backward(dy), xt.grad.numpy(), np.float64, what="dx")
    if affine:
        assert list(layer.grads) == ["weight", "bias"]
        assert_close(layer.grads["weight"], wt.grad.numpy(), np.float64, what="dweight")
        assert_close(layer.grads["bias"], bt.grad.numpy(), np.float64, what="dbias")
    else:
        assert layer.grads == {}


# -- no batch statistics ----------------------------------------------------------------------------

@AFFINE
def test_training_and_eval_are_the_same_and_backward_overwrites_grads(affine, rng):
    layer = prepared(70, np.float32, affine)
    x = make_input(rng, (2, 70, 23, 25), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y_train, dx_train = layer(x), layer.backward(dy)
    grads_train = {k: g.copy() for k, g in layer.grads.items()}
    layer.eval()
    same_bits(layer(x), y_train, "eval y")
    same_bits(layer.backward(dy), dx_train, "eval dx")  # a second backward: the same, not summed
    assert layer.grads.keys() == grads_train.keys()
    for key, g in grads_train.items():
        same_bits(layer.grads[key], g, f"eval d{key}")
    assert layer.state_dict().keys() == layer.parameters().keys()  # no running statistics


def test_a_samples_output_does_not_depend_on_the_other_samples(rng):
    layer = prepared(70, np.float32)
    x = make_input(rng, (3, 70, 23, 25), np.float32)
    y = layer(x)
    same_bits(layer(x[1:2]), y[1:2], "sample 1 alone")
    x_other = x.copy()
    x_other[[0, 2]] = make_input(rng, (2, 70, 23, 25), np.float32) * 5.0
    same_bits(layer(x_other)[1], y[1], "sample 1 among other samples")


# -- half input, strides, threads -------------------------------------------------------------------

@pytest.mark.parametrize("half", list(HALF_EPS))
@pytest.mark.parametrize("shape", [case((4, 6, 7, 9), "C6"),
                                   case((1, 70, 25, 25), "C70-S625-blocks-and-chunks")])
@AFFINE
def test_half_input_is_computed_in_float32(half, shape, affine):
    # Computed in float32 from the exact half inputs and rounded once: the float32 layer's result
    # on the upcast values, rounded to the half type, or (where the two compiled kernels' float32
    # roundings differ, seen in a sanitizer build) the half value next to it; the float32 parameter
    # gradients up to float32 rounding; and so within an ulp of the half type (HALF_EPS) of the float64 reference.
    hdt = half_dtype(half)
    layer = prepared(shape[1], np.float32, affine)
    rng = np.random.default_rng(1)
    x = (0.5 + rng.standard_normal(shape)).astype(hdt)
    dy = rng.standard_normal(shape).astype(hdt)
    y32 = layer(x.astype(np.float32))
    dx32 = layer.backward(dy.astype(np.float32))
    grads32 = dict(layer.grads)
    y, dx = layer(x), layer.backward(dy)
    one_rounding_of(y, y32, half, "y")
    one_rounding_of(dx, dx32, half, "dx")
    assert layer.grads.keys() == grads32.keys()
    for key, g in grads32.items():
        np.testing.assert_allclose(layer.grads[key], g, rtol=1e-5, atol=1e-6 * np.max(np.abs(g)), err_msg=key)
    want_dx, want_dw, want_db = reference_backward(layer, x, dy)
    want_grads = {"weight": want_dw, "bias": want_db} if affine else {}
    check_half_input_all(layer, x, dy, reference_y(layer, x), want_dx, want_grads, half)


LN2D_VIEWS = {
    **VIEWS,
    "transposed-and-back": lambda rng, dt: np.ascontiguousarray(
        make_input(rng, (5, 6, 7, 5), dt).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
    "fortran-order": lambda rng, dt: np.asfortranarray(make_input(rng, (5, 6, 7, 5), dt)),
    "sample-sliced": lambda rng, dt: make_input(rng, (10, 6, 7, 5), dt)[::2],
    "wide-step-sliced": lambda rng, dt: make_input(rng, (2, 70, 25, 50), dt)[..., ::2],
}


@pytest.mark.parametrize("view", list(LN2D_VIEWS))
@AFFINE
def test_non_contiguous_input_gives_the_bits_of_its_copy(view, affine, dtype, rng):
    x = LN2D_VIEWS[view](rng, dtype)
    assert not x.flags.c_contiguous
    x_before = x.copy()
    strided, contiguous = prepared(x.shape[1], dtype, affine), prepared(x.shape[1], dtype, affine)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy_view = np.flip(np.flip(dy, -1).copy(), -1)
    assert not dy_view.flags.c_contiguous
    same_bits(strided(x), contiguous(np.ascontiguousarray(x)), "y")
    same_bits(strided.backward(dy_view), contiguous.backward(dy), "dx")
    assert strided.grads.keys() == contiguous.grads.keys() == contiguous.parameters().keys()
    for key, g in contiguous.grads.items():
        same_bits(strided.grads[key], g, f"d{key}")
    np.testing.assert_array_equal(x, x_before)  # the input is never written


# (3, 70, 23, 25): 575 columns in blocks of 512 + 63, rows in chunks of 64 + 6;
# (2, 300, 8, 8): 64 columns, rows in chunks of 128 + 128 + 44; (2, 5, 40, 40): four blocks.
THREAD_SHAPES = [case((3, 70, 23, 25), "blocks-and-chunks"), case((2, 300, 8, 8), "row-chunks"),
                 case((2, 5, 40, 40), "four-blocks")]


@pytest.mark.parametrize("shape", THREAD_SHAPES)
@AFFINE
def test_bitwise_identical_for_one_and_two_threads(shape, affine, dtype):
    assert_bitwise_same_threads_any_state(lambda: prepared(shape[1], dtype, affine), shape, dtype)


# -- state_dict -------------------------------------------------------------------------------------

@AFFINE
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_state_dict_keys_shapes_and_dtypes(affine, dtype):
    layer = ln2d(6, dtype, affine=affine)
    want = [("weight", (6,)), ("bias", (6,))] if affine else []
    state = layer.state_dict()
    assert [(k, v.shape) for k, v in state.items()] == want
    assert all(v.dtype == dtype for v in state.values())
    assert list(layer.parameters()) == [k for k, _ in want]
    for key, v in state.items():  # copies: writing them leaves the layer alone
        v[...] = 7.0
        assert not np.any(getattr(layer, key) == 7.0)


@AFFINE
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_state_dict_round_trip_into_a_fresh_layer(affine, dtype, rng):
    trained, fresh = prepared(6, dtype, affine), ln2d(6, dtype, affine=affine)
    assert_state_dict_round_trip(trained, fresh, rng, (4, 6, 5, 3), dtype)
    x = make_input(rng, (2, 6, 25, 25), dtype)
    same_bits(fresh(x), trained(x), "y of the loaded layer")


# -- what is rejected, and empty input ------------------------------------------------------------

def rejects(exc, argument):
    """pytest.raises for "<argument>: expected ..., got ..." (test_errors.py's contract)."""
    return pytest.raises(exc, match=rf"^{argument}: expected .*, got ")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_wrong_channel_count_raises_naming_the_input(dtype, rng):
    layer = prepared(6, dtype)
    for C in (5, 7, 1):
        with rejects(ValueError, "input"):
            layer(make_input(rng, (2, C, 3, 3), dtype))
    with rejects(ValueError, "input"):  # channels last is not NCHW
        layer(make_input(rng, (2, 3, 3, 6), dtype))
    with pytest.raises(ValueError, match=r"expected 6 channels in dim 1 \(num_channels\)"):  # its own argument
        layer(make_input(rng, (2, 5, 3, 3), dtype))


@pytest.mark.parametrize("layer_dtype, bad", [
    (np.float32, np.float64), (np.float64, np.float32), (np.float64, np.float16),
    (np.float32, np.int32), (np.float32, np.bool_), (np.float32, np.complex64)],
    ids=["float64-into-float32", "float32-into-float64", "float16-into-float64", "int32", "bool",
         "complex64"])
def test_wrong_dtype_raises_type_error_naming_the_input(layer_dtype, bad):
    with rejects(TypeError, "input"):
        ln2d(6, layer_dtype)(np.ones((2, 6, 3, 3), bad))


def test_a_non_array_input_raises_type_error_naming_the_input():
    layer = ln2d(6)
    for bad in (np.ones((2, 6, 3, 3)).tolist(), 1.5, None):
        with rejects(TypeError, "input"):
            layer(bad)


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 5), (2, 6, 3, 4, 2)], ids=["2D", "3D", "5D"])
def test_input_other_than_4d_raises_naming_the_input(shape):
    # the reference is defined for (N, C, *spatial), the layer takes NCHW only
    with pytest.raises(ValueError, match=r"^input: expected 4D input \(N, C, H, W\), got "
                                         + rf"{len(shape)}D input of shape"):
        ln2d(6)(np.ones(shape))


@pytest.mark.parametrize("kw, exc, argument", [
    (dict(num_channels=0), ValueError, "num_channels"), (dict(num_channels=-2), ValueError, "num_channels"),
    (dict(num_channels=2.5), TypeError, "num_channels"), (dict(num_channels=4, eps=-1e-6), ValueError, "eps"),
    (dict(num_channels=4, eps=float("nan")), ValueError, "eps"),
    (dict(num_channels=4, dtype=np.int32), TypeError, "dtype"),
    (dict(num_channels=4, dtype=np.float16), TypeError, "dtype")],
    ids=["C0", "C-2", "C2.5", "eps-negative", "eps-nan", "dtype-int32", "dtype-float16"])
def test_bad_constructor_arguments_raise(kw, exc, argument):
    with pytest.raises(exc, match=rf"^{argument}: expected"):
        normkit.LayerNorm2d(**kw)


def test_backward_before_forward_raises_state_error():
    layer = ln2d(6)
    with pytest.raises(normkit.StateError, match="^backward: expected a forward"):
        layer.backward(np.ones((2, 6, 3, 3)))
    with pytest.raises(TypeError):  # a rejected forward is no forward
        layer(np.ones((2, 6, 3, 3), np.int64))
    with pytest.raises(normkit.StateError):
        layer.backward(np.ones((2, 6, 3, 3)))


def test_dy_of_another_shape_or_dtype_raises_naming_dy(rng):
    layer = prepared(6, np.float32)
    layer(make_input(rng, (2, 6, 3, 3), np.float32))
    with rejects(ValueError, "dy"):
        layer.backward(np.ones((2, 6, 3, 4), np.float32))
    with rejects(TypeError, "dy"):
        layer.backward(np.ones((2, 6, 3, 3)))


@pytest.mark.parametrize("shape", [(0, 6, 3, 3), (2, 6, 0, 3)], ids=["no-samples", "no-pixels"])
@AFFINE
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_an_empty_batch_gives_empty_results_and_zero_parameter_gradients(shape, affine, dtype):
    # (test_variants_empty.py covers the batch-statistics variants, not LayerNorm2d.)
    layer = prepared(6, dtype, affine)
    y = layer(np.zeros(shape, dtype))
    dx = layer.backward(np.zeros(shape, dtype))
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    assert list(layer.grads) == (["weight", "bias"] if affine else [])
    for g in layer.grads.values():
        assert g.shape == (6,) and g.dtype == dtype and not np.any(g)


# -- defaults ---------------------------------------------------------------------------------------

def test_defaults_and_repr():
    layer = normkit.LayerNorm2d(8)
    assert layer.eps == 1e-6 and layer.affine is True and layer.dtype == np.float32
    assert layer.num_channels == 8 and layer.training
    assert layer.weight.dtype == layer.bias.dtype == np.float32
    np.testing.assert_array_equal(layer.weight, np.ones(8))
    np.testing.assert_array_equal(layer.bias, np.zeros(8))
    assert layer.grads == {}
    assert repr(layer) == "LayerNorm2d(8, eps=1e-06, affine=True)"
    plain = normkit.LayerNorm2d(5, eps=1e-5, affine=False, dtype=np.float64)
    assert plain.weight is None and plain.bias is None and plain.parameters() == {}
    assert plain.dtype == np.float64
    assert repr(plain) == "LayerNorm2d(5, eps=1e-05, affine=False)"


def test_default_layer_is_plain_standardization_over_the_channels(rng, assert_close):
    # weight ones and bias zeros: every position's channels have mean 0 and biased variance
    # var/(var + 1e-6)
    x = make_input(rng, (2, 6, 4, 5), np.float32)
    y = ref.f64(normkit.LayerNorm2d(6)(x))
    var = ref.f64(x).var(axis=1)
    assert_close(y.mean(axis=1), np.zeros((2, 4, 5)), np.float32, what="mean over C")
    assert_close(y.var(axis=1), var / (var + 1e-6), np.float32, what="variance over C")
