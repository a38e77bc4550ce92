"""What least-squares reconstruction leaves of each head and FFN neuron (prune.reconstruct_scores).

With prune.reconstruct, surgery rebuilds a removed unit's contribution to o / down from the kept units' inputs,
as far as they predict it. Removing a unit then costs only the part of its input the kept units cannot predict:
its residual. The Taylor score |m dL/dm| prices the whole contribution, so among units of equal score it cannot
tell the one the others rebuild from the one nobody can. `select_kept` chooses, layer by layer, which units go:
one at a time, the unit with the least score x share goes, where share = sqrt(residual variance / variance) of its
input given the units still kept (1: nothing recoverable, as in plain pruning; 0: a linear copy of kept units).
One at a time, because two copies of each other both look free while both are kept (the greedy structured OBS
of ZipLM). How many units each layer loses stays the plan's, so the plan's constraints and predicted speed hold.
"""
from __future__ import annotations

import torch


def _columns(units: list[int], width: int) -> torch.Tensor:
    """Input columns of these units, `width` consecutive columns each."""
    units_t = torch.as_tensor(sorted(units), dtype=torch.long)
    return (units_t[:, None] * width + torch.arange(width)).flatten()


def _layer_shares(c: torch.Tensor, kept: list[int], width: int, damp: float) -> torch.Tensor:
    """One layer's moment matrix c (n_units * width square, float64) and kept units -> per unit share in [0, 1].

    A removed unit R is predicted from the kept units K: its residual covariance is C_RR - C_RK (C_KK + dI)^-1 C_KR.
    A kept unit R is predicted from K without itself. Its residual covariance is the Schur complement of R in
    C_KK + dI, minus its own ridge: ((C_KK + dI)^-1)_RR^-1 - dI. One inverse serves every kept unit.
    The share is sqrt(trace(residual) / trace(C_RR)): the fraction, in norm, of the unit's input (and so, for a
    unit whose output weights act on its columns alike, of its output) that reconstruction cannot recover."""
    n_units = c.shape[0] // width
    var = c.diagonal().view(n_units, width).sum(1)
    kept = sorted(set(kept))
    residual = var.clone()  # nothing kept: nothing predicts anything
    if kept:
        k = _columns(kept, width)
        c_kk = c[k][:, k]
        d = _ridge(c_kk, damp)
        inv = torch.linalg.inv(c_kk + d * torch.eye(len(k), dtype=c.dtype))
        gone = [u for u in range(n_units) if u not in set(kept)]
        if gone:
            r = _columns(gone, width)
            c_rk = c[r][:, k]
            per_col = c.diagonal()[r] - ((c_rk @ inv) * c_rk).sum(1)
            residual[torch.tensor(gone)] = per_col.view(len(gone), width).sum(1)
        pos = torch.arange(len(k)).view(len(kept), width)  # each kept unit's positions inside K
        blocks = inv[pos[:, :, None], pos[:, :, None].transpose(1, 2)]  # (kept, width, width)
        schur = torch.linalg.inv(blocks).diagonal(dim1=1, dim2=2).sum(1) - width * d
        residual[torch.tensor(kept)] = schur
    share = torch.ones(n_units, dtype=torch.float64)
    live = var > 0  # a unit whose input never moved costs nothing either way: its score is left as it is
    share[live] = (residual[live] / var[live]).clamp(0.0, 1.0).sqrt()
    return share


def _ridge(c: torch.Tensor, damp: float) -> float:
    """surgery's ridge d = damp x mean diagonal; with damp 0 a vanishing one keeps dead inputs invertible."""
    return max(damp, 1e-12) * float(c.diagonal().mean().clamp_min(1e-12))


def _greedy_kept(c: torch.Tensor, score: torch.Tensor, n_remove: int, width: int, damp: float) -> list[int]:
    """One layer: remove n_remove units one at a time, each time the least score x share given the units still
    kept. The inverse of the kept units' (C + dI) is downdated in place (a removed unit's rows and columns fall to
    zero), so each removal costs one width-rank update of the full matrix."""
    n_units = c.shape[0] // width
    var = c.diagonal().view(n_units, width).sum(1)
    d = _ridge(c, damp)
    inv = torch.linalg.inv(c + d * torch.eye(len(c), dtype=c.dtype))
    pos = torch.arange(n_units * width).view(n_units, width)
    alive = torch.ones(n_units, dtype=torch.bool)
    score = score.to(torch.float64)
    for _ in range(n_remove):
        if width == 1:
            residual = 1.0 / inv.diagonal().clamp_min(1e-300) - d
        else:
            residual = torch.linalg.inv(inv[pos[:, :, None], pos[:, None, :]] + torch.diag_embed(
                (~alive).double()[:, None].expand(n_units, width))).diagonal(dim1=1, dim2=2).sum(1) - width * d
        share = torch.where(var > 0, (residual / var.clamp_min(1e-300)).clamp(0.0, 1.0).sqrt(), 1.0)
        cost = torch.where(alive, score * share, torch.inf)
        u = int(cost.argmin())  # ties: the lowest index (deterministic)
        cols = pos[u]
        block = inv[cols][:, cols]
        inv -= inv[:, cols] @ torch.linalg.solve(block, inv[cols, :])  # the inverse over the others, u zeroed
        inv[cols, :] = 0.0
        inv[:, cols] = 0.0
        alive[u] = False
    return alive.nonzero().flatten().tolist()


@torch.no_grad()
def select_kept(moments, *, head_scores: list[torch.Tensor], ffn_scores: list[torch.Tensor],
                kept_heads: list[list[int]], kept_neurons: list[list[int]], head_width: int, damp: float
                ) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, as many kept head units (KV groups on GQA) and FFN neurons as kept_heads / kept_neurons hold
    (a plan's), chosen greedily by score x what reconstruction cannot rebuild (`_greedy_kept`).
    moments: (o-input, down-input) x x^T per layer (StructureMasks.take_moments); head_width: input columns per
    head unit (heads per unit x head dim); damp: prune.reconstruct_damp, as surgery uses it.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(500, 4, dtype=torch.float64)
    >>> x[:, 3] = 2 * x[:, 0]                         # neuron 3 copies neuron 0
    >>> c = (x.T @ x / len(x))[None]
    >>> score = [torch.tensor([1.0, 0.5, 0.9, 1.0])]   # by score alone, neuron 1 would go
    >>> _, kept = select_kept((c[:, :0, :0], c), head_scores=[torch.ones(0)], ffn_scores=score, kept_heads=[[]],
    ...                       kept_neurons=[[0, 2, 3]], head_width=1, damp=0.01)
    >>> sorted(set(kept[0]) & {1, 2}), len(set(kept[0]) & {0, 3})   # one copy goes; then the other is needed
    ([1, 2], 1)
    """
    heads = [sorted(_greedy_kept(torch.as_tensor(c, dtype=torch.float64), s, len(s) - len(k), head_width, damp))
             if len(k) < len(s) else sorted(k) for c, s, k in zip(moments[0], head_scores, kept_heads)]
    ffn = [sorted(_greedy_kept(torch.as_tensor(c, dtype=torch.float64), s, len(s) - len(k), 1, damp))
           if len(k) < len(s) else sorted(k) for c, s, k in zip(moments[1], ffn_scores, kept_neurons)]
    return heads, ffn


@torch.no_grad()
def residual_shares(moments, *, kept_heads: list[list[int]], kept_neurons: list[list[int]], head_width: int,
                    damp: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the share of each head unit's (KV group's, on GQA) and each FFN neuron's input that the
    reconstruction over the kept units cannot recover, given kept_heads / kept_neurons (a plan's).
    moments: (o-input, down-input) x x^T per layer (StructureMasks.take_moments); head_width: input columns per
    head unit (heads per unit x head dim); damp: prune.reconstruct_damp, as surgery uses it.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(500, 3, dtype=torch.float64)
    >>> x[:, 2] = 2 * x[:, 0]                         # neuron 2 copies neuron 0
    >>> c = (x.T @ x / len(x))[None]
    >>> _, (share,) = residual_shares((c[:, :0, :0], c), kept_heads=[[]], kept_neurons=[[0, 1]], head_width=1,
    ...                               damp=0.0)
    >>> [round(float(s), 2) for s in share]          # 2 is rebuilt from 0; 0 is not (its copy goes)
    [1.0, 1.0, 0.0]
    """
    heads = [_layer_shares(torch.as_tensor(c, dtype=torch.float64), kept, head_width, damp) if c.numel() else
             torch.ones(0, dtype=torch.float64) for c, kept in zip(moments[0], kept_heads)]
    ffn = [_layer_shares(torch.as_tensor(c, dtype=torch.float64), kept, 1, damp)
           for c, kept in zip(moments[1], kept_neurons)]
    return heads, ffn
