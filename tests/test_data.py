"""normkit.data.BalancedBatchSampler: class-balanced index batches (arXiv:1802.07590).

Spec: iterating yields one epoch of batches, each a 1-D np.int64 array holding samples_per_class
(s) examples of each of classes_per_batch (P) distinct classes (all K classes by default), one
class's examples next to each other; no index twice within an epoch. len() is the largest B with
sum_c min(n_c // s, B) >= P * B -- the most batches any arrangement could fill -- and every epoch
yields exactly len() batches. The k-th iter() yields epoch k: a fresh sampler with the same seed
repeats the sequence, and consecutive epochs are different shuffles. Bad arguments raise
TypeError (wrong type) or ValueError (wrong value) whose message starts with the argument's name.
"""
import functools
import itertools

import numpy as np
import pytest

from normkit.data import BalancedBatchSampler

# -- label sets -------------------------------------------------------------------------------
BALANCED = np.repeat(np.arange(6), 4)                        # 6 classes x 4 examples
UNBALANCED = np.array([3, 7, 7, 3, 5, 5, 5, 5, 5, 9, 9, 9])  # counts 2, 5, 2, 3 (classes 3,5,7,9)
ODD_LABELS = np.array([-4, 1000, 1000, -4, 12, -4, 12, 1000, 12, 12])  # any integers
SKEWED = np.concatenate([np.full(30, 0), np.full(3, 1), np.full(7, 2), np.full(4, 3), np.full(11, 4)])
LABEL_SETS = {"balanced": BALANCED, "unbalanced": UNBALANCED, "odd_labels": ODD_LABELS,
              "skewed": SKEWED}

# (label set, classes_per_batch, samples_per_class): all classes, subsets, single classes, pairs.
CASES = [
    ("balanced", None, 1), ("balanced", None, 2), ("balanced", None, 4), ("balanced", 3, 1),
    ("balanced", 4, 2), ("balanced", 1, 3), ("balanced", 5, 1),
    ("unbalanced", None, 1), ("unbalanced", None, 2), ("unbalanced", 2, 1), ("unbalanced", 3, 2),
    ("unbalanced", 1, 1),
    ("odd_labels", None, 1), ("odd_labels", 2, 1), ("odd_labels", 2, 3),
    ("skewed", None, 1), ("skewed", 2, 1), ("skewed", 3, 2), ("skewed", 4, 1), ("skewed", 2, 3),
]
CASE_IDS = [f"{name}-P{p}-s{s}" for name, p, s in CASES]
CASE = pytest.mark.parametrize("name,P,s", CASES, ids=CASE_IDS)


def sampler_for(name, P, s, seed=0):
    return LABEL_SETS[name], BalancedBatchSampler(LABEL_SETS[name], classes_per_batch=P,
                                                  samples_per_class=s, seed=seed)


def num_classes(labels):
    return len(np.unique(labels))


@functools.lru_cache(maxsize=None)
def most_batches(slots, P):
    """Brute force: the most batches of P distinct classes when class c can join at most slots[c]
    batches (slots a sorted tuple), by trying every choice of P classes for the next batch."""
    best = 0
    for chosen in itertools.combinations(range(len(slots)), P):
        if all(slots[c] > 0 for c in chosen):
            rest = tuple(sorted(v - (i in chosen) for i, v in enumerate(slots)))
            best = max(best, 1 + most_batches(rest, P))
    return best


def check_epoch(labels, batches, P, s):
    """Every batch is balanced and well-formed; no index is used twice in the epoch."""
    for batch in batches:
        assert isinstance(batch, np.ndarray) and batch.dtype == np.int64 and batch.ndim == 1
        assert len(batch) == P * s
        assert batch.min() >= 0 and batch.max() < len(labels)
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == P, f"expected {P} classes in a batch, got {labels[batch]}"
        assert (counts == s).all(), f"expected {s} examples of each class, got {labels[batch]}"
        # one class's examples next to each other: the labels change only at group boundaries
        groups = labels[batch].reshape(P, s)
        assert (groups == groups[:, :1]).all(), f"a class's examples are split: {labels[batch]}"
    used = np.concatenate(batches)
    assert len(np.unique(used)) == len(used), "an index appears twice within one epoch"


# -- every batch balanced, no index twice, len -----------------------------------------------
@CASE
def test_every_epoch_is_balanced_without_repeats(name, P, s):
    labels, sampler = sampler_for(name, P, s)
    P = P or num_classes(labels)
    for _ in range(5):
        check_epoch(labels, list(sampler), P, s)


@CASE
def test_len_is_the_number_of_batches_of_every_epoch(name, P, s):
    labels, sampler = sampler_for(name, P, s, seed=3)
    n = len(sampler)
    assert isinstance(n, int) and n >= 1
    assert [sum(1 for _ in sampler) for _ in range(8)] == [n] * 8
    assert len(sampler) == n  # iterating does not change it


@CASE
def test_len_is_the_most_batches_any_arrangement_can_fill(name, P, s):
    labels, sampler = sampler_for(name, P, s)
    P = P or num_classes(labels)
    slots = tuple(sorted(np.unique(labels, return_counts=True)[1] // s))
    assert len(sampler) == most_batches(slots, P)


@CASE
def test_epoch_ends_when_no_further_batch_can_be_filled(name, P, s):
    labels, sampler = sampler_for(name, P, s)
    P = P or num_classes(labels)
    for _ in range(3):
        unused = np.setdiff1d(np.arange(len(labels)), np.concatenate(list(sampler)))
        _, left = np.unique(labels[unused], return_counts=True)
        assert (left >= s).sum() < P, "the leftover examples would fill another batch"


def test_len_rule_for_all_classes_is_the_smallest_class():
    labels = np.repeat([0, 1, 2], [9, 5, 12])
    assert len(BalancedBatchSampler(labels)) == 5
    assert len(BalancedBatchSampler(labels, samples_per_class=2)) == 2
    assert len(BalancedBatchSampler(labels, samples_per_class=5)) == 1


def test_len_rule_with_a_subset_of_classes():
    # counts 30, 3, 7, 4, 11 with P = 2: a big class cannot pair with itself, so it is capped by
    # the others (3 + 7 + 4 + 11 = 25 examples to pair with), not by its size: 25 batches.
    assert len(BalancedBatchSampler(SKEWED, classes_per_batch=2)) == 25
    assert len(BalancedBatchSampler(SKEWED, classes_per_batch=1)) == 55
    assert len(BalancedBatchSampler(SKEWED, classes_per_batch=5)) == 3


# -- coverage ----------------------------------------------------------------------------------
@pytest.mark.parametrize("P,s", [(None, 1), (None, 2), (None, 4), (3, 1), (3, 2), (2, 4), (1, 1)])
def test_balanced_labels_use_every_index_exactly_once(P, s):
    # 6 classes x 4 examples: s divides 4 and P divides 6 * 4 / s, so nothing is left over.
    sampler = BalancedBatchSampler(BALANCED, classes_per_batch=P, samples_per_class=s, seed=5)
    for _ in range(3):
        used = np.sort(np.concatenate(list(sampler)))
        np.testing.assert_array_equal(used, np.arange(len(BALANCED)))
    assert len(sampler) * (P or 6) * s == len(BALANCED)


def test_unbalanced_labels_draw_the_surplus_of_large_classes_anew_each_epoch():
    # class 0 has 30 examples but joins at most 3 batches with all classes: each epoch picks 3 of
    # them at random, and over many epochs every one is picked (an example missed by 200 fair
    # draws of 3 in 30 has probability 0.9**200 < 1e-9).
    sampler = BalancedBatchSampler(SKEWED)
    assert len(sampler) == 3
    seen = set()
    for _ in range(200):
        batches = list(sampler)
        check_epoch(SKEWED, batches, 5, 1)
        seen.update(np.concatenate(batches).tolist())
    assert seen == set(range(len(SKEWED)))


def test_a_subset_of_classes_varies_which_classes_meet():
    labels = np.repeat(np.arange(5), 2)
    sampler = BalancedBatchSampler(labels, classes_per_batch=2)
    pairs = set()
    for _ in range(40):
        for batch in sampler:
            pairs.add(tuple(sorted(labels[batch].tolist())))
    assert pairs == set(itertools.combinations(range(5), 2))


# -- determinism and shuffles ----------------------------------------------------------------
def epochs(sampler, k):
    return [[b.tolist() for b in sampler] for _ in range(k)]


@pytest.mark.parametrize("name,P,s", [("balanced", None, 1), ("skewed", 2, 1), ("unbalanced", 3, 2)])
def test_same_seed_same_sequence_of_epochs(name, P, s):
    _, a = sampler_for(name, P, s, seed=11)
    _, b = sampler_for(name, P, s, seed=11)
    assert epochs(a, 4) == epochs(b, 4)


def test_each_iteration_is_a_new_shuffle():
    sampler = BalancedBatchSampler(BALANCED, samples_per_class=2, seed=0)
    seq = epochs(sampler, 6)
    assert len({str(e) for e in seq}) == 6


def test_different_seeds_give_different_epochs():
    first = {str(epochs(BalancedBatchSampler(BALANCED, seed=seed), 1)) for seed in range(6)}
    assert len(first) == 6


def test_iteration_k_is_reproducible_with_set_epoch():
    seq = epochs(BalancedBatchSampler(SKEWED, classes_per_batch=3, seed=2), 5)
    resumed = BalancedBatchSampler(SKEWED, classes_per_batch=3, seed=2)
    resumed.set_epoch(3)
    assert resumed.epoch == 3
    assert epochs(resumed, 2) == seq[3:5]


def test_the_epoch_is_fixed_at_iter_not_at_first_next():
    seq = epochs(BalancedBatchSampler(BALANCED, seed=4), 2)
    sampler = BalancedBatchSampler(BALANCED, seed=4)
    it0, it1 = iter(sampler), iter(sampler)
    assert [b.tolist() for b in it1] == seq[1]
    assert [b.tolist() for b in it0] == seq[0]


def test_batches_are_new_arrays_and_labels_are_copied():
    labels = UNBALANCED.copy()
    sampler = BalancedBatchSampler(labels, seed=1)
    ref = epochs(BalancedBatchSampler(UNBALANCED, seed=1), 2)
    labels[:] = 0  # editing the caller's array afterwards changes nothing
    batches = list(sampler)
    for b in batches:
        b[:] = -1  # nor does editing a yielded batch
    assert epochs(sampler, 1) == ref[1:]
    np.testing.assert_array_equal(sampler.classes, [3, 5, 7, 9])


# -- label types -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [list, tuple, lambda a: a.astype(np.uint8),
                                  lambda a: a.astype(np.int16), lambda a: a[::-1][::-1].copy(),
                                  lambda a: np.stack([a, a])[0]],
                         ids=["list", "tuple", "uint8", "int16", "copy", "strided_view"])
def test_labels_may_be_any_integer_sequence(make):
    labels = np.array([3, 7, 7, 3, 7, 3])
    sampler = BalancedBatchSampler(make(labels), seed=0)
    assert len(sampler) == 3 and sampler.num_classes == 2 and sampler.batch_size == 2
    check_epoch(labels, list(sampler), 2, 1)


def test_attributes():
    sampler = BalancedBatchSampler(ODD_LABELS, classes_per_batch=2, samples_per_class=3, seed=7)
    np.testing.assert_array_equal(sampler.classes, [-4, 12, 1000])
    assert (sampler.num_classes, sampler.classes_per_batch, sampler.samples_per_class,
            sampler.batch_size, sampler.seed) == (3, 2, 3, 6, 7)
    assert "classes_per_batch=2" in repr(sampler)


# -- errors ------------------------------------------------------------------------------------
ERRORS = [
    (dict(labels=np.array([0.0, 1.0])), TypeError, "labels"),
    (dict(labels=np.array([True, False])), TypeError, "labels"),
    (dict(labels=["a", "b"]), TypeError, "labels"),
    (dict(labels="0101"), TypeError, "labels"),
    (dict(labels=None), TypeError, "labels"),
    (dict(labels=np.zeros((2, 3), dtype=np.int64)), ValueError, "labels"),
    (dict(labels=np.int64(3)), ValueError, "labels"),
    (dict(labels=np.array([], dtype=np.int64)), ValueError, "labels"),
    (dict(labels=[]), ValueError, "labels"),
    (dict(classes_per_batch=7), ValueError, "classes_per_batch"),   # 6 classes
    (dict(classes_per_batch=0), ValueError, "classes_per_batch"),
    (dict(classes_per_batch=-1), ValueError, "classes_per_batch"),
    (dict(classes_per_batch=2.0), TypeError, "classes_per_batch"),
    (dict(classes_per_batch=True), TypeError, "classes_per_batch"),
    (dict(samples_per_class=0), ValueError, "samples_per_class"),
    (dict(samples_per_class=5), ValueError, "samples_per_class"),   # 4 examples per class
    (dict(samples_per_class=1.5), TypeError, "samples_per_class"),
    (dict(samples_per_class="2"), TypeError, "samples_per_class"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(seed=None), TypeError, "seed"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
]


@pytest.mark.parametrize("kwargs,exc,arg", ERRORS,
                         ids=[f"{arg}-{i}" for i, (_, _, arg) in enumerate(ERRORS)])
def test_bad_arguments_raise_naming_the_argument(kwargs, exc, arg):
    kwargs = {"labels": BALANCED, **kwargs}
    with pytest.raises(exc, match=f"^{arg}: expected"):
        BalancedBatchSampler(**kwargs)


def test_too_small_a_class_is_named():
    with pytest.raises(ValueError, match=r"^samples_per_class: expected at most 2 \(class 7 has 2"):
        BalancedBatchSampler([3, 3, 3, 7, 7, 5, 5, 5], samples_per_class=3)


def test_numpy_integer_arguments_are_accepted():
    sampler = BalancedBatchSampler(BALANCED, classes_per_batch=np.int64(3),
                                   samples_per_class=np.int32(2), seed=np.uint8(9))
    assert len(sampler) == 4 and sampler.batch_size == 6


def test_set_epoch_checks_its_argument():
    sampler = BalancedBatchSampler(BALANCED)
    with pytest.raises(TypeError, match="^epoch: expected"):
        sampler.set_epoch(1.0)
    with pytest.raises(ValueError, match="^epoch: expected"):
        sampler.set_epoch(-1)


# -- large input -------------------------------------------------------------------------------
def test_many_classes_and_examples():
    labels = np.random.default_rng(0).integers(0, 300, 20000)
    sampler = BalancedBatchSampler(labels, classes_per_batch=32, samples_per_class=4, seed=1)
    slots = np.unique(labels, return_counts=True)[1] // 4
    B = len(sampler)
    assert np.minimum(slots, B).sum() >= 32 * B and np.minimum(slots, B + 1).sum() < 32 * (B + 1)
    batches = list(sampler)
    assert len(batches) == B
    check_epoch(labels, batches, 32, 4)


# -- torch interop -----------------------------------------------------------------------------
def test_usable_as_a_torch_dataloader_batch_sampler():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    labels = np.repeat([10, 20, 30], [6, 8, 5])
    x = torch.arange(len(labels), dtype=torch.float32)[:, None]
    dataset = TensorDataset(x, torch.from_numpy(labels))
    sampler = BalancedBatchSampler(labels, samples_per_class=2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == len(sampler) == 2
    for _ in range(2):
        got = list(loader)
        assert len(got) == 2
        for xb, yb in got:
            assert sorted(yb.tolist()) == [10, 10, 20, 20, 30, 30]
            np.testing.assert_array_equal(labels[xb[:, 0].long().numpy()], yb.numpy())


def test_labels_may_be_a_torch_tensor():
    torch = pytest.importorskip("torch")
    sampler = BalancedBatchSampler(torch.tensor([3, 7, 7, 3]))
    assert len(sampler) == 2
    with pytest.raises(TypeError, match="^labels: expected"):
        BalancedBatchSampler(torch.tensor([0.0, 1.0]))
