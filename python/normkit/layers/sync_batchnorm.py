"""SyncBatchNorm: BatchNorm whose training statistics span the processes of a data-parallel job.

Every tensor-sized pass is the core's, on this process's shard (plan_per_channel of the local
batch): group_moments for the statistics, normalize for y, backward_sums and
backward_apply_coefficients for the backward. Between them the processes exchange C-sized
arrays with one Allgather each way, and each process merges them in rank order (so every rank
computes bitwise the same numbers):

  forward   per rank r and channel c: n_r, m_r, M2_r = n_r * var_r (count, mean, squared
            deviations), merged with Chan's formula, rank 0 first:
              n = n_a + n_b,  d = m_b - m_a,  m = m_a + d n_b/n,  M2 = M2_a + M2_b + d^2 n_a n_b/n
            (exact for uneven batches; a rank with no samples sends n = 0 and changes nothing).
  backward  per rank: B_r = sum dy, A_r = sum dy (x - m) about the global mean, summed in rank
            order; with the global M = n, rstd r and weight w (tests/reference.py's
            batch-norm backward over the concatenated batch):
              dx = r w dy - r^3 w A (x - m)/M - r w B/M
            dweight = r A_r and dbias = B_r are this rank's contributions (their sum over the
            ranks is BatchNorm's gradient), as torch's SyncBatchNorm leaves them.

Running statistics follow torch: the global mean, and the global biased variance times
M/(M - 1). Eval (with running statistics) and batch statistics outside training are local, with
no communication, as in torch.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .. import _checks, _core, _engine, functional as F
from ._variant import running_factor, unbiased
from .batchnorm import BatchNormState, running_stats_affine, setup_batchnorm_state


class _ProcessGroup(Protocol):
    """What SyncBatchNorm calls on a process_group: mpi4py's buffer-based Allgather (and its
    size, Get_size() or `size`, which _size_of looks up)."""

    def Allgather(self, sendbuf: npt.NDArray[np.float64], recvbuf: npt.NDArray[np.float64],
                  /) -> object: ...


class _SingleProcess:
    """The process group of a job of one process (process_group=None without mpi4py)."""

    def Get_size(self) -> int:
        return 1

    def Allgather(self, sendbuf: npt.NDArray[np.float64], recvbuf: npt.NDArray[np.float64]) -> None:
        np.copyto(recvbuf.reshape(np.shape(sendbuf)), sendbuf)


def _size_of(group: _ProcessGroup) -> int:
    """The number of processes of a communicator: mpi4py's Get_size(), or a `size` attribute."""
    get = getattr(group, "Get_size", None)
    size = get() if callable(get) else getattr(group, "size", None)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise TypeError(f"process_group: expected a communicator whose Get_size() (or size) is a "
                        f"positive integer, got {size!r} from {type(group).__name__}")
    return int(size)


def process_group_arg(group: _ProcessGroup | None) -> _ProcessGroup | None:
    """None (resolved at the first synchronized forward), or an object with mpi4py's
    buffer-based Allgather(sendbuf, recvbuf) and its size (Get_size() or size)."""
    if group is None:
        return None
    if not callable(getattr(group, "Allgather", None)):
        raise TypeError(f"process_group: expected None, an mpi4py communicator or an object with "
                        f"Allgather(sendbuf, recvbuf) and Get_size(), got {type(group).__name__}")
    if not (callable(getattr(group, "Get_size", None)) or hasattr(group, "size")):
        raise TypeError(f"process_group: expected an object with Get_size() (or size) next to "
                        f"Allgather, got {type(group).__name__}")
    return group


def default_process_group() -> _ProcessGroup:
    """MPI.COMM_WORLD when mpi4py is installed, else a single process."""
    try:
        from mpi4py import MPI
    except ImportError:
        return _SingleProcess()
    return MPI.COMM_WORLD


class RemoteInputError(ValueError):
    """Another rank rejected its input (or its dy): this rank raises too instead of waiting."""


# A rank whose input fails its checks still takes part in the exchange, with this count, so
# that the other ranks raise RemoteInputError instead of waiting forever in the next collective.
_REJECTED = -1.0


def merge_moments(n: npt.NDArray[np.float64], mean: npt.NDArray[np.float64],
                  m2: npt.NDArray[np.float64]
                  ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                             npt.NDArray[np.float64]]:
    """Chan's merge of per-rank (count, mean, M2) rows, (P, C) each, in rank order: (n, mean,
    M2) of the union, (C,) each; ranks with n = 0 change nothing."""
    tn, tm, tm2 = n[0].copy(), mean[0].copy(), m2[0].copy()
    for r in range(1, n.shape[0]):
        nb = n[r]
        total = tn + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(total > 0, nb / total, 0.0)  # n_b / n, 0 while both are empty
        d = mean[r] - tm
        tm = tm + d * frac
        tm2 = tm2 + m2[r] + d * d * tn * frac
        tn = total
    return tn, tm, tm2


def sum_in_rank_order(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The sum of (P, C) rows, rank 0 first (one fixed order on every rank)."""
    total: npt.NDArray[np.float64] = rows[0].copy()
    for r in range(1, rows.shape[0]):
        total += rows[r]
    return total


class SyncSaved:
    """A synchronized forward: its plan, the local x (contiguous), the global mean, rstd and
    count per channel, the weight (float64) and the output's shape."""

    __slots__ = ("plan", "x", "mean", "rstd", "count", "w", "shape", "group")

    def __init__(self, plan: _core.Plan, x: npt.NDArray[Any], mean: npt.NDArray[np.float64],
                 rstd: npt.NDArray[np.float64], count: float, w: npt.NDArray[np.float64],
                 shape: tuple[int, ...], group: _ProcessGroup) -> None:
        self.plan, self.x, self.mean, self.rstd, self.count = plan, x, mean, rstd, count
        self.w, self.shape, self.group = w, shape, group


class SyncBatchNorm(BatchNormState):
    """Batch normalization of (N, C, *spatial) input (any rank >= 2) with statistics over
    every process of `process_group`: torch.nn.SyncBatchNorm on NumPy arrays.

    process_group: an mpi4py communicator, or any object with mpi4py's buffer-based
    Allgather(sendbuf, recvbuf) (the only call made) and Get_size() (or `size`); None is
    MPI.COMM_WORLD when mpi4py is installed, else a single process. Every process must call
    forward (in training) and backward the same number of times, with the same num_features
    and dtype; batch sizes may differ, down to 0 samples.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: _ProcessGroup | None = None,
                 dtype: npt.DTypeLike = np.float32) -> None:
        super().__init__()
        self.process_group = process_group_arg(process_group)
        setup_batchnorm_state(self, num_features, eps, momentum, affine, track_running_stats, dtype)
        self.use_batch_stats = False  # as BatchNorm's (eval only; local, as torch's)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert (self.running_mean is not None and self.running_var is not None
                    and self.num_batches_tracked is not None)  # registered with tracking
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked[...] = 0

    def _group(self) -> _ProcessGroup:
        if self.process_group is None:
            self.process_group = default_process_group()
        return self.process_group

    def _allgather(self, group: _ProcessGroup,
                   send: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        size = _size_of(group)
        recv = np.empty((size,) + send.shape, np.float64)
        group.Allgather(send, recv)
        return recv

    def _check_input(self, x: npt.NDArray[Any]) -> None:
        _checks.layer_input(x, self.dtype, min_ndim=2, channels=self.num_features,
                            ranks=" (N, C, *spatial)")

    # -- forward ------------------------------------------------------------------------------
    def _forward(self, x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], SyncSaved | _core.Saved]:
        if not self.training:  # local, as torch's SyncBatchNorm in eval
            self._check_input(x)
            use_batch = self.running_mean is None or self.use_batch_stats
            rm, rv = (None, None) if use_batch else (self.running_mean, self.running_var)
            return F.batch_norm_impl(x, rm, rv, self.weight, self.bias, use_batch, 0.0, self.eps)
        group = self._group()
        C = self.num_features
        send = np.zeros((3, C))  # rows: count, mean, M2
        try:
            self._check_input(x)
        except (TypeError, ValueError):
            send[0] = _REJECTED
            self._allgather(group, send)
            raise
        x = _checks.contiguous(x)
        N, _, S = _engine.planes(x)
        plan = _core.plan_per_channel(N, C, S)
        if x.size:
            mean, var = _core.group_moments(plan, x)  # local, biased, float64
            send[0], send[1], send[2] = N * S, mean, var * (N * S)
        got = self._allgather(group, send)
        rejected = np.flatnonzero(got[:, 0, 0] < 0)
        if rejected.size:
            raise RemoteInputError(f"input: rank {int(rejected[0])} of the process_group rejected its "
                                   f"input, so this forward is abandoned on every rank")
        counts, mean, m2 = merge_moments(got[:, 0], got[:, 1], got[:, 2])
        M = float(counts[0])
        if M == 1:
            raise ValueError(f"input: expected more than 1 value per channel when training, got 1 "
                             f"over the process_group (this rank's input has shape {x.shape})")
        with np.errstate(invalid="ignore", divide="ignore"):
            var = m2 / M  # biased; NaN when every rank's batch is empty
        rstd = _engine.rstd_of(var, self.eps)
        y = _core.empty_like(x)
        if x.size:
            _core.normalize(plan, x, mean, rstd, self.weight, self.bias, y)
        w = np.ones(C) if self.weight is None else self.weight.astype(np.float64)
        saved = SyncSaved(plan, x, mean, rstd, M, w, x.shape, group)
        if self.track_running_stats:  # every check has passed: the state changes now
            assert (self.running_mean is not None and self.running_var is not None
                    and self.num_batches_tracked is not None)  # registered with tracking
            if M > 0:  # an empty global batch leaves them alone, as BatchNorm
                factor = running_factor(self)
                _engine.running_update(self.running_mean, mean, factor)
                _engine.running_update(self.running_var, unbiased(var, M), factor)
            self.num_batches_tracked += 1
        return y, saved

    # -- backward -----------------------------------------------------------------------------
    def backward(self, dy: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Gradient w.r.t. the input of the last forward; this rank's parameter gradients go to
        `grads` (in training their sum over the ranks is BatchNorm's)."""
        saved = self._saved
        if saved is None:
            raise _checks.StateError(
                f"backward: expected a forward call first, got none on this {type(self).__name__}")
        dx, self.grads = self.backward_of(saved, dy)
        return dx

    def backward_of(self, saved: SyncSaved | _core.Saved, dy: npt.NDArray[Any]
                    ) -> tuple[npt.NDArray[Any], dict[str, npt.NDArray[Any]]]:
        """(dx, grads) for the forward that made `saved` (a SyncSaved or the local path's)."""
        if not isinstance(saved, SyncSaved):
            return self._local_backward(saved, dy)
        C = self.num_features
        send = np.zeros((3, C))  # rows: sum dy, sum dy (x - mean), status
        try:
            dy = _checks.grad_output(dy, saved.shape, saved.x.dtype)
        except (TypeError, ValueError):
            send[2] = _REJECTED
            self._allgather(saved.group, send)
            raise
        x = saved.x
        if x.size:
            B, A = _core.backward_sums(saved.plan, x, dy, saved.mean)
            send[0], send[1] = B, A
        got = self._allgather(saved.group, send)
        rejected = np.flatnonzero(got[:, 2, 0] < 0)
        if rejected.size:
            raise RemoteInputError(f"dy: rank {int(rejected[0])} of the process_group rejected its dy, "
                                   f"so this backward is abandoned on every rank")
        B, A = sum_in_rank_order(got[:, 0]), sum_in_rank_order(got[:, 1])
        r, w, M = saved.rstd, saved.w, saved.count
        dx = _core.empty_like(x)
        if x.size:
            c1, c2, c3 = r * w, -r ** 2 * r * w * A / M, -r * w * B / M
            _core.backward_apply_coefficients(saved.plan, x, dy, saved.mean, c1, c2, c3, dx)
        # this rank's contributions (zero from an empty shard)
        grads: dict[str, npt.NDArray[Any]] = {}
        if self.weight is not None:
            grads["weight"] = (r * send[1] if x.size else np.zeros(C)).astype(self.weight.dtype)
        if self.bias is not None:
            grads["bias"] = send[0].astype(self.bias.dtype)
        return dx.reshape(saved.shape), grads

    def _local_backward(self, saved: _core.Saved, dy: npt.NDArray[Any]
                        ) -> tuple[npt.NDArray[Any], dict[str, npt.NDArray[Any]]]:
        want_w, want_b = self.weight is not None, self.bias is not None
        fast = _core.backward_fast(saved, dy, want_w, want_b)
        if fast is not None:
            dx, dw, db = fast
        else:
            dy = _checks.grad_output(dy, saved.shape, saved.x.dtype).reshape(saved.x.shape)
            dx, dw, db = _engine.backward(saved, dy, want_w, want_b)
        grads: dict[str, npt.NDArray[Any]] = {}
        if dw is not None:
            assert self.weight is not None  # dw only when want_w
            grads["weight"] = dw.reshape(self.weight.shape)
        if db is not None:
            assert self.bias is not None  # db only when want_b
            grads["bias"] = db.reshape(self.bias.shape)
        return dx, grads

    def _inference_affine(self, modality: object
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return running_stats_affine(self)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
