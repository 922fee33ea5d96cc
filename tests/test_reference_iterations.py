"""The across-iterations references prove themselves: MABN, CBN, BKN (reference.py, "Research
variants III").

All float64, NumPy and reference.py only:
- every exact backward equals central finite differences of its own forward (the batch-free
  tests' `_check_backward`, conftest's FD_TOL) for the input and every argument it has a
  gradient for, over (N, C, H, W) and (N, C) inputs: CBN with 0, 1 and 3 earlier terms (one of
  them clamped), BKN for all six gradients with C != C_prev;
- MABN's training backward is the paper's, not the derivative: it is spelled out entry by entry
  in plain loops, shown to be the derivative exactly where the equations say (warm-up; a
  one-slot buffer before step 1000), and shown to differ from it -- in the way the equations
  predict -- once the buffer averages; a 1200-step run crosses every boundary of its schedule
  (warm-up, the buffer filling, r's clip opening at step 1000) against a step-by-step shadow;
- each layer where its equations collapse to batch norm (CBN with no history, BKN with no prior,
  gain 0, or a discarded prediction) equals ref.batch_norm and its backward.
"""
import copy
import math
from collections import deque

import numpy as np
import pytest

import reference as ref
from conftest import FD_TOL
from test_reference_batch_free import _check_backward

SHAPES = [pytest.param((2, 3, 2, 2), id="2x3x2x2"), pytest.param((5, 3), id="NC_input-5x3")]


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    return np.asarray(v).reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))


def _affine_params(rng, C):
    return rng.uniform(0.5, 1.5, C), rng.normal(0.0, 0.5, C)


def _entries(a, c):
    """Channel c's entries of an (N, C, *spatial) array, as plain floats, in C order."""
    return [float(v) for v in np.moveaxis(a, 1, 0)[c].ravel()]


# == MABN ==========================================================================================

def _mabn_advanced(rng, shape, steps, **kw):
    """A layer after `steps` training steps (forward and backward) on random data."""
    layer = ref.MABNReference(shape[1], **kw)
    w, b = _affine_params(rng, shape[1])
    for _ in range(steps):
        layer.forward(rng.normal(0.2, 1.0, shape), w, b)
        layer.backward(rng.normal(size=shape))
    return layer


def _mabn_fd_pair(template, training=True):
    """forward/backward closures for _check_backward: each call steps its own copy of
    `template`, so every finite-difference evaluation sees the same state."""
    def forward(x, w, b):
        return copy.deepcopy(template).forward(x, w, b, training)

    def backward(x, dy, w, b):
        layer = copy.deepcopy(template)
        layer.forward(x, w, b, training)
        return layer.backward(dy)
    return forward, backward


def test_mabn_initial_state():
    layer = ref.MABNReference(3)
    assert (layer.buffer_size, layer.eps, layer.momentum, layer.warmup_iters, layer.r_max) == \
        (16, 1e-5, 0.98, 100, 5.0)
    assert layer.iters == 0
    assert layer.buffer_x2.shape == layer.buffer_gz.shape == (16, 3)
    assert not layer.buffer_x2.any() and not layer.buffer_gz.any()
    assert np.array_equal(layer.running_var, np.ones(3))


@pytest.mark.parametrize("shape", SHAPES)
def test_mabn_first_step_is_rms_normalization_spelled_out(shape, rng, assert_close):
    # step 1 is in warm-up: chi2_S = chi2_B, r = 1, so y = w x/sqrt(mean x^2 + eps) + b.
    eps, momentum = 1e-5, 0.9
    layer = ref.MABNReference(shape[1], buffer_size=4, eps=eps, momentum=momentum,
                              warmup_iters=10)
    x = rng.normal(0.3, 1.2, shape)
    w, b = _affine_params(rng, shape[1])
    y = layer.forward(x, w, b)
    idx = (1, 2) + (1,) * (len(shape) - 2)          # one entry, of channel 2
    values = _entries(x, 2)
    chi2 = sum(v * v for v in values) / len(values)
    want = w[2] * x[idx] / math.sqrt(chi2 + eps) + b[2]
    assert abs(y[idx] - want) <= 1e-12 * max(1.0, abs(want))
    assert layer.iters == 1
    assert np.array_equal(layer.last["r"], np.ones(shape[1]))
    assert_close(layer.buffer_x2[0], (x ** 2).mean(axis=_axes(x)), what="slot 0")
    assert not layer.buffer_x2[1:].any()
    # running_var after the step, by hand: momentum*1 + (1 - momentum)*chi2_S
    assert abs(layer.running_var[2] - (momentum * 1.0 + (1 - momentum) * chi2)) <= 1e-14


@pytest.mark.parametrize("shape", SHAPES + [pytest.param((1, 2, 3, 1), id="N1-1x2x3x1")])
@pytest.mark.parametrize("steps_before, buffer_size", [(0, 4), (5, 4), (50, 1)],
                         ids=["first_step", "step6_warmup", "step51_one_slot"])
def test_mabn_backward_is_the_derivative_where_the_window_is_the_batch(
        shape, steps_before, buffer_size, rng, assert_close):
    # In warm-up (t < warmup_iters = 10), or past it with a one-slot buffer (chi2_S = chi2_B,
    # psi_S = psi_B) while r is clipped to 1 (t <= 1000), MABN is y = w x/s + b with
    # s = sqrt(mean x^2 + eps), and its backward is that map's derivative:
    # dx = (g - z*mean(g z))/s, g = dy*w, z = x/s.
    template = _mabn_advanced(rng, shape, steps_before, buffer_size=buffer_size, warmup_iters=10)
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, shape[1])
    forward, backward = _mabn_fd_pair(template)
    _check_backward(forward, backward, x, dy, [w, b], ("weight", "bias"), assert_close)
    s = np.sqrt((x ** 2).mean(axis=_axes(x), keepdims=True) + 1e-5)
    z, g = x / s, dy * _per_channel(w, x)
    assert_close(backward(x, dy, w, b)[0], (g - z * (g * z).mean(axis=_axes(x), keepdims=True)) / s,
                 what="dx, the RMS normalization's derivative")


def test_mabn_backward_past_warmup_averages_psi_instead_of_differentiating(rng, assert_close):
    # Once chi2_S averages buffer_size slots, the exact derivative of the forward (r = 1 before
    # step 1000) is dx = (g - z psi_B/buffer_size)/s: chi2_B enters chi2_S with weight
    # 1/buffer_size. The paper's backward uses psi_S, the average of the buffered psi's,
    # instead -- deliberately not the derivative. dweight and dbias are exact (y is affine in
    # them).
    shape, bs = (2, 3, 2, 2), 4
    template = _mabn_advanced(rng, shape, 20, buffer_size=bs, warmup_iters=2)
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, 3)
    forward, backward = _mabn_fd_pair(template)

    def loss():
        return float(np.sum(forward(x, w, b) * dy))

    fd_dx = ref.numerical_gradient(loss, x)
    layer = copy.deepcopy(template)
    layer.forward(x, w, b)
    dx, dw, db = layer.backward(dy)
    assert_close(dw, ref.numerical_gradient(loss, w), tol=FD_TOL, what="dweight")
    assert_close(db, ref.numerical_gradient(loss, b), tol=FD_TOL, what="dbias")
    s = _per_channel(layer.last["s"], x)
    z, g = x / s, dy * _per_channel(w, x)
    psi_b = _per_channel(layer.last["psi_B"], x)
    assert_close(fd_dx, (g - z * psi_b / bs) / s, tol=FD_TOL, what="exact dx")
    assert_close(dx, (g - z * _per_channel(layer.last["psi_S"], x)) / s, what="paper's dx")
    assert np.max(np.abs(dx - fd_dx)) > 1e-2, "the paper's dx should differ from the derivative"


def test_mabn_step_past_warmup_spelled_out(rng):
    # Step 1501 of a layer whose buffers and running variance are set by hand: the buffered
    # chi2/psi windows are active and r's clip is [1/r_max, r_max] -- open in channel 0, binding
    # in channel 1. Everything recomputed from the equations in plain float loops.
    C, bs, eps, momentum, r_max = 2, 3, 1e-5, 0.9, 1.5
    layer = ref.MABNReference(C, buffer_size=bs, eps=eps, momentum=momentum, warmup_iters=100,
                              r_max=r_max)
    layer.iters = 1500
    layer.buffer_x2[...] = rng.uniform(0.5, 2.0, (bs, C))
    layer.buffer_gz[...] = rng.normal(0.0, 0.3, (bs, C))
    old_x2, old_gz = layer.buffer_x2.copy(), layer.buffer_gz.copy()
    x = rng.normal(0.3, 1.2, (2, C, 2, 2))
    dy = rng.normal(size=x.shape)
    w, b = np.array([1.3, 0.7]), np.array([0.2, -0.4])
    t, slot = 1501, 1500 % bs
    M = 8

    want = {}
    rv_old = []
    for c in range(C):
        xs = _entries(x, c)
        chi2_b = sum(v * v for v in xs) / M
        slots = [float(v) for v in old_x2[:, c]]
        slots[slot] = chi2_b
        chi2_s = sum(slots) / bs
        rv = chi2_s * (1.2 if c == 0 else 0.25)          # r ~ 0.91 (open), ~ 2 (clipped)
        rv_old.append(rv)
        s = math.sqrt(chi2_s + eps)
        r_raw = s / math.sqrt(rv + eps)
        r = min(max(r_raw, 1.0 / r_max), r_max)
        assert (r == r_raw) == (c == 0)
        dys = _entries(dy, c)
        z = [v / s for v in xs]
        g = [d * w[c] * r for d in dys]
        psi_b = sum(gi * zi for gi, zi in zip(g, z)) / M
        gz_slots = [float(v) for v in old_gz[:, c]]
        gz_slots[slot] = psi_b
        psi_s = sum(gz_slots) / bs
        want[c] = dict(
            y=[w[c] * (r * zi) + b[c] for zi in z], r=r, chi2_b=chi2_b, psi_b=psi_b,
            rv=momentum * rv + (1 - momentum) * chi2_s,
            dx=[(gi - zi * psi_s) / s for gi, zi in zip(g, z)],
            dw=sum(d * r * zi for d, zi in zip(dys, z)), db=sum(dys))
    layer.running_var[...] = rv_old

    y = layer.forward(x, w, b)
    dx, dw, db = layer.backward(dy)
    assert layer.iters == t
    for c in range(C):
        wc = want[c]
        np.testing.assert_allclose(_entries(y, c), wc["y"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(_entries(dx, c), wc["dx"], rtol=0, atol=1e-12)
        np.testing.assert_allclose([dw[c], db[c], layer.running_var[c], layer.last["r"][c]],
                                   [wc["dw"], wc["db"], wc["rv"], wc["r"]], rtol=0, atol=1e-12)
        np.testing.assert_allclose([layer.buffer_x2[slot, c], layer.buffer_gz[slot, c]],
                                   [wc["chi2_b"], wc["psi_b"]], rtol=0, atol=1e-13)
    others = [k for k in range(bs) if k != slot]
    assert np.array_equal(layer.buffer_x2[others], old_x2[others])
    assert np.array_equal(layer.buffer_gz[others], old_gz[others])


@pytest.mark.parametrize("buffer_size, warmup_iters", [(4, 10), (4, 2)],
                         ids=["warmup_past_buffer", "buffer_past_warmup"])
def test_mabn_1205_steps_cross_every_boundary(buffer_size, warmup_iters, rng):
    # A shadow written with a deque of the last buffer_size batches' statistics, step by step,
    # against the reference's ring buffers. Boundaries crossed: the warm-up's end at
    # max(buffer_size + 1, warmup_iters); r's clip [1, 1] until step 1000, [1/r_max, r_max]
    # after. The input's scale drifts (period 60 steps, chi2 varying by e^(+-1.2)) faster than
    # running_var follows (momentum 0.98), so after step 1000 r's clip at 1.05 binds.
    shape, C, eps, momentum, r_max, steps = (2, 3, 2, 2), 3, 1e-5, 0.98, 1.05, 1205
    layer = ref.MABNReference(C, buffer_size=buffer_size, eps=eps, momentum=momentum,
                              warmup_iters=warmup_iters, r_max=r_max)
    w, b = _affine_params(rng, C)
    wc, bc = w.reshape(1, C, 1, 1), b.reshape(1, C, 1, 1)
    channel_scale = rng.uniform(0.5, 2.0, C).reshape(1, C, 1, 1)
    hist_x2, hist_gz = deque(maxlen=buffer_size), deque(maxlen=buffer_size)
    rv = np.ones(C)
    err = dict(y=0.0, rv=0.0, dx=0.0, dw=0.0, slot_x2=0.0, slot_gz=0.0)
    first_windowed = None
    unit_r_with_raw_off_one = clipped = open_after = 0

    for t in range(1, steps + 1):
        x = channel_scale * math.exp(0.6 * math.sin(2 * math.pi * t / 60)) \
            * rng.normal(0.0, 1.0, shape)
        dy = rng.normal(size=shape)
        before_x2, before_gz = layer.buffer_x2.copy(), layer.buffer_gz.copy()
        y = layer.forward(x, w, b)
        dx, dw, db = layer.backward(dy)
        assert layer.iters == t

        slot = (t - 1) % buffer_size
        others = [k for k in range(buffer_size) if k != slot]
        assert np.array_equal(layer.buffer_x2[others], before_x2[others]), f"step {t}"
        assert np.array_equal(layer.buffer_gz[others], before_gz[others]), f"step {t}"

        chi2_b = (x ** 2).mean(axis=(0, 2, 3))
        hist_x2.append(chi2_b)
        windowed = not (t <= buffer_size or t < warmup_iters)
        if windowed and first_windowed is None:
            first_windowed = t
        chi2_s = np.mean(hist_x2, axis=0) if windowed else chi2_b
        s = np.sqrt(chi2_s + eps)
        r_raw = s / np.sqrt(rv + eps)
        if t <= max(1000, warmup_iters):
            r = np.ones(C)
            unit_r_with_raw_off_one += int(np.sum(np.abs(r_raw - 1.0) > 1e-3))
        else:
            r = np.clip(r_raw, 1 / r_max, r_max)
            clipped += int(np.sum((r_raw > r_max) | (r_raw < 1 / r_max)))
            open_after += int(np.sum((r_raw < r_max) & (r_raw > 1 / r_max) & (r_raw != 1.0)))
        rv = momentum * rv + (1 - momentum) * chi2_s
        z = x / s.reshape(1, C, 1, 1)
        rr = r.reshape(1, C, 1, 1)
        g = dy * wc * rr
        psi_b = (g * z).mean(axis=(0, 2, 3))
        hist_gz.append(psi_b)
        psi_s = np.mean(hist_gz, axis=0) if windowed else psi_b

        for key, got, want in (
                ("y", y, wc * (rr * z) + bc), ("rv", layer.running_var, rv),
                ("dx", dx, (g - z * psi_s.reshape(1, C, 1, 1)) / s.reshape(1, C, 1, 1)),
                ("dw", np.concatenate([dw, db]),
                 np.concatenate([(dy * rr * z).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3))])),
                ("slot_x2", layer.buffer_x2[slot], chi2_b),
                ("slot_gz", layer.buffer_gz[slot], psi_b)):
            scale = max(1.0, float(np.max(np.abs(want))))
            err[key] = max(err[key], float(np.max(np.abs(got - want))) / scale)

    assert first_windowed == max(buffer_size + 1, warmup_iters)
    assert max(err.values()) <= 1e-12, err
    assert unit_r_with_raw_off_one > 100, "r's [1, 1] clip should bind before step 1000"
    assert clipped > 50, f"r's [1/r_max, r_max] clip bound {clipped} times after step 1000"
    assert open_after > 10, f"r was strictly inside its clip {open_after} times after step 1000"


@pytest.mark.parametrize("shape", SHAPES)
def test_mabn_inference_is_an_affine_map_of_running_var_and_changes_no_state(shape, rng,
                                                                            assert_close):
    eps = 1e-5
    layer = _mabn_advanced(rng, shape, 7, buffer_size=4, warmup_iters=3, eps=eps)
    before = (layer.iters, layer.buffer_x2.copy(), layer.buffer_gz.copy(),
              layer.running_var.copy())
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, shape[1])
    y = layer.forward(x, w, b, training=False)
    want = _per_channel(w, x) * x / np.sqrt(_per_channel(before[3], x) + eps) + _per_channel(b, x)
    assert_close(y, want, what="y")
    layer.backward(dy)
    assert layer.iters == before[0]
    for got, was in zip((layer.buffer_x2, layer.buffer_gz, layer.running_var), before[1:]):
        assert np.array_equal(got, was)
    forward, backward = _mabn_fd_pair(layer, training=False)
    _check_backward(forward, backward, x, dy, [w, b], ("weight", "bias"), assert_close)


def test_mabn_backward_before_forward_raises():
    with pytest.raises(RuntimeError):
        ref.MABNReference(2).backward(np.zeros((1, 2)))


# == CBN ===========================================================================================

def test_cbn_window_statistics_hand_example():
    # C = 2, the preceding layer's weight of shape (2, 3). Entry 1's compensation moves both
    # statistics; entry 2's moves channel 0's mean square below its mean's square (1.5 -> 0.5
    # < 1^2), so its clamp binds after compensation, not before.
    weight_t = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0]])
    entry1 = (np.array([0.5, -1.0]), np.array([1.0, 2.0]),
              np.array([[1.0, 1.0, 0.0], [0.5, -1.0, 0.0]]),         # delta [[0,1,0],[0,0,1]]
              np.array([[0.5, 0.25, 3.0], [1.0, 1.0, 2.0]]),         # -> mu = [0.75, 1]
              np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]))          # -> nu = [1, 2.5]
    entry2 = (np.array([1.0, 2.0]), np.array([1.5, 5.0]), np.zeros((2, 3)),  # delta = weight_t
              np.zeros((2, 3)),                                      # -> mu = [1, 2]
              np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))         # -> nu = [0.5, 5]
    mean_t, sqmean_t = np.array([0.0, 1.0]), np.array([2.0, 3.0])

    mus, nus = ref.cbn_compensated_history(weight_t, [entry1, entry2])
    np.testing.assert_array_equal(np.array(mus), [[0.75, 1.0], [1.0, 2.0]])
    np.testing.assert_array_equal(np.array(nus), [[1.0, 2.5], [0.5, 5.0]])

    mu_bar, var_bar, terms = ref.cbn_window_statistics(mean_t, sqmean_t, weight_t,
                                                       [entry1, entry2], eps=1e-5)
    assert terms == 3
    # max(nu, mu^2) per term: current [2, 3], entry 1 [1, 2.5], entry 2 [max(0.5, 1) = 1, 5]
    want_mu = np.array([1.75 / 3, 4.0 / 3])
    want_nu = np.array([4.0 / 3, 3.5])
    np.testing.assert_allclose(mu_bar, want_mu, rtol=0, atol=1e-15)
    np.testing.assert_allclose(var_bar, want_nu - want_mu ** 2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(var_bar, [8.9375 / 9, 15.5 / 9], rtol=0, atol=1e-15)
    # without the clamp channel 0 would be (2 + 1 + 0.5)/3 - mu^2: the clamp changed it
    assert abs(var_bar[0] - (3.5 / 3 - want_mu[0] ** 2)) > 0.1
    # no history: the current step alone
    mu1, var1, terms1 = ref.cbn_window_statistics(mean_t, sqmean_t, weight_t, [])
    assert terms1 == 1
    np.testing.assert_array_equal(mu1, mean_t)
    np.testing.assert_array_equal(var1, sqmean_t - mean_t ** 2)
    # the current term is clamped too: a given sqmean_t below mean_t^2 counts as mean_t^2
    _, var2, _ = ref.cbn_window_statistics(np.array([1.0, 2.0]), np.array([0.5, 5.0]),
                                           weight_t, [])
    np.testing.assert_array_equal(var2, [0.0, 1.0])


def test_cbn_compensation_sums_over_each_conv_filter(rng):
    # weights (C_out, C_in, kh, kw) = (3, 2, 2, 2): row c's compensation sums over its 8 entries.
    weight_t = rng.normal(size=(3, 2, 2, 2))
    entry = (rng.normal(size=3), rng.uniform(1.0, 2.0, 3), rng.normal(size=(3, 2, 2, 2)),
             rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 2, 2, 2)))
    mu, nu = ref.cbn_compensate(entry, weight_t)
    for c in range(3):
        delta = [float(a - b) for a, b in zip(weight_t[c].ravel(), entry[2][c].ravel())]
        want_mu = entry[0][c] + sum(d * j for d, j in zip(delta, entry[3][c].ravel()))
        want_nu = entry[1][c] + sum(d * j for d, j in zip(delta, entry[4][c].ravel()))
        assert abs(mu[c] - want_mu) <= 1e-13 and abs(nu[c] - want_nu) <= 1e-13


def _cbn_history(rng, x, count, clamp):
    """`count` compensated earlier terms near x's statistics; with `clamp`, the second-oldest
    term's (or the only one's) nu is below its mu^2 in channels 0 and 1."""
    axes = _axes(x)
    mus, nus = [], []
    for _ in range(count):
        mu = x.mean(axis=axes) + rng.normal(0.0, 0.3, x.shape[1])
        mus.append(mu)
        nus.append(mu ** 2 + x.var(axis=axes) * rng.uniform(0.7, 1.3, x.shape[1]))
    if clamp and count:
        k = min(1, count - 1)
        nus[k][:2] = mus[k][:2] ** 2 - rng.uniform(0.2, 0.5, 2)
    return mus, nus


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("earlier", [0, 1, 3], ids=["no_history", "1_earlier", "3_earlier"])
def test_cbn_backward_equals_finite_differences(shape, earlier, rng, assert_close):
    eps = 1e-5
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, shape[1])
    mus, nus = _cbn_history(rng, x, earlier, clamp=True)
    if earlier:
        k = min(1, earlier - 1)
        assert np.all(nus[k][:2] < mus[k][:2] ** 2), "the clamp must bind for that term"
    _check_backward(lambda x, w, b: ref.cross_iteration_batch_norm(x, w, b, mus, nus, eps),
                    lambda x, dy, w, b: ref.cross_iteration_batch_norm_backward(
                        x, dy, w, b, mus, nus, eps),
                    x, dy, [w, b], ("weight", "bias"), assert_close)


@pytest.mark.parametrize("shape", SHAPES)
def test_cbn_forward_is_the_window_statistics_of_the_compensated_history(shape, rng,
                                                                        assert_close):
    # The full chain: raw history entries -> cbn_window_statistics with the current step's
    # mean(x), mean(x^2) -> y by hand; and cross_iteration_batch_norm given the compensated
    # terms gives the same y. One entry's compensated nu is pushed below mu^2 (clamp binds), and
    # y differs from what the unclamped window would give.
    eps, C = 1e-5, shape[1]
    x = rng.normal(0.3, 1.2, shape)
    w, b = _affine_params(rng, C)
    weight_t = rng.normal(size=(C, 2, 3))
    history = []
    for _ in range(3):
        history.append((x.mean(axis=_axes(x)) + rng.normal(0, 0.3, C), rng.uniform(1.5, 2.5, C),
                        weight_t + rng.normal(0, 0.1, (C, 2, 3)), rng.normal(0, 0.2, (C, 2, 3)),
                        rng.normal(0, 0.2, (C, 2, 3))))
    mus, nus = ref.cbn_compensated_history(weight_t, history)
    shift = nus[1][0] - mus[1][0] ** 2 + 0.4         # entry 1, channel 0: nu -> mu^2 - 0.4
    history[1] = history[1][:1] + (history[1][1] - shift,) + history[1][2:]
    mus, nus = ref.cbn_compensated_history(weight_t, history)
    assert nus[1][0] < mus[1][0] ** 2
    mu_bar, var_bar, terms = ref.cbn_window_statistics(
        x.mean(axis=_axes(x)), (x ** 2).mean(axis=_axes(x)), weight_t, history, eps)
    assert terms == 4
    want = _per_channel(w, x) * (x - _per_channel(mu_bar, x)) / np.sqrt(
        _per_channel(var_bar, x) + eps) + _per_channel(b, x)
    y = ref.cross_iteration_batch_norm(x, w, b, mus, nus, eps)
    assert_close(y, want, what="y")
    unclamped_nu = (np.sum(nus, axis=0) + (x ** 2).mean(axis=_axes(x))) / 4
    unclamped = (x - _per_channel(mu_bar, x)) / np.sqrt(
        _per_channel(unclamped_nu - mu_bar ** 2, x) + eps)
    assert np.max(np.abs(y - (_per_channel(w, x) * unclamped + _per_channel(b, x)))) > 1e-3


@pytest.mark.parametrize("shape", SHAPES + [pytest.param((1, 2, 3, 1), id="N1-1x2x3x1")])
def test_cbn_without_history_is_batch_norm(shape, rng, assert_close):
    eps = 1e-5
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, shape[1])
    assert_close(ref.cross_iteration_batch_norm(x, w, b, [], [], eps),
                 ref.batch_norm(x, w, b, eps), what="y")
    assert_close(ref.cross_iteration_batch_norm(x, w, b, [], [], eps),
                 _per_channel(w, x) * ref.standardize(x, _axes(x), eps) + _per_channel(b, x),
                 what="y (standardize)")
    for got, want, what in zip(ref.cross_iteration_batch_norm_backward(x, dy, w, b, [], [], eps),
                               ref.batch_norm_backward(x, dy, w, b, eps),
                               ("dx", "dweight", "dbias")):
        assert_close(got, want, what=what)


# == BKN ===========================================================================================

BKN_NAMES = ("weight", "bias", "A", "prior_mean", "prior_var")


def _bkn_pair(gain, eps=1e-5):
    def forward(x, w, b, A, pm, pv):
        return ref.batch_kalman_norm(x, w, b, A, pm, pv, gain, eps)[0]

    def backward(x, dy, w, b, A, pm, pv):
        g = ref.batch_kalman_norm_backward(x, dy, w, b, A, pm, pv, gain, eps)
        return g["x"], g["weight"], g["bias"], g["A"], g["prior_mean"], g["prior_var"]
    return forward, backward


def _bkn_prior(rng, C, C_prev):
    return (rng.normal(0.0, 0.5, (C, C_prev)), rng.normal(0.0, 1.0, C_prev),
            rng.uniform(0.5, 1.5, C_prev))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gain", [0.9, 0.3], ids=["gain0.9", "gain0.3"])
def test_bkn_backward_equals_finite_differences(shape, gain, rng, assert_close):
    C, C_prev = shape[1], 4
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, C)
    A, pm, pv = _bkn_prior(rng, C, C_prev)
    assert ref.batch_kalman_norm(x, w, b, A, pm, pv, gain)[3], "the prediction must be used"
    forward, backward = _bkn_pair(gain)
    _check_backward(forward, backward, x, dy, [w, b, A, pm, pv], BKN_NAMES, assert_close)


def test_bkn_forward_spelled_out(rng):
    eps, p, C, C_prev = 1e-5, 0.8, 3, 4
    x = rng.normal(0.3, 1.2, (2, C, 2, 3))
    w, b = _affine_params(rng, C)
    A, pm, pv = _bkn_prior(rng, C, C_prev)
    y, post_mean, post_var, used = ref.batch_kalman_norm(x, w, b, A, pm, pv, p, eps)
    assert used is True
    ratios = []
    for c in range(C):
        xs = _entries(x, c)
        mu_b = sum(xs) / len(xs)
        var_b = sum((v - mu_b) ** 2 for v in xs) / len(xs)
        mu_pred = sum(A[c, k] * pm[k] for k in range(C_prev))
        var_pred = sum(A[c, k] ** 2 * pv[k] for k in range(C_prev))
        ratios.append(var_pred / var_b)
        mu = p * mu_pred + (1 - p) * mu_b
        var = p * var_pred + (1 - p) * var_b + p * (1 - p) * (mu_b - mu_pred) ** 2
        assert abs(post_mean[c] - mu) <= 1e-13 and abs(post_var[c] - var) <= 1e-13
        want = [w[c] * (v - mu) / math.sqrt(var + eps) + b[c] for v in xs]
        np.testing.assert_allclose(_entries(y, c), want, rtol=0, atol=1e-12)
    assert sum(ratios) / C < 100


def _assert_is_batch_norm(x, dy, w, b, A, pm, pv, gain, eps, assert_close, used):
    y, post_mean, post_var, used_prior = ref.batch_kalman_norm(x, w, b, A, pm, pv, gain, eps)
    assert used_prior is used
    assert_close(y, ref.batch_norm(x, w, b, eps), what="y")
    mean, var = x.mean(axis=_axes(x)), x.var(axis=_axes(x))
    assert_close(post_mean, mean, what="post_mean")
    assert_close(post_var, var, what="post_var (biased)")
    grads = ref.batch_kalman_norm_backward(x, dy, w, b, A, pm, pv, gain, eps)
    assert set(grads) == {"x", "weight", "bias", "A", "prior_mean", "prior_var"}
    for key, want in zip(("x", "weight", "bias"), ref.batch_norm_backward(x, dy, w, b, eps)):
        assert_close(grads[key], want, what=f"d{key}")
    return grads


@pytest.mark.parametrize("shape", SHAPES)
def test_bkn_discarded_prediction_is_batch_norm_with_zero_prior_gradients(shape, rng,
                                                                          assert_close):
    C = shape[1]
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, C)
    A, pm, _ = _bkn_prior(rng, C, 4)
    pv = np.full(4, 1e4)                   # var_pred ~ 1e4 |A_c|^2 >> 100 var_B
    grads = _assert_is_batch_norm(x, dy, w, b, A, pm, pv, 0.9, 1e-5, assert_close, used=False)
    for key, p in (("A", A), ("prior_mean", pm), ("prior_var", pv)):
        assert grads[key].shape == p.shape and not grads[key].any(), f"d{key} should be zero"
    forward, backward = _bkn_pair(0.9)
    _check_backward(forward, backward, x, dy, [w, b, A, pm, pv], BKN_NAMES, assert_close)


@pytest.mark.parametrize("shape", SHAPES)
def test_bkn_gain_zero_is_batch_norm(shape, rng, assert_close):
    C = shape[1]
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, C)
    A, pm, pv = _bkn_prior(rng, C, 4)
    grads = _assert_is_batch_norm(x, dy, w, b, A, pm, pv, 0.0, 1e-5, assert_close, used=True)
    for key in ("A", "prior_mean", "prior_var"):
        assert not grads[key].any(), f"d{key} should be zero at gain 0"


@pytest.mark.parametrize("shape", SHAPES)
def test_bkn_without_prior_is_batch_norm(shape, rng, assert_close):
    C = shape[1]
    x = rng.normal(0.3, 1.2, shape)
    dy = rng.normal(size=shape)
    w, b = _affine_params(rng, C)
    grads = _assert_is_batch_norm(x, dy, w, b, None, None, None, 0.9, 1e-5, assert_close,
                                  used=False)
    assert grads["A"] is None and grads["prior_mean"] is None and grads["prior_var"] is None
    _check_backward(lambda x, w, b: ref.batch_kalman_norm(x, w, b, None, None, None)[0],
                    lambda x, dy, w, b: (lambda g: (g["x"], g["weight"], g["bias"]))(
                        ref.batch_kalman_norm_backward(x, dy, w, b, None, None, None)),
                    x, dy, [w, b], ("weight", "bias"), assert_close)


@pytest.mark.parametrize("prior_var, used", [
    ([100.0, 100.0, 100.0], False), ([50.0, 150.0, 100.0], False),
    ([100.0, 100.0, 99.99], True), ([250.0, 25.0, 24.0], True)],
    ids=["mean_ratio_exactly_100", "mean_100_uneven", "mean_just_below", "one_channel_over_100"])
def test_bkn_guard_is_the_mean_ratio_at_least_100(prior_var, used, assert_close):
    # Each channel's entries are +-1: mu_B = 0, var_B = 1 exactly; A = I: var_pred = prior_var
    # exactly, so the mean ratio is exactly what the parameters say.
    x = np.tile(np.array([1.0, -1.0, -1.0, 1.0])[:, None], (1, 3))
    A, pm, pv = np.eye(3), np.array([0.5, -0.5, 0.25]), np.array(prior_var)
    w, b = np.ones(3), np.zeros(3)
    y, post_mean, post_var, used_prior = ref.batch_kalman_norm(x, w, b, A, pm, pv, 0.5)
    assert used_prior is used
    if used:
        assert_close(post_mean, 0.5 * pm, what="post_mean")
        assert_close(post_var, 0.5 * pv + 0.5 + 0.25 * pm ** 2, what="post_var")
    else:
        np.testing.assert_array_equal(post_mean, np.zeros(3))
        np.testing.assert_array_equal(post_var, np.ones(3))
