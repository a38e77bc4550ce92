"""Evaluation metrics from raw model outputs: classification (accuracy/f1/matthews) or regression (pearson/spearman)."""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ..errors import PrunetuneError
from .base import LOWER_IS_BETTER, Task, greater_is_better  # noqa: F401 (re-exported)


def _safe(x: float) -> float:
    x = float(x)
    return x if np.isfinite(x) else 0.0


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:  # undefined for constant inputs: report 0
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _safe(fn(a, b)[0])


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """predictions: logits (N, C) for classification (or class ids (N,)); (N,) or (N, 1) scores for regression."""
    preds = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if preds.shape[0] != labels.shape[0]:
        raise PrunetuneError(f"got {preds.shape[0]} predictions for {labels.shape[0]} labels")
    if task.num_labels == 1:
        p, y = preds.reshape(-1).astype(np.float64), labels.astype(np.float64)
        pearson, spearman = _corr(pearsonr, p, y), _corr(spearmanr, p, y)
        return {"pearson": pearson, "spearman": spearman, "combined": (pearson + spearman) / 2}
    ids = preds.argmax(axis=-1) if preds.ndim == 2 else preds.reshape(-1)
    ids, y = ids.astype(np.int64), labels.astype(np.int64)
    if len(y) == 0:
        return {"accuracy": 0.0, "f1": 0.0, "matthews": 0.0}
    average = "binary" if task.num_labels == 2 else "macro"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "accuracy": _safe(accuracy_score(y, ids)),
            "f1": _safe(f1_score(y, ids, average=average, zero_division=0)),
            "matthews": _safe(matthews_corrcoef(y, ids)),
        }
