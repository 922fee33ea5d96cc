"""SyncBatchNorm: statistics and backward sums over data-parallel processes equal BatchNorm's
on the concatenated batch.

Three levels:
- in process, with fake communicators: a world of threads (one SyncBatchNorm per simulated
  rank, a barrier for Allgather) for exact merging, uneven and empty ranks and bitwise-equal
  statistics on every rank; a world whose other ranks are empty; bad inputs and clear errors;
- the real thing: tests/sync_workers/mpi_worker.py under `mpiexec -n 2` and `-n 3`
  (normkit.SyncBatchNorm over mpi4py) and tests/sync_workers/torch_worker.py under torchrun
  with 2 and 3 processes (normkit.torch.SyncBatchNorm over gloo), each asserting its exit code
  and the checks it reports;
- normkit.torch.SyncBatchNorm in one process: torch.nn.BatchNorm's numbers, torch's constructor,
  convert_sync_batchnorm.
"""
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

import normkit
from normkit.layers import sync_batchnorm as sbn

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "sync_workers")
sys.path.insert(0, WORKERS)
import common  # noqa: E402  (the workers' cases and report format)

C = 3


# -- fake communicators ---------------------------------------------------------------------------

class ThreadWorld:
    """P simulated ranks in one process: rank r's communicator is `world.comm(r)`; Allgather
    waits for every rank's buffer (a barrier with a timeout, so a bug fails instead of hanging)."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=20)
        self.calls = [0] * size

    def comm(self, rank):
        world = self

        class Comm:
            def Get_size(self):
                return world.size

            def Allgather(self, sendbuf, recvbuf):
                world.calls[rank] += 1
                world.slots[rank] = np.array(sendbuf, copy=True)
                world.barrier.wait()
                recvbuf[...] = np.stack(world.slots).reshape(recvbuf.shape)
                world.barrier.wait()

        return Comm()

    def run(self, fn):
        """fn(rank, comm) on every rank in its own thread; returns the results in rank order
        (an exception on any rank is raised here, after every thread ended)."""
        results, errors = [None] * self.size, [None] * self.size

        def body(r):
            try:
                results[r] = fn(r, self.comm(r))
            except BaseException as e:  # noqa: B902 - re-raised in the main thread
                errors[r] = e
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for e in errors:
            if e is not None and not isinstance(e, threading.BrokenBarrierError):
                raise e
        for e in errors:
            if e is not None:
                raise e
        return results


class LoneRank:
    """A world of `size` ranks where every other rank has an empty batch (count 0, zero sums):
    the layer must then be BatchNorm on this rank's batch."""

    def __init__(self, size=3, rank=1):
        self.size, self.rank, self.calls = size, rank, 0

    def Get_size(self):
        return self.size

    def Allgather(self, sendbuf, recvbuf):
        self.calls += 1
        recvbuf[...] = 0
        recvbuf[self.rank] = sendbuf


def tol(dtype):
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-5


def assert_close(got, want, t):
    ok, detail = common.close(got, want, t)
    assert ok, detail


def bn_like(x, dtype, **kw):
    cls = {2: normkit.BatchNorm1d, 3: normkit.BatchNorm1d, 4: normkit.BatchNorm2d, 5: normkit.BatchNorm3d}[x.ndim]
    return cls(C, dtype=dtype, **kw)


def reference_run(x, dy, dtype, steps=1, **kw):
    layer = bn_like(x, dtype, **kw)
    layer.weight[...] = [0.5, 1.0, 1.5]
    layer.bias[...] = [-0.2, 0.0, 0.3]
    for _ in range(steps):
        y = layer(x)
        dx = layer.backward(dy)
    return layer, y, dx


def sync_run(world, xs, dys, dtype, steps=1, **kw):
    """Every rank's (layer, y, dx, saved) after `steps` steps on its shard."""
    def fn(r, comm):
        layer = normkit.SyncBatchNorm(C, process_group=comm, dtype=dtype, **kw)
        layer.weight[...] = [0.5, 1.0, 1.5]
        layer.bias[...] = [-0.2, 0.0, 0.3]
        for _ in range(steps):
            y = layer(xs[r])
            saved = layer._saved
            dx = layer.backward(dys[r])
        return layer, y, dx, saved
    return world.run(fn)


def split(a, sizes):
    return np.split(a, np.cumsum(sizes)[:-1])


# -- the merge itself -------------------------------------------------------------------------------

def test_merge_moments_is_exact_for_uneven_and_empty_ranks():
    rng = np.random.default_rng(0)
    x = 1e4 + rng.standard_normal((23, C))
    sizes = [0, 5, 0, 1, 17, 0]
    parts = split(x, sizes)
    n = np.array([[len(p)] * C for p in parts], np.float64)
    mean = np.array([p.mean(0) if len(p) else np.zeros(C) for p in parts])
    m2 = np.array([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.zeros(C) for p in parts])
    tn, tm, tm2 = sbn.merge_moments(n, mean, m2)
    np.testing.assert_array_equal(tn, 23)
    np.testing.assert_allclose(tm, x.mean(0), rtol=1e-15)
    np.testing.assert_allclose(tm2 / 23, x.var(0), rtol=1e-12)  # no cancellation at 1e4


def test_merge_of_nothing_is_empty():
    z = np.zeros((3, C))
    tn, tm, tm2 = sbn.merge_moments(z, z, z)
    assert not tn.any() and not tm.any() and not tm2.any()


# -- simulated ranks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("sizes,trailing,offset", [
    ((3, 3), (4, 5), 0.0),
    ((1, 6, 2), (3, 5), 0.0),
    ((4, 0, 3), (7,), 0.0),  # a rank with no samples
    ((0, 2, 5), (), 0.0),  # rank 0 empty, 2-D input
    ((2, 3), (2, 3, 2), 0.0),  # 5-D input
    ((2, 5, 1), (6, 6), 1e4),  # x = 1e4 + noise
], ids=["even", "uneven", "empty_rank", "empty_rank0_2d", "5d", "offset_1e4"])
def test_threads_equal_batchnorm_on_the_whole_batch(dtype, sizes, trailing, offset):
    rng = np.random.default_rng(sum(sizes))
    shape = (sum(sizes), C) + trailing
    x = (offset + rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ref, y_ref, dx_ref = reference_run(x, dy, dtype, steps=2)
    out = sync_run(ThreadWorld(len(sizes)), split(x, sizes), split(dy, sizes), dtype, steps=2)
    t = tol(dtype) * (10 if offset and dtype == np.float32 else 1)
    for (layer, y, dx, _), y_want, dx_want in zip(out, split(y_ref, sizes), split(dx_ref, sizes)):
        assert y.dtype == dx.dtype == dtype and y.shape == y_want.shape
        assert_close(y, y_want, t)
        assert_close(dx, dx_want, t)
        assert_close(layer.running_mean, ref.running_mean, t)
        assert_close(layer.running_var, ref.running_var, t)
        assert int(layer.num_batches_tracked) == 2
    for k in ("weight", "bias"):  # each rank its contribution; the sum is BatchNorm's
        total = sum(o[0].grads[k].astype(np.float64) for o in out)
        assert_close(total, ref.grads[k], t * sum(sizes))
    # Every rank merged the same numbers in the same order: bitwise equal statistics.
    first = out[0][3]
    for _, _, _, saved in out[1:]:
        assert saved.mean.tobytes() == first.mean.tobytes() and saved.rstd.tobytes() == first.rstd.tobytes()
    for o in out[1:]:
        assert o[0].running_mean.tobytes() == out[0][0].running_mean.tobytes()
        assert o[0].running_var.tobytes() == out[0][0].running_var.tobytes()


def test_an_empty_rank_gets_zero_gradients_and_takes_part_in_every_exchange():
    x = np.random.default_rng(1).standard_normal((5, C, 4))
    world = ThreadWorld(2)
    out = sync_run(world, [x, x[:0]], [x, x[:0]], np.float64)
    layer, y, dx, _ = out[1]
    assert y.shape == dx.shape == (0, C, 4)
    np.testing.assert_array_equal(layer.grads["weight"], 0)
    np.testing.assert_array_equal(layer.grads["bias"], 0)
    assert world.calls == [2, 2]  # one Allgather forward, one backward, on both ranks


def test_every_rank_empty_leaves_running_stats_alone():
    x = np.zeros((0, C, 2))
    out = sync_run(ThreadWorld(2), [x, x], [x, x], np.float64)
    for layer, y, dx, _ in out:
        assert y.shape == dx.shape == x.shape
        np.testing.assert_array_equal(layer.running_mean, 0)
        np.testing.assert_array_equal(layer.running_var, 1)
        np.testing.assert_array_equal(layer.grads["weight"], 0)
        assert int(layer.num_batches_tracked) == 1  # counted, as BatchNorm counts an empty batch


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_lone_rank_is_batchnorm(momentum):
    """Other ranks empty: exactly BatchNorm on this rank's batch (steps, momentum=None)."""
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((4, C, 3, 3)), rng.standard_normal((4, C, 3, 3))
    ref = normkit.BatchNorm2d(C, momentum=momentum, dtype=np.float64)
    comm = LoneRank()
    layer = normkit.SyncBatchNorm(C, momentum=momentum, process_group=comm, dtype=np.float64)
    for step in range(3):
        xs = x + step
        assert_close(layer(xs), ref(xs), 1e-12)
        assert_close(layer.backward(dy), ref.backward(dy), 1e-12)
    assert_close(layer.running_mean, ref.running_mean, 1e-12)
    assert_close(layer.running_var, ref.running_var, 1e-12)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert comm.calls == 6


def test_default_process_group_without_mpi_init_is_one_process():
    """process_group=None in a plain process (no mpiexec): one process, BatchNorm's numbers."""
    code = (
        "import numpy as np, normkit\n"
        "x = np.random.default_rng(0).standard_normal((4, 3, 5))\n"
        "a, b = normkit.SyncBatchNorm(3, dtype=np.float64), normkit.BatchNorm1d(3, dtype=np.float64)\n"
        "ok = np.allclose(a(x), b(x), rtol=0, atol=1e-12) and np.allclose(a.backward(x), b.backward(x), rtol=0, atol=1e-12)\n"
        "ok = ok and np.allclose(a.running_var, b.running_var, rtol=0, atol=1e-12)\n"
        "print('OK' if ok else 'MISMATCH', type(a.process_group).__name__, a.process_group.Get_size())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "OK" and res.stdout.split()[-1] == "1", res.stdout


def test_without_mpi4py_the_default_is_one_process(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    group = sbn.default_process_group()
    assert isinstance(group, sbn._SingleProcess) and group.Get_size() == 1


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [object(), 3, "COMM_WORLD"], ids=["object", "int", "str"])
def test_process_group_without_allgather_is_a_type_error(group):
    with pytest.raises(TypeError, match="process_group"):
        normkit.SyncBatchNorm(C, process_group=group)


def test_process_group_without_a_size_is_a_type_error():
    class NoSize:
        def Allgather(self, sendbuf, recvbuf):
            pass

    with pytest.raises(TypeError, match="process_group.*Get_size"):
        normkit.SyncBatchNorm(C, process_group=NoSize())


def test_a_size_attribute_is_enough():
    class Sized:
        size = 1

        def Allgather(self, sendbuf, recvbuf):
            recvbuf[0] = sendbuf

    x = np.random.default_rng(3).standard_normal((3, C))
    assert_close(normkit.SyncBatchNorm(C, process_group=Sized(), dtype=np.float64)(x),
                 normkit.BatchNorm1d(C, dtype=np.float64)(x), 1e-12)


def _state(layer):
    return [np.array(v, copy=True) for v in layer.state_dict().values()]


@pytest.mark.parametrize("x,error,match", [
    (np.ones((4, C + 1, 2)), ValueError, "input: expected 3 channels"),
    (np.ones(4), ValueError, "input: expected at least 2 dimensions"),
    (np.ones((4, C), np.int64), TypeError, "input: expected dtype"),
    (np.ones((4, C), np.float32), TypeError, "input: expected dtype float64"),
    ([[1.0, 2.0, 3.0]], TypeError, "input: expected a numpy.ndarray"),
], ids=["channels", "1d", "int", "float32_for_float64", "list"])
def test_bad_input_raises_writes_nothing_and_still_takes_part(x, error, match):
    comm = LoneRank()
    layer = normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64, momentum=None)
    before = _state(layer)
    with pytest.raises(error, match=match):
        layer(x)
    assert all(np.array_equal(a, b) for a, b in zip(before, _state(layer)))
    assert comm.calls == 1  # the other ranks are not left waiting


def test_another_ranks_bad_input_raises_here():
    x = np.random.default_rng(4).standard_normal((3, C, 2))
    world = ThreadWorld(2)

    def fn(r, comm):
        layer = normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64)
        try:
            layer(x if r == 0 else x[:, :2])
        except sbn.RemoteInputError as e:
            return "remote", str(e), int(layer.num_batches_tracked)
        except ValueError as e:
            return "own", str(e), int(layer.num_batches_tracked)

    (kind0, msg0, n0), (kind1, _, n1) = world.run(fn)
    assert (kind0, kind1) == ("remote", "own") and "rank 1" in msg0 and n0 == n1 == 0


def test_another_ranks_bad_dy_raises_here():
    x = np.random.default_rng(5).standard_normal((3, C, 2))
    world = ThreadWorld(2)

    def fn(r, comm):
        layer = normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64)
        layer(x)
        try:
            layer.backward(x if r == 0 else x[:2])
        except sbn.RemoteInputError:
            return "remote"
        except ValueError as e:
            return "own" if "dy" in str(e) else repr(e)

    assert world.run(fn) == ["remote", "own"]


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1, 1)], ids=["2d", "4d"])
def test_one_value_per_channel_over_the_ranks_is_a_value_error(shape):
    comm = LoneRank()
    layer = normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64)
    before = _state(layer)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones(shape))
    assert all(np.array_equal(a, b) for a, b in zip(before, _state(layer)))


def test_one_value_on_each_of_two_ranks_is_enough():
    out = ThreadWorld(2).run(lambda r, comm: normkit.SyncBatchNorm(C, process_group=comm, dtype=np.float64)(
        np.full((1, C), float(r))))
    assert_close(out[0], -np.ones((1, C)), 1e-4)
    assert_close(out[1], np.ones((1, C)), 1e-4)


def test_backward_before_forward():
    with pytest.raises(normkit.StateError, match="forward call first"):
        normkit.SyncBatchNorm(C, process_group=LoneRank()).backward(np.ones((2, C)))


@pytest.mark.parametrize("track", [True, False], ids=["running", "batch_stats"])
def test_eval_is_local_and_batchnorms(track):
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal((5, C, 4)), rng.standard_normal((5, C, 4))
    comm = LoneRank()
    layer = normkit.SyncBatchNorm(C, process_group=comm, track_running_stats=track, dtype=np.float64)
    ref = normkit.BatchNorm1d(C, track_running_stats=track, dtype=np.float64)
    layer(x + 1), ref(x + 1)
    calls = comm.calls
    layer.eval(), ref.eval()
    assert_close(layer(x), ref(x), 1e-12)
    assert_close(layer.backward(dy), ref.backward(dy), 1e-12)
    assert_close(layer.grads["weight"], ref.grads["weight"], 1e-12)
    assert comm.calls == calls
    if track:
        layer.use_batch_stats = ref.use_batch_stats = True
        assert_close(layer(x), ref(x), 1e-12)
        assert comm.calls == calls


def test_state_dict_and_parameters_are_batchnorms():
    layer, ref = normkit.SyncBatchNorm(C), normkit.BatchNorm2d(C)
    assert list(layer.state_dict()) == list(ref.state_dict())
    assert list(layer.parameters()) == ["weight", "bias"]
    layer.load_state_dict(ref.state_dict())
    assert "SyncBatchNorm(3, eps=1e-05" in repr(layer)
    assert normkit.SyncBatchNorm in (getattr(normkit, n) for n in normkit.__all__)


def test_no_affine_has_no_grads():
    x = np.random.default_rng(7).standard_normal((4, C))
    layer = normkit.SyncBatchNorm(C, affine=False, process_group=LoneRank(), dtype=np.float64)
    ref = normkit.BatchNorm1d(C, affine=False, dtype=np.float64)
    layer(x), ref(x)
    assert_close(layer.backward(x), ref.backward(x), 1e-12)
    assert layer.grads == {}


# -- the real launchers ------------------------------------------------------------------------------

def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "MPI_", "OMPI_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")  # harmless for MPICH; Open MPI refuses root otherwise
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (WORKERS, env.get("PYTHONPATH")) if p)
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on the loopback, whatever the hostname resolves to
    return env


def _report(res, world):
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(common.REPORT)]
    detail = f"exit {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
    assert lines, "no report line\n" + detail
    report = json.loads(lines[-1][len(common.REPORT):])
    assert report["failures"] == [], "\n".join(report["failures"])
    assert res.returncode == 0, detail
    assert report["world"] == world
    return report["checks"]


def _expected_case_checks():
    names = []
    for case in common.CASES:
        for what in ("output", "input_grad", "running_mean", "running_var", "num_batches_tracked",
                     "bitwise_on_every_rank", "eval_output", "eval_input_grad", "eval_no_communication"):
            names.append(f"{case[0]}/{what}")
        if case[6]:
            names.append(f"{case[0]}/param_grad_sum")
    return names


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


@pytest.mark.parametrize("n", [2, 3])
def test_mpiexec_workers(n):
    pytest.importorskip("mpi4py")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH")
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", os.path.join(WORKERS, "mpi_worker.py")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    checks = _report(res, n)
    expected = _expected_case_checks() + [
        "global_count_1_raises", "global_count_1_no_state_written", "bad_input_raises_on_every_rank",
        "bad_input_no_state_written", "after_bad_input_steps_continue", "bad_dy_raises_on_every_rank",
        "default_group_is_world", "stable_1e4_f64_3d/variance_kept"]
    missing = [c for c in expected if c not in checks]
    assert not missing, missing
    assert all(checks.values())


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("n", [2, 3])
def test_torchrun_workers(n):
    pytest.importorskip("torch")
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(WORKERS, "torch_worker.py")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    checks = _report(res, n)
    expected = _expected_case_checks() + [
        "convert/replaced", "convert/shares_tensors", "convert/output", "convert/input_grad",
        "convert/param_grad_sum", "convert/buffers", "convert/state_dict_keys"]
    missing = [c for c in expected if c not in checks]
    assert not missing, missing
    assert all(checks.values())


# -- normkit.torch.SyncBatchNorm in one process ------------------------------------------------------

def _torch_sync():
    torch = pytest.importorskip("torch")
    return torch, importlib.import_module("normkit.torch").SyncBatchNorm


def test_torch_export_is_the_sync_module():
    _torch_sync()
    assert importlib.import_module("normkit.torch").SyncBatchNorm is \
        importlib.import_module("normkit.torch._sync").SyncBatchNorm


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_gradcheck_in_float64(training):
    torch, cls = _torch_sync()
    torch.manual_seed(0)
    m = cls(C, dtype=torch.float64).train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    m.momentum = 0.0  # the running statistics stay put across gradcheck's many forwards
    x = torch.randn(4, C, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: m(x), (x, m.weight, m.bias))


def test_torch_constructor_is_torchs():
    torch, cls = _torch_sync()
    import inspect
    ours = list(inspect.signature(cls.__init__).parameters)[1:9]
    theirs = list(inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters)[1:9]
    assert ours == theirs == ["num_features", "eps", "momentum", "affine", "track_running_stats",
                              "process_group", "device", "dtype"]
    m = cls(4, 1e-3, None, False, True, None, "cpu", torch.float64)
    assert m.weight is None and m.running_mean.dtype == torch.float64 and m.momentum is None
    assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    assert list(cls(4).state_dict()) == list(torch.nn.SyncBatchNorm(4).state_dict())


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(5, C), (4, C, 6), (3, C, 4, 5), (2, C, 2, 3, 2)], ids=["2d", "3d", "4d", "5d"])
def test_torch_single_process_is_batchnorm(dtype_name, shape):
    torch, cls = _torch_sync()
    dtype = getattr(torch, dtype_name)
    ref_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)]
    torch.manual_seed(0)
    ref, m = ref_cls(C, dtype=torch.float64), cls(C, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        m.weight.copy_(ref.weight)
        m.bias.copy_(ref.bias)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype).to(torch.float64)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).to(torch.float64)
    t = 1e-10 if dtype == torch.float64 else 1e-5
    for _ in range(2):
        xr, xs = x.clone().requires_grad_(), x.to(dtype).clone().requires_grad_()
        yr, ys = ref(xr), m(xs)
        yr.backward(g)
        ys.backward(g.to(dtype))
        assert ys.dtype == dtype
        assert_close(ys.detach().numpy(), yr.detach().numpy(), t)
        assert_close(xs.grad.numpy(), xr.grad.numpy(), t)
    assert_close(m.weight.grad.numpy(), ref.weight.grad.numpy(), t * 10)
    assert_close(m.bias.grad.numpy(), ref.bias.grad.numpy(), t * 10)
    assert_close(m.running_var.numpy(), ref.running_var.numpy(), t)
    assert int(m.num_batches_tracked) == 2
    m.eval(), ref.eval()
    with torch.no_grad():
        assert_close(m(x.to(dtype)).numpy(), ref(x).numpy(), t)


def test_torch_errors():
    torch, cls = _torch_sync()
    m = cls(C)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.ones(3))
    with pytest.raises(ValueError, match="channels"):
        m(torch.ones(2, C + 1))
    with pytest.raises(TypeError, match="input"):
        m(torch.ones(2, C, dtype=torch.float64))  # float32 module
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.ones(1, C))
    assert int(m.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="device"):
        cls(C, device="meta")


def test_torch_half_input_on_a_float32_module():
    torch, cls = _torch_sync()
    m, ref = cls(C), torch.nn.BatchNorm2d(C)
    x = torch.randn(4, C, 3, 3)
    for dtype in (torch.float16, torch.bfloat16):
        y = m(x.to(dtype))
        assert y.dtype == dtype
        assert_close(y.float().detach().numpy(), ref(x.to(dtype).float()).detach().numpy(), 1e-2)


def test_torch_convert_sync_batchnorm():
    torch, cls = _torch_sync()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.ReLU()),
                                torch.nn.SyncBatchNorm(5, affine=False))
    model[1].eval()
    bn = model[1]
    out = cls.convert_sync_batchnorm(model)
    assert out is model and isinstance(out[1], cls) and isinstance(out[2][0], cls) and isinstance(out[3], cls)
    assert out[1].weight is bn.weight and out[1].running_var is bn.running_var and not out[1].training
    assert out[3].weight is None and out[2][0].training
    assert isinstance(cls.convert_sync_batchnorm(torch.nn.BatchNorm3d(2)), cls)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    out.train()
    y = out[1](out[0](x))
    y.sum().backward()
    assert x.grad is not None and out[0].weight.grad is not None
    # normkit.torch's own BatchNorm modules convert too, where the package has them.
    try:
        nk_bn = importlib.import_module("normkit.torch").BatchNorm2d
    except (ImportError, AttributeError):
        return
    src = nk_bn(4)
    conv = cls.convert_sync_batchnorm(torch.nn.Sequential(src))
    assert isinstance(conv[0], cls) and conv[0].weight is src.weight
