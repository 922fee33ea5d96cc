"""Memory: many forward/backward calls leave the resident set flat.

A leaked plan, statistics array or saved input per call (a missing Py_DECREF in the binding, a
reference cycle through a layer's saved state, a vector that escapes) shows up as RSS growth of
several megabytes over 10,000 calls. Error paths (rejected arguments, exceptions thrown in C++)
are included, since those are where references are most often dropped.
"""
import gc
import os
import resource

import numpy as np
import pytest

import normkit
import normkit.functional as F
from normkit import _core

CALLS = 10_000
SLACK_BYTES = 3 * 2**20
PAGE = resource.getpagesize()


def _sanitized():
    """ASan keeps freed memory in quarantine, so RSS says nothing about leaks under it."""
    try:
        with open("/proc/self/maps") as f:
            return any("libasan" in line or "libtsan" in line for line in f)
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)"),
    pytest.mark.skipif(_sanitized(), reason="RSS is meaningless under a sanitizer's allocator"),
]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _make_workload():
    rng = np.random.default_rng(0)
    x4 = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    dy4 = rng.normal(size=x4.shape).astype(np.float32)
    x3 = rng.normal(size=(3, 4, 7))  # float64
    dy3 = rng.normal(size=x3.shape)
    x_strided = rng.normal(size=(2, 8, 5, 12)).astype(np.float32)[:, ::2, :, ::2]  # copied by the API
    layers = [
        (normkit.BatchNorm2d(4), x4, dy4),
        (normkit.GroupNorm(2, 4, dtype=np.float64), x3, dy3),
        (normkit.LayerNorm((4, 7), dtype=np.float64), x3, dy3),
        (normkit.RMSNorm(6), x4, dy4),
        (normkit.InstanceNorm2d(4, affine=True, track_running_stats=True), x_strided, dy4),
    ]
    layers[0][0].eval()  # BatchNorm2d: also exercise the eval (running statistics) path
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    bad_plan = _core.plan_per_channel(2, 4, 30)
    wrong_size = np.zeros(7, np.float32)

    def step(i):
        layer, x, dy = layers[i % len(layers)]
        layer(x)
        layer.backward(dy)
        if i % 2:
            layers[0][0].train(i % 4 == 1)
        if i % 5 == 0:
            F.batch_norm(x4, rm, rv, training=True)
            F.layer_norm(x3, 7)
        if i % 10 == 0:  # error paths: Python checks and C++ exceptions
            for call in (lambda: F.group_norm(x4, 3),
                         lambda: layer.backward(dy.astype(np.float16)),
                         lambda: _core.group_moments(bad_plan, wrong_size),
                         lambda: _core.set_isa("no-such-isa")):
                try:
                    call()
                except (TypeError, ValueError):
                    pass
                else:
                    raise AssertionError("expected an error")

    return step


def test_rss_flat_over_many_forward_backward_calls():
    step = _make_workload()
    for i in range(2000):  # warm up: allocator pools, numpy caches, lazy imports
        step(i)
    gc.collect()
    start = rss_bytes()
    mid = None
    for i in range(CALLS):
        step(i)
        if i == CALLS // 2:
            mid = rss_bytes()
    gc.collect()
    end = rss_bytes()
    growth = end - start
    assert growth <= SLACK_BYTES, (
        f"RSS grew by {growth / 2**20:.2f} MiB over {CALLS} calls "
        f"(start {start / 2**20:.1f}, half-way {mid / 2**20:.1f}, end {end / 2**20:.1f} MiB)")
