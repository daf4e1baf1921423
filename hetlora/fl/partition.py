"""Split a training set among federated clients.

Every function returns *indices* into the data set (``int64`` 1-D arrays, sorted
ascending), never copies of the data, and is deterministic in its ``seed``:
the same arguments give the same split on every machine (NumPy's PCG64
``default_rng``).

- :func:`dirichlet_partition`: label-skewed non-IID clients (α → 0: each client
  holds one or two classes; α → ∞: IID).
- :func:`iid_partition`: uniform random, sizes differ by at most one.
- :func:`natural_partition`: one client per value of a natural key (e.g. the
  account that wrote a tweet).
- :func:`split_holdout`: a client's own train / held-out split.
- :func:`stratified_split`: a per-class train / test split of a whole data set.
- :func:`label_skew`: how far the clients' label mixes are from the global mix.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence

import numpy as np

__all__ = [
    "dirichlet_partition",
    "iid_partition",
    "label_skew",
    "natural_partition",
    "split_holdout",
    "stratified_split",
]

logger = logging.getLogger(__name__)

# Resampling the whole Dirichlet split is cheap (a few ms for 20k samples), but at
# tiny alpha a draw that leaves some client short can be likely; past this many
# draws the last one is repaired instead (see dirichlet_partition).
_MAX_DIRICHLET_TRIES = 100


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_labels(labels: object) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_fraction(fraction: object, name: str) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1), got {fraction!r}")
    value = float(fraction)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {fraction!r}")
    return value


def _sorted_parts(groups: Sequence[Sequence[int] | np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 2) -> list[np.ndarray]:
    """Label-skewed non-IID split: each class is shared among clients in Dirichlet(α) proportions.

    Args:
        labels: ``int`` ``[N]`` class id of every training sample.
        num_clients: number of clients ``K >= 1``.
        alpha: Dirichlet concentration ``> 0``; the paper's settings are 0.01, 0.1 and 0.5.
        seed: non-negative integer; the split is a pure function of the arguments.
        min_size: every client ends up with at least this many samples (``K * min_size <= N``).

    Returns:
        ``K`` sorted ``int64`` index arrays that together hold every index ``0..N-1``
        exactly once.

    Procedure (the label-skew protocol used by FedNLP and the HetLoRA paper, which
    follow the NIID-Bench reference code):

    1. Classes are visited in a seeded random order. For class ``c`` with ``n_c``
       samples, draw proportions ``p ~ Dir(α·1)`` over the clients that currently
       hold fewer than ``N / K`` samples (a client that is already "full" sits the
       class out; this is the reference code's balancing rule, which keeps one
       client from swallowing several whole classes at small α), shuffle the class
       and cut it at ``floor(cumsum(p) · n_c)``.
    2. If any client ends with fewer than ``min_size`` samples, the whole split is
       redrawn (the reference code does the same), at most 100 times.
    3. If every draw fell short (likely only when ``K · min_size`` is close to
       ``N``), the last draw is *repaired*: the smallest client repeatedly takes
       samples from the currently largest one, from that donor's most frequent
       class, until it reaches ``min_size``. This changes as few label mixes as
       possible, and always terminates because ``K · min_size <= N``. A warning is
       logged when it happens.

    Raises:
        ValueError: naming ``labels``, ``num_clients``, ``alpha``, ``seed`` or ``min_size``
            when one is invalid, or when ``num_clients`` exceeds the number of samples.
    """
    y = _check_labels(labels)
    k = _check_int(num_clients, "num_clients", 1)
    min_size = _check_int(min_size, "min_size", 0)
    seed = _check_seed(seed)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    n = y.size
    if k > n:
        raise ValueError(f"num_clients ({k}) exceeds the number of samples ({n})")
    if k * min_size > n:
        raise ValueError(f"num_clients * min_size ({k} * {min_size}) exceeds the number of samples ({n})")

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    cap = n / k
    parts: list[list[np.ndarray]] = []
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for ci in rng.permutation(len(classes)):
            idx = rng.permutation(by_class[ci])
            open_clients = np.flatnonzero(sizes < cap)
            if open_clients.size == 0:  # cannot happen (sizes sum to < n while a class is left), but be safe
                open_clients = np.arange(k)
            p = rng.dirichlet(np.full(open_clients.size, float(alpha)))
            total = p.sum()
            if not np.isfinite(total) or total <= 0:
                # At tiny alpha every gamma draw can underflow to 0; the limit of
                # Dir(α→0) is "the whole class to one client", so do exactly that.
                p = np.zeros(open_clients.size)
                p[rng.integers(open_clients.size)] = 1.0
            else:
                p = p / total
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for client, chunk in zip(open_clients, np.split(idx, cuts)):
                if chunk.size:
                    parts[client].append(chunk)
                    sizes[client] += chunk.size
        if sizes.min() >= min_size:
            return _sorted_parts([np.concatenate(p) if p else np.empty(0, np.int64) for p in parts])

    # Repair the last draw (see the docstring, step 3).
    flat = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    moved = 0
    while True:
        sizes = np.array([f.size for f in flat])
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            break
        donor = int(np.argmax(sizes))
        need = min(min_size - int(sizes[small]), int(sizes[donor]) - min_size)
        donor_labels = y[flat[donor]]
        values, counts = np.unique(donor_labels, return_counts=True)
        major = values[np.argmax(counts)]
        take_pos = np.flatnonzero(donor_labels == major)[:need]
        if take_pos.size < need:  # majority class too small: top up from the donor's other samples
            rest = np.setdiff1d(np.arange(flat[donor].size), take_pos)[: need - take_pos.size]
            take_pos = np.concatenate([take_pos, rest])
        keep = np.ones(flat[donor].size, dtype=bool)
        keep[take_pos] = False
        flat[small] = np.concatenate([flat[small], flat[donor][take_pos]])
        flat[donor] = flat[donor][keep]
        moved += int(take_pos.size)
    logger.warning(
        "dirichlet_partition: no draw in %d gave every client >= %d samples (alpha=%g, %d clients, %d samples); "
        "moved %d samples from the largest clients to the smallest",
        _MAX_DIRICHLET_TRIES, min_size, alpha, k, n, moved,
    )
    return _sorted_parts(flat)


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random split of ``range(num_samples)`` into ``num_clients`` parts.

    Returns ``num_clients`` sorted ``int64`` index arrays whose sizes differ by at most one.
    Raises ``ValueError`` naming ``num_samples``, ``num_clients`` or ``seed``.
    """
    n = _check_int(num_samples, "num_samples", 1)
    k = _check_int(num_clients, "num_clients", 1)
    seed = _check_seed(seed)
    if k > n:
        raise ValueError(f"num_clients ({k}) exceeds num_samples ({n})")
    perm = np.random.default_rng(seed).permutation(n)
    return _sorted_parts(np.array_split(perm, k))


def natural_partition(client_ids: np.ndarray) -> list[np.ndarray]:
    """One client per distinct value of ``client_ids`` (``[N]``, any sortable dtype).

    Client ``i`` is the ``i``-th distinct value in sorted order; it gets the sorted
    ``int64`` indices of the samples carrying that value.
    """
    ids = np.asarray(client_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"client_ids must be a non-empty 1-D array, got shape {ids.shape}")
    _, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return _sorted_parts(np.split(order, bounds))


def split_holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's ``indices`` into (train, held-out), both sorted ``int64``.

    ``round(fraction * len(indices))`` indices, chosen at random, are held out, but
    never all of them: a client with at least one sample keeps at least one to train
    on. ``fraction`` must lie in ``[0, 1)``.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"indices must be a 1-D array, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    frac = _check_fraction(fraction, "fraction")
    seed = _check_seed(seed)
    idx = idx.astype(np.int64, copy=False)
    n_hold = min(int(round(frac * idx.size)), max(idx.size - 1, 0))
    perm = np.random.default_rng(seed).permutation(idx)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random split of ``range(len(labels))`` into (train, test) sorted ``int64`` indices.

    Each class sends ``round(fraction * n_c)`` of its ``n_c`` samples to test, but keeps
    at least one in train (a class with one sample stays wholly in train).
    """
    y = _check_labels(labels)
    frac = _check_fraction(fraction, "fraction")
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = min(int(round(frac * idx.size)), idx.size - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    if not train:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def label_skew(parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance between each client's label mix and the global one.

    The global mix is that of all samples in ``parts`` together; empty clients are
    skipped. 0 means every client sees the global label mix exactly; the value
    approaches 1 when each client holds a single, rare class. IID splits of a few
    hundred samples per client give a few hundredths (sampling noise).
    """
    y = _check_labels(labels)
    c = _check_int(num_classes, "num_classes", 1)
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, num_classes={c}), got range [{y.min()}, {y.max()}]")
    hists = []
    for p in parts:
        idx = np.asarray(p, dtype=np.int64)
        if idx.size:
            hists.append(np.bincount(y[idx], minlength=c).astype(np.float64))
    if not hists:
        raise ValueError("parts must contain at least one non-empty client")
    counts = np.stack(hists)
    global_mix = counts.sum(0) / counts.sum()
    local_mix = counts / counts.sum(1, keepdims=True)
    return float(0.5 * np.abs(local_mix - global_mix).sum(1).mean())
