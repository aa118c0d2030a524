"""Fold assignments: group-disjoint, stratified, crossed with content; deterministic by seed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stethoscope.probe.errors import ProbeDataError
from stethoscope.probe.splits import cross_folds, fold_masks, group_folds, stratified_folds


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=5, max_size=40),
    k=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    n_classes=st.integers(1, 4),
)
def test_no_group_in_two_folds(sizes, k, seed, n_classes):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    strata = groups % n_classes
    if len(sizes) < k:
        with pytest.raises(ProbeDataError):
            group_folds(groups, k, seed, strata)
        return
    folds = group_folds(groups, k, seed, strata)
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    assert set(np.unique(folds)) == set(range(k))  # no empty fold
    train, test = fold_masks(folds, k)
    for f in range(k):
        assert not set(groups[train[f]]) & set(groups[test[f]])


def test_stratified_by_class_and_balanced():
    groups = np.repeat(np.arange(24), 10)
    target = groups // 8  # 3 classes x 8 groups
    folds = group_folds(groups, 4, seed=0, strata=target)
    for f in range(4):
        classes, counts = np.unique(target[folds == f], return_counts=True)
        assert list(classes) == [0, 1, 2] and set(counts) == {20}


def test_deterministic_by_seed():
    groups = np.repeat(np.arange(30), 3)
    a = group_folds(groups, 5, seed=7)
    assert (a == group_folds(groups, 5, seed=7)).all()
    assert not (a == group_folds(groups, 5, seed=8)).all()


def test_stratified_item_folds_spread_each_class():
    labels = np.repeat(np.arange(6), 5)
    folds = stratified_folds(labels, 5, seed=0)
    for c in range(6):
        assert sorted(folds[labels == c]) == [0, 1, 2, 3, 4]


def test_cross_folds_hold_out_groups_and_contents():
    groups = np.repeat(np.arange(8), 6)  # 8 speakers x 6 texts
    content = np.tile(np.arange(6), 8)
    k = 3
    gf, cf = group_folds(groups, k, 0), group_folds(content, k, 1)
    train, seen, unseen = cross_folds(gf, cf, k)
    for f in range(k):
        assert not set(groups[train[f]]) & set(groups[seen[f] | unseen[f]])
        assert set(content[seen[f]]) <= set(content[train[f]])
        assert not set(content[unseen[f]]) & set(content[train[f]])
        assert seen[f].any() and unseen[f].any()
