"""Held-out loss proxy: how much the loss on rows the rounds never train on rises when one PEFT unit is switched
off (forward passes only). It measures the quantity the first-order criteria estimate (taylor, gradient, ...)
directly, so the warm-up can rank those criteria by how well they predict it.

>>> spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
0.5
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Sequence

import torch

# Above this share of units whose removal LOWERS the held-out loss (a supernet that over-fits or overshoots), the
# proxy ranks units backwards: the warm-up warns and the report says so.
TURNED = 0.5


@torch.no_grad()
def mean_loss(model, batches: list[dict], device: torch.device) -> float:
    """Mean of the per-batch losses (the batches are fixed, so every unit is judged on the same rows)."""
    total = 0.0
    for b in batches:
        total += float(model(**{k: v.to(device) for k, v in b.items()}).loss)
    return total / max(1, len(batches))


@torch.no_grad()
def drop_loss(model, units: list[str], switched_off: Callable[[str], AbstractContextManager], batches: list[dict],
              device: torch.device, blocks: Sequence[torch.nn.Module] | None = None,
              unit_block: dict[str, int] | None = None) -> dict[str, float]:
    """unit -> held-out loss with the unit off minus with every unit on (higher: the unit matters more).
    Evaluated in eval mode (no dropout: the difference is the unit's, not the dropout draw's); the model's
    training mode is restored afterwards.

    With `blocks` (the model's layer stack, in order) and `unit_block` (unit -> the first block it changes):
    switching off a unit in block L leaves blocks 0..L-1 as they were, so their outputs from the all-on pass
    are replayed and only blocks L.. run again. Same numbers, about half the forward work on average."""
    was_training = model.training
    model.eval()
    try:
        if blocks is None or unit_block is None:
            base = mean_loss(model, batches, device)
            out = {}
            for u in units:
                with switched_off(u):
                    out[u] = mean_loss(model, batches, device) - base
            return out
        # per batch, so only one batch's block outputs are held at a time; sums run in batch order as above
        base_total, totals = 0.0, dict.fromkeys(units, 0.0)
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with _blocks_recorded(blocks) as outputs:
                base_total += float(model(**b).loss)
            for u in units:
                with switched_off(u), _blocks_replayed(blocks, outputs, unit_block[u]):
                    totals[u] += float(model(**b).loss)
        n = max(1, len(batches))
        return {u: totals[u] / n - base_total / n for u in units}
    finally:
        model.train(was_training)


@contextmanager
def _blocks_recorded(blocks: Sequence[torch.nn.Module]):
    """Each block's forward output of the next call (what `forward` returns, before the block's own hooks,
    which run again on replay as they did here)."""
    outputs: list = [None] * len(blocks)

    def recording(i, forward):
        def run(*args, **kwargs):
            outputs[i] = forward(*args, **kwargs)
            return outputs[i]
        return run

    with _forwards(blocks, {i: recording(i, blk.forward) for i, blk in enumerate(blocks)}):
        yield outputs


@contextmanager
def _blocks_replayed(blocks: Sequence[torch.nn.Module], outputs: list, first: int):
    """Blocks below `first` return their recorded outputs without computing (their inputs are unchanged)."""
    with _forwards(blocks, {i: (lambda *_a, _o=outputs[i], **_k: _o) for i in range(first)}):
        yield


@contextmanager
def _forwards(blocks: Sequence[torch.nn.Module], replacements: dict):
    """Swap the given blocks' forward methods for the duration (instance attributes shadow the class's)."""
    before = {i: blocks[i].__dict__.get("forward") for i in replacements}  # an instance forward already set
    try:
        for i, fn in replacements.items():
            blocks[i].forward = fn
        yield
    finally:
        for i, fn in before.items():
            if fn is None:
                blocks[i].__dict__.pop("forward", None)
            else:
                blocks[i].forward = fn


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant (no ranking)."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(spearmanr(x, y).statistic)
