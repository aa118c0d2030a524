"""The batched logistic regression against scikit-learn, and the batched metrics against naive ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stethoscope.probe import metrics as M
from stethoscope.probe.fit import fit_logistic
from stethoscope.probe.splits import fold_masks, group_folds


def _data(layers=3, n=300, dim=20, classes=3, groups=15, seed=0):
    rng = np.random.default_rng(seed)
    group = np.arange(n) % groups
    y = group % classes
    basis = rng.normal(size=(4, dim))
    X = np.stack(
        [
            rng.normal(size=(classes, dim))[y] * (0.2 + 0.3 * layer)
            + rng.normal(size=(n, 4)) @ basis  # correlated directions
            + rng.normal(size=(n, dim)) * rng.uniform(0.5, 3, dim)  # uneven scales
            + 5.0
            for layer in range(layers)
        ]
    ).astype(np.float32)  # (L, N, D)
    return X, y, group


def _sklearn_fold(X, y, train, test, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny fits: thread pools only add waits on a busy machine
        sc = StandardScaler().fit(X[train])
        clf = LogisticRegression(C=C, tol=1e-6, max_iter=5000).fit(sc.transform(X[train]), y[train])
        return clf, sc, clf.predict(sc.transform(X[test]))


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_matches_scikit_learn_on_the_same_splits(C):
    from sklearn.metrics import f1_score

    X, y, group = _data()
    k = 5
    train, test = fold_masks(group_folds(group, k, 0, strata=y), k)
    fit = fit_logistic(
        torch.from_numpy(X),
        torch.from_numpy(y)[None].expand(k, -1),
        torch.from_numpy(train),
        3,
        C=C,
        tol=1e-5,
    )
    assert bool(fit.converged.all())
    for layer in range(X.shape[0]):
        for f in range(k):
            clf, _, pred_sk = _sklearn_fold(X[layer], y, train[f], test[f], C)
            pred = fit.pred[layer, f].numpy()[test[f]]
            assert (
                abs(
                    f1_score(y[test[f]], pred, average="macro")
                    - f1_score(y[test[f]], pred_sk, average="macro")
                )
                <= 0.02
            )
            assert (pred == pred_sk).mean() >= 0.97
            # the same optimum: weights agree in standardised space
            np.testing.assert_allclose(
                fit.weight[layer, f].numpy(), clf.coef_, atol=2e-2 * max(1, abs(clf.coef_).max())
            )


def test_preconditioning_changes_speed_not_the_answer():
    X, y, group = _data(layers=2, n=150)
    train, _ = fold_masks(group_folds(group, 3, 0, strata=y), 3)
    args = (torch.from_numpy(X), torch.from_numpy(y)[None].expand(3, -1), torch.from_numpy(train), 3)
    a = fit_logistic(*args, tol=1e-5, precondition=True)
    b = fit_logistic(*args, tol=1e-5, precondition=False)
    assert a.iters.sum() < b.iters.sum()
    assert torch.allclose(a.weight, b.weight, atol=1e-3)
    assert (a.pred == b.pred).float().mean() > 0.99


def test_layers_fitted_together_equal_layers_fitted_alone():
    X, y, group = _data(layers=3)
    train, _ = fold_masks(group_folds(group, 3, 0, strata=y), 3)
    yt, tr = torch.from_numpy(y)[None].expand(3, -1), torch.from_numpy(train)
    together = fit_logistic(torch.from_numpy(X), yt, tr, 3, tol=1e-6)
    for layer in range(3):
        alone = fit_logistic(torch.from_numpy(X[layer : layer + 1]), yt, tr, 3, tol=1e-6)
        assert torch.allclose(together.weight[layer], alone.weight[0], atol=1e-3)


def test_a_class_absent_from_training_is_never_predicted():
    X, y, _ = _data(layers=1, n=90)
    train = torch.from_numpy(y != 2)[None]  # class 2 only in the test side
    fit = fit_logistic(torch.from_numpy(X), torch.from_numpy(y)[None], train, 3)
    assert not (fit.pred == 2).any()
    assert torch.isfinite(fit.weight).all() and (fit.weight[0, 0, 2] == 0).all()


def test_unlabelled_items_and_constant_features_are_harmless():
    X, y, _ = _data(layers=1, n=60)
    X[0, :, 0] = 3.0  # a constant column: std 0
    y_t = torch.from_numpy(y).clone()
    y_t[:10] = -1
    fit = fit_logistic(torch.from_numpy(X), y_t[None], torch.ones(1, 60, dtype=torch.bool), 3)
    assert torch.isfinite(fit.weight).all() and bool(fit.converged.all())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 1000),
    n=st.integers(1, 40),
    k=st.integers(2, 5),
)
def test_macro_f1_and_accuracy_equal_scikit_learn(seed, n, k):
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = rng.integers(0, k, n)
    mask = rng.random(n) < 0.7
    mask[0] = True
    cm = M.confusion(
        torch.from_numpy(pred)[None, None], torch.from_numpy(y)[None], torch.from_numpy(mask)[None], k
    )
    assert float(M.macro_f1(cm)[0, 0]) == pytest.approx(
        f1_score(y[mask], pred[mask], average="macro"), abs=1e-6
    )
    assert float(M.accuracy(cm)[0, 0]) == pytest.approx(accuracy_score(y[mask], pred[mask]), abs=1e-6)


def test_chance_levels_and_fold_summary():
    from scipy import stats

    labels = np.array(["a"] * 6 + ["b"] * 3 + ["c"])
    assert M.chance_f1(labels) == pytest.approx(1 / 3)
    assert M.majority_accuracy(labels) == pytest.approx(0.6)
    v = np.array([0.5, 0.6, 0.55, np.nan, 0.7])
    mean, std, lo, hi = M.fold_summary(v, 0.95)
    clean = v[~np.isnan(v)]
    ref = stats.t.interval(0.95, len(clean) - 1, loc=clean.mean(), scale=stats.sem(clean))
    assert mean == pytest.approx(clean.mean()) and std == pytest.approx(clean.std(ddof=1))
    assert (lo, hi) == pytest.approx(ref)
    assert M.fold_summary(np.array([0.4]))[2:] == (0.4, 0.4)
    assert np.isnan(M.fold_summary(np.array([np.nan]))[0])
