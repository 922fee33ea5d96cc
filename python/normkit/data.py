"""Data helpers for normalization experiments: class-balanced batches (pure NumPy).

Batch normalization makes every example's output depend on the other examples in its batch, so the
*structure* of a batch is part of the model: Hajaj and Gillies, "Batch Normalization and the impact
of batch structure on the behavior of deep convolution networks" (arXiv:1802.07590), train on
balanced batches (one image per class) and show that what the network learns changes with it.
`BalancedBatchSampler` builds such batches from a label array; it follows torch's batch-sampler
protocol (iterating yields batches of indices, `len()` is the number of batches), so it can be passed
as `torch.utils.data.DataLoader(dataset, batch_sampler=...)` as well as used on plain arrays.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BalancedBatchSampler"]


def _int_arg(v: object, name: str, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected {what}, got {type(v).__name__} {v!r}")
    return int(v)


def _labels_arg(labels: Any) -> npt.NDArray[np.integer[Any]]:
    """labels as a 1-D integer ndarray (a copy: later edits of the caller's array change nothing)."""
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"labels: expected a 1-D array of integers, got {type(labels).__name__}")
    try:
        if hasattr(labels, "detach") and hasattr(labels, "cpu"):  # a torch tensor
            labels = labels.detach().cpu().numpy()
        arr = np.array(labels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"labels: expected a 1-D array of integers, got {type(labels).__name__} "
                        f"({e})") from None
    if arr.shape == (0,):  # before the dtype: an empty list has no integer dtype
        raise ValueError("labels: expected at least one label, got an empty array")
    if not np.issubdtype(arr.dtype, np.integer):  # bool, float, object (None) and str are refused
        raise TypeError(f"labels: expected a 1-D array of integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array of integers, got shape {arr.shape}")
    return arr


def _max_batches(slots: npt.NDArray[np.integer[Any]], per_batch: int) -> int:
    """The largest B with sum_c min(slots[c], B) >= per_batch * B: the most batches of `per_batch`
    distinct classes that can be formed when class c can appear in at most slots[c] batches.

    Necessary: a class is in at most min(slots[c], B) of B batches, and B batches hold
    per_batch * B class places. Sufficient: given usages u_c <= B summing to per_batch * B, the
    forced-first fill of _schedule builds the batches. g(B) = sum min(slots, B) - per_batch * B is
    concave with g(0) = 0, so the feasible B form an interval [0, B_max]: bisect it."""
    lo, hi = 0, int(slots.sum()) // per_batch  # g(lo) >= 0; every B > hi is infeasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(slots, mid).sum() >= per_batch * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


class BalancedBatchSampler:
    """Class-balanced batches of indices (arXiv:1802.07590, Hajaj and Gillies: balanced batches,
    one example per class, for batch-normalized networks).

    ``BalancedBatchSampler(labels, classes_per_batch=None, samples_per_class=1, seed=0)``

    Iterating yields one epoch of batches, each a new ``np.int64`` array of
    ``classes_per_batch * samples_per_class`` indices into ``labels``: ``samples_per_class``
    examples of each of ``classes_per_batch`` distinct classes (all classes when None), the
    examples of one class next to each other, the classes in random order. Within an epoch no
    index appears twice.

    Arguments:
        labels: the class of every example, a 1-D integer array (or a list or CPU tensor of
            integers); any integers, e.g. ``[3, 7, 7, 3]``, not only 0..K-1.
        classes_per_batch: P, the classes in each batch, 1 <= P <= K (K = the number of distinct
            labels); None means K.
        samples_per_class: s >= 1; every class needs at least s examples.
        seed: an integer >= 0; epoch e of the sampler is shuffled by ``default_rng((seed, e))``.

    Epoch and length rule. Class c with n_c examples gives m_c = n_c // s groups of s examples.
    An epoch is ``len(sampler)`` batches, where ``len`` is the largest B with
    ``sum_c min(m_c, B) >= P * B`` -- the most batches that any arrangement could fill without
    reusing an index, so an epoch ends exactly when no further batch can be filled. It depends on
    the class counts only, so it is the same for every epoch and equals the number of batches
    yielded. With all classes per batch it is ``min_c m_c``; with balanced labels (every n_c = n,
    s dividing n) and P dividing K * n / s, an epoch uses every index exactly once. Which
    examples and, when P < K, which classes fill each batch are drawn at random per epoch; unused
    examples (remainders, surplus of large classes) are left out of that epoch only. Building an
    epoch costs O(N) with all classes per batch, O(len * K) with a subset.

    Epochs: the k-th ``iter()`` of a sampler (counting from 0) yields epoch k, so each iteration is
    a new shuffle and a fresh sampler with the same seed yields the same sequence of epochs.
    ``set_epoch(e)`` makes the next ``iter()`` yield epoch e (as torch's DistributedSampler does),
    for resuming a run.

    Errors (raised by the constructor, before any state is built): TypeError for labels that are
    not integers or arguments that are not ints; ValueError for labels that are not 1-D or are
    empty, classes_per_batch outside [1, K], samples_per_class < 1 or above the smallest class's
    count, and a negative seed.
    """

    def __init__(self, labels: npt.ArrayLike, classes_per_batch: int | None = None,
                 samples_per_class: int = 1, seed: int = 0) -> None:
        labels = _labels_arg(labels)
        if classes_per_batch is not None:
            classes_per_batch = _int_arg(classes_per_batch, "classes_per_batch",
                                         "None or a positive integer")
        samples_per_class = _int_arg(samples_per_class, "samples_per_class", "a positive integer")
        seed = _int_arg(seed, "seed", "an integer >= 0")

        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        K = len(classes)
        if classes_per_batch is None:
            classes_per_batch = K
        elif not 1 <= classes_per_batch <= K:
            raise ValueError(f"classes_per_batch: expected an integer in [1, {K}] (labels hold {K} "
                             f"classes), got {classes_per_batch}")
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class: expected a positive integer, got {samples_per_class}")
        smallest = int(np.argmin(counts))
        if counts[smallest] < samples_per_class:
            raise ValueError(f"samples_per_class: expected at most {counts[smallest]} (class "
                             f"{classes[smallest]} has {counts[smallest]} examples in labels), got "
                             f"{samples_per_class}")
        if seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed}")

        self.classes = classes                      # the distinct labels, sorted
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.seed = seed
        by_class = np.argsort(inverse, kind="stable").astype(np.int64)
        self._class_indices = np.split(by_class, np.cumsum(counts)[:-1])  # class k's indices
        self._slots = counts // samples_per_class   # m_c: the groups class c can give per epoch
        self._len = _max_batches(self._slots, classes_per_batch)
        self._epoch = 0

    @property
    def num_classes(self) -> int:
        """K, the number of distinct labels."""
        return len(self.classes)

    @property
    def batch_size(self) -> int:
        """Indices in every batch: classes_per_batch * samples_per_class."""
        return self.classes_per_batch * self.samples_per_class

    @property
    def epoch(self) -> int:
        """The epoch the next iter() yields."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iter() yield epoch `epoch` (later iterations continue from it)."""
        epoch = _int_arg(epoch, "epoch", "an integer >= 0")
        if epoch < 0:
            raise ValueError(f"epoch: expected an integer >= 0, got {epoch}")
        self._epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[npt.NDArray[np.int64]]:
        # The epoch number is taken now, at iter(), not at the first next(): iterators created
        # together get consecutive epochs whatever order they are consumed in.
        epoch, self._epoch = self._epoch, self._epoch + 1
        return iter(self._schedule(epoch))

    def __repr__(self) -> str:
        return (f"BalancedBatchSampler(num_classes={self.num_classes}, "
                f"classes_per_batch={self.classes_per_batch}, "
                f"samples_per_class={self.samples_per_class}, seed={self.seed}, len={self._len})")

    def _schedule(self, epoch: int) -> list[npt.NDArray[np.int64]]:
        """Epoch `epoch`'s batches, as a list of new int64 arrays."""
        rng = np.random.default_rng((self.seed, epoch))
        B, P, s = self._len, self.classes_per_batch, self.samples_per_class
        K = len(self._slots)
        # Usage u_c: batches that class c joins this epoch, u_c <= min(m_c, B), sum u_c = P * B.
        # Start from the caps and take the surplus away one unit at a time from random classes,
        # each class weighted by what it still has (drawing units without replacement).
        use = np.minimum(self._slots, B)
        surplus = int(use.sum()) - P * B
        if surplus:
            units = np.repeat(np.arange(K), use)
            dropped = rng.choice(len(units), size=surplus, replace=False)
            use = use - np.bincount(units[dropped], minlength=K)
        # Which classes form each batch: batch after batch, with R batches still to form, a class
        # that must join every one of them (u_c == R) is taken; the other places go to a random
        # draw without replacement, weighted by what each class has left (Gumbel top-k). Taking the
        # forced classes keeps u_c <= R - 1 for the next step, and sum u_c = P * R keeps them at
        # most P, so every batch is filled and the epoch has exactly B batches. Cost: O(B * K).
        # With all classes in every batch (P == K, so u_c == B) there is no choice to make.
        members = np.empty((B, P), dtype=np.int64)
        if P == K:
            members[:] = np.arange(K)
        cls, left = np.flatnonzero(use), use[use > 0].astype(np.int64)
        for b in range(B if P < K else 0):
            R = B - b
            keys = np.log(left) + rng.gumbel(size=len(left))
            keys[left == R] = np.inf
            pick = np.argpartition(keys, len(left) - P)[len(left) - P:]
            members[b] = cls[pick]
            left[pick] -= 1
            if left[pick].min() == 0:
                cls, left = cls[left > 0], left[left > 0]
        # The examples: a random u_c * s of class c's, in groups of s; class c's k-th batch (in
        # the order formed) gets its k-th group.
        starts = np.concatenate(([0], np.cumsum(use)[:-1]))   # first group of class c
        groups = np.concatenate([rng.permutation(self._class_indices[c])[: use[c] * s]
                                 for c in range(K)]).reshape(-1, s)
        flat = members.reshape(-1)
        by_class = np.argsort(flat, kind="stable")           # places, class by class, in order
        rank = np.empty_like(flat)
        rank[by_class] = np.arange(len(flat)) - starts[flat[by_class]]
        grid = groups[starts[flat] + rank].reshape(B, P, s)
        # Shuffle the classes within each batch and the batches themselves (the forced choices
        # gather at the end of the loop above).
        within = rng.permuted(np.broadcast_to(np.arange(P), (B, P)), axis=1)
        grid = np.take_along_axis(grid, within[:, :, None], axis=1)[rng.permutation(B)]
        return [np.array(batch.reshape(-1), dtype=np.int64) for batch in grid]
