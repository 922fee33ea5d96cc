"""The raw core binding (normkit._core) refuses plans that would index out of bounds, so a
direct caller gets a ValueError, never a crash (fuzzer findings, kept as regression tests)."""
import numpy as np
import pytest

from normkit import _core


@pytest.mark.parametrize("make, message", [
    (lambda: _core.plan_per_channel_in_sets(2, 2, 3, [0, -1]), "sample_group entry out of range"),
    (lambda: _core.plan_per_channel(1, 2 ** 62, 4), "overflows int64"),
    (lambda: _core.plan_per_channel(2 ** 40, 2 ** 20, 2 ** 10), "overflows int64"),
    (lambda: _core.plan_per_sample_group(2, 4, 3, 3), "num_groups must divide C"),
    (lambda: _core.plan_per_sample_group(2, 4, 3, 0), "num_groups must divide C"),
    (lambda: _core.plan_per_channel(-1, 2, 3), "negative dimension"),
], ids=["negative-set", "overflow-C", "overflow-NCS", "groups-not-dividing", "zero-groups", "negative-N"])
def test_invalid_plans_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_plan_made_invalid_from_python_is_refused_before_use():
    plan = _core.plan_per_row(2, 3, False)
    plan.channels_last = True  # a per-column affine needs channels-first memory
    with pytest.raises(ValueError, match="channels-first"):
        _core.group_moments(plan, np.ones(6, np.float32))
    with pytest.raises(ValueError, match="channels-first"):
        plan.group_counts


def test_arrays_of_the_wrong_size_or_dtype_are_refused():
    plan = _core.plan_per_channel(2, 3, 4)
    with pytest.raises(ValueError, match="x: expected 24 elements"):
        _core.group_moments(plan, np.ones(23, np.float32))
    with pytest.raises(TypeError, match="x: expected float32, float64, float16 or bfloat16"):
        _core.group_moments(plan, np.ones(24, np.int32))
    mean, var = _core.group_moments(plan, np.ones(24, np.float32))
    with pytest.raises(TypeError, match="out: expected a C-contiguous float32"):
        _core.normalize(plan, np.ones(24, np.float32), mean, var, None, None, np.ones(24, np.float64))


@pytest.mark.parametrize("plan", [_core.plan_per_sample_group(0, 4, 8, 2), _core.plan_per_row(0, 5, True),
                                  _core.plan_per_channel(0, 3, 2)], ids=["groups", "rows", "channels"])
def test_a_batch_of_no_samples_reads_nothing(plan):
    """A plan of N = 0 still has its groups (one statistics set): every entry point must see that
    it has no elements to read (fuzzer finding: the one-chunk-per-group path read x[0, run))."""
    x, y = np.ones(0, np.float32), np.ones(0, np.float32)
    mean, var, rstd = _core.normalize_batch_stats(plan, x, 1e-5, None, None, y)
    assert np.isnan(mean).all() and np.isnan(var).all()
    m, v = _core.group_moments(plan, x)
    assert np.isnan(m).all() and np.isnan(v).all()


def test_zero_channel_group_plan_is_empty():
    assert _core.plan_per_sample_group(2, 0, 3, 3).num_groups == 0


def test_output_buffers_are_never_shared_between_live_arrays():
    # A size no other test makes: the cache hands out the oldest block of a size, so a block an
    # earlier test left behind would be taken before a's.
    x = np.zeros((1, 786_443), dtype=np.float32)
    a, b = _core.empty_like(x), _core.empty_like(x)
    assert a.shape == x.shape and a.dtype == x.dtype and a.flags.c_contiguous and a.flags.writeable
    assert not np.shares_memory(a, b)
    a_addr = a.__array_interface__["data"][0]
    del a  # its block goes back to the cache ...
    c = _core.empty_like(x)  # ... and an output of the same size takes it
    assert c.__array_interface__["data"][0] == a_addr
    assert not np.shares_memory(b, c)


def test_consecutive_outputs_stay_independent():
    import normkit
    layer = normkit.BatchNorm2d(3)
    x1 = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    y1 = layer(x1)
    kept = y1.copy()
    for _ in range(3):
        layer(x1 * 2)  # fresh outputs while y1 is alive must not reuse its memory
    assert np.array_equal(y1, kept)


def test_a_plan_pickles_to_the_same_plan_and_a_bad_state_is_refused():
    import pickle
    plan = _core.plan_per_channel_in_sets(4, 6, 5, [0, 1, 0, 1], channels_per_group=2)
    plan.channels_last = True
    twin = pickle.loads(pickle.dumps(plan))
    fields = ("N", "C", "S", "channels_per_group", "num_sample_sets", "skip_mean", "column_affine",
              "channels_last", "num_groups", "group_counts")
    assert [getattr(twin, f) for f in fields] == [getattr(plan, f) for f in fields]
    state = list(plan.__getstate__())
    state[3] = [0, 5, 0, 1]  # a sample in a set that does not exist
    with pytest.raises(ValueError, match="sample_group entry out of range"):
        _core.Plan.__new__(_core.Plan).__setstate__(tuple(state))
