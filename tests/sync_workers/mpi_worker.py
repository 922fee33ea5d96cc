"""normkit.SyncBatchNorm over MPI equals normkit's BatchNorm on the concatenated batch.

Run: mpiexec -n 2 python -m mpi4py tests/sync_workers/mpi_worker.py (any number of ranks).
Rank 0 prints one report line (common.REPORT + JSON of the checks); the exit code is 0 when
every check passed on every rank. `python -m mpi4py` aborts the whole job on an uncaught
exception, so a failure cannot leave the other ranks waiting.
"""
import sys

import numpy as np
from mpi4py import MPI

import normkit
from common import CASES, STEPS, C, Checks, batch, report, shard, tol

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
checks = Checks(rank)


class Counting:
    """COMM_WORLD, counting Allgather calls."""

    def __init__(self, comm):
        self.comm, self.calls = comm, 0

    def Get_size(self):
        return self.comm.Get_size()

    def Allgather(self, sendbuf, recvbuf):
        self.calls += 1
        self.comm.Allgather(sendbuf, recvbuf)


def reference_layer(ndim, dtype, affine, momentum):
    cls = {2: normkit.BatchNorm1d, 3: normkit.BatchNorm1d, 4: normkit.BatchNorm2d, 5: normkit.BatchNorm3d}[ndim]
    return cls(C, momentum=momentum, affine=affine, dtype=dtype)


def run_case(case):
    name, _, _, dtype, offset, momentum, affine = case
    t = tol(dtype, offset)
    x, dy, weight, bias, sizes = batch(case, 0, world)
    ref = reference_layer(x.ndim, dtype, affine, momentum)
    sync = normkit.SyncBatchNorm(C, momentum=momentum, affine=affine, process_group=comm, dtype=dtype)
    if affine:
        for layer in (ref, sync):
            layer.weight[...] = weight
            layer.bias[...] = bias
    for step in range(STEPS):
        x, dy, _, _, sizes = batch(case, step, world)
        x, dy = x.astype(dtype), dy.astype(dtype)
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        y = sync(shard(x, sizes, rank))
        saved = sync._saved
        dx = sync.backward(shard(dy, sizes, rank))
        checks.close(f"{name}/output", y, shard(y_ref, sizes, rank), t)
        checks.close(f"{name}/input_grad", dx, shard(dx_ref, sizes, rank), t)
        checks.check(f"{name}/dtypes", y.dtype == dtype and dx.dtype == dtype, f"{y.dtype}, {dx.dtype}")
        checks.close(f"{name}/running_mean", sync.running_mean, ref.running_mean, t)
        checks.close(f"{name}/running_var", sync.running_var, ref.running_var, t)
        checks.check(f"{name}/num_batches_tracked", int(sync.num_batches_tracked) == int(ref.num_batches_tracked))
        # Each rank holds its own contribution; their sum (in rank order) is BatchNorm's.
        per_rank = comm.allgather({k: np.asarray(v, np.float64) for k, v in sync.grads.items()})
        sums = {k: sum(g[k] for g in per_rank) for k in ref.grads}
        checks.check(f"{name}/grad_names", set(sync.grads) == set(ref.grads), f"{sorted(sync.grads)}")
        for k in ref.grads:
            checks.close(f"{name}/param_grad_sum", sums.get(k, np.nan), ref.grads[k], t * max(1, x.shape[0]))
        mine = [saved.mean, saved.rstd, np.float64(saved.count), sync.running_mean, sync.running_var]
        mine += [sums[k] for k in sorted(sums)]
        checks.same_bits(f"{name}/bitwise_on_every_rank", comm.allgather(mine))
    if offset:  # the variance survives the offset: running_var near the noise's, not 0 or garbage
        checks.check(f"{name}/variance_kept", np.all(sync.running_var > 0.2), f"{sync.running_var}")
    sync.eval()
    ref.eval()
    counting = Counting(comm)
    sync.process_group = counting
    y = sync(shard(x, sizes, rank))
    dx = sync.backward(shard(dy, sizes, rank))
    checks.close(f"{name}/eval_output", y, shard(ref(x), sizes, rank), t)
    checks.close(f"{name}/eval_input_grad", dx, shard(ref.backward(dy), sizes, rank), t)
    checks.check(f"{name}/eval_no_communication", counting.calls == 0, f"{counting.calls} Allgather calls")


def state(layer):
    return [np.array(a, copy=True) for a in layer.state_dict().values()]


def unchanged(before, layer):
    return all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, state(layer)))


def run_errors():
    # A global count of one value per channel raises on every rank, and writes nothing.
    layer = normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64)
    before = state(layer)
    x = np.ones((1 if rank == 0 else 0, C))
    try:
        layer(x)
        raised = False
    except ValueError as e:
        raised = "more than 1 value per channel" in str(e)
    checks.check("global_count_1_raises", raised, "no ValueError naming 'more than 1 value per channel'")
    checks.check("global_count_1_no_state_written", unchanged(before, layer))
    # Two values in total (one each on two ranks) are enough.
    x = np.full((1 if rank < 2 else 0, C), float(rank))
    y = layer(x)
    checks.check("global_count_2_ok", np.all(np.abs(np.abs(y) - 1) < 1e-4) or x.shape[0] == 0, f"{y}")

    # One rank's bad input: it raises its own error, every other rank a RemoteInputError; no
    # rank waits forever, nothing is written, and the next step works on every rank.
    layer = normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64)
    before = state(layer)
    bad = rank == world - 1
    x = np.random.default_rng(rank).standard_normal((3, C + 1 if bad else C, 4))
    try:
        layer(x)
        got = None
    except normkit.layers.sync_batchnorm.RemoteInputError:
        got = "remote"
    except ValueError as e:
        got = "own" if "channels" in str(e) else repr(e)
    checks.check("bad_input_raises_on_every_rank", got == ("own" if bad else "remote"), f"got {got}")
    checks.check("bad_input_no_state_written", unchanged(before, layer))
    x = np.random.default_rng(rank).standard_normal((3, C, 4))
    y = layer(x)
    dx = layer.backward(np.ones_like(y))
    checks.check("after_bad_input_steps_continue", int(layer.num_batches_tracked) == 1 and dx.shape == x.shape)
    # One rank's bad dy: the same, in the backward.
    layer(x)
    dy = np.ones((2, C, 4)) if rank == 0 else np.ones_like(x)
    try:
        layer.backward(dy)
        got = None
    except normkit.layers.sync_batchnorm.RemoteInputError:
        got = "remote"
    except ValueError as e:
        got = "own" if "dy" in str(e) else repr(e)
    checks.check("bad_dy_raises_on_every_rank", got == ("own" if rank == 0 else "remote"), f"got {got}")

    # process_group=None is MPI.COMM_WORLD.
    a = normkit.SyncBatchNorm(C, dtype=np.float64)
    b = normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64)
    x = np.random.default_rng(rank + 10).standard_normal((2 + rank, C, 3))
    checks.check("default_group_is_world", np.array_equal(a(x), b(x)) and a.process_group is MPI.COMM_WORLD)


def main():
    for case in CASES:
        run_case(case)
    run_errors()
    all_results = comm.gather(checks.results, root=0)
    ok = True
    if rank == 0:
        line, ok = report(all_results, world)
        print(line, flush=True)
    ok = comm.bcast(ok, root=0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
