"""Fold assignments for the probes: group-disjoint, content-disjoint, stratified, and their crossing.

Every function returns one fold id per item (``-1`` = not used), computed from a seed only, so the same
labels and seed give the same folds on any machine. A fold's test set is ``folds == f``; its training
set is every other labelled item, except where a crossing excludes more (see :func:`cross_folds`).
"""

from __future__ import annotations

import numpy as np

from stethoscope.probe.errors import ProbeDataError


def _balanced_assign(units: np.ndarray, sizes: np.ndarray, strata: np.ndarray, k: int, seed: int) -> dict:
    """Assign units (groups, texts) to ``k`` folds, largest first, each to its stratum's lightest fold.

    Ties go to the fold lightest overall and then the lowest index, after a seeded shuffle, so folds
    are balanced in items per stratum and the assignment is reproducible.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(units))
    # stable sort by size (descending) keeps the shuffled order among equal sizes
    order = order[np.argsort(-sizes[order], kind="stable")]
    per_stratum: dict = {}
    total = np.zeros(k, dtype=np.int64)
    fold_of: dict = {}
    for i in order:
        load = per_stratum.setdefault(strata[i], np.zeros(k, dtype=np.int64))
        best = min(range(k), key=lambda f: (load[f], total[f], f))
        fold_of[units[i]] = best
        load[best] += sizes[i]
        total[best] += sizes[i]
    return fold_of


def group_folds(groups: np.ndarray, k: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """Group-disjoint folds: every item of a group lands in the same fold.

    Args:
        groups: (N,) group label per item (speaker, document, text id, ...).
        k: number of folds; needs at least ``k`` distinct groups.
        seed: shuffles groups before the balanced assignment.
        strata: (N,) optional class per item; a group is stratified by its most frequent class so
            every fold sees every class when the class has at least ``k`` groups.

    Returns:
        (N,) int fold id per item.
    """
    groups = np.asarray(groups)
    units, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(units) < k:
        raise ProbeDataError(
            f"{len(units)} distinct groups cannot fill {k} group-disjoint folds: "
            f"lower probe.folds to at most {len(units)} or add groups"
        )
    if strata is None:
        unit_strata = np.zeros(len(units), dtype=np.int64)
    else:
        strata = np.asarray(strata)
        unit_strata = np.empty(len(units), dtype=object)
        for u in range(len(units)):
            values, counts = np.unique(strata[inverse == u], return_counts=True)
            unit_strata[u] = values[np.argmax(counts)]
    fold_of = _balanced_assign(np.arange(len(units)), sizes, unit_strata, k, seed)
    unit_fold = np.array([fold_of[u] for u in range(len(units))], dtype=np.int64)
    return unit_fold[inverse]


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Item-level stratified folds: each class dealt round-robin so it appears in as many folds as it can."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (offset + np.arange(len(idx))) % k
        offset += len(idx)
    return folds


def cross_folds(group_fold: np.ndarray, content_fold: np.ndarray, k: int):
    """Masks for the text-drop estimate: group- and content-disjoint training, seen and unseen tests.

    Fold ``f`` trains on items whose group is outside group fold ``f`` *and* whose content is outside
    content fold ``f``; both test sets hold the held-out groups, one with contents seen in training,
    one with contents never seen. Their F1 difference is the drop due to unseen texts alone.

    Returns:
        train, seen, unseen: (k, N) bool masks.
    """
    g = group_fold[None, :] == np.arange(k)[:, None]  # (k, N) item's group is held out
    c = content_fold[None, :] == np.arange(k)[:, None]  # (k, N) item's content is held out
    return ~g & ~c, g & ~c, g & c


def fold_masks(folds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) masks of shape (k, N) from fold ids; items with fold -1 are in neither."""
    test = folds[None, :] == np.arange(k)[:, None]
    train = (folds[None, :] >= 0) & ~test
    return train, test
