"""normkit.torch.SyncBatchNorm over torch.distributed (gloo, CPU) equals torch.nn.BatchNorm on
the concatenated batch.

Run: torchrun --nproc_per_node 2 tests/sync_workers/torch_worker.py (any number of processes).
Rank 0 prints one report line (common.REPORT + JSON of the checks); the exit code is 0 when
every check passed on every rank.
"""
import copy
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from common import CASES, STEPS, C, Checks, batch, report, shard, tol

try:  # the package's export; the module itself while the package does not export it yet
    from normkit.torch import SyncBatchNorm
except ImportError:
    from normkit.torch._sync import SyncBatchNorm
from normkit.torch import _sync

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def allgather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reference_module(ndim, dtype, affine, momentum):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[ndim]
    return cls(C, momentum=momentum, affine=affine, dtype=dtype)


def run_case(checks, rank, world, case):
    name, _, _, np_dtype, offset, momentum, affine = case
    dtype = TORCH_DTYPES[np.dtype(np_dtype)]
    t = tol(np_dtype, offset)
    x, dy, weight, bias, sizes = batch(case, 0, world)
    # The reference is torch's BatchNorm in float64 on the same (rounded) values: torch's own
    # float32 CPU batch norm loses ~1e-4 of the output to the mean at x = 1e4 + noise, which
    # normkit does not (its statistics are float64).
    ref = reference_module(x.ndim, torch.float64, affine, momentum)
    sync = SyncBatchNorm(C, momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            for m in (ref, sync):
                m.weight.copy_(torch.from_numpy(weight))
                m.bias.copy_(torch.from_numpy(bias))
    for step in range(STEPS):
        x, dy, _, _, sizes = batch(case, step, world)
        x, dy = (a.astype(np_dtype).astype(np.float64) for a in (x, dy))
        xg = torch.from_numpy(x).requires_grad_()
        dyg = torch.from_numpy(dy)
        xs = torch.from_numpy(shard(x, sizes, rank)).to(dtype).requires_grad_()
        y_ref = ref(xg)
        y_ref.backward(dyg)
        y = sync(xs)
        y.backward(torch.from_numpy(shard(dy, sizes, rank)).to(dtype))
        checks.close(f"{name}/output", y.detach(), shard(y_ref.detach().numpy(), sizes, rank), t)
        checks.close(f"{name}/input_grad", xs.grad, shard(xg.grad.numpy(), sizes, rank), t)
        checks.check(f"{name}/dtypes", y.dtype == dtype and xs.grad.dtype == dtype, f"{y.dtype}")
        checks.close(f"{name}/running_mean", sync.running_mean, ref.running_mean.detach(), t)
        checks.close(f"{name}/running_var", sync.running_var, ref.running_var.detach(), t)
        checks.check(f"{name}/num_batches_tracked", int(sync.num_batches_tracked) == int(ref.num_batches_tracked))
        if affine:
            mine = {k: getattr(sync, k).grad.numpy().astype(np.float64) for k in ("weight", "bias")}
            per_rank = allgather(mine)
            sums = {k: sum(g[k] for g in per_rank) for k in mine}
            for k in mine:
                checks.close(f"{name}/param_grad_sum", sums[k], getattr(ref, k).grad.numpy(), t * max(1, x.shape[0]))
                getattr(sync, k).grad = None
                getattr(ref, k).grad = None
            arrays = [sums["weight"], sums["bias"]]
        else:
            arrays = []
        arrays += [sync.running_mean.numpy().copy(), sync.running_var.numpy().copy()]
        checks.same_bits(f"{name}/bitwise_on_every_rank", allgather(arrays))
    with torch.no_grad():  # no autograd: the same synchronized statistics
        xs = torch.from_numpy(shard(x, sizes, rank)).to(dtype)
        y_ref = ref(torch.from_numpy(x))
        checks.close(f"{name}/no_grad_output", sync(xs), shard(y_ref.numpy(), sizes, rank), t)
    sync.eval()
    ref.eval()
    calls = count_allgathers()
    xs = torch.from_numpy(shard(x, sizes, rank)).to(dtype).requires_grad_()
    xg = torch.from_numpy(x).requires_grad_()
    y, y_ref = sync(xs), ref(xg)
    y.sum().backward()
    y_ref.sum().backward()
    checks.close(f"{name}/eval_output", y.detach(), shard(y_ref.detach().numpy(), sizes, rank), t)
    checks.close(f"{name}/eval_input_grad", xs.grad, shard(xg.grad.numpy(), sizes, rank), t)
    checks.check(f"{name}/eval_no_communication", calls[0] == 0, f"{calls[0]} Allgather calls")


def count_allgathers():
    """A one-element list counting _TorchGroup.Allgather calls from now on."""
    calls = [0]
    original = _sync._TorchGroup.Allgather if not hasattr(_sync._TorchGroup, "_original") else _sync._TorchGroup._original

    def counted(self, sendbuf, recvbuf):
        calls[0] += 1
        return original(self, sendbuf, recvbuf)

    _sync._TorchGroup._original = original
    _sync._TorchGroup.Allgather = counted
    return calls


def run_convert(checks, rank, world):
    """convert_sync_batchnorm on a small CNN: the converted model on the shards equals the
    original on the whole batch (outputs, input and every parameter gradient summed)."""
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1), torch.nn.Sequential(torch.nn.BatchNorm2d(2, momentum=None)))
    model = model.double()
    ref = copy.deepcopy(model)
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    checks.check("convert/replaced", isinstance(converted[1], SyncBatchNorm) and isinstance(converted[4][0], SyncBatchNorm)
                 and isinstance(converted[0], torch.nn.Conv2d), f"{converted}")
    checks.check("convert/shares_tensors", converted[1].weight is model[1].weight
                 and converted[4][0].running_mean is model[4][0].running_mean)
    sizes = [2 + r % 2 for r in range(world)]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((sum(sizes), 3, 5, 5)) + 3
    g = rng.standard_normal((sum(sizes), 2, 5, 5))
    for step in range(2):
        xg = torch.from_numpy(x + step).requires_grad_()
        xs = torch.from_numpy(shard(x + step, sizes, rank)).requires_grad_()
        y_ref = ref(xg)
        (y_ref * torch.from_numpy(g)).sum().backward()
        y = converted(xs)
        (y * torch.from_numpy(shard(g, sizes, rank))).sum().backward()
        checks.close("convert/output", y.detach(), shard(y_ref.detach().numpy(), sizes, rank), 1e-10)
        checks.close("convert/input_grad", xs.grad, shard(xg.grad.numpy(), sizes, rank), 1e-10)
    for (n, p), (_, q) in zip(converted.named_parameters(), ref.named_parameters()):
        total = sum(allgather(p.grad.numpy()))
        checks.close("convert/param_grad_sum", total, q.grad.numpy(), 1e-9)
    for (n, b), (_, c) in zip(converted.named_buffers(), ref.named_buffers()):
        checks.close("convert/buffers", b, c, 1e-10)
    checks.check("convert/state_dict_keys", list(converted.state_dict()) == list(ref.state_dict()))


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    checks = Checks(rank)
    for case in CASES:
        run_case(checks, rank, world, case)
    run_convert(checks, rank, world)
    all_results = allgather(checks.results)
    line, ok = report(all_results, world)
    if rank == 0:
        print(line, flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
