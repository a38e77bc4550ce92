"""What least-squares reconstruction leaves of each head and FFN neuron (prune.reconstruct_scores).

With prune.reconstruct, surgery rebuilds a removed unit's contribution to o / down from the kept units' inputs,
as far as they predict it. Removing a unit then costs only the part of its input the kept units cannot predict:
its residual. The Taylor score |m dL/dm| prices the whole contribution, so among units of equal score it cannot
tell the one the others rebuild from the one nobody can. `select_kept` chooses, layer by layer, which units go:
one at a time, the unit with the least score x share goes, where share = sqrt(residual variance / variance) of its
input given the units still kept (1: nothing recoverable, as in plain pruning; 0: a linear copy of kept units).
One at a time, because two copies of each other both look free while both are kept (the greedy order of ZipLM's
structured OBS; the share weighs a unit's input columns by their energy, not by its output weights). How many
units each layer loses stays the plan's, so the plan's constraints and predicted speed hold.
"""
from __future__ import annotations

import math

import torch

MAX_STEPS = 512  # greedy removals per layer; wider layers remove ceil(n / MAX_STEPS) units per step


def _columns(units: list[int], width: int) -> torch.Tensor:
    """Input columns of these units, `width` consecutive columns each (the layout of surgery's _span)."""
    units_t = torch.as_tensor(sorted(units), dtype=torch.long)
    return (units_t[:, None] * width + torch.arange(width)).flatten()


def ridge(c: torch.Tensor, kept: list[int], width: int, damp: float) -> float:
    """surgery.base.reconstruct's ridge d = damp x the mean diagonal of C over the kept units' columns (damp 0: a
    vanishing one, so dead inputs stay invertible)."""
    diag = c.diagonal()[_columns(kept, width).to(c.device)] if kept else c.diagonal()
    return max(damp, 1e-12) * float(diag.mean().clamp_min(1e-12))


def _layer_shares(c: torch.Tensor, kept: list[int], width: int, d: float) -> torch.Tensor:
    """One layer's moment matrix c (n_units * width square, float64), kept units and ridge d -> per unit share.

    A removed unit R is predicted from the kept units K: its residual covariance is C_RR - C_RK (C_KK + dI)^-1 C_KR.
    A kept unit R is predicted from K without itself. Its residual covariance is the Schur complement of R in
    C_KK + dI, minus its own ridge: ((C_KK + dI)^-1)_RR^-1 - dI. One inverse serves every kept unit.
    The share is sqrt(trace(residual) / trace(C_RR)) in [0, 1] (1 for a unit whose input never moved)."""
    n_units = c.shape[0] // width
    var = c.diagonal().view(n_units, width).sum(1)
    kept = sorted(set(kept))
    residual = var.clone()  # nothing kept: nothing predicts anything
    if kept:
        k = _columns(kept, width).to(c.device)
        inv = torch.linalg.inv(c[k][:, k] + d * torch.eye(len(k), dtype=c.dtype, device=c.device))
        kept_set = set(kept)
        gone = [u for u in range(n_units) if u not in kept_set]
        if gone:
            r = _columns(gone, width).to(c.device)
            c_rk = c[r][:, k]
            per_col = c.diagonal()[r] - ((c_rk @ inv) * c_rk).sum(1)
            residual[torch.tensor(gone, device=c.device)] = per_col.view(len(gone), width).sum(1)
        pos = torch.arange(len(k), device=c.device).view(len(kept), width)  # each kept unit's places inside K
        blocks = inv[pos[:, :, None], pos[:, None, :]]  # (kept, width, width)
        schur = torch.linalg.inv(blocks).diagonal(dim1=1, dim2=2).sum(1) - width * d
        residual[torch.tensor(kept, device=c.device)] = schur
    return torch.where(var > 0, (residual / var.clamp_min(1e-300)).clamp(0.0, 1.0).sqrt(), 1.0)


def _greedy_kept(c: torch.Tensor, score: torch.Tensor, n_remove: int, width: int, d: float) -> list[int]:
    """One layer: remove n_remove units, each step the least score x share given the units still kept (ridge d
    throughout). The inverse of the kept units' (C + dI) is downdated in place (a removed unit's rows and columns
    fall to zero), so a step costs one rank-(width x units removed) update of the full matrix."""
    n_units = c.shape[0] // width
    var = c.diagonal().view(n_units, width).sum(1)
    eye = torch.eye(len(c), dtype=c.dtype, device=c.device)
    inv = torch.linalg.inv(c + d * eye)
    pos = torch.arange(n_units * width, device=c.device).view(n_units, width)
    alive = torch.ones(n_units, dtype=torch.bool, device=c.device)
    score = score.to(device=c.device, dtype=torch.float64).clamp_min(0.0)  # a loss estimate: never negative
    per_step = math.ceil(n_remove / MAX_STEPS) if n_remove else 1
    removed = 0
    while removed < n_remove:
        if width == 1:
            residual = 1.0 / inv.diagonal().abs().clamp_min(1e-300) - d
        else:  # a removed unit's block is zero: an identity keeps the batched inverse defined
            blocks = inv[pos[:, :, None], pos[:, None, :]] + torch.diag_embed(
                (~alive).to(c.dtype)[:, None].expand(n_units, width))
            residual = torch.linalg.inv(blocks).diagonal(dim1=1, dim2=2).sum(1) - width * d
        share = torch.where(var > 0, (residual / var.clamp_min(1e-300)).clamp(0.0, 1.0).sqrt(), 1.0)
        cost = torch.where(alive, score * share, torch.inf)
        take = min(per_step, n_remove - removed)
        units = cost.argsort(stable=True)[:take]  # ties: the lowest index (deterministic)
        cols = pos[units].flatten()
        # the inverse over the others: inv -= inv[:, U] inv[U, U]^-1 inv[U, :]; U's rows and columns become 0
        inv.addmm_(inv[:, cols], torch.linalg.solve(inv[cols][:, cols], inv[cols, :]), alpha=-1.0)
        inv[cols, :] = 0.0
        inv[:, cols] = 0.0
        alive[units] = False
        removed += take
    return alive.nonzero().flatten().tolist()


@torch.no_grad()
def select_kept(moments, *, head_scores: list[torch.Tensor], ffn_scores: list[torch.Tensor],
                kept_heads: list[list[int]], kept_neurons: list[list[int]], head_width: int, damp: float,
                device: torch.device | str | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, as many kept head units (KV groups on GQA) and FFN neurons as kept_heads / kept_neurons hold
    (a plan's), chosen greedily by score x what reconstruction cannot rebuild (`_greedy_kept`; the ridge is
    surgery's over the plan's kept units, whose count the choice keeps).
    moments: (o-input, down-input) x x^T per layer (StructureMasks.take_moments); scores: non-negative loss
    estimates (Taylor); head_width: input columns per head unit (heads per unit x head dim); damp:
    prune.reconstruct_damp; device: where the float64 work runs (the model's: a GPU makes wide FFNs quick).

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
    out = []
    for kind_moments, kind_scores, kind_kept, width in ((moments[0], head_scores, kept_heads, head_width),
                                                        (moments[1], ffn_scores, kept_neurons, 1)):
        layers = []
        for c, s, k in zip(kind_moments, kind_scores, kind_kept):
            if len(k) == len(s):  # nothing removed here
                layers.append(sorted(k))
                continue
            c = torch.as_tensor(c, dtype=torch.float64).to(device or "cpu")
            layers.append(_greedy_kept(c, s, len(s) - len(k), width, ridge(c, list(k), width, damp)))
        out.append(layers)
    return out[0], out[1]


@torch.no_grad()
def residual_shares(moments, *, kept_heads: list[list[int]], kept_neurons: list[list[int]], head_width: int,
                    damp: float, device: torch.device | str | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the share of each head unit's (KV group's, on GQA) and each FFN neuron's input that the
    reconstruction over the kept units cannot recover, given kept_heads / kept_neurons (a plan's): a removed unit
    as surgery rebuilds it from the kept ones, a kept unit as the others would rebuild it. Arguments as
    `select_kept`'s.

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
    out = []
    for kind_moments, kind_kept, width in ((moments[0], kept_heads, head_width), (moments[1], kept_neurons, 1)):
        layers = []
        for c, kept in zip(kind_moments, kind_kept):
            c = torch.as_tensor(c, dtype=torch.float64).to(device or "cpu")
            layers.append(_layer_shares(c, list(kept), width, ridge(c, list(kept), width, damp)).cpu()
                          if c.numel() else torch.ones(0, dtype=torch.float64))
        out.append(layers)
    return out[0], out[1]
