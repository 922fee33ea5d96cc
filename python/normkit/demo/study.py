"""The study: every (variant, batch size, seed) job, in worker processes, with a progress bar,
then the mean test accuracy over the seeds.

Each job is deterministic on its own (train.run_job), and every kernel it runs is
single-threaded in a worker (normkit.set_num_threads(1), BLAS limited to one thread), so the
results do not depend on the number of workers or on the order in which jobs finish.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

import normkit

from . import train

Job = tuple[str, int, int, int]  # (variant, batch size, seed, epochs): train.run_job's arguments
Data = Mapping[str, npt.NDArray[Any]]  # train.load_data's


class _Limiter(Protocol):  # threadpoolctl's threadpool_limits
    def restore_original_limits(self) -> None: ...


class _Progress(Protocol):  # a tqdm bar, or _TextProgress
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


_DATA: Data | None = None  # a worker's copy of the data set
_LIMITS: _Limiter | None = None  # a worker's BLAS thread limit
_BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _limit_blas() -> _Limiter | None:
    """Limit BLAS to one thread where threadpoolctl is there (scikit-learn brings it): the
    limiter (restore_original_limits() undoes it), or None."""
    try:
        from threadpoolctl import threadpool_limits  # untyped: ignore_missing_imports
    except ImportError:
        return None
    limits: _Limiter = threadpool_limits(1)
    return limits


def _init_worker(data: Data) -> None:
    global _DATA, _LIMITS
    _DATA = data
    normkit.set_num_threads(1)
    _LIMITS = _limit_blas()  # kept alive for the worker's life


def _run(job: Job) -> dict[str, Any]:
    assert _DATA is not None  # set by _init_worker
    return train.run_job(*job, _DATA)


def jobs(variants: Sequence[str], batch_sizes: Sequence[int], seeds: int, epochs: int) -> list[Job]:
    """The jobs, the longest first (the smallest batch size: the most steps), so that the last
    ones to finish are short and the workers finish together."""
    return [(v, bs, seed, epochs) for bs in sorted(batch_sizes) for v in variants for seed in range(seeds)]


def _progress(total: int) -> _Progress:
    """A tqdm bar over training steps, or a plain-text fallback with the same update()/close()."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextProgress(total)
    bar: _Progress = tqdm(total=total, unit="step", desc="training", file=sys.stderr,
                          dynamic_ncols=True)
    return bar


class _TextProgress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.shown = total, 0, -1

    def update(self, n: int) -> None:
        self.done += n
        tenth = 10 * self.done // max(self.total, 1)
        if tenth != self.shown:
            self.shown = tenth
            print(f"training: {100 * self.done // max(self.total, 1)}% of {self.total} steps", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        pass


def run(variants: Sequence[str], batch_sizes: Sequence[int], epochs: int, seeds: int, data: Data,
        workers: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    """The results of every job, as train.run_job's dicts in (variant, batch size, seed) order."""
    todo = jobs(variants, batch_sizes, seeds, epochs)
    n = len(data["y_train"])
    bar = _progress(sum(train.steps_per_epoch(n, bs) * epochs for _, bs, _, _ in todo)) if progress else None

    def steps(bs: int) -> int:
        return train.steps_per_epoch(n, bs) * epochs

    out: list[dict[str, Any]] = []
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        threads, limits = normkit.get_num_threads(), _limit_blas()
        normkit.set_num_threads(1)
        try:
            for job in todo:
                out.append(train.run_job(*job, data))
                if bar:
                    bar.update(steps(job[1]))
        finally:
            normkit.set_num_threads(threads)
            if limits is not None:
                limits.restore_original_limits()
    else:
        import multiprocessing

        # spawn, not fork: a forked child of a process that has run OpenMP threads may hang in
        # its own first parallel region. The workers' BLAS start single-threaded too.
        ctx = multiprocessing.get_context("spawn")
        saved = {k: os.environ.get(k) for k in _BLAS_THREADS}
        os.environ.update({k: "1" for k in _BLAS_THREADS})
        try:
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(data,))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        with pool:
            for result in pool.imap_unordered(_run, todo):
                out.append(result)
                if bar:
                    bar.update(steps(result["batch_size"]))
    if bar:
        bar.close()
    return sorted(out, key=lambda r: (variants.index(r["variant"]), r["batch_size"], r["seed"]))


def summarize(results: Sequence[Mapping[str, Any]], variants: Sequence[str],
              batch_sizes: Sequence[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """{variant: {batch size: {"accuracy": mean over the seeds, "std", "per_seed", "diverged"}}}."""
    table: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    for v in variants:
        for bs in sorted(batch_sizes):
            rs = [r for r in results if r["variant"] == v and r["batch_size"] == bs]
            accs = [r["accuracy"] for r in rs]
            table[v][bs] = {"accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "per_seed": accs,
                            "diverged": sum(r["diverged"] for r in rs)}
    return table
