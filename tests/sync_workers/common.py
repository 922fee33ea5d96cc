"""What the SyncBatchNorm workers share: the cases, the global batches, the tolerance and the
report that tests/test_sync_batchnorm.py reads.

Every rank builds the same global batch from the case's seed and takes its own slice of
samples (rank r: the `sizes[r]` samples after those of ranks 0..r-1), so each rank can run the
single-process reference on the whole batch and compare its slice.
"""
import json

import numpy as np

REPORT = "SYNC_REPORT "  # the line prefix of the report rank 0 prints

# (name, sample count per rank, trailing shape after (N, C), dtype, x offset, momentum, affine)
# sizes are given for 3 ranks; a 2-rank job uses the first two and folds the third into rank 1.
CASES = [
    ("even_f64_4d", (3, 3, 3), (5, 4), np.float64, 0.0, 0.1, True),
    ("uneven_f64_4d", (1, 4, 2), (3, 5), np.float64, 0.0, 0.1, True),
    ("empty_rank_f64_4d", (4, 0, 3), (3, 3), np.float64, 0.0, 0.1, True),
    ("empty_rank0_f32_4d", (0, 5, 2), (4, 4), np.float32, 0.0, None, True),
    ("uneven_f32_2d", (2, 7, 3), (), np.float32, 0.0, 0.1, True),
    ("stable_1e4_f64_3d", (2, 3, 5), (17,), np.float64, 1e4, 0.1, True),
    ("stable_1e4_f32_4d", (3, 1, 4), (6, 5), np.float32, 1e4, 0.1, True),
    ("no_affine_f64_5d", (1, 2, 2), (2, 3, 2), np.float64, 0.0, 0.3, False),
]
C = 3
STEPS = 2  # forward/backward steps per case: running statistics over more than one update


def sizes_for(sizes, world):
    """The per-rank sample counts of a case for `world` ranks (the extra ones folded into the
    last rank, missing ones empty)."""
    sizes = list(sizes)
    if world < len(sizes):
        sizes = sizes[:world - 1] + [sum(sizes[world - 1:])]
    return sizes + [0] * (world - len(sizes))


def batch(case, step, world):
    """(x, dy, weight, bias) of the whole batch in float64 and the per-rank counts."""
    name, sizes, trailing, dtype, offset, momentum, affine = case
    sizes = sizes_for(sizes, world)
    rng = np.random.default_rng([sum(map(ord, name)), step])
    shape = (sum(sizes), C) + tuple(trailing)
    x = offset + rng.standard_normal(shape) * rng.uniform(0.5, 2.0, (1, C) + (1,) * len(trailing)) \
        + rng.uniform(-1, 1, (1, C) + (1,) * len(trailing))
    dy = rng.standard_normal(shape)
    weight, bias = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
    return x, dy, weight, bias, sizes


def shard(a, sizes, rank):
    start = sum(sizes[:rank])
    return a[start:start + sizes[rank]]


def tol(dtype, offset):
    """|got - want| <= tol * max(1, max|want|). float64: conftest's 1e-10. float32: the
    reference and SyncBatchNorm sum in different orders; at x = 1e4 + noise float32 input
    itself is only good to 1e-3 absolute, so the comparison there is relative to 1e4."""
    if np.dtype(dtype) == np.float64:
        return 1e-10
    return 1e-5 if offset == 0 else 1e-4


def close(got, want, t):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False, f"shape {got.shape} != {want.shape}"
    if got.size == 0:
        return True, ""
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want))) / scale
    return err <= t, f"relative error {err:.3g} > {t:.3g}" if err > t else ""


class Checks:
    """Named pass/fail results of one rank."""

    def __init__(self, rank):
        self.rank, self.results = rank, {}

    def check(self, name, ok, detail=""):
        ok = bool(ok)
        prev = self.results.get(name)
        if prev is None or prev[0]:
            self.results[name] = (ok, "" if ok else f"rank {self.rank}: {detail}")

    def close(self, name, got, want, t):
        ok, detail = close(got, want, t)
        self.check(name, ok, detail)

    def same_bits(self, name, arrays_per_rank):
        """Every rank's arrays are bitwise identical to rank 0's."""
        first = [np.ascontiguousarray(a).tobytes() for a in arrays_per_rank[0]]
        ok = all([np.ascontiguousarray(a).tobytes() for a in arrays] == first for arrays in arrays_per_rank)
        self.check(name, ok, "ranks differ bitwise")


def report(all_results, world):
    """Rank 0's report line: every check with its pass state over all ranks, and failures."""
    merged, failures = {}, []
    for results in all_results:
        for name, (ok, detail) in results.items():
            merged[name] = merged.get(name, True) and ok
            if not ok:
                failures.append(f"{name}: {detail}")
    line = REPORT + json.dumps({"world": world, "checks": merged, "failures": failures})
    return line, not failures
