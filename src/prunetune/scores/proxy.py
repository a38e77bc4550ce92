"""Held-out loss proxy: how much the loss on rows the rounds never train on rises when one PEFT unit is switched
off (forward passes only). It measures the quantity the first-order criteria estimate (taylor, gradient, ...)
directly, so the warm-up can rank those criteria by how well they predict it.

>>> spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
0.5
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch


@torch.no_grad()
def mean_loss(model, batches: list[dict], device: torch.device) -> float:
    """Mean of the per-batch losses (the batches are fixed, so every unit is judged on the same rows)."""
    total = 0.0
    for b in batches:
        total += float(model(**{k: v.to(device) for k, v in b.items()}).loss)
    return total / max(1, len(batches))


@torch.no_grad()
def drop_loss(model, units: list[str], switched_off: Callable[[str], AbstractContextManager], batches: list[dict],
              device: torch.device) -> dict[str, float]:
    """unit -> held-out loss with the unit off minus with every unit on (higher: the unit matters more).
    Evaluated in eval mode (no dropout: the difference is the unit's, not the dropout draw's); the model's
    training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        base = mean_loss(model, batches, device)
        out = {}
        for u in units:
            with switched_off(u):
                out[u] = mean_loss(model, batches, device) - base
        return out
    finally:
        model.train(was_training)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant (no ranking)."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(spearmanr(x, y).statistic)
