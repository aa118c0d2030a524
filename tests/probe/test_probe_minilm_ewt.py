"""A real text probe: pretrained MiniLM on UD English EWT sentences, target = genre, group = document."""

from __future__ import annotations

import numpy as np
import torch

from stethoscope.probe.fit import fit_logistic
from stethoscope.probe.metrics import majority_accuracy
from stethoscope.probe.pipeline import run_fit
from stethoscope.probe.probing import build_design


def test_genre_is_decodable_well_above_the_majority_baseline(minilm_ewt):
    cfg, manifest, feats = minilm_ewt
    assert feats.layers == [f"encoder_block_{i:02d}" for i in range(6)]
    assert feats.array("encoder_block_03").shape == (300, 384)
    rows = run_fit(cfg, progress=False).rows
    majority = majority_accuracy(manifest.target)  # 0.2: five balanced genres
    # the majority baseline's macro-F1 is lower still (one class predicted): 2 * 0.2 / 1.2 / 5
    majority_f1 = 2 * majority / (1 + majority) / len(set(manifest.target))
    best = max(r["target_f1"] for r in rows)
    assert best > 0.5 > majority + 0.25
    assert all(r["target_f1_ci_low"] > majority_f1 + 0.2 for r in rows)
    assert all(r["target_acc"] > majority + 0.2 for r in rows)
    assert all(r["converged"] for r in rows)
    assert np.isnan(rows[0]["text_drop"]) and np.isnan(rows[0]["leakage"])  # no content, no nuisance columns


def test_no_document_in_both_train_and_test(minilm_ewt):
    cfg, manifest, _ = minilm_ewt
    design = build_design(manifest.target, manifest.group, None, None, cfg.probe, cfg.seed)
    target = next(t for t in design.tasks if t.name == "target")
    for f in range(cfg.probe.folds):
        train_docs = set(manifest.group[target.train[f]])
        test_docs = set(manifest.group[target.score["test"][f]])
        assert test_docs and not train_docs & test_docs
        assert set(manifest.target[target.score["test"][f]]) == set(manifest.target)  # every genre tested


def test_batched_probe_equals_scikit_learn_on_the_same_splits(minilm_ewt):
    """Same folds, same C, both solvers converged (scikit-learn tightly): the same F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    cfg, manifest, feats = minilm_ewt
    design = build_design(manifest.target, manifest.group, None, None, cfg.probe, cfg.seed)
    target = next(t for t in design.tasks if t.name == "target")
    layers = ["encoder_block_01", "encoder_block_03", "encoder_block_05"]
    X = np.stack([np.asarray(feats.array(name)) for name in layers])  # (L, N, D)
    k = cfg.probe.folds
    fit = fit_logistic(
        torch.from_numpy(X),
        torch.from_numpy(target.y)[None].expand(k, -1),
        torch.from_numpy(target.train),
        target.n_classes,
        C=cfg.probe.C,
        tol=cfg.probe.tol,
    )
    assert bool(fit.converged.all())
    for i in range(len(layers)):
        ours, theirs, agree = [], [], []
        for f in range(k):
            train, test = target.train[f], target.score["test"][f]
            with threadpool_limits(1):
                sc = StandardScaler().fit(X[i][train])
                clf = LogisticRegression(C=cfg.probe.C, tol=1e-6, max_iter=5000)
                clf.fit(sc.transform(X[i][train]), target.y[train])
                pred_sk = clf.predict(sc.transform(X[i][test]))
            pred = fit.pred[i, f].numpy()[test]
            theirs.append(f1_score(target.y[test], pred_sk, average="macro"))
            ours.append(f1_score(target.y[test], pred, average="macro"))
            agree.append((pred == pred_sk).mean())
        assert abs(np.mean(ours) - np.mean(theirs)) <= 0.02, (layers[i], ours, theirs)
        assert min(agree) >= 0.95  # per fold, at most a few borderline items differ
