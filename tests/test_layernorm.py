"""LayerNorm, RMSNorm, functional.layer_norm and functional.rms_norm against the float64 reference.

Spec (torch.nn.LayerNorm / torch.nn.RMSNorm): each row -- the trailing `normalized_shape` dims of
one leading index -- is normalized on its own; the affine is elementwise, of shape
normalized_shape. LayerNorm subtracts the mean and divides by sqrt(biased var + eps); RMSNorm only
divides by sqrt(mean(x^2) + eps), with eps=None meaning the dtype's machine epsilon, and has no
bias. No running statistics: train and eval are the same.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
import reference as ref


def config_id(shape, normalized_shape):
    return f"{'x'.join(map(str, shape))}-over-({','.join(map(str, normalized_shape))})"


def configs(*items):
    return [pytest.param(s, ns, id=config_id(s, ns)) for s, ns in items]


# Rows of 1, 7, 17, 23, 33 elements; 1-D, 2-D, 3-D and 4-D inputs; one to three normalized dims;
# more than 16 rows (the column-affine gradient works in blocks of rows).
CONFIGS = configs(((4, 7), (7,)), ((7,), (7,)), ((3, 1), (1,)), ((2, 5, 7), (7,)),
                  ((2, 5, 7), (5, 7)), ((2, 3, 5, 7), (3, 5, 7)), ((5, 1, 7), (1, 7)),
                  ((2, 3, 17), (17,)), ((1, 23), (23,)), ((3, 17, 33), (33,)),
                  ((2, 4, 3, 17), (3, 17)))
# Rows around the 2048-element chunk.
CHUNK_CONFIGS = configs(((3, 2047), (2047,)), ((2, 2048), (2048,)), ((2, 2049), (2049,)),
                        ((1, 4097), (4097,)), ((2, 64, 64), (64, 64)), ((19, 2049), (2049,)))
SMALL_CONFIGS = configs(((3, 7), (7,)), ((2, 3, 4), (3, 4)), ((2, 2, 5), (5,)), ((5,), (5,)))

LN_AFFINE = pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)],
                                    ids=["affine", "weight_only", "no_affine"])
RMS_AFFINE = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])


def row_size(normalized_shape):
    return int(np.prod(normalized_shape, dtype=np.int64))


def rows(shape, normalized_shape):
    return int(np.prod(shape, dtype=np.int64)) // max(1, row_size(normalized_shape))


def make_input(rng, shape, dtype):
    # An offset and a spread per row, so that every row has statistics of its own.
    lead = shape[:-1] + (1,)
    return (rng.uniform(-2, 2, lead) + rng.uniform(0.5, 2, lead) * rng.standard_normal(shape)).astype(dtype)


def dx_scale(x, dy, weight, normalized_shape, eps):
    """The size of the terms LayerNorm's dx is a difference of (see reference.rstd): it exceeds
    |dx| where rows are (nearly) constant, e.g. a one-element row has r = 1/sqrt(eps) = 316 and
    dx exactly 0."""
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    w = 1.0 if weight is None else np.abs(ref.f64(weight))
    return float(np.max(ref.rstd(x, axes, eps) * np.abs(ref.f64(dy)) * w))


def rms_eps(layer, dtype):
    return float(np.finfo(dtype).eps) if layer.eps is None else layer.eps


# == LayerNorm =====================================================================================

@pytest.mark.parametrize("shape, normalized_shape", CONFIGS + CHUNK_CONFIGS)
@LN_AFFINE
def test_layer_norm_forward_matches_reference(shape, normalized_shape, affine, bias, dtype, rng,
                                              randomize_affine, assert_close):
    layer = normkit.LayerNorm(normalized_shape, elementwise_affine=affine, bias=bias, dtype=dtype)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref.layer_norm(x, normalized_shape, layer.weight, layer.bias, layer.eps), dtype,
                 count=row_size(normalized_shape), what="y")


@pytest.mark.parametrize("shape, normalized_shape", CONFIGS + CHUNK_CONFIGS)
@LN_AFFINE
def test_layer_norm_backward_matches_reference(shape, normalized_shape, affine, bias, dtype, rng,
                                               randomize_affine, assert_close):
    layer = normkit.LayerNorm(normalized_shape, elementwise_affine=affine, bias=bias, dtype=dtype)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer(x)
    dx = layer.backward(dy)
    want_dx, want_dw, want_db = ref.layer_norm_backward(x, dy, normalized_shape, layer.weight,
                                                        layer.bias, layer.eps)
    assert_close(dx, want_dx, dtype, count=row_size(normalized_shape), what="dx",
                 scale=dx_scale(x, dy, layer.weight, normalized_shape, layer.eps))
    expected_grads = {name for name, on in (("weight", affine), ("bias", bias)) if on}
    assert set(layer.grads) == expected_grads
    count = rows(shape, normalized_shape)
    if affine:
        assert layer.grads["weight"].shape == tuple(normalized_shape)
        assert_close(layer.grads["weight"], want_dw, dtype, count=count, what="dweight")
    if bias:
        assert_close(layer.grads["bias"], want_db, dtype, count=count, what="dbias")


@pytest.mark.parametrize("shape, normalized_shape", SMALL_CONFIGS)
@LN_AFFINE
def test_layer_norm_float64_backward_equals_finite_differences(
        shape, normalized_shape, affine, bias, rng, randomize_affine,
        check_gradients_by_finite_differences):
    layer = normkit.LayerNorm(normalized_shape, elementwise_affine=affine, bias=bias,
                              dtype=np.float64)
    randomize_affine(layer)
    check_gradients_by_finite_differences(layer, make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))


@pytest.mark.parametrize("shape, normalized_shape",
                         configs(((4, 7), (7,)), ((2, 5, 7), (5, 7)), ((3, 17, 33), (33,)),
                                 ((2, 2049), (2049,))))
def test_layer_norm_without_affine_and_eps_rows_have_mean_0_and_variance_1(
        shape, normalized_shape, dtype, rng, assert_close):
    layer = normkit.LayerNorm(normalized_shape, eps=0.0, elementwise_affine=False, dtype=dtype)
    y = layer(make_input(rng, shape, dtype)).astype(np.float64)
    y = y.reshape(-1, row_size(normalized_shape))
    count = row_size(normalized_shape)
    assert_close(y.mean(axis=1), np.zeros(len(y)), dtype, count=count, what="mean")
    assert_close(y.var(axis=1), np.ones(len(y)), dtype, count=count, what="variance")


@pytest.mark.parametrize("shape, normalized_shape",
                         configs(((4, 7), (7,)), ((2, 5, 7), (5, 7)), ((3, 17, 33), (33,)),
                                 ((2, 2049), (2049,))))
def test_layer_norm_dx_sums_to_zero_over_each_row(shape, normalized_shape, dtype, rng,
                                                  randomize_affine, assert_close):
    layer = normkit.LayerNorm(normalized_shape, dtype=dtype)
    randomize_affine(layer)
    layer(make_input(rng, shape, dtype))
    dx = layer.backward(rng.standard_normal(shape).astype(dtype)).astype(np.float64)
    count = row_size(normalized_shape)
    sums = dx.reshape(-1, count).sum(axis=1) / np.sqrt(count)
    assert_close(sums, np.zeros(len(sums)), dtype, count=count, what="sum of dx")


def test_layer_norm_keys_and_modes():
    assert list(normkit.LayerNorm(5).state_dict()) == ["weight", "bias"]
    assert list(normkit.LayerNorm(5, bias=False).state_dict()) == ["weight"]
    assert list(normkit.LayerNorm(5, elementwise_affine=False).state_dict()) == []
    layer = normkit.LayerNorm((2, 3))
    assert layer.weight.shape == (2, 3) and layer.bias.shape == (2, 3)
    assert layer.eval() is layer and layer.train() is layer


# == RMSNorm =======================================================================================

@pytest.mark.parametrize("shape, normalized_shape", CONFIGS + CHUNK_CONFIGS)
@RMS_AFFINE
@pytest.mark.parametrize("eps", [None, 1e-3], ids=["eps_default", "eps1e-3"])
def test_rms_norm_forward_matches_reference(shape, normalized_shape, affine, eps, dtype, rng,
                                            randomize_affine, assert_close):
    layer = normkit.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, dtype=dtype)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref.rms_norm(x, normalized_shape, layer.weight, rms_eps(layer, dtype)), dtype,
                 count=row_size(normalized_shape), what="y")


@pytest.mark.parametrize("shape, normalized_shape", CONFIGS + CHUNK_CONFIGS)
@RMS_AFFINE
@pytest.mark.parametrize("eps", [None, 1e-3], ids=["eps_default", "eps1e-3"])
def test_rms_norm_backward_matches_reference(shape, normalized_shape, affine, eps, dtype, rng,
                                             randomize_affine, assert_close):
    layer = normkit.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, dtype=dtype)
    randomize_affine(layer)
    x = make_input(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer(x)
    dx = layer.backward(dy)
    want_dx, want_dw = ref.rms_norm_backward(x, dy, normalized_shape, layer.weight,
                                             rms_eps(layer, dtype))
    assert_close(dx, want_dx, dtype, count=row_size(normalized_shape), what="dx")
    if affine:
        assert set(layer.grads) == {"weight"}
        assert_close(layer.grads["weight"], want_dw, dtype, count=rows(shape, normalized_shape),
                     what="dweight")
    else:
        assert layer.grads == {}


@pytest.mark.parametrize("shape, normalized_shape", SMALL_CONFIGS)
@RMS_AFFINE
@pytest.mark.parametrize("eps", [None, 0.1], ids=["eps_default", "eps0.1"])
def test_rms_norm_float64_backward_equals_finite_differences(
        shape, normalized_shape, affine, eps, rng, randomize_affine,
        check_gradients_by_finite_differences):
    layer = normkit.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, dtype=np.float64)
    randomize_affine(layer)
    check_gradients_by_finite_differences(layer, make_input(rng, shape, np.float64),
                                          rng.standard_normal(shape))


@pytest.mark.parametrize("shape, normalized_shape",
                         configs(((4, 7), (7,)), ((2, 5, 7), (5, 7)), ((3, 17, 33), (33,)),
                                 ((2, 2049), (2049,))))
def test_rms_norm_without_affine_and_eps_rows_have_unit_mean_square(shape, normalized_shape, dtype,
                                                                    rng, assert_close):
    layer = normkit.RMSNorm(normalized_shape, eps=0.0, elementwise_affine=False, dtype=dtype)
    y = layer(make_input(rng, shape, dtype)).astype(np.float64)
    y = y.reshape(-1, row_size(normalized_shape))
    assert_close((y ** 2).mean(axis=1), np.ones(len(y)), dtype, count=row_size(normalized_shape),
                 what="mean square")


def test_rms_norm_is_scale_invariant_and_keeps_the_mean(rng, assert_close):
    # Unlike LayerNorm it does not centre: a constant row maps to sign(x)*1 (not to 0).
    layer = normkit.RMSNorm(4, eps=0.0, elementwise_affine=False, dtype=np.float64)
    x = np.array([[3.0, 3.0, 3.0, 3.0], [-2.0, -2.0, -2.0, -2.0]])
    assert_close(layer(x), np.sign(x), np.float64)
    x = make_input(rng, (3, 4), np.float64)
    assert_close(layer(7.5 * x), layer(x), np.float64)


def test_rms_norm_keys_and_defaults():
    layer = normkit.RMSNorm((2, 3))
    assert layer.eps is None
    assert list(layer.state_dict()) == ["weight"] and layer.weight.shape == (2, 3)
    assert list(normkit.RMSNorm(3, elementwise_affine=False).state_dict()) == []


# == Layouts of the input ==========================================================================

VIEWS = {
    "transposed": lambda base: base.transpose(1, 0, 2)[:, :, :7],
    "last-axis-strided": lambda base: base.transpose(0, 2, 1)[:, :7],
    "step-sliced": lambda base: base[::2, :, 1:15:2],
    "negative-stride": lambda base: base[::-1, :, 6::-1],
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("family", ["LayerNorm", "RMSNorm"])
def test_non_contiguous_input_gives_the_same_result_as_its_copy(view, family, dtype, rng,
                                                                assert_close):
    x = VIEWS[view](make_input(rng, (6, 6, 17), dtype))
    assert not x.flags.c_contiguous
    normalized_shape = x.shape[-2:]
    strided, contiguous = (getattr(normkit, family)(normalized_shape, dtype=dtype) for _ in range(2))
    for layer in (strided, contiguous):
        for name, p in layer.parameters().items():
            p[...] = np.linspace(0.5, 1.5, p.size).reshape(p.shape) * (1 if name == "weight" else -1)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy_view = np.flip(np.flip(dy, axis=-1).copy(), axis=-1)  # equal values, negative strides
    assert_close(strided(x), contiguous(np.ascontiguousarray(x)), dtype, what="y")
    assert_close(strided.backward(dy_view), contiguous.backward(dy), dtype, what="dx")
    for name in contiguous.grads:
        assert_close(strided.grads[name], contiguous.grads[name], dtype, what=f"d{name}")


# == The functional forms ==========================================================================

@pytest.mark.parametrize("shape, normalized_shape",
                         configs(((4, 7), (7,)), ((7,), (7,)), ((2, 5, 7), (5, 7)),
                                 ((3, 17, 33), (33,)), ((2, 2049), (2049,))))
def test_functional_layer_norm_matches_reference(shape, normalized_shape, dtype, rng, assert_close):
    x = make_input(rng, shape, dtype)
    w = rng.uniform(0.5, 1.5, normalized_shape).astype(dtype)
    b = rng.normal(size=normalized_shape).astype(dtype)
    count = row_size(normalized_shape)
    assert_close(F.layer_norm(x, normalized_shape, w, b, eps=1e-3),
                 ref.layer_norm(x, normalized_shape, w, b, 1e-3), dtype, count=count, what="affine")
    assert_close(F.layer_norm(x, normalized_shape), ref.layer_norm(x, normalized_shape), dtype,
                 count=count, what="defaults")
    # An int normalized_shape is one trailing dimension, as in torch.
    assert_close(F.layer_norm(x, shape[-1]), ref.layer_norm(x, (shape[-1],)), dtype, count=count,
                 what="int normalized_shape")


@pytest.mark.parametrize("shape, normalized_shape",
                         configs(((4, 7), (7,)), ((7,), (7,)), ((2, 5, 7), (5, 7)),
                                 ((3, 17, 33), (33,)), ((2, 2049), (2049,))))
def test_functional_rms_norm_matches_reference(shape, normalized_shape, dtype, rng, assert_close):
    x = make_input(rng, shape, dtype)
    w = rng.uniform(0.5, 1.5, normalized_shape).astype(dtype)
    count = row_size(normalized_shape)
    assert_close(F.rms_norm(x, normalized_shape, w, eps=1e-3),
                 ref.rms_norm(x, normalized_shape, w, 1e-3), dtype, count=count, what="weight, eps")
    assert_close(F.rms_norm(x, normalized_shape),
                 ref.rms_norm(x, normalized_shape, None, float(np.finfo(dtype).eps)), dtype,
                 count=count, what="defaults (eps = machine epsilon of the dtype)")
