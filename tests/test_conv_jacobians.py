"""normkit.conv2d_stat_jacobians: the statistics Jacobians of a convolution (API.md, Functions).

y = conv2d(x, w) with torch's semantics; M = N*H_out*W_out; for output channel c
    mean_c = (1/M) sum y[:, c],   sqmean_c = (1/M) sum y[:, c]^2,
and row c of the two results is d mean_c / d w[c] and d sqmean_c / d w[c]. Checked against a
float64 NumPy reference (patches by fancy indexing, einsum), whose Jacobians are in turn checked by
central finite differences of mean_c and sqmean_c (which also show that channel c depends on
filter c only), against torch's autograd when torch is installed, across dtypes, ISA levels and
thread counts (bitwise), and for the argument errors.
"""
import numpy as np
import pytest

import normkit
from normkit import _core

FD_H = 1e-5

# (N, C_in, H, W, C_out, (kh, kw), stride, padding, dilation, groups), with readable ids.
CASES = {
    "1x1": (2, 3, 4, 5, 4, (1, 1), 1, 0, 1, 1),
    "3x3": (2, 3, 6, 7, 5, (3, 3), 1, 0, 1, 1),
    "stride2": (2, 3, 7, 8, 4, (3, 3), 2, 0, 1, 1),
    "pad1": (2, 2, 5, 6, 3, (3, 3), 1, 1, 1, 1),
    "dil2": (2, 2, 8, 9, 3, (3, 3), 1, 0, 2, 1),
    "groups2": (2, 4, 6, 6, 6, (3, 3), 1, 0, 1, 2),
    "s2p1d2g2": (2, 4, 9, 10, 6, (3, 3), 2, 1, 2, 2),
    "nonsquare": (3, 2, 7, 9, 5, (2, 3), (2, 1), (1, 2), (1, 2), 1),
    "depthwise": (2, 4, 6, 5, 4, (3, 3), 1, 1, 1, 4),
    "kernel_gt_input": (1, 2, 3, 3, 3, (5, 4), 1, 2, 1, 1),
    "one_position": (3, 2, 3, 4, 2, (3, 4), 1, 0, 1, 1),
    "pad_larger_than_kernel": (1, 1, 2, 2, 2, (2, 2), 3, 3, 1, 1),
}


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def make_case(rng, case, dtype=np.float64):
    N, C_in, H, W, C_out, (kh, kw), stride, padding, dilation, groups = case
    x = rng.standard_normal((N, C_in, H, W)).astype(dtype)
    w = (rng.standard_normal((C_out, C_in // groups, kh, kw)) / np.sqrt(C_in // groups * kh * kw)).astype(dtype)
    return x, w, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def patches(x, kh, kw, stride=1, padding=0, dilation=1):
    """(N, C_in, kh, kw, H_out, W_out): the input value each filter element meets at each output
    position, zeros in the padding (torch's conv2d geometry)."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = np.arange(kh)[:, None] * dh + np.arange(Ho)[None, :] * sh  # (kh, Ho)
    cols = np.arange(kw)[:, None] * dw + np.arange(Wo)[None, :] * sw  # (kw, Wo)
    return xp[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def reference(x, w, stride=1, padding=0, dilation=1, groups=1):
    """(y, dmean, dsqmean) in float64: y = conv2d(x, w); dmean[c] = mean over (n, i, j) of the
    patch; dsqmean[c] = 2/M sum y[n, c, i, j] * patch(n, i, j)."""
    C_out, Cg, kh, kw = w.shape
    p = patches(x, kh, kw, stride, padding, dilation)
    N, C_in, _, _, Ho, Wo = p.shape
    pg = p.reshape(N, groups, Cg, kh, kw, Ho, Wo)
    wg = np.asarray(w, np.float64).reshape(groups, C_out // groups, Cg, kh, kw)
    y = np.einsum("gockl,ngcklij->ngoij", wg, pg)
    M = N * Ho * Wo
    dmean = np.broadcast_to(pg.sum(axis=(0, 5, 6))[:, None] / M, wg.shape)
    dsqmean = 2 / M * np.einsum("ngoij,ngcklij->gockl", y, pg)
    return y.reshape(N, C_out, Ho, Wo), dmean.reshape(w.shape), dsqmean.reshape(w.shape)


def conv_loops(x, w, stride, padding, dilation, groups):
    """conv2d by explicit loops, for checking the reference's y without torch."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    N, C_in, H, W = x.shape
    C_out, Cg, kh, kw = w.shape
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((N, C_out, Ho, Wo))
    for n, c, i, j in np.ndindex(N, C_out, Ho, Wo):
        g = c // (C_out // groups)
        for ci, ky, kx in np.ndindex(Cg, kh, kw):
            ih, iw = i * sh - ph + ky * dh, j * sw - pw + kx * dw
            if 0 <= ih < H and 0 <= iw < W:
                y[n, c, i, j] += w[c, ci, ky, kx] * x[n, g * Cg + ci, ih, iw]
    return y


def channel_stats(x, w, **conv):
    y = reference(x, w, **conv)[0]
    return y.mean(axis=(0, 2, 3)), (y * y).mean(axis=(0, 2, 3))


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    return CASES[request.param]


# -- the reference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s2p1d2g2", "nonsquare", "depthwise", "kernel_gt_input"])
def test_reference_conv_matches_loops(rng, name, assert_close):
    x, w, conv = make_case(rng, CASES[name])
    assert_close(reference(x, w, **conv)[0], conv_loops(x, w, **conv), what="reference y")


@pytest.mark.parametrize("name", ["3x3", "s2p1d2g2", "nonsquare", "depthwise"])
def test_reference_jacobians_match_finite_differences(rng, name, assert_close):
    """d mean_c / d w[c] and d sqmean_c / d w[c] by central differences, one weight element at a
    time; every other channel's statistics stay put (channel c depends on filter c only)."""
    x, w, conv = make_case(rng, CASES[name])
    _, dmean, dsqmean = reference(x, w, **conv)
    fd_mean, fd_sq = np.zeros_like(w), np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        wp, wm = w.copy(), w.copy()
        wp[idx] += FD_H
        wm[idx] -= FD_H
        (mp, qp), (mm, qm) = channel_stats(x, wp, **conv), channel_stats(x, wm, **conv)
        dm, dq = (mp - mm) / (2 * FD_H), (qp - qm) / (2 * FD_H)
        c = idx[0]
        fd_mean[idx], fd_sq[idx] = dm[c], dq[c]
        others = np.arange(w.shape[0]) != c
        assert np.all(np.abs(dm[others]) < 1e-9) and np.all(np.abs(dq[others]) < 1e-9), idx
    assert_close(dmean, fd_mean, tol=1e-6, what="dmean vs finite differences")
    assert_close(dsqmean, fd_sq, tol=1e-6, what="dsqmean vs finite differences")


# -- normkit against the reference -----------------------------------------------------------------
def test_matches_reference(rng, case, dtype, assert_close):
    x, w, conv = make_case(rng, case, dtype)
    dmean, dsqmean = normkit.conv2d_stat_jacobians(x, w, **conv)
    _, want_mean, want_sq = reference(x, w, **conv)
    for got, want, what in ((dmean, want_mean, "dmean"), (dsqmean, want_sq, "dsqmean")):
        assert got.dtype == dtype and got.shape == w.shape, what
        assert_close(got, want, dtype, what=what)


def test_float32_close_to_float64(rng, assert_close):
    x, w, conv = make_case(rng, CASES["s2p1d2g2"])
    got32 = normkit.conv2d_stat_jacobians(x.astype(np.float32), w.astype(np.float32), **conv)
    got64 = normkit.conv2d_stat_jacobians(x, w, **conv)
    for a, b in zip(got32, got64):
        assert a.dtype == np.float32 and b.dtype == np.float64
        assert_close(a, b, np.float32)


def test_exact_inputs_give_exact_jacobians():
    """x = 1 and no padding: every patch is all ones, so dmean = 1 and y[c] = sum w[c]
    everywhere, dsqmean[c] = 2 sum w[c] -- exact in any summation order (w in eighths)."""
    w = (np.arange(4 * 3 * 3 * 2, dtype=np.float64).reshape(4, 3, 3, 2) % 7 - 3) / 8
    for dtype in (np.float32, np.float64):
        dmean, dsqmean = normkit.conv2d_stat_jacobians(np.ones((3, 6, 9, 8), dtype), w.astype(dtype),
                                                       stride=2, dilation=(1, 3), groups=2)
        assert np.array_equal(dmean, np.ones_like(w))
        assert np.array_equal(dsqmean, np.broadcast_to(2 * w.sum(axis=(1, 2, 3))[:, None, None, None], w.shape))


@pytest.mark.parametrize("shape", [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
    (3, 32, 30, 29, 8, (3, 3), 1, 1, 1, 1),  # a sample's positions in several blocks
    (2, 2, 6, 5, 260, (1, 2), 1, 0, 1, 1),  # a group's filters in several channel blocks
    (2, 6, 24, 24, 390, (3, 3), 1, 1, 1, 3),  # both, with groups
    (2, 1, 70, 70, 3, (1, 2), 1, 0, 1, 1),  # a tiny fan-in: blocks of at most 4096 positions
], ids=["position_blocks", "channel_blocks", "grouped_blocks", "longest_blocks"])
def test_blocked_shapes_match_reference(rng, shape, assert_close):
    x, w, conv = make_case(rng, shape)
    _, want_mean, want_sq = reference(x, w, **conv)
    got_mean, got_sq = normkit.conv2d_stat_jacobians(x, w, **conv)
    assert_close(got_mean, want_mean, what="dmean")
    assert_close(got_sq, want_sq, what="dsqmean")


@pytest.mark.parametrize("isa", list(_core.supported_isas()))
def test_every_isa_level(rng, isa, dtype, assert_close):
    x, w, conv = make_case(rng, (3, 32, 30, 29, 8, (3, 3), 1, 1, 1, 1), dtype)  # several position blocks
    _, want_mean, want_sq = reference(x, w, **conv)
    before = _core.isa_name()
    _core.set_isa(isa)
    try:
        got_mean, got_sq = normkit.conv2d_stat_jacobians(x, w, **conv)
    finally:
        _core.set_isa(before)
    assert_close(got_mean, want_mean, dtype, what=f"dmean at {isa}")
    assert_close(got_sq, want_sq, dtype, what=f"dsqmean at {isa}")


@pytest.mark.parametrize("dtype_", [np.float32, np.float64], ids=["float32", "float64"])
def test_bitwise_identical_for_any_thread_count(rng, dtype_):
    shapes = [(8, 32, 30, 29, 12, (3, 3), 1, 1, 1, 1), (3, 6, 24, 24, 390, (3, 3), 1, 1, 1, 3),
              (40, 3, 8, 8, 4, (3, 3), 1, 1, 1, 1)]  # 40 samples: fewer ranges than blocks
    before = normkit.get_num_threads()
    try:
        for shape in shapes:
            x, w, conv = make_case(rng, shape, dtype_)
            results = []
            for threads in (1, 2, 3):
                normkit.set_num_threads(threads)
                results.append(b"".join(a.tobytes() for a in normkit.conv2d_stat_jacobians(x, w, **conv)))
            assert results[1] == results[0] and results[2] == results[0], shape
    finally:
        normkit.set_num_threads(before)


# -- inputs: views, read-only arrays, empty results ------------------------------------------------
def test_strided_and_read_only_inputs_are_read_not_written(rng):
    x, w, conv = make_case(rng, CASES["s2p1d2g2"])
    want = normkit.conv2d_stat_jacobians(x, w, **conv)
    xs = np.zeros((x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3]))[..., ::2]
    xs[...] = x
    wf = np.asfortranarray(w)
    x_before, w_before = xs.copy(), wf.copy()
    xs.flags.writeable = wf.flags.writeable = False
    got = normkit.conv2d_stat_jacobians(xs, wf, **conv)
    assert np.array_equal(xs, x_before) and np.array_equal(wf, w_before)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
        assert a.flags.c_contiguous and a.flags.writeable
        assert not np.shares_memory(a, xs) and not np.shares_memory(a, wf)


def test_list_parameters_and_zero_filters(rng):
    x, w, _ = make_case(rng, CASES["nonsquare"])
    a = normkit.conv2d_stat_jacobians(x, w, stride=[2, 1], padding=[1, 2], dilation=[1, 2])
    b = normkit.conv2d_stat_jacobians(x, w, (2, 1), (1, 2), (1, 2), 1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    dmean, dsqmean = normkit.conv2d_stat_jacobians(x, w[:0])
    assert dmean.shape == dsqmean.shape == (0,) + w.shape[1:]


# -- torch -----------------------------------------------------------------------------------------
def torch_jacobians(x, w, stride, padding, dilation, groups):
    """Autograd of sum_c mean_c and of sum_c sqmean_c: channel c depends on filter c only, so row c
    of each gradient is channel c's derivative."""
    torch = pytest.importorskip("torch")
    out = []
    for power in (1, 2):
        wt = torch.from_numpy(np.array(w, np.float64)).requires_grad_(True)
        y = torch.nn.functional.conv2d(torch.from_numpy(np.array(x, np.float64)), wt, stride=stride,
                                       padding=padding, dilation=dilation, groups=groups)
        (y ** power).mean(dim=(0, 2, 3)).sum().backward()
        out.append(wt.grad.numpy())
    return out


@pytest.mark.parametrize("name", ["3x3", "s2p1d2g2", "nonsquare", "depthwise", "kernel_gt_input",
                                  "pad_larger_than_kernel"])
def test_matches_torch_autograd(rng, name, dtype, assert_close):
    x, w, conv = make_case(rng, CASES[name], dtype)
    want_mean, want_sq = torch_jacobians(x, w, **conv)
    got_mean, got_sq = normkit.conv2d_stat_jacobians(x, w, **conv)
    assert_close(got_mean, want_mean, dtype, what="dmean vs torch")
    assert_close(got_sq, want_sq, dtype, what="dsqmean vs torch")


def test_reference_conv_matches_torch(rng, assert_close):
    torch = pytest.importorskip("torch")
    x, w, conv = make_case(rng, CASES["s2p1d2g2"])
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), **conv).numpy()
    assert_close(reference(x, w, **conv)[0], want, what="reference y vs torch")


def test_larger_layer_matches_torch(rng, assert_close):
    """A ResNet-like layer at a small batch: positions in several blocks, float32 GEMMs."""
    x, w, conv = make_case(rng, (2, 32, 28, 28, 48, (3, 3), 1, 1, 1, 1), np.float32)
    want_mean, want_sq = torch_jacobians(x, w, **conv)
    got_mean, got_sq = normkit.conv2d_stat_jacobians(x, w, **conv)
    count = x.shape[0] * 28 * 28
    assert_close(got_mean, want_mean, np.float32, count, what="dmean vs torch")
    assert_close(got_sq, want_sq, np.float32, count, what="dsqmean vs torch")


# -- errors ----------------------------------------------------------------------------------------
X = np.zeros((2, 4, 6, 6))
WT = np.zeros((6, 2, 3, 3))


@pytest.mark.parametrize("args, kwargs, error, name", [
    ((X.tolist(), WT), {}, TypeError, "conv_input"),
    ((X.astype(np.int64), WT), {}, TypeError, "conv_input"),
    ((X.astype(np.float16), WT.astype(np.float16)), {}, TypeError, "conv_input"),
    ((X[0], WT), {}, ValueError, "conv_input"),
    ((X, "w"), {}, TypeError, "weight"),
    ((X, WT.astype(np.float32)), {}, TypeError, "weight"),
    ((X, WT[0]), {}, ValueError, "weight"),
    ((X, WT), {}, ValueError, "weight"),  # 2 input channels per filter, C_in/groups = 4
    ((X, np.zeros((6, 2, 0, 3))), {"groups": 2}, ValueError, "weight"),
    ((X, WT), {"groups": 0}, ValueError, "groups"),
    ((X, WT), {"groups": 2.0}, TypeError, "groups"),
    ((X, WT), {"groups": True}, TypeError, "groups"),
    ((X, np.zeros((6, 1, 3, 3))), {"groups": 3}, ValueError, "groups"),  # 3 does not divide C_in
    ((X, np.zeros((6, 1, 3, 3))), {"groups": 4}, ValueError, "groups"),  # 4 does not divide C_out
    ((X, WT), {"groups": 2, "stride": 0}, ValueError, "stride"),
    ((X, WT), {"groups": 2, "stride": (1,)}, TypeError, "stride"),
    ((X, WT), {"groups": 2, "stride": 1.0}, TypeError, "stride"),
    ((X, WT), {"groups": 2, "stride": "1"}, TypeError, "stride"),
    ((X, WT), {"groups": 2, "padding": -1}, ValueError, "padding"),
    ((X, WT), {"groups": 2, "padding": "same"}, TypeError, "padding"),
    ((X, WT), {"groups": 2, "dilation": (1, 0)}, ValueError, "dilation"),
    ((X, WT), {"groups": 2, "dilation": 3}, ValueError, "conv_input"),  # dilated kernel 7 > 6
    ((X, np.zeros((6, 2, 7, 1))), {"groups": 2}, ValueError, "conv_input"),
    ((X[:0], WT), {"groups": 2}, ValueError, "conv_input"),
])
def test_errors_name_the_argument(args, kwargs, error, name):
    with pytest.raises(error, match=rf"^{name}: expected"):
        normkit.conv2d_stat_jacobians(*args, **kwargs)


def test_core_rejects_bad_geometry_without_crashing():
    """The binding checks what it reads even when the Python checks are bypassed."""
    with pytest.raises(ValueError):
        _core.conv2d_stat_jacobians(X, WT, 1, 1, 0, 0, 1, 1, 1)  # C_in/groups mismatch
    with pytest.raises(ValueError):
        _core.conv2d_stat_jacobians(X, WT, 0, 1, 0, 0, 1, 1, 2)
    with pytest.raises(ValueError):
        _core.conv2d_stat_jacobians(X, WT, 1, 1, -1, 0, 1, 1, 2)
    with pytest.raises(ValueError):
        _core.conv2d_stat_jacobians(X, WT, 1, 1, 0, 0, 1, 1, 1 << 40)
    with pytest.raises(TypeError):
        _core.conv2d_stat_jacobians(X, WT.astype(np.float32), 1, 1, 0, 0, 1, 1, 2)
    with pytest.raises(TypeError, match="C-contiguous"):
        _core.conv2d_stat_jacobians(np.zeros((2, 4, 6, 12))[..., ::2], WT, 1, 1, 0, 0, 1, 1, 2)
