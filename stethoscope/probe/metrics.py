"""Probe scores computed for every (layer, fold) at once: macro-F1, accuracy, confusion, chance levels, CIs.

Macro-F1 follows scikit-learn's ``f1_score(average="macro")``: the mean F1 over the classes present in
the fold's true or predicted labels, a class with no true and no predicted item being left out.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def confusion(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Confusion counts of every (layer, problem) probe on its test items.

    Args:
        pred: (L, P, N) predicted class.
        y: (P, N) true class (-1 = unlabelled, never counted).
        mask: (P, N) bool, the items each problem is scored on.
        n_classes: K.

    Returns:
        (L, P, K, K) float counts, rows = true class, columns = predicted class.
    """
    L, P, N = pred.shape
    K = n_classes
    keep = (mask & (y >= 0)).to(torch.float32)  # (P, N)
    idx = y.clamp_min(0)[None] * K + pred  # (L, P, N) flat cell of each item
    cm = torch.zeros(L, P, K * K, dtype=torch.float32, device=pred.device)
    cm.scatter_add_(2, idx, keep.expand(L, P, N).contiguous())
    return cm.view(L, P, K, K)


def macro_f1(cm: torch.Tensor) -> torch.Tensor:
    """(…, K, K) confusion -> (…) macro-F1 over the classes seen as truth or prediction; NaN if empty."""
    tp = cm.diagonal(dim1=-2, dim2=-1)  # (…, K)
    true = cm.sum(-1)
    predicted = cm.sum(-2)
    denom = true + predicted
    seen = denom > 0
    f1 = torch.where(seen, 2 * tp / denom.clamp_min(1e-12), torch.zeros_like(tp))
    n_seen = seen.sum(-1)
    return torch.where(n_seen > 0, f1.sum(-1) / n_seen.clamp_min(1), torch.full_like(f1[..., 0], math.nan))


def accuracy(cm: torch.Tensor) -> torch.Tensor:
    """(…, K, K) confusion -> (…) accuracy; NaN if the fold has no item."""
    total = cm.sum((-2, -1))
    correct = cm.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.where(total > 0, correct / total.clamp_min(1e-12), torch.full_like(total, math.nan))


def chance_f1(labels: np.ndarray) -> float:
    """Expected macro-F1 of a guesser that draws labels from the class priors: exactly 1 / K.

    Each class then has precision = recall = its prior, so the macro mean is 1 / K whatever the balance;
    that makes it the chance level of a macro-F1 (a majority guess scores lower: its F1 is 0 on K - 1
    classes).
    """
    return 1.0 / max(len(np.unique(labels)), 1)


def majority_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class."""
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / counts.sum()) if len(counts) else math.nan


def fold_summary(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, std and a Student-t confidence interval across folds (NaN folds ignored).

    Returns:
        (mean, std, low, high); the interval collapses to the mean with one fold.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return (math.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, 0.0, mean, mean
    std = float(v.std(ddof=1))
    from scipy.special import stdtrit  # the Student-t quantile; scipy.stats costs seconds to import

    half = float(stdtrit(len(v) - 1, 0.5 + confidence / 2)) * std / math.sqrt(len(v))
    return mean, std, mean - half, mean + half
