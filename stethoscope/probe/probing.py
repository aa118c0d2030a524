"""The four probes of a layer, batched over layers: target, control, nuisance (leakage), unseen texts.

* **target**: group-disjoint folds (no speaker in both train and test), stratified by class.
* **control** (Hewitt & Liang 2019): the same folds, labels shuffled per *content* value (the analogue of
  their per-word-type control task): a probe that can memorise texts would solve it, so selectivity =
  target F1 - control F1 tells structure from probe capacity. Without a content column, labels are
  shuffled per item.
* **nuisance**: a probe for the nuisance attribute on content-disjoint folds (every speaker reads texts on
  both sides), since group-disjoint folds cannot test a nuisance that *is* the group. Leakage = its
  macro-F1 minus its chance level. With ``leakage_chance: shuffled`` (default) the chance level is
  measured: the same probe, same folds, on nuisance labels shuffled across items *within each target
  class*. That keeps what the target explains (8 speakers per accent: a layer that knows the accent
  and nothing about speakers still narrows a speaker down to 8) and removes the rest, so leakage is
  nuisance information *beyond* the target, and a deterministic probe's own below-1/K macro-F1 on
  noise cancels out. ``uniform`` uses 1 / classes instead.
* **text drop**: folds that are group- *and* content-disjoint; target F1 on held-out speakers reading
  seen texts minus the same speakers reading unseen texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stethoscope.probe import metrics as M
from stethoscope.probe.config import ProbeConfig
from stethoscope.probe.fit import fit_logistic
from stethoscope.probe.splits import cross_folds, fold_masks, group_folds, stratified_folds


@dataclass
class Task:
    """One probe family: labels, per-fold training masks, and the masks it is scored on."""

    name: str
    y: np.ndarray  # (N,) class index
    n_classes: int
    train: np.ndarray  # (F, N) bool
    score: dict[str, np.ndarray]  # name -> (F, N) bool


@dataclass
class Design:
    """All tasks of a dataset, built once and applied to every layer."""

    tasks: list[Task]
    target_classes: np.ndarray
    chance_f1: float
    majority_acc: float
    nuisance_chance_f1: float
    notes: list[str]
    folds: int


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes, codes = np.unique(values, return_inverse=True)
    return classes, codes.astype(np.int64)


def build_design(
    target: np.ndarray,
    group: np.ndarray,
    nuisance: np.ndarray | None,
    content: np.ndarray | None,
    cfg: ProbeConfig,
    seed: int,
) -> Design:
    """Folds and labels of every probe (pure numpy; the same inputs and seed give the same design)."""
    k = cfg.folds
    notes: list[str] = []
    classes, y = _codes(target)
    gfold = group_folds(group, k, seed, strata=target)
    train_g, test_g = fold_masks(gfold, k)
    tasks = [Task("target", y, len(classes), train_g, {"test": test_g})]
    if cfg.control:
        rng = np.random.default_rng(seed + 1)
        if content is not None:
            units, unit_of = np.unique(content, return_inverse=True)
            labels = rng.permutation(np.resize(np.arange(len(classes)), len(units)))
            y_ctrl = labels[unit_of]
        else:
            y_ctrl = rng.permutation(y)
        tasks.append(Task("control", y_ctrl.astype(np.int64), len(classes), train_g, {"test": test_g}))
    n_content = len(np.unique(content)) if content is not None else 0
    nuisance_chance = math.nan
    if cfg.leakage and nuisance is not None:
        n_classes, yn = _codes(nuisance)
        if n_content >= k:
            nfold = group_folds(content, k, seed + 2)
        else:
            nfold = stratified_folds(nuisance, k, seed + 2)
            if content is not None:
                notes.append(f"only {n_content} content values for {k} folds: leakage measured on item folds")
        train_n, test_n = fold_masks(nfold, k)
        # items whose nuisance class is absent from their fold's training side cannot be predicted
        covered = np.zeros_like(test_n)
        for f in range(k):
            present = np.zeros(len(n_classes), dtype=bool)
            present[yn[train_n[f]]] = True
            covered[f] = test_n[f] & present[yn]
        uncovered = int(test_n.sum() - covered.sum())
        if uncovered:
            notes.append(
                f"{uncovered} nuisance test items belong to classes absent from their fold's training side "
                "(scored only on covered items)"
            )
        tasks.append(Task("nuisance", yn, len(n_classes), train_n, {"test": covered}))
        if cfg.leakage_chance == "shuffled":
            # the same probe on nuisance labels shuffled across items *within* each target class: it
            # keeps whatever the target explains (speakers nested in accents) and nothing else
            rng = np.random.default_rng(seed + 4)
            y_shuf = yn.copy()
            for c in range(len(classes)):
                idx = np.flatnonzero(y == c)
                y_shuf[idx] = yn[idx[rng.permutation(len(idx))]]
            tasks.append(Task("nuisance_shuffled", y_shuf, len(n_classes), train_n, {"test": covered}))
        else:
            nuisance_chance = M.chance_f1(nuisance)
    if cfg.text_drop and content is not None and n_content >= k:
        cfold = group_folds(content, k, seed + 3)
        train_x, seen, unseen = cross_folds(gfold, cfold, k)
        tasks.append(Task("text", y, len(classes), train_x, {"seen": seen, "unseen": unseen}))
    elif cfg.text_drop and content is not None:
        notes.append(f"only {n_content} content values for {k} folds: text drop not measured")
    return Design(tasks, classes, M.chance_f1(target), M.majority_accuracy(target), nuisance_chance, notes, k)


@dataclass
class LayerScores:
    """Per-fold scores of every task for a stack of layers: name -> (L, F) arrays, plus confusions."""

    per_fold: dict[str, np.ndarray]
    confusion: np.ndarray  # (L, K, K) target confusion summed over folds
    converged: np.ndarray  # (L,) bool: every probe of the layer converged
    iterations: np.ndarray  # (L,) most iterations any of its probes needed


def score_layers(X: torch.Tensor, design: Design, cfg: ProbeConfig) -> LayerScores:
    """Fit every task's probes on ``X`` (L, N, D) in as few batched solves as the class counts allow.

    Tasks with the same number of classes share one solve: their folds are stacked as problems.
    """
    L = X.shape[0]
    dev = X.device
    per_fold: dict[str, np.ndarray] = {}
    confusion = None
    converged = np.ones(L, dtype=bool)
    iterations = np.zeros(L, dtype=np.int64)
    by_k: dict[int, list[Task]] = {}
    for task in design.tasks:
        by_k.setdefault(task.n_classes, []).append(task)
    for k_classes, tasks in by_k.items():
        y = np.concatenate([np.broadcast_to(t.y, t.train.shape) for t in tasks])  # (P, N)
        train = np.concatenate([t.train for t in tasks])  # (P, N)
        fit = fit_logistic(
            X,
            torch.from_numpy(np.ascontiguousarray(y)).to(dev),
            torch.from_numpy(train).to(dev),
            k_classes,
            C=cfg.C,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            standardize=cfg.standardize,
        )
        converged &= fit.converged.all(1).cpu().numpy()
        iterations = np.maximum(iterations, fit.iters.amax(1).cpu().numpy())
        start = 0
        for t in tasks:
            f = t.train.shape[0]
            pred = fit.pred[:, start : start + f]  # (L, F, N)
            yt = torch.from_numpy(np.broadcast_to(t.y, t.train.shape).copy()).to(dev)
            for score_name, mask in t.score.items():
                cm = M.confusion(pred, yt, torch.from_numpy(mask).to(dev), k_classes)  # (L, F, K, K)
                per_fold[f"{t.name}_{score_name}_f1"] = M.macro_f1(cm).cpu().numpy()
                per_fold[f"{t.name}_{score_name}_acc"] = M.accuracy(cm).cpu().numpy()
                if t.name == "target":
                    confusion = cm.sum(1).cpu().numpy()
            start += f
    return LayerScores(per_fold, confusion, converged, iterations)


def metric_rows(scores: LayerScores, design: Design, confidence: float) -> list[dict]:
    """One dict per layer with the metrics.csv columns (means across folds, CIs, derived metrics)."""
    pf = scores.per_fold
    L = scores.confusion.shape[0]
    rows = []
    for i in range(L):
        row: dict = {}
        mean, std, lo, hi = M.fold_summary(pf["target_test_f1"][i], confidence)
        lo, hi = max(lo, 0.0), min(hi, 1.0)  # an F1 lives in [0, 1]; few folds can push a t-interval out
        row.update(target_f1=mean, target_f1_std=std, target_f1_ci_low=lo, target_f1_ci_high=hi)
        row["target_acc"] = M.fold_summary(pf["target_test_acc"][i])[0]
        row["chance_f1"] = design.chance_f1
        row["majority_acc"] = design.majority_acc
        if "control_test_f1" in pf:
            row["control_f1"] = M.fold_summary(pf["control_test_f1"][i])[0]
            sel = pf["target_test_f1"][i] - pf["control_test_f1"][i]
            _, _, lo, hi = M.fold_summary(sel, confidence)
            row.update(
                selectivity=row["target_f1"] - row["control_f1"],
                selectivity_ci_low=lo,
                selectivity_ci_high=hi,
            )
        else:
            row.update(
                control_f1=math.nan,
                selectivity=math.nan,
                selectivity_ci_low=math.nan,
                selectivity_ci_high=math.nan,
            )
        if "nuisance_test_f1" in pf:
            nf = pf["nuisance_test_f1"][i]
            if "nuisance_shuffled_test_f1" in pf:  # (F,) the same probe on shuffled labels, per fold
                chance = pf["nuisance_shuffled_test_f1"][i]
            else:
                chance = np.full_like(nf, design.nuisance_chance_f1)
            row["nuisance_f1"] = M.fold_summary(nf)[0]
            row["nuisance_chance_f1"] = M.fold_summary(chance)[0]
            mean, _, lo, hi = M.fold_summary(nf - chance, confidence)
            row.update(leakage=mean, leakage_ci_low=lo, leakage_ci_high=hi)
        else:
            row.update(
                nuisance_f1=math.nan,
                nuisance_chance_f1=math.nan,
                leakage=math.nan,
                leakage_ci_low=math.nan,
                leakage_ci_high=math.nan,
            )
        if "text_seen_f1" in pf:
            seen, unseen = pf["text_seen_f1"][i], pf["text_unseen_f1"][i]
            row["text_f1_seen"] = M.fold_summary(seen)[0]
            row["text_f1_unseen"] = M.fold_summary(unseen)[0]
            mean, _, lo, hi = M.fold_summary(seen - unseen, confidence)
            row.update(text_drop=mean, text_drop_ci_low=lo, text_drop_ci_high=hi)
        else:
            row.update(
                text_f1_seen=math.nan,
                text_f1_unseen=math.nan,
                text_drop=math.nan,
                text_drop_ci_low=math.nan,
                text_drop_ci_high=math.nan,
            )
        row["converged"] = bool(scores.converged[i])
        row["iterations"] = int(scores.iterations[i])
        rows.append(row)
    return rows
